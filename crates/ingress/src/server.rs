//! Accepting connections (plain and TLS), and draining them on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::Proxy;
use crate::body::full;
use crate::bounds::{Gate, ListenerBounds};
use crate::connection::{self, Accepted};
use crate::metrics::ListenerMetrics;
use crate::proxy::ConnectionInfo;
use crate::readiness::Readiness;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// After the shutdown signal: how long in-flight requests may finish.
    pub drain_timeout: Duration,
    /// Request line plus headers, at most; past it HTTP/1.1 clients get 431.
    pub max_header_bytes: usize,
    /// Where the listeners' breaches are counted.
    pub metrics: ListenerMetrics,
    /// Answers the edge's health probe (`GET /healthz` with
    /// [`crate::HEALTH_PROBE_HEADER`]) before any routing.
    pub readiness: Readiness,
}

/// One public listener; with an acceptor, it speaks TLS (ALPN h2 and
/// http/1.1). Its head timeout and connection caps are `bounds`'.
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub bounds: ListenerBounds,
}

/// A connection on its way to its task, with its listener's TLS, gate and
/// connection builder.
type Admitted = (Accepted, Option<TlsAcceptor>, Arc<Gate>, auto::Builder<TokioExecutor>);

/// Serves `proxy` on `listeners` until `shutdown` resolves, then stops
/// accepting, lets in-flight requests finish for at most the drain timeout,
/// and ends every isolate.
pub async fn serve(
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    // Each connection holds a receiver; at shutdown the value is sent (they
    // close gracefully) and the drain waits for every receiver to drop.
    let (drain_tx, drain_rx) = watch::channel(());
    let (accepted_tx, mut accepted) = mpsc::channel::<Admitted>(64);
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let builder = connection::builder(Some(options.max_header_bytes));
            let gate = Gate::new(listener.bounds, options.metrics.clone());
            tokio::spawn(accept_loop(listener.tcp, listener.tls, gate, builder, accepted_tx.clone()))
        })
        .collect();
    drop(accepted_tx);

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            next = accepted.recv() => {
                let Some((accepted, tls, gate, builder)) = next else { break };
                let proxy = proxy.clone();
                let readiness = options.readiness.clone();
                let connection = ConnectionInfo { peer: accepted.peer, secure: tls.is_some() };
                tokio::spawn(connection::serve_connection(
                    accepted,
                    tls,
                    gate,
                    builder,
                    Some(drain_rx.clone()),
                    move |_: &Arc<connection::ConnState>| {
                        service_fn(move |request| {
                            let proxy = proxy.clone();
                            let probe = readiness.probe_answer(&request);
                            async move {
                                Ok::<_, std::convert::Infallible>(match probe {
                                    Some(answer) => answer.map(full),
                                    None => proxy.handle(request, connection).await,
                                })
                            }
                        })
                    },
                ));
            }
            () = &mut shutdown => break,
        }
    }
    for acceptor in acceptors {
        acceptor.abort();
    }
    tracing::info!(drain_timeout_s = options.drain_timeout.as_secs_f64(), "shutting down: draining in-flight requests");
    drop(drain_rx);
    let _ = drain_tx.send(());
    if tokio::time::timeout(options.drain_timeout, drain_tx.closed()).await.is_err() {
        tracing::warn!("drain timeout reached; ending the remaining requests");
    }
    proxy.isolates().shutdown().await;
    tracing::info!("every isolate has ended");
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gate: Arc<Gate>,
    builder: auto::Builder<TokioExecutor>,
    accepted: mpsc::Sender<Admitted>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Past a cap the stream is dropped here, unread.
                let Some(admitted) = connection::admit(&gate, stream, peer) else { continue };
                if accepted.send((admitted, tls.clone(), gate.clone(), builder.clone())).await.is_err() {
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
