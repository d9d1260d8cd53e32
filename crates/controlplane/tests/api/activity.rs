//! What the runner reports through the origin: logs (listed and followed),
//! usage, analytics buckets, batch dedupe and retention.

use std::time::Duration;

use futures_util::StreamExt;
use isocloud_origin::ActivityBatch;
use serde_json::{Value, json};

use crate::backend_tests;
use crate::support::{Backend, TestServer, eventually};

backend_tests!(
    logs_are_stored_and_listed,
    logs_page_back_in_time,
    batches_are_stored_once,
    logs_follow,
    usage_and_analytics,
    latency_and_status_classes_in_usage_and_analytics,
    garbage_latency_and_status_classes_are_not_stored,
    retention_prunes
);

fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn batch(id: &str, events: Vec<Value>) -> ActivityBatch {
    ActivityBatch {
        batch_id: id.to_owned(),
        events: events.into_iter().map(|e| serde_json::from_value(e).expect("an activity event")).collect(),
    }
}

fn log(deployment: &str, at_ms: i64, message: &str) -> Value {
    json!({"deployment_id": deployment, "timestamp": rfc3339(at_ms), "type": "log", "level": "info", "message": message})
}

async fn two_deployments(s: &TestServer) -> (String, String) {
    s.create_project("p").await;
    let a = s.deploy("p", &[("main.ts", "// a")], "main.ts", true).await["id"].as_str().unwrap().to_owned();
    let b = s.deploy("p", &[("main.ts", "// b")], "main.ts", false).await["id"].as_str().unwrap().to_owned();
    (a, b)
}

async fn logs_are_stored_and_listed(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (a, b) = two_deployments(&s).await;
    let origin = s.cp.origin();
    let t = now_ms() - 60_000;
    let events = vec![
        json!({"deployment_id": a, "timestamp": rfc3339(t), "type": "boot", "boot_ms": 42}),
        json!({"deployment_id": a, "timestamp": rfc3339(t + 1), "type": "log", "level": "warning", "message": "careful", "request_id": "req-1"}),
        json!({"deployment_id": a, "timestamp": rfc3339(t + 2), "type": "uncaught_exception", "message": "boom"}),
        json!({"deployment_id": a, "timestamp": rfc3339(t + 3), "type": "cpu_time_limit", "limit": 50, "used": 75}),
        json!({"deployment_id": a, "timestamp": rfc3339(t + 4), "type": "memory_limit", "limit": 100, "used": 200}),
        json!({"deployment_id": a, "timestamp": rfc3339(t + 5), "type": "terminated", "reason": "idle"}),
        json!({"deployment_id": a, "timestamp": rfc3339(t + 6), "type": "boot_failure", "message": "syntax error"}),
        // Not this batch's deployment: dropped.
        json!({"deployment_id": b, "timestamp": rfc3339(t + 7), "type": "log", "level": "info", "message": "stray"}),
    ];
    origin.report_activity(&a, &batch("b-a", events)).await.unwrap();
    origin.report_activity(&b, &batch("b-b", vec![log(&b, t + 8, "from b")])).await.unwrap();

    let all = s.get("/api/v1/projects/p/logs").await.json();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 8, "{all:?}");
    let types: Vec<&str> = all.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["boot", "log", "uncaught_exception", "cpu_time_limit", "memory_limit", "terminated", "boot_failure", "log"]
    );
    let ids: Vec<i64> = all.iter().map(|l| l["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend: {ids:?}");
    let warning = &all[1];
    assert_eq!(warning["deployment_id"], a.as_str());
    assert_eq!(warning["level"], "warning");
    assert_eq!(warning["message"], "careful");
    assert_eq!(warning["request_id"], "req-1");
    assert_eq!(warning["timestamp"], crate::activity::format_ms(t + 1));
    assert_eq!(all[0]["level"], Value::Null);
    assert_eq!(all[0]["request_id"], Value::Null);
    assert!(all[3]["message"].as_str().unwrap().contains("75"), "{}", all[3]);

    let only_b = s.get(&format!("/api/v1/projects/p/logs?deployment={b}")).await.json();
    assert_eq!(only_b.as_array().unwrap().len(), 1);
    assert_eq!(only_b[0]["message"], "from b");
    assert_eq!(s.get(&format!("/api/v1/deployments/{a}/logs")).await.json().as_array().unwrap().len(), 7);
    let newest = s.get("/api/v1/projects/p/logs?limit=2").await.json();
    assert_eq!(newest.as_array().unwrap().iter().map(|l| l["id"].as_i64().unwrap()).collect::<Vec<_>>(), ids[6..]);
    let since = crate::activity::format_ms(t + 5).replace('Z', "%2B00:00");
    let recent = s.get(&format!("/api/v1/projects/p/logs?since={since}")).await.json();
    assert_eq!(recent.as_array().unwrap().len(), 3);

    s.get("/api/v1/projects/p/logs?since=yesterday").await.assert_error(400, "INVALID_FIELD", Some("since"));
    s.get("/api/v1/projects/p/logs?limit=1001").await.assert_error(400, "INVALID_FIELD", Some("limit"));
    s.get("/api/v1/projects/p/logs?follow=maybe").await.assert_error(400, "INVALID_FIELD", Some("follow"));
    s.get("/api/v1/projects/p/logs?deployment=zzzzzzzzzzzz").await.assert_error(404, "NOT_FOUND", None);
    s.create_project("q").await;
    s.get(&format!("/api/v1/projects/q/logs?deployment={a}")).await.assert_error(404, "NOT_FOUND", None);
    s.get("/api/v1/projects/nope/logs").await.assert_error(404, "NOT_FOUND", None);
    s.get("/api/v1/deployments/zzzzzzzzzzzz/logs").await.assert_error(404, "NOT_FOUND", None);
    // Unknown deployments' reports are taken (so the runner stops) and dropped.
    origin.report_activity("zzzzzzzzzzzz", &batch("b-z", vec![log("zzzzzzzzzzzz", t, "x")])).await.unwrap();
}

/// Pages of logs go back in time: each page newest-last, the `Link` to the
/// older ones keeping the filters; entries stored while paging shift nothing.
async fn logs_page_back_in_time(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (a, b) = two_deployments(&s).await;
    let origin = s.cp.origin();
    let t = now_ms() - 60_000;
    let events: Vec<Value> = (0..7).map(|n| log(&a, t + n, &format!("a{n}"))).collect();
    origin.report_activity(&a, &batch("b-a", events)).await.unwrap();
    origin.report_activity(&b, &batch("b-b", vec![log(&b, t + 20, "b0")])).await.unwrap();

    let first = s.get(&format!("/api/v1/projects/p/logs?deployment={a}&limit=3")).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let messages =
        |v: &Value| v.as_array().unwrap().iter().map(|l| l["message"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(messages(&first.json()), ["a4", "a5", "a6"]);
    let link = first.headers.get("link").expect("a link to older entries").to_str().unwrap().to_owned();
    assert!(link.contains(&format!("deployment={a}")) && link.contains("limit=3"), "{link}");
    let next = link.trim_start_matches('<').split('>').next().unwrap().to_owned();

    // A new entry arrives between two pages: the next page is unchanged.
    origin.report_activity(&a, &batch("b-a2", vec![log(&a, t + 30, "a-late")])).await.unwrap();
    let second = s.get(&next).await;
    assert_eq!(messages(&second.json()), ["a1", "a2", "a3"]);
    let link = second.headers.get("link").unwrap().to_str().unwrap();
    let last = s.get(link.trim_start_matches('<').split('>').next().unwrap()).await;
    assert_eq!(messages(&last.json()), ["a0"]);
    assert!(last.headers.get("link").is_none(), "the oldest page has no next");

    // The deployment's own list pages the same way.
    let own = s.get(&format!("/api/v1/deployments/{a}/logs?limit=7")).await;
    assert_eq!(messages(&own.json()), ["a1", "a2", "a3", "a4", "a5", "a6", "a-late"]);
    assert!(own.headers.get("link").unwrap().to_str().unwrap().starts_with(&format!("</api/v1/deployments/{a}/logs?")));
    s.get("/api/v1/projects/p/logs?cursor=bm90").await.assert_error(400, "INVALID_FIELD", Some("cursor"));
    let cursor = next.split("cursor=").nth(1).unwrap();
    s.get(&format!("/api/v1/projects/p/logs?follow=true&cursor={cursor}")).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("cursor"),
    );
}

pub fn format_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

async fn batches_are_stored_once(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (a, _) = two_deployments(&s).await;
    let origin = s.cp.origin();
    let t = now_ms();
    let first = batch("same-batch", vec![log(&a, t, "one"), log(&a, t + 1, "two")]);
    origin.report_activity(&a, &first).await.unwrap();
    origin.report_activity(&a, &first).await.unwrap();
    // Redelivered at once, concurrently.
    let second = batch("batch-2", vec![log(&a, t + 2, "three")]);
    let (x, y) = tokio::join!(origin.report_activity(&a, &second), origin.report_activity(&a, &second));
    x.unwrap();
    y.unwrap();
    let logs = s.get("/api/v1/projects/p/logs").await.json();
    let messages: Vec<&str> = logs.as_array().unwrap().iter().map(|l| l["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["one", "two", "three"]);
    let usage = batch(
        "usage-1",
        vec![json!({"deployment_id": a, "timestamp": rfc3339(t), "type": "usage", "requests": 5, "cpu_ms": 1,
            "wall_ms": 1, "ingress_bytes": 1, "egress_bytes": 1, "peak_memory_bytes": 1,
            "interval_start": rfc3339(t - 10_000), "interval_end": rfc3339(t)})],
    );
    origin.report_activity(&a, &usage).await.unwrap();
    origin.report_activity(&a, &usage).await.unwrap();
    assert_eq!(s.get("/api/v1/projects/p/usage").await.json().as_array().unwrap().len(), 1);
}

async fn logs_follow(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (a, b) = two_deployments(&s).await;
    let origin = s.cp.origin();
    origin.report_activity(&a, &batch("old", vec![log(&a, now_ms(), "before")])).await.unwrap();

    let response = s
        .client
        .get(s.url(&format!("/api/v1/projects/p/logs?follow=true&deployment={a}")))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut next_line = async || -> Value {
        loop {
            if let Some((line, rest)) = buffer.split_once('\n') {
                let value = serde_json::from_str(line).expect("an NDJSON line");
                buffer = rest.to_owned();
                return value;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.next()).await.expect("a line in time");
            buffer.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
        }
    };
    assert_eq!(next_line().await["message"], "before");
    assert_eq!(s.cp.active_log_follows(), 1);
    origin.report_activity(&b, &batch("other", vec![log(&b, now_ms(), "not followed")])).await.unwrap();
    origin
        .report_activity(&a, &batch("new", vec![log(&a, now_ms(), "after 1"), log(&a, now_ms(), "after 2")]))
        .await
        .unwrap();
    assert_eq!(next_line().await["message"], "after 1");
    assert_eq!(next_line().await["message"], "after 2");
    origin.report_activity(&a, &batch("newer", vec![log(&a, now_ms(), "after 3")])).await.unwrap();
    let third = next_line().await;
    assert_eq!(third["message"], "after 3");
    assert_eq!(third["deployment_id"], a.as_str());

    // The client goes away: the stream ends on the server too.
    drop(body);
    assert!(eventually(Duration::from_secs(10), || async { s.cp.active_log_follows() == 0 }).await);
}

async fn usage_and_analytics(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (a, b) = two_deployments(&s).await;
    let origin = s.cp.origin();
    let minute = 60_000;
    // Five minutes ago, on a minute boundary.
    let t0 = (now_ms() / minute) * minute - 5 * minute;
    let usage = |deployment: &str, start: i64, requests: u64, errors: u64, peak: u64| {
        json!({"deployment_id": deployment, "timestamp": rfc3339(start + 10_000), "type": "usage",
            "requests": requests, "errors": errors, "cpu_ms": requests * 2, "wall_ms": requests * 3,
            "ingress_bytes": 100, "egress_bytes": 200, "peak_memory_bytes": peak,
            "fetch_requests": 1, "fetch_sent_bytes": 2, "fetch_received_bytes": 3,
            "interval_start": rfc3339(start), "interval_end": rfc3339(start + 10_000)})
    };
    origin
        .report_activity(&a, &batch("u1", vec![usage(&a, t0 + 1_000, 2, 1, 100), usage(&a, t0 + 30_000, 3, 0, 300)]))
        .await
        .unwrap();
    origin.report_activity(&b, &batch("u2", vec![usage(&b, t0 + minute + 5_000, 7, 2, 50)])).await.unwrap();
    // Long ago: outside the default window.
    origin.report_activity(&a, &batch("u3", vec![usage(&a, t0 - 10 * 60 * minute, 1000, 0, 1)])).await.unwrap();

    let records = s.get("/api/v1/projects/p/usage").await.json();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 4);
    let first = &records[1];
    assert_eq!(first["deployment_id"], a.as_str());
    assert_eq!(first["requests"], 2);
    assert_eq!(first["errors"], 1);
    assert_eq!(first["cpu_ms"], 4);
    assert_eq!(first["wall_ms"], 6);
    assert_eq!(first["ingress_bytes"], 100);
    assert_eq!(first["egress_bytes"], 200);
    assert_eq!(first["peak_memory_bytes"], 100);
    assert_eq!(first["fetch_requests"], 1);
    assert_eq!(first["interval_start"], format_ms(t0 + 1_000));
    assert_eq!(first["interval_end"], format_ms(t0 + 11_000));
    let only_b = s.get(&format!("/api/v1/projects/p/usage?deployment={b}")).await.json();
    assert_eq!(only_b.as_array().unwrap().len(), 1);
    let since = format_ms(t0);
    assert_eq!(s.get(&format!("/api/v1/projects/p/usage?since={since}")).await.json().as_array().unwrap().len(), 3);

    let analytics = s.get(&format!("/api/v1/projects/p/analytics?since={since}&step_s=60")).await;
    assert_eq!(analytics.status, 200, "{}", analytics.text);
    let analytics = analytics.json();
    assert_eq!(analytics["step_s"], 60);
    let points = analytics["points"].as_array().unwrap();
    // t0 … now, one point per minute, zeros included.
    assert!(points.len() == 6 || points.len() == 7, "{}", points.len());
    assert_eq!(points[0]["t"], format_ms(t0));
    assert_eq!(
        points[0],
        json!({"t": format_ms(t0), "requests": 5, "errors": 1, "cpu_ms": 10, "wall_ms": 15,
               "peak_memory_bytes": 300, "ingress_bytes": 200, "egress_bytes": 400,
               // A report without the extensions: no classes, nothing timed.
               "status_1xx": 0, "status_2xx": 0, "status_3xx": 0, "status_4xx": 0, "status_5xx": 0,
               "latency_p50_ms": null, "latency_p99_ms": null, "latency_counts": vec![0; 12]})
    );
    assert_eq!(points[1]["t"], format_ms(t0 + minute));
    assert_eq!(points[1]["requests"], 7);
    assert_eq!(points[1]["errors"], 2);
    assert_eq!(points[1]["peak_memory_bytes"], 50);
    assert!(points[2..].iter().all(|p| p["requests"] == 0 && p["peak_memory_bytes"] == 0));
    // Coarser buckets sum both.
    let hourly = s.get(&format!("/api/v1/projects/p/analytics?since={since}&step_s=3600")).await.json();
    let total: i64 = hourly["points"].as_array().unwrap().iter().map(|p| p["requests"].as_i64().unwrap()).sum();
    assert_eq!(total, 12);
    let only_a = s.get(&format!("/api/v1/projects/p/analytics?since={since}&deployment={a}")).await.json();
    assert_eq!(only_a["points"][1]["requests"], 0);
    // The default window is the last hour.
    let default = s.get("/api/v1/projects/p/analytics").await.json();
    let total: i64 = default["points"].as_array().unwrap().iter().map(|p| p["requests"].as_i64().unwrap()).sum();
    assert_eq!(total, 12);

    s.get("/api/v1/projects/p/analytics?step_s=5").await.assert_error(400, "INVALID_FIELD", Some("step_s"));
    s.get("/api/v1/projects/p/analytics?since=2000-01-01T00:00:00Z&step_s=10").await.assert_error(
        400,
        "INVALID_FIELD",
        Some("step_s"),
    );
    s.get("/api/v1/projects/p/analytics?since=x").await.assert_error(400, "INVALID_FIELD", Some("since"));
    s.get("/api/v1/projects/p/usage?limit=-1").await.assert_error(400, "INVALID_FIELD", Some("limit"));
}

/// A usage event with the latency and status-class extensions, starting at
/// `start` (10 s long).
fn usage_with(deployment: &str, start: i64, requests: u64, extensions: Value) -> Value {
    let mut event = json!({"deployment_id": deployment, "timestamp": rfc3339(start + 10_000), "type": "usage",
        "requests": requests, "errors": 0, "cpu_ms": 1, "wall_ms": 1,
        "ingress_bytes": 10, "egress_bytes": 20, "peak_memory_bytes": 1,
        "interval_start": rfc3339(start), "interval_end": rfc3339(start + 10_000)});
    for (key, value) in extensions.as_object().unwrap() {
        event[key] = value.clone();
    }
    event
}

const LE_MS: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];

async fn latency_and_status_classes_in_usage_and_analytics(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (a, b) = two_deployments(&s).await;
    let origin = s.cp.origin();
    let minute = 60_000;
    let hour = 60 * minute;
    // In the last whole hour, so one hourly step holds all.
    let t0 = (now_ms() / hour) * hour - hour + 5 * minute;
    // Deployment a: 100 requests in two intervals of one minute; 97 fast
    // (≤ 5 ms), 2 at ≤ 250 ms, 1 past 10 s. Deployment b: 10 at ≤ 50 ms.
    let a1 = usage_with(
        &a,
        t0 + 1_000,
        60,
        json!({
            "latency": {"le_ms": LE_MS, "counts": [58, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0]},
            "status_classes": {"2xx": 50, "3xx": 2, "4xx": 6, "5xx": 2}
        }),
    );
    let a2 = usage_with(
        &a,
        t0 + 30_000,
        40,
        json!({
            "latency": {"le_ms": LE_MS, "counts": [39, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]},
            "status_classes": {"1xx": 1, "2xx": 38, "5xx": 1}
        }),
    );
    origin.report_activity(&a, &batch("l1", vec![a1, a2])).await.unwrap();
    let b1 = usage_with(
        &b,
        t0 + minute,
        10,
        json!({
            "latency": {"le_ms": LE_MS, "counts": [0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0]},
            "status_classes": {"2xx": 10}
        }),
    );
    origin.report_activity(&b, &batch("l2", vec![b1])).await.unwrap();

    // Each record as reported.
    let records = s.get(&format!("/api/v1/projects/p/usage?deployment={a}")).await.json();
    let first = &records[0];
    assert_eq!(
        (&first["status_1xx"], &first["status_2xx"], &first["status_3xx"], &first["status_4xx"], &first["status_5xx"]),
        (&json!(0), &json!(50), &json!(2), &json!(6), &json!(2))
    );
    assert_eq!(first["latency_counts"], json!([58, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0]));

    let since = format_ms(t0);
    let analytics = s.get(&format!("/api/v1/projects/p/analytics?since={since}&step_s=60")).await.json();
    assert_eq!(analytics["latency_le_ms"], json!(LE_MS));
    let points = analytics["points"].as_array().unwrap();
    // The first minute merges a's two histograms: 97 of 100 at ≤ 5 ms, the
    // 99th request at ≤ 250 ms (the upper bound of the bucket it falls in).
    let p = &points[0];
    assert_eq!(p["latency_counts"], json!([97, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 1]));
    assert_eq!((&p["latency_p50_ms"], &p["latency_p99_ms"]), (&json!(5), &json!(250)));
    assert_eq!(
        (&p["status_1xx"], &p["status_2xx"], &p["status_3xx"], &p["status_4xx"], &p["status_5xx"]),
        (&json!(1), &json!(88), &json!(2), &json!(6), &json!(3))
    );
    assert_eq!((&p["ingress_bytes"], &p["egress_bytes"]), (&json!(20), &json!(40)));
    let p = &points[1];
    assert_eq!((&p["latency_p50_ms"], &p["latency_p99_ms"]), (&json!(50), &json!(50)));
    assert_eq!(p["status_2xx"], 10);
    // A minute with nothing timed has no quantile.
    assert_eq!((&points[2]["latency_p50_ms"], &points[2]["latency_p99_ms"]), (&Value::Null, &Value::Null));
    // One step over all: 110 timed requests, the 109th (p99) at ≤ 250 ms.
    let hourly = s.get(&format!("/api/v1/projects/p/analytics?since={since}&step_s=3600")).await.json();
    let whole: Vec<&Value> =
        hourly["points"].as_array().unwrap().iter().filter(|p| p["requests"].as_i64().unwrap() > 0).collect();
    assert_eq!(whole.len(), 1, "{hourly}");
    assert_eq!(whole[0]["latency_counts"], json!([97, 0, 0, 10, 0, 2, 0, 0, 0, 0, 0, 1]));
    assert_eq!((&whole[0]["latency_p50_ms"], &whole[0]["latency_p99_ms"]), (&json!(5), &json!(250)));
    // One deployment's own.
    let only_b = s.get(&format!("/api/v1/projects/p/analytics?since={since}&step_s=3600&deployment={b}")).await.json();
    let only_b: Vec<&Value> =
        only_b["points"].as_array().unwrap().iter().filter(|p| p["requests"].as_i64().unwrap() > 0).collect();
    assert_eq!((&only_b[0]["latency_p99_ms"], &only_b[0]["status_2xx"]), (&json!(50), &json!(10)));
}

/// A runner's report is input: malformed extensions are not stored (the
/// rest of the event is), figures are bounded per row so the sums never
/// overflow, and a report of the wrong type is no activity event at all.
async fn garbage_latency_and_status_classes_are_not_stored(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (a, _) = two_deployments(&s).await;
    let origin = s.cp.origin();
    let minute = 60_000;
    let t0 = (now_ms() / minute) * minute - 2 * minute;
    let huge = u64::MAX;
    let garbage = [
        json!({"latency": {"le_ms": [1, 2, 3], "counts": [1, 1, 1, 1]}}),
        json!({"latency": {"le_ms": LE_MS, "counts": [1, 1]}}),
        json!({"latency": {"le_ms": LE_MS, "counts": vec![huge; 12]}}),
        json!({"status_classes": {"2xx": huge, "5xx": huge}}),
        json!({"status_classes": {"4xx": 1u64 << 40}}),
    ];
    let events = garbage.iter().enumerate().map(|(i, g)| usage_with(&a, t0 + i as i64 * 1_000, 3, g.clone())).collect();
    origin.report_activity(&a, &batch("g1", events)).await.unwrap();
    // Two more: requests past the per-row bound, twice (their sum would
    // overflow a BIGINT unbounded).
    let big = vec![
        usage_with(&a, t0 + 10_000, huge, json!({"status_classes": {"2xx": 1}})),
        usage_with(&a, t0 + 11_000, huge, json!({})),
    ];
    origin.report_activity(&a, &batch("g2", big)).await.unwrap();

    let records = s.get("/api/v1/projects/p/usage").await.json();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 7, "every event kept");
    for record in &records[..5] {
        assert_eq!(record["requests"], 3, "{record}");
        assert_eq!(record["latency_counts"], json!(vec![0; 12]), "{record}");
        let classes: i64 = (1..=5).map(|c| record[format!("status_{c}xx")].as_i64().unwrap()).sum();
        assert_eq!(classes, 0, "{record}");
    }
    assert_eq!(records[5]["status_2xx"], 1, "a well-formed extension beside a huge figure is kept");
    let bound = records[5]["requests"].as_i64().unwrap();
    assert!(bound < i64::MAX / 10_000_000 + 1, "bounded per row: {bound}");
    // The sums answer (no overflow, no 500).
    let analytics = s.get(&format!("/api/v1/projects/p/analytics?since={}&step_s=3600", format_ms(t0))).await;
    assert_eq!(analytics.status, 200, "{}", analytics.text);
    let total: i64 =
        analytics.json()["points"].as_array().unwrap().iter().map(|p| p["requests"].as_i64().unwrap()).sum();
    assert_eq!(total, 15 + 2 * bound);
    // Counts of the wrong type are not an activity event: the HTTP origin
    // refuses such a batch whole (400), the runner's spool never makes one.
    let mut wrong = usage_with(&a, t0, 1, json!({}));
    wrong["latency"] = json!({"le_ms": LE_MS, "counts": ["many"]});
    assert!(serde_json::from_value::<isocloud_protocol::ActivityEvent>(wrong).is_err());
    let mut wrong = usage_with(&a, t0, 1, json!({}));
    wrong["status_classes"] = json!({"2xx": -1});
    assert!(serde_json::from_value::<isocloud_protocol::ActivityEvent>(wrong).is_err());
}

async fn retention_prunes(backend: Backend) {
    let s = TestServer::start_with(backend, |o| {
        o.log_retention = Duration::from_secs(3600);
        o.usage_retention = Duration::from_secs(2 * 3600);
    })
    .await;
    let (a, _) = two_deployments(&s).await;
    let origin = s.cp.origin();
    let now = now_ms();
    let hour = 3_600_000;
    let usage = |end: i64| {
        json!({"deployment_id": a, "timestamp": rfc3339(end), "type": "usage", "requests": 1, "cpu_ms": 1,
            "wall_ms": 1, "ingress_bytes": 1, "egress_bytes": 1, "peak_memory_bytes": 1,
            "interval_start": rfc3339(end - 10_000), "interval_end": rfc3339(end)})
    };
    origin
        .report_activity(
            &a,
            &batch(
                "mixed",
                vec![
                    log(&a, now - 2 * hour, "old"),
                    log(&a, now - 1000, "new"),
                    usage(now - 3 * hour),
                    usage(now - 90 * 60_000),
                ],
            ),
        )
        .await
        .unwrap();
    let deleted = s.cp.prune().await.unwrap();
    assert_eq!(deleted, 2);
    let logs = s.get("/api/v1/projects/p/logs").await.json();
    assert_eq!(logs.as_array().unwrap().iter().map(|l| l["message"].as_str().unwrap()).collect::<Vec<_>>(), ["new"]);
    assert_eq!(s.get("/api/v1/projects/p/usage").await.json().as_array().unwrap().len(), 1);
    // The batch id is remembered as long as its events are kept.
    origin.report_activity(&a, &batch("mixed", vec![log(&a, now, "again")])).await.unwrap();
    assert_eq!(s.get("/api/v1/projects/p/logs").await.json().as_array().unwrap().len(), 1);
}
