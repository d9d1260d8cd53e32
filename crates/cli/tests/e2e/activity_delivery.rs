//! Activity delivery end to end, through a real origin whose
//! `report_activity` fails (503) and then recovers: every line the isolate
//! printed arrives, each `batch_id` only ever with one content; a runner
//! stopped during the outage leaves its batches in the spool and the next
//! runner on the same state dir delivers them; a full spool drops the oldest
//! logs, and counts and reports what it dropped.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;
use serde_json::Value;

const CHATTY: &str = r#"
console.log("booted");
Deno.serve((req) => {
  const url = new URL(req.url);
  const tag = url.searchParams.get("tag");
  const lines = Number(url.searchParams.get("lines"));
  const pad = "x".repeat(Number(url.searchParams.get("pad") ?? "0"));
  for (let i = 0; i < lines; i++) console.log(pad ? `line ${tag} ${i} ${pad}` : `line ${tag} ${i}`);
  return new Response("ok");
});
"#;

const NOTE_PREFIX: &str = "[isocloud] activity events dropped: ";

/// Asks deployment `chatty` to print `lines` lines tagged `tag`; returns them.
async fn print(runner: &Runner, tag: &str, lines: usize, pad: usize) -> Vec<String> {
    let response = reqwest::Client::new()
        .get(format!("http://{}/?tag={tag}&lines={lines}&pad={pad}", runner.addr))
        .header("x-deno-subhost", subhost_token(claims_for("chatty")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let pad = "x".repeat(pad);
    (0..lines)
        .map(|i| if pad.is_empty() { format!("line {tag} {i}") } else { format!("line {tag} {i} {pad}") })
        .collect()
}

/// Each batch id with the content it came with; fails if one came with two.
fn one_content_per_batch_id(bodies: &[Value]) -> HashMap<String, Value> {
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for body in bodies {
        let id = body["batch_id"].as_str().expect("a batch_id").to_owned();
        assert!(!body["events"].as_array().expect("events").is_empty(), "an empty batch: {body}");
        match by_id.get(&id) {
            Some(first) => assert_eq!(first, body, "batch {id} arrived with two different contents"),
            None => {
                by_id.insert(id, body.clone());
            }
        }
    }
    by_id
}

/// The accepted events, one copy per batch id.
fn delivered_events(origin: &TestOrigin) -> Vec<Value> {
    one_content_per_batch_id(&origin.activity_batches())
        .into_values()
        .flat_map(|batch| batch["events"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Log messages delivered (one copy per batch id), with how many times each
/// arrived; drop notes left out.
fn delivered_lines(origin: &TestOrigin) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for event in delivered_events(origin) {
        let message = event["message"].as_str().unwrap_or_default();
        if event["type"] == "log" && !message.starts_with(NOTE_PREFIX) {
            *out.entry(message.to_owned()).or_default() += 1;
        }
    }
    out
}

fn spooled_batches(runner: &Runner) -> usize {
    match std::fs::read_dir(runner.state_dir.path().join("spool")) {
        Ok(dir) => dir.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".batch")).count(),
        Err(_) => 0,
    }
}

/// Whether some batch id was sent more than once (a retry happened).
fn a_batch_was_retried(origin: &TestOrigin) -> bool {
    let attempts = origin.activity_attempts();
    let ids: HashSet<&Value> = attempts.iter().map(|b| &b["batch_id"]).collect();
    attempts.len() > ids.len()
}

/// The value of `series` (name and labels) in a /metrics answer. The
/// registry's empty prefix puts a `_` before every name.
fn metric(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let value = line.trim_start_matches('_').strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

#[tokio::test]
async fn an_origin_that_fails_then_recovers_gets_every_line_once() {
    let origin = TestOrigin::start().await;
    origin.deploy("chatty", TestDeployment::inline_js(CHATTY));
    origin.fail_activity(Some(503));
    let runner = origin.runner(&[]);

    let mut printed = vec!["booted".to_owned()];
    for round in 0..3 {
        printed.extend(print(&runner, &format!("a{round}"), 40, 0).await);
    }
    wait_until("a refused batch to be retried", Duration::from_secs(20), || a_batch_was_retried(&origin)).await;
    assert!(origin.activity_batches().is_empty(), "the origin accepted nothing yet");
    assert!(spooled_batches(&runner) > 0, "refused batches wait on disk");
    // More output while the origin is down.
    for round in 0..2 {
        printed.extend(print(&runner, &format!("b{round}"), 40, 0).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    origin.fail_activity(None);
    wait_until("every refused batch to be accepted", Duration::from_secs(60), || {
        let accepted = one_content_per_batch_id(&origin.activity_batches());
        let lines = delivered_lines(&origin);
        printed.iter().all(|line| lines.contains_key(line))
            && one_content_per_batch_id(&origin.activity_attempts()).keys().all(|id| accepted.contains_key(id))
    })
    .await;

    // Nothing lost, nothing twice under different ids, no id with two contents.
    let lines = delivered_lines(&origin);
    for line in &printed {
        assert_eq!(lines[line], 1, "{line:?} arrived in more than one batch");
    }
    one_content_per_batch_id(&origin.activity_attempts());
    assert!(
        delivered_events(&origin).iter().any(|e| e["type"] == "boot" && e["deployment_id"] == "chatty"),
        "the lifecycle event arrived too"
    );
    wait_until("the spool to empty", Duration::from_secs(10), || spooled_batches(&runner) == 0).await;
    let metrics = runner.metrics().await;
    assert!(!metrics.contains("isocloud_activity_events_dropped_total{"), "{metrics}");
    assert_eq!(metric(&metrics, "isocloud_activity_spool_batches"), Some(0), "{metrics}");
}

#[tokio::test]
async fn a_restarted_runner_delivers_what_the_stopped_one_spooled() {
    let origin = TestOrigin::start().await;
    origin.deploy("chatty", TestDeployment::inline_js(CHATTY));
    origin.fail_activity(Some(503));
    let first = origin.runner_with_state(&[], tempfile::tempdir().unwrap());

    let mut printed = vec!["booted".to_owned()];
    printed.extend(print(&first, "run1", 60, 0).await);
    wait_until("a refused attempt", Duration::from_secs(20), || !origin.activity_attempts().is_empty()).await;

    // SIGTERM while the origin still refuses: the shutdown flush tries once
    // more, fails, and leaves the batches on disk.
    let (mut first, status) = tokio::task::spawn_blocking(move || {
        let mut first = first;
        let status = first.terminate(Duration::from_secs(30));
        (first, status)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}\n{}", first.stderr());
    assert!(spooled_batches(&first) > 0, "the batches outlive the runner");
    let refused_before_restart = one_content_per_batch_id(&origin.activity_attempts());
    assert!(origin.activity_batches().is_empty());

    // A new runner on the same state dir, with no request at all: it finds
    // the spool, and the origin under the name stored in each batch.
    let second = origin.runner_with_state(&[], first.take_state_dir());
    drop(first);
    let attempts_before = origin.activity_attempts().len();
    wait_until("the new runner to retry the old batches", Duration::from_secs(20), || {
        origin.activity_attempts().len() > attempts_before
    })
    .await;
    origin.fail_activity(None);
    wait_until("the earlier run's events to arrive", Duration::from_secs(60), || {
        let lines = delivered_lines(&origin);
        printed.iter().all(|line| lines.contains_key(line))
            && delivered_events(&origin).iter().any(|e| e["type"] == "terminated" && e["reason"] == "shutdown")
    })
    .await;

    let lines = delivered_lines(&origin);
    for line in &printed {
        assert_eq!(lines[line], 1, "{line:?} arrived in more than one batch");
    }
    // The same ids, with the same content, across the restart.
    let all = one_content_per_batch_id(&origin.activity_attempts());
    let accepted = one_content_per_batch_id(&origin.activity_batches());
    for (id, body) in &refused_before_restart {
        assert_eq!(accepted.get(id), Some(body), "batch {id} of the first run, delivered by the second");
    }
    assert!(all.len() >= refused_before_restart.len());
    wait_until("the spool to empty", Duration::from_secs(10), || spooled_batches(&second) == 0).await;
}

#[tokio::test]
async fn a_full_spool_drops_the_oldest_logs_and_reports_how_many() {
    let origin = TestOrigin::start().await;
    origin.deploy("chatty", TestDeployment::inline_js(CHATTY));
    origin.fail_activity(Some(503));
    let runner = origin.runner(&["--spool-max-mb", "1"]);

    // ~1.6 MB of console output into a 1 MB spool.
    let mut printed = vec!["booted".to_owned()];
    let mut last_round = Vec::new();
    for round in 0..8 {
        last_round = print(&runner, &format!("r{round}"), 200, 1000).await;
        printed.extend(last_round.iter().cloned());
    }
    let dropped_logs =
        || async { metric(&runner.metrics().await, r#"isocloud_activity_events_dropped_total{kind="log"}"#) };
    let mut dropped = None;
    for _ in 0..100 {
        dropped = dropped_logs().await;
        if dropped.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped.unwrap_or(0) > 0, "the spool was overfilled, so logs were dropped");
    let spool_bytes = metric(&runner.metrics().await, "isocloud_activity_spool_bytes").unwrap();
    assert!(spool_bytes <= 1024 * 1024, "logs stay within the bound: {spool_bytes}");

    origin.fail_activity(None);
    // Every printed line either arrived or was counted as dropped, and the
    // notes the origin got add up to the count.
    let mut settled = (0, 0, 0);
    for _ in 0..600 {
        let dropped = dropped_logs().await.unwrap_or(0);
        let lines = delivered_lines(&origin);
        let arrived = printed.iter().filter(|line| lines.contains_key(*line)).count() as u64;
        let noted: u64 = delivered_events(&origin)
            .iter()
            .filter_map(|e| e["message"].as_str()?.strip_prefix(NOTE_PREFIX)?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        settled = (dropped, arrived, noted);
        if arrived + dropped == printed.len() as u64 && noted == dropped && spooled_batches(&runner) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (dropped, arrived, noted) = settled;
    assert_eq!(arrived + dropped, printed.len() as u64, "arrived {arrived} + dropped {dropped} = printed");
    assert_eq!(noted, dropped, "the notes report every drop");

    let lines = delivered_lines(&origin);
    assert!(lines.values().all(|n| *n == 1));
    for line in &last_round {
        assert!(lines.contains_key(line), "the newest output is kept: {line:.20}…");
    }
    let events = delivered_events(&origin);
    assert!(events.iter().any(|e| e["type"] == "boot"), "lifecycle events are not dropped while logs are left");
    let note = events.iter().find(|e| e["message"].as_str().is_some_and(|m| m.starts_with(NOTE_PREFIX))).unwrap();
    assert_eq!(note["level"], "warning");
    assert_eq!(note["deployment_id"], "chatty");
    assert!(note.get("request_id").is_none(), "{note}");
    one_content_per_batch_id(&origin.activity_attempts());
}
