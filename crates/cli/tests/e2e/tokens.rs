//! Scoped tokens through the CLI (issue 16 item 5): the admin makes a deploy
//! token for one project with `isocloud tokens create`; with it alone, the
//! CLI deploys that project to production (served by the runner) and is
//! refused on another project (the admin's same deploy works there first);
//! `isocloud audit` shows what it did and was refused under its name;
//! after `isocloud tokens revoke` its next call fails.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::{ControlPlaneServe, isocloud_cli};

/// Runs the client with `token`; (success, stdout, stderr).
fn run_with(serve: &ControlPlaneServe, token: &str, config: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_isocloud"))
        .args(args)
        .env("ISOCLOUD_CONFIG_DIR", config)
        .env("ISOCLOUD_URL", serve.control_url())
        .env("ISOCLOUD_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .expect("run the isocloud client");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[tokio::test]
async fn a_deploy_token_from_the_cli_deploys_its_project_and_is_refused_on_another() {
    let serve = ControlPlaneServe::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    let admin = |args: &[&str]| isocloud_cli(&serve.control_url(), &serve.admin_token(), &config, args);
    admin(&["projects", "create", "shop"]);
    admin(&["projects", "create", "other"]);
    let app = work.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("main.ts"), "Deno.serve(() => new Response('shipped by ci'));\n").unwrap();
    let app = app.to_str().unwrap();

    let (ok, secret, told) = run_with(
        &serve,
        &serve.admin_token(),
        &config,
        &["tokens", "create", "--scope", "project:shop:deploy", "--name", "ci", "--expires", "30d"],
    );
    assert!(ok, "{told}");
    let secret = secret.trim().to_owned();
    assert!(secret.starts_with("isc_"), "stdout is the secret alone: {secret:?}");
    assert!(told.contains("shown this once") && told.contains("project:shop:deploy"), "{told}");
    let listed = admin(&["tokens", "list"]);
    assert!(listed.contains("ci") && listed.contains("project:shop:deploy") && !listed.contains(&secret), "{listed}");

    // Its project: deployed to production and served by the runner.
    let (ok, out, err) = run_with(&serve, &secret, &config, &["deploy", "--project", "shop", "--prod", app]);
    assert!(ok, "{out}\n{err}");
    let response = reqwest::Client::new()
        .get(format!("{}/", serve.public_url()))
        .header("host", format!("shop.localhost:{}", serve.runner.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "shipped by ci");

    // Another project: the admin's deploy works; the token's is refused,
    // naming the scope it would need.
    admin(&["deploy", "--project", "other", app]);
    let (ok, out, err) = run_with(&serve, &secret, &config, &["deploy", "--project", "other", app]);
    assert!(!ok, "{out}");
    // (The CLI's first call reads the project: refused naming project:other:read.)
    assert!(err.contains("FORBIDDEN") && err.contains("project:other:"), "{err}");
    assert!(admin(&["deployments", "--project", "other"]).lines().count() == 2, "the admin's one deployment only");
    let (ok, _, err) = run_with(&serve, &secret, &config, &["env", "set", "-p", "shop", "K", "V"]);
    assert!(!ok && err.contains("needs admin"), "{err}");
    let (ok, out, _) = run_with(&serve, &secret, &config, &["projects", "list"]);
    assert!(ok && out.contains("shop") && !out.contains("other"), "{out}");

    // The audit log names the token for each of its changes.
    let audit = admin(&["audit", "--project", "shop"]);
    assert!(audit.lines().any(|l| l.contains("ci") && l.contains("deployment.create") && l.contains("ok")), "{audit}");
    assert!(audit.lines().any(|l| l.contains("ci") && l.contains("env.set") && l.contains("denied")), "{audit}");

    // Revoked: its next call is refused with its own code.
    let id = listed.lines().find(|l| l.contains("project:shop:deploy")).unwrap().split_whitespace().next().unwrap();
    admin(&["tokens", "revoke", id]);
    let (ok, _, err) = run_with(&serve, &secret, &config, &["deployments", "--project", "shop"]);
    assert!(!ok && err.contains("TOKEN_REVOKED"), "{err}");
}
