use isocloud_protocol::{ConfigError, ErrorCode};

/// Why an origin could not tell us what a deployment is.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    #[error("origin did not answer {rpc} within {timeout_ms} ms")]
    Timeout { rpc: &'static str, timeout_ms: u64 },
    #[error("origin answered boot with HTTP {status}")]
    BootRefused { status: u16 },
    #[error("origin answered {rpc} with HTTP {status}")]
    BadStatus { rpc: &'static str, status: u16 },
    #[error("origin's {rpc} answer is larger than {limit_bytes} bytes")]
    TooLarge { rpc: &'static str, limit_bytes: u64 },
    #[error("origin's {rpc} answer is malformed: {message}")]
    Malformed { rpc: &'static str, message: String },
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    #[error("layer {layer_id:?} failed: {message}")]
    Layer { layer_id: String, message: String },
    #[error("module not found: {specifier} ({context})")]
    ModuleNotFound { specifier: String, context: String },
    #[error("deployment not found")]
    DeploymentNotFound,
    #[error("asset not found: {0}")]
    AssetNotFound(String),
    #[error("cache i/o: {0}")]
    Cache(#[from] std::io::Error),
    /// Apps mode: the app's build (deno install) failed; deno's reason.
    #[error("the app's build failed: {0}")]
    BuildFailed(String),
}

impl OriginError {
    /// The stable code the end user sees for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            OriginError::Unreachable(_)
            | OriginError::Timeout { .. }
            | OriginError::Malformed { .. }
            | OriginError::TooLarge { .. }
            | OriginError::BadStatus { .. } => ErrorCode::OriginUnreachable,
            OriginError::BootRefused { .. } | OriginError::BuildFailed(_) => ErrorCode::BootFailed,
            OriginError::InvalidConfig(_) => ErrorCode::InvalidIsolateConfig,
            OriginError::Layer { .. } => ErrorCode::LayerFailed,
            OriginError::ModuleNotFound { .. } => ErrorCode::ModuleNotFound,
            OriginError::DeploymentNotFound => ErrorCode::DeploymentNotFound,
            OriginError::AssetNotFound(_) => ErrorCode::BadRequest,
            OriginError::Cache(_) => ErrorCode::Internal,
        }
    }
}
