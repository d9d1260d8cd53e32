//! Pre-started isolates: deno processes the runner starts before it knows
//! their deployment, kept per sandbox profile (`permissions.net`). A cold
//! boot takes one, and the tenant's code then runs in it with exactly what
//! an isolate started for it would have: its files, its envs and nothing
//! else, the same sandbox, its own deno cache dir.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// Answers with what the isolate sees of itself.
const INTROSPECT: &str = r#"
Deno.serve(async () => {
  let passwd = "readable";
  try { await Deno.readTextFile("/etc/passwd"); } catch (e) { passwd = e.name; }
  return Response.json({
    pid: Deno.pid,
    env: Deno.env.toObject(),
    cwd: Deno.cwd(),
    asset: await Deno.readTextFile("./greeting.txt"),
    passwd,
  });
});
"#;

/// What `host`'s isolate sees of itself, and its host pid: in its own PID
/// namespace it is pid 1 (a pre-started one too, once it serves).
async fn introspect(runner: &Runner, host: &str) -> (Value, u32) {
    let response = runner.get(host, "/").await;
    assert_eq!(response.status(), 200, "{host}");
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["pid"], 1, "deno is pid 1 of its own namespace: {seen}");
    (seen, runner.isolate_pid(host.strip_suffix(".localhost").unwrap()).await)
}

/// Waits until the runner has `children` deno processes, `waiting` of them
/// pre-started and unassigned; returns the children.
async fn settle(runner: &Runner, children: usize, waiting: u64) -> Vec<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while runner.isolate_pids().len() != children {
        let stderr = runner.stderr();
        let log = &stderr[stderr.len().saturating_sub(3000)..];
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} are not {children} processes; log:\n{log}",
            runner.isolate_pids()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = runner.metrics().await;
        if metric_value(&metrics, "isocloud_prestarted_waiting") == waiting {
            return runner.isolate_pids();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("isocloud_prestarted_waiting never reached {waiting}:\n{metrics}");
}

#[tokio::test]
async fn a_cold_boot_takes_a_prestarted_isolate_that_then_is_the_deployments_alone() {
    let apps = AppsDir::new();
    apps.app(
        "hello",
        &[
            ("main.ts", INTROSPECT),
            ("greeting.txt", "hello from the tree"),
            ("isolate.json", r#"{"envs":{"GREETING":"hi","HTTP_PROXY":"http://tenant.example:1"}}"#),
        ],
    );
    let runner = apps.serve(&["--prestarted-isolates", "1"]);
    let prestarted = settle(&runner, 1, 1).await;

    let (seen, pid) = introspect(&runner, "hello.localhost").await;
    assert_eq!(pid, prestarted[0], "the boot took the waiting isolate: {seen}");
    // Exactly its configured envs (its own proxy value, not the runner's),
    // nothing the runner set for deno.
    assert_eq!(seen["env"], serde_json::json!({"GREETING": "hi", "HTTP_PROXY": "http://tenant.example:1"}));
    assert_eq!(seen["cwd"], "/src");
    assert_eq!(seen["asset"], "hello from the tree");
    assert_eq!(seen["passwd"], "NotCapable", "{seen}");

    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#), 1, "{metrics}");
    // The deployment's deno cache dir is the one the isolate started with:
    // a re-boot finds what it compiled.
    let deno_dirs: Vec<_> = std::fs::read_dir(runner.state_dir.path().join("deno-dir")).unwrap().collect();
    assert_eq!(deno_dirs.len(), 1, "{deno_dirs:?}");

    // The pool refills in the background: a new process, not the one
    // given away.
    let refilled = settle(&runner, 2, 1).await;
    let fresh: Vec<u32> = refilled.into_iter().filter(|pid| *pid != prestarted[0]).collect();
    assert_eq!(fresh.len(), 1);
    // The same deployment is served by the same isolate from now on.
    assert_eq!(introspect(&runner, "hello.localhost").await.1, prestarted[0]);
}

#[tokio::test]
async fn deployments_that_need_their_own_start_or_another_profile_do_not_take_one() {
    let apps = AppsDir::new();
    let files = |config: &'static str| [("main.ts", INTROSPECT), ("greeting.txt", "hi"), ("isolate.json", config)];
    // A module deno finds only through the import map (a `.jsonc` file is
    // loaded as `data.jsonc.js`; a `.json` one is a JSON module, in place
    // since JSON modules came), which a pre-started deno read empty: needs
    // its own process. (Envs never do: no deno starts with a tenant's.)
    apps.app("needs-import-map", &files(r#"{"envs":{"NO_COLOR":"0"}}"#))
        .app("needs-import-map", &[("data.jsonc", "{}")]);
    // Another profile: no network at all.
    apps.app("offline-a", &files(r#"{"permissions":{"net":false}}"#));
    apps.app("offline-b", &files(r#"{"permissions":{"net":false}}"#));
    let runner = apps.serve(&["--prestarted-isolates", "1"]);
    let waiting = settle(&runner, 1, 1).await;

    let (seen, pid) = introspect(&runner, "needs-import-map.localhost").await;
    assert!(!waiting.contains(&pid), "{pid} {seen}");
    assert_eq!(seen["env"], serde_json::json!({"NO_COLOR": "0"}));
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="unfit"}"#), 1, "{metrics}");
    assert!(runner.isolate_pids().contains(&waiting[0]), "the unfit boot left the waiting isolate waiting");

    // The first boot of a new profile finds none waiting, and teaches the
    // pool the profile: the next one of that profile takes a waiting isolate.
    let (_, a_pid) = introspect(&runner, "offline-a.localhost").await;
    assert!(!waiting.contains(&a_pid));
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="miss"}"#), 1, "{metrics}");
    // needs-import-map, offline-a, and one waiting for each profile.
    let waiting_now = settle(&runner, 4, 2).await;
    let (b, b_pid) = introspect(&runner, "offline-b.localhost").await;
    assert!(waiting_now.contains(&b_pid), "offline-b took the isolate waiting for its profile");
    assert_ne!(b_pid, waiting[0], "not the one of the other profile");
    assert_eq!(b["passwd"], "NotCapable");
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#), 1, "{metrics}");
}

/// About `bytes` of plain JS, the way a bundler emits it.
fn big_module(bytes: usize) -> String {
    let mut code = String::with_capacity(bytes + 200);
    let mut i = 0;
    while code.len() < bytes {
        code.push_str(&format!("export function f{i}(x) {{ return x + {i} * \"s{i}-lorem ipsum\".length; }}\n"));
        i += 1;
    }
    code
}

#[tokio::test]
async fn a_big_deployment_reboots_on_its_own_code_cache_a_small_one_on_a_prestarted_isolate() {
    let apps = AppsDir::new();
    let big = big_module(400 * 1024);
    apps.app(
        "big",
        &[
            ("main.ts", "import { f7 } from './big.js';\nDeno.serve(() => new Response(`big ${Deno.pid} ${f7(1)}`));"),
            ("big.js", &big),
        ],
    );
    apps.app("small", &[("main.ts", "Deno.serve(() => new Response(`small ${Deno.pid}`));")]);
    let runner = apps.serve(&["--prestarted-isolates", "1", "--idle-timeout-s", "1"]);
    // The host pid of `name`'s isolate, once it answered (as pid 1).
    let serve = |name: &'static str| {
        let runner = &runner;
        async move {
            let host = format!("{name}.localhost");
            let response = runner.get(&host, "/").await;
            assert_eq!(response.status(), 200, "{host}: {}", runner.stderr());
            let body = response.text().await.unwrap();
            let mut words = body.split(' ');
            assert_eq!(words.next(), Some(name), "{body}");
            assert_eq!(words.next(), Some("1"), "deno is pid 1 of its own namespace: {body}");
            runner.isolate_pid(name).await
        }
    };

    for name in ["big", "small"] {
        let waiting = settle(&runner, 1, 1).await;
        let first = serve(name).await;
        assert_eq!(first, waiting[0], "{name}'s first boot took the pre-started isolate");
        wait_until(&format!("{name}'s isolate idles out"), Duration::from_secs(20), || !process_alive(first)).await;
    }
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#), 2, "{metrics}");
    // What the first boots compiled is in their deployments' cache dirs.
    let deno_dirs: Vec<_> =
        std::fs::read_dir(runner.state_dir.path().join("deno-dir")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(deno_dirs.len(), 2, "{deno_dirs:?}");
    let code_cache_bytes: Vec<u64> = deno_dirs
        .iter()
        .map(|dir| {
            ["v8_code_cache_v2", "v8_code_cache_v2-wal"]
                .iter()
                .filter_map(|f| dir.join(f).metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .collect();
    assert!(code_cache_bytes.iter().any(|bytes| *bytes as usize > big.len() / 4), "{code_cache_bytes:?}");

    // The big one's re-boot starts its own deno on its cache (a pre-started
    // one would compile everything again); the small one's takes the pool's.
    let waiting = settle(&runner, 1, 1).await;
    let big_again = serve("big").await;
    assert_ne!(big_again, waiting[0], "the big deployment's re-boot left the pre-started isolate waiting");
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="code_cache"}"#), 1, "{metrics}");
    let small_again = serve("small").await;
    assert_eq!(small_again, waiting[0], "the small deployment's re-boot took the pre-started isolate");
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#), 3, "{metrics}");
}

#[tokio::test]
async fn a_prestarted_isolate_of_a_remote_origin_asks_for_the_tree_when_it_reads_a_file() {
    let origin = TestOrigin::start().await;
    let mut deployment =
        TestDeployment::inline_js("Deno.serve(async () => new Response(await Deno.readTextFile('./data.txt')));");
    deployment.tree = Some(serde_json::json!({ "entries": {
        "": { "kind": "directory" },
        "/data.txt": { "kind": "file", "size": 9, "hash": "blob-data" },
    }}));
    origin.deploy("reader", deployment);
    origin.blob("blob-data", "from tree");
    let runner = origin.runner(&["--prestarted-isolates", "1"]);
    settle(&runner, 1, 1).await;

    let response = runner.subhost_get("reader", "/").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "from tree", "the deferred tree reached the pre-started isolate");
    let metrics = runner.metrics().await;
    assert_eq!(metric_value(&metrics, r#"isocloud_prestarted_boots_total{result="hit"}"#), 1, "{metrics}");
    assert_eq!(origin.calls_to("read_tree"), 1, "{:?}", origin.calls());
}
