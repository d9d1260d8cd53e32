//! A running isolate: its limits and counters, the keep-alive HTTP/1.1
//! connections into it, and the guards that mark it busy.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use isocloud_egress::{EgressGrant, EgressUsage, HopGuard};
use isocloud_protocol::{LATENCY_BUCKETS, LogLevel};
use isocloud_sandbox::{IsolateCgroup, IsolateFiles, SIGKILL, SIGTERM, SandboxedCommand, signal_process_group};
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::lifetime::LifetimeOwner;
use crate::monitor::MonitorLink;
use crate::spawn::Spawned;
use crate::{ForwardError, StartError, Termination};

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

/// Limits the supervisor enforces on a running isolate.
#[derive(Debug, Clone, Copy)]
pub struct IsolateLimits {
    /// CPU time each request brings to the isolate's budget (see `monitor`).
    pub cpu_limit_ms: u64,
    pub memory_limit_bytes: u64,
    /// No cgroup caps this isolate: the monitor watches its resident memory.
    pub watch_rss: bool,
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

/// An isolate's response body. Read to its end, it hands its keep-alive
/// connection back to the isolate's idle list; dropped before its end, it
/// drops the connection with it (hyper closes a connection whose response
/// was not read).
pub struct IsolateBody {
    inner: Incoming,
    recycle: Option<(SendRequest<RequestBody>, Arc<Isolate>)>,
}

impl IsolateBody {
    fn recycle(&mut self) {
        if let Some((sender, isolate)) = self.recycle.take() {
            isolate.park(sender);
        }
    }
}

impl http_body::Body for IsolateBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.recycle();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for IsolateBody {
    fn drop(&mut self) {
        // An empty body (204, HEAD, `content-length: 0`) may never be polled.
        if http_body::Body::is_end_stream(&self.inner) {
            self.recycle();
        }
    }
}

/// How long a connect may wait for a busy isolate's accept backlog.
const CONNECT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many idle keep-alive connections into one isolate are kept.
const MAX_IDLE_CONNECTIONS: usize = 32;

/// Counters of one isolate since it started; `take_usage` reads deltas.
#[derive(Default)]
pub(crate) struct Meter {
    wall_us: AtomicU64,
    ingress_bytes: AtomicU64,
    egress_bytes: AtomicU64,
    /// Requests by the class of their answer (`1xx` … `5xx`).
    status: [AtomicU64; 5],
    /// Requests by their time to the response head
    /// ([`isocloud_protocol::LATENCY_BOUNDS_MS`], then `+Inf`).
    latency: [AtomicU64; LATENCY_BUCKETS],
    pub(crate) cpu_ns: AtomicU64,
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
    /// Requests answered with a 5xx (`status[4]`).
    pub errors: u64,
    /// Requests by the class of their answer: `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    pub status: [u64; 5],
    /// Requests by time to the response head, per bucket of
    /// [`isocloud_protocol::LATENCY_BOUNDS_MS`] and `+Inf`.
    pub latency: [u64; LATENCY_BUCKETS],
    /// Not a delta: the most the isolate has held so far.
    pub peak_memory_bytes: u64,
    /// The isolate's own outbound calls through the egress proxy (always
    /// deltas, taken from the grant).
    pub fetch: EgressUsage,
}

pub struct Isolate {
    pub(crate) pid: u32,
    pub(crate) meter: Meter,
    pub(crate) termination: Arc<Mutex<Option<Termination>>>,
    pub(crate) requests_started: AtomicU64,
    pub(crate) files: IsolateFiles,
    pub(crate) idle: Mutex<Vec<SendRequest<RequestBody>>>,
    pub(crate) state: watch::Receiver<IsolateState>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) started: Instant,
    pub(crate) last_active_ms: AtomicU64,
    /// Its credentials for the egress proxy; dropped (revoked) with it.
    pub(crate) egress: Option<EgressGrant>,
    pub(crate) monitor: Arc<MonitorLink>,
    /// Ends every task of the isolate when it goes (see `lifetime`).
    pub(crate) _lifetime: LifetimeOwner,
    /// Where its reports go: the deployment's activity.
    pub(crate) hooks: Arc<dyn IsolateHooks>,
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

    /// The CPU the isolate's process has used so far, read from the kernel
    /// now (one syscall; only a traced request reads it, at its start and end).
    pub fn cpu_time(&self) -> Option<Duration> {
        isocloud_sandbox::process_cpu_time(self.pid).ok()
    }

    /// The isolate's egress proxy credentials, when it has any.
    pub fn egress(&self) -> Option<&EgressGrant> {
        self.egress.as_ref()
    }

    /// Sends `request` into the isolate. The request URI should be in
    /// absolute form (`https://host/path?q`): it becomes `request.url`.
    pub async fn forward(
        self: &Arc<Self>,
        request: Request<RequestBody>,
    ) -> Result<Response<IsolateBody>, ForwardError> {
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
                // An upgraded connection is the client's now, never the pool's.
                let recycle =
                    (response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS).then(|| (sender, self.clone()));
                Ok(response.map(|inner| IsolateBody { inner, recycle }))
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
        {
            let mut idle = self.idle.lock().expect("idle pool poisoned");
            idle.retain(|sender| !sender.is_closed());
            // The most recently parked first: its socket is the warmest.
            if let Some(at) = idle.iter().rposition(SendRequest::is_ready) {
                return Ok(idle.swap_remove(at));
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

    /// Keeps a connection whose response was read to its end for the next
    /// request: no task per request waits for it to be ready. hyper marks it
    /// ready once its dispatcher has seen the end (at once, or on its next
    /// poll); [`Self::connection`] takes only ready ones and drops closed ones.
    fn park(&self, sender: SendRequest<RequestBody>) {
        let mut idle = self.idle.lock().expect("idle pool poisoned");
        if idle.len() < MAX_IDLE_CONNECTIONS && !sender.is_closed() {
            idle.push(sender);
        }
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

    /// A request this isolate was given was answered with `status` (the
    /// tenant's, or the runner's for it), its head `elapsed` after the
    /// request's arrived. Two relaxed atomic adds: the per-request cost.
    pub fn count_response(&self, status: u16, elapsed: Duration) {
        if let Some(class) = isocloud_protocol::status_class(status) {
            self.meter.status[class].fetch_add(1, Ordering::Relaxed);
        }
        self.meter.latency[isocloud_protocol::latency_bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn note_memory(&self, bytes: u64) {
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
            errors: self.meter.status[4].load(Ordering::Relaxed),
            status: self.meter.status.each_ref().map(|c| c.load(Ordering::Relaxed)),
            latency: self.meter.latency.each_ref().map(|c| c.load(Ordering::Relaxed)),
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
            status: std::array::from_fn(|i| now.status[i] - taken.status[i]),
            latency: std::array::from_fn(|i| now.latency[i] - taken.latency[i]),
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
