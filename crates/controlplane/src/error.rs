//! The crate's two error types: [`ControlPlaneError`] for starting the
//! control plane, [`ApiError`] for everything an API request can run into —
//! mapped once, here, to a status and the JSON body of
//! `docs/control-plane-api.md`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
            ApiError::InvalidRequest { .. } => "INVALID_REQUEST",
            ApiError::InvalidField { .. } => "INVALID_FIELD",
            ApiError::MissingBlobs { .. } => "MISSING_BLOBS",
            ApiError::Unauthorized(_) => "UNAUTHORIZED",
            ApiError::NotFound(_) => "NOT_FOUND",
            ApiError::MethodNotAllowed(_) => "METHOD_NOT_ALLOWED",
            ApiError::Conflict(_) => "CONFLICT",
            ApiError::PayloadTooLarge(_) => "PAYLOAD_TOO_LARGE",
            ApiError::StorageFull(_) => "STORAGE_FULL",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::InvalidField { .. } | ApiError::MissingBlobs { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
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
        let mut error = json!({ "code": self.code() });
        match &self {
            ApiError::Internal(detail) => {
                tracing::error!(target: "isocloud::controlplane", error = %detail, "API request failed");
                error["message"] = "internal error; the control plane's log has the details".into();
            }
            ApiError::StorageFull(detail) => {
                // The router's layer logs it again with the data dir and its
                // free space; this line keeps the failing write's detail.
                tracing::error!(target: "isocloud::controlplane", error = %detail, "API write failed: storage full");
                error["message"] =
                    "the control plane's storage is full; nothing was written (the operator must free space)".into();
            }
            other => error["message"] = other.to_string().into(),
        }
        match &self {
            ApiError::InvalidField { field, .. } | ApiError::InvalidRequest { field: Some(field), .. } => {
                error["field"] = field.as_str().into();
            }
            ApiError::MissingBlobs { missing } => error["missing"] = json!(missing),
            _ => {}
        }
        (self.status(), axum::Json(json!({ "error": error }))).into_response()
    }
}
