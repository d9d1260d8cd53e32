//! Every listener of `isocloud serve` — public, TLS, control plane, admin —
//! bounded the same way (`isocloud_ingress::ListenerBounds`): a peer that
//! trickles or withholds a request head is cut at the head timeout, a body
//! stalled short of its length is cut at the body bound (control, admin),
//! and a peer past its connection cap is closed at once while its open
//! connections keep working. Each breach shows in `/metrics` by listener
//! and reason. Raw sockets on loopback; each test takes a few seconds.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::ControlPlaneServe;

/// What became of a connection the test held open.
#[derive(Debug, PartialEq)]
enum Fate {
    /// The server closed it (EOF or reset) this long after the connect.
    Cut(Duration),
    /// The server answered something (not what a bounded listener does to
    /// a peer past its bound).
    Answered(String),
    /// Still open when the test stopped waiting.
    Open,
}

async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Connects, writes `start`, then one more byte every 100 ms, until the
/// server closes the connection or `give_up` passes.
async fn trickle(addr: SocketAddr, start: &'static [u8], give_up: Duration) -> Fate {
    let connected = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    if !start.is_empty() && stream.write_all(start).await.is_err() {
        return Fate::Cut(connected.elapsed());
    }
    watch_until_cut(&mut stream, connected, give_up, !start.is_empty()).await
}

/// Connects, writes `start`, then nothing: returns once the server closes
/// the connection or `give_up` passes.
async fn stall(addr: SocketAddr, start: &'static [u8], give_up: Duration) -> Fate {
    let connected = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(start).await.unwrap();
    watch_until_cut(&mut stream, connected, give_up, false).await
}

/// Reads `stream` (writing a byte of header value every 100 ms when
/// `keep_writing`) until the server closes it or `give_up` passes.
async fn watch_until_cut(stream: &mut TcpStream, since: Instant, give_up: Duration, keep_writing: bool) -> Fate {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Fate::Cut(since.elapsed()),
            Ok(Ok(n)) => return Fate::Answered(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) if since.elapsed() > give_up => return Fate::Open,
            Err(_) => {
                if keep_writing && stream.write_all(b"a").await.is_err() {
                    return Fate::Cut(since.elapsed());
                }
            }
        }
    }
}

/// Sends `request` on `stream` and reads the answer's status line (the
/// server closes or answers within 5 s).
async fn status_on(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!("no answer to {request:?}: {other:?} after {:?}", String::from_utf8_lossy(&answer)),
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    // Drain a short body so the next request on the connection starts clean.
    if let Some(length) = text.lines().find_map(|l| {
        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
    }) {
        let head_end = text.find("\r\n\r\n").unwrap() + 4;
        let mut have = answer.len() - head_end;
        while have < length {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the body of the answer to {request:?} ended early");
            have += n;
        }
    }
    text.lines().next().unwrap_or_default().to_owned()
}

fn get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

/// The value of `isocloud_listener_breaches_total{listener,reason}`.
fn breaches(metrics: &str, listener: &str, reason: &str) -> u64 {
    let sample = format!(r#"isocloud_listener_breaches_total{{listener="{listener}",reason="{reason}"}} "#);
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&sample))
        .unwrap_or_else(|| panic!("no {sample} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// Closes our side and waits for the server to close its own (so its
/// place under a cap is free again).
async fn close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept a closed connection open"),
        }
    }
}

/// A normal request on `addr` answers (the probe before each bound).
async fn answers(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    status_on(&mut stream, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_trickled_heads_on_the_control_listener_are_all_cut_at_the_head_timeout() {
    let serve = ControlPlaneServe::start(&[
        "--header-timeout-s",
        "1",
        // 100 connections from one address: above the default per-peer cap.
        "--control-max-connections-per-peer",
        "0",
        "--tls-listen",
        "127.0.0.1:0",
    ]);
    let admin = serve.runner.admin;
    let tls = serve.tls.unwrap();

    // The probe: each listener answers a request sent at once. The control
    // listener's connection is kept: idle after its answer, it is closed at
    // the head timeout too, but that is no breach.
    let mut idle = TcpStream::connect(serve.control).await.unwrap();
    assert!(status_on(&mut idle, &get("/", "cp")).await.contains(" 200 "), "the dashboard");
    let idle_since = Instant::now();
    assert!(answers(serve.runner.addr, &get("/", "nothing.localhost")).await.starts_with("HTTP/1.1 "), "public");
    assert!(answers(admin, &get("/healthz", "admin")).await.contains(" 200 "), "admin");
    let before = serve.runner.metrics().await;
    assert_eq!(breaches(&before, "control", "head_timeout"), 0);

    // 100 heads trickled a byte per 100 ms, all at once; and, on the public
    // and TLS listeners, connections that never send a byte, and one that
    // stalls in the HTTP/2 preface (before the bound, hyper's HTTP version
    // sniffing waited for them for ever).
    let started = Instant::now();
    let give_up = Duration::from_secs(6);
    let trickled = futures_util::future::join_all(
        (0..100).map(|_| trickle(serve.control, b"GET /api/v1/projects HTTP/1.1\r\nHost: cp\r\nX-Slow: ", give_up)),
    );
    let silent_public = trickle(serve.runner.addr, b"", give_up);
    let silent_tls = trickle(tls, b"", give_up);
    let h2_preface = stall(serve.runner.addr, b"PRI * HTTP/2.0\r\n\r\nSM", give_up);
    let (trickled, silent_public, silent_tls, h2_preface) =
        tokio::join!(trickled, silent_public, silent_tls, h2_preface);
    let all_done = started.elapsed();

    for (i, fate) in trickled.iter().chain([&silent_public, &silent_tls, &h2_preface]).enumerate() {
        match fate {
            // Never before the timeout (the connect came first), and within
            // it plus scheduling slack on a loaded 2-core machine.
            Fate::Cut(after) => assert!(
                *after >= Duration::from_millis(950) && *after < Duration::from_secs(4),
                "connection {i} cut after {after:?}"
            ),
            other => panic!("connection {i}: {other:?}"),
        }
    }
    assert!(all_done < Duration::from_secs(5), "all 103 cut within {all_done:?}");
    match watch_until_cut(&mut idle, idle_since, give_up, false).await {
        Fate::Cut(after) => assert!(after < Duration::from_secs(4), "the idle keep-alive closed after {after:?}"),
        other => panic!("the idle keep-alive connection: {other:?}"),
    }

    let metrics = serve.runner.metrics().await;
    assert_eq!(
        breaches(&metrics, "control", "head_timeout"),
        100,
        "each trickled head counted once, the idle keep-alive not at all"
    );
    assert_eq!(breaches(&metrics, "public", "head_timeout"), 2);
    assert_eq!(breaches(&metrics, "tls", "head_timeout"), 1);
    // Normal requests' keep-alive connections closing idle are not breaches.
    assert_eq!(breaches(&metrics, "admin", "head_timeout"), 0);
    // And the listener still answers.
    assert!(answers(serve.control, &get("/", "cp")).await.contains(" 200 "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_stalled_short_of_its_length_is_cut_at_the_body_bound() {
    let serve = ControlPlaneServe::start(&["--body-timeout-s", "1", "--header-timeout-s", "5"]);
    let token = serve.admin_token();
    let post = |body_length: usize, body: &str| {
        format!(
            "POST /api/v1/projects HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {body_length}\r\n\r\n{body}"
        )
    };
    // The probe: the same request with its whole body is answered.
    let body = r#"{"name":"whole"}"#;
    let status = answers(serve.control, &post(body.len(), body)).await;
    assert!(status.contains(" 201 "), "{status}");

    // Declared 1,000 bytes, sent 9, then nothing.
    let connected = Instant::now();
    let mut stream = TcpStream::connect(serve.control).await.unwrap();
    stream.write_all(post(1000, r#"{"name":""#).as_bytes()).await.unwrap();
    let fate = watch_until_cut(&mut stream, connected, Duration::from_secs(6), false).await;
    match fate {
        Fate::Cut(after) => assert!(
            after >= Duration::from_millis(950) && after < Duration::from_secs(4),
            "cut after {after:?} (body bound 1 s, head timeout 5 s)"
        ),
        other => panic!("the stalled body: {other:?}"),
    }
    let metrics = serve.runner.metrics().await;
    assert_eq!(breaches(&metrics, "control", "body_timeout"), 1);
    assert_eq!(breaches(&metrics, "control", "head_timeout"), 0, "the head had arrived");
}

/// Holds `cap` connections from 127.0.0.1 to `addr` (the first one has had
/// an answer), then shows the next one from there is closed unanswered,
/// one from 127.0.0.2 is served, the held one still answers, and a place
/// given back is taken again.
async fn per_peer_cap_holds(addr: SocketAddr, cap: usize, request: &str) {
    let here: IpAddr = "127.0.0.1".parse().unwrap();
    let mut held = vec![connect_from(here, addr).await];
    let first = status_on(&mut held[0], request).await;
    assert!(first.starts_with("HTTP/1.1 "), "the probe on {addr}: {first}");
    while held.len() < cap {
        held.push(connect_from(here, addr).await);
    }
    // Past the cap: accepted by the kernel, closed by the runner unread.
    let since = Instant::now();
    let mut refused = connect_from(here, addr).await;
    let _ = refused.write_all(request.as_bytes()).await;
    match watch_until_cut(&mut refused, since, Duration::from_secs(3), false).await {
        Fate::Cut(after) => assert!(after < Duration::from_millis(900), "closed at once, not at a timeout: {after:?}"),
        other => panic!("the connection past the cap on {addr}: {other:?}"),
    }
    // Another peer is not at its cap.
    let mut other = connect_from("127.0.0.2".parse().unwrap(), addr).await;
    assert_eq!(status_on(&mut other, request).await, first, "another peer on {addr}");
    // The connection already open keeps working.
    assert_eq!(status_on(&mut held[0], request).await, first, "the held connection on {addr}");
    // A closed connection gives its place back.
    close(held.pop().unwrap()).await;
    let mut again = connect_from(here, addr).await;
    assert_eq!(status_on(&mut again, request).await, first, "a place given back on {addr}");
    for stream in held.into_iter().chain([again, other]) {
        close(stream).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_past_its_cap_is_closed_at_once_while_its_open_connection_and_other_peers_are_served() {
    let serve = ControlPlaneServe::start(&[
        "--control-max-connections-per-peer",
        "3",
        "--max-connections-per-peer",
        "3",
        "--admin-max-connections-per-peer",
        "3",
    ]);
    let admin = serve.runner.admin;
    per_peer_cap_holds(serve.control, 3, &get("/", "cp")).await;
    per_peer_cap_holds(admin, 3, &get("/healthz", "admin")).await;
    // On the public listener a loopback peer is the runner's own egress
    // proxy (every isolate's calls to other deployments, bounded by the
    // proxy) or a reverse proxy on the host: counted in all, not per peer.
    let mut public = Vec::new();
    for n in 0..6 {
        let mut stream = connect_from("127.0.0.1".parse().unwrap(), serve.runner.addr).await;
        let status = status_on(&mut stream, &get("/", "nothing.localhost")).await;
        assert!(status.starts_with("HTTP/1.1 4"), "public connection {n} from loopback: {status}");
        public.push(stream);
    }
    for stream in public {
        close(stream).await;
    }

    let metrics = serve.runner.metrics().await;
    for (listener, refused) in [("control", 1), ("admin", 1), ("public", 0)] {
        assert_eq!(breaches(&metrics, listener, "per_peer_cap"), refused, "{listener}");
        assert_eq!(breaches(&metrics, listener, "total_cap"), 0, "{listener}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_at_its_total_cap_closes_the_next_connection_from_anyone() {
    let serve =
        ControlPlaneServe::start(&["--control-max-connections", "3", "--control-max-connections-per-peer", "0"]);
    let request = get("/", "cp");
    let mut held = Vec::new();
    for n in 1..=3 {
        let mut stream = connect_from(format!("127.0.0.{n}").parse().unwrap(), serve.control).await;
        assert!(status_on(&mut stream, &request).await.contains(" 200 "), "the probe from 127.0.0.{n}");
        held.push(stream);
    }
    let since = Instant::now();
    let mut refused = connect_from("127.0.0.4".parse().unwrap(), serve.control).await;
    let _ = refused.write_all(request.as_bytes()).await;
    match watch_until_cut(&mut refused, since, Duration::from_secs(3), false).await {
        Fate::Cut(after) => assert!(after < Duration::from_millis(900), "closed at once: {after:?}"),
        other => panic!("the connection past the total cap: {other:?}"),
    }
    assert!(status_on(&mut held[2], &request).await.contains(" 200 "), "the open ones keep working");
    let metrics = serve.runner.metrics().await;
    assert_eq!(breaches(&metrics, "control", "total_cap"), 1);
    assert_eq!(breaches(&metrics, "control", "per_peer_cap"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_idle_after_its_request_is_closed_at_the_head_timeout_without_a_breach() {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let serve = ControlPlaneServe::start(&["--header-timeout-s", "1"]);
    let stream = TcpStream::connect(serve.runner.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    // The probe: an h2c request is answered on it.
    let request = hyper::Request::get(format!("http://nothing.localhost:{}/", serve.runner.addr.port()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.expect("an answer over h2c");
    assert_eq!(response.status(), 404);
    drop(response);
    // Then idle: HTTP/2 has no head timeout of its own (before the bound it
    // stayed open for ever); closed (GOAWAY) at the runner's.
    let idle_since = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "the idle h2c connection was still open after 5 s");
    let after = idle_since.elapsed();
    assert!(after >= Duration::from_millis(900), "closed after {after:?}, before the head timeout");

    let metrics = serve.runner.metrics().await;
    assert_eq!(breaches(&metrics, "public", "head_timeout"), 0, "an idle connection is no breach");
}
