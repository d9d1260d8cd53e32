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
    /// spooled by an older runner still read. `latency` and `status_classes`
    /// are isocloud extensions (absent from an older runner's batches, and
    /// an origin that does not know them ignores them).
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency: Option<LatencyHistogram>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status_classes: Option<StatusClasses>,
    },
    Terminated {
        reason: String,
    },
}

/// The upper bounds (inclusive, in ms) of the latency histogram's buckets;
/// one more bucket (`+Inf`) holds what took longer. Fixed, so every
/// runner's histograms merge by adding counts.
pub const LATENCY_BOUNDS_MS: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];

/// Buckets of a latency histogram: the bounds and `+Inf`.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// The bucket a request's time to its response head falls in: the first
/// whose bound it does not pass (compared in microseconds, so 5.4 ms is
/// not counted as 5).
pub fn latency_bucket(elapsed: std::time::Duration) -> usize {
    let us = elapsed.as_micros();
    LATENCY_BOUNDS_MS.iter().position(|&bound| us <= u128::from(bound) * 1_000).unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// A status code's class as an index into [`StatusClasses::as_array`]
/// (`1xx` → 0 … `5xx` → 4); `None` outside 100..=599.
pub const fn status_class(status: u16) -> Option<usize> {
    match status {
        100..=599 => Some(status as usize / 100 - 1),
        _ => None,
    }
}

/// isocloud extension of the `usage` event: how long requests took from
/// their head's arrival to the response head (time to first byte, a boot
/// included), as counts per bucket. `le_ms` repeats [`LATENCY_BOUNDS_MS`]
/// so the histogram says what it is; `counts` has one more entry (`+Inf`).
/// Counts are per bucket, not cumulative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub le_ms: Vec<u64>,
    pub counts: Vec<u64>,
}

impl LatencyHistogram {
    /// A histogram over [`LATENCY_BOUNDS_MS`].
    pub fn new(counts: [u64; LATENCY_BUCKETS]) -> Self {
        LatencyHistogram { le_ms: LATENCY_BOUNDS_MS.to_vec(), counts: counts.to_vec() }
    }
}

/// isocloud extension of the `usage` event: requests by the class of the
/// status they were answered with, the runner's own answers for the
/// deployment (limits, crashes, failed boots) included. A WebSocket
/// upgrade (101) is `1xx`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusClasses {
    #[serde(rename = "1xx", default)]
    pub informational: u64,
    #[serde(rename = "2xx", default)]
    pub success: u64,
    #[serde(rename = "3xx", default)]
    pub redirection: u64,
    #[serde(rename = "4xx", default)]
    pub client_error: u64,
    #[serde(rename = "5xx", default)]
    pub server_error: u64,
}

impl StatusClasses {
    pub const fn from_array(counts: [u64; 5]) -> Self {
        StatusClasses {
            informational: counts[0],
            success: counts[1],
            redirection: counts[2],
            client_error: counts[3],
            server_error: counts[4],
        }
    }

    /// `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    pub const fn as_array(&self) -> [u64; 5] {
        [self.informational, self.success, self.redirection, self.client_error, self.server_error]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latencies_fall_in_the_first_bucket_they_do_not_pass() {
        assert_eq!(latency_bucket(Duration::ZERO), 0);
        assert_eq!(latency_bucket(Duration::from_millis(5)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(5_001)), 1);
        assert_eq!(latency_bucket(Duration::from_millis(300)), 6);
        assert_eq!(latency_bucket(Duration::from_millis(10_000)), 10);
        assert_eq!(latency_bucket(Duration::from_secs(3_600)), 11);
    }

    #[test]
    fn status_classes_by_hundreds() {
        assert_eq!([101, 200, 304, 404, 599].map(status_class), [Some(0), Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(status_class(99), None);
        assert_eq!(status_class(600), None);
    }

    #[test]
    fn the_extensions_are_optional_both_ways() {
        let old = serde_json::json!({
            "deployment_id": "d", "timestamp": "2024-05-01T00:00:10Z", "type": "usage",
            "requests": 3, "cpu_ms": 4, "wall_ms": 5, "ingress_bytes": 6, "egress_bytes": 7,
            "peak_memory_bytes": 8, "interval_start": "2024-05-01T00:00:00Z", "interval_end": "2024-05-01T00:00:10Z"
        });
        let event: ActivityEvent = serde_json::from_value(old.clone()).unwrap();
        let ActivityKind::Usage { latency, status_classes, .. } = &event.kind else { panic!("{event:?}") };
        assert_eq!((latency, status_classes), (&None, &None));
        // Absent extensions are not written either: an older origin sees the same shape.
        assert_eq!(
            serde_json::to_value(&event).unwrap().as_object().unwrap().len(),
            old.as_object().unwrap().len() + 4
        );

        let mut new = old;
        new["latency"] =
            serde_json::json!({"le_ms": LATENCY_BOUNDS_MS, "counts": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]});
        new["status_classes"] = serde_json::json!({"2xx": 2, "5xx": 1});
        let event: ActivityEvent = serde_json::from_value(new).unwrap();
        let ActivityKind::Usage { latency, status_classes, .. } = &event.kind else { panic!("{event:?}") };
        assert_eq!(latency.as_ref().unwrap().counts[11], 2);
        assert_eq!(status_classes.unwrap().as_array(), [0, 2, 0, 0, 1]);
    }
}
