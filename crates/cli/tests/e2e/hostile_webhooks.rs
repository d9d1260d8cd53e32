//! Issue 21's git webhook rows against the real `isocloud serve`, with a
//! real repository, real builds and real isolates serving what they built:
//! a signed delivery deploys once (its replay is ignored), a late or
//! replayed delivery of an older commit moves nothing (row 4); every
//! unsigned delivery gets one 401 whatever the project (row 7); stalled
//! bodies are bounded in bytes and time, and trickling ones do not shut the
//! webhook (row 1); a manifest naming a path
//! twice is refused naming it (row 8).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::ControlPlaneServe;

const SECRET: &str = "a webhook secret of some length";

/// HMAC-SHA256 (RFC 2104), as a forge signs a delivery.
fn sign(body: &[u8]) -> String {
    let mut key = [0u8; 64];
    key[..SECRET.len()].copy_from_slice(SECRET.as_bytes());
    let pad = |byte: u8| key.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(body).finalize();
    let outer = Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    format!("sha256={}", hex::encode(outer))
}

fn git(repo: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Commits an app answering `version` on `main`; the commit id.
fn commit_app(repo: &Path, version: &str) -> String {
    if !repo.join(".git").exists() {
        std::fs::create_dir_all(repo).unwrap();
        git(repo, &["init", "--quiet", "--initial-branch=main"]);
    }
    std::fs::write(repo.join("main.ts"), format!("Deno.serve(() => new Response('{version}'));\n")).unwrap();
    git(repo, &["add", "--all"]);
    git(repo, &["commit", "--quiet", "-m", version]);
    git(repo, &["rev-parse", "HEAD"])
}

fn push_body(commit: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": "refs/heads/main", "before": "0".repeat(40), "after": commit, "deleted": false,
        "head_commit": {"id": commit, "message": message}, "repository": {"full_name": "acme/app"},
    }))
    .unwrap()
}

/// POSTs a delivery; status and body text.
async fn deliver(
    serve: &ControlPlaneServe,
    project: &str,
    body: &[u8],
    signature: Option<&str>,
    delivery: &str,
) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/api/v1/projects/{project}/git/webhook", serve.control_url()))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("x-hub-signature-256", signature);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn wait_built(serve: &ControlPlaneServe, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, deployment) = serve.api(reqwest::Method::GET, &format!("/deployments/{id}"), None).await;
        if deployment["status"] != "building" {
            return deployment;
        }
        assert!(Instant::now() < deadline, "still building: {deployment}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `app.localhost` answers through the runner, once it answers `want`.
async fn serves(serve: &ControlPlaneServe, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = reqwest::Client::new()
            .get(format!("{}/", serve.public_url()))
            .header("host", format!("app.localhost:{}", serve.runner.addr.port()))
            .send()
            .await
            .unwrap();
        let text = response.text().await.unwrap();
        if text == want {
            return;
        }
        assert!(Instant::now() < deadline, "app.localhost answers {text:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn deployment_count(serve: &ControlPlaneServe) -> usize {
    serve.api(reqwest::Method::GET, "/projects/app/deployments", None).await.1.as_array().unwrap().len()
}

fn id_of(text: &str) -> String {
    serde_json::from_str::<Value>(text).unwrap()["id"].as_str().unwrap_or_else(|| panic!("no id: {text}")).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_build_once_and_old_commits_move_nothing() {
    let serve = ControlPlaneServe::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("app");
    let v1 = commit_app(&repo, "v1");
    assert_eq!(serve.api(reqwest::Method::POST, "/projects", Some(json!({"name": "app"}))).await.0, 201);
    assert_eq!(serve.api(reqwest::Method::POST, "/projects", Some(json!({"name": "plain"}))).await.0, 201);
    let settings =
        json!({"repository": repo.to_str().unwrap(), "branch": "main", "entrypoint": "main.ts", "secret": SECRET});
    assert_eq!(serve.api(reqwest::Method::PUT, "/projects/app/git", Some(settings)).await.0, 200);

    // The probe: a signed delivery deploys, and production serves it.
    let v1_body = push_body(&v1, "v1");
    let v1_signature = sign(&v1_body);
    let (status, text) = deliver(&serve, "app", &v1_body, Some(&v1_signature), "delivery-v1").await;
    assert_eq!(status, 202, "{text}");
    let v1_id = id_of(&text);
    assert_eq!(wait_built(&serve, &v1_id).await["status"], "ready");
    serves(&serve, "v1").await;

    // Its replay, as captured and under a new delivery id: ignored.
    for delivery in ["delivery-v1", "delivery-made-up"] {
        let (status, text) = deliver(&serve, "app", &v1_body, Some(&v1_signature), delivery).await;
        assert_eq!(status, 200, "{text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer["status"], "ignored", "{text}");
        assert!(answer["reason"].as_str().unwrap().contains("received before"), "{text}");
    }
    assert_eq!(deployment_count(&serve).await, 1, "a replay built something");

    // v2 deploys.
    let v2 = commit_app(&repo, "v2");
    let v2_body = push_body(&v2, "v2");
    let (status, text) = deliver(&serve, "app", &v2_body, Some(&sign(&v2_body)), "delivery-v2").await;
    assert_eq!(status, 202, "{text}");
    let v2_id = id_of(&text);
    assert_eq!(wait_built(&serve, &v2_id).await["status"], "ready");
    serves(&serve, "v2").await;

    // A late (or forgotten and replayed) delivery of v1: signed, accepted,
    // but v1 is not the head once fetched: it fails saying why, and v2
    // stays in production.
    let late = push_body(&v1, "v1 (late)");
    let (status, text) = deliver(&serve, "app", &late, Some(&sign(&late)), "delivery-v1-late").await;
    assert_eq!(status, 202, "{text}");
    let late_id = id_of(&text);
    let built = wait_built(&serve, &late_id).await;
    assert_eq!(built["status"], "failed", "{built}");
    assert!(built["error"].as_str().unwrap().contains("is not the head of branch main"), "{built}");
    let (_, log) = serve.api(reqwest::Method::GET, &format!("/deployments/{late_id}/build"), None).await;
    assert!(log["log"].as_str().unwrap_or_default().contains("production is unchanged"), "{log}");
    let (_, project) = serve.api(reqwest::Method::GET, "/projects/app", None).await;
    assert_eq!(project["production_deployment_id"], v2_id.as_str(), "{project}");
    serves(&serve, "v2").await;

    // Unsigned or wrongly signed: one answer, byte for byte, whether the
    // project deploys from git, does not, or does not exist.
    let wrong = format!("sha256={}", "0".repeat(64));
    for signature in [None, Some(wrong.as_str())] {
        let mut answers = Vec::new();
        for project in ["app", "plain", "nope"] {
            answers.push(deliver(&serve, project, &v2_body, signature, "d").await);
        }
        for answer in &answers {
            assert_eq!(answer.0, 401, "{}", answer.1);
            assert_eq!(answer, &answers[0], "the answers differ: {answers:?}");
        }
    }
    assert_eq!(deployment_count(&serve).await, 3);
}

/// Sends a webhook request's head declaring `declared_bytes` and 1 KiB of
/// body, then nothing.
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

/// The status and head of the answer, or `None` if none came in `wait`.
async fn answer(stream: &mut TcpStream, wait: Duration) -> Option<(u16, String)> {
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
                return Some((text.split(' ').nth(1)?.parse().ok()?, text));
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

async fn ping(serve: &ControlPlaneServe) -> (u16, String) {
    let body = br#"{"zen": "Design for failure.", "hook_id": 1}"#;
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/projects/app/git/webhook", serve.control_url()))
        .header("x-github-event", "ping")
        .header("x-hub-signature-256", sign(body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_webhook_bodies_are_bounded() {
    let serve = ControlPlaneServe::start(&[]);
    assert_eq!(serve.api(reqwest::Method::POST, "/projects", Some(json!({"name": "app"}))).await.0, 201);
    let settings =
        json!({"repository": "/srv/git/app.git", "branch": "main", "entrypoint": "main.ts", "secret": SECRET});
    assert_eq!(serve.api(reqwest::Method::PUT, "/projects/app/git", Some(settings)).await.0, 200);
    let addr = serve.control.to_string();

    // The probe: a signed delivery is answered.
    assert_eq!(ping(&serve).await.0, 200);

    // Issue 21's attack, 8 MiB declared: refused unread, at once.
    let mut big = stall(&addr, 8 * 1024 * 1024).await;
    assert_eq!(answer(&mut big, Duration::from_secs(2)).await.map(|a| a.0), Some(413));

    // 40 declaring the 4 MiB bound, stalled after 1 KiB: all are held, and
    // a signed delivery is still answered (slow senders hold only what
    // they sent).
    const KIB: usize = 1024;
    const MAX_BODY: usize = 4 * 1024 * 1024;
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(stall(&addr, MAX_BODY).await);
    }
    assert_eq!(ping(&serve).await.0, 200, "slow senders do not shut the webhook");
    // Bodies that sent most of their bytes fill the 64 MiB: as many as fit
    // are held, the next is told 503 with Retry-After, and so is a signed
    // delivery once the last KiB are taken.
    let fit = (64 * KIB - 40) / (MAX_BODY / KIB - 1);
    for _ in 0..fit {
        held.push(stall_after(&addr, MAX_BODY, MAX_BODY - KIB).await);
    }
    let mut over = stall_after(&addr, MAX_BODY, MAX_BODY - KIB).await;
    let (status, head) = answer(&mut over, Duration::from_secs(3)).await.expect("the body past the budget");
    assert_eq!(status, 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    let rest = (64 * KIB - 40 - fit * (MAX_BODY / KIB - 1)) * KIB;
    held.push(stall_after(&addr, MAX_BODY, rest).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, text) = ping(&serve).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("\"CAPACITY\""), "{text}");

    // Every held one is cut at 10 s.
    let wait = Duration::from_secs(13).saturating_sub(started.elapsed());
    let cut = futures_util::future::join_all(held.iter_mut().map(|stream| answer(stream, wait))).await;
    for answer in cut {
        assert_eq!(answer.map(|a| a.0), Some(408), "a stalled body outlived 13 s");
    }
    assert!(started.elapsed() >= Duration::from_millis(9500), "cut after {:?}", started.elapsed());
    assert_eq!(ping(&serve).await.0, 200, "the webhook answers again");

    // Each refusal is counted in /metrics (the large body and the signed
    // ping turned away; 40 + fit + 1 cut).
    let metrics = serve.runner.metrics().await;
    let cut = format!(r#"isocloud_webhook_refused_total{{reason="body_timeout"}} {}"#, 40 + fit + 1);
    for sample in [
        r#"isocloud_webhook_refused_total{reason="busy"} 2"#,
        cut.as_str(),
        r#"isocloud_webhook_refused_total{reason="too_large"} 1"#,
    ] {
        assert!(metrics.contains(sample), "no {sample} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_naming_a_path_twice_is_refused() {
    let serve = ControlPlaneServe::start(&[]);
    assert_eq!(serve.api(reqwest::Method::POST, "/projects", Some(json!({"name": "app"}))).await.0, 201);
    let client = reqwest::Client::new();
    let mut hashes = Vec::new();
    for content in ["Deno.serve(() => new Response('reviewed'));", "Deno.serve(() => new Response('smuggled'));"] {
        let hash = hex::encode(Sha256::digest(content));
        let response = client
            .put(format!("{}/api/v1/blobs/{hash}", serve.control_url()))
            .bearer_auth(serve.admin_token())
            .body(content)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201);
        hashes.push((hash, content.len()));
    }
    let post = |second: &str| {
        let body = format!(
            r#"{{"entrypoint": "main.ts", "files": {{"main.ts": {{"hash": "{}", "size": {}}}, "{second}": {{"hash": "{}", "size": {}}}}}}}"#,
            hashes[0].0, hashes[0].1, hashes[1].0, hashes[1].1
        );
        client
            .post(format!("{}/api/v1/projects/app/deployments", serve.control_url()))
            .bearer_auth(serve.admin_token())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // The probe: two paths, each once.
    assert_eq!(post("other.ts").await.unwrap().status().as_u16(), 201);
    let refused = post("main.ts").await.unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["field"], "files.main.ts", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("\"main.ts\" is named twice"), "{error}");
    assert_eq!(deployment_count(&serve).await, 1);
}
