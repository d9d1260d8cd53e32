//! Authentication, the error shape of every kind of bad request, and the
//! dashboard's static files.

use serde_json::json;

use crate::backend_tests;
use crate::support::{Backend, TestServer};

backend_tests!(
    tokens_are_required,
    bad_bodies_are_invalid_requests,
    routes_and_methods,
    bodies_over_the_bound,
    storage_failure_is_internal,
    dashboard_is_served
);

async fn tokens_are_required(backend: Backend) {
    let s = TestServer::start(backend).await;
    let whoami = s.get("/api/v1/whoami").await;
    assert_eq!(whoami.status, 200);
    let who = whoami.json();
    assert_eq!(
        (who["token_name"].clone(), who["scope"].clone(), who["project"].clone()),
        (json!("admin"), json!("admin"), serde_json::Value::Null)
    );

    let none = s.send(s.client.get(s.url("/api/v1/projects"))).await;
    none.assert_error(401, "UNAUTHORIZED", None);
    let wrong = s.send(s.client.get(s.url("/api/v1/projects")).bearer_auth("0".repeat(64))).await;
    wrong.assert_error(401, "UNAUTHORIZED", None);
    let basic = s.send(s.client.get(s.url("/api/v1/projects")).basic_auth("admin", Some(&s.token))).await;
    basic.assert_error(401, "UNAUTHORIZED", None);
    let empty = s.send(s.client.get(s.url("/api/v1/whoami")).header("authorization", "Bearer ")).await;
    empty.assert_error(401, "UNAUTHORIZED", None);
    // Mutations are refused before anything happens.
    let post = s.send(s.client.post(s.url("/api/v1/projects")).json(&json!({"name": "x"}))).await;
    post.assert_error(401, "UNAUTHORIZED", None);
    assert_eq!(s.get("/api/v1/projects").await.json(), json!([]));
    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    let path = s.options.data_dir.join("admin-token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(&s.options.data_dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    if matches!(s.backend, Backend::Sqlite) {
        // The database runs in WAL mode.
        assert!(s.options.data_dir.join("isocloud.db-wal").exists());
    }
}

async fn bad_bodies_are_invalid_requests(backend: Backend) {
    let s = TestServer::start(backend).await;
    let raw = |body: &'static str, content_type: &'static str| {
        s.send(
            s.client
                .post(s.url("/api/v1/projects"))
                .bearer_auth(&s.token)
                .header("content-type", content_type)
                .body(body),
        )
    };
    let not_json = raw("{name: hello", "application/json").await;
    not_json.assert_error(400, "INVALID_REQUEST", None);
    assert!(not_json.message().contains("not valid JSON"), "{}", not_json.text);
    raw("", "application/json").await.assert_error(400, "INVALID_REQUEST", None);
    raw("{\"name\": \"a\"} trailing", "application/json").await.assert_error(400, "INVALID_REQUEST", None);
    let text = raw("{\"name\": \"a\"}", "text/plain").await;
    text.assert_error(400, "INVALID_REQUEST", None);
    assert!(text.message().contains("content-type"), "{}", text.text);

    let wrong_type = s.post("/api/v1/projects", json!({"name": 5})).await;
    wrong_type.assert_error(400, "INVALID_REQUEST", Some("name"));
    let missing = s.post("/api/v1/projects", json!({})).await;
    missing.assert_error(400, "INVALID_REQUEST", None);
    assert!(missing.message().contains("name"), "{}", missing.text);
    let unknown = s.post("/api/v1/projects", json!({"name": "a", "colour": "red"})).await;
    unknown.assert_error(400, "INVALID_REQUEST", Some("colour"));
    assert!(unknown.message().contains("colour"), "{}", unknown.text);
    let array = s.post("/api/v1/projects", json!(["a"])).await;
    array.assert_error(400, "INVALID_REQUEST", None);
    // A nested shape error names its path.
    s.create_project("p").await;
    let nested = s
        .post(
            "/api/v1/projects/p/deployments",
            json!({"entrypoint": "main.ts", "files": {"main.ts": {"hash": 1, "size": 1}}}),
        )
        .await;
    nested.assert_error(400, "INVALID_REQUEST", Some("files.main.ts.hash"));
    // Bad query parameters name themselves.
    s.get("/api/v1/projects/p/deployments?limit=abc").await.assert_error(400, "INVALID_FIELD", Some("limit"));
    s.get("/api/v1/projects/p/deployments?limit=0").await.assert_error(400, "INVALID_FIELD", Some("limit"));
    s.get("/api/v1/projects/p/deployments?lmit=5").await.assert_error(400, "INVALID_FIELD", Some("lmit"));
    s.get("/api/v1/projects/p/deployments?limit=1&limit=2").await.assert_error(400, "INVALID_FIELD", Some("limit"));
    assert_eq!(s.get("/api/v1/projects").await.json().as_array().unwrap().len(), 1);
}

async fn routes_and_methods(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.get("/api/v1/nothing/here").await.assert_error(404, "NOT_FOUND", None);
    s.get("/api/v2/projects").await.assert_error(404, "NOT_FOUND", None);
    s.delete("/api/v1/projects").await.assert_error(405, "METHOD_NOT_ALLOWED", None);
    s.get("/api/v1/deployments/zzzzzzzzzzzz").await.assert_error(404, "NOT_FOUND", None);
    s.get("/api/v1/deployments/..%2F..%2Fetc").await.assert_error(404, "NOT_FOUND", None);
    s.get("/api/v1/domains/nope.example.com").await.assert_error(404, "NOT_FOUND", None);
}

/// Sends a request head declaring `content_length` body bytes and no body;
/// the status and body of the answer.
async fn declare_only(s: &TestServer, method: &str, path: &str, content_length: u64) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\n\
         content-length: {content_length}\r\n\r\n",
        s.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the JSON body of the answer is complete.
    while !String::from_utf8_lossy(&answer).contains("}}") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

async fn bodies_over_the_bound(backend: Backend) {
    let s = TestServer::start(backend).await;
    // JSON bodies: 16 MiB, refused on the declared length without reading.
    let (status, body) = declare_only(&s, "POST", "/api/v1/projects", 16 * 1024 * 1024 + 1).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("PAYLOAD_TOO_LARGE"), "{body}");
    // Blobs: the configured bound (1 MiB in these tests), declared or not.
    let blob = vec![7u8; 1024 * 1024 + 1];
    let hash = crate::support::sha256_hex(&blob);
    let (status, body) = declare_only(&s, "PUT", &format!("/api/v1/blobs/{hash}"), blob.len() as u64).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("PAYLOAD_TOO_LARGE"), "{body}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = blob.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let streamed = s
        .send(
            s.client
                .put(s.url(&format!("/api/v1/blobs/{hash}")))
                .bearer_auth(&s.token)
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))),
        )
        .await;
    streamed.assert_error(413, "PAYLOAD_TOO_LARGE", None);
    let missing = s.post("/api/v1/blobs/missing", json!({"hashes": [hash]})).await;
    assert_eq!(missing.json()["missing"], json!([hash]));
    // At the bound exactly, it fits.
    let fits = vec![7u8; 1024 * 1024];
    s.upload(&fits).await;
}

async fn storage_failure_is_internal(backend: Backend) {
    let s = TestServer::start(backend).await;
    // Break the blob store under the running control plane.
    let tmp = s.options.data_dir.join("blobs/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let hash = crate::support::sha256_hex(b"x");
    let reply = s.send(s.client.put(s.url(&format!("/api/v1/blobs/{hash}"))).bearer_auth(&s.token).body("x")).await;
    reply.assert_error(500, "INTERNAL", None);
    // The client learns nothing of the server's paths.
    assert!(!reply.text.contains("blobs/tmp"), "{}", reply.text);
}

async fn dashboard_is_served(backend: Backend) {
    let s = TestServer::start(backend).await;
    for (path, content_type, needle) in [
        ("/", "text/html", "<html"),
        ("/app.js", "text/javascript", ""),
        ("/style.css", "text/css", ""),
        ("/projects/hello/logs", "text/html", "<html"),
    ] {
        let reply = s.send(s.client.get(s.url(path))).await;
        assert_eq!(reply.status, 200, "{path}");
        let got = reply.headers["content-type"].to_str().unwrap();
        assert!(got.starts_with(content_type), "{path}: {got}");
        assert!(reply.text.contains(needle), "{path}");
        assert!(reply.headers.contains_key("content-security-policy"), "{path}");
    }
    s.send(s.client.get(s.url("/api/anything"))).await.assert_error(404, "NOT_FOUND", None);
}
