//! Custom domains, their verification state and their certificates.

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use super::{Arg, Result, Sql, StoreError, Touched, col, conflict_on_unique, note_routing_change};

#[derive(Debug, Clone)]
pub struct DomainRow {
    pub domain: String,
    pub project_name: Option<String>,
    pub created_at_ms: i64,
    pub token: String,
    pub verified_at_ms: Option<i64>,
    pub certificate: Option<CertSummary>,
    /// Automatic certificates: the last order's outcome and the next
    /// attempt (`None`: never ordered).
    pub acme: Option<super::acme::AcmeState>,
}

/// What may be shown of a certificate (never its PEMs).
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub not_after_ms: i64,
    pub names: Vec<String>,
    /// `manual` (uploaded) or `acme` (ordered by the control plane).
    pub source: String,
}

/// A stored certificate, PEMs included (for the SNI table only, which
/// serves it for `domain` alone).
#[derive(Debug, Clone)]
pub struct CertRow {
    pub domain: String,
    pub cert_pem: String,
    pub key_pem: String,
}

const COLUMNS: &str = "d.domain, d.project_id, p.name AS project_name, d.created_at_ms, d.token, d.verified_at_ms, \
     c.not_after_ms, c.names_json, c.source, o.status AS acme_status, o.error AS acme_error, \
     o.failures AS acme_failures, o.next_attempt_at_ms AS acme_next_attempt_at_ms, \
     o.last_attempt_at_ms AS acme_last_attempt_at_ms";
const FROM: &str = "FROM domains d LEFT JOIN projects p ON p.id = d.project_id \
     LEFT JOIN certificates c ON c.domain = d.domain LEFT JOIN acme_orders o ON o.domain = d.domain";

fn names_from_json(json: &str) -> Result<Vec<String>> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("names_json: {e}")))
}

fn from_row(row: &AnyRow) -> Result<DomainRow> {
    let not_after_ms: Option<i64> = col(row, "not_after_ms")?;
    let certificate = match not_after_ms {
        Some(not_after_ms) => {
            let names_json: Option<String> = col(row, "names_json")?;
            let source: Option<String> = col(row, "source")?;
            Some(CertSummary {
                not_after_ms,
                names: names_from_json(names_json.as_deref().unwrap_or("[]"))?,
                source: source.unwrap_or_else(|| "manual".into()),
            })
        }
        None => None,
    };
    Ok(DomainRow {
        domain: col(row, "domain")?,
        project_name: col(row, "project_name")?,
        created_at_ms: col(row, "created_at_ms")?,
        token: col(row, "token")?,
        verified_at_ms: col(row, "verified_at_ms")?,
        certificate,
        acme: super::acme::state_from_row(row)?,
    })
}

/// Up to `limit` domains by name after `after`, only `project_id`'s when
/// given (a page of `GET /domains`).
pub async fn page(
    conn: &mut AnyConnection,
    project_id: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<DomainRow>> {
    let rows = page_sql(project_id, after, limit).query().fetch_all(conn).await?;
    rows.iter().map(from_row).collect()
}

pub(crate) fn page_sql(project_id: Option<&str>, after: Option<&str>, limit: i64) -> Sql {
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} {FROM} WHERE 1 = 1"));
    if let Some(project_id) = project_id {
        sql.push(" AND d.project_id = ").bind(Arg::Text(project_id.to_owned()));
    }
    if let Some(after) = after {
        sql.push(" AND d.domain > ").bind(Arg::Text(after.to_owned()));
    }
    sql.push(" ORDER BY d.domain LIMIT ").bind(Arg::Int(limit));
    sql
}

pub async fn get(conn: &mut AnyConnection, domain: &str) -> Result<Option<DomainRow>> {
    let row =
        sqlx::query(&format!("SELECT {COLUMNS} {FROM} WHERE d.domain = $1")).bind(domain).fetch_optional(conn).await?;
    row.as_ref().map(from_row).transpose()
}

pub async fn insert(
    conn: &mut AnyConnection,
    domain: &str,
    project_id: Option<&str>,
    token: &str,
    now_ms: i64,
) -> Result<()> {
    sqlx::query("INSERT INTO domains (domain, project_id, created_at_ms, token) VALUES ($1, $2, $3, $4)")
        .bind(domain)
        .bind(project_id)
        .bind(now_ms)
        .bind(token)
        .execute(conn)
        .await
        .map_err(conflict_on_unique(|| format!("the domain {domain:?} is already added")))?;
    Ok(())
}

pub async fn set_project(conn: &mut AnyConnection, domain: &str, project_id: Option<&str>) -> Result<()> {
    sqlx::query("UPDATE domains SET project_id = $2 WHERE domain = $1")
        .bind(domain)
        .bind(project_id)
        .execute(&mut *conn)
        .await?;
    note_routing_change(conn, &Touched::Domain(domain.to_owned())).await
}

/// Marks the domain verified (unless it already is); returns whether it
/// changed.
pub async fn set_verified(conn: &mut AnyConnection, domain: &str, now_ms: i64) -> Result<bool> {
    let result = sqlx::query("UPDATE domains SET verified_at_ms = $2 WHERE domain = $1 AND verified_at_ms IS NULL")
        .bind(domain)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    if result.rows_affected() > 0 {
        note_routing_change(conn, &Touched::Domain(domain.to_owned())).await?;
    }
    Ok(result.rows_affected() > 0)
}

pub async fn delete(conn: &mut AnyConnection, domain: &str) -> Result<bool> {
    // Explicitly, not only by cascade: the certificate must go in this
    // transaction on every back end.
    sqlx::query("DELETE FROM certificates WHERE domain = $1").bind(domain).execute(&mut *conn).await?;
    super::acme::forget(conn, domain).await?;
    let result = sqlx::query("DELETE FROM domains WHERE domain = $1").bind(domain).execute(&mut *conn).await?;
    note_routing_change(conn, &Touched::Domain(domain.to_owned())).await?;
    Ok(result.rows_affected() > 0)
}

/// An uploaded certificate (`source = 'manual'`): it replaces an ACME one,
/// and no ACME order replaces it.
pub async fn put_certificate(
    conn: &mut AnyConnection,
    domain: &str,
    cert_pem: &str,
    key_pem: &str,
    names: &[String],
    not_after_ms: i64,
    now_ms: i64,
) -> Result<()> {
    let names_json = serde_json::to_string(names).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    sqlx::query(
        "INSERT INTO certificates (domain, cert_pem, key_pem, names_json, not_after_ms, updated_at_ms, source) \
         VALUES ($1, $2, $3, $4, $5, $6, 'manual') ON CONFLICT (domain) DO UPDATE SET cert_pem = excluded.cert_pem, \
         key_pem = excluded.key_pem, names_json = excluded.names_json, not_after_ms = excluded.not_after_ms, \
         updated_at_ms = excluded.updated_at_ms, source = excluded.source",
    )
    .bind(domain)
    .bind(cert_pem)
    .bind(key_pem)
    .bind(names_json)
    .bind(not_after_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    note_routing_change(conn, &Touched::Domain(domain.to_owned())).await
}

pub async fn delete_certificate(conn: &mut AnyConnection, domain: &str) -> Result<bool> {
    let result = sqlx::query("DELETE FROM certificates WHERE domain = $1").bind(domain).execute(&mut *conn).await?;
    note_routing_change(conn, &Touched::Domain(domain.to_owned())).await?;
    Ok(result.rows_affected() > 0)
}

/// Verified domains attached to a project: `(domain, project id)`.
pub async fn routing_rows(conn: &mut AnyConnection) -> Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT domain, project_id FROM domains WHERE verified_at_ms IS NOT NULL AND project_id IS NOT NULL",
    )
    .fetch_all(conn)
    .await?;
    rows.iter().map(|row| Ok((col(row, "domain")?, col(row, "project_id")?))).collect()
}

/// One domain as routing sees it: `Some(project id)` when it is verified and
/// attached; and its certificate when it is verified and has one.
pub async fn routing_of(conn: &mut AnyConnection, domain: &str) -> Result<(Option<String>, Option<CertRow>)> {
    let row = sqlx::query(
        "SELECT d.project_id, c.cert_pem, c.key_pem FROM domains d LEFT JOIN certificates c ON c.domain = d.domain \
         WHERE d.domain = $1 AND d.verified_at_ms IS NOT NULL",
    )
    .bind(domain)
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else { return Ok((None, None)) };
    let project: Option<String> = col(&row, "project_id")?;
    let cert_pem: Option<String> = col(&row, "cert_pem")?;
    let key_pem: Option<String> = col(&row, "key_pem")?;
    let cert = match (cert_pem, key_pem) {
        (Some(cert_pem), Some(key_pem)) => Some(CertRow { domain: domain.to_owned(), cert_pem, key_pem }),
        _ => None,
    };
    Ok((project, cert))
}

/// The domains attached to `project_id`.
pub async fn of_project(conn: &mut AnyConnection, project_id: &str) -> Result<Vec<String>> {
    let rows = of_project_sql(project_id).query().fetch_all(conn).await?;
    rows.iter().map(|row| col(row, "domain")).collect()
}

pub(crate) fn of_project_sql(project_id: &str) -> Sql {
    let mut sql = Sql::new("SELECT domain FROM domains WHERE project_id = ");
    sql.bind(Arg::Text(project_id.to_owned()));
    sql
}

/// Certificates of verified domains, for the SNI table.
pub async fn certificate_rows(conn: &mut AnyConnection) -> Result<Vec<CertRow>> {
    let rows = sqlx::query(
        "SELECT c.domain, c.cert_pem, c.key_pem FROM certificates c \
         JOIN domains d ON d.domain = c.domain WHERE d.verified_at_ms IS NOT NULL ORDER BY c.domain",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(CertRow { domain: col(row, "domain")?, cert_pem: col(row, "cert_pem")?, key_pem: col(row, "key_pem")? })
        })
        .collect()
}

/// Certificates of verified domains whose name sorts after `after`, by
/// name, `limit` at most: the edges' certificate feed, a page at a time.
pub async fn certificate_rows_after(conn: &mut AnyConnection, after: &str, limit: i64) -> Result<Vec<CertRow>> {
    let rows = sqlx::query(
        "SELECT c.domain, c.cert_pem, c.key_pem FROM certificates c \
         JOIN domains d ON d.domain = c.domain WHERE d.verified_at_ms IS NOT NULL AND c.domain > $1 \
         ORDER BY c.domain LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(CertRow { domain: col(row, "domain")?, cert_pem: col(row, "cert_pem")?, key_pem: col(row, "key_pem")? })
        })
        .collect()
}
