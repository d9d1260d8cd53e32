//! Blob garbage collection against the real store, on the disk store and on
//! a real S3 server (Garage on loopback): what no deployment references is
//! deleted past the grace period; what a deployment references (a file, an
//! ESZIP), what was just uploaded, and what a client was just told is
//! stored are kept.

use std::time::Duration;

use isocloud_controlplane::blobs::test_s3::TestS3;
use serde_json::json;

use crate::backend_tests;
use crate::support::{Backend, TestServer, sha256_hex};

backend_tests!(collects_on_disk, collects_on_s3);

/// Short, so the test sees blobs age past it (S3 times are whole seconds).
const GRACE: Duration = Duration::from_secs(3);

const ESZIP_V1: &str = r#"{"version": 1, "modules": {
  "file:///src/main.ts": {"Source": {"source": "export default { fetch: () => new Response('hi') };",
    "transpiled": null, "content_type": "application/typescript", "deps": []}}
}}"#;

async fn collects_on_disk(backend: Backend) {
    collects(backend, None).await
}

async fn collects_on_s3(backend: Backend) {
    let Some(s3) = TestS3::start() else { return };
    collects(backend, Some(&s3)).await
}

async fn missing(s: &TestServer, hashes: &[&str]) -> Vec<String> {
    let reply = s.post("/api/v1/blobs/missing", json!({ "hashes": hashes })).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let mut missing: Vec<String> = serde_json::from_value(reply.json()["missing"].clone()).unwrap();
    missing.sort();
    missing
}

async fn collects(backend: Backend, s3: Option<&TestS3>) {
    let s = TestServer::start_with(backend, |o| {
        o.blob_gc_grace = GRACE;
        o.blob_store = s3.map(|s3| s3.config("gc"));
    })
    .await;
    s.create_project("keep").await;
    s.create_project("gone").await;
    // Referenced: a deployment's file, another's ESZIP.
    let kept = s.deploy("keep", &[("main.ts", "// kept")], "main.ts", true).await;
    let eszip = s.upload(ESZIP_V1.as_bytes()).await;
    let reply =
        s.post("/api/v1/projects/keep/deployments", json!({"entrypoint": "file:///src/main.ts", "eszip": eszip})).await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    // Referenced until its project goes.
    s.deploy("gone", &[("main.ts", "// goes with its project")], "main.ts", true).await;
    // Never referenced.
    let unreferenced = s.upload(b"uploaded, never deployed").await;
    let confirmed = s.upload(b"uploaded, confirmed again later").await;
    let (file, doomed) = (sha256_hex(b"// kept"), sha256_hex(b"// goes with its project"));

    // The probe: inside the grace period nothing goes.
    let first = s.cp.collect_blob_garbage().await.unwrap();
    assert_eq!((first.scanned, first.kept_recent, first.deleted), (5, 5, 0), "{first:?}");

    assert_eq!(s.delete("/api/v1/projects/gone").await.status, 204);
    tokio::time::sleep(GRACE + Duration::from_millis(1500)).await;
    let fresh = s.upload(b"just uploaded, deployment on its way").await;
    // A client about to deploy is told this old one is stored: it must stay.
    assert!(missing(&s, &[&confirmed]).await.is_empty());

    let report = s.cp.collect_blob_garbage().await.unwrap();
    assert_eq!(
        (report.scanned, report.deleted, report.kept_referenced, report.kept_recent),
        (6, 2, 2, 2),
        "deleted: the unreferenced and the deleted project's; kept: {file}, {eszip}, {fresh}, {confirmed}: {report:?}"
    );
    assert!(report.deleted_bytes > 0);
    let all = [file.as_str(), &eszip, &doomed, &unreferenced, &confirmed, &fresh];
    let mut expected = vec![doomed.clone(), unreferenced.clone()];
    expected.sort();
    assert_eq!(missing(&s, &all).await, expected);

    // What is kept still serves, through the origin.
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = isocloud_origin::DiskCache::open(cache_dir.path(), 1 << 20).unwrap();
    let id = kept["id"].as_str().unwrap();
    let loaded = isocloud_origin::load_deployment(s.cp.origin().as_ref(), &cache, id).await.unwrap();
    assert!(loaded.modules.keys().any(|u| u.as_str() == "file:///src/main.ts"));

    // Two nodes collecting at once: both passes succeed, nothing is left.
    let (a, b) = tokio::join!(s.cp.collect_blob_garbage(), s.cp.collect_blob_garbage());
    assert_eq!(a.unwrap().deleted + b.unwrap().deleted, 0);

    if let Some(s3) = s3 {
        // The bucket holds the four kept blobs and one marker (the confirmed
        // one's), nothing of the deleted ones; the data dir holds no blob.
        use futures_util::StreamExt as _;
        use object_store::ObjectStore as _;
        let keys: Vec<String> =
            s3.raw().list(Some(&"gc".into())).map(|meta| meta.unwrap().location.to_string()).collect().await;
        assert_eq!(keys.iter().filter(|k| !k.starts_with("gc/in-use/")).count(), 4, "{keys:?}");
        assert!(keys.iter().all(|k| !k.ends_with(&doomed[2..]) && !k.ends_with(&unreferenced[2..])), "{keys:?}");
        assert!(!s.options.data_dir.join("blobs").exists(), "no blobs in the data dir");
    }
}
