//! A project's env vars. Values are read only to copy them into a new
//! deployment; the API never shows them.

use std::collections::BTreeMap;

use sqlx::AnyConnection;

use super::{Result, col};

#[derive(Debug, Clone)]
pub struct EnvVarRow {
    pub name: String,
    pub updated_at_ms: i64,
}

pub async fn list(conn: &mut AnyConnection, project_id: &str) -> Result<Vec<EnvVarRow>> {
    let rows = sqlx::query("SELECT name, updated_at_ms FROM env_vars WHERE project_id = $1 ORDER BY name")
        .bind(project_id)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| Ok(EnvVarRow { name: col(row, "name")?, updated_at_ms: col(row, "updated_at_ms")? }))
        .collect()
}

/// Name → value, for a deployment's snapshot.
pub async fn snapshot(conn: &mut AnyConnection, project_id: &str) -> Result<BTreeMap<String, String>> {
    let rows =
        sqlx::query("SELECT name, value FROM env_vars WHERE project_id = $1").bind(project_id).fetch_all(conn).await?;
    rows.iter().map(|row| Ok((col(row, "name")?, col(row, "value")?))).collect()
}

pub async fn exists(conn: &mut AnyConnection, project_id: &str, name: &str) -> Result<bool> {
    let row = sqlx::query("SELECT 1 AS hit FROM env_vars WHERE project_id = $1 AND name = $2")
        .bind(project_id)
        .bind(name)
        .fetch_optional(conn)
        .await?;
    Ok(row.is_some())
}

pub async fn count(conn: &mut AnyConnection, project_id: &str) -> Result<i64> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM env_vars WHERE project_id = $1")
        .bind(project_id)
        .fetch_one(conn)
        .await?;
    col(&row, "n")
}

pub async fn upsert(conn: &mut AnyConnection, project_id: &str, name: &str, value: &str, now_ms: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO env_vars (project_id, name, value, updated_at_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (project_id, name) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
    )
    .bind(project_id)
    .bind(name)
    .bind(value)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Returns whether there was such a var.
pub async fn delete(conn: &mut AnyConnection, project_id: &str, name: &str) -> Result<bool> {
    let result = sqlx::query("DELETE FROM env_vars WHERE project_id = $1 AND name = $2")
        .bind(project_id)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(result.rows_affected() > 0)
}
