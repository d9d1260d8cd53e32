//! Automatic certificates (ACME) against Pebble, Let's Encrypt's test ACME
//! server (Debian's `pebble`, `scripts/install-pebble`), on loopback with its
//! validation real: Pebble resolves the domain through the test's DNS
//! responder and fetches the HTTP-01 answer from the runner's public
//! listener. A verified domain gets a certificate, served by SNI (the client
//! trusts only Pebble's root); it is renewed without a restart; a failed
//! challenge shows the ACME server's error on the domain and is retried; an
//! uploaded certificate wins over the ACME one. With `--acme-challenge
//! tls-alpn-01` Pebble validates on the TLS listener alone (its HTTP port
//! closed), through a proxy of the test that holds its connection while
//! the test probes the listener with the challenge pending.
//!
//! Without `pebble` the tests skip, except under `CI=true`, where they fail.

// The control plane's own test responder: TXT for verification, A for Pebble.
#[path = "../../../controlplane/tests/api/support/dns.rs"]
#[allow(dead_code, reason = "shared with the control plane's tests, which use more of it")]
#[allow(clippy::duplicate_mod, reason = "control_plane.rs includes the same responder; each module keeps its own")]
mod dns;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;

use crate::support::ControlPlaneServe;
use crate::support::tls_probe::{ACME_TLS_1, probe};

/// Whether the tests can run; under CI=true a missing pebble fails them.
fn pebble_available() -> bool {
    let found = Command::new("pebble").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "pebble is not installed (scripts/install-pebble); CI=true needs these tests to run"
        );
        eprintln!("skipping: pebble is not installed (scripts/install-pebble)");
    }
    found
}

fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` free ports, all different: each listener is held until the last is
/// bound (one released before the next bind can come back as that one,
/// which gave Pebble the same port for its API and its management).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    listeners.map(|listener| listener.local_addr().unwrap().port())
}

/// Pebble's own HTTPS certificate (the ACME client trusts it through
/// `--acme-ca-file`) and the ports it will listen on, chosen before the
/// runner starts (its flags name the directory).
struct PebblePlan {
    dir: tempfile::TempDir,
    acme_port: u16,
    management_port: u16,
    cert_pem: String,
}

impl PebblePlan {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let cert_pem = cert.cert.pem();
        std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        let [acme_port, management_port] = free_ports();
        PebblePlan { dir, acme_port, management_port, cert_pem }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// Starts Pebble validating HTTP-01 on `http_port` (the runner's public
    /// listener), names resolved by `dns`, certificates valid `validity_s`.
    async fn start(self, http_port: u16, tls_port: u16, dns: SocketAddr, validity_s: u64) -> Pebble {
        let config = json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.acme_port),
            "managementListenAddress": format!("127.0.0.1:{}", self.management_port),
            "certificate": self.dir.path().join("cert.pem"),
            "privateKey": self.dir.path().join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity_s,
        }});
        let config_path = self.dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = std::fs::File::create(self.dir.path().join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(dns.to_string())
            // Real validation; no random sleeps, no rejected nonces.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pebble");
        let mut pebble = Pebble { child, plan: self, root_pem: String::new() };
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pebble.plan.cert_pem.as_bytes()).unwrap())
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(response) = client.get(pebble.plan.directory()).send().await
                && response.status() == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "pebble did not start:\n{}", pebble.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The root it issues under, from its management interface.
        let url = format!("https://127.0.0.1:{}/roots/0", pebble.plan.management_port);
        let root_pem = client.get(url).send().await.unwrap().text().await.unwrap();
        assert!(root_pem.contains("BEGIN CERTIFICATE"), "{root_pem}");
        pebble.root_pem = root_pem;
        pebble
    }
}

struct Pebble {
    child: Child,
    plan: PebblePlan,
    root_pem: String,
}

impl Pebble {
    fn log(&self) -> String {
        std::fs::read_to_string(self.plan.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A runner with ACME pointed at Pebble, a deployed project `shop`, and
/// Pebble started on its public port.
struct Setup {
    dns: dns::DnsResponder,
    serve: ControlPlaneServe,
    pebble: Pebble,
    _work: tempfile::TempDir,
}

async fn setup(validity_s: u64, extra: &[&str]) -> Setup {
    setup_with(validity_s, extra, |serve| (serve.runner.addr.port(), serve.tls.expect("the TLS listener").port())).await
}

/// [`setup`] with Pebble's HTTP-01 and TLS-ALPN-01 ports chosen by `ports`.
async fn setup_with(validity_s: u64, extra: &[&str], ports: impl FnOnce(&ControlPlaneServe) -> (u16, u16)) -> Setup {
    let dns = dns::DnsResponder::start().await;
    let plan = PebblePlan::new();
    let dns_addr = dns.addr.to_string();
    let directory = plan.directory();
    let ca_file = plan.ca_file();
    let mut args = vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--dns-resolver",
        &dns_addr,
        "--acme-email",
        "ops@example.com",
        "--acme-directory",
        &directory,
        "--acme-ca-file",
        ca_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let serve = ControlPlaneServe::start(&args);
    let (http_port, tls_port) = ports(&serve);
    let pebble = plan.start(http_port, tls_port, dns.addr, validity_s).await;

    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("main.ts"), "Deno.serve((req) => new Response(`shop ${new URL(req.url).protocol}`));\n")
        .unwrap();
    let config = work.path().join("config");
    cli(&serve, &config, &["projects", "create", "shop"]);
    cli(&serve, &config, &["deploy", "--project", "shop", "--prod", app.to_str().unwrap()]);
    Setup { dns, serve, pebble, _work: work }
}

fn cli(serve: &ControlPlaneServe, config: &Path, args: &[&str]) -> String {
    crate::support::isocloud_cli(&serve.control_url(), &serve.admin_token(), config, args)
}

impl Setup {
    /// Adds `domain` to `shop`, its name resolving to `ip` for Pebble, and
    /// verifies it (DNS TXT).
    async fn verified_domain(&self, domain: &str, ip: Ipv4Addr) {
        self.dns.set_a(domain, ip);
        let (status, added) = self
            .serve
            .api(reqwest::Method::POST, "/domains", Some(json!({ "domain": domain, "project": "shop" })))
            .await;
        assert_eq!(status, 201, "{added}");
        self.dns.set_txt(
            added["verification"]["txt_name"].as_str().unwrap(),
            added["verification"]["txt_value"].as_str().unwrap(),
        );
        let (_, verified) = self.serve.api(reqwest::Method::POST, &format!("/domains/{domain}/verify"), None).await;
        assert_eq!(verified["verified"], true, "{verified}");
    }

    async fn domain(&self, domain: &str) -> Value {
        let (status, answer) = self.serve.api(reqwest::Method::GET, &format!("/domains/{domain}"), None).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// Waits (`timeout`) until `check` holds for the domain's API view.
    async fn wait_for(&self, domain: &str, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.domain(domain).await;
            if check(&view) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "{domain}: {what} not within {timeout:?}; last view: {view}\nrunner:\n{}\npebble:\n{}",
                self.serve.runner.stderr(),
                self.pebble.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The certificate the TLS listener serves for `domain` (SNI), checked
    /// against `root_pem` only; its issuer and serial.
    async fn served(&self, domain: &str, root_pem: &str) -> Result<Served, String> {
        let tls = self.serve.tls.unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(tls).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(domain.to_owned()).unwrap();
        let stream = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let leaf = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).unwrap().clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        Ok(Served { issuer: parsed.issuer().to_string(), serial: parsed.raw_serial_as_string() })
    }

    /// [`Self::served`] once the listener has it: an issued certificate is
    /// in the store (the API shows it) a moment before this node's table is
    /// reloaded with it, as a user who reads "valid" and connects at once
    /// may see; 10 s at most.
    async fn served_soon(&self, domain: &str, root_pem: &str) -> Served {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.served(domain, root_pem).await {
                Ok(served) => return served,
                Err(e) => assert!(Instant::now() < deadline, "{domain}: no certificate served under that root: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET https://domain/` through the TLS listener, trusting `root_pem` only.
    async fn https_get(&self, domain: &str, root_pem: &str) -> (u16, String) {
        let tls = self.serve.tls.unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(root_pem.as_bytes()).unwrap())
            .tls_built_in_root_certs(false)
            .resolve(domain, tls)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let response = client.get(format!("https://{domain}:{}/", tls.port())).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

#[derive(Debug, PartialEq)]
struct Served {
    issuer: String,
    serial: String,
}

fn has_acme_certificate(view: &Value) -> bool {
    view["certificate"]["source"] == "acme"
}

#[tokio::test]
async fn a_verified_domain_gets_a_certificate_from_pebble_served_by_sni() {
    if !pebble_available() {
        return;
    }
    let setup = setup(3600, &[]).await;
    let root = setup.pebble.root_pem.clone();
    let domain = "www.shop-one.example.com";
    setup.verified_domain(domain, Ipv4Addr::LOCALHOST).await;
    let view = setup.wait_for(domain, "an ACME certificate", Duration::from_secs(20), has_acme_certificate).await;
    assert_eq!(view["acme"]["status"], "valid", "{view}");
    assert_eq!(view["acme"]["error"], Value::Null, "{view}");
    assert_eq!(view["certificate"]["names"], json!([domain]), "{view}");

    let served = setup.served_soon(domain, &root).await;
    assert!(served.issuer.contains("Pebble Intermediate CA"), "{served:?}");
    let (status, body) = setup.https_get(domain, &root).await;
    assert_eq!((status, body.as_str()), (200, "shop https:"));

    // The challenge path answers only pending tokens: with none pending, it
    // routes to the app as any other path does.
    let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let response = plain
        .get(format!("{}/.well-known/acme-challenge/abc", setup.serve.public_url()))
        .header("host", domain)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 308, "a host with a certificate is sent to HTTPS, as before");

    // The CLI lists it with its source and state.
    let config = tempfile::tempdir().unwrap();
    let listing = cli(&setup.serve, config.path(), &["domains", "list"]);
    assert!(listing.contains("acme until") && listing.contains("valid, renew"), "{listing}");
}

#[tokio::test]
async fn a_certificate_is_renewed_and_served_without_a_restart() {
    if !pebble_available() {
        return;
    }
    // 9 s certificates with 30 days ahead: renewed once a third of the
    // lifetime is left (about 6 s after issuance).
    let setup = setup(9, &[]).await;
    let root = setup.pebble.root_pem.clone();
    let domain = "renew.shop-two.example.com";
    setup.verified_domain(domain, Ipv4Addr::LOCALHOST).await;
    let first_view = setup.wait_for(domain, "an ACME certificate", Duration::from_secs(20), has_acme_certificate).await;
    let first = setup.served_soon(domain, &root).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    let renewed = loop {
        if let Ok(served) = setup.served(domain, &root).await
            && served.serial != first.serial
        {
            break served;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal; first {first_view}, now {}\n{}",
            setup.domain(domain).await,
            setup.serve.runner.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(renewed.issuer.contains("Pebble Intermediate CA"), "{renewed:?}");
    assert!(started.elapsed() > Duration::from_secs(2), "renewed when due, not at once: {:?}", started.elapsed());
    let view = setup.domain(domain).await;
    assert_ne!(view["certificate"]["not_after"], first_view["certificate"]["not_after"], "{view}");
    let (status, _) = setup.https_get(domain, &root).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_failed_challenge_shows_the_acme_error_and_is_retried() {
    if !pebble_available() {
        return;
    }
    let setup = setup(3600, &["--acme-retry-min-s", "1"]).await;
    // The probe: a name that resolves to the runner gets its certificate.
    let good = "good.shop-three.example.com";
    setup.verified_domain(good, Ipv4Addr::LOCALHOST).await;
    setup.wait_for(good, "an ACME certificate", Duration::from_secs(20), has_acme_certificate).await;

    // A name that resolves where nothing answers: Pebble's validation fails.
    let bad = "bad.shop-three.example.com";
    setup.verified_domain(bad, Ipv4Addr::new(127, 0, 0, 2)).await;
    let failed =
        setup.wait_for(bad, "a failed order", Duration::from_secs(60), |view| view["acme"]["status"] == "failed").await;
    let error = failed["acme"]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("127.0.0.2") || error.contains("connection refused"), "the ACME server's error: {error}");
    assert!(error.contains("urn:ietf:params:acme:error:"), "the problem type: {error}");
    assert_eq!(failed["certificate"], Value::Null, "{failed}");
    assert!(failed["acme"]["next_attempt_at"].as_str() > failed["acme"]["last_attempt_at"].as_str(), "{failed}");

    // Retried later, backing off: failures keep counting.
    setup
        .wait_for(bad, "a second failed order", Duration::from_secs(60), |view| {
            view["acme"]["failures"].as_i64().unwrap_or(0) >= 2
        })
        .await;
    let config = tempfile::tempdir().unwrap();
    let listing = cli(&setup.serve, config.path(), &["domains", "list"]);
    assert!(listing.contains("failed") && listing.contains("retry"), "{listing}");

    // Once the name resolves to the runner, a retry succeeds and the error goes.
    setup.dns.set_a(bad, Ipv4Addr::LOCALHOST);
    let fixed = setup.wait_for(bad, "a certificate after the fix", Duration::from_secs(60), has_acme_certificate).await;
    assert_eq!((fixed["acme"]["status"].clone(), fixed["acme"]["error"].clone()), (json!("valid"), Value::Null));
    assert_eq!(fixed["acme"]["failures"], 0);
}

#[tokio::test]
async fn an_uploaded_certificate_wins_over_the_acme_one() {
    if !pebble_available() {
        return;
    }
    // Short-lived ACME certificates: a renewal comes due while the upload
    // is there, and must not replace it.
    let setup = setup(6, &[]).await;
    let root = setup.pebble.root_pem.clone();
    let domain = "manual.shop-four.example.com";
    setup.verified_domain(domain, Ipv4Addr::LOCALHOST).await;
    setup.wait_for(domain, "an ACME certificate", Duration::from_secs(20), has_acme_certificate).await;
    assert!(setup.served_soon(domain, &root).await.issuer.contains("Pebble"));

    let uploaded = rcgen::generate_simple_self_signed(vec![domain.to_owned()]).unwrap();
    let (cert_pem, key_pem) = (uploaded.cert.pem(), uploaded.key_pair.serialize_pem());
    let (status, answer) = setup
        .serve
        .api(
            reqwest::Method::PUT,
            &format!("/domains/{domain}/certificate"),
            Some(json!({ "cert_pem": cert_pem, "key_pem": key_pem })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["certificate"]["source"], "manual", "{answer}");
    let manual = setup.served(domain, &cert_pem).await.expect("the uploaded certificate is served");
    assert!(!manual.issuer.contains("Pebble"), "{manual:?}");
    assert!(setup.served(domain, &root).await.is_err(), "Pebble's chain is no longer served");

    // Past the ACME certificate's renewal time: still the upload.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(setup.served(domain, &cert_pem).await.expect("still the upload"), manual);
    assert_eq!(setup.domain(domain).await["certificate"]["source"], "manual");
    let (status, _) = setup.https_get(domain, &cert_pem).await;
    assert_eq!(status, 200);
}

/// A TCP proxy in front of the TLS listener for Pebble: each connection is
/// held (counted in `arrived`) until `release` turns true, then forwarded.
struct HeldProxy {
    port: u16,
    listener: Option<tokio::net::TcpListener>,
    arrived: tokio::sync::watch::Receiver<usize>,
    arrivals: Option<tokio::sync::watch::Sender<usize>>,
    release: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl HeldProxy {
    async fn bind() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (arrivals, arrived) = tokio::sync::watch::channel(0);
        let (release, _) = tokio::sync::watch::channel(false);
        HeldProxy { port, listener: Some(listener), arrived, arrivals: Some(arrivals), release, task: None }
    }

    fn forward_to(&mut self, target: SocketAddr) {
        let listener = self.listener.take().unwrap();
        let arrivals = self.arrivals.take().unwrap();
        let release = self.release.subscribe();
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                arrivals.send_modify(|n| *n += 1);
                let mut release = release.clone();
                tokio::spawn(async move {
                    let _ = release.wait_for(|go| *go).await;
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }
}

impl Drop for HeldProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[tokio::test]
async fn tls_alpn_01_answers_on_the_tls_listener_alone_and_only_acme_tls_1_gets_the_challenge() {
    if !pebble_available() {
        return;
    }
    let mut proxy = HeldProxy::bind().await;
    let proxy_port = proxy.port;
    // Pebble's HTTP-01 port is one nothing listens on: only the TLS
    // listener can answer.
    let setup = setup_with(3600, &["--acme-challenge", "tls-alpn-01"], |_| (free_port(), proxy_port)).await;
    let tls = setup.serve.tls.unwrap();
    proxy.forward_to(tls);
    let root = setup.pebble.root_pem.clone();
    let domain = "www.shop-alpn.example.com";
    let browser: &[&[u8]] = &[b"h2", b"http/1.1"];
    setup.verified_domain(domain, Ipv4Addr::LOCALHOST).await;

    // Pebble is validating: the challenge is pending while its connection waits.
    let mut arrived = proxy.arrived.clone();
    // (The watch's guard dropped at once: the proxy counts further arrivals.)
    let waited = tokio::time::timeout(Duration::from_secs(20), async { arrived.wait_for(|n| *n > 0).await.is_ok() });
    assert!(
        waited.await == Ok(true),
        "Pebble never validated\nrunner:\n{}\npebble:\n{}",
        setup.serve.runner.stderr(),
        setup.pebble.log()
    );
    // The ACME server's handshake: the challenge certificate for the name
    // with the critical acmeIdentifier (a DER OCTET STRING of 32 bytes),
    // `acme-tls/1` agreed, and the connection closed: no HTTP served.
    let challenge = probe(tls, domain, &[ACME_TLS_1]).await.expect("the challenge handshake");
    assert_eq!(challenge.alpn.as_deref(), Some(ACME_TLS_1), "{challenge:?}");
    assert_eq!(challenge.names, [format!("DNSName({domain})")], "{challenge:?}");
    let (critical, value) = challenge.acme_identifier.clone().expect("the acmeIdentifier extension");
    assert!(critical && value.len() == 34 && value[..2] == [0x04, 0x20], "{challenge:?}");
    assert_eq!(challenge.after, "", "closed after the handshake, no HTTP answer");
    // Denied: a browser's handshake for the same name gets no certificate
    // (there is none yet, and never the challenge one); `acme-tls/1` for a
    // name with no pending challenge gets none.
    let browsing = probe(tls, domain, browser).await.expect_err("no certificate for a browser yet");
    assert!(browsing.contains("AccessDenied") || browsing.contains("alert"), "{browsing}");
    setup.dns.set_a("other.shop-alpn.example.com", Ipv4Addr::LOCALHOST);
    assert!(probe(tls, "other.shop-alpn.example.com", &[ACME_TLS_1]).await.is_err());

    // Pebble's connection goes through: the certificate is issued.
    proxy.release.send_replace(true);
    let view = setup.wait_for(domain, "an ACME certificate", Duration::from_secs(20), has_acme_certificate).await;
    assert_eq!((view["acme"]["status"].clone(), view["acme"]["error"].clone()), (json!("valid"), Value::Null));
    let served = setup.served_soon(domain, &root).await;
    assert!(served.issuer.contains("Pebble Intermediate CA"), "{served:?}");
    let (status, body) = setup.https_get(domain, &root).await;
    assert_eq!((status, body.as_str()), (200, "shop https:"));
    // On the same listener a browser's ALPN gets the certificate and HTTP…
    let browsing = probe(tls, domain, &[b"http/1.1"]).await.expect("a browser's handshake");
    assert_eq!(browsing.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(browsing.acme_identifier.is_none() && browsing.after.starts_with("HTTP/1.1 200"), "{browsing:?}");
    // …and `acme-tls/1` nothing, the challenge gone with the order.
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe(tls, domain, &[ACME_TLS_1]).await.is_ok() {
        assert!(Instant::now() < deadline, "the challenge certificate outlived its order");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
