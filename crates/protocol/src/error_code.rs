//! Stable error codes: the table the HTTP edges (the ingress and the egress
//! proxy) map every failure onto, and the one renderer of their answers.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Marks an answer as the runner's own error. Only the runner sets it: the
/// ingress removes it from isolates' responses.
pub const ERROR_HEADER: &str = "x-isocloud-error";

/// `Retry-After` of a 503 `CAPACITY` (a bound shared by everyone is full:
/// isolate slots, the boot queue, the egress proxy's connections), in seconds.
pub const CAPACITY_RETRY_AFTER_S: u32 = 1;

/// The egress proxy's `Proxy-Authenticate` challenge, sent with every 407.
pub const EGRESS_PROXY_CHALLENGE: &str = "Basic realm=\"isocloud egress\"";

/// A runner error as the end user (or the relay in front of it) sees it: an
/// HTTP status plus a stable code, repeated in the `x-isocloud-error` header.
///
/// The table ([`ErrorCode::spec`]) is the single place where a code gets its
/// status and whether a retry makes sense; add a variant and its row there,
/// then map the failing crate's error onto it. [`ErrorCode::response`] is the
/// one way an edge turns a code into an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No deployment is known for the request's host.
    DeploymentNotFound,
    /// The `x-deno-subhost` token failed verification.
    Unauthorized,
    /// The origin could not be reached, timed out, or answered garbage.
    OriginUnreachable,
    /// The origin's `boot` answered with a non-2xx status.
    BootFailed,
    /// The isolate config broke a rule of the protocol.
    InvalidIsolateConfig,
    /// A layer could not be fetched or decoded.
    LayerFailed,
    /// The entrypoint, or a module it imports, is in no layer.
    ModuleNotFound,
    /// The isolate process failed while starting (module evaluation threw,
    /// no handler was registered, …).
    IsolateStartFailed,
    /// The isolate died with requests in flight.
    IsolateCrashed,
    /// The isolate used more CPU time than its requests were allowed.
    CpuTimeLimit,
    /// The isolate used more memory than allowed.
    MemoryLimit,
    /// The request took longer than the runner's wall-clock limit.
    RequestTimeout,
    /// Every isolate slot is busy; no new deployment can boot now.
    Capacity,
    /// The request body is larger than allowed.
    PayloadTooLarge,
    /// The runner is shutting down and takes no new requests.
    ShuttingDown,
    /// Something inside the runner failed; details are in its log only.
    Internal,
    /// A bad request that never reached an isolate (malformed host, …).
    BadRequest,
    /// A call came back into the cloud more often than the hop bound allows
    /// (an isolate calling itself, directly or through others).
    LoopDetected,
    /// The egress proxy refused an outbound call: the host is outside the
    /// isolate's `permissions.net`, or an internal address.
    EgressDenied,
    /// The egress proxy's caller brought no credentials of a live isolate
    /// (407: the status HTTP gives a proxy's authentication challenge).
    EgressAuthRequired,
    /// The isolate holds as many egress proxy connections, or outbound
    /// connections and tunnels, as it may.
    EgressConnectionLimit,
    /// The egress proxy could not reach an allowed upstream (no such name,
    /// refused, timed out): nothing was sent to it.
    UpstreamUnreachable,
    /// The upstream's connection failed after the request was sent (closed,
    /// or answered garbage): it may have acted on the request.
    UpstreamFailed,
}

/// One row of the code table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeSpec {
    /// The stable code, in the body and in [`ERROR_HEADER`].
    pub name: &'static str,
    pub http_status: u16,
    /// A client or an edge may send the same request again (after
    /// `Retry-After` when the answer has one): no tenant code and no upstream
    /// acted on it, and the cause may pass. Everything else is final for this
    /// request: retrying could run it twice, or would fail the same way.
    pub retryable: bool,
}

const fn row(name: &'static str, http_status: u16, retryable: bool) -> CodeSpec {
    CodeSpec { name, http_status, retryable }
}

impl ErrorCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::DeploymentNotFound,
        ErrorCode::Unauthorized,
        ErrorCode::OriginUnreachable,
        ErrorCode::BootFailed,
        ErrorCode::InvalidIsolateConfig,
        ErrorCode::LayerFailed,
        ErrorCode::ModuleNotFound,
        ErrorCode::IsolateStartFailed,
        ErrorCode::IsolateCrashed,
        ErrorCode::CpuTimeLimit,
        ErrorCode::MemoryLimit,
        ErrorCode::RequestTimeout,
        ErrorCode::Capacity,
        ErrorCode::PayloadTooLarge,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::BadRequest,
        ErrorCode::LoopDetected,
        ErrorCode::EgressDenied,
        ErrorCode::EgressAuthRequired,
        ErrorCode::EgressConnectionLimit,
        ErrorCode::UpstreamUnreachable,
        ErrorCode::UpstreamFailed,
    ];

    /// The code table: name, status, retryable. Control-plane failures are
    /// 502 (the protocol's rule), so a relay can tell them from the tenant's
    /// own 5xx by [`ERROR_HEADER`].
    pub const fn spec(self) -> CodeSpec {
        match self {
            ErrorCode::DeploymentNotFound => row("DEPLOYMENT_NOT_FOUND", 404, false),
            ErrorCode::Unauthorized => row("UNAUTHORIZED", 401, false),
            // The boot never ran: the origin may be back for the next try.
            ErrorCode::OriginUnreachable => row("ORIGIN_UNREACHABLE", 502, true),
            // The origin answered, and would answer the same again.
            ErrorCode::BootFailed => row("BOOT_FAILED", 502, false),
            ErrorCode::InvalidIsolateConfig => row("INVALID_ISOLATE_CONFIG", 502, false),
            ErrorCode::LayerFailed => row("LAYER_FAILED", 502, false),
            ErrorCode::ModuleNotFound => row("MODULE_NOT_FOUND", 502, false),
            ErrorCode::IsolateStartFailed => row("ISOLATE_START_FAILED", 502, false),
            // The request was in the tenant's hands: it may have acted on it.
            ErrorCode::IsolateCrashed => row("ISOLATE_CRASHED", 502, false),
            ErrorCode::CpuTimeLimit => row("CPU_TIME_LIMIT", 502, false),
            ErrorCode::MemoryLimit => row("MEMORY_LIMIT", 502, false),
            ErrorCode::RequestTimeout => row("REQUEST_TIMEOUT", 504, false),
            // Full now, not for long (with `Retry-After`).
            ErrorCode::Capacity => row("CAPACITY", 503, true),
            ErrorCode::PayloadTooLarge => row("PAYLOAD_TOO_LARGE", 413, false),
            // Not taken: another runner (or this one, restarted) takes it.
            ErrorCode::ShuttingDown => row("SHUTTING_DOWN", 503, true),
            ErrorCode::Internal => row("INTERNAL", 500, false),
            ErrorCode::BadRequest => row("BAD_REQUEST", 400, false),
            ErrorCode::LoopDetected => row("LOOP_DETECTED", 508, false),
            ErrorCode::EgressDenied => row("EGRESS_DENIED", 403, false),
            // HTTP's own status for a proxy's challenge (RFC 9110 §15.5.8).
            ErrorCode::EgressAuthRequired => row("EGRESS_AUTH_REQUIRED", 407, false),
            // The caller's own bound: once it closes a connection, room again.
            ErrorCode::EgressConnectionLimit => row("EGRESS_CONNECTION_LIMIT", 429, true),
            // Nothing was sent: the upstream may answer the next try.
            ErrorCode::UpstreamUnreachable => row("UPSTREAM_UNREACHABLE", 502, true),
            // Sent: the upstream may have acted on it.
            ErrorCode::UpstreamFailed => row("UPSTREAM_FAILED", 502, false),
        }
    }

    pub const fn as_str(self) -> &'static str {
        self.spec().name
    }

    /// The HTTP status for this code.
    pub const fn http_status(self) -> u16 {
        self.spec().http_status
    }

    /// Whether a client or an edge may send the request again ([`CodeSpec::retryable`]).
    pub const fn retryable(self) -> bool {
        self.spec().retryable
    }

    /// The answer an edge sends for this code: the status, the code in
    /// [`ERROR_HEADER`], `{"error":{"code":…,"message":…}}`, never cached,
    /// and the headers the status requires (`Retry-After` of `CAPACITY`, the
    /// `Proxy-Authenticate` challenge of a 407). `message` is shown to the
    /// client: it says what failed, never how the runner is built.
    pub fn response(self, message: &str) -> Response<Bytes> {
        let body = serde_json::json!({ "error": { "code": self.as_str(), "message": message } });
        let mut response = Response::new(Bytes::from(body.to_string()));
        *response.status_mut() = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.as_str()));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            ErrorCode::Capacity => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(CAPACITY_RETRY_AFTER_S));
            }
            ErrorCode::EgressAuthRequired => {
                headers.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static(EGRESS_PROXY_CHALLENGE));
            }
            _ => {}
        }
        response
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_screaming_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert!(code.as_str().chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        }
    }

    #[test]
    fn control_plane_errors_are_502() {
        for code in [
            ErrorCode::OriginUnreachable,
            ErrorCode::BootFailed,
            ErrorCode::InvalidIsolateConfig,
            ErrorCode::LayerFailed,
            ErrorCode::ModuleNotFound,
            ErrorCode::IsolateCrashed,
        ] {
            assert_eq!(code.http_status(), 502, "{code}");
        }
    }

    /// Retryable: the request reached no tenant code and no upstream, and the
    /// cause may pass. Anything that ran, or would fail the same, is final.
    #[test]
    fn retryable_codes_are_those_nothing_acted_on() {
        let retryable: Vec<_> = ErrorCode::ALL.into_iter().filter(|c| c.retryable()).map(ErrorCode::as_str).collect();
        assert_eq!(
            retryable,
            ["ORIGIN_UNREACHABLE", "CAPACITY", "SHUTTING_DOWN", "EGRESS_CONNECTION_LIMIT", "UPSTREAM_UNREACHABLE"]
        );
        assert!(!ErrorCode::UpstreamFailed.retryable(), "sent: the upstream may have acted on it");
        assert!(!ErrorCode::IsolateCrashed.retryable(), "the tenant had the request");
    }

    #[test]
    fn every_code_renders_its_row() {
        for code in ErrorCode::ALL {
            let response = code.response("what failed");
            assert_eq!(response.status().as_u16(), code.http_status(), "{code}");
            assert_eq!(response.headers()[ERROR_HEADER], code.as_str());
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
            let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            assert_eq!(body, serde_json::json!({ "error": { "code": code.as_str(), "message": "what failed" } }));
            assert_eq!(response.headers().contains_key(header::RETRY_AFTER), code == ErrorCode::Capacity, "{code}");
            assert_eq!(
                response.headers().contains_key(header::PROXY_AUTHENTICATE),
                code.http_status() == 407,
                "{code}: a 407 must carry its challenge, nothing else does"
            );
        }
    }

    #[test]
    fn a_message_is_json_escaped() {
        let response = ErrorCode::BadRequest.response("a \"quoted\"\nline");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["error"]["message"], "a \"quoted\"\nline");
    }
}
