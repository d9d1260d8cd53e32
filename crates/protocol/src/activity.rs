//! Activity reports (`subhosting-protocol.md` §5): what the runner tells an
//! origin about its deployments.

use serde::{Deserialize, Serialize};

/// One `report_activity` body. The same `batch_id` is only ever sent with the
/// same content, so an origin can drop a retried duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityBatch {
    pub batch_id: String,
    pub events: Vec<ActivityEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityEvent {
    pub deployment_id: String,
    /// RFC 3339.
    pub timestamp: String,
    #[serde(flatten)]
    pub kind: ActivityKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    /// The name on the wire (`"warning"`), as serde writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActivityKind {
    Boot {
        boot_ms: u64,
    },
    BootFailure {
        message: String,
    },
    Log {
        level: LogLevel,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    UncaughtException {
        message: String,
    },
    /// `limit` and `used` in milliseconds of CPU time.
    CpuTimeLimit {
        limit: u64,
        used: u64,
    },
    /// `limit` and `used` in bytes.
    MemoryLimit {
        limit: u64,
        used: u64,
    },
    /// What one isolate used over `[interval_start, interval_end)`, measured
    /// by the runner (never reported by the tenant). Bytes are HTTP body
    /// bytes into the isolate (`ingress`) and out of it (`egress`); the
    /// `fetch_*` figures are the isolate's own outbound calls through the
    /// egress proxy. `errors` counts requests answered with a 5xx (the
    /// tenant's or the runner's). The later fields default to 0 so batches
    /// spooled by an older runner still read.
    Usage {
        requests: u64,
        cpu_ms: u64,
        wall_ms: u64,
        ingress_bytes: u64,
        egress_bytes: u64,
        peak_memory_bytes: u64,
        #[serde(default)]
        errors: u64,
        #[serde(default)]
        fetch_requests: u64,
        #[serde(default)]
        fetch_sent_bytes: u64,
        #[serde(default)]
        fetch_received_bytes: u64,
        interval_start: String,
        interval_end: String,
    },
    Terminated {
        reason: String,
    },
}
