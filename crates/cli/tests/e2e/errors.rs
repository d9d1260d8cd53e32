//! Every control-plane error code end to end in subhosting mode (protocol §2, §3, §6): status, the code in
//! the JSON body and in `x-isocloud-error`, a message naming the problem, and a runner that keeps serving
//! its healthy deployments — plus the tenant's own 5xx answers, which must pass through untouched.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{Value, json};

const HEALTHY: &str = "Deno.serve(() => new Response('healthy'));";

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// GET `path` of `deployment` through the runner, as a relay would send it.
async fn get(runner: &Runner, deployment: &str, path: &str) -> reqwest::Response {
    runner.subhost_get(deployment, path).await
}

async fn text(runner: &Runner, deployment: &str, path: &str) -> String {
    let response = get(runner, deployment, path).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{deployment}{path}: {body}\nrunner log:\n{}", runner.stderr());
    body
}

/// The host pid of `deployment`'s isolate, after `path` showed it serves and
/// answers `Deno.pid`: 1, in its own PID namespace.
async fn host_pid(runner: &Runner, deployment: &str, path: &str) -> u32 {
    assert_eq!(text(runner, deployment, path).await, "1", "deno is pid 1 of its own namespace");
    runner.isolate_pid(deployment).await
}

/// The 502 of a control-plane failure; returns the message.
async fn control_plane_error(runner: &Runner, deployment: &str, code: &str) -> String {
    let message = expect_error(get(runner, deployment, "/").await, 502, code).await;
    assert!(!message.is_empty(), "{deployment}: {code} without a message");
    assert_no_host_paths(runner, &message);
    message
}

/// Protocol §3: the host's own paths never show through — not even in an error.
fn assert_no_host_paths(runner: &Runner, message: &str) {
    let state_dir = runner.state_dir.path();
    let canonical = state_dir.canonicalize().unwrap();
    for dir in [state_dir, canonical.as_path()] {
        let dir = dir.to_str().unwrap();
        assert!(!message.contains(dir), "the message shows the runner's state dir {dir}: {message:?}");
    }
}

/// The runner survived: its healthy deployment still answers.
async fn assert_still_serving(runner: &Runner) {
    assert_eq!(text(runner, "healthy", "/").await, "healthy");
}

fn assert_mentions(message: &str, fragments: &[&str]) {
    for fragment in fragments {
        assert!(message.contains(fragment), "message {message:?} should mention {fragment:?}");
    }
}

/// An origin with the healthy deployment, and a runner in front of it.
async fn origin_and_runner(extra: &[&str]) -> (TestOrigin, Runner) {
    let origin = TestOrigin::start().await;
    origin.deploy("healthy", TestDeployment::inline_js(HEALTHY));
    let runner = origin.runner(extra);
    (origin, runner)
}

/// Several nodes of one origin (a control plane's origin listeners): a
/// root that takes no connection hands each RPC to the next root named.
#[tokio::test]
async fn a_root_that_takes_no_connection_hands_the_rpcs_to_the_fallback_root() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_root = format!("http://{}/v0/", closed.local_addr().unwrap());
    drop(closed);
    let origin = TestOrigin::start().await;
    origin
        .deploy("healthy", TestDeployment::inline_js("console.log('up');\nDeno.serve(() => new Response('healthy'));"));
    let secret = format!("{KID}={SECRET}");
    // The probe: the dead root alone boots nothing.
    let alone = Runner::start(&["runner", "--rpc-root", &dead_root, "--subhost-secret", &secret]);
    control_plane_error(&alone, "healthy", "ORIGIN_UNREACHABLE").await;

    let live_root = origin.rpc_root();
    let runner = Runner::start(&[
        "runner",
        "--rpc-root",
        &dead_root,
        "--rpc-root-fallback",
        &live_root,
        "--subhost-secret",
        &secret,
        "--usage-interval-s",
        "1",
    ]);
    assert_eq!(text(&runner, "healthy", "/").await, "healthy");
    assert!(origin.fetch_calls().iter().any(|c| c.starts_with("boot")), "{:?}", origin.fetch_calls());
    // The isolate's activity reaches the origin through the same root.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !origin.activity_events().iter().any(|e| e["message"] == "up") {
        assert!(Instant::now() < deadline, "no activity at the fallback root: {:?}", origin.activity_events());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(runner.stderr().contains("its next root answered"), "{}", runner.stderr());
}

#[tokio::test]
async fn an_unreachable_origin_is_502_origin_unreachable() {
    // A loopback port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_root = format!("http://{}/v0/", closed.local_addr().unwrap());
    drop(closed);
    // The healthy deployment lives at a real origin the tokens may aim at.
    let origin = TestOrigin::start().await;
    origin.deploy("healthy", TestDeployment::inline_js(HEALTHY));
    let secret = format!("{KID}={SECRET}");
    let live_root = origin.rpc_root();
    let allowed = format!("{KID}={live_root}");
    let runner =
        Runner::start(&["runner", "--rpc-root", &dead_root, "--subhost-secret", &secret, "--allow-rpc-root", &allowed]);

    let started = Instant::now();
    let message = control_plane_error(&runner, "anything", "ORIGIN_UNREACHABLE").await;
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_mentions(&message.to_lowercase(), &["unreachable"]);
    // How the connection failed is the operator's to read (the log), not a visitor's.
    assert!(!message.contains("refused") && !message.contains("os error"), "{message}");
    // Still unreachable the second time: nothing was cached from the failure.
    control_plane_error(&runner, "anything", "ORIGIN_UNREACHABLE").await;

    let now = now_s();
    let token =
        subhost_token(json!({ "deployment_id": "healthy", "iat": now, "exp": now + 300, "rpc_root": live_root }));
    let response =
        client().get(format!("http://{}/", runner.addr)).header("x-deno-subhost", token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "healthy");
}

#[tokio::test]
async fn a_hanging_origin_is_cut_off_as_origin_unreachable() {
    let (origin, runner) = origin_and_runner(&["--origin-timeout-s", "1"]).await;
    origin.deploy("slow", TestDeployment::inline_js("Deno.serve(() => new Response('slow but fine'));"));
    assert_still_serving(&runner).await;

    *origin.state.boot_delay.lock().unwrap() = Some(Duration::from_secs(30));
    let started = Instant::now();
    let message = control_plane_error(&runner, "slow", "ORIGIN_UNREACHABLE").await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "the runner waited {elapsed:?} for a hanging origin");
    assert!(elapsed >= Duration::from_millis(900), "answered after {elapsed:?}, before the timeout");
    assert_mentions(&message, &["boot", "1000 ms"]);
    // The running isolate does not depend on the origin.
    assert_still_serving(&runner).await;

    // Once the origin answers again, the deployment boots.
    *origin.state.boot_delay.lock().unwrap() = None;
    assert_eq!(text(&runner, "slow", "/").await, "slow but fine");
}

#[tokio::test]
async fn boot_refused_by_the_origin_is_502_boot_failed() {
    let (origin, runner) = origin_and_runner(&[]).await;
    let mut refused = TestDeployment::inline_js("Deno.serve(() => new Response('booted after all'));");
    refused.boot_status = Some(500);
    origin.deploy("refused", refused.clone());

    let message = control_plane_error(&runner, "refused", "BOOT_FAILED").await;
    assert_mentions(&message, &["boot", "500"]);
    assert_still_serving(&runner).await;

    // A deployment the origin does not know: boot answers 404.
    let message = control_plane_error(&runner, "unknown", "BOOT_FAILED").await;
    assert_mentions(&message, &["boot", "404"]);
    assert_still_serving(&runner).await;

    // A refusal is not remembered: once the origin boots it, it serves.
    refused.boot_status = None;
    origin.deploy("refused", refused);
    assert_eq!(text(&runner, "refused", "/").await, "booted after all");
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn invalid_isolate_configs_are_502_and_name_the_field() {
    let (origin, runner) = origin_and_runner(&[]).await;
    let serve = "Deno.serve(() => new Response('configured'));";
    let with_body = |header: &str| {
        let mut d = TestDeployment::inline_js(serve);
        d.config_header = header.to_owned();
        d
    };
    origin.deploy("garbage", with_body("this is not a config"));
    origin.deploy("broken-json", with_body(r#"{"entrypoint": "file:///src/main.js", "layers": ["#));
    origin.deploy("empty-header", with_body(""));
    origin.deploy("no-header", TestDeployment::inline_js(serve));
    origin.omit_config_header("no-header");
    origin.deploy("no-layers", TestDeployment::inline_js(serve).with(|c| c["layers"] = json!([])));
    origin.deploy("unknown-kind", TestDeployment::inline_js(serve).with(|c| c["layers"][0]["kind"] = json!("tarball")));
    origin.deploy(
        "bundle-no-specifier",
        TestDeployment::inline_js(serve).with(|c| c["layers"][0]["specifier"] = Value::Null),
    );
    origin.deploy("inline-names-nothing", TestDeployment::inline_js(serve).with(|c| c["inline_layer"] = json!("nope")));
    origin.deploy("env-with-equals", TestDeployment::inline_js(serve).with(|c| c["envs"] = json!({ "A=B": "x" })));
    origin.deploy("env-empty-name", TestDeployment::inline_js(serve).with(|c| c["envs"] = json!({ "": "x" })));
    origin.deploy("entry-not-url", TestDeployment::inline_js(serve).with(|c| c["entrypoint"] = json!("main.js")));
    origin.deploy(
        "entry-in-no-layer",
        TestDeployment::inline_js(serve).with(|c| c["entrypoint"] = json!("file:///src/elsewhere.js")),
    );
    origin.deploy("unknown-field", TestDeployment::inline_js(serve).with(|c| c["entry_point"] = json!("x")));

    let cases: &[(&str, &[&str])] = &[
        ("garbage", &["neither JSON nor base64url"]),
        ("broken-json", &["invalid isolate config"]),
        ("empty-header", &["invalid isolate config"]),
        ("no-header", &["x-deno-config"]),
        ("no-layers", &["layers", "at least one layer"]),
        ("unknown-kind", &["layers[0].kind", "tarball"]),
        ("bundle-no-specifier", &["layers[0].specifier"]),
        ("inline-names-nothing", &["inline_layer", "nope"]),
        ("env-with-equals", &["envs.A=B"]),
        ("env-empty-name", &["envs.", "empty"]),
        ("entry-not-url", &["entrypoint", "main.js"]),
        ("entry-in-no-layer", &["entrypoint", "file:///src/elsewhere.js", "not in any layer"]),
        ("unknown-field", &["entry_point"]),
    ];
    for (deployment, fragments) in cases {
        let message = control_plane_error(&runner, deployment, "INVALID_ISOLATE_CONFIG").await;
        assert_mentions(&message, fragments);
    }
    assert_still_serving(&runner).await;
    // No isolate was started for any of them.
    assert_eq!(runner.isolate_pids().len(), 1, "only the healthy isolate runs");

    // The same config, base64url-encoded, is accepted.
    let config = json!({
        "entrypoint": "file:///src/main.js",
        "layers": [{ "kind": "bundle", "id": "inline-main", "specifier": "file:///src/main.js" }],
        "inline_layer": "inline-main",
        "envs": { "GREETING": "hej" },
    });
    let mut encoded =
        TestDeployment::inline_js("Deno.serve(() => new Response('base64 ' + Deno.env.get('GREETING')));");
    encoded.config_header = base64url(config.to_string().as_bytes());
    assert!(!encoded.config_header.starts_with('{'));
    origin.deploy("base64", encoded);
    assert_eq!(text(&runner, "base64", "/").await, "base64 hej");
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
}

/// A deployment whose one bundle layer `layer_id` is fetched with the layer RPC.
fn layered(layer_id: &str, kind: &str) -> TestDeployment {
    let layer = match kind {
        "bundle" => json!({ "kind": "bundle", "id": layer_id, "specifier": "file:///src/main.js" }),
        _ => json!({ "kind": kind, "id": layer_id }),
    };
    TestDeployment::config(json!({ "entrypoint": "file:///src/main.js", "layers": [layer] }))
}

#[tokio::test]
async fn layers_that_fail_are_502_layer_failed() {
    let (origin, runner) = origin_and_runner(&[]).await;

    // The layer RPC answers 500.
    origin.deploy("layer-500", layered("layer-a", "bundle"));
    origin.layer("layer-a", "Deno.serve(() => new Response('layer a'));");
    *origin.state.layer_status.lock().unwrap() = Some(500);
    let message = control_plane_error(&runner, "layer-500", "LAYER_FAILED").await;
    assert_mentions(&message, &["layer-a", "500"]);
    assert_still_serving(&runner).await;
    *origin.state.layer_status.lock().unwrap() = None;
    // The failure was not cached: with the origin fixed, the layer loads.
    assert_eq!(text(&runner, "layer-500", "/").await, "layer a");

    // The origin does not have the layer.
    origin.deploy("layer-404", layered("layer-missing", "bundle"));
    let message = control_plane_error(&runner, "layer-404", "LAYER_FAILED").await;
    assert_mentions(&message, &["layer-missing", "404"]);

    // ESZIP layers whose bytes are garbage.
    origin.deploy("eszip-garbage", layered("eszip-garbage", "eszip"));
    origin.layer("eszip-garbage", "this is not an eszip archive at all");
    let message = control_plane_error(&runner, "eszip-garbage", "LAYER_FAILED").await;
    assert_mentions(&message, &["eszip-garbage", "ESZIP"]);
    origin.deploy("eszip-bad-magic", layered("eszip-bad-magic", "eszip"));
    origin.layer("eszip-bad-magic", &b"ESZIP_V2\x00\x00\xff\xff\x01\x02garbage"[..]);
    let message = control_plane_error(&runner, "eszip-bad-magic", "LAYER_FAILED").await;
    assert_mentions(&message, &["eszip-bad-magic", "ESZIP"]);

    // A real ESZIP, cut short.
    let app = tempfile::tempdir().unwrap();
    std::fs::write(app.path().join("main.js"), "Deno.serve(() => new Response('from eszip'));").unwrap();
    let eszip = build_eszip(app.path(), "main.js", None);
    origin.deploy("eszip-ok", layered("eszip-ok", "eszip"));
    origin.layer("eszip-ok", eszip.clone());
    assert_eq!(text(&runner, "eszip-ok", "/").await, "from eszip");
    origin.deploy("eszip-truncated", layered("eszip-truncated", "eszip"));
    origin.layer("eszip-truncated", eszip[..eszip.len() * 2 / 3].to_vec());
    let message = control_plane_error(&runner, "eszip-truncated", "LAYER_FAILED").await;
    assert_mentions(&message, &["eszip-truncated"]);

    assert_still_serving(&runner).await;
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn an_import_of_a_missing_module_is_502_module_not_found() {
    let (origin, runner) = origin_and_runner(&[]).await;
    origin.deploy(
        "missing-import",
        TestDeployment::inline_js("import { x } from './missing.js';\nDeno.serve(() => new Response(x));"),
    );
    let message = control_plane_error(&runner, "missing-import", "MODULE_NOT_FOUND").await;
    assert_mentions(&message, &["missing.js"]);
    assert_still_serving(&runner).await;
    wait_until("the failed isolate to go", Duration::from_secs(5), || runner.isolate_pids().len() == 1).await;
}

#[tokio::test]
async fn isolates_that_fail_to_start_are_502_isolate_start_failed() {
    let (origin, runner) = origin_and_runner(&[]).await;
    origin.deploy(
        "throws-at-start",
        TestDeployment::inline_js("throw new Error('boom at start');\nDeno.serve(() => new Response('never'));"),
    );
    origin.deploy("no-handler", TestDeployment::inline_js("console.log('loaded, but serving nothing');"));

    let message = control_plane_error(&runner, "throws-at-start", "ISOLATE_START_FAILED").await;
    assert_mentions(&message, &["boom at start"]);
    assert_still_serving(&runner).await;
    let message = control_plane_error(&runner, "no-handler", "ISOLATE_START_FAILED").await;
    assert_mentions(&message.to_lowercase(), &["handler"]);
    assert_still_serving(&runner).await;
    // No process is left behind by the failed starts.
    wait_until("the failed isolates to go", Duration::from_secs(5), || runner.isolate_pids().len() == 1).await;
}

/// What a tenant reads of its own errors names its file and line, and none
/// of the platform's frames (the harness's, deno's internals).
#[tokio::test]
async fn tenant_errors_name_the_tenants_file_and_line_and_no_platform_frames() {
    let (origin, runner) = origin_and_runner(&["--usage-interval-s", "1"]).await;
    let platform = |text: &str| text.contains("harness") || text.contains("ext:") || text.contains("node:internal");
    origin.deploy(
        "throws-in-a-function",
        TestDeployment::inline_js("function boom() {\n  throw new Error('thrown at start');\n}\nboom();\nDeno.serve(() => new Response('never'));"),
    );
    let message = control_plane_error(&runner, "throws-in-a-function", "ISOLATE_START_FAILED").await;
    assert!(message.starts_with("Error: thrown at start\n"), "{message}");
    assert!(message.contains("at boom (file:///src/main.js:2:9)"), "the place it threw: {message}");
    assert!(message.contains("at file:///src/main.js:4:1"), "and the call: {message}");
    assert!(!platform(&message), "{message}");

    origin.deploy(
        "throws-in-the-handler",
        TestDeployment::inline_js(
            "Deno.serve((req) => {\n  console.error(new Error('logged'));\n  return null.property;\n});",
        ),
    );
    let response = get(&runner, "throws-in-the-handler", "/").await;
    assert_eq!(response.status(), 500);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (logged, thrown) = loop {
        let messages: Vec<String> = origin
            .activity_events()
            .iter()
            .filter(|e| e["deployment_id"] == "throws-in-the-handler" && e["type"] == "log")
            .filter_map(|e| e["message"].as_str().map(str::to_owned))
            .collect();
        let logged = messages.iter().find(|m| m.starts_with("Error: logged")).cloned();
        let thrown = messages.iter().find(|m| m.contains("TypeError")).cloned();
        if let (Some(logged), Some(thrown)) = (logged, thrown) {
            break (logged, thrown);
        }
        assert!(std::time::Instant::now() < deadline, "no error lines: {:?}", origin.activity_events());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The probe: both name the tenant's line.
    assert!(logged.contains("at file:///src/main.js:2:17"), "{logged}");
    assert!(thrown.contains("at file:///src/main.js:3:15"), "{thrown}");
    assert!(!thrown.contains("TypeError: TypeError"), "{thrown}");
    for line in [&logged, &thrown] {
        assert!(!platform(line), "platform frames in a tenant's line: {line}");
    }
    assert_still_serving(&runner).await;
}

#[tokio::test]
async fn an_isolate_dying_mid_request_is_502_isolate_crashed_and_the_next_request_gets_a_fresh_one() {
    let (origin, runner) = origin_and_runner(&[]).await;
    origin.deploy(
        "crashy",
        TestDeployment::inline_js(
            r#"
Deno.serve((req) => {
  if (new URL(req.url).pathname === "/exit") Deno.exit(1);
  return new Response(String(Deno.pid));
});
"#,
        ),
    );
    let first = host_pid(&runner, "crashy", "/pid").await;
    assert!(runner.isolate_pids().contains(&first));

    let message = expect_error(get(&runner, "crashy", "/exit").await, 502, "ISOLATE_CRASHED").await;
    assert_mentions(&message, &["crashed"]);
    assert_no_host_paths(&runner, &message);
    wait_until("the crashed isolate to be gone", Duration::from_secs(5), || !process_alive(first)).await;

    let second = host_pid(&runner, "crashy", "/pid").await;
    assert_ne!(first, second, "the crashed isolate served again");
    assert!(runner.isolate_pids().contains(&second));
    let crashy_boots = origin.calls().iter().filter(|c| *c == "boot crashy").count();
    assert_eq!(crashy_boots, 2, "{:?}", origin.calls());
    assert_still_serving(&runner).await;
}

#[tokio::test]
async fn the_tenants_own_5xx_pass_through_untouched() {
    let (origin, runner) = origin_and_runner(&[]).await;
    origin.deploy(
        "tenant",
        TestDeployment::inline_js(
            r#"
Deno.serve((req) => {
  switch (new URL(req.url).pathname) {
    case "/500":
      return new Response("tenant says no", { status: 500, headers: { "content-type": "text/x-tenant", "x-tenant": "five-hundred" } });
    case "/502":
      return new Response("tenant's own bad gateway", { status: 502, headers: { "x-tenant": "five-oh-two" } });
    case "/forged":
      return new Response("tenant pretending", { status: 502, headers: { "x-isocloud-error": "BOOT_FAILED" } });
    case "/503":
      return new Response(JSON.stringify({ error: { code: "TENANT_DOWN", message: "maintenance" } }), {
        status: 503,
        headers: { "content-type": "application/json", "retry-after": "7", "x-tenant": "five-oh-three" },
      });
    case "/throw":
      throw new Error("tenant bug");
    case "/reject":
      return Promise.reject(new Error("tenant async bug"));
    default:
      return new Response(String(Deno.pid));
  }
});
"#,
        ),
    );
    let pid = host_pid(&runner, "tenant", "/").await;

    let response = get(&runner, "tenant", "/500").await;
    assert_eq!(response.status(), 500);
    assert!(response.headers().get("x-isocloud-error").is_none());
    assert_eq!(response.headers()["content-type"], "text/x-tenant");
    assert_eq!(response.headers()["x-tenant"], "five-hundred");
    assert_eq!(response.text().await.unwrap(), "tenant says no");

    // A tenant's 502 looks like a control-plane status; the missing header tells them apart.
    let response = get(&runner, "tenant", "/502").await;
    assert_eq!(response.status(), 502);
    assert!(response.headers().get("x-isocloud-error").is_none());
    assert_eq!(response.headers()["x-tenant"], "five-oh-two");
    assert_eq!(response.text().await.unwrap(), "tenant's own bad gateway");

    // A tenant cannot pass its answer off as the runner's: the header is the runner's alone.
    let response = get(&runner, "tenant", "/forged").await;
    assert_eq!(response.status(), 502);
    assert!(response.headers().get("x-isocloud-error").is_none(), "a tenant forged x-isocloud-error");
    assert_eq!(response.text().await.unwrap(), "tenant pretending");

    let response = get(&runner, "tenant", "/503").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("x-isocloud-error").is_none());
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(response.headers()["x-tenant"], "five-oh-three");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({ "error": { "code": "TENANT_DOWN", "message": "maintenance" } }));

    // A handler that throws is the tenant's 500, not a runner error, and the isolate lives on.
    for path in ["/throw", "/reject"] {
        let response = get(&runner, "tenant", path).await;
        assert_eq!(response.status(), 500, "{path}");
        assert!(response.headers().get("x-isocloud-error").is_none(), "{path}");
        let body = response.text().await.unwrap();
        assert!(!body.contains("ISOLATE_CRASHED"), "{path}: {body}");
        assert_eq!(host_pid(&runner, "tenant", "/").await, pid, "{path}: the isolate was replaced");
    }
    assert_eq!(origin.calls_to("boot"), 1, "the tenant booted once: {:?}", origin.calls());
    assert_still_serving(&runner).await;
}

#[tokio::test]
async fn without_a_token_a_subhosting_runner_routes_by_host_and_finds_nothing() {
    let (origin, runner) = origin_and_runner(&[]).await;
    assert_still_serving(&runner).await;
    let boots = origin.calls_to("boot");

    let message = expect_error(runner.get("127.0.0.1", "/").await, 404, "DEPLOYMENT_NOT_FOUND").await;
    assert_mentions(&message, &["127.0.0.1"]);
    expect_error(runner.get("healthy.localhost", "/").await, 404, "DEPLOYMENT_NOT_FOUND").await;
    // A forwarded host from a peer without a token routes nothing either.
    let response = runner
        .client_for("example.com")
        .get(runner.url("example.com", "/"))
        .header("x-forwarded-host", "healthy")
        .send()
        .await
        .unwrap();
    expect_error(response, 404, "DEPLOYMENT_NOT_FOUND").await;

    assert_eq!(origin.calls_to("boot"), boots, "a request without a token reached the origin");
    assert_still_serving(&runner).await;
}

#[tokio::test]
async fn logs_and_start_errors_say_what_isocloud_allows_not_which_deno_flag_to_pass() {
    let apps = AppsDir::new();
    // A denied fetch, uncaught: deno's message names --allow-net.
    apps.app(
        "denied",
        &[
            ("isolate.json", r#"{"permissions":{"net":false}}"#),
            ("main.ts", "Deno.serve(async () => { await fetch('http://example.com/'); return new Response('no'); });"),
        ],
    );
    // An npm import in a deployment that was not built: deno names --no-npm.
    apps.app(
        "unbuilt",
        &[("main.js", "const m = 'npm:left-pad@1'; await import(m); Deno.serve(() => new Response('x'));")],
    );
    let runner = apps.serve(&[]);

    let response = runner.get("denied.localhost", "/").await;
    assert_eq!(response.status(), 500);
    let line = runner.wait_for_log("Requires net access");
    assert!(line.contains("not allowed by the deployment's permissions.net"), "{line}");
    assert!(!runner.stderr().contains("--allow-net"), "deno's flag leaked into the logs");

    let message = expect_error(runner.get("unbuilt.localhost", "/").await, 502, "MODULE_NOT_FOUND").await;
    assert!(!message.contains("--no-npm"), "deno's flag leaked into the answer: {message}");
    assert!(message.contains("installed when a deployment is built"), "{message}");
}

#[tokio::test]
async fn a_deno_1_global_at_start_names_its_replacement() {
    let apps = AppsDir::new();
    apps.app(
        "old",
        &[("main.ts", "window.addEventListener('load', () => {});\nDeno.serve(() => new Response('x'));\n")],
    );
    apps.app(
        "new",
        &[("main.ts", "globalThis.addEventListener('load', () => {});\nDeno.serve(() => new Response('ok'));\n")],
    );
    let runner = apps.serve(&[]);
    // The probe: the same app with globalThis starts.
    assert_eq!(runner.get("new.localhost", "/").await.text().await.unwrap(), "ok");
    let message = expect_error(runner.get("old.localhost", "/").await, 502, "ISOLATE_START_FAILED").await;
    assert!(message.contains("window is not defined") && message.contains("use globalThis"), "{message}");
}
