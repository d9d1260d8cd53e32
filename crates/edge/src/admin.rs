//! The edge's admin listener: `/healthz` (ready: a host table and a runner
//! in, and not stopping — 503 `draining` through `--drain-delay-s`), `/metrics` (Prometheus) and `/runners` (each runner and whether it
//! is in), apart from public traffic and within the ingress's listener
//! bounds.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use isocloud_ingress::{BoundedBody, ListenerBounds, ListenerMetrics, Readiness, serve_bounded};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::hosts::HostTable;
use crate::runners::Runners;

/// Serves the admin routes on `listener` until the task is dropped.
pub async fn serve_admin(
    listener: TcpListener,
    bounds: ListenerBounds,
    metrics: ListenerMetrics,
    registry: Arc<Registry>,
    table: Arc<RwLock<HostTable>>,
    runners: Arc<Runners>,
    readiness: Readiness,
) {
    let service = service_fn(move |request: http::Request<BoundedBody>| {
        let answer = match request.uri().path() {
            "/healthz" if readiness.is_draining() => {
                let (status, text) = readiness.health();
                (status, "text/plain", text.to_owned())
            }
            path => admin_answer(path, &registry, &table, &runners),
        };
        async move {
            let (status, content_type, body) = answer;
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    serve_bounded(listener, bounds, metrics, service).await;
}

fn admin_answer(
    path: &str,
    registry: &Registry,
    table: &RwLock<HostTable>,
    runners: &Runners,
) -> (StatusCode, &'static str, String) {
    match path {
        "/healthz" => {
            let loaded = table.read().unwrap_or_else(|p| p.into_inner()).generation().is_some();
            match (loaded, runners.any_up()) {
                (true, true) => (StatusCode::OK, "text/plain", "ok\n".into()),
                (false, _) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no host table yet from the control plane\n".into())
                }
                (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "every runner is out\n".into()),
            }
        }
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding failed\n".into()),
            }
        }
        "/runners" => {
            let list: Vec<serde_json::Value> = runners
                .list()
                .iter()
                .map(|runner| serde_json::json!({ "runner": runner.name(), "up": runner.is_up() }))
                .collect();
            (StatusCode::OK, "application/json", serde_json::Value::from(list).to_string())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
