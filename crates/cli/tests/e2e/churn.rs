//! Nothing outlives its isolate: hundreds of isolate lifetimes, ended by
//! every path there is (idle stop, LRU eviction, CPU kill, memory kill,
//! crash, a boot that throws, a boot that never serves, a streamed answer
//! abandoned half-way, a tenant holding extra control connections), and
//! then the runner's descriptors, tasks, cgroups and isolate folders are
//! back where they started, within a small constant.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::support::*;

/// Ordinary tenants: more than `--max-isolates`, so cycling through them
/// evicts, and the idle timeout stops the rest.
const ORDINARY: usize = 6;

const OK: &str = r#"Deno.serve(() => new Response("ok"));"#;
/// Spins past the CPU budget: killed with CPU_TIME_LIMIT.
const SPIN: &str = r#"Deno.serve(() => { while (true) {} });"#;
/// Holds more than the memory limit: killed with MEMORY_LIMIT.
const HOG: &str = r#"
const kept = [];
Deno.serve(() => {
  for (let i = 0; i < 8; i++) { const b = new Uint8Array(32 << 20); b.fill(1); kept.push(b); }
  return new Response(String(kept.length));
});
"#;
/// Exits in the middle of a request: ISOLATE_CRASHED.
const CRASH: &str = r#"Deno.serve(() => { Deno.exit(3); });"#;
/// Throws while its module evaluates: a boot that fails half-way.
const THROW: &str = r#"throw new Error("boom at boot");"#;
/// Never registers a handler nor finishes evaluating: the boot times out.
const STALL: &str = r#"await new Promise(() => {});"#;
/// Streams a megabyte slowly; the test walks away after the first chunks.
const STREAM: &str = r#"
Deno.serve(() => {
  let sent = 0;
  const body = new ReadableStream({
    async pull(controller) {
      if (sent >= 64) { controller.close(); return; }
      await new Promise((r) => setTimeout(r, 20));
      controller.enqueue(new Uint8Array(16 * 1024));
      sent++;
    },
  });
  return new Response(body);
});
"#;
/// Opens as many extra connections to its own control socket as it can and
/// keeps them: the runner must bound and, at the end, close them.
const GRABBER: &str = r#"
const held = [];
Deno.serve(async () => {
  for (let i = 0; i < 20; i++) {
    try { held.push(await Deno.connect({ transport: "unix", path: "/isocloud/run/control.sock" })); } catch { break; }
  }
  return new Response(String(held.length));
});
"#;

fn tenants() -> Vec<(String, &'static str)> {
    let mut all: Vec<(String, &'static str)> = (0..ORDINARY).map(|i| (format!("ok{i}"), OK)).collect();
    all.extend([
        ("spin".to_owned(), SPIN),
        ("hog".to_owned(), HOG),
        ("crash".to_owned(), CRASH),
        ("throw".to_owned(), THROW),
        ("stall".to_owned(), STALL),
        ("stream".to_owned(), STREAM),
        ("grabber".to_owned(), GRABBER),
    ]);
    all
}

const RUNNER_FLAGS: [&str; 12] = [
    "--max-isolates",
    "4",
    "--idle-timeout-s",
    "1",
    "--cpu-limit-ms",
    "50",
    "--memory-limit-mb",
    "160",
    "--boot-timeout-s",
    "2",
    "--prestarted-isolates",
    "2",
];

/// What the runner holds, read from outside (descriptors) and from its
/// `/metrics` (the rest).
#[derive(Debug, Clone, Copy)]
struct Holdings {
    fds: i64,
    tasks: i64,
    isolate_tasks: i64,
    control_listeners: i64,
    cgroups: i64,
    isolate_dirs: i64,
    live: i64,
    lifetimes: i64,
}

fn gauge(metrics: &str, name: &str) -> i64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}")) as i64
}

async fn holdings(runner: &Runner) -> Holdings {
    let metrics = runner.metrics().await;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", runner.pid())).unwrap().count() as i64;
    Holdings {
        fds,
        tasks: gauge(&metrics, "isocloud_runtime_alive_tasks"),
        isolate_tasks: gauge(&metrics, "isocloud_isolate_tasks"),
        control_listeners: gauge(&metrics, "isocloud_isolate_control_listeners"),
        cgroups: gauge(&metrics, "isocloud_isolate_cgroups"),
        isolate_dirs: gauge(&metrics, "isocloud_isolate_dirs"),
        live: gauge(&metrics, "isocloud_live_isolates"),
        lifetimes: gauge(&metrics, "isocloud_isolate_lifetimes"),
    }
}

/// Waits until no tenant isolate runs and the pre-started ones are back,
/// then reads what the runner holds.
async fn settled(runner: &Runner) -> Holdings {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = holdings(runner).await;
    let mut stable = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = holdings(runner).await;
        // Settled: nothing live, only the pre-started isolates' lifetimes,
        // and the same figures twice in a row.
        if now.live == 0 && now.lifetimes <= 2 && now.fds == last.fds && now.tasks == last.tasks {
            stable += 1;
            if stable >= 3 {
                return now;
            }
        } else {
            stable = 0;
        }
        last = now;
        if Instant::now() > deadline {
            return now;
        }
    }
}

/// Boots so far, served or failed.
fn boots(metrics: &str) -> i64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("isocloud_boots_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as i64
}

type Get<'a> = Box<dyn Fn(String, &'static str) -> Pin<Box<dyn Future<Output = reqwest::Response> + 'a>> + 'a>;

/// One round: every tenant once, the misbehaving ones with what makes them
/// end.
async fn round(get: &Get<'_>, round: usize) {
    for i in 0..ORDINARY {
        let response = get(format!("ok{i}"), "/").await;
        assert_eq!(response.status(), 200, "an ordinary tenant must always be served (round {round})");
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    // Six ordinary tenants through four slots: evictions.
    for (name, code) in [("spin", "CPU_TIME_LIMIT"), ("hog", "MEMORY_LIMIT"), ("crash", "ISOLATE_CRASHED")] {
        let response = get(name.to_owned(), "/").await;
        assert_eq!(response.status(), 502, "{name}");
        assert_eq!(response.headers()["x-isocloud-error"], code, "{name}");
    }
    let response = get("throw".to_owned(), "/").await;
    assert_eq!(response.headers()["x-isocloud-error"], "ISOLATE_START_FAILED");
    if round <= 2 {
        let response = get("stall".to_owned(), "/").await;
        assert_eq!(response.headers()["x-isocloud-error"], "ISOLATE_START_FAILED");
    }
    // Streamed and abandoned after the first chunk.
    let mut response = get("stream".to_owned(), "/").await;
    assert_eq!(response.status(), 200);
    let _ = response.chunk().await;
    drop(response);
    let response = get("grabber".to_owned(), "/").await;
    assert_eq!(response.status(), 200);
    // The connects succeed (the kernel's backlog takes them); the runner
    // closes all but its bound at once, which `/metrics` counts.
    let connected: usize = response.text().await.unwrap().parse().unwrap();
    assert_eq!(connected, 20);
    // Every fourth round, a pause past the idle timeout: idle stops.
    if round % 4 == 1 {
        tokio::time::sleep(Duration::from_millis(1600)).await;
    }
}

async fn churn(runner: &Runner, get: Get<'_>) {
    // Warm-up: one of each, so lazily made things (the template, pools,
    // clients, metric series) exist in the baseline.
    round(&get, 0).await;
    let baseline = settled(runner).await;
    let boots_before = boots(&runner.metrics().await);
    let mut lifetimes = 0;
    let mut rounds = 1;
    // Every boot, served or failed, is one isolate lifetime.
    while lifetimes < 200 {
        round(&get, rounds).await;
        lifetimes = boots(&runner.metrics().await) - boots_before;
        rounds += 1;
    }
    let after = settled(runner).await;
    eprintln!("churn: {rounds} rounds, {lifetimes} isolate lifetimes\nbaseline {baseline:?}\nafter    {after:?}");
    assert_eq!(after.live, 0, "isolates still live: {after:?}");
    assert!(after.fds <= baseline.fds + 8, "descriptors grew: {baseline:?} -> {after:?}");
    assert!(after.tasks <= baseline.tasks + 16, "tasks grew: {baseline:?} -> {after:?}");
    assert!(after.isolate_tasks <= baseline.isolate_tasks + 4, "isolate tasks grew: {baseline:?} -> {after:?}");
    assert!(after.control_listeners <= baseline.control_listeners, "control listeners grew: {baseline:?} -> {after:?}");
    assert!(after.cgroups <= baseline.cgroups, "cgroups grew: {baseline:?} -> {after:?}");
    assert!(after.isolate_dirs <= baseline.isolate_dirs, "isolate folders grew: {baseline:?} -> {after:?}");
    let refused = gauge(&runner.metrics().await, "isocloud_isolate_control_connections_refused_total");
    assert!(refused >= rounds as i64 * 10, "extra control connections were not refused: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_its_isolate_in_apps_mode() {
    let apps = AppsDir::new();
    for (name, code) in tenants() {
        apps.app(&name, &[("main.js", code)]);
    }
    let runner = apps.serve(&RUNNER_FLAGS);
    let get: Get<'_> = Box::new(|name, path| {
        let runner = &runner;
        Box::pin(async move { runner.get(&format!("{name}.localhost"), path).await })
    });
    churn(&runner, get).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_its_isolate_in_subhosting_mode() {
    let origin = TestOrigin::start().await;
    for (name, code) in tenants() {
        origin.deploy(&name, TestDeployment::inline_js(code));
    }
    let runner = origin.runner(&RUNNER_FLAGS);
    let get: Get<'_> = Box::new(|name, path| {
        let runner = &runner;
        Box::pin(async move { runner.subhost_get(&name, path).await })
    });
    churn(&runner, get).await;
}
