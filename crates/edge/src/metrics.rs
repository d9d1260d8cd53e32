//! The edge's Prometheus figures (its admin listener's `/metrics`), beside
//! the ingress's request counter (`isocloud_requests`) and listener
//! breaches, which the edge shares.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct Metrics {
    /// Requests answered: the runners' answers by status, the edge's own
    /// errors by status and code (the ingress's counter, one name for both
    /// roles).
    pub requests: isocloud_ingress::EdgeMetrics,
    retries: Counter,
    runner_up: Family<[(&'static str, String); 1], Gauge>,
    routing_generation: Gauge,
    routing_deployments: Gauge,
    routing_reloads: Counter,
    routing_failures: Counter,
    certificates: Gauge,
    certificate_failures: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: isocloud_ingress::EdgeMetrics::new(registry),
            retries: Counter::default(),
            runner_up: Family::default(),
            routing_generation: Gauge::default(),
            routing_deployments: Gauge::default(),
            routing_reloads: Counter::default(),
            routing_failures: Counter::default(),
            certificates: Gauge::default(),
            certificate_failures: Counter::default(),
        };
        registry.register(
            "isocloud_edge_retries",
            "Idempotent requests sent again to the next runner of their ranking (the first failed before answering)",
            metrics.retries.clone(),
        );
        registry.register(
            "isocloud_edge_runner_up",
            "Whether each runner takes requests (1) or is out after failed health checks (0)",
            metrics.runner_up.clone(),
        );
        registry.register(
            "isocloud_edge_routing_generation",
            "The control plane's routing generation the host table is at",
            metrics.routing_generation.clone(),
        );
        registry.register(
            "isocloud_edge_routing_deployments",
            "Ready deployments in the host table",
            metrics.routing_deployments.clone(),
        );
        registry.register(
            "isocloud_edge_routing_reloads",
            "Host tables received whole (at start, or when the change log no longer reached back)",
            metrics.routing_reloads.clone(),
        );
        registry.register(
            "isocloud_edge_routing_failures",
            "Polls of the routing feed that failed (the table held kept serving)",
            metrics.routing_failures.clone(),
        );
        registry.register(
            "isocloud_edge_certificates",
            "Certificates held for --tls-listen (verified domains' own, from the control plane)",
            metrics.certificates.clone(),
        );
        registry.register(
            "isocloud_edge_certificate_failures",
            "Certificate fetches that failed (those held kept serving; retried after the next poll)",
            metrics.certificate_failures.clone(),
        );
        metrics
    }

    /// Figures registered nowhere (tests, and tools that show none).
    pub fn unregistered() -> Self {
        Self::new(&mut Registry::default())
    }

    pub(crate) fn retried(&self) {
        self.retries.inc();
    }

    pub(crate) fn runner_up(&self, runner: &str, up: bool) {
        self.runner_up.get_or_create(&[("runner", runner.to_owned())]).set(i64::from(up));
    }

    /// A runner no longer in the list: its series goes too.
    pub(crate) fn runner_gone(&self, runner: &str) {
        self.runner_up.remove(&[("runner", runner.to_owned())]);
    }

    pub(crate) fn routing_polled(&self, full: bool, generation: i64, deployments: usize) {
        if full {
            self.routing_reloads.inc();
        }
        self.routing_generation.set(generation);
        self.routing_deployments.set(deployments as i64);
    }

    pub(crate) fn routing_failed(&self) {
        self.routing_failures.inc();
    }

    pub(crate) fn certificates_held(&self, held: usize) {
        self.certificates.set(held as i64);
    }

    pub(crate) fn certificates_failed(&self) {
        self.certificate_failures.inc();
    }
}
