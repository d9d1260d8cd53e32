//! Stable error codes: the table the HTTP edge maps every failure onto.

/// A runner error as the end user (or the relay in front of it) sees it: an
/// HTTP status plus a stable code, repeated in the `x-isocloud-error` header.
///
/// The table is the single place where a code gets its status; add a variant
/// here, then map the failing crate's error onto it at the HTTP edge.
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
    /// isolate's `permissions.net`, or the caller is not a live isolate.
    EgressDenied,
}

impl ErrorCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: [ErrorCode; 19] = [
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
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::DeploymentNotFound => "DEPLOYMENT_NOT_FOUND",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::OriginUnreachable => "ORIGIN_UNREACHABLE",
            ErrorCode::BootFailed => "BOOT_FAILED",
            ErrorCode::InvalidIsolateConfig => "INVALID_ISOLATE_CONFIG",
            ErrorCode::LayerFailed => "LAYER_FAILED",
            ErrorCode::ModuleNotFound => "MODULE_NOT_FOUND",
            ErrorCode::IsolateStartFailed => "ISOLATE_START_FAILED",
            ErrorCode::IsolateCrashed => "ISOLATE_CRASHED",
            ErrorCode::CpuTimeLimit => "CPU_TIME_LIMIT",
            ErrorCode::MemoryLimit => "MEMORY_LIMIT",
            ErrorCode::RequestTimeout => "REQUEST_TIMEOUT",
            ErrorCode::Capacity => "CAPACITY",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::LoopDetected => "LOOP_DETECTED",
            ErrorCode::EgressDenied => "EGRESS_DENIED",
        }
    }

    /// The HTTP status for this code. Control-plane failures are 502 (the
    /// protocol's rule), so a relay can tell them from the tenant's own 5xx by
    /// the `x-isocloud-error` header.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::DeploymentNotFound => 404,
            ErrorCode::Unauthorized => 401,
            ErrorCode::BadRequest => 400,
            ErrorCode::EgressDenied => 403,
            ErrorCode::LoopDetected => 508,
            ErrorCode::ShuttingDown | ErrorCode::Capacity => 503,
            ErrorCode::RequestTimeout => 504,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Internal => 500,
            ErrorCode::OriginUnreachable
            | ErrorCode::BootFailed
            | ErrorCode::InvalidIsolateConfig
            | ErrorCode::LayerFailed
            | ErrorCode::ModuleNotFound
            | ErrorCode::IsolateStartFailed
            | ErrorCode::IsolateCrashed
            | ErrorCode::CpuTimeLimit
            | ErrorCode::MemoryLimit => 502,
        }
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
}
