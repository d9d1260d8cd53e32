//! Which isolates run: one per deployment, booted on demand, shared by every
//! request to that deployment, replaced when it dies, terminated when idle.
//!
//! This crate owns the map from deployment to isolate, the boot sequence
//! (origin → module graph → isolate files → sandboxed process), single-flight
//! boots (concurrent first requests boot once), boot admission (a bounded
//! queue of deno starts) and the per-tenant cap, the idle reaper, graceful
//! shutdown, and handing each isolate's activity (logs, lifecycle, usage) to
//! the sink that reports it to the origin (`isocloud-activity`). It must not
//! parse HTTP requests or decide routing; the ingress hands it an origin and
//! a deployment id, and it hands back a running [`Isolate`].

#![forbid(unsafe_code)]

mod admission;
mod boot;
mod deployment_metrics;
mod metrics;
mod node_http;
mod npm;
mod packages;
mod pool;
mod slots;
mod template;
mod warm;

pub use admission::{AdmissionOptions, BOOT_MEMORY_BYTES, default_concurrency};
pub use boot::BootError;
pub use isocloud_activity::{ActivityOptions, ActivitySink, DROP_NOTE_PREFIX, OriginResolver, SpoolError};
pub use isocloud_supervisor::{
    CPU_BUDGET_CAP_PERCENT, ForwardError, InFlight, Isolate, IsolateLimits, RequestBody, Termination, UsageTotals,
};
pub use metrics::PoolMetrics;
pub use npm::NpmRegistry;
pub use pool::{IsolateView, LogTap, Pool, PoolOptions};
