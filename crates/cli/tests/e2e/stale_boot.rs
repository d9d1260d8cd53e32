//! Faults a cache can answer (issue 15, item 4), and a built deployment on
//! a remote runner (item 1).
//!
//! A runner keeps the last boot answer of each deployment in its disk
//! cache; with the origin down (here: a forwarder in front of the test
//! origin that drops every connection), a deployment whose isolate idled out
//! boots again from it, younger than `--boot-stale-max-age-s`. Without it
//! (or with 0) the visitor gets 502 `ORIGIN_UNREACHABLE`, whose message never
//! names the origin. A deployment the origin says is gone (404) is never
//! served stale, and its kept answer is dropped.
//!
//! A deployment the control plane built (`npm:` imports, `node_modules` in
//! its tree) serves on an `isocloud runner` fed over `--origin-listen` as it
//! serves in process — and from its kept answer and tree once the control
//! plane is out of reach.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::registry::TestRegistry;
use crate::support::{
    ControlPlaneServe, KID, Runner, SECRET, TestDeployment, TestOrigin, expect_error, isocloud_cli, metric_value,
    runner_fed_by,
};

// ------------------------------------------------------------------ a switchable origin

/// A TCP forwarder in front of an origin: while `down`, every connection it
/// holds is cut and every new one is closed at once (an origin that is
/// gone, as the runner's HTTP client sees it: no pooled connection survives).
struct Switch {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    /// Bumped on every switch down: live connections watch it and end.
    epoch: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Switch {
    async fn start(upstream: SocketAddr) -> Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let (epoch, _) = tokio::sync::watch::channel(0u64);
        let (is_down, watch) = (down.clone(), epoch.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if is_down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = watch.subscribe();
                connections.spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Switch { addr, down, epoch, task }
    }

    fn rpc_root(&self) -> String {
        format!("http://{}/v0/", self.addr)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.epoch.send_modify(|epoch| *epoch += 1);
        }
    }
}

const HELLO: &str = "Deno.serve(() => new Response('hello from the last answer'));";

/// A runner whose one subhoster's origin is behind `switch`, isolates idle
/// out after 1 s.
fn runner_behind(switch: &Switch, extra: &[&str]) -> Runner {
    let secret = format!("{KID}={SECRET}");
    let root = switch.rpc_root();
    let mut args = vec!["runner", "--rpc-root", &root, "--subhost-secret", &secret, "--idle-timeout-s", "1"];
    args.extend_from_slice(extra);
    Runner::start(&args)
}

/// Waits until `deployment` has no isolate on `runner` (idled out).
async fn idle_out(runner: &Runner, deployment: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while runner.isolates().await.iter().any(|i| i["deployment_id"] == deployment) {
        assert!(Instant::now() < deadline, "{deployment} never idled out:\n{}", runner.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn serves(runner: &Runner, deployment: &str) -> String {
    let response = runner.subhost_get(deployment, "/").await;
    assert_eq!(response.status(), 200, "{}", runner.stderr());
    response.text().await.unwrap()
}

/// 502 `code`, and the message the visitor got (which must not name the origin).
async fn refused(runner: &Runner, deployment: &str, code: &str, switch: &Switch) -> String {
    let response = runner.subhost_get(deployment, "/").await;
    let message = expect_error(response, 502, code).await;
    let origin = switch.addr.to_string();
    assert!(!message.contains(&origin), "the visitor is shown the origin's address: {message:?}");
    assert!(!message.contains(&switch.addr.port().to_string()), "the visitor is shown the origin's port: {message:?}");
    message
}

#[tokio::test]
async fn with_the_origin_down_an_idled_out_deployment_boots_from_its_last_answer() {
    let origin = TestOrigin::start().await;
    origin.deploy("shop", TestDeployment::inline_js(HELLO));
    let switch = Switch::start(origin.addr).await;

    // First, without a kept answer: stale boots off, the origin down, 502.
    let off = runner_behind(&switch, &["--boot-stale-max-age-s", "0"]);
    assert_eq!(serves(&off, "shop").await, "hello from the last answer");
    idle_out(&off, "shop").await;
    switch.set_down(true);
    let message = refused(&off, "shop", "ORIGIN_UNREACHABLE", &switch).await;
    assert!(message.contains("unreachable"), "{message}");
    let log = off.stderr();
    assert!(log.contains(&switch.rpc_root()), "the operator's log names the origin:\n{log}");
    assert_eq!(metric_value(&off.metrics().await, "isocloud_stale_boots_total"), 0);
    drop(off);

    // A runner that never saw the deployment has nothing to boot from.
    let fresh = runner_behind(&switch, &[]);
    refused(&fresh, "shop", "ORIGIN_UNREACHABLE", &switch).await;
    drop(fresh);

    // With the default: booted while the origin is up, idled out, the
    // origin down — the next request boots from the kept answer.
    switch.set_down(false);
    let runner = runner_behind(&switch, &[]);
    assert_eq!(serves(&runner, "shop").await, "hello from the last answer");
    idle_out(&runner, "shop").await;
    switch.set_down(true);
    let boots_before = origin.calls_to("boot");
    assert_eq!(serves(&runner, "shop").await, "hello from the last answer");
    assert_eq!(origin.calls_to("boot"), boots_before, "the origin saw no boot: it was down");
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, "isocloud_stale_boots_total"), 1, "{metrics}");
    runner.wait_for_log("booting from the last boot answer");

    // The deployment's own log hears of it once the origin is back.
    switch.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = origin.activity_events();
        if events.iter().any(|e| {
            e["deployment_id"] == "shop"
                && e["type"] == "log"
                && e["level"] == "warning"
                && e["message"].as_str().is_some_and(|m| m.contains("last boot answer"))
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no stale-boot warning reached the origin: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A 5xx from the origin is a fault too: boot from the kept answer.
    idle_out(&runner, "shop").await;
    let mut failing = TestDeployment::inline_js(HELLO);
    failing.boot_status = Some(503);
    origin.deploy("shop", failing);
    assert_eq!(serves(&runner, "shop").await, "hello from the last answer");
    assert_eq!(metric_value(&runner.metrics().await, "isocloud_stale_boots_total"), 2);
}

#[tokio::test]
async fn a_deployment_the_origin_says_is_gone_is_not_served_stale() {
    let origin = TestOrigin::start().await;
    origin.deploy("gone", TestDeployment::inline_js(HELLO));
    let switch = Switch::start(origin.addr).await;
    let runner = runner_behind(&switch, &[]);
    assert_eq!(serves(&runner, "gone").await, "hello from the last answer");
    idle_out(&runner, "gone").await;

    // The origin answers: no such deployment. That is final.
    origin.state.deployments.lock().unwrap().remove("gone");
    let message = refused(&runner, "gone", "BOOT_FAILED", &switch).await;
    assert!(message.contains("404"), "{message}");
    assert_eq!(metric_value(&runner.metrics().await, "isocloud_stale_boots_total"), 0);

    // And the kept answer went with it: with the origin down, nothing to boot.
    switch.set_down(true);
    refused(&runner, "gone", "ORIGIN_UNREACHABLE", &switch).await;
    assert_eq!(metric_value(&runner.metrics().await, "isocloud_stale_boots_total"), 0);
}

// ------------------------------------------------------------------ built deployments, remote runner

const NPM_APP: &str = r#"import greet from "npm:a@1";
import tag, { kind } from "npm:esm-pkg@2";
Deno.serve(() => new Response(`${greet("bob")} ${tag(kind)}`));
"#;

fn cli(serve: &ControlPlaneServe, config: &Path, args: &[&str]) -> String {
    isocloud_cli(&serve.control_url(), &serve.admin_token(), config, args)
}

#[tokio::test]
async fn a_built_deployment_serves_on_a_remote_runner() {
    let registry = TestRegistry::start();
    crate::builds_registry::publish_npm_set(&registry);
    let (npm, jsr) = (registry.npm_url(), registry.jsr_url());
    let extra = ["--npm-registry", &npm, "--jsr-registry", &jsr, "--cpu-limit-ms", "5000"];
    let (serve, origin) = ControlPlaneServe::start_with_origin(&extra);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    cli(&serve, &config, &["projects", "create", "built"]);
    let app = work.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("main.ts"), NPM_APP).unwrap();
    let out = cli(&serve, &config, &["deploy", "--project", "built", "--prod", app.to_str().unwrap()]);
    let host = out.lines().last().unwrap().trim().strip_prefix("http://").unwrap().split(':').next().unwrap();
    let deployment_id = host.strip_prefix("built-").and_then(|h| h.strip_suffix(".localhost")).unwrap().to_owned();

    // In process: the packages laid out from the tree at boot.
    let local = serve.runner.get("built.localhost", "/").await;
    assert_eq!(local.status(), 200, "{}", serve.runner.stderr());
    let expected = local.text().await.unwrap();
    assert_eq!(expected, "HI BOB! esm:esm");

    // Remote: the same deployment through the origin listener (behind a
    // switch: below, the listener goes away).
    let switch = Switch::start(origin).await;
    let runner = runner_fed_by(switch.addr, SECRET, &["--idle-timeout-s", "1"]);
    let remote = runner.subhost_get(&deployment_id, "/").await;
    let status = remote.status();
    let body = remote.text().await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, expected.as_str()), "{}", runner.stderr());

    // With the control plane out of reach, the built deployment boots again
    // from its kept answer and tree, its packages from the runner's store.
    idle_out(&runner, &deployment_id).await;
    switch.set_down(true);
    assert_eq!(serves(&runner, &deployment_id).await, expected);
    assert_eq!(metric_value(&runner.metrics().await, "isocloud_stale_boots_total"), 1);
}
