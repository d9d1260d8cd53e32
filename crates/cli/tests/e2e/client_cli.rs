//! The client commands as a user runs them: the real `isocloud` binary
//! (login, projects, deploy, deployments, promote, rollback, env, domains,
//! logs) against the real control plane, served in-process on loopback with
//! a fresh SQLite data dir. No runner: deployments are created and promoted,
//! not requested.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use isocloud_controlplane::{ControlPlane, ControlPlaneOptions};

/// The public port the control plane puts in URLs; nothing listens there.
const PUBLIC_PORT: u16 = 8080;

/// The control plane on 127.0.0.1:0, on its own runtime so the test thread
/// can block on the CLI.
struct Server {
    url: String,
    data: tempfile::TempDir,
    control_plane: Arc<ControlPlane>,
    runtime: tokio::runtime::Runtime,
}

impl Server {
    fn start() -> Server {
        Server::start_with_max_blob_bytes(64 * 1024 * 1024)
    }

    fn start_with_max_blob_bytes(max_blob_bytes: u64) -> Server {
        let data = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let options = ControlPlaneOptions {
            data_dir: data.path().to_path_buf(),
            database_url: None,
            base_domain: "localhost".to_string(),
            public_http_port: PUBLIC_PORT,
            public_https_port: None,
            log_retention: Duration::from_secs(72 * 3600),
            usage_retention: Duration::from_secs(30 * 86_400),
            max_blob_bytes,
            domain_verify_http_port: 80,
            dns_resolver: None,
            build: None,
            blob_store: None,
            blob_gc_grace: Duration::from_secs(86_400),
        };
        let (control_plane, addr) = runtime.block_on(async {
            let control_plane = ControlPlane::open(options).await.expect("open the control plane");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr: SocketAddr = listener.local_addr().unwrap();
            let router = control_plane.router();
            tokio::spawn(async move { axum::serve(listener, router).await });
            (control_plane, addr)
        });
        Server { url: format!("http://{addr}"), data, control_plane, runtime }
    }

    fn admin_token_file(&self) -> PathBuf {
        self.data.path().join("admin-token")
    }
}

/// The CLI with its own config dir and no ISOCLOUD_* from the environment.
struct Cli {
    config: tempfile::TempDir,
}

impl Cli {
    fn new() -> Cli {
        Cli { config: tempfile::tempdir().unwrap() }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_isocloud"));
        command
            .args(args)
            .env("ISOCLOUD_CONFIG_DIR", self.config.path())
            .env_remove("ISOCLOUD_URL")
            .env_remove("ISOCLOUD_TOKEN")
            .env_remove("ISOCLOUD_LOG");
        command
    }

    fn output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run isocloud");
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns (stdout, stderr).
    fn ok(&self, args: &[&str]) -> (String, String) {
        self.ok_with_stdin(args, None)
    }

    fn ok_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> (String, String) {
        let output = self.output(args, stdin);
        let (stdout, stderr) = texts(&output);
        assert!(output.status.success(), "isocloud {args:?} failed ({}):\n{stdout}\n{stderr}", output.status);
        (stdout, stderr)
    }

    /// Runs a command that must fail with exit code 1; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.output(args, None);
        let (stdout, stderr) = texts(&output);
        assert_eq!(output.status.code(), Some(1), "isocloud {args:?} should fail:\n{stdout}\n{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        stderr
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let (stdout, _) = self.ok(args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("isocloud {args:?}: {e}:\n{stdout}"))
    }
}

fn texts(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// `uploaded X of N files (…), M already on the server` → (X, N, M).
fn upload_summary(stderr: &str) -> (usize, usize, usize) {
    let line = stderr.lines().find(|l| l.starts_with("uploaded ")).unwrap_or_else(|| panic!("no summary:\n{stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| words[i].trim_matches(',').parse::<usize>().unwrap_or_else(|_| panic!("{line}"));
    let already = words.iter().position(|w| *w == "already").expect(line) - 1;
    (number(1), number(3), number(already))
}

fn last_line(stdout: &str) -> &str {
    stdout.lines().last().unwrap_or_default()
}

/// The id in `http://<project>-<id>.localhost:<port>`.
fn deployment_id(url: &str, project: &str) -> String {
    let prefix = format!("http://{project}-");
    let rest = url.strip_prefix(&prefix).unwrap_or_else(|| panic!("not a deployment URL of {project}: {url}"));
    let (id, host_rest) = rest.split_once('.').expect(url);
    assert_eq!(host_rest, format!("localhost:{PUBLIC_PORT}"), "{url}");
    assert!(id.len() == 12 && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{url}");
    id.to_string()
}

fn write(root: &Path, path: &str, content: &str) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// main.ts and 29 more files, two of them with the same bytes.
fn app_with_30_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "main.ts", "Deno.serve(() => new Response(Deno.env.get('GREETING') ?? 'hi'));\n");
    for i in 0..27 {
        write(dir.path(), &format!("static/{}/file-{i}.txt", i % 3), &format!("asset number {i}\n"));
    }
    write(dir.path(), "lib/util.ts", "export const x = 1;\n");
    write(dir.path(), "static/copy.txt", "asset number 0\n");
    write(dir.path(), "skipped.log", "left out by --exclude\n");
    write(dir.path(), ".git/config", "not a repository, and never uploaded\n");
    dir
}

#[test]
fn a_file_over_the_servers_blob_bound_is_refused_by_name_before_anything_is_uploaded() {
    let server = Server::start_with_max_blob_bytes(2 * 1024 * 1024);
    let cli = Cli::new();
    let token_file = server.admin_token_file().display().to_string();
    cli.ok(&["login", "--url", &server.url, "--token-file", &token_file]);
    cli.ok(&["projects", "create", "big"]);
    let app = tempfile::tempdir().unwrap();
    write(app.path(), "main.ts", "Deno.serve(() => new Response('hi'));\n");
    write(app.path(), "small.txt", "small\n");
    let dir = app.path().to_str().unwrap();
    // The probe: at the bound exactly, the deploy goes through.
    std::fs::write(app.path().join("assets.bin"), vec![7u8; 2 * 1024 * 1024]).unwrap();
    cli.ok(&["deploy", "--project", "big", dir]);

    std::fs::create_dir(app.path().join("media")).unwrap();
    std::fs::write(app.path().join("media/video.bin"), vec![9u8; 3 * 1024 * 1024 + 100_000]).unwrap();
    write(app.path(), "new.txt", "a file the server has not seen\n");
    let error = cli.fails(&["deploy", "--project", "big", dir]);
    assert!(
        error.contains("media/video.bin is 3.1 MiB, over the server's bound of 2 MiB per file")
            && error.contains("--exclude 'media/video.bin'"),
        "{error}"
    );
    assert!(!error.contains("cannot reach"), "{error}");
    // Nothing was uploaded: the new small file is still missing on the server.
    let new_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"a file the server has not seen\n"));
    let token = std::fs::read_to_string(server.admin_token_file()).unwrap();
    let missing: serde_json::Value = server.runtime.block_on(async {
        let answer = reqwest::Client::new()
            .post(format!("{}/api/v1/blobs/missing", server.url))
            .bearer_auth(token.trim())
            .json(&serde_json::json!({ "hashes": [new_hash] }))
            .send()
            .await
            .unwrap();
        answer.json().await.unwrap()
    });
    assert_eq!(missing["missing"], serde_json::json!([new_hash]), "{missing}");
    // The hint works as written.
    let (stdout, _) = cli.ok(&["deploy", "--project", "big", "--exclude", "media/video.bin", dir]);
    assert!(stdout.contains("big-"), "{stdout}");
}

#[test]
fn the_client_commands_against_the_control_plane() {
    let server = Server::start();
    let cli = Cli::new();
    let url = server.url.as_str();

    // Logging in: a wrong token is refused and saves nothing.
    let error = cli.fails(&["login", "--url", url, "--token", "wrong"]);
    assert!(error.contains("(UNAUTHORIZED)") && error.contains("hint: "), "{error}");
    assert!(!cli.config.path().join("credentials.json").exists());
    let error = cli.fails(&["projects", "list"]);
    assert!(error.contains("isocloud login --url"), "{error}");

    let token_file = server.admin_token_file().display().to_string();
    let (stdout, stderr) = cli.ok(&["login", "--url", url, "--token-file", &token_file]);
    assert_eq!(stdout.trim(), format!("logged in to {url} as admin"), "{stderr}");
    let credentials = cli.config.path().join("credentials.json");
    assert_eq!(std::fs::metadata(&credentials).unwrap().permissions().mode() & 0o777, 0o600);
    // The token piped on stdin works too.
    let token = std::fs::read_to_string(server.admin_token_file()).unwrap();
    cli.ok_with_stdin(&["login", "--url", url], Some(&token));

    // Projects.
    let (stdout, _) = cli.ok(&["projects", "create", "hello"]);
    assert_eq!(stdout.trim(), "created project hello");
    let error = cli.fails(&["projects", "create", "hello"]);
    assert!(error.contains("(CONFLICT)"), "{error}");
    let error = cli.fails(&["projects", "create", "Not_Valid"]);
    assert!(error.contains("(INVALID_FIELD, field name)"), "{error}");
    let (stdout, _) = cli.ok(&["projects", "list"]);
    assert!(stdout.lines().any(|l| l.starts_with("hello ")), "{stdout}");

    // Deploying: everything is uploaded once, then nothing.
    let app = app_with_30_files();
    let dir = app.path().to_str().unwrap();
    let (stdout, stderr) = cli.ok(&["deploy", "--project", "hello", "--exclude", "*.log", dir]);
    assert_eq!(upload_summary(&stderr), (30, 30, 0), "{stderr}");
    let first = deployment_id(last_line(&stdout), "hello");
    assert_eq!(stdout.lines().count(), 1, "only the URL on stdout: {stdout}");
    let (stdout, stderr) = cli.ok(&["deploy", "--project", "hello", "--exclude", "*.log", dir]);
    assert_eq!(upload_summary(&stderr), (0, 30, 30), "{stderr}");
    let second = deployment_id(last_line(&stdout), "hello");
    assert_ne!(first, second);

    // One changed file is one upload; --prod prints the production URL too.
    write(app.path(), "static/0/file-0.txt", "changed\n");
    let (stdout, stderr) = cli.ok(&["deploy", "-p", "hello", "--prod", "--exclude", "*.log", dir]);
    assert_eq!(upload_summary(&stderr), (1, 30, 30 - 1), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0], format!("http://hello.localhost:{PUBLIC_PORT}"));
    let third = deployment_id(lines[1], "hello");

    let deployment = cli.json(&["deploy", "-p", "hello", "--exclude", "*.log", "--json", dir]);
    assert_eq!(deployment["files"], 30, "{deployment}");
    assert_eq!(deployment["entrypoint"].as_str().map(|e| e.ends_with("main.ts")), Some(true), "{deployment}");
    let fourth = deployment["id"].as_str().unwrap().to_string();

    let listed = cli.json(&["deployments", "-p", "hello", "--json"]);
    let ids: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(ids, [fourth.as_str(), third.as_str(), second.as_str(), first.as_str()], "newest first");
    let (stdout, _) = cli.ok(&["deployments", "-p", "hello"]);
    let prod_line = stdout.lines().find(|l| l.contains("Prod")).expect(&stdout);
    assert!(prod_line.starts_with(&third), "{stdout}");
    // Each column's values start under its header.
    let header = stdout.lines().next().unwrap();
    assert_eq!(header.find("PROD"), prod_line.find("Prod"), "{stdout}");
    for line in stdout.lines().skip(1) {
        assert_eq!(header.find("STATUS"), line.find("ready"), "{stdout}");
    }

    // Production: promote twice, roll back to the one before, then to a named
    // earlier one (a rollback drops the promotions after its target).
    let production = |cli: &Cli| {
        let projects = cli.json(&["projects", "list", "--json"]);
        projects[0]["production_deployment_id"].as_str().map(str::to_string)
    };
    let (stdout, _) = cli.ok(&["promote", "-p", "hello", &first]);
    assert_eq!(stdout.trim(), format!("http://hello.localhost:{PUBLIC_PORT}"));
    assert_eq!(production(&cli).as_deref(), Some(first.as_str()));
    cli.ok(&["promote", "-p", "hello", &second]);
    assert_eq!(production(&cli).as_deref(), Some(second.as_str()));
    cli.ok(&["rollback", "-p", "hello"]);
    assert_eq!(production(&cli).as_deref(), Some(first.as_str()));
    cli.ok(&["rollback", "-p", "hello", &third]);
    assert_eq!(production(&cli).as_deref(), Some(third.as_str()));
    let error = cli.fails(&["rollback", "-p", "hello", &fourth]);
    assert!(error.contains('('), "never production, so no rollback to it: {error}");
    let error = cli.fails(&["promote", "-p", "hello", "nosuchid0000"]);
    assert!(error.contains("(NOT_FOUND"), "{error}");

    // Env vars: values go in, never come out.
    let secret = "s3cret-value-never-printed";
    cli.ok(&["env", "set", "-p", "hello", &format!("API_KEY={secret}")]);
    cli.ok(&["env", "set", "-p", "hello", "GREETING", "hello there"]);
    cli.ok_with_stdin(&["env", "set", "-p", "hello", "PIPED", "--stdin"], Some(&format!("{secret}\n")));
    let (stdout, stderr) = cli.ok(&["env", "list", "-p", "hello"]);
    let names: Vec<&str> = stdout.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["API_KEY", "GREETING", "PIPED"], "{stdout}");
    assert!(!stdout.contains(secret) && !stderr.contains(secret));
    let env_json = serde_json::to_string(&cli.json(&["env", "list", "-p", "hello", "--json"])).unwrap();
    assert!(!env_json.contains(secret), "{env_json}");
    let error = cli.fails(&["env", "set", "-p", "hello", "1BAD", "x"]);
    assert!(error.contains("INVALID_FIELD"), "{error}");
    cli.ok(&["env", "delete", "-p", "hello", "GREETING"]);
    let deployment = cli.json(&["deploy", "-p", "hello", "--exclude", "*.log", "--json", dir]);
    assert_eq!(deployment["env_names"], serde_json::json!(["API_KEY", "PIPED"]), "{deployment}");

    // Inside a git work tree the commit is recorded; uncommitted changes are noted.
    let repo = tempfile::tempdir().unwrap();
    write(repo.path(), "main.ts", "Deno.serve(() => new Response('git'));\n");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo.path())
            .args(["-c", "user.name=T", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if git(&["init", "-q", "-b", "main"]) && git(&["add", "."]) && git(&["commit", "-q", "-m", "Add main\n\nbody"]) {
        let repo_dir = repo.path().to_str().unwrap();
        let (_, stderr) = cli.ok(&["deploy", "-p", "hello", repo_dir]);
        assert!(!stderr.contains("uncommitted"), "{stderr}");
        write(repo.path(), "extra.txt", "not committed\n");
        let (_, stderr) = cli.ok(&["deploy", "-p", "hello", repo_dir]);
        assert!(stderr.contains("uncommitted changes; recording commit"), "{stderr}");
        let listed = cli.json(&["deployments", "-p", "hello", "--json", "--limit", "1"]);
        let recorded = &listed[0]["git"];
        assert_eq!((recorded["message"].as_str(), recorded["branch"].as_str()), (Some("Add main"), Some("main")));
        assert_eq!(recorded["commit"].as_str().map(str::len), Some(40), "{listed}");
        let (stdout, _) = cli.ok(&["deployments", "-p", "hello", "--limit", "1"]);
        assert!(stdout.lines().nth(1).is_some_and(|l| l.ends_with(" Add main")), "{stdout}");
    } else {
        eprintln!("no usable git: the git part is skipped");
    }

    // Domains.
    let (stdout, _) = cli.ok(&["domains", "add", "www.example.com", "--project", "hello"]);
    assert!(stdout.contains("_isocloud-challenge.www.example.com"), "{stdout}");
    assert!(stdout.contains("TXT") && stdout.contains("/.well-known/isocloud-challenge/"), "{stdout}");
    let (stdout, _) = cli.ok(&["domains", "list"]);
    let line = stdout.lines().find(|l| l.starts_with("www.example.com")).expect(&stdout);
    assert_eq!(line.split_whitespace().collect::<Vec<_>>(), ["www.example.com", "hello", "no", "-", "-"]);
    let error = cli.fails(&["domains", "add", "www.example.com", "--project", "hello"]);
    assert!(error.contains("(CONFLICT)"), "{error}");
    cli.ok(&["domains", "detach", "www.example.com"]);
    let domains = cli.json(&["domains", "list", "--json"]);
    assert_eq!(domains[0]["project"], serde_json::Value::Null, "{domains}");
    cli.ok(&["domains", "attach", "www.example.com", "-p", "hello"]);
    cli.ok(&["domains", "delete", "www.example.com"]);
    assert_eq!(cli.json(&["domains", "list", "--json"]), serde_json::json!([]));

    // Logs: what the runner reported through the in-process origin.
    report_logs(&server, &first);
    let (stdout, _) = cli.ok(&["logs", "-p", "hello", "--since", "1h"]);
    assert!(stdout.contains(" info  [req-1] hello from the isolate"), "{stdout}");
    assert!(stdout.contains(" error second line"), "{stdout}");
    let (stdout, _) = cli.ok(&["logs", "-p", "hello", "--deployment", &second]);
    assert_eq!(stdout, "", "another deployment's logs");
    follow_logs_until_interrupted(&cli, &server, &first);

    // Renaming and deleting.
    cli.ok(&["projects", "rename", "hello", "world"]);
    let error = cli.fails(&["deploy", "-p", "hello", dir]);
    assert!(error.contains("isocloud projects create hello"), "{error}");
    let error = cli.fails(&["projects", "delete", "world"]);
    assert!(error.contains("--yes"), "{error}");
    cli.ok(&["projects", "delete", "world", "--yes"]);
    assert_eq!(cli.json(&["projects", "list", "--json"]), serde_json::json!([]));

    // Another control plane without a token of its own; one that is down.
    let error = cli.fails(&["projects", "list", "--url", "http://127.0.0.1:9"]);
    assert!(error.contains("no token for http://127.0.0.1:9"), "{error}");
    let error = cli.fails(&["projects", "list", "--url", "http://127.0.0.1:9", "--token", "x"]);
    assert!(error.contains("cannot reach the control plane at http://127.0.0.1:9"), "{error}");
    assert!(error.contains("isocloud login --url"), "{error}");
}

/// Log lines as the runner reports them, through the in-process origin.
fn report(server: &Server, deployment_id: &str, batch_id: &str, lines: &[(&str, &str, Option<&str>)]) {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|(level, message, request_id)| {
            let mut event = serde_json::json!({
                "deployment_id": deployment_id, "timestamp": now,
                "type": "log", "level": level, "message": message,
            });
            if let Some(id) = request_id {
                event["request_id"] = (*id).into();
            }
            event
        })
        .collect();
    let batch: isocloud_origin::ActivityBatch =
        serde_json::from_value(serde_json::json!({ "batch_id": batch_id, "events": events })).unwrap();
    let origin = server.control_plane.origin();
    server.runtime.block_on(origin.report_activity(deployment_id, &batch)).expect("report activity");
}

fn report_logs(server: &Server, deployment_id: &str) {
    report(
        server,
        deployment_id,
        "batch-1",
        &[("info", "hello from the isolate", Some("req-1")), ("error", "second line", None)],
    );
}

/// `logs --follow` prints what arrives after it started, and exits 0 on Ctrl-C.
fn follow_logs_until_interrupted(cli: &Cli, server: &Server, deployment_id: &str) {
    let child = cli
        .command(&["logs", "-p", "hello", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    report(server, deployment_id, "batch-live", &[("info", "live line", None)]);
    std::thread::sleep(Duration::from_millis(1500));
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "Ctrl-C ends a follow with 0 ({}):\n{stderr}", output.status);
    assert!(stdout.contains("hello from the isolate"), "earlier lines first:\n{stdout}\n{stderr}");
    assert!(stdout.contains("live line"), "then new ones:\n{stdout}\n{stderr}");
}
