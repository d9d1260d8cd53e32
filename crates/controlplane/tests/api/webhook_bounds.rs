//! Row 1 of issue 21 (the webhook's part): the public git webhook reads its
//! body before it can check the signature, so what an outsider can make it
//! hold is bounded: 64 MiB of bodies being read, all deliveries together,
//! counted as the bytes arrive (past it, 503 `CAPACITY`), 4 MiB each (a
//! larger declared length gets 413 unread), 10 s each. Slow senders hold
//! only what they sent: they cannot shut the webhook. Raw TCP on loopback;
//! the store plays no part, so SQLite only.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Backend, Reply, TestServer};

const SECRET: &str = "a webhook secret of some length";
const MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection, sends a webhook request's head declaring
/// `declared_bytes` and the first KiB of the body, and leaves it there.
async fn stall(addr: &str, declared_bytes: usize) -> TcpStream {
    stall_after(addr, declared_bytes, 1024).await
}

/// [`stall`] after `sent_bytes` of the body.
async fn stall_after(addr: &str, declared_bytes: usize, sent_bytes: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/projects/app/git/webhook HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         x-github-event: push\r\nx-hub-signature-256: sha256={}\r\ncontent-length: {declared_bytes}\r\n\r\n",
        "ab".repeat(32)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b' '; sent_bytes]).await.unwrap();
    stream
}

/// The status and head of the answer, or `None` if none came by `deadline`.
async fn answer(stream: &mut TcpStream, deadline: Duration) -> Option<(u16, String)> {
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&seen).into_owned();
                let status = text.split(' ').nth(1)?.parse().ok()?;
                return Some((status, text));
            }
        }
    };
    tokio::time::timeout(deadline, read).await.ok().flatten()
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn signed_ping(s: &TestServer) -> Reply {
    let body = serde_json::to_vec(&json!({"zen": "Design for failure.", "hook_id": 1})).unwrap();
    let request = s
        .client
        .post(s.url("/api/v1/projects/app/git/webhook"))
        .header("x-github-event", "ping")
        .header("x-hub-signature-256", sign(&body))
        .body(body);
    s.send(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_are_bounded_in_bytes_and_time_and_slow_ones_do_not_shut_the_webhook() {
    let s = TestServer::start(Backend::Sqlite).await;
    s.create_project("app").await;
    let settings =
        json!({"repository": "/srv/git/app.git", "branch": "main", "entrypoint": "main.ts", "secret": SECRET});
    assert_eq!(s.put("/api/v1/projects/app/git", settings).await.status, 200);
    let addr = s.base.trim_start_matches("http://").to_owned();

    // The probe: a signed delivery is answered.
    assert_eq!(signed_ping(&s).await.status, 200);

    // Declared over the bound: 413 at once, nothing read.
    let mut big = stall(&addr, 8 * 1024 * 1024).await;
    let (status, _) = answer(&mut big, Duration::from_secs(2)).await.expect("an answer to the 8 MiB body");
    assert_eq!(status, 413);

    // 40 bodies declaring the most a body may, each stalled after 1 KiB:
    // all are held, and a signed delivery is still answered (a count of 16
    // bodies at once used to turn it away).
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..40 {
        slow.push(stall(&addr, MAX_BODY_BYTES).await);
    }
    assert_eq!(signed_ping(&s).await.status, 200, "slow senders do not shut the webhook");

    // Bodies that send most of their bytes fill the budget: as many large
    // ones as fit beside the slow ones are held ...
    const KIB: usize = 1024;
    let fit = (MAX_BUFFERED_BYTES / KIB - 40) / (MAX_BODY_BYTES / KIB - 1);
    let mut full = Vec::new();
    for _ in 0..fit {
        full.push(stall_after(&addr, MAX_BODY_BYTES, MAX_BODY_BYTES - KIB).await);
    }
    let answered = futures_util::future::join_all(full.iter_mut().map(|s| answer(s, Duration::from_millis(300)))).await;
    assert!(answered.iter().all(Option::is_none), "{fit} large bodies fit: {answered:?}");
    // ... one more is turned away (503, its connection closed) ...
    let mut over = stall_after(&addr, MAX_BODY_BYTES, MAX_BODY_BYTES - KIB).await;
    let (status, head) = answer(&mut over, Duration::from_secs(3)).await.expect("the large body past the budget");
    assert_eq!(status, 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    // ... and one that takes exactly what is left is held.
    let rest = MAX_BUFFERED_BYTES - (40 + fit * (MAX_BODY_BYTES / KIB - 1)) * KIB;
    let mut last = stall_after(&addr, MAX_BODY_BYTES, rest).await;
    assert!(answer(&mut last, Duration::from_millis(300)).await.is_none(), "the last {rest} bytes fit");
    full.push(last);
    // Now a signed delivery is refused too, with the stable code.
    signed_ping(&s).await.assert_error(503, "CAPACITY", None);

    // The held ones are cut once their 10 s are up, not later.
    let left = (BODY_TIMEOUT + Duration::from_secs(3)).saturating_sub(started.elapsed());
    let mut waiting: Vec<TcpStream> = slow.into_iter().chain(full).collect();
    let cut = futures_util::future::join_all(waiting.iter_mut().map(|stream| answer(stream, left))).await;
    for answer in cut {
        let (status, head) = answer.expect("a stalled body is cut within 13 s");
        assert_eq!(status, 408, "{head}");
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= BODY_TIMEOUT - Duration::from_millis(500), "cut after only {elapsed:?}");

    // And the webhook answers again: the budget came back whole.
    assert_eq!(signed_ping(&s).await.status, 200);
}
