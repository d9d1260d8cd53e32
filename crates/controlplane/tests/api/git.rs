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

backend_tests!(git_settings, webhook_builds_and_promotes, webhook_refusals);

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
    assert_eq!(boot.config.entrypoint.as_str(), "file:///src/main.ts");
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
    let layer = origin.boot(&id2).await.unwrap().config.layers[0].id().to_owned();
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
    hook(&s, "plain", &payload, Some(sign(&body, SECRET)), "push").await.assert_error(404, "NOT_FOUND", None);
    hook(&s, "nope", &payload, Some(sign(&body, SECRET)), "push").await.assert_error(404, "NOT_FOUND", None);

    let ignored = |reply: Reply, says: &str| {
        assert_eq!(reply.status, 200, "{}", reply.text);
        let why = reply.json()["ignored"].as_str().unwrap_or_default().to_owned();
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
