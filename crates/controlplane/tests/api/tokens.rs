//! Scoped tokens (issue 16 item 5): each scope boundary first shown open
//! with a token that may cross it, then closed (403 naming the scope
//! needed); expired and revoked tokens refused with their own 401 codes,
//! also on a second node of the same store; grants follow the project's id
//! across a rename; the audit log records each mutation with the token's
//! name, refusals included.

use std::time::Duration;

use serde_json::{Value, json};

use crate::backend_tests;
use crate::support::{Backend, Reply, TestServer, eventually};

backend_tests!(
    a_deploy_token_deploys_its_project_and_nothing_else,
    a_read_token_reads_its_project_and_mutates_nothing,
    expired_and_revoked_tokens_are_refused_on_every_node,
    a_grant_follows_the_project_id_not_its_name,
    the_audit_log_records_each_mutation_with_the_token_name,
    tokens_are_listed_by_page_without_secrets_and_the_last_admin_stays,
);

/// Calls made with one token.
struct As<'a> {
    s: &'a TestServer,
    token: String,
}

impl As<'_> {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let mut request = self.s.client.request(method.parse().unwrap(), self.s.url(path)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.s.send(request).await
    }
    async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> Reply {
        self.call("POST", path, Some(body)).await
    }
    async fn upload(&self, bytes: &[u8]) -> Reply {
        let hash = crate::support::sha256_hex(bytes);
        let url = self.s.url(&format!("/api/v1/blobs/{hash}"));
        self.s.send(self.s.client.put(url).bearer_auth(&self.token).body(bytes.to_vec())).await
    }
}

/// Creates a token as admin; the whole answer (`token`, `secret`).
async fn create_token(s: &TestServer, body: Value) -> Value {
    let reply = s.post("/api/v1/tokens", body).await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    reply.json()
}

async fn token_for<'a>(s: &'a TestServer, scope: &str, name: &str) -> As<'a> {
    let created = create_token(s, json!({"scope": scope, "name": name})).await;
    As { s, token: created["secret"].as_str().unwrap().to_owned() }
}

#[track_caller]
fn forbidden(reply: &Reply, needs: &str) {
    reply.assert_error(403, "FORBIDDEN", None);
    assert!(reply.message().contains(needs), "message does not name {needs}: {}", reply.text);
}

fn deployment_body(hash: &str, size: usize) -> Value {
    json!({"entrypoint": "main.ts", "files": {"main.ts": {"hash": hash, "size": size}}})
}

async fn a_deploy_token_deploys_its_project_and_nothing_else(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("a").await;
    s.create_project("b").await;
    let b_deployment = s.deploy("b", &[("main.ts", "// b")], "main.ts", true).await;
    let b_id = b_deployment["id"].as_str().unwrap();
    let ci = token_for(&s, "project:a:deploy", "ci").await;

    // Its own project: upload, deploy, promote, roll back, read.
    let code = b"export default { fetch: () => new Response('a') };";
    assert_eq!(ci.upload(code).await.status, 201);
    let hash = crate::support::sha256_hex(code);
    let missing = ci.post("/api/v1/blobs/missing", json!({"hashes": [hash]})).await;
    assert_eq!(missing.status, 200, "{}", missing.text);
    let made = ci.post("/api/v1/projects/a/deployments", deployment_body(&hash, code.len())).await;
    assert_eq!(made.status, 201, "{}", made.text);
    let a_id = made.json()["id"].as_str().unwrap().to_owned();
    let promoted = ci.post("/api/v1/projects/a/promote", json!({"deployment_id": a_id})).await;
    assert_eq!(promoted.status, 200, "{}", promoted.text);
    for path in [
        "/api/v1/projects/a".to_owned(),
        "/api/v1/projects/a/deployments".to_owned(),
        "/api/v1/projects/a/logs".to_owned(),
        "/api/v1/projects/a/usage".to_owned(),
        "/api/v1/projects/a/env".to_owned(),
        format!("/api/v1/deployments/{a_id}"),
        format!("/api/v1/deployments/{a_id}/logs"),
    ] {
        assert_eq!(ci.get(&path).await.status, 200, "{path}");
    }
    let who = ci.get("/api/v1/whoami").await.json();
    assert_eq!((who["token_name"].as_str(), who["scope"].as_str()), (Some("ci"), Some("project:a:deploy")));
    // The list shows its project only (the admin sees both).
    let names = |r: Reply| r.json().as_array().unwrap().iter().map(|p| p["name"].clone()).collect::<Vec<_>>();
    assert_eq!(names(s.get("/api/v1/projects").await), [json!("a"), json!("b")]);
    assert_eq!(names(ci.get("/api/v1/projects").await), [json!("a")]);

    // Project b: the same calls work for the admin, not for a's token.
    assert_eq!(s.post("/api/v1/projects/b/deployments", deployment_body(&hash, code.len())).await.status, 201);
    forbidden(&ci.post("/api/v1/projects/b/deployments", deployment_body(&hash, code.len())).await, "project:b:deploy");
    forbidden(&ci.post("/api/v1/projects/b/promote", json!({"deployment_id": b_id})).await, "project:b:deploy");
    forbidden(&ci.get("/api/v1/projects/b").await, "project:b:read");
    forbidden(&ci.get("/api/v1/projects/b/env").await, "project:b:read");
    forbidden(&ci.get(&format!("/api/v1/deployments/{b_id}")).await, "project:b:read");
    forbidden(&ci.get(&format!("/api/v1/deployments/{b_id}/build")).await, "project:b:read");
    // A project that does not exist is no one's.
    forbidden(&ci.get("/api/v1/projects/nope").await, "project:nope:read");

    // On its own project, what stays admin's: env writes, limits, domains,
    // git, rename, delete, tokens, audit. Each works for the admin first.
    assert_eq!(s.put("/api/v1/projects/a/env/K", json!({"value": "v"})).await.status, 200);
    forbidden(&ci.call("PUT", "/api/v1/projects/a/env/K", Some(json!({"value": "w"}))).await, "needs admin");
    forbidden(&ci.call("DELETE", "/api/v1/projects/a/env/K", None).await, "needs admin");
    assert_eq!(s.put("/api/v1/projects/a/limits", json!({"usage_rows": 5_000})).await.status, 200);
    forbidden(&ci.call("PUT", "/api/v1/projects/a/limits", Some(json!({"usage_rows": 99_999}))).await, "needs admin");
    assert_eq!(ci.get("/api/v1/projects/a/limits").await.json()["usage_rows"], 5_000);
    assert_eq!(s.post("/api/v1/domains", json!({"domain": "a.example.com", "project": "a"})).await.status, 201);
    forbidden(&ci.post("/api/v1/domains", json!({"domain": "b.example.com", "project": "a"})).await, "needs admin");
    forbidden(&ci.call("PATCH", "/api/v1/domains/a.example.com", Some(json!({"project": null}))).await, "needs admin");
    forbidden(
        &ci.call("PUT", "/api/v1/domains/a.example.com/certificate", Some(json!({"cert_pem": "x", "key_pem": "y"})))
            .await,
        "needs admin",
    );
    forbidden(&ci.get("/api/v1/domains").await, "needs admin");
    forbidden(&ci.call("PATCH", "/api/v1/projects/a", Some(json!({"name": "z"}))).await, "needs admin");
    forbidden(&ci.call("DELETE", "/api/v1/projects/a", None).await, "needs admin");
    forbidden(&ci.post("/api/v1/projects", json!({"name": "c"})).await, "needs admin");
    forbidden(&ci.post("/api/v1/tokens", json!({"scope": "admin"})).await, "needs admin");
    forbidden(&ci.get("/api/v1/tokens").await, "needs admin");
    forbidden(&ci.get("/api/v1/audit").await, "needs admin");
    // Nothing it was refused happened.
    assert_eq!(s.get("/api/v1/projects/a").await.status, 200);
    assert_eq!(s.get("/api/v1/domains/a.example.com").await.json()["project"], "a");
}

async fn a_read_token_reads_its_project_and_mutates_nothing(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("a").await;
    let d = s.deploy("a", &[("main.ts", "// a")], "main.ts", true).await;
    let id = d["id"].as_str().unwrap();
    let viewer = token_for(&s, "project:a:read", "viewer").await;
    for path in [
        "/api/v1/projects".to_owned(),
        "/api/v1/projects/a".to_owned(),
        "/api/v1/projects/a/deployments".to_owned(),
        "/api/v1/projects/a/logs".to_owned(),
        "/api/v1/projects/a/analytics".to_owned(),
        format!("/api/v1/deployments/{id}/build"),
    ] {
        assert_eq!(viewer.get(&path).await.status, 200, "{path}");
    }
    // Every mutation of the project: the admin's call works (shown for
    // each kind once above and in the deploy test); the read token's is 403.
    let code = b"// read";
    let hash = crate::support::sha256_hex(code);
    forbidden(&viewer.upload(code).await, "deploy");
    forbidden(&viewer.post("/api/v1/blobs/missing", json!({"hashes": [hash]})).await, "deploy");
    let mutations: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", "/api/v1/projects/a/deployments".into(), Some(deployment_body(&hash, code.len()))),
        ("POST", "/api/v1/projects/a/promote".into(), Some(json!({"deployment_id": id}))),
        ("POST", "/api/v1/projects/a/rollback".into(), None),
        ("PUT", "/api/v1/projects/a/env/K".into(), Some(json!({"value": "v"}))),
        ("DELETE", "/api/v1/projects/a/env/K".into(), None),
        ("PUT", "/api/v1/projects/a/limits".into(), Some(json!({}))),
        ("PUT", "/api/v1/projects/a/git".into(), Some(json!({}))),
        ("DELETE", "/api/v1/projects/a/git".into(), None),
        ("PATCH", "/api/v1/projects/a".into(), Some(json!({"name": "b"}))),
        ("DELETE", "/api/v1/projects/a".into(), None),
        ("POST", "/api/v1/projects".into(), Some(json!({"name": "c"}))),
        ("POST", "/api/v1/domains".into(), Some(json!({"domain": "x.example.com"}))),
        ("POST", "/api/v1/tokens".into(), Some(json!({"scope": "project:a:deploy"}))),
    ];
    for (method, path, body) in mutations {
        let reply = viewer.call(method, &path, body).await;
        assert_eq!((reply.status, reply.code()), (403, "FORBIDDEN".into()), "{method} {path}: {}", reply.text);
    }
    let project = s.get("/api/v1/projects/a").await.json();
    assert_eq!(project["production_deployment_id"], id, "nothing moved");
    assert_eq!(s.get("/api/v1/projects/a/deployments").await.json().as_array().unwrap().len(), 1);
}

async fn expired_and_revoked_tokens_are_refused_on_every_node(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("a").await;
    let short = create_token(&s, json!({"scope": "project:a:read", "name": "short", "expires_in_s": 1})).await;
    let short = As { s: &s, token: short["secret"].as_str().unwrap().to_owned() };
    assert_eq!(short.get("/api/v1/projects/a").await.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = short.get("/api/v1/projects/a").await;
    expired.assert_error(401, "TOKEN_EXPIRED", None);
    assert!(expired.message().contains("short"), "{}", expired.text);

    // A second node on the same store: the token works there, then a
    // revocation on the first holds on the second at its next request.
    let second = isocloud_controlplane::ControlPlane::open(s.options.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second_base = format!("http://{}", listener.local_addr().unwrap());
    let router = second.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let created = create_token(&s, json!({"scope": "project:a:deploy", "name": "ci"})).await;
    let (id, secret) = (created["token"]["id"].as_str().unwrap(), created["secret"].as_str().unwrap());
    let on_second = || s.send(s.client.get(format!("{second_base}/api/v1/projects/a")).bearer_auth(secret));
    assert_eq!(on_second().await.status, 200);
    let ci = As { s: &s, token: secret.to_owned() };
    assert_eq!(ci.get("/api/v1/projects/a").await.status, 200);
    assert_eq!(s.delete(&format!("/api/v1/tokens/{id}")).await.status, 204);
    ci.get("/api/v1/projects/a").await.assert_error(401, "TOKEN_REVOKED", None);
    on_second().await.assert_error(401, "TOKEN_REVOKED", None);
    let listed = s.get("/api/v1/tokens").await.json();
    let status = |name: &str| listed.as_array().unwrap().iter().find(|t| t["name"] == name).unwrap()["status"].clone();
    assert_eq!((status("ci"), status("short"), status("admin")), (json!("revoked"), json!("expired"), json!("active")));
    server.abort();
}

async fn a_grant_follows_the_project_id_not_its_name(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("a").await;
    let ci = token_for(&s, "project:a:deploy", "ci").await;
    assert_eq!(s.patch("/api/v1/projects/a", json!({"name": "a2"})).await.status, 200);
    // Renamed: the grant holds under the new name and shows it.
    assert_eq!(ci.get("/api/v1/projects/a2").await.status, 200);
    assert_eq!(ci.get("/api/v1/whoami").await.json()["scope"], "project:a2:deploy");
    assert_eq!(s.delete("/api/v1/projects/a2").await.status, 204);
    // A new project under the old name is not the token's.
    s.create_project("a").await;
    assert_eq!(s.get("/api/v1/projects/a").await.status, 200);
    forbidden(&ci.get("/api/v1/projects/a").await, "project:a:read");
    assert_eq!(ci.get("/api/v1/projects").await.json(), json!([]));
    let listed = s.get("/api/v1/tokens").await.json();
    let ci_row = listed.as_array().unwrap().iter().find(|t| t["name"] == "ci").unwrap().clone();
    assert_eq!((ci_row["scope"].clone(), ci_row["project"].clone()), (json!("project:(deleted):deploy"), Value::Null));
    // A scope naming a project that does not exist is refused.
    let bad = s.post("/api/v1/tokens", json!({"scope": "project:nope:read"})).await;
    bad.assert_error(400, "INVALID_FIELD", Some("scope"));
}

async fn the_audit_log_records_each_mutation_with_the_token_name(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("a").await;
    s.create_project("b").await;
    let ci = token_for(&s, "project:a:deploy", "ci-pipeline").await;
    let code = b"// audited";
    ci.upload(code).await;
    let hash = crate::support::sha256_hex(code);
    let made = ci.post("/api/v1/projects/a/deployments", deployment_body(&hash, code.len())).await;
    assert_eq!(made.status, 201);
    let refused = ci.post("/api/v1/projects/b/deployments", deployment_body(&hash, code.len())).await;
    assert_eq!(refused.status, 403);
    assert_eq!(s.put("/api/v1/projects/a/env/K", json!({"value": "secret-value"})).await.status, 200);
    // A read is not audited.
    assert_eq!(ci.get("/api/v1/projects/a").await.status, 200);

    let log = s.get("/api/v1/audit").await;
    assert_eq!(log.status, 200, "{}", log.text);
    assert!(!log.text.contains("secret-value"), "values never reach the log");
    let entries = log.json().as_array().unwrap().clone();
    let summary: Vec<(String, String, String, String)> = entries
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
            (s("token_name"), s("action"), s("project"), s("outcome"))
        })
        .collect();
    let row = |a: &str, b: &str, c: &str, d: &str| (a.to_owned(), b.to_owned(), c.to_owned(), d.to_owned());
    // Newest first.
    assert_eq!(
        summary,
        [
            row("admin", "env.set", "a", "ok"),
            row("ci-pipeline", "deployment.create", "b", "denied"),
            row("ci-pipeline", "deployment.create", "a", "ok"),
            row("ci-pipeline", "blob.upload", "-", "ok"),
            row("admin", "token.create", "a", "ok"),
            row("admin", "project.create", "-", "ok"),
            row("admin", "project.create", "-", "ok"),
        ],
        "{}",
        log.text
    );
    let deployed = &entries[2];
    let id = made.json()["id"].as_str().unwrap().to_owned();
    assert!(deployed["target"].as_str().unwrap().contains(&id), "{deployed}");
    assert_eq!(deployed["status"], 201);
    assert!(entries[6]["target"].as_str().unwrap().contains("project a"), "{}", entries[6]);

    // Filtered by project, and paged by its cursor.
    let of_a = s.get("/api/v1/audit?project=a&limit=2").await;
    let first: Vec<String> =
        of_a.json().as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap().to_owned()).collect();
    assert_eq!(first, ["env.set", "deployment.create"]);
    let link = of_a.headers["link"].to_str().unwrap().to_owned();
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    assert!(next.contains("project=a"), "{link}");
    let rest = s.get(next).await.json();
    assert_eq!(
        rest.as_array().unwrap().iter().map(|e| e["action"].clone()).collect::<Vec<_>>(),
        [json!("token.create")]
    );
    s.get("/api/v1/audit?project=nope").await.assert_error(404, "NOT_FOUND", None);
}

async fn tokens_are_listed_by_page_without_secrets_and_the_last_admin_stays(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("a").await;
    let mut secrets = Vec::new();
    for name in ["t1", "t2", "t3"] {
        let created = create_token(&s, json!({"scope": "project:a:read", "name": name})).await;
        let secret = created["secret"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("isc_") && secret.len() > 60, "{secret}");
        secrets.push(secret);
    }
    // A name is never taken twice.
    s.post("/api/v1/tokens", json!({"scope": "admin", "name": "t1"})).await.assert_error(409, "CONFLICT", None);
    let first = s.get("/api/v1/tokens?limit=2").await;
    let names = |r: &Reply| r.json().as_array().unwrap().iter().map(|t| t["name"].clone()).collect::<Vec<_>>();
    assert_eq!(names(&first), [json!("admin"), json!("t1")]);
    let link = first.headers["link"].to_str().unwrap().to_owned();
    let next = link.trim_start_matches('<').split('>').next().unwrap().to_owned();
    let second = s.get(&next).await;
    assert_eq!(names(&second), [json!("t2"), json!("t3")]);
    for secret in &secrets {
        assert!(!first.text.contains(secret.as_str()) && !second.text.contains(secret.as_str()));
    }
    // Last use is noted (off the request's path, at most once a minute).
    let user = As { s: &s, token: secrets[0].clone() };
    assert_eq!(user.get("/api/v1/projects/a").await.status, 200);
    let last_used = || async {
        let listed = s.get("/api/v1/tokens").await.json();
        listed.as_array().unwrap().iter().find(|t| t["name"] == "t1").unwrap()["last_used_at"].clone()
    };
    assert!(eventually(Duration::from_secs(5), || async { !last_used().await.is_null() }).await);
    let noted = last_used().await;
    assert_eq!(user.get("/api/v1/projects/a").await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(last_used().await, noted, "within the minute, no second write");

    // The last usable admin token cannot be revoked; with another, it can.
    let admin_id = {
        let listed = s.get("/api/v1/tokens").await.json();
        listed[0]["id"].as_str().unwrap().to_owned()
    };
    s.delete(&format!("/api/v1/tokens/{admin_id}")).await.assert_error(409, "CONFLICT", None);
    let other = create_token(&s, json!({"scope": "admin", "name": "ops", "expires_in_s": 3600})).await;
    assert!(other["token"]["expires_at"].is_string());
    assert_eq!(s.delete(&format!("/api/v1/tokens/{admin_id}")).await.status, 204);
    s.get("/api/v1/whoami").await.assert_error(401, "TOKEN_REVOKED", None);
    let ops = As { s: &s, token: other["secret"].as_str().unwrap().to_owned() };
    assert_eq!(ops.get("/api/v1/tokens").await.status, 200);
}
