//! A restart on the same data dir and database keeps everything, and does
//! not make a new admin token.

use std::time::Duration;

use isocloud_controlplane::ControlPlane;
use serde_json::json;

use crate::backend_tests;
use crate::support::dns::DnsResponder;
use crate::support::{Backend, TestServer, eventually};

backend_tests!(everything_survives_a_restart, two_nodes_share_a_store);

async fn everything_survives_a_restart(backend: Backend) {
    let dns = DnsResponder::start().await;
    let addr = dns.addr;
    let s = TestServer::start_with(backend, move |o| o.dns_resolver = Some(addr)).await;
    let token_file = s.options.data_dir.join("admin-token");
    let token_before = std::fs::read_to_string(&token_file).unwrap();
    s.create_project("keep").await;
    s.put("/api/v1/projects/keep/env/A", json!({"value": "1"})).await;
    let d = s.deploy("keep", &[("main.ts", "// kept"), ("static/x.txt", "x")], "main.ts", true).await;
    let id = d["id"].as_str().unwrap().to_owned();
    let domain = s.post("/api/v1/domains", json!({"domain": "keep.example.com", "project": "keep"})).await.json();
    dns.set_txt("_isocloud-challenge.keep.example.com", domain["verification"]["txt_value"].as_str().unwrap());
    assert_eq!(s.post_empty("/api/v1/domains/keep.example.com/verify").await.json()["verified"], true);
    let cert = rcgen::generate_simple_self_signed(vec!["keep.example.com".to_owned()]).unwrap();
    let put = s
        .put(
            "/api/v1/domains/keep.example.com/certificate",
            json!({"cert_pem": cert.cert.pem(), "key_pem": cert.key_pair.serialize_pem()}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text);
    let batch = isocloud_origin::ActivityBatch {
        batch_id: "before-restart".into(),
        events: vec![
            serde_json::from_value(json!({"deployment_id": id, "timestamp": "2024-01-01T00:00:00Z",
            "type": "log", "level": "info", "message": "kept"}))
            .unwrap(),
        ],
    };
    s.cp.origin().report_activity(&id, &batch).await.unwrap();
    let project = s.get("/api/v1/projects/keep").await.json();
    let domains = s.get("/api/v1/domains").await.json();

    let (s, created) = s.restart().await;
    assert!(created.is_none(), "no new admin token on a store that has one");
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), token_before);
    // The old token still works, and everything is as it was.
    assert_eq!(s.get("/api/v1/projects/keep").await.json(), project);
    assert_eq!(s.get("/api/v1/domains").await.json(), domains);
    assert_eq!(s.get(&format!("/api/v1/deployments/{id}")).await.json(), d);
    assert_eq!(s.get("/api/v1/projects/keep/env").await.json().as_array().unwrap().len(), 1);
    assert_eq!(s.get("/api/v1/projects/keep/logs").await.json()[0]["message"], "kept");
    // The tables are loaded at start, before any change.
    assert_eq!(s.cp.resolve_host("keep.localhost").unwrap().deployment_id, id);
    let custom = s.cp.resolve_host("keep.example.com").unwrap();
    assert_eq!(custom.deployment_id, id);
    assert!(custom.has_certificate);
    assert!(s.cp.certificate_for("keep.example.com").is_some());
    // Blobs are still there, and the batch id still deduplicates.
    let boot = s.cp.origin().boot(&id).await.unwrap();
    assert_eq!(boot.config.envs().get("A").map(String::as_str), Some("1"));
    s.cp.origin().report_activity(&id, &batch).await.unwrap();
    assert_eq!(s.get("/api/v1/projects/keep/logs").await.json().as_array().unwrap().len(), 1);
    let tree = s.cp.origin().read_tree(&id).await.unwrap();
    let (_, _, hash) = tree.resolve_file("/static/x.txt").unwrap();
    assert_eq!(s.cp.origin().read_blob(&id, hash).await.unwrap(), "x".as_bytes());
}

/// A second control plane on the same database (and data dir, for the
/// blobs) picks up the first one's changes by itself, within seconds.
async fn two_nodes_share_a_store(backend: Backend) {
    let a = TestServer::start(backend).await;
    let b = ControlPlane::open(a.options.clone()).await.unwrap();
    assert!(b.created_admin_token().is_none());
    let background = tokio::spawn(b.clone().run_background());
    a.create_project("shared").await;
    let d = a.deploy("shared", &[("main.ts", "// shared")], "main.ts", true).await;
    let id = d["id"].as_str().unwrap().to_owned();
    let seen = eventually(Duration::from_secs(10), || async {
        b.resolve_host("shared.localhost").is_some_and(|r| r.deployment_id == id)
    })
    .await;
    assert!(seen, "node b never routed the new production");
    assert!(b.origin().boot(&id).await.is_ok());
    // Node b's writes are visible to node a.
    let batch = isocloud_origin::ActivityBatch {
        batch_id: "from-b".into(),
        events: vec![
            serde_json::from_value(json!({"deployment_id": id, "timestamp": "2024-01-01T00:00:00Z",
                "type": "log", "level": "info", "message": "via b"}))
            .unwrap(),
        ],
    };
    b.origin().report_activity(&id, &batch).await.unwrap();
    assert_eq!(a.get("/api/v1/projects/shared/logs").await.json()[0]["message"], "via b");
    // A rename and a second deployment reach node b as changes, not reloads.
    let second = a.deploy("shared", &[("main.ts", "// second")], "main.ts", false).await;
    let second = second["id"].as_str().unwrap().to_owned();
    a.patch("/api/v1/projects/shared", json!({"name": "joint"})).await;
    let moved = eventually(Duration::from_secs(10), || async {
        b.resolve_host("joint.localhost").is_some_and(|r| r.deployment_id == id)
            && b.resolve_host(&format!("joint-{second}.localhost")).is_some_and(|r| r.deployment_id == second)
            && b.resolve_host("shared.localhost").is_none()
    })
    .await;
    assert!(moved, "node b never followed the rename and the new deployment");
    a.delete("/api/v1/projects/joint").await;
    let gone = eventually(Duration::from_secs(10), || async {
        b.resolve_host("joint.localhost").is_none() && b.resolve_host(&format!("joint-{second}.localhost")).is_none()
    })
    .await;
    assert!(gone, "node b still routes a deleted project");
    background.abort();
}
