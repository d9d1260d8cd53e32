//! What running deployments report: logs and lifecycle events in `logs`,
//! usage in `usage_records`, and the batch ids already stored (so a batch
//! delivered twice is stored once).

use std::sync::atomic::{AtomicU64, Ordering};

use isocloud_protocol::{
    ActivityBatch, ActivityEvent, ActivityKind, LATENCY_BOUNDS_MS, LATENCY_BUCKETS, LatencyHistogram, StatusClasses,
};
use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::limits::{self, Limits, ProjectState};
use super::{Arg, Result, Sql, Store, col};
use crate::time::{format_ms, now_ms, parse_rfc3339_ms};

/// Event times further ahead than this are taken as "now": a runner's
/// clock gone wrong must not keep rows past their retention.
const MAX_FUTURE_MS: i64 = 3_600_000;
/// Bounds on what one event may put into a row, whatever the project's
/// own line bound (which is at most this; see [`limits::RULES`]).
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
const MAX_REQUEST_ID_BYTES: usize = 128;
const MAX_BATCH_ID_BYTES: usize = 256;
/// What a log row weighs beyond its message and request id: the other
/// columns and the three indexes, roughly (migration 0004 uses the same).
const LOG_ROW_OVERHEAD_BYTES: i64 = 96;
/// The rate bound's window.
const RATE_WINDOW_MS: i64 = 60_000;
/// The `type` of the entry that says how many lines were dropped.
pub const DROPPED_KIND: &str = "dropped";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogInsert {
    pub timestamp_ms: i64,
    pub kind: &'static str,
    pub level: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
}

impl LogInsert {
    /// The bytes this row counts for against its project's bounds.
    pub fn size_bytes(&self) -> i64 {
        (self.message.len() + self.request_id.as_ref().map_or(0, String::len)) as i64 + LOG_ROW_OVERHEAD_BYTES
    }

    /// Cuts the message to `max_bytes`, saying how much went. Returns
    /// whether it was cut.
    fn cut_to(&mut self, max_bytes: usize) -> bool {
        if self.message.len() <= max_bytes {
            return false;
        }
        let cut = crate::validate::truncate(&self.message, max_bytes);
        let more = self.message.len() - cut.len();
        self.message = format!("{cut}… [{more} more bytes cut: the line bound is {max_bytes} bytes]");
        true
    }
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
    /// Requests by time to the response head, per bucket of
    /// [`LATENCY_BOUNDS_MS`] and `+Inf` (zeros: not reported).
    pub latency: [i64; LATENCY_BUCKETS],
    /// Requests by status class, `[1xx, 2xx, 3xx, 4xx, 5xx]` (zeros: not reported).
    pub status: [i64; 5],
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The columns of [`UsageRow::latency`] then [`UsageRow::status`], in order
/// (migration 0008).
const EXTENSION_COLUMNS: [&str; LATENCY_BUCKETS + 5] = [
    "latency_le_5",
    "latency_le_10",
    "latency_le_25",
    "latency_le_50",
    "latency_le_100",
    "latency_le_250",
    "latency_le_500",
    "latency_le_1000",
    "latency_le_2500",
    "latency_le_5000",
    "latency_le_10000",
    "latency_le_inf",
    "status_1xx",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
];

/// Reads [`EXTENSION_COLUMNS`] of `row` into (latency, status).
fn extensions_of(row: &AnyRow) -> Result<([i64; LATENCY_BUCKETS], [i64; 5])> {
    let mut latency = [0; LATENCY_BUCKETS];
    let mut status = [0; 5];
    for (i, name) in EXTENSION_COLUMNS.iter().enumerate() {
        let value: i64 = col(row, name)?;
        if i < LATENCY_BUCKETS {
            latency[i] = value;
        } else {
            status[i - LATENCY_BUCKETS] = value;
        }
    }
    Ok((latency, status))
}

/// The most one usage row may add to a summed figure: 2^39 (half a
/// trillion requests, 512 GiB, 17 years of CPU in one interval — past any
/// runner's), so the sums over a project's rows (at most 10 million, the
/// top of `usage_rows`) stay within a BIGINT and the analytics' `SUM` never
/// overflows, whatever a runner reports.
pub const MAX_FIGURE: i64 = 1 << 39;

fn figure(value: u64) -> i64 {
    clamp(value).min(MAX_FIGURE)
}

/// Counts whose sum is at most [`MAX_FIGURE`], else `None` (a report
/// that claims more is garbage, not a figure to clip to).
fn bounded_counts<const N: usize>(counts: [u64; N]) -> Option<[i64; N]> {
    let sum = counts.iter().try_fold(0u64, |sum, &c| sum.checked_add(c))?;
    (sum <= MAX_FIGURE as u64).then(|| counts.map(|c| c as i64))
}

/// A usage event's latency histogram, checked: over exactly
/// [`LATENCY_BOUNDS_MS`] with one count per bucket and `+Inf`, summing to at
/// most [`MAX_FIGURE`]. Anything else is not stored (zeros, and a warning):
/// a runner's report is input, and other bounds would not merge.
pub fn checked_latency(deployment_id: &str, latency: Option<&LatencyHistogram>) -> [i64; LATENCY_BUCKETS] {
    let Some(latency) = latency else { return [0; LATENCY_BUCKETS] };
    let counts: Option<[u64; LATENCY_BUCKETS]> =
        (latency.le_ms == LATENCY_BOUNDS_MS).then(|| latency.counts.as_slice().try_into().ok()).flatten();
    match counts.and_then(bounded_counts) {
        Some(counts) => counts,
        None => {
            tracing::warn!(
                target: "isocloud::controlplane",
                deployment_id,
                buckets = latency.le_ms.len(),
                counts = latency.counts.len(),
                "usage latency histogram not stored: not over the fixed bounds, or its counts past the bound"
            );
            [0; LATENCY_BUCKETS]
        }
    }
}

/// A usage event's status classes, checked like [`checked_latency`].
pub fn checked_status(deployment_id: &str, status: Option<&StatusClasses>) -> [i64; 5] {
    let Some(status) = status else { return [0; 5] };
    bounded_counts(status.as_array()).unwrap_or_else(|| {
        tracing::warn!(target: "isocloud::controlplane", deployment_id, "usage status classes not stored: past the bound");
        [0; 5]
    })
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
                latency,
                status_classes,
            } => {
                let interval_end_ms =
                    parse_rfc3339_ms(interval_end).ok().filter(|&ms| ms <= now + MAX_FUTURE_MS).unwrap_or(timestamp_ms);
                usage.push(UsageRow {
                    deployment_id: deployment_id.to_owned(),
                    interval_start_ms: parse_rfc3339_ms(interval_start).unwrap_or(interval_end_ms),
                    interval_end_ms,
                    requests: figure(*requests),
                    errors: figure(*errors),
                    cpu_ms: figure(*cpu_ms),
                    wall_ms: figure(*wall_ms),
                    ingress_bytes: figure(*ingress_bytes),
                    egress_bytes: figure(*egress_bytes),
                    // Not summed (the analytics take the largest).
                    peak_memory_bytes: clamp(*peak_memory_bytes),
                    fetch_requests: figure(*fetch_requests),
                    fetch_sent_bytes: figure(*fetch_sent_bytes),
                    fetch_received_bytes: figure(*fetch_received_bytes),
                    latency: checked_latency(deployment_id, latency.as_ref()),
                    status: checked_status(deployment_id, status_classes.as_ref()),
                })
            }
        }
    }
    (logs, usage)
}

/// Lines dropped over a project's rate bound and removed oldest-first for
/// its total bound, by this process (for `/metrics`; the per-project counts
/// are in the store).
pub static LOG_LINES_DROPPED: AtomicU64 = AtomicU64::new(0);
pub static LOG_LINES_EVICTED: AtomicU64 = AtomicU64::new(0);

/// Stores a batch in one transaction, within the project's bounds (see
/// [`admit`] and [`evict_logs`]). Returns `false` when the batch id was
/// stored before (nothing is written again). A batch over a bound is still
/// taken whole (the runner must not resend it): what does not fit is
/// dropped and counted.
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
    if logs.is_empty() && usage.is_empty() {
        tx.commit().await?;
        return Ok(true);
    }
    // Batches of one project queue on its row from here to the commit.
    let mut state = limits::lock(&mut tx, &project_id, now).await?;
    let limits = state.overrides.limits();
    let dropped_before = state.dropped_lines;
    let mut logs = admit(&mut state, &limits, logs, now);
    if state.dropped_lines > dropped_before {
        note_dropped(&mut tx, &mut state, &limits, &mut logs, now).await?;
        LOG_LINES_DROPPED.fetch_add((state.dropped_lines - dropped_before) as u64, Ordering::Relaxed);
    }
    if !logs.is_empty() {
        let average_bytes = logs.iter().map(|(log, _)| log.size_bytes()).sum::<i64>() / logs.len() as i64;
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
                "INSERT INTO logs (id, project_id, deployment_id, timestamp_ms, kind, level, message, request_id, \
                 size_bytes) VALUES ",
            );
            for (i, (log, is_note)) in chunk.iter().enumerate() {
                let id = first_id + (chunk_start + i) as i64;
                if *is_note {
                    state.window_dropped_log_id = Some(id);
                }
                sql.push(if i == 0 { "(" } else { ", (" });
                sql.bind(Arg::Int(id)).push(", ");
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
                sql.push(", ");
                sql.bind(Arg::Int(log.size_bytes()));
                sql.push(")");
                state.log_bytes += log.size_bytes();
            }
            sql.query().execute(&mut *tx).await?;
        }
        let evicted_before = state.evicted_lines;
        evict_logs(&mut tx, &mut state, limits.log_bytes_total, average_bytes).await?;
        LOG_LINES_EVICTED.fetch_add((state.evicted_lines - evicted_before) as u64, Ordering::Relaxed);
    }
    for row in &usage {
        let mut sql = Sql::new(&format!(
            "INSERT INTO usage_records (id, project_id, deployment_id, interval_start_ms, interval_end_ms, requests, \
             errors, cpu_ms, wall_ms, ingress_bytes, egress_bytes, peak_memory_bytes, fetch_requests, \
             fetch_sent_bytes, fetch_received_bytes, {}) VALUES (",
            EXTENSION_COLUMNS.join(", ")
        ));
        let args = [
            Arg::Int(crate::ids::row_id()),
            Arg::Text(project_id.clone()),
            Arg::Text(deployment_id.to_owned()),
            Arg::Int(row.interval_start_ms),
            Arg::Int(row.interval_end_ms),
            Arg::Int(row.requests),
            Arg::Int(row.errors),
            Arg::Int(row.cpu_ms),
            Arg::Int(row.wall_ms),
            Arg::Int(row.ingress_bytes),
            Arg::Int(row.egress_bytes),
            Arg::Int(row.peak_memory_bytes),
            Arg::Int(row.fetch_requests),
            Arg::Int(row.fetch_sent_bytes),
            Arg::Int(row.fetch_received_bytes),
        ]
        .into_iter()
        .chain(row.latency.iter().chain(&row.status).map(|&count| Arg::Int(count)));
        for (i, arg) in args.enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(arg);
        }
        sql.push(")");
        sql.query().execute(&mut *tx).await?;
        state.usage_row_count += 1;
    }
    evict_usage(&mut tx, &mut state, limits.usage_rows).await?;
    limits::save(&mut tx, &state).await?;
    tx.commit().await?;
    Ok(true)
}

/// The line and rate bounds, on one batch's lines in order: each line is
/// cut to the line bound; a line that would take this minute's bytes past
/// the rate bound is dropped and counted (so past the bound the newest
/// lines go, and a short line may still fit after a long one went). The
/// lines to store come back, none of them the "dropped" entry (`false`).
fn admit(state: &mut ProjectState, limits: &Limits, logs: Vec<LogInsert>, now_ms: i64) -> Vec<(LogInsert, bool)> {
    if now_ms < state.window_start_ms || now_ms - state.window_start_ms >= RATE_WINDOW_MS {
        state.window_start_ms = now_ms;
        state.window_bytes = 0;
        state.window_dropped_log_id = None;
        state.window_dropped_lines = 0;
        state.window_dropped_bytes = 0;
    }
    let line_bytes = usize::try_from(limits.log_line_bytes).unwrap_or(usize::MAX);
    let mut kept = Vec::with_capacity(logs.len());
    for mut log in logs {
        if log.cut_to(line_bytes) {
            state.truncated_lines += 1;
        }
        let size = log.size_bytes();
        if state.window_bytes + size > limits.log_bytes_per_minute {
            state.window_dropped_lines += 1;
            state.window_dropped_bytes += size;
            state.dropped_lines += 1;
            state.dropped_bytes += size;
            continue;
        }
        state.window_bytes += size;
        kept.push((log, false));
    }
    kept
}

fn dropped_message(state: &ProjectState, limits: &Limits) -> String {
    format!(
        "{} log lines ({} bytes) dropped since {}: this project logged more than its bound of {} bytes a minute",
        state.window_dropped_lines,
        state.window_dropped_bytes,
        format_ms(state.window_start_ms),
        limits.log_bytes_per_minute
    )
}

/// Says in the logs themselves that lines were dropped: one entry of type
/// [`DROPPED_KIND`] a minute, its count brought up to date as more drop
/// (a new entry when this minute has none yet, or it was removed).
async fn note_dropped(
    conn: &mut AnyConnection,
    state: &mut ProjectState,
    limits: &Limits,
    logs: &mut Vec<(LogInsert, bool)>,
    now_ms: i64,
) -> Result<()> {
    let message = dropped_message(state, limits);
    if let Some(id) = state.window_dropped_log_id {
        let old = sqlx::query("SELECT size_bytes FROM logs WHERE id = $1").bind(id).fetch_optional(&mut *conn).await?;
        if let Some(old) = old {
            let old_bytes: i64 = col(&old, "size_bytes")?;
            let new_bytes = message.len() as i64 + LOG_ROW_OVERHEAD_BYTES;
            sqlx::query("UPDATE logs SET message = $2, size_bytes = $3 WHERE id = $1")
                .bind(id)
                .bind(&message)
                .bind(new_bytes)
                .execute(&mut *conn)
                .await?;
            state.log_bytes += new_bytes - old_bytes;
            return Ok(());
        }
    }
    let note = LogInsert {
        timestamp_ms: now_ms,
        kind: DROPPED_KIND,
        level: Some("warning".to_owned()),
        message,
        request_id: None,
    };
    logs.push((note, true));
    Ok(())
}

/// The total bound: while the project holds more log bytes than
/// `total_bytes`, its oldest lines go (down to 15/16 of the bound, so a
/// project at its bound does not delete on every batch), counted.
async fn evict_logs(
    conn: &mut AnyConnection,
    state: &mut ProjectState,
    total_bytes: i64,
    average_bytes: i64,
) -> Result<()> {
    if state.log_bytes <= total_bytes {
        return Ok(());
    }
    let target = total_bytes - total_bytes / 16;
    while state.log_bytes > target {
        let rows_wanted = ((state.log_bytes - target) / average_bytes.max(LOG_ROW_OVERHEAD_BYTES) + 1).clamp(1, 2_000);
        let rows = sqlx::query(
            "DELETE FROM logs WHERE id IN (SELECT id FROM logs WHERE project_id = $1 ORDER BY id LIMIT $2) \
             RETURNING size_bytes",
        )
        .bind(&state.project_id)
        .bind(rows_wanted)
        .fetch_all(&mut *conn)
        .await?;
        if rows.is_empty() {
            // Nothing left: the count had drifted (rows gone another way).
            state.log_bytes = 0;
            break;
        }
        for row in &rows {
            let size: i64 = col(row, "size_bytes")?;
            state.log_bytes -= size;
            state.evicted_lines += 1;
            state.evicted_bytes += size;
        }
    }
    Ok(())
}

/// The usage bound: past `max_rows`, the oldest intervals go (down to
/// 15/16 of the bound), counted.
async fn evict_usage(conn: &mut AnyConnection, state: &mut ProjectState, max_rows: i64) -> Result<()> {
    if state.usage_row_count <= max_rows {
        return Ok(());
    }
    let excess = state.usage_row_count - (max_rows - max_rows / 16);
    let deleted = sqlx::query(
        "DELETE FROM usage_records WHERE id IN \
         (SELECT id FROM usage_records WHERE project_id = $1 ORDER BY interval_start_ms, id LIMIT $2)",
    )
    .bind(&state.project_id)
    .bind(excess)
    .execute(conn)
    .await?
    .rows_affected() as i64;
    state.evicted_usage_rows += deleted;
    // Fewer than asked: the project had no more rows (the count had drifted).
    state.usage_row_count = if deleted < excess { 0 } else { state.usage_row_count - deleted };
    Ok(())
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
    /// Only ids below this (the next, older page of a list).
    pub before_id: Option<i64>,
}

/// The newest `limit` matching logs, returned oldest first (when
/// `newest`); or the oldest `limit` after `after_id` (follow mode).
pub async fn logs(conn: &mut AnyConnection, filter: &LogFilter, limit: i64, newest: bool) -> Result<Vec<LogRow>> {
    let rows = logs_sql(filter, limit, newest).query().fetch_all(conn).await?;
    let mut logs = rows.iter().map(log_from_row).collect::<Result<Vec<_>>>()?;
    if newest {
        logs.reverse();
    }
    Ok(logs)
}

pub(crate) fn logs_sql(filter: &LogFilter, limit: i64, newest: bool) -> Sql {
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
    if let Some(before_id) = filter.before_id {
        sql.push(" AND id < ").bind(Arg::Int(before_id));
    }
    sql.push(if newest { " ORDER BY id DESC LIMIT " } else { " ORDER BY id ASC LIMIT " }).bind(Arg::Int(limit));
    sql
}

fn usage_from_row(row: &AnyRow) -> Result<UsageRow> {
    let (latency, status) = extensions_of(row)?;
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
        latency,
        status,
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
    let mut sql = Sql::new(&format!(
        "SELECT deployment_id, interval_start_ms, interval_end_ms, requests, errors, cpu_ms, wall_ms, ingress_bytes, \
         egress_bytes, peak_memory_bytes, fetch_requests, fetch_sent_bytes, fetch_received_bytes, {} \
         FROM usage_records WHERE project_id = ",
        EXTENSION_COLUMNS.join(", ")
    ));
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
    /// The merged latency histogram (see [`UsageRow::latency`]).
    pub latency: [i64; LATENCY_BUCKETS],
    pub status: [i64; 5],
}

impl Bucket {
    /// The quantile `permille`/1000 of the bucket's merged latency
    /// histogram, as the upper bound (ms) of the histogram bucket it falls
    /// in: the smallest bound that at least that share of the timed
    /// requests did not pass. `None` when no request was timed; past the
    /// last bound (`+Inf`) it reads as the last bound, 10,000 ms, meaning
    /// "10 s or more" (the bucket's `latency_counts` tell how many).
    pub fn latency_quantile_ms(&self, permille: i64) -> Option<i64> {
        let total: i64 = self.latency.iter().sum();
        if total <= 0 {
            return None;
        }
        // The rank of the quantile's request, 1-based: ceil(share × total),
        // in integers (the sums are below 2^63; the product is not).
        let rank = ((i128::from(permille) * i128::from(total) + 999) / 1000).clamp(1, i128::from(total)) as i64;
        let mut seen = 0;
        for (i, &count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let last = LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1];
                return Some(LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(last) as i64);
            }
        }
        None
    }
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
         CAST(SUM(egress_bytes) AS BIGINT) AS egress_bytes",
    );
    for name in EXTENSION_COLUMNS {
        sql.push(&format!(", CAST(SUM({name}) AS BIGINT) AS {name}"));
    }
    sql.push(" FROM usage_records WHERE project_id = ");
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
            let (latency, status) = extensions_of(row)?;
            Ok(Bucket {
                bucket_start_ms: col::<i64>(row, "bucket")? * step_ms,
                requests: col(row, "requests")?,
                errors: col(row, "errors")?,
                cpu_ms: col(row, "cpu_ms")?,
                wall_ms: col(row, "wall_ms")?,
                peak_memory_bytes: col(row, "peak_memory_bytes")?,
                ingress_bytes: col(row, "ingress_bytes")?,
                egress_bytes: col(row, "egress_bytes")?,
                latency,
                status,
            })
        })
        .collect()
}

/// Rows deleted per statement while pruning, so a large backlog never holds
/// the write lock for long.
const PRUNE_CHUNK_ROWS: i64 = 5_000;

/// Deletes logs, usage and seen batch ids older than their retention,
/// taking them off their projects' counts. Returns how many rows went.
pub async fn prune(store: &Store, logs_before_ms: i64, usage_before_ms: i64, batches_before_ms: i64) -> Result<u64> {
    // (statement, cutoff, what a returned row takes off its project's count)
    let statements = [
        (
            "DELETE FROM logs WHERE id IN (SELECT id FROM logs WHERE timestamp_ms < $1 LIMIT $2) \
             RETURNING project_id, size_bytes",
            logs_before_ms,
            Some(true),
        ),
        (
            "DELETE FROM usage_records WHERE id IN (SELECT id FROM usage_records WHERE interval_end_ms < $1 LIMIT $2) \
             RETURNING project_id",
            usage_before_ms,
            Some(false),
        ),
        (
            "DELETE FROM activity_batches WHERE batch_id IN \
             (SELECT batch_id FROM activity_batches WHERE received_at_ms < $1 LIMIT $2) RETURNING batch_id",
            batches_before_ms,
            None,
        ),
    ];
    let mut total = 0;
    for (statement, before_ms, counts) in statements {
        loop {
            let mut tx = store.write().await?;
            let rows = sqlx::query(statement).bind(before_ms).bind(PRUNE_CHUNK_ROWS).fetch_all(&mut *tx).await?;
            if let Some(logs) = counts {
                let mut by_project = std::collections::HashMap::<String, i64>::new();
                for row in &rows {
                    let weight = if logs { col::<i64>(row, "size_bytes")? } else { 1 };
                    *by_project.entry(col(row, "project_id")?).or_default() += weight;
                }
                for (project_id, weight) in by_project {
                    let (log_bytes, usage_rows) = if logs { (weight, 0) } else { (0, weight) };
                    limits::forget(&mut tx, &project_id, log_bytes, usage_rows).await?;
                }
            }
            tx.commit().await?;
            let deleted = rows.len() as u64;
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

    fn usage_json(extra: serde_json::Value) -> ActivityEvent {
        let mut event = serde_json::json!({
            "deployment_id": "d", "timestamp": "2024-05-01T00:00:10Z", "type": "usage",
            "requests": 10, "cpu_ms": 4, "wall_ms": 5, "ingress_bytes": 6, "egress_bytes": 7,
            "peak_memory_bytes": 8, "interval_start": "2024-05-01T00:00:00Z",
            "interval_end": "2024-05-01T00:00:10Z"
        });
        for (key, value) in extra.as_object().unwrap() {
            event[key] = value.clone();
        }
        serde_json::from_value(event).unwrap()
    }

    #[test]
    fn latency_and_status_classes_are_stored_when_well_formed_and_dropped_when_not() {
        let good = usage_json(serde_json::json!({
            "latency": {"le_ms": LATENCY_BOUNDS_MS, "counts": [6, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 1]},
            "status_classes": {"2xx": 6, "4xx": 2, "5xx": 2}
        }));
        let (_, usage) = rows_from_batch("d", &[good]);
        assert_eq!(usage[0].latency, [6, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 1]);
        assert_eq!(usage[0].status, [0, 6, 0, 2, 2]);

        let u = u64::MAX;
        for garbage in [
            // Other bounds: they would not merge.
            serde_json::json!({"latency": {"le_ms": [1, 2], "counts": [1, 2, 3]}}),
            // One count short, one too many.
            serde_json::json!({"latency": {"le_ms": LATENCY_BOUNDS_MS, "counts": vec![1u64; 11]}}),
            serde_json::json!({"latency": {"le_ms": LATENCY_BOUNDS_MS, "counts": vec![1u64; 13]}}),
            // Counts whose sum overflows, or passes the per-row bound.
            serde_json::json!({"latency": {"le_ms": LATENCY_BOUNDS_MS, "counts": [u, u, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}}),
            serde_json::json!({"status_classes": {"2xx": MAX_FIGURE, "5xx": 1}}),
            serde_json::json!({"status_classes": {"1xx": u, "2xx": u}}),
        ] {
            let (_, usage) = rows_from_batch("d", &[usage_json(garbage.clone())]);
            assert_eq!((usage[0].latency, usage[0].status), ([0; 12], [0; 5]), "{garbage}");
            assert_eq!(usage[0].requests, 10, "the rest of the event is kept: {garbage}");
        }
        // Summed figures are bounded per row, so a project's sums fit a BIGINT.
        let (_, usage) = rows_from_batch("d", &[usage_json(serde_json::json!({"requests": u, "errors": u}))]);
        assert_eq!((usage[0].requests, usage[0].errors), (MAX_FIGURE, MAX_FIGURE));
        assert!(MAX_FIGURE.checked_mul(10_000_000).is_some());
    }

    #[test]
    fn quantiles_are_the_upper_bound_of_the_bucket_they_fall_in() {
        let mut bucket = Bucket::default();
        assert_eq!(bucket.latency_quantile_ms(500), None, "nothing timed");
        // 98 fast (≤ 5 ms), 2 slow (≤ 500 ms): p50 5, p99 500.
        bucket.latency[0] = 98;
        bucket.latency[6] = 2;
        assert_eq!((bucket.latency_quantile_ms(500), bucket.latency_quantile_ms(990)), (Some(5), Some(500)));
        // 99 of 100 fast: the 99th is still fast.
        bucket.latency[6] = 1;
        bucket.latency[0] = 99;
        assert_eq!(bucket.latency_quantile_ms(990), Some(5));
        // Past the last bound: the last bound ("10 s or more").
        bucket.latency = [0; 12];
        bucket.latency[11] = 1;
        assert_eq!(bucket.latency_quantile_ms(500), Some(10_000));
        // Huge counts do not overflow the rank.
        bucket.latency = [0; 12];
        bucket.latency[3] = MAX_FIGURE * 10_000;
        assert_eq!(bucket.latency_quantile_ms(990), Some(50));
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "x".repeat(MAX_MESSAGE_BYTES + 10);
        let events = vec![event("d", ActivityKind::BootFailure { message: long })];
        let (logs, _) = rows_from_batch("d", &events);
        assert!(logs[0].message.len() <= MAX_MESSAGE_BYTES + 3 && logs[0].message.ends_with('…'));
    }

    fn line(message: &str) -> LogInsert {
        LogInsert {
            timestamp_ms: 0,
            kind: "log",
            level: Some("info".into()),
            message: message.into(),
            request_id: None,
        }
    }

    #[test]
    fn lines_are_cut_to_the_line_bound_with_a_marker() {
        let limits = Limits { log_line_bytes: 128, ..limits::DEFAULT_LIMITS };
        let mut state = ProjectState::default();
        let kept = admit(&mut state, &limits, vec![line(&"é".repeat(100)), line("short")], 1_000);
        assert_eq!(state.truncated_lines, 1);
        let cut = &kept[0].0.message;
        assert!(cut.starts_with(&"é".repeat(64)) && !cut.starts_with(&"é".repeat(65)), "{cut}");
        assert!(cut.ends_with("… [72 more bytes cut: the line bound is 128 bytes]"), "{cut}");
        assert_eq!(kept[1].0.message, "short");
    }

    #[test]
    fn the_rate_bound_drops_the_newest_lines_and_counts_them() {
        let limits = Limits { log_bytes_per_minute: 10 * (LOG_ROW_OVERHEAD_BYTES + 4), ..limits::DEFAULT_LIMITS };
        let mut state = ProjectState { window_start_ms: 1_000, ..ProjectState::default() };
        let lines = (0..25).map(|i| line(&format!("{i:04}"))).collect();
        let kept = admit(&mut state, &limits, lines, 2_000);
        assert_eq!(kept.iter().map(|(l, _)| l.message.as_str()).collect::<Vec<_>>().last(), Some(&"0009"));
        assert_eq!((state.window_dropped_lines, state.dropped_lines), (15, 15));
        assert_eq!(state.dropped_bytes, 15 * (LOG_ROW_OVERHEAD_BYTES + 4));
        // Within the minute, nothing more fits; a minute later it does.
        assert!(admit(&mut state, &limits, vec![line("0025")], 30_000).is_empty());
        assert_eq!(state.dropped_lines, 16);
        assert_eq!(admit(&mut state, &limits, vec![line("0026")], 61_000).len(), 1);
        assert_eq!((state.window_dropped_lines, state.dropped_lines, state.window_start_ms), (0, 16, 61_000));
        assert!(
            dropped_message(&ProjectState { window_dropped_lines: 3, ..state }, &limits).starts_with("3 log lines")
        );
    }
}
