//! The control plane's storage in `/metrics` (#21 row 10): what the store
//! takes, what the data dir's disk has left, and what the per-project log
//! bounds dropped — the figures an operator alerts on before a full disk
//! turns writes into `507 STORAGE_FULL`.

use std::sync::Arc;

use isocloud_controlplane::ControlPlane;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

struct StoreCollector(Arc<ControlPlane>);

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures = self.0.storage();
        let mut store = encoder.encode_descriptor(
            "isocloud_store_bytes",
            "Bytes the control plane's store takes: the database (SQLite files or PostgreSQL's database) and blobs",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (part, bytes) in [("database", figures.database_bytes), ("blobs", figures.blob_bytes)] {
            let gauge = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
            gauge.encode(store.encode_family(&[("part", part)])?)?;
        }
        // Unknown (statvfs failed): left out rather than shown as 0, which
        // would page someone.
        if let Some(free) = figures.data_disk_free_bytes {
            let gauge = ConstGauge::new(i64::try_from(free).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(
                "isocloud_data_disk_free_bytes",
                "Free bytes on the file system of the control plane's data dir",
                None,
                gauge.metric_type(),
            )?)?;
        }
        let counters = [
            (
                "isocloud_log_lines_dropped",
                "Log lines dropped over a project's log rate bound (per-project counts: GET /projects/{name}/limits)",
                figures.log_lines_dropped,
            ),
            (
                "isocloud_log_lines_evicted",
                "Log lines removed oldest-first to keep a project within its total log bound",
                figures.log_lines_evicted,
            ),
            (
                "isocloud_store_full_errors",
                "Control plane API writes refused with 507 STORAGE_FULL",
                figures.storage_full_errors,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

pub fn register(registry: &mut Registry, control_plane: Arc<ControlPlane>) {
    registry.register_collector(Box::new(StoreCollector(control_plane)));
}
