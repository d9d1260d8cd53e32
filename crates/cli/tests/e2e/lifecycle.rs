//! Isolate lifecycle end to end: reuse, idle termination, crash replacement,
//! graceful shutdown, console capture with request ids, and the admin
//! listener's health and metrics.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::Value;

const PID_APP: &str = r#"
Deno.serve(async (req) => {
  const url = new URL(req.url);
  if (url.pathname === "/exit") Deno.exit(3);
  if (url.pathname === "/slow") { await new Promise((r) => setTimeout(r, 1500)); return new Response("slow done"); }
  return new Response(String(Deno.pid));
});
"#;

/// The host pid of the isolate serving `host` (`<app>.localhost`), after a
/// request that shows it serves; inside its PID namespace it is pid 1.
async fn pid_of(runner: &Runner, host: &str) -> u32 {
    let response = runner.get(host, "/").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "1", "deno is pid 1 of its own namespace");
    runner.isolate_pid(host.strip_suffix(".localhost").unwrap()).await
}

#[tokio::test]
async fn one_isolate_is_reused_then_terminated_when_idle() {
    let apps = AppsDir::new();
    apps.app("idle", &[("main.ts", PID_APP)]);
    let runner = apps.serve(&["--idle-timeout-s", "1"]);

    let first = pid_of(&runner, "idle.localhost").await;
    assert_eq!(pid_of(&runner, "idle.localhost").await, first, "a second request reuses the isolate");
    assert!(process_alive(first));
    assert_eq!(runner.isolate_pids(), vec![first]);

    wait_until("the idle isolate to exit", Duration::from_secs(10), || !process_alive(first)).await;
    assert!(runner.isolate_pids().is_empty());
    let metrics = runner.metrics().await;
    assert!(has_metric(&metrics, r#"isocloud_isolate_terminations_total{reason="idle"} 1"#), "{metrics}");

    // The next request boots it again.
    let second = pid_of(&runner, "idle.localhost").await;
    assert_ne!(second, first);
}

#[tokio::test]
async fn a_crashed_isolate_is_replaced_on_the_next_request() {
    let apps = AppsDir::new();
    apps.app("crashy", &[("main.ts", PID_APP)]).app("neighbour", &[("main.ts", PID_APP)]);
    let runner = apps.serve(&[]);
    let neighbour = pid_of(&runner, "neighbour.localhost").await;
    let first = pid_of(&runner, "crashy.localhost").await;

    let message = expect_error(runner.get("crashy.localhost", "/exit").await, 502, "ISOLATE_CRASHED").await;
    assert!(!message.is_empty());
    wait_until("the crashed isolate to be gone", Duration::from_secs(5), || !process_alive(first)).await;

    let second = pid_of(&runner, "crashy.localhost").await;
    assert_ne!(second, first);
    // The neighbour never noticed.
    assert_eq!(pid_of(&runner, "neighbour.localhost").await, neighbour);
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_leaves_no_deno_process() {
    let apps = AppsDir::new();
    apps.app("a", &[("main.ts", PID_APP)]).app("b", &[("main.ts", PID_APP)]);
    let mut runner = apps.serve(&["--drain-timeout-s", "10"]);
    let a = pid_of(&runner, "a.localhost").await;
    let b = pid_of(&runner, "b.localhost").await;

    let client = runner.client_for("a.localhost");
    let slow = tokio::spawn(client.get(runner.url("a.localhost", "/slow")).send());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = runner.terminate(Duration::from_secs(20));
        (status, runner)
    });
    let response = slow.await.unwrap().expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "slow done");
    let (status, _runner) = status.await.unwrap();
    assert!(status.success(), "runner exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    for pid in [a, b] {
        assert!(!process_alive(pid), "deno process {pid} outlived the runner");
    }
}

#[tokio::test]
async fn a_killed_runner_takes_its_isolates_with_it() {
    let apps = AppsDir::new();
    apps.app("a", &[("main.ts", PID_APP)]);
    let runner = apps.serve(&[]);
    let pid = pid_of(&runner, "a.localhost").await;
    signal(runner.pid(), libc::SIGKILL);
    wait_until("the orphaned isolate to die", Duration::from_secs(5), || !process_alive(pid)).await;
}

#[tokio::test]
async fn console_output_reaches_the_origin_with_request_ids() {
    let origin = TestOrigin::start().await;
    origin.deploy(
        "logger",
        TestDeployment::inline_js(
            r#"
console.log("booting");
Deno.serve(async (req) => {
  console.log("handling", new URL(req.url).pathname, { n: 1 });
  await new Promise((r) => setTimeout(r, 10));
  console.error("after await");
  return new Response("ok");
});
"#,
        ),
    );
    let runner = origin.runner(&[]);
    let client = reqwest::Client::new();
    let response = client
        .get(format!("http://{}/logged", runner.addr))
        .header("x-deno-subhost", subhost_token(claims_for("logger")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let mut events = Vec::new();
    // The boot event and the isolate's lines travel in separate batches.
    wait_until("log events and the boot to be reported", Duration::from_secs(10), || {
        events = origin.activity_events();
        events.iter().filter(|e| e["type"] == "log").count() >= 3 && events.iter().any(|e| e["type"] == "boot")
    })
    .await;
    let logs: Vec<&Value> = events.iter().filter(|e| e["type"] == "log").collect();
    let boot_log = logs.iter().find(|e| e["message"] == "booting").expect("the top-level log");
    assert!(boot_log.get("request_id").is_none(), "{boot_log}");
    let handling = logs.iter().find(|e| e["message"].as_str().unwrap().starts_with("handling /logged")).unwrap();
    assert_eq!(handling["level"], "info");
    assert_eq!(handling["deployment_id"], "logger");
    assert!(handling["message"].as_str().unwrap().contains("n: 1"), "{handling}");
    let request_id = handling["request_id"].as_str().expect("a request id").to_owned();
    let after = logs.iter().find(|e| e["message"] == "after await").unwrap();
    assert_eq!(after["level"], "error");
    assert_eq!(after["request_id"], request_id.as_str(), "the id survives an await");
    assert!(events.iter().any(|e| e["type"] == "boot" && e["boot_ms"].as_u64().is_some()), "{events:?}");
    for event in &events {
        assert!(event["timestamp"].as_str().unwrap().ends_with('Z'), "{event}");
    }
}

#[tokio::test]
async fn admin_listener_reports_health_and_metrics() {
    let apps = AppsDir::new();
    apps.app("m", &[("main.ts", PID_APP)]);
    let runner = apps.serve(&[]);
    let health = reqwest::get(format!("http://{}/healthz", runner.admin)).await.unwrap();
    assert_eq!(health.status(), 200);
    pid_of(&runner, "m.localhost").await;
    pid_of(&runner, "m.localhost").await;
    expect_error(runner.get("missing.localhost", "/").await, 404, "DEPLOYMENT_NOT_FOUND").await;

    let metrics = runner.metrics().await;
    for expected in [
        r#"isocloud_requests_total{status="200"} 2"#,
        r#"isocloud_requests_total{status="404",code="DEPLOYMENT_NOT_FOUND"} 1"#,
        r#"isocloud_boots_total{result="ok"} 1"#,
        "isocloud_live_isolates 1",
        "isocloud_boot_duration_seconds_count 1",
        "isocloud_cache_hits_total",
    ] {
        assert!(has_metric(&metrics, expected), "missing {expected:?} in:\n{metrics}");
    }
    // The public listener does not serve the admin paths.
    expect_error(runner.get("127.0.0.1", "/metrics").await, 404, "DEPLOYMENT_NOT_FOUND").await;
}

#[tokio::test]
async fn usage_measured_by_the_runner_reaches_the_origin() {
    let origin = TestOrigin::start().await;
    origin.deploy(
        "metered",
        TestDeployment::inline_js(
            r#"Deno.serve(async (req) => { await req.arrayBuffer(); await new Promise((r) => setTimeout(r, 50)); return new Response("y".repeat(2000)); });"#,
        ),
    );
    let runner = origin.runner(&["--idle-timeout-s", "1"]);
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let response = client
            .post(format!("http://{}/", runner.addr))
            .header("x-deno-subhost", subhost_token(claims_for("metered")))
            .body(vec![b'x'; 1000])
            .send()
            .await
            .unwrap();
        assert_eq!(response.bytes().await.unwrap().len(), 2000);
    }
    // The isolate idles out; its last usage is reported with its termination.
    let mut usage = Vec::new();
    wait_until("a usage event", Duration::from_secs(15), || {
        usage = origin.activity_events().into_iter().filter(|e| e["type"] == "usage").collect();
        !usage.is_empty()
    })
    .await;
    let sum = |field: &str| usage.iter().map(|e| e[field].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("requests"), 3, "{usage:?}");
    assert_eq!(sum("ingress_bytes"), 3000, "{usage:?}");
    assert_eq!(sum("egress_bytes"), 6000, "{usage:?}");
    assert!(sum("wall_ms") >= 150, "{usage:?}");
    let peak = usage.iter().map(|e| e["peak_memory_bytes"].as_u64().unwrap()).max().unwrap();
    assert!(peak > 10 * 1024 * 1024, "a deno isolate holds more than 10 MB: {peak}");
    for event in &usage {
        assert!(event["interval_start"].as_str().unwrap().ends_with('Z'), "{event}");
        assert!(event["interval_end"].as_str().unwrap() >= event["interval_start"].as_str().unwrap(), "{event}");
    }
}

#[tokio::test]
async fn a_deployments_first_cache_starts_from_the_runners_template() {
    let apps = AppsDir::new();
    apps.app("fresh", &[("main.ts", PID_APP)]);
    let runner = apps.serve(&[]);
    runner.wait_for_log("deno cache template ready");
    // The template is the runner's warm-up isolate's cache: the harness's
    // compiled code, outside the per-deployment folders.
    let template = runner.state_dir.path().join("deno-template");
    let code_cache = |dir: &std::path::Path| {
        ["v8_code_cache_v2", "v8_code_cache_v2-wal"]
            .iter()
            .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
            .sum::<u64>()
    };
    assert!(code_cache(&template) > 0, "no code cache in {}", template.display());
    let deno_dirs = || std::fs::read_dir(runner.state_dir.path().join("deno-dir")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(deno_dirs(), 0, "the warm-up leaves no cache dir of its own");

    pid_of(&runner, "fresh.localhost").await;
    let dirs: Vec<_> =
        std::fs::read_dir(runner.state_dir.path().join("deno-dir")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(code_cache(&dirs[0]) > 0);
}
