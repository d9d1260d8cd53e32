//! Deployments (immutable once ready) and their files.

use std::collections::BTreeMap;

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Arg, Result, Sql, StoreError, Touched, col, note_routing_change};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Building,
    Ready,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Building => "building",
            Status::Ready => "ready",
            Status::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "building" => Ok(Status::Building),
            "ready" => Ok(Status::Ready),
            "failed" => Ok(Status::Failed),
            other => Err(StoreError::Corrupt(format!("deployment status {other:?}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitInfo {
    pub commit: String,
    pub message: String,
    pub branch: String,
}

#[derive(Debug, Clone)]
pub struct DeploymentRow {
    pub id: String,
    pub project_id: String,
    pub project_name: String,
    /// The project's current production deployment.
    pub production_deployment_id: Option<String>,
    pub created_at_ms: i64,
    pub status: Status,
    pub error: Option<String>,
    /// A module specifier (`file:///src/main.ts`).
    pub entrypoint: String,
    pub eszip_sha256: Option<String>,
    /// `{"net": …}` as given.
    pub permissions_json: String,
    /// The env vars copied at creation, name → value.
    pub envs: BTreeMap<String, String>,
    pub git: Option<GitInfo>,
    pub file_count: i64,
    pub size_bytes: i64,
    pub build_promote: bool,
    /// What the build step printed (deno's output, cleaned), when one ran.
    pub build_log: Option<String>,
}

impl DeploymentRow {
    pub fn is_production(&self) -> bool {
        self.production_deployment_id.as_deref() == Some(self.id.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    pub path: String,
    /// Empty for a symlink.
    pub sha256: String,
    pub size_bytes: i64,
    /// A symlink a build made (npm's `node_modules` layout): relative, and
    /// inside the deployment (checked when the build collects it).
    pub symlink_target: Option<String>,
}

impl FileRow {
    pub fn file(path: impl Into<String>, sha256: impl Into<String>, size_bytes: i64) -> Self {
        Self { path: path.into(), sha256: sha256.into(), size_bytes, symlink_target: None }
    }
}

/// What [`insert`] writes.
#[derive(Debug, Clone)]
pub struct NewDeployment {
    pub id: String,
    pub project_id: String,
    pub created_at_ms: i64,
    pub status: Status,
    pub entrypoint: String,
    pub eszip_sha256: Option<String>,
    pub permissions_json: String,
    pub envs: BTreeMap<String, String>,
    pub git: Option<GitInfo>,
    pub files: Vec<FileRow>,
    pub build_promote: bool,
    /// Why it failed (`status` failed: its build did).
    pub error: Option<String>,
    pub build_log: Option<String>,
}

const COLUMNS: &str = "d.id, d.project_id, p.name AS project_name, p.production_deployment_id, d.created_at_ms, \
     d.status, d.error, d.entrypoint, d.eszip_sha256, d.permissions_json, d.envs_json, d.git_commit, d.git_message, \
     d.git_branch, d.file_count, d.size_bytes, d.build_promote, d.build_log";

fn from_row(row: &AnyRow) -> Result<DeploymentRow> {
    let envs_json: String = col(row, "envs_json")?;
    let envs = serde_json::from_str(&envs_json).map_err(|e| StoreError::Corrupt(format!("envs_json: {e}")))?;
    let commit: Option<String> = col(row, "git_commit")?;
    let git = match commit {
        Some(commit) => Some(GitInfo {
            commit,
            message: col::<Option<String>>(row, "git_message")?.unwrap_or_default(),
            branch: col::<Option<String>>(row, "git_branch")?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(DeploymentRow {
        id: col(row, "id")?,
        project_id: col(row, "project_id")?,
        project_name: col(row, "project_name")?,
        production_deployment_id: col(row, "production_deployment_id")?,
        created_at_ms: col(row, "created_at_ms")?,
        status: Status::parse(&col::<String>(row, "status")?)?,
        error: col(row, "error")?,
        entrypoint: col(row, "entrypoint")?,
        eszip_sha256: col(row, "eszip_sha256")?,
        permissions_json: col(row, "permissions_json")?,
        envs,
        git,
        file_count: col(row, "file_count")?,
        size_bytes: col(row, "size_bytes")?,
        build_promote: col::<i64>(row, "build_promote")? != 0,
        build_log: col(row, "build_log")?,
    })
}

/// Rows per multi-row INSERT: well under SQLite's and PostgreSQL's bounds on
/// bound parameters.
const FILES_PER_INSERT: usize = 200;

async fn insert_files(conn: &mut AnyConnection, deployment_id: &str, files: &[FileRow]) -> Result<()> {
    for chunk in files.chunks(FILES_PER_INSERT) {
        let mut sql =
            Sql::new("INSERT INTO deployment_files (deployment_id, path, sha256, size_bytes, symlink_target) VALUES ");
        for (i, file) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(Arg::Text(deployment_id.to_owned())).push(", ");
            sql.bind(Arg::Text(file.path.clone())).push(", ");
            sql.bind(Arg::Text(file.sha256.clone())).push(", ");
            sql.bind(Arg::Int(file.size_bytes)).push(", ");
            match &file.symlink_target {
                Some(target) => sql.bind(Arg::Text(target.clone())).push(")"),
                None => sql.push("NULL)"),
            };
        }
        sql.query().execute(&mut *conn).await?;
    }
    Ok(())
}

pub async fn insert(conn: &mut AnyConnection, new: &NewDeployment) -> Result<()> {
    let envs_json = serde_json::to_string(&new.envs).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let size_bytes: i64 = new.files.iter().map(|f| f.size_bytes).sum();
    sqlx::query(
        "INSERT INTO deployments (id, project_id, created_at_ms, status, error, entrypoint, eszip_sha256, \
         permissions_json, envs_json, git_commit, git_message, git_branch, file_count, size_bytes, build_promote, \
         build_log) VALUES ($1, $2, $3, $4, $15, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $16)",
    )
    .bind(&new.id)
    .bind(&new.project_id)
    .bind(new.created_at_ms)
    .bind(new.status.as_str())
    .bind(&new.entrypoint)
    .bind(new.eszip_sha256.as_deref())
    .bind(&new.permissions_json)
    .bind(envs_json)
    .bind(new.git.as_ref().map(|g| g.commit.clone()))
    .bind(new.git.as_ref().map(|g| g.message.clone()))
    .bind(new.git.as_ref().map(|g| g.branch.clone()))
    .bind(new.files.len() as i64)
    .bind(size_bytes)
    .bind(i64::from(new.build_promote))
    .bind(new.error.as_deref())
    .bind(new.build_log.as_deref())
    .execute(&mut *conn)
    .await?;
    insert_files(conn, &new.id, &new.files).await?;
    if new.status == Status::Ready {
        // A new deployment URL routes from now on.
        note_routing_change(conn, &Touched::Deployment(new.id.clone())).await?;
    }
    Ok(())
}

pub(crate) fn get_sql(id: &str) -> Sql {
    let mut sql =
        Sql::new(&format!("SELECT {COLUMNS} FROM deployments d JOIN projects p ON p.id = d.project_id WHERE d.id = "));
    sql.bind(Arg::Text(id.to_owned()));
    sql
}

pub async fn get(conn: &mut AnyConnection, id: &str) -> Result<Option<DeploymentRow>> {
    let row = get_sql(id).query().fetch_optional(conn).await?;
    row.as_ref().map(from_row).transpose()
}

/// Newest first.
pub(crate) fn list_by_project_sql(project_id: &str, after: Option<(i64, &str)>, limit: i64) -> Sql {
    // Without a cursor: after everything (a time past any, an id past any).
    let (after_ms, after_id) = after.unwrap_or((i64::MAX, "~"));
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM deployments d JOIN projects p ON p.id = d.project_id WHERE d.project_id = "
    ));
    sql.bind(Arg::Text(project_id.to_owned())).push(" AND (d.created_at_ms < ").bind(Arg::Int(after_ms));
    sql.push(" OR (d.created_at_ms = ")
        .bind(Arg::Int(after_ms))
        .push(" AND d.id < ")
        .bind(Arg::Text(after_id.to_owned()));
    sql.push(")) ORDER BY d.created_at_ms DESC, d.id DESC LIMIT ").bind(Arg::Int(limit));
    sql
}

/// At most `limit` of the project's deployments, newest first, after
/// `after` (`(created_at_ms, id)` of the last one seen) when given.
pub async fn list_by_project(
    conn: &mut AnyConnection,
    project_id: &str,
    after: Option<(i64, &str)>,
    limit: i64,
) -> Result<Vec<DeploymentRow>> {
    let rows = list_by_project_sql(project_id, after, limit).query().fetch_all(conn).await?;
    rows.iter().map(from_row).collect()
}

pub(crate) fn files_sql(postgres: bool, deployment_id: &str) -> Sql {
    // One row holding the listing as JSON, not a row per file: a built
    // deployment lists ~600 files, and the driver's cost is per row (582
    // rows took 2.6 ms here, their JSON a fraction of it).
    let mut sql = Sql::new(if postgres {
        "SELECT COALESCE(json_agg(json_build_array(path, sha256, size_bytes, symlink_target))::text, '[]') \
         AS listing FROM deployment_files WHERE deployment_id = "
    } else {
        "SELECT COALESCE(json_group_array(json_array(path, sha256, size_bytes, symlink_target)), '[]') \
         AS listing FROM deployment_files WHERE deployment_id = "
    });
    sql.bind(Arg::Text(deployment_id.to_owned()));
    sql
}

pub async fn files(conn: &mut AnyConnection, deployment_id: &str) -> Result<Vec<FileRow>> {
    let postgres = conn.backend_name() == "PostgreSQL";
    let row = files_sql(postgres, deployment_id).query().fetch_one(conn).await?;
    let listing: String = col(&row, "listing")?;
    let rows: Vec<(String, String, i64, Option<String>)> = serde_json::from_str(&listing)
        .map_err(|e| StoreError::Corrupt(format!("the file listing of deployment {deployment_id}: {e}")))?;
    let mut files: Vec<FileRow> = rows
        .into_iter()
        .map(|(path, sha256, size_bytes, symlink_target)| FileRow { path, sha256, size_bytes, symlink_target })
        .collect();
    // Byte order, whatever the database's collation.
    files.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Whether blob `hash` is one of the deployment's files or its ESZIP.
pub(crate) fn has_blob_sql(deployment_id: &str, hash: &str) -> Sql {
    let mut sql = Sql::new("SELECT 1 AS hit FROM deployment_files WHERE deployment_id = ");
    sql.bind(Arg::Text(deployment_id.to_owned())).push(" AND sha256 = ").bind(Arg::Text(hash.to_owned()));
    sql.push(" UNION ALL SELECT 1 AS hit FROM deployments WHERE id = ").bind(Arg::Text(deployment_id.to_owned()));
    sql.push(" AND eszip_sha256 = ").bind(Arg::Text(hash.to_owned()));
    sql
}

pub async fn has_blob(conn: &mut AnyConnection, deployment_id: &str, hash: &str) -> Result<bool> {
    let row = has_blob_sql(deployment_id, hash).query().fetch_optional(conn).await?;
    Ok(row.is_some())
}

/// The project of deployment `id` when it is ready (routing's view of it).
pub(crate) fn ready_of_project_sql(project_id: &str) -> Sql {
    let mut sql = Sql::new("SELECT id FROM deployments WHERE status = 'ready' AND project_id = ");
    sql.bind(Arg::Text(project_id.to_owned()));
    sql
}

/// The ids of a project's ready deployments.
pub async fn ready_of_project(conn: &mut AnyConnection, project_id: &str) -> Result<Vec<String>> {
    let rows = ready_of_project_sql(project_id).query().fetch_all(conn).await?;
    rows.iter().map(|row| col(row, "id")).collect()
}

/// Calls `visit` with `(id, project id)` of every ready deployment, a row
/// at a time (a million of them are never all in memory as rows).
pub async fn each_routing_row(conn: &mut AnyConnection, mut visit: impl FnMut(String, String)) -> Result<()> {
    use futures_util::TryStreamExt as _;
    let mut rows = sqlx::query("SELECT id, project_id FROM deployments WHERE status = 'ready'").fetch(conn);
    while let Some(row) = rows.try_next().await? {
        visit(col(&row, "id")?, col(&row, "project_id")?);
    }
    Ok(())
}

pub(crate) fn routing_of_sql(id: &str) -> Sql {
    let mut sql = Sql::new("SELECT project_id FROM deployments WHERE status = 'ready' AND id = ");
    sql.bind(Arg::Text(id.to_owned()));
    sql
}

pub async fn routing_of(conn: &mut AnyConnection, id: &str) -> Result<Option<String>> {
    let row = routing_of_sql(id).query().fetch_optional(conn).await?;
    row.as_ref().map(|row| col(row, "project_id")).transpose()
}

/// Claims the oldest git build no node is working on (or whose claim is
/// older than `stale_before_ms`: its node died). Two nodes racing for one
/// build: the conditional UPDATE lets exactly one win.
pub async fn claim_build(conn: &mut AnyConnection, now_ms: i64, stale_before_ms: i64) -> Result<Option<DeploymentRow>> {
    let candidates = sqlx::query(
        "SELECT id FROM deployments WHERE status = 'building' \
         AND (build_claimed_at_ms IS NULL OR build_claimed_at_ms < $1) ORDER BY created_at_ms LIMIT 8",
    )
    .bind(stale_before_ms)
    .fetch_all(&mut *conn)
    .await?;
    for candidate in candidates {
        let id: String = col(&candidate, "id")?;
        let claimed = sqlx::query(
            "UPDATE deployments SET build_claimed_at_ms = $2 WHERE id = $1 AND status = 'building' \
             AND (build_claimed_at_ms IS NULL OR build_claimed_at_ms < $3)",
        )
        .bind(&id)
        .bind(now_ms)
        .bind(stale_before_ms)
        .execute(&mut *conn)
        .await?;
        if claimed.rows_affected() == 1 {
            return get(conn, &id).await;
        }
    }
    Ok(None)
}

/// A finished build's files. Only a deployment still `building` changes.
pub async fn finish_build(conn: &mut AnyConnection, id: &str, files: &[FileRow], log: Option<&str>) -> Result<bool> {
    let size_bytes: i64 = files.iter().map(|f| f.size_bytes).sum();
    let updated = sqlx::query(
        "UPDATE deployments SET status = 'ready', file_count = $2, size_bytes = $3, build_claimed_at_ms = NULL, \
         build_log = $4 WHERE id = $1 AND status = 'building'",
    )
    .bind(id)
    .bind(files.len() as i64)
    .bind(size_bytes)
    .bind(log)
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() != 1 {
        return Ok(false);
    }
    insert_files(conn, id, files).await?;
    note_routing_change(conn, &Touched::Deployment(id.to_owned())).await?;
    Ok(true)
}

pub async fn fail_build(conn: &mut AnyConnection, id: &str, error: &str, log: Option<&str>) -> Result<()> {
    sqlx::query(
        "UPDATE deployments SET status = 'failed', error = $2, build_claimed_at_ms = NULL, build_log = $3 \
         WHERE id = $1 AND status = 'building'",
    )
    .bind(id)
    .bind(error)
    .bind(log)
    .execute(conn)
    .await?;
    Ok(())
}
