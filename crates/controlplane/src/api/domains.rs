//! `/domains`: custom domains (verified by DNS TXT or an HTTP token before
//! they route) and their certificates.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use sqlx::AnyConnection;

use super::paging::PageRequest;
use super::projects::project_or_404;
use super::{ApiJson, ApiPath, ApiQuery, AppState, check, views};
use crate::error::ApiError;
use crate::store::domains::{self, DomainRow};
use crate::time::now_ms;
use crate::verify::Outcome;
use crate::{certs, ids, validate};
use isocloud_api as wire;

fn not_found(domain: &str) -> ApiError {
    ApiError::NotFound(format!("domain {:?} not found", validate::truncate(domain, 100)))
}

async fn domain_or_404(conn: &mut AnyConnection, domain: &str) -> Result<DomainRow, ApiError> {
    domains::get(conn, domain).await?.ok_or_else(|| not_found(domain))
}

/// A page of domains by name (`limit`, `cursor`), only a project's with
/// `project=NAME`.
pub(crate) async fn list(
    State(cp): State<AppState>,
    query: ApiQuery,
) -> Result<(HeaderMap, Json<Vec<wire::Domain>>), ApiError> {
    query.only(&["project", "limit", "cursor"])?;
    let page = PageRequest::from_query(&query, 100, 1000, 1)?;
    let mut conn = cp.store.read().await?;
    let (project_id, path) = match query.text("project") {
        Some(name) => {
            let project = project_or_404(&mut conn, name).await?;
            (Some(project.id), format!("/api/v1/domains?project={}", project.name))
        }
        None => (None, "/api/v1/domains".to_owned()),
    };
    let after = page.after.as_ref().map(|key| key[0].as_str());
    let rows = domains::page(&mut conn, project_id.as_deref(), after, page.fetch()).await?;
    let (headers, rows) = page.finish(rows, &path, |d| vec![d.domain.clone()]);
    Ok((headers, Json(rows.iter().map(|d| views::domain(&cp, d)).collect())))
}

pub(crate) async fn get(
    State(cp): State<AppState>,
    ApiPath(domain): ApiPath<String>,
) -> Result<Json<wire::Domain>, ApiError> {
    let mut conn = cp.store.read().await?;
    let row = domain_or_404(&mut conn, &domain).await?;
    Ok(Json(views::domain(&cp, &row)))
}

pub(crate) async fn create(
    State(cp): State<AppState>,
    ApiJson(body): ApiJson<wire::NewDomainBody>,
) -> Result<(StatusCode, Json<wire::Domain>), ApiError> {
    check("domain", validate::domain(&body.domain, &cp.options.base_domain))?;
    let mut tx = cp.store.write().await?;
    let project_id = match &body.project {
        Some(name) => Some(project_or_404(&mut tx, name).await?.id),
        None => None,
    };
    domains::insert(&mut tx, &body.domain, project_id.as_deref(), &ids::verification_token(), now_ms()).await?;
    let row = domain_or_404(&mut tx, &body.domain).await?;
    tx.commit().await?;
    // Not verified yet, so nothing routes to it: no table rebuild.
    Ok((StatusCode::CREATED, Json(views::domain(&cp, &row))))
}

pub(crate) async fn attach(
    State(cp): State<AppState>,
    ApiPath(domain): ApiPath<String>,
    body: Result<ApiJson<wire::AttachDomainBody>, ApiError>,
) -> Result<Json<wire::Domain>, ApiError> {
    // A `project` of the wrong type is that field's error, as a bad value
    // of any other field is, not the body's shape.
    let ApiJson(body) = body.map_err(|e| match e {
        ApiError::InvalidRequest { field: Some(field), .. } if field == "project" => {
            ApiError::field("project", "must be a project name or null (to detach)")
        }
        other => other,
    })?;
    let mut tx = cp.store.write().await?;
    domain_or_404(&mut tx, &domain).await?;
    let project_id = match &body.project {
        None => None,
        Some(name) => Some(project_or_404(&mut tx, name).await?.id),
    };
    domains::set_project(&mut tx, &domain, project_id.as_deref()).await?;
    let row = domain_or_404(&mut tx, &domain).await?;
    tx.commit().await?;
    cp.reload_routing_logged().await;
    Ok(Json(views::domain(&cp, &row)))
}

pub(crate) async fn verify(
    State(cp): State<AppState>,
    ApiPath(domain): ApiPath<String>,
) -> Result<Json<wire::Domain>, ApiError> {
    let row = {
        let mut conn = cp.store.read().await?;
        domain_or_404(&mut conn, &domain).await?
    };
    if row.verified_at_ms.is_some() {
        return Ok(Json(views::domain(&cp, &row)));
    }
    // The checks talk to the network: no transaction is open meanwhile.
    match cp.verifier.verify(&row.domain, &row.token).await {
        Outcome::Verified(method) => {
            tracing::info!(target: "isocloud::controlplane", domain = row.domain, ?method, "domain verified");
            let mut tx = cp.store.write().await?;
            domains::set_verified(&mut tx, &row.domain, now_ms()).await?;
            let row = domain_or_404(&mut tx, &domain).await?;
            tx.commit().await?;
            cp.reload_routing_logged().await;
            // A verified domain without a certificate gets one ordered.
            cp.acme_wake();
            Ok(Json(views::domain(&cp, &row)))
        }
        Outcome::NotVerified { dns, http } => {
            tracing::info!(target: "isocloud::controlplane", domain = row.domain, dns, http, "domain not verified");
            Ok(Json(views::domain(&cp, &row)))
        }
    }
}

pub(crate) async fn put_certificate(
    State(cp): State<AppState>,
    ApiPath(domain): ApiPath<String>,
    ApiJson(body): ApiJson<wire::CertificateBody>,
) -> Result<Json<wire::Domain>, ApiError> {
    let row = {
        let mut conn = cp.store.read().await?;
        domain_or_404(&mut conn, &domain).await?
    };
    let now = now_ms();
    let checked = certs::check(&body.cert_pem, &body.key_pem, &row.domain, now)
        .map_err(|e| ApiError::field(e.field, e.message))?;
    let mut tx = cp.store.write().await?;
    domain_or_404(&mut tx, &domain).await?;
    domains::put_certificate(
        &mut tx,
        &domain,
        &body.cert_pem,
        &body.key_pem,
        &checked.names,
        checked.not_after_ms,
        now,
    )
    .await?;
    let row = domain_or_404(&mut tx, &domain).await?;
    tx.commit().await?;
    cp.reload_routing_logged().await;
    Ok(Json(views::domain(&cp, &row)))
}

pub(crate) async fn delete_certificate(
    State(cp): State<AppState>,
    ApiPath(domain): ApiPath<String>,
) -> Result<Json<wire::Domain>, ApiError> {
    let mut tx = cp.store.write().await?;
    domain_or_404(&mut tx, &domain).await?;
    if !domains::delete_certificate(&mut tx, &domain).await? {
        return Err(ApiError::NotFound(format!("domain {domain:?} has no certificate")));
    }
    let row = domain_or_404(&mut tx, &domain).await?;
    tx.commit().await?;
    cp.reload_routing_logged().await;
    // Without one, an automatic certificate is ordered (when ACME is on).
    cp.acme_wake();
    Ok(Json(views::domain(&cp, &row)))
}

pub(crate) async fn delete(
    State(cp): State<AppState>,
    ApiPath(domain): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let mut tx = cp.store.write().await?;
    if !domains::delete(&mut tx, &domain).await? {
        return Err(not_found(&domain));
    }
    tx.commit().await?;
    cp.reload_routing_logged().await;
    Ok(StatusCode::NO_CONTENT)
}
