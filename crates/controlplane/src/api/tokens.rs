//! `/tokens` (admin only): create a scoped token (its secret shown once),
//! list them a page at a time, revoke one. The change and its audit entry
//! are one transaction.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};

use super::access::{self, AuditedInTx, Caller};
use super::paging::PageRequest;
use super::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::error::ApiError;
use crate::store::audit;
use crate::store::tokens::{self, Kind, NewToken, TokenRow};
use crate::time::{format_ms, now_ms};
use crate::{ids, validate};
use isocloud_api as wire;

/// A token lives at most ten years (a bound, so `now + expires_in` never overflows).
const MAX_EXPIRES_IN_S: u64 = 10 * 365 * 24 * 3600;
const MAX_NAME_CHARS: usize = 64;
/// New tokens start with this, so secret scanners and people can tell one.
const SECRET_PREFIX: &str = "isc_";

pub(crate) fn view(row: &TokenRow, now: i64) -> wire::Token {
    let status = if row.revoked_at_ms.is_some() {
        "revoked"
    } else if row.expires_at_ms.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    };
    wire::Token {
        id: row.id.clone(),
        name: row.name.clone(),
        scope: row.scope(),
        project: row.project_name.clone(),
        created_at: format_ms(row.created_at_ms),
        expires_at: row.expires_at_ms.map(format_ms),
        revoked_at: row.revoked_at_ms.map(format_ms),
        last_used_at: row.last_used_at_ms.map(format_ms),
        status: status.to_owned(),
    }
}

/// `admin`, `project:NAME:deploy` or `project:NAME:read`.
fn parse_scope(scope: &str) -> Result<(Kind, Option<&str>), ApiError> {
    if scope == "admin" {
        return Ok((Kind::Admin, None));
    }
    let bad = || ApiError::field("scope", "must be admin, project:NAME:deploy or project:NAME:read");
    let rest = scope.strip_prefix("project:").ok_or_else(bad)?;
    let (name, kind) = rest.rsplit_once(':').ok_or_else(bad)?;
    let kind = match kind {
        "deploy" => Kind::Deploy,
        "read" => Kind::Read,
        _ => return Err(bad()),
    };
    if name.is_empty() {
        return Err(bad());
    }
    Ok((kind, Some(name)))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::field("name", format!("must be 1–{MAX_NAME_CHARS} of a-z, A-Z, 0-9, '-', '_' and '.'")))
    }
}

pub(crate) async fn list(
    State(cp): State<AppState>,
    query: ApiQuery,
) -> Result<(HeaderMap, Json<Vec<wire::Token>>), ApiError> {
    query.only(&["limit", "cursor"])?;
    let page = PageRequest::from_query(&query, 100, 1000, 1)?;
    let mut conn = cp.store.read().await?;
    let after = page.after.as_ref().map(|key| key[0].as_str());
    let rows = tokens::list(&mut conn, after, page.fetch()).await?;
    let (headers, rows) = page.finish(rows, "/api/v1/tokens", |t| vec![t.name.clone()]);
    let now = now_ms();
    Ok((headers, Json(rows.iter().map(|t| view(t, now)).collect())))
}

pub(crate) async fn create(
    State(cp): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    ApiJson(body): ApiJson<wire::NewTokenBody>,
) -> Result<impl IntoResponse, ApiError> {
    let (kind, project_name) = parse_scope(body.scope.trim())?;
    if let Some(name) = &body.name {
        check_name(name)?;
    }
    let expires_in_s = match body.expires_in_s {
        Some(s) if s == 0 || s > MAX_EXPIRES_IN_S => {
            return Err(ApiError::field("expires_in_s", format!("must be from 1 to {MAX_EXPIRES_IN_S} seconds")));
        }
        other => other,
    };
    let now = now_ms();
    let mut tx = cp.store.write().await?;
    let project_id = match project_name {
        Some(name) => Some(tokens::project_id_by_name(&mut tx, name).await?.ok_or_else(|| ApiError::InvalidField {
            field: "scope".into(),
            message: format!("scope: project {:?} not found", validate::truncate(name, 80)),
        })?),
        None => None,
    };
    let name = match &body.name {
        Some(name) => name.clone(),
        None => match project_name {
            Some(project) => format!("{project}-{}-{}", kind.as_str(), ids::base36(6)),
            None => format!("admin-{}", ids::base36(6)),
        },
    };
    let secret = format!("{SECRET_PREFIX}{}", ids::secret_token());
    let id = ids::base36(16);
    let expires_at_ms = expires_in_s.map(|s| now + (s as i64) * 1000);
    tokens::insert(
        &mut tx,
        &NewToken {
            id: &id,
            name: &name,
            token_sha256: &ids::sha256_hex(secret.as_bytes()),
            kind,
            project_id: project_id.as_deref(),
            created_at_ms: now,
            expires_at_ms,
        },
    )
    .await?;
    let row = tokens::by_id(&mut tx, &id).await?.ok_or_else(|| ApiError::internal("token vanished"))?;
    let target = format!("/tokens ({} {name}, {})", row.id, row.scope());
    audit::insert(&mut tx, &access::entry(&caller, "token.create", target, project_id, 201), now).await?;
    tx.commit().await?;
    tracing::info!(target: "isocloud::controlplane", token = name, scope = row.scope(), "token created");
    let created = wire::CreatedToken { token: view(&row, now), secret };
    Ok((StatusCode::CREATED, Extension(AuditedInTx), Json(created)))
}

pub(crate) async fn revoke(
    State(cp): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let now = now_ms();
    let mut tx = cp.store.write().await?;
    let token = tokens::by_id(&mut tx, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("token {:?} not found", validate::truncate(&id, 80))))?;
    let usable = token.revoked_at_ms.is_none() && token.expires_at_ms.is_none_or(|at| at > now);
    if token.kind == Kind::Admin && usable && tokens::usable_admins(&mut tx, now).await? <= 1 {
        return Err(ApiError::Conflict(format!(
            "token {:?} is the last usable admin token; create another admin token before revoking it",
            token.name
        )));
    }
    tokens::revoke(&mut tx, &token.id, now).await?;
    let target = format!("/tokens/{} ({}, {})", token.id, token.name, token.scope());
    audit::insert(&mut tx, &access::entry(&caller, "token.revoke", target, token.project_id.clone(), 204), now).await?;
    tx.commit().await?;
    tracing::info!(target: "isocloud::controlplane", token = token.name, "token revoked");
    Ok((StatusCode::NO_CONTENT, Extension(AuditedInTx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse() {
        assert_eq!(parse_scope("admin").unwrap(), (Kind::Admin, None));
        assert_eq!(parse_scope("project:hello:deploy").unwrap(), (Kind::Deploy, Some("hello")));
        assert_eq!(parse_scope("project:hello:read").unwrap(), (Kind::Read, Some("hello")));
        for bad in ["", "root", "project:hello", "project::read", "project:hello:write", "hello:read"] {
            assert!(parse_scope(bad).is_err(), "{bad}");
        }
    }
}
