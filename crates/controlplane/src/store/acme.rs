//! ACME state (migrations 0007, 0009): the account per directory, each
//! domain's order state with the lease one node holds while it orders, and
//! the pending challenges' key authorizations: HTTP-01's, which any node's
//! public listener answers from here, and TLS-ALPN-01's, which every node
//! loads into memory for its TLS listener (each write and removal of one is a
//! routing change on its domain, so the nodes' delta reload picks it up).

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Result, col, note_routing_change};
use crate::store::Touched;

/// A domain's ordering state as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeState {
    /// `valid` (the last order gave a certificate) or `failed`.
    pub status: String,
    /// The ACME server's (or the transport's) error of the last failure.
    pub error: Option<String>,
    /// Failures in a row (0 after a success).
    pub failures: i64,
    pub next_attempt_at_ms: i64,
    pub last_attempt_at_ms: Option<i64>,
}

pub(crate) fn state_from_row(row: &AnyRow) -> Result<Option<AcmeState>> {
    let status: Option<String> = col(row, "acme_status")?;
    let Some(status) = status else { return Ok(None) };
    Ok(Some(AcmeState {
        status,
        error: col(row, "acme_error")?,
        failures: col(row, "acme_failures")?,
        next_attempt_at_ms: col(row, "acme_next_attempt_at_ms")?,
        last_attempt_at_ms: col(row, "acme_last_attempt_at_ms")?,
    }))
}

/// The stored account credentials (instant-acme's JSON) of `directory_url`.
pub async fn account(conn: &mut AnyConnection, directory_url: &str) -> Result<Option<String>> {
    let row = sqlx::query("SELECT credentials_json FROM acme_accounts WHERE directory_url = $1")
        .bind(directory_url)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(|row| col(row, "credentials_json")).transpose()
}

/// Keeps `credentials_json` unless another node stored one first; returns
/// the one stored (so every node uses the same account).
pub async fn put_account_if_absent(
    conn: &mut AnyConnection,
    directory_url: &str,
    credentials_json: &str,
    email: Option<&str>,
    now_ms: i64,
) -> Result<String> {
    sqlx::query(
        "INSERT INTO acme_accounts (directory_url, credentials_json, email, created_at_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (directory_url) DO NOTHING",
    )
    .bind(directory_url)
    .bind(credentials_json)
    .bind(email)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(account(conn, directory_url).await?.unwrap_or_else(|| credentials_json.to_owned()))
}

/// Verified domains that need an order now: no certificate (and not
/// backing off from a failure), or an ACME certificate whose renewal time
/// has come; never one with a manual certificate, never one whose lease
/// another node holds. At most `limit`, the most overdue first.
pub async fn due(conn: &mut AnyConnection, now_ms: i64, limit: i64) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT d.domain FROM domains d \
         LEFT JOIN certificates c ON c.domain = d.domain \
         LEFT JOIN acme_orders o ON o.domain = d.domain \
         WHERE d.verified_at_ms IS NOT NULL \
         AND (c.domain IS NULL OR c.source = 'acme') \
         AND (o.domain IS NULL OR o.next_attempt_at_ms <= $1 OR (c.domain IS NULL AND o.status <> 'failed')) \
         AND (o.lease_until_ms IS NULL OR o.lease_until_ms < $1) \
         ORDER BY COALESCE(o.next_attempt_at_ms, 0), d.domain LIMIT $2",
    )
    .bind(now_ms)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(|row| col(row, "domain")).collect()
}

/// The earliest time any domain's order state asks to be looked at again
/// (renewals, retries, leases running out), for the loop's sleep.
pub async fn next_wakeup(conn: &mut AnyConnection) -> Result<Option<i64>> {
    let row = sqlx::query(
        "SELECT MIN(CASE WHEN lease_until_ms IS NOT NULL AND lease_until_ms > next_attempt_at_ms \
         THEN lease_until_ms ELSE next_attempt_at_ms END) AS at FROM acme_orders",
    )
    .fetch_one(conn)
    .await?;
    col(&row, "at")
}

/// Takes the lease on `domain`'s order for `owner` until `until_ms`, if no
/// other node holds one; returns whether this node has it.
pub async fn take_lease(
    conn: &mut AnyConnection,
    domain: &str,
    owner: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool> {
    // A first order: the row, with nothing to retry yet.
    sqlx::query(
        "INSERT INTO acme_orders (domain, status, failures, next_attempt_at_ms, updated_at_ms) \
         SELECT $1, 'pending', 0, $2, $2 WHERE EXISTS (SELECT 1 FROM domains WHERE domain = $1) \
         ON CONFLICT (domain) DO NOTHING",
    )
    .bind(domain)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    let taken = sqlx::query(
        "UPDATE acme_orders SET lease_owner = $2, lease_until_ms = $4 WHERE domain = $1 \
         AND (lease_until_ms IS NULL OR lease_until_ms < $3 OR lease_owner = $2)",
    )
    .bind(domain)
    .bind(owner)
    .bind(now_ms)
    .bind(until_ms)
    .execute(conn)
    .await?;
    Ok(taken.rows_affected() == 1)
}

/// The order gave a certificate: stored as `source = 'acme'` unless a
/// manual one is there (it wins), the failures cleared, the lease given
/// back and the renewal due at `renew_at_ms`. Returns whether the
/// certificate was stored.
#[allow(clippy::too_many_arguments, reason = "one row's columns, written in one transaction")]
pub async fn succeed(
    conn: &mut AnyConnection,
    domain: &str,
    owner: &str,
    cert_pem: &str,
    key_pem: &str,
    names: &[String],
    not_after_ms: i64,
    renew_at_ms: i64,
    now_ms: i64,
) -> Result<bool> {
    let names_json = serde_json::to_string(names).map_err(|e| super::StoreError::Corrupt(e.to_string()))?;
    // The domain may have gone (deleted, or no longer verified) while the
    // order ran: nothing is stored then.
    let stored = sqlx::query(
        "INSERT INTO certificates (domain, cert_pem, key_pem, names_json, not_after_ms, updated_at_ms, source) \
         SELECT $1, $2, $3, $4, $5, $6, 'acme' FROM domains WHERE domain = $1 AND verified_at_ms IS NOT NULL \
         ON CONFLICT (domain) DO UPDATE SET cert_pem = excluded.cert_pem, key_pem = excluded.key_pem, \
         names_json = excluded.names_json, not_after_ms = excluded.not_after_ms, \
         updated_at_ms = excluded.updated_at_ms, source = excluded.source WHERE certificates.source = 'acme'",
    )
    .bind(domain)
    .bind(cert_pem)
    .bind(key_pem)
    .bind(names_json)
    .bind(not_after_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        > 0;
    sqlx::query(
        "UPDATE acme_orders SET status = 'valid', error = NULL, failures = 0, next_attempt_at_ms = $3, \
         last_attempt_at_ms = $4, lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = $4 \
         WHERE domain = $1 AND lease_owner = $2",
    )
    .bind(domain)
    .bind(owner)
    .bind(renew_at_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    clear_challenges(conn, domain).await?;
    if stored {
        note_routing_change(conn, &Touched::Domain(domain.to_owned())).await?;
    }
    Ok(stored)
}

/// The order failed with `error`: recorded, retried at `retry_at_ms`, the
/// lease given back.
pub async fn fail(
    conn: &mut AnyConnection,
    domain: &str,
    owner: &str,
    error: &str,
    retry_at_ms: i64,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE acme_orders SET status = 'failed', error = $3, failures = failures + 1, next_attempt_at_ms = $4, \
         last_attempt_at_ms = $5, lease_owner = NULL, lease_until_ms = NULL, updated_at_ms = $5 \
         WHERE domain = $1 AND lease_owner = $2",
    )
    .bind(domain)
    .bind(owner)
    .bind(error)
    .bind(retry_at_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    clear_challenges(conn, domain).await
}

/// Failures in a row so far for `domain` (0 when none or no row).
pub async fn failures(conn: &mut AnyConnection, domain: &str) -> Result<i64> {
    let row =
        sqlx::query("SELECT failures FROM acme_orders WHERE domain = $1").bind(domain).fetch_optional(conn).await?;
    Ok(row.as_ref().map(|row| col(row, "failures")).transpose()?.unwrap_or(0))
}

/// `acme_challenges.kind` of an HTTP-01 challenge (the column's default).
pub const HTTP_01: &str = "http-01";
/// `acme_challenges.kind` of a TLS-ALPN-01 challenge.
pub const TLS_ALPN_01: &str = "tls-alpn-01";

/// A pending HTTP-01 challenge's key authorization, until `expires_at_ms`.
pub async fn put_challenge(
    conn: &mut AnyConnection,
    domain: &str,
    token: &str,
    key_authorization: &str,
    expires_at_ms: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO acme_challenges (domain, token, key_authorization, expires_at_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (domain, token) DO UPDATE SET key_authorization = excluded.key_authorization, \
         expires_at_ms = excluded.expires_at_ms",
    )
    .bind(domain)
    .bind(token)
    .bind(key_authorization)
    .bind(expires_at_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// A pending TLS-ALPN-01 challenge's key authorization, until
/// `expires_at_ms`: the domain's only one (a new order's replaces an old
/// one), under a routing change so every node's TLS listener loads it.
pub async fn put_tls_alpn_challenge(
    conn: &mut AnyConnection,
    domain: &str,
    token: &str,
    key_authorization: &str,
    expires_at_ms: i64,
) -> Result<()> {
    sqlx::query("DELETE FROM acme_challenges WHERE domain = $1 AND kind = 'tls-alpn-01'")
        .bind(domain)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO acme_challenges (domain, token, key_authorization, expires_at_ms, kind) \
         VALUES ($1, $2, $3, $4, 'tls-alpn-01') \
         ON CONFLICT (domain, token) DO UPDATE SET key_authorization = excluded.key_authorization, \
         expires_at_ms = excluded.expires_at_ms, kind = excluded.kind",
    )
    .bind(domain)
    .bind(token)
    .bind(key_authorization)
    .bind(expires_at_ms)
    .execute(&mut *conn)
    .await?;
    note_routing_change(conn, &Touched::Domain(domain.to_owned())).await
}

/// A pending TLS-ALPN-01 challenge: its domain, key authorization and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsAlpnChallenge {
    pub domain: String,
    pub key_authorization: String,
    pub expires_at_ms: i64,
}

fn tls_alpn_from_row(row: &AnyRow) -> Result<TlsAlpnChallenge> {
    Ok(TlsAlpnChallenge {
        domain: col(row, "domain")?,
        key_authorization: col(row, "key_authorization")?,
        expires_at_ms: col(row, "expires_at_ms")?,
    })
}

/// The pending TLS-ALPN-01 challenges not expired at `now_ms`, at most
/// `limit`, the latest to expire first (a node's whole reload).
pub async fn tls_alpn_challenges(conn: &mut AnyConnection, now_ms: i64, limit: i64) -> Result<Vec<TlsAlpnChallenge>> {
    let rows = sqlx::query(
        "SELECT domain, key_authorization, expires_at_ms FROM acme_challenges \
         WHERE kind = 'tls-alpn-01' AND expires_at_ms > $1 ORDER BY expires_at_ms DESC, domain LIMIT $2",
    )
    .bind(now_ms)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(tls_alpn_from_row).collect()
}

/// `domain`'s pending TLS-ALPN-01 challenge, if any and not expired (a
/// node's delta reload of a touched domain).
pub async fn tls_alpn_challenge(
    conn: &mut AnyConnection,
    domain: &str,
    now_ms: i64,
) -> Result<Option<TlsAlpnChallenge>> {
    let row = sqlx::query(
        "SELECT domain, key_authorization, expires_at_ms FROM acme_challenges \
         WHERE domain = $1 AND kind = 'tls-alpn-01' AND expires_at_ms > $2 \
         ORDER BY expires_at_ms DESC LIMIT 1",
    )
    .bind(domain)
    .bind(now_ms)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(tls_alpn_from_row).transpose()
}

/// The HTTP-01 key authorization for `token` pending on `domain`, if not
/// expired (a TLS-ALPN-01 one is never answered over HTTP).
pub async fn challenge(conn: &mut AnyConnection, domain: &str, token: &str, now_ms: i64) -> Result<Option<String>> {
    let row = sqlx::query(
        "SELECT key_authorization FROM acme_challenges \
         WHERE domain = $1 AND token = $2 AND expires_at_ms > $3 AND kind = 'http-01'",
    )
    .bind(domain)
    .bind(token)
    .bind(now_ms)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(|row| col(row, "key_authorization")).transpose()
}

/// Forgets `domain`'s pending challenges; a TLS-ALPN-01 one under a routing
/// change, so every node drops its challenge certificate.
pub async fn clear_challenges(conn: &mut AnyConnection, domain: &str) -> Result<()> {
    let tls_alpn = sqlx::query("DELETE FROM acme_challenges WHERE domain = $1 AND kind = 'tls-alpn-01'")
        .bind(domain)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM acme_challenges WHERE domain = $1").bind(domain).execute(&mut *conn).await?;
    if tls_alpn > 0 {
        note_routing_change(conn, &Touched::Domain(domain.to_owned())).await?;
    }
    Ok(())
}

/// A domain's ACME rows, when the domain goes (explicitly: SQLite's
/// cascades are not relied on).
pub async fn forget(conn: &mut AnyConnection, domain: &str) -> Result<()> {
    clear_challenges(conn, domain).await?;
    sqlx::query("DELETE FROM acme_orders WHERE domain = $1").bind(domain).execute(conn).await?;
    Ok(())
}
