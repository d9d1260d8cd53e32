//! Where the proxy connects: public addresses, never internal ones
//! ([`INTERNAL_RANGES`], a table with a reason per range), unless the
//! operator opened a range (`--egress-allow-private`). The runner's public
//! listeners stay reachable (a tenant calling another deployment of this
//! cloud by its public host, hop-counted); its private ones (admin, control
//! plane) never are.
//!
//! Checked on the addresses a name resolved to, after resolution; the proxy
//! then connects to exactly the address it checked (no second lookup, so no
//! DNS rebinding between check and connect).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

/// An IP network: `10.0.0.0/8`, `fd00::/8`; a bare address is one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an IP network like 10.0.0.0/8 or fd00::/8")]
    Syntax(String),
    #[error("{text:?}: the prefix length must be 0..={max}")]
    Prefix { text: String, max: u8 },
    #[error("{text:?} has address bits set past its prefix: did you mean {network}?")]
    HostBits { text: String, network: Cidr },
}

impl Cidr {
    pub const fn v4(octets: [u8; 4], prefix: u8) -> Self {
        Self { network: IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])), prefix }
    }

    pub const fn v6(segments: [u16; 8], prefix: u8) -> Self {
        let [a, b, c, d, e, f, g, h] = segments;
        Self { network: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(u32::from(net).into(), u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => same_prefix(u128::from(net), u128::from(ip), 128, self.prefix),
            _ => false,
        }
    }
}

/// Whether `a` and `b`, numbers of `width` bits, agree in their top `prefix` bits.
fn same_prefix(a: u128, b: u128, width: u8, prefix: u8) -> bool {
    let shift = u32::from(width - prefix.min(width));
    a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0)
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| CidrError::Syntax(text.to_owned()))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(CidrError::Prefix { text: text.to_owned(), max }),
            },
        };
        // A network with host bits set is most often a typo for a wider or
        // narrower range than meant: refuse rather than guess.
        let masked = match network {
            IpAddr::V4(ip) => {
                let bits = u32::from(ip);
                let mask = u32::MAX.checked_shl(u32::from(32 - prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(bits & mask))
            }
            IpAddr::V6(ip) => {
                let bits = u128::from(ip);
                let mask = u128::MAX.checked_shl(u32::from(128 - prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        };
        if masked != network {
            return Err(CidrError::HostBits { text: text.to_owned(), network: Cidr { network: masked, prefix } });
        }
        Ok(Cidr { network, prefix })
    }
}

/// How a range's addresses carry an IPv4 address, which decides for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embeds {
    Nothing,
    /// The low 32 bits (IPv4-mapped, SIIT, NAT64's well-known prefix).
    Ipv4Low32,
    /// Bits 16..48 (6to4).
    Ipv4SixToFour,
}

/// A range the proxy does not connect to (or, when it embeds an IPv4
/// address, judges by that address).
#[derive(Debug)]
pub struct InternalRange {
    pub network: Cidr,
    /// Named in the refusal: "127.0.0.1 is loopback".
    pub class: &'static str,
    pub reason: &'static str,
    pub embeds: Embeds,
}

const fn v4(octets: [u8; 4], prefix: u8, class: &'static str, reason: &'static str) -> InternalRange {
    InternalRange { network: Cidr::v4(octets, prefix), class, reason, embeds: Embeds::Nothing }
}

const fn v6(segments: [u16; 8], prefix: u8, class: &'static str, reason: &'static str) -> InternalRange {
    InternalRange { network: Cidr::v6(segments, prefix), class, reason, embeds: Embeds::Nothing }
}

const fn v6_embedding(
    segments: [u16; 8],
    prefix: u8,
    class: &'static str,
    reason: &'static str,
    embeds: Embeds,
) -> InternalRange {
    InternalRange { network: Cidr::v6(segments, prefix), class, reason, embeds }
}

/// Every range an isolate's outbound call may not reach, first match wins.
/// Sources: the IANA special-purpose registries (RFC 6890 and updates).
pub static INTERNAL_RANGES: &[InternalRange] = &[
    // IPv4
    v4([0, 0, 0, 0], 8, "unspecified (\"this network\")", "a connect to 0.0.0.0 reaches the runner's own host"),
    v4([10, 0, 0, 0], 8, "private (RFC 1918)", "the operator's internal network"),
    v4([100, 64, 0, 0], 10, "shared address space (CGNAT, RFC 6598)", "carrier NAT and cloud-internal services"),
    v4([127, 0, 0, 0], 8, "loopback", "the runner's host: its admin listener, control plane, local databases"),
    v4(
        [169, 254, 0, 0],
        16,
        "link-local",
        "the local link, and cloud metadata (169.254.169.254: instance credentials)",
    ),
    v4([172, 16, 0, 0], 12, "private (RFC 1918)", "the operator's internal network"),
    v4([192, 0, 0, 0], 24, "IETF protocol assignments (RFC 6890)", "DS-Lite and NAT64 plumbing, not ordinary hosts"),
    v4([192, 0, 2, 0], 24, "documentation (TEST-NET-1)", "no real host; reserved for examples"),
    v4([192, 88, 99, 0], 24, "6to4 relay anycast (RFC 7526)", "deprecated relays, not ordinary hosts"),
    v4([192, 168, 0, 0], 16, "private (RFC 1918)", "the operator's internal network, home routers"),
    v4([198, 18, 0, 0], 15, "benchmarking (RFC 2544)", "lab networks; some appliances use it internally"),
    v4([198, 51, 100, 0], 24, "documentation (TEST-NET-2)", "no real host; reserved for examples"),
    v4([203, 0, 113, 0], 24, "documentation (TEST-NET-3)", "no real host; reserved for examples"),
    v4([224, 0, 0, 0], 4, "multicast", "groups on the local network, no TCP peer"),
    v4([255, 255, 255, 255], 32, "broadcast", "every host on the local link"),
    v4([240, 0, 0, 0], 4, "reserved (class E)", "not routable on the internet; some networks use it internally"),
    // IPv6
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified (::)", "a connect to :: reaches the runner's own host"),
    v6(
        [0, 0, 0, 0, 0, 0, 0, 1],
        128,
        "loopback",
        "the runner's host: its admin listener, control plane, local databases",
    ),
    v6_embedding(
        [0, 0, 0, 0, 0, 0xffff, 0, 0],
        96,
        "IPv4-mapped",
        "an IPv4 address in IPv6 form (::ffff:127.0.0.1): judged as that address",
        Embeds::Ipv4Low32,
    ),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 96, "IPv4-compatible (RFC 4291, deprecated)", "a dead embedding of IPv4"),
    v6_embedding(
        [0, 0, 0, 0, 0xffff, 0, 0, 0],
        96,
        "IPv4-translated (SIIT, RFC 2765)",
        "a translator maps it to the embedded IPv4 address: judged as that address",
        Embeds::Ipv4Low32,
    ),
    v6_embedding(
        [0x64, 0xff9b, 0, 0, 0, 0, 0, 0],
        96,
        "NAT64 (RFC 6052)",
        "a NAT64 gateway connects to the embedded IPv4 address: judged as that address",
        Embeds::Ipv4Low32,
    ),
    v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use NAT64 (RFC 8215)", "translators inside the operator's network"),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only (RFC 6666)", "a black hole, no host"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo (RFC 4380)", "tunnels to an obfuscated IPv4 address"),
    v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48, "benchmarking (RFC 5180)", "lab networks"),
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation (RFC 3849)", "no real host; reserved for examples"),
    v6_embedding(
        [0x2002, 0, 0, 0, 0, 0, 0, 0],
        16,
        "6to4 (RFC 3056)",
        "a relay connects to the embedded IPv4 address: judged as that address",
        Embeds::Ipv4SixToFour,
    ),
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation (RFC 9637)", "no real host; reserved for examples"),
    v6(
        [0xfc00, 0, 0, 0, 0, 0, 0, 0],
        7,
        "unique local (ULA, RFC 4193)",
        "IPv6 private networks, cloud metadata (fd00:ec2::254)",
    ),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local", "the local link"),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (RFC 3879, deprecated)", "old private networks"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast", "groups on the local network, no TCP peer"),
];

/// Why an address is internal: its range, and for an embedding range the
/// embedded IPv4 address and the range that one is in.
#[derive(Debug, Clone, Copy)]
pub struct Internal {
    pub range: &'static InternalRange,
    pub embedded: Option<(Ipv4Addr, &'static InternalRange)>,
}

impl std::fmt::Display for Internal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.embedded {
            None => write!(f, "{} ({})", self.range.class, self.range.reason),
            Some((ip, inner)) => write!(f, "{} of {ip}, {} ({})", self.range.class, inner.class, inner.reason),
        }
    }
}

/// The internal range `ip` is in, if any; an address embedding IPv4
/// (`::ffff:127.0.0.1`, `64:ff9b::7f00:1`, `2002:7f00:1::`) is internal
/// when the IPv4 address it embeds is.
pub fn internal(ip: IpAddr) -> Option<Internal> {
    let range = INTERNAL_RANGES.iter().find(|r| r.network.contains(ip))?;
    let embedded = match (range.embeds, ip) {
        (Embeds::Nothing, _) | (_, IpAddr::V4(_)) => return Some(Internal { range, embedded: None }),
        (Embeds::Ipv4Low32, IpAddr::V6(ip)) => Ipv4Addr::from(u128::from(ip) as u32),
        (Embeds::Ipv4SixToFour, IpAddr::V6(ip)) => Ipv4Addr::from((u128::from(ip) >> 80) as u32),
    };
    let inner = internal(IpAddr::V4(embedded))?;
    Some(Internal { range, embedded: Some((embedded, inner.range)) })
}

/// The embedded IPv4 address of an address in an embedding range.
fn embedded_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    internal(ip).and_then(|i| i.embedded).map(|(v4, _)| v4)
}

/// An IPv4 address in any spelling `inet_aton` (and so the URL standard)
/// accepts: `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`, a trailing
/// dot. Names that merely look numeric are not addresses.
pub fn parse_ipv4_loosely(text: &str) -> Option<Ipv4Addr> {
    let text = text.strip_suffix('.').unwrap_or(text);
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (*part, 10)
        };
        if part.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        // `0x` alone is 0, as inet_aton has it.
        numbers.push(if digits.is_empty() { 0 } else { u64::from_str_radix(digits, radix).ok()? });
    }
    let (last, leading) = numbers.split_last()?;
    if leading.iter().any(|&n| n > 255) || *last >= 1u64 << (8 * (5 - numbers.len())) {
        return None;
    }
    let mut value = *last;
    for (i, n) in leading.iter().enumerate() {
        value |= n << (8 * (3 - i));
    }
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

/// A listener of the runner itself, as the proxy judges calls to it.
#[derive(Debug, Clone, Copy)]
struct RunnerListener {
    addr: SocketAddr,
    /// Named in a refusal: "the admin listener".
    name: &'static str,
}

impl RunnerListener {
    /// `addr` is this listener: the same ip and port, or, for a listener on
    /// every address (0.0.0.0, ::), a loopback or local address on its port.
    fn is(&self, addr: SocketAddr) -> bool {
        if self.addr.port() != addr.port() {
            return false;
        }
        let ip = addr.ip();
        self.addr.ip() == ip || (self.addr.ip().is_unspecified() && (ip.is_loopback() || is_local_address(ip)))
    }
}

/// The proxy's rules for destinations.
#[derive(Debug, Default)]
pub(crate) struct Destinations {
    allow_private: Vec<Cidr>,
    /// Told after start-up, when the runner has bound them.
    public: Mutex<Vec<RunnerListener>>,
    private: Mutex<Vec<RunnerListener>>,
}

impl Destinations {
    pub(crate) fn new(allow_private: Vec<Cidr>) -> Self {
        Self { allow_private, ..Self::default() }
    }

    pub(crate) fn add_public(&self, addr: SocketAddr, name: &'static str) {
        self.public.lock().expect("listeners poisoned").push(RunnerListener { addr, name });
    }

    pub(crate) fn add_private(&self, addr: SocketAddr, name: &'static str) {
        self.private.lock().expect("listeners poisoned").push(RunnerListener { addr, name });
    }

    /// The address to connect to for `addr` (IPv4-mapped forms become the
    /// IPv4 address), or why not.
    pub(crate) fn check(&self, addr: SocketAddr) -> Result<SocketAddr, String> {
        let ip = addr.ip().to_canonical();
        let addr = SocketAddr::new(ip, addr.port());
        if ip.is_unspecified() {
            // Whatever an operator opened: this is the runner's own host.
            return Err(format!("{addr} is {}", internal(ip).expect("unspecified is in the table")));
        }
        if let Some(listener) = self.private.lock().expect("listeners poisoned").iter().find(|l| l.is(addr)) {
            return Err(format!("{addr} is the runner's {}, which isolates never reach", listener.name));
        }
        if self.public.lock().expect("listeners poisoned").iter().any(|l| l.is(addr)) {
            return Ok(addr);
        }
        if self.allowed_private(ip) {
            return Ok(addr);
        }
        match internal(ip) {
            Some(why) => Err(format!(
                "{addr} is {why}; isolates reach public addresses only (an operator opens internal ranges with \
                 --egress-allow-private)"
            )),
            None => Ok(addr),
        }
    }

    /// Inside a range the operator opened; an embedding form counts as the
    /// IPv4 address it embeds.
    fn allowed_private(&self, ip: IpAddr) -> bool {
        let allowed = |ip: IpAddr| self.allow_private.iter().any(|net| net.contains(ip));
        allowed(ip) || embedded_ipv4(ip).is_some_and(|v4| allowed(IpAddr::V4(v4)))
    }
}

/// Whether `ip` is an address of one of this host's interfaces. Asked only
/// for calls to a port a runner listener on 0.0.0.0 or :: holds.
#[allow(unsafe_code, reason = "getifaddrs: std has no list of the host's addresses")]
fn is_local_address(ip: IpAddr) -> bool {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocates into `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        // Unknown: treat as local, which the callers read as "the runner's
        // listener" — refused for a private one; for a public one the
        // connection goes to that port of an address this runner holds.
        return true;
    }
    let mut found = false;
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, alive
        // until freeifaddrs; ifa_addr is null or points to a sockaddr whose
        // family says which sockaddr_* it is.
        unsafe {
            let address = (*entry).ifa_addr;
            if !address.is_null() {
                let local = match i32::from((*address).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(address as *const libc::sockaddr_in);
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(address as *const libc::sockaddr_in6);
                        Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                };
                if local == Some(ip) {
                    found = true;
                    break;
                }
            }
            entry = (*entry).ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests;
