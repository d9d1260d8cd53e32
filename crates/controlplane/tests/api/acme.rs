//! Automatic certificates on both stores: the control plane orders from a
//! real Pebble (Let's Encrypt's test ACME server, `scripts/install-pebble`),
//! which validates HTTP-01 against a listener of this test that answers only
//! through `ControlPlane::acme_key_authorization` (the store's pending
//! tokens, as the runner's public listener does), and TLS-ALPN-01 against
//! the ingress's TLS accept path on a second node sharing the store (its
//! challenge table fed by the routing change feed). Every ACME query
//! (account, lease, challenges, certificate, failure) runs on SQLite and
//! PostgreSQL.
//! Without pebble the test skips, except under `CI=true`, where it fails.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isocloud_controlplane::{AcmeOptions, ChallengeKind, ControlPlane};
use serde_json::json;

use crate::backend_tests;
use crate::support::dns::DnsResponder;
use crate::support::{Backend, TestServer};

backend_tests!(
    a_verified_domain_gets_a_certificate_and_a_refused_challenge_its_error,
    tls_alpn_01_is_answered_by_another_nodes_tls_listener,
);

fn pebble_available() -> bool {
    let found = Command::new("pebble").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "pebble is not installed (scripts/install-pebble)");
        eprintln!("skipping: pebble is not installed (scripts/install-pebble)");
    }
    found
}

fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` free ports, all different: each listener is held until the last is
/// bound (one released before the next bind can come back as that one).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    listeners.map(|listener| listener.local_addr().unwrap().port())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The public listener's part: `/.well-known/acme-challenge/<token>` by Host.
async fn challenge_listener(cp: Arc<ControlPlane>) -> SocketAddr {
    let app = axum::Router::new().route(
        "/.well-known/acme-challenge/{token}",
        axum::routing::get(
            move |axum::extract::Path(token): axum::extract::Path<String>, headers: axum::http::HeaderMap| {
                let cp = cp.clone();
                async move {
                    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or_default();
                    let host = host.split(':').next().unwrap_or_default().to_owned();
                    match cp.acme_key_authorization(&host, &token).await {
                        Some(answer) => (axum::http::StatusCode::OK, answer),
                        None => (axum::http::StatusCode::NOT_FOUND, String::new()),
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Adds `domain`, its name resolving to `ip` for Pebble, and verifies it.
async fn verify(s: &TestServer, dns: &DnsResponder, domain: &str, ip: Ipv4Addr) {
    dns.set_a(domain, ip);
    let created = s.post("/api/v1/domains", json!({ "domain": domain })).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let created = created.json();
    dns.set_txt(
        created["verification"]["txt_name"].as_str().unwrap(),
        created["verification"]["txt_value"].as_str().unwrap(),
    );
    let reply = s.post_empty(&format!("/api/v1/domains/{domain}/verify")).await;
    assert_eq!(reply.json()["verified"], true, "{}", reply.text);
}

/// The domain's API view once `check` holds (within 20 s).
async fn wait_for(
    s: &TestServer,
    domain: &str,
    what: &str,
    check: &dyn Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = s.get(&format!("/api/v1/domains/{domain}")).await.json();
        if check(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "{domain}: {what}; last: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pebble on loopback (its own HTTPS under a throwaway certificate),
/// validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`, names
/// resolved by `dns`; the ACME options that order from it.
struct Pebble {
    _child: KillOnDrop,
    _dir: tempfile::TempDir,
    options: AcmeOptions,
}

async fn start_pebble(dns: SocketAddr, http_port: u16, tls_port: u16, challenge: ChallengeKind) -> Pebble {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let [acme_port, management_port] = free_ports();
    let config = json!({ "pebble": {
        "listenAddress": format!("127.0.0.1:{acme_port}"),
        "managementListenAddress": format!("127.0.0.1:{management_port}"),
        "certificate": dir.path().join("cert.pem"),
        "privateKey": dir.path().join("key.pem"),
        "httpPort": http_port,
        "tlsPort": tls_port,
    }});
    std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
    let child = KillOnDrop(
        Command::new("pebble")
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            .arg("-dnsserver")
            .arg(dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble"),
    );
    let directory = format!("https://127.0.0.1:{acme_port}/dir");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !client.get(&directory).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "pebble did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let options = AcmeOptions {
        directory_url: directory,
        email: Some("ops@example.com".into()),
        ca_pem: Some(cert.cert.pem().into_bytes()),
        renew_before: Duration::from_secs(30 * 86_400),
        retry_min: Duration::from_secs(60),
        challenge,
    };
    Pebble { _child: child, _dir: dir, options }
}

async fn a_verified_domain_gets_a_certificate_and_a_refused_challenge_its_error(backend: Backend) {
    if !pebble_available() {
        return;
    }
    let dns = DnsResponder::start().await;
    let addr = dns.addr;
    let s = TestServer::start_with(backend, move |o| o.dns_resolver = Some(addr)).await;
    let http = challenge_listener(s.cp.clone()).await;
    let pebble = start_pebble(dns.addr, http.port(), free_port(), ChallengeKind::Http01).await;
    let acme = tokio::spawn(s.cp.start_acme(pebble.options.clone()).unwrap());
    let verify = async |domain: &str, ip: Ipv4Addr| verify(&s, &dns, domain, ip).await;
    let wait = async |domain: &str, what: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
        wait_for(&s, domain, what, check).await
    };

    // The probe: a name Pebble reaches the listener under gets its certificate,
    // served by SNI from the table without a restart.
    let good = "good.acme-store.example.com";
    verify(good, Ipv4Addr::LOCALHOST).await;
    let view = wait(good, "an ACME certificate", &|v| v["certificate"]["source"] == "acme").await;
    assert_eq!((view["acme"]["status"].as_str(), view["acme"]["failures"].as_i64()), (Some("valid"), Some(0)));
    // The SNI table follows the store through the routing change feed: the
    // view can show the certificate a moment before the table has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.cp.certificate_for(good).is_none() {
        assert!(Instant::now() < deadline, "{good}: stored, but never in the SNI table");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A name that resolves where nothing listens: the ACME server's error,
    // kept on the domain with the next attempt a minute on.
    let bad = "bad.acme-store.example.com";
    verify(bad, Ipv4Addr::new(127, 0, 0, 2)).await;
    let view = wait(bad, "a failed order", &|v| v["acme"]["status"] == "failed").await;
    let error = view["acme"]["error"].as_str().unwrap();
    assert!(error.contains("urn:ietf:params:acme:error:connection"), "{error}");
    assert_eq!(view["certificate"], serde_json::Value::Null);
    assert!(s.cp.certificate_for(bad).is_none());
    assert!(view["acme"]["next_attempt_at"].as_str() > view["acme"]["last_attempt_at"].as_str(), "{view}");
    // No pending token is left to answer for either name.
    assert_eq!(s.cp.acme_key_authorization(bad, "abc").await, None);
    acme.abort();
}

/// A node's certificates as its TLS listener asks them.
struct NodeCertificates(Arc<ControlPlane>);

impl isocloud_ingress::Certificates for NodeCertificates {
    fn certificate_for(&self, server_name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.certificate_for(server_name)
    }

    fn acme_tls_alpn_certificate(&self, server_name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.acme_tls_alpn_certificate(server_name)
    }
}

/// `node`'s TLS listener: the ingress's acceptor and accept path, a
/// one-line HTTP service behind it.
async fn tls_listener(node: Arc<ControlPlane>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let acceptor = isocloud_ingress::tls_acceptor(Arc::new(NodeCertificates(node))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bounds = isocloud_ingress::ListenerBounds::defaults(
        isocloud_ingress::ListenerKind::Tls,
        Duration::from_secs(10),
        isocloud_ingress::BodyBound { timeout: Duration::from_secs(30), min_rate_bytes_per_s: 0 },
    );
    let metrics = isocloud_ingress::ListenerMetrics::new(&mut prometheus_client::registry::Registry::default());
    let service = hyper::service::service_fn(|_request: http::Request<isocloud_ingress::BoundedBody>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok"))))
    });
    (addr, tokio::spawn(isocloud_ingress::serve_bounded_tls(listener, acceptor, bounds, metrics, service)))
}

async fn tls_alpn_01_is_answered_by_another_nodes_tls_listener(backend: Backend) {
    if !pebble_available() {
        return;
    }
    let dns = DnsResponder::start().await;
    let addr = dns.addr;
    let s = TestServer::start_with(backend, move |o| o.dns_resolver = Some(addr)).await;
    // Node B shares A's store and only answers: A orders, Pebble reaches B's
    // TLS listener; nothing answers HTTP-01 (Pebble's HTTP port is closed).
    let b = ControlPlane::open(s.options.clone()).await.unwrap();
    let b_background = tokio::spawn(b.clone().run_background());
    let (tls, b_listener) = tls_listener(b.clone()).await;
    let pebble = start_pebble(dns.addr, free_port(), tls.port(), ChallengeKind::TlsAlpn01).await;
    let acme = tokio::spawn(s.cp.start_acme(pebble.options.clone()).unwrap());

    let domain = "www.alpn-store.example.com";
    verify(&s, &dns, domain, Ipv4Addr::LOCALHOST).await;
    let view = wait_for(&s, domain, "an ACME certificate", &|v| v["certificate"]["source"] == "acme").await;
    assert_eq!((view["acme"]["status"].as_str(), view["acme"]["error"].as_str()), (Some("valid"), None), "{view}");
    assert_eq!(view["certificate"]["names"], json!([domain]));
    // B serves it by SNI, and neither node holds the challenge any more
    // (its removal is a routing change too).
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.certificate_for(domain).is_none() || b.acme_tls_alpn_certificate(domain).is_some() {
        assert!(Instant::now() < deadline, "{domain}: B never loaded the certificate or never dropped the challenge");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.cp.acme_tls_alpn_certificate(domain).is_none());
    assert_eq!(s.cp.acme_key_authorization(domain, "abc").await, None);
    acme.abort();
    b_listener.abort();
    b_background.abort();
}
