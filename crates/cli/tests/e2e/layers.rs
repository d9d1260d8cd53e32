//! Subhosting mode: layers fetched by RPC or carried inline, their priority
//! (earlier wins, across bundle and ESZIP kinds), ESZIP graphs built by
//! `@deno/eszip`, the on-disk layer cache, one boot for concurrent first
//! requests, and lazily fetched assets of a `read_tree` manifest.

use std::time::Duration;

use crate::support::*;
use serde_json::{Value, json};

/// A relay's request for `deployment_id` at this runner.
async fn subhost_get(runner: &Runner, deployment_id: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{}{path}", runner.addr))
        .header("x-deno-subhost", subhost_token(claims_for(deployment_id)))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("request to the runner")
}

/// The body of a 200 answer (with the runner's log when it is not a 200).
async fn ok_text(runner: &Runner, response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "body: {body}\nrunner log:\n{}", runner.stderr());
    body
}

fn calls_matching(origin: &TestOrigin, call: &str) -> usize {
    origin.calls().iter().filter(|c| *c == call).count()
}

#[tokio::test]
async fn a_bundle_layer_is_fetched_by_the_layer_rpc() {
    let origin = TestOrigin::start().await;
    origin.layer("main-v1", "Deno.serve((req) => new Response(`from a fetched layer ${new URL(req.url).pathname}`));");
    origin.deploy(
        "fetched",
        TestDeployment::config(json!({
            "entrypoint": "file:///src/main.js",
            "layers": [{ "kind": "bundle", "id": "main-v1", "specifier": "file:///src/main.js" }],
        })),
    );
    let runner = origin.runner(&[]);

    let body = ok_text(&runner, subhost_get(&runner, "fetched", "/hello").await).await;
    assert_eq!(body, "from a fetched layer /hello");
    assert_eq!(calls_matching(&origin, "boot fetched"), 1, "{:?}", origin.calls());
    assert_eq!(calls_matching(&origin, "layer fetched main-v1"), 1, "{:?}", origin.calls());
    assert!(origin.state.auth_failures.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_earlier_layer_wins_on_duplicate_specifiers() {
    let origin = TestOrigin::start().await;
    let main = r#"import { who } from "./dep.js"; Deno.serve(() => new Response(`dep from ${who}`));"#;
    origin.layer("main", main);
    origin.layer("dep-a", r#"export const who = "layer A";"#);
    origin.layer("dep-b", r#"export const who = "layer B";"#);
    let layers = |order: [&str; 2]| {
        let mut layers = vec![json!({ "kind": "bundle", "id": "main", "specifier": "file:///src/main.js" })];
        layers.extend(order.iter().map(|id| json!({ "kind": "bundle", "id": id, "specifier": "file:///src/dep.js" })));
        TestDeployment::config(json!({ "entrypoint": "file:///src/main.js", "layers": layers }))
    };
    origin.deploy("a-first", layers(["dep-a", "dep-b"]));
    origin.deploy("b-first", layers(["dep-b", "dep-a"]));
    let runner = origin.runner(&[]);

    assert_eq!(ok_text(&runner, subhost_get(&runner, "a-first", "/").await).await, "dep from layer A");
    assert_eq!(ok_text(&runner, subhost_get(&runner, "b-first", "/").await).await, "dep from layer B");
}

#[tokio::test]
async fn an_inline_layer_is_the_boot_body_and_never_fetched() {
    let origin = TestOrigin::start().await;
    origin.deploy("inline", TestDeployment::inline_js("Deno.serve(() => new Response('inline layer'));"));
    // Were the runner to ask for it, it would get something else.
    origin.layer("inline-main", "Deno.serve(() => new Response('fetched, not inline'));");
    let runner = origin.runner(&[]);

    assert_eq!(ok_text(&runner, subhost_get(&runner, "inline", "/").await).await, "inline layer");
    assert_eq!(origin.calls_to("boot"), 1, "{:?}", origin.calls());
    assert_eq!(origin.calls_to("layer"), 0, "{:?}", origin.calls());
}

#[tokio::test]
async fn a_deployment_that_reads_no_file_never_waits_for_the_tree() {
    let origin = TestOrigin::start().await;
    origin.deploy("fileless", TestDeployment::inline_js("Deno.serve(() => new Response('booted'));"));
    // An origin whose read_tree takes 3 s (or never matches the path).
    *origin.state.tree_delay.lock().unwrap() = Some(Duration::from_secs(3));
    let runner = origin.runner(&[]);

    let started = std::time::Instant::now();
    assert_eq!(ok_text(&runner, subhost_get(&runner, "fileless", "/").await).await, "booted");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the first request waited for the tree: {:?}",
        started.elapsed()
    );
    // Boot is the only RPC a deployment that touches no file needs.
    assert_eq!(origin.calls_to("read_tree"), 0, "{:?}", origin.calls());
    assert_eq!(origin.calls_to("boot"), 1, "{:?}", origin.calls());
}

#[tokio::test]
async fn when_boot_fails_the_user_hears_boots_reason_and_a_failed_tree_fails_no_boot() {
    let origin = TestOrigin::start().await;
    *origin.state.tree_status.lock().unwrap() = Some(500);
    // The tree fails at once; boot fails later, and says why better.
    *origin.state.boot_delay.lock().unwrap() = Some(Duration::from_millis(300));
    let runner = origin.runner(&[]);

    let message = expect_error(subhost_get(&runner, "no-such-deployment", "/").await, 502, "BOOT_FAILED").await;
    assert_eq!(message, "origin answered boot with HTTP 404");
    // Boot is the only required RPC: a deployment that boots serves without
    // its tree; a file read fails inside the isolate, and the origin hears why.
    origin.deploy(
        "treeless",
        TestDeployment::inline_js(
            "Deno.serve(async () => { try { await Deno.readTextFile('./a.txt'); return new Response('read'); } \
             catch (e) { return new Response(`served without files: ${e.name}`); } });",
        ),
    );
    let answer = ok_text(&runner, subhost_get(&runner, "treeless", "/").await).await;
    assert_eq!(answer, "served without files: NotFound");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = origin.activity_events();
        if events.iter().any(|e| e["message"].as_str().is_some_and(|m| m.contains("read_tree failed"))) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no read_tree event reached the origin: {events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TS app with a JS module, a JSON module and a remote module, as files.
fn eszip_app() -> (tempfile::TempDir, tempfile::TempDir) {
    let app = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let write = |root: &std::path::Path, path: &str, text: &str| {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, text).unwrap();
    };
    write(
        app.path(),
        "main.ts",
        r#"
import { double } from "./lib/math.js";
import data from "./data.json" with { type: "json" };
import { greet } from "https://deno.land/x/greet/mod.ts";

const answer: number = double(21);
Deno.serve(() => Response.json({ answer, data, greeting: greet("eszip") }));
"#,
    );
    write(app.path(), "lib/math.js", "export const double = (n) => n * 2;\n");
    write(app.path(), "data.json", r#"{ "name": "from json", "list": [1, 2, 3] }"#);
    write(
        remote.path(),
        "deno.land/x/greet/mod.ts",
        "export function greet(name: string): string { return `hello ${name} from deno.land`; }\n",
    );
    (app, remote)
}

#[tokio::test]
async fn an_eszip_layer_carries_ts_js_json_and_remote_modules() {
    let (app, remote) = eszip_app();
    let eszip = build_eszip(app.path(), "main.ts", Some(remote.path()));
    let origin = TestOrigin::start().await;
    origin.layer("app-eszip", eszip);
    origin.deploy(
        "eszip-app",
        TestDeployment::config(json!({
            "entrypoint": "file:///src/main.ts",
            "layers": [{ "kind": "eszip", "id": "app-eszip" }],
        })),
    );
    let runner = origin.runner(&[]);

    let body: Value = serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "eszip-app", "/").await).await)
        .expect("a JSON answer");
    assert_eq!(body["answer"], 42, "{body}");
    assert_eq!(body["data"], json!({ "name": "from json", "list": [1, 2, 3] }), "{body}");
    // The isolate has no network and deno runs with --no-remote: this module
    // can only have come from the layer.
    assert_eq!(body["greeting"], "hello eszip from deno.land", "{body}");
    assert_eq!(calls_matching(&origin, "layer eszip-app app-eszip"), 1, "{:?}", origin.calls());
}

#[tokio::test]
async fn priority_holds_across_eszip_and_bundle_layers() {
    let app = tempfile::tempdir().unwrap();
    std::fs::write(
        app.path().join("main.ts"),
        r#"
import { who } from "./dep.js";
// Not a static import: the ESZIP does not carry ./extra.js, a later layer does.
const extraPath = "./ex" + "tra.js";
const { extra } = await import(extraPath);
Deno.serve(() => Response.json({ dep: who, extra }));
"#,
    )
    .unwrap();
    std::fs::write(app.path().join("dep.js"), r#"export const who = "dep from the eszip";"#).unwrap();
    let eszip = build_eszip(app.path(), "main.ts", None);

    let origin = TestOrigin::start().await;
    origin.layer("app-eszip", eszip);
    origin.layer("dep-bundle", r#"export const who = "dep from the bundle";"#);
    origin.layer("extra-bundle", r#"export const extra = "extra from the bundle";"#);
    let eszip_layer = json!({ "kind": "eszip", "id": "app-eszip" });
    let dep_layer = json!({ "kind": "bundle", "id": "dep-bundle", "specifier": "file:///src/dep.js" });
    let extra_layer = json!({ "kind": "bundle", "id": "extra-bundle", "specifier": "file:///src/extra.js" });
    let deployment =
        |layers: Vec<&Value>| TestDeployment::config(json!({ "entrypoint": "file:///src/main.ts", "layers": layers }));
    origin.deploy("eszip-first", deployment(vec![&eszip_layer, &dep_layer, &extra_layer]));
    origin.deploy("bundle-first", deployment(vec![&dep_layer, &eszip_layer, &extra_layer]));
    let runner = origin.runner(&[]);

    let body: Value =
        serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "eszip-first", "/").await).await).unwrap();
    assert_eq!(body, json!({ "dep": "dep from the eszip", "extra": "extra from the bundle" }));
    let body: Value =
        serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "bundle-first", "/").await).await).unwrap();
    assert_eq!(body, json!({ "dep": "dep from the bundle", "extra": "extra from the bundle" }));
}

#[tokio::test]
async fn layers_are_cached_by_id_across_deployments_and_reboots() {
    let origin = TestOrigin::start().await;
    origin.layer("shared-lib", r#"export const lib = "shared lib v1";"#);
    for id in ["one", "two"] {
        let main = format!(
            r#"import {{ lib }} from "./lib.js"; Deno.serve(() => Response.json({{ id: "{id}", lib, pid: Deno.pid }}));"#
        );
        let mut deployment = TestDeployment::config(json!({
            "entrypoint": "file:///src/main.js",
            "layers": [
                { "kind": "bundle", "id": format!("main-{id}"), "specifier": "file:///src/main.js" },
                { "kind": "bundle", "id": "shared-lib", "specifier": "file:///src/lib.js" },
            ],
            "inline_layer": format!("main-{id}"),
        }));
        deployment.inline_body = main.into();
        origin.deploy(id, deployment);
    }
    let runner = origin.runner(&["--idle-timeout-s", "1"]);
    let shared_lib_fetches =
        || origin.calls().iter().filter(|c| c.starts_with("layer ") && c.ends_with(" shared-lib")).count();

    let first: Value = serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "one", "/").await).await).unwrap();
    assert_eq!(first["lib"], "shared lib v1");
    // In its own PID namespace deno is pid 1; the runner knows its host pid.
    assert_eq!(first["pid"], 1, "{first}");
    let first_pid = runner.isolate_pid("one").await;
    let second: Value = serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "two", "/").await).await).unwrap();
    assert_eq!(second["id"], "two");
    assert_eq!(second["lib"], "shared lib v1");
    assert_eq!(shared_lib_fetches(), 1, "{:?}", origin.calls());

    // Both go idle and are terminated; the next request boots again, from
    // the cached layer.
    wait_until("the idle isolates to be terminated", Duration::from_secs(15), || runner.isolate_pids().is_empty())
        .await;
    let again: Value = serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "one", "/").await).await).unwrap();
    assert_eq!(again["lib"], "shared lib v1");
    assert_eq!(again["pid"], 1, "{again}");
    assert_ne!(runner.isolate_pid("one").await, first_pid, "a new isolate serves after the idle termination");
    assert_eq!(calls_matching(&origin, "boot one"), 2, "{:?}", origin.calls());
    assert_eq!(shared_lib_fetches(), 1, "{:?}", origin.calls());
    assert_eq!(origin.calls_to("layer"), 1, "the inline layers are never fetched: {:?}", origin.calls());
}

#[tokio::test]
async fn concurrent_first_requests_share_one_boot() {
    let origin = TestOrigin::start().await;
    origin.deploy(
        "popular",
        TestDeployment::inline_js(
            // Which isolate answers: each is pid 1 of its own PID namespace.
            "const ISOLATE = crypto.randomUUID();\n\
             Deno.serve((req) => Response.json({ isolate: ISOLATE, pid: Deno.pid, path: new URL(req.url).pathname }));",
        ),
    );
    // A slow origin keeps the boot open while all requests arrive.
    *origin.state.boot_delay.lock().unwrap() = Some(Duration::from_millis(300));
    let runner = origin.runner(&[]);

    let requests = (0..20).map(|i| {
        let runner = &runner;
        async move {
            let body = ok_text(runner, subhost_get(runner, "popular", &format!("/r{i}")).await).await;
            serde_json::from_str::<Value>(&body).unwrap()
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    assert_eq!(answers.len(), 20);
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer["path"], format!("/r{i}"));
        assert_eq!(answer["isolate"], answers[0]["isolate"], "one isolate serves them all");
        assert_eq!(answer["pid"], 1, "deno is pid 1 of its own namespace: {answer}");
    }
    assert_eq!(origin.calls_to("boot"), 1, "{:?}", origin.calls());
    assert_eq!(runner.isolate_pids().len(), 1);
}

#[tokio::test]
async fn assets_of_the_manifest_are_fetched_lazily_and_read_only() {
    let origin = TestOrigin::start().await;
    let mut deployment = TestDeployment::inline_js(
        r#"
const attempt = async (f) => { try { return { ok: await f() }; } catch (e) { return { error: e.name }; } };
Deno.serve(async (req) => {
  switch (new URL(req.url).pathname) {
    case "/ping": return new Response("pong");
    case "/read": return Response.json({
      relative: await Deno.readTextFile("static/a.txt"),
      viaUrl: await Deno.readTextFile(new URL("./static/a.txt", import.meta.url)),
    });
    case "/link": return Response.json({
      absolute: await attempt(() => Deno.readTextFile("ln")),
      relative: await attempt(() => Deno.readTextFile("static/rel")),
      sync: await attempt(() => Deno.readTextFileSync("ln")),
      fetched: await attempt(async () => await (await fetch(new URL("./ln", import.meta.url))).text()),
      lstat: (await Deno.lstat("ln")).isSymlink,
    });
    case "/write": return Response.json(await attempt(() => Deno.writeTextFile("static/a.txt", "overwritten")));
    case "/missing": return Response.json(await attempt(() => Deno.readTextFile("static/nope.txt")));
  }
  return new Response("unknown", { status: 404 });
});
"#,
    );
    deployment.tree = Some(json!({ "entries": {
        "": { "kind": "directory" },
        "/static": { "kind": "directory" },
        "/static/a.txt": { "kind": "file", "size": 5, "hash": "blob-a" },
        "/static/b.txt": { "kind": "file", "size": 5, "hash": "blob-b" },
        "/static/rel": { "kind": "symlink", "target": "a.txt" },
        "/ln": { "kind": "symlink", "target": "/static/b.txt" },
    }}));
    origin.deploy("assets", deployment);
    origin.blob("blob-a", "alpha");
    origin.blob("blob-b", "bravo");
    let runner = origin.runner(&[]);
    let blob_reads = |id: &str| calls_matching(&origin, &format!("read_blob assets {id}"));

    assert_eq!(ok_text(&runner, subhost_get(&runner, "assets", "/ping").await).await, "pong");
    assert_eq!(origin.calls_to("read_tree"), 0, "the tree waits for a file operation: {:?}", origin.calls());
    assert_eq!(origin.calls_to("read_blob"), 0, "nothing is read at boot: {:?}", origin.calls());

    for _ in 0..2 {
        let read: Value =
            serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "assets", "/read").await).await).unwrap();
        assert_eq!(read, json!({ "relative": "alpha", "viaUrl": "alpha" }));
        assert_eq!(blob_reads("blob-a"), 1, "fetched once, on the first read: {:?}", origin.calls());
        assert_eq!(blob_reads("blob-b"), 0, "{:?}", origin.calls());
        assert_eq!(origin.calls_to("read_tree"), 1, "the tree, once, at the first file read: {:?}", origin.calls());
    }

    let link: Value =
        serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "assets", "/link").await).await).unwrap();
    assert_eq!(
        link,
        json!({
            "absolute": { "ok": "bravo" },
            "relative": { "ok": "alpha" },
            "sync": { "ok": "bravo" },
            "fetched": { "ok": "bravo" },
            "lstat": true,
        })
    );
    assert_eq!(blob_reads("blob-b"), 1, "{:?}", origin.calls());
    assert_eq!(blob_reads("blob-a"), 1, "{:?}", origin.calls());

    let write: Value =
        serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "assets", "/write").await).await).unwrap();
    assert_eq!(write, json!({ "error": "NotCapable" }));
    let read: Value =
        serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "assets", "/read").await).await).unwrap();
    assert_eq!(read["relative"], "alpha", "the failed write changed nothing");

    let missing: Value =
        serde_json::from_str(&ok_text(&runner, subhost_get(&runner, "assets", "/missing").await).await).unwrap();
    assert_eq!(missing, json!({ "error": "NotFound" }));
    assert_eq!(origin.calls_to("read_blob"), 2, "{:?}", origin.calls());
}

#[tokio::test]
async fn an_eszip_built_with_an_import_map_resolves_its_bare_imports_at_run_time() {
    let app = tempfile::tempdir().unwrap();
    let write = |path: &str, text: &str| {
        let full = app.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, text).unwrap();
    };
    write("import_map.json", r#"{ "imports": { "greeting": "./greeting.ts", "lib/": "./lib/" } }"#);
    write("greeting.ts", "export const greeting = \"hello\";\n");
    write("lib/who.ts", "export const who = \"from lib\";\n");
    write(
        "main.ts",
        "import { greeting } from \"greeting\";\nimport { who } from \"lib/who.ts\";\n\
         Deno.serve(() => new Response(`${greeting} ${who}`));\n",
    );
    let with_map = build_eszip_with_import_map(app.path(), "main.ts", None, Some("file:///src/import_map.json"));
    let origin = TestOrigin::start().await;
    origin.layer("mapped", with_map);
    origin.deploy(
        "mapped",
        TestDeployment::config(json!({
            "entrypoint": "file:///src/main.ts",
            "layers": [{ "kind": "eszip", "id": "mapped" }],
        })),
    );
    let runner = origin.runner(&[]);
    assert_eq!(ok_text(&runner, subhost_get(&runner, "mapped", "/").await).await, "hello from lib");
}

#[tokio::test]
async fn eszips_whose_modules_live_under_file_urls_with_a_host_serve_and_never_collide() {
    let origin = TestOrigin::start().await;
    for version in ["v1", "v2"] {
        let app = tempfile::tempdir().unwrap();
        std::fs::write(app.path().join("util.ts"), format!("export const who = \"slug {version}\";\n")).unwrap();
        std::fs::write(
            app.path().join("main.ts"),
            "import { who } from \"./util.ts\";\nDeno.serve(() => new Response(who));\n",
        )
        .unwrap();
        let base = format!("file://slug-{version}/{version}/");
        origin.layer(&format!("eszip-{version}"), build_eszip_at(app.path(), "main.ts", None, None, &base));
        origin.deploy(
            &format!("hosted-{version}"),
            TestDeployment::config(json!({
                "entrypoint": format!("{base}main.ts"),
                "layers": [{ "kind": "eszip", "id": format!("eszip-{version}") }],
            })),
        );
    }
    // Two layers in one deployment whose modules differ only by host.
    origin.deploy(
        "both",
        TestDeployment::config(json!({
            "entrypoint": "file://slug-v2/v2/main.ts",
            "layers": [{ "kind": "eszip", "id": "eszip-v1" }, { "kind": "eszip", "id": "eszip-v2" }],
        })),
    );
    let runner = origin.runner(&[]);
    assert_eq!(ok_text(&runner, subhost_get(&runner, "hosted-v1", "/").await).await, "slug v1");
    assert_eq!(ok_text(&runner, subhost_get(&runner, "hosted-v2", "/").await).await, "slug v2");
    assert_eq!(ok_text(&runner, subhost_get(&runner, "both", "/").await).await, "slug v2");
}

#[tokio::test]
async fn a_module_with_a_custom_scheme_is_the_entrypoint_it_names() {
    let origin = TestOrigin::start().await;
    origin.layer(
        "stage2",
        "import { who, whoUrl, whoFile } from \"file:///root/who.js\";\n\
         Deno.serve(() => new Response(`stage2 ${who} ${import.meta.url} ${whoUrl} ${whoFile}`));\n",
    );
    origin.layer(
        "who",
        "export const who = \"from /root\";\n\
         export const whoUrl = import.meta.url, whoFile = import.meta.filename;\n",
    );
    origin.deploy(
        "custom",
        TestDeployment::config(json!({
            "entrypoint": "netlify:bootstrap-stage2",
            "layers": [
                { "kind": "bundle", "id": "stage2", "specifier": "netlify:bootstrap-stage2" },
                { "kind": "bundle", "id": "who", "specifier": "file:///root/who.js" },
            ],
        })),
    );
    let runner = origin.runner(&[]);
    // `import.meta` is what the origin named, never where the runner wrote it.
    assert_eq!(
        ok_text(&runner, subhost_get(&runner, "custom", "/").await).await,
        "stage2 from /root netlify:bootstrap-stage2 file:///root/who.js /root/who.js"
    );
}

#[tokio::test]
async fn a_renaming_loaders_redirects_resolve_under_a_host_and_import_meta_is_the_origins() {
    let app = tempfile::tempdir().unwrap();
    std::fs::write(app.path().join("util.ts"), "export const utilUrl: string = import.meta.url;\n").unwrap();
    std::fs::write(
        app.path().join("main.ts"),
        "import { utilUrl } from \"./util.ts\";\n\
         const resolved = import.meta.resolve(\"./assets/logo.svg\");\n\
         Deno.serve(() => new Response([import.meta.url, utilUrl, resolved, String(import.meta.filename)].join(\" \")));\n",
    )
    .unwrap();
    let base = "file://zipper-app/v3/";
    let archive = build_eszip_with_args(app.path(), "main.ts", &["--base", base, "--rename-ts-to-tsx"]);
    assert!(
        String::from_utf8_lossy(&archive).contains("file://zipper-app/v3/util.tsx"),
        "the probe: the loader renamed the modules, so the archive holds redirects"
    );
    let origin = TestOrigin::start().await;
    origin.layer("renamed", archive);
    origin.deploy(
        "renamed",
        TestDeployment::config(json!({
            "entrypoint": format!("{base}main.ts"),
            "layers": [{ "kind": "eszip", "id": "renamed" }],
        })),
    );
    let runner = origin.runner(&[]);
    // As under Deno's ESZIP loader: a redirected module runs under its final
    // specifier, relative URLs resolve against it, and a file URL with a host
    // has no local file name.
    assert_eq!(
        ok_text(&runner, subhost_get(&runner, "renamed", "/").await).await,
        "file://zipper-app/v3/main.tsx file://zipper-app/v3/util.tsx file://zipper-app/v3/assets/logo.svg undefined"
    );
}
