//! The control plane as a remote origin (issue 15, item 1): `isocloud serve
//! --origin-listen` answers the origin RPCs over HTTP, and an `isocloud
//! runner` in another process, pointed at that listener as it would be at a
//! subhoster's origin, serves a first-party deployment — code, env, assets,
//! and its logs back into the control plane — while `serve`'s own runner
//! serves the same deployment in process. RPCs signed with no key or a
//! wrong one are refused. With `--origin-tls-cert` the listener speaks TLS
//! only, and a runner reaches it trusting the CA it names (`--rpc-root-ca`).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{
    ControlPlaneServe, KID, SECRET, claims_for, expect_error, isocloud_cli, now_s, origin_certificate, runner_fed_by,
    runner_fed_by_root, subhost_token, token_with,
};
use serde_json::json;

/// A key of the same length as `SECRET`, which the origin does not hold.
const WRONG_SECRET: &str = "wrong-secret-0123456789abcdef012345678";

fn cli(serve: &ControlPlaneServe, config: &Path, args: &[&str]) -> String {
    isocloud_cli(&serve.control_url(), &serve.admin_token(), config, args)
}

/// Answers its env var and an asset (so `read_tree` and `read_blob` are
/// exercised, not only `boot` and `layer`), and logs each request.
fn write_app(dir: &Path) {
    std::fs::create_dir_all(dir.join("static")).unwrap();
    std::fs::write(
        dir.join("main.ts"),
        "Deno.serve(async (req) => {\n  console.log(`served ${new URL(req.url).pathname}`);\n  \
         const about = await Deno.readTextFile(\"static/about.txt\");\n  \
         return new Response(`${Deno.env.get(\"GREETING\")} ${about}`);\n});\n",
    )
    .unwrap();
    std::fs::write(dir.join("static/about.txt"), "about v1").unwrap();
}

/// Project `shop` with its GREETING env var and [`write_app`]'s app,
/// deployed to production: the deployment id.
fn deploy_shop(serve: &ControlPlaneServe, config: &Path, work: &Path) -> String {
    cli(serve, config, &["projects", "create", "shop"]);
    cli(serve, config, &["env", "set", "GREETING", "hello", "--project", "shop"]);
    let app = work.join("app");
    write_app(&app);
    let out = cli(serve, config, &["deploy", "--project", "shop", "--prod", app.to_str().unwrap()]);
    let host = out.lines().last().unwrap().trim().strip_prefix("http://").unwrap().split(':').next().unwrap();
    host.strip_prefix("shop-").and_then(|h| h.strip_suffix(".localhost")).unwrap().to_owned()
}

async fn rpc(origin: std::net::SocketAddr, path: &str, token: Option<String>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(format!("http://{origin}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("the origin listener answers")
}

#[tokio::test]
async fn a_runner_on_another_machine_serves_a_first_party_deployment_through_the_origin_listener() {
    let (serve, origin) = ControlPlaneServe::start_with_origin(&["--cpu-limit-ms", "5000"]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    let deployment_id = deploy_shop(&serve, &config, work.path());

    // In process: `serve`'s own runner, by Host.
    let local = serve.runner.get("shop.localhost", "/local").await;
    assert_eq!(local.status(), 200);
    assert_eq!(local.text().await.unwrap(), "hello about v1");

    // Remote: another process, fed only over the origin listener, reached
    // as a relay reaches a runner.
    let runner = runner_fed_by(origin, SECRET, &[]);
    let remote = runner.subhost_get(&deployment_id, "/remote").await;
    assert_eq!(remote.status(), 200, "{}", runner.stderr());
    assert_eq!(remote.text().await.unwrap(), "hello about v1", "the same answer as in process");
    let isolates = runner.isolates().await;
    assert_eq!(isolates.len(), 1, "{isolates:?}");
    assert_eq!(isolates[0]["origin"], format!("{KID}@http://{origin}/"), "{isolates:?}");

    // Its console line reaches the control plane by report_activity.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cli(&serve, &config, &["logs", "--project", "shop"]).contains("served /remote") {
        assert!(Instant::now() < deadline, "the remote runner's log line never arrived:\n{}", runner.stderr());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The origin listener itself: the right key works, then no key and a
    // wrong key are refused, and a runner holding a wrong key cannot boot.
    let boot = format!("/boot?deployment_id={deployment_id}");
    let signed = rpc(origin, &boot, Some(subhost_token(claims_for(&deployment_id)))).await;
    assert_eq!(signed.status(), 200);
    assert!(signed.headers().contains_key("x-deno-config"));
    expect_error(rpc(origin, &boot, None).await, 401, "UNAUTHORIZED").await;
    let wrong = token_with(jsonwebtoken::Algorithm::HS256, Some(KID), WRONG_SECRET, claims_for(&deployment_id));
    expect_error(rpc(origin, &boot, Some(wrong)).await, 401, "UNAUTHORIZED").await;
    let other = token_with(jsonwebtoken::Algorithm::HS256, Some(KID), SECRET, claims_for("aaaaaaaaaaaa"));
    let message = expect_error(rpc(origin, &boot, Some(other)).await, 401, "UNAUTHORIZED").await;
    assert!(message.contains("deployment_id"), "{message}");
    let long_lived = json!({ "deployment_id": deployment_id, "iat": now_s(), "exp": now_s() + 86_400 });
    let long_lived = token_with(jsonwebtoken::Algorithm::HS256, Some(KID), SECRET, long_lived);
    expect_error(rpc(origin, &boot, Some(long_lived)).await, 401, "UNAUTHORIZED").await;

    let outsider = runner_fed_by(origin, WRONG_SECRET, &[]);
    let relay_token = token_with(jsonwebtoken::Algorithm::HS256, Some(KID), WRONG_SECRET, claims_for(&deployment_id));
    let refused = reqwest::Client::new()
        .get(format!("http://{}/", outsider.addr))
        .header("x-deno-subhost", relay_token)
        .send()
        .await
        .unwrap();
    expect_error(refused, 502, "BOOT_FAILED").await;
    assert!(outsider.isolates().await.is_empty());
    let log = serve.runner.stderr();
    assert!(log.contains("origin: RPC refused"), "the refusals are logged:\n{log}");
}

#[tokio::test]
async fn over_tls_the_origin_listener_feeds_a_runner_that_trusts_its_ca_and_no_runner_that_does_not() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = origin_certificate(pki.path());
    let (serve, origin) = ControlPlaneServe::start_with_origin(&[
        "--cpu-limit-ms",
        "5000",
        "--origin-tls-cert",
        cert.as_str(),
        "--origin-tls-key",
        key.as_str(),
    ]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    let deployment_id = deploy_shop(&serve, &config, work.path());

    // The listener answers a signed RPC over TLS, to a client trusting the
    // CA; plain HTTP gets no answer at all.
    let ca_pem = std::fs::read(&ca).unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .build()
        .unwrap();
    let boot = format!("boot?deployment_id={deployment_id}");
    let signed = trusting
        .get(format!("https://{origin}/{boot}"))
        .bearer_auth(subhost_token(claims_for(&deployment_id)))
        .send()
        .await
        .expect("TLS to the origin listener");
    assert_eq!(signed.status(), 200);
    assert!(signed.headers().contains_key("x-deno-config"));
    let plain = reqwest::Client::new().get(format!("http://{origin}/{boot}")).send().await;
    assert!(plain.is_err(), "plain HTTP answered: {:?}", plain.map(|r| r.status()));

    // A runner trusting the CA boots the deployment through it.
    let rpc_root = format!("https://{origin}/");
    let runner = runner_fed_by_root(&rpc_root, SECRET, &["--rpc-root-ca", ca.as_str()]);
    let remote = runner.subhost_get(&deployment_id, "/remote").await;
    assert_eq!(remote.status(), 200, "{}", runner.stderr());
    assert_eq!(remote.text().await.unwrap(), "hello about v1");
    let isolates = runner.isolates().await;
    assert_eq!(isolates[0]["origin"], format!("{KID}@{rpc_root}"), "{isolates:?}");

    // The same runner without the CA: the certificate is not trusted, so
    // nothing boots, and its log says why.
    let untrusting = runner_fed_by_root(&rpc_root, SECRET, &[]);
    let refused = untrusting.subhost_get(&deployment_id, "/remote").await;
    expect_error(refused, 502, "ORIGIN_UNREACHABLE").await;
    assert!(untrusting.isolates().await.is_empty());
    let log = untrusting.stderr();
    assert!(log.contains("invalid peer certificate: UnknownIssuer"), "the log says why:\n{log}");
}
