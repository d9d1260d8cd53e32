//! TLS on the public listener: the certificate is picked by SNI from a
//! source the control plane keeps (uploaded PEM pairs per domain).

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// Certificates by server name. Looked up in every handshake: answer from
/// memory.
pub trait Certificates: Send + Sync + 'static {
    /// `server_name`: the SNI, lowercase.
    fn certificate_for(&self, server_name: &str) -> Option<Arc<CertifiedKey>>;
}

struct BySni(Arc<dyn Certificates>);

impl std::fmt::Debug for BySni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BySni")
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No SNI, or a name without a certificate: the handshake fails
        // rather than showing some other domain's certificate.
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.certificate_for(&name)
    }
}

/// An acceptor that offers HTTP/2 and HTTP/1.1 (ALPN).
pub fn tls_acceptor(certificates: Arc<dyn Certificates>) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni(certificates)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
