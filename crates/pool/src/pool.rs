//! The deployment → isolate map.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use isocloud_origin::{DiskCache, Origin};
use isocloud_protocol::{ActivityKind, LogLevel};
use isocloud_sandbox::SandboxPolicy;
use isocloud_supervisor::{Isolate, IsolateLimits, IsolateState, Reserved, Termination};

use crate::admission::{Admission, AdmissionOptions};
use crate::boot::{BootContext, boot};
use crate::deployment_metrics::Ending;
use crate::slots::{BootFuture, Capacity, Key, Lookup, Occupancy, Slots, Started, Sweep};
use crate::warm::{Warm, WarmOptions};
use crate::{ActivitySink, BootError, PoolMetrics};

#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// An isolate without requests for this long is terminated.
    pub idle_timeout: Duration,
    /// From spawn to "serving"; past it the boot fails.
    pub start_timeout: Duration,
    /// How long a terminated isolate gets between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Where each isolate's files are written.
    pub instances_dir: PathBuf,
    /// Isolates running or booting at once, at most.
    pub max_isolates: usize,
    /// Isolates running or booting at once for one tenant
    /// ([`Origin::tenant_of`]), at most: at its cap a tenant's new boot
    /// evicts its own least recently used idle isolate, or is refused.
    pub max_isolates_per_tenant: usize,
    /// How many deno processes start at once, and the queue of the rest.
    pub admission: AdmissionOptions,
    pub limits: IsolateLimits,
    pub cgroups: Option<Arc<isocloud_sandbox::Cgroups>>,
    /// The activity spool: where, how big, and how to find origins again.
    pub activity: crate::ActivityOptions,
    /// How often each running isolate's usage is reported.
    pub usage_interval: Duration,
    /// The runner's egress proxy; `None`: isolates call out directly.
    pub egress: Option<isocloud_egress::EgressProxy>,
    /// Deployment deno cache dirs kept (most recently booted first).
    pub max_deno_dirs: usize,
    /// The package store's bound on sets no isolate uses (`packages.rs`).
    pub package_store_max_bytes: u64,
    /// Where an ESZIP's npm snapshot packages come from (`npm.rs`).
    pub npm_registry: crate::NpmRegistry,
    /// Isolates kept pre-started per sandbox profile (see `warm`); 0: none.
    /// Needs the mount namespace (a pre-started isolate's `/src` is its own
    /// before it has anything in it).
    pub prestarted_per_profile: usize,
    /// How old a deployment's kept boot answer may be to boot it while its
    /// origin cannot be reached; zero: none kept or used.
    pub boot_stale_max_age: Duration,
    /// Where every deployment's log lines (console, the runner's notes) go
    /// besides its origin: the OTLP exporter with `--otlp-endpoint`, else none.
    pub log_tap: Option<LogTap>,
}

/// A receiver of log lines. It is called on the line's way to the activity sink and must not block.
#[derive(Clone)]
pub struct LogTap(pub Arc<LogTapFn>);

/// (deployment id, level, message, request id).
pub type LogTapFn = dyn Fn(&str, LogLevel, &str, Option<&str>) + Send + Sync;

impl std::fmt::Debug for LogTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogTap")
    }
}

/// At shutdown, how long queued activity may take to reach the origins.
const ACTIVITY_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl Occupancy for Isolate {
    fn is_running(&self) -> bool {
        Isolate::is_running(self)
    }

    fn is_condemned(&self) -> bool {
        self.termination().is_some()
    }

    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight() == 0).then(|| Isolate::idle_for(self))
    }
}

/// One running isolate, as the admin listener lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IsolateView {
    /// On the host (the isolate itself sees pid 1).
    pub pid: u32,
    pub origin: String,
    pub deployment_id: String,
    pub tenant: String,
}

struct Inner {
    slots: Mutex<Slots<Isolate>>,
    /// Which origin each running isolate came from, for its reports.
    origins: Mutex<HashMap<Key, Arc<dyn Origin>>>,
    ctx: BootContext,
    options: PoolOptions,
    metrics: PoolMetrics,
    next_instance: Arc<AtomicU64>,
    closed: AtomicBool,
    /// Start of the current usage interval (RFC 3339).
    usage_since: Mutex<String>,
    /// Requests answered without an isolate, by deployment, since the last
    /// usage report (see [`Pool::count_refused`]).
    refused: Mutex<HashMap<Key, Refused>>,
}

/// A deployment's requests answered without an isolate, and its origin.
struct Refused {
    origin: Arc<dyn Origin>,
    /// By the class of the runner's answer (`[1xx … 5xx]`).
    status: [u64; 5],
    /// By time to the answer ([`isocloud_protocol::LATENCY_BOUNDS_MS`]).
    latency: [u64; isocloud_protocol::LATENCY_BUCKETS],
}

/// Deployments whose refused requests wait for the next usage report, at
/// most (a flood of never-booting ids must not grow the map).
const MAX_REFUSED_DEPLOYMENTS: usize = 10_000;

/// Cheap to clone; every clone is the same pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    pub fn new(
        options: PoolOptions,
        policy: SandboxPolicy,
        cache: Arc<DiskCache>,
        metrics: PoolMetrics,
    ) -> std::io::Result<Self> {
        // Instances of an earlier run are dead: their processes died with it.
        if options.instances_dir.exists() {
            std::fs::remove_dir_all(&options.instances_dir)?;
        }
        std::fs::create_dir_all(&options.instances_dir)?;
        let activity = ActivitySink::start(options.activity.clone(), metrics.activity.clone())?;
        let next_instance = Arc::new(AtomicU64::new(1));
        let warm = (options.prestarted_per_profile > 0 && policy.mount_namespace).then(|| {
            Warm::new(WarmOptions {
                per_profile: options.prestarted_per_profile,
                policy: policy.clone(),
                instances_dir: options.instances_dir.clone(),
                start_timeout: options.start_timeout,
                limits: options.limits,
                cgroups: options.cgroups.clone(),
                egress: options.egress.clone(),
                next_instance: next_instance.clone(),
                waiting: metrics.prestarted_waiting.clone(),
                preloaded_packages: metrics.prestarted_preloaded_packages.clone(),
            })
        });
        metrics.boot_concurrency_limit.set(options.admission.max_concurrent_boots as i64);
        // A tenant's share of the queue is its share of the isolate slots.
        let share = options.max_isolates_per_tenant.min(options.max_isolates);
        let queue_per_tenant =
            options.admission.max_boot_queue.saturating_mul(share).div_ceil(options.max_isolates.max(1)).max(1);
        let admission = Arc::new(Admission::new(options.admission, queue_per_tenant, metrics.admission()));
        let packages = Arc::new(crate::packages::PackageStore::new(
            options.instances_dir.parent().unwrap_or(&options.instances_dir).join("packages"),
            options.package_store_max_bytes,
        )?);
        let ctx = BootContext {
            packages,
            npm_registry: options.npm_registry.clone(),
            cache,
            policy,
            instances_dir: options.instances_dir.clone(),
            start_timeout: options.start_timeout,
            limits: options.limits,
            cgroups: options.cgroups.clone(),
            activity,
            egress: options.egress.clone(),
            warm,
            admission,
            metrics: metrics.clone(),
            stale: isocloud_origin::StaleBoots { max_age: options.boot_stale_max_age },
            log_tap: options.log_tap.clone(),
        };
        let pool = Self {
            inner: Arc::new(Inner {
                slots: Mutex::new(Slots::new()),
                origins: Mutex::new(HashMap::new()),
                ctx,
                options,
                metrics,
                next_instance,
                closed: AtomicBool::new(false),
                usage_since: Mutex::new(isocloud_activity::now_rfc3339()),
                refused: Mutex::new(HashMap::new()),
            }),
        };
        tokio::spawn(reap(Arc::downgrade(&pool.inner)));
        Ok(pool)
    }

    /// Boots one runner-owned isolate and keeps its deno cache as the
    /// template every new deployment cache dir starts from, so a first boot
    /// does not compile the harness again. Call before serving; on failure
    /// (logged) deployments start from empty caches.
    pub async fn build_deno_template(&self) {
        let started = std::time::Instant::now();
        match crate::template::build(&self.inner.ctx).await {
            Ok(()) => tracing::info!(ms = started.elapsed().as_millis() as u64, "deno cache template ready"),
            Err(e) => tracing::warn!(error = %e, "no deno cache template: first boots compile the harness"),
        }
        // Pre-started isolates copy the template: start them after it, for
        // the profile of the protocol's default config (all of the network).
        if let Some(warm) = &self.inner.ctx.warm {
            warm.refill(&isocloud_protocol::NetPermission::All);
        }
    }

    /// The running isolate of `deployment_id`, booting it if needed.
    /// Concurrent callers for one deployment share one boot.
    /// The isolate comes reserved ([`Isolate::reserve`], taken under the
    /// pool's lock): no idle stop or eviction can end it before its request.
    pub async fn isolate(&self, origin: &Arc<dyn Origin>, deployment_id: &str) -> Result<Reserved, BootError> {
        self.isolate_and_start(origin, deployment_id).await.map(|(reserved, _)| reserved)
    }

    /// [`Pool::isolate`], and whether the request waited for a boot (`true`)
    /// or found the isolate running: a traced request's span says which.
    pub async fn isolate_and_start(
        &self,
        origin: &Arc<dyn Origin>,
        deployment_id: &str,
    ) -> Result<(Reserved, bool), BootError> {
        let started = std::time::Instant::now();
        let reserved = self.isolate_reserved(origin, deployment_id).await;
        if let Err(e) = &reserved
            && e.code() != isocloud_protocol::ErrorCode::DeploymentNotFound
        {
            self.count_refused(origin, deployment_id, e.code().http_status(), started.elapsed());
        }
        reserved
    }

    /// A request the runner answered for a deployment with no isolate to
    /// serve it (its boot failed, or no room): counted as a request and an
    /// error of the deployment's, reported with the next usage interval, so
    /// its analytics do not show 0 requests after 41 failed visits.
    /// `status` is the runner's answer, `elapsed` how long the request
    /// waited for it (a failed boot's time included).
    fn count_refused(&self, origin: &Arc<dyn Origin>, deployment_id: &str, status: u16, elapsed: Duration) {
        let key: Key = (origin.name().to_owned(), deployment_id.to_owned());
        let mut refused = self.inner.refused.lock().expect("pool poisoned");
        let count = |entry: &mut Refused| {
            if let Some(class) = isocloud_protocol::status_class(status) {
                entry.status[class] += 1;
            }
            entry.latency[isocloud_protocol::latency_bucket(elapsed)] += 1;
        };
        if let Some(entry) = refused.get_mut(&key) {
            count(entry);
        } else if refused.len() < MAX_REFUSED_DEPLOYMENTS {
            let mut entry = Refused { origin: origin.clone(), status: [0; 5], latency: Default::default() };
            count(&mut entry);
            refused.insert(key, entry);
        } else {
            tracing::debug!(deployment_id, "refused request not counted: too many deployments await their report");
        }
    }

    async fn isolate_reserved(
        &self,
        origin: &Arc<dyn Origin>,
        deployment_id: &str,
    ) -> Result<(Reserved, bool), BootError> {
        // A boot's isolate is reserved when its waiter gets the lock; should
        // it have been evicted in between (another boot needed the slot),
        // the request goes round again rather than to a dying isolate.
        let mut booted = false;
        for _ in 0..3 {
            let (isolate, boot) = self.isolate_unreserved(origin, deployment_id).await?;
            booted |= boot;
            let key: Key = (origin.name().to_owned(), deployment_id.to_owned());
            let slots = self.inner.slots.lock().expect("pool poisoned");
            if slots.holds(&key, &isolate) {
                return Ok((isolate.reserve(), booted));
            }
        }
        Err(BootError::Capacity(self.inner.options.max_isolates))
    }

    async fn isolate_unreserved(
        &self,
        origin: &Arc<dyn Origin>,
        deployment_id: &str,
    ) -> Result<(Arc<Isolate>, bool), BootError> {
        let key: Key = (origin.name().to_owned(), deployment_id.to_owned());
        let options = &self.inner.options;
        let capacity = Capacity { max_isolates: options.max_isolates, max_per_tenant: options.max_isolates_per_tenant };
        let looked = {
            let mut slots = self.inner.slots.lock().expect("pool poisoned");
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(BootError::ShuttingDown);
            }
            slots.lookup(
                &key,
                capacity,
                // From memory (the trait's contract), so fine under the lock.
                || origin.tenant_of(deployment_id).into(),
                || self.boot_future(key.clone(), origin.clone()),
            )
        };
        if let Some(isolate) = looked.exited {
            self.note_exit(&key, &isolate);
        }
        match looked.answer {
            Ok(Lookup::Ready(isolate)) => Ok((isolate, false)),
            Ok(Lookup::Join(boot)) => boot.await.map(|isolate| (isolate, true)),
            Ok(Lookup::Started(Started { boot, evicted })) => {
                if let Some((key, isolate, reason)) = evicted {
                    self.evict(key, isolate, reason);
                }
                boot.await.map(|isolate| (isolate, true))
            }
            Err(refusal) => {
                let reason = match refusal {
                    BootError::TenantCapacity(_) => "tenant_cap",
                    _ => "max_isolates",
                };
                self.inner.metrics.boot_refusals.get_or_create(&vec![("reason", reason)]).inc();
                tracing::info!(tenant = %origin.tenant_of(deployment_id), reason, "boot refused: no idle isolate to make room");
                Err(refusal)
            }
        }
    }

    fn boot_future(&self, key: Key, origin: Arc<dyn Origin>) -> BootFuture<Isolate> {
        let inner = self.inner.clone();
        let instance = inner.next_instance.fetch_add(1, Ordering::Relaxed);
        // A task, so a boot finishes (and is cached) even if every request
        // that waited for it went away.
        let task = tokio::spawn(async move {
            let result = boot(&inner.ctx, origin.clone(), key.1.clone(), instance, true).await;
            let mut slots = inner.slots.lock().expect("pool poisoned");
            match result {
                Ok((isolate, boot_ms)) => {
                    inner.metrics.boots.get_or_create(&vec![("result", "ok")]).inc();
                    inner.metrics.boot_seconds.observe(boot_ms as f64 / 1000.0);
                    inner.metrics.live_isolates.inc();
                    inner.ctx.activity.report(&origin, &key.1, ActivityKind::Boot { boot_ms });
                    tracing::info!(
                        origin = origin.name(),
                        deployment_id = key.1,
                        boot_ms,
                        pid = isolate.pid(),
                        "isolate booted"
                    );
                    if inner.closed.load(Ordering::Acquire) || !slots.settle(&key, Some(isolate.clone())) {
                        slots.remove(&key);
                        inner.metrics.live_isolates.dec();
                        isolate.kill();
                        return Err(BootError::ShuttingDown);
                    }
                    inner.origins.lock().expect("pool poisoned").insert(key.clone(), origin);
                    Ok(isolate)
                }
                Err(e) => {
                    inner.metrics.boots.get_or_create(&vec![("result", "failed")]).inc();
                    inner.ctx.activity.report(&origin, &key.1, ActivityKind::BootFailure { message: e.to_string() });
                    tracing::warn!(origin = origin.name(), deployment_id = key.1, code = %e.code(), error = %e, "boot failed");
                    slots.settle(&key, None);
                    Err(e)
                }
            }
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(BootError::Start(Arc::new(isocloud_supervisor::StartError::Spawn(std::io::Error::other(format!(
                    "boot task failed: {e}"
                ))))))
            })
        }
        .boxed()
        .shared()
    }

    /// Stops an idle isolate [`Slots::lookup`] evicted to make room for a boot.
    fn evict(&self, key: Key, isolate: Arc<Isolate>, reason: &'static str) {
        self.inner.metrics.live_isolates.dec();
        self.inner.metrics.terminations.get_or_create(&vec![("reason", reason)]).inc();
        self.inner.metrics.deployments.ended(&key.1, Ending::Evicted);
        tracing::info!(
            deployment_id = key.1,
            pid = isolate.pid(),
            reason,
            "evicting the least recently used idle isolate"
        );
        if let Some(origin) = self.inner.origins.lock().expect("pool poisoned").remove(&key) {
            report_usage(&self.inner, &origin, &key.1, &isolate);
            self.inner.ctx.activity.report(&origin, &key.1, ActivityKind::Terminated { reason: "evicted".into() });
        }
        let grace = self.inner.options.kill_grace;
        tokio::spawn(async move { isolate.terminate(grace).await });
    }

    /// Books an isolate that died by itself (crash, `Deno.exit`).
    fn note_exit(&self, key: &Key, isolate: &Arc<Isolate>) {
        note_exit(&self.inner, key, isolate);
    }

    /// How many isolates run now.
    pub fn live(&self) -> usize {
        self.inner.slots.lock().expect("pool poisoned").ready().count()
    }

    /// The pids of running isolates (operations and tests).
    pub fn pids(&self) -> Vec<u32> {
        self.inner.slots.lock().expect("pool poisoned").ready().map(|(_, _, isolate)| isolate.pid()).collect()
    }

    /// Every running isolate: its host pid, whose deployment it serves and
    /// the tenant it counts under (the admin listener's `/isolates`). In its
    /// own PID namespace an isolate knows itself only as pid 1: this is where
    /// an operator finds which process is which deployment.
    pub fn isolates(&self) -> Vec<IsolateView> {
        let mut views: Vec<IsolateView> = self
            .inner
            .slots
            .lock()
            .expect("pool poisoned")
            .ready()
            .map(|((origin, deployment_id), tenant, isolate)| IsolateView {
                pid: isolate.pid(),
                origin: origin.clone(),
                deployment_id: deployment_id.clone(),
                tenant: tenant.to_string(),
            })
            .collect();
        views.sort_by(|a, b| (&a.origin, &a.deployment_id).cmp(&(&b.origin, &b.deployment_id)));
        views
    }

    /// Refuses new boots and terminates every isolate (SIGTERM, then SIGKILL
    /// after the grace period). Call after in-flight requests have drained.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Some(warm) = &self.inner.ctx.warm {
            warm.close();
        }
        // Queued boots end now (ShuttingDown), not after their turn.
        self.inner.ctx.admission.close();
        let isolates = self.inner.slots.lock().expect("pool poisoned").drain_ready();
        let grace = self.inner.options.kill_grace;
        futures_util::future::join_all(isolates.iter().map(|(_, isolate)| isolate.terminate(grace))).await;
        self.inner.metrics.live_isolates.set(0);
        for (key, isolate) in &isolates {
            if let Some(origin) = self.inner.origins.lock().expect("pool poisoned").remove(key) {
                report_usage(&self.inner, &origin, &key.1, isolate);
                self.inner.ctx.activity.report(&origin, &key.1, ActivityKind::Terminated { reason: "shutdown".into() });
            }
        }
        // What the isolates said last should reach their origins.
        self.inner.ctx.activity.flush(ACTIVITY_FLUSH_TIMEOUT).await;
    }
}

fn note_exit(inner: &Inner, key: &Key, isolate: &Arc<Isolate>) {
    inner.metrics.live_isolates.dec();
    let status = match isolate.state() {
        IsolateState::Exited(status) => status,
        IsolateState::Running => "running".into(),
    };
    let (reason, event) = match isolate.termination() {
        Some(Termination::CpuTimeLimit { limit_ms, used_ms }) => {
            ("cpu_time_limit", ActivityKind::CpuTimeLimit { limit: limit_ms, used: used_ms })
        }
        Some(Termination::MemoryLimit { limit_bytes, used_bytes }) => {
            ("memory_limit", ActivityKind::MemoryLimit { limit: limit_bytes, used: used_bytes })
        }
        None => {
            tracing::warn!(deployment_id = key.1, pid = isolate.pid(), %status, "isolate exited by itself");
            ("exited", ActivityKind::UncaughtException { message: format!("isolate process exited ({status})") })
        }
    };
    inner.metrics.terminations.get_or_create(&vec![("reason", reason)]).inc();
    match reason {
        "cpu_time_limit" => inner.metrics.deployments.ended(&key.1, Ending::CpuTimeLimit),
        "memory_limit" => inner.metrics.deployments.ended(&key.1, Ending::MemoryLimit),
        _ => {}
    }
    if let Some(origin) = inner.origins.lock().expect("pool poisoned").remove(key) {
        report_usage(inner, &origin, &key.1, isolate);
        inner.ctx.activity.report(&origin, &key.1, event);
    }
}

/// How often deno cache dirs past `max_deno_dirs` are pruned.
const DENO_DIR_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Reports what `isolate` used since its last report, if anything.
fn report_usage(inner: &Inner, origin: &Arc<dyn Origin>, deployment_id: &str, isolate: &Isolate) {
    let since = inner.usage_since.lock().expect("pool poisoned").clone();
    let used = isolate.take_usage();
    let fetch = used.fetch;
    inner.metrics.deployments.usage(deployment_id, used.requests, used.cpu_ms, used.peak_memory_bytes);
    inner.metrics.deployments.fetch(
        deployment_id,
        fetch.bytes_sent + fetch.bytes_received,
        fetch.denied + fetch.internal_denied + fetch.over_limit,
        fetch.loops,
    );
    // Refused calls are the tenant's business to know about: its fetch
    // failed, and its logs say why.
    for (count, why) in [
        (fetch.denied, "outside permissions.net (EGRESS_DENIED)"),
        (
            fetch.internal_denied,
            "to an internal address: loopback, private, link-local or the runner's own (EGRESS_DENIED)",
        ),
        (fetch.over_limit, "past the bound of connections one isolate may hold through the proxy"),
        (fetch.loops, "past the hop bound: a loop back into the cloud (LOOP_DETECTED)"),
    ] {
        if count > 0 {
            inner.ctx.activity.report(
                origin,
                deployment_id,
                ActivityKind::Log {
                    level: LogLevel::Warning,
                    message: format!("egress proxy refused {count} outbound call(s): {why}"),
                    request_id: None,
                },
            );
        }
    }
    if used.requests == 0
        && used.cpu_ms == 0
        && used.ingress_bytes == 0
        && used.egress_bytes == 0
        && fetch.requests == 0
        && fetch.bytes_sent == 0
        && fetch.bytes_received == 0
    {
        return;
    }
    inner.ctx.activity.report(
        origin,
        deployment_id,
        ActivityKind::Usage {
            requests: used.requests,
            cpu_ms: used.cpu_ms,
            wall_ms: used.wall_ms,
            ingress_bytes: used.ingress_bytes,
            egress_bytes: used.egress_bytes,
            peak_memory_bytes: used.peak_memory_bytes,
            errors: used.errors,
            fetch_requests: fetch.requests,
            fetch_sent_bytes: fetch.bytes_sent,
            fetch_received_bytes: fetch.bytes_received,
            interval_start: since,
            interval_end: isocloud_activity::now_rfc3339(),
            latency: Some(isocloud_protocol::LatencyHistogram::new(used.latency)),
            status_classes: Some(isocloud_protocol::StatusClasses::from_array(used.status)),
        },
    );
}

/// Reports the requests answered without an isolate since the last interval
/// as usage: each a request of its deployment, and an error when the
/// runner's answer was a 5xx (all of them today: boot failures, capacity).
fn report_refused(inner: &Inner) {
    let since = inner.usage_since.lock().expect("pool poisoned").clone();
    let refused = std::mem::take(&mut *inner.refused.lock().expect("pool poisoned"));
    for ((_, deployment_id), Refused { origin, status, latency }) in refused {
        let requests = latency.iter().sum();
        inner.metrics.deployments.usage(&deployment_id, requests, 0, 0);
        inner.ctx.activity.report(
            &origin,
            &deployment_id,
            ActivityKind::Usage {
                requests,
                cpu_ms: 0,
                wall_ms: 0,
                ingress_bytes: 0,
                egress_bytes: 0,
                peak_memory_bytes: 0,
                errors: status[4],
                fetch_requests: 0,
                fetch_sent_bytes: 0,
                fetch_received_bytes: 0,
                interval_start: since.clone(),
                interval_end: isocloud_activity::now_rfc3339(),
                latency: Some(isocloud_protocol::LatencyHistogram::new(latency)),
                status_classes: Some(isocloud_protocol::StatusClasses::from_array(status)),
            },
        );
    }
}

/// Terminates idle isolates, books crashed ones and reports usage, until the
/// pool is gone.
async fn reap(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_usage = std::time::Instant::now();
    let mut last_prune: Option<std::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if last_prune.is_none_or(|at| at.elapsed() >= DENO_DIR_PRUNE_INTERVAL) {
            last_prune = Some(std::time::Instant::now());
            let root = inner.ctx.policy.deno_dir.clone();
            let keep = inner.options.max_deno_dirs;
            let in_use: std::collections::HashSet<std::path::PathBuf> = inner
                .slots
                .lock()
                .expect("pool poisoned")
                .keys()
                .map(|(origin, id)| root.join(crate::boot::deno_dir_name(origin, id)))
                .collect();
            tokio::task::spawn_blocking(move || {
                let removed = isocloud_sandbox::prune_deno_dirs(&root, keep, &in_use);
                if removed > 0 {
                    tracing::info!(removed, keep, "pruned deno cache dirs of deployments not booted lately");
                }
            });
        }
        if last_usage.elapsed() >= inner.options.usage_interval {
            let running: Vec<(Key, Arc<Isolate>)> = inner
                .slots
                .lock()
                .expect("pool poisoned")
                .ready()
                .map(|(key, _, isolate)| (key.clone(), isolate.clone()))
                .collect();
            for (key, isolate) in running {
                let origin = inner.origins.lock().expect("pool poisoned").get(&key).cloned();
                if let Some(origin) = origin {
                    report_usage(&inner, &origin, &key.1, &isolate);
                }
            }
            report_refused(&inner);
            *inner.usage_since.lock().expect("pool poisoned") = isocloud_activity::now_rfc3339();
            last_usage = std::time::Instant::now();
        }
        let idle_timeout = inner.options.idle_timeout;
        let Sweep { exited: dead, idle } = inner.slots.lock().expect("pool poisoned").sweep(idle_timeout);
        for (key, isolate) in dead {
            note_exit(&inner, &key, &isolate);
        }
        for (key, isolate) in idle {
            inner.metrics.live_isolates.dec();
            inner.metrics.terminations.get_or_create(&vec![("reason", "idle")]).inc();
            tracing::info!(deployment_id = key.1, pid = isolate.pid(), "terminating idle isolate");
            if let Some(origin) = inner.origins.lock().expect("pool poisoned").remove(&key) {
                report_usage(&inner, &origin, &key.1, &isolate);
                inner.ctx.activity.report(&origin, &key.1, ActivityKind::Terminated { reason: "idle".into() });
            }
            let grace = inner.options.kill_grace;
            tokio::spawn(async move { isolate.terminate(grace).await });
        }
    }
}
