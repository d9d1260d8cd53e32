use std::collections::BTreeMap;

use bytes::Bytes;
use isocloud_model::{AssetTree, Deployment, ModuleFile};
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
        pid_namespace: false,
        isolate_uids: None,
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
        tree_error: None,
        tree_deferred: false,
        import_maps: Vec::new(),
        npm: None,
    }
}

/// `d` with `envs` as its config's envs (a config is made only by parsing).
fn with_envs(mut d: Deployment, envs: &[(&str, &str)]) -> Deployment {
    let envs: BTreeMap<&str, &str> = envs.iter().copied().collect();
    let json = serde_json::json!({
        "entrypoint": "file:///src/main.ts",
        "layers": [{ "kind": "eszip", "id": "x" }],
        "envs": envs,
    });
    d.config = IsolateConfig::from_json(json.to_string().as_bytes()).unwrap();
    d
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
fn custom_schemes_and_file_urls_with_a_host_get_places_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let d = deployment(
        &[
            ("netlify:bootstrap-stage2", ModuleKind::JavaScript, "bootstrap"),
            ("file://slug/v1/main.ts", ModuleKind::JavaScript, "slug main"),
            ("file:///v1/main.ts", ModuleKind::JavaScript, "hostless main"),
        ],
        &[],
    );
    let files =
        IsolateFiles::prepare(&dir.path().join("i"), &d, &policy(dir.path()), &dir.path().join("deno-dir/d"), None)
            .unwrap();
    let map = import_map(&files);
    let bootstrap = Url::parse(&map["netlify:bootstrap-stage2"]).unwrap().to_file_path().unwrap();
    assert!(bootstrap.starts_with(files.modules.join("scheme/netlify")), "{bootstrap:?}");
    assert_eq!(std::fs::read_to_string(bootstrap).unwrap(), "bootstrap");
    // The host is kept: file://slug/v1/main.ts and file:///v1/main.ts are two modules.
    assert_eq!(map["file://slug/"], Url::from_directory_path(files.modules.join("file-host/slug")).unwrap().as_str());
    assert_eq!(std::fs::read_to_string(files.modules.join("file-host/slug/v1/main.ts")).unwrap(), "slug main");
    assert_eq!(std::fs::read_to_string(files.modules.join("file/v1/main.ts")).unwrap(), "hostless main");
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

fn jailed_policy(dir: &Path) -> SandboxPolicy {
    SandboxPolicy { mount_namespace: true, ..policy(dir) }
}

#[test]
fn a_blank_isolate_takes_a_deployment_whose_modules_all_live_in_src() {
    let dir = tempfile::tempdir().unwrap();
    let policy = jailed_policy(dir.path());
    let blank = IsolateFiles::prepare_blank(&dir.path().join("i1"), &policy, None).unwrap();
    assert_eq!(import_map(&blank), BTreeMap::new());
    let bootstrap: serde_json::Value = serde_json::from_slice(&std::fs::read(&blank.bootstrap).unwrap()).unwrap();
    assert_eq!(bootstrap["prestart"], true);
    assert!(blank.deno_dir.starts_with(&blank.dir), "its own cache dir until it has a deployment");

    let d = with_envs(
        deployment(
            &[
                ("file:///src/main.ts", ModuleKind::JavaScript, "main"),
                ("file:///src/lib/data.json", ModuleKind::Json, "{}"),
            ],
            &[],
        ),
        &[("GREETING", "hi")],
    );
    assert_eq!(blank.fits_blank(&d), Ok(()));
    let deployment_deno_dir = policy.deno_dir.join("abc");
    let filled = blank.fill(&d, &deployment_deno_dir).unwrap();
    assert_eq!(std::fs::read_to_string(filled.src.join("main.ts")).unwrap(), "main");
    assert_eq!(std::fs::read_to_string(filled.src.join("lib/data.json")).unwrap(), "{}");
    // The isolate's cache dir became the deployment's.
    assert_eq!(filled.deno_dir, deployment_deno_dir);
    assert!(deployment_deno_dir.is_dir() && !blank.deno_dir.exists());
    let assignment = filled.assignment(&d);
    assert_eq!(assignment.entrypoint, "file:///src/main.ts");
    assert_eq!(assignment.envs, [("GREETING".to_owned(), "hi".to_owned())].into());

    // A second isolate of the same deployment keeps its own cache dir: the
    // deployment's exists already.
    let other = IsolateFiles::prepare_blank(&dir.path().join("i2"), &policy, None).unwrap();
    let filled = other.fill(&d, &deployment_deno_dir).unwrap();
    assert_eq!(filled.deno_dir, other.deno_dir);
}

#[test]
fn a_blank_isolate_refuses_what_needs_the_import_map() {
    let dir = tempfile::tempdir().unwrap();
    let jailed = IsolateFiles::prepare_blank(&dir.path().join("i1"), &jailed_policy(dir.path()), None).unwrap();
    let src_only = [("file:///src/main.ts", ModuleKind::JavaScript, "main")];
    let remote = deployment(&[src_only[0], ("https://deno.land/x/mod.ts", ModuleKind::JavaScript, "r")], &[]);
    assert_eq!(jailed.fits_blank(&remote), Err("a module needs the import map"));
    let query = deployment(&[src_only[0], ("file:///src/a.ts?v=1", ModuleKind::JavaScript, "q")], &[]);
    assert_eq!(jailed.fits_blank(&query), Err("a module needs the import map"));
    let redirected = deployment(&src_only, &[("file:///src/old.ts", "file:///src/main.ts")]);
    assert_eq!(jailed.fits_blank(&redirected), Err("the module graph has redirects"));
    // Envs never matter: no isolate starts with the tenant's.
    let tenant_envs =
        with_envs(deployment(&src_only, &[]), &[("NO_COLOR", "0"), ("HTTP_PROXY", "http://tenant.example:1")]);
    assert_eq!(jailed.fits_blank(&tenant_envs), Ok(()));
    assert!(jailed.fill(&remote, &dir.path().join("deno-dir/x")).is_err(), "fill checks again");

    let unjailed = IsolateFiles::prepare_blank(&dir.path().join("i2"), &policy(dir.path()), None).unwrap();
    assert_eq!(unjailed.fits_blank(&deployment(&src_only, &[])), Err("isolates have no mount namespace"));
}

#[test]
fn the_bootstrap_carries_the_tenants_envs_readable_by_the_isolate_alone() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = with_envs(
        deployment(&[("file:///src/main.ts", ModuleKind::JavaScript, "main")], &[]),
        &[("GREETING", "hi"), ("HTTP_PROXY", "http://tenant.example:1")],
    );
    let egress =
        EgressRoute { proxy_url: "http://isolate:secret@127.0.0.1:9".into(), proxy_authority: "127.0.0.1:9".into() };
    let files = IsolateFiles::prepare(
        &dir.path().join("i"),
        &d,
        &policy(dir.path()),
        &dir.path().join("deno-dir/d"),
        Some(&egress),
    )
    .unwrap();
    let bootstrap: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.bootstrap).unwrap()).unwrap();
    assert_eq!(bootstrap["envs"], serde_json::json!({"GREETING": "hi", "HTTP_PROXY": "http://tenant.example:1"}));
    assert_eq!(bootstrap["egress_probe"], "http://127.0.0.1:9/");
    assert!(!bootstrap.to_string().contains("secret"), "the proxy credential is only in deno's environment");
    assert_eq!(std::fs::metadata(&files.bootstrap).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn a_module_reading_import_meta_gets_the_origins_specifier_on_its_first_line() {
    let url = |s: &str| Url::parse(s).unwrap();
    let text = |c: std::borrow::Cow<'_, [u8]>| String::from_utf8(c.into_owned()).unwrap();
    let origin = url("file://slug/v1/main.ts");
    let written = "file:///isocloud/modules/file-host/slug/v1/main.ts";

    let source = b"console.log(import.meta.url);\nexport {};\n";
    let out = text(with_origin_meta(&origin, written, ModuleKind::JavaScript, source));
    let first = out.lines().next().unwrap();
    assert!(first.contains(r#"m.url="file://slug/v1/main.ts""#), "{first}");
    assert!(first.contains("m.filename=undefined"), "a file URL with a host names no local file: {first}");
    assert!(first.ends_with("console.log(import.meta.url);"), "the line numbers stay: {first}");
    assert_eq!(out.lines().count(), 2);

    let local = text(with_origin_meta(&url("file:///root/who.js"), written, ModuleKind::JavaScript, source));
    assert!(local.contains(r#"m.filename="/root/who.js";m.dirname="/root""#), "{local}");

    let hashbang = text(with_origin_meta(
        &origin,
        written,
        ModuleKind::JavaScript,
        b"#!/usr/bin/env -S deno run\nimport.meta.url;\n",
    ));
    assert!(hashbang.starts_with("#!/usr/bin/env -S deno run\n{const m=import.meta"), "{hashbang}");

    // Left alone: a module that never reads it (it may be CommonJS), JSON,
    // and a module that already runs under its own specifier.
    let plain = b"module.exports = 1;\n";
    assert!(matches!(with_origin_meta(&origin, written, ModuleKind::JavaScript, plain), std::borrow::Cow::Borrowed(_)));
    assert!(matches!(with_origin_meta(&origin, written, ModuleKind::Json, source), std::borrow::Cow::Borrowed(_)));
    let src = url("file:///src/main.ts");
    assert!(matches!(
        with_origin_meta(&src, "file:///src/main.ts", ModuleKind::JavaScript, source),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn the_harness_manifest_leaves_out_the_package_folders() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = deployment(&[("file:///src/main.ts", ModuleKind::JavaScript, "main")], &[]);
    d.tree = AssetTree::parse(
        br#"{"entries": {"": {"kind":"directory"}, "/main.ts": {"kind":"file","size":4,"hash":"a"},
            "/node_modules": {"kind":"directory"}, "/node_modules/hono": {"kind":"symlink","target":".deno/hono@4/node_modules/hono"},
            "/vendor": {"kind":"directory"}, "/vendor/jsr.io/x.ts": {"kind":"file","size":1,"hash":"b"},
            "/node_modules_not": {"kind":"file","size":1,"hash":"c"}}}"#,
    )
    .unwrap();
    let files =
        IsolateFiles::prepare(&dir.path().join("i"), &d, &policy(dir.path()), &dir.path().join("deno-dir/d"), None)
            .unwrap();
    let written = AssetTree::parse(&std::fs::read(&files.tree).unwrap()).expect("the harness reads an AssetTree");
    let paths: Vec<&str> = written.entries.keys().map(String::as_str).collect();
    assert_eq!(paths, ["", "/main.ts", "/node_modules_not"]);
    // A deferred tree, written when the harness asks, is the same.
    files.write_tree(&d.tree).unwrap();
    assert_eq!(AssetTree::parse(&std::fs::read(&files.tree).unwrap()).unwrap(), written);
}
