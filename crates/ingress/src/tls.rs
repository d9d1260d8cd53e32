//! TLS on the public listener: the certificate is picked by SNI from a
//! source the control plane keeps (uploaded PEM pairs per domain).
//!
//! A ClientHello offering ALPN `acme-tls/1` is an ACME server's TLS-ALPN-01
//! validation (RFC 8737), never a browser: it gets the challenge certificate
//! pending for its server name or none (the handshake fails), never the
//! domain's real certificate; `acme-tls/1` is negotiated and the connection
//! closes after the handshake, no HTTP served on it ([`is_acme_tls_alpn`]).

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// The ALPN protocol of TLS-ALPN-01 validations (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Certificates by server name. Looked up in every handshake: answer from
/// memory.
pub trait Certificates: Send + Sync + 'static {
    /// `server_name`: the SNI, lowercase.
    fn certificate_for(&self, server_name: &str) -> Option<Arc<CertifiedKey>>;

    /// The TLS-ALPN-01 challenge certificate pending for `server_name` (the
    /// SNI, lowercase), asked only when the ClientHello offers
    /// `acme-tls/1`. `None` (the default: no ACME here) fails the handshake.
    fn acme_tls_alpn_certificate(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let _ = server_name;
        None
    }
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
        // The ACME server's validation: the challenge certificate or nothing.
        // `acme-tls/1` is first of ours, so it is what gets negotiated.
        if hello.alpn().is_some_and(|mut offered| offered.any(|protocol| protocol == ACME_TLS_ALPN)) {
            return self.0.acme_tls_alpn_certificate(&name);
        }
        self.0.certificate_for(&name)
    }
}

/// Whether a finished handshake negotiated `acme-tls/1`: a TLS-ALPN-01
/// validation, to be closed without serving anything (RFC 8737 §3).
pub fn is_acme_tls_alpn(connection: &rustls::ServerConnection) -> bool {
    connection.alpn_protocol() == Some(ACME_TLS_ALPN)
}

/// An acceptor that offers HTTP/2 and HTTP/1.1 (ALPN), and `acme-tls/1`
/// to the ACME server's TLS-ALPN-01 validations.
pub fn tls_acceptor(certificates: Arc<dyn Certificates>) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni(certificates)));
    // rustls picks the first of ours the client offers: `acme-tls/1` first,
    // so a hello offering it never negotiates HTTP over a challenge
    // certificate.
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The TLS-ALPN-01 challenge certificate for `domain` (RFC 8737 §3):
/// self-signed, a fresh P-256 key, `domain` its only subject alternative
/// name, and the critical acmeIdentifier extension (1.3.6.1.5.5.7.1.31)
/// holding `digest`, the key authorization's SHA-256. Shared by the control
/// plane's TLS listener and the edge's, which mint it from the digest alone.
pub fn tls_alpn_certificate(domain: &str, digest: &[u8; 32]) -> Result<CertifiedKey, String> {
    let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use super::*;

    /// Regular certificates and pending TLS-ALPN-01 ones, by name.
    #[derive(Default)]
    struct Table {
        regular: HashMap<String, Arc<CertifiedKey>>,
        acme: HashMap<String, Arc<CertifiedKey>>,
    }

    impl Certificates for Table {
        fn certificate_for(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
            self.regular.get(server_name).cloned()
        }

        fn acme_tls_alpn_certificate(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
            self.acme.get(server_name).cloned()
        }
    }

    /// A self-signed certificate for `name`, with the acmeIdentifier
    /// extension when `acme_digest` is given.
    fn certificate(name: &str, acme_digest: Option<[u8; 32]>) -> Arc<CertifiedKey> {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        if let Some(digest) = acme_digest {
            params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer))
    }

    /// A handshake with `acceptor` over memory, SNI `name` (an IP: none),
    /// offering `alpn`: the leaf the client got and the protocol agreed.
    async fn handshake(
        acceptor: &TlsAcceptor,
        name: &str,
        alpn: &[&[u8]],
    ) -> Result<(CertificateDer<'static>, Option<Vec<u8>>), String> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let (client, server) = tokio::join!(
            isocloud_test_tls::trusting_connector(alpn).connect(server_name, client_io),
            acceptor.accept(server_io)
        );
        let client = client.map_err(|e| format!("client: {e}"))?;
        let server = server.map_err(|e| format!("server: {e}"))?;
        let agreed = client.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(agreed.as_deref(), server.get_ref().1.alpn_protocol());
        assert_eq!(is_acme_tls_alpn(server.get_ref().1), agreed.as_deref() == Some(ACME_TLS_ALPN));
        let leaf = client.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
        Ok((leaf, agreed))
    }

    fn leaf_of(key: &CertifiedKey) -> CertificateDer<'static> {
        key.cert[0].clone().into_owned()
    }

    #[tokio::test]
    async fn acme_tls_1_gets_the_challenge_certificate_only_for_a_pending_name() {
        let mut table = Table::default();
        let shop = certificate("shop.test", None);
        let shop_challenge = certificate("shop.test", Some([7; 32]));
        let pending_challenge = certificate("pending.test", Some([9; 32]));
        table.regular.insert("shop.test".into(), shop.clone());
        table.regular.insert("other.test".into(), certificate("other.test", None));
        table.acme.insert("shop.test".into(), shop_challenge.clone());
        table.acme.insert("pending.test".into(), pending_challenge.clone());
        let acceptor = tls_acceptor(Arc::new(table)).unwrap();
        let browser: &[&[u8]] = &[b"h2", b"http/1.1"];

        // A browser gets the domain's certificate and HTTP.
        let (leaf, agreed) = handshake(&acceptor, "shop.test", browser).await.unwrap();
        assert_eq!((leaf, agreed.as_deref()), (leaf_of(&shop), Some(&b"h2"[..])));
        let (leaf, agreed) = handshake(&acceptor, "shop.test", &[b"http/1.1"]).await.unwrap();
        assert_eq!((leaf, agreed.as_deref()), (leaf_of(&shop), Some(&b"http/1.1"[..])));

        // The ACME server's validation gets the challenge certificate, and
        // `acme-tls/1` is agreed (also when it offers more: never HTTP over
        // a challenge certificate).
        let (leaf, agreed) = handshake(&acceptor, "SHOP.test", &[ACME_TLS_ALPN]).await.unwrap();
        assert_eq!((leaf, agreed.as_deref()), (leaf_of(&shop_challenge), Some(ACME_TLS_ALPN)));
        let (leaf, agreed) = handshake(&acceptor, "shop.test", &[b"h2", ACME_TLS_ALPN]).await.unwrap();
        assert_eq!((leaf, agreed.as_deref()), (leaf_of(&shop_challenge), Some(ACME_TLS_ALPN)));
        let (leaf, _) = handshake(&acceptor, "pending.test", &[ACME_TLS_ALPN]).await.unwrap();
        assert_eq!(leaf, leaf_of(&pending_challenge));

        // Denied: `acme-tls/1` for a name with no pending challenge (even one
        // with a certificate) gets nothing, nor without SNI; a browser never
        // gets a challenge certificate.
        let failed = handshake(&acceptor, "other.test", &[ACME_TLS_ALPN]).await.unwrap_err();
        assert!(failed.contains("AccessDenied"), "the server finds no certificate: {failed}");
        assert!(handshake(&acceptor, "unknown.test", &[ACME_TLS_ALPN]).await.is_err());
        assert!(handshake(&acceptor, "127.0.0.1", &[ACME_TLS_ALPN]).await.is_err(), "no SNI");
        assert!(handshake(&acceptor, "pending.test", browser).await.is_err());
        // Without ALPN at all: the domain's certificate, as before.
        let (leaf, agreed) = handshake(&acceptor, "shop.test", &[]).await.unwrap();
        assert_eq!((leaf, agreed), (leaf_of(&shop), None));
    }

    #[tokio::test]
    async fn an_acme_tls_1_connection_is_closed_after_the_handshake_without_http() {
        let mut table = Table::default();
        table.regular.insert("shop.test".into(), certificate("shop.test", None));
        table.acme.insert("shop.test".into(), certificate("shop.test", Some([7; 32])));
        let acceptor = tls_acceptor(Arc::new(table)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bounds = crate::ListenerBounds::defaults(
            crate::ListenerKind::Tls,
            std::time::Duration::from_secs(10),
            crate::BodyBound { timeout: std::time::Duration::from_secs(30), min_rate_bytes_per_s: 0 },
        );
        let metrics = crate::ListenerMetrics::new(&mut prometheus_client::registry::Registry::default());
        let service = hyper::service::service_fn(|_request: http::Request<crate::BoundedBody>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(crate::body::full(bytes::Bytes::from("hello"))))
        });
        let server = tokio::spawn(crate::serve_bounded_tls(listener, acceptor, bounds, metrics, service));

        let exchange = async |alpn: &[&[u8]]| {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut tls = isocloud_test_tls::trusting_connector(alpn)
                .connect(ServerName::try_from("shop.test").unwrap(), tcp)
                .await
                .unwrap();
            // Ignored by a closed connection; answered by an open one.
            let _ = tls.write_all(b"GET / HTTP/1.1\r\nhost: shop.test\r\nconnection: close\r\n\r\n").await;
            let mut answer = Vec::new();
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
            let _ = read.expect("the server answers or closes within 5 s");
            String::from_utf8_lossy(&answer).into_owned()
        };
        // The probe: HTTP/1.1 over the same listener is served.
        let answer = exchange(&[b"http/1.1"]).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
        // `acme-tls/1`: the handshake, then the close; no HTTP.
        assert_eq!(exchange(&[ACME_TLS_ALPN]).await, "");
        server.abort();
    }
}
