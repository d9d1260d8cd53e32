//! Boot admission and per-tenant fairness: never-seen deployments requested
//! at once start a few deno processes at a time, first come first served,
//! from a bounded queue (503 `CAPACITY` with `Retry-After` past it); one
//! tenant cannot take every isolate slot. Each bound is first shown off (the
//! stampede, the slot grab), then on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;

use crate::support::*;

fn metric(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
}

/// An app folder of `n` deployments `d0…`, each answering its own name.
fn many_apps(n: usize) -> AppsDir {
    let apps = AppsDir::new();
    for i in 0..n {
        apps.app(&format!("d{i}"), &[("main.ts", &format!("Deno.serve(() => new Response('d{i}'));"))]);
    }
    apps
}

/// What a burst did: each answer's status, and its completion time from the
/// burst's start, in order of completion; and the most deno processes that
/// ran at once without having answered yet (sampled every few ms).
struct Burst {
    completions: Vec<(u16, Duration)>,
    peak_unanswered: usize,
}

/// Requests `d0…d{n-1}` all at once (every request sent before any boot can
/// finish) while counting the runner's deno processes.
async fn burst(runner: &Runner, n: usize) -> Burst {
    let answered = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (answered, done, pid) = (answered.clone(), done.clone(), runner.pid());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Acquire) {
                let before = answered.load(Ordering::Acquire);
                let running = children_of(pid).len();
                peak = peak.max(running.saturating_sub(before));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    // Every client built before the clock starts: building one loads the
    // TLS roots (tens of ms in a debug build), and forty built in turn
    // would be counted as the runner's delay before its first answer.
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let host = format!("d{i}.localhost");
            (runner.client_for(&host), runner.url(&host, "/"))
        })
        .collect();
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (client, url))| {
            let answered = answered.clone();
            tokio::spawn(async move {
                let response = client.get(url).send().await.expect("an answer");
                let status = response.status().as_u16();
                let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                let body = response.text().await.unwrap();
                let at = start.elapsed();
                answered.fetch_add(1, Ordering::AcqRel);
                match status {
                    200 => assert_eq!(body, format!("d{i}")),
                    503 => {
                        assert!(body.contains("CAPACITY"), "{body}");
                        assert_eq!(retry_after.as_deref(), Some("1"), "a 503 CAPACITY says when to retry");
                    }
                    other => panic!("d{i}: {other} {body}"),
                }
                (status, at)
            })
        })
        .collect();
    let mut completions = Vec::new();
    for task in tasks {
        completions.push(task.await.unwrap());
    }
    done.store(true, Ordering::Release);
    completions.sort_by_key(|(_, at)| *at);
    Burst { completions, peak_unanswered: sampler.join().unwrap() }
}

/// The `p`th percentile of the completion times of 200s.
fn completion(burst: &Burst, p: usize) -> Duration {
    let ok: Vec<Duration> = burst.completions.iter().filter(|(s, _)| *s == 200).map(|(_, at)| *at).collect();
    ok[(ok.len() - 1) * p / 100]
}

#[tokio::test]
async fn a_burst_of_never_seen_deployments_takes_turns_and_the_first_answers_come_early() {
    const N: usize = 40;
    let apps = many_apps(N);

    // The probe: admission effectively off, every deno starts at once and
    // they all share the cores.
    let runner = apps.serve(&["--max-concurrent-boots", "1000"]);
    let off = burst(&runner, N).await;
    assert!(off.completions.iter().all(|(s, _)| *s == 200));
    assert!(off.peak_unanswered >= N / 2, "no stampede to prevent? at most {} deno at once", off.peak_unanswered);
    drop(runner);

    let runner = apps.serve(&["--max-concurrent-boots", "2"]);
    let on = burst(&runner, N).await;
    assert!(on.completions.iter().all(|(s, _)| *s == 200), "{:?}", on.completions);
    // Two start at a time (a process that has served but whose answer is
    // still on its way counts too, and so does one spawned while the
    // sampler read /proc: a little slack).
    assert!(on.peak_unanswered <= 6, "{} deno processes ran at once unanswered", on.peak_unanswered);
    // Taking turns: half the deployments answered well before the last one.
    let (p50, max) = (completion(&on, 50), completion(&on, 100));
    assert!(p50.as_secs_f64() < 0.75 * max.as_secs_f64(), "p50 {p50:?}, last {max:?}");
    let metrics = runner.metrics().await;
    assert!(metric(&metrics, "isocloud_boots_queued_total") >= (N / 2) as f64, "{metrics}");
    assert_eq!(metric(&metrics, "isocloud_boot_queue_wait_seconds_count"), N as f64, "{metrics}");
    assert_eq!(metric(&metrics, "isocloud_boot_queue_length"), 0.0, "{metrics}");
    assert_eq!(metric(&metrics, "isocloud_boots_starting"), 0.0, "{metrics}");
    assert_eq!(metric(&metrics, "isocloud_boot_concurrency_limit"), 2.0, "{metrics}");
    eprintln!(
        "{N} at once: off p50 {:?} last {:?}, peak {}; on p50 {p50:?} last {max:?}, peak {}",
        completion(&off, 50),
        completion(&off, 100),
        off.peak_unanswered,
        on.peak_unanswered
    );
}

/// A deployment whose start takes a second (top-level await), so a burst
/// is all queued before the first turn ends.
const SLOW_START: &str =
    "await new Promise((r) => setTimeout(r, 1000));\nDeno.serve(() => new Response('DEPLOYMENT'));";

#[tokio::test]
async fn past_the_boot_queue_a_burst_gets_503_with_retry_after_and_nothing_else_fails() {
    const N: usize = 10;
    let apps = AppsDir::new();
    for i in 0..N {
        apps.app(&format!("d{i}"), &[("main.ts", &SLOW_START.replace("DEPLOYMENT", &format!("d{i}")))]);
    }
    // The probe: a queue long enough for everyone, all answered.
    let runner = apps.serve(&["--max-concurrent-boots", "4", "--max-boot-queue", "100"]);
    let open = burst(&runner, N).await;
    assert!(open.completions.iter().all(|(s, _)| *s == 200), "{:?}", open.completions);
    drop(runner);

    // One starts, three wait, the other six are told to come back.
    let runner = apps.serve(&["--max-concurrent-boots", "1", "--max-boot-queue", "3"]);
    let bounded = burst(&runner, N).await;
    let ok = bounded.completions.iter().filter(|(s, _)| *s == 200).count();
    let refused = bounded.completions.iter().filter(|(s, _)| *s == 503).count();
    assert_eq!((ok, refused), (4, 6), "{:?}", bounded.completions);
    // Refusals come at once, not after a wait.
    let first_ok = completion(&bounded, 0);
    assert!(bounded.completions.iter().filter(|(s, _)| *s == 503).all(|(_, at)| *at < first_ok));
    let metrics = runner.metrics().await;
    assert_eq!(metric(&metrics, r#"isocloud_boot_refusals_total{reason="queue_full"}"#), 6.0, "{metrics}");
    // Retried as told, every one of them is served.
    let retried = burst(&runner, N).await;
    let ok = retried.completions.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok >= 4 + 3, "{:?}", retried.completions);
}

const OTHER_KID: &str = "other";
const OTHER_SECRET: &str = "other-secret-fedcba9876543210fedcba98";

/// Answers its pid; `/slow` holds the request for a while (an isolate in use).
const PID: &str = "Deno.serve(async (req) => { if (new URL(req.url).pathname === '/slow') await new Promise((r) => setTimeout(r, 3000)); return new Response(String(Deno.pid)); });";

async fn get_as(runner: &Runner, kid: &str, secret: &str, deployment: &str, path: &str) -> reqwest::Response {
    let token = token_with(Algorithm::HS256, Some(kid), secret, claims_for(deployment));
    reqwest::Client::new()
        .get(format!("http://{}{path}", runner.addr))
        .header("x-deno-subhost", token)
        .send()
        .await
        .expect("an answer")
}

/// The host pid of `kid`'s isolate of `deployment` (two subhosters may each
/// have one of the same id), after it served: it answers 1, the pid it has
/// in its own PID namespace.
async fn pid_as(runner: &Runner, kid: &str, secret: &str, deployment: &str) -> u32 {
    let response = get_as(runner, kid, secret, deployment, "/").await;
    assert_eq!(response.status(), 200, "{kid}/{deployment}");
    assert_eq!(response.text().await.unwrap(), "1", "{kid}/{deployment}: deno is pid 1 of its own namespace");
    let isolates = runner.isolates().await;
    let tenant = format!("subhoster:{kid}");
    let mine: Vec<&serde_json::Value> =
        isolates.iter().filter(|i| i["deployment_id"] == deployment && i["tenant"] == tenant.as_str()).collect();
    assert_eq!(mine.len(), 1, "one running isolate of {tenant}/{deployment}: {isolates:?}");
    mine[0]["pid"].as_u64().unwrap() as u32
}

/// Holds `deployments` of `kid` busy with `/slow` requests until they end.
fn hold_busy(
    runner: &Runner,
    kid: &'static str,
    secret: &'static str,
    deployments: &[&str],
) -> Vec<tokio::task::JoinHandle<u16>> {
    deployments
        .iter()
        .map(|d| {
            let (addr, token) = (runner.addr, token_with(Algorithm::HS256, Some(kid), secret, claims_for(d)));
            tokio::spawn(async move {
                let response = reqwest::Client::new()
                    .get(format!("http://{addr}/slow"))
                    .header("x-deno-subhost", token)
                    .send()
                    .await
                    .unwrap();
                response.status().as_u16()
            })
        })
        .collect()
}

#[tokio::test]
async fn one_subhoster_cannot_take_every_isolate_slot() {
    let origin = TestOrigin::start().await;
    origin.accept_subhoster(OTHER_KID, OTHER_SECRET);
    for id in ["a1", "a2", "a3", "a4", "b1"] {
        origin.deploy(id, TestDeployment::inline_js(PID));
    }
    let root = origin.rpc_root();
    let (acme, other) = (format!("{KID}={SECRET}"), format!("{OTHER_KID}={OTHER_SECRET}"));
    let subhosters = ["runner", "--rpc-root", &root, "--subhost-secret", &acme, "--subhost-secret", &other];

    // The probe: without a per-tenant cap, acme's four busy isolates take
    // every slot and the other subhoster cannot boot at all.
    let runner = Runner::start(&[&subhosters[..], &["--max-isolates", "4", "--max-isolates-per-tenant", "4"]].concat());
    for id in ["a1", "a2", "a3", "a4"] {
        pid_as(&runner, KID, SECRET, id).await;
    }
    let busy = hold_busy(&runner, KID, SECRET, &["a1", "a2", "a3", "a4"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    expect_error(get_as(&runner, OTHER_KID, OTHER_SECRET, "b1", "/").await, 503, "CAPACITY").await;
    for task in busy {
        assert_eq!(task.await.unwrap(), 200);
    }
    drop(runner);

    // Two subhosters: each may hold half of the four slots (the default).
    let runner = Runner::start(&[&subhosters[..], &["--max-isolates", "4"]].concat());
    let a1 = pid_as(&runner, KID, SECRET, "a1").await;
    let a2 = pid_as(&runner, KID, SECRET, "a2").await;
    pid_as(&runner, KID, SECRET, "a2").await;
    // At its cap, acme's next boot evicts acme's own least recently used idle isolate.
    let a3 = pid_as(&runner, KID, SECRET, "a3").await;
    wait_until("a1 to be evicted", Duration::from_secs(5), || !process_alive(a1)).await;
    assert!(process_alive(a2) && process_alive(a3));
    let metrics = runner.metrics().await;
    assert_eq!(
        metric(&metrics, r#"isocloud_isolate_terminations_total{reason="evicted_tenant_cap"}"#),
        1.0,
        "{metrics}"
    );

    // Both of acme's isolates busy: acme's next deployment is refused...
    let busy = hold_busy(&runner, KID, SECRET, &["a2", "a3"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = get_as(&runner, KID, SECRET, "a4", "/").await;
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()).as_deref(), Some("1"));
    let message = expect_error(response, 503, "CAPACITY").await;
    assert!(message.contains("tenant"), "{message}");
    // ...while the other subhoster still boots, the same deployment id too.
    let b1 = pid_as(&runner, OTHER_KID, OTHER_SECRET, "b1").await;
    let other_a1 = pid_as(&runner, OTHER_KID, OTHER_SECRET, "a1").await;
    assert_ne!(b1, other_a1);
    for task in busy {
        assert_eq!(task.await.unwrap(), 200);
    }
    let metrics = runner.metrics().await;
    assert_eq!(metric(&metrics, r#"isocloud_boot_refusals_total{reason="tenant_cap"}"#), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, r#"isocloud_boot_refusals_total{reason="max_isolates"}"#), 0.0, "{metrics}");
    let kids = origin.state.rpc_kids.lock().unwrap().clone();
    assert!(kids.contains(&OTHER_KID.to_owned()), "{kids:?}");
}
