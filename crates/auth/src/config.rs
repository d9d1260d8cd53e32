//! What the operator configures per subhoster, and the checks it must pass
//! before a verifier is built from it.

use std::fmt;

use url::Url;

/// A subhoster's shared HS256 secret. `Debug` never shows the bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    // Crate-private: the bytes only ever go into an HMAC key.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Self(text.as_bytes().to_vec())
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Self(text.into_bytes())
    }
}

/// One subhoster the operator configured.
#[derive(Debug, Clone)]
pub struct Subhoster {
    /// The JWT header's `kid` that selects this subhoster.
    pub kid: String,
    pub secret: Secret,
    /// Where the runner sends this subhoster's RPCs when a token carries no
    /// `rpc_root` claim: an absolute http(s) URL ending in `/`.
    pub rpc_root: Url,
    /// An `rpc_root` claim is honoured only when it is `rpc_root` itself or
    /// its normalised form starts with one of these. Each must be a normalised
    /// absolute http(s) URL (so it pins scheme, host and port). They are this
    /// subhoster's own: another subhoster's prefixes never admit its claims.
    pub allowed_rpc_root_prefixes: Vec<String>,
}

/// Why a subhoster configuration was refused. Names the `kid`, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error("a subhoster has an empty kid")]
    EmptyKid,
    #[error("subhoster {0:?} is configured more than once")]
    DuplicateKid(String),
    #[error("subhoster {kid:?} has an empty secret")]
    EmptySecret { kid: String },
    #[error("subhoster {kid:?}: rpc_root {rpc_root:?} {reason}")]
    InvalidRpcRoot { kid: String, rpc_root: String, reason: &'static str },
    #[error("subhoster {kid:?}: allowed rpc_root prefix {prefix:?} {reason}")]
    InvalidRpcRootPrefix { kid: String, prefix: String, reason: &'static str },
}

impl Subhoster {
    pub(crate) fn validate(&self) -> Result<(), AuthConfigError> {
        if self.kid.is_empty() {
            return Err(AuthConfigError::EmptyKid);
        }
        if self.secret.is_empty() {
            return Err(AuthConfigError::EmptySecret { kid: self.kid.clone() });
        }
        if let Some(reason) = rpc_root_problem(&self.rpc_root) {
            return Err(AuthConfigError::InvalidRpcRoot {
                kid: self.kid.clone(),
                rpc_root: self.rpc_root.to_string(),
                reason,
            });
        }
        for prefix in &self.allowed_rpc_root_prefixes {
            if let Some(reason) = prefix_problem(prefix) {
                return Err(AuthConfigError::InvalidRpcRootPrefix {
                    kid: self.kid.clone(),
                    prefix: prefix.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Whether this subhoster's RPCs may go to `rpc_root` (a parsed, so
    /// normalised, URL): its own default, or under one of its own prefixes.
    /// The one rule for token claims and for spooled batches alike.
    pub fn may_use_rpc_root(&self, rpc_root: &Url) -> bool {
        *rpc_root == self.rpc_root
            || self.allowed_rpc_root_prefixes.iter().any(|p| rpc_root.as_str().starts_with(p.as_str()))
    }
}

/// Why `url` cannot serve as an `rpc_root`, if it cannot. RPC paths are joined
/// onto it, so anything after the path would be lost or misplaced.
pub(crate) fn rpc_root_problem(url: &Url) -> Option<&'static str> {
    if !matches!(url.scheme(), "http" | "https") {
        Some("is not an http(s) URL")
    } else if !url.username().is_empty() || url.password().is_some() {
        Some("must not carry credentials")
    } else if url.query().is_some() || url.fragment().is_some() {
        Some("must not have a query or fragment")
    } else if !url.path().ends_with('/') {
        Some("must end with '/'")
    } else {
        None
    }
}

/// Prefixes are compared as text against the normalised claim, so a prefix
/// must itself be normalised and reach at least the `/` after the authority:
/// otherwise `https://origin.example` would also admit
/// `https://origin.example.evil.com/` or `https://origin.example@evil.com/`.
fn prefix_problem(prefix: &str) -> Option<&'static str> {
    let Ok(url) = Url::parse(prefix) else {
        return Some("is not an absolute URL");
    };
    if !matches!(url.scheme(), "http" | "https") {
        Some("is not an http(s) URL")
    } else if !url.username().is_empty() || url.password().is_some() {
        Some("must not carry credentials")
    } else if url.query().is_some() || url.fragment().is_some() {
        Some("must not have a query or fragment")
    } else if url.as_str() != prefix {
        Some(
            "is not in normalised form (lowercase scheme and host, no default port, \
             and at least the '/' after the host)",
        )
    } else {
        None
    }
}
