//! End-to-end test kit: the real `isocloud` binary on port 0 with its own
//! state dir, a real origin server on loopback that verifies the runner's RPC
//! JWTs, app folders, tokens minted by an independent JWT library, and
//! helpers to look at the processes the runner started.
#![allow(dead_code, reason = "each area uses a different part")]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

pub mod edge;
pub mod registry;
pub mod tls_probe;

pub const KID: &str = "acme";
pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// The repository root (for the pinned deno and the eszip tooling).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_owned()
}

pub fn deno_path() -> PathBuf {
    let path = repo_root().join(".isocloud/deno/bin/deno");
    assert!(path.is_file(), "the pinned deno is missing: run ./scripts/install-deno (scripts/test does)");
    path
}

// ------------------------------------------------------------------ runner

pub struct Runner {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state_dir: tempfile::TempDir,
    stderr: Arc<Mutex<String>>,
}

/// `args` of a `serve` or `runner`, with no pre-started isolates unless
/// they ask for them.
fn no_prestart_unless_asked<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut args = args.to_vec();
    if matches!(args.first(), Some(&"serve" | &"runner")) && !args.contains(&"--prestarted-isolates") {
        args.extend(["--prestarted-isolates", "0"]);
    }
    args
}

impl Runner {
    /// Starts `isocloud <args…>` with a free port, an admin port and its own
    /// state dir, and waits until it listens.
    pub fn start(args: &[&str]) -> Runner {
        Self::start_with_state(args, tempfile::tempdir().unwrap())
    }

    /// Like [`Runner::start`], on a given state dir (an earlier runner's,
    /// from [`Runner::take_state_dir`], to test a restart).
    ///
    /// Without pre-started isolates unless `args` ask for them: most tests
    /// count the runner's deno processes, one per deployment
    /// (`prestarted.rs` tests them, the control plane tests run with them).
    pub fn start_with_state(args: &[&str], state_dir: tempfile::TempDir) -> Runner {
        Self::start_with_lines(&no_prestart_unless_asked(args), state_dir, &[]).0
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Hands the state dir over (for a runner started after this one exited);
    /// this runner keeps an empty one.
    pub fn take_state_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.state_dir, tempfile::tempdir().unwrap())
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the runner's log (read by a thread) holds `text`.
    pub fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.stderr();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "the runner never logged {text:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A client that reaches `host` (any name) at this runner.
    pub fn client_for(&self, host: &str) -> reqwest::Client {
        reqwest::Client::builder().resolve(host, self.addr).timeout(Duration::from_secs(60)).build().unwrap()
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.addr.port())
    }

    /// GET `path` on `host` through the runner.
    pub async fn get(&self, host: &str, path: &str) -> reqwest::Response {
        self.client_for(host).get(self.url(host, path)).send().await.expect("request to the runner")
    }

    /// GET `path` of `deployment` the way a relay sends it: a fresh subhost
    /// token, no Host routing.
    pub async fn subhost_get(&self, deployment: &str, path: &str) -> reqwest::Response {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .get(format!("http://{}{path}", self.addr))
            .header("x-deno-subhost", subhost_token(claims_for(deployment)))
            .send()
            .await
            .expect("request to the runner")
    }

    /// The running isolates as the admin listener lists them (`/isolates`):
    /// `{pid, origin, deployment_id, tenant}` each, `pid` on the host.
    pub async fn isolates(&self) -> Vec<Value> {
        let response = reqwest::get(format!("http://{}/isolates", self.admin)).await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// The host pid of the one running isolate of `deployment_id` (in apps
    /// mode, the app's name). Isolates live in PID namespaces of their own,
    /// where `Deno.pid` is 1: this is how a test names the process.
    pub async fn isolate_pid(&self, deployment_id: &str) -> u32 {
        let isolates = self.isolates().await;
        let mine: Vec<&Value> = isolates.iter().filter(|i| i["deployment_id"] == deployment_id).collect();
        assert_eq!(mine.len(), 1, "one running isolate of {deployment_id}: {isolates:?}");
        mine[0]["pid"].as_u64().unwrap() as u32
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }

    /// The deno processes the runner started and that still run.
    pub fn isolate_pids(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// SIGTERM, then waits for the exit (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("isocloud did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory preconditions; pid is a child we started.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Pids whose parent is `parent`, read from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The command name may hold spaces and parens; fields follow the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) && fields.first() != Some(&"Z") {
            out.push(pid);
        }
    }
    out
}

pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, r)| !r.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

pub async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ------------------------------------------------------------------ apps

/// A folder of apps for `isocloud serve --apps`.
pub struct AppsDir {
    pub dir: tempfile::TempDir,
}

impl AppsDir {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    pub fn app(&self, name: &str, files: &[(&str, &str)]) -> &Self {
        for (path, text) in files {
            let full = self.dir.path().join(name).join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, text).unwrap();
        }
        self
    }

    pub fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    pub fn serve(&self, extra: &[&str]) -> Runner {
        let mut args = vec!["serve", "--apps", self.path()];
        args.extend_from_slice(extra);
        Runner::start(&args)
    }
}

// ------------------------------------------------------------------ tokens

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A relay token, minted by `jsonwebtoken` (not by the runner's own code).
pub fn subhost_token(claims: Value) -> String {
    token_with(jsonwebtoken::Algorithm::HS256, Some(KID), SECRET, claims)
}

pub fn token_with(alg: jsonwebtoken::Algorithm, kid: Option<&str>, secret: &str, claims: Value) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

pub fn claims_for(deployment_id: &str) -> Value {
    json!({ "deployment_id": deployment_id, "iat": now_s(), "exp": now_s() + 300 })
}

// ------------------------------------------------------------------ origin

/// One deployment as the test origin describes it.
#[derive(Clone, Default)]
pub struct TestDeployment {
    /// Sent verbatim as `x-deno-config` (a test may send garbage).
    pub config_header: String,
    pub inline_body: Bytes,
    pub tree: Option<Value>,
    /// Answer boot with this status instead of 200.
    pub boot_status: Option<u16>,
}

impl TestDeployment {
    pub fn config(config: Value) -> Self {
        Self { config_header: config.to_string(), ..Self::default() }
    }

    /// One bundle layer at `file:///src/main.js`, carried inline.
    pub fn inline_js(source: &str) -> Self {
        let mut d = Self::config(json!({
            "entrypoint": "file:///src/main.js",
            "layers": [{ "kind": "bundle", "id": "inline-main", "specifier": "file:///src/main.js" }],
            "inline_layer": "inline-main",
        }));
        d.inline_body = Bytes::from(source.to_owned());
        d
    }

    pub fn with(mut self, f: impl FnOnce(&mut Value)) -> Self {
        let mut config: Value = serde_json::from_str(&self.config_header).unwrap();
        f(&mut config);
        self.config_header = config.to_string();
        self
    }
}

#[derive(Default)]
pub struct OriginState {
    pub deployments: Mutex<HashMap<String, TestDeployment>>,
    pub layers: Mutex<HashMap<String, Bytes>>,
    pub blobs: Mutex<HashMap<String, Bytes>>,
    /// `rpc deployment_id[ layer_id|file_id]`, in arrival order.
    pub calls: Mutex<Vec<String>>,
    /// RPCs whose Authorization JWT did not verify.
    pub auth_failures: Mutex<Vec<String>>,
    pub activity: Mutex<Vec<Value>>,
    /// Boot answers wait this long first (a hanging origin).
    pub boot_delay: Mutex<Option<Duration>>,
    /// Layer answers with this status instead.
    pub layer_status: Mutex<Option<u16>>,
    /// read_tree answers with this status instead.
    pub tree_status: Mutex<Option<u16>>,
    /// read_tree waits this long before answering.
    pub tree_delay: Mutex<Option<Duration>>,
    /// Per boot answer: its deployment id and how many `calls` had arrived
    /// when it left (what the runner asked for while it waited).
    pub boot_answered: Mutex<Vec<(String, usize)>>,
    /// Deployments whose boot answer carries no `x-deno-config` header at all.
    pub omit_config_header: Mutex<HashSet<String>>,
    /// Subhosters besides `KID`/`SECRET` whose RPC JWTs verify: kid → secret.
    pub extra_subhosters: Mutex<HashMap<String, String>>,
    /// The `kid` of every RPC whose JWT verified, in arrival order.
    pub rpc_kids: Mutex<Vec<String>>,
    /// While set, `report_activity` answers this status and accepts nothing
    /// (an origin that fails, then recovers).
    pub activity_status: Mutex<Option<u16>>,
    /// Every `report_activity` body received, refused ones included, in
    /// arrival order (`activity` holds the accepted ones).
    pub activity_attempts: Mutex<Vec<Value>>,
}

pub struct TestOrigin {
    pub addr: SocketAddr,
    pub state: Arc<OriginState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestOrigin {
    pub async fn start() -> TestOrigin {
        let state = Arc::new(OriginState::default());
        let (addr, task) =
            serve_http(state.clone(), |state, request| async move { answer(&state, request).await }).await;
        TestOrigin { addr, state, task }
    }

    pub fn rpc_root(&self) -> String {
        format!("http://{}/v0/", self.addr)
    }

    pub fn deploy(&self, id: &str, deployment: TestDeployment) {
        self.state.deployments.lock().unwrap().insert(id.to_owned(), deployment);
    }

    pub fn layer(&self, id: &str, bytes: impl Into<Bytes>) {
        self.state.layers.lock().unwrap().insert(id.to_owned(), bytes.into());
    }

    pub fn blob(&self, id: &str, bytes: impl Into<Bytes>) {
        self.state.blobs.lock().unwrap().insert(id.to_owned(), bytes.into());
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.calls.lock().unwrap().clone()
    }

    /// The calls that fetch a deployment (all but `report_activity`, which
    /// the runner's spool delivers in its own time, after the request that
    /// caused it has been answered).
    pub fn fetch_calls(&self) -> Vec<String> {
        self.calls().into_iter().filter(|call| !call.starts_with("report_activity")).collect()
    }

    /// Also accept RPC JWTs signed by subhoster `kid` with `secret`.
    pub fn accept_subhoster(&self, kid: &str, secret: &str) {
        self.state.extra_subhosters.lock().unwrap().insert(kid.to_owned(), secret.to_owned());
    }

    /// Boot answers for `id` leave out the `x-deno-config` header.
    pub fn omit_config_header(&self, id: &str) {
        self.state.omit_config_header.lock().unwrap().insert(id.to_owned());
    }

    pub fn calls_to(&self, rpc: &str) -> usize {
        self.calls().iter().filter(|c| c.split(' ').next() == Some(rpc)).count()
    }

    /// `report_activity` answers `status` (e.g. 503) until called with `None`.
    pub fn fail_activity(&self, status: Option<u16>) {
        *self.state.activity_status.lock().unwrap() = status;
    }

    /// Every `report_activity` body received, refused ones included.
    pub fn activity_attempts(&self) -> Vec<Value> {
        self.state.activity_attempts.lock().unwrap().clone()
    }

    /// The accepted `report_activity` bodies.
    pub fn activity_batches(&self) -> Vec<Value> {
        self.state.activity.lock().unwrap().clone()
    }

    pub fn activity_events(&self) -> Vec<Value> {
        self.state
            .activity
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// [`TestOrigin::runner`] on a given state dir.
    pub fn runner_with_state(&self, extra: &[&str], state_dir: tempfile::TempDir) -> Runner {
        let secret = format!("{KID}={SECRET}");
        let root = self.rpc_root();
        let mut args = vec!["runner", "--rpc-root", &root, "--subhost-secret", &secret];
        args.extend_from_slice(extra);
        Runner::start_with_state(&args, state_dir)
    }

    /// A runner in subhosting mode pointed at this origin.
    pub fn runner(&self, extra: &[&str]) -> Runner {
        let secret = format!("{KID}={SECRET}");
        let root = self.rpc_root();
        let mut args = vec!["runner", "--rpc-root", &root, "--subhost-secret", &secret];
        args.extend_from_slice(extra);
        Runner::start(&args)
    }
}

/// An HTTP/1.1 and h2c server on a free loopback port answering every
/// request with `answer(state, request)`; aborting the task stops it.
pub async fn serve_http<S, F, Fut>(state: Arc<S>, answer: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (state, answer) = (state.clone(), answer.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let reply = answer(state.clone(), request);
                    async move { Ok::<_, std::convert::Infallible>(reply.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

fn reply(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
}

/// Checks the runner's RPC JWT the way a subhoster's origin would; returns
/// the kid it was signed as.
fn verify_rpc_jwt(
    state: &OriginState,
    request: &Request<hyper::body::Incoming>,
    deployment_id: &str,
) -> Result<String, String> {
    let header = request.headers().get("authorization").ok_or("no Authorization header")?;
    let token = header.to_str().map_err(|e| e.to_string())?.strip_prefix("Bearer ").ok_or("not a Bearer token")?;
    let decoded_header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = decoded_header.kid.clone().unwrap_or_default();
    let secret = match kid.as_str() {
        KID => SECRET.to_owned(),
        other => state
            .extra_subhosters
            .lock()
            .unwrap()
            .get(other)
            .cloned()
            .ok_or_else(|| format!("kid {:?}", decoded_header.kid))?,
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp"]);
    let data =
        jsonwebtoken::decode::<Value>(token, &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()), &validation)
            .map_err(|e| e.to_string())?;
    if data.claims["deployment_id"] != deployment_id {
        return Err(format!("claim deployment_id {} != query {deployment_id}", data.claims["deployment_id"]));
    }
    if data.claims["iat"].as_u64().is_none() {
        return Err("no iat".into());
    }
    Ok(kid)
}

async fn answer(state: &OriginState, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let query: HashMap<String, String> = request.uri().query().map(url_pairs).unwrap_or_default();
    let deployment_id = query.get("deployment_id").cloned().unwrap_or_default();
    let rpc = request.uri().path().strip_prefix("/v0/").unwrap_or("").to_owned();
    let detail = query.get("layer_id").or(query.get("file_id")).cloned().unwrap_or_default();
    state.calls.lock().unwrap().push(format!("{rpc} {deployment_id} {detail}").trim_end().to_owned());
    match verify_rpc_jwt(state, &request, &deployment_id) {
        Ok(kid) => state.rpc_kids.lock().unwrap().push(kid),
        Err(e) => {
            state.auth_failures.lock().unwrap().push(format!("{rpc}: {e}"));
            return reply(401, "bad rpc token");
        }
    }
    match rpc.as_str() {
        "boot" => {
            let delay = *state.boot_delay.lock().unwrap();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let arrived = state.calls.lock().unwrap().len();
            state.boot_answered.lock().unwrap().push((deployment_id.clone(), arrived));
            let Some(d) = state.deployments.lock().unwrap().get(&deployment_id).cloned() else {
                return reply(404, "no such deployment");
            };
            if let Some(status) = d.boot_status {
                return reply(status, "boot refused");
            }
            let mut response = reply(200, d.inline_body.clone());
            if !state.omit_config_header.lock().unwrap().contains(&deployment_id) {
                response.headers_mut().insert("x-deno-config", d.config_header.parse().unwrap());
            }
            response
        }
        "layer" => {
            if let Some(status) = *state.layer_status.lock().unwrap() {
                return reply(status, "layer refused");
            }
            match state.layers.lock().unwrap().get(&detail) {
                Some(bytes) => reply(200, bytes.clone()),
                None => reply(404, "no such layer"),
            }
        }
        "read_tree" => {
            let delay = *state.tree_delay.lock().unwrap();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = *state.tree_status.lock().unwrap() {
                return reply(status, "tree refused");
            }
            let tree = state.deployments.lock().unwrap().get(&deployment_id).and_then(|d| d.tree.clone());
            reply(200, tree.unwrap_or_else(|| json!({ "entries": { "": { "kind": "directory" } } })).to_string())
        }
        "read_blob" => match state.blobs.lock().unwrap().get(&detail) {
            Some(bytes) => reply(200, bytes.clone()),
            None => reply(404, "no such blob"),
        },
        "report_activity" => {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let batch: Value = serde_json::from_slice(&body).unwrap();
            state.activity_attempts.lock().unwrap().push(batch.clone());
            if let Some(status) = *state.activity_status.lock().unwrap() {
                return reply(status, "activity refused");
            }
            state.activity.lock().unwrap().push(batch);
            reply(200, "")
        }
        _ => reply(404, "unknown rpc"),
    }
}

fn url_pairs(query: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(query.as_bytes()).into_owned().collect()
}

// ------------------------------------------------------------------ eszip

/// Builds an ESZIP of the app in `dir` (served as `file:///src/…`) with the
/// npm package `@deno/eszip`, run by node.
pub fn build_eszip(dir: &Path, entry: &str, remote: Option<&Path>) -> Vec<u8> {
    build_eszip_with_import_map(dir, entry, remote, None)
}

/// [`build_eszip`], resolving with the import map at `import_map` (a
/// specifier, as `@deno/eszip`'s third argument): the archive carries it.
pub fn build_eszip_with_import_map(
    dir: &Path,
    entry: &str,
    remote: Option<&Path>,
    import_map: Option<&str>,
) -> Vec<u8> {
    build_eszip_at(dir, entry, remote, import_map, "file:///src/")
}

/// [`build_eszip_with_import_map`] with the app's files at `base` (e.g.
/// `file://<slug>/v1/`, as some subhosters' bundlers name them).
pub fn build_eszip_at(dir: &Path, entry: &str, remote: Option<&Path>, import_map: Option<&str>, base: &str) -> Vec<u8> {
    let mut args = vec!["--base", base];
    let remote = remote.map(|r| r.to_string_lossy().into_owned());
    if let Some(remote) = &remote {
        args.extend(["--remote", remote]);
    }
    if let Some(import_map) = import_map {
        args.extend(["--import-map", import_map]);
    }
    build_eszip_with_args(dir, entry, &args)
}

/// `tools/eszip/build.mjs --root dir … entry` with `args` (its options,
/// e.g. `--rename-ts-to-tsx`): the archive's bytes.
pub fn build_eszip_with_args(dir: &Path, entry: &str, args: &[&str]) -> Vec<u8> {
    let root = repo_root();
    let script = root.join("tools/eszip/build.mjs");
    assert!(
        root.join("tools/eszip/node_modules").is_dir(),
        "tools/eszip/node_modules is missing: run `npm ci --prefix tools/eszip` (scripts/test does)"
    );
    let out = dir.join("out.eszip2");
    let output = Command::new("node")
        .arg(&script)
        .arg("--root")
        .arg(dir)
        .arg("--out")
        .arg(&out)
        .args(args)
        .arg(entry)
        .output()
        .expect("node runs");
    assert!(output.status.success(), "eszip build failed: {}", String::from_utf8_lossy(&output.stderr));
    std::fs::read(out).unwrap()
}

/// Unpadded base64url (RFC 4648 §5), for hand-made tokens and configs.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Parses the runner's JSON error answer and checks code, header and status.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(response.status().as_u16(), status, "status for {code}");
    assert_eq!(
        response.headers().get("x-isocloud-error").map(|v| v.to_str().unwrap().to_owned()).as_deref(),
        Some(code)
    );
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    body["error"]["message"].as_str().unwrap_or_default().to_owned()
}

/// The value of the series `series` (name and labels, as printed) in the
/// Prometheus text, as a whole number; 0 when it is absent.
pub fn metric_value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .unwrap_or(0)
}

/// Whether the Prometheus text has a line starting with `sample` (a whole
/// metric name, so a prefixed or suffixed name does not count).
pub fn has_metric(metrics: &str, sample: &str) -> bool {
    metrics.lines().any(|line| line.starts_with(sample))
}

// ------------------------------------------------------------------ control plane

impl Runner {
    /// Like [`Runner::start_with_state`], and also waits (30 s at most) for a
    /// stdout line starting with each of `prefixes`, in any order; returns
    /// the rest of each such line, in the order of `prefixes`.
    pub fn start_with_lines(args: &[&str], state_dir: tempfile::TempDir, prefixes: &[&str]) -> (Runner, Vec<String>) {
        Self::start_command(Command::new(env!("CARGO_BIN_EXE_isocloud")), args, state_dir, prefixes)
    }

    /// Like [`Runner::start`], in a mount namespace of its own where an
    /// empty tmpfs covers `/sys/fs/cgroup`: a machine without usable
    /// cgroups, where the runner enforces the memory cap by reading each
    /// isolate's resident memory. Needs root (`unshare`, `mount`).
    pub fn start_without_cgroups(args: &[&str]) -> Runner {
        let args = no_prestart_unless_asked(args);
        let mut command = Command::new("unshare");
        command.args(["--mount", "--propagation", "private", "sh", "-c"]);
        // `exec`: the runner is the child this handle kills and waits for.
        command.arg("mount -t tmpfs none /sys/fs/cgroup && exec \"$0\" \"$@\"").arg(env!("CARGO_BIN_EXE_isocloud"));
        Self::start_command(command, &args, tempfile::tempdir().unwrap(), &[]).0
    }

    fn start_command(
        mut command: Command,
        args: &[&str],
        state_dir: tempfile::TempDir,
        prefixes: &[&str],
    ) -> (Runner, Vec<String>) {
        let mut child = command
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir.path())
            .arg("--deno")
            .arg(deno_path())
            .env("ISOCLOUD_LOG", "info,isocloud::tenant=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn isocloud");
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                if std::env::var_os("ISOCLOUD_TEST_VERBOSE").is_some() {
                    eprintln!("[runner] {line}");
                }
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut addr = None;
        let mut admin = None;
        let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
        let deadline = Instant::now() + Duration::from_secs(30);
        while addr.is_none() || admin.is_none() || found.iter().any(Option::is_none) {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "isocloud did not print every line of {prefixes:?} (and its listeners); stderr:\n{}",
                        stderr.lock().unwrap()
                    );
                }
            };
            if let Some(rest) = line.strip_prefix("isocloud: admin on http://") {
                admin = Some(rest.parse().unwrap());
            }
            // `https://` when the runner's listener speaks TLS (--tls-cert).
            let listening = line.strip_prefix("isocloud: listening on http://");
            if let Some(rest) = listening.or_else(|| line.strip_prefix("isocloud: listening on https://")) {
                addr = Some(rest.parse().unwrap());
            }
            for (prefix, slot) in prefixes.iter().zip(found.iter_mut()) {
                if let Some(rest) = line.strip_prefix(prefix) {
                    *slot = Some(rest.to_owned());
                }
            }
        }
        let runner = Runner { child: Some(child), addr: addr.unwrap(), admin: admin.unwrap(), state_dir, stderr };
        (runner, found.into_iter().map(Option::unwrap).collect())
    }
}

/// An `isocloud runner` in subhosting mode fed by the control plane's
/// origin listener at `origin` (subhoster `KID`, key `secret`), with room
/// for slow test machines (`--cpu-limit-ms 5000`), then `extra`.
pub fn runner_fed_by(origin: SocketAddr, secret: &str, extra: &[&str]) -> Runner {
    runner_fed_by_root(&format!("http://{origin}/"), secret, extra)
}

/// [`runner_fed_by`] an origin listener at `rpc_root` (`https://…` for one
/// serving TLS).
pub fn runner_fed_by_root(rpc_root: &str, secret: &str, extra: &[&str]) -> Runner {
    let key = format!("{KID}={secret}");
    let args = ["runner", "--rpc-root", rpc_root, "--subhost-secret", &key, "--cpu-limit-ms", "5000"];
    Runner::start(&[&args[..], extra].concat())
}

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files in `dir`:
/// the CA's, the certificate's and its key's paths.
pub fn origin_certificate(dir: &std::path::Path) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "isocloud test origin CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let paths =
        [("ca.pem", ca.pem()), ("origin.pem", cert.pem()), ("origin.key", key.serialize_pem())].map(|(name, pem)| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path.to_str().unwrap().to_owned()
        });
    let [ca, cert, key] = paths;
    (ca, cert, key)
}

/// `isocloud serve` with the built-in control plane: the runner (public
/// listener), the control plane's listener, and the data dir holding the
/// database and the admin token.
pub struct ControlPlaneServe {
    pub runner: Runner,
    pub control: SocketAddr,
    /// The public HTTPS listener, when started with `--tls-listen`.
    pub tls: Option<SocketAddr>,
    /// The origin listener, when started with `--origin-listen`.
    pub origin: Option<SocketAddr>,
    pub data_dir: tempfile::TempDir,
    pub base_domain: String,
}

impl ControlPlaneServe {
    /// Starts `isocloud serve --data DIR --control-listen 127.0.0.1:0
    /// --base-domain localhost <extra…>` on a fresh data dir.
    pub fn start(extra: &[&str]) -> ControlPlaneServe {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// `start` with `--origin-listen 127.0.0.1:0`, the test key
    /// (`KID=SECRET`) as its origin secret and no pre-started isolates,
    /// then `extra`; also the origin listener's address (for runners and
    /// edges fed by it).
    pub fn start_with_origin(extra: &[&str]) -> (ControlPlaneServe, SocketAddr) {
        let key = format!("{KID}={SECRET}");
        let mut args =
            vec!["--origin-listen", "127.0.0.1:0", "--origin-secret", key.as_str(), "--prestarted-isolates", "0"];
        args.extend_from_slice(extra);
        let serve = Self::start(&args);
        let origin = serve.origin.expect("started with --origin-listen");
        (serve, origin)
    }

    /// [`ControlPlaneServe::start`] on a given data dir (a restart keeps it).
    /// With `--tls-listen` or `--origin-listen` in `extra`, also waits for
    /// that listener.
    pub fn start_in(data_dir: tempfile::TempDir, extra: &[&str]) -> ControlPlaneServe {
        let data = data_dir.path().to_str().unwrap().to_owned();
        let base_domain = "localhost".to_owned();
        let mut args =
            vec!["serve", "--data", &data, "--control-listen", "127.0.0.1:0", "--base-domain", base_domain.as_str()];
        args.extend_from_slice(extra);
        const TLS: &str = "isocloud: tls on https://";
        // With --origin-tls-cert the origin listener speaks TLS only.
        let origin_tls = extra.contains(&"--origin-tls-cert");
        let origin_line = if origin_tls { "isocloud: origin on https://" } else { "isocloud: origin on http://" };
        let mut prefixes = vec!["isocloud: control plane on http://"];
        if extra.contains(&"--tls-listen") {
            prefixes.push(TLS);
        }
        if extra.contains(&"--origin-listen") {
            prefixes.push(origin_line);
        }
        let (runner, lines) = Runner::start_with_lines(&args, tempfile::tempdir().unwrap(), &prefixes);
        let address_of = |prefix: &str| {
            let line = prefixes.iter().position(|p| *p == prefix).map(|i| &lines[i]);
            line.map(|line| line.trim().parse().unwrap_or_else(|e| panic!("{prefix}{line}: {e}")))
        };
        let control = lines[0].trim().parse().expect("the control plane's address");
        let (tls, origin) = (address_of(TLS), address_of(origin_line));
        let serve = ControlPlaneServe { runner, control, tls, origin, data_dir, base_domain };
        let token_file = serve.admin_token_file();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !token_file.is_file() {
            assert!(
                Instant::now() < deadline,
                "no admin token at {}; stderr:\n{}",
                token_file.display(),
                serve.runner.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    /// `method /api/v1<path>` with the admin token and an optional JSON
    /// body: the status, and the answer as JSON (or as a string when it is
    /// not JSON).
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}/api/v1{path}", self.control_url()))
            .bearer_auth(self.admin_token());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.data_dir.path().join("admin-token")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.admin_token_file()).expect("the admin token").trim().to_owned()
    }

    /// The control plane's base URL (the dashboard is at `/`, the API at `/api/v1`).
    pub fn control_url(&self) -> String {
        format!("http://{}", self.control)
    }

    /// The runner's public base URL (route by Host `<project>.<base domain>`).
    pub fn public_url(&self) -> String {
        format!("http://{}", self.runner.addr)
    }
}

/// Runs `command` to its end, killing it after `timeout`; returns its exit
/// status (None when killed), stdout and stderr.
pub fn run_with_timeout(
    command: &mut Command,
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let mut child =
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn the command");
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
            }
            text
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let err = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// Runs the `isocloud` client against the control plane at `control_url`
/// with its own config dir; returns stdout, panicking with both streams on
/// failure.
pub fn isocloud_cli(control_url: &str, token: &str, config: &Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_isocloud"))
        .args(args)
        .env("ISOCLOUD_CONFIG_DIR", config)
        .env("ISOCLOUD_URL", control_url)
        .env("ISOCLOUD_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .expect("run the isocloud client");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "isocloud {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A deployment that calls itself (its own `request.url`) with the subhost
/// token in its `TOKEN` env; the chain of answers says how far the hops went.
pub const LOOPER: &str = r#"
Deno.serve(async (req) => {
  const res = await fetch(req.url, { headers: { "x-deno-subhost": Deno.env.get("TOKEN") } });
  const inner = await res.text();
  return new Response(`${res.status}:${res.headers.get("x-isocloud-error") ?? ""}|${inner}`);
});
"#;
