//! The public edge against hostile HTTP (issue 11): requests whose host is
//! ambiguous get 400 and reach no isolate (row 11), written byte by byte over
//! TCP and over h2c; upgraded connections and response bodies are bounded in
//! idle time and lifetime, so idle WebSockets cannot hold every isolate slot
//! (row 9). Each denial first shows its probe: the well-formed request is
//! served, the unbounded stream holds.

use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Counts the requests that reach it.
const COUNTER: &str = r#"
let n = 0;
Deno.serve((req) => Response.json({ n: ++n, url: req.url, host: req.headers.get("host") }));
"#;

/// Echoes WebSocket messages.
const WS_ECHO: &str = r#"
Deno.serve((req) => {
  if (req.headers.get("upgrade") !== "websocket") return new Response("plain");
  const { socket, response } = Deno.upgradeWebSocket(req);
  socket.onmessage = (e) => socket.send(`echo: ${e.data}`);
  return response;
});
"#;

/// One tick every 200 ms, forever, at `/forever`; one chunk and then
/// silence at `/stall`.
const ENDLESS: &str = r#"
Deno.serve((req) => {
  const stall = new URL(req.url).pathname === "/stall";
  const encoder = new TextEncoder();
  let timer;
  const body = new ReadableStream({
    start(controller) {
      controller.enqueue(encoder.encode("first\n"));
      if (!stall) timer = setInterval(() => controller.enqueue(encoder.encode("tick\n")), 200);
    },
    cancel() { clearInterval(timer); },
  });
  return new Response(body, { headers: { "content-type": "text/plain" } });
});
"#;

/// A response read off a raw connection.
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.head, self.body))
    }

    /// The runner's own 400, never the tenant's answer.
    fn assert_bad_request(&self, what: &str) {
        assert_eq!(self.status, 400, "{what}: {}\n{}", self.head, self.body);
        assert_eq!(self.header("x-isocloud-error"), Some("BAD_REQUEST"), "{what}: {}", self.head);
        assert_eq!(self.json()["error"]["code"], "BAD_REQUEST", "{what}: {}", self.body);
    }
}

/// Writes `request` as it is onto a fresh connection and reads the answer
/// to the connection's end (every request here says `Connection: close`).
async fn raw(runner: &Runner, request: &str) -> Raw {
    let mut stream = tokio::net::TcpStream::connect(runner.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut bytes))
        .await
        .expect("the runner answers and closes")
        .unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {text:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    let mut response = Raw { status, head: head.to_owned(), body: body.to_owned() };
    if response.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        response.body = dechunk(&response.body);
    }
    response
}

fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        text = &rest[size + 2..];
    }
    out
}

fn get(target: &str, hosts: &[&str]) -> String {
    let mut request = format!("GET {target} HTTP/1.1\r\n");
    for host in hosts {
        request.push_str(&format!("Host: {host}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    request
}

#[tokio::test]
async fn http1_requests_with_ambiguous_hosts_get_400_and_reach_no_isolate() {
    let apps = AppsDir::new();
    apps.app("probe", &[("main.ts", COUNTER)]).app("other", &[("main.ts", COUNTER)]);
    let runner = apps.serve(&[]);
    let port = runner.addr.port();
    let probe = format!("probe.localhost:{port}");
    let other = format!("other.localhost:{port}");

    // The probe: well-formed requests, origin-form and absolute-form, are served.
    let served = raw(&runner, &get("/a", &[&probe])).await;
    assert_eq!(served.status, 200, "{}\n{}", served.head, served.body);
    assert_eq!(served.json()["n"], 1);
    let absolute = format!("http://{probe}/b");
    let served = raw(&runner, &get(&absolute, &[&probe])).await;
    assert_eq!(served.status, 200, "{}\n{}", served.head, served.body);
    assert_eq!(served.json()["n"], 2);
    assert_eq!(served.json()["url"], absolute);
    // Case and the scheme's default port are no disagreement.
    let served = raw(&runner, &get("http://probe.localhost/c", &["PROBE.localhost:80"])).await;
    assert_eq!(served.json()["n"], 3, "{}", served.body);
    let pids = runner.isolate_pids();
    assert_eq!(pids.len(), 1);

    let to_other = format!("http://{other}/x");
    let to_probe = format!("http://{probe}/x");
    let probe_other_port = format!("probe.localhost:{}", port.wrapping_add(1));
    let list = format!("{probe}, {other}");
    let cases: Vec<(&str, String)> = vec![
        ("two Host headers, probe first", get("/x", &[&probe, &other])),
        ("two Host headers, other first", get("/x", &[&other, &probe])),
        ("two identical Host headers", get("/x", &[&probe, &probe])),
        ("absolute-form other, Host probe", get(&to_other, &[&probe])),
        ("absolute-form probe, Host other", get(&to_probe, &[&other])),
        ("absolute-form probe, Host probe on another port", get(&to_probe, &[&probe_other_port])),
        ("absolute-form probe, two Hosts", get(&to_probe, &[&probe, &probe])),
        ("HTTP/1.1 without Host", get("/x", &[])),
        ("HTTP/1.1 absolute-form without Host", get(&to_probe, &[])),
        ("a Host that is a list", get("/x", &[&list])),
        ("a Host with a path", get("/x", &["probe.localhost/x"])),
        ("user info in the target", get(&format!("http://u@{probe}/x"), &[&probe])),
        // Field names are case-insensitive: still two Hosts.
        (
            "Host and a second hOsT",
            format!("GET /x HTTP/1.1\r\nHost: {probe}\r\nhOsT: {other}\r\nConnection: close\r\n\r\n"),
        ),
    ];
    for (what, request) in &cases {
        raw(&runner, request).await.assert_bad_request(what);
    }

    // None of them reached an isolate: the probe counted only the good ones,
    // and the other deployment never booted.
    let served = raw(&runner, &get("/after", &[&probe])).await;
    assert_eq!(served.json()["n"], 4, "a malformed request reached the isolate");
    assert_eq!(runner.isolate_pids(), pids, "a malformed request booted an isolate");
    let metrics = runner.metrics().await;
    let counted = format!("isocloud_requests_total{{status=\"400\",code=\"BAD_REQUEST\"}} {}", cases.len());
    assert!(has_metric(&metrics, &counted), "{counted} not in\n{metrics}");
}

#[tokio::test]
async fn h2c_requests_whose_authority_and_host_disagree_get_400() {
    use http_body_util::{BodyExt, Empty};

    let apps = AppsDir::new();
    apps.app("probe", &[("main.ts", COUNTER)]).app("other", &[("main.ts", COUNTER)]);
    let runner = apps.serve(&[]);
    let port = runner.addr.port();
    let stream = tokio::net::TcpStream::connect(runner.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("the runner speaks h2c");
    let connection = tokio::spawn(connection);
    let send = |authority: String, hosts: Vec<String>| {
        let mut sender = sender.clone();
        async move {
            let mut request = hyper::Request::get(format!("http://{authority}/h2"));
            for host in hosts {
                request = request.header(hyper::header::HOST, host);
            }
            let response = sender
                .send_request(request.body(Empty::<bytes::Bytes>::new()).unwrap())
                .await
                .expect("a stream of the connection");
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            let status = response.status().as_u16();
            let code = response.headers().get("x-isocloud-error").map(|v| v.to_str().unwrap().to_owned());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, code, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let probe = format!("probe.localhost:{port}");
    let other = format!("other.localhost:{port}");

    // The probe: `:authority` alone, and with a Host that agrees.
    let (status, _, body) = send(probe.clone(), vec![]).await;
    assert_eq!((status, &body["n"]), (200, &Value::from(1)), "{body}");
    assert_eq!(body["url"], format!("http://{probe}/h2"));
    let (status, _, body) = send(probe.clone(), vec![probe.clone()]).await;
    assert_eq!((status, &body["n"]), (200, &Value::from(2)), "{body}");
    let pids = runner.isolate_pids();

    for (what, authority, hosts) in [
        ("Host names another deployment", probe.clone(), vec![other.clone()]),
        (":authority names another deployment", other.clone(), vec![probe.clone()]),
        ("Host on another port", probe.clone(), vec![format!("probe.localhost:{}", port.wrapping_add(1))]),
        ("two Host headers", probe.clone(), vec![probe.clone(), probe.clone()]),
        ("two Host headers disagreeing", probe.clone(), vec![probe.clone(), other.clone()]),
    ] {
        let (status, code, body) = send(authority, hosts).await;
        assert_eq!((status, code.as_deref()), (400, Some("BAD_REQUEST")), "{what}: {body}");
        assert_eq!(body["error"]["code"], "BAD_REQUEST", "{what}: {body}");
    }

    // Each refusal was its own stream's: the connection serves on, and no
    // refused request reached or booted an isolate.
    let (status, _, body) = send(probe.clone(), vec![]).await;
    assert_eq!((status, &body["n"]), (200, &Value::from(3)), "a malformed request reached the isolate: {body}");
    assert_eq!(runner.isolate_pids(), pids, "a malformed request booted an isolate");
    assert!(!connection.is_finished());
}

async fn websocket(runner: &Runner, host: &str) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(runner.addr).await.unwrap();
    let url = format!("ws://{host}:{}/socket", runner.addr.port());
    let (socket, response) = tokio_tungstenite::client_async(url, tcp).await.expect("websocket handshake");
    assert_eq!(response.status(), 101);
    socket
}

async fn echo(socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, text: &str) {
    socket.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.expect("an echo in time");
    assert_eq!(reply.unwrap().unwrap(), Message::text(format!("echo: {text}")));
}

fn ws_apps() -> AppsDir {
    let apps = AppsDir::new();
    apps.app("ws", &[("main.ts", WS_ECHO)]).app("other", &[("main.ts", COUNTER)]);
    apps
}

/// The probe for the bound below: without one (the default idle timeout is
/// a minute), one idle WebSocket holds the only isolate slot and another
/// tenant's deployment gets 503 `CAPACITY`.
#[tokio::test]
async fn without_a_short_bound_an_idle_websocket_holds_its_slot() {
    let apps = ws_apps();
    let runner = apps.serve(&["--max-isolates", "1"]);
    let mut socket = websocket(&runner, "ws.localhost").await;
    echo(&mut socket, "hello").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    expect_error(runner.get("other.localhost", "/").await, 503, "CAPACITY").await;
    // Still open and working.
    echo(&mut socket, "still here").await;
    assert!(!has_metric(&runner.metrics().await, "isocloud_streams_cut_total{"));
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_the_idle_timeout_and_frees_its_slot() {
    let apps = ws_apps();
    let runner = apps.serve(&["--max-isolates", "1", "--stream-idle-timeout-s", "1", "--stream-max-lifetime-s", "60"]);
    let mut socket = websocket(&runner, "ws.localhost").await;
    // Busy is not idle: a message every 300 ms keeps it open past the timeout.
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        echo(&mut socket, &format!("message {i}")).await;
        i += 1;
    }
    // Then silence (from the last echo on): the runner closes it.
    let quiet_since = Instant::now();
    expect_error(runner.get("other.localhost", "/").await, 503, "CAPACITY").await;
    let ended = tokio::time::timeout(Duration::from_secs(10), socket.next()).await;
    match &ended {
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) | Err(_) => {}
        Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
    }
    let quiet = quiet_since.elapsed();
    assert!(ended.is_ok(), "the idle WebSocket was never closed");
    assert!(quiet >= Duration::from_millis(900), "closed after {quiet:?}, before the idle timeout");
    assert!(quiet < Duration::from_secs(4), "closed after {quiet:?}");

    // Its isolate is no longer busy: another tenant's deployment boots in its slot.
    let response = runner.get("other.localhost", "/").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let metrics = runner.metrics().await;
    assert!(has_metric(&metrics, "isocloud_streams_cut_total{kind=\"upgrade\",bound=\"idle\"} 1"), "{metrics}");
    runner.wait_for_log("stream closed by the runner");
    // The tenant is told too, in its own logs (apps mode: the runner's log,
    // as `isocloud::tenant`).
    runner.wait_for_log("[isocloud] upgrade closed by the runner after 1 s");
}

/// Reads `path` until the body ends; returns the text, whether it ended with
/// an error (cut) rather than cleanly, and when it ended.
async fn read_stream(runner: &Runner, host: &str, path: &str) -> (String, bool, Duration) {
    let response = runner.get(host, path).await;
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut failed = false;
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stream never ended; got {text:?}");
    (text, failed, started.elapsed())
}

#[tokio::test]
async fn a_response_that_never_ends_is_cut_at_the_max_lifetime_and_a_stalled_one_when_idle() {
    let apps = AppsDir::new();
    apps.app("endless", &[("main.ts", ENDLESS)]).app("other", &[("main.ts", COUNTER)]);
    let runner = apps.serve(&["--max-isolates", "1", "--stream-idle-timeout-s", "1", "--stream-max-lifetime-s", "3"]);

    // Ticks every 200 ms: never idle for the 1 s bound, so it streams the
    // whole 3 s lifetime (the probe), then is cut — as an error, not an end.
    let (text, failed, lasted) = read_stream(&runner, "endless.localhost", "/forever").await;
    assert!(failed, "the cut stream looked complete: {text:?}");
    assert!(lasted >= Duration::from_millis(2800), "cut after {lasted:?}");
    assert!(lasted < Duration::from_secs(6), "cut after {lasted:?}");
    assert!(text.starts_with("first\n") && text.matches("tick\n").count() >= 10, "{text:?}");

    // One chunk, then nothing: cut by the idle bound.
    let (text, failed, lasted) = read_stream(&runner, "endless.localhost", "/stall").await;
    assert_eq!(text, "first\n");
    assert!(failed, "the cut stream looked complete");
    assert!(lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(3), "cut after {lasted:?}");

    // The isolate is idle again: with one slot, another deployment boots.
    let response = runner.get("other.localhost", "/").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let metrics = runner.metrics().await;
    assert!(has_metric(&metrics, "isocloud_streams_cut_total{kind=\"body\",bound=\"lifetime\"} 1"), "{metrics}");
    assert!(has_metric(&metrics, "isocloud_streams_cut_total{kind=\"body\",bound=\"idle\"} 1"), "{metrics}");
}
