//! One isolate's permission to use the proxy, and what it has used.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use isocloud_protocol::NetPermission;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::proxy::Shared;

/// What one isolate did through the proxy since the last
/// [`EgressGrant::take_usage`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EgressUsage {
    /// Outbound calls (tunnels and plain requests) the proxy let through.
    pub requests: u64,
    /// Bytes the isolate sent out (request bodies, tunnel upstream).
    pub bytes_sent: u64,
    /// Bytes that came back (response bodies, tunnel downstream).
    pub bytes_received: u64,
    /// Calls refused because the host is outside `permissions.net`.
    pub denied: u64,
    /// Calls refused by the hop bound.
    pub loops: u64,
    /// Calls refused because the destination is internal (loopback,
    /// private, link-local, …) or one of the runner's private listeners.
    pub internal_denied: u64,
    /// Connections refused past the per-isolate bound
    /// ([`crate::EgressOptions::max_connections_per_isolate`]).
    pub over_limit: u64,
}

pub(crate) struct GrantState {
    pub(crate) token: String,
    /// For the runner's log; a pre-started isolate's grant is named when
    /// the isolate gets its deployment.
    deployment: Mutex<String>,
    pub(crate) net: NetPermission,
    pub(crate) requests: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) loops: AtomicU64,
    pub(crate) internal_denied: AtomicU64,
    pub(crate) over_limit: AtomicU64,
    /// Outbound connections and tunnels it may still open.
    pub(crate) upstream_slots: Arc<Semaphore>,
    /// Hop counts of the requests the isolate is serving now; an outbound
    /// call is one more than the largest. A multiset: few entries, linear.
    in_flight_hops: Mutex<Vec<u32>>,
    /// Cancelled when the grant ends, closing its open tunnels.
    pub(crate) revoked: CancellationToken,
}

impl GrantState {
    pub(crate) fn deployment(&self) -> String {
        self.deployment.lock().expect("deployment poisoned").clone()
    }

    pub(crate) fn outbound_hops(&self) -> u32 {
        let in_flight = self.in_flight_hops.lock().expect("hops poisoned");
        in_flight.iter().copied().max().unwrap_or(0).saturating_add(1)
    }
}

/// An isolate's credentials for the egress proxy. Dropping it revokes them,
/// closes the isolate's open tunnels and stops serving the proxy inside its
/// network namespace.
pub struct EgressGrant {
    pub(crate) state: Arc<GrantState>,
    pub(crate) proxy: Weak<Shared>,
    proxy_addr: SocketAddr,
    proxy_url: String,
    proxy_authority: String,
    /// The accept loop on the listener inside the isolate's network
    /// namespace ([`EgressGrant::serve_inside`]).
    inside: Option<tokio::task::JoinHandle<()>>,
}

impl EgressGrant {
    pub(crate) fn new(
        token: String,
        deployment: String,
        net: NetPermission,
        proxy: Weak<Shared>,
        proxy_addr: SocketAddr,
        max_connections: usize,
    ) -> Self {
        let proxy_authority = proxy_addr.to_string();
        let proxy_url = format!("http://isolate:{token}@{proxy_authority}");
        let state = Arc::new(GrantState {
            token,
            deployment: Mutex::new(deployment),
            net,
            requests: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            loops: AtomicU64::new(0),
            internal_denied: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
            upstream_slots: Arc::new(Semaphore::new(max_connections)),
            in_flight_hops: Mutex::new(Vec::new()),
            revoked: CancellationToken::new(),
        });
        Self { state, proxy, proxy_addr, proxy_url, proxy_authority, inside: None }
    }

    /// The proxy's address; inside an isolate's network namespace its
    /// listener has the same one ([`EgressGrant::serve_inside`]).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Serves the proxy on `listener` (nonblocking, bound inside the
    /// isolate's network namespace) for as long as this grant lives, at most
    /// [`crate::EgressOptions::max_connections_per_isolate`] connections at
    /// once (past that each is refused and closed). Needs a tokio runtime.
    pub fn serve_inside(&mut self, listener: std::net::TcpListener) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let proxy = self.proxy.upgrade().ok_or_else(|| std::io::Error::other("the egress proxy is gone"))?;
        let slots = Arc::new(Semaphore::new(proxy.options.max_connections_per_isolate));
        let bound = crate::proxy::Bound::Isolate(Arc::downgrade(&self.state));
        let task = tokio::spawn(crate::proxy::accept_loop(listener, self.proxy.clone(), slots, bound));
        if let Some(previous) = self.inside.replace(task) {
            previous.abort();
        }
        Ok(())
    }

    /// `http://isolate:<token>@127.0.0.1:<port>`, for `HTTP_PROXY`/`HTTPS_PROXY`.
    pub fn proxy_url(&self) -> &str {
        &self.proxy_url
    }

    /// `127.0.0.1:<port>`: deno's `--allow-net` must name it, and the
    /// harness's readiness probe (`GET http://<it>/`) goes through it.
    pub fn proxy_authority(&self) -> &str {
        &self.proxy_authority
    }

    /// Names the deployment the isolate now runs (a pre-started isolate's
    /// grant is made before there is one).
    pub fn name_deployment(&self, deployment: &str) {
        *self.state.deployment.lock().expect("deployment poisoned") = deployment.to_owned();
    }

    /// Marks a request with `hops` as being served by this isolate until the
    /// guard drops; calls the isolate makes meanwhile carry `hops + 1`.
    pub fn enter(&self, hops: u32) -> HopGuard {
        self.state.in_flight_hops.lock().expect("hops poisoned").push(hops);
        HopGuard { state: self.state.clone(), hops }
    }

    pub fn take_usage(&self) -> EgressUsage {
        let take = |counter: &AtomicU64| counter.swap(0, Ordering::Relaxed);
        EgressUsage {
            requests: take(&self.state.requests),
            bytes_sent: take(&self.state.bytes_sent),
            bytes_received: take(&self.state.bytes_received),
            denied: take(&self.state.denied),
            loops: take(&self.state.loops),
            internal_denied: take(&self.state.internal_denied),
            over_limit: take(&self.state.over_limit),
        }
    }
}

impl Drop for EgressGrant {
    fn drop(&mut self) {
        if let Some(inside) = &self.inside {
            inside.abort();
        }
        self.state.revoked.cancel();
        if let Some(proxy) = self.proxy.upgrade() {
            proxy.revoke(&self.state.token);
        }
    }
}

impl std::fmt::Debug for EgressGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token: it is a credential.
        f.debug_struct("EgressGrant").field("deployment", &self.state.deployment()).finish_non_exhaustive()
    }
}

/// See [`EgressGrant::enter`].
pub struct HopGuard {
    state: Arc<GrantState>,
    hops: u32,
}

impl Drop for HopGuard {
    fn drop(&mut self) {
        let mut in_flight = self.state.in_flight_hops.lock().expect("hops poisoned");
        if let Some(i) = in_flight.iter().position(|&h| h == self.hops) {
            in_flight.swap_remove(i);
        }
    }
}

/// Whether `permissions.net` lets an isolate reach `host:port`, with deno's
/// `--allow-net` meaning: `host` allows every port, `host:port` that one;
/// names compare case-insensitively, IPv6 literals in brackets.
pub fn allows(net: &NetPermission, host: &str, port: u16) -> bool {
    match net {
        NetPermission::All => true,
        NetPermission::None => false,
        NetPermission::Allow(entries) => entries.iter().any(|entry| {
            let (entry_host, entry_port) = split_host_port(entry);
            entry_host.eq_ignore_ascii_case(host) && entry_port.is_none_or(|p| p == port)
        }),
    }
}

/// `host[:port]` → (host, port); `[v6]:port` keeps its brackets off.
pub(crate) fn split_host_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (entry, None),
        };
    }
    match entry.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(entries: &[&str]) -> NetPermission {
        NetPermission::Allow(entries.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn allow_list_has_denos_meaning() {
        let net = allow(&["api.example.com", "db.example.com:5432", "10.0.0.1", "[::1]:8080"]);
        assert!(allows(&net, "api.example.com", 443));
        assert!(allows(&net, "API.example.com", 80));
        assert!(allows(&net, "db.example.com", 5432));
        assert!(!allows(&net, "db.example.com", 5433));
        assert!(allows(&net, "10.0.0.1", 1));
        assert!(allows(&net, "::1", 8080));
        assert!(!allows(&net, "::1", 8081));
        assert!(!allows(&net, "example.com", 443));
        assert!(!allows(&net, "evil-api.example.com", 443));
        assert!(!allows(&NetPermission::None, "api.example.com", 443));
        assert!(allows(&NetPermission::All, "anything", 1));
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("a.b:80"), ("a.b", Some(80)));
        assert_eq!(split_host_port("a.b"), ("a.b", None));
        assert_eq!(split_host_port("[::1]:443"), ("::1", Some(443)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert_eq!(split_host_port("a.b:notaport"), ("a.b:notaport", None));
    }
}
