//! The control plane as the runner's origin: the boot config, layers, the
//! asset tree and blobs, straight from the store, and host routing.

use isocloud_origin::{AssetEntry, OriginError};
use isocloud_protocol::{LayerSpec, NetPermission};
use serde_json::json;

use crate::backend_tests;
use crate::support::{Backend, TestServer, sha256_hex};

backend_tests!(origin_answers, origin_refuses_foreign_hashes, origin_names_each_deployments_project, hosts_resolve);

const MAIN: &str = "import { greet } from './lib/greet.ts';\nexport default { fetch: () => new Response(greet()) };\n";
const GREET: &str = "export function greet() { return 'hi'; }\n";
const SAME: &str = "export const same = 1;\n";

async fn origin_answers(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("app").await;
    s.put("/api/v1/projects/app/env/GREETING", json!({"value": "hello"})).await;
    let files = [
        ("main.ts", MAIN),
        ("lib/greet.ts", GREET),
        ("a.js", SAME),
        ("b.js", SAME),
        ("data.json", "{\"a\": 1}"),
        ("static/hello.txt", "hello, asset"),
    ];
    let mut spec = serde_json::Map::new();
    for (path, content) in files {
        spec.insert(path.into(), json!({"hash": s.upload(content.as_bytes()).await, "size": content.len()}));
    }
    let reply = s
        .post(
            "/api/v1/projects/app/deployments",
            json!({"entrypoint": "main.ts", "files": spec, "permissions": {"net": ["api.example.com"]}}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let origin = s.cp.origin();
    assert_eq!(origin.name(), "controlplane");

    let boot = origin.boot(&id).await.unwrap();
    assert!(boot.inline_layer.is_empty());
    let config = boot.config;
    assert_eq!(config.entrypoint().as_str(), "file:///src/main.ts");
    assert_eq!(config.envs().get("GREETING").map(String::as_str), Some("hello"));
    assert_eq!(*config.net(), NetPermission::Allow(vec!["api.example.com".into()]));
    let bundles: Vec<(String, String)> = config
        .layers()
        .iter()
        .map(|layer| match layer {
            LayerSpec::Bundle { id, specifier } => (id.clone(), specifier.to_string()),
            LayerSpec::Eszip { .. } => panic!("no eszip layer"),
        })
        .collect();
    let specifiers: Vec<&str> = bundles.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        specifiers,
        [
            "file:///src/a.js",
            "file:///src/b.js",
            "file:///src/data.json",
            "file:///src/lib/greet.ts",
            "file:///src/main.ts"
        ]
    );
    // Identical files get distinct layer ids naming the same blob.
    assert_eq!(bundles[0].0, sha256_hex(SAME.as_bytes()));
    assert_ne!(bundles[0].0, bundles[1].0);
    for (layer_id, specifier) in &bundles {
        let bytes = origin.layer(&id, layer_id).await.unwrap();
        let path = specifier.trim_start_matches("file:///src/");
        let expected = files.iter().find(|(p, _)| *p == path).unwrap().1;
        assert_eq!(bytes, expected.as_bytes());
    }

    let tree = origin.read_tree(&id).await.unwrap();
    assert_eq!(tree.entries.get(""), Some(&AssetEntry::Directory));
    assert_eq!(tree.entries.get("/static"), Some(&AssetEntry::Directory));
    assert_eq!(tree.entries.get("/lib"), Some(&AssetEntry::Directory));
    let (_, size, hash) = tree.resolve_file("/static/hello.txt").unwrap();
    assert_eq!(size, 12);
    assert_eq!(origin.read_blob(&id, hash).await.unwrap(), "hello, asset".as_bytes());
    assert_eq!(tree.entries.len(), 3 + files.len());

    // The whole path the runner takes: boot, layers, merge, entrypoint.
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = isocloud_origin::DiskCache::open(cache_dir.path(), 1 << 20).unwrap();
    let loaded = isocloud_origin::load_deployment(origin.as_ref(), &cache, &id).await.unwrap();
    assert_eq!(loaded.modules.len(), 5);

    assert!(matches!(origin.boot("zzzzzzzzzzzz").await, Err(OriginError::DeploymentNotFound)));
    assert!(matches!(origin.boot("../../etc").await, Err(OriginError::DeploymentNotFound)));
    assert!(matches!(origin.read_tree("zzzzzzzzzzzz").await, Err(OriginError::DeploymentNotFound)));
}

/// The runner caps isolates per tenant; for the control plane a tenant is
/// a project, whichever of its deployments runs.
async fn origin_names_each_deployments_project(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("one").await;
    s.create_project("two").await;
    let first = s.deploy("one", &[("main.ts", "// first")], "main.ts", false).await;
    let second = s.deploy("one", &[("main.ts", "// second")], "main.ts", false).await;
    let theirs = s.deploy("two", &[("main.ts", "// theirs")], "main.ts", false).await;
    let origin = s.cp.origin();
    let tenant = |d: &serde_json::Value| origin.tenant_of(d["id"].as_str().unwrap());
    assert_eq!(tenant(&first), "controlplane/one");
    assert_eq!(tenant(&second), "controlplane/one");
    assert_eq!(tenant(&theirs), "controlplane/two");
    // Unknown to the routing table: it cannot boot, and is nobody's project.
    assert_eq!(origin.tenant_of("zzzzzzzzzzzz"), "controlplane");
}

async fn origin_refuses_foreign_hashes(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("one").await;
    s.create_project("two").await;
    let mine = s.deploy("one", &[("main.ts", "// mine"), ("secret.txt", "one's secret")], "main.ts", false).await;
    let theirs = s.deploy("two", &[("main.ts", "// theirs")], "main.ts", false).await;
    let mine = mine["id"].as_str().unwrap();
    let theirs = theirs["id"].as_str().unwrap();
    let secret = sha256_hex(b"one's secret");
    let origin = s.cp.origin();
    assert_eq!(origin.read_blob(mine, &secret).await.unwrap(), "one's secret".as_bytes());
    // The blob exists, but not in that deployment.
    assert!(matches!(origin.read_blob(theirs, &secret).await, Err(OriginError::AssetNotFound(_))));
    assert!(matches!(origin.layer(theirs, &secret).await, Err(OriginError::Layer { .. })));
    assert!(matches!(origin.layer(theirs, &format!("{secret}.1")).await, Err(OriginError::Layer { .. })));
    // Uploaded but in no deployment at all.
    let loose = s.upload(b"loose").await;
    assert!(origin.read_blob(mine, &loose).await.is_err());
    assert!(origin.read_blob(mine, "../../../etc/passwd").await.is_err());
    assert!(origin.read_blob("zzzzzzzzzzzz", &secret).await.is_err());
}

async fn hosts_resolve(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("my-app").await;
    let first = s.deploy("my-app", &[("main.ts", "// 1")], "main.ts", false).await;
    let first = first["id"].as_str().unwrap().to_owned();
    assert!(s.cp.resolve_host("my-app.localhost").is_none());
    assert_eq!(s.cp.resolve_host(&format!("my-app-{first}.localhost")).unwrap().deployment_id, first);
    s.post("/api/v1/projects/my-app/promote", json!({"deployment_id": first})).await;
    let prod = s.cp.resolve_host("my-app.localhost").unwrap();
    assert_eq!(prod.deployment_id, first);
    assert!(!prod.has_certificate);
    for host in ["localhost", "x.my-app.localhost", "nope.localhost", "my-app-zzzzzzzzzzzz.localhost", "example.com"] {
        assert!(s.cp.resolve_host(host).is_none(), "{host}");
    }
    // Renaming moves every host of the project.
    s.patch("/api/v1/projects/my-app", json!({"name": "renamed"})).await;
    assert!(s.cp.resolve_host("my-app.localhost").is_none());
    assert!(s.cp.resolve_host(&format!("my-app-{first}.localhost")).is_none());
    assert_eq!(s.cp.resolve_host("renamed.localhost").unwrap().deployment_id, first);
    assert_eq!(s.cp.resolve_host(&format!("renamed-{first}.localhost")).unwrap().deployment_id, first);
    let listed = s.get("/api/v1/projects/renamed/deployments").await.json();
    assert_eq!(listed[0]["url"], format!("http://renamed-{first}.localhost:8080"));
}
