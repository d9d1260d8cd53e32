//! Custom domains: adding, attaching, verification by DNS TXT (a real UDP
//! DNS responder) and by HTTP token (a real HTTP server), routing of
//! verified domains only, and certificates served by SNI, each for the one
//! domain it was uploaded for.

use std::net::Ipv4Addr;
use std::sync::Arc;

use rustls::sign::CertifiedKey;

use serde_json::{Value, json};

use crate::backend_tests;
use crate::support::dns::DnsResponder;
use crate::support::{Backend, TestServer, TokenServer};

backend_tests!(
    domains_page_by_name_and_by_project,
    domains_crud,
    verification_by_dns_txt,
    verification_by_http_token,
    unverified_domains_do_not_route,
    certificates,
    a_certificate_serves_only_the_domain_it_was_uploaded_for,
    an_upload_that_is_not_valid_now_is_refused_naming_why
);

async fn server_with_dns(backend: Backend, dns: &DnsResponder, http_port: u16) -> TestServer {
    let addr = dns.addr;
    TestServer::start_with(backend, move |o| {
        o.dns_resolver = Some(addr);
        o.domain_verify_http_port = http_port;
    })
    .await
}

/// Adds `domain` to `project` and verifies it by DNS TXT.
async fn verified(s: &TestServer, dns: &DnsResponder, domain: &str, project: &str) -> Value {
    let created = s.post("/api/v1/domains", json!({"domain": domain, "project": project})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let created = created.json();
    dns.set_txt(
        created["verification"]["txt_name"].as_str().unwrap(),
        created["verification"]["txt_value"].as_str().unwrap(),
    );
    let reply = s.post_empty(&format!("/api/v1/domains/{domain}/verify")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["verified"], true, "{}", reply.text);
    reply.json()
}

/// The same certificate (the tables are rebuilt, so not the same `Arc`).
fn same(a: &Arc<CertifiedKey>, b: &Arc<CertifiedKey>) -> bool {
    a.cert == b.cert
}

fn self_signed(names: &[&str]) -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    (cert.cert.pem(), cert.key_pair.serialize_pem())
}

/// A self-signed certificate for `names`, valid from the start of
/// `from_year` to the start of `to_year`.
fn dated(names: &[&str], from_year: i32, to_year: i32) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params.not_before = rcgen::date_time_ymd(from_year, 1, 1);
    params.not_after = rcgen::date_time_ymd(to_year, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// `GET /domains` pages by name (a platform's domains are many), also
/// filtered to one project, the filter kept in the next page's link.
async fn domains_page_by_name_and_by_project(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("hello").await;
    s.create_project("other").await;
    for (domain, project) in [
        ("e.example.com", "hello"),
        ("a.example.com", "other"),
        ("d.example.com", "hello"),
        ("c.example.com", "other"),
        ("b.example.com", "hello"),
    ] {
        let created = s.post("/api/v1/domains", json!({"domain": domain, "project": project})).await;
        assert_eq!(created.status, 201, "{}", created.text);
    }
    let mut names = Vec::new();
    let mut next = Some("/api/v1/domains?limit=2".to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let reply = s.get(&path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        names.extend(reply.json().as_array().unwrap().iter().map(|d| d["domain"].as_str().unwrap().to_owned()));
        next = reply
            .headers
            .get("link")
            .map(|l| l.to_str().unwrap().trim_start_matches('<').split('>').next().unwrap().to_owned());
        pages += 1;
    }
    assert_eq!(names, ["a.example.com", "b.example.com", "c.example.com", "d.example.com", "e.example.com"]);
    assert_eq!(pages, 3);
    let first = s.get("/api/v1/domains?project=hello&limit=2").await;
    let link = first.headers.get("link").unwrap().to_str().unwrap().to_owned();
    assert!(link.starts_with("</api/v1/domains?project=hello&limit=2&cursor="), "{link}");
    let second = s.get(link.trim_start_matches('<').split('>').next().unwrap()).await;
    let mine: Vec<String> = [first.json(), second.json()]
        .iter()
        .flat_map(|page| {
            page.as_array().unwrap().iter().map(|d| d["domain"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(mine, ["b.example.com", "d.example.com", "e.example.com"]);
    s.get("/api/v1/domains?project=nope").await.assert_error(404, "NOT_FOUND", None);
    s.get("/api/v1/domains?cursor=zzz").await.assert_error(400, "INVALID_FIELD", Some("cursor"));
    s.get("/api/v1/domains?owner=me").await.assert_error(400, "INVALID_FIELD", Some("owner"));
}

async fn domains_crud(backend: Backend) {
    let s = TestServer::start(backend).await;
    s.create_project("hello").await;
    s.create_project("other").await;
    assert_eq!(s.get("/api/v1/domains").await.json(), json!([]));
    let created = s.post("/api/v1/domains", json!({"domain": "www.example.com", "project": "hello"})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let d = created.json();
    assert_eq!(d["domain"], "www.example.com");
    assert_eq!(d["project"], "hello");
    assert_eq!(d["verified"], false);
    assert_eq!(d["verified_at"], Value::Null);
    assert_eq!(d["certificate"], Value::Null);
    let token = d["verification"]["txt_value"].as_str().unwrap().to_owned();
    assert!(token.len() >= 32);
    assert_eq!(d["verification"]["txt_name"], "_isocloud-challenge.www.example.com");
    assert_eq!(d["verification"]["http_url"], format!("http://www.example.com/.well-known/isocloud-challenge/{token}"));
    assert_eq!(d["verification"]["http_body"], token.as_str());
    assert_eq!(s.get("/api/v1/domains/www.example.com").await.json(), d);
    assert_eq!(s.get("/api/v1/domains").await.json(), json!([d]));

    s.post("/api/v1/domains", json!({"domain": "www.example.com", "project": "other"}))
        .await
        .assert_error(409, "CONFLICT", None);
    for bad in
        ["WWW.example.com", "example", "x.localhost", "localhost", "a..b", "*.example.com", "10.0.0.1", "a_b.com"]
    {
        s.post("/api/v1/domains", json!({"domain": bad, "project": "hello"})).await.assert_error(
            400,
            "INVALID_FIELD",
            Some("domain"),
        );
    }
    s.post("/api/v1/domains", json!({"domain": "shop.example.com", "project": "nope"})).await.assert_error(
        404,
        "NOT_FOUND",
        None,
    );
    let unattached = s.post("/api/v1/domains", json!({"domain": "shop.example.com"})).await;
    assert_eq!(unattached.status, 201);
    assert_eq!(unattached.json()["project"], Value::Null);

    let moved = s.patch("/api/v1/domains/www.example.com", json!({"project": "other"})).await;
    assert_eq!(moved.status, 200, "{}", moved.text);
    assert_eq!(moved.json()["project"], "other");
    let detached = s.patch("/api/v1/domains/www.example.com", json!({"project": null})).await;
    assert_eq!(detached.json()["project"], Value::Null);
    s.patch("/api/v1/domains/www.example.com", json!({"project": 5})).await.assert_error(
        400,
        "INVALID_FIELD",
        Some("project"),
    );
    s.patch("/api/v1/domains/www.example.com", json!({})).await.assert_error(400, "INVALID_REQUEST", None);
    s.patch("/api/v1/domains/www.example.com", json!({"project": "nope"})).await.assert_error(404, "NOT_FOUND", None);
    s.patch("/api/v1/domains/nope.example.com", json!({"project": null})).await.assert_error(404, "NOT_FOUND", None);
    s.post_empty("/api/v1/domains/nope.example.com/verify").await.assert_error(404, "NOT_FOUND", None);

    assert_eq!(s.delete("/api/v1/domains/www.example.com").await.status, 204);
    s.delete("/api/v1/domains/www.example.com").await.assert_error(404, "NOT_FOUND", None);
    assert_eq!(s.get("/api/v1/domains").await.json().as_array().unwrap().len(), 1);
}

async fn verification_by_dns_txt(backend: Backend) {
    let dns = DnsResponder::start().await;
    let s = server_with_dns(backend, &dns, 9).await;
    s.create_project("hello").await;
    let prod = s.deploy("hello", &[("main.ts", "// prod")], "main.ts", true).await;
    let created = s.post("/api/v1/domains", json!({"domain": "dns.example.com", "project": "hello"})).await.json();
    // Not there yet: not verified, 200 all the same.
    let attempt = s.post_empty("/api/v1/domains/dns.example.com/verify").await;
    assert_eq!(attempt.status, 200);
    assert_eq!(attempt.json()["verified"], false);
    assert!(s.cp.resolve_host("dns.example.com").is_none());
    // A wrong value does not count either.
    dns.set_txt("_isocloud-challenge.dns.example.com", "wrong");
    assert_eq!(s.post_empty("/api/v1/domains/dns.example.com/verify").await.json()["verified"], false);

    dns.set_txt("_isocloud-challenge.dns.example.com", created["verification"]["txt_value"].as_str().unwrap());
    let done = s.post_empty("/api/v1/domains/dns.example.com/verify").await.json();
    assert_eq!(done["verified"], true);
    assert!(done["verified_at"].is_string());
    let routed = s.cp.resolve_host("dns.example.com").expect("a verified domain routes");
    assert_eq!(routed.deployment_id, prod["id"].as_str().unwrap());
    assert!(!routed.has_certificate);
    // Verifying again is harmless.
    assert_eq!(s.post_empty("/api/v1/domains/dns.example.com/verify").await.json()["verified_at"], done["verified_at"]);
}

async fn verification_by_http_token(backend: Backend) {
    let dns = DnsResponder::start().await;
    let http = TokenServer::start().await;
    let s = server_with_dns(backend, &dns, http.port).await;
    s.create_project("hello").await;
    let prod = s.deploy("hello", &[("main.ts", "// prod")], "main.ts", true).await;
    let created = s.post("/api/v1/domains", json!({"domain": "http.example.com", "project": "hello"})).await.json();
    let token = created["verification"]["http_body"].as_str().unwrap().to_owned();
    assert_eq!(
        created["verification"]["http_url"],
        format!("http://http.example.com:{}/.well-known/isocloud-challenge/{token}", http.port)
    );
    // The name resolves (through the configured nameserver) to our server.
    dns.set_a("http.example.com", Ipv4Addr::LOCALHOST);
    assert_eq!(s.post_empty("/api/v1/domains/http.example.com/verify").await.json()["verified"], false);
    http.serve(&format!("/.well-known/isocloud-challenge/{token}"), "not the token");
    assert_eq!(s.post_empty("/api/v1/domains/http.example.com/verify").await.json()["verified"], false);
    http.serve(&format!("/.well-known/isocloud-challenge/{token}"), &format!("{token}\n"));
    let done = s.post_empty("/api/v1/domains/http.example.com/verify").await.json();
    assert_eq!(done["verified"], true, "{done}");
    assert_eq!(s.cp.resolve_host("http.example.com").unwrap().deployment_id, prod["id"].as_str().unwrap());
}

async fn unverified_domains_do_not_route(backend: Backend) {
    let dns = DnsResponder::start().await;
    let s = server_with_dns(backend, &dns, 9).await;
    s.create_project("hello").await;
    s.create_project("empty").await;
    let prod = s.deploy("hello", &[("main.ts", "// prod")], "main.ts", true).await;
    let prod_id = prod["id"].as_str().unwrap().to_owned();
    s.post("/api/v1/domains", json!({"domain": "unverified.example.com", "project": "hello"})).await;
    assert!(s.cp.resolve_host("unverified.example.com").is_none());

    verified(&s, &dns, "shop.example.com", "hello").await;
    assert_eq!(s.cp.resolve_host("shop.example.com").unwrap().deployment_id, prod_id);
    // Attached to a project without production: nothing to serve.
    s.patch("/api/v1/domains/shop.example.com", json!({"project": "empty"})).await;
    assert!(s.cp.resolve_host("shop.example.com").is_none());
    s.patch("/api/v1/domains/shop.example.com", json!({"project": "hello"})).await;
    assert_eq!(s.cp.resolve_host("shop.example.com").unwrap().deployment_id, prod_id);
    s.patch("/api/v1/domains/shop.example.com", json!({"project": null})).await;
    assert!(s.cp.resolve_host("shop.example.com").is_none());
    s.patch("/api/v1/domains/shop.example.com", json!({"project": "hello"})).await;
    // Production moves, the domain follows.
    let next = s.deploy("hello", &[("main.ts", "// next")], "main.ts", true).await;
    assert_eq!(s.cp.resolve_host("shop.example.com").unwrap().deployment_id, next["id"].as_str().unwrap());
    s.delete("/api/v1/domains/shop.example.com").await;
    assert!(s.cp.resolve_host("shop.example.com").is_none());
}

async fn certificates(backend: Backend) {
    let dns = DnsResponder::start().await;
    let s = server_with_dns(backend, &dns, 9).await;
    s.create_project("hello").await;
    s.deploy("hello", &[("main.ts", "// prod")], "main.ts", true).await;
    s.post("/api/v1/domains", json!({"domain": "pending.example.com", "project": "hello"})).await;
    verified(&s, &dns, "www.example.com", "hello").await;
    verified(&s, &dns, "api.example.com", "hello").await;

    let (cert, key) = self_signed(&["www.example.com"]);
    let (_, other_key) = self_signed(&["www.example.com"]);
    let (shop_cert, shop_key) = self_signed(&["shop.example.org"]);
    let put = async |domain: &str, cert: &str, key: &str| {
        s.put(&format!("/api/v1/domains/{domain}/certificate"), json!({"cert_pem": cert, "key_pem": key})).await
    };
    put("www.example.com", &cert, &other_key).await.assert_error(400, "INVALID_FIELD", Some("key_pem"));
    put("www.example.com", &shop_cert, &shop_key).await.assert_error(400, "INVALID_FIELD", Some("cert_pem"));
    put("www.example.com", "garbage", &key).await.assert_error(400, "INVALID_FIELD", Some("cert_pem"));
    put("www.example.com", &cert, "garbage").await.assert_error(400, "INVALID_FIELD", Some("key_pem"));
    put("nope.example.com", &cert, &key).await.assert_error(404, "NOT_FOUND", None);
    assert!(s.cp.certificate_for("www.example.com").is_none());
    assert!(!s.cp.resolve_host("www.example.com").unwrap().has_certificate);

    let stored = put("www.example.com", &cert, &key).await;
    assert_eq!(stored.status, 200, "{}", stored.text);
    assert_eq!(stored.json()["certificate"]["names"], json!(["www.example.com"]));
    assert!(stored.json()["certificate"]["not_after"].is_string());
    // The PEMs never come back.
    for path in ["/api/v1/domains/www.example.com", "/api/v1/domains"] {
        let text = s.get(path).await.text;
        assert!(!text.contains("BEGIN") && !text.contains("PRIVATE"), "{path}: {text}");
    }
    assert!(!stored.text.contains("BEGIN"));
    let served = s.cp.certificate_for("www.example.com").expect("served by SNI");
    assert!(served.keys_match().is_ok());
    assert!(s.cp.certificate_for("WWW.EXAMPLE.COM").is_some());
    assert!(s.cp.resolve_host("www.example.com").unwrap().has_certificate);
    assert!(s.cp.certificate_for("api.example.com").is_none());

    // A wildcard certificate serves the one domain it was uploaded for, not
    // its other names.
    let (wild_cert, wild_key) = self_signed(&["*.example.com"]);
    assert_eq!(put("api.example.com", &wild_cert, &wild_key).await.status, 200);
    let wild = s.cp.certificate_for("api.example.com").unwrap();
    assert!(s.cp.certificate_for("other.example.com").is_none());
    assert!(!same(&wild, &s.cp.certificate_for("www.example.com").unwrap()));
    assert!(s.cp.certificate_for("example.com").is_none());
    assert!(s.cp.certificate_for("a.b.example.com").is_none());
    // Base-domain hosts never get a custom domain's certificate.
    assert!(!s.cp.resolve_host("hello.localhost").unwrap().has_certificate);

    // Stored for an unverified domain, but not served, by its own
    // certificate nor by the wildcard.
    let (pending_cert, pending_key) = self_signed(&["pending.example.com"]);
    assert_eq!(put("pending.example.com", &pending_cert, &pending_key).await.status, 200);
    assert!(s.cp.certificate_for("pending.example.com").is_none());

    let removed = s.delete("/api/v1/domains/www.example.com/certificate").await;
    assert_eq!(removed.status, 200, "{}", removed.text);
    assert_eq!(removed.json()["certificate"], Value::Null);
    s.delete("/api/v1/domains/www.example.com/certificate").await.assert_error(404, "NOT_FOUND", None);
    // The wildcard of api.example.com does not stand in for it.
    assert!(s.cp.certificate_for("www.example.com").is_none());
    assert!(!s.cp.resolve_host("www.example.com").unwrap().has_certificate);
    assert!(same(&s.cp.certificate_for("api.example.com").unwrap(), &wild));
    s.delete("/api/v1/domains/api.example.com").await;
    assert!(s.cp.certificate_for("api.example.com").is_none());
}

/// Project A's owner uploads, for A's verified domain, a certificate whose
/// names also cover project B's verified domains (by name and by
/// wildcard). It serves A's domain, and nothing of B's: no TLS, no redirect
/// to HTTPS.
async fn a_certificate_serves_only_the_domain_it_was_uploaded_for(backend: Backend) {
    let dns = DnsResponder::start().await;
    let s = server_with_dns(backend, &dns, 9).await;
    for project in ["a", "b"] {
        s.create_project(project).await;
        s.deploy(project, &[("main.ts", &format!("// {project}"))], "main.ts", true).await;
    }
    verified(&s, &dns, "x.a-corp.com", "a").await;
    verified(&s, &dns, "y.a-corp.com", "b").await;
    verified(&s, &dns, "shop.b-corp.com", "b").await;
    let put = async |domain: &str, cert: &str, key: &str| {
        s.put(&format!("/api/v1/domains/{domain}/certificate"), json!({"cert_pem": cert, "key_pem": key})).await
    };

    // It covers A's domain, so the upload is taken (a certificate may name
    // more than one domain: www and the apex, say).
    let (cert, key) = self_signed(&["x.a-corp.com", "shop.b-corp.com", "*.a-corp.com"]);
    let stored = put("x.a-corp.com", &cert, &key).await;
    assert_eq!(stored.status, 200, "{}", stored.text);
    // Probe: A's domain is served with it, and HTTP to it goes to HTTPS.
    let served = s.cp.certificate_for("x.a-corp.com").expect("A's domain by SNI");
    assert!(served.keys_match().is_ok());
    assert!(s.cp.resolve_host("x.a-corp.com").unwrap().has_certificate);
    // B's domains, named exactly and by the wildcard: nothing.
    for b_domain in ["shop.b-corp.com", "y.a-corp.com"] {
        assert!(s.cp.certificate_for(b_domain).is_none(), "{b_domain}");
        let routed = s.cp.resolve_host(b_domain).expect("B's domain still routes to B");
        assert!(!routed.has_certificate, "{b_domain} must not be redirected to HTTPS");
    }

    // B's own certificate serves B's domain, and only it.
    let (b_cert, b_key) = self_signed(&["shop.b-corp.com"]);
    assert_eq!(put("shop.b-corp.com", &b_cert, &b_key).await.status, 200);
    let b_served = s.cp.certificate_for("shop.b-corp.com").unwrap();
    assert!(!same(&b_served, &served));
    assert!(same(&s.cp.certificate_for("x.a-corp.com").unwrap(), &served));
    assert!(s.cp.certificate_for("y.a-corp.com").is_none());
}

async fn an_upload_that_is_not_valid_now_is_refused_naming_why(backend: Backend) {
    let dns = DnsResponder::start().await;
    let s = server_with_dns(backend, &dns, 9).await;
    s.create_project("hello").await;
    verified(&s, &dns, "www.example.com", "hello").await;
    let put = async |cert: &str, key: &str| {
        s.put("/api/v1/domains/www.example.com/certificate", json!({"cert_pem": cert, "key_pem": key})).await
    };
    let refused = |reply: crate::support::Reply, field: &str, says: &str| {
        reply.assert_error(400, "INVALID_FIELD", Some(field));
        assert!(reply.message().contains(says), "{says}: {}", reply.text);
    };
    // Probe: a pair valid now, for this domain, is taken.
    let (cert, key) = dated(&["www.example.com"], 2000, 3000);
    assert_eq!(put(&cert, &key).await.status, 200);

    let (expired, expired_key) = dated(&["www.example.com"], 2000, 2001);
    refused(put(&expired, &expired_key).await, "cert_pem", "expired at 2001-01-01");
    let (future, future_key) = dated(&["www.example.com"], 2999, 3000);
    refused(put(&future, &future_key).await, "cert_pem", "is not valid before 2999-01-01");
    let (other, other_key) = dated(&["shop.example.com"], 2000, 3000);
    refused(put(&other, &other_key).await, "cert_pem", "does not cover www.example.com");
    let (wild, wild_key) = dated(&["*.www.example.com", "example.com"], 2000, 3000);
    refused(put(&wild, &wild_key).await, "cert_pem", "does not cover www.example.com");
    let (_, foreign_key) = dated(&["www.example.com"], 2000, 3000);
    refused(put(&cert, &foreign_key).await, "key_pem", "does not match");
    // Still the first certificate.
    let shown = s.get("/api/v1/domains/www.example.com").await.json();
    assert!(shown["certificate"]["not_after"].as_str().unwrap().starts_with("3000-01-01"), "{shown}");
}
