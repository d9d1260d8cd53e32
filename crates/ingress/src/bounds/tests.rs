use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use prometheus_client::registry::Registry;

use super::*;

fn bounds(per_peer: usize, total: usize) -> ListenerBounds {
    ListenerBounds {
        listener: ListenerKind::Control,
        header_timeout: Duration::from_secs(10),
        body: None,
        max_connections_per_peer: per_peer,
        loopback_exempt: false,
        max_connections: total,
    }
}

fn gate(per_peer: usize, total: usize) -> (Arc<Gate>, Registry) {
    let mut registry = Registry::default();
    let metrics = ListenerMetrics::new(&mut registry);
    (Gate::new(bounds(per_peer, total), metrics), registry)
}

fn encoded(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn a_peer_past_its_cap_is_refused_while_another_peer_is_admitted() {
    let (gate, registry) = gate(2, 100);
    let first = gate.admit(ip("10.0.0.1")).expect("under the cap");
    let _second = gate.admit(ip("10.0.0.1")).expect("at the cap");
    assert_eq!(gate.admit(ip("10.0.0.1")).err(), Some(Breach::PerPeerCap));
    let _other = gate.admit(ip("10.0.0.2")).expect("another peer has its own count");
    drop(first);
    let _again = gate.admit(ip("10.0.0.1")).expect("a closed connection gives its place back");
    assert!(
        encoded(&registry).contains(r#"isocloud_listener_breaches_total{listener="control",reason="per_peer_cap"} 1"#),
        "{}",
        encoded(&registry)
    );
}

#[test]
fn the_total_cap_holds_across_peers_and_every_permit_gives_its_place_back() {
    let (gate, registry) = gate(0, 3);
    let permits: Vec<Permit> =
        (1..=3).map(|n| gate.admit(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))).expect("under the total")).collect();
    assert_eq!(gate.admit(ip("10.0.0.9")).err(), Some(Breach::TotalCap));
    assert!(encoded(&registry).contains(r#"isocloud_listener_connections{listener="control"} 3"#));
    drop(permits);
    assert_eq!(gate.held(), (0, 0), "no peer entry outlives its last connection");
    assert!(
        encoded(&registry).contains(r#"isocloud_listener_breaches_total{listener="control",reason="total_cap"} 1"#)
    );
    assert!(encoded(&registry).contains(r#"isocloud_listener_connections{listener="control"} 0"#));
}

#[test]
fn zero_per_peer_means_no_per_peer_cap() {
    let (gate, _registry) = gate(0, 1000);
    let _permits: Vec<Permit> = (0..500).map(|_| gate.admit(ip("10.0.0.1")).expect("no per-peer cap")).collect();
}

#[test]
fn an_ipv6_peer_is_its_slash_64_and_a_mapped_ipv4_is_the_ipv4_address() {
    let a = PeerKey::of(ip("2001:db8:1:2::1"));
    let b = PeerKey::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"));
    let other = PeerKey::of(ip("2001:db8:1:3::1"));
    assert_eq!(a, b, "one /64: one peer");
    assert_ne!(a, other);
    let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
    assert_eq!(PeerKey::of(mapped), PeerKey::of(ip("192.0.2.7")));
    assert_ne!(PeerKey::of(IpAddr::V6(Ipv6Addr::LOCALHOST)), PeerKey::of(ip("127.0.0.1")));

    let (gate, _registry) = gate(1, 10);
    let _held = gate.admit(ip("2001:db8:1:2::1")).unwrap();
    assert_eq!(gate.admit(ip("2001:db8:1:2::99")).err(), Some(Breach::PerPeerCap), "a fresh address of the /64");
}

#[test]
fn a_body_may_take_its_timeout_and_one_second_more_per_min_rate_bytes() {
    let bound = BodyBound { timeout: Duration::from_secs(30), min_rate_bytes_per_s: 16 * 1024 };
    assert_eq!(bound.allowed(0), Duration::from_secs(30));
    assert_eq!(bound.allowed(16 * 1024 - 1), Duration::from_secs(30));
    assert_eq!(bound.allowed(16 * 1024 * 10), Duration::from_secs(40));
    // The default 64 MiB blob at the floor rate: over an hour, never cut.
    assert_eq!(bound.allowed(64 << 20), Duration::from_secs(30 + 4096));
    let total_only = BodyBound { timeout: Duration::from_secs(5), min_rate_bytes_per_s: 0 };
    assert_eq!(total_only.allowed(u64::MAX), Duration::from_secs(5));
}

#[test]
fn every_listener_has_a_default_row_and_only_the_private_ones_time_bodies() {
    let body = BodyBound { timeout: Duration::from_secs(30), min_rate_bytes_per_s: 1 };
    for kind in ListenerKind::ALL {
        let bounds = ListenerBounds::defaults(kind, Duration::from_secs(10), body);
        assert!(bounds.max_connections >= bounds.max_connections_per_peer, "{kind:?}");
        assert_eq!(bounds.body.is_some(), matches!(kind, ListenerKind::Control | ListenerKind::Admin), "{kind:?}");
    }
    assert_eq!(LISTENER_DEFAULTS.len(), ListenerKind::ALL.len());
}

#[test]
fn a_listeners_series_show_zero_from_the_start() {
    let (_gate, registry) = gate(1, 1);
    let text = encoded(&registry);
    for reason in ["head_timeout", "per_peer_cap", "total_cap"] {
        assert!(
            text.contains(&format!(r#"isocloud_listener_breaches_total{{listener="control",reason="{reason}"}} 0"#)),
            "{text}"
        );
    }
    assert!(!text.contains(r#"reason="body_timeout""#), "no body bound, no body series: {text}");
}

#[test]
fn loopback_peers_escape_the_per_peer_cap_only_where_exempt_and_never_the_total() {
    let mut registry = Registry::default();
    let metrics = ListenerMetrics::new(&mut registry);
    let public = Gate::new(ListenerBounds { loopback_exempt: true, ..bounds(1, 4) }, metrics.clone());
    let loopback: Vec<Permit> = ["127.0.0.1", "127.0.0.1", "::1", "::ffff:127.0.0.1"]
        .iter()
        .map(|peer| public.admit(ip(peer)).expect("loopback is not capped per peer here"))
        .collect();
    assert_eq!(public.held(), (4, 0), "counted in all, not per peer");
    assert_eq!(public.admit(ip("127.0.0.1")).err(), Some(Breach::TotalCap));
    drop(loopback);
    let _remote = public.admit(ip("10.0.0.1")).unwrap();
    assert_eq!(public.admit(ip("10.0.0.1")).err(), Some(Breach::PerPeerCap), "remote peers still are");

    let (control, _registry) = gate(1, 4);
    let _held = control.admit(ip("127.0.0.1")).unwrap();
    assert_eq!(control.admit(ip("127.0.0.1")).err(), Some(Breach::PerPeerCap), "not exempt: capped");
    let defaults = |kind| {
        ListenerBounds::defaults(
            kind,
            Duration::from_secs(1),
            BodyBound { timeout: Duration::from_secs(1), min_rate_bytes_per_s: 0 },
        )
    };
    assert!(defaults(ListenerKind::Public).loopback_exempt && defaults(ListenerKind::Tls).loopback_exempt);
    assert!(!defaults(ListenerKind::Control).loopback_exempt && !defaults(ListenerKind::Admin).loopback_exempt);
}
