//! Env vars: set, list (names only), replace, delete, and their rules.

use serde_json::json;

use crate::backend_tests;
use crate::support::{Backend, TestServer};

backend_tests!(env_vars_crud, env_rules, env_names_that_change_deno_or_the_loader_are_refused);

async fn env_vars_crud(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("p").await;
    assert_eq!(s.get("/api/v1/projects/p/env").await.json(), json!([]));
    let set = s.put("/api/v1/projects/p/env/API_KEY", json!({"value": "secret-value-1"})).await;
    assert_eq!(set.status, 200, "{}", set.text);
    let set = set.json();
    assert_eq!(set["name"], "API_KEY");
    assert!(set["updated_at"].is_string());
    assert_eq!(s.put("/api/v1/projects/p/env/_Z", json!({"value": ""})).await.status, 200);
    let listed = s.get("/api/v1/projects/p/env").await;
    let json = listed.json();
    let names: Vec<&str> = json.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["API_KEY", "_Z"]);
    assert!(!listed.text.contains("secret-value"), "{}", listed.text);
    assert!(listed.json()[0].get("value").is_none());

    assert_eq!(s.put("/api/v1/projects/p/env/API_KEY", json!({"value": "secret-value-2"})).await.status, 200);
    assert_eq!(s.get("/api/v1/projects/p/env").await.json().as_array().unwrap().len(), 2);
    let d = s.deploy("p", &[("main.ts", "// x")], "main.ts", false).await;
    let boot = s.cp.origin().boot(d["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(boot.config.envs().get("API_KEY").map(String::as_str), Some("secret-value-2"));

    assert_eq!(s.delete("/api/v1/projects/p/env/API_KEY").await.status, 204);
    s.delete("/api/v1/projects/p/env/API_KEY").await.assert_error(404, "NOT_FOUND", None);
    assert_eq!(s.get("/api/v1/projects/p/env").await.json().as_array().unwrap().len(), 1);
    s.get("/api/v1/projects/nope/env").await.assert_error(404, "NOT_FOUND", None);
    s.put("/api/v1/projects/nope/env/A", json!({"value": "v"})).await.assert_error(404, "NOT_FOUND", None);
}

async fn env_rules(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("p").await;
    for bad in ["1A", "A-B", "A%3DB", "%C3%A9", &"A".repeat(257)] {
        let reply = s.put(&format!("/api/v1/projects/p/env/{bad}"), json!({"value": "v"})).await;
        reply.assert_error(400, "INVALID_FIELD", Some("name"));
    }
    s.put("/api/v1/projects/p/env/A", json!({"value": "a\u{0}b"})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("value"),
    );
    s.put("/api/v1/projects/p/env/A", json!({"value": "v".repeat(32 * 1024 + 1)})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("value"),
    );
    assert_eq!(s.put("/api/v1/projects/p/env/A", json!({"value": "v".repeat(32 * 1024)})).await.status, 200);
    s.put("/api/v1/projects/p/env/A", json!({"value": 5})).await.assert_error(400, "INVALID_REQUEST", Some("value"));
    s.put("/api/v1/projects/p/env/A", json!({})).await.assert_error(400, "INVALID_REQUEST", None);
    assert_eq!(s.get("/api/v1/projects/p/env").await.json().as_array().unwrap().len(), 1);
    // At most 200 vars per project.
    for n in 1..200 {
        assert_eq!(s.put(&format!("/api/v1/projects/p/env/V{n}"), json!({"value": "v"})).await.status, 200);
    }
    s.put("/api/v1/projects/p/env/ONE_TOO_MANY", json!({"value": "v"})).await.assert_error(409, "CONFLICT", None);
    // Replacing one that exists is still fine.
    assert_eq!(s.put("/api/v1/projects/p/env/A", json!({"value": "w"})).await.status, 200);
}

/// `isocloud env set LD_PRELOAD=…` and friends: a 400 naming the field and
/// why, and nothing stored; the same call with an ordinary name (and the
/// allowed `NODE_ENV`) succeeds.
async fn env_names_that_change_deno_or_the_loader_are_refused(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("p").await;
    for allowed in ["GREETING", "NODE_ENV"] {
        let set = s.put(&format!("/api/v1/projects/p/env/{allowed}"), json!({"value": "/src/x.wasm"})).await;
        assert_eq!(set.status, 200, "{allowed}: {}", set.text);
    }
    for denied in ["LD_PRELOAD", "DENO_V8_FLAGS", "NODE_OPTIONS", "GCONV_PATH", "ld_preload"] {
        let reply = s.put(&format!("/api/v1/projects/p/env/{denied}"), json!({"value": "/src/x.wasm"})).await;
        reply.assert_error(400, "INVALID_FIELD", Some("name"));
        assert!(reply.text.contains("may not be set by a tenant"), "{denied}: {}", reply.text);
        assert!(reply.text.contains(denied), "{denied}: {}", reply.text);
    }
    let listed = s.get("/api/v1/projects/p/env").await.json();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["GREETING", "NODE_ENV"]);
}
