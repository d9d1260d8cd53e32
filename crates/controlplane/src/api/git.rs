//! `/projects/{name}/git`: a project's repository settings, and the push
//! webhook that turns a push to its branch into a deployment (built in the
//! background by `crate::git`).
//!
//! The webhook is public: it reads its body into the HMAC as it arrives,
//! within one budget of bytes for all the bodies being read, each bounded
//! in bytes and time
//! (`crate::git::MAX_WEBHOOK_*`); answers every unsigned delivery the same
//! 401; and builds a delivery once (`store::deliveries`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::projects::{not_found, project_or_404};
use super::{ApiJson, ApiPath, AppState, check, parse_json, views};
use crate::error::{ApiError, error_response};
use crate::git::{MAX_WEBHOOK_BODY_BYTES, MAX_WEBHOOK_BUFFERED_BYTES, WEBHOOK_BODY_TIMEOUT, WebhookRefusal};
use crate::origin::file_specifier;
use crate::store::StoreError;
use crate::store::deliveries;
use crate::store::deployments::{self, GitInfo, NewDeployment, Status};
use crate::store::env;
use crate::store::projects::{self, GitSettings};
use crate::time::now_ms;
use crate::{ids, validate};
use isocloud_api::{self as wire, ApiErrorBody, code};

pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const EVENT_HEADER: &str = "x-github-event";
/// Where a forge puts its id of a delivery, first found wins.
const DELIVERY_HEADERS: [&str; 3] = ["x-github-delivery", "x-gitea-delivery", "x-gogs-delivery"];
const MAX_DELIVERY_ID_BYTES: usize = 128;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettingsBody {
    repository: String,
    branch: String,
    entrypoint: String,
    secret: String,
}

pub(crate) async fn put_settings(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<SettingsBody>,
) -> Result<Json<wire::Project>, ApiError> {
    check("repository", validate::git_repository(&body.repository))?;
    check("branch", validate::git_branch(&body.branch))?;
    let entrypoint = body.entrypoint.trim_start_matches("./");
    check("entrypoint", validate::file_path(entrypoint))?;
    if !validate::is_code_path(entrypoint) {
        return Err(ApiError::field(
            "entrypoint",
            format!("{entrypoint:?} is not a code file ({})", validate::CODE_EXTENSIONS.join(", ")),
        ));
    }
    check("entrypoint", validate::code_path(entrypoint))?;
    check("secret", validate::webhook_secret(&body.secret))?;
    let settings = GitSettings {
        repository: body.repository,
        branch: body.branch,
        entrypoint: entrypoint.to_owned(),
        secret: body.secret,
    };
    let mut tx = cp.store.write().await?;
    let project = project_or_404(&mut tx, &name).await?;
    projects::set_git(&mut tx, &project.id, Some(&settings), now_ms()).await?;
    let project = projects::by_id(&mut tx, &project.id).await?.ok_or_else(|| not_found(&name))?;
    tx.commit().await?;
    Ok(Json(views::project(&cp, &project)))
}

pub(crate) async fn delete_settings(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<wire::Project>, ApiError> {
    let mut tx = cp.store.write().await?;
    let project = project_or_404(&mut tx, &name).await?;
    projects::set_git(&mut tx, &project.id, None, now_ms()).await?;
    let project = projects::by_id(&mut tx, &project.id).await?.ok_or_else(|| not_found(&name))?;
    tx.commit().await?;
    Ok(Json(views::project(&cp, &project)))
}

/// The parts of a GitHub push event the webhook reads.
#[derive(Deserialize)]
struct PushEvent {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    head_commit: Option<HeadCommit>,
}

#[derive(Deserialize)]
struct HeadCommit {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// A fresh HMAC-SHA256 keyed with `key` (HMAC takes a key of any length).
fn mac_for(key: &[u8]) -> Option<Hmac<Sha256>> {
    Hmac::<Sha256>::new_from_slice(key).ok()
}

/// The 32 bytes of `sha256=<hex>`, or `None` for anything else.
fn parse_signature(header: Option<&str>) -> Option<Vec<u8>> {
    let signature = hex::decode(header?.trim().strip_prefix("sha256=")?).ok()?;
    (signature.len() == 32).then_some(signature)
}

/// The one answer to every delivery that is not signed with the project's
/// secret, whether the project exists, has git settings, or not: an
/// outsider learns nothing of which projects there are.
fn unauthorized() -> ApiError {
    ApiError::Unauthorized(format!(
        "missing or wrong {SIGNATURE_HEADER} (sha256=<hex HMAC-SHA256 of the body with the project's webhook secret>)"
    ))
}

/// A delivery that builds nothing, and why.
fn ignored(why: String) -> Response {
    (StatusCode::OK, Json(json!({ "status": "ignored", "reason": why }))).into_response()
}

/// 503 with `Retry-After`: the bodies being read hold the byte budget. The
/// connection closes, as this body was not read to its end.
fn busy(cp: &AppState) -> Response {
    cp.webhook_gate.count(WebhookRefusal::Busy);
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        ApiErrorBody::new(
            code::CAPACITY,
            format!(
                "the webhook deliveries being read hold the {} MiB they may; try again shortly",
                MAX_WEBHOOK_BUFFERED_BYTES >> 20
            ),
        ),
    );
    response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

pub(crate) async fn webhook(State(cp): State<AppState>, ApiPath(name): ApiPath<String>, request: Request) -> Response {
    match receive(&cp, &name, request).await {
        Ok(response) => response,
        Err(e) => {
            match &e {
                ApiError::Unauthorized(_) => cp.webhook_gate.count(WebhookRefusal::Unsigned),
                ApiError::PayloadTooLarge(_) => cp.webhook_gate.count(WebhookRefusal::TooLarge),
                _ => {}
            }
            e.into_response()
        }
    }
}

/// Why reading a webhook body stopped.
enum BodyError {
    TooSlow,
    /// The budget of bytes being read is spent.
    Busy,
    Api(ApiError),
}

/// Reads the body into `mac` as it arrives, at most
/// [`MAX_WEBHOOK_BODY_BYTES`], each KiB taken from `budget` as it comes:
/// the body and the permits for its bytes.
async fn read_signed_body(
    request: Request,
    mac: &mut Hmac<Sha256>,
    budget: &Arc<Semaphore>,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), BodyError> {
    let too_large = || ApiError::PayloadTooLarge(format!("the body is larger than {MAX_WEBHOOK_BODY_BYTES} bytes"));
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_WEBHOOK_BODY_BYTES as u64) {
        return Err(BodyError::Api(too_large()));
    }
    let mut stream = request.into_body().into_data_stream();
    let mut body = Vec::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Api(ApiError::request(format!("reading the body failed: {e}"))))?;
        let length = body.len() + chunk.len();
        if length > MAX_WEBHOOK_BODY_BYTES {
            return Err(BodyError::Api(too_large()));
        }
        // By the body's whole length, so many small chunks cost no more
        // than one large one.
        let held_kib = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        let more_kib = length.div_ceil(1024).saturating_sub(held_kib);
        if more_kib > 0 {
            let more = u32::try_from(more_kib).map_err(|_| BodyError::Busy)?;
            let permit = Arc::clone(budget).try_acquire_many_owned(more).map_err(|_| BodyError::Busy)?;
            match &mut held {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
        }
        mac.update(&chunk);
        body.extend_from_slice(&chunk);
    }
    Ok((body, held))
}

async fn receive(cp: &AppState, name: &str, request: Request) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::now() + WEBHOOK_BODY_TIMEOUT;
    let headers = request.headers().clone();
    let Some(signature) = parse_signature(headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok())) else {
        return Err(unauthorized());
    };
    // Every delivery reads its body into an HMAC, with a random key when
    // the project has no secret, so the answer and its time are the same
    // for a project with git settings, one without, and none.
    let project = if name.len() <= validate::MAX_PROJECT_NAME_BYTES {
        let mut conn = cp.store.read().await?;
        projects::by_name(&mut conn, name).await?
    } else {
        None
    };
    let secret = project.as_ref().and_then(|p| p.git.as_ref()).map(|git| git.secret.as_bytes());
    let mut mac = mac_for(secret.unwrap_or(&cp.webhook_gate.unknown_project_key)).ok_or_else(unauthorized)?;
    let budget = &cp.webhook_gate.body_kib;
    let body = match tokio::time::timeout_at(deadline, read_signed_body(request, &mut mac, budget)).await {
        Ok(body) => body,
        Err(_) => Err(BodyError::TooSlow),
    };
    let body = match body {
        // The body is held now only if it is signed.
        Ok((body, _permits)) => body,
        Err(BodyError::Api(e)) => return Err(e),
        Err(BodyError::Busy) => return Ok(busy(cp)),
        Err(BodyError::TooSlow) => {
            cp.webhook_gate.count(WebhookRefusal::BodyTimeout);
            let mut response = error_response(
                StatusCode::REQUEST_TIMEOUT,
                ApiErrorBody::new(
                    code::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {} s", WEBHOOK_BODY_TIMEOUT.as_secs()),
                ),
            );
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            return Ok(response);
        }
    };
    let signed = mac.verify_slice(&signature).is_ok();
    let (true, Some(_)) = (signed, secret) else { return Err(unauthorized()) };

    let event = headers.get(EVENT_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("push");
    if event != "push" {
        return Ok(ignored(format!("{} events do not deploy", validate::truncate(event, 40))));
    }
    let push: PushEvent = parse_json(&body)?;
    let git = project.as_ref().and_then(|p| p.git.as_ref()).ok_or_else(unauthorized)?;
    if push.deleted {
        return Ok(ignored(format!("{} was deleted", validate::truncate(&push.git_ref, 300))));
    }
    let Some(branch) = push.git_ref.strip_prefix("refs/heads/") else {
        return Ok(ignored(format!("{} is not a branch", validate::truncate(&push.git_ref, 300))));
    };
    if branch != git.branch {
        return Ok(ignored(format!(
            "branch {} is not the configured branch {}",
            validate::truncate(branch, 300),
            git.branch
        )));
    }
    check("after", validate::git_commit(&push.after))?;
    let head = push.head_commit.as_ref();
    let message = head
        .filter(|h| h.id.as_deref() == Some(push.after.as_str()) || h.id.is_none())
        .and_then(|h| h.message.as_deref())
        .map(validate::first_line)
        .unwrap_or_default();
    // A delivery is known by its signed body (which a replay cannot change)
    // and by the forge's id for it.
    let mut keys = vec![format!("body:{}", ids::sha256_hex(&body))];
    if let Some(delivery) = delivery_id(&headers)? {
        keys.push(format!("id:{delivery}"));
    }

    let now = now_ms();
    let mut tx = cp.store.write().await?;
    // The project may have changed since it was read; use it as it is now.
    let project = project_or_404(&mut tx, name).await?;
    let Some(git) = project.git.clone() else { return Err(unauthorized()) };
    if let Some(seen) = deliveries::seen(&mut tx, &project.id, &keys).await? {
        return Ok(ignored(format!(
            "this delivery was received before, at {}, and made deployment {}; a delivery builds once",
            crate::time::format_ms(seen.received_at_ms),
            seen.deployment_id
        )));
    }
    let envs = env::snapshot(&mut tx, &project.id).await?;
    let new = NewDeployment {
        id: ids::deployment_id(),
        project_id: project.id.clone(),
        created_at_ms: now,
        status: Status::Building,
        entrypoint: file_specifier(&git.entrypoint),
        eszip_sha256: None,
        permissions_json: "null".into(),
        envs,
        git: Some(GitInfo { commit: push.after.clone(), message, branch: branch.to_owned() }),
        files: Vec::new(),
        build_promote: true,
        error: None,
        build_log: None,
    };
    deployments::insert(&mut tx, &new).await?;
    match deliveries::record(&mut tx, &project.id, &keys, &new.id, now).await {
        Ok(()) => {}
        // The same delivery, at the same moment, on another node.
        Err(StoreError::Conflict(why)) => return Ok(ignored(why)),
        Err(e) => return Err(e.into()),
    }
    let deployment =
        deployments::get(&mut tx, &new.id).await?.ok_or_else(|| ApiError::internal("deployment vanished"))?;
    tx.commit().await?;
    cp.builds.notify_one();
    Ok((StatusCode::ACCEPTED, Json(views::deployment(cp, &deployment))).into_response())
}

/// The forge's id of this delivery: GitHub's header, or Gitea's or Gogs'
/// own (they send GitHub's signature and event headers too).
fn delivery_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some((name, value)) = DELIVERY_HEADERS.iter().find_map(|name| Some((*name, headers.get(*name)?))) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(id) if !id.is_empty() && id.len() <= MAX_DELIVERY_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(id.to_owned()))
        }
        _ => Err(ApiError::field(name, format!("must be 1–{MAX_DELIVERY_ID_BYTES} printable ASCII characters"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sha256=<hex HMAC-SHA256 of the body>`, compared in constant time,
    /// as the webhook does it (there in pieces, as the body arrives).
    fn signature_matches(secret: &str, body: &[u8], header: Option<&str>) -> bool {
        let (Some(signature), Some(mut mac)) = (parse_signature(header), mac_for(secret.as_bytes())) else {
            return false;
        };
        for piece in body.chunks(3) {
            mac.update(piece);
        }
        mac.verify_slice(&signature).is_ok()
    }

    #[test]
    fn signatures() {
        // The example of GitHub's documentation.
        let secret = "It's a Secret to Everybody";
        let body = b"Hello, World!";
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_matches(secret, body, Some(good)));
        assert!(!signature_matches(secret, b"Hello, World?", Some(good)));
        assert!(!signature_matches("other secret", body, Some(good)));
        assert!(!signature_matches(secret, body, None));
        assert!(!signature_matches(secret, body, Some("sha1=757107ea")));
        assert!(!signature_matches(secret, body, Some("sha256=zz")));
        assert!(!signature_matches(secret, body, Some("sha256=")));
    }
}
