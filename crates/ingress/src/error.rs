//! The one place where failures become HTTP answers.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use isocloud_protocol::ErrorCode;

use crate::body::{ResponseBody, full};

/// Marks an answer as the runner's own error. Only the runner sets it: the
/// proxy removes it from isolates' responses.
pub const ERROR_HEADER: &str = "x-isocloud-error";

/// `Retry-After` of a 503 `CAPACITY` (the runner's slots or boot queue are
/// full), in seconds.
pub const CAPACITY_RETRY_AFTER_S: &str = "1";

/// A failure answered by the runner itself (never the tenant's own response).
#[derive(Debug, Clone)]
pub struct EdgeError {
    pub code: ErrorCode,
    /// Safe to show a client: says what failed, never how the runner is built.
    pub message: String,
}

impl EdgeError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// `{"error":{"code":…,"message":…}}` with the code repeated in
    /// `x-isocloud-error`, so a relay can tell our errors from the tenant's.
    pub fn into_response(self) -> Response<ResponseBody> {
        let body = serde_json::json!({ "error": { "code": self.code.as_str(), "message": self.message } });
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() =
            StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code.as_str()));
        headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.code == ErrorCode::Capacity {
            // Full now, not for long: an isolate goes idle or a boot's turn comes.
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static(CAPACITY_RETRY_AFTER_S));
        }
        response
    }
}
