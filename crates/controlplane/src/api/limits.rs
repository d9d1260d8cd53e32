//! `/projects/{name}/limits`: what the control plane keeps for a project
//! (log bytes a minute and in all, line length, usage rows), what it holds
//! now and what was dropped. An admin sets a project's own bounds with PUT;
//! a bound left out or `null` is the default.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::projects::project_or_404;
use super::{ApiJson, ApiPath, AppState};
use crate::error::ApiError;
use crate::store::limits::{self, DEFAULT_LIMITS, Limits, Overrides, ProjectState, RULES};
use crate::time::{format_ms, now_ms};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsBody {
    #[serde(default)]
    log_bytes_per_minute: Option<i64>,
    #[serde(default)]
    log_bytes_total: Option<i64>,
    #[serde(default)]
    log_line_bytes: Option<i64>,
    #[serde(default)]
    usage_rows: Option<i64>,
}

fn limits_json(limits: &Limits) -> Value {
    json!({
        "log_bytes_per_minute": limits.log_bytes_per_minute,
        "log_bytes_total": limits.log_bytes_total,
        "log_line_bytes": limits.log_line_bytes,
        "usage_rows": limits.usage_rows,
    })
}

pub(crate) fn view(state: &ProjectState) -> Value {
    let limits = state.overrides.limits();
    let mut body = limits_json(&limits);
    let this_minute = now_ms() - state.window_start_ms < 60_000;
    body["defaults"] = limits_json(&DEFAULT_LIMITS);
    body["held"] = json!({
        "log_bytes": state.log_bytes,
        "usage_rows": state.usage_row_count,
        "log_bytes_this_minute": if this_minute { state.window_bytes } else { 0 },
        "minute_started_at": (state.window_start_ms > 0).then(|| format_ms(state.window_start_ms)),
    });
    body["dropped"] = json!({
        "log_lines_over_rate": state.dropped_lines,
        "log_bytes_over_rate": state.dropped_bytes,
        "log_lines_evicted": state.evicted_lines,
        "log_bytes_evicted": state.evicted_bytes,
        "log_lines_truncated": state.truncated_lines,
        "usage_rows_evicted": state.evicted_usage_rows,
    });
    body
}

pub(crate) async fn get(State(cp): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let mut conn = cp.store.read().await?;
    let project = project_or_404(&mut conn, &name).await?;
    let state = limits::get(&mut conn, &project.id).await?;
    Ok(Json(view(&state)))
}

/// Each given bound within its rule, and a line no longer than a minute's
/// bytes (or no line would ever fit).
fn check(body: &LimitsBody) -> Result<Overrides, ApiError> {
    let given = [
        ("log_bytes_per_minute", body.log_bytes_per_minute),
        ("log_bytes_total", body.log_bytes_total),
        ("log_line_bytes", body.log_line_bytes),
        ("usage_rows", body.usage_rows),
    ];
    for (field, value) in given {
        let Some(value) = value else { continue };
        let (_, min, max, why) = RULES.iter().find(|(name, ..)| *name == field).expect("a rule per field");
        if !(*min..=*max).contains(&value) {
            return Err(ApiError::field(field, format!("must be from {min} to {max} ({why})")));
        }
    }
    let overrides = Overrides {
        log_bytes_per_minute: body.log_bytes_per_minute,
        log_bytes_total: body.log_bytes_total,
        log_line_bytes: body.log_line_bytes,
        usage_rows: body.usage_rows,
    };
    let limits = overrides.limits();
    if limits.log_line_bytes > limits.log_bytes_per_minute {
        return Err(ApiError::field(
            "log_line_bytes",
            format!(
                "{} is more than log_bytes_per_minute ({}): no line would ever be kept",
                limits.log_line_bytes, limits.log_bytes_per_minute
            ),
        ));
    }
    Ok(overrides)
}

pub(crate) async fn put(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<LimitsBody>,
) -> Result<Json<Value>, ApiError> {
    let overrides = check(&body)?;
    let mut tx = cp.store.write().await?;
    let project = project_or_404(&mut tx, &name).await?;
    let state = limits::set_overrides(&mut tx, &project.id, &overrides, now_ms()).await?;
    tx.commit().await?;
    tracing::info!(target: "isocloud::controlplane", project = project.name, ?overrides, "project limits set");
    Ok(Json(view(&state)))
}
