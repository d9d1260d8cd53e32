//! The admin listener: health, Prometheus metrics and the running isolates,
//! apart from tenant traffic (never reachable from an isolate: the egress
//! proxy refuses its address).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::service::service_fn;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::body::full;
use crate::bounds::ListenerBounds;
use crate::connection::{BoundedBody, serve_bounded};
use crate::metrics::ListenerMetrics;
use crate::readiness::Readiness;

/// Serves `/healthz` (503 `draining` once `readiness` says the runner is
/// leaving), `/metrics` and `/isolates` (a JSON array of
/// [`isocloud_pool::IsolateView`]) within `bounds` until the task is
/// dropped.
pub async fn serve_admin(
    listener: TcpListener,
    bounds: ListenerBounds,
    metrics: ListenerMetrics,
    registry: Arc<Registry>,
    pool: isocloud_pool::Pool,
    readiness: Readiness,
) {
    let service = service_fn(move |request: http::Request<BoundedBody>| {
        let registry = registry.clone();
        let pool = pool.clone();
        let health = readiness.health();
        async move {
            let (status, content_type, body) = match request.uri().path() {
                "/healthz" => (health.0, "text/plain", health.1.to_owned()),
                "/metrics" => {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
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
    serve_bounded(listener, bounds, metrics, service).await;
}
