//! Accepting connections, and draining them on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::Proxy;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// After the shutdown signal: how long in-flight requests may finish.
    pub drain_timeout: Duration,
    /// Request line plus headers, at most; past it HTTP/1.1 clients get 431.
    pub max_header_bytes: usize,
    /// A client must send its whole head within this (slowloris).
    pub header_timeout: Duration,
}

/// Serves `proxy` on `listener` until `shutdown` resolves, then stops
/// accepting, lets in-flight requests finish for at most the drain timeout,
/// and ends every isolate.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper answers 431 itself when the head does not fit (HTTP/1.1), and
    // refuses an oversized header list (HTTP/2).
    builder
        .http1()
        .max_buf_size(options.max_header_bytes.max(8192))
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    builder.http2().max_header_list_size(options.max_header_bytes as u32);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                let service = service_fn(move |request| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, std::convert::Infallible>(proxy.handle(request).await) }
                });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::trace!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(drain_timeout_s = options.drain_timeout.as_secs_f64(), "shutting down: draining in-flight requests");
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain timeout reached; ending the remaining requests");
    }
    proxy.pool().shutdown().await;
    tracing::info!("every isolate has ended");
}
