//! `/projects`: create, list, rename, delete; promote and roll back.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use sqlx::AnyConnection;

use super::access::{AuditNote, Caller};
use super::paging::PageRequest;
use super::{ApiJson, ApiPath, ApiQuery, AppState, OptionalJson, check, views};
use crate::error::ApiError;
use crate::store::deployments::{self, Status};
use crate::store::projects::{self, ProjectRow};
use crate::time::now_ms;
use crate::validate::DeploymentId;
use crate::{ids, validate};
use isocloud_api as wire;

pub(crate) fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("project {:?} not found", validate::truncate(name, 80)))
}

pub(crate) async fn project_or_404(conn: &mut AnyConnection, name: &str) -> Result<ProjectRow, ApiError> {
    projects::by_name(conn, name).await?.ok_or_else(|| not_found(name))
}

/// Projects by name, a page at a time (`?limit=N`, 1–1000, default 100;
/// `Link: rel="next"` while more follow). A project token sees its own
/// project only.
pub(crate) async fn list(
    State(cp): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: ApiQuery,
) -> Result<(HeaderMap, Json<Vec<wire::Project>>), ApiError> {
    query.only(&["limit", "cursor"])?;
    let page = PageRequest::from_query(&query, 100, 1000, 1)?;
    let mut conn = cp.store.read().await?;
    let after = page.after.as_ref().map(|key| key[0].as_str());
    let rows = match caller.project_id() {
        None => projects::list(&mut conn, after, page.fetch()).await?,
        Some(id) => projects::by_id(&mut conn, id)
            .await?
            .into_iter()
            .filter(|p| after.is_none_or(|after| p.name.as_str() > after))
            .collect(),
    };
    let (headers, rows) = page.finish(rows, "/api/v1/projects", |p| vec![p.name.clone()]);
    Ok((headers, Json(rows.iter().map(|p| views::project(&cp, p)).collect())))
}

pub(crate) async fn create(
    State(cp): State<AppState>,
    ApiJson(body): ApiJson<wire::ProjectNameBody>,
) -> Result<impl IntoResponse, ApiError> {
    let name = check("name", validate::project_name(&body.name))?;
    let id = ids::project_id();
    let mut tx = cp.store.write().await?;
    projects::insert(&mut tx, &id, &name, now_ms()).await?;
    let project = projects::by_id(&mut tx, &id).await?.ok_or_else(|| ApiError::internal("project vanished"))?;
    tx.commit().await?;
    // A project without production routes nowhere yet: no table rebuild.
    let note = AuditNote(format!("project {}", project.name));
    Ok((StatusCode::CREATED, Extension(note), Json(views::project(&cp, &project))))
}

pub(crate) async fn get(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<wire::Project>, ApiError> {
    let mut conn = cp.store.read().await?;
    let project = project_or_404(&mut conn, &name).await?;
    Ok(Json(views::project(&cp, &project)))
}

pub(crate) async fn rename(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<wire::ProjectNameBody>,
) -> Result<Json<wire::Project>, ApiError> {
    let new_name = check("name", validate::project_name(&body.name))?;
    let mut tx = cp.store.write().await?;
    let now = now_ms();
    let project = projects::lock_by_name(&mut tx, &name, now).await?.ok_or_else(|| not_found(&name))?;
    if new_name.as_str() != project.name {
        projects::rename(&mut tx, &project.id, &new_name, now).await?;
    }
    let project = projects::by_id(&mut tx, &project.id).await?.ok_or_else(|| not_found(&name))?;
    tx.commit().await?;
    cp.reload_routing_logged().await;
    Ok(Json(views::project(&cp, &project)))
}

pub(crate) async fn delete(State(cp): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<StatusCode, ApiError> {
    let mut tx = cp.store.write().await?;
    let project = project_or_404(&mut tx, &name).await?;
    projects::delete(&mut tx, &project.id).await?;
    tx.commit().await?;
    cp.reload_routing_logged().await;
    cp.remove_git_mirror(&project.id).await;
    Ok(StatusCode::NO_CONTENT)
}

fn deployment_id_field(id: &str) -> Result<DeploymentId, ApiError> {
    validate::deployment_id(id).ok_or_else(|| {
        ApiError::field("deployment_id", format!("{:?} is not a deployment id", validate::truncate(id, 80)))
    })
}

pub(crate) async fn promote(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<wire::DeploymentRefBody>,
) -> Result<Json<wire::Project>, ApiError> {
    let id = deployment_id_field(&body.deployment_id)?;
    let mut tx = cp.store.write().await?;
    let now = now_ms();
    let project = projects::lock_by_name(&mut tx, &name, now).await?.ok_or_else(|| not_found(&name))?;
    let deployment =
        deployments::get(&mut tx, id.as_str()).await?.filter(|d| d.project_id == project.id).ok_or_else(|| {
            ApiError::NotFound(format!("deployment {:?} not found in project {:?}", id.as_str(), project.name))
        })?;
    if deployment.status != Status::Ready {
        return Err(ApiError::Conflict(format!(
            "deployment {} is {}; only ready deployments can be promoted",
            deployment.id,
            deployment.status.as_str()
        )));
    }
    if !deployment.is_production() {
        projects::promote(&mut tx, &project.id, &deployment.id, now).await?;
    }
    let project = projects::by_id(&mut tx, &project.id).await?.ok_or_else(|| not_found(&name))?;
    tx.commit().await?;
    cp.reload_routing_logged().await;
    Ok(Json(views::project(&cp, &project)))
}

pub(crate) async fn rollback(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    OptionalJson(body): OptionalJson<wire::DeploymentRefBody>,
) -> Result<Json<wire::Project>, ApiError> {
    let wanted = body.map(|body| deployment_id_field(&body.deployment_id)).transpose()?;
    let mut tx = cp.store.write().await?;
    let now = now_ms();
    let project = projects::lock_by_name(&mut tx, &name, now).await?.ok_or_else(|| not_found(&name))?;
    let history = projects::history(&mut tx, &project.id).await?;
    let current = project.production_deployment_id.as_deref();
    let target = match &wanted {
        None => history.iter().find(|p| Some(p.deployment_id.as_str()) != current).ok_or_else(|| {
            ApiError::Conflict(format!(
                "project {:?} has no earlier production deployment to roll back to",
                project.name
            ))
        })?,
        Some(id) => {
            let owned = deployments::get(&mut tx, id.as_str()).await?.is_some_and(|d| d.project_id == project.id);
            if !owned {
                return Err(ApiError::NotFound(format!(
                    "deployment {:?} not found in project {:?}",
                    id.as_str(),
                    project.name
                )));
            }
            history.iter().find(|p| p.deployment_id == id.as_str()).ok_or_else(|| {
                ApiError::field(
                    "deployment_id",
                    format!("deployment {} was never production of project {:?}", id.as_str(), project.name),
                )
            })?
        }
    };
    if Some(target.deployment_id.as_str()) != current || history.first().map(|p| p.seq) != Some(target.seq) {
        projects::rollback_to(&mut tx, &project.id, target, now).await?;
    }
    let project = projects::by_id(&mut tx, &project.id).await?.ok_or_else(|| not_found(&name))?;
    tx.commit().await?;
    cp.reload_routing_logged().await;
    Ok(Json(views::project(&cp, &project)))
}
