//! `/projects/{name}/git`: a project's repository settings, and the push
//! webhook that turns a push to its branch into a deployment (built in the
//! background by `crate::git`).

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use super::projects::{not_found, project_or_404};
use super::{ApiJson, ApiPath, AppState, check, parse_json, read_body, views};
use crate::error::ApiError;
use crate::origin::file_specifier;
use crate::store::deployments::{self, GitInfo, NewDeployment, Status};
use crate::store::env;
use crate::store::projects::{self, GitSettings};
use crate::time::now_ms;
use crate::{ids, validate};

/// The webhook is reachable without a token and its body must be read
/// before the signature can be checked, so the bound is kept well below
/// GitHub's 25 MB cap (push payloads are a few KB to a few MB).
const MAX_WEBHOOK_BODY_BYTES: usize = 8 * 1024 * 1024;
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const EVENT_HEADER: &str = "x-github-event";

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
) -> Result<Json<Value>, ApiError> {
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
) -> Result<Json<Value>, ApiError> {
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

/// `sha256=<hex HMAC-SHA256 of the body>`, compared in constant time.
pub fn signature_matches(secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(signature) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else { return false };
    let Ok(signature) = hex::decode(signature) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&signature).is_ok()
}

fn ignored(why: String) -> (StatusCode, Json<Value>) {
    (StatusCode::OK, Json(json!({ "ignored": why })))
}

pub(crate) async fn webhook(
    State(cp): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Only a project with git settings reads a body at all.
    let project = {
        let mut conn = cp.store.read().await?;
        project_or_404(&mut conn, &name).await?
    };
    let Some(git) = &project.git else {
        return Err(ApiError::NotFound(format!("project {:?} has no git settings", project.name)));
    };
    let body = read_body(request, MAX_WEBHOOK_BODY_BYTES).await?;
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    if !signature_matches(&git.secret, &body, signature) {
        return Err(ApiError::Unauthorized(format!(
            "missing or wrong {SIGNATURE_HEADER} (sha256=<hex HMAC-SHA256 of the body with the project's webhook secret>)"
        )));
    }
    let event = headers.get(EVENT_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("push");
    if event != "push" {
        return Ok(ignored(format!("{} events do not deploy", validate::truncate(event, 40))));
    }
    let push: PushEvent = parse_json(&body)?;
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

    let now = now_ms();
    let mut tx = cp.store.write().await?;
    // The project may have changed since it was read; use it as it is now.
    let project = project_or_404(&mut tx, &name).await?;
    let Some(git) = project.git.clone() else {
        return Err(ApiError::NotFound(format!("project {:?} has no git settings", project.name)));
    };
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
    let deployment =
        deployments::get(&mut tx, &new.id).await?.ok_or_else(|| ApiError::internal("deployment vanished"))?;
    tx.commit().await?;
    cp.builds.notify_one();
    Ok((StatusCode::ACCEPTED, Json(views::deployment(&cp, &deployment))))
}

#[cfg(test)]
mod tests {
    use super::*;

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
