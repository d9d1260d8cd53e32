//! TLS handshakes as an ACME server's TLS-ALPN-01 validation makes them
//! (ALPN `acme-tls/1`) and as a browser does, reading the leaf whatever it
//! is: the control plane's and the edge's listeners are probed alike.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_rustls::rustls;

pub const ACME_TLS_1: &[u8] = b"acme-tls/1";

/// What a handshake offering `alpn` for `name` got from a TLS listener
/// (the control plane's or an edge's): the protocol agreed, the leaf (DER)
/// and its DNS names, its acmeIdentifier extension (critical?, DER value)
/// if any, and what an HTTP/1.1 request written after it read back (the
/// connection's end within 5 s).
#[derive(Debug)]
pub struct Probe {
    pub alpn: Option<Vec<u8>>,
    pub leaf: Vec<u8>,
    pub names: Vec<String>,
    pub acme_identifier: Option<(bool, Vec<u8>)>,
    pub after: String,
}

pub async fn probe(tls: SocketAddr, name: &str, alpn: &[&[u8]]) -> Result<Probe, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(tls).await.map_err(|e| e.to_string())?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let handshake = isocloud_test_tls::trusting_connector(alpn).connect(server_name, tcp);
    let mut stream = tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .map_err(|_| "the handshake took over 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let (_, connection) = stream.get_ref();
    let leaf = connection.peer_certificates().unwrap()[0].to_vec();
    let alpn = connection.alpn_protocol().map(<[u8]>::to_vec);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let names = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    let acme_identifier = parsed
        .extensions()
        .iter()
        .find(|ext| ext.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
        .map(|ext| (ext.critical, ext.value.to_vec()));
    let request = format!("GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "{name}: neither an answer nor a close within 5 s");
    Ok(Probe { alpn, leaf, names, acme_identifier, after: String::from_utf8_lossy(&answer).into_owned() })
}
