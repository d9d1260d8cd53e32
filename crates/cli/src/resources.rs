//! What the runner process holds, for `/metrics`, and its descriptor limit.
//!
//! The gauges sit beside `isocloud_live_isolates` so that a gap that grows
//! between them — descriptors, tasks, control listeners, cgroups, isolate
//! folders that outlive their isolates — is a graph an operator alerts on.

use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Raises the soft limit of open descriptors to the hard one and logs both.
pub fn raise_descriptor_limit() {
    match isocloud_sandbox::rlimits::raise_descriptor_limit() {
        Ok((before, now)) => tracing::info!(soft_before = before, soft = now, hard = now, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
}

fn count_entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|entries| entries.count()).unwrap_or(0)
}

fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status.lines().find_map(|l| l.strip_prefix("Threads:").and_then(|n| n.trim().parse().ok())))
        .unwrap_or(0)
}

struct ResourceCollector {
    cgroups: Option<Arc<isocloud_sandbox::Cgroups>>,
    instances_dir: PathBuf,
}

impl std::fmt::Debug for ResourceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResourceCollector")
    }
}

impl Collector for ResourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let held = isocloud_supervisor::held();
        let runtime = tokio::runtime::Handle::try_current().map(|h| h.metrics()).ok();
        let tasks = runtime.as_ref().map_or(0, |m| m.num_alive_tasks());
        let workers = runtime.as_ref().map_or(0, |m| m.num_workers());
        let gauges: [(&str, &str, i64); 12] = [
            (
                "isocloud_process_open_fds",
                "Descriptors the runner holds open",
                count_entries("/proc/self/fd".as_ref()) as i64,
            ),
            (
                "isocloud_process_max_fds",
                "The runner's soft descriptor limit",
                isocloud_sandbox::rlimits::descriptor_limit() as i64,
            ),
            ("isocloud_process_threads", "Threads of the runner process", threads() as i64),
            ("isocloud_runtime_alive_tasks", "Tasks alive in the runner's async runtime", tasks as i64),
            (
                "isocloud_runtime_threads",
                "Worker threads of the runner's async runtime (--runtime-threads)",
                workers as i64,
            ),
            (
                "isocloud_isolate_lifetimes",
                "Isolate lifetimes not yet ended (live, starting, pre-started)",
                held.lifetimes,
            ),
            ("isocloud_isolate_control_listeners", "Isolate control sockets bound", held.control_listeners),
            ("isocloud_isolate_control_connections", "Isolate control connections open", held.control_connections),
            (
                "isocloud_isolate_tasks",
                "Per-isolate tasks running (accept loops, control connections, output pumps, exit watchers, asset reads)",
                held.tasks,
            ),
            ("isocloud_isolate_materializing", "Asset reads being served for isolates", held.materializing),
            (
                "isocloud_isolate_cgroups",
                "Isolate memory cgroups that exist",
                self.cgroups.as_ref().map_or(0, |c| c.isolate_count()) as i64,
            ),
            ("isocloud_isolate_dirs", "Isolate folders in the state dir", count_entries(&self.instances_dir) as i64),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let breaches: [(&str, &str, i64); 3] = [
            (
                "isocloud_isolate_control_connections_refused",
                "Control connections refused past the per-isolate bound (4)",
                held.control_connections_refused,
            ),
            (
                "isocloud_isolate_control_messages_dropped",
                "Control messages dropped for being over 256 KiB",
                held.control_messages_dropped,
            ),
            (
                "isocloud_isolate_asset_reads_refused",
                "Asset reads refused past the per-isolate bound (16 at once)",
                held.materialize_refused,
            ),
        ];
        for (name, help, value) in breaches {
            let counter = ConstCounter::new(value.max(0) as u64);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

pub fn register(registry: &mut Registry, cgroups: Option<Arc<isocloud_sandbox::Cgroups>>, instances_dir: PathBuf) {
    registry.register_collector(Box::new(ResourceCollector { cgroups, instances_dir }));
}
