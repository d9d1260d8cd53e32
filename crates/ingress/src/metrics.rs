use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The edge's share of the runner's Prometheus metrics.
#[derive(Clone)]
pub struct EdgeMetrics {
    /// By status code and, for the runner's own answers, error code.
    pub requests: Family<Vec<(&'static str, String)>, Counter>,
    /// Upgraded connections and response bodies closed by a bound, by kind
    /// (`upgrade`, `body`) and bound (`idle`, `lifetime`).
    pub streams_cut: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl EdgeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self { requests: Family::default(), streams_cut: Family::default() };
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
        let mut labels = vec![("status", status.to_string())];
        if let Some(code) = code {
            labels.push(("code", code.to_owned()));
        }
        self.requests.get_or_create(&labels).inc();
    }
}
