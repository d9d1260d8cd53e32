//! The egress proxy over real TCP on loopback: credentials, the allow-list,
//! hop bound, counters, tunnels, and revocation.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use isocloud_egress::{EgressOptions, EgressProxy, HOPS_HEADER};
use isocloud_protocol::NetPermission;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The upstreams here listen on loopback, which the proxy refuses unless
/// the operator opened it (`--egress-allow-private`): these tests open it.
fn options() -> EgressOptions {
    let mut options = EgressOptions::new(3);
    options.connect_timeout = Duration::from_secs(5);
    options.allow_private = vec!["127.0.0.0/8".parse().unwrap()];
    options
}

/// An upstream HTTP server that records each request head and its peer
/// address, and answers `hello` (`Connection: close`).
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<(String, SocketAddr)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, peer) = listener.accept().await.unwrap();
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let declared: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let body_start = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let mut have = buf.len() - body_start;
                while have < declared {
                    let n = stream.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    have += n;
                }
                recorded.lock().unwrap().push((head, peer));
                let _ =
                    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello").await;
            });
        }
    });
    (addr, seen)
}

/// An echo server for tunnels.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn basic(token: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("isolate:{token}"))
}

fn token_of(grant: &isocloud_egress::EgressGrant) -> String {
    let url = grant.proxy_url();
    let rest = url.strip_prefix("http://isolate:").unwrap();
    rest.split_once('@').unwrap().0.to_owned()
}

/// Sends raw bytes to the proxy and reads until it closes the connection.
async fn exchange(proxy: SocketAddr, request: String) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await.expect("proxy answered").unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn get(target: &str, token: Option<&str>, body: &str) -> String {
    let auth = token.map(|t| format!("proxy-authorization: Basic {}\r\n", basic(t))).unwrap_or_default();
    format!(
        "POST {target} HTTP/1.1\r\nhost: x\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn credentials_are_required_and_revoked_with_the_grant() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options()).await.unwrap();
    let (up, seen) = upstream().await;
    let target = format!("http://{up}/");

    let answer = exchange(proxy.local_addr(), get(&target, None, "")).await;
    assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");
    assert!(answer.contains("EGRESS_AUTH_REQUIRED"), "{answer}");
    let answer = exchange(proxy.local_addr(), get(&target, Some("not-a-token"), "")).await;
    assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");

    let grant = proxy.grant("d1", NetPermission::All);
    let token = token_of(&grant);
    let answer = exchange(proxy.local_addr(), get(&target, Some(&token), "")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    drop(grant);
    let answer = exchange(proxy.local_addr(), get(&target, Some(&token), "")).await;
    assert!(answer.starts_with("HTTP/1.1 407"), "a revoked token must not work: {answer}");
    assert_eq!(seen.lock().unwrap().len(), 1, "refused calls never reach the upstream");
}

#[tokio::test]
async fn the_allow_list_is_enforced_again() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options()).await.unwrap();
    let (up, seen) = upstream().await;
    let grant = proxy.grant("d1", NetPermission::Allow(vec![format!("allowed.localhost:{}", up.port())]));
    let token = token_of(&grant);

    let answer =
        exchange(proxy.local_addr(), get(&format!("http://allowed.localhost:{}/", up.port()), Some(&token), "")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for denied in [format!("http://{up}/"), format!("http://other.localhost:{}/", up.port())] {
        let answer = exchange(proxy.local_addr(), get(&denied, Some(&token), "")).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{denied}: {answer}");
        assert!(answer.contains("not in this deployment's permissions.net"), "{answer}");
    }
    let connect = format!(
        "CONNECT 127.0.0.1:{} HTTP/1.1\r\nhost: 127.0.0.1\r\nproxy-authorization: Basic {}\r\nconnection: close\r\n\r\n",
        up.port(),
        basic(&token)
    );
    let answer = exchange(proxy.local_addr(), connect).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "tunnels are checked too: {answer}");

    let usage = grant.take_usage();
    assert_eq!((usage.requests, usage.denied), (1, 3));
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn plain_http_is_forwarded_with_a_hop_count_and_counted() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options()).await.unwrap();
    let (up, seen) = upstream().await;
    let grant = proxy.grant("d1", NetPermission::All);
    let token = token_of(&grant);

    let serving = grant.enter(1);
    let answer = exchange(proxy.local_addr(), get(&format!("http://{up}/path?q=1"), Some(&token), "0123456789")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello"), "{answer}");
    drop(serving);

    let (head, peer) = seen.lock().unwrap()[0].clone();
    assert!(head.starts_with("POST /path?q=1 HTTP/1.1"), "origin-form upstream: {head}");
    assert!(head.to_ascii_lowercase().contains(&format!("{HOPS_HEADER}: 2")), "serving hop 1 → calls carry 2: {head}");
    assert!(!head.to_ascii_lowercase().contains("proxy-authorization"), "credentials stay with the proxy: {head}");
    // The link is gone once the exchange is over.
    assert_eq!(proxy.hops_of_peer(peer), None);

    let usage = grant.take_usage();
    assert_eq!((usage.requests, usage.bytes_sent, usage.bytes_received), (1, 10, 5));
    assert_eq!(grant.take_usage(), Default::default(), "take_usage resets");
}

#[tokio::test]
async fn calls_past_the_hop_bound_are_loops() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options()).await.unwrap();
    let (up, seen) = upstream().await;
    let grant = proxy.grant("d1", NetPermission::All);
    let token = token_of(&grant);

    let _low = grant.enter(0);
    let deep = grant.enter(options().max_hops);
    let answer = exchange(proxy.local_addr(), get(&format!("http://{up}/"), Some(&token), "")).await;
    assert!(answer.starts_with("HTTP/1.1 508"), "{answer}");
    assert!(answer.contains("LOOP_DETECTED"), "{answer}");
    assert_eq!(grant.take_usage().loops, 1);
    assert!(seen.lock().unwrap().is_empty());

    drop(deep);
    let answer = exchange(proxy.local_addr(), get(&format!("http://{up}/"), Some(&token), "")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "the bound follows the requests in flight: {answer}");
}

#[tokio::test]
async fn tunnels_carry_bytes_both_ways_and_close_with_the_grant() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options()).await.unwrap();
    let echo = echo().await;
    let grant = proxy.grant("d1", NetPermission::All);
    let token = token_of(&grant);

    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let connect =
        format!("CONNECT {echo} HTTP/1.1\r\nhost: {echo}\r\nproxy-authorization: Basic {}\r\n\r\n", basic(&token));
    stream.write_all(connect.as_bytes()).await.unwrap();
    let mut head = [0u8; 19];
    stream.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let mut rest = Vec::new();
    while !rest.ends_with(b"\r\n\r\n") {
        rest.push(stream.read_u8().await.unwrap());
    }
    stream.write_all(b"ping through the tunnel").await.unwrap();
    let mut echoed = [0u8; 23];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping through the tunnel");

    // The grant ends (the isolate is gone): its tunnel closes.
    let state = grant.take_usage();
    assert_eq!(state.requests, 1);
    drop(grant);
    let mut tail = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut tail)).await;
    assert!(closed.is_ok(), "the tunnel must close when the grant is revoked");
}

#[tokio::test]
async fn the_probe_answers_without_leaving_the_proxy() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options()).await.unwrap();
    let grant = proxy.grant("d1", NetPermission::None);
    let token = token_of(&grant);
    let request = format!(
        "GET http://{0}/ HTTP/1.1\r\nhost: {0}\r\nproxy-authorization: Basic {1}\r\nconnection: close\r\n\r\n",
        grant.proxy_authority(),
        basic(&token)
    );
    let answer = exchange(proxy.local_addr(), request).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert_eq!(grant.take_usage(), Default::default(), "the probe is not a call");
}

#[tokio::test]
async fn the_ingress_can_tell_its_own_proxy_connections() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options()).await.unwrap();
    // An "ingress" that holds the request open while it asks the proxy.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ingress = listener.local_addr().unwrap();
    let asked = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let (mut stream, peer) = listener.accept().await.unwrap();
            // Looked up once the request head is in, as the ingress does:
            // the proxy registers the link before it sends a byte.
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let hops = proxy.hops_of_peer(peer);
            stream.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n").await.unwrap();
            hops
        })
    };
    let grant = proxy.grant("d1", NetPermission::All);
    let _serving = grant.enter(2);
    let answer = exchange(proxy.local_addr(), get(&format!("http://{ingress}/"), Some(&token_of(&grant)), "")).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert_eq!(asked.await.unwrap(), Some(3));
    assert_eq!(proxy.hops_of_peer("127.0.0.1:1".parse().unwrap()), None);
}

#[tokio::test]
async fn a_grant_serves_the_proxy_on_a_listener_of_its_own_until_it_ends() {
    let proxy = EgressProxy::start("127.0.0.1:0".parse().unwrap(), options()).await.unwrap();
    let (up, seen) = upstream().await;
    let mut grant = proxy.grant("d1", NetPermission::All);
    assert_eq!(grant.proxy_addr(), proxy.local_addr());
    let token = token_of(&grant);
    // Stands in for the listener inside an isolate's network namespace.
    let inside = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inside_addr = inside.local_addr().unwrap();
    inside.set_nonblocking(true).unwrap();
    grant.serve_inside(inside).unwrap();

    let answer = exchange(inside_addr, get(&format!("http://{up}/"), Some(&token), "")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let head = seen.lock().unwrap()[0].0.to_ascii_lowercase();
    assert!(head.contains(&format!("{HOPS_HEADER}: 1")), "the same proxy served it: {head}");

    drop(grant);
    // The abort lands on the runtime's next turn.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(inside_addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener closes with the grant");
}
