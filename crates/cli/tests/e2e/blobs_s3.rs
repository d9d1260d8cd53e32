//! `isocloud serve --blob-store s3://…` against a real S3 server (Garage on
//! loopback, `scripts/install-s3`): the CLI deploys an app that the build
//! step builds, the runner serves it, and its blobs (the uploaded files and
//! what the build wrote) are in the bucket, none in the data dir; a restart
//! on the same database and bucket serves it again.

use std::path::Path;

use futures_util::StreamExt as _;
use isocloud_controlplane::blobs::test_s3::{REGION, TestS3};
use isocloud_controlplane::{BlobStore, S3BlobStore};
use sha2::{Digest, Sha256};

use crate::support::ControlPlaneServe;

const MAIN: &str = "import { greet } from \"./greet.ts\";\nDeno.serve(() => new Response(greet()));\n";
const GREET: &str = "export function greet() { return \"served from the bucket\"; }\n";

async fn get(serve: &ControlPlaneServe, host: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("{}/", serve.public_url()))
        .header("host", format!("{host}:{}", serve.runner.addr.port()))
        .send()
        .await
        .expect("request to the runner");
    (response.status().as_u16(), response.text().await.unwrap())
}

fn cli(serve: &ControlPlaneServe, config: &Path, args: &[&str]) -> String {
    crate::support::isocloud_cli(&serve.control_url(), &serve.admin_token(), config, args)
}

#[tokio::test]
async fn serve_keeps_blobs_in_the_bucket_and_serves_from_there() {
    let Some(s3) = TestS3::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let secret_file = work.path().join("s3-secret");
    std::fs::write(&secret_file, format!("{}\n", s3.secret_access_key)).unwrap();
    let url = s3.url("e2e/blobs");
    let flags = [
        "--blob-store",
        url.as_str(),
        "--blob-store-endpoint",
        s3.endpoint.as_str(),
        "--blob-store-region",
        REGION,
        "--blob-store-access-key-id",
        s3.access_key_id.as_str(),
        "--blob-store-secret-access-key-file",
        secret_file.to_str().unwrap(),
    ];
    let serve = ControlPlaneServe::start(&flags);
    assert!(serve.runner.stderr().contains("s3://isocloud-test/e2e/blobs"), "{}", serve.runner.stderr());

    let config = work.path().join("config");
    let app = work.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("main.ts"), MAIN).unwrap();
    std::fs::write(app.join("greet.ts"), GREET).unwrap();
    cli(&serve, &config, &["projects", "create", "bucketed"]);
    cli(&serve, &config, &["deploy", "--project", "bucketed", "--prod", app.to_str().unwrap()]);
    assert_eq!(get(&serve, "bucketed.localhost").await, (200, "served from the bucket".to_owned()));

    // The uploads are in the bucket under their hashes.
    let store = S3BlobStore::open(&s3.config("e2e/blobs"), std::time::Duration::from_secs(86_400)).await.unwrap();
    for content in [MAIN, GREET] {
        let hash = hex::encode(Sha256::digest(content.as_bytes()));
        assert_eq!(store.get(&hash).await.unwrap().as_deref(), Some(content.as_bytes()), "{hash}");
    }
    let listed: Vec<String> = store.list().map(|e| e.unwrap().hash).collect().await;
    assert!(listed.len() >= 2, "{listed:?}");
    // None in the data dir.
    let data = serve.data_dir.path();
    assert!(!data.join("blobs").exists(), "a blobs dir in {}", data.display());

    // A restart on the same database and bucket serves it again (a cold boot
    // reads every blob back from the bucket).
    let ControlPlaneServe { mut runner, data_dir, .. } = serve;
    runner.terminate(std::time::Duration::from_secs(10));
    drop(runner);
    let serve = ControlPlaneServe::start_in(data_dir, &flags);
    assert_eq!(get(&serve, "bucketed.localhost").await, (200, "served from the bucket".to_owned()));
    assert!(!serve.data_dir.path().join("blobs").exists());
}
