//! The crate's two error types: [`ControlPlaneError`] for starting the
//! control plane, [`ApiError`] for everything an API request can run into —
//! mapped once, here, to a status and the JSON body of
//! `docs/control-plane-api.md` (`isocloud_api::ErrorEnvelope`, the type the
//! client reads).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use isocloud_api::{ApiErrorBody, ErrorEnvelope, code};

use crate::blobs::BlobError;
use crate::store::StoreError;

/// Why [`crate::ControlPlane::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("control plane data dir {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("control plane database: {0}")]
    Store(#[from] StoreError),
    #[error("control plane admin token {path}: {source}")]
    AdminToken { path: std::path::PathBuf, source: std::io::Error },
    #[error("control plane blob store: {0}")]
    Blobs(#[from] BlobError),
    #[error("control plane options: {0}")]
    Options(String),
    /// The data dir (or a file in it) could not be made private.
    #[error("{0}")]
    NotPrivate(#[from] crate::private::NotPrivate),
}

/// A failed API request. Every variant but `Internal` is the client's to
/// fix and says how; `Internal` is logged in full and shown generically.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not the expected shape.
    #[error("{message}")]
    InvalidRequest { message: String, field: Option<String> },
    /// One field breaks a rule.
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    #[error("{} blob(s) are not uploaded: {}", missing.len(), missing.join(", "))]
    MissingBlobs { missing: Vec<String> },
    #[error("{0}")]
    Unauthorized(String),
    /// 401: a known token past its expiry.
    #[error("{0}")]
    TokenExpired(String),
    /// 401: a known token that was revoked.
    #[error("{0}")]
    TokenRevoked(String),
    /// 403: the token's scope does not cover the route; the message names
    /// the scope needed.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A write failed for want of space (the disk of the data dir or of
    /// PostgreSQL). Logged with the data dir and its free space by
    /// [`crate::ControlPlane::router`]; the client is told only that.
    #[error("storage full: {0}")]
    StorageFull(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField { field: field.into(), message: message.into() }
    }

    pub fn request(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest { message: message.into(), field: None }
    }

    pub fn internal(what: impl std::fmt::Display) -> Self {
        ApiError::Internal(what.to_string())
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => code::INVALID_REQUEST,
            ApiError::InvalidField { .. } => code::INVALID_FIELD,
            ApiError::MissingBlobs { .. } => code::MISSING_BLOBS,
            ApiError::Unauthorized(_) => code::UNAUTHORIZED,
            ApiError::TokenExpired(_) => code::TOKEN_EXPIRED,
            ApiError::TokenRevoked(_) => code::TOKEN_REVOKED,
            ApiError::Forbidden(_) => code::FORBIDDEN,
            ApiError::NotFound(_) => code::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => code::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => code::CONFLICT,
            ApiError::PayloadTooLarge(_) => code::PAYLOAD_TOO_LARGE,
            ApiError::StorageFull(_) => code::STORAGE_FULL,
            ApiError::Internal(_) => code::INTERNAL,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::InvalidField { .. } | ApiError::MissingBlobs { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized(_) | ApiError::TokenExpired(_) | ApiError::TokenRevoked(_) => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(message) => ApiError::Conflict(message),
            full if full.is_storage_full() => ApiError::StorageFull(full.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        match &e {
            &BlobError::TooLarge { limit_bytes } => {
                ApiError::PayloadTooLarge(format!("the blob is larger than the bound of {limit_bytes} bytes"))
            }
            BlobError::HashMismatch { expected, actual } => {
                ApiError::field("hash", format!("the body's SHA-256 is {actual}, not {expected} as the path says"))
            }
            BlobError::BadHash(message) => ApiError::field("hash", message),
            BlobError::Body(message) => ApiError::request(format!("reading the body failed: {message}")),
            BlobError::Io { .. } if e.is_storage_full() => ApiError::StorageFull(e.to_string()),
            BlobError::Io { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(target: "isocloud::controlplane", error = %detail, "API request failed");
                "internal error; the control plane's log has the details".to_owned()
            }
            ApiError::StorageFull(detail) => {
                // The router's layer logs it again with the data dir and its
                // free space; this line keeps the failing write's detail.
                tracing::error!(target: "isocloud::controlplane", error = %detail, "API write failed: storage full");
                "the control plane's storage is full; nothing was written (the operator must free space)".to_owned()
            }
            other => other.to_string(),
        };
        let mut error = ApiErrorBody::new(self.code(), message);
        match self {
            ApiError::InvalidField { field, .. } | ApiError::InvalidRequest { field: Some(field), .. } => {
                error.field = Some(field);
            }
            ApiError::MissingBlobs { missing } => error.missing = Some(missing),
            _ => {}
        }
        error_response(status, error)
    }
}

/// The API's error answer: `status` and `{"error": error}`. For the few
/// errors [`ApiError`] has no variant for (the git webhook's `CAPACITY` and
/// `REQUEST_TIMEOUT`) too.
pub(crate) fn error_response(status: StatusCode, error: ApiErrorBody) -> Response {
    (status, axum::Json(ErrorEnvelope { error })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact answers the server's `json!()` renderer wrote before the
    /// envelope was an `isocloud-api` type: byte for byte, one error of each
    /// shape (`field`, `missing`, an empty `missing`, neither, the generic
    /// messages that hide a detail).
    #[tokio::test]
    async fn errors_render_as_they_did() {
        let cases = [
            (
                ApiError::MissingBlobs { missing: vec!["ab".into(), "cd".into()] },
                400,
                r#"{"error":{"code":"MISSING_BLOBS","message":"2 blob(s) are not uploaded: ab, cd","missing":["ab","cd"]}}"#,
            ),
            (
                ApiError::MissingBlobs { missing: vec![] },
                400,
                r#"{"error":{"code":"MISSING_BLOBS","message":"0 blob(s) are not uploaded: ","missing":[]}}"#,
            ),
            (
                ApiError::field("name", "must be 1–50 of a-z0-9-"),
                400,
                r#"{"error":{"code":"INVALID_FIELD","message":"name: must be 1–50 of a-z0-9-","field":"name"}}"#,
            ),
            (
                ApiError::InvalidRequest { message: "colour: unknown field".into(), field: Some("colour".into()) },
                400,
                r#"{"error":{"code":"INVALID_REQUEST","message":"colour: unknown field","field":"colour"}}"#,
            ),
            (
                ApiError::request("the body is empty"),
                400,
                r#"{"error":{"code":"INVALID_REQUEST","message":"the body is empty"}}"#,
            ),
            (
                ApiError::NotFound("no such project `x`".into()),
                404,
                r#"{"error":{"code":"NOT_FOUND","message":"no such project `x`"}}"#,
            ),
            (
                ApiError::Internal("disk on fire".into()),
                500,
                r#"{"error":{"code":"INTERNAL","message":"internal error; the control plane's log has the details"}}"#,
            ),
            (
                ApiError::StorageFull("no space".into()),
                507,
                r#"{"error":{"code":"STORAGE_FULL","message":"the control plane's storage is full; nothing was written (the operator must free space)"}}"#,
            ),
        ];
        for (error, status, before) in cases {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{before}");
            let content_type = response.headers().get(axum::http::header::CONTENT_TYPE).unwrap();
            assert_eq!(content_type, "application/json");
            let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
            assert_eq!(std::str::from_utf8(&body).unwrap(), before);
            // And the client's type reads it back whole.
            let decoded: ErrorEnvelope = serde_json::from_slice(&body).unwrap();
            assert_eq!(serde_json::to_string(&decoded).unwrap(), before);
        }
    }
}
