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
//! No internal network: the proxy resolves names itself and connects only to
//! public addresses (`address`: loopback, private, link-local, CGNAT, … are
//! refused with 403 `EGRESS_DENIED` after resolution, in every spelling),
//! besides the runner's own public listeners and ranges the operator opened.
//! Bounded: connections per isolate and on the shared listener, with a short
//! header timeout (`proxy`). Its refusals are answered as the ingress's are,
//! by [`isocloud_protocol::ErrorCode::response`]: an allowed host it cannot
//! reach is 502 `UPSTREAM_UNREACHABLE`, never a denial.
//!
//! This crate must not decide which deployment serves a request or start
//! processes; it never trusts what an isolate says about itself beyond the
//! token it was given, and it never buffers a whole body.

mod address;
mod body;
mod grant;
mod links;
mod proxy;

pub use address::{Cidr, CidrError, Embeds, INTERNAL_RANGES, Internal, InternalRange, internal, parse_ipv4_loosely};
pub use grant::{EgressGrant, EgressUsage, HopGuard, allows};
pub use proxy::{
    EgressOptions, EgressProxy, EgressRefusals, HEADER_TIMEOUT, MAX_CONNECTIONS_PER_ISOLATE, MAX_SHARED_CONNECTIONS,
};

/// The header carrying how many times a call has passed through isolates of
/// this cloud. Set by the egress proxy on outbound plain-HTTP calls, read by
/// the ingress.
pub const HOPS_HEADER: &str = "x-isocloud-hops";
