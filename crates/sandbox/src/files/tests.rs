use std::collections::BTreeMap;

use bytes::Bytes;
use isocloud_origin::{AssetTree, Deployment, ModuleFile};
use isocloud_protocol::IsolateConfig;

use super::*;

fn policy(dir: &Path) -> SandboxPolicy {
    SandboxPolicy {
        deno: dir.join("deno"),
        harness_dir: dir.join("harness"),
        deno_dir: dir.join("deno-dir"),
        v8_heap_limit_mb: None,
        mount_namespace: false,
        network_namespace: false,
        isolate_ids: None,
        landlock: None,
        seccomp: None,
        rlimits: false,
    }
}

fn deployment(modules: &[(&str, ModuleKind, &str)], redirects: &[(&str, &str)]) -> Deployment {
    let config =
        IsolateConfig::from_json(br#"{"entrypoint":"file:///src/main.ts","layers":[{"kind":"eszip","id":"x"}]}"#)
            .unwrap();
    Deployment {
        deployment_id: "d".into(),
        config,
        modules: modules
            .iter()
            .map(|(s, kind, src)| {
                let specifier = Url::parse(s).unwrap();
                (specifier.clone(), ModuleFile { specifier, kind: *kind, source: Bytes::from(src.to_string()) })
            })
            .collect(),
        redirects: redirects.iter().map(|(a, b)| (Url::parse(a).unwrap(), Url::parse(b).unwrap())).collect(),
        tree: AssetTree::default(),
    }
}

fn import_map(files: &IsolateFiles) -> BTreeMap<String, String> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.import_map).unwrap()).unwrap();
    serde_json::from_value(json["imports"].clone()).unwrap()
}

#[test]
fn places_src_and_remote_modules_and_maps_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = deployment(
        &[
            ("file:///src/main.ts", ModuleKind::JavaScript, "main"),
            ("file:///src/lib/data.json", ModuleKind::Json, "{}"),
            ("https://deno.land/x/mod.ts", ModuleKind::JavaScript, "remote"),
            ("https://esm.sh/react?target=deno", ModuleKind::JavaScript, "react"),
        ],
        &[("https://deno.land/x/latest.ts", "https://deno.land/x/mod.ts")],
    );
    let files =
        IsolateFiles::prepare(&dir.path().join("i"), &d, &policy(dir.path()), &dir.path().join("deno-dir/d"), None)
            .unwrap();
    assert_eq!(std::fs::read_to_string(files.src.join("main.ts")).unwrap(), "main");
    assert_eq!(std::fs::read_to_string(files.src.join("lib/data.json")).unwrap(), "{}");
    let map = import_map(&files);
    let remote = files.modules.join("https/deno.land/x/mod.ts");
    assert_eq!(std::fs::read_to_string(&remote).unwrap(), "remote");
    assert_eq!(
        map["https://deno.land/"],
        Url::from_directory_path(files.modules.join("https/deno.land")).unwrap().as_str()
    );
    assert_eq!(map["https://deno.land/x/latest.ts"], Url::from_file_path(&remote).unwrap().as_str());
    let react = Url::parse(&map["https://esm.sh/react?target=deno"]).unwrap().to_file_path().unwrap();
    assert_eq!(std::fs::read_to_string(react).unwrap(), "react");
}

#[test]
fn refuses_asset_paths_that_escape() {
    let dir = tempfile::tempdir().unwrap();
    let d = deployment(&[("file:///src/main.ts", ModuleKind::JavaScript, "")], &[]);
    let files =
        IsolateFiles::prepare(&dir.path().join("i"), &d, &policy(dir.path()), &dir.path().join("deno-dir/d"), None)
            .unwrap();
    assert!(files.materialize_asset("/../../etc/x", b"x").is_err());
    assert!(files.materialize_asset("relative", b"x").is_err());
    let written = files.materialize_asset("/static/a.txt", b"hello").unwrap();
    assert_eq!(std::fs::read(written).unwrap(), b"hello");
}
