//! What running deployments report: logs and lifecycle events in `logs`,
//! usage in `usage_records`, and the batch ids already stored (so a batch
//! delivered twice is stored once).

use isocloud_protocol::{ActivityBatch, ActivityEvent, ActivityKind};
use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Arg, Result, Sql, Store, col};
use crate::time::{now_ms, parse_rfc3339_ms};

/// Event times further ahead than this are taken as "now": a runner's
/// clock gone wrong must not keep rows past their retention.
const MAX_FUTURE_MS: i64 = 3_600_000;
/// Bounds on what one event may put into a row.
const MAX_MESSAGE_BYTES: usize = 16 * 1024;
const MAX_REQUEST_ID_BYTES: usize = 128;
const MAX_BATCH_ID_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogInsert {
    pub timestamp_ms: i64,
    pub kind: &'static str,
    pub level: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub deployment_id: String,
    pub interval_start_ms: i64,
    pub interval_end_ms: i64,
    pub requests: i64,
    pub errors: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub ingress_bytes: i64,
    pub egress_bytes: i64,
    pub peak_memory_bytes: i64,
    pub fetch_requests: i64,
    pub fetch_sent_bytes: i64,
    pub fetch_received_bytes: i64,
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn bounded(text: &str, max_bytes: usize) -> String {
    let cut = crate::validate::truncate(text, max_bytes);
    if cut.len() < text.len() { format!("{cut}…") } else { cut.to_owned() }
}

/// Splits a batch into log rows and usage rows for `deployment_id`. Events
/// naming another deployment are dropped (a batch is per deployment), as
/// are kinds this version does not know.
pub fn rows_from_batch(deployment_id: &str, events: &[ActivityEvent]) -> (Vec<LogInsert>, Vec<UsageRow>) {
    let mut logs = Vec::new();
    let mut usage = Vec::new();
    for event in events {
        if event.deployment_id != deployment_id {
            tracing::warn!(target: "isocloud::controlplane", deployment_id, other = event.deployment_id, "activity event for another deployment dropped");
            continue;
        }
        let now = now_ms();
        let timestamp_ms = match parse_rfc3339_ms(&event.timestamp) {
            Ok(ms) if ms <= now + MAX_FUTURE_MS => ms,
            _ => now,
        };
        let log = |kind: &'static str, message: String| LogInsert {
            timestamp_ms,
            kind,
            level: None,
            message: bounded(&message, MAX_MESSAGE_BYTES),
            request_id: None,
        };
        match &event.kind {
            ActivityKind::Log { level, message, request_id } => logs.push(LogInsert {
                level: Some(level.as_str().to_owned()),
                request_id: request_id.as_deref().map(|r| bounded(r, MAX_REQUEST_ID_BYTES)),
                ..log("log", message.clone())
            }),
            ActivityKind::Boot { boot_ms } => logs.push(log("boot", format!("isolate booted in {boot_ms} ms"))),
            ActivityKind::BootFailure { message } => logs.push(log("boot_failure", message.clone())),
            ActivityKind::UncaughtException { message } => logs.push(log("uncaught_exception", message.clone())),
            ActivityKind::CpuTimeLimit { limit, used } => logs.push(log(
                "cpu_time_limit",
                format!("isolate terminated: CPU time limit exceeded ({used} ms used, limit {limit} ms)"),
            )),
            ActivityKind::MemoryLimit { limit, used } => logs.push(log(
                "memory_limit",
                format!("isolate terminated: memory limit exceeded ({used} bytes used, limit {limit} bytes)"),
            )),
            ActivityKind::Terminated { reason } => {
                logs.push(log("terminated", format!("isolate terminated: {reason}")))
            }
            ActivityKind::Usage {
                requests,
                errors,
                cpu_ms,
                wall_ms,
                ingress_bytes,
                egress_bytes,
                peak_memory_bytes,
                fetch_requests,
                fetch_sent_bytes,
                fetch_received_bytes,
                interval_start,
                interval_end,
            } => {
                let interval_end_ms =
                    parse_rfc3339_ms(interval_end).ok().filter(|&ms| ms <= now + MAX_FUTURE_MS).unwrap_or(timestamp_ms);
                usage.push(UsageRow {
                    deployment_id: deployment_id.to_owned(),
                    interval_start_ms: parse_rfc3339_ms(interval_start).unwrap_or(interval_end_ms),
                    interval_end_ms,
                    requests: clamp(*requests),
                    errors: clamp(*errors),
                    cpu_ms: clamp(*cpu_ms),
                    wall_ms: clamp(*wall_ms),
                    ingress_bytes: clamp(*ingress_bytes),
                    egress_bytes: clamp(*egress_bytes),
                    peak_memory_bytes: clamp(*peak_memory_bytes),
                    fetch_requests: clamp(*fetch_requests),
                    fetch_sent_bytes: clamp(*fetch_sent_bytes),
                    fetch_received_bytes: clamp(*fetch_received_bytes),
                })
            }
        }
    }
    (logs, usage)
}

/// Stores a batch in one transaction. Returns `false` when the batch id was
/// stored before (nothing is written again).
pub async fn store_batch(store: &Store, deployment_id: &str, batch: &ActivityBatch) -> Result<bool> {
    let batch_id = bounded(&batch.batch_id, MAX_BATCH_ID_BYTES);
    let (logs, usage) = rows_from_batch(deployment_id, &batch.events);
    let mut tx = store.write().await?;
    let now = now_ms();
    let first = sqlx::query(
        "INSERT INTO activity_batches (batch_id, received_at_ms) VALUES ($1, $2) ON CONFLICT (batch_id) DO NOTHING",
    )
    .bind(&batch_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if first.rows_affected() == 0 {
        return Ok(false);
    }
    let project = sqlx::query("SELECT project_id FROM deployments WHERE id = $1")
        .bind(deployment_id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(project) = project else {
        // The deployment's project was deleted: the events have nowhere to
        // go, but the batch is taken (the runner must stop resending it).
        tx.commit().await?;
        return Ok(true);
    };
    let project_id: String = col(&project, "project_id")?;
    if !logs.is_empty() {
        // Late in the transaction: the meta row stays locked until commit.
        let row = sqlx::query("UPDATE meta SET next_log_id = next_log_id + $1 WHERE id = 1 RETURNING next_log_id")
            .bind(logs.len() as i64)
            .fetch_one(&mut *tx)
            .await?;
        let end: i64 = col(&row, "next_log_id")?;
        let first_id = end - logs.len() as i64;
        for chunk_start in (0..logs.len()).step_by(100) {
            let chunk = &logs[chunk_start..logs.len().min(chunk_start + 100)];
            let mut sql = Sql::new(
                "INSERT INTO logs (id, project_id, deployment_id, timestamp_ms, kind, level, message, request_id) VALUES ",
            );
            for (i, log) in chunk.iter().enumerate() {
                sql.push(if i == 0 { "(" } else { ", (" });
                sql.bind(Arg::Int(first_id + (chunk_start + i) as i64)).push(", ");
                sql.bind(Arg::Text(project_id.clone())).push(", ");
                sql.bind(Arg::Text(deployment_id.to_owned())).push(", ");
                sql.bind(Arg::Int(log.timestamp_ms)).push(", ");
                sql.bind(Arg::Text(log.kind.to_owned())).push(", ");
                match &log.level {
                    Some(level) => sql.bind(Arg::Text(level.clone())),
                    None => sql.push("NULL"),
                };
                sql.push(", ");
                sql.bind(Arg::Text(log.message.clone())).push(", ");
                match &log.request_id {
                    Some(id) => sql.bind(Arg::Text(id.clone())),
                    None => sql.push("NULL"),
                };
                sql.push(")");
            }
            sql.query().execute(&mut *tx).await?;
        }
    }
    for row in &usage {
        sqlx::query(
            "INSERT INTO usage_records (id, project_id, deployment_id, interval_start_ms, interval_end_ms, requests, \
             errors, cpu_ms, wall_ms, ingress_bytes, egress_bytes, peak_memory_bytes, fetch_requests, \
             fetch_sent_bytes, fetch_received_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(crate::ids::row_id())
        .bind(&project_id)
        .bind(deployment_id)
        .bind(row.interval_start_ms)
        .bind(row.interval_end_ms)
        .bind(row.requests)
        .bind(row.errors)
        .bind(row.cpu_ms)
        .bind(row.wall_ms)
        .bind(row.ingress_bytes)
        .bind(row.egress_bytes)
        .bind(row.peak_memory_bytes)
        .bind(row.fetch_requests)
        .bind(row.fetch_sent_bytes)
        .bind(row.fetch_received_bytes)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub id: i64,
    pub deployment_id: String,
    pub timestamp_ms: i64,
    pub kind: String,
    pub level: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
}

fn log_from_row(row: &AnyRow) -> Result<LogRow> {
    Ok(LogRow {
        id: col(row, "id")?,
        deployment_id: col(row, "deployment_id")?,
        timestamp_ms: col(row, "timestamp_ms")?,
        kind: col(row, "kind")?,
        level: col(row, "level")?,
        message: col(row, "message")?,
        request_id: col(row, "request_id")?,
    })
}

/// Which logs.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub project_id: Option<String>,
    pub deployment_id: Option<String>,
    pub since_ms: Option<i64>,
    /// Only ids above this (follow mode).
    pub after_id: Option<i64>,
}

/// The newest `limit` matching logs, returned oldest first (when
/// `newest`); or the oldest `limit` after `after_id` (follow mode).
pub async fn logs(conn: &mut AnyConnection, filter: &LogFilter, limit: i64, newest: bool) -> Result<Vec<LogRow>> {
    let mut sql =
        Sql::new("SELECT id, deployment_id, timestamp_ms, kind, level, message, request_id FROM logs WHERE 1 = 1");
    if let Some(project_id) = &filter.project_id {
        sql.push(" AND project_id = ").bind(Arg::Text(project_id.clone()));
    }
    if let Some(deployment_id) = &filter.deployment_id {
        sql.push(" AND deployment_id = ").bind(Arg::Text(deployment_id.clone()));
    }
    if let Some(since_ms) = filter.since_ms {
        sql.push(" AND timestamp_ms >= ").bind(Arg::Int(since_ms));
    }
    if let Some(after_id) = filter.after_id {
        sql.push(" AND id > ").bind(Arg::Int(after_id));
    }
    sql.push(if newest { " ORDER BY id DESC LIMIT " } else { " ORDER BY id ASC LIMIT " }).bind(Arg::Int(limit));
    let rows = sql.query().fetch_all(conn).await?;
    let mut logs = rows.iter().map(log_from_row).collect::<Result<Vec<_>>>()?;
    if newest {
        logs.reverse();
    }
    Ok(logs)
}

fn usage_from_row(row: &AnyRow) -> Result<UsageRow> {
    Ok(UsageRow {
        deployment_id: col(row, "deployment_id")?,
        interval_start_ms: col(row, "interval_start_ms")?,
        interval_end_ms: col(row, "interval_end_ms")?,
        requests: col(row, "requests")?,
        errors: col(row, "errors")?,
        cpu_ms: col(row, "cpu_ms")?,
        wall_ms: col(row, "wall_ms")?,
        ingress_bytes: col(row, "ingress_bytes")?,
        egress_bytes: col(row, "egress_bytes")?,
        peak_memory_bytes: col(row, "peak_memory_bytes")?,
        fetch_requests: col(row, "fetch_requests")?,
        fetch_sent_bytes: col(row, "fetch_sent_bytes")?,
        fetch_received_bytes: col(row, "fetch_received_bytes")?,
    })
}

/// The newest `limit` usage records, oldest first.
pub async fn usage(
    conn: &mut AnyConnection,
    project_id: &str,
    deployment_id: Option<&str>,
    since_ms: Option<i64>,
    limit: i64,
) -> Result<Vec<UsageRow>> {
    let mut sql = Sql::new(
        "SELECT deployment_id, interval_start_ms, interval_end_ms, requests, errors, cpu_ms, wall_ms, ingress_bytes, \
         egress_bytes, peak_memory_bytes, fetch_requests, fetch_sent_bytes, fetch_received_bytes \
         FROM usage_records WHERE project_id = ",
    );
    sql.bind(Arg::Text(project_id.to_owned()));
    if let Some(deployment_id) = deployment_id {
        sql.push(" AND deployment_id = ").bind(Arg::Text(deployment_id.to_owned()));
    }
    if let Some(since_ms) = since_ms {
        sql.push(" AND interval_start_ms >= ").bind(Arg::Int(since_ms));
    }
    sql.push(" ORDER BY interval_start_ms DESC, id DESC LIMIT ").bind(Arg::Int(limit));
    let rows = sql.query().fetch_all(conn).await?;
    let mut usage = rows.iter().map(usage_from_row).collect::<Result<Vec<_>>>()?;
    usage.reverse();
    Ok(usage)
}

/// One analytics bucket: sums over the usage records whose interval starts
/// in `[bucket_start_ms, bucket_start_ms + step)`, and the largest peak.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    pub bucket_start_ms: i64,
    pub requests: i64,
    pub errors: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub peak_memory_bytes: i64,
    pub ingress_bytes: i64,
    pub egress_bytes: i64,
}

/// Buckets with data in `[since_ms, until_ms)`, aligned to multiples of
/// `step_ms` since the epoch (`since_ms` is expected aligned). Summed in SQL.
pub async fn analytics(
    conn: &mut AnyConnection,
    project_id: &str,
    deployment_id: Option<&str>,
    since_ms: i64,
    until_ms: i64,
    step_ms: i64,
) -> Result<Vec<Bucket>> {
    let mut sql = Sql::new("SELECT interval_start_ms / ");
    sql.bind(Arg::Int(step_ms));
    sql.push(
        " AS bucket, CAST(SUM(requests) AS BIGINT) AS requests, CAST(SUM(errors) AS BIGINT) AS errors, \
         CAST(SUM(cpu_ms) AS BIGINT) AS cpu_ms, CAST(SUM(wall_ms) AS BIGINT) AS wall_ms, \
         MAX(peak_memory_bytes) AS peak_memory_bytes, CAST(SUM(ingress_bytes) AS BIGINT) AS ingress_bytes, \
         CAST(SUM(egress_bytes) AS BIGINT) AS egress_bytes FROM usage_records WHERE project_id = ",
    );
    sql.bind(Arg::Text(project_id.to_owned()));
    if let Some(deployment_id) = deployment_id {
        sql.push(" AND deployment_id = ").bind(Arg::Text(deployment_id.to_owned()));
    }
    sql.push(" AND interval_start_ms >= ").bind(Arg::Int(since_ms));
    sql.push(" AND interval_start_ms < ").bind(Arg::Int(until_ms));
    sql.push(" GROUP BY 1 ORDER BY 1");
    let rows = sql.query().fetch_all(conn).await?;
    rows.iter()
        .map(|row| {
            Ok(Bucket {
                bucket_start_ms: col::<i64>(row, "bucket")? * step_ms,
                requests: col(row, "requests")?,
                errors: col(row, "errors")?,
                cpu_ms: col(row, "cpu_ms")?,
                wall_ms: col(row, "wall_ms")?,
                peak_memory_bytes: col(row, "peak_memory_bytes")?,
                ingress_bytes: col(row, "ingress_bytes")?,
                egress_bytes: col(row, "egress_bytes")?,
            })
        })
        .collect()
}

/// Rows deleted per statement while pruning, so a large backlog never holds
/// the write lock for long.
const PRUNE_CHUNK_ROWS: i64 = 5_000;

/// Deletes logs, usage and seen batch ids older than their retention.
/// Returns how many rows went.
pub async fn prune(store: &Store, logs_before_ms: i64, usage_before_ms: i64, batches_before_ms: i64) -> Result<u64> {
    let statements = [
        ("DELETE FROM logs WHERE id IN (SELECT id FROM logs WHERE timestamp_ms < $1 LIMIT $2)", logs_before_ms),
        (
            "DELETE FROM usage_records WHERE id IN (SELECT id FROM usage_records WHERE interval_end_ms < $1 LIMIT $2)",
            usage_before_ms,
        ),
        (
            "DELETE FROM activity_batches WHERE batch_id IN \
             (SELECT batch_id FROM activity_batches WHERE received_at_ms < $1 LIMIT $2)",
            batches_before_ms,
        ),
    ];
    let mut total = 0;
    for (statement, before_ms) in statements {
        loop {
            let mut tx = store.write().await?;
            let deleted =
                sqlx::query(statement).bind(before_ms).bind(PRUNE_CHUNK_ROWS).execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            total += deleted;
            if deleted < PRUNE_CHUNK_ROWS as u64 {
                break;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use isocloud_protocol::LogLevel;

    fn event(deployment_id: &str, kind: ActivityKind) -> ActivityEvent {
        ActivityEvent { deployment_id: deployment_id.into(), timestamp: "2024-05-01T00:00:01Z".into(), kind }
    }

    #[test]
    fn future_times_become_now() {
        let mut future = event("d", ActivityKind::Terminated { reason: "idle".into() });
        future.timestamp = "2999-01-01T00:00:00Z".into();
        let (logs, _) = rows_from_batch("d", &[future]);
        assert!((logs[0].timestamp_ms - now_ms()).abs() < 60_000);
    }

    #[test]
    fn splits_events_into_rows() {
        let events = vec![
            event(
                "d",
                ActivityKind::Log { level: LogLevel::Warning, message: "hi".into(), request_id: Some("r1".into()) },
            ),
            event("d", ActivityKind::CpuTimeLimit { limit: 50, used: 80 }),
            event("other", ActivityKind::Boot { boot_ms: 3 }),
            // Built from JSON: usage from an older runner, without the later fields.
            serde_json::from_value(serde_json::json!({
                "deployment_id": "d", "timestamp": "2024-05-01T00:00:10Z", "type": "usage",
                "requests": 3, "cpu_ms": 4, "wall_ms": 5, "ingress_bytes": 6, "egress_bytes": 7,
                "peak_memory_bytes": u64::MAX, "interval_start": "2024-05-01T00:00:00Z",
                "interval_end": "2024-05-01T00:00:10Z"
            }))
            .unwrap(),
        ];
        let (logs, usage) = rows_from_batch("d", &events);
        assert_eq!(logs.len(), 2);
        assert_eq!(logs[0].level.as_deref(), Some("warning"));
        assert_eq!(logs[0].request_id.as_deref(), Some("r1"));
        assert_eq!(logs[0].timestamp_ms, 1_714_521_601_000);
        assert_eq!(logs[1].kind, "cpu_time_limit");
        assert!(logs[1].message.contains("80 ms"), "{}", logs[1].message);
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].peak_memory_bytes, i64::MAX);
        assert_eq!(usage[0].interval_end_ms - usage[0].interval_start_ms, 10_000);
        assert_eq!(usage[0].errors, 0);
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "x".repeat(MAX_MESSAGE_BYTES + 10);
        let events = vec![event("d", ActivityKind::BootFailure { message: long })];
        let (logs, _) = rows_from_batch("d", &events);
        assert!(logs[0].message.len() <= MAX_MESSAGE_BYTES + 3 && logs[0].message.ends_with('…'));
    }
}
