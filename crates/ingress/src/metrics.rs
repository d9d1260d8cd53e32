use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::bounds::{Breach, ListenerKind};

/// The edge's share of the runner's Prometheus metrics.
#[derive(Clone)]
pub struct EdgeMetrics {
    /// By status code and, for the runner's own answers, error code.
    pub requests: Family<Vec<(&'static str, String)>, Counter>,
    /// Upgraded connections and response bodies closed by a bound, by kind
    /// (`upgrade`, `body`) and bound (`idle`, `lifetime`).
    pub streams_cut: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// The tenant's own answers' counters by status, found once: a request
    /// then costs an atomic add, not a label vector and a family lookup.
    by_status: std::sync::Arc<[std::sync::OnceLock<Counter>]>,
    /// From the request head to the response head (time to first byte), by
    /// status class: five series, whatever the traffic.
    head_seconds: [Histogram; 5],
}

/// Time-to-first-byte buckets: half a millisecond (a warm hop) to 30 s.
const HEAD_SECONDS_BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl EdgeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let head_family: Family<[(&'static str, &'static str); 1], Histogram> =
            Family::new_with_constructor(|| Histogram::new(HEAD_SECONDS_BUCKETS));
        let metrics = Self {
            requests: Family::default(),
            streams_cut: Family::default(),
            by_status: (0..1000).map(|_| std::sync::OnceLock::new()).collect(),
            head_seconds: STATUS_CLASSES.map(|class| head_family.get_or_create(&[("class", class)]).clone()),
        };
        registry.register(
            "isocloud_response_head_seconds",
            "From a request's head to its response's head (time to first byte), by status class; \
             boots included",
            head_family,
        );
        registry.register("isocloud_requests", "Requests answered, by status", metrics.requests.clone());
        registry.register(
            "isocloud_streams_cut",
            "Upgraded connections and response bodies closed by the idle or lifetime bound",
            metrics.streams_cut.clone(),
        );
        metrics
    }

    pub fn count_stream_cut(&self, kind: &'static str, bound: &'static str) {
        self.streams_cut.get_or_create(&vec![("kind", kind), ("bound", bound)]).inc();
    }

    /// A response head sent `elapsed` after its request's head arrived.
    pub fn observe_head(&self, status: u16, elapsed: std::time::Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.head_seconds[class].observe(elapsed.as_secs_f64());
    }

    pub fn count(&self, status: u16, code: Option<&'static str>) {
        if code.is_none()
            && let Some(counter) = self.by_status.get(usize::from(status))
        {
            counter.get_or_init(|| self.requests.get_or_create(&vec![("status", status.to_string())]).clone()).inc();
            return;
        }
        let mut labels = vec![("status", status.to_string())];
        if let Some(code) = code {
            labels.push(("code", code.to_owned()));
        }
        self.requests.get_or_create(&labels).inc();
    }
}

/// What every listener's bounds did: breaches by listener and reason, and
/// the connections each listener holds now.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    breaches: Family<[(&'static str, &'static str); 2], Counter>,
    open: Family<[(&'static str, &'static str); 1], Gauge>,
}

impl ListenerMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self { breaches: Family::default(), open: Family::default() };
        registry.register(
            "isocloud_listener_breaches",
            "Connections cut or refused by a listener's bounds, by listener and reason \
             (head_timeout, body_timeout, per_peer_cap, total_cap)",
            metrics.breaches.clone(),
        );
        registry.register(
            "isocloud_listener_connections",
            "Connections each listener holds open",
            metrics.open.clone(),
        );
        metrics
    }

    /// Shows a listener's series at 0 from the start (alerts see a rise,
    /// not a series appearing).
    pub(crate) fn prepare(&self, listener: ListenerKind, body_bound: bool) {
        for breach in Breach::ALL {
            if breach != Breach::BodyTimeout || body_bound {
                let _ = self.breaches.get_or_create(&[("listener", listener.label()), ("reason", breach.label())]);
            }
        }
        let _ = self.open.get_or_create(&[("listener", listener.label())]);
    }

    pub(crate) fn count_breach(&self, listener: ListenerKind, breach: Breach) {
        self.breaches.get_or_create(&[("listener", listener.label()), ("reason", breach.label())]).inc();
    }

    pub(crate) fn set_open(&self, listener: ListenerKind, open: usize) {
        self.open.get_or_create(&[("listener", listener.label())]).set(open as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn response_heads_are_timed_by_status_class_in_five_series() {
        let mut registry = Registry::default();
        let metrics = EdgeMetrics::new(&mut registry);
        metrics.observe_head(204, Duration::from_micros(700));
        metrics.observe_head(200, Duration::from_millis(3));
        metrics.observe_head(502, Duration::from_secs(2));
        metrics.observe_head(999, Duration::from_millis(1));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line =
            |series: &str| text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series} in {text}"));
        assert!(line("isocloud_response_head_seconds_count{class=\"2xx\"}").ends_with(" 2"), "{text}");
        assert!(line("isocloud_response_head_seconds_bucket{le=\"0.001\",class=\"2xx\"}").ends_with(" 1"), "{text}");
        assert!(
            line("isocloud_response_head_seconds_count{class=\"5xx\"}").ends_with(" 2"),
            "an odd status is 5xx: {text}"
        );
        assert!(line("isocloud_response_head_seconds_bucket{le=\"1.0\",class=\"5xx\"}").ends_with(" 1"), "{text}");
        assert_eq!(text.matches("isocloud_response_head_seconds_count{").count(), 5, "{text}");
    }
}
