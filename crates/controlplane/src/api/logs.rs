//! Logs (also followed as an NDJSON stream), usage records and analytics.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use isocloud_api as wire;
use sqlx::AnyConnection;

use super::deployments::deployment_not_found;
use super::paging::{PageRequest, bad_cursor};
use super::projects::project_or_404;
use super::{ApiPath, ApiQuery, AppState, views};
use crate::ControlPlane;
use crate::error::ApiError;
use crate::store::activity::{self, Bucket, LogFilter, LogRow};
use crate::store::{deployments, limits};
use crate::time::now_ms;
use crate::validate;

/// How often a follow stream asks the database for new entries. Polling
/// (rather than a channel from `report_activity`) sees what every node of a
/// shared database stored.
const FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(300);
/// Entries one poll fetches at most (the rest come with the next poll).
const FOLLOW_BATCH: i64 = 500;
/// Follow streams one node serves at once.
pub const MAX_LOG_FOLLOWS: usize = 256;
const MAX_POINTS: i64 = 10_000;

/// The `deployment` query parameter: a deployment of this project.
async fn deployment_filter(
    conn: &mut AnyConnection,
    project_id: &str,
    query: &ApiQuery,
) -> Result<Option<String>, ApiError> {
    let Some(text) = query.text("deployment") else { return Ok(None) };
    let Some(id) = validate::deployment_id(text) else { return Err(deployment_not_found(text)) };
    let owned = deployments::get(conn, id.as_str()).await?.is_some_and(|d| d.project_id == project_id);
    if owned { Ok(Some(id.into_string())) } else { Err(deployment_not_found(text)) }
}

pub(crate) async fn project_logs(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    query: ApiQuery,
) -> Result<Response, ApiError> {
    query.only(&["deployment", "since", "limit", "follow", "cursor"])?;
    let mut conn = cp.store.read().await?;
    let project = project_or_404(&mut conn, &name).await?;
    let deployment_id = deployment_filter(&mut conn, &project.id, &query).await?;
    let bounds = limits::get(&mut conn, &project.id).await?;
    drop(conn);
    let filter = LogFilter {
        project_id: Some(project.id),
        deployment_id,
        since_ms: query.time_ms("since")?,
        ..LogFilter::default()
    };
    let path = with_filters(format!("/api/v1/projects/{name}/logs"), &query, &["deployment", "since"]);
    let mut response = logs_response(cp, filter, &query, &path).await?;
    // What the project's bounds dropped, beside the lines: over the rate
    // (also an entry of type "dropped" in the lines, once a minute) and
    // removed oldest-first for the total (`GET …/limits` has the rest).
    let headers = response.headers_mut();
    headers.insert(DROPPED_HEADER, HeaderValue::from(bounds.dropped_lines));
    headers.insert(EVICTED_HEADER, HeaderValue::from(bounds.evicted_lines));
    Ok(response)
}

/// Log lines a project's rate bound dropped, since it was first bounded.
pub const DROPPED_HEADER: &str = "x-isocloud-log-lines-dropped";
/// Log lines its total bound removed, oldest first.
pub const EVICTED_HEADER: &str = "x-isocloud-log-lines-evicted";

pub(crate) async fn deployment_logs(
    State(cp): State<AppState>,
    ApiPath(id): ApiPath<String>,
    query: ApiQuery,
) -> Result<Response, ApiError> {
    query.only(&["since", "limit", "follow", "cursor"])?;
    let id = validate::deployment_id(&id).ok_or_else(|| deployment_not_found(&id))?;
    {
        let mut conn = cp.store.read().await?;
        deployments::get(&mut conn, id.as_str()).await?.ok_or_else(|| deployment_not_found(id.as_str()))?;
    }
    let path = with_filters(format!("/api/v1/deployments/{}/logs", id.as_str()), &query, &["since"]);
    let deployment_id = Some(id.into_string());
    let filter = LogFilter { deployment_id, since_ms: query.time_ms("since")?, ..LogFilter::default() };
    logs_response(cp, filter, &query, &path).await
}

/// `path` with the filters of `query` that were given, for the next page's link.
fn with_filters(path: String, query: &ApiQuery, names: &[&str]) -> String {
    let mut pairs = url::form_urlencoded::Serializer::new(String::new());
    for name in names {
        if let Some(value) = query.text(name) {
            pairs.append_pair(name, value);
        }
    }
    let pairs = pairs.finish();
    if pairs.is_empty() { path } else { format!("{path}?{pairs}") }
}

/// A page of the newest entries (oldest first within it), its `Link` to the
/// page of older ones; or, with `follow`, that page and then the new ones as
/// they come. The cursor is the oldest entry's id given: pages go back in
/// time, and entries stored meanwhile never shift them.
async fn logs_response(
    cp: Arc<ControlPlane>,
    mut filter: LogFilter,
    query: &ApiQuery,
    path: &str,
) -> Result<Response, ApiError> {
    let page = PageRequest::from_query(query, 100, 1000, 1)?;
    let follow = query.flag("follow")?;
    if let Some(after) = &page.after {
        if follow {
            return Err(ApiError::field("cursor", "pages older entries; it does not go with follow=true"));
        }
        filter.before_id = Some(after[0].parse().map_err(|_| bad_cursor())?);
    }
    let mut initial = {
        let mut conn = cp.store.read().await?;
        activity::logs(&mut conn, &filter, page.fetch(), true).await?
    };
    if !follow {
        // Newest last: the extra row that says more follow is the first.
        initial.reverse();
        let (headers, mut rows) = page.finish(initial, path, |log| vec![log.id.to_string()]);
        rows.reverse();
        return Ok((headers, Json(rows.iter().map(views::log).collect::<Vec<_>>())).into_response());
    }
    // Follow mode starts from the page asked for, without the extra row.
    let extra = initial.len().saturating_sub(usize::try_from(page.limit).unwrap_or(usize::MAX));
    initial.drain(..extra);
    let guard = FollowGuard::new(&cp)?;
    let last_id = initial.last().map_or(0, |log| log.id);
    let state = Follow { cp, filter, last_id, pending: initial.into(), _guard: guard };
    let stream = futures_util::stream::unfold(state, |mut follow| async move {
        let line = follow.next_line().await;
        Some((Ok::<_, std::convert::Infallible>(line), follow))
    });
    Ok(([(CONTENT_TYPE, "application/x-ndjson"), (CACHE_CONTROL, "no-cache")], Body::from_stream(stream))
        .into_response())
}

/// Counts open follow streams; the count drops when the client goes away
/// (hyper drops the body, and this with it).
struct FollowGuard(Arc<ControlPlane>);

impl FollowGuard {
    fn new(cp: &Arc<ControlPlane>) -> Result<Self, ApiError> {
        let before = cp.log_follows.fetch_add(1, Ordering::SeqCst);
        let guard = FollowGuard(Arc::clone(cp));
        if before >= MAX_LOG_FOLLOWS {
            return Err(ApiError::Conflict(format!(
                "{MAX_LOG_FOLLOWS} log streams are open on this control plane already; try again later"
            )));
        }
        Ok(guard)
    }
}

impl Drop for FollowGuard {
    fn drop(&mut self) {
        self.0.log_follows.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Follow {
    cp: Arc<ControlPlane>,
    filter: LogFilter,
    last_id: i64,
    pending: VecDeque<LogRow>,
    _guard: FollowGuard,
}

impl Follow {
    /// The next NDJSON line; waits (polling) until there is one.
    async fn next_line(&mut self) -> String {
        loop {
            if let Some(log) = self.pending.pop_front() {
                self.last_id = self.last_id.max(log.id);
                return ndjson_line(&views::log(&log));
            }
            tokio::time::sleep(FOLLOW_POLL_INTERVAL).await;
            let filter = LogFilter { after_id: Some(self.last_id), ..self.filter.clone() };
            let fetched = async {
                let mut conn = self.cp.store.read().await?;
                activity::logs(&mut conn, &filter, FOLLOW_BATCH, false).await
            }
            .await;
            match fetched {
                Ok(logs) => self.pending.extend(logs),
                Err(e) => tracing::warn!(target: "isocloud::controlplane", error = %e, "log follow poll failed"),
            }
        }
    }
}

/// One line of a follow stream: the entry's JSON and a newline.
fn ndjson_line(entry: &wire::LogEntry) -> String {
    // A struct of strings and integers always serialises.
    let mut line = serde_json::to_string(entry).unwrap_or_default();
    line.push('\n');
    line
}

pub(crate) async fn usage(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    query: ApiQuery,
) -> Result<Json<Vec<wire::Usage>>, ApiError> {
    query.only(&["deployment", "since", "limit"])?;
    let since_ms = query.time_ms("since")?;
    let limit = query.int("limit", 1000, 1, 10_000)?;
    let mut conn = cp.store.read().await?;
    let project = project_or_404(&mut conn, &name).await?;
    let deployment_id = deployment_filter(&mut conn, &project.id, &query).await?;
    let rows = activity::usage(&mut conn, &project.id, deployment_id.as_deref(), since_ms, limit).await?;
    Ok(Json(rows.iter().map(views::usage).collect()))
}

/// Bucket starts from `since` (rounded down to a step) to now, each with
/// the sums of the usage records that started in it (zero when none).
pub(crate) fn fill_points(buckets: &[Bucket], first_ms: i64, last_ms: i64, step_ms: i64) -> Vec<Bucket> {
    let mut by_start = buckets.iter().map(|b| (b.bucket_start_ms, b)).collect::<std::collections::HashMap<_, _>>();
    let mut points = Vec::new();
    let mut t = first_ms;
    while t <= last_ms {
        points.push(by_start.remove(&t).cloned().unwrap_or(Bucket { bucket_start_ms: t, ..Bucket::default() }));
        t += step_ms;
    }
    points
}

pub(crate) async fn analytics(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    query: ApiQuery,
) -> Result<Json<wire::Analytics>, ApiError> {
    query.only(&["deployment", "since", "step_s"])?;
    let step_s = query.int("step_s", 60, 10, 86_400)?;
    let step_ms = step_s * 1000;
    let now = now_ms();
    let since_ms = query.time_ms("since")?.unwrap_or(now - 3_600_000);
    let first_ms = since_ms.div_euclid(step_ms) * step_ms;
    let last_ms = now.div_euclid(step_ms) * step_ms;
    let points = (last_ms - first_ms) / step_ms + 1;
    if points > MAX_POINTS {
        return Err(ApiError::field(
            "step_s",
            format!("{points} points from `since` to now at {step_s} s each; at most {MAX_POINTS} (raise step_s)"),
        ));
    }
    let mut conn = cp.store.read().await?;
    let project = project_or_404(&mut conn, &name).await?;
    let deployment_id = deployment_filter(&mut conn, &project.id, &query).await?;
    let buckets =
        activity::analytics(&mut conn, &project.id, deployment_id.as_deref(), first_ms, last_ms + step_ms, step_ms)
            .await?;
    let points = fill_points(&buckets, first_ms, last_ms, step_ms);
    Ok(Json(wire::Analytics {
        step_s,
        latency_le_ms: views::latency_le_ms(),
        points: points.iter().map(views::point).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_filled_with_zeros() {
        let data = vec![Bucket { bucket_start_ms: 120_000, requests: 5, ..Bucket::default() }];
        let points = fill_points(&data, 60_000, 180_000, 60_000);
        assert_eq!(points.iter().map(|p| p.bucket_start_ms).collect::<Vec<_>>(), vec![60_000, 120_000, 180_000]);
        assert_eq!(points.iter().map(|p| p.requests).collect::<Vec<_>>(), vec![0, 5, 0]);
    }
}
