//! `/projects/{name}/env`: env vars, copied into each new deployment. Values
//! go in and are never shown again.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::projects::project_or_404;
use super::{ApiJson, ApiPath, AppState, check};
use crate::error::ApiError;
use crate::store::env;
use crate::time::{format_ms, now_ms};
use crate::validate;
use isocloud_api as wire;

pub(crate) async fn list(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Vec<wire::EnvVar>>, ApiError> {
    let mut conn = cp.store.read().await?;
    let project = project_or_404(&mut conn, &name).await?;
    let vars = env::list(&mut conn, &project.id).await?;
    Ok(Json(
        vars.iter().map(|v| wire::EnvVar { name: v.name.clone(), updated_at: format_ms(v.updated_at_ms) }).collect(),
    ))
}

pub(crate) async fn put(
    State(cp): State<AppState>,
    ApiPath((name, env_name)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<wire::EnvValueBody>,
) -> Result<Json<wire::EnvVar>, ApiError> {
    check("name", validate::env_name(&env_name))?;
    check("value", validate::env_value(&body.value))?;
    let now = now_ms();
    let mut tx = cp.store.write().await?;
    let project = project_or_404(&mut tx, &name).await?;
    if !env::exists(&mut tx, &project.id, &env_name).await?
        && env::count(&mut tx, &project.id).await? >= validate::MAX_ENV_VARS as i64
    {
        return Err(ApiError::Conflict(format!(
            "project {:?} already has the most env vars a project may have ({})",
            project.name,
            validate::MAX_ENV_VARS
        )));
    }
    env::upsert(&mut tx, &project.id, &env_name, &body.value, now).await?;
    tx.commit().await?;
    Ok(Json(wire::EnvVar { name: env_name, updated_at: format_ms(now) }))
}

pub(crate) async fn delete(
    State(cp): State<AppState>,
    ApiPath((name, env_name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = cp.store.write().await?;
    let project = project_or_404(&mut tx, &name).await?;
    if !env::delete(&mut tx, &project.id, &env_name).await? {
        return Err(ApiError::NotFound(format!(
            "env var {:?} not found in project {:?}",
            validate::truncate(&env_name, 80),
            project.name
        )));
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
