//! Projects: create, read, rename, delete (with its cascade), production
//! promotion and rollback; one namespace for hosts (no project name takes a
//! deployment's host, and stored data that collides routes to the
//! deployment).

use serde_json::json;

use crate::backend_tests;
use crate::support::{Backend, TestServer};

backend_tests!(
    projects_crud,
    project_names_are_checked,
    rename_conflict_changes_nothing,
    promote_and_rollback,
    delete_cascades,
    a_name_of_a_deployment_host_is_refused_on_create_and_rename,
    a_stored_name_colliding_with_a_deployment_host_loses_to_the_deployment,
    lists_page_by_cursor_in_a_stable_order
);

fn is_rfc3339(value: &serde_json::Value) -> bool {
    value.as_str().is_some_and(|s| s.len() == 24 && s.ends_with('Z') && s.as_bytes()[10] == b'T')
}

async fn projects_crud(backend: Backend) {
    let s = TestServer::start(backend).await;
    assert_eq!(s.get("/api/v1/projects").await.json(), json!([]));

    let created = s.create_project("hello").await;
    assert_eq!(created["name"], "hello");
    assert!(created["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(is_rfc3339(&created["created_at"]) && is_rfc3339(&created["updated_at"]), "{created}");
    assert_eq!(created["production_deployment_id"], json!(null));
    assert_eq!(created["production_url"], json!(null));
    assert_eq!(created["git"], json!(null));

    let got = s.get("/api/v1/projects/hello").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), created);
    s.create_project("another").await;
    let names: Vec<String> = s
        .get("/api/v1/projects")
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["another", "hello"]);

    let renamed = s.patch("/api/v1/projects/hello", json!({"name": "hi"})).await;
    assert_eq!(renamed.status, 200, "{}", renamed.text);
    assert_eq!(renamed.json()["name"], "hi");
    assert_eq!(renamed.json()["id"], created["id"]);
    s.get("/api/v1/projects/hello").await.assert_error(404, "NOT_FOUND", None);
    assert_eq!(s.get("/api/v1/projects/hi").await.status, 200);

    let deleted = s.delete("/api/v1/projects/hi").await;
    assert_eq!(deleted.status, 204);
    assert!(deleted.text.is_empty());
    s.get("/api/v1/projects/hi").await.assert_error(404, "NOT_FOUND", None);
    s.delete("/api/v1/projects/hi").await.assert_error(404, "NOT_FOUND", None);
    s.patch("/api/v1/projects/hi", json!({"name": "x"})).await.assert_error(404, "NOT_FOUND", None);
    assert_eq!(s.get("/api/v1/projects").await.json().as_array().unwrap().len(), 1);
}

async fn project_names_are_checked(backend: Backend) {
    let s = TestServer::start(backend).await;
    for bad in ["Hello", "api", "www", "admin", "dashboard", "-a", "a-", "a_b", "", &"a".repeat(51), "a-0123456789ab"] {
        let reply = s.post("/api/v1/projects", json!({ "name": bad })).await;
        reply.assert_error(400, "INVALID_FIELD", Some("name"));
    }
    s.create_project(&"a".repeat(50)).await;
    s.create_project("taken").await;
    s.post("/api/v1/projects", json!({"name": "taken"})).await.assert_error(409, "CONFLICT", None);
    s.patch("/api/v1/projects/taken", json!({"name": "Bad Name"})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("name"),
    );
    assert_eq!(s.get("/api/v1/projects").await.json().as_array().unwrap().len(), 2);
}

async fn rename_conflict_changes_nothing(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("one").await;
    s.create_project("two").await;
    let before = s.get("/api/v1/projects/one").await.json();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // The rename runs in a transaction that already touched the row
    // (updated_at); the conflict must roll all of it back.
    s.patch("/api/v1/projects/one", json!({"name": "two"})).await.assert_error(409, "CONFLICT", None);
    assert_eq!(s.get("/api/v1/projects/one").await.json(), before);
}

async fn promote_and_rollback(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("hello").await;
    s.create_project("other").await;
    let main = [("main.ts", "export default { fetch: () => new Response('a') };")];
    let a = s.deploy("hello", &main, "main.ts", true).await;
    let a_id = a["id"].as_str().unwrap().to_owned();
    assert_eq!(a["production"], true);
    let project = s.get("/api/v1/projects/hello").await.json();
    assert_eq!(project["production_deployment_id"], a_id.as_str());
    assert_eq!(project["production_url"], "http://hello.localhost:8080");
    assert_eq!(s.cp.resolve_host("hello.localhost").unwrap().deployment_id, a_id);

    let b = s.deploy("hello", &[("main.ts", "// b")], "main.ts", false).await;
    let b_id = b["id"].as_str().unwrap().to_owned();
    assert_eq!(b["production"], false);
    assert_eq!(s.get("/api/v1/projects/hello").await.json()["production_deployment_id"], a_id.as_str());
    let c_id = s.deploy("hello", &[("main.ts", "// c")], "main.ts", false).await["id"].as_str().unwrap().to_owned();
    let foreign = s.deploy("other", &[("main.ts", "// o")], "main.ts", false).await["id"].as_str().unwrap().to_owned();

    let promote = |id: &str| s.post("/api/v1/projects/hello/promote", json!({ "deployment_id": id }));
    let promoted = promote(&b_id).await;
    assert_eq!(promoted.status, 200, "{}", promoted.text);
    assert_eq!(promoted.json()["production_deployment_id"], b_id.as_str());
    assert_eq!(s.cp.resolve_host("hello.localhost").unwrap().deployment_id, b_id);
    assert_eq!(s.get(&format!("/api/v1/deployments/{b_id}")).await.json()["production"], true);
    assert_eq!(s.get(&format!("/api/v1/deployments/{a_id}")).await.json()["production"], false);
    // Promoting production again is a no-op.
    assert_eq!(promote(&b_id).await.json()["production_deployment_id"], b_id.as_str());
    assert_eq!(promote(&c_id).await.json()["production_deployment_id"], c_id.as_str());

    promote(&foreign).await.assert_error(404, "NOT_FOUND", None);
    promote("zzzzzzzzzzzz").await.assert_error(404, "NOT_FOUND", None);
    promote("not an id").await.assert_error(400, "INVALID_FIELD", Some("deployment_id"));
    s.post("/api/v1/projects/nope/promote", json!({"deployment_id": c_id})).await.assert_error(404, "NOT_FOUND", None);

    // History a, b, c: each rollback steps back one.
    let rollback = s.post_empty("/api/v1/projects/hello/rollback").await;
    assert_eq!(rollback.status, 200, "{}", rollback.text);
    assert_eq!(rollback.json()["production_deployment_id"], b_id.as_str());
    assert_eq!(s.cp.resolve_host("hello.localhost").unwrap().deployment_id, b_id);
    assert_eq!(s.post_empty("/api/v1/projects/hello/rollback").await.json()["production_deployment_id"], a_id.as_str());
    s.post_empty("/api/v1/projects/hello/rollback").await.assert_error(409, "CONFLICT", None);
    assert_eq!(s.cp.resolve_host("hello.localhost").unwrap().deployment_id, a_id);

    // History a, c: b was popped, so it was never production before.
    promote(&c_id).await;
    s.post("/api/v1/projects/hello/rollback", json!({"deployment_id": b_id})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("deployment_id"),
    );
    s.post("/api/v1/projects/hello/rollback", json!({"deployment_id": foreign})).await.assert_error(
        404,
        "NOT_FOUND",
        None,
    );
    let back = s.post("/api/v1/projects/hello/rollback", json!({"deployment_id": a_id})).await;
    assert_eq!(back.status, 200, "{}", back.text);
    assert_eq!(back.json()["production_deployment_id"], a_id.as_str());
    // Every deployment keeps its own URL whatever production is.
    for id in [&a_id, &b_id, &c_id] {
        assert_eq!(s.cp.resolve_host(&format!("hello-{id}.localhost")).unwrap().deployment_id, *id);
    }
    assert_eq!(s.cp.resolve_host(&format!("other-{foreign}.localhost")).unwrap().deployment_id, foreign);
    assert!(s.cp.resolve_host(&format!("hello-{foreign}.localhost")).is_none());
}

async fn delete_cascades(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("doomed").await;
    let d = s.deploy("doomed", &[("main.ts", "// d")], "main.ts", true).await;
    let id = d["id"].as_str().unwrap().to_owned();
    assert_eq!(s.put("/api/v1/projects/doomed/env/KEY", json!({"value": "v"})).await.status, 200);
    assert_eq!(
        s.post("/api/v1/domains", json!({"domain": "doomed.example.com", "project": "doomed"})).await.status,
        201
    );
    let batch = isocloud_origin::ActivityBatch {
        batch_id: "b1".into(),
        events: vec![serde_json::from_value(json!({
            "deployment_id": id, "timestamp": "2024-01-01T00:00:00Z", "type": "log", "level": "info", "message": "hi"
        })).unwrap()],
    };
    s.cp.origin().report_activity(&id, &batch).await.unwrap();
    assert_eq!(s.get(&format!("/api/v1/deployments/{id}/logs")).await.json().as_array().unwrap().len(), 1);
    assert!(s.cp.resolve_host("doomed.localhost").is_some());

    assert_eq!(s.delete("/api/v1/projects/doomed").await.status, 204);
    s.get(&format!("/api/v1/deployments/{id}")).await.assert_error(404, "NOT_FOUND", None);
    s.get(&format!("/api/v1/deployments/{id}/logs")).await.assert_error(404, "NOT_FOUND", None);
    assert!(s.cp.resolve_host("doomed.localhost").is_none());
    assert!(s.cp.resolve_host(&format!("doomed-{id}.localhost")).is_none());
    assert!(s.cp.origin().boot(&id).await.is_err());
    // The domain stays, detached.
    let domain = s.get("/api/v1/domains/doomed.example.com").await.json();
    assert_eq!(domain["project"], json!(null));
    // The name is free again, with nothing of the old project.
    s.create_project("doomed").await;
    assert_eq!(s.get("/api/v1/projects/doomed/env").await.json(), json!([]));
    assert_eq!(s.get("/api/v1/projects/doomed/deployments").await.json(), json!([]));
    assert_eq!(s.get("/api/v1/projects/doomed/logs").await.json(), json!([]));
}

async fn a_name_of_a_deployment_host_is_refused_on_create_and_rename(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("alpha").await;
    let id = s.deploy("alpha", &[("main.ts", "// alpha")], "main.ts", true).await["id"].as_str().unwrap().to_owned();
    let deployment_host = format!("alpha-{id}.localhost");
    // Probe: alpha's deployment URL serves alpha, and names with '-' are
    // fine, this one included when it is not of the deployment-host shape.
    assert_eq!(s.cp.resolve_host(&deployment_host).unwrap().deployment_id, id);
    s.create_project("alpha-beta").await;
    s.create_project("beta").await;
    let beta = s.get("/api/v1/projects/beta").await.json();

    let taken = format!("alpha-{id}");
    let refused = s.post("/api/v1/projects", json!({ "name": taken })).await;
    refused.assert_error(400, "INVALID_FIELD", Some("name"));
    assert!(refused.message().contains("shape of a deployment's host"), "{}", refused.text);
    let refused = s.patch("/api/v1/projects/beta", json!({ "name": taken })).await;
    refused.assert_error(400, "INVALID_FIELD", Some("name"));
    assert!(refused.message().contains("shape of a deployment's host"), "{}", refused.text);
    // Any deployment id, existing or not: the shape alone is refused, so
    // no later deployment can collide either.
    s.post("/api/v1/projects", json!({"name": "alpha-zzzzzzzzzzzz"})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("name"),
    );

    assert_eq!(s.get("/api/v1/projects/beta").await.json(), beta);
    s.get(&format!("/api/v1/projects/{taken}")).await.assert_error(404, "NOT_FOUND", None);
    assert_eq!(s.cp.resolve_host(&deployment_host).unwrap().deployment_id, id);
}

/// Data from before the rule (written here straight into the database): a
/// project named `alpha-<alpha's deployment id>`. After a restart the host
/// is alpha's deployment's, and the project can be renamed out of the way.
async fn a_stored_name_colliding_with_a_deployment_host_loses_to_the_deployment(backend: Backend) {
    use sqlx::Connection;

    let s = TestServer::start(backend.clone()).await;
    s.create_project("alpha").await;
    let id = s.deploy("alpha", &[("main.ts", "// alpha")], "main.ts", true).await["id"].as_str().unwrap().to_owned();
    s.create_project("beta").await;
    let beta_id = s.deploy("beta", &[("main.ts", "// beta")], "main.ts", true).await["id"].as_str().unwrap().to_owned();
    let taken = format!("alpha-{id}");
    let host = format!("{taken}.localhost");
    assert_eq!(s.cp.resolve_host(&host).unwrap().deployment_id, id);

    let url = match &backend {
        Backend::Sqlite => format!("sqlite://{}", s.options.data_dir.join("isocloud.db").display()),
        Backend::Postgres { url } => url.clone(),
    };
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let updated =
        sqlx::query("UPDATE projects SET name = $1 WHERE name = 'beta'").bind(&taken).execute(&mut conn).await;
    assert_eq!(updated.unwrap().rows_affected(), 1);
    conn.close().await.unwrap();

    let (s, _) = s.restart().await;
    assert_eq!(s.get(&format!("/api/v1/projects/{taken}")).await.json()["production_deployment_id"], beta_id.as_str());
    // The deployment wins: an immutable URL is never taken over.
    assert_eq!(s.cp.resolve_host(&host).unwrap().deployment_id, id);
    assert_eq!(s.cp.resolve_host("alpha.localhost").unwrap().deployment_id, id);
    assert_eq!(s.cp.resolve_host(&format!("{taken}-{beta_id}.localhost")).unwrap().deployment_id, beta_id);
    // Its owner renames it to a name that is its own.
    let renamed = s.patch(&format!("/api/v1/projects/{taken}"), json!({"name": "beta"})).await;
    assert_eq!(renamed.status, 200, "{}", renamed.text);
    assert_eq!(s.cp.resolve_host("beta.localhost").unwrap().deployment_id, beta_id);
    assert_eq!(s.cp.resolve_host(&host).unwrap().deployment_id, id);
}

/// Follows `first`'s `Link: rel="next"` to the end: every page's items, and
/// how many pages.
async fn all_pages(s: &TestServer, first: &str, key: &str) -> (Vec<String>, usize) {
    let (mut items, mut pages, mut next) = (Vec::new(), 0, Some(first.to_owned()));
    while let Some(path) = next.take() {
        let reply = s.get(&path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        pages += 1;
        for item in reply.json().as_array().unwrap() {
            items.push(item[key].as_str().unwrap().to_owned());
        }
        if let Some(link) = reply.headers.get("link") {
            let link = link.to_str().unwrap();
            assert!(link.ends_with(">; rel=\"next\""), "{link}");
            next = Some(link.trim_start_matches('<').split('>').next().unwrap().to_owned());
        }
        assert!(pages < 100, "the links never end");
    }
    (items, pages)
}

async fn lists_page_by_cursor_in_a_stable_order(backend: Backend) {
    let s = TestServer::start(backend).await;
    for name in ["echo", "alpha", "delta", "bravo", "charlie"] {
        s.create_project(name).await;
    }
    let (names, pages) = all_pages(&s, "/api/v1/projects?limit=2", "name").await;
    assert_eq!(names, ["alpha", "bravo", "charlie", "delta", "echo"]);
    assert_eq!(pages, 3);
    // The whole list in one page when it fits: no link.
    let one = s.get("/api/v1/projects").await;
    assert_eq!(one.json().as_array().unwrap().len(), 5);
    assert!(one.headers.get("link").is_none());

    // Deployments: newest first, none twice, none skipped, also when one is
    // made between two pages.
    let mut made = Vec::new();
    for n in 0..5 {
        // Apart in time, so that creation order is the list's order.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        made.push(
            s.deploy("alpha", &[("main.ts", &format!("// {n}"))], "main.ts", false).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let first = s.get("/api/v1/projects/alpha/deployments?limit=2").await;
    let link = first.headers["link"].to_str().unwrap().to_owned();
    let next = link.trim_start_matches('<').split('>').next().unwrap().to_owned();
    let newest: Vec<String> =
        first.json().as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect();
    s.deploy("alpha", &[("main.ts", "// made between pages")], "main.ts", false).await;
    let (rest, _) = all_pages(&s, &next, "id").await;
    let mut seen = newest.clone();
    seen.extend(rest);
    made.reverse();
    assert_eq!(seen, made, "newest first, each once");

    for cursor in ["garbage", "W10", "%00"] {
        s.get(&format!("/api/v1/projects?cursor={cursor}")).await.assert_error(400, "INVALID_FIELD", Some("cursor"));
        s.get(&format!("/api/v1/projects/alpha/deployments?cursor={cursor}")).await.assert_error(
            400,
            "INVALID_FIELD",
            Some("cursor"),
        );
    }
    s.get("/api/v1/projects?limit=0").await.assert_error(400, "INVALID_FIELD", Some("limit"));
}
