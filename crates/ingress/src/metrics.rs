use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
}

impl EdgeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            streams_cut: Family::default(),
            by_status: (0..1000).map(|_| std::sync::OnceLock::new()).collect(),
        };
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
