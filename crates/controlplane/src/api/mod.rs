//! The HTTP API of `docs/control-plane-api.md`, under `/api/v1`: routing,
//! bearer-token authentication and scopes (`access.rs`), and the extractors
//! that turn every bad input into an [`ApiError`] (never axum's plain-text rejections).

mod access;
mod audit;
mod blobs;
mod deployments;
mod domains;
mod env;
mod git;
mod limits;
mod logs;
mod paging;
mod projects;
mod tokens;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::routing::{delete, get, post, put};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::ControlPlane;
use crate::error::ApiError;

pub(crate) type AppState = Arc<ControlPlane>;

/// The most a JSON request body may weigh (a deployment of 20,000 files
/// fits with room to spare).
pub const MAX_JSON_BODY_BYTES: usize = 16 * 1024 * 1024;

pub(crate) fn router(state: AppState) -> Router {
    let authenticated = Router::new()
        .route("/whoami", get(whoami))
        .route("/projects", get(projects::list).post(projects::create))
        .route("/projects/{name}", get(projects::get).patch(projects::rename).delete(projects::delete))
        .route("/projects/{name}/deployments", get(deployments::list).post(deployments::create))
        .route("/projects/{name}/promote", post(projects::promote))
        .route("/projects/{name}/rollback", post(projects::rollback))
        .route("/projects/{name}/env", get(env::list))
        .route("/projects/{name}/env/{env_name}", put(env::put).delete(env::delete))
        .route("/projects/{name}/logs", get(logs::project_logs))
        .route("/projects/{name}/limits", get(limits::get).put(limits::put))
        .route("/projects/{name}/usage", get(logs::usage))
        .route("/projects/{name}/analytics", get(logs::analytics))
        .route("/projects/{name}/git", put(git::put_settings).delete(git::delete_settings))
        .route("/blobs/missing", post(blobs::missing))
        .route("/blobs/{hash}", put(blobs::upload))
        .route("/deployments/{id}", get(deployments::get))
        .route("/deployments/{id}/logs", get(logs::deployment_logs))
        .route("/deployments/{id}/build", get(deployments::build_log))
        .route("/deployments/{id}/files", get(deployments::files))
        .route("/domains", get(domains::list).post(domains::create))
        .route("/domains/{domain}", get(domains::get).patch(domains::attach).delete(domains::delete))
        .route("/domains/{domain}/verify", post(domains::verify))
        .route("/domains/{domain}/certificate", put(domains::put_certificate).delete(domains::delete_certificate))
        .route("/tokens", get(tokens::list).post(tokens::create))
        .route("/tokens/{id}", delete(tokens::revoke))
        .route("/audit", get(audit::list))
        // Every route above is checked against `access::RULES` (a route
        // without a rule is refused) and its mutations audited.
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), access::guard));
    // The webhook signs its body instead of carrying a token (its rule
    // says so too).
    let public = Router::new().route("/projects/{name}/git/webhook", post(git::webhook));
    Router::new()
        .nest(
            "/api/v1",
            authenticated.merge(public).fallback(not_found).method_not_allowed_fallback(method_not_allowed),
        )
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such API route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("this route does not take that method".into())
}

async fn whoami(
    axum::Extension(access::Caller(token)): axum::Extension<access::Caller>,
) -> axum::Json<isocloud_api::Whoami> {
    axum::Json(isocloud_api::Whoami {
        token_name: token.name.clone(),
        token_id: token.id.clone(),
        scope: token.scope(),
        project: token.project_name.clone(),
    })
}

/// A JSON body: `content-type` JSON (or none), at most
/// [`MAX_JSON_BODY_BYTES`], parsed with the path of the first bad field.
pub(crate) struct ApiJson<T>(pub T);

/// Like [`ApiJson`], but an empty body is `None`.
pub(crate) struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = json_body(request).await?;
        if bytes.trim_ascii().is_empty() {
            return Err(ApiError::request("the body is empty; expected a JSON object"));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = json_body(request).await?;
        if bytes.trim_ascii().is_empty() {
            return Ok(OptionalJson(None));
        }
        parse_json(&bytes).map(|v| OptionalJson(Some(v)))
    }
}

async fn json_body(request: Request) -> Result<Vec<u8>, ApiError> {
    if let Some(content_type) = request.headers().get(CONTENT_TYPE) {
        let json = content_type
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::request("content-type must be application/json"));
        }
    }
    read_body(request, MAX_JSON_BODY_BYTES).await
}

/// Reads a whole body, refusing it (413) past `limit_bytes`.
pub(crate) async fn read_body(request: Request, limit_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError::PayloadTooLarge(format!("the body is larger than {limit_bytes} bytes"));
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit_bytes as u64) {
        return Err(too_large());
    }
    let mut stream = request.into_body().into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::request(format!("reading the body failed: {e}")))?;
        if bytes.len() + chunk.len() > limit_bytes {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Parses a JSON object, naming where it went wrong. (serde would also
/// take an array for a struct; every body of this API is an object.)
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
            return Err(ApiError::request("the body must be a JSON object"));
        }
        _ => {}
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::request(format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::request(format!("the body does not have the expected shape: {inner}"))
        } else {
            ApiError::InvalidRequest {
                message: format!("the body does not have the expected shape at `{path}`: {inner}"),
                field: Some(path),
            }
        }
    })?;
    deserializer.end().map_err(|e| ApiError::request(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

/// A path segment, percent-decoded; a bad one is a 400 in our JSON shape.
pub(crate) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e| ApiError::request(format!("bad path: {}", e.body_text())))
    }
}

/// Query parameters as strings; each handler checks its own and names the
/// parameter in the error.
pub(crate) struct ApiQuery(pub std::collections::HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for ApiQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        let mut params = std::collections::HashMap::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if params.insert(key.clone().into_owned(), value.into_owned()).is_some() {
                return Err(ApiError::field(key.into_owned(), "given more than once"));
            }
        }
        Ok(ApiQuery(params))
    }
}

impl ApiQuery {
    /// Refuses parameters this route does not know (a typo would otherwise
    /// be silently ignored).
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(unknown) => Err(ApiError::field(
                unknown.clone(),
                format!("unknown query parameter (this route takes: {})", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// An integer in `min..=max`, or `default` when absent.
    pub fn int(&self, name: &str, default: i64, min: i64, max: i64) -> Result<i64, ApiError> {
        match self.0.get(name) {
            None => Ok(default),
            Some(text) => match text.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::field(name, format!("must be an integer from {min} to {max}"))),
            },
        }
    }

    pub fn time_ms(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.0
            .get(name)
            .map(|text| crate::time::parse_rfc3339_ms(text).map_err(|m| ApiError::field(name, m)))
            .transpose()
    }

    pub fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.0.get(name).map(String::as_str) {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(_) => Err(ApiError::field(name, "must be true or false")),
        }
    }
}

/// Runs a rule, attaching `field` to its message; passes on what it made.
pub(crate) fn check<T>(field: impl Into<String>, rule: Result<T, String>) -> Result<T, ApiError> {
    rule.map_err(|message| ApiError::field(field, message))
}
