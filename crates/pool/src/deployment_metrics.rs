//! Per-deployment Prometheus metrics with bounded cardinality: the busiest
//! deployments by requests get their own label, everyone else is summed into
//! `deployment="other"`, so a runner with 100,000 tenants still exports a
//! few hundred series.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

/// Deployments exported under their own label.
pub const TOP_DEPLOYMENTS: usize = 20;
/// Deployments tracked individually before the least busy are folded into
/// "other" (so memory stays bounded too).
const TRACKED_DEPLOYMENTS: usize = 2_000;

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    requests: u64,
    cpu_ms: u64,
    peak_memory_bytes: u64,
    cpu_kills: u64,
    memory_kills: u64,
    evictions: u64,
    fetch_bytes: u64,
    fetch_denied: u64,
    loops: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.requests += other.requests;
        self.cpu_ms += other.cpu_ms;
        self.peak_memory_bytes = self.peak_memory_bytes.max(other.peak_memory_bytes);
        self.cpu_kills += other.cpu_kills;
        self.memory_kills += other.memory_kills;
        self.evictions += other.evictions;
        self.fetch_bytes += other.fetch_bytes;
        self.fetch_denied += other.fetch_denied;
        self.loops += other.loops;
    }
}

#[derive(Default)]
struct Table {
    by_deployment: HashMap<String, Stats>,
    folded: Stats,
}

/// What the pool feeds per deployment; cheap to clone.
#[derive(Clone, Default)]
pub struct DeploymentMetrics {
    table: Arc<Mutex<Table>>,
}

/// What happened to an isolate, for the per-deployment counters.
#[derive(Debug, Clone, Copy)]
pub enum Ending {
    CpuTimeLimit,
    MemoryLimit,
    Evicted,
}

impl DeploymentMetrics {
    fn update(&self, deployment: &str, f: impl FnOnce(&mut Stats)) {
        let mut table = self.table.lock().expect("deployment metrics poisoned");
        f(table.by_deployment.entry(deployment.to_owned()).or_default());
        if table.by_deployment.len() > TRACKED_DEPLOYMENTS {
            // Fold the least busy half into "other".
            let mut names: Vec<(u64, String)> =
                table.by_deployment.iter().map(|(name, stats)| (stats.requests, name.clone())).collect();
            names.sort_unstable();
            for (_, name) in names.into_iter().take(TRACKED_DEPLOYMENTS / 2) {
                if let Some(stats) = table.by_deployment.remove(&name) {
                    table.folded.add(&stats);
                }
            }
        }
    }

    pub fn usage(&self, deployment: &str, requests: u64, cpu_ms: u64, peak_memory_bytes: u64) {
        self.update(deployment, |s| {
            s.requests += requests;
            s.cpu_ms += cpu_ms;
            s.peak_memory_bytes = s.peak_memory_bytes.max(peak_memory_bytes);
        });
    }

    /// Outbound traffic through the egress proxy, and the calls it refused.
    pub fn fetch(&self, deployment: &str, bytes: u64, denied: u64, loops: u64) {
        if bytes == 0 && denied == 0 && loops == 0 {
            return;
        }
        self.update(deployment, |s| {
            s.fetch_bytes += bytes;
            s.fetch_denied += denied;
            s.loops += loops;
        });
    }

    pub fn ended(&self, deployment: &str, ending: Ending) {
        self.update(deployment, |s| match ending {
            Ending::CpuTimeLimit => s.cpu_kills += 1,
            Ending::MemoryLimit => s.memory_kills += 1,
            Ending::Evicted => s.evictions += 1,
        });
    }

    /// The exported rows: the top deployments by requests, then "other".
    fn rows(&self) -> Vec<(String, Stats)> {
        let table = self.table.lock().expect("deployment metrics poisoned");
        let mut all: Vec<(&String, &Stats)> = table.by_deployment.iter().collect();
        all.sort_unstable_by(|a, b| b.1.requests.cmp(&a.1.requests).then_with(|| a.0.cmp(b.0)));
        let mut other = table.folded;
        let mut rows = Vec::new();
        for (i, (name, stats)) in all.into_iter().enumerate() {
            if i < TOP_DEPLOYMENTS {
                rows.push((name.clone(), *stats));
            } else {
                other.add(stats);
            }
        }
        rows.push(("other".to_owned(), other));
        rows
    }
}

impl std::fmt::Debug for DeploymentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeploymentMetrics")
    }
}

impl Collector for DeploymentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.rows();
        type Field = fn(&Stats) -> u64;
        let counters: [(&str, &str, Field); 8] = [
            ("isocloud_deployment_requests", "Requests per deployment (top deployments, the rest as other)", |s| {
                s.requests
            }),
            ("isocloud_deployment_cpu_milliseconds", "CPU time per deployment, from the kernel's clock", |s| s.cpu_ms),
            ("isocloud_deployment_cpu_limit_kills", "Isolates killed for the CPU limit, per deployment", |s| {
                s.cpu_kills
            }),
            ("isocloud_deployment_memory_limit_kills", "Isolates killed for the memory limit, per deployment", |s| {
                s.memory_kills
            }),
            ("isocloud_deployment_evictions", "Idle isolates evicted to make room, per deployment", |s| s.evictions),
            ("isocloud_deployment_fetch_bytes", "Bytes sent and received through the egress proxy", |s| s.fetch_bytes),
            ("isocloud_deployment_fetch_denied", "Outbound calls refused: host outside permissions.net", |s| {
                s.fetch_denied
            }),
            ("isocloud_deployment_loops_refused", "Outbound calls refused by the hop bound", |s| s.loops),
        ];
        for (name, help, field) in counters {
            let mut descriptor =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for (deployment, stats) in &rows {
                let labels = [("deployment", deployment.as_str())];
                let counter = ConstCounter::new(field(stats));
                counter.encode(descriptor.encode_family(&labels)?)?;
            }
        }
        let mut descriptor = encoder.encode_descriptor(
            "isocloud_deployment_peak_memory_bytes",
            "Most resident memory an isolate of the deployment held",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (deployment, stats) in &rows {
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new(stats.peak_memory_bytes as i64);
            gauge.encode(descriptor.encode_family(&[("deployment", deployment.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_busiest_get_a_label() {
        let metrics = DeploymentMetrics::default();
        for i in 0..(TOP_DEPLOYMENTS + 5) {
            metrics.usage(&format!("d{i}"), (i + 1) as u64, 1, 100);
        }
        metrics.ended("d0", Ending::Evicted);
        let rows = metrics.rows();
        assert_eq!(rows.len(), TOP_DEPLOYMENTS + 1);
        let (last, other) = rows.last().unwrap();
        assert_eq!(last, "other");
        // d0..d4 (the least busy) are summed: 1+2+3+4+5 requests, one eviction.
        assert_eq!(other.requests, 15);
        assert_eq!(other.evictions, 1);
        assert_eq!(rows[0].0, format!("d{}", TOP_DEPLOYMENTS + 4));
    }

    #[test]
    fn memory_stays_bounded() {
        let metrics = DeploymentMetrics::default();
        for i in 0..(TRACKED_DEPLOYMENTS * 3) {
            metrics.usage(&format!("d{i}"), 1, 0, 0);
        }
        let table = metrics.table.lock().unwrap();
        assert!(table.by_deployment.len() <= TRACKED_DEPLOYMENTS);
        let total: u64 = table.by_deployment.values().map(|s| s.requests).sum::<u64>() + table.folded.requests;
        assert_eq!(total, (TRACKED_DEPLOYMENTS * 3) as u64);
    }
}
