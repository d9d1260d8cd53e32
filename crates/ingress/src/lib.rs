//! The public edge of the runner: HTTP listeners, request routing, the proxy
//! into isolates, and the admin listener.
//!
//! This crate owns everything a client can touch: it accepts HTTP/1.1 and
//! HTTP/2, decides which deployment serves a request ([`Router`]: by Host, or
//! by a verified `x-deno-subhost` token), asks the pool for that deployment's
//! isolate, streams the request in and the response out (WebSocket upgrades
//! included, each bounded in idle time and lifetime: [`StreamLimits`]), and
//! maps every failure — once, here — to a status and a stable code
//! ([`EdgeError`]). A request whose host is ambiguous (two `Host`s, a `Host`
//! that disagrees with the target or `:authority`) is 400 before routing. It
//! must not boot isolates or talk to origins itself; errors never leak
//! internals to the client, only to the log.
//!
//! Every listener of the runner — public, TLS, and the control plane's and
//! admin listeners, which serve through [`serve_bounded`] — holds to one
//! set of [`ListenerBounds`]: head timeout, body bound, connection caps per
//! peer and in all, each breach counted ([`ListenerMetrics`]).

#![forbid(unsafe_code)]

mod acme;
mod admin;
mod body;
mod bounds;
mod cert_files;
mod connection;
mod error;
mod isolates;
mod metrics;
mod proxy;
mod readiness;
mod routing;
mod server;
mod streams;
mod tls;
mod trace;

pub use acme::{AcmeChallenges, CHALLENGE_PATH, challenge_of};
pub use admin::serve_admin;
pub use bounds::{
    BodyBound, Breach, DEFAULT_BODY_TIMEOUT_S, DEFAULT_MIN_BODY_RATE_KB_S, LISTENER_DEFAULTS, ListenerBounds,
    ListenerDefaults, ListenerKind,
};
pub use cert_files::{CertificateFiles, CertificateFilesError, certificate_files_acceptor};
pub use connection::{BodyTooSlow, BoundedBody, PeerAddr, serve_bounded, serve_bounded_tls};
pub use error::EdgeError;
pub use isolates::{InFlightGuard, Isolates, RequestGuard, Reservation, Upstream};
pub use metrics::{EdgeMetrics, ListenerMetrics};
pub use proxy::{ConnectionInfo, EdgeLimits, Proxy};
pub use readiness::{DRAINING_HEADER, HEALTH_PROBE_HEADER, Readiness};
pub use routing::{
    HostRoute, HostRoutes, HostRouting, Route, Routed, Router, SubhostRouting, https_location, request_authority,
};
pub use server::{Listener, ServeOptions, serve};
pub use streams::StreamLimits;
pub use tls::{ACME_TLS_ALPN, Certificates, is_acme_tls_alpn, tls_acceptor, tls_alpn_certificate};
