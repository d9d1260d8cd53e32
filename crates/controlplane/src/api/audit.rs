//! `GET /audit` (admin only): the audit log, newest first, a page at a time,
//! of one project with `?project=NAME`. Entries are kept 90 days
//! (`store::audit::RETENTION_MS`, pruned with the logs).

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;

use super::paging::PageRequest;
use super::projects::not_found;
use super::{ApiQuery, AppState};
use crate::error::ApiError;
use crate::store::{audit, tokens};
use crate::time::format_ms;
use isocloud_api as wire;

pub(crate) async fn list(
    State(cp): State<AppState>,
    query: ApiQuery,
) -> Result<(HeaderMap, Json<Vec<wire::AuditEntry>>), ApiError> {
    query.only(&["limit", "cursor", "project"])?;
    let page = PageRequest::from_query(&query, 100, 1000, 1)?;
    let mut conn = cp.store.read().await?;
    let project_id = match query.text("project") {
        Some(name) => Some(tokens::project_id_by_name(&mut conn, name).await?.ok_or_else(|| not_found(name))?),
        None => None,
    };
    let before = page.after.as_ref().map(|key| key[0].as_str());
    let rows = audit::list(&mut conn, project_id.as_deref(), before, page.fetch()).await?;
    let path = match query.text("project") {
        // The next link keeps the filter.
        Some(name) => format!(
            "/api/v1/audit?project={}",
            url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
        ),
        None => "/api/v1/audit".to_owned(),
    };
    let (headers, rows) = page.finish(rows, &path, |e| vec![e.id.clone()]);
    Ok((
        headers,
        Json(
            rows.iter()
                .map(|e| wire::AuditEntry {
                    id: e.id.clone(),
                    at: format_ms(e.at_ms),
                    token_id: e.token_id.clone(),
                    token_name: e.token_name.clone(),
                    action: e.action.clone(),
                    target: e.target.clone(),
                    project: e.project_name.clone(),
                    status: u16::try_from(e.status).unwrap_or_default(),
                    outcome: e.outcome.clone(),
                })
                .collect(),
        ),
    ))
}
