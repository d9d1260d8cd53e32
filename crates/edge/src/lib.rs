//! The edge role (`isocloud edge`): a public listener in front of several
//! stateless runners, for first-party deployments of the control plane.
//!
//! It owns four things: the host table, a copy of the control plane's
//! kept within a second or two by its routing feed (`hosts.rs`, the
//! follower in `follower.rs`: deltas past the generation held, the table
//! whole at start or when the change log no longer reaches back, the last
//! table kept while the control plane is away); the choice of runner,
//! rendezvous hashing of the deployment id over the runners that are in
//! (`rendezvous.rs`), so a deployment stays warm on one runner and moves
//! only when that runner leaves; the runners' health (`runners.rs`:
//! probes every second, out after two failures or at once when a runner
//! says it is stopping, back after two passes; the list replaceable while
//! the edge runs, each runner named again keeping its health)
//! and the bounded connection pools to them (h2c, or HTTP/1.1 keep-alive);
//! and the forwarding (`forward.rs`): an `x-deno-subhost` relay token per
//! request, signed with the key the runners and the control plane share,
//! idempotent requests without a body retried on the next runner when one
//! fails before answering. With `--tls-listen`, HTTPS by SNI with the
//! control plane's certificates (`certs.rs`: fetched over the origin
//! listener when the routing feed names their domain, each served for its
//! own domain only) and 308 to HTTPS on the plain listener for domains that
//! have one; ACME HTTP-01 answers asked of the control plane (`acme.rs`).
//! The routing feed, the certificates and the ACME lookups share one
//! `FailoverRoots` (`--rpc-root` and its `--rpc-root-fallback`s): a
//! control-plane node that takes no connection hands all three to the next.
//!
//! It must not run isolates, talk to the store or the origin RPCs, or
//! decide anything a runner decides (limits, hops, stream bounds): the
//! runner behind it applies those to every request as to a relay's. It
//! never forwards a client's own `x-deno-subhost`, and never puts a secret
//! or key material in a log line or an answer. The listener and its bounds are the
//! ingress's (`serve_bounded`).

#![forbid(unsafe_code)]

mod acme;
mod admin;
mod certs;
mod follower;
mod forward;
mod hosts;
mod metrics;
pub mod rendezvous;
mod runners;

pub use acme::{ACME_CONNECT_TIMEOUT, ACME_LOOKUP_TIMEOUT, ACME_LOOKUPS, AcmeLookup};
pub use admin::serve_admin;
pub use certs::{
    CertificateFeed, CertificatePage, CertificatePem, EdgeCertificates, LoadError, MAX_CERTIFICATE_PAGE_BYTES,
    MAX_TLS_ALPN_CHALLENGES, Pending, TlsAlpnDigest, TlsAlpnPage,
};
pub use follower::{FollowError, Follower, MAX_ROUTING_BYTES, Polled, SigningKey};
pub use forward::{Edge, ForwardOptions, MAX_ATTEMPTS, RELAY_TOKEN_TTL_S, serve_public};
pub use hosts::{ApplyError, HostTable, ProjectRoute, RoutingUpdate};
pub use isocloud_origin::FailoverRoots;
pub use metrics::Metrics;
pub use runners::{
    BoxError, EdgeBody, IN_AFTER_SUCCESSES, OUT_AFTER_FAILURES, Runner, RunnerClients, RunnerSet, RunnerUrlError,
    Runners, RunnersChanged, parse_runner_list, runner_roots,
};

/// How often the routing feed is polled: a change reaches the edge within
/// about this plus one answer's time (issue 15 asks for 2 s).
pub const ROUTING_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
