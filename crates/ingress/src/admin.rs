//! The admin listener: health, Prometheus metrics and the running isolates,
//! apart from tenant traffic (never reachable from an isolate: the egress
//! proxy refuses its address).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::body::full;

/// Serves `/healthz`, `/metrics` and `/isolates` (a JSON array of
/// [`isocloud_pool::IsolateView`]) until the task is dropped.
pub async fn serve_admin(listener: TcpListener, registry: Arc<Registry>, pool: isocloud_pool::Pool) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let registry = registry.clone();
        let pool = pool.clone();
        let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let registry = registry.clone();
            let pool = pool.clone();
            async move {
                let (status, content_type, body) = match request.uri().path() {
                    "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                    "/metrics" => {
                        let mut text = String::new();
                        match prometheus_client::encoding::text::encode(&mut text, &registry) {
                            Ok(()) => {
                                (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text)
                            }
                            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding failed\n".into()),
                        }
                    }
                    "/isolates" => match serde_json::to_string(&pool.isolates()) {
                        Ok(json) => (StatusCode::OK, "application/json", json),
                        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding failed\n".into()),
                    },
                    _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                };
                let mut response = Response::new(full(Bytes::from(body)));
                *response.status_mut() = status;
                response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let builder = builder.clone();
        tokio::spawn(async move {
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
