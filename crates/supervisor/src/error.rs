//! Why an isolate did not start, why a request into it failed, and why the
//! runner ended it.

use std::time::Duration;

use isocloud_protocol::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the isolate process: {0}")]
    Spawn(std::io::Error),
    #[error("{message}")]
    Failed { code: ErrorCode, message: String },
    #[error("the isolate did not start serving within {0:?}")]
    Timeout(Duration),
    #[error("the isolate exited while starting ({status}): {stderr}")]
    Exited { status: String, stderr: String },
}

impl StartError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StartError::Failed { code, .. } => *code,
            StartError::Spawn(_) => ErrorCode::Internal,
            StartError::Timeout(_) | StartError::Exited { .. } => ErrorCode::IsolateStartFailed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The process is gone, or died while the request was in it.
    #[error("the isolate crashed: {0}")]
    Crashed(String),
    /// The runner ended the isolate for breaking a limit.
    #[error("the isolate was terminated: {0}")]
    Terminated(Termination),
}

/// Why the runner ended an isolate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Termination {
    #[error("CPU time limit: used {used_ms} ms of a {limit_ms} ms per-request budget")]
    CpuTimeLimit { limit_ms: u64, used_ms: u64 },
    #[error("memory limit: {limit_bytes} bytes")]
    MemoryLimit { limit_bytes: u64, used_bytes: u64 },
}

impl Termination {
    pub fn code(&self) -> ErrorCode {
        match self {
            Termination::CpuTimeLimit { .. } => ErrorCode::CpuTimeLimit,
            Termination::MemoryLimit { .. } => ErrorCode::MemoryLimit,
        }
    }
}
