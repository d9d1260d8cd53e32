//! Blobs and deployments: uploads, the Deployment shape, every field rule,
//! env snapshots, ESZIP deployments, and that a refused deployment leaves
//! nothing behind.

use serde_json::{Value, json};

use crate::backend_tests;
use crate::support::{Backend, TestServer, sha256_hex};

backend_tests!(
    blobs_upload_and_missing,
    deployment_shape_and_listing,
    missing_blob_creates_nothing,
    fields_are_checked,
    env_is_snapshotted,
    eszip_deployments,
    files_are_listed_a_page_at_a_time
);

/// `GET /deployments/{id}/files`: paths and sizes in path order, paged by
/// the Link header; an unknown deployment is 404, a bad cursor named.
async fn files_are_listed_a_page_at_a_time(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("p").await;
    let files = [("main.ts", "// main\n"), ("static/b.txt", "bee"), ("static/a.txt", "a"), ("lib/x.ts", "export {};")];
    let d = s.deploy("p", &files, "main.ts", false).await;
    let id = d["id"].as_str().unwrap();

    let all = s.get(&format!("/api/v1/deployments/{id}/files")).await;
    assert_eq!(all.status, 200, "{}", all.text);
    assert!(all.headers.get("link").is_none());
    let mut want: Vec<(&str, &str)> = files.to_vec();
    want.sort();
    let expected: Vec<Value> = want
        .iter()
        .map(|(path, text)| {
            json!({"path": path, "size_bytes": text.len(), "sha256": sha256_hex(text.as_bytes()), "symlink_target": null})
        })
        .collect();
    assert_eq!(all.json(), Value::Array(expected.clone()));

    // Three at a time: the Link header's next page, then the last.
    let first = s.get(&format!("/api/v1/deployments/{id}/files?limit=3")).await;
    assert_eq!(first.json(), Value::Array(expected[..3].to_vec()));
    let link = first.headers["link"].to_str().unwrap().to_owned();
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    assert!(next.starts_with(&format!("/api/v1/deployments/{id}/files?limit=3&cursor=")), "{link}");
    let rest = s.get(next).await;
    assert_eq!(rest.json(), Value::Array(expected[3..].to_vec()));
    assert!(rest.headers.get("link").is_none());

    s.get("/api/v1/deployments/nosuchdeploy/files").await.assert_error(404, "NOT_FOUND", None);
    s.get(&format!("/api/v1/deployments/{id}/files?cursor=%%")).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("cursor"),
    );
    s.get(&format!("/api/v1/deployments/{id}/files?limit=0")).await.assert_error(400, "INVALID_FIELD", Some("limit"));
    s.get(&format!("/api/v1/deployments/{id}/files?other=1")).await.assert_error(400, "INVALID_FIELD", Some("other"));
}

async fn blobs_upload_and_missing(backend: Backend) {
    let s = TestServer::start(backend).await;
    let bytes = b"hello blob";
    let hash = sha256_hex(bytes);
    let put = |body: &'static [u8], hash: String| {
        s.send(s.client.put(s.url(&format!("/api/v1/blobs/{hash}"))).bearer_auth(&s.token).body(body))
    };
    let first = put(bytes, hash.clone()).await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(first.json(), json!({"hash": hash, "size": 10}));
    let again = put(bytes, hash.clone()).await;
    assert_eq!(again.status, 200, "{}", again.text);

    let other = sha256_hex(b"other");
    let mismatch = put(b"not other", other.clone()).await;
    mismatch.assert_error(400, "INVALID_FIELD", Some("hash"));
    assert!(mismatch.message().contains(&sha256_hex(b"not other")), "{}", mismatch.text);
    put(b"x", "ABC".into()).await.assert_error(400, "INVALID_FIELD", Some("hash"));
    put(b"x", hash.to_uppercase()).await.assert_error(400, "INVALID_FIELD", Some("hash"));

    let missing = s.post("/api/v1/blobs/missing", json!({"hashes": [hash, other, other]})).await;
    assert_eq!(missing.status, 200);
    assert_eq!(missing.json(), json!({"missing": [other], "max_blob_bytes": 1024 * 1024}));
    s.post("/api/v1/blobs/missing", json!({"hashes": [hash, "nope"]})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("hashes[1]"),
    );
    s.post("/api/v1/blobs/missing", json!({"hashes": "x"})).await.assert_error(400, "INVALID_REQUEST", Some("hashes"));
}

async fn deployment_shape_and_listing(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("hello").await;
    let main = "export default { fetch: () => new Response('hi') };";
    let logo = "<svg/>";
    let main_hash = s.upload(main.as_bytes()).await;
    let logo_hash = s.upload(logo.as_bytes()).await;
    let reply = s
        .post(
            "/api/v1/projects/hello/deployments",
            json!({
                "entrypoint": "./main.ts",
                "files": {
                    "main.ts": {"hash": main_hash, "size": main.len()},
                    "static/logo.svg": {"hash": logo_hash, "size": logo.len()},
                },
                "permissions": {"net": ["api.example.com", "db.example.com:5432"]},
                "git": {"commit": "a".repeat(40), "message": "first line\n\nbody", "branch": "main"},
            }),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    let d = reply.json();
    let id = d["id"].as_str().unwrap().to_owned();
    assert!(id.len() == 12 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{id}");
    assert_eq!(d["project"], "hello");
    assert_eq!(d["status"], "ready");
    assert_eq!(d["error"], Value::Null);
    assert_eq!(d["entrypoint"], "file:///src/main.ts");
    assert_eq!(d["url"], format!("http://hello-{id}.localhost:8080"));
    assert_eq!(d["production"], false);
    assert_eq!(d["git"], json!({"commit": "a".repeat(40), "message": "first line", "branch": "main"}));
    assert_eq!(d["env_names"], json!([]));
    assert_eq!(d["files"], 2);
    assert_eq!(d["size_bytes"], (main.len() + logo.len()) as u64);
    assert_eq!(s.get(&format!("/api/v1/deployments/{id}")).await.json(), d);
    assert_eq!(s.cp.resolve_host(&format!("hello-{id}.localhost")).unwrap().deployment_id, id);
    assert!(s.cp.resolve_host("hello.localhost").is_none(), "no production yet");

    let mut ids = vec![id];
    for n in 0..3 {
        ids.push(
            s.deploy("hello", &[("main.ts", &format!("// {n}"))], "main.ts", false).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        // Creation times are milliseconds; keep them apart.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let listed: Vec<String> = s
        .get("/api/v1/projects/hello/deployments")
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);
    let limited = s.get("/api/v1/projects/hello/deployments?limit=2").await.json();
    assert_eq!(limited.as_array().unwrap().len(), 2);
    assert_eq!(limited[0]["id"], newest_first[0].as_str());
    s.get("/api/v1/projects/nope/deployments").await.assert_error(404, "NOT_FOUND", None);
    s.post(
        "/api/v1/projects/nope/deployments",
        json!({"entrypoint": "main.ts", "files": {"main.ts": {"hash": main_hash, "size": main.len()}}}),
    )
    .await
    .assert_error(404, "NOT_FOUND", None);
}

async fn missing_blob_creates_nothing(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("hello").await;
    let present = s.upload(b"// main").await;
    let absent = sha256_hex(b"never uploaded");
    let absent_eszip = sha256_hex(b"no eszip either");
    let reply = s
        .post(
            "/api/v1/projects/hello/deployments",
            json!({
                "entrypoint": "main.ts",
                "files": {"main.ts": {"hash": present, "size": 7}, "a.txt": {"hash": absent, "size": 14}},
                "eszip": absent_eszip,
                "production": true,
            }),
        )
        .await;
    reply.assert_error(400, "MISSING_BLOBS", None);
    let mut missing: Vec<String> =
        reply.json()["error"]["missing"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_owned()).collect();
    missing.sort();
    let mut expected = vec![absent.clone(), absent_eszip];
    expected.sort();
    assert_eq!(missing, expected);
    assert_eq!(s.get("/api/v1/projects/hello/deployments").await.json(), json!([]));
    let project = s.get("/api/v1/projects/hello").await.json();
    assert_eq!(project["production_deployment_id"], Value::Null);
    assert!(s.cp.resolve_host("hello.localhost").is_none());
}

async fn fields_are_checked(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("p").await;
    let code = "// code";
    let hash = s.upload(code.as_bytes()).await;
    let file = json!({"hash": hash, "size": code.len()});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"entrypoint": "main.ts", "files": {}}), "files"),
        (json!({"entrypoint": "/abs.ts", "files": {"/abs.ts": file}}), "files./abs.ts"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file, "../x.ts": file}}), "files.../x.ts"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file, "a\\b.ts": file}}), "files.a\\b.ts"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file, "a//b.ts": file}}), "files.a//b.ts"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file, "a\u{0}.txt": file}}), "files.a\u{0}.txt"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file, "a#b.ts": file}}), "files.a#b.ts"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": {"hash": "xyz", "size": 7}}}), "files.main.ts.hash"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": {"hash": hash, "size": 8}}}), "files.main.ts.size"),
        (
            json!({"entrypoint": "main.ts", "files": {"main.ts": {"hash": hash, "size": 2_000_000}}}),
            "files.main.ts.size",
        ),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file, "main.ts/x.ts": file}}), "files.main.ts/x.ts"),
        (json!({"entrypoint": "other.ts", "files": {"main.ts": file}}), "entrypoint"),
        (json!({"entrypoint": "logo.svg", "files": {"main.ts": file, "logo.svg": file}}), "entrypoint"),
        (json!({"entrypoint": "../main.ts", "files": {"main.ts": file}}), "entrypoint"),
        (json!({"entrypoint": "", "files": {"main.ts": file}}), "entrypoint"),
        (json!({"entrypoint": "https://example.com/x.ts", "files": {"main.ts": file}}), "entrypoint"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "eszip": "nope"}), "eszip"),
        (
            json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "permissions": {"net": ["--allow-all"]}}),
            "permissions.net[0]",
        ),
        (
            json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "permissions": {"net": ["a,b"]}}),
            "permissions.net[0]",
        ),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "permissions": {"net": "all"}}), "permissions"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "permissions": {"run": true}}), "permissions"),
        (json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "permissions": true}), "permissions"),
        (
            json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "git": {"commit": "main", "branch": "main"}}),
            "git.commit",
        ),
        (
            json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "git": {"commit": "a".repeat(40), "branch": "-x"}}),
            "git.branch",
        ),
        (
            json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "git": {"commit": "a".repeat(40), "branch": "m", "message": "a\u{0}"}}),
            "git.message",
        ),
    ];
    for (body, field) in cases {
        let reply = s.post("/api/v1/projects/p/deployments", body.clone()).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text);
        assert_eq!(reply.code(), "INVALID_FIELD", "{body}: {}", reply.text);
        let got = reply.field().unwrap_or_default();
        assert!(got.starts_with(field), "{body}: field {got:?}, expected {field:?}: {}", reply.text);
        assert!(reply.message().starts_with(&got), "{body}: message does not name the field: {}", reply.text);
    }
    assert_eq!(s.get("/api/v1/projects/p/deployments").await.json(), json!([]));
    // Permissions given as the protocol allows are kept.
    for net in [json!(true), json!(false), json!([]), json!(["[::1]:8000"])] {
        let body = json!({"entrypoint": "main.ts", "files": {"main.ts": file}, "permissions": {"net": net}});
        assert_eq!(s.post("/api/v1/projects/p/deployments", body).await.status, 201);
    }
}

async fn env_is_snapshotted(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("p").await;
    assert_eq!(s.put("/api/v1/projects/p/env/GREETING", json!({"value": "one"})).await.status, 200);
    let first = s.deploy("p", &[("main.ts", "// a")], "main.ts", false).await;
    assert_eq!(s.put("/api/v1/projects/p/env/GREETING", json!({"value": "two"})).await.status, 200);
    assert_eq!(s.put("/api/v1/projects/p/env/API_KEY", json!({"value": "k"})).await.status, 200);
    let second = s.deploy("p", &[("main.ts", "// a")], "main.ts", false).await;
    assert_eq!(first["env_names"], json!(["GREETING"]));
    assert_eq!(second["env_names"], json!(["API_KEY", "GREETING"]));
    let origin = s.cp.origin();
    let boot = origin.boot(first["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(boot.config.envs().get("GREETING").map(String::as_str), Some("one"));
    assert_eq!(boot.config.envs().len(), 1);
    let boot = origin.boot(second["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(boot.config.envs().get("GREETING").map(String::as_str), Some("two"));
    assert_eq!(boot.config.envs().get("API_KEY").map(String::as_str), Some("k"));
    // Values never come back over the API.
    for path in ["/api/v1/projects/p/env", &format!("/api/v1/deployments/{}", second["id"].as_str().unwrap())] {
        let text = s.get(path).await.text;
        assert!(!text.contains("\"two\"") && !text.contains("\"k\""), "{path}: {text}");
    }
}

const ESZIP_V1: &str = r#"{"version": 1, "modules": {
  "file:///src/main.ts": {"Source": {"source": "import { greet } from './greet.js'; export default { fetch: () => new Response(greet()) };",
    "transpiled": null, "content_type": "application/typescript", "deps": ["file:///src/greet.js"]}},
  "file:///src/greet.js": {"Source": {"source": "export function greet() { return 'hi'; }",
    "transpiled": null, "content_type": "application/javascript", "deps": []}}
}}"#;

async fn eszip_deployments(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("p").await;
    let eszip = s.upload(ESZIP_V1.as_bytes()).await;
    let asset = "hello";
    let asset_hash = s.upload(asset.as_bytes()).await;
    let reply = s
        .post(
            "/api/v1/projects/p/deployments",
            json!({"entrypoint": "file:///src/main.ts", "eszip": eszip,
                   "files": {"static/a.txt": {"hash": asset_hash, "size": asset.len()}}}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    // The whole graph loads through the origin: ESZIP layer first.
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = isocloud_origin::DiskCache::open(cache_dir.path(), 1 << 20).unwrap();
    let origin = s.cp.origin();
    let loaded = isocloud_origin::load_deployment(origin.as_ref(), &cache, &id).await.unwrap();
    assert_eq!(loaded.config.layers()[0].id(), eszip);
    assert!(loaded.modules.keys().any(|u| u.as_str() == "file:///src/greet.js"));
    assert!(loaded.tree.resolve_file("/static/a.txt").is_some());

    // A relative entrypoint names the same module.
    let relative = s.post("/api/v1/projects/p/deployments", json!({"entrypoint": "main.ts", "eszip": eszip})).await;
    assert_eq!(relative.status, 201, "{}", relative.text);
    let absent =
        s.post("/api/v1/projects/p/deployments", json!({"entrypoint": "file:///src/other.ts", "eszip": eszip})).await;
    absent.assert_error(400, "INVALID_FIELD", Some("entrypoint"));
    let not_eszip = s.upload(b"definitely not an archive").await;
    let bad = s.post("/api/v1/projects/p/deployments", json!({"entrypoint": "main.ts", "eszip": not_eszip})).await;
    bad.assert_error(400, "INVALID_FIELD", Some("eszip"));
    assert_eq!(s.get("/api/v1/projects/p/deployments").await.json().as_array().unwrap().len(), 2);
}
