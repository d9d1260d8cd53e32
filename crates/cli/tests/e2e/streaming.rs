//! Streaming through the runner, both ways: chunked responses arrive chunk
//! by chunk, request bodies reach the isolate while they are still being
//! sent, big bodies arrive intact, WebSockets echo, and one isolate serves
//! many requests at once.

/// Moving tens of megabytes through an isolate (and hashing them) costs more
/// CPU than the default 50 ms budget; these tests are about streaming, the
/// CPU limit has its own (hostile_limits.rs).
const STREAMING_LIMITS: &[&str] = &["--cpu-limit-ms", "5000"];

use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Byte `i` of the test pattern; `PATTERN_JS` computes the same in the isolate.
fn pattern_byte(i: usize) -> u8 {
    ((i % 251) ^ (i / 65_521)) as u8
}

const PATTERN_JS: &str = r#"
function patternChunk(offset, length) {
  const bytes = new Uint8Array(length);
  for (let j = 0; j < length; j++) {
    const i = offset + j;
    bytes[j] = ((i % 251) ^ Math.floor(i / 65521)) & 0xff;
  }
  return bytes;
}
const hex = (buffer) => [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");
"#;

fn pattern(offset: usize, length: usize) -> Vec<u8> {
    (offset..offset + length).map(pattern_byte).collect()
}

#[tokio::test]
async fn a_streamed_response_arrives_chunk_by_chunk() {
    let apps = AppsDir::new();
    apps.app(
        "ticks",
        &[(
            "main.ts",
            r#"
Deno.serve(() => {
  let i = 0;
  const encoder = new TextEncoder();
  const body = new ReadableStream({
    async pull(controller) {
      if (i > 0) await new Promise((r) => setTimeout(r, 300));
      controller.enqueue(encoder.encode(`chunk ${i}\n`));
      if (++i === 5) controller.close();
    },
  });
  return new Response(body, { headers: { "content-type": "text/plain" } });
});
"#,
        )],
    );
    let runner = apps.serve(STREAMING_LIMITS);
    // Boot first, so the timing below is the stream's alone.
    runner.get("ticks.localhost", "/").await.text().await.unwrap();

    let response = runner.get("ticks.localhost", "/").await;
    assert_eq!(response.status(), 200);
    let headers_at = Instant::now();
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut arrivals = Vec::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while arrivals.len() < text.matches('\n').count() {
            arrivals.push(headers_at.elapsed());
        }
    }
    assert_eq!(text, "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
    assert_eq!(arrivals.len(), 5);
    assert!(arrivals[0] < Duration::from_secs(1), "the first chunk waited for the rest: {arrivals:?}");
    assert!(arrivals[4] - arrivals[0] >= Duration::from_secs(1), "the chunks arrived together: {arrivals:?}");
    for i in 1..5 {
        // The isolate sends chunk i 300 ms after chunk i-1; some slack for timers.
        let expected = Duration::from_millis(300 * i as u64 - 100);
        assert!(arrivals[i] - arrivals[0] >= expected, "chunk {i} came early: {arrivals:?}");
    }
}

#[tokio::test]
async fn a_request_body_streams_into_the_isolate() {
    const TOTAL: usize = 20 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let apps = AppsDir::new();
    let source = format!(
        "{PATTERN_JS}\n{}",
        r#"
Deno.serve(async (req) => {
  const reader = req.body.getReader();
  const parts = [];
  let bytes = 0, reads = 0, firstAt = 0, lastAt = 0;
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    if (reads === 0) firstAt = performance.now();
    lastAt = performance.now();
    parts.push(value);
    bytes += value.length;
    reads++;
  }
  const all = new Uint8Array(bytes);
  let offset = 0;
  for (const part of parts) { all.set(part, offset); offset += part.length; }
  const sha256 = hex(await crypto.subtle.digest("SHA-256", all));
  return Response.json({ bytes, reads, sha256, spanMs: lastAt - firstAt });
});
"#
    );
    apps.app("upload", &[("main.ts", &source)]);
    let runner = apps.serve(STREAMING_LIMITS);

    // 20 MB made on the fly, with a pause half-way: a runner that buffered
    // the body would hand it to the isolate in one go after the pause.
    let chunks = futures_util::stream::unfold(0usize, |offset| async move {
        if offset >= TOTAL {
            return None;
        }
        if offset == TOTAL / 2 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        let length = CHUNK.min(TOTAL - offset);
        Some((Ok::<_, std::io::Error>(pattern(offset, length)), offset + length))
    });
    let response = runner
        .client_for("upload.localhost")
        .post(runner.url("upload.localhost", "/"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();

    let expected = format!("{:x}", Sha256::digest(pattern(0, TOTAL)));
    assert_eq!(answer["bytes"], TOTAL, "{answer}");
    assert_eq!(answer["sha256"], expected, "{answer}");
    assert!(answer["reads"].as_u64().unwrap() > 1, "{answer}");
    assert!(answer["spanMs"].as_f64().unwrap() >= 400.0, "the body reached the isolate all at once: {answer}");
}

#[tokio::test]
async fn a_large_response_arrives_intact() {
    const TOTAL: usize = 30 * 1024 * 1024;
    let apps = AppsDir::new();
    let source = format!(
        "{PATTERN_JS}\nconst TOTAL = {TOTAL};\n{}",
        r#"
Deno.serve(() => {
  let offset = 0;
  const body = new ReadableStream({
    type: "bytes",
    pull(controller) {
      const length = Math.min(256 * 1024, TOTAL - offset);
      controller.enqueue(patternChunk(offset, length));
      offset += length;
      if (offset === TOTAL) controller.close();
    },
  });
  return new Response(body, { headers: { "content-type": "application/octet-stream" } });
});
"#
    );
    apps.app("big", &[("main.ts", &source)]);
    let runner = apps.serve(STREAMING_LIMITS);

    let response = runner.get("big.localhost", "/").await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        hasher.update(&chunk);
        received += chunk.len();
    }
    assert_eq!(received, TOTAL);
    assert_eq!(format!("{:x}", hasher.finalize()), format!("{:x}", Sha256::digest(pattern(0, TOTAL))));
}

#[tokio::test]
async fn websockets_echo_through_the_runner() {
    let apps = AppsDir::new();
    apps.app(
        "ws",
        &[(
            "main.ts",
            r#"
Deno.serve((req) => {
  if (req.headers.get("upgrade") !== "websocket") return new Response("not a websocket", { status: 400 });
  const { socket, response } = Deno.upgradeWebSocket(req);
  socket.binaryType = "arraybuffer";
  socket.onmessage = (e) => {
    if (typeof e.data !== "string") socket.send(new Uint8Array(e.data).reverse());
    else if (e.data === "bye") socket.close(4001, "done here");
    else socket.send(`echo: ${e.data} (${new URL(req.url).pathname})`);
  };
  return response;
});
"#,
        )],
    );
    let runner = apps.serve(STREAMING_LIMITS);
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(runner.addr).await.unwrap();
        let url = format!("ws://ws.localhost:{}/socket", runner.addr.port());
        let (socket, response) = tokio_tungstenite::client_async(url, tcp).await.expect("websocket handshake");
        assert_eq!(response.status(), 101);
        socket
    };

    // The client closes.
    let mut socket = connect().await;
    socket.send(Message::text("hello")).await.unwrap();
    let reply = socket.next().await.unwrap().unwrap();
    assert_eq!(reply, Message::text("echo: hello (/socket)"));
    let binary: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
    socket.send(Message::binary(binary.clone())).await.unwrap();
    let reply = socket.next().await.unwrap().unwrap();
    assert_eq!(reply, Message::binary(binary.iter().rev().copied().collect::<Vec<u8>>()));
    for i in 0..10 {
        socket.send(Message::text(format!("message {i}"))).await.unwrap();
    }
    for i in 0..10 {
        let reply = socket.next().await.unwrap().unwrap();
        assert_eq!(reply, Message::text(format!("echo: message {i} (/socket)")));
    }
    socket.close(Some(CloseFrame { code: CloseCode::Normal, reason: "client done".into() })).await.unwrap();
    let mut close = None;
    while let Some(message) = socket.next().await {
        if let Message::Close(frame) = message.expect("a clean close") {
            close = Some(frame);
        }
    }
    let close = close.expect("the isolate answered the close");
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Normal));

    // The isolate closes.
    let mut socket = connect().await;
    socket.send(Message::text("bye")).await.unwrap();
    match socket.next().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::from(4001));
            assert_eq!(frame.reason.as_str(), "done here");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    while let Some(message) = socket.next().await {
        message.expect("a clean close");
    }
}

#[tokio::test]
async fn one_isolate_serves_concurrent_requests() {
    let apps = AppsDir::new();
    apps.app(
        "slow",
        &[(
            "main.ts",
            r#"
// Which isolate answers: each is pid 1 of its own PID namespace.
const ISOLATE = crypto.randomUUID();
Deno.serve(async (req) => {
  await new Promise((r) => setTimeout(r, 500));
  return Response.json({ isolate: ISOLATE, pid: Deno.pid, path: new URL(req.url).pathname });
});
"#,
        )],
    );
    let runner = apps.serve(STREAMING_LIMITS);
    let warm: Value = runner.get("slow.localhost", "/warm").await.json().await.unwrap();
    assert_eq!(warm["pid"], 1, "deno is pid 1 of its own namespace: {warm}");
    assert!(warm["isolate"].as_str().is_some_and(|id| id.len() == 36), "{warm}");

    let client = runner.client_for("slow.localhost");
    let started = Instant::now();
    let requests = (0..20).map(|i| {
        let request = client.get(runner.url("slow.localhost", &format!("/r{i}")));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let elapsed = started.elapsed();

    // One after the other they would take 10 s.
    assert!(elapsed < Duration::from_millis(2500), "20 requests of 500 ms took {elapsed:?}");
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer["path"], format!("/r{i}"));
        assert_eq!(answer["isolate"], warm["isolate"], "all served by the one isolate");
        assert_eq!(answer["pid"], 1);
    }
    assert_eq!(runner.isolate_pids().len(), 1);
}
