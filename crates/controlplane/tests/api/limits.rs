//! What the control plane keeps for a project is bounded per project (#21
//! row 9): a line's length, log bytes a minute (the newest go, counted, and
//! said in the logs), log bytes in all (the oldest go, counted), usage rows;
//! an admin sets a project's own; another project's logs are never touched.

use isocloud_origin::ActivityBatch;
use serde_json::{Value, json};

use crate::backend_tests;
use crate::support::{Backend, TestServer};

backend_tests!(
    lines_are_cut_to_the_line_bound,
    the_rate_bound_drops_and_says_so,
    the_total_bound_removes_the_oldest_of_that_project_only,
    pruning_takes_rows_off_the_count,
    usage_rows_are_bounded,
    limits_are_checked_and_reset,
);

fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn lines(deployment: &str, id: &str, messages: impl IntoIterator<Item = String>) -> ActivityBatch {
    let t = now_ms();
    let events = messages
        .into_iter()
        .map(|m| {
            json!({"deployment_id": deployment, "timestamp": rfc3339(t), "type": "log", "level": "info", "message": m})
        })
        .map(|e| serde_json::from_value(e).unwrap())
        .collect();
    ActivityBatch { batch_id: id.to_owned(), events }
}

async fn project_with_deployment(s: &TestServer, name: &str) -> String {
    s.create_project(name).await;
    s.deploy(name, &[("main.ts", "// x")], "main.ts", true).await["id"].as_str().unwrap().to_owned()
}

async fn messages(s: &TestServer, project: &str) -> Vec<Value> {
    let reply = s.get(&format!("/api/v1/projects/{project}/logs?limit=1000")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json().as_array().unwrap().clone()
}

async fn lines_are_cut_to_the_line_bound(backend: Backend) {
    let s = TestServer::start(backend).await;
    let d = project_with_deployment(&s, "p").await;
    let origin = s.cp.origin();
    // Probe: a line under the default bound (16 KiB) is kept whole.
    origin.report_activity(&d, &lines(&d, "b1", ["x".repeat(10_000)])).await.unwrap();
    assert_eq!(messages(&s, "p").await[0]["message"].as_str().unwrap().len(), 10_000);

    s.put("/api/v1/projects/p/limits", json!({"log_line_bytes": 1024})).await;
    origin.report_activity(&d, &lines(&d, "b2", ["y".repeat(10_000)])).await.unwrap();
    let cut = messages(&s, "p").await[1]["message"].as_str().unwrap().to_owned();
    assert!(cut.starts_with(&"y".repeat(1024)) && !cut.starts_with(&"y".repeat(1025)), "{}", cut.len());
    assert!(cut.ends_with("… [8976 more bytes cut: the line bound is 1024 bytes]"), "{cut}");
    assert_eq!(s.get("/api/v1/projects/p/limits").await.json()["dropped"]["log_lines_truncated"], 1);
}

async fn the_rate_bound_drops_and_says_so(backend: Backend) {
    let s = TestServer::start(backend).await;
    let d = project_with_deployment(&s, "p").await;
    let origin = s.cp.origin();
    let reply = s.put("/api/v1/projects/p/limits", json!({"log_bytes_per_minute": 64 * 1024})).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["log_bytes_per_minute"], 64 * 1024);
    // Probe: under the rate, every line is kept and nothing is counted.
    origin.report_activity(&d, &lines(&d, "probe", (0..10).map(|i| format!("probe {i}")))).await.unwrap();
    let reply = s.get("/api/v1/projects/p/logs").await;
    assert_eq!(reply.json().as_array().unwrap().len(), 10);
    assert_eq!(reply.headers["x-isocloud-log-lines-dropped"], "0");

    // 300 lines of ~1 KiB in three batches: about 60 fit in the minute.
    for b in 0..3 {
        let batch = lines(&d, &format!("noisy-{b}"), (0..100).map(|i| format!("{b}-{i:03} {}", "z".repeat(1000))));
        origin.report_activity(&d, &batch).await.unwrap();
    }
    let limits = s.get("/api/v1/projects/p/limits").await.json();
    let dropped = limits["dropped"]["log_lines_over_rate"].as_i64().unwrap();
    assert!((230..=250).contains(&dropped), "{limits}");
    assert!(limits["held"]["log_bytes_this_minute"].as_i64().unwrap() <= 64 * 1024, "{limits}");
    let reply = s.get("/api/v1/projects/p/logs?limit=1000").await;
    assert_eq!(reply.headers["x-isocloud-log-lines-dropped"], dropped.to_string().as_str());
    let logs = reply.json();
    let logs = logs.as_array().unwrap();
    // The oldest lines of the minute are the ones kept; the newest went.
    assert!(logs.iter().any(|l| l["message"].as_str().unwrap().starts_with("0-000 ")));
    assert!(!logs.iter().any(|l| l["message"].as_str().unwrap().starts_with("2-099 ")));
    // One entry says so, brought up to date as more dropped.
    let notes: Vec<&Value> = logs.iter().filter(|l| l["type"] == "dropped").collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    let note = notes[0]["message"].as_str().unwrap();
    assert!(note.starts_with(&format!("{dropped} log lines (")), "{note}");
    assert!(note.contains("its bound of 65536 bytes a minute"), "{note}");
    assert_eq!(notes[0]["level"], "warning");
}

async fn the_total_bound_removes_the_oldest_of_that_project_only(backend: Backend) {
    let s = TestServer::start(backend).await;
    let noisy = project_with_deployment(&s, "noisy").await;
    let quiet = project_with_deployment(&s, "quiet").await;
    let origin = s.cp.origin();
    origin.report_activity(&quiet, &lines(&quiet, "q", ["quiet's line".to_owned()])).await.unwrap();
    let total = 128 * 1024;
    s.put("/api/v1/projects/noisy/limits", json!({"log_bytes_per_minute": 16 * 1024 * 1024, "log_bytes_total": total}))
        .await;
    // 1,000 lines of ~1 KiB: eight times the bound.
    for b in 0..10 {
        let batch = lines(&noisy, &format!("n{b}"), (0..100).map(|i| format!("{b}-{i:03} {}", "n".repeat(1000))));
        origin.report_activity(&noisy, &batch).await.unwrap();
    }
    let limits = s.get("/api/v1/projects/noisy/limits").await.json();
    let held = limits["held"]["log_bytes"].as_i64().unwrap();
    assert!(held <= total && held > total / 2, "{limits}");
    let evicted = limits["dropped"]["log_lines_evicted"].as_i64().unwrap();
    assert_eq!(limits["dropped"]["log_lines_over_rate"], 0, "{limits}");
    let kept = messages(&s, "noisy").await;
    assert_eq!(kept.len() as i64 + evicted, 1000, "{limits}");
    // Oldest first: what is left is the newest, in order, ending at the last.
    assert!(kept.last().unwrap()["message"].as_str().unwrap().starts_with("9-099 "));
    assert!(!kept.iter().any(|l| l["message"].as_str().unwrap().starts_with("0-000 ")));
    let stored: i64 = kept.iter().map(|l| l["message"].as_str().unwrap().len() as i64 + 96).sum();
    assert_eq!(stored, held, "the count is the rows' weight");
    let reply = s.get("/api/v1/projects/noisy/logs").await;
    assert_eq!(reply.headers["x-isocloud-log-lines-evicted"], evicted.to_string().as_str());
    // The other project's line is untouched.
    assert_eq!(messages(&s, "quiet").await[0]["message"], "quiet's line");
}

async fn pruning_takes_rows_off_the_count(backend: Backend) {
    let s = TestServer::start_with(backend, |o| o.log_retention = std::time::Duration::from_secs(3600)).await;
    let d = project_with_deployment(&s, "p").await;
    let origin = s.cp.origin();
    let mut old = lines(&d, "old", (0..5).map(|i| format!("old {i}")));
    let two_hours_ago = rfc3339(now_ms() - 7_200_000);
    for event in &mut old.events {
        event.timestamp = two_hours_ago.clone();
    }
    origin.report_activity(&d, &old).await.unwrap();
    origin.report_activity(&d, &lines(&d, "new", ["new".to_owned()])).await.unwrap();
    let held = |v: Value| v["held"]["log_bytes"].as_i64().unwrap();
    assert_eq!(held(s.get("/api/v1/projects/p/limits").await.json()), 5 * (5 + 96) + 3 + 96);
    s.cp.prune().await.unwrap();
    assert_eq!(held(s.get("/api/v1/projects/p/limits").await.json()), 3 + 96);
    assert_eq!(messages(&s, "p").await.len(), 1);
}

async fn usage_rows_are_bounded(backend: Backend) {
    let s = TestServer::start(backend).await;
    let d = project_with_deployment(&s, "p").await;
    let origin = s.cp.origin();
    s.put("/api/v1/projects/p/limits", json!({"usage_rows": 1000})).await;
    let t0 = now_ms() - 3_600_000;
    for b in 0..3 {
        let events: Vec<Value> = (0..500)
            .map(|i| {
                let start = t0 + (b * 500 + i) * 1000;
                json!({"deployment_id": d, "timestamp": rfc3339(start + 1000), "type": "usage", "requests": 1,
                    "cpu_ms": 1, "wall_ms": 1, "ingress_bytes": 1, "egress_bytes": 1, "peak_memory_bytes": 1,
                    "interval_start": rfc3339(start), "interval_end": rfc3339(start + 1000)})
            })
            .collect();
        let batch = ActivityBatch {
            batch_id: format!("u{b}"),
            events: events.into_iter().map(|e| serde_json::from_value(e).unwrap()).collect(),
        };
        origin.report_activity(&d, &batch).await.unwrap();
    }
    let limits = s.get("/api/v1/projects/p/limits").await.json();
    let held = limits["held"]["usage_rows"].as_i64().unwrap();
    assert!(held <= 1000, "{limits}");
    assert_eq!(held + limits["dropped"]["usage_rows_evicted"].as_i64().unwrap(), 1500, "{limits}");
    let rows = s.get("/api/v1/projects/p/usage?limit=10000").await.json();
    assert_eq!(rows.as_array().unwrap().len() as i64, held);
    // The newest intervals are the ones kept.
    let last = rows.as_array().unwrap().last().unwrap()["interval_start"].as_str().unwrap().to_owned();
    let first = rows.as_array().unwrap()[0]["interval_start"].as_str().unwrap().to_owned();
    assert!(first > rfc3339(t0 + 400_000) && last.starts_with(&rfc3339(t0 + 1499 * 1000)[..19]), "{first} {last}");
}

async fn limits_are_checked_and_reset(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("p").await;
    let defaults = s.get("/api/v1/projects/p/limits").await.json();
    assert_eq!(
        (
            &defaults["log_bytes_per_minute"],
            &defaults["log_bytes_total"],
            &defaults["log_line_bytes"],
            &defaults["usage_rows"]
        ),
        (&json!(1_048_576), &json!(67_108_864), &json!(16_384), &json!(100_000))
    );
    assert_eq!(defaults["held"]["log_bytes"], 0);
    s.put("/api/v1/projects/p/limits", json!({"log_bytes_total": 10})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("log_bytes_total"),
    );
    s.put("/api/v1/projects/p/limits", json!({"usage_rows": 1_000_000_000})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("usage_rows"),
    );
    s.put("/api/v1/projects/p/limits", json!({"log_bytes_per_minute": 8192, "log_line_bytes": 16384}))
        .await
        .assert_error(400, "INVALID_FIELD", Some("log_line_bytes"));
    let reply = s.put("/api/v1/projects/p/limits", json!({"log_bytes": 1})).await;
    assert_eq!((reply.status, reply.code()), (400, "INVALID_REQUEST".to_owned()), "{}", reply.text);
    s.put("/api/v1/projects/nope/limits", json!({})).await.assert_error(404, "NOT_FOUND", None);

    let set = s.put("/api/v1/projects/p/limits", json!({"log_bytes_total": 1_048_576, "usage_rows": 5000})).await;
    assert_eq!(set.status, 200, "{}", set.text);
    assert_eq!((&set.json()["log_bytes_total"], &set.json()["usage_rows"]), (&json!(1_048_576), &json!(5000)));
    assert_eq!(set.json()["defaults"]["log_bytes_total"], 67_108_864);
    // Left out or null: the default again.
    let reset = s.put("/api/v1/projects/p/limits", json!({"usage_rows": null})).await.json();
    assert_eq!((&reset["log_bytes_total"], &reset["usage_rows"]), (&json!(67_108_864), &json!(100_000)));
}
