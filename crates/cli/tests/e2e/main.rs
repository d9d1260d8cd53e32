//! The runner end to end: the real `isocloud` binary, real deno isolates,
//! real HTTP on loopback, a real origin server started by each test. One test
//! binary with a module per area, so the workspace links it once instead of
//! once per file (each link costs seconds and tens of megabytes).
//!
//! Run one area with `cargo test -p isocloud --test e2e egress::`.

#![allow(unsafe_code, reason = "test code: geteuid, setns and pre_exec hooks on the processes the tests start")]

mod support;

mod acme;
mod activity_delivery;
mod admission;
mod apps_mode;
mod blobs_s3;
mod builds;
mod builds_registry;
mod churn;
mod client_cli;
mod control_plane;
mod dashboard;
mod deno_relay;
mod edge;
mod edge_tls;
mod egress;
mod errors;
mod hostile_http;
mod hostile_limits;
mod hostile_listeners;
mod hostile_names;
mod hostile_native;
mod hostile_network;
mod hostile_sandbox;
mod hostile_store;
mod hostile_webhooks;
mod isolate_uids;
mod layers;
mod lifecycle;
mod multi_node;
mod net_permissions;
mod otlp;
mod prestarted;
mod remote_origin;
mod stale_boot;
mod streaming;
mod subhost_auth;
mod tokens;
