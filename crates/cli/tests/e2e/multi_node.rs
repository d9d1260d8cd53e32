//! Many machines on loopback (issue 15 item 5): one PostgreSQL, one S3
//! server (Garage), two control-plane nodes (`isocloud serve` on the same
//! database and bucket, each with its own data and state dirs and an origin
//! listener), three `isocloud runner`s (one fed by node A, two by node B)
//! and one `isocloud edge` following node A's routing feed. Apps deployed
//! with the CLI against either node are served through the edge by Host; a
//! runner killed under load costs no request and its deployments move to
//! the next runner of the ranking; with node A killed, node B's API and
//! origin RPCs keep answering and the runner fed by A re-boots from its
//! last boot answers; node A restarted on the same database, bucket and
//! dirs has lost nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isocloud_controlplane::blobs::test_s3::{REGION, TestS3};

use crate::support::edge::{Edge, isolates_of, ranking};
use crate::support::{KID, Runner, SECRET, isocloud_cli, metric_value, runner_fed_by};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

// ------------------------------------------------------------------ PostgreSQL

/// A throwaway PostgreSQL cluster for this test: `initdb` into a temp dir,
/// `postgres` on a free loopback port, fsync off; as the `postgres` user
/// when we are root (PostgreSQL refuses root). Fast shutdown on drop.
struct Postgres {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        crate::support::signal(self.child.id(), libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Postgres {
    /// None (noted on stderr) when PostgreSQL is not installed; under
    /// `CI=true` that fails the test.
    fn start() -> Option<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|dir| {
            let mut found: Vec<(u32, PathBuf)> = dir
                .flatten()
                .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
                .filter(|(_, bin)| bin.join("initdb").is_file())
                .collect();
            found.sort();
            found.pop().map(|(_, bin)| bin)
        });
        let Some(bin) = bin else {
            assert!(!ci(), "no PostgreSQL (CI=true): run scripts/install-postgres (scripts/test does)");
            eprintln!("skipped: PostgreSQL is not installed; run scripts/install-postgres");
            return None;
        };
        // SAFETY: geteuid has no preconditions.
        let user = (unsafe { libc::geteuid() } == 0).then(postgres_user);
        let dir = tempfile::Builder::new().prefix("isocloud-pg-").tempdir().unwrap();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let output = as_user(Command::new(bin.join("initdb")), user)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .expect("run initdb");
        assert!(output.status.success(), "initdb: {}", String::from_utf8_lossy(&output.stderr));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        let child = as_user(Command::new(bin.join("postgres")), user)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        let mut server = Postgres { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Some(server);
            }
            let log = || std::fs::read_to_string(server._dir.path().join("postgres.log")).unwrap_or_default();
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("postgres exited ({status}):\n{}", log());
            }
            assert!(Instant::now() < deadline, "postgres not ready within 30 s:\n{}", log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

/// The uid and gid of the `postgres` user (the Debian package makes it).
fn postgres_user() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the entry is read at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!entry.is_null(), "running as root, but there is no `postgres` user to run PostgreSQL as");
    // SAFETY: non-null pointer returned by getpwnam.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

fn as_user(mut command: Command, user: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = user {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    command
}

// ------------------------------------------------------------------ roles

/// One control-plane node: `isocloud serve` with its API, its origin
/// listener and its own data dir.
struct Node {
    serve: Runner,
    control: SocketAddr,
    origin: SocketAddr,
    data_dir: tempfile::TempDir,
}

/// What the nodes share: the database, the bucket, the origin key.
struct Shared {
    database_url: String,
    blob_flags: Vec<String>,
}

impl Node {
    /// Starts a node on `data_dir` and `state_dir`, its origin listener on
    /// `origin` (port 0: a free one).
    fn start(shared: &Shared, data_dir: tempfile::TempDir, state_dir: tempfile::TempDir, origin: &str) -> Node {
        let data = data_dir.path().to_str().unwrap().to_owned();
        let key = format!("{KID}={SECRET}");
        let mut args = vec!["serve", "--data", &data, "--database-url", &shared.database_url];
        args.extend(["--control-listen", "127.0.0.1:0", "--base-domain", "localhost"]);
        args.extend(["--origin-listen", origin, "--origin-secret", &key, "--prestarted-isolates", "0"]);
        args.extend(shared.blob_flags.iter().map(String::as_str));
        let prefixes = ["isocloud: control plane on http://", "isocloud: origin on http://"];
        let (serve, lines) = Runner::start_with_lines(&args, state_dir, &prefixes);
        let control = lines[0].trim().parse().expect("the control plane's address");
        let origin = lines[1].trim().parse().expect("the origin listener's address");
        Node { serve, control, origin, data_dir }
    }

    fn control_url(&self) -> String {
        format!("http://{}", self.control)
    }
}

/// A runner fed by `origin` (a node's origin listener); isolates idle out
/// after 1 s, so a stale boot can be seen quickly.
fn runner(origin: SocketAddr) -> Runner {
    runner_fed_by(origin, SECRET, &["--idle-timeout-s", "1", "--origin-timeout-s", "2"])
}

/// Answers `NAME METHOD PATH`.
fn write_app(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("main.ts"),
        format!("Deno.serve((req) => new Response(`{name} ${{req.method}} ${{new URL(req.url).pathname}}`));\n"),
    )
    .unwrap();
}

/// Creates project `name` through `node` (unless it exists) and deploys
/// its app to production; the deployment id.
fn deploy(node: &Node, token: &str, work: &Path, name: &str, create: bool) -> String {
    let config = work.join("config");
    let cli = |args: &[&str]| isocloud_cli(&node.control_url(), token, &config, args);
    if create {
        cli(&["projects", "create", name]);
    }
    let app = work.join(name);
    write_app(&app, name);
    let out = cli(&["deploy", "--project", name, "--prod", app.to_str().unwrap()]);
    let host = out.lines().last().unwrap().trim().strip_prefix("http://").unwrap().split(':').next().unwrap();
    host.strip_prefix(&format!("{name}-")).and_then(|h| h.strip_suffix(".localhost")).unwrap().to_owned()
}

/// One GET of the load: when it was sent, the host, status and body.
type Sample = (Instant, String, u16, String);

#[tokio::test]
async fn two_control_planes_one_edge_three_runners_survive_a_runner_and_a_node() {
    let started = Instant::now();
    let Some(postgres) = Postgres::start() else { return };
    let Some(s3) = TestS3::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let secret_file = work.path().join("s3-secret");
    std::fs::write(&secret_file, format!("{}\n", s3.secret_access_key)).unwrap();
    let shared = Shared {
        database_url: postgres.url(),
        blob_flags: vec![
            "--blob-store".into(),
            s3.url("multi/blobs"),
            "--blob-store-endpoint".into(),
            s3.endpoint.clone(),
            "--blob-store-region".into(),
            REGION.into(),
            "--blob-store-access-key-id".into(),
            s3.access_key_id.clone(),
            "--blob-store-secret-access-key-file".into(),
            secret_file.to_str().unwrap().into(),
        ],
    };

    // Node A first: it makes the admin token (one per database); node B
    // then finds a token in the database and writes none.
    let node_a = Node::start(&shared, tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), "127.0.0.1:0");
    let token_file = node_a.data_dir.path().join("admin-token");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !token_file.is_file() {
        assert!(Instant::now() < deadline, "no admin token:\n{}", node_a.serve.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_owned();
    let node_b = Node::start(&shared, tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), "127.0.0.1:0");
    assert!(!node_b.data_dir.path().join("admin-token").exists(), "node B made a second admin token");

    // One runner fed by node A, two by node B.
    let fed_by_a = runner(node_a.origin);
    let fed_by_b = [runner(node_b.origin), runner(node_b.origin)];
    let all = [&fed_by_a, &fed_by_b[0], &fed_by_b[1]];
    let edge = Edge::start(node_a.origin, &all, &["--health-interval-ms", "200"]);
    println!("started in {} ms", started.elapsed().as_millis());

    // 1. Deploy alpha through node A, beta through node B: each served
    // through the edge by Host, on the runner its ranking puts first. The
    // runner to kill below must leave one runner fed by B: until a B-fed
    // runner is first for alpha or beta, alpha is deployed again.
    let mut alpha = deploy(&node_a, &token, work.path(), "alpha", true);
    let beta = deploy(&node_b, &token, work.path(), "beta", true);
    let b_first = |id: &str| fed_by_b.iter().any(|r| std::ptr::eq(ranking(id, &all)[0], r));
    for _ in 0..20 {
        if b_first(&alpha) || b_first(&beta) {
            break;
        }
        alpha = deploy(&node_a, &token, work.path(), "alpha", false);
    }
    let (moving, moving_host) = if b_first(&alpha) { (alpha.clone(), "alpha") } else { (beta.clone(), "beta") };
    assert!(b_first(&moving), "neither alpha nor beta ranks a runner fed by B first");
    for (host, name) in [("alpha.localhost", "alpha"), ("beta.localhost", "beta")] {
        assert_eq!(edge.wait_served(host).await, format!("{name} GET /"), "through the edge");
    }
    assert_eq!(edge.try_text("nope.localhost", "/").await.0, 404);
    assert_eq!(edge.try_text(&format!("alpha-{alpha}.localhost"), "/x").await, (200, "alpha GET /x".to_owned()));
    assert_eq!(edge.try_text(&format!("beta-{beta}.localhost"), "/x").await, (200, "beta GET /x".to_owned()));
    for id in [&alpha, &beta] {
        let first = ranking(id, &all)[0];
        for runner in all {
            let expected = usize::from(std::ptr::eq(runner, first));
            assert_eq!(isolates_of(runner, id).await, expected, "{id} on {}", runner.addr);
        }
    }
    println!("step 1 (deploys through A and B, served by Host) done at {} ms", started.elapsed().as_millis());

    // 2. Kill the B-fed runner `moving` is on, under a loop of GETs of both
    // apps: no GET fails, and `moving` is served by the next runner of its
    // ranking.
    let rank = ranking(&moving, &all);
    let victim_index = fed_by_b.iter().position(|r| std::ptr::eq(r, rank[0])).unwrap();
    let next_is_a = std::ptr::eq(rank[1], &fed_by_a);
    let [b0, b1] = fed_by_b;
    let (victim, survivor_b) = if victim_index == 0 { (b0, b1) } else { (b1, b0) };
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let edge = Arc::new(edge);
    let load: Vec<_> = ["alpha", "beta", "alpha", "beta"]
        .into_iter()
        .map(|name| {
            let (edge, stop, samples) = (edge.clone(), stop.clone(), samples.clone());
            tokio::spawn(async move {
                let host = format!("{name}.localhost");
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let (status, body) = edge.try_text(&host, "/load").await;
                    samples.lock().unwrap().push((sent, name.to_owned(), status, body));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    drop(victim); // SIGKILL
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // While the load still runs (isolates idle out after 1 s).
    let next_runner = if next_is_a { &fed_by_a } else { &survivor_b };
    assert_eq!(isolates_of(next_runner, &moving).await, 1, "{moving_host} moved to the next runner of its ranking");
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let after: Vec<&Sample> = samples.iter().filter(|s| s.0 >= killed_at).collect();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.2 != 200).collect();
    println!(
        "step 2: {} GETs ({} sent after the kill), {} failed, at {} ms",
        samples.len(),
        after.len(),
        failed.len(),
        started.elapsed().as_millis()
    );
    assert!(after.len() >= 10, "too few GETs after the kill: {}", after.len());
    for (_, name, status, body) in &samples {
        assert_eq!((*status, body.as_str()), (200, format!("{name} GET /load").as_str()), "edge:\n{}", edge.stderr());
    }

    // 3. Kill node A (SIGKILL). Node B's API answers (list, deploy); its
    // origin RPCs feed the B-fed runner, which boots a deployment made
    // after A died. The runner fed by A: warm deployments keep being
    // served; one that idled out boots from its last boot answer (a stale
    // boot); one it never booted cannot boot while A is away (502).
    // Warm both apps on the A-fed runner first (so it keeps their answers).
    for id in [&alpha, &beta] {
        let response = fed_by_a.subhost_get(id, "/").await;
        assert_eq!(response.status(), 200, "{}", fed_by_a.stderr());
    }
    let Node { serve: mut serve_a, origin: origin_a, data_dir: data_a, .. } = node_a;
    let state_a = serve_a.take_state_dir();
    drop(serve_a); // SIGKILL
    let listed = isocloud_cli(&node_b.control_url(), &token, &work.path().join("config"), &["projects", "list"]);
    assert!(listed.contains("alpha") && listed.contains("beta"), "{listed}");
    let gamma = deploy(&node_b, &token, work.path(), "gamma", true);
    let response = survivor_b.subhost_get(&gamma, "/").await;
    assert_eq!(response.status(), 200, "{}", survivor_b.stderr());
    assert_eq!(response.text().await.unwrap(), "gamma GET /");
    // Through the edge, alpha and beta are served from the table it holds.
    for name in ["alpha", "beta"] {
        assert_eq!(edge.try_text(&format!("{name}.localhost"), "/").await, (200, format!("{name} GET /")));
    }
    // The A-fed runner: alpha idles out there, then boots stale.
    let deadline = Instant::now() + Duration::from_secs(10);
    while isolates_of(&fed_by_a, &alpha).await > 0 {
        assert!(Instant::now() < deadline, "alpha never idled out on the A-fed runner");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stale_before = metric_value(&fed_by_a.metrics().await, "isocloud_stale_boots_total");
    let response = fed_by_a.subhost_get(&alpha, "/").await;
    assert_eq!(response.status(), 200, "stale boot on the A-fed runner:\n{}", fed_by_a.stderr());
    assert_eq!(response.text().await.unwrap(), "alpha GET /");
    let stale = metric_value(&fed_by_a.metrics().await, "isocloud_stale_boots_total") - stale_before;
    assert_eq!(stale, 1, "alpha booted from its last answer");
    let response = fed_by_a.subhost_get(&gamma, "/").await;
    let gamma_on_a_fed = response.status().as_u16();
    println!(
        "step 3: node A down: B lists and deploys, gamma served by the B-fed runner, alpha booted stale on the \
         A-fed runner; gamma on the A-fed runner: {gamma_on_a_fed} ({}); at {} ms",
        response.text().await.unwrap_or_default(),
        started.elapsed().as_millis()
    );
    assert_eq!(gamma_on_a_fed, 502, "a deployment the A-fed runner never booted cannot boot with A away");

    // 4. Restart node A on the same database, bucket, dirs and origin
    // address: every project and deployment is listed, every app served
    // through the edge (gamma once the edge has A's table again), and the
    // A-fed runner boots gamma.
    let node_a = Node::start(&shared, data_a, state_a, &origin_a.to_string());
    assert_eq!(node_a.origin, origin_a);
    let config = work.path().join("config");
    let cli = |args: &[&str]| isocloud_cli(&node_a.control_url(), &token, &config, args);
    let listed = cli(&["projects", "list"]);
    for name in ["alpha", "beta", "gamma"] {
        assert!(listed.contains(name), "{name} in {listed}");
    }
    for (name, id) in [("alpha", &alpha), ("beta", &beta), ("gamma", &gamma)] {
        let deployments = cli(&["deployments", "--project", name]);
        assert!(deployments.contains(id.as_str()), "{id} in {deployments}");
    }
    for name in ["alpha", "beta", "gamma"] {
        assert_eq!(edge.wait_served(&format!("{name}.localhost")).await, format!("{name} GET /"));
    }
    let response = fed_by_a.subhost_get(&gamma, "/").await;
    assert_eq!(response.status(), 200, "{}", fed_by_a.stderr());
    println!("step 4 (node A restarted, nothing lost) done at {} ms", started.elapsed().as_millis());
    drop(node_b);
}
