//! Projects, their git settings and their production history.

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Arg, Result, Sql, Touched, col, conflict_on_unique, note_routing_change};
use crate::validate::ProjectName;

#[derive(Debug, Clone)]
pub struct ProjectRow {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub production_deployment_id: Option<String>,
    pub git: Option<GitSettings>,
}

#[derive(Debug, Clone)]
pub struct GitSettings {
    pub repository: String,
    pub branch: String,
    /// A path in the repository's tree.
    pub entrypoint: String,
    /// The webhook's HMAC key. Kept as is (it must sign), never shown.
    pub secret: String,
}

const COLUMNS: &str = "id, name, created_at_ms, updated_at_ms, production_deployment_id, git_repository, git_branch, git_entrypoint, git_secret";

fn from_row(row: &AnyRow) -> Result<ProjectRow> {
    let repository: Option<String> = col(row, "git_repository")?;
    let git = match repository {
        Some(repository) => Some(GitSettings {
            repository,
            branch: col::<Option<String>>(row, "git_branch")?.unwrap_or_default(),
            entrypoint: col::<Option<String>>(row, "git_entrypoint")?.unwrap_or_default(),
            secret: col::<Option<String>>(row, "git_secret")?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(ProjectRow {
        id: col(row, "id")?,
        name: col(row, "name")?,
        created_at_ms: col(row, "created_at_ms")?,
        updated_at_ms: col(row, "updated_at_ms")?,
        production_deployment_id: col(row, "production_deployment_id")?,
        git,
    })
}

/// At most `limit` projects by name, after `after` (a name) when given.
pub async fn list(conn: &mut AnyConnection, after: Option<&str>, limit: i64) -> Result<Vec<ProjectRow>> {
    let rows = list_sql(after, limit).query().fetch_all(conn).await?;
    rows.iter().map(from_row).collect()
}

pub(crate) fn list_sql(after: Option<&str>, limit: i64) -> Sql {
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM projects WHERE name > "));
    sql.bind(Arg::Text(after.unwrap_or("").to_owned())).push(" ORDER BY name LIMIT ").bind(Arg::Int(limit));
    sql
}

pub(crate) fn by_name_sql(name: &str) -> Sql {
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM projects WHERE name = "));
    sql.bind(Arg::Text(name.to_owned()));
    sql
}

pub async fn by_name(conn: &mut AnyConnection, name: &str) -> Result<Option<ProjectRow>> {
    let row = by_name_sql(name).query().fetch_optional(conn).await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn by_id(conn: &mut AnyConnection, id: &str) -> Result<Option<ProjectRow>> {
    let row =
        sqlx::query(&format!("SELECT {COLUMNS} FROM projects WHERE id = $1")).bind(id).fetch_optional(conn).await?;
    row.as_ref().map(from_row).transpose()
}

/// Locks the project's row for the rest of the transaction (PostgreSQL; on
/// SQLite the write transaction holds the whole database) and returns it.
/// Everything that changes a project's production goes through this first,
/// so two promotions of one project never interleave.
pub async fn lock_by_name(conn: &mut AnyConnection, name: &str, now_ms: i64) -> Result<Option<ProjectRow>> {
    let row = sqlx::query(&format!("UPDATE projects SET updated_at_ms = $2 WHERE name = $1 RETURNING {COLUMNS}"))
        .bind(name)
        .bind(now_ms)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn insert(conn: &mut AnyConnection, id: &str, name: &ProjectName, now_ms: i64) -> Result<()> {
    let name = name.as_str();
    sqlx::query("INSERT INTO projects (id, name, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $3)")
        .bind(id)
        .bind(name)
        .bind(now_ms)
        .execute(conn)
        .await
        .map_err(conflict_on_unique(|| format!("a project named {name:?} already exists")))?;
    Ok(())
}

pub async fn rename(conn: &mut AnyConnection, id: &str, new_name: &ProjectName, now_ms: i64) -> Result<()> {
    let new_name = new_name.as_str();
    sqlx::query("UPDATE projects SET name = $2, updated_at_ms = $3 WHERE id = $1")
        .bind(id)
        .bind(new_name)
        .bind(now_ms)
        .execute(&mut *conn)
        .await
        .map_err(conflict_on_unique(|| format!("a project named {new_name:?} already exists")))?;
    note_routing_change(conn, &Touched::Project(id.to_owned())).await
}

/// Deletes the project; deployments, files, env vars, promotions, logs and
/// usage go by cascade, domains are detached (and keep their verification).
pub async fn delete(conn: &mut AnyConnection, id: &str) -> Result<()> {
    // What routed to it goes with it, each as a change of its own: the
    // nodes' tables keep no list of a project's deployments.
    for domain in super::domains::of_project(conn, id).await? {
        note_routing_change(conn, &Touched::Domain(domain)).await?;
    }
    for deployment in super::deployments::ready_of_project(conn, id).await? {
        note_routing_change(conn, &Touched::Deployment(deployment)).await?;
    }
    sqlx::query("UPDATE domains SET project_id = NULL WHERE project_id = $1").bind(id).execute(&mut *conn).await?;
    sqlx::query("DELETE FROM projects WHERE id = $1").bind(id).execute(&mut *conn).await?;
    note_routing_change(conn, &Touched::Project(id.to_owned())).await
}

pub async fn set_git(conn: &mut AnyConnection, id: &str, git: Option<&GitSettings>, now_ms: i64) -> Result<()> {
    sqlx::query(
        "UPDATE projects SET git_repository = $2, git_branch = $3, git_entrypoint = $4, git_secret = $5, updated_at_ms = $6 WHERE id = $1",
    )
    .bind(id)
    .bind(git.map(|g| g.repository.clone()))
    .bind(git.map(|g| g.branch.clone()))
    .bind(git.map(|g| g.entrypoint.clone()))
    .bind(git.map(|g| g.secret.clone()))
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Makes `deployment_id` production and records it in the history. The
/// caller has locked the project ([`lock_by_name`]) and checked that the
/// deployment is one of its ready ones.
pub async fn promote(conn: &mut AnyConnection, project_id: &str, deployment_id: &str, now_ms: i64) -> Result<()> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM promotions WHERE project_id = $1")
        .bind(project_id)
        .fetch_one(&mut *conn)
        .await?;
    let seq: i64 = col(&row, "seq")?;
    sqlx::query("INSERT INTO promotions (project_id, seq, deployment_id, promoted_at_ms) VALUES ($1, $2, $3, $4)")
        .bind(project_id)
        .bind(seq + 1)
        .bind(deployment_id)
        .bind(now_ms)
        .execute(&mut *conn)
        .await
        .map_err(conflict_on_unique(|| "the project's production changed concurrently; try again".to_owned()))?;
    set_production(conn, project_id, Some(deployment_id), now_ms).await
}

async fn set_production(
    conn: &mut AnyConnection,
    project_id: &str,
    deployment_id: Option<&str>,
    now_ms: i64,
) -> Result<()> {
    sqlx::query("UPDATE projects SET production_deployment_id = $2, updated_at_ms = $3 WHERE id = $1")
        .bind(project_id)
        .bind(deployment_id)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    note_routing_change(conn, &Touched::Project(project_id.to_owned())).await
}

/// One entry of the production history.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub seq: i64,
    pub deployment_id: String,
}

/// The production history, newest first.
pub async fn history(conn: &mut AnyConnection, project_id: &str) -> Result<Vec<Promotion>> {
    let rows = sqlx::query("SELECT seq, deployment_id FROM promotions WHERE project_id = $1 ORDER BY seq DESC")
        .bind(project_id)
        .fetch_all(conn)
        .await?;
    rows.iter().map(|row| Ok(Promotion { seq: col(row, "seq")?, deployment_id: col(row, "deployment_id")? })).collect()
}

/// Rolls back to the history entry `to` (the newest entry of its
/// deployment): every entry after it is dropped, so the one before it is
/// what a further rollback reaches.
pub async fn rollback_to(conn: &mut AnyConnection, project_id: &str, to: &Promotion, now_ms: i64) -> Result<()> {
    sqlx::query("DELETE FROM promotions WHERE project_id = $1 AND seq > $2")
        .bind(project_id)
        .bind(to.seq)
        .execute(&mut *conn)
        .await?;
    set_production(conn, project_id, Some(&to.deployment_id), now_ms).await
}

/// Every project's name and production deployment, for the routing table.
/// Project `id` as routing sees it (`None`: gone).
pub async fn routing_of(conn: &mut AnyConnection, id: &str) -> Result<Option<(String, Option<String>)>> {
    let row = sqlx::query("SELECT name, production_deployment_id FROM projects WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(|row| Ok((col(row, "name")?, col(row, "production_deployment_id")?))).transpose()
}

pub async fn routing_rows(conn: &mut AnyConnection) -> Result<Vec<(String, String, Option<String>)>> {
    let rows = sqlx::query("SELECT id, name, production_deployment_id FROM projects").fetch_all(conn).await?;
    rows.iter()
        .map(|row| Ok((col(row, "id")?, col(row, "name")?, col(row, "production_deployment_id")?)))
        .collect::<Result<Vec<_>>>()
}
