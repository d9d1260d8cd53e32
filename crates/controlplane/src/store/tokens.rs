//! API tokens, stored as SHA-256 of the token (the token itself is shown
//! once, when it is made).

use sqlx::AnyConnection;

use super::{Result, col};

/// The name of the token a fresh store creates.
pub const ADMIN_TOKEN_NAME: &str = "admin";

pub async fn count(conn: &mut AnyConnection) -> Result<i64> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM tokens").fetch_one(conn).await?;
    col(&row, "n")
}

/// Inserts a token unless one with that name exists; returns whether it did.
pub async fn insert_if_absent(conn: &mut AnyConnection, name: &str, token_sha256: &str, now_ms: i64) -> Result<bool> {
    let result = sqlx::query(
        "INSERT INTO tokens (id, name, token_sha256, created_at_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
    )
    .bind(crate::ids::base36(16))
    .bind(name)
    .bind(token_sha256)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// The name of the token with this hash.
pub async fn name_by_hash(conn: &mut AnyConnection, token_sha256: &str) -> Result<Option<String>> {
    let row =
        sqlx::query("SELECT name FROM tokens WHERE token_sha256 = $1").bind(token_sha256).fetch_optional(conn).await?;
    row.map(|row| col(&row, "name")).transpose()
}
