//! The public edge of the runner: HTTP listeners, request routing, the proxy
//! into isolates, and the admin listener.
//!
//! This crate owns everything a client can touch: it accepts HTTP/1.1 and
//! HTTP/2, decides which deployment serves a request ([`Router`]: by Host, or
//! by a verified `x-deno-subhost` token), asks the pool for that deployment's
//! isolate, streams the request in and the response out (WebSocket upgrades
//! included), and maps every failure — once, here — to a status and a stable
//! code ([`EdgeError`]). It must not boot isolates or talk to origins itself;
//! errors never leak internals to the client, only to the log.

mod admin;
mod body;
mod error;
mod metrics;
mod proxy;
mod routing;
mod server;
mod tls;

pub use admin::serve_admin;
pub use error::EdgeError;
pub use metrics::EdgeMetrics;
pub use proxy::{ConnectionInfo, EdgeLimits, Proxy};
pub use routing::{HostRoute, HostRoutes, HostRouting, Route, Routed, Router, SubhostRouting};
pub use server::{Listener, ServeOptions, serve};
pub use tls::{Certificates, tls_acceptor};
