//! Certificates an https RPC root may present beside the public roots
//! (`--rpc-root-ca`): the private CA a control plane's origin listener
//! certificate (`--origin-tls-cert`) comes from. Checked once, when the
//! settings are read (one client built per file), so every client built
//! with them builds.

use std::path::PathBuf;

/// A CA bundle larger than this is refused unread.
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Why a CA file gives nothing to trust.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct RpcTrustError {
    pub path: PathBuf,
    pub reason: String,
}

/// Extra trust anchors for the HTTP clients that speak to RPC roots. Empty
/// (the default): the public roots only.
#[derive(Clone, Default)]
pub struct RpcTrust {
    files: Vec<PathBuf>,
    certificates: Vec<reqwest::Certificate>,
}

impl std::fmt::Debug for RpcTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTrust").field("files", &self.files).field("certificates", &self.certificates.len()).finish()
    }
}

impl RpcTrust {
    /// Every certificate of each PEM file; a file with none, or one a TLS
    /// client would not take, is refused naming it.
    pub fn from_pem_files(paths: &[PathBuf]) -> Result<Self, RpcTrustError> {
        let mut trust = RpcTrust::default();
        for path in paths {
            let failed = |reason: String| RpcTrustError { path: path.clone(), reason };
            let size = std::fs::metadata(path).map_err(|e| failed(e.to_string()))?.len();
            if size > MAX_CA_FILE_BYTES {
                return Err(failed(format!("is {size} bytes, more than the {MAX_CA_FILE_BYTES} a CA file may be")));
            }
            let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| failed(format!("{e}")))?;
            if certificates.is_empty() {
                return Err(failed("holds no CERTIFICATE block".into()));
            }
            // The client parses its roots only when built: build one with
            // the file's certificates now.
            let with_them =
                certificates.iter().cloned().fold(reqwest::Client::builder(), |b, c| b.add_root_certificate(c));
            with_them
                .build()
                .map_err(|e| failed(format!("a certificate in it cannot be trusted: {}", error_chain(&e))))?;
            trust.files.push(path.clone());
            trust.certificates.extend(certificates);
        }
        Ok(trust)
    }

    /// The files the certificates came from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// `builder`, trusting these certificates too.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        self.certificates.iter().cloned().fold(builder, reqwest::ClientBuilder::add_root_certificate)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_is_read_whole_and_garbage_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = RpcTrust::from_pem_files(std::slice::from_ref(&missing)).unwrap_err().to_string();
        assert!(error.contains("missing.pem") && error.contains("No such file"), "{error}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let error = RpcTrust::from_pem_files(std::slice::from_ref(&empty)).unwrap_err().to_string();
        assert!(error.contains("empty.pem") && error.contains("no CERTIFICATE"), "{error}");

        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let error = RpcTrust::from_pem_files(std::slice::from_ref(&broken)).unwrap_err().to_string();
        assert!(error.contains("broken.pem"), "{error}");
    }
}
