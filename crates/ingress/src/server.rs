//! Accepting connections (plain and TLS), and draining them on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::Proxy;
use crate::proxy::ConnectionInfo;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// After the shutdown signal: how long in-flight requests may finish.
    pub drain_timeout: Duration,
    /// Request line plus headers, at most; past it HTTP/1.1 clients get 431.
    pub max_header_bytes: usize,
    /// A client must send its whole head within this (slowloris).
    pub header_timeout: Duration,
}

/// One public listener; with an acceptor, it speaks TLS (ALPN h2 and
/// http/1.1).
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<TlsAcceptor>,
}

/// A TLS client must finish its handshake within this.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `proxy` on `listeners` until `shutdown` resolves, then stops
/// accepting, lets in-flight requests finish for at most the drain timeout,
/// and ends every isolate.
pub async fn serve(
    listeners: Vec<Listener>,
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

    let (accepted_tx, mut accepted) = mpsc::channel::<(TcpStream, SocketAddr, Option<TlsAcceptor>)>(64);
    let acceptors: Vec<_> =
        listeners.into_iter().map(|listener| tokio::spawn(accept_loop(listener, accepted_tx.clone()))).collect();
    drop(accepted_tx);

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            next = accepted.recv() => {
                let Some((stream, peer, tls)) = next else { break };
                let proxy = proxy.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let connection = ConnectionInfo { peer, secure: tls.is_some() };
                    let service = service_fn(move |request| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, std::convert::Infallible>(proxy.handle(request, connection).await) }
                    });
                    let result = match tls {
                        None => {
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Some(acceptor) => {
                            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                    };
                    if let Err(e) = result {
                        tracing::trace!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    for acceptor in acceptors {
        acceptor.abort();
    }
    tracing::info!(drain_timeout_s = options.drain_timeout.as_secs_f64(), "shutting down: draining in-flight requests");
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain timeout reached; ending the remaining requests");
    }
    proxy.pool().shutdown().await;
    tracing::info!("every isolate has ended");
}

async fn accept_loop(listener: Listener, accepted: mpsc::Sender<(TcpStream, SocketAddr, Option<TlsAcceptor>)>) {
    loop {
        match listener.tcp.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                if accepted.send((stream, peer, listener.tls.clone())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
