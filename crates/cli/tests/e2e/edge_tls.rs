//! The edge's public HTTPS (issue 15 item 2): `isocloud serve
//! --origin-listen` (the control plane), one `isocloud runner`, and one
//! `isocloud edge --tls-listen`. A verified domain's uploaded certificate
//! reaches the edge over the origin listener and is served by SNI (for that
//! domain alone), the isolate sees an https `request.url`, plain HTTP to
//! the domain is 308 to HTTPS, a certificate uploaded later is served
//! within seconds without a restart; and ACME HTTP-01 challenges pending in
//! the control plane's store are answered through the edge's plain
//! listener, never redirected, and TLS-ALPN-01 ones by its TLS listener
//! (to a hello offering `acme-tls/1` alone).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::Digest as _;
use sqlx::Connection as _;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;

use crate::support::edge::Edge;
use crate::support::tls_probe::{ACME_TLS_1, probe};
use crate::support::{ControlPlaneServe, Runner, SECRET, isocloud_cli, runner_fed_by};

#[path = "../../../controlplane/tests/api/support/dns.rs"]
#[allow(dead_code, reason = "shared with the control plane's tests, which use more of it")]
#[allow(clippy::duplicate_mod, reason = "control_plane.rs includes the same responder; each module keeps its own")]
mod dns;

const DOMAIN: &str = "www.shop.test";

/// Project `shop`, its app (answers its `request.url`) in production, and
/// [`DOMAIN`] attached and verified (DNS TXT).
async fn shop_with_domain(serve: &ControlPlaneServe, dns: &dns::DnsResponder, work: &Path) {
    let config = work.join("config");
    let cli = |args: &[&str]| isocloud_cli(&serve.control_url(), &serve.admin_token(), &config, args);
    cli(&["projects", "create", "shop"]);
    let app = work.join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("main.ts"), "Deno.serve((req) => new Response(req.url));\n").unwrap();
    cli(&["deploy", "--project", "shop", "--prod", app.to_str().unwrap()]);
    let (status, domain) =
        serve.api(reqwest::Method::POST, "/domains", Some(json!({ "domain": DOMAIN, "project": "shop" }))).await;
    assert_eq!(status, 201, "{domain}");
    dns.set_txt(
        domain["verification"]["txt_name"].as_str().unwrap(),
        domain["verification"]["txt_value"].as_str().unwrap(),
    );
    let (_, verified) = serve.api(reqwest::Method::POST, &format!("/domains/{DOMAIN}/verify"), None).await;
    assert_eq!(verified["verified"], true, "{verified}");
}

/// A fresh self-signed certificate for [`DOMAIN`] uploaded; its PEM (the
/// only CA a client of the test trusts).
async fn upload_certificate(serve: &ControlPlaneServe) -> String {
    let cert = rcgen::generate_simple_self_signed(vec![DOMAIN.to_owned()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let (status, answer) = serve
        .api(
            reqwest::Method::PUT,
            &format!("/domains/{DOMAIN}/certificate"),
            Some(json!({ "cert_pem": cert_pem, "key_pem": key_pem })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    cert_pem
}

/// A client trusting `ca_pem` alone, reaching `name` at `addr`; a new one
/// per call, so every request makes its own handshake.
fn https_client(ca_pem: &str, name: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve(name, addr)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Plain HTTP to the edge, redirects not followed.
async fn plain(edge: &Edge, host: &str, path: &str) -> reqwest::Response {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(host, edge.addr)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    client.get(edge.url(host, path)).send().await.expect("the edge answers")
}

/// Waits (10 s at most) until the edge serves [`DOMAIN`] over HTTPS to a
/// client trusting `ca_pem` alone; how long that took.
async fn wait_https(edge: &Edge, ca_pem: &str) -> Duration {
    let (started, tls) = (Instant::now(), edge.tls.expect("the edge's TLS listener"));
    loop {
        let sent = https_client(ca_pem, DOMAIN, tls).get(format!("https://{DOMAIN}:{}/", tls.port())).send().await;
        match sent {
            Ok(response) if response.status() == 200 => return started.elapsed(),
            other => assert!(
                started.elapsed() < Duration::from_secs(10),
                "{DOMAIN} not served over HTTPS with the certificate: {other:?}; edge:\n{}",
                edge.stderr()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The control plane (with its origin listener), [`shop_with_domain`] with
/// an uploaded certificate (`ca`, its PEM), one runner and one edge with a
/// TLS listener that serves the domain over HTTPS already. The fields
/// whose names start with `_` are held so the processes live.
struct ShopBehindEdge {
    serve: ControlPlaneServe,
    edge: Edge,
    ca: String,
    _dns: dns::DnsResponder,
    _work: tempfile::TempDir,
    _runner: Runner,
}

async fn shop_behind_an_edge() -> ShopBehindEdge {
    let dns = dns::DnsResponder::start().await;
    let resolver = dns.addr.to_string();
    let (serve, origin) = ControlPlaneServe::start_with_origin(&["--dns-resolver", &resolver]);
    let work = tempfile::tempdir().unwrap();
    shop_with_domain(&serve, &dns, work.path()).await;
    let ca = upload_certificate(&serve).await;
    let runner = runner_fed_by(origin, SECRET, &[]);
    let edge = Edge::start(origin, &[&runner], &["--tls-listen", "127.0.0.1:0"]);
    wait_https(&edge, &ca).await;
    ShopBehindEdge { serve, edge, ca, _dns: dns, _work: work, _runner: runner }
}

#[tokio::test]
async fn the_edge_serves_a_domains_certificate_by_sni_and_a_new_one_within_seconds() {
    let ShopBehindEdge { serve, edge, ca: first, _dns, _work, _runner } = shop_behind_an_edge().await;
    let tls = edge.tls.expect("the edge's TLS listener");
    edge.wait_served("shop.localhost").await;

    // HTTPS by SNI, HTTP/2 by ALPN, the client trusting the uploaded
    // certificate alone; the isolate sees the https URL the client asked for.
    let response = https_client(&first, DOMAIN, tls)
        .get(format!("https://{DOMAIN}:{}/secure?x=1", tls.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.unwrap(), format!("https://{DOMAIN}:{}/secure?x=1", tls.port()));

    // Plain HTTP to the domain: 308 to the edge's HTTPS; a host without a
    // certificate is served over plain HTTP.
    let response = plain(&edge, DOMAIN, "/path?q=1").await;
    assert_eq!(response.status(), 308);
    assert_eq!(response.headers()["location"], format!("https://{DOMAIN}:{}/path?q=1", tls.port()).as_str());
    let response = plain(&edge, "shop.localhost", "/plain").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), format!("http://shop.localhost:{}/plain", edge.addr.port()));

    // A name without a certificate of its own gets no handshake, never
    // another domain's certificate.
    let other = https_client(&first, "shop.localhost", tls);
    assert!(other.get(format!("https://shop.localhost:{}/", tls.port())).send().await.is_err());

    // A certificate uploaded in place of the first is served within a few
    // seconds (the routing feed names the domain, the edge fetches it), no
    // restart; the first one is served no more.
    let second = upload_certificate(&serve).await;
    let took = wait_https(&edge, &second).await;
    println!("the new certificate served through the edge {} ms after its upload", took.as_millis());
    assert!(took < Duration::from_secs(5), "{took:?}");
    let stale = https_client(&first, DOMAIN, tls).get(format!("https://{DOMAIN}:{}/", tls.port())).send().await;
    assert!(stale.is_err(), "the replaced certificate is still served: {stale:?}");

    // The edge's log never holds key material.
    let log = edge.stderr();
    assert!(!log.contains("PRIVATE KEY") && !log.contains("BEGIN CERTIFICATE"), "{log}");
    assert!(log.contains("certificates: up to date"), "{log}");
}

/// An HTTP-01 challenge the control plane's store holds as pending (as an
/// ACME order of any node leaves it) is answered through the edge's plain
/// listener, even for a domain whose plain HTTP goes to HTTPS; other
/// challenge paths reach the app, unredirected.
#[tokio::test]
async fn an_acme_challenge_pending_in_the_store_is_answered_through_the_edge() {
    let ShopBehindEdge { serve, edge, _dns, _work, _runner, .. } = shop_behind_an_edge().await;
    let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    let path = format!("/.well-known/acme-challenge/{token}");

    // The probe: nothing pending yet, so the path is the app's (not
    // redirected), while the rest of the domain's plain HTTP is.
    assert_eq!(plain(&edge, DOMAIN, "/").await.status(), 308);
    let response = plain(&edge, DOMAIN, &path).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), format!("http://{DOMAIN}:{}{path}", edge.addr.port()));

    // Pending in the store, as an order leaves it.
    let db = format!("sqlite://{}", serve.data_dir.path().join("isocloud.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
    let expires_at_ms = (std::time::SystemTime::now() + Duration::from_secs(600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    sqlx::query(
        "INSERT INTO acme_challenges (domain, token, key_authorization, expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
    )
    .bind(DOMAIN)
    .bind(token)
    .bind(format!("{token}.thumbprint"))
    .bind(expires_at_ms)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let response = plain(&edge, DOMAIN, &path).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert_eq!(response.text().await.unwrap(), format!("{token}.thumbprint"));
    // Another host, or another token: the app's.
    let response = plain(&edge, DOMAIN, "/.well-known/acme-challenge/other").await;
    assert_eq!(
        response.text().await.unwrap(),
        format!("http://{DOMAIN}:{}/.well-known/acme-challenge/other", edge.addr.port())
    );
    let response = plain(&edge, "shop.localhost", &path).await;
    assert_eq!(response.text().await.unwrap(), format!("http://shop.localhost:{}{path}", edge.addr.port()));
}

/// A TLS-ALPN-01 challenge the control plane's store holds as pending (as
/// an ACME order leaves it, with its routing change) reaches the edge
/// through the routing feed: a hello offering `acme-tls/1` for the domain
/// gets the challenge certificate and a closed connection; a browser's
/// hello still gets the uploaded certificate and the app; `acme-tls/1` for
/// another name gets nothing.
#[tokio::test]
async fn a_tls_alpn_01_challenge_pending_in_the_store_is_answered_by_the_edges_tls_listener() {
    let ShopBehindEdge { serve, edge, ca, _dns, _work, _runner } = shop_behind_an_edge().await;
    let uploaded = rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap().to_vec();
    let tls = edge.tls.expect("the edge's TLS listener");

    // The probe: nothing pending yet, so `acme-tls/1` for the domain gets
    // no certificate (never the uploaded one), while a browser's hello gets
    // the uploaded certificate and the app over the same listener.
    let refused = probe(tls, DOMAIN, &[ACME_TLS_1]).await.expect_err("no challenge certificate yet");
    assert!(refused.contains("AccessDenied"), "{refused}");
    let browsing = probe(tls, DOMAIN, &[b"http/1.1"]).await.expect("a browser's handshake");
    assert_eq!(browsing.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(browsing.leaf == uploaded && browsing.acme_identifier.is_none(), "{browsing:?}");
    assert!(browsing.after.starts_with("HTTP/1.1 200"), "{browsing:?}");

    // Pending in the store, as `put_tls_alpn_challenge` leaves it: the row
    // and, in the same transaction, a routing change naming the domain
    // (the edge fetches challenges only for domains its routing feed names:
    // the row alone would not reach it).
    let key_authorization = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.thumbprint-of-the-account-key";
    let digest: [u8; 32] = sha2::Sha256::digest(key_authorization.as_bytes()).into();
    let db = format!("sqlite://{}", serve.data_dir.path().join("isocloud.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO acme_challenges (domain, token, key_authorization, expires_at_ms, kind) \
         VALUES (?1, ?2, ?3, ?4, 'tls-alpn-01')",
    )
    .bind(DOMAIN)
    .bind("evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA")
    .bind(key_authorization)
    .bind(now_ms + 600_000)
    .execute(&mut *tx)
    .await
    .unwrap();
    let generation: i64 = sqlx::query_scalar(
        "UPDATE meta SET routing_generation = routing_generation + 1 WHERE id = 1 RETURNING routing_generation",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query("INSERT INTO routing_changes (generation, kind, subject, changed_at_ms) VALUES (?1, 'domain', ?2, ?3)")
        .bind(generation)
        .bind(DOMAIN)
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    conn.close().await.unwrap();

    // Within seconds the ACME server's handshake gets the challenge
    // certificate: the domain its only name, the critical acmeIdentifier a
    // DER OCTET STRING of SHA-256(key authorization), `acme-tls/1` agreed,
    // and the connection closed after the handshake: no HTTP served.
    let started = Instant::now();
    let challenge = loop {
        match probe(tls, DOMAIN, &[ACME_TLS_1]).await {
            Ok(challenge) => break challenge,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(10),
                "no challenge certificate 10 s after the row: {e}; edge:\n{}",
                edge.stderr()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("the tls-alpn-01 challenge answered by the edge {} ms after the row", started.elapsed().as_millis());
    assert_eq!(challenge.alpn.as_deref(), Some(ACME_TLS_1), "{challenge:?}");
    assert_eq!(challenge.names, [format!("DNSName({DOMAIN})")], "{challenge:?}");
    assert_ne!(challenge.leaf, uploaded);
    let (critical, value) = challenge.acme_identifier.clone().expect("the acmeIdentifier extension");
    let mut expected = vec![0x04, 0x20];
    expected.extend_from_slice(&digest);
    assert!(critical, "{challenge:?}");
    assert_eq!(value, expected, "the acmeIdentifier is not SHA-256 of the key authorization");
    assert_eq!(challenge.after, "", "closed after the handshake, no HTTP answer");
    // Offered beside a browser's protocols, `acme-tls/1` still wins: never
    // HTTP over a challenge certificate.
    let mixed = probe(tls, DOMAIN, &[b"h2", ACME_TLS_1, b"http/1.1"]).await.expect("the challenge handshake");
    assert_eq!((mixed.alpn.as_deref(), mixed.after.as_str()), (Some(ACME_TLS_1), ""), "{mixed:?}");

    // A browser's hello still gets the uploaded certificate and the app
    // (HTTP/1.1 here, HTTP/2 through reqwest)…
    let browsing = probe(tls, DOMAIN, &[b"http/1.1"]).await.expect("a browser's handshake");
    assert!(browsing.leaf == uploaded && browsing.acme_identifier.is_none(), "{browsing:?}");
    assert!(browsing.after.starts_with("HTTP/1.1 200"), "{browsing:?}");
    let response =
        https_client(&ca, DOMAIN, tls).get(format!("https://{DOMAIN}:{}/", tls.port())).send().await.unwrap();
    assert_eq!((response.status(), response.version()), (reqwest::StatusCode::OK, reqwest::Version::HTTP_2));
    assert_eq!(response.text().await.unwrap(), format!("https://{DOMAIN}:{}/", tls.port()));
    // …and `acme-tls/1` for a name with nothing pending gets no certificate.
    let other = probe(tls, "shop.localhost", &[ACME_TLS_1]).await.expect_err("no challenge for another name");
    assert!(other.contains("AccessDenied"), "{other}");
}
