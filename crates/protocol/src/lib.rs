//! The subhosting wire contract as data types: the isolate config that an
//! origin's `boot` answer carries (`x-deno-config`), the stable error codes the
//! runner answers with, and the activity events it reports back; and inside
//! the runner, the messages its harness and it exchange ([`harness`]).
//!
//! This crate owns parsing and validation of those shapes — a value of
//! [`IsolateConfig`] has passed every rule of `subhosting-protocol.md` §3 that
//! can be checked without the layers' bytes, including which env names a
//! tenant may set ([`env_policy`]). It does no I/O and must not know
//! about HTTP servers, processes or caches: of HTTP it knows the `http`
//! crate's types only, to render an [`ErrorCode`] as the one answer both
//! edges (the ingress and the egress proxy) send for it.

#![forbid(unsafe_code)]

mod activity;
mod config;
pub mod deno_words;
pub mod env_policy;
mod error_code;
pub mod harness;

pub use activity::{
    ActivityBatch, ActivityEvent, ActivityKind, LATENCY_BOUNDS_MS, LATENCY_BUCKETS, LatencyHistogram, LogLevel,
    StatusClasses, latency_bucket, status_class,
};
pub use config::{ConfigError, IsolateConfig, LayerSpec, NetPermission, validate_env_name};
pub use error_code::{CAPACITY_RETRY_AFTER_S, CodeSpec, EGRESS_PROXY_CHALLENGE, ERROR_HEADER, ErrorCode};

/// The files a deployment starts from when none is named, first found wins
/// (`isocloud deploy`, apps mode, builds): the names Deno Deploy users give
/// their entrypoints, TSX and JSX included.
pub const DEFAULT_ENTRYPOINTS: [&str; 14] = [
    "main.ts",
    "main.tsx",
    "main.js",
    "main.jsx",
    "main.mjs",
    "mod.ts",
    "index.ts",
    "index.tsx",
    "index.js",
    "index.jsx",
    "index.mjs",
    "server.ts",
    "server.tsx",
    "server.js",
];
