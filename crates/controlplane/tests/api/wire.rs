//! Every answer the client reads decodes as the `isocloud-api` type it is
//! declared as, with each field present (an absent field, `Option` or not,
//! fails the decode naming it), over real HTTP from a real store.

use isocloud_api as wire;
use isocloud_origin::ActivityBatch;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::backend_tests;
use crate::support::{Backend, Reply, TestServer};

backend_tests!(every_answer_decodes_as_its_wire_type);

/// The answer as `T`, asserting its status; a decode failure names the
/// field and where it is.
#[track_caller]
fn decode<T: DeserializeOwned>(reply: &Reply, status: u16) -> T {
    assert_eq!(reply.status, status, "{}", reply.text);
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&reply.text))
        .unwrap_or_else(|e| panic!("{} as {}: {e}", reply.text, std::any::type_name::<T>()))
}

async fn every_answer_decodes_as_its_wire_type(backend: Backend) {
    let s = TestServer::start(backend).await;
    let who: wire::Whoami = decode(&s.get("/api/v1/whoami").await, 200);
    assert!(!who.token_name.is_empty());

    // Projects: without and with production and git settings.
    let created: wire::Project = decode(&s.post("/api/v1/projects", json!({"name": "hello"})).await, 201);
    assert_eq!((created.production_url, created.git), (None, None));
    let main = "export default { fetch() { return new Response('hi') } }";
    let hash = s.upload(main.as_bytes()).await;
    let body = json!({
        "entrypoint": "main.ts",
        "files": {"main.ts": {"hash": hash, "size": main.len()}},
        "git": {"commit": "a".repeat(40), "message": "first line\n\nbody", "branch": "main"},
    });
    let deployed: wire::Deployment = decode(&s.post("/api/v1/projects/hello/deployments", body).await, 201);
    let git = deployed.git.as_ref().expect("git info");
    assert_eq!((git.message.as_str(), git.branch.as_str()), ("first line", "main"));
    let id = deployed.id.clone();
    let promoted: wire::Project =
        decode(&s.post("/api/v1/projects/hello/promote", json!({"deployment_id": id})).await, 200);
    assert_eq!(promoted.production_deployment_id.as_deref(), Some(id.as_str()));
    assert!(promoted.production_url.is_some());
    let settings = json!({"repository": "/srv/git/app.git", "branch": "main", "entrypoint": "main.ts",
        "secret": "a webhook secret of some length"});
    let with_git: wire::Project = decode(&s.put("/api/v1/projects/hello/git", settings).await, 200);
    assert_eq!(with_git.git.map(|g| g.repository).as_deref(), Some("/srv/git/app.git"));
    let listed: Vec<wire::Project> = decode(&s.get("/api/v1/projects").await, 200);
    assert_eq!(listed.len(), 1);
    let _: wire::Project = decode(&s.get("/api/v1/projects/hello").await, 200);

    // Deployments and their build.
    let got: wire::Deployment = decode(&s.get(&format!("/api/v1/deployments/{id}")).await, 200);
    assert_eq!(got, wire::Deployment { production: true, ..deployed });
    let listed: Vec<wire::Deployment> = decode(&s.get("/api/v1/projects/hello/deployments").await, 200);
    assert_eq!(listed.len(), 1);
    let build: wire::Build = decode(&s.get(&format!("/api/v1/deployments/{id}/build")).await, 200);
    assert_eq!((build.id.as_str(), build.status.as_str()), (id.as_str(), "ready"));

    // Env vars.
    let set: wire::EnvVar = decode(&s.put("/api/v1/projects/hello/env/API_KEY", json!({"value": "v"})).await, 200);
    assert_eq!(set.name, "API_KEY");
    let vars: Vec<wire::EnvVar> = decode(&s.get("/api/v1/projects/hello/env").await, 200);
    assert_eq!(vars, vec![set]);

    // Domains.
    let domain: wire::Domain =
        decode(&s.post("/api/v1/domains", json!({"domain": "www.example.com", "project": "hello"})).await, 201);
    assert_eq!((domain.verified, domain.certificate), (false, None));
    assert_eq!(domain.verification.txt_value, domain.verification.http_body);
    let detached: wire::Domain =
        decode(&s.patch("/api/v1/domains/www.example.com", json!({"project": null})).await, 200);
    assert_eq!(detached.project, None);
    let _: Vec<wire::Domain> = decode(&s.get("/api/v1/domains").await, 200);
    let _: wire::Domain = decode(&s.get("/api/v1/domains/www.example.com").await, 200);

    // Blobs.
    let missing: wire::MissingBlobs =
        decode(&s.post("/api/v1/blobs/missing", json!({"hashes": [hash, "b".repeat(64)]})).await, 200);
    assert_eq!(missing.missing, vec!["b".repeat(64)]);

    // Logs, usage and analytics, as the runner reports them.
    let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap();
    let events = [
        json!({"deployment_id": id, "timestamp": now, "type": "log", "level": "info", "message": "hi", "request_id": "r1"}),
        json!({"deployment_id": id, "timestamp": now, "type": "boot", "boot_ms": 5}),
        json!({"deployment_id": id, "timestamp": now, "type": "usage", "requests": 2, "cpu_ms": 1, "wall_ms": 1,
            "ingress_bytes": 1, "egress_bytes": 1, "peak_memory_bytes": 1, "interval_start": now, "interval_end": now}),
    ];
    let batch = ActivityBatch {
        batch_id: "wire".to_owned(),
        events: events.into_iter().map(|e| serde_json::from_value(e).expect("an activity event")).collect(),
    };
    s.cp.origin().report_activity(&id, &batch).await.unwrap();
    let logs: Vec<wire::LogEntry> = decode(&s.get("/api/v1/projects/hello/logs").await, 200);
    let kinds: Vec<(&str, Option<&str>)> = logs.iter().map(|l| (l.kind.as_str(), l.request_id.as_deref())).collect();
    assert_eq!(kinds, vec![("log", Some("r1")), ("boot", None)]);
    let _: Vec<wire::LogEntry> = decode(&s.get(&format!("/api/v1/deployments/{id}/logs")).await, 200);
    let usage: Vec<wire::Usage> = decode(&s.get("/api/v1/projects/hello/usage").await, 200);
    assert_eq!(usage.iter().map(|u| u.requests).sum::<i64>(), 2);
    let analytics: wire::Analytics = decode(&s.get("/api/v1/projects/hello/analytics").await, 200);
    assert_eq!(analytics.step_s, 60);
    assert_eq!(analytics.points.iter().map(|p| p.requests).sum::<i64>(), 2);
}
