//! Row 8 of issue 21: a deployment manifest naming one path twice is
//! refused, naming the path (JSON allows the duplicate key; a map would
//! keep one entry silently, so what the client showed and what runs could
//! differ).

use serde_json::json;

use crate::backend_tests;
use crate::support::{Backend, TestServer};

backend_tests!(a_path_named_twice_is_refused);

async fn a_path_named_twice_is_refused(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("app").await;
    let shown = "export default { fetch: () => new Response('reviewed') };";
    let hidden = "export default { fetch: () => new Response('smuggled') };";
    let (shown_hash, hidden_hash) = (s.upload(shown.as_bytes()).await, s.upload(hidden.as_bytes()).await);
    let entry = |hash: &str, size: usize| format!(r#"{{"hash": "{hash}", "size": {size}}}"#);
    let manifest = |files: &str| format!(r#"{{"entrypoint": "main.ts", "files": {{{files}}}}}"#);
    let post = |body: String| {
        s.send(
            s.client
                .post(s.url("/api/v1/projects/app/deployments"))
                .bearer_auth(&s.token)
                .header("content-type", "application/json")
                .body(body),
        )
    };

    // The probe: the same manifest with each path once is accepted.
    let once = manifest(&format!(
        r#""main.ts": {}, "other.ts": {}"#,
        entry(&shown_hash, shown.len()),
        entry(&hidden_hash, hidden.len())
    ));
    let reply = post(once).await;
    assert_eq!(reply.status, 201, "{}", reply.text);

    // main.ts twice, also spelled with a JSON escape: 400 naming it.
    for second_name in ["main.ts", r"main\u002ets"] {
        let twice = manifest(&format!(
            r#""main.ts": {}, "{second_name}": {}"#,
            entry(&shown_hash, shown.len()),
            entry(&hidden_hash, hidden.len())
        ));
        let reply = post(twice).await;
        reply.assert_error(400, "INVALID_FIELD", Some("files.main.ts"));
        assert!(reply.message().contains("\"main.ts\" is named twice"), "{}", reply.text);
    }
    // Nothing was made of them.
    let list = s.get("/api/v1/projects/app/deployments").await.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["files"], json!(2));
}
