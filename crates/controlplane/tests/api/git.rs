//! Git: repository settings and the push webhook, against a real local
//! repository built with `git` and real HMAC signatures.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::backend_tests;
use crate::support::{Backend, Reply, TestServer};

backend_tests!(
    git_settings,
    webhook_builds_and_promotes,
    webhook_refusals,
    webhook_unsigned_answers_alike,
    webhook_delivery_builds_once,
    webhook_older_commit_builds_nothing
);

const SECRET: &str = "a webhook secret of some length";

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

/// A repository with `files` committed on `main`; the commit id.
fn commit(repo: &Path, files: &[(&str, &str)], message: &str) -> String {
    if !repo.join(".git").exists() {
        std::fs::create_dir_all(repo).unwrap();
        git(repo, &["init", "--quiet", "--initial-branch=main"]);
    }
    for (path, content) in files {
        let full = repo.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }
    git(repo, &["add", "--all"]);
    git(repo, &["commit", "--quiet", "-m", message]);
    git(repo, &["rev-parse", "HEAD"])
}

fn sign(body: &[u8], secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn hook(s: &TestServer, project: &str, payload: &Value, signature: Option<String>, event: &str) -> Reply {
    let body = serde_json::to_vec(payload).unwrap();
    let mut request = s
        .client
        .post(s.url(&format!("/api/v1/projects/{project}/git/webhook")))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .body(body);
    if let Some(signature) = signature {
        request = request.header("x-hub-signature-256", signature);
    }
    s.send(request).await
}

/// Sends exactly `body` (as a forge would), with a delivery id.
async fn deliver(s: &TestServer, project: &str, body: &[u8], signature: Option<&str>, delivery: &str) -> Reply {
    let mut request = s
        .client
        .post(s.url(&format!("/api/v1/projects/{project}/git/webhook")))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("x-hub-signature-256", signature);
    }
    s.send(request).await
}

/// A push event's body for `commit` on `main`.
fn push_body(commit: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": "refs/heads/main", "before": "0".repeat(40), "after": commit, "deleted": false,
        "head_commit": {"id": commit, "message": message}, "repository": {"full_name": "acme/app"},
    }))
    .unwrap()
}

async fn deployment_count(s: &TestServer, project: &str) -> usize {
    s.get(&format!("/api/v1/projects/{project}/deployments")).await.json().as_array().unwrap().len()
}

async fn push(s: &TestServer, project: &str, branch: &str, commit: &str, message: &str) -> Reply {
    let payload = json!({
        "ref": format!("refs/heads/{branch}"), "before": "0".repeat(40), "after": commit, "deleted": false,
        "head_commit": {"id": commit, "message": message}, "repository": {"full_name": "acme/app"},
    });
    let signature = sign(&serde_json::to_vec(&payload).unwrap(), SECRET);
    hook(s, project, &payload, Some(signature), "push").await
}

async fn configure(s: &TestServer, project: &str, repo: &Path) {
    let reply = s
        .put(
            &format!("/api/v1/projects/{project}/git"),
            json!({"repository": repo.to_str().unwrap(), "branch": "main", "entrypoint": "main.ts", "secret": SECRET}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
}

async fn wait_built(s: &TestServer, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let last = s.get(&format!("/api/v1/deployments/{id}")).await.json();
        if last["status"] != "building" {
            return last;
        }
        assert!(tokio::time::Instant::now() < deadline, "still building: {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The build's node rebuilds its routing table right after recording the
/// result; the API may show `ready` a moment before.
async fn routes_to(s: &TestServer, host: &str, id: &str) {
    let routed = crate::support::eventually(Duration::from_secs(5), || async {
        s.cp.resolve_host(host).is_some_and(|r| r.deployment_id == id)
    })
    .await;
    assert!(routed, "{host} does not route to {id}");
}

async fn git_settings(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("app").await;
    let good = json!({"repository": "/srv/git/app.git", "branch": "main", "entrypoint": "main.ts", "secret": SECRET});
    let reply = s.put("/api/v1/projects/app/git", good.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.json()["git"],
        json!({"repository": "/srv/git/app.git", "branch": "main", "entrypoint": "main.ts"})
    );
    assert!(!reply.text.contains(SECRET), "the secret is never shown");
    assert!(!s.get("/api/v1/projects/app").await.text.contains(SECRET));
    for (field, value) in [
        ("repository", json!("ext::sh -c evil")),
        ("repository", json!("-uexploit")),
        ("repository", json!("relative/path")),
        ("branch", json!("a..b")),
        ("branch", json!("-x")),
        ("entrypoint", json!("../main.ts")),
        ("entrypoint", json!("README.md")),
        ("secret", json!("short")),
    ] {
        let mut body = good.clone();
        body[field] = value;
        s.put("/api/v1/projects/app/git", body).await.assert_error(400, "INVALID_FIELD", Some(field));
    }
    s.put("/api/v1/projects/nope/git", good).await.assert_error(404, "NOT_FOUND", None);
    let removed = s.delete("/api/v1/projects/app/git").await;
    assert_eq!(removed.status, 200);
    assert_eq!(removed.json()["git"], Value::Null);
}

async fn webhook_builds_and_promotes(backend: Backend) {
    let s = TestServer::start(backend).await;
    let background = tokio::spawn(s.cp.clone().run_background());
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("app");
    let first = commit(
        &repo,
        &[("main.ts", "export default { fetch: () => new Response('v1') };"), ("static/a.txt", "asset")],
        "first version\n\nwith a body",
    );
    s.create_project("app").await;
    s.put("/api/v1/projects/app/env/MODE", json!({"value": "prod"})).await;
    configure(&s, "app", &repo).await;

    let reply = push(&s, "app", "main", &first, "first version\n\nwith a body").await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let queued = reply.json();
    assert_eq!(queued["status"], "building");
    assert_eq!(queued["git"], json!({"commit": first, "message": "first version", "branch": "main"}));
    let id = queued["id"].as_str().unwrap().to_owned();
    let built = wait_built(&s, &id).await;
    assert_eq!(built["status"], "ready", "{built}");
    assert_eq!(built["files"], 2);
    assert_eq!(built["production"], true);
    assert_eq!(built["env_names"], json!(["MODE"]));
    routes_to(&s, "app.localhost", &id).await;
    let origin = s.cp.origin();
    let boot = origin.boot(&id).await.unwrap();
    assert_eq!(boot.config.entrypoint().as_str(), "file:///src/main.ts");
    let tree = origin.read_tree(&id).await.unwrap();
    let (_, _, hash) = tree.resolve_file("/static/a.txt").unwrap();
    assert_eq!(origin.read_blob(&id, hash).await.unwrap(), "asset".as_bytes());

    // A second push: the mirror is fetched, not cloned again.
    let second = commit(&repo, &[("main.ts", "export default { fetch: () => new Response('v2') };")], "second");
    let reply = push(&s, "app", "main", &second, "second").await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let id2 = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_built(&s, &id2).await["status"], "ready");
    routes_to(&s, "app.localhost", &id2).await;
    let layer = origin.boot(&id2).await.unwrap().config.layers()[0].id().to_owned();
    assert!(String::from_utf8(origin.layer(&id2, &layer).await.unwrap().to_vec()).unwrap().contains("v2"));
    // Rollback works on git deployments like any other.
    let back = s.post_empty("/api/v1/projects/app/rollback").await.json();
    assert_eq!(back["production_deployment_id"], id.as_str());

    // A commit the repository does not have: the build fails, production stays.
    let reply = push(&s, "app", "main", &"f".repeat(40), "ghost").await;
    let ghost = reply.json()["id"].as_str().unwrap().to_owned();
    let failed = wait_built(&s, &ghost).await;
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].as_str().unwrap().contains("not in"), "{failed}");
    assert_eq!(s.cp.resolve_host("app.localhost").unwrap().deployment_id, id);
    assert!(s.cp.resolve_host(&format!("app-{ghost}.localhost")).is_none());
    s.post("/api/v1/projects/app/promote", json!({"deployment_id": ghost})).await.assert_error(409, "CONFLICT", None);

    // A commit without the entrypoint fails with a message that says so.
    git(&repo, &["rm", "--quiet", "main.ts"]);
    let third = commit(&repo, &[("other.ts", "// no main")], "no entrypoint");
    let reply = push(&s, "app", "main", &third, "no entrypoint").await;
    let broken = wait_built(&s, reply.json()["id"].as_str().unwrap()).await;
    assert_eq!(broken["status"], "failed");
    assert!(broken["error"].as_str().unwrap().contains("main.ts"), "{broken}");
    background.abort();
}

async fn webhook_refusals(backend: Backend) {
    let s = TestServer::start(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("app");
    let head = commit(&repo, &[("main.ts", "// x")], "x");
    s.create_project("app").await;
    s.create_project("plain").await;
    configure(&s, "app", &repo).await;
    let payload =
        json!({"ref": "refs/heads/main", "after": head, "deleted": false, "head_commit": {"id": head, "message": "x"}});
    let body = serde_json::to_vec(&payload).unwrap();

    hook(&s, "app", &payload, None, "push").await.assert_error(401, "UNAUTHORIZED", None);
    hook(&s, "app", &payload, Some(sign(&body, "another secret entirely")), "push").await.assert_error(
        401,
        "UNAUTHORIZED",
        None,
    );
    hook(&s, "app", &payload, Some("sha256=zz".into()), "push").await.assert_error(401, "UNAUTHORIZED", None);
    let mut tampered = payload.clone();
    tampered["after"] = json!("e".repeat(40));
    hook(&s, "app", &tampered, Some(sign(&body, SECRET)), "push").await.assert_error(401, "UNAUTHORIZED", None);
    // No git settings, or no project: the same 401 (an outsider learns
    // nothing of which projects exist or deploy from git).
    hook(&s, "plain", &payload, Some(sign(&body, SECRET)), "push").await.assert_error(401, "UNAUTHORIZED", None);
    hook(&s, "nope", &payload, Some(sign(&body, SECRET)), "push").await.assert_error(401, "UNAUTHORIZED", None);

    let ignored = |reply: Reply, says: &str| {
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json()["status"], "ignored", "{}", reply.text);
        let why = reply.json()["reason"].as_str().unwrap_or_default().to_owned();
        assert!(why.contains(says), "{why}");
    };
    ignored(push(&s, "app", "feature", &head, "x").await, "feature");
    let deleted = json!({"ref": "refs/heads/main", "after": "0".repeat(40), "deleted": true});
    let signature = sign(&serde_json::to_vec(&deleted).unwrap(), SECRET);
    ignored(hook(&s, "app", &deleted, Some(signature), "push").await, "deleted");
    let tag = json!({"ref": "refs/tags/v1", "after": head, "deleted": false});
    let signature = sign(&serde_json::to_vec(&tag).unwrap(), SECRET);
    ignored(hook(&s, "app", &tag, Some(signature), "push").await, "not a branch");
    let ping = json!({"zen": "Keep it logically awesome.", "hook_id": 1});
    let signature = sign(&serde_json::to_vec(&ping).unwrap(), SECRET);
    ignored(hook(&s, "app", &ping, Some(signature), "ping").await, "ping");

    let bad_commit = json!({"ref": "refs/heads/main", "after": "main", "deleted": false});
    let signature = sign(&serde_json::to_vec(&bad_commit).unwrap(), SECRET);
    hook(&s, "app", &bad_commit, Some(signature), "push").await.assert_error(400, "INVALID_FIELD", Some("after"));
    let not_push = json!({"hello": "world"});
    let signature = sign(&serde_json::to_vec(&not_push).unwrap(), SECRET);
    hook(&s, "app", &not_push, Some(signature), "push").await.assert_error(400, "INVALID_REQUEST", None);
    // None of it made a deployment.
    assert_eq!(s.get("/api/v1/projects/app/deployments").await.json(), json!([]));
}

/// Row 7 of issue 21: an unsigned or wrongly signed delivery gets one answer,
/// byte for byte, whether the project deploys from git, does not, or does
/// not exist.
async fn webhook_unsigned_answers_alike(backend: Backend) {
    let s = TestServer::start(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("app");
    let head = commit(&repo, &[("main.ts", "// x")], "x");
    s.create_project("app").await;
    s.create_project("plain").await;
    configure(&s, "app", &repo).await;
    let body = push_body(&head, "x");

    // The probe: the right signature is accepted.
    let signed = deliver(&s, "app", &body, Some(&sign(&body, SECRET)), "probe-1").await;
    assert_eq!(signed.status, 202, "{}", signed.text);

    let wrong = sign(&body, "another secret entirely");
    for signature in [None, Some(wrong.as_str()), Some("sha256=zz")] {
        let answers = [
            deliver(&s, "app", &body, signature, "d-1").await,
            deliver(&s, "plain", &body, signature, "d-2").await,
            deliver(&s, "nope", &body, signature, "d-3").await,
        ];
        for answer in &answers {
            answer.assert_error(401, "UNAUTHORIZED", None);
            assert_eq!(answer.text, answers[0].text, "{signature:?}: the answers differ");
        }
    }
    // Signed with the secret of another project: still the same 401.
    let stolen = deliver(&s, "plain", &body, Some(&sign(&body, SECRET)), "d-4").await;
    stolen.assert_error(401, "UNAUTHORIZED", None);
    assert_eq!(stolen.text, deliver(&s, "nope", &body, None, "d-5").await.text);
    assert_eq!(deployment_count(&s, "app").await, 1);
    assert_eq!(deployment_count(&s, "plain").await, 0);
}

/// Row 4 of issue 21, first half: a delivery is acted on once. Sent again
/// (same body, same or another delivery id) it is answered `ignored` and
/// builds nothing; a new delivery still deploys.
async fn webhook_delivery_builds_once(backend: Backend) {
    let s = TestServer::start(backend).await;
    let background = tokio::spawn(s.cp.clone().run_background());
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("app");
    let first = commit(&repo, &[("main.ts", "export default { fetch: () => new Response('v1') };")], "v1");
    s.create_project("app").await;
    configure(&s, "app", &repo).await;

    // The probe: a signed delivery deploys.
    let body = push_body(&first, "v1");
    let signature = sign(&body, SECRET);
    let reply = deliver(&s, "app", &body, Some(&signature), "72d3162e-cc78-11e3-81ab-4c9367dc0958").await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_built(&s, &id).await["status"], "ready");
    routes_to(&s, "app.localhost", &id).await;

    // The replay, as captured; then with a made-up delivery id (the header
    // is not signed); then a new body under the old id.
    for delivery in ["72d3162e-cc78-11e3-81ab-4c9367dc0958", "ffffffff-0000-0000-0000-000000000000"] {
        let replay = deliver(&s, "app", &body, Some(&signature), delivery).await;
        assert_eq!(replay.status, 200, "{}", replay.text);
        assert_eq!(replay.json()["status"], "ignored", "{}", replay.text);
        let reason = replay.json()["reason"].as_str().unwrap().to_owned();
        assert!(reason.contains("received before") && reason.contains(&id), "{reason}");
    }
    let reworded = push_body(&first, "v1, again");
    let replay =
        deliver(&s, "app", &reworded, Some(&sign(&reworded, SECRET)), "72d3162e-cc78-11e3-81ab-4c9367dc0958").await;
    assert_eq!(replay.json()["status"], "ignored", "{}", replay.text);
    assert_eq!(deployment_count(&s, "app").await, 1, "a replay made a deployment");

    // A new push is a new delivery: it deploys.
    let second = commit(&repo, &[("main.ts", "export default { fetch: () => new Response('v2') };")], "v2");
    let body = push_body(&second, "v2");
    let reply = deliver(&s, "app", &body, Some(&sign(&body, SECRET)), "a-second-delivery").await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let id2 = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_built(&s, &id2).await["status"], "ready");
    routes_to(&s, "app.localhost", &id2).await;
    assert_eq!(deployment_count(&s, "app").await, 2);
    background.abort();
}

/// Row 4 of issue 21, second half: a correctly signed delivery of an older
/// commit (late, or replayed after it was forgotten) builds nothing and
/// never moves production; the deployment's error and build log say why.
async fn webhook_older_commit_builds_nothing(backend: Backend) {
    let s = TestServer::start(backend).await;
    let background = tokio::spawn(s.cp.clone().run_background());
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("app");
    let old = commit(&repo, &[("main.ts", "export default { fetch: () => new Response('old') };")], "old");
    s.create_project("app").await;
    configure(&s, "app", &repo).await;
    let old_body = push_body(&old, "old");
    let old_signature = sign(&old_body, SECRET);

    // The probe: the old commit's delivery deploys while it is the head.
    let reply = deliver(&s, "app", &old_body, Some(&old_signature), "delivery-old").await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let old_id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_built(&s, &old_id).await["status"], "ready");

    let new = commit(&repo, &[("main.ts", "export default { fetch: () => new Response('new') };")], "new");
    let body = push_body(&new, "new");
    let reply = deliver(&s, "app", &body, Some(&sign(&body, SECRET)), "delivery-new").await;
    let new_id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_built(&s, &new_id).await["status"], "ready");
    routes_to(&s, "app.localhost", &new_id).await;

    // A delivery of the old commit the store does not remember (sent late,
    // or replayed once forgotten): signed, so accepted, but the build finds
    // the branch elsewhere.
    let late = push_body(&old, "old, delivered late");
    let reply = deliver(&s, "app", &late, Some(&sign(&late, SECRET)), "delivery-late").await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    let late_id = reply.json()["id"].as_str().unwrap().to_owned();
    let built = wait_built(&s, &late_id).await;
    assert_eq!(built["status"], "failed", "{built}");
    let error = built["error"].as_str().unwrap();
    assert!(error.contains(&format!("{old} is not the head of branch main (the head is {new})")), "{error}");
    let log = s.get(&format!("/api/v1/deployments/{late_id}/build")).await.json();
    assert!(log["log"].as_str().unwrap_or_default().contains("production is unchanged"), "{log}");
    // Production never moved, and no files were stored for it.
    let project = s.get("/api/v1/projects/app").await.json();
    assert_eq!(project["production_deployment_id"], new_id.as_str(), "{project}");
    assert_eq!(s.cp.resolve_host("app.localhost").unwrap().deployment_id, new_id);
    assert_eq!(built["files"], 0);
    background.abort();
}
