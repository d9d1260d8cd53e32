//! Hostile tenants against the runner's limits: CPU time per request
//! (measured by the kernel, from outside), wall clock, and the number of
//! isolates. Each attack must fail for the attacker, be recorded, and leave a
//! neighbour deployment serving.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::Value;

/// Each handler here answers `<Deno.pid> <ISOLATE>`: its pid in its own PID
/// namespace (1) and a random identity of the isolate, which tells requests
/// served by one isolate from those of a replacement ([`isolate_of`]).
const NEIGHBOUR: &str =
    "const ISOLATE = crypto.randomUUID();\nDeno.serve(() => new Response(`${Deno.pid} ${ISOLATE}`));";

/// A handler that spins for `?ms=N` of CPU, answers its pid and identity on
/// `/`, and on `/loop` never returns.
const BURNER: &str = r#"
const ISOLATE = crypto.randomUUID();
Deno.serve((req) => {
  const url = new URL(req.url);
  if (url.pathname === "/loop") { while (true) {} }
  if (url.pathname === "/background") {
    setTimeout(() => { while (true) {} }, 10);
    return new Response("answered first");
  }
  const ms = Number(url.searchParams.get("ms") ?? 0);
  const end = performance.now() + ms;
  while (performance.now() < end) {}
  return new Response(`${Deno.pid} ${ISOLATE}`);
});
"#;

/// The identity in an answer `<Deno.pid> <ISOLATE>`, after checking deno is
/// pid 1 of its own namespace.
fn isolate_of(body: &str) -> String {
    let (pid, isolate) = body.split_once(' ').unwrap_or_else(|| panic!("not `<pid> <isolate>`: {body:?}"));
    assert_eq!(pid, "1", "deno is pid 1 of its own namespace: {body:?}");
    assert_eq!(isolate.len(), 36, "{body:?}");
    isolate.to_owned()
}

/// The host pid of the isolate of `host` (`<app>.localhost`), after `path`
/// showed it serves.
async fn pid(runner: &Runner, host: &str, path: &str) -> u32 {
    let response = runner.get(host, path).await;
    assert_eq!(response.status(), 200, "{host}{path}");
    isolate_of(&response.text().await.unwrap());
    runner.isolate_pid(host.strip_suffix(".localhost").unwrap()).await
}

/// The same for deployment `id` of a subhosting runner: `path`'s answer's
/// identity, and the host pid.
async fn subhost_pid(runner: &Runner, id: &str, path: &str) -> (String, u32) {
    let response = runner.subhost_get(id, path).await;
    assert_eq!(response.status(), 200, "{id}{path}");
    (isolate_of(&response.text().await.unwrap()), runner.isolate_pid(id).await)
}

#[tokio::test]
async fn a_runaway_loop_is_killed_fast_and_reported() {
    let origin = TestOrigin::start().await;
    origin.deploy("burner", TestDeployment::inline_js(BURNER));
    origin.deploy("neighbour", TestDeployment::inline_js(NEIGHBOUR));
    let runner = origin.runner(&["--cpu-limit-ms", "50"]);
    let get = |id: &'static str, path: &'static str| runner.subhost_get(id, path);
    let (neighbour_isolate, _) = subhost_pid(&runner, "neighbour", "/").await;
    let (_, first) = subhost_pid(&runner, "burner", "/").await;

    // The neighbour keeps answering while the loop spins.
    let neighbour = async {
        let mut answered = 0;
        for _ in 0..10 {
            let response = get("neighbour", "/").await;
            assert_eq!(response.status(), 200);
            assert_eq!(isolate_of(&response.text().await.unwrap()), neighbour_isolate);
            answered += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answered
    };
    let started = Instant::now();
    let (looped, answered) = tokio::join!(get("burner", "/loop"), neighbour);
    let elapsed = started.elapsed();
    let message = expect_error(looped, 502, "CPU_TIME_LIMIT").await;
    assert!(message.contains("CPU"), "{message}");
    assert_eq!(answered, 10);
    // 1.5 × 50 ms of budget at most, plus sampling and kill; generous for CI.
    assert!(elapsed < Duration::from_secs(2), "the loop lived {elapsed:?}");
    wait_until("the runaway isolate to be gone", Duration::from_secs(5), || !process_alive(first)).await;

    let (_, second) = subhost_pid(&runner, "burner", "/").await;
    assert_ne!(second, first, "the next request boots a fresh isolate");

    let event = first_event(&origin, "cpu_time_limit").await;
    assert_eq!(event["deployment_id"], "burner");
    assert_eq!(event["limit"], 50);
    assert!(event["used"].as_u64().unwrap() >= 50, "{event}");
    let metrics = runner.metrics().await;
    assert!(has_metric(&metrics, r#"isocloud_isolate_terminations_total{reason="cpu_time_limit"} 1"#), "{metrics}");
    // Per deployment (fed by usage reports: every 10 s and when an isolate
    // ends), with bounded cardinality: beyond the busiest, "other".
    assert!(has_metric(&metrics, r#"isocloud_deployment_cpu_limit_kills_total{deployment="burner"} 1"#), "{metrics}");
    assert!(has_metric(&metrics, r#"isocloud_deployment_requests_total{deployment="other"} 0"#), "{metrics}");
}

#[tokio::test]
async fn cpu_burnt_after_the_response_is_charged_too() {
    let apps = AppsDir::new();
    apps.app("burner", &[("main.ts", BURNER)]);
    let runner = apps.serve(&["--cpu-limit-ms", "50"]);
    let first = pid(&runner, "burner.localhost", "/").await;
    let response = runner.get("burner.localhost", "/background").await;
    assert_eq!(response.text().await.unwrap(), "answered first");
    wait_until("the background loop's isolate to be killed", Duration::from_secs(5), || !process_alive(first)).await;
    assert_ne!(pid(&runner, "burner.localhost", "/").await, first);
}

#[tokio::test]
async fn ordinary_handlers_are_never_killed_and_a_slow_burn_is() {
    let apps = AppsDir::new();
    apps.app("modest", &[("main.ts", BURNER)]).app("greedy", &[("main.ts", BURNER)]);
    let runner = apps.serve(&["--cpu-limit-ms", "50"]);

    // 25 ms of CPU per request, well under the limit: one isolate throughout.
    let modest = pid(&runner, "modest.localhost", "/?ms=25").await;
    for _ in 0..20 {
        assert_eq!(pid(&runner, "modest.localhost", "/?ms=25").await, modest);
    }

    // Averaging: a 60 ms request may borrow what a 20 ms one left unused.
    let mixed = pid(&runner, "modest.localhost", "/?ms=20").await;
    for _ in 0..5 {
        assert_eq!(pid(&runner, "modest.localhost", "/?ms=60").await, mixed);
        assert_eq!(pid(&runner, "modest.localhost", "/?ms=20").await, mixed);
    }

    // 90 ms per request: more than the budget each request brings.
    let mut killed = false;
    for _ in 0..10 {
        let response = runner.get("greedy.localhost", "/?ms=90").await;
        if response.status() == 502 {
            expect_error(response, 502, "CPU_TIME_LIMIT").await;
            killed = true;
            break;
        }
    }
    assert!(killed, "an isolate using 90 ms per request under a 50 ms limit kept running");
}

#[tokio::test]
async fn a_request_that_never_answers_gets_504() {
    let apps = AppsDir::new();
    apps.app("sleepy", &[("main.ts", "Deno.serve(() => new Promise(() => {}));")]).app("n", &[("main.ts", NEIGHBOUR)]);
    let runner = apps.serve(&["--request-timeout-s", "1"]);
    let started = Instant::now();
    let message = expect_error(runner.get("sleepy.localhost", "/").await, 504, "REQUEST_TIMEOUT").await;
    assert!(message.contains("1 s"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));
    pid(&runner, "n.localhost", "/").await;
}

#[tokio::test]
async fn a_full_runner_evicts_the_least_recently_used_idle_isolate_or_refuses() {
    let apps = AppsDir::new();
    let slow = "const ISOLATE = crypto.randomUUID();\nDeno.serve(async (req) => { if (new URL(req.url).pathname === '/slow') await new Promise((r) => setTimeout(r, 1500)); return new Response(`${Deno.pid} ${ISOLATE}`); });";
    for name in ["a", "b", "c"] {
        apps.app(name, &[("main.ts", slow)]);
    }
    let runner = apps.serve(&["--max-isolates", "2"]);
    let a = pid(&runner, "a.localhost", "/").await;
    let b = pid(&runner, "b.localhost", "/").await;
    pid(&runner, "b.localhost", "/").await;
    // a is the least recently used: c's boot evicts it.
    pid(&runner, "c.localhost", "/").await;
    wait_until("a to be evicted", Duration::from_secs(5), || !process_alive(a)).await;
    assert!(process_alive(b));
    let metrics = runner.metrics().await;
    assert!(has_metric(&metrics, r#"isocloud_isolate_terminations_total{reason="evicted"} 1"#), "{metrics}");

    // Both slots busy with in-flight requests: a new deployment is refused.
    let client_b = runner.client_for("b.localhost");
    let client_c = runner.client_for("c.localhost");
    let busy_b = tokio::spawn(client_b.get(runner.url("b.localhost", "/slow")).send());
    let busy_c = tokio::spawn(client_c.get(runner.url("c.localhost", "/slow")).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    expect_error(runner.get("a.localhost", "/").await, 503, "CAPACITY").await;
    assert_eq!(busy_b.await.unwrap().unwrap().status(), 200);
    assert_eq!(busy_c.await.unwrap().unwrap().status(), 200);
    let body: Value = Value::from(pid(&runner, "a.localhost", "/").await);
    assert!(body.as_u64().is_some());
}

const MEMORY_BOMBS: &str = r#"
const ISOLATE = crypto.randomUUID();
const kept = [];
Deno.serve((req) => {
  const url = new URL(req.url);
  if (url.pathname === "/buffers") {
    // ArrayBuffers live outside V8's heap: only the cgroup (or the RSS
    // watch) can stop them. Touch every page so it is really resident.
    while (true) { const b = new Uint8Array(16 * 1024 * 1024); b.fill(1); kept.push(b); }
  }
  if (url.pathname === "/heap") {
    while (true) { kept.push({ a: Math.random(), b: "x".repeat(64) + Math.random(), c: [1, 2, 3] }); }
  }
  return new Response(`${Deno.pid} ${ISOLATE}`);
});
"#;

#[tokio::test]
async fn memory_bombs_are_stopped_and_reported() {
    let origin = TestOrigin::start().await;
    origin.deploy("bomb", TestDeployment::inline_js(MEMORY_BOMBS));
    origin.deploy("neighbour", TestDeployment::inline_js(NEIGHBOUR));
    // The CPU limit is generous: this test is about memory.
    let runner = origin.runner(&["--memory-limit-mb", "128", "--cpu-limit-ms", "20000"]);
    runner.wait_for_log("limits: memory=128 MB");
    let get = |id: &'static str, path: &'static str| runner.subhost_get(id, path);
    let neighbour = subhost_pid(&runner, "neighbour", "/").await;

    for bomb in ["/buffers", "/heap"] {
        let (_, first) = subhost_pid(&runner, "bomb", "/").await;
        let message = expect_error(get("bomb", bomb).await, 502, "MEMORY_LIMIT").await;
        assert!(message.contains("memory"), "{bomb}: {message}");
        wait_until("the bomb's isolate to be gone", Duration::from_secs(5), || !process_alive(first)).await;
        assert_eq!(subhost_pid(&runner, "neighbour", "/").await, neighbour, "the neighbour was replaced");
    }
    let (_, second) = subhost_pid(&runner, "bomb", "/").await;
    assert!(process_alive(second));

    let mut events = Vec::new();
    wait_until("two memory_limit events", Duration::from_secs(10), || {
        events = origin.activity_events();
        events.iter().filter(|e| e["type"] == "memory_limit").count() >= 2
    })
    .await;
    let metrics = runner.metrics().await;
    assert!(has_metric(&metrics, r#"isocloud_deployment_memory_limit_kills_total{deployment="bomb"} 2"#), "{metrics}");
    for event in events.iter().filter(|e| e["type"] == "memory_limit") {
        eprintln!("memory_limit event: {event}");
        assert_eq!(event["limit"], 128 * 1024 * 1024);
        assert!(event["used"].as_u64().unwrap() > 0, "{event}");
    }
}

/// The first activity event of type `kind` the origin has (10 s at most).
async fn first_event(origin: &TestOrigin, kind: &str) -> Value {
    let mut found = None;
    wait_until(&format!("a {kind} event"), Duration::from_secs(10), || {
        found = origin.activity_events().into_iter().find(|e| e["type"] == kind);
        found.is_some()
    })
    .await;
    found.expect("found")
}

/// Where no memory cgroup is usable, the runner's own reads of each
/// isolate's resident memory are the cap on what lives outside V8's heap.
#[tokio::test]
async fn without_cgroups_the_resident_memory_watch_stops_a_buffer_bomb() {
    let origin = TestOrigin::start().await;
    origin.deploy("bomb", TestDeployment::inline_js(MEMORY_BOMBS));
    let (root, secret) = (origin.rpc_root(), format!("{KID}={SECRET}"));
    let args = ["runner", "--rpc-root", &root, "--subhost-secret", &secret];
    let runner =
        Runner::start_without_cgroups(&[&args[..], &["--memory-limit-mb", "128", "--cpu-limit-ms", "20000"]].concat());
    // The probe: this runner found no cgroup, so the watch is what it has.
    runner.wait_for_log("limits: memory=128 MB per isolate (RSS watch + V8 heap)");
    let (_, first) = subhost_pid(&runner, "bomb", "/").await;
    let message = expect_error(runner.subhost_get("bomb", "/buffers").await, 502, "MEMORY_LIMIT").await;
    assert!(message.contains("memory"), "{message}");
    wait_until("the bomb's isolate to be gone", Duration::from_secs(5), || !process_alive(first)).await;
    let event = first_event(&origin, "memory_limit").await;
    assert_eq!(event["limit"], 128 * 1024 * 1024, "{event}");
    assert!(event["used"].as_u64().unwrap() > 128 * 1024 * 1024, "the watch read more than the cap: {event}");
    // The next request gets a new isolate that serves.
    let (_, second) = subhost_pid(&runner, "bomb", "/").await;
    assert!(second != first && process_alive(second));
}

#[tokio::test]
async fn oversized_requests_and_slow_clients_are_refused_at_the_edge() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let apps = AppsDir::new();
    apps.app(
        "echo",
        &[(
            "main.ts",
            r#"Deno.serve(async (req) => {
  try { const body = await req.arrayBuffer(); return new Response(`read ${body.byteLength}`); }
  catch (e) { return new Response(`body error: ${(e as Error).name}`, { status: 400 }); }
});"#,
        )],
    );
    let runner = apps.serve(&["--max-request-body-mb", "1", "--max-header-kb", "16", "--header-timeout-s", "2"]);
    let client = runner.client_for("echo.localhost");
    let url = runner.url("echo.localhost", "/");

    // Declared too large: refused before any isolate exists. The runner
    // answers at once and closes without reading the body, so a client still
    // writing may see the reset before it reads the 413.
    match client.post(&url).body(vec![b'x'; 2 * 1024 * 1024]).send().await {
        Ok(response) => {
            expect_error(response, 413, "PAYLOAD_TOO_LARGE").await;
        }
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    assert!(runner.isolate_pids().is_empty());

    // Within bounds: served.
    let response = client.post(&url).body(vec![b'x'; 512 * 1024]).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), format!("read {}", 512 * 1024));

    // Streamed without a length: cut off where it passes the bound.
    let chunks = futures_util::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 64 * 1024])));
    match client.post(&url).body(reqwest::Body::wrap_stream(chunks)).send().await {
        Ok(response) => {
            expect_error(response, 413, "PAYLOAD_TOO_LARGE").await;
        }
        // The runner may answer and close before the client has finished
        // sending; either way the body never reached the isolate whole.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }

    // Huge headers: 431 from the edge.
    let response = client.get(&url).header("x-big", "z".repeat(32 * 1024)).send().await.unwrap();
    assert_eq!(response.status(), 431);

    // Slowloris: a head that never completes is dropped after the timeout.
    let mut slow = tokio::net::TcpStream::connect(runner.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\nX-Slow: ").await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the runner kept a slow client's connection open");
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());

    // The runner still serves.
    let response = client.post(&url).body("ok").send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "read 2");
}

#[tokio::test]
async fn thousands_of_concurrent_requests_to_one_isolate_leave_the_runner_serving() {
    let apps = AppsDir::new();
    apps.app(
        "flooded",
        &[(
            "main.ts",
            "const ISOLATE = crypto.randomUUID();\n\
             Deno.serve(async () => { await new Promise((r) => setTimeout(r, 20)); return new Response(`${Deno.pid} ${ISOLATE}`); });",
        )],
    )
    .app("n", &[("main.ts", NEIGHBOUR)]);
    let runner = apps.serve(&[]);
    let neighbour = pid(&runner, "n.localhost", "/").await;
    let flooded = {
        let response = runner.get("flooded.localhost", "/").await;
        assert_eq!(response.status(), 200);
        isolate_of(&response.text().await.unwrap())
    };
    let flooded_pid = runner.isolate_pid("flooded").await;

    // 2,000 requests at once, over many connections.
    let client = reqwest::Client::builder()
        .resolve("flooded.localhost", runner.addr)
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let url = runner.url("flooded.localhost", "/");
    let started = Instant::now();
    let requests = (0..2000).map(|_| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let response = client.get(url).send().await?;
            let status = response.status().as_u16();
            let body = response.text().await?;
            Ok::<_, reqwest::Error>((status, body))
        })
    });
    let results = futures_util::future::join_all(requests).await;
    let mut served = 0;
    for result in results {
        let (status, body) = result.unwrap().expect("every request gets an answer");
        assert_eq!(status, 200, "{body}");
        assert_eq!(isolate_of(&body), flooded, "one isolate serves them all");
        served += 1;
    }
    assert_eq!(served, 2000);
    eprintln!("2000 concurrent requests served in {:?}", started.elapsed());
    // The neighbour was never disturbed, and the flood left one isolate.
    assert_eq!(pid(&runner, "n.localhost", "/").await, neighbour);
    assert_eq!(runner.isolate_pids().len(), 2);
    assert_eq!(runner.isolate_pid("flooded").await, flooded_pid);
}
