use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The edge's share of the runner's Prometheus metrics.
#[derive(Clone)]
pub struct EdgeMetrics {
    /// By status code and, for the runner's own answers, error code.
    pub requests: Family<Vec<(&'static str, String)>, Counter>,
}

impl EdgeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self { requests: Family::default() };
        registry.register("isocloud_requests", "Requests answered, by status", metrics.requests.clone());
        metrics
    }

    pub fn count(&self, status: u16, code: Option<&'static str>) {
        let mut labels = vec![("status", status.to_string())];
        if let Some(code) = code {
            labels.push(("code", code.to_owned()));
        }
        self.requests.get_or_create(&labels).inc();
    }
}
