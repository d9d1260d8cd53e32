use std::collections::HashSet;

use super::*;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn class_of(text: &str) -> Option<&'static str> {
    internal(ip(text)).map(|i| i.range.class)
}

#[test]
fn every_range_has_a_reason_and_is_a_network() {
    let mut seen = HashSet::new();
    for range in INTERNAL_RANGES {
        assert!(range.reason.len() >= 10, "{} needs a real reason", range.network);
        assert!(!range.class.is_empty());
        assert!(seen.insert(range.network), "{} is listed twice", range.network);
        // Written as a network, so it parses back to itself.
        assert_eq!(range.network.to_string().parse::<Cidr>(), Ok(range.network), "{}", range.network);
    }
}

#[test]
fn every_range_is_refused_at_its_first_and_last_address() {
    for range in INTERNAL_RANGES {
        let (first, last) = match range.network.network {
            IpAddr::V4(net) => {
                let bits = u32::from(net);
                let host = u32::MAX.checked_shr(u32::from(range.network.prefix)).unwrap_or(0);
                (IpAddr::V4(bits.into()), IpAddr::V4((bits | host).into()))
            }
            IpAddr::V6(net) => {
                let bits = u128::from(net);
                let host = u128::MAX.checked_shr(u32::from(range.network.prefix)).unwrap_or(0);
                (IpAddr::V6(bits.into()), IpAddr::V6((bits | host).into()))
            }
        };
        for address in [first, last] {
            let found = INTERNAL_RANGES.iter().find(|r| r.network.contains(address)).unwrap();
            // An embedding range decides by what it embeds: its first address
            // embeds 0.0.0.0 (internal), its last 255.255.255.255 (broadcast).
            assert!(internal(address).is_some(), "{address} of {} is let through", range.network);
            assert!(
                std::ptr::eq(found, range) || found.network.prefix > range.network.prefix,
                "{address}: an earlier, wider row {} hides {}",
                found.network,
                range.network
            );
        }
    }
}

#[test]
fn internal_addresses_by_class() {
    for (address, class) in [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified (\"this network\")"),
        ("::", "unspecified (::)"),
        ("10.1.2.3", "private (RFC 1918)"),
        ("172.16.0.1", "private (RFC 1918)"),
        ("172.31.255.255", "private (RFC 1918)"),
        ("192.168.1.1", "private (RFC 1918)"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "shared address space (CGNAT, RFC 6598)"),
        ("100.127.255.255", "shared address space (CGNAT, RFC 6598)"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved (class E)"),
        ("192.0.2.1", "documentation (TEST-NET-1)"),
        ("198.51.100.7", "documentation (TEST-NET-2)"),
        ("203.0.113.9", "documentation (TEST-NET-3)"),
        ("198.18.0.1", "benchmarking (RFC 2544)"),
        ("192.0.0.8", "IETF protocol assignments (RFC 6890)"),
        ("fc00::1", "unique local (ULA, RFC 4193)"),
        ("fd00:ec2::254", "unique local (ULA, RFC 4193)"),
        ("fe80::1", "link-local"),
        ("febf::1", "link-local"),
        ("fec0::1", "site-local (RFC 3879, deprecated)"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation (RFC 3849)"),
        ("3fff::1", "documentation (RFC 9637)"),
        ("2001::1", "Teredo (RFC 4380)"),
        ("2001:2::1", "benchmarking (RFC 5180)"),
        ("100::1", "discard-only (RFC 6666)"),
        ("64:ff9b:1::1", "local-use NAT64 (RFC 8215)"),
        ("::127.0.0.1", "IPv4-compatible (RFC 4291, deprecated)"),
        ("::8.8.8.8", "IPv4-compatible (RFC 4291, deprecated)"),
    ] {
        assert_eq!(class_of(address), Some(class), "{address}");
    }
}

#[test]
fn public_addresses_pass() {
    for address in [
        "8.8.8.8",
        "1.1.1.1",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "172.15.255.255",
        "172.32.0.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2606:4700:4700::1111",
        "2a00:1450:4001::200e",
        "fbff:ffff::1",
        "64:ff9b::808:808",
        "::ffff:8.8.8.8",
        "2002:808:808::1",
    ] {
        assert!(internal(ip(address)).is_none(), "{address} is public: {:?}", internal(ip(address)));
    }
}

#[test]
fn embedded_ipv4_decides_for_mapped_nat64_and_6to4_forms() {
    for (address, outer, inner) in [
        ("::ffff:127.0.0.1", "IPv4-mapped", "loopback"),
        ("::ffff:7f00:1", "IPv4-mapped", "loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped", "link-local"),
        ("::ffff:10.0.0.1", "IPv4-mapped", "private (RFC 1918)"),
        ("::ffff:0.0.0.0", "IPv4-mapped", "unspecified (\"this network\")"),
        ("::ffff:0:127.0.0.1", "IPv4-translated (SIIT, RFC 2765)", "loopback"),
        ("64:ff9b::127.0.0.1", "NAT64 (RFC 6052)", "loopback"),
        ("64:ff9b::a9fe:a9fe", "NAT64 (RFC 6052)", "link-local"),
        ("2002:7f00:1::", "6to4 (RFC 3056)", "loopback"),
        ("2002:c0a8:101::1", "6to4 (RFC 3056)", "private (RFC 1918)"),
    ] {
        let why = internal(ip(address)).unwrap_or_else(|| panic!("{address} is let through"));
        assert_eq!(why.range.class, outer, "{address}");
        assert_eq!(why.embedded.map(|(_, r)| r.class), Some(inner), "{address}");
        assert!(why.to_string().contains(inner), "{why}");
    }
}

#[test]
fn every_spelling_of_loopback_is_an_address() {
    for spelling in [
        "127.0.0.1",
        "127.1",
        "127.0.1",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0177.0.0.1",
        "0x7f.1",
        "127.0.0.1.",
    ] {
        assert_eq!(parse_ipv4_loosely(spelling), Some(Ipv4Addr::LOCALHOST), "{spelling}");
    }
    assert_eq!(parse_ipv4_loosely("0"), Some(Ipv4Addr::UNSPECIFIED));
    assert_eq!(parse_ipv4_loosely("0x"), Some(Ipv4Addr::UNSPECIFIED));
    assert_eq!(parse_ipv4_loosely("169.254.43518"), Some(Ipv4Addr::new(169, 254, 169, 254)));
    for name in [
        "example.com",
        "1e100.net",
        "127.0.0.1.nip.io",
        "08.0.0.1",
        "256.0.0.1",
        "1.2.3.4.5",
        "4294967296",
        "",
        "1..2",
        "0xg",
    ] {
        assert_eq!(parse_ipv4_loosely(name), None, "{name}");
    }
}

#[test]
fn cidrs_parse_and_say_what_is_wrong() {
    let cidr: Cidr = "10.0.0.0/8".parse().unwrap();
    assert!(cidr.contains(ip("10.255.0.1")));
    assert!(!cidr.contains(ip("11.0.0.1")));
    assert!(!cidr.contains(ip("::ffff:10.0.0.1")), "families do not mix; callers canonicalize first");
    let one: Cidr = "192.168.1.5".parse().unwrap();
    assert_eq!(one.to_string(), "192.168.1.5/32");
    assert!(one.contains(ip("192.168.1.5")) && !one.contains(ip("192.168.1.6")));
    let v6: Cidr = "fd00::/8".parse().unwrap();
    assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fc00::1")));
    let all: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains(ip("8.8.8.8")));

    assert_eq!(
        "10.0.0.1/8".parse::<Cidr>().unwrap_err().to_string(),
        "\"10.0.0.1/8\" has address bits set past its prefix: did you mean 10.0.0.0/8?"
    );
    assert!(matches!("10.0.0.0/33".parse::<Cidr>(), Err(CidrError::Prefix { max: 32, .. })));
    assert!(matches!("fd00::/129".parse::<Cidr>(), Err(CidrError::Prefix { max: 128, .. })));
    assert!(matches!("10.0.0.0/+8".parse::<Cidr>(), Err(CidrError::Prefix { .. })));
    assert!(matches!("intranet/8".parse::<Cidr>(), Err(CidrError::Syntax(_))));
    assert!(matches!("10.0.0/8".parse::<Cidr>(), Err(CidrError::Syntax(_))));
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn destinations_allow_public_and_opened_ranges_only() {
    let destinations = Destinations::new(vec!["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(destinations.check(addr("8.8.8.8:443")), Ok(addr("8.8.8.8:443")));
    assert_eq!(destinations.check(addr("10.1.2.3:5432")), Ok(addr("10.1.2.3:5432")));
    assert_eq!(destinations.check(addr("[::ffff:10.1.2.3]:80")), Ok(addr("10.1.2.3:80")), "connects to the IPv4 form");
    assert_eq!(destinations.check(addr("[::ffff:8.8.8.8]:80")), Ok(addr("8.8.8.8:80")));
    let refused = destinations.check(addr("127.0.0.1:80")).unwrap_err();
    assert!(refused.starts_with("127.0.0.1:80 is loopback"), "{refused}");
    let refused = destinations.check(addr("[::ffff:127.0.0.1]:80")).unwrap_err();
    assert!(refused.starts_with("127.0.0.1:80 is loopback"), "{refused}");
    let refused = destinations.check(addr("169.254.169.254:80")).unwrap_err();
    assert!(refused.contains("link-local") && refused.contains("metadata"), "{refused}");
    let refused = destinations.check(addr("[64:ff9b::7f00:1]:80")).unwrap_err();
    assert!(refused.contains("NAT64") && refused.contains("loopback"), "{refused}");

    // Opening everything still never opens the runner's own host by 0.0.0.0.
    let everything = Destinations::new(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
    assert!(everything.check(addr("127.0.0.1:80")).is_ok());
    assert!(everything.check(addr("0.0.0.0:80")).unwrap_err().contains("unspecified"));
    assert!(everything.check(addr("[::]:80")).unwrap_err().contains("unspecified"));
}

#[test]
fn runner_listeners_public_reachable_private_never() {
    let destinations = Destinations::new(vec!["127.0.0.0/8".parse().unwrap()]);
    destinations.add_public(addr("127.0.0.1:8080"), "public listener");
    destinations.add_private(addr("127.0.0.1:9090"), "admin listener");
    destinations.add_private(addr("0.0.0.0:8081"), "control plane listener");
    assert!(destinations.check(addr("127.0.0.1:8080")).is_ok());
    let refused = destinations.check(addr("127.0.0.1:9090")).unwrap_err();
    assert!(refused.contains("admin listener"), "{refused}");
    for on_every_address in ["127.0.0.1:8081", "127.0.0.53:8081", "[::1]:8081"] {
        let refused = destinations.check(addr(on_every_address)).unwrap_err();
        assert!(refused.contains("control plane listener"), "{on_every_address}: {refused}");
    }
    assert!(destinations.check(addr("127.0.0.1:8082")).is_ok(), "the operator opened loopback");

    let closed = Destinations::new(Vec::new());
    closed.add_public(addr("127.0.0.1:8080"), "public listener");
    closed.add_public(addr("0.0.0.0:8443"), "TLS listener");
    assert!(closed.check(addr("127.0.0.1:8080")).is_ok());
    assert!(closed.check(addr("127.0.0.1:8443")).is_ok());
    assert!(closed.check(addr("[::1]:8443")).is_ok());
    assert!(closed.check(addr("127.0.0.2:8080")).is_err(), "exactly the listener's address");
    assert!(closed.check(addr("127.0.0.1:8081")).is_err());
    assert!(closed.check(addr("192.0.2.1:8443")).is_err(), "not an address of this host");
}
