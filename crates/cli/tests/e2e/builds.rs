//! Builds end to end: `isocloud deploy` of real Deno apps through the real
//! `isocloud serve`, whose build step runs the pinned deno (`deno install`)
//! against the npm registry, and the runner then starts the isolate offline
//! from the build's output. An npm app with a `deno.json` import map, TSX
//! with `jsxImportSource` and a JSON import serves; a second deployment of
//! the same app stores no new blob; a syntax error, a missing package, a
//! loopback `https:` import and a registry that is down each fail the build
//! with the reason and the place, and the CLI exits non-zero.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::ControlPlaneServe;
use serde_json::Value;

/// Hono (npm) behind a `deno.json` import map (bare and `@/` specifiers),
/// server-side JSX from TSX, a JSON module, JSON request bodies.
fn write_hono_app(dir: &Path) {
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::write(
        dir.join("deno.json"),
        r#"{
  "imports": { "hono": "npm:hono@4", "hono/": "npm:/hono@4/", "@/": "./" },
  "compilerOptions": { "jsx": "react-jsx", "jsxImportSource": "hono/jsx" }
}
"#,
    )
    .unwrap();
    std::fs::write(dir.join("lib/who.ts"), "export const who = \"lib\";\n").unwrap();
    std::fs::write(dir.join("conf.json"), "{\"greeting\":\"hello\"}\n").unwrap();
    std::fs::write(
        dir.join("main.tsx"),
        r#"import { Hono } from "hono";
import { who } from "@/lib/who.ts";
import conf from "./conf.json" with { type: "json" };
const app = new Hono();
const Page = (props: { name: string }) => <h1>{conf.greeting} {props.name}</h1>;
app.get("/hello/:name", (c) => c.html(<Page name={c.req.param("name")} />));
app.post("/echo", async (c) => c.json({ who, got: await c.req.json() }));
Deno.serve(app.fetch);
"#,
    )
    .unwrap();
}

/// Runs the client; (success, stdout, stderr).
pub(crate) fn client(serve: &ControlPlaneServe, config: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_isocloud"))
        .args(args)
        .env("ISOCLOUD_CONFIG_DIR", config)
        .env("ISOCLOUD_URL", serve.control_url())
        .env("ISOCLOUD_TOKEN", serve.admin_token())
        .stdin(Stdio::null())
        .output()
        .expect("run the isocloud client");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The deployment URL's host: `deploy` prints the URL as its last line.
pub(crate) fn deployment_host(stdout: &str) -> String {
    let url = stdout.lines().last().expect("deploy printed a URL").trim();
    url.strip_prefix("http://").unwrap().split(':').next().unwrap().to_owned()
}

/// The deployment id in a deployment host (`<project>-<id>.localhost`).
pub(crate) fn deployment_id(host: &str) -> String {
    host.split('.').next().unwrap().rsplit('-').next().unwrap().to_owned()
}

async fn request(
    serve: &ControlPlaneServe,
    method: reqwest::Method,
    host: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let response = reqwest::Client::new()
        .request(method, format!("{}{path}", serve.public_url()))
        .header("host", host)
        .body(body.to_owned())
        .send()
        .await
        .expect("request to the runner");
    (response.status().as_u16(), response.text().await.unwrap())
}

pub(crate) async fn api_get(serve: &ControlPlaneServe, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/api/v1{path}", serve.control_url()))
        .bearer_auth(serve.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Files under `dir`, at any depth.
pub(crate) fn count_files(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            count += count_files(&entry.path());
        } else {
            count += 1;
        }
    }
    count
}

#[tokio::test]
async fn an_npm_app_with_deno_json_tsx_and_json_deploys_and_serves() {
    let serve = ControlPlaneServe::start(&[]);
    let config = tempfile::tempdir().unwrap();
    let app = tempfile::tempdir().unwrap();
    write_hono_app(app.path());
    let (ok, _, stderr) = client(&serve, config.path(), &["projects", "create", "hono"]);
    assert!(ok, "{stderr}");

    // main.tsx is found as the entrypoint; the build resolves Hono.
    let (ok, stdout, stderr) =
        client(&serve, config.path(), &["deploy", "--project", "hono", app.path().to_str().unwrap()]);
    assert!(ok, "the deploy failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("is ready"), "{stderr}");
    let host = deployment_host(&stdout);
    let (status, body) = request(&serve, reqwest::Method::GET, &host, "/hello/bob", "").await;
    assert_eq!((status, body.as_str()), (200, "<h1>hello bob</h1>"), "server-side JSX from TSX, a JSON import");
    let (status, body) = request(&serve, reqwest::Method::POST, &host, "/echo", r#"{"n":[1,2]}"#).await;
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed, serde_json::json!({ "who": "lib", "got": { "n": [1, 2] } }), "@/ mapped by deno.json");

    // The build's output is part of the deployment: npm's files and links.
    let id = deployment_id(&host);
    let deployment = api_get(&serve, &format!("/deployments/{id}")).await;
    assert_eq!(deployment["status"], "ready");
    assert!(deployment["files"].as_i64().unwrap() > 50, "node_modules is in the deployment: {deployment}");
    let build = api_get(&serve, &format!("/deployments/{id}/build")).await;
    assert_eq!(build["status"], "ready", "{build}");
    assert!(build["log"].is_string(), "a build log is kept: {build}");
    let packages: Vec<&str> = build["npm_packages"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(packages.len() == 1 && packages[0].starts_with("hono@4."), "the resolved npm packages: {build}");

    // The same app again: a new deployment, not one new blob.
    let blobs = serve.data_dir.path().join("blobs");
    let before = count_files(&blobs);
    let (ok, stdout, stderr) =
        client(&serve, config.path(), &["deploy", "--project", "hono", app.path().to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(count_files(&blobs), before, "the packages are stored once");
    let again = deployment_host(&stdout);
    assert_ne!(again, host);
    assert_eq!(request(&serve, reqwest::Method::GET, &again, "/hello/ann", "").await.1, "<h1>hello ann</h1>");
}

#[tokio::test]
async fn a_broken_app_fails_its_build_with_the_reason_and_never_serves() {
    let serve = ControlPlaneServe::start(&[]);
    let config = tempfile::tempdir().unwrap();
    assert!(client(&serve, config.path(), &["projects", "create", "broken"]).0);
    let app = tempfile::tempdir().unwrap();
    let deploy = |source: &str| {
        std::fs::write(app.path().join("main.ts"), source).unwrap();
        client(&serve, config.path(), &["deploy", "--project", "broken", "--prod", app.path().to_str().unwrap()])
    };

    // The probe works: a good app deploys and serves.
    let (ok, stdout, stderr) = deploy("Deno.serve(() => new Response(\"good\"));\n");
    assert!(ok, "{stdout}\n{stderr}");
    let good = deployment_host(&stdout);
    assert_eq!(request(&serve, reqwest::Method::GET, &good, "/", "").await, (200, "good".to_owned()));
    let good_id = deployment_id(&good);
    let (ok, _, stderr) = client(&serve, config.path(), &["logs", "--build", &good_id]);
    assert!(ok, "a good build's log prints and exits 0: {stderr}");

    for (source, expected) in [
        ("const x = ;\nDeno.serve(() => new Response(\"x\"));\n", vec!["SyntaxError", "file:///src/main.ts:1:11"]),
        (
            "import x from \"npm:isocloud-no-such-package-zz@1\";\nDeno.serve(() => new Response(String(x)));\n",
            vec!["isocloud-no-such-package-zz", "does not exist", "file:///src/main.ts:1"],
        ),
        (
            // A tenant's import must not reach the control plane's network.
            &format!(
                "import x from \"{}/api/v1/whoami\";\nDeno.serve(() => new Response(String(x)));\n",
                serve.control_url()
            ),
            vec!["Requires import access", "--build-allow-import"],
        ),
    ] {
        let (ok, stdout, stderr) = deploy(source);
        assert!(!ok, "a broken build must fail the deploy: {stdout}\n{stderr}");
        for needle in &expected {
            assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
        }
        assert!(!stderr.contains("run again with"), "deno's flag advice leaked: {stderr}");
        assert!(!stderr.contains("/builds/"), "a host path leaked: {stderr}");
        // The whole log, by the command the failure names.
        let id = stderr.split("deployment ").nth(1).and_then(|rest| rest.split(' ').next()).unwrap().to_owned();
        assert!(stderr.contains(&format!("isocloud logs --build {id}")), "{stderr}");
        let (ok, log, why) = client(&serve, config.path(), &["logs", "--build", &id]);
        assert!(!ok, "a failed build's log exits non-zero");
        assert!(log.contains(expected[0]) && why.contains("failed"), "{log}\n{why}");
    }

    // Failed deployments are listed as such, and production never moved.
    let list = api_get(&serve, "/projects/broken/deployments").await;
    let failed = list.as_array().unwrap().iter().filter(|d| d["status"] == "failed").count();
    assert_eq!(failed, 3, "{list}");
    let project = api_get(&serve, "/projects/broken").await;
    let production = project["production_deployment_id"].as_str().unwrap();
    assert!(good.contains(production), "production stays on the good deployment: {project}");
    assert_eq!(request(&serve, reqwest::Method::GET, "broken.localhost", "/", "").await.1, "good");
}

#[tokio::test]
async fn a_registry_that_is_down_fails_the_build_with_that_reason() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let registry = format!("http://{closed}/");
    let serve = ControlPlaneServe::start(&["--npm-registry", &registry]);
    let config = tempfile::tempdir().unwrap();
    assert!(client(&serve, config.path(), &["projects", "create", "offline"]).0);
    let app = tempfile::tempdir().unwrap();
    std::fs::write(
        app.path().join("main.ts"),
        "import { Hono } from \"npm:hono@4\";\nDeno.serve(new Hono().get(\"/\", (c) => c.text(\"x\")).fetch);\n",
    )
    .unwrap();
    let (ok, stdout, stderr) =
        client(&serve, config.path(), &["deploy", "--project", "offline", app.path().to_str().unwrap()]);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains(&closed.to_string()) && stderr.contains("hono"),
        "the registry and package are named:\n{stderr}"
    );
}

#[tokio::test]
async fn express_and_node_http_servers_serve_through_the_runner() {
    let serve = ControlPlaneServe::start(&[]);
    let config = tempfile::tempdir().unwrap();
    assert!(client(&serve, config.path(), &["projects", "create", "node"]).0);
    let (ok, _, stderr) = client(&serve, config.path(), &["env", "set", "--project", "node", "GREETING=hej"]);
    assert!(ok, "{stderr}");

    // Express from npm: app.listen(3000) and server.address() as Node apps
    // use them, JSON bodies, route params, process.env.
    let express = tempfile::tempdir().unwrap();
    std::fs::write(
        express.path().join("main.ts"),
        r#"import express from "npm:express@4";
const app = express();
app.use(express.json());
app.get("/users/:id", (req, res) => res.json({ id: req.params.id, url: req.url, greeting: process.env.GREETING ?? null }));
app.post("/echo", (req, res) => res.json(req.body));
const server = app.listen(3000, () => console.log(`express on ${server.address().port}`));
"#,
    )
    .unwrap();
    let (ok, stdout, stderr) =
        client(&serve, config.path(), &["deploy", "--project", "node", express.path().to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let host = deployment_host(&stdout);
    let (status, body) = request(&serve, reqwest::Method::GET, &host, "/users/42?x=1", "").await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body, serde_json::json!({ "id": "42", "url": "/users/42?x=1", "greeting": "hej" }));
    let response = reqwest::Client::new()
        .post(format!("{}/echo", serve.public_url()))
        .header("host", &host)
        .json(&serde_json::json!({ "list": [1, 2] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), serde_json::json!({ "list": [1, 2] }));

    // Koa: its own code never names http (its package does): the runner's
    // package store marks the set, and the harness takes listen() over.
    let koa = tempfile::tempdir().unwrap();
    std::fs::write(
        koa.path().join("main.ts"),
        "import Koa from \"npm:koa@2\";\nconst app = new Koa();\napp.use((ctx) => { ctx.body = `koa ${ctx.path}`; });\napp.listen(3000);\n",
    )
    .unwrap();
    let (ok, stdout, stderr) =
        client(&serve, config.path(), &["deploy", "--project", "node", koa.path().to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let host = deployment_host(&stdout);
    assert_eq!(request(&serve, reqwest::Method::GET, &host, "/k", "").await, (200, "koa /k".to_owned()));

    // A bare node:http server, no npm at all.
    let plain = tempfile::tempdir().unwrap();
    std::fs::write(
        plain.path().join("main.ts"),
        "import { createServer } from \"node:http\";\ncreateServer((req, res) => { res.writeHead(201, { \"content-type\": \"text/plain\" }); res.end(`node ${req.method} ${req.url}`); }).listen(8080);\n",
    )
    .unwrap();
    let (ok, stdout, stderr) =
        client(&serve, config.path(), &["deploy", "--project", "node", plain.path().to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let host = deployment_host(&stdout);
    assert_eq!(request(&serve, reqwest::Method::GET, &host, "/a?b", "").await, (201, "node GET /a?b".to_owned()));
}

#[tokio::test]
async fn apps_mode_builds_apps_that_import_packages_and_an_edit_fixes_a_broken_one() {
    let apps = crate::support::AppsDir::new();
    write_hono_app(&Path::new(apps.path()).join("hono"));
    apps.app("plain", &[("main.ts", "Deno.serve(() => new Response(\"plain\"));\n")]);
    apps.app("broken", &[("main.ts", "import { Hono } from \"npm:hono@4\";\nconst x = ;\n")]);
    let runner = apps.serve(&[]);

    // The probe: an app with nothing to build serves as before.
    assert_eq!(runner.get("plain.localhost", "/").await.text().await.unwrap(), "plain");
    // deno.json, npm, TSX: built on its first boot, then served.
    let response = runner.get("hono.localhost", "/hello/dev").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "<h1>hello dev</h1>");

    // A broken app answers with its build error, in the app's own names.
    let message = crate::support::expect_error(runner.get("broken.localhost", "/").await, 502, "BOOT_FAILED").await;
    assert!(message.contains("SyntaxError") && message.contains("file:///src/main.ts:2:11"), "{message}");
    assert!(!message.contains("app-builds"), "a host path leaked: {message}");
    // The fix takes effect on the next request: a new build, then it serves.
    std::fs::write(
        Path::new(apps.path()).join("broken/main.ts"),
        "import { Hono } from \"npm:hono@4\";\nDeno.serve(new Hono().get(\"/*\", (c) => c.text(\"fixed\")).fetch);\n",
    )
    .unwrap();
    assert_eq!(runner.get("broken.localhost", "/").await.text().await.unwrap(), "fixed");
}

#[tokio::test]
async fn a_build_reads_no_host_file_outside_its_work_copy() {
    let serve = ControlPlaneServe::start(&[]);
    let config = tempfile::tempdir().unwrap();
    assert!(client(&serve, config.path(), &["projects", "create", "snoop"]).0);
    // A file of the control plane's data dir (beside its database and
    // every tenant's blobs), readable by anyone who can reach it; deno's
    // syntax error would quote its line.
    let secret = format!("SECRET-{}", std::process::id());
    let planted = serve.data_dir.path().join("planted.ts");
    std::fs::write(&planted, format!("const token = \"{secret}\" +;\n")).unwrap();
    let app = tempfile::tempdir().unwrap();
    let import = format!("file://{}", planted.display());
    std::fs::write(
        app.path().join("main.ts"),
        format!("import \"{import}\";\nDeno.serve(() => new Response(\"x\"));\n"),
    )
    .unwrap();

    // The probe: an unconfined `deno install` of the same app reads it.
    let work = tempfile::tempdir().unwrap();
    std::fs::copy(app.path().join("main.ts"), work.path().join("main.ts")).unwrap();
    let output = Command::new(crate::support::repo_root().join(".isocloud/deno/bin/deno"))
        .args(["install", "--entrypoint", "main.ts"])
        .current_dir(work.path())
        .env("DENO_DIR", work.path().join("deno-dir"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains(&secret), "the probe must read the planted file");

    // The build cannot: the file is not in its root (and Landlock allows
    // nothing of the host's beyond the system folders).
    let (ok, stdout, stderr) =
        client(&serve, config.path(), &["deploy", "--project", "snoop", app.path().to_str().unwrap()]);
    assert!(!ok, "{stdout}");
    assert!(!stderr.contains(&secret), "the build read a host file: {stderr}");
    assert!(stderr.contains("planted.ts"), "the failure names the import: {stderr}");
}

#[tokio::test]
async fn a_never_seen_deployment_of_a_known_package_set_boots_on_an_isolate_started_with_it() {
    let serve = ControlPlaneServe::start(&["--prestarted-isolates", "1"]);
    let config = tempfile::tempdir().unwrap();
    assert!(client(&serve, config.path(), &["projects", "create", "warm"]).0);
    let mut hosts = Vec::new();
    for version in ["one", "two", "three"] {
        let app = tempfile::tempdir().unwrap();
        std::fs::write(
            app.path().join("main.ts"),
            format!("import {{ Hono }} from \"npm:hono@4\";\nDeno.serve(new Hono().get(\"/\", (c) => c.text(\"{version}\")).fetch);\n"),
        )
        .unwrap();
        let (ok, stdout, stderr) =
            client(&serve, config.path(), &["deploy", "--project", "warm", app.path().to_str().unwrap()]);
        assert!(ok, "{stdout}\n{stderr}");
        hosts.push((deployment_host(&stdout), version));
    }
    let series = |metrics: &str, name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0) as u64
    };
    let hits = |metrics: &str| series(metrics, r#"isocloud_prestarted_boots_total{result="hit"} "#);
    let waiting = |metrics: &str| series(metrics, "isocloud_prestarted_waiting ");
    // Isolates of other profiles (no packages) may wait already.
    let others = waiting(&serve.runner.metrics().await);
    // The first lays the set out and teaches the pool the profile.
    assert_eq!(request(&serve, reqwest::Method::GET, &hosts[0].0, "/", "").await, (200, "one".to_owned()));
    let before = hits(&serve.runner.metrics().await);
    // The others take isolates started with the set bound, once one waits.
    for (host, version) in &hosts[1..] {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while waiting(&serve.runner.metrics().await) <= others {
            if std::time::Instant::now() > deadline {
                let stderr = serve.runner.stderr();
                panic!(
                    "no isolate of the package set was pre-started:\n{}",
                    &stderr[stderr.len().saturating_sub(4000)..]
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(request(&serve, reqwest::Method::GET, host, "/", "").await, (200, version.to_string()));
    }
    assert_eq!(hits(&serve.runner.metrics().await), before + 2, "both took a pre-started isolate of the set");
}
