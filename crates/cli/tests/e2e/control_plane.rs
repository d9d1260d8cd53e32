//! The built-in control plane end to end: the CLI against the real
//! `isocloud serve`, through the runner to real isolates. Deploy, hit the
//! deployment URL, promote, hit the production URL, roll back, change an env
//! var and see it in a new deployment (and not in the old one), see logs and
//! usage arrive, restart and lose nothing; a custom domain verified by a DNS
//! TXT record, with a certificate, reached over HTTPS by SNI (HTTP/2 by ALPN)
//! and redirected from HTTP.

// The control plane's own test responder; this test sets TXT records only.
#[path = "../../../controlplane/tests/api/support/dns.rs"]
#[allow(dead_code, reason = "shared with the control plane's tests, which use more of it")]
mod dns;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::ControlPlaneServe;
use serde_json::json;

/// Runs the `isocloud` client against `serve` with its own config dir;
/// returns stdout, panicking with both streams on failure.
fn cli(serve: &ControlPlaneServe, config: &Path, args: &[&str]) -> String {
    crate::support::isocloud_cli(&serve.control_url(), &serve.admin_token(), config, args)
}

/// Runs the client expecting it to fail: its stderr.
fn cli_fails(serve: &ControlPlaneServe, config: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_isocloud"))
        .args(args)
        .env("ISOCLOUD_CONFIG_DIR", config)
        .env("ISOCLOUD_URL", serve.control_url())
        .env("ISOCLOUD_TOKEN", serve.admin_token())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the isocloud client");
    assert!(!output.status.success(), "isocloud {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The app of version `v`: answers its version, the GREETING env var and the
/// URL it was asked for; logs each request.
fn write_app(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir.join("static")).unwrap();
    std::fs::write(
        dir.join("main.ts"),
        format!(
            "Deno.serve((req) => {{\n  console.log(`{version} served ${{new URL(req.url).pathname}}`);\n  \
             return new Response(`{version} ${{Deno.env.get(\"GREETING\") ?? \"none\"}} ${{req.url}}`);\n}});\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("static/about.txt"), format!("about {version}")).unwrap();
}

/// The deployment URL is the last line `deploy` prints.
fn deployment_host(deploy_output: &str) -> String {
    let url = deploy_output.lines().last().expect("deploy printed a URL").trim();
    url.strip_prefix("http://").unwrap().split(':').next().unwrap().to_owned()
}

/// GET through the runner's public listener with `Host: <host>:<port>`, as
/// a browser sends it.
async fn get(serve: &ControlPlaneServe, host: &str, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", serve.public_url()))
        .header("host", format!("{host}:{}", serve.runner.addr.port()))
        .send()
        .await
        .expect("request to the runner");
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn eventually(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn deploy_promote_roll_back_and_restart_through_the_runner() {
    let serve = ControlPlaneServe::start(&["--usage-interval-s", "1", "--cpu-limit-ms", "5000"]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    let port = serve.runner.addr.port();

    cli(&serve, &config, &["projects", "create", "shop"]);
    cli(&serve, &config, &["env", "set", "GREETING", "hello", "--project", "shop"]);
    let app = work.path().join("app");
    write_app(&app, "v1");
    let v1 = deployment_host(&cli(&serve, &config, &["deploy", "--project", "shop", "--prod", app.to_str().unwrap()]));
    assert!(v1.starts_with("shop-") && v1.ends_with(".localhost"), "{v1}");

    let (status, body) = get(&serve, "shop.localhost", "/first").await;
    assert_eq!(status, 200);
    assert_eq!(body, format!("v1 hello http://shop.localhost:{port}/first"), "production serves v1");
    assert_eq!(get(&serve, &v1, "/").await.1, format!("v1 hello http://{v1}:{port}/"));

    write_app(&app, "v2");
    let v2 = deployment_host(&cli(&serve, &config, &["deploy", "--project", "shop", app.to_str().unwrap()]));
    assert_eq!(get(&serve, &v2, "/").await.1, format!("v2 hello http://{v2}:{port}/"), "its own URL at once");
    assert!(get(&serve, "shop.localhost", "/").await.1.starts_with("v1 "), "not production until promoted");

    let v2_id = v2.strip_prefix("shop-").unwrap().strip_suffix(".localhost").unwrap();
    cli(&serve, &config, &["promote", "--project", "shop", v2_id]);
    assert!(get(&serve, "shop.localhost", "/").await.1.starts_with("v2 "), "promoted");
    cli(&serve, &config, &["rollback", "--project", "shop"]);
    assert!(get(&serve, "shop.localhost", "/").await.1.starts_with("v1 "), "rolled back");

    // An env var change reaches the next deployment only: deployments are
    // immutable.
    cli(&serve, &config, &["env", "set", "GREETING", "bye", "--project", "shop"]);
    write_app(&app, "v3");
    let v3 = deployment_host(&cli(&serve, &config, &["deploy", "--project", "shop", app.to_str().unwrap()]));
    assert!(get(&serve, &v3, "/").await.1.starts_with("v3 bye "));
    assert!(get(&serve, &v1, "/").await.1.starts_with("v1 hello "));
    assert_eq!(get(&serve, "nope.localhost", "/").await.0, 404);

    // Logs and usage arrive from the runner's activity reports.
    eventually("the console line in `isocloud logs`", Duration::from_secs(20), async || {
        cli(&serve, &config, &["logs", "--project", "shop"]).contains("v1 served /first")
    })
    .await;
    eventually("usage with the requests", Duration::from_secs(20), async || {
        let (_, usage) = serve.api(reqwest::Method::GET, "/projects/shop/usage", None).await;
        let requests: u64 = usage.as_array().into_iter().flatten().map(|u| u["requests"].as_u64().unwrap_or(0)).sum();
        requests >= 6
    })
    .await;

    // A restart on the same data dir loses nothing.
    let ControlPlaneServe { mut runner, data_dir, .. } = serve;
    assert!(runner.terminate(Duration::from_secs(15)).success());
    let serve = ControlPlaneServe::start_in(data_dir, &["--cpu-limit-ms", "5000"]);
    let port = serve.runner.addr.port();
    assert_eq!(get(&serve, "shop.localhost", "/again").await.1, format!("v1 hello http://shop.localhost:{port}/again"));
    assert!(get(&serve, &v3, "/").await.1.starts_with("v3 bye "));
    let (_, deployments) = serve.api(reqwest::Method::GET, "/projects/shop/deployments", None).await;
    assert_eq!(deployments.as_array().map(Vec::len), Some(3), "{deployments}");
    let listed = cli(&serve, &config, &["logs", "--project", "shop"]);
    assert!(listed.contains("v1 served /first"), "logs survive the restart: {listed}");
}

fn self_signed(names: &[&str]) -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    (cert.cert.pem(), cert.key_pair.serialize_pem())
}

fn https_client(cert_pem: &str, name: &str, tls: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve(name, tls)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_custom_domain_with_a_certificate_is_served_over_https_by_sni() {
    let dns = dns::DnsResponder::start().await;
    let dns_addr = dns.addr.to_string();
    let serve = ControlPlaneServe::start(&["--tls-listen", "127.0.0.1:0", "--dns-resolver", &dns_addr]);
    let tls = serve.tls.expect("the TLS listener");
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    cli(&serve, &config, &["projects", "create", "shop"]);
    let app = work.path().join("app");
    write_app(&app, "v1");
    cli(&serve, &config, &["deploy", "--project", "shop", "--prod", app.to_str().unwrap()]);

    let (status, domain) = serve
        .api(reqwest::Method::POST, "/domains", Some(json!({ "domain": "www.shop.test", "project": "shop" })))
        .await;
    assert_eq!(status, 201, "{domain}");
    assert_eq!(get(&serve, "www.shop.test", "/").await.0, 404, "an unverified domain does not route");
    dns.set_txt(
        domain["verification"]["txt_name"].as_str().unwrap(),
        domain["verification"]["txt_value"].as_str().unwrap(),
    );
    let (_, verified) = serve.api(reqwest::Method::POST, "/domains/www.shop.test/verify", None).await;
    assert_eq!(verified["verified"], true, "{verified}");
    let (status, body) = get(&serve, "www.shop.test", "/plain").await;
    assert_eq!((status, body.starts_with("v1 none http://www.shop.test:")), (200, true), "{body}");

    let (cert_pem, key_pem) = self_signed(&["www.shop.test"]);
    let (status, answer) = serve
        .api(
            reqwest::Method::PUT,
            "/domains/www.shop.test/certificate",
            Some(json!({ "cert_pem": cert_pem, "key_pem": key_pem })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");

    // HTTPS by SNI, HTTP/2 by ALPN; the isolate sees the https URL.
    let client = https_client(&cert_pem, "www.shop.test", tls);
    let response = client.get(format!("https://www.shop.test:{}/secure?x=1", tls.port())).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.unwrap(), format!("v1 none https://www.shop.test:{}/secure?x=1", tls.port()));

    // Plain HTTP to a host with a certificate is sent to HTTPS.
    let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let response =
        plain.get(format!("{}/path?q=1", serve.public_url())).header("host", "www.shop.test").send().await.unwrap();
    assert_eq!(response.status(), 308);
    assert_eq!(
        response.headers()["location"].to_str().unwrap(),
        format!("https://www.shop.test:{}/path?q=1", tls.port())
    );

    // A name without a certificate gets no handshake (never another
    // domain's certificate).
    let other = https_client(&cert_pem, "shop.localhost", tls);
    assert!(other.get(format!("https://shop.localhost:{}/", tls.port())).send().await.is_err());
}

#[tokio::test]
async fn an_eszip_built_by_the_deno_toolchain_deploys_and_serves() {
    let serve = ControlPlaneServe::start(&["--cpu-limit-ms", "5000"]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("greet.ts"),
        "export const greet = (who: string): string => `hello ${who} from an eszip`;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("main.ts"),
        "import { greet } from \"./greet.ts\";\nDeno.serve(() => new Response(greet(\"isocloud\")));\n",
    )
    .unwrap();
    let archive = work.path().join("app.eszip");
    std::fs::write(&archive, crate::support::build_eszip(&src, "main.ts", None)).unwrap();

    cli(&serve, &config, &["projects", "create", "packed"]);
    let out = cli(
        &serve,
        &config,
        &["deploy", "--project", "packed", "--prod", "--eszip", archive.to_str().unwrap(), "--entrypoint", "main.ts"],
    );
    let host = deployment_host(&out);
    assert_eq!(get(&serve, &host, "/").await, (200, "hello isocloud from an eszip".to_owned()));
    assert_eq!(get(&serve, "packed.localhost", "/").await.1, "hello isocloud from an eszip");
}

/// Visits the runner answered for a deployment that never booted are its
/// requests and errors too: its usage does not read 0 after failed visits.
#[tokio::test]
async fn a_deployment_whose_boot_fails_counts_its_visits_as_requests_and_errors() {
    let serve = ControlPlaneServe::start(&["--usage-interval-s", "1"]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    cli(&serve, &config, &["projects", "create", "broken"]);
    let app = work.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    // Builds (the syntax is fine), then throws as it starts.
    std::fs::write(
        app.join("main.ts"),
        "throw new Error(\"fails at start\");\nDeno.serve(() => new Response(\"never\"));\n",
    )
    .unwrap();
    cli(&serve, &config, &["deploy", "--project", "broken", "--prod", app.to_str().unwrap()]);

    const VISITS: u64 = 5;
    for _ in 0..VISITS {
        let (status, body) = get(&serve, "broken.localhost", "/").await;
        assert!(status >= 500, "a boot that fails is the runner's 5xx: {status} {body}");
    }
    let totals = async || {
        let (_, usage) = serve.api(reqwest::Method::GET, "/projects/broken/usage", None).await;
        let sum = |field: &str| -> u64 {
            usage.as_array().into_iter().flatten().map(|u| u[field].as_u64().unwrap_or(0)).sum()
        };
        (sum("requests"), sum("errors"))
    };
    eventually("the failed visits in the usage", Duration::from_secs(20), async || {
        let (requests, errors) = totals().await;
        requests >= VISITS && errors >= VISITS
    })
    .await;
    assert_eq!(totals().await, (VISITS, VISITS), "each visit counted once");
    // The runner's answers are 5xx in the status classes, and timed.
    let (_, usage) = serve.api(reqwest::Method::GET, "/projects/broken/usage", None).await;
    let records = usage.as_array().unwrap();
    let sum = |f: &dyn Fn(&serde_json::Value) -> u64| records.iter().map(f).sum::<u64>();
    assert_eq!(sum(&|u| u["status_5xx"].as_u64().unwrap()), VISITS, "{usage}");
    assert_eq!(sum(&|u| u["status_2xx"].as_u64().unwrap() + u["status_4xx"].as_u64().unwrap()), 0, "{usage}");
    let timed = sum(&|u| u["latency_counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum());
    assert_eq!(timed, VISITS, "{usage}");
}

/// Real requests to a real deployment show up in the analytics as what
/// they were answered with, and how long they took: 200s, the tenant's
/// 404s and 500s as their status classes, a slow path in the p99.
#[tokio::test]
async fn analytics_count_status_classes_and_latency_of_real_requests() {
    let serve = ControlPlaneServe::start(&["--usage-interval-s", "1"]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    cli(&serve, &config, &["projects", "create", "timed"]);
    let app = work.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    const SLOW_MS: u64 = 600;
    std::fs::write(
        app.join("main.ts"),
        format!(
            "Deno.serve(async (req) => {{\n  const path = new URL(req.url).pathname;\n  \
             if (path === \"/missing\") return new Response(\"no such page\", {{ status: 404 }});\n  \
             if (path === \"/boom\") return new Response(\"it broke\", {{ status: 500 }});\n  \
             if (path === \"/slow\") await new Promise((r) => setTimeout(r, {SLOW_MS}));\n  \
             return new Response(\"ok \" + path);\n}});\n"
        ),
    )
    .unwrap();
    cli(&serve, &config, &["deploy", "--project", "timed", "--prod", app.to_str().unwrap()]);

    let mut expected = [0u64; 5];
    for (path, times, status) in [("/", 20, 200), ("/missing", 5, 404), ("/boom", 3, 500), ("/slow", 2, 200)] {
        for _ in 0..times {
            let (got, body) = get(&serve, "timed.localhost", path).await;
            assert_eq!(got, status, "{path}: {body}");
            expected[usize::from(status / 100 - 1)] += 1;
        }
    }
    let since = (time::OffsetDateTime::now_utc() - time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let path = format!("/projects/timed/analytics?since={since}&step_s=3600");
    let classes = async || {
        let (status, analytics) = serve.api(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{analytics}");
        let points = analytics["points"].as_array().unwrap().clone();
        let sum = |key: &str| points.iter().map(|p| p[key].as_u64().unwrap()).sum::<u64>();
        ([sum("status_1xx"), sum("status_2xx"), sum("status_3xx"), sum("status_4xx"), sum("status_5xx")], analytics)
    };
    eventually("the requests in the analytics", Duration::from_secs(20), async || classes().await.0 == expected).await;
    let (counted, analytics) = classes().await;
    assert_eq!(counted, [0, 22, 0, 5, 3], "{analytics}");
    let points = analytics["points"].as_array().unwrap();
    let requests: u64 = points.iter().map(|p| p["requests"].as_u64().unwrap()).sum();
    let errors: u64 = points.iter().map(|p| p["errors"].as_u64().unwrap()).sum();
    assert_eq!((requests, errors), (30, 3), "errors are the 5xx: {analytics}");
    let timed: u64 =
        points.iter().flat_map(|p| p["latency_counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap())).sum();
    assert_eq!(timed, 30, "{analytics}");
    // The slow requests are 2 of at most 30 in whichever step holds them:
    // past 1 %, so that step's p99 is at least the bound above their delay.
    let p99 = points.iter().filter_map(|p| p["latency_p99_ms"].as_u64()).max().unwrap();
    assert!(p99 > SLOW_MS, "p99 {p99} ms is above the slow path's {SLOW_MS} ms: {analytics}");
    let p50 = points.iter().filter_map(|p| p["latency_p50_ms"].as_u64()).min().unwrap();
    assert!(p50 < SLOW_MS, "most requests are fast: p50 {p50} ms: {analytics}");
    // Bandwidth: the bodies that came out of the isolate.
    let egress: u64 = points.iter().map(|p| p["egress_bytes"].as_u64().unwrap()).sum();
    assert!(egress >= 20 * "ok /".len() as u64, "{analytics}");

    // `isocloud analytics` shows the same: a row per step with traffic, and
    // the totals with the quantiles of the merged histogram.
    let shown = cli(&serve, &config, &["analytics", "--project", "timed", "--since", "1h", "--step", "1h"]);
    assert!(shown.starts_with("TIME "), "{shown}");
    assert!(shown.contains("total: 30 requests, 3 errors (10.0%), 2xx 22 3xx 0 4xx 5 5xx 3, p50 ≤"), "{shown}");
    let json: serde_json::Value = serde_json::from_str(&cli(
        &serve,
        &config,
        &["analytics", "--project", "timed", "--since", "1h", "--step", "1h", "--json"],
    ))
    .unwrap();
    let requests: u64 = json["points"].as_array().unwrap().iter().map(|p| p["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, 30, "{json}");
    let refused = cli_fails(&serve, &config, &["analytics", "--project", "timed", "--step", "1s"]);
    assert!(refused.contains("`1s` is not a step between 10s and 1d"), "{refused}");
}
