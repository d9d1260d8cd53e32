//! The control plane's store against local users, a noisy tenant and a full
//! disk (#21 rows 5, 9, 10), through the real `isocloud serve`: files are
//! private whatever the directory was; one project's logs cannot fill the
//! store for the others, and what was dropped is shown; a full disk is a
//! 507 `STORAGE_FULL` the operator is told about, production keeps serving,
//! and writes work again once there is space.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{ControlPlaneServe, Runner, deno_path, run_with_timeout};

/// Another local user.
const NOBODY: u32 = 65534;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Whether uid 65534 can read `path` (a real read, as that user).
fn nobody_reads(path: &Path) -> bool {
    Command::new("cat")
        .arg(path)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run cat as nobody")
        .success()
}

fn needs_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{what} needs root, and CI runs as root");
    eprintln!("SKIPPED: {what} needs root");
    false
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

async fn api(serve: &ControlPlaneServe, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}/api/v1{path}", serve.control_url()))
        .bearer_auth(serve.admin_token());
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("API request")
}

async fn api_json(serve: &ControlPlaneServe, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let response = api(serve, method, path, body).await;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert!((200..300).contains(&status), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

async fn upload(serve: &ControlPlaneServe, bytes: &[u8]) -> (u16, String) {
    let response = reqwest::Client::new()
        .put(format!("{}/api/v1/blobs/{}", serve.control_url(), sha256_hex(bytes)))
        .bearer_auth(serve.admin_token())
        .body(bytes.to_vec())
        .send()
        .await
        .expect("upload");
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Creates `project` and deploys `main.ts` to production; waits until its
/// host answers 200.
async fn deploy(serve: &ControlPlaneServe, project: &str, main_ts: &str) {
    api_json(serve, reqwest::Method::POST, "/projects", Some(json!({"name": project}))).await;
    let (status, text) = upload(serve, main_ts.as_bytes()).await;
    assert!(status == 200 || status == 201, "{status} {text}");
    let files = json!({"main.ts": {"hash": sha256_hex(main_ts.as_bytes()), "size": main_ts.len()}});
    api_json(
        serve,
        reqwest::Method::POST,
        &format!("/projects/{project}/deployments"),
        Some(json!({"entrypoint": "main.ts", "files": files, "production": true})),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(serve, project).await.0 != 200 {
        assert!(Instant::now() < deadline, "{project} never served; stderr:\n{}", serve.runner.stderr());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get(serve: &ControlPlaneServe, project: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("{}/", serve.public_url()))
        .header("host", format!("{project}.{}:{}", serve.base_domain, serve.runner.addr.port()))
        .timeout(Duration::from_secs(60))
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

fn serve_args<'a>(data: &'a str, state: &'a str) -> Vec<&'a str> {
    vec![
        "serve",
        "--data",
        data,
        "--state-dir",
        state,
        "--control-listen",
        "127.0.0.1:0",
        "--base-domain",
        "localhost",
        "--listen",
        "127.0.0.1:0",
    ]
}

// ------------------------------------------------------------------ row 5

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_state_dirs_open_to_others_are_tightened() {
    if !needs_root("reading as another uid") {
        return;
    }
    // What a package or systemd's StateDirectory= leaves: 0755, made before
    // the first start.
    let data_dir = tempfile::tempdir().unwrap();
    chmod(data_dir.path(), 0o755);
    let state_dir = tempfile::tempdir().unwrap();
    chmod(state_dir.path(), 0o755);
    std::fs::create_dir(state_dir.path().join("spool")).unwrap();
    chmod(&state_dir.path().join("spool"), 0o755);
    // Probe: another user reads what is readable in such a directory.
    let probe = data_dir.path().join("probe.txt");
    std::fs::write(&probe, "anyone").unwrap();
    chmod(&probe, 0o644);
    assert!(nobody_reads(&probe), "the probe: uid {NOBODY} reads a 0644 file in a 0755 dir");

    let data = data_dir.path().to_str().unwrap().to_owned();
    let state = state_dir.path().to_str().unwrap().to_owned();
    let args = ["serve", "--data", &data, "--control-listen", "127.0.0.1:0", "--base-domain", "localhost"];
    let (runner, _) = Runner::start_with_lines(&args, state_dir, &["isocloud: control plane on http://"]);
    runner.wait_for_log("data dir was readable or writable by other users: tightened");
    runner.wait_for_log("state dir was readable or writable by other users: tightened");
    let stderr = runner.stderr();
    for (what, path) in [("data dir", &data), ("state dir", &state)] {
        assert!(
            stderr.lines().any(|l| l.contains(&format!("{what} was readable or writable by other users: tightened"))
                && l.contains(path.as_str())
                && l.contains("0755")),
            "no log line for the {what}:\n{stderr}"
        );
    }
    let db = data_dir.path().join("isocloud.db");
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", db.display()));
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!(mode(&data_dir.path().join("admin-token")), 0o600);
    for dir in [data_dir.path().to_owned(), data_dir.path().join("blobs"), runner.state_dir.path().join("spool")] {
        // 0700, or 0711 where a build's or an isolate's uid passes through:
        // never readable or writable by others.
        assert_eq!(mode(&dir) & 0o766, 0o700, "{}: {:o}", dir.display(), mode(&dir));
    }
    assert!(!nobody_reads(&db), "uid {NOBODY} must not read the database");
    assert!(!nobody_reads(&data_dir.path().join("admin-token")));
    drop(runner);

    // Not ours: refused, naming the path and the fix.
    let theirs = tempfile::tempdir().unwrap();
    chmod(theirs.path(), 0o755);
    std::os::unix::fs::chown(theirs.path(), Some(NOBODY), None).unwrap();
    let state = tempfile::tempdir().unwrap();
    let theirs_path = theirs.path().to_str().unwrap();
    let state_path = state.path().to_str().unwrap();
    let (status, _, stderr) = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_isocloud"))
            .args(serve_args(theirs_path, state_path))
            .arg("--deno")
            .arg(deno_path()),
        Duration::from_secs(30),
    );
    assert!(status.is_some_and(|s| !s.success()), "start must fail; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("data dir {theirs_path} belongs to uid {NOBODY}"))
            && stderr.contains(&format!("chown -R 0 {theirs_path}")),
        "{stderr}"
    );
    assert_eq!(mode(theirs.path()), 0o755, "left as it was");
}

// ------------------------------------------------------------------ row 9

/// Logs `n` lines of ~1 KB per request.
fn noisy_handler(n: usize) -> String {
    format!(
        "const line = 'x'.repeat(1000);\nDeno.serve(() => {{\n  for (let i = 0; i < {n}; i++) console.log(`${{i}} ${{line}}`);\n  \
         return new Response('logged');\n}});\n"
    )
}

fn store_file_bytes(data_dir: &Path) -> u64 {
    ["isocloud.db", "isocloud.db-wal"].iter().map(|f| std::fs::metadata(data_dir.join(f)).map_or(0, |m| m.len())).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_tenant_cannot_fill_the_store_for_others() {
    // 5,000 console.logs take more than the default 50 ms of CPU.
    let serve = ControlPlaneServe::start(&["--cpu-limit-ms", "10000"]);
    deploy(&serve, "quiet", "Deno.serve(() => { console.log('quiet line'); return new Response('quiet'); });\n").await;
    deploy(&serve, "noisy", &noisy_handler(5000)).await;
    assert_eq!(get(&serve, "quiet").await, (200, "quiet".to_owned()));
    eventually("the quiet project's line", Duration::from_secs(20), async || {
        let logs = api_json(&serve, reqwest::Method::GET, "/projects/quiet/logs", None).await;
        logs.as_array().unwrap().iter().any(|l| l["message"] == "quiet line")
    })
    .await;
    let before = store_file_bytes(serve.data_dir.path());

    // Probe: the noisy tenant's lines do arrive.
    assert_eq!(get(&serve, "noisy").await.0, 200);
    eventually("the noisy project's first lines", Duration::from_secs(20), async || {
        let logs = api_json(&serve, reqwest::Method::GET, "/projects/noisy/logs?limit=1000", None).await;
        logs.as_array().unwrap().iter().any(|l| l["message"].as_str().unwrap_or("").starts_with("0 xxx"))
    })
    .await;
    // Then 5 × 5,000 lines of 1 KB: 25 MB logged in seconds, against the
    // default bound of 1 MiB a minute.
    for _ in 0..4 {
        assert_eq!(get(&serve, "noisy").await.0, 200);
    }
    let limits = async || api_json(&serve, reqwest::Method::GET, "/projects/noisy/limits", None).await;
    eventually("most of 25,000 lines to be dropped", Duration::from_secs(30), async || {
        limits().await["dropped"]["log_lines_over_rate"].as_i64().unwrap() >= 15_000
    })
    .await;
    let l = limits().await;
    // 1 MiB a minute: one minute's worth, two if the test straddled one.
    assert!(l["held"]["log_bytes"].as_i64().unwrap() <= 2 * 1024 * 1024 + 8192, "{l}");
    let grown = store_file_bytes(serve.data_dir.path()).saturating_sub(before);
    assert!(grown < 12 * 1024 * 1024, "the store grew {grown} bytes for 25 MB logged (bound 1 MiB); {l}");

    // The drop is shown: counted in the logs API, and said in the lines.
    let response = api(&serve, reqwest::Method::GET, "/projects/noisy/logs?limit=1000", None).await;
    let dropped: i64 = response.headers()["x-isocloud-log-lines-dropped"].to_str().unwrap().parse().unwrap();
    assert!(dropped >= 15_000, "{dropped}");
    let logs: Value = response.json().await.unwrap();
    let note = logs.as_array().unwrap().iter().find(|l| l["type"] == "dropped").expect("a `dropped` entry");
    assert!(note["message"].as_str().unwrap().contains("log lines"), "{note}");

    // The total bound: set by the admin, held by removing the oldest.
    let set = json!({"log_bytes_per_minute": 16 * 1024 * 1024, "log_bytes_total": 512 * 1024});
    api_json(&serve, reqwest::Method::PUT, "/projects/noisy/limits", Some(set)).await;
    assert_eq!(get(&serve, "noisy").await.0, 200);
    eventually("the oldest lines to be removed", Duration::from_secs(30), async || {
        limits().await["dropped"]["log_lines_evicted"].as_i64().unwrap() > 0
    })
    .await;
    let l = limits().await;
    assert!(l["held"]["log_bytes"].as_i64().unwrap() <= 512 * 1024, "{l}");

    // The other project's logs are kept all along.
    let quiet = api_json(&serve, reqwest::Method::GET, "/projects/quiet/logs", None).await;
    assert!(quiet.as_array().unwrap().iter().any(|l| l["message"] == "quiet line"), "{quiet}");
    assert_eq!(get(&serve, "quiet").await, (200, "quiet".to_owned()));
    let metrics = serve.runner.metrics().await;
    assert!(metrics.lines().any(|l| l.starts_with("isocloud_log_lines_dropped_total ")), "{metrics}");
}

// ------------------------------------------------------------------ row 10

/// A tmpfs of `size_mb` at a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    fn mount(size_mb: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if output.status.success() {
            return Some(Tmpfs { dir: Some(dir) });
        }
        let why = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "cannot mount a tmpfs under CI=true (CI runs as root): {why}"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs: {why}");
        None
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Writes a file until the file system is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        while file.write_all(&chunk[..512]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_507_storage_full_and_recovers() {
    let Some(tmpfs) = Tmpfs::mount(48) else { return };
    let data_dir = tempfile::TempDir::new_in(tmpfs.path()).unwrap();
    let data = data_dir.path().to_owned();
    let serve = ControlPlaneServe::start_in(data_dir, &[]);
    deploy(&serve, "app", "Deno.serve(() => new Response('still serving'));\n").await;
    // Probe: an upload fits.
    let blob = |tag: u8| (0..1024 * 1024).map(|i| (i % 251) as u8 ^ tag).collect::<Vec<u8>>();
    let (status, text) = upload(&serve, &blob(1)).await;
    assert_eq!(status, 201, "{text}");
    let metrics = serve.runner.metrics().await;
    for series in ["isocloud_store_bytes{part=\"database\"} ", "isocloud_store_bytes{part=\"blobs\"} "] {
        assert!(metrics.lines().any(|l| l.starts_with(series)), "{series}: {metrics}");
    }
    let free: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("isocloud_data_disk_free_bytes "))
        .unwrap_or_else(|| panic!("no free-space series: {metrics}"))
        .parse()
        .unwrap();
    assert!(free > 0.0 && free <= 48.0 * 1024.0 * 1024.0, "{free}");

    // A disk this small is "nearly full" from the start: the operator is told.
    serve.runner.wait_for_log("the data dir's disk is nearly full");

    let filler = tmpfs.fill();
    let (status, text) = upload(&serve, &blob(2)).await;
    assert_eq!(status, 507, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "STORAGE_FULL", "{text}");
    assert!(!text.contains(data.to_str().unwrap()), "no path to the client: {text}");
    // The operator's line names the data dir and its free space (read from
    // the server's stderr as it arrives).
    eventually("the storage-full log line", Duration::from_secs(5), async || {
        serve.runner.stderr().lines().any(|l| {
            l.contains("storage full") && l.contains(data.to_str().unwrap()) && l.contains("data_disk_free_bytes")
        })
    })
    .await;
    // A database write fits in the WAL's pages or is refused the same way;
    // never a 500.
    let response = api(&serve, reqwest::Method::POST, "/projects", Some(json!({"name": "later"}))).await;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert!(status == 201 || (status == 507 && text.contains("STORAGE_FULL")), "{status} {text}");
    // Production keeps serving.
    assert_eq!(get(&serve, "app").await, (200, "still serving".to_owned()));
    let metrics = serve.runner.metrics().await;
    assert!(metrics.lines().any(|l| l.starts_with("isocloud_store_full_errors_total ")), "{metrics}");

    // Space is back: the same upload works.
    std::fs::remove_file(filler).unwrap();
    let (status, text) = upload(&serve, &blob(2)).await;
    assert_eq!(status, 201, "{text}");
    for i in 0..12 {
        let response =
            api(&serve, reqwest::Method::POST, "/projects", Some(json!({"name": format!("after-{i}")}))).await;
        assert_eq!(response.status().as_u16(), 201, "{}", response.text().await.unwrap());
    }
    assert_eq!(get(&serve, "app").await, (200, "still serving".to_owned()));
    drop(serve);
}
