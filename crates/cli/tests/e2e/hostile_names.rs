//! Names that would mean two things, against the real `isocloud serve`: a
//! project named like another project's deployment host (issue #21 row 2)
//! and a certificate uploaded for one project's domain that also names
//! another project's (row 3). Each test first shows the probe working (the
//! deployment URL serves its project; A's certificate serves A's domain by
//! SNI), then that the attack gets nothing.

// The control plane's own test responder; these tests set TXT records only
// (`control_plane` includes it too, privately).
#[path = "../../../controlplane/tests/api/support/dns.rs"]
#[allow(dead_code, clippy::duplicate_mod, reason = "the control plane's tests use more of it")]
mod dns;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use sqlx::Connection;

use crate::support::ControlPlaneServe;

/// Deploys, as production of `project`, an app that answers its project's
/// name; returns the deployment id.
fn deploy_naming(serve: &ControlPlaneServe, work: &Path, project: &str) -> String {
    let app = work.join(format!("app-{project}"));
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("main.ts"), format!("Deno.serve(() => new Response(\"{project}\"));\n")).unwrap();
    let config = work.join("config");
    let control = serve.control_url();
    let token = serve.admin_token();
    let out = crate::support::isocloud_cli(
        &control,
        &token,
        &config,
        &["deploy", "--project", project, "--prod", app.to_str().unwrap()],
    );
    // The last line is the deployment's URL, `http://<project>-<id>.localhost:<port>`.
    let url = out.lines().last().expect("deploy printed a URL").trim();
    let host = url.strip_prefix("http://").unwrap().split(':').next().unwrap();
    host.strip_prefix(&format!("{project}-")).unwrap().strip_suffix(".localhost").unwrap().to_owned()
}

/// GET `/` through the public listener with `Host: host`, no redirects
/// followed: status and body.
async fn get(serve: &ControlPlaneServe, host: &str) -> (u16, String) {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let response = client.get(format!("{}/", serve.public_url())).header("host", host).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn a_project_name_never_takes_a_deployment_host() {
    let serve = ControlPlaneServe::start(&[]);
    let work = tempfile::tempdir().unwrap();
    assert_eq!(serve.api(reqwest::Method::POST, "/projects", Some(json!({"name": "alpha"}))).await.0, 201);
    let id = deploy_naming(&serve, work.path(), "alpha");
    let taken = format!("alpha-{id}");
    let host = format!("{taken}.localhost");
    // Probe: alpha's immutable deployment URL serves alpha.
    assert_eq!(get(&serve, &host).await, (200, "alpha".to_owned()));

    let (status, refused) = serve.api(reqwest::Method::POST, "/projects", Some(json!({"name": taken}))).await;
    assert_eq!((status, refused["error"]["field"].as_str()), (400, Some("name")), "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("shape of a deployment's host"), "{message}");

    assert_eq!(serve.api(reqwest::Method::POST, "/projects", Some(json!({"name": "beta"}))).await.0, 201);
    let beta_id = deploy_naming(&serve, work.path(), "beta");
    let (status, refused) = serve.api(reqwest::Method::PATCH, "/projects/beta", Some(json!({"name": taken}))).await;
    assert_eq!((status, refused["error"]["field"].as_str()), (400, Some("name")), "{refused}");
    assert_eq!(get(&serve, &host).await, (200, "alpha".to_owned()), "the deployment URL still serves alpha");
    assert_eq!(get(&serve, "beta.localhost").await, (200, "beta".to_owned()));

    // A store from before the rule, where beta got that name anyway: the
    // start reports it naming both, and the deployment keeps its URL.
    let ControlPlaneServe { mut runner, data_dir, .. } = serve;
    assert!(runner.terminate(Duration::from_secs(15)).success());
    let db = format!("sqlite://{}", data_dir.path().join("isocloud.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
    let updated = sqlx::query("UPDATE projects SET name = ?1 WHERE name = 'beta'").bind(&taken).execute(&mut conn);
    assert_eq!(updated.await.unwrap().rows_affected(), 1);
    conn.close().await.unwrap();
    let serve = ControlPlaneServe::start_in(data_dir, &[]);
    serve.runner.wait_for_log(&format!(
        "host {host} is both project \"{taken}\" and deployment {id} of project \"alpha\"; the deployment is served"
    ));
    assert_eq!(get(&serve, &host).await, (200, "alpha".to_owned()));
    assert_eq!(get(&serve, &format!("{taken}-{beta_id}.localhost")).await, (200, "beta".to_owned()));
}

fn self_signed(names: &[&str]) -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    (cert.cert.pem(), cert.key_pair.serialize_pem())
}

/// HTTPS to `https://<name>:<port>/` at the TLS listener, trusting only
/// `cert_pem`: the body, or the error (no handshake) as a string.
async fn https_get(cert_pem: &str, name: &str, tls: SocketAddr) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve(name, tls)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let response = client.get(format!("https://{name}:{}/", tls.port())).send().await.map_err(|e| format!("{e:?}"))?;
    Ok(response.text().await.unwrap())
}

/// Adds `domain` to `project` and verifies it by DNS TXT.
async fn verified(serve: &ControlPlaneServe, dns: &dns::DnsResponder, domain: &str, project: &str) {
    let (status, created) =
        serve.api(reqwest::Method::POST, "/domains", Some(json!({"domain": domain, "project": project}))).await;
    assert_eq!(status, 201, "{created}");
    dns.set_txt(
        created["verification"]["txt_name"].as_str().unwrap(),
        created["verification"]["txt_value"].as_str().unwrap(),
    );
    let (_, verified) = serve.api(reqwest::Method::POST, &format!("/domains/{domain}/verify"), None).await;
    assert_eq!(verified["verified"], true, "{verified}");
}

#[tokio::test]
async fn a_certificate_serves_only_the_domain_it_was_uploaded_for() {
    let dns = dns::DnsResponder::start().await;
    let dns_addr = dns.addr.to_string();
    let serve = ControlPlaneServe::start(&["--tls-listen", "127.0.0.1:0", "--dns-resolver", &dns_addr]);
    let tls = serve.tls.expect("the TLS listener");
    let work = tempfile::tempdir().unwrap();
    for project in ["a", "b"] {
        assert_eq!(serve.api(reqwest::Method::POST, "/projects", Some(json!({"name": project}))).await.0, 201);
        deploy_naming(&serve, work.path(), project);
    }
    verified(&serve, &dns, "www.a.test", "a").await;
    verified(&serve, &dns, "www.b.test", "b").await;
    verified(&serve, &dns, "y.a.test", "b").await;

    // A's certificate names B's domains too (exactly, and by wildcard); it
    // covers A's, so the upload is taken.
    let (a_cert, a_key) = self_signed(&["www.a.test", "www.b.test", "*.a.test"]);
    let (status, answer) = serve
        .api(
            reqwest::Method::PUT,
            "/domains/www.a.test/certificate",
            Some(json!({"cert_pem": a_cert, "key_pem": a_key})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    // Probe: A's domain over TLS by SNI with A's certificate; its plain
    // HTTP goes to HTTPS.
    assert_eq!(https_get(&a_cert, "www.a.test", tls).await.as_deref(), Ok("a"));
    assert_eq!(get(&serve, "www.a.test").await.0, 308);

    // B's domains: a client that would accept A's certificate gets no
    // handshake, and plain HTTP is served, not redirected into it.
    for b_domain in ["www.b.test", "y.a.test"] {
        let answer = https_get(&a_cert, b_domain, tls).await;
        assert!(answer.is_err(), "{b_domain} was answered with A's certificate: {answer:?}");
        assert_eq!(get(&serve, b_domain).await, (200, "b".to_owned()), "{b_domain}");
    }

    // B's own certificate serves B's domain; A's is not what it gets.
    let (b_cert, b_key) = self_signed(&["www.b.test"]);
    let (status, answer) = serve
        .api(
            reqwest::Method::PUT,
            "/domains/www.b.test/certificate",
            Some(json!({"cert_pem": b_cert, "key_pem": b_key})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(https_get(&b_cert, "www.b.test", tls).await.as_deref(), Ok("b"));
    assert!(https_get(&a_cert, "www.b.test", tls).await.is_err());
    assert!(https_get(&a_cert, "y.a.test", tls).await.is_err());
}
