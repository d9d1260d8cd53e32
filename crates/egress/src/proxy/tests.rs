//! The proxy on real sockets: a loopback "internal service" the tests start,
//! reached first (the probe works) and then refused by every spelling.

use std::sync::atomic::AtomicUsize;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A TCP service on 127.0.0.1:0 that counts connections and answers
/// `HTTP/1.1 200` to whatever arrives.
struct Internal {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn internal_service() -> Internal {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\ninternal")
                    .await;
            });
        }
    });
    Internal { addr, connections }
}

fn options(allow_private: &[&str]) -> EgressOptions {
    let mut options = EgressOptions::new(10);
    options.allow_private = allow_private.iter().map(|c| c.parse().unwrap()).collect();
    options.connect_timeout = Duration::from_secs(5);
    options
}

fn token_of(grant: &EgressGrant) -> String {
    let url = grant.proxy_url();
    let credentials = url.strip_prefix("http://").unwrap().split('@').next().unwrap();
    credentials.split_once(':').unwrap().1.to_owned()
}

/// One request to the proxy at `proxy`; the status and the body (empty for
/// a tunnel that opened) and the connection, which a tunnel keeps.
async fn ask(proxy: SocketAddr, token: &str, method: &str, target: &str) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("isolate:{token}"));
    let host = if method == "CONNECT" { target.to_owned() } else { "x".to_owned() };
    let request =
        format!("{method} {target} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: Basic {credentials}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut stream).await;
    (status, body, stream)
}

async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let (head, body) = read_head_and_body(stream).await;
    (head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), body)
}

/// One response: its head, lowercased, and its body.
async fn read_head_and_body(stream: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|l| l.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Names in /etc/hosts that stand for a loopback address but are not
/// `localhost` (which the proxy maps itself): they go through the resolver.
fn loopback_names_in_etc_hosts() -> Vec<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut names = Vec::new();
    for line in hosts.lines().map(|l| l.split('#').next().unwrap_or("")) {
        let mut fields = line.split_whitespace();
        let Some(ip) = fields.next().and_then(|ip| ip.parse::<IpAddr>().ok()) else { continue };
        if ip.is_loopback() {
            names.extend(fields.filter(|n| !n.contains("localhost")).map(str::to_owned));
        }
    }
    names
}

fn spellings(port: u16) -> Vec<String> {
    let mut hosts: Vec<String> = [
        "127.0.0.1",
        "127.1",
        "127.0.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "localhost",
        "LOCALHOST",
        "localhost.",
        "internal.localhost",
        "a.b.localhost.",
    ]
    .iter()
    .map(|h| h.to_string())
    .collect();
    hosts.extend(loopback_names_in_etc_hosts());
    hosts.into_iter().map(|h| format!("{h}:{port}")).collect()
}

#[tokio::test]
async fn every_spelling_of_loopback_is_refused_after_the_probe_reaches_it() {
    let service = internal_service().await;
    let port = service.addr.port();

    // The probe: with loopback opened, each spelling reaches the service.
    let open = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options(&["127.0.0.0/8", "::1/128"])).await.unwrap();
    let grant = open.grant("probe", NetPermission::All);
    for target in spellings(port) {
        let (status, _, _) = ask(open.local_addr(), &token_of(&grant), "CONNECT", &target).await;
        assert_eq!(status, 200, "CONNECT {target}");
        let (status, body, _) = ask(open.local_addr(), &token_of(&grant), "GET", &format!("http://{target}/")).await;
        assert_eq!((status, body.as_str()), (200, "internal"), "GET {target}");
    }
    let reached = service.connections.load(Ordering::SeqCst);
    assert_eq!(reached, 2 * spellings(port).len());

    // By default: refused, all of them, by both ways through the proxy.
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options(&[])).await.unwrap();
    let grant = proxy.grant("tenant", NetPermission::All);
    let mut targets = spellings(port);
    targets.extend([format!("0.0.0.0:{port}"), format!("0:{port}"), format!("[::]:{port}")]);
    for target in &targets {
        for (method, request_target) in [("CONNECT", target.clone()), ("GET", format!("http://{target}/"))] {
            let (status, body, _) = ask(proxy.local_addr(), &token_of(&grant), method, &request_target).await;
            assert_eq!(status, 403, "{method} {request_target}: {body}");
            assert!(body.contains("EGRESS_DENIED"), "{body}");
            assert!(body.contains("loopback") || body.contains("unspecified"), "names the class: {body}");
        }
    }
    assert_eq!(service.connections.load(Ordering::SeqCst), reached, "no refused call reached the service");
    let usage = grant.take_usage();
    assert_eq!(usage.internal_denied, 2 * targets.len() as u64);
    assert_eq!(usage.requests, 0);
    assert_eq!(proxy.refusals().internal_address, 2 * targets.len() as u64);
}

#[tokio::test]
async fn other_internal_ranges_are_refused_with_their_class() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options(&[])).await.unwrap();
    let grant = proxy.grant("tenant", NetPermission::All);
    for (target, class) in [
        ("169.254.169.254:80", "link-local"),
        ("10.0.0.1:80", "private"),
        ("192.168.0.1:80", "private"),
        ("100.64.0.1:80", "CGNAT"),
        ("[fd00::1]:80", "unique local"),
        ("[fe80::1]:80", "link-local"),
        ("[64:ff9b::a9fe:a9fe]:80", "NAT64"),
        ("224.0.0.1:80", "multicast"),
        ("255.255.255.255:80", "broadcast"),
    ] {
        let (status, body, _) = ask(proxy.local_addr(), &token_of(&grant), "CONNECT", target).await;
        assert_eq!(status, 403, "{target}: {body}");
        assert!(body.contains(class), "{target}: {body}");
    }
}

#[tokio::test]
async fn the_runners_public_listener_is_reachable_and_its_private_ones_never() {
    let public = internal_service().await;
    let admin = internal_service().await;
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options(&[])).await.unwrap();
    proxy.add_public_listener(public.addr, "public listener");
    proxy.add_private_listener(admin.addr, "admin listener");
    let grant = proxy.grant("tenant", NetPermission::All);
    let token = token_of(&grant);
    let (status, body, _) =
        ask(proxy.local_addr(), &token, "GET", &format!("http://other.localhost:{}/", public.addr.port())).await;
    assert_eq!((status, body.as_str()), (200, "internal"), "another deployment, by the public listener");
    let (status, body, _) =
        ask(proxy.local_addr(), &token, "GET", &format!("http://localhost:{}/metrics", admin.addr.port())).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin listener"), "{body}");
    let (status, body, _) =
        ask(proxy.local_addr(), &token, "GET", &format!("http://localhost:{}/", public.addr.port() ^ 1)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("loopback"), "only the listener's own port: {body}");

    // Even where the operator opened loopback: the admin listener and the
    // proxy itself stay closed.
    let open = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options(&["127.0.0.0/8"])).await.unwrap();
    open.add_private_listener(admin.addr, "admin listener");
    let grant = open.grant("tenant", NetPermission::All);
    let token = token_of(&grant);
    let (status, body, _) = ask(open.local_addr(), &token, "CONNECT", &admin.addr.to_string()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin listener"), "{body}");
    let (status, body, _) = ask(open.local_addr(), &token, "CONNECT", &open.local_addr().to_string()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("egress proxy"), "{body}");
    assert_eq!(admin.connections.load(Ordering::SeqCst), 0);
    let (status, _, _) = ask(open.local_addr(), &token, "CONNECT", &public.addr.to_string()).await;
    assert_eq!(status, 200, "the opened range itself works");
}

#[tokio::test]
async fn a_grants_outbound_connections_are_bounded() {
    let service = internal_service().await;
    let mut options = options(&["127.0.0.0/8"]);
    options.max_connections_per_isolate = 2;
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options).await.unwrap();
    let grant = proxy.grant("tenant", NetPermission::All);
    let token = token_of(&grant);
    let target = service.addr.to_string();
    let (first, _, tunnel_1) = ask(proxy.local_addr(), &token, "CONNECT", &target).await;
    let (second, _, _tunnel_2) = ask(proxy.local_addr(), &token, "CONNECT", &target).await;
    assert_eq!((first, second), (200, 200));
    let (status, body, _) = ask(proxy.local_addr(), &token, "CONNECT", &target).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("EGRESS_CONNECTION_LIMIT") && body.contains("2 outbound connections"), "{body}");
    assert_eq!(grant.take_usage().over_limit, 1);
    assert_eq!(proxy.refusals().isolate_connections, 1);

    // Another isolate is not affected; a closed tunnel frees its slot.
    let other = proxy.grant("neighbour", NetPermission::All);
    assert_eq!(ask(proxy.local_addr(), &token_of(&other), "CONNECT", &target).await.0, 200);
    drop(tunnel_1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, _) = ask(proxy.local_addr(), &token, "CONNECT", &target).await;
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn the_shared_listener_is_bounded_and_idle_connections_time_out() {
    let mut options = options(&[]);
    options.max_shared_connections = 4;
    options.header_timeout = Duration::from_millis(300);
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options).await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(proxy.local_addr()).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy.open_connections() < 4 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut fifth = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (head, body) = read_head_and_body(&mut fifth).await;
    assert!(head.starts_with("http/1.1 503 "), "{head}");
    assert!(head.contains("x-isocloud-error: capacity\r\n") && head.contains("retry-after: 1\r\n"), "{head}");
    assert!(body.contains("CAPACITY"), "{body}");
    assert!(is_closed(&mut fifth).await);
    assert_eq!(proxy.open_connections(), 4, "the refused one holds nothing");
    assert_eq!(proxy.refusals().shared_connections, 1);

    // Nothing arrived on them within the header timeout: closed.
    for stream in &mut idle {
        assert!(is_closed(stream).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy.open_connections() > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, _, _) = ask(proxy.local_addr(), "no-such-token", "CONNECT", "example.com:443").await;
    assert_eq!(status, 407, "room again");
}

#[tokio::test]
async fn a_listener_inside_a_namespace_is_bounded_per_isolate() {
    let mut options = options(&[]);
    options.max_connections_per_isolate = 3;
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options).await.unwrap();
    let mut grant = proxy.grant("tenant", NetPermission::All);
    // Any listener serves for the test; the runner binds it in the
    // isolate's network namespace.
    let inside = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    inside.set_nonblocking(true).unwrap();
    let inside_addr = inside.local_addr().unwrap();
    grant.serve_inside(inside).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(inside_addr).await.unwrap());
    }
    let mut fourth = TcpStream::connect(inside_addr).await.unwrap();
    let (status, body) = read_response(&mut fourth).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("EGRESS_CONNECTION_LIMIT") && body.contains("3 connections"), "{body}");
    assert_eq!(grant.take_usage().over_limit, 1);
    assert_eq!(proxy.refusals().isolate_connections, 1);
    assert_eq!(proxy.open_connections(), 3);
    // The shared listener is another bound.
    let (status, _, _) = ask(proxy.local_addr(), &token_of(&grant), "CONNECT", "10.0.0.1:80").await;
    assert_eq!(status, 403);
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy.open_connections() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "closed connections free their slots");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut again = TcpStream::connect(inside_addr).await.unwrap();
    again.write_all(b"GET http://10.0.0.1/ HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut again).await.0, 407, "served again (no credentials: 407)");
}

/// A service on 127.0.0.1:0 that reads a request and closes without an answer.
async fn silent_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    addr
}

/// An upstream that cannot be reached is not a denial: 502
/// `UPSTREAM_UNREACHABLE` (retryable, nothing was sent); one that took the
/// request and failed is 502 `UPSTREAM_FAILED` (not retryable).
#[tokio::test]
async fn an_unreachable_or_failing_upstream_is_told_from_a_denial() {
    let service = internal_service().await;
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options(&["127.0.0.0/8"])).await.unwrap();
    let grant = proxy.grant("tenant", NetPermission::All);
    let token = token_of(&grant);
    // The probe: an allowed upstream that answers is reached both ways.
    assert_eq!(ask(proxy.local_addr(), &token, "CONNECT", &service.addr.to_string()).await.0, 200);
    let (status, body, _) = ask(proxy.local_addr(), &token, "GET", &format!("http://{}/", service.addr)).await;
    assert_eq!((status, body.as_str()), (200, "internal"));

    // Nobody listens on a port just freed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for (method, target) in [("CONNECT", closed.to_string()), ("GET", format!("http://{closed}/"))] {
        let (status, body, _) = ask(proxy.local_addr(), &token, method, &target).await;
        assert_eq!(status, 502, "{method} {target}: {body}");
        assert!(body.contains("UPSTREAM_UNREACHABLE") && body.contains("cannot connect"), "{body}");
    }

    let silent = silent_service().await;
    let (status, body, _) = ask(proxy.local_addr(), &token, "GET", &format!("http://{silent}/")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("UPSTREAM_FAILED"), "{body}");
    assert_eq!(grant.take_usage().denied, 0, "none of them was a denial");
}

/// The proxy's own protocol errors: a request it cannot proxy is 400
/// `BAD_REQUEST`; no credentials is 407 with the challenge HTTP requires.
#[tokio::test]
async fn a_malformed_proxy_request_is_400_and_no_credentials_407_with_a_challenge() {
    let service = internal_service().await;
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options(&["127.0.0.0/8"])).await.unwrap();
    let grant = proxy.grant("tenant", NetPermission::All);
    let token = token_of(&grant);
    let (status, _, _) = ask(proxy.local_addr(), &token, "GET", &format!("http://{}/", service.addr)).await;
    assert_eq!(status, 200, "the probe: an absolute-form http URL is proxied");
    let (status, body, _) = ask(proxy.local_addr(), &token, "GET", &format!("https://{}/", service.addr)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("BAD_REQUEST") && body.contains("CONNECT"), "{body}");

    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let request = format!("CONNECT {0} HTTP/1.1\r\nhost: {0}\r\n\r\n", service.addr);
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_head_and_body(&mut stream).await;
    assert!(head.starts_with("http/1.1 407 "), "{head}");
    assert!(head.contains("proxy-authenticate: basic realm=\"isocloud egress\"\r\n"), "{head}");
    assert!(head.contains("x-isocloud-error: egress_auth_required\r\n"), "{head}");
    assert!(body.contains("EGRESS_AUTH_REQUIRED"), "{body}");
}
