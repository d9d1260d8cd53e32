//! The one place where the ingress's failures become HTTP answers; the
//! answer itself is rendered by [`ErrorCode::response`], as the egress
//! proxy's are.

use http::Response;
pub(crate) use isocloud_protocol::ERROR_HEADER;
use isocloud_protocol::ErrorCode;

use crate::body::{ResponseBody, full};

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
        self.code.response(&self.message).map(full)
    }
}
