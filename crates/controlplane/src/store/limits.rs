//! Per-project bounds on what the control plane keeps (#21): log bytes a
//! minute and in all, a log line's length, usage rows. The defaults are
//! [`DEFAULT_LIMITS`]; an admin sets a project's own with
//! `PUT /projects/{name}/limits`. The `project_limits` row also counts what
//! the project holds and what was dropped, changed in the same transaction
//! as the rows it counts, so the bound never needs a scan of `logs`.

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Result, col};

/// The bounds in force for one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub log_bytes_per_minute: i64,
    pub log_bytes_total: i64,
    pub log_line_bytes: i64,
    pub usage_rows: i64,
}

/// The documented defaults (README, docs/security.md):
/// - 1 MiB of logs a minute: about 10,000 lines of 100 bytes, far more than
///   a healthy app prints, while a runaway loop stops costing the store at
///   ~1.4 GiB a day;
/// - 64 MiB of logs in all: an hour of the full rate, or days of an
///   ordinary app's lines; with the rate bound a project reaches it only
///   by logging hard for an hour. The store's worst case is projects × this;
/// - 16 KiB a line: a long stack trace fits;
/// - 100,000 usage rows: a busy isolate reports one every 10 s, so about
///   11 days of one isolate, 30 days of one reporting every 26 s.
pub const DEFAULT_LIMITS: Limits = Limits {
    log_bytes_per_minute: 1024 * 1024,
    log_bytes_total: 64 * 1024 * 1024,
    log_line_bytes: 16 * 1024,
    usage_rows: 100_000,
};

/// What an admin may set, with why each end is where it is.
pub const RULES: [(&str, i64, i64, &str); 4] = [
    (
        "log_bytes_per_minute",
        4 * 1024,
        1024 * 1024 * 1024,
        "a few lines a minute at least; a GiB a minute is more than one store takes from a project",
    ),
    ("log_bytes_total", 64 * 1024, 64 * 1024 * 1024 * 1024, "a screenful at least; 64 GiB is a disk"),
    ("log_line_bytes", 128, 1024 * 1024, "a short line at least; a MiB is more than anyone reads as one line"),
    ("usage_rows", 1_000, 10_000_000, "an hour of a few isolates at least; 10 million rows is a few GiB"),
];

/// A project's own settings; `None` keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    pub log_bytes_per_minute: Option<i64>,
    pub log_bytes_total: Option<i64>,
    pub log_line_bytes: Option<i64>,
    pub usage_rows: Option<i64>,
}

impl Overrides {
    pub fn limits(&self) -> Limits {
        Limits {
            log_bytes_per_minute: self.log_bytes_per_minute.unwrap_or(DEFAULT_LIMITS.log_bytes_per_minute),
            log_bytes_total: self.log_bytes_total.unwrap_or(DEFAULT_LIMITS.log_bytes_total),
            log_line_bytes: self.log_line_bytes.unwrap_or(DEFAULT_LIMITS.log_line_bytes),
            usage_rows: self.usage_rows.unwrap_or(DEFAULT_LIMITS.usage_rows),
        }
    }
}

/// A project's row: its settings, what it holds, what was dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectState {
    pub project_id: String,
    pub overrides: Overrides,
    pub log_bytes: i64,
    pub usage_row_count: i64,
    pub window_start_ms: i64,
    pub window_bytes: i64,
    pub window_dropped_log_id: Option<i64>,
    pub window_dropped_lines: i64,
    pub window_dropped_bytes: i64,
    pub dropped_lines: i64,
    pub dropped_bytes: i64,
    pub evicted_lines: i64,
    pub evicted_bytes: i64,
    pub truncated_lines: i64,
    pub evicted_usage_rows: i64,
}

const COLUMNS: &str = "project_id, log_bytes_per_minute, log_bytes_total, log_line_bytes, usage_rows, log_bytes, \
     usage_row_count, window_start_ms, window_bytes, window_dropped_log_id, window_dropped_lines, \
     window_dropped_bytes, dropped_lines, dropped_bytes, evicted_lines, evicted_bytes, truncated_lines, \
     evicted_usage_rows";

fn from_row(row: &AnyRow) -> Result<ProjectState> {
    Ok(ProjectState {
        project_id: col(row, "project_id")?,
        overrides: Overrides {
            log_bytes_per_minute: col(row, "log_bytes_per_minute")?,
            log_bytes_total: col(row, "log_bytes_total")?,
            log_line_bytes: col(row, "log_line_bytes")?,
            usage_rows: col(row, "usage_rows")?,
        },
        log_bytes: col(row, "log_bytes")?,
        usage_row_count: col(row, "usage_row_count")?,
        window_start_ms: col(row, "window_start_ms")?,
        window_bytes: col(row, "window_bytes")?,
        window_dropped_log_id: col(row, "window_dropped_log_id")?,
        window_dropped_lines: col(row, "window_dropped_lines")?,
        window_dropped_bytes: col(row, "window_dropped_bytes")?,
        dropped_lines: col(row, "dropped_lines")?,
        dropped_bytes: col(row, "dropped_bytes")?,
        evicted_lines: col(row, "evicted_lines")?,
        evicted_bytes: col(row, "evicted_bytes")?,
        truncated_lines: col(row, "truncated_lines")?,
        evicted_usage_rows: col(row, "evicted_usage_rows")?,
    })
}

/// The project's row as it is (a read), or a fresh one's figures when it
/// has none yet.
pub async fn get(conn: &mut AnyConnection, project_id: &str) -> Result<ProjectState> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM project_limits WHERE project_id = $1"))
        .bind(project_id)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => from_row(&row),
        None => {
            let (log_bytes, usage_row_count) = held(conn, project_id).await?;
            Ok(ProjectState { project_id: project_id.to_owned(), log_bytes, usage_row_count, ..Default::default() })
        }
    }
}

/// What the project's rows weigh, counted once when its row is made.
async fn held(conn: &mut AnyConnection, project_id: &str) -> Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE((SELECT SUM(size_bytes) FROM logs WHERE project_id = $1), 0) AS BIGINT) AS log_bytes, \
         CAST((SELECT COUNT(*) FROM usage_records WHERE project_id = $1) AS BIGINT) AS usage_rows",
    )
    .bind(project_id)
    .fetch_one(conn)
    .await?;
    Ok((col(&row, "log_bytes")?, col(&row, "usage_rows")?))
}

/// Locks the project's row for the rest of the write transaction (making it
/// when missing) and returns it. Batches of one project queue here.
pub async fn lock(conn: &mut AnyConnection, project_id: &str, now_ms: i64) -> Result<ProjectState> {
    let lock = format!(
        "UPDATE project_limits SET window_start_ms = window_start_ms WHERE project_id = $1 RETURNING {COLUMNS}"
    );
    if let Some(row) = sqlx::query(&lock).bind(project_id).fetch_optional(&mut *conn).await? {
        return from_row(&row);
    }
    let (log_bytes, usage_row_count) = held(conn, project_id).await?;
    sqlx::query(
        "INSERT INTO project_limits (project_id, log_bytes, usage_row_count, window_start_ms, window_bytes, \
         window_dropped_lines, window_dropped_bytes, dropped_lines, dropped_bytes, evicted_lines, evicted_bytes, \
         truncated_lines, evicted_usage_rows) VALUES ($1, $2, $3, $4, 0, 0, 0, 0, 0, 0, 0, 0, 0) \
         ON CONFLICT (project_id) DO NOTHING",
    )
    .bind(project_id)
    .bind(log_bytes)
    .bind(usage_row_count)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query(&lock).bind(project_id).fetch_one(&mut *conn).await?;
    from_row(&row)
}

/// Writes back the counters of a row taken with [`lock`].
pub async fn save(conn: &mut AnyConnection, state: &ProjectState) -> Result<()> {
    sqlx::query(
        "UPDATE project_limits SET log_bytes = $2, usage_row_count = $3, window_start_ms = $4, window_bytes = $5, \
         window_dropped_log_id = $6, window_dropped_lines = $7, window_dropped_bytes = $8, dropped_lines = $9, \
         dropped_bytes = $10, evicted_lines = $11, evicted_bytes = $12, truncated_lines = $13, \
         evicted_usage_rows = $14 WHERE project_id = $1",
    )
    .bind(&state.project_id)
    .bind(state.log_bytes)
    .bind(state.usage_row_count)
    .bind(state.window_start_ms)
    .bind(state.window_bytes)
    .bind(state.window_dropped_log_id)
    .bind(state.window_dropped_lines)
    .bind(state.window_dropped_bytes)
    .bind(state.dropped_lines)
    .bind(state.dropped_bytes)
    .bind(state.evicted_lines)
    .bind(state.evicted_bytes)
    .bind(state.truncated_lines)
    .bind(state.evicted_usage_rows)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets the project's own bounds (the row is made when missing).
pub async fn set_overrides(
    conn: &mut AnyConnection,
    project_id: &str,
    overrides: &Overrides,
    now_ms: i64,
) -> Result<ProjectState> {
    lock(conn, project_id, now_ms).await?;
    let row = sqlx::query(&format!(
        "UPDATE project_limits SET log_bytes_per_minute = $2, log_bytes_total = $3, log_line_bytes = $4, \
         usage_rows = $5 WHERE project_id = $1 RETURNING {COLUMNS}"
    ))
    .bind(project_id)
    .bind(overrides.log_bytes_per_minute)
    .bind(overrides.log_bytes_total)
    .bind(overrides.log_line_bytes)
    .bind(overrides.usage_rows)
    .fetch_one(conn)
    .await?;
    from_row(&row)
}

/// Takes rows pruned for their age off their projects' counts.
pub async fn forget(conn: &mut AnyConnection, project_id: &str, log_bytes: i64, usage_rows: i64) -> Result<()> {
    sqlx::query(
        "UPDATE project_limits SET \
         log_bytes = CASE WHEN log_bytes > $2 THEN log_bytes - $2 ELSE 0 END, \
         usage_row_count = CASE WHEN usage_row_count > $3 THEN usage_row_count - $3 ELSE 0 END \
         WHERE project_id = $1",
    )
    .bind(project_id)
    .bind(log_bytes)
    .bind(usage_rows)
    .execute(conn)
    .await?;
    Ok(())
}
