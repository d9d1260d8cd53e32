//! The runner's egress proxy: the way out for an isolate's outbound HTTP(S).
//!
//! Every isolate gets an [`EgressGrant`]: credentials for the proxy (in the
//! standard `HTTP_PROXY`/`HTTPS_PROXY` variables deno honours), its
//! `permissions.net` allow-list, and counters. The proxy enforces the
//! allow-list a second time (deno checked it first), counts the bytes each
//! deployment sends and receives, and bounds loops: an outbound call carries
//! one hop more than the requests its isolate is serving
//! (`x-isocloud-hops` on plain HTTP, and a table of the proxy's own
//! connections — [`EgressProxy::hops_of_peer`] — for calls that come back into
//! this runner, which covers tunnels too); past the bound the call is refused
//! with 508 `LOOP_DETECTED`.
//!
//! This crate must not decide which deployment serves a request or start
//! processes; it never trusts what an isolate says about itself beyond the
//! token it was given, and it never buffers a whole body.

mod body;
mod grant;
mod links;
mod proxy;

pub use grant::{EgressGrant, EgressUsage, HopGuard, allows};
pub use proxy::{EgressOptions, EgressProxy};

/// The header carrying how many times a call has passed through isolates of
/// this cloud. Set by the egress proxy on outbound plain-HTTP calls, read by
/// the ingress.
pub const HOPS_HEADER: &str = "x-isocloud-hops";
