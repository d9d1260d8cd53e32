//! Whether this process still wants new work. At a stop with a drain delay
//! (`--drain-delay-s`) it keeps serving everything for that long while its
//! health checks say it is leaving: the admin listener's `/healthz` answers
//! 503 (a load balancer's or Kubernetes' readiness probe), and the edge's
//! probe on the public listener — `GET /healthz` carrying
//! [`HEALTH_PROBE_HEADER`] — answers 503 with [`DRAINING_HEADER`], which
//! takes the runner out of the edge's rotation at once. Only then do the
//! listeners close, so no request is sent to a closed port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};

/// The header the edge's health probe carries: a request to `/healthz`
/// with it is answered by the runner itself, never by a deployment.
pub const HEALTH_PROBE_HEADER: &str = "x-isocloud-health-probe";
/// On the probe's answer while the runner is leaving.
pub const DRAINING_HEADER: &str = "x-isocloud-draining";

/// Shared by the listeners of one process; clones see the same state.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// From now on, health checks say this process is leaving.
    pub fn start_draining(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// `/healthz`'s status and text: 200 `ok`, or 503 `draining`.
    pub fn health(&self) -> (StatusCode, &'static str) {
        if self.is_draining() { (StatusCode::SERVICE_UNAVAILABLE, "draining\n") } else { (StatusCode::OK, "ok\n") }
    }

    /// The answer to the edge's probe, when `request` is one.
    pub fn probe_answer<B>(&self, request: &Request<B>) -> Option<Response<Bytes>> {
        if request.uri().path() != "/healthz" || !request.headers().contains_key(HEALTH_PROBE_HEADER) {
            return None;
        }
        let (status, text) = self.health();
        let mut response = Response::new(Bytes::from_static(text.as_bytes()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.is_draining() {
            headers.insert(DRAINING_HEADER, HeaderValue::from_static("1"));
        }
        Some(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, probe: bool) -> Request<()> {
        let mut builder = Request::get(path);
        if probe {
            builder = builder.header(HEALTH_PROBE_HEADER, "1");
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn only_the_probe_is_answered_and_it_says_when_the_process_is_leaving() {
        let readiness = Readiness::default();
        assert!(readiness.probe_answer(&request("/healthz", false)).is_none(), "a tenant's /healthz");
        assert!(readiness.probe_answer(&request("/other", true)).is_none());
        let ok = readiness.probe_answer(&request("/healthz", true)).unwrap();
        assert_eq!(ok.status(), 200);
        assert!(!ok.headers().contains_key(DRAINING_HEADER));

        readiness.clone().start_draining();
        let leaving = readiness.probe_answer(&request("/healthz", true)).unwrap();
        assert_eq!(leaving.status(), 503);
        assert_eq!(leaving.headers()[DRAINING_HEADER], "1");
        assert_eq!(readiness.health(), (StatusCode::SERVICE_UNAVAILABLE, "draining\n"));
    }
}
