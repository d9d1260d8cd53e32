//! The bounds every listener of the runner holds to — public, TLS, control
//! plane, admin — configured in one place: how long a peer may take to send
//! a request head, how slowly it may send a request body, and how many
//! connections one peer and all peers together may hold open.
//!
//! A connection past a cap is closed at once, before a byte is read: an
//! answer (503) would first need the request head, which is what a peer at
//! its cap must not be allowed to make the listener wait for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::ListenerMetrics;

/// Which listener a bound or a breach belongs to (the `listener` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    Public,
    Tls,
    Control,
    Admin,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 4] = [Self::Public, Self::Tls, Self::Control, Self::Admin];

    pub fn label(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Tls => "tls",
            Self::Control => "control",
            Self::Admin => "admin",
        }
    }
}

/// What a peer did past a bound (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Breach {
    /// No complete request head (TLS handshake included) within the head
    /// timeout of the connection opening or of its last response.
    HeadTimeout,
    /// A request body slower than the body bound allows.
    BodyTimeout,
    /// One more connection than the per-peer cap.
    PerPeerCap,
    /// One more connection than the listener's cap.
    TotalCap,
}

impl Breach {
    pub const ALL: [Breach; 4] = [Self::HeadTimeout, Self::BodyTimeout, Self::PerPeerCap, Self::TotalCap];

    pub fn label(self) -> &'static str {
        match self {
            Self::HeadTimeout => "head_timeout",
            Self::BodyTimeout => "body_timeout",
            Self::PerPeerCap => "per_peer_cap",
            Self::TotalCap => "total_cap",
        }
    }
}

/// How slowly a request body may arrive (Apache's `mod_reqtimeout` model):
/// it must be done within `timeout` of its head, and every
/// `min_rate_bytes_per_s` bytes received move that deadline one second
/// later. A large upload on a slow but honest link keeps going; a body
/// stalled one byte short is cut after `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyBound {
    pub timeout: Duration,
    /// 0: no extension, `timeout` is the whole body's time.
    pub min_rate_bytes_per_s: u64,
}

impl BodyBound {
    /// The deadline, measured from the head, after `received` body bytes.
    pub fn allowed(&self, received: u64) -> Duration {
        match received.checked_div(self.min_rate_bytes_per_s) {
            Some(seconds) => self.timeout.saturating_add(Duration::from_secs(seconds)),
            None => self.timeout,
        }
    }
}

/// The default body bound of the control and admin listeners: 30 s for a
/// body's start (an API call's JSON arrives in one round trip), then at
/// least 16 KiB/s (128 kbit/s, a poor mobile uplink): the largest blob (64
/// MiB by default) may take over an hour at that floor, while a peer that
/// stalls holds its connection for 30 s, not for ever.
pub const DEFAULT_BODY_TIMEOUT_S: u64 = 30;
pub const DEFAULT_MIN_BODY_RATE_KB_S: u64 = 16;

/// One listener's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerBounds {
    pub listener: ListenerKind,
    /// From the connection's accept (and its TLS handshake), or from its
    /// last response's end, to the next complete request head.
    pub header_timeout: Duration,
    /// `None`: bodies stream on untimed (the public listeners: they go to a
    /// tenant, whose handler decides how to read them, bounded by the
    /// request timeout up to the response head and the stream bounds after).
    pub body: Option<BodyBound>,
    /// Connections one peer (an IPv4 address, an IPv6 /64) may hold; 0: no
    /// per-peer cap.
    pub max_connections_per_peer: usize,
    /// Loopback peers are not capped per peer (only in all): see
    /// [`ListenerDefaults::loopback_exempt`].
    pub loopback_exempt: bool,
    /// Connections the listener holds at once.
    pub max_connections: usize,
}

/// A listener's default caps, and why they are what they are.
#[derive(Debug, Clone, Copy)]
pub struct ListenerDefaults {
    pub listener: ListenerKind,
    pub max_connections_per_peer: usize,
    pub max_connections: usize,
    /// Whether request bodies are timed (see [`ListenerBounds::body`]).
    pub body_bound: bool,
    /// Whether loopback peers escape the per-peer cap. On the public
    /// listeners they are the runner's own egress proxy (every isolate's
    /// calls to other deployments, bounded per isolate and in all by the
    /// proxy, and one tenant's must never use up another's) or a reverse
    /// proxy on the host (which bounds its own clients).
    pub loopback_exempt: bool,
    pub why: &'static str,
}

/// The defaults, one row per listener. Every total stays well below the
/// runner's descriptor limit (raised to the hard limit at start, usually
/// 2^20 under systemd) with room for isolates' sockets and files.
pub const LISTENER_DEFAULTS: [ListenerDefaults; 4] = [
    ListenerDefaults {
        listener: ListenerKind::Public,
        max_connections_per_peer: 256,
        max_connections: 16_384,
        body_bound: false,
        loopback_exempt: true,
        why: "browsers open about 6 connections per host, so 256 is ~40 busy browsers behind one NAT; a relay or CDN \
              in front connects from few addresses: raise it (or 0) there",
    },
    ListenerDefaults {
        listener: ListenerKind::Tls,
        max_connections_per_peer: 256,
        max_connections: 16_384,
        body_bound: false,
        loopback_exempt: true,
        why: "the public listener's traffic over TLS: the same caps",
    },
    ListenerDefaults {
        listener: ListenerKind::Control,
        max_connections_per_peer: 64,
        max_connections: 1_024,
        body_bound: true,
        loopback_exempt: false,
        why: "the CLI uploads 4 files at once and a dashboard tab opens ~6 connections, so 64 is a dozen CI jobs and \
              users behind one address; the API is for operators and CI, not for crowds",
    },
    ListenerDefaults {
        listener: ListenerKind::Admin,
        max_connections_per_peer: 16,
        max_connections: 64,
        body_bound: true,
        loopback_exempt: false,
        why: "Prometheus and health checkers hold a connection or two each",
    },
];

impl ListenerBounds {
    /// `listener`'s defaults (see [`LISTENER_DEFAULTS`]) with the runner's
    /// head timeout and body bound.
    pub fn defaults(listener: ListenerKind, header_timeout: Duration, body: BodyBound) -> Self {
        let row = LISTENER_DEFAULTS.iter().find(|row| row.listener == listener).expect("a row per listener");
        Self {
            listener,
            header_timeout,
            body: row.body_bound.then_some(body),
            max_connections_per_peer: row.max_connections_per_peer,
            loopback_exempt: row.loopback_exempt,
            max_connections: row.max_connections,
        }
    }
}

/// Who a per-peer cap counts as one peer: an IPv4 address (an IPv4-mapped
/// IPv6 one too), or an IPv6 /64 — the least a site is given, so one
/// machine cannot take a fresh address per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PeerKey {
    V4(u32),
    V6Prefix64(u64),
}

impl PeerKey {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6Prefix64((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// The connections a listener holds, counted per peer and in all; a
/// connection is admitted only under both caps, and counted until its
/// [`Permit`] drops (with the socket: upgraded connections stay counted).
pub(crate) struct Gate {
    pub(crate) bounds: ListenerBounds,
    pub(crate) metrics: ListenerMetrics,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    per_peer: HashMap<PeerKey, usize>,
}

impl Gate {
    pub(crate) fn new(bounds: ListenerBounds, metrics: ListenerMetrics) -> Arc<Self> {
        metrics.prepare(bounds.listener, bounds.body.is_some());
        Arc::new(Self { bounds, metrics, held: Mutex::new(Held::default()) })
    }

    /// A permit for one more connection from `peer`, or the cap it would
    /// break (counted).
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Breach> {
        let capped = self.bounds.max_connections_per_peer != 0
            && !(self.bounds.loopback_exempt && peer.to_canonical().is_loopback());
        let key = capped.then(|| PeerKey::of(peer));
        let result = {
            let mut held = self.held.lock().expect("gate lock");
            let of_peer = key.and_then(|key| held.per_peer.get(&key).copied()).unwrap_or(0);
            if held.total >= self.bounds.max_connections {
                Err(Breach::TotalCap)
            } else if key.is_some() && of_peer >= self.bounds.max_connections_per_peer {
                Err(Breach::PerPeerCap)
            } else {
                held.total += 1;
                if let Some(key) = key {
                    held.per_peer.insert(key, of_peer + 1);
                }
                Ok(held.total)
            }
        };
        match result {
            Ok(total) => {
                self.metrics.set_open(self.bounds.listener, total);
                Ok(Permit { gate: self.clone(), key })
            }
            Err(breach) => {
                self.metrics.count_breach(self.bounds.listener, breach);
                Err(breach)
            }
        }
    }

    pub(crate) fn breach(&self, breach: Breach) {
        self.metrics.count_breach(self.bounds.listener, breach);
    }

    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let held = self.held.lock().unwrap();
        (held.total, held.per_peer.len())
    }
}

/// One admitted connection; dropping it gives its place back.
pub(crate) struct Permit {
    gate: Arc<Gate>,
    /// `None`: not counted per peer.
    key: Option<PeerKey>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let total = {
            let mut held = self.gate.held.lock().expect("gate lock");
            held.total -= 1;
            if let Some(key) = self.key
                && let Some(n) = held.per_peer.get_mut(&key)
            {
                *n -= 1;
                if *n == 0 {
                    held.per_peer.remove(&key);
                }
            }
            held.total
        };
        self.gate.metrics.set_open(self.gate.bounds.listener, total);
    }
}

#[cfg(test)]
mod tests;
