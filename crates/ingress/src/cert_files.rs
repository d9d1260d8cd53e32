//! One certificate from a PEM pair of files, for a listener its callers
//! reach by address (the control plane's origin listener, `--origin-tls-cert`
//! and `--origin-tls-key`): served whatever the SNI says, since a client
//! that names an IP sends none. The files are looked at again at most once a
//! second, from a handshake; when either changed, the pair is read again, so
//! a rotated certificate (cert-manager, certbot) is served without a
//! restart. A pair that does not load keeps the one before, and says so in
//! the log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// A certificate or key file larger than this is refused unread.
const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;
/// How often a handshake may look at the files' modification times.
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// Why a pair of files gives no certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertificateFilesError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the key in {key} does not match the certificate in {cert}: {reason}")]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
}

/// What was loaded, and when the files were last looked at.
struct Loaded {
    key: Arc<CertifiedKey>,
    modified: (Option<SystemTime>, Option<SystemTime>),
    looked: Instant,
}

/// A certificate chain and its key, read from `cert_path` and `key_path`.
pub struct CertificateFiles {
    cert_path: PathBuf,
    key_path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for CertificateFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateFiles")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertificateFiles {
    /// Reads the pair: a PEM chain (leaf first) and its PEM key (PKCS#8,
    /// PKCS#1 or SEC1), which must match.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertificateFilesError> {
        let modified = (modified(cert_path), modified(key_path));
        let key = Arc::new(read_pair(cert_path, key_path)?);
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            loaded: Mutex::new(Loaded { key, modified, looked: Instant::now() }),
        })
    }

    /// The certificate to serve now: the one loaded, or the pair read again
    /// when a file changed since (at most one look a second).
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if loaded.looked.elapsed() < LOOK_AGAIN {
            return Arc::clone(&loaded.key);
        }
        loaded.looked = Instant::now();
        let now = (modified(&self.cert_path), modified(&self.key_path));
        if now != loaded.modified {
            // A rotation writes two files: until both are in place the pair
            // does not match, and the next look tries again.
            match read_pair(&self.cert_path, &self.key_path) {
                Ok(key) => {
                    loaded.key = Arc::new(key);
                    loaded.modified = now;
                    tracing::info!(cert = %self.cert_path.display(), "certificate files changed: serving the new pair");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "certificate files changed but do not load: the previous pair stays")
                }
            }
        }
        Arc::clone(&loaded.key)
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// An acceptor serving `files`' certificate to every client, offering
/// HTTP/2 and HTTP/1.1 (ALPN).
pub fn certificate_files_acceptor(files: Arc<CertificateFiles>) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(files);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, CertificateFilesError> {
    let failed = |reason: String| CertificateFilesError::File { path: path.to_owned(), reason };
    let size = std::fs::metadata(path).map_err(|e| failed(e.to_string()))?.len();
    if size > MAX_PEM_FILE_BYTES {
        return Err(failed(format!("is {size} bytes, more than the {MAX_PEM_FILE_BYTES} a PEM file may be")));
    }
    std::fs::read(path).map_err(|e| failed(e.to_string()))
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, CertificateFilesError> {
    let cert_failed = |reason: String| CertificateFilesError::File { path: cert_path.to_owned(), reason };
    let key_failed = |reason: String| CertificateFilesError::File { path: key_path.to_owned(), reason };
    let chain = CertificateDer::pem_slice_iter(&read_bounded(cert_path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_failed(format!("is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_failed("holds no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read_bounded(key_path)?)
        .map_err(|e| key_failed(format!("is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| key_failed(format!("is not a supported key type (RSA, ECDSA P-256/P-384, Ed25519): {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| CertificateFilesError::Mismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls::pki_types::ServerName;

    use super::*;

    /// A self-signed pair for 127.0.0.1 in `dir`: the certificate's DER.
    fn write_pair(dir: &Path) -> CertificateDer<'static> {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
        certified.cert.der().clone()
    }

    /// A handshake to `acceptor` over memory, naming an IP (no SNI): the
    /// leaf served.
    async fn leaf_served(acceptor: &TlsAcceptor, trusted: &CertificateDer<'static>) -> CertificateDer<'static> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server = {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(server_io).await.unwrap();
                tls.write_all(b"ok").await.unwrap();
                tls.shutdown().await.unwrap();
            })
        };
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, client_io).await.expect("handshake with the trusted pair");
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"ok");
        server.await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    #[tokio::test]
    async fn serves_the_pair_to_a_client_naming_an_ip_and_the_rotated_pair_after_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_pair(dir.path());
        let files =
            Arc::new(CertificateFiles::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap());
        let acceptor = certificate_files_acceptor(Arc::clone(&files)).unwrap();
        assert_eq!(leaf_served(&acceptor, &first).await, first);

        // Rotated on disk: served after the next look (a second at most).
        std::thread::sleep(Duration::from_millis(20)); // a later mtime on coarse clocks
        let second = write_pair(dir.path());
        assert_ne!(first, second);
        std::thread::sleep(LOOK_AGAIN);
        assert_eq!(leaf_served(&acceptor, &second).await, second);

        // A broken rotation (the key of another pair) keeps the last good one.
        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(dir.path().join("key.pem"), other.key_pair.serialize_pem()).unwrap();
        std::thread::sleep(LOOK_AGAIN);
        assert_eq!(leaf_served(&acceptor, &second).await, second);
    }

    #[test]
    fn a_pair_that_does_not_load_says_which_file_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let missing = CertificateFiles::load(&cert, &key).unwrap_err().to_string();
        assert!(missing.contains("cert.pem") && missing.contains("No such file"), "{missing}");

        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let empty = CertificateFiles::load(&cert, &key).unwrap_err().to_string();
        assert!(empty.contains("cert.pem") && empty.contains("no CERTIFICATE block"), "{empty}");

        write_pair(dir.path());
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let bad_key = CertificateFiles::load(&cert, &key).unwrap_err().to_string();
        assert!(bad_key.contains("key.pem") && bad_key.contains("key type"), "{bad_key}");

        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(&key, other.key_pair.serialize_pem()).unwrap();
        let mismatch = CertificateFiles::load(&cert, &key).unwrap_err().to_string();
        assert!(mismatch.contains("does not match"), "{mismatch}");

        std::fs::write(&cert, vec![b'x'; MAX_PEM_FILE_BYTES as usize + 1]).unwrap();
        let huge = CertificateFiles::load(&cert, &key).unwrap_err().to_string();
        assert!(huge.contains("more than"), "{huge}");
    }
}
