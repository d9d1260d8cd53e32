use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The pool's share of the runner's Prometheus metrics.
#[derive(Clone)]
pub struct PoolMetrics {
    pub boots: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub boot_seconds: Histogram,
    /// Boots by whether a pre-started isolate served them: `hit`, `miss`
    /// (none waiting), `unfit` (the deployment needs a process of its own).
    pub prestarted_boots: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Pre-started isolates waiting for a deployment.
    pub prestarted_waiting: Gauge,
    /// Packages whose entry modules pre-started isolates loaded (compiled,
    /// not evaluated) before they waited, summed over the isolates.
    pub prestarted_preloaded_packages: Counter,
    pub live_isolates: Gauge,
    pub terminations: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Activity events dropped undelivered, by `kind` (the event's `type`).
    pub activity: isocloud_activity::ActivityMetrics,
    pub deployments: crate::deployment_metrics::DeploymentMetrics,
    /// Boots waiting for a turn to start their deno process.
    pub boot_queue_length: Gauge,
    /// Deno processes starting now under admission (holding a turn).
    pub boots_starting: Gauge,
    /// From asking for a turn to getting it.
    pub boot_queue_wait_seconds: Histogram,
    /// Boots that had to wait for a turn.
    pub boots_queued: Counter,
    /// Boots refused, by `reason`: `max_isolates`, `tenant_cap`,
    /// `queue_full`, `tenant_queue_full` (the tenant's share of the queue),
    /// `queue_too_slow` (the wait at the recent pace would pass the bound),
    /// `queue_timeout`.
    pub boot_refusals: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// `--max-concurrent-boots` in force.
    pub boot_concurrency_limit: Gauge,
    /// Boots from a deployment's kept boot answer: its origin could not be
    /// reached (`--boot-stale-max-age-s`).
    pub stale_boots: Counter,
}

impl PoolMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            boots: Family::default(),
            prestarted_boots: Family::default(),
            prestarted_waiting: Gauge::default(),
            prestarted_preloaded_packages: Counter::default(),
            boot_seconds: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            live_isolates: Gauge::default(),
            terminations: Family::default(),
            activity: Default::default(),
            deployments: Default::default(),
            boot_queue_length: Gauge::default(),
            boots_starting: Gauge::default(),
            boot_queue_wait_seconds: Histogram::new([
                0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            boots_queued: Counter::default(),
            boot_refusals: Family::default(),
            boot_concurrency_limit: Gauge::default(),
            stale_boots: Counter::default(),
        };
        registry.register_collector(Box::new(metrics.deployments.clone()));
        registry.register("isocloud_boots", "Isolate boots by result", metrics.boots.clone());
        registry.register(
            "isocloud_boot_duration_seconds",
            "Boot latency, origin to first byte served",
            metrics.boot_seconds.clone(),
        );
        registry.register(
            "isocloud_prestarted_boots",
            "Boots by whether a pre-started isolate served them (hit, miss, unfit, code_cache: a re-boot that starts its own deno to use its compiled code)",
            metrics.prestarted_boots.clone(),
        );
        registry.register(
            "isocloud_prestarted_waiting",
            "Pre-started isolates waiting for a deployment",
            metrics.prestarted_waiting.clone(),
        );
        registry.register(
            "isocloud_prestarted_preloaded_packages",
            "Packages of a bound set whose entry modules pre-started isolates loaded (compiled, not evaluated) before they waited",
            metrics.prestarted_preloaded_packages.clone(),
        );
        registry.register("isocloud_live_isolates", "Isolates running now", metrics.live_isolates.clone());
        registry.register("isocloud_isolate_terminations", "Isolates ended, by reason", metrics.terminations.clone());
        registry.register(
            "isocloud_activity_events_dropped",
            "Activity events dropped undelivered (spool full, logs first; never usage), by kind",
            metrics.activity.dropped.clone(),
        );
        registry.register(
            "isocloud_activity_spool_bytes",
            "Bytes of activity batches waiting in the on-disk spool",
            metrics.activity.spool_bytes.clone(),
        );
        registry.register(
            "isocloud_activity_spool_batches",
            "Activity batches waiting in the on-disk spool",
            metrics.activity.spool_batches.clone(),
        );
        registry.register(
            "isocloud_boot_queue_length",
            "Boots waiting for a turn to start their deno process",
            metrics.boot_queue_length.clone(),
        );
        registry.register(
            "isocloud_boots_starting",
            "Deno processes starting now under boot admission",
            metrics.boots_starting.clone(),
        );
        registry.register(
            "isocloud_boot_queue_wait_seconds",
            "How long each admitted boot waited for its turn (0 when one was free)",
            metrics.boot_queue_wait_seconds.clone(),
        );
        registry.register("isocloud_boots_queued", "Boots that had to wait for a turn", metrics.boots_queued.clone());
        registry.register(
            "isocloud_boot_refusals",
            "Boots refused with 503 CAPACITY, by reason (max_isolates, tenant_cap, queue_full, tenant_queue_full, queue_too_slow, queue_timeout)",
            metrics.boot_refusals.clone(),
        );
        registry.register(
            "isocloud_boot_concurrency_limit",
            "Deno processes allowed to start at once (--max-concurrent-boots)",
            metrics.boot_concurrency_limit.clone(),
        );
        registry.register(
            "isocloud_stale_boots",
            "Boots from a deployment's last boot answer, kept on disk, while its origin could not be reached (--boot-stale-max-age-s)",
            metrics.stale_boots.clone(),
        );
        metrics
    }

    pub(crate) fn admission(&self) -> crate::admission::AdmissionMetrics {
        crate::admission::AdmissionMetrics {
            queue_length: self.boot_queue_length.clone(),
            running: self.boots_starting.clone(),
            wait_seconds: self.boot_queue_wait_seconds.clone(),
            queued: self.boots_queued.clone(),
            refusals: self.boot_refusals.clone(),
        }
    }
}
