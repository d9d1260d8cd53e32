//! One running isolate: its process, the HTTP connections into it, and the
//! control channel out of it.
//!
//! This crate owns an isolate from spawn to exit: it starts the
//! [`SandboxedCommand`] the sandbox built, waits until the harness says it
//! serves (or why it cannot) — or, for a pre-started isolate, until the
//! harness waits for its deployment, which [`Prestarted::assign`] hands it
//! over the control socket — forwards requests over keep-alive HTTP/1.1
//! connections on the isolate's unix socket, relays the harness's reports
//! (console output with request ids, asset reads) to [`IsolateHooks`], and
//! notices when the process exits. It must not decide which deployment runs
//! or for how long (the pool does), and it never talks to an origin itself.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use isocloud_egress::{EgressGrant, EgressUsage, HopGuard};
use isocloud_protocol::{ErrorCode, LogLevel};
use isocloud_sandbox::{IsolateCgroup, IsolateFiles, SIGKILL, SIGTERM, SandboxedCommand, signal_process_group};
use serde::Deserialize;
use std::collections::HashMap;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

mod lifetime;
mod monitor;
use lifetime::{Count, HELD, Lifetime, LifetimeOwner, breach};
pub use lifetime::{Held, held};
use monitor::{MonitorLink, monitor};

/// What the runner does with an isolate's reports. Implemented by the pool,
/// which knows the deployment and its origin.
pub trait IsolateHooks: Send + Sync + 'static {
    /// A console line (from the harness, with the request id when known) or a
    /// raw stdout/stderr line of the process.
    fn log(&self, level: LogLevel, message: String, request_id: Option<String>);
    /// Fetches the asset at `tree_path` into the isolate's deployment root.
    fn materialize(&self, tree_path: String) -> BoxFuture<'static, Result<(), String>>;
    /// Writes the deployment's asset manifest where the harness reads it,
    /// fetching it first when it was deferred at boot; once per isolate.
    /// (No default: a wrapper that forgot to pass it on would answer with
    /// whatever manifest is on disk.)
    fn load_tree(&self) -> BoxFuture<'static, Result<(), String>>;
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the isolate process: {0}")]
    Spawn(std::io::Error),
    #[error("{message}")]
    Failed { code: ErrorCode, message: String },
    #[error("the isolate did not start serving within {0:?}")]
    Timeout(Duration),
    #[error("the isolate exited while starting ({status}): {stderr}")]
    Exited { status: String, stderr: String },
}

impl StartError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StartError::Failed { code, .. } => *code,
            StartError::Spawn(_) => ErrorCode::Internal,
            StartError::Timeout(_) | StartError::Exited { .. } => ErrorCode::IsolateStartFailed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The process is gone, or died while the request was in it.
    #[error("the isolate crashed: {0}")]
    Crashed(String),
    /// The runner ended the isolate for breaking a limit.
    #[error("the isolate was terminated: {0}")]
    Terminated(Termination),
}

/// Limits the supervisor enforces on a running isolate.
#[derive(Debug, Clone, Copy)]
pub struct IsolateLimits {
    /// CPU time each request brings to the isolate's budget (see `monitor`).
    pub cpu_limit_ms: u64,
    pub memory_limit_bytes: u64,
    /// No cgroup caps this isolate: the monitor watches its resident memory.
    pub watch_rss: bool,
}

/// Why the runner ended an isolate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Termination {
    #[error("CPU time limit: used {used_ms} ms of a {limit_ms} ms per-request budget")]
    CpuTimeLimit { limit_ms: u64, used_ms: u64 },
    #[error("memory limit: {limit_bytes} bytes")]
    MemoryLimit { limit_bytes: u64, used_bytes: u64 },
}

impl Termination {
    pub fn code(&self) -> ErrorCode {
        match self {
            Termination::CpuTimeLimit { .. } => ErrorCode::CpuTimeLimit,
            Termination::MemoryLimit { .. } => ErrorCode::MemoryLimit,
        }
    }
}

/// A request may borrow from the budget that earlier, cheaper requests left
/// unused, but what is saved never exceeds this share of one request's limit
/// minus one (each request in flight adds its own limit on top): a runaway
/// loop dies after at most 1.5 × `cpu_limit_ms` of CPU, plus one sample. Alternating 20 ms and 60 ms
/// requests under a 50 ms limit pass; a sustained average above it does not.
pub const CPU_BUDGET_CAP_PERCENT: u64 = 150;
/// Extra requests' worth of CPU the first request of an isolate may use:
/// V8 compiles code lazily, so the first pass through a framework costs far
/// more than every later one. A runaway first request therefore dies after
/// at most (1.5 + this) × `cpu_limit_ms`; later ones after 1.5 ×.
pub const CPU_WARM_UP_REQUESTS: u64 = 3;

/// The CPU clock is read at most this often (the slack of the CPU limit)
/// and at least this often (the resolution of the usage figures); see
/// `monitor` for the plan in between.
pub const CPU_SAMPLE_BUSY: Duration = Duration::from_millis(5);
pub const CPU_SAMPLE_IDLE: Duration = Duration::from_millis(100);

/// Lifecycle state, observable by the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IsolateState {
    Running,
    Exited(String),
}

/// A request body on its way into an isolate: the client's, streamed, with
/// whatever bound the edge put on it.
pub type RequestBody = http_body_util::combinators::BoxBody<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// What V8 prints when its heap limit (`--max-old-space-size`) is reached.
const V8_OUT_OF_MEMORY: [&str; 2] = ["Reached heap limit", "heap out of memory"];

/// How long a connect may wait for a busy isolate's accept backlog.
const CONNECT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many idle keep-alive connections into one isolate are kept.
const MAX_IDLE_CONNECTIONS: usize = 32;
/// Control lines longer than this are a broken or hostile harness: the
/// line is skipped (and the tenant told), the connection lives on. With
/// [`MAX_CONTROL_CONNECTIONS`] it bounds what one isolate's control socket
/// makes the runner buffer.
const MAX_CONTROL_LINE_BYTES: usize = 256 * 1024;
/// The harness opens one control connection and its sync-read worker a
/// second; more are refused, so a tenant cannot make the runner hold
/// descriptors and buffers for connections of its own.
const MAX_CONTROL_CONNECTIONS: usize = 4;
/// Distinct assets one isolate may have the runner fetch at once; a request
/// for a path already being fetched waits for that fetch.
const MAX_MATERIALIZING: usize = 16;
/// A console line or output line longer than this is cut, and says so:
/// one line must not become megabytes in the activity queue and the
/// origin's store.
pub const MAX_LOG_MESSAGE_BYTES: usize = 32 * 1024;
const STDERR_TAIL_BYTES: usize = 4096;

/// Counters of one isolate since it started; `take_usage` reads deltas.
#[derive(Default)]
struct Meter {
    wall_us: AtomicU64,
    ingress_bytes: AtomicU64,
    egress_bytes: AtomicU64,
    errors: AtomicU64,
    cpu_ns: AtomicU64,
    peak_memory_bytes: AtomicU64,
    /// What the last `take_usage` returned, to compute the next delta.
    taken: Mutex<UsageTotals>,
}

/// Totals (or, from `take_usage`, deltas) of what an isolate used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub requests: u64,
    pub cpu_ms: u64,
    pub wall_ms: u64,
    pub ingress_bytes: u64,
    pub egress_bytes: u64,
    /// Requests answered with a 5xx.
    pub errors: u64,
    /// Not a delta: the most the isolate has held so far.
    pub peak_memory_bytes: u64,
    /// The isolate's own outbound calls through the egress proxy (always
    /// deltas, taken from the grant).
    pub fetch: EgressUsage,
}

pub struct Isolate {
    pid: u32,
    meter: Meter,
    termination: Arc<Mutex<Option<Termination>>>,
    requests_started: AtomicU64,
    files: IsolateFiles,
    idle: Mutex<Vec<SendRequest<RequestBody>>>,
    state: watch::Receiver<IsolateState>,
    in_flight: AtomicUsize,
    started: Instant,
    last_active_ms: AtomicU64,
    /// Its credentials for the egress proxy; dropped (revoked) with it.
    egress: Option<EgressGrant>,
    monitor: Arc<MonitorLink>,
    /// Ends every task of the isolate when it goes (see `lifetime`).
    _lifetime: LifetimeOwner,
    /// Where its reports go: the deployment's activity.
    hooks: Arc<dyn IsolateHooks>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ControlMessage {
    Ready,
    /// A pre-started harness waits for its deployment on this connection.
    Waiting,
    StartError {
        code: String,
        message: String,
    },
    Log {
        level: String,
        message: String,
        request_id: Option<String>,
    },
    Materialize {
        id: u64,
        path: String,
    },
    /// The harness needs the asset manifest (deferred at boot).
    Tree {
        id: u64,
    },
}

/// An isolate process between spawn and serving.
struct Spawned {
    pid: u32,
    termination: Arc<Mutex<Option<Termination>>>,
    state: watch::Receiver<IsolateState>,
    egress: Option<EgressGrant>,
    started_rx: oneshot::Receiver<Result<(), (ErrorCode, String)>>,
    /// The harness's control connection, once it waits for an assignment
    /// (pre-started isolates only).
    waiting_rx: Option<oneshot::Receiver<mpsc::Sender<Vec<u8>>>>,
    stderr_tail: Arc<Mutex<String>>,
    /// Dropping it (a failed start, an unassigned pre-started isolate, the
    /// isolate's end) kills the process and ends its tasks.
    lifetime: LifetimeOwner,
    hooks: Arc<dyn IsolateHooks>,
}

impl Spawned {
    fn spawn(
        mut command: SandboxedCommand,
        files: &IsolateFiles,
        hooks: Arc<dyn IsolateHooks>,
        limits: IsolateLimits,
        cgroup: Option<IsolateCgroup>,
        mut egress: Option<EgressGrant>,
    ) -> Result<Spawned, StartError> {
        let listener = UnixListener::bind(&files.control).map_err(StartError::Spawn)?;
        let listener_count = Count::new(&HELD.control_listeners);
        let network_namespace = command.network_namespace();
        // The child joins its cgroup before exec: deno's own start-up is
        // charged to the isolate, not to the runner.
        if let Some(cgroup) = &cgroup {
            let procs = cgroup
                .procs_file()
                .map_err(|e| StartError::Spawn(std::io::Error::other(format!("cannot open the memory cgroup: {e}"))))?;
            command.join_cgroup(procs);
        }
        let mut child = command.spawn().map_err(StartError::Spawn)?;
        let pid = child.id().ok_or_else(|| StartError::Spawn(std::io::Error::other("no pid")))?;
        // From here every end path goes through the lifetime: its owner's
        // drop kills the process group, its end stops the isolate's tasks.
        let (lifetime, owner) = Lifetime::new();
        // In its own network namespace the isolate reaches the egress proxy
        // only through a listener the runner puts there, at the proxy's own
        // address. Right away: the harness probes the proxy first thing (and
        // retries briefly).
        if network_namespace && let Some(grant) = &mut egress {
            let inside = isocloud_sandbox::netns::listen_inside(pid, grant.proxy_addr())
                .and_then(|listener| grant.serve_inside(listener));
            if let Err(e) = inside {
                let _ = signal_process_group(pid, SIGKILL);
                return Err(StartError::Spawn(std::io::Error::other(format!(
                    "cannot serve the egress proxy in the isolate's network namespace: {e}"
                ))));
            }
        }
        tracing::debug!(pid, dir = %files.dir.display(), "isolate process spawned");

        let stderr_tail = Arc::new(Mutex::new(String::new()));
        if let Some(stdout) = child.stdout.take() {
            lifetime.spawn_draining(pump_output(stdout, LogLevel::Info, hooks.clone(), None));
        }
        if let Some(stderr) = child.stderr.take() {
            lifetime.spawn_draining(pump_output(stderr, LogLevel::Error, hooks.clone(), Some(stderr_tail.clone())));
        }

        let (started_tx, started_rx) = oneshot::channel::<Result<(), (ErrorCode, String)>>();
        let (waiting_tx, waiting_rx) = oneshot::channel::<mpsc::Sender<Vec<u8>>>();
        let control = ControlContext {
            hooks: hooks.clone(),
            started: Arc::new(Mutex::new(Some(started_tx))),
            waiting: Arc::new(Mutex::new(Some(waiting_tx))),
            materializing: Arc::default(),
            lifetime: lifetime.clone(),
        };
        lifetime.spawn(accept_control(listener, listener_count, control));

        let (state_tx, state_rx) = watch::channel(IsolateState::Running);
        let termination: Arc<Mutex<Option<Termination>>> = Arc::default();
        let exit_termination = termination.clone();
        let exit_stderr = stderr_tail.clone();
        // Not a task of the lifetime: it ends the lifetime, when the process
        // is gone — and when the lifetime ends first (its owner dropped), it
        // kills the process and still reaps it.
        tokio::spawn(async move {
            let _count = Count::new(&HELD.tasks);
            let waited = tokio::select! {
                waited = child.wait() => waited,
                () = lifetime.ended() => {
                    let _ = signal_process_group(pid, SIGKILL);
                    child.wait().await
                }
            };
            let status = match waited {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            // Whatever the leader started goes with it.
            let _ = signal_process_group(pid, SIGKILL);
            // Why it died decides what in-flight requests are told: set it
            // before anyone can see the exit.
            let oom = cgroup.as_ref().is_some_and(IsolateCgroup::oom_killed)
                || V8_OUT_OF_MEMORY.iter().any(|m| exit_stderr.lock().expect("stderr tail poisoned").contains(m));
            if oom {
                let used_bytes =
                    cgroup.as_ref().and_then(IsolateCgroup::peak_bytes).unwrap_or(limits.memory_limit_bytes);
                exit_termination
                    .lock()
                    .expect("termination poisoned")
                    .get_or_insert(Termination::MemoryLimit { limit_bytes: limits.memory_limit_bytes, used_bytes });
            }
            drop(cgroup);
            tracing::debug!(pid, %status, "isolate process exited");
            let _ = state_tx.send(IsolateState::Exited(status));
            lifetime.end();
        });
        Ok(Spawned {
            pid,
            termination,
            state: state_rx,
            egress,
            started_rx,
            waiting_rx: Some(waiting_rx),
            stderr_tail,
            lifetime: owner,
            hooks,
        })
    }

    /// Becomes the [`Isolate`] of `files` and waits until the harness serves.
    async fn serve(
        self,
        files: IsolateFiles,
        start_timeout: Duration,
        limits: IsolateLimits,
    ) -> Result<Arc<Isolate>, StartError> {
        let Spawned { pid, termination, state, egress, mut started_rx, stderr_tail, lifetime, hooks, .. } = self;
        let isolate = Arc::new(Isolate {
            pid,
            files,
            idle: Mutex::new(Vec::new()),
            termination,
            meter: Meter::default(),
            egress,
            requests_started: AtomicU64::new(0),
            state,
            in_flight: AtomicUsize::new(0),
            started: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            monitor: Arc::default(),
            _lifetime: lifetime,
            hooks,
        });
        let exited = isolate.state.clone();
        let started = |message: Result<Result<(), (ErrorCode, String)>, oneshot::error::RecvError>| match message {
            Ok(Ok(())) => Ok(()),
            Ok(Err((code, message))) => Err(StartError::Failed { code, message }),
            Err(_) => Err(StartError::Exited { status: "control channel closed".into(), stderr: String::new() }),
        };
        let outcome = tokio::time::timeout(start_timeout, async {
            tokio::select! {
                message = &mut started_rx => started(message),
                status = exit_status(exited) => {
                    // The harness reports why it cannot start and exits right
                    // away; the exit may be seen first. Its reason is better.
                    match tokio::time::timeout(Duration::from_millis(250), &mut started_rx).await {
                        Ok(Ok(Err((code, message)))) => Err(StartError::Failed { code, message }),
                        _ => Err(StartError::Exited { status, stderr: String::new() }),
                    }
                }
            }
        })
        .await
        .unwrap_or(Err(StartError::Timeout(start_timeout)));

        match outcome {
            Ok(()) => {
                tokio::spawn(monitor(Arc::downgrade(&isolate), limits));
                Ok(isolate)
            }
            Err(mut error) => {
                isolate.kill();
                if let StartError::Exited { stderr, .. } = &mut error {
                    // Give the stderr pump a moment to drain what deno printed.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *stderr = strip_ansi(&stderr_tail.lock().expect("stderr tail poisoned"));
                }
                Err(error)
            }
        }
    }
}

/// Resolves with the exit status once the process has exited.
async fn exit_status(mut state: watch::Receiver<IsolateState>) -> String {
    match state.wait_for(|s| matches!(s, IsolateState::Exited(_))).await.as_deref() {
        Ok(IsolateState::Exited(status)) => status.clone(),
        _ => String::new(),
    }
}

/// An isolate process started before a deployment was chosen for it: deno
/// is up, the harness evaluated and waiting on its control socket. The
/// pool keeps a few per sandbox profile, so a boot skips the process start.
/// Dropped unassigned, it is killed and its files removed.
pub struct Prestarted {
    spawned: Option<Spawned>,
    control: Option<mpsc::Sender<Vec<u8>>>,
    hooks: Arc<LateHooks>,
    files: IsolateFiles,
}

impl Prestarted {
    /// Its blank files ([`IsolateFiles::prepare_blank`]).
    pub fn files(&self) -> &IsolateFiles {
        &self.files
    }

    pub fn pid(&self) -> Option<u32> {
        self.spawned.as_ref().map(|s| s.pid)
    }

    /// Still waiting (not exited meanwhile).
    pub fn is_running(&self) -> bool {
        self.spawned.as_ref().is_some_and(|s| matches!(*s.state.borrow(), IsolateState::Running))
    }

    /// Its egress proxy credentials, to be named after the deployment.
    pub fn egress(&self) -> Option<&EgressGrant> {
        self.spawned.as_ref().and_then(|s| s.egress.as_ref())
    }

    /// Gives it a deployment: `files` are its files filled with the
    /// deployment ([`IsolateFiles::fill`]), `assignment` what the harness
    /// is told ([`IsolateFiles::assignment`]). Waits, for at most
    /// `start_timeout`, until the tenant's code serves.
    pub async fn assign(
        mut self,
        files: IsolateFiles,
        hooks: Arc<dyn IsolateHooks>,
        assignment: serde_json::Value,
        start_timeout: Duration,
        limits: IsolateLimits,
    ) -> Result<Arc<Isolate>, StartError> {
        let _ = self.hooks.0.set(hooks);
        let mut message = assignment;
        message["op"] = "assign".into();
        let mut line = serde_json::to_vec(&message).expect("json value");
        line.push(b'\n');
        let control = self.control.take().expect("a prestarted isolate has its control connection");
        let spawned = self.spawned.take().expect("assigned once");
        if control.send(line).await.is_err() {
            let _ = signal_process_group(spawned.pid, SIGKILL);
            let _ = std::fs::remove_dir_all(&files.dir);
            return Err(StartError::Exited { status: "control channel closed".into(), stderr: String::new() });
        }
        // From here the isolate (and its Drop) own the process and its files.
        spawned.serve(files, start_timeout, limits).await
    }
}

impl Drop for Prestarted {
    fn drop(&mut self) {
        if let Some(spawned) = &self.spawned {
            let _ = signal_process_group(spawned.pid, SIGKILL);
            let _ = std::fs::remove_dir_all(&self.files.dir);
        }
    }
}

/// The hooks of a pre-started isolate, known once it is assigned. Before,
/// only the harness runs, and what it prints goes to the runner's log.
#[derive(Default)]
struct LateHooks(std::sync::OnceLock<Arc<dyn IsolateHooks>>);

impl IsolateHooks for LateHooks {
    fn log(&self, level: LogLevel, message: String, request_id: Option<String>) {
        match self.0.get() {
            Some(hooks) => hooks.log(level, message, request_id),
            None => tracing::debug!(target: "isocloud::prestart", ?level, "{message}"),
        }
    }

    fn materialize(&self, tree_path: String) -> BoxFuture<'static, Result<(), String>> {
        match self.0.get() {
            Some(hooks) => hooks.materialize(tree_path),
            None => Box::pin(async { Err("no deployment yet".to_owned()) }),
        }
    }

    fn load_tree(&self) -> BoxFuture<'static, Result<(), String>> {
        match self.0.get() {
            Some(hooks) => hooks.load_tree(),
            None => Box::pin(async { Err("no deployment yet".to_owned()) }),
        }
    }
}

impl Isolate {
    /// Spawns `command` and waits until the harness serves, for at most
    /// `start_timeout`.
    pub async fn start(
        command: SandboxedCommand,
        files: IsolateFiles,
        hooks: Arc<dyn IsolateHooks>,
        start_timeout: Duration,
        limits: IsolateLimits,
        cgroup: Option<IsolateCgroup>,
        egress: Option<EgressGrant>,
    ) -> Result<Arc<Isolate>, StartError> {
        let spawned = Spawned::spawn(command, &files, hooks, limits, cgroup, egress)?;
        spawned.serve(files, start_timeout, limits).await
    }

    /// Spawns `command` (of [`SandboxedCommand::blank`] files) and waits, for
    /// at most `start_timeout`, until its harness waits for a deployment:
    /// deno has started, the harness is compiled and evaluated. What is left
    /// for [`Prestarted::assign`] is the tenant's own code.
    pub async fn prestart(
        command: SandboxedCommand,
        files: IsolateFiles,
        start_timeout: Duration,
        limits: IsolateLimits,
        cgroup: Option<IsolateCgroup>,
        egress: Option<EgressGrant>,
    ) -> Result<Prestarted, StartError> {
        let hooks = Arc::new(LateHooks::default());
        let mut spawned = Spawned::spawn(command, &files, hooks.clone(), limits, cgroup, egress)?;
        let mut waiting_rx = spawned.waiting_rx.take().expect("a fresh spawn has its waiting slot");
        let outcome = tokio::time::timeout(start_timeout, async {
            tokio::select! {
                control = &mut waiting_rx => control.map_err(|_| StartError::Exited {
                    status: "control channel closed".into(),
                    stderr: String::new(),
                }),
                status = exit_status(spawned.state.clone()) => Err(StartError::Exited { status, stderr: String::new() }),
            }
        })
        .await
        .unwrap_or(Err(StartError::Timeout(start_timeout)));
        let mut prestarted = Prestarted { spawned: Some(spawned), control: None, hooks, files };
        match outcome {
            Ok(control) => {
                prestarted.control = Some(control);
                Ok(prestarted)
            }
            Err(mut error) => {
                if let (StartError::Exited { stderr, .. }, Some(spawned)) = (&mut error, &prestarted.spawned) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *stderr = strip_ansi(&spawned.stderr_tail.lock().expect("stderr tail poisoned"));
                }
                Err(error)
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn files(&self) -> &IsolateFiles {
        &self.files
    }

    pub fn state(&self) -> IsolateState {
        self.state.borrow().clone()
    }

    pub fn is_running(&self) -> bool {
        matches!(*self.state.borrow(), IsolateState::Running)
    }

    /// Resolves once the process has exited.
    pub async fn exited(&self) {
        let mut state = self.state.clone();
        let _ = state.wait_for(|s| matches!(s, IsolateState::Exited(_))).await;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Time since the last request finished or started.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn touch(&self) {
        self.last_active_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Holds the isolate busy (so no idle stop or eviction picks it) from
    /// now until the reservation becomes a request ([`Reserved::begin_request`])
    /// or drops. The pool reserves under its lock, so an isolate it hands
    /// out cannot be ended between the lookup and the request.
    pub fn reserve(self: &Arc<Self>) -> Reserved {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Reserved { isolate: Some(self.clone()) }
    }

    /// Marks a request as in flight until the returned guard drops (when the
    /// response body has been fully sent, not merely the headers).
    /// `hops`: how many isolates of this cloud the request has passed
    /// through already; calls the isolate makes meanwhile carry one more.
    pub fn begin_request(self: &Arc<Self>, hops: u32) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started_request(hops)
    }

    /// [`Isolate::begin_request`] with `in_flight` already counted.
    fn started_request(self: &Arc<Self>, hops: u32) -> InFlight {
        self.requests_started.fetch_add(1, Ordering::SeqCst);
        self.monitor.request_started();
        self.touch();
        let hop = self.egress.as_ref().map(|grant| grant.enter(hops));
        InFlight { isolate: self.clone(), started: Instant::now(), _hop: hop }
    }

    /// A note of the runner's about this isolate (a stream it cut, a bound
    /// it hit) into the deployment's own logs, beside its console output.
    pub fn note(&self, level: LogLevel, message: String, request_id: Option<String>) {
        self.hooks.log(level, message, request_id);
    }

    /// The isolate's egress proxy credentials, when it has any.
    pub fn egress(&self) -> Option<&EgressGrant> {
        self.egress.as_ref()
    }

    /// Sends `request` into the isolate. The request URI should be in
    /// absolute form (`https://host/path?q`): it becomes `request.url`.
    pub async fn forward(self: &Arc<Self>, request: Request<RequestBody>) -> Result<Response<Incoming>, ForwardError> {
        if let IsolateState::Exited(status) = self.state() {
            return Err(self
                .termination()
                .map(ForwardError::Terminated)
                .unwrap_or_else(|| ForwardError::Crashed(format!("process exited ({status})"))));
        }
        let mut sender = self.connection().await?;
        let result = sender.send_request(request).await;
        match result {
            Ok(response) => {
                self.recycle(sender);
                Ok(response)
            }
            Err(e) => {
                // Let the exit watcher catch up, so the message says why.
                let mut state = self.state.clone();
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    state.wait_for(|s| matches!(s, IsolateState::Exited(_))),
                )
                .await;
                if let Some(termination) = self.termination() {
                    return Err(ForwardError::Terminated(termination));
                }
                Err(ForwardError::Crashed(match self.state() {
                    IsolateState::Exited(status) => format!("process exited ({status})"),
                    IsolateState::Running => e.to_string(),
                }))
            }
        }
    }

    async fn connection(&self) -> Result<SendRequest<RequestBody>, ForwardError> {
        loop {
            let candidate = self.idle.lock().expect("idle pool poisoned").pop();
            match candidate {
                Some(sender) if sender.is_ready() => return Ok(sender),
                Some(_) => continue,
                None => break,
            }
        }
        let stream = self.connect().await?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ForwardError::Crashed(format!("handshake with the isolate failed: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::trace!(error = %e, "isolate connection closed");
            }
        });
        Ok(sender)
    }

    /// A new connection into the isolate. A full accept backlog (a flood of
    /// new connections) makes a unix-socket connect fail with EAGAIN at once:
    /// that is a busy isolate, not a dead one, so it is retried for a while.
    async fn connect(&self) -> Result<UnixStream, ForwardError> {
        let deadline = Instant::now() + CONNECT_BUSY_TIMEOUT;
        loop {
            match UnixStream::connect(&self.files.socket).await {
                Ok(stream) => return Ok(stream),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline && self.is_running() =>
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => return Err(ForwardError::Crashed(format!("cannot connect to the isolate: {e}"))),
            }
        }
    }

    /// Returns a connection to the idle pool once it can take the next
    /// request (HTTP/1.1: after this response's body is done).
    fn recycle(self: &Arc<Self>, mut sender: SendRequest<RequestBody>) {
        let isolate = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = isolate.idle.lock().expect("idle pool poisoned");
                if idle.len() < MAX_IDLE_CONNECTIONS {
                    idle.push(sender);
                }
            }
        });
    }

    /// Asks the process to stop, then kills it after `grace`.
    pub async fn terminate(&self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        let _ = signal_process_group(self.pid, SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            self.kill();
            self.exited().await;
        }
    }

    /// Body bytes that went into the isolate.
    pub fn count_ingress(&self, bytes: u64) {
        self.meter.ingress_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Body bytes that came out of the isolate.
    pub fn count_egress(&self, bytes: u64) {
        self.meter.egress_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A request this isolate served was answered with a 5xx.
    pub fn count_error(&self) {
        self.meter.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn note_memory(&self, bytes: u64) {
        self.meter.peak_memory_bytes.fetch_max(bytes, Ordering::Relaxed);
    }

    /// What the isolate used since the last call (the first call: since it
    /// started). Every figure is the runner's own measurement.
    pub fn take_usage(&self) -> UsageTotals {
        let now = UsageTotals {
            requests: self.requests_started.load(Ordering::Relaxed),
            cpu_ms: self.meter.cpu_ns.load(Ordering::Relaxed) / 1_000_000,
            wall_ms: self.meter.wall_us.load(Ordering::Relaxed) / 1_000,
            ingress_bytes: self.meter.ingress_bytes.load(Ordering::Relaxed),
            egress_bytes: self.meter.egress_bytes.load(Ordering::Relaxed),
            errors: self.meter.errors.load(Ordering::Relaxed),
            peak_memory_bytes: self.meter.peak_memory_bytes.load(Ordering::Relaxed),
            fetch: EgressUsage::default(),
        };
        let mut taken = self.meter.taken.lock().expect("meter poisoned");
        let delta = UsageTotals {
            requests: now.requests - taken.requests,
            cpu_ms: now.cpu_ms - taken.cpu_ms,
            wall_ms: now.wall_ms - taken.wall_ms,
            ingress_bytes: now.ingress_bytes - taken.ingress_bytes,
            egress_bytes: now.egress_bytes - taken.egress_bytes,
            errors: now.errors - taken.errors,
            peak_memory_bytes: now.peak_memory_bytes,
            fetch: self.egress.as_ref().map(EgressGrant::take_usage).unwrap_or_default(),
        };
        *taken = now;
        delta
    }

    /// Why the runner ended this isolate, if it did.
    pub fn termination(&self) -> Option<Termination> {
        self.termination.lock().expect("termination poisoned").clone()
    }

    /// Ends the isolate for breaking a limit: in-flight requests learn why.
    pub fn terminate_for(&self, termination: Termination) {
        tracing::warn!(pid = self.pid, %termination, "terminating isolate");
        self.termination.lock().expect("termination poisoned").get_or_insert(termination);
        self.kill();
    }

    /// Kills the process group now.
    pub fn kill(&self) {
        let _ = signal_process_group(self.pid, SIGKILL);
    }
}

impl Drop for Isolate {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.files.dir);
    }
}

/// An isolate held busy for a request about to be sent
/// ([`Isolate::reserve`]).
pub struct Reserved {
    isolate: Option<Arc<Isolate>>,
}

impl Reserved {
    pub fn isolate(&self) -> &Arc<Isolate> {
        self.isolate.as_ref().expect("a reservation holds its isolate until used")
    }

    /// The reservation becomes the request's [`InFlight`] guard.
    pub fn begin_request(mut self, hops: u32) -> InFlight {
        let isolate = self.isolate.take().expect("a reservation is used once");
        isolate.started_request(hops)
    }
}

impl std::ops::Deref for Reserved {
    type Target = Arc<Isolate>;
    fn deref(&self) -> &Arc<Isolate> {
        self.isolate()
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(isolate) = self.isolate.take() {
            isolate.touch();
            isolate.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Held while a request is inside an isolate.
pub struct InFlight {
    isolate: Arc<Isolate>,
    started: Instant,
    _hop: Option<HopGuard>,
}

impl InFlight {
    pub fn isolate(&self) -> &Arc<Isolate> {
        &self.isolate
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.isolate.meter.wall_us.fetch_add(self.started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.isolate.touch();
        self.isolate.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn parse_level(level: &str) -> LogLevel {
    match level {
        "debug" => LogLevel::Debug,
        "warning" => LogLevel::Warning,
        "error" => LogLevel::Error,
        _ => LogLevel::Info,
    }
}

fn parse_code(code: &str) -> ErrorCode {
    match code {
        "MODULE_NOT_FOUND" => ErrorCode::ModuleNotFound,
        _ => ErrorCode::IsolateStartFailed,
    }
}

/// What every control connection of one isolate shares.
#[derive(Clone)]
struct ControlContext {
    hooks: Arc<dyn IsolateHooks>,
    started: StartedSlot,
    waiting: WaitingSlot,
    /// Assets being fetched for this isolate, by path: a second request for
    /// one waits for the same fetch.
    materializing: Arc<Mutex<HashMap<String, Materializing>>>,
    lifetime: Lifetime,
}

type Materializing = Shared<BoxFuture<'static, Result<(), String>>>;

async fn accept_control(listener: UnixListener, _listener_count: Count, control: ControlContext) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
    while let Ok((stream, _)) = listener.accept().await {
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            breach(&HELD.control_connections_refused);
            control.hooks.log(
                LogLevel::Warning,
                format!(
                    "[isocloud] a control connection was refused: an isolate may hold at most \
                     {MAX_CONTROL_CONNECTIONS}"
                ),
                None,
            );
            continue;
        };
        let context = control.clone();
        control.lifetime.spawn(async move {
            let _permit = permit;
            serve_control(stream, context).await;
        });
    }
}

type StartedSlot = Arc<Mutex<Option<oneshot::Sender<Result<(), (ErrorCode, String)>>>>>;
/// Taken by the first connection that says it waits: the harness, before
/// any tenant code ran.
type WaitingSlot = Arc<Mutex<Option<oneshot::Sender<mpsc::Sender<Vec<u8>>>>>>;

/// Reads one control line into `line`, at most [`MAX_CONTROL_LINE_BYTES`].
/// `Ok(false)`: the connection ended. A longer line is skipped to its end
/// and reported as `Err(skipped bytes)`.
async fn read_control_line(reader: &mut (impl AsyncBufReadExt + Unpin), line: &mut Vec<u8>) -> Result<bool, usize> {
    line.clear();
    match reader.take(MAX_CONTROL_LINE_BYTES as u64).read_until(b'\n', line).await {
        Ok(0) | Err(_) => return Ok(false),
        Ok(_) if line.ends_with(b"\n") => return Ok(true),
        Ok(n) if n < MAX_CONTROL_LINE_BYTES => return Ok(false),
        Ok(_) => {}
    }
    // Over the bound: skip to the end of the line without holding it.
    let mut skipped = line.len();
    loop {
        let (done, used) = match reader.fill_buf().await {
            Ok([]) | Err(_) => return Ok(false),
            Ok(buffer) => match buffer.iter().position(|b| *b == b'\n') {
                Some(at) => (true, at + 1),
                None => (false, buffer.len()),
            },
        };
        reader.consume(used);
        skipped += used;
        if done {
            line.clear();
            return Err(skipped);
        }
    }
}

async fn serve_control(stream: UnixStream, control: ControlContext) {
    let _count = Count::new(&HELD.control_connections);
    let (read, mut write) = stream.into_split();
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(64);
    control.lifetime.spawn(async move {
        while let Some(line) = reply_rx.recv().await {
            if write.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        match read_control_line(&mut reader, &mut line).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(skipped) => {
                breach(&HELD.control_messages_dropped);
                control.hooks.log(
                    LogLevel::Warning,
                    format!(
                        "[isocloud] a control message of {skipped} bytes was dropped: the bound is \
                         {MAX_CONTROL_LINE_BYTES} bytes"
                    ),
                    None,
                );
                continue;
            }
        }
        let message = match serde_json::from_slice::<ControlMessage>(&line) {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a malformed control message");
                continue;
            }
        };
        match message {
            ControlMessage::Waiting => {
                if let Some(tx) = control.waiting.lock().expect("waiting slot poisoned").take() {
                    let _ = tx.send(reply_tx.clone());
                }
            }
            ControlMessage::Ready => {
                if let Some(tx) = control.started.lock().expect("started slot poisoned").take() {
                    let _ = tx.send(Ok(()));
                }
            }
            ControlMessage::StartError { code, message } => {
                if let Some(tx) = control.started.lock().expect("started slot poisoned").take() {
                    let _ = tx.send(Err((parse_code(&code), truncate_log(message))));
                }
            }
            ControlMessage::Log { level, message, request_id } => {
                let request_id = request_id.filter(|id| id.len() <= 128);
                control.hooks.log(parse_level(&level), truncate_log(message), request_id)
            }
            // The manifest is deduplicated and bounded like asset reads (a
            // path is never empty, so "" is the tree's own key).
            ControlMessage::Tree { id } => answer(&control, &reply_tx, id, String::new()),
            ControlMessage::Materialize { id, path } => answer(&control, &reply_tx, id, path),
        }
    }
}

/// The fetch of `path` for this isolate: the one already running, a new one
/// while fewer than [`MAX_MATERIALIZING`] run, else a refusal.
/// Fetches `path` (`""`: the manifest) for the harness and sends it the
/// answer to its call `id`, in a task of the isolate's lifetime.
fn answer(control: &ControlContext, reply_tx: &mpsc::Sender<Vec<u8>>, id: u64, path: String) {
    let job = materialize_once(control, path);
    let reply_tx = reply_tx.clone();
    control.lifetime.spawn(async move {
        let reply = match job.await {
            Ok(()) => serde_json::json!({ "id": id, "ok": true }),
            Err(error) => serde_json::json!({ "id": id, "ok": false, "error": error }),
        };
        let mut line = serde_json::to_vec(&reply).expect("json value");
        line.push(b'\n');
        let _ = reply_tx.send(line).await;
    });
}

/// `""`: the asset manifest itself ([`IsolateHooks::load_tree`]).
fn materialize_once(control: &ControlContext, path: String) -> Materializing {
    let mut running = control.materializing.lock().expect("materializing poisoned");
    if let Some(job) = running.get(&path) {
        return job.clone();
    }
    if running.len() >= MAX_MATERIALIZING || path.len() > 4096 {
        breach(&HELD.materialize_refused);
        let refusal = format!("too many asset reads at once (at most {MAX_MATERIALIZING}); try again");
        return futures_util::future::ready(Err(refusal)).boxed().shared();
    }
    let fetch = if path.is_empty() { control.hooks.load_tree() } else { control.hooks.materialize(path.clone()) };
    let table = control.materializing.clone();
    let key = path.clone();
    let job = async move {
        let _count = Count::new(&HELD.materializing);
        let result = fetch.await;
        table.lock().expect("materializing poisoned").remove(&key);
        result
    }
    .boxed()
    .shared();
    running.insert(path, job.clone());
    job
}

/// Cuts `message` to [`MAX_LOG_MESSAGE_BYTES`] (on a character boundary),
/// saying how much was cut, with deno's command-line advice in isocloud's
/// words (`isocloud_protocol::deno_words`): every line and error an isolate
/// reports goes through here.
pub fn truncate_log(message: String) -> String {
    let mut message = match isocloud_protocol::deno_words::in_isocloud_words(&message) {
        std::borrow::Cow::Borrowed(_) => message,
        std::borrow::Cow::Owned(rewritten) => rewritten,
    };
    if message.len() <= MAX_LOG_MESSAGE_BYTES {
        return message;
    }
    let total = message.len();
    let mut cut = MAX_LOG_MESSAGE_BYTES;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(&format!(" … [isocloud: truncated, {total} bytes in all]"));
    message
}

async fn pump_output(
    stream: impl AsyncRead + Unpin,
    level: LogLevel,
    hooks: Arc<dyn IsolateHooks>,
    tail: Option<Arc<Mutex<String>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(64 * 1024).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = truncate_log(String::from_utf8_lossy(&line).trim_end().to_owned());
        if let Some(tail) = &tail {
            let mut tail = tail.lock().expect("stderr tail poisoned");
            tail.push_str(&text);
            tail.push('\n');
            if tail.len() > STDERR_TAIL_BYTES {
                let cut = tail.len() - STDERR_TAIL_BYTES;
                let cut = (cut..tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(0);
                tail.drain(..cut);
            }
        }
        hooks.log(level, text, None);
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_overlong_control_line_is_skipped_and_the_next_one_read() {
        let mut input = vec![b'x'; MAX_CONTROL_LINE_BYTES * 3];
        input.extend_from_slice(b"\n{\"op\":\"ready\"}\n");
        let mut reader = BufReader::new(&input[..]);
        let mut line = Vec::new();
        let skipped = read_control_line(&mut reader, &mut line).await.unwrap_err();
        assert_eq!(skipped, MAX_CONTROL_LINE_BYTES * 3 + 1);
        assert_eq!(read_control_line(&mut reader, &mut line).await, Ok(true));
        assert_eq!(line, b"{\"op\":\"ready\"}\n");
        assert_eq!(read_control_line(&mut reader, &mut line).await, Ok(false));
    }

    #[tokio::test]
    async fn a_line_cut_off_by_the_end_of_the_connection_is_not_a_message() {
        let mut reader = BufReader::new(&b"{\"op\":\"rea"[..]);
        let mut line = Vec::new();
        assert_eq!(read_control_line(&mut reader, &mut line).await, Ok(false));
    }

    #[test]
    fn long_log_lines_are_cut_on_a_character_boundary_and_say_so() {
        let short = "é".repeat(10);
        assert_eq!(truncate_log(short.clone()), short);
        let long = "é".repeat(MAX_LOG_MESSAGE_BYTES);
        let cut = truncate_log(long);
        assert!(cut.len() < MAX_LOG_MESSAGE_BYTES + 64);
        assert!(cut.ends_with(&format!("[isocloud: truncated, {} bytes in all]", MAX_LOG_MESSAGE_BYTES * 2)), "{cut}");
    }
}
