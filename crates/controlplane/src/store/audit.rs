//! The audit log: one row per API mutation (see
//! `migrations/0006_scoped_tokens.sql`), newest first by its id.

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Arg, Result, Sql, col};

/// How long entries are kept (pruned by the background loop).
pub const RETENTION_MS: i64 = 90 * 24 * 3600 * 1000;

/// One entry as it is written.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub token_id: String,
    pub token_name: String,
    pub action: String,
    pub target: String,
    pub project_id: Option<String>,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct EntryRow {
    pub id: String,
    pub at_ms: i64,
    pub token_id: String,
    pub token_name: String,
    pub action: String,
    pub target: String,
    /// The project's name now; `None` when it is gone (or there was none).
    pub project_name: Option<String>,
    pub status: i64,
    pub outcome: String,
}

/// `ok`, `denied` or `failed`, from the HTTP status.
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        401 | 403 => "denied",
        _ => "failed",
    }
}

/// An id that sorts by time: 15 digits of epoch ms, then a random suffix
/// (entries of one millisecond keep one order, whatever it is).
fn entry_id(at_ms: i64) -> String {
    format!("{:015}-{}", at_ms.max(0), crate::ids::base36(10))
}

/// The smallest id of entries at `at_ms` and after.
fn id_floor(at_ms: i64) -> String {
    format!("{:015}-", at_ms.max(0))
}

pub async fn insert(conn: &mut AnyConnection, entry: &NewEntry, at_ms: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (id, at_ms, token_id, token_name, action, target, project_id, status, outcome) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(entry_id(at_ms))
    .bind(at_ms)
    .bind(&entry.token_id)
    .bind(&entry.token_name)
    .bind(&entry.action)
    .bind(&entry.target)
    .bind(entry.project_id.as_deref())
    .bind(i64::from(entry.status))
    .bind(outcome(entry.status))
    .execute(conn)
    .await?;
    Ok(())
}

const COLUMNS: &str = "a.id, a.at_ms, a.token_id, a.token_name, a.action, a.target, a.project_id, \
                       p.name AS project_name, a.status, a.outcome";

pub(crate) fn list_sql(project_id: Option<&str>, before: Option<&str>, limit: i64) -> Sql {
    let mut sql =
        Sql::new(&format!("SELECT {COLUMNS} FROM audit_log a LEFT JOIN projects p ON p.id = a.project_id WHERE "));
    if let Some(project_id) = project_id {
        sql.push("a.project_id = ").bind(Arg::Text(project_id.to_owned())).push(" AND ");
    }
    // Without a cursor: before every id (digits sort before `~`).
    sql.push("a.id < ").bind(Arg::Text(before.unwrap_or("~").to_owned()));
    sql.push(" ORDER BY a.id DESC LIMIT ").bind(Arg::Int(limit));
    sql
}

/// At most `limit` entries, newest first, older than the entry `before`
/// when given, of one project when given.
pub async fn list(
    conn: &mut AnyConnection,
    project_id: Option<&str>,
    before: Option<&str>,
    limit: i64,
) -> Result<Vec<EntryRow>> {
    let rows = list_sql(project_id, before, limit).query().fetch_all(conn).await?;
    rows.iter().map(from_row).collect()
}

fn from_row(row: &AnyRow) -> Result<EntryRow> {
    Ok(EntryRow {
        id: col(row, "id")?,
        at_ms: col(row, "at_ms")?,
        token_id: col(row, "token_id")?,
        token_name: col(row, "token_name")?,
        action: col(row, "action")?,
        target: col(row, "target")?,
        project_name: col(row, "project_name")?,
        status: col(row, "status")?,
        outcome: col(row, "outcome")?,
    })
}

pub(crate) fn prune_sql(before_ms: i64) -> Sql {
    let mut sql = Sql::new("DELETE FROM audit_log WHERE id < ");
    sql.bind(Arg::Text(id_floor(before_ms)));
    sql
}

/// Deletes the entries older than `before_ms`: a range of the primary key.
pub async fn prune(conn: &mut AnyConnection, before_ms: i64) -> Result<u64> {
    Ok(prune_sql(before_ms).query().execute(conn).await?.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_the_floor_splits_them() {
        let (a, b) = (entry_id(999), entry_id(1_000));
        assert!(a < b, "{a} {b}");
        assert!(a < id_floor(1_000) && id_floor(1_000) <= b);
        assert!(entry_id(i64::from(u32::MAX) * 1000).as_str() < "~");
    }
}
