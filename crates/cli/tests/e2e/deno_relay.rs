//! Issue 18: a relay and an origin written for Deno's Subhosting protocol,
//! unchanged. The relay is shaped like Deno's example relay (`jose`-signed
//! HS256 JWTs with a `kid`, a 15-minute `exp`, an `rpc_root` claim, every
//! header forwarded; `tools/e2e/relay.mjs`, run by the pinned deno). The
//! origin has the traits of a production subhoster's: RPCs under
//! `/api/deno/v0/`, only `boot` answering (an ESZIP inline layer whose id
//! changes on every boot), `read_tree` and `layer` answering 500 (their
//! handler never matched) or `read_tree` slow, `report_activity` answering
//! 500. Its apps: an ESZIP built by `@deno/eszip` with a host-bearing base, a
//! renaming loader and an import map, and two Deploy-era servers
//! (`Deno.listen` + `Deno.serveHttp`) on the same port.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use serde_json::json;

use crate::support::*;

/// The port both Deploy-era tenants listen on (any number works).
const DEPLOY_ERA_PORT: u16 = 8931;
const RPC_PATH: &str = "/api/deno/v0/";

/// What the origin serves for one deployment: an entrypoint and the inline
/// layer (ESZIP or one JS module).
#[derive(Clone)]
struct App {
    entrypoint: String,
    eszip: bool,
    bytes: Bytes,
}

#[derive(Default)]
struct ZipperState {
    apps: Mutex<HashMap<String, App>>,
    boots: Mutex<Vec<String>>,
    /// `rpc deployment_id`, in arrival order.
    calls: Mutex<Vec<String>>,
    /// Deployments whose `read_tree` waits this long, then answers 500.
    slow_tree: Mutex<HashMap<String, Duration>>,
}

/// An origin with the traits of the one a production subhoster ran.
struct ZipperOrigin {
    addr: SocketAddr,
    state: Arc<ZipperState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ZipperOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ZipperOrigin {
    async fn start() -> Self {
        let state = Arc::new(ZipperState::default());
        let (addr, task) =
            serve_http(state.clone(), |state, request| async move { zipper_answer(&state, request).await }).await;
        Self { addr, state, task }
    }

    fn rpc_root(&self) -> String {
        format!("http://{}{RPC_PATH}", self.addr)
    }

    fn app(&self, id: &str, app: App) {
        self.state.apps.lock().unwrap().insert(id.to_owned(), app);
    }

    fn calls_to(&self, rpc: &str, deployment: &str) -> usize {
        let wanted = format!("{rpc} {deployment}");
        self.state.calls.lock().unwrap().iter().filter(|c| **c == wanted).count()
    }
}

fn status(code: u16, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
    response
}

async fn zipper_answer(state: &ZipperState, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let Some(rpc) = request.uri().path().strip_prefix(RPC_PATH).map(str::to_owned) else {
        return status(404, "not found");
    };
    let deployment = url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "deployment_id")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    state.calls.lock().unwrap().push(format!("{rpc} {deployment}"));
    // The runner signs every RPC as the subhoster.
    let token = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    if jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .is_err()
    {
        return status(401, "bad token");
    }
    match rpc.as_str() {
        "boot" => {
            let Some(app) = state.apps.lock().unwrap().get(&deployment).cloned() else {
                return status(404, "no such deployment");
            };
            let mut boots = state.boots.lock().unwrap();
            boots.push(deployment.clone());
            // A layer id of its own on every boot, as a builder that
            // bundles per request would give.
            let layer_id = format!("{deployment}-boot-{}", boots.len());
            let layer = if app.eszip {
                json!({ "kind": "eszip", "id": layer_id })
            } else {
                json!({ "kind": "bundle", "id": layer_id, "specifier": app.entrypoint })
            };
            let config = json!({
                "entrypoint": app.entrypoint,
                "layers": [layer],
                "inline_layer": layer_id,
                "permissions": { "net": false },
            });
            let mut response = Response::new(Full::new(app.bytes));
            response.headers_mut().insert("x-deno-config", config.to_string().parse().unwrap());
            response
        }
        "read_tree" => {
            let delay = state.slow_tree.lock().unwrap().get(&deployment).copied();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            status(500, "Internal Server Error")
        }
        // Their handlers never matched.
        _ => status(500, "Internal Server Error"),
    }
}

/// `tools/e2e/relay.mjs` run by the pinned deno; killed on drop.
struct Relay {
    child: Child,
    port: u16,
    _deno_dir: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    fn start(runner: &Runner, rpc_root: &str) -> Relay {
        let root = repo_root();
        assert!(
            root.join("tools/e2e/node_modules/jose").is_dir(),
            "tools/e2e/node_modules/jose is missing: run `npm ci --prefix tools/e2e` (scripts/test does)"
        );
        let deno_dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(deno_path())
            .args(["run", "--allow-net", "--allow-env", "--node-modules-dir=manual", "tools/e2e/relay.mjs"])
            .current_dir(&root)
            .env("DENO_DIR", deno_dir.path())
            .env("NO_COLOR", "1")
            .env("RUNNER_URL", format!("http://{}/", runner.addr))
            .env("SUBHOST_KID", KID)
            .env("SUBHOST_SECRET", SECRET)
            .env("RPC_ROOT", rpc_root)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("deno runs the relay");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("relay listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the relay did not start: {line:?}"));
        Relay { child, port, _deno_dir: deno_dir }
    }

    /// A request for `deployment` as a visitor of the subhoster sends it.
    fn request(&self, method: reqwest::Method, deployment: &str, path: &str) -> reqwest::RequestBuilder {
        let host = format!("{deployment}.relay.localhost");
        reqwest::Client::new().request(method, format!("http://127.0.0.1:{}{path}", self.port)).header("host", host)
    }

    async fn get_text(&self, deployment: &str, path: &str) -> String {
        let response = self.request(reqwest::Method::GET, deployment, path).send().await.unwrap();
        let code = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(code, 200, "{deployment}{path}: {body}");
        body
    }
}

/// The zipper-like app: an ESZIP whose modules live under
/// `file://zipper-app/v3/`, built by `@deno/eszip` with a loader that
/// renamed `.ts` to `.tsx` and an import map.
fn zipper_eszip() -> Vec<u8> {
    let app = tempfile::tempdir().unwrap();
    let write = |path: &str, text: &str| {
        let full = app.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, text).unwrap();
    };
    write("import_map.json", r#"{ "imports": { "greeting": "./lib/greeting.ts" } }"#);
    write("lib/greeting.ts", "export const greeting = (who: string): string => `hello ${who}`;\n");
    write(
        "main.ts",
        r#"import { greeting } from "greeting";
Deno.serve(async (request) => {
  if (new URL(request.url).pathname === "/file") {
    try {
      return new Response(await Deno.readTextFile("/src/data.txt"));
    } catch (e) {
      return new Response(`file error: ${e.name}`);
    }
  }
  return new Response(`${greeting("zipper")} from ${import.meta.url}`);
});
"#,
    );
    let base = "file://zipper-app/v3/";
    build_eszip_with_args(
        app.path(),
        "main.ts",
        &["--base", base, "--rename-ts-to-tsx", "--import-map", "file://zipper-app/v3/import_map.json"],
    )
}

/// A server written for Deno Deploy before `Deno.serve`.
fn deploy_era_app(name: &str) -> App {
    let source = format!(
        r#"const listener = Deno.listen({{ port: {DEPLOY_ERA_PORT} }});
for await (const conn of listener) {{
  (async () => {{
    for await (const {{ request, respondWith }} of Deno.serveHttp(conn)) {{
      const body = await request.text();
      await respondWith(new Response(`{name} ${{request.method}} ${{request.headers.get("x-visitor")}} ${{body}}`));
    }}
  }})();
}}
"#
    );
    App { entrypoint: format!("file:///src/{name}.js"), eszip: false, bytes: source.into() }
}

/// Sockets listening on `port` in the test's (the host's) network
/// namespace, from `/proc/net/tcp{,6}`.
fn host_listeners_on(port: u16) -> usize {
    let wanted = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&wanted) && fields[3] == "0A"
        })
        .count()
}

#[tokio::test]
async fn a_relay_and_an_origin_written_for_denos_protocol_serve_unchanged() {
    let origin = ZipperOrigin::start().await;
    origin.app(
        "zipper",
        App { entrypoint: "file://zipper-app/v3/main.ts".into(), eszip: true, bytes: zipper_eszip().into() },
    );
    origin.app("era-a", deploy_era_app("era-a"));
    origin.app("era-b", deploy_era_app("era-b"));
    let rpc_root = origin.rpc_root();
    let secret = format!("{KID}={SECRET}");
    let allowed = format!("{KID}={rpc_root}");
    let runner = Runner::start(&[
        "runner",
        "--rpc-root",
        "http://127.0.0.1:9/unused/",
        "--subhost-secret",
        &secret,
        "--allow-rpc-root",
        &allowed,
    ]);
    let relay = Relay::start(&runner, &rpc_root);

    // The ESZIP: bare import through the archive's import map, redirects of
    // the renaming loader, `import.meta.url` as the origin named the module.
    assert_eq!(relay.get_text("zipper", "/").await, "hello zipper from file://zipper-app/v3/main.tsx");
    assert_eq!(origin.calls_to("read_tree", "zipper"), 0, "a deployment that reads no file never asks for the tree");
    // Its tree answers 500: the file operation fails inside the isolate,
    // the isolate and the deployment keep serving.
    assert_eq!(relay.get_text("zipper", "/file").await, "file error: NotFound");
    assert_eq!(relay.get_text("zipper", "/").await, "hello zipper from file://zipper-app/v3/main.tsx");

    // A new boot gets a layer id never seen before; it boots from the inline
    // layer alone, and `layer` (which answers 500) is never called.
    let first = runner.isolate_pid("zipper").await;
    signal(first, libc::SIGKILL);
    wait_until("the killed isolate is gone", Duration::from_secs(10), || !process_alive(first)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = relay.request(reqwest::Method::GET, "zipper", "/").send().await.unwrap();
        if response.status() == 200 {
            assert_eq!(response.text().await.unwrap(), "hello zipper from file://zipper-app/v3/main.tsx");
            break;
        }
        assert!(Instant::now() < deadline, "no reboot after the isolate died: {}", response.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(origin.calls_to("boot", "zipper") >= 2, "{:?}", origin.state.calls.lock().unwrap());
    assert_eq!(origin.calls_to("layer", "zipper"), 0);

    // Two Deploy-era tenants on one port: each gets the relay's requests,
    // bodies and headers through, and nothing listens in the host's network.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let probe_port = probe.local_addr().unwrap().port();
    assert_eq!(host_listeners_on(probe_port), 1, "the probe: a host listener is seen");
    assert_eq!(host_listeners_on(DEPLOY_ERA_PORT), 0);
    for name in ["era-a", "era-b"] {
        let response = relay
            .request(reqwest::Method::POST, name, "/submit")
            .header("x-visitor", "v1")
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), format!("{name} POST v1 payload"));
    }
    let isolates = runner.isolates().await;
    assert!(
        ["era-a", "era-b"].iter().all(|d| isolates.iter().any(|i| i["deployment_id"] == *d)),
        "both tenants run: {isolates:?}"
    );
    assert_eq!(host_listeners_on(DEPLOY_ERA_PORT), 0, "a tenant's Deno.listen binds nothing on the host");

    // `report_activity` answers 500 throughout: serving never depended on it.
    wait_until("the runner reported activity", Duration::from_secs(15), || {
        origin.state.calls.lock().unwrap().iter().any(|c| c.starts_with("report_activity"))
    })
    .await;
    assert_eq!(relay.get_text("era-a", "/").await, "era-a GET null ");
}

#[tokio::test]
async fn a_slow_read_tree_delays_no_request_that_reads_no_file() {
    let origin = ZipperOrigin::start().await;
    origin.app(
        "zipper",
        App { entrypoint: "file://zipper-app/v3/main.ts".into(), eszip: true, bytes: zipper_eszip().into() },
    );
    origin.state.slow_tree.lock().unwrap().insert("zipper".into(), Duration::from_secs(3));
    let rpc_root = origin.rpc_root();
    let secret = format!("{KID}={SECRET}");
    let runner = Runner::start(&["runner", "--rpc-root", &rpc_root, "--subhost-secret", &secret]);
    let relay = Relay::start(&runner, &rpc_root);
    let started = Instant::now();
    assert_eq!(relay.get_text("zipper", "/").await, "hello zipper from file://zipper-app/v3/main.tsx");
    let first_request = started.elapsed();
    assert!(first_request < Duration::from_secs(2), "a read_tree of 3 s held the first request: {first_request:?}");
    // The file-reading request waits for the tree, then sees its failure.
    assert_eq!(relay.get_text("zipper", "/file").await, "file error: NotFound");
    assert_eq!(origin.calls_to("read_tree", "zipper"), 1);
}

/// An ESZIP whose modules import `npm:` packages, with the npm snapshot the
/// `eszip` crate writes (names and versions, no files), under `base`.
fn npm_eszip(base: &str, main: &str, snapshot: serde_json::Value) -> Vec<u8> {
    let app = tempfile::tempdir().unwrap();
    std::fs::write(app.path().join("main.ts"), main).unwrap();
    let snapshot_file = app.path().join("snapshot.json");
    std::fs::write(&snapshot_file, snapshot.to_string()).unwrap();
    build_eszip_with_args(app.path(), "main.ts", &["--base", base, "--npm-snapshot", snapshot_file.to_str().unwrap()])
}

/// Issue 12 item 5: the runner lays out an ESZIP's npm snapshot from its
/// `--npm-registry` (checked against the registry's integrity) into the
/// package store, once per distinct set.
#[tokio::test]
async fn an_eszip_with_an_npm_snapshot_boots_with_packages_from_the_runners_registry() {
    use crate::support::registry::TestRegistry;
    let registry = TestRegistry::start();
    // `a` (CommonJS) requires `b`; `@isocloud/scoped` is ES modules.
    crate::builds_registry::publish_npm_set(&registry);
    let main = "import greet from \"npm:a@^1\";\nimport { scoped } from \"npm:@isocloud/scoped@0.1\";\n\
                Deno.serve(() => new Response(`${greet(\"eszip\")} ${scoped}`));\n";
    let snapshot = json!({
        "roots": { "a@^1": "a@1.0.0", "@isocloud/scoped@0.1": "@isocloud/scoped@0.1.0" },
        "packages": { "a@1.0.0": { "b": "b@1.2.0" }, "b@1.2.0": {}, "@isocloud/scoped@0.1.0": {} },
    });
    let origin = ZipperOrigin::start().await;
    for (id, base) in [("npm-app", "file://npm-app/v1/"), ("npm-app-again", "file:///src/")] {
        let bytes = npm_eszip(base, main, snapshot.clone());
        origin.app(id, App { entrypoint: format!("{base}main.ts"), eszip: true, bytes: bytes.into() });
    }
    let ghost = json!({ "roots": { "ghost@^1": "ghost@1.0.0" }, "packages": { "ghost@1.0.0": {} } });
    let bytes = npm_eszip("file:///src/", "import \"npm:ghost@^1\";\nDeno.serve(() => new Response(\"x\"));\n", ghost);
    origin.app("ghost", App { entrypoint: "file:///src/main.ts".into(), eszip: true, bytes: bytes.into() });

    let rpc_root = origin.rpc_root();
    let secret = format!("{KID}={SECRET}");
    let npm_registry = registry.npm_url();
    let runner = Runner::start(&[
        "runner",
        "--rpc-root",
        &rpc_root,
        "--subhost-secret",
        &secret,
        "--npm-registry",
        &npm_registry,
    ]);
    let relay = Relay::start(&runner, &rpc_root);

    // CommonJS with a dependency, a scoped ES module: as `deno run` gives them.
    assert_eq!(relay.get_text("npm-app", "/").await, "HI ESZIP! scoped ok");
    let fetched = registry.requests();
    assert_eq!(fetched.iter().filter(|r| r.contains(".tgz")).count(), 3, "one tarball per package: {fetched:?}");

    // The same snapshot in another deployment, and a reboot: the set is laid
    // out once and shared; the registry is not asked again.
    assert_eq!(relay.get_text("npm-app-again", "/").await, "HI ESZIP! scoped ok");
    let pid = runner.isolate_pid("npm-app").await;
    signal(pid, libc::SIGKILL);
    wait_until("the killed isolate is gone", Duration::from_secs(10), || !process_alive(pid)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.request(reqwest::Method::GET, "npm-app", "/").send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "no reboot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(registry.requests(), fetched, "the package store served the second deployment and the reboot");

    // A package the registry lacks: the visitor hears which.
    let response = relay.request(reqwest::Method::GET, "ghost", "/").send().await.unwrap();
    let message = expect_error(response, 502, "MODULE_NOT_FOUND").await;
    assert!(message.contains("npm:ghost@1.0.0"), "{message}");
}
