//! The dashboard in a real browser against the real `isocloud serve`
//! (control plane + runner + deno isolates): `tools/e2e/dashboard.mjs`
//! (playwright-core driving Debian's chromium) logs in with the admin token,
//! creates a project in the UI, deploys a hello app through the API, promotes
//! and rolls back in the UI, sends requests through the runner and waits for
//! them in the analytics charts and the live logs.
//!
//! Needs `scripts/install-chromium` (chromium + tools/e2e/node_modules);
//! `scripts/test` runs it. `ISOCLOUD_E2E_SCREENSHOT=/path.png` keeps a
//! screenshot of the final page; a failure always saves one and names it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{ControlPlaneServe, repo_root, run_with_timeout};

#[test]
fn dashboard_in_a_browser() {
    let root = repo_root();
    let chromium = std::env::var("ISOCLOUD_E2E_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).is_file(),
        "{chromium} is missing: run ./scripts/install-chromium (scripts/test does)"
    );
    assert!(
        root.join("tools/e2e/node_modules/playwright-core").is_dir(),
        "tools/e2e/node_modules is missing: run ./scripts/install-chromium (scripts/test does)"
    );

    let serve = ControlPlaneServe::start(&[]);
    let mut node = Command::new("node");
    node.arg(root.join("tools/e2e/dashboard.mjs"))
        .arg("--url")
        .arg(serve.control_url())
        .arg("--token-file")
        .arg(serve.admin_token_file())
        .arg("--public")
        .arg(serve.public_url())
        .arg("--base-domain")
        .arg(&serve.base_domain)
        .arg("--chromium")
        .arg(&chromium);
    // The script stops itself after 120 s; this bound only catches a hung node.
    let (status, stdout, stderr) = run_with_timeout(&mut node, Duration::from_secs(180));
    assert!(
        status.is_some_and(|s| s.success()),
        "the dashboard test failed ({status:?}):\n{stdout}\n{stderr}\n--- isocloud stderr:\n{}",
        serve.runner.stderr()
    );
    assert!(stdout.contains("dashboard e2e: ok"), "{stdout}");
    // The steps and their timings, for `--nocapture` readers.
    eprintln!("{stdout}");
}
