//! API tokens, stored as SHA-256 of the token (the token itself is shown
//! once, when it is made), with their scope, expiry, revocation and when
//! they were last used (see `migrations/0006_scoped_tokens.sql`).

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Arg, Result, Sql, StoreError, col, conflict_on_unique};

/// The name of the token a fresh store creates.
pub const ADMIN_TOKEN_NAME: &str = "admin";
/// `last_used_at_ms` is written when it is older than this: one write a
/// minute per token, whatever the request rate.
pub const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Admin,
    Deploy,
    Read,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Admin => "admin",
            Kind::Deploy => "deploy",
            Kind::Read => "read",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "admin" => Ok(Kind::Admin),
            "deploy" => Ok(Kind::Deploy),
            "read" => Ok(Kind::Read),
            other => Err(StoreError::Corrupt(format!("token scope {other:?}"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// Set for `Deploy` and `Read`: the project's id.
    pub project_id: Option<String>,
    /// The project's name now; `None` when it was deleted (or for `Admin`).
    pub project_name: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
}

impl TokenRow {
    /// `admin`, `project:NAME:deploy`, `project:NAME:read` (the project's
    /// current name; `(deleted)` when it is gone).
    pub fn scope(&self) -> String {
        match self.kind {
            Kind::Admin => "admin".to_owned(),
            kind => format!("project:{}:{}", self.project_name.as_deref().unwrap_or("(deleted)"), kind.as_str()),
        }
    }
}

const COLUMNS: &str = "t.id, t.name, t.scope, t.project_id, p.name AS project_name, t.created_at_ms, \
                       t.expires_at_ms, t.revoked_at_ms, t.last_used_at_ms";
const FROM: &str = "FROM tokens t LEFT JOIN projects p ON p.id = t.project_id";

fn from_row(row: &AnyRow) -> Result<TokenRow> {
    Ok(TokenRow {
        id: col(row, "id")?,
        name: col(row, "name")?,
        kind: Kind::parse(&col::<String>(row, "scope")?)?,
        project_id: col(row, "project_id")?,
        project_name: col(row, "project_name")?,
        created_at_ms: col(row, "created_at_ms")?,
        expires_at_ms: col(row, "expires_at_ms")?,
        revoked_at_ms: col(row, "revoked_at_ms")?,
        last_used_at_ms: col(row, "last_used_at_ms")?,
    })
}

pub async fn count(conn: &mut AnyConnection) -> Result<i64> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM tokens").fetch_one(conn).await?;
    col(&row, "n")
}

/// Inserts an admin token unless one with that name exists; returns whether
/// it did (two nodes initialising one store race here).
pub async fn insert_if_absent(conn: &mut AnyConnection, name: &str, token_sha256: &str, now_ms: i64) -> Result<bool> {
    let result = sqlx::query(
        "INSERT INTO tokens (id, name, token_sha256, created_at_ms, scope) VALUES ($1, $2, $3, $4, 'admin') \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(crate::ids::base36(16))
    .bind(name)
    .bind(token_sha256)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// What a new token is.
pub struct NewToken<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub token_sha256: &'a str,
    pub kind: Kind,
    pub project_id: Option<&'a str>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

pub async fn insert(conn: &mut AnyConnection, token: &NewToken<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO tokens (id, name, token_sha256, created_at_ms, scope, project_id, expires_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(token.id)
    .bind(token.name)
    .bind(token.token_sha256)
    .bind(token.created_at_ms)
    .bind(token.kind.as_str())
    .bind(token.project_id)
    .bind(token.expires_at_ms)
    .execute(conn)
    .await
    .map_err(conflict_on_unique(|| {
        format!("a token named {:?} exists already (names are never reused)", token.name)
    }))?;
    Ok(())
}

pub(crate) fn by_hash_sql(token_sha256: &str) -> Sql {
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} {FROM} WHERE t.token_sha256 = "));
    sql.bind(Arg::Text(token_sha256.to_owned()));
    sql
}

/// The token with this hash (revoked and expired ones too: the caller says
/// which it is).
pub async fn by_hash(conn: &mut AnyConnection, token_sha256: &str) -> Result<Option<TokenRow>> {
    let row = by_hash_sql(token_sha256).query().fetch_optional(conn).await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn by_id(conn: &mut AnyConnection, id: &str) -> Result<Option<TokenRow>> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} {FROM} WHERE t.id = $1")).bind(id).fetch_optional(conn).await?;
    row.as_ref().map(from_row).transpose()
}

pub(crate) fn list_sql(after: Option<&str>, limit: i64) -> Sql {
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} {FROM} WHERE t.name > "));
    sql.bind(Arg::Text(after.unwrap_or("").to_owned())).push(" ORDER BY t.name LIMIT ").bind(Arg::Int(limit));
    sql
}

/// At most `limit` tokens by name, after `after` (a name) when given.
pub async fn list(conn: &mut AnyConnection, after: Option<&str>, limit: i64) -> Result<Vec<TokenRow>> {
    let rows = list_sql(after, limit).query().fetch_all(conn).await?;
    rows.iter().map(from_row).collect()
}

/// Marks the token revoked (the first revocation's time is kept).
pub async fn revoke(conn: &mut AnyConnection, id: &str, now_ms: i64) -> Result<()> {
    sqlx::query("UPDATE tokens SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL")
        .bind(now_ms)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Admin tokens still usable at `now_ms` (not revoked, not expired).
pub async fn usable_admins(conn: &mut AnyConnection, now_ms: i64) -> Result<i64> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM tokens WHERE scope = 'admin' AND revoked_at_ms IS NULL \
         AND (expires_at_ms IS NULL OR expires_at_ms > $1)",
    )
    .bind(now_ms)
    .fetch_one(conn)
    .await?;
    col(&row, "n")
}

/// Notes a use at `now_ms` unless one was noted within the resolution (the
/// condition makes nodes that race here write once).
pub async fn touch(conn: &mut AnyConnection, id: &str, now_ms: i64) -> Result<()> {
    sqlx::query(
        "UPDATE tokens SET last_used_at_ms = $1 WHERE id = $2 AND (last_used_at_ms IS NULL OR last_used_at_ms < $3)",
    )
    .bind(now_ms)
    .bind(id)
    .bind(now_ms - LAST_USED_RESOLUTION_MS)
    .execute(conn)
    .await?;
    Ok(())
}

/// The project a deployment belongs to (whatever its status), for checking
/// a project token on `/deployments/{id}` routes.
pub async fn project_of_deployment(conn: &mut AnyConnection, deployment_id: &str) -> Result<Option<String>> {
    let row = sqlx::query("SELECT project_id FROM deployments WHERE id = $1")
        .bind(deployment_id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(|row| col(row, "project_id")).transpose()
}

/// A project's id by its name.
pub async fn project_id_by_name(conn: &mut AnyConnection, name: &str) -> Result<Option<String>> {
    let row = sqlx::query("SELECT id FROM projects WHERE name = $1").bind(name).fetch_optional(conn).await?;
    row.as_ref().map(|row| col(row, "id")).transpose()
}
