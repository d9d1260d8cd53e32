//! Activity reports to origins (`subhosting-protocol.md` §5), delivered at
//! least once. This crate owns the way there — batching, the on-disk spool,
//! per-origin delivery with backoff, what gives way when the spool is full —
//! and nothing of isolates: the pool hands it events, origins receive them.
//! It must not block its caller (events are queued, bounded) nor report
//! activity from inside a resolver call.
//!
//! Events are gathered in memory per (origin, deployment, [`Tier`]) and cut
//! into batches every 500 ms (sooner when one is full). Each batch gets its
//! `batch_id` as it is written to the on-disk [`spool`](spool::Spool), before
//! any attempt, and leaves the spool only when its origin answers 2xx; every
//! retry re-reads the same file, so an id never comes with other events. One
//! delivery task per origin sends its batches oldest first, a few at a time,
//! and backs off exponentially (250 ms doubling to 30 s, jittered) on a
//! non-2xx answer or an unreachable origin — only that origin waits. After a
//! restart, the spool's batches are delivered again: their origin is found by
//! the [`Origin::name`] stored in each file, through an [`OriginResolver`].
//!
//! When the spool is full, whole batches give way: oldest logs first, then
//! lifecycle events, never usage. Every dropped event is counted
//! (`isocloud_activity_events_dropped_total{kind}`) and reported to its
//! origin later as a `log` event of level `warning` whose message starts with
//! [`DROP_NOTE_PREFIX`] and carries the counts; such notes are never dropped.

mod spool;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use isocloud_origin::Origin;
use isocloud_protocol::{ActivityEvent, ActivityKind, LogLevel};
use tokio::sync::Notify;
use tokio::time::Instant;

pub use spool::SpoolError;
use spool::{Claimed, Dropped, Kinds, Spool, SpoolGauges, Tier, tier_of};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Events held in memory between cuts. Past it (the disk is slower than the
/// output) new log events are dropped, counted and noted; other kinds are
/// always taken.
const QUEUE_EVENTS: usize = 16_384;
/// The same bound in bytes of log events: a line may be up to
/// `MAX_LOG_MESSAGE_BYTES`, so a count alone would let a flood of long
/// lines hold hundreds of megabytes.
const QUEUE_LOG_BYTES: usize = 16 * 1024 * 1024;
const MAX_BATCH_EVENTS: usize = 500;
/// Upper bound of a batch (estimated before it is written; one event may
/// exceed it alone). Small batches make "drop the oldest" fine-grained.
const MAX_BATCH_BYTES: usize = 256 * 1024;
const CUT_INTERVAL: Duration = Duration::from_millis(500);
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Batches of one origin in flight at once while it answers; one while it fails.
const SENDS_PER_ORIGIN: usize = 4;

/// The message of the `log` event (level `warning`, no `request_id`) that
/// tells an origin how many of a deployment's events were dropped, e.g.
/// `[isocloud] activity events dropped: 1500 (log=1500)`.
pub const DROP_NOTE_PREFIX: &str = "[isocloud] activity events dropped:";

type ResolveFn = dyn Fn(&str) -> Option<Arc<dyn Origin>> + Send + Sync;

/// Finds an origin again by its [`Origin::name`], for batches an earlier run
/// left in the spool (remote origins are created per kid and rpc root, on
/// demand, so nothing else would know them at start-up). Called with the
/// sink's lock held: it must not block or report activity.
#[derive(Clone)]
pub struct OriginResolver(Arc<ResolveFn>);

impl OriginResolver {
    pub fn new(resolve: impl Fn(&str) -> Option<Arc<dyn Origin>> + Send + Sync + 'static) -> Self {
        Self(Arc::new(resolve))
    }

    /// Knows no origin: spooled batches wait until their origin reports again
    /// in this run.
    pub fn none() -> Self {
        Self::new(|_| None)
    }

    pub fn resolve(&self, name: &str) -> Option<Arc<dyn Origin>> {
        (self.0)(name)
    }
}

impl std::fmt::Debug for OriginResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OriginResolver")
    }
}

#[derive(Debug, Clone)]
pub struct ActivityOptions {
    /// Where batches wait for delivery (`<state>/spool`), kept across restarts.
    pub spool_dir: PathBuf,
    /// Bound of the spool; usage and drop notes may exceed it (they are never
    /// dropped), everything else gives way.
    pub spool_max_bytes: u64,
    pub resolver: OriginResolver,
}

/// The sink's share of the runner's metrics (registered by the caller).
#[derive(Clone, Default)]
pub struct ActivityMetrics {
    /// Events dropped undelivered, by `kind` (the event's `type`):
    /// `isocloud_activity_events_dropped_total`.
    pub dropped: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// What the spool holds now.
    pub spool_bytes: Gauge,
    pub spool_batches: Gauge,
}

/// Takes events from the pool and gets them to their origins. Cheap to
/// clone; every clone is the same sink.
#[derive(Clone)]
pub struct ActivitySink {
    shared: Arc<Shared>,
}

struct Shared {
    spool: Arc<Spool>,
    metrics: ActivityMetrics,
    resolver: OriginResolver,
    batch_bytes: usize,
    state: Mutex<State>,
    /// A pending batch is full: cut before the tick.
    cut_now: Notify,
    /// One cut at a time (the tick's and a flush's).
    cutting: tokio::sync::Mutex<()>,
    /// A delivery ended (either way) or a cut finished; `flush` re-checks.
    progress: Notify,
    /// Bumped by `flush`: deliveries retry at once, and failures are recorded
    /// against it so the flush knows every origin has had its try.
    flush_epoch: AtomicU64,
}

#[derive(Default)]
struct State {
    pending: HashMap<(String, String, Tier), Pending>,
    pending_events: usize,
    /// Estimated bytes of the log events in `pending`.
    pending_log_bytes: usize,
    /// Dropped events not yet reported, per (origin, deployment).
    drops: HashMap<(String, String), Unreported>,
    /// (origin, deployment) pairs whose drop note waits in the spool: further
    /// drops are summed into the next note, sent once that one arrived, so
    /// notes cannot pile up during an outage.
    noted: HashSet<(String, String)>,
    /// The running delivery task of each origin.
    workers: HashMap<String, Worker>,
}

/// Drops of one deployment that no note has reported yet.
#[derive(Default)]
struct Unreported {
    /// Its origin, if known, to deliver the note without the resolver.
    origin: Option<Arc<dyn Origin>>,
    kinds: Kinds,
}

struct Pending {
    origin: Arc<dyn Origin>,
    events: Vec<ActivityEvent>,
    bytes: usize,
}

struct Worker {
    wake: Arc<Notify>,
    /// The flush epoch of its latest failed attempt.
    failed_epoch: u64,
}

/// A batch about to be written to the spool.
struct NewBatch {
    origin: Option<Arc<dyn Origin>>,
    name: String,
    deployment_id: String,
    tier: Tier,
    note: bool,
    events: Vec<ActivityEvent>,
    /// A note's counts, to be noted again if the note cannot be written.
    noted_kinds: Kinds,
}

impl ActivitySink {
    /// Opens the spool (loading what an earlier run left and starting its
    /// delivery) and starts cutting batches.
    pub fn start(options: ActivityOptions, metrics: ActivityMetrics) -> Result<Self, SpoolError> {
        let gauges = SpoolGauges { bytes: metrics.spool_bytes.clone(), batches: metrics.spool_batches.clone() };
        let spool = Arc::new(Spool::open(&options.spool_dir, options.spool_max_bytes, gauges)?);
        let noted = spool.notes();
        let shared = Arc::new(Shared {
            batch_bytes: MAX_BATCH_BYTES.min(usize::try_from(options.spool_max_bytes / 8).unwrap_or(usize::MAX).max(1)),
            spool,
            metrics,
            resolver: options.resolver,
            state: Mutex::new(State { noted, ..State::default() }),
            cut_now: Notify::new(),
            cutting: tokio::sync::Mutex::new(()),
            progress: Notify::new(),
            flush_epoch: AtomicU64::new(0),
        });
        let left = shared.spool.origins();
        if !left.is_empty() {
            tracing::info!(
                origins = left.len(),
                bytes = shared.spool.bytes(),
                "activity spool: delivering what an earlier run left"
            );
        }
        {
            let mut state = shared.lock_state();
            for name in left {
                shared.ensure_worker(&mut state, &name, None);
            }
        }
        tokio::spawn(cut_loop(shared.clone()));
        Ok(Self { shared })
    }

    pub fn report(&self, origin: &Arc<dyn Origin>, deployment_id: &str, kind: ActivityKind) {
        let tier = tier_of(&kind);
        let event = ActivityEvent { deployment_id: deployment_id.to_owned(), timestamp: now_rfc3339(), kind };
        let size = estimated_bytes(&event);
        let mut state = self.shared.lock_state();
        if tier == Tier::Log && (state.pending_events >= QUEUE_EVENTS || state.pending_log_bytes >= QUEUE_LOG_BYTES) {
            let dropped = Dropped {
                origin: origin.name().to_owned(),
                deployment_id: deployment_id.to_owned(),
                kinds: vec![("log", 1)],
            };
            self.shared.count_drops(&mut state, Some(origin), [dropped]);
            return;
        }
        state.pending_events += 1;
        if tier == Tier::Log {
            state.pending_log_bytes += size;
        }
        let key = (origin.name().to_owned(), deployment_id.to_owned(), tier);
        let slot = state.pending.entry(key).or_insert_with(|| Pending {
            origin: origin.clone(),
            events: Vec::new(),
            bytes: 0,
        });
        slot.events.push(event);
        slot.bytes += size;
        if slot.events.len() >= MAX_BATCH_EVENTS || slot.bytes >= self.shared.batch_bytes {
            self.shared.cut_now.notify_one();
        }
    }

    /// Spools everything reported so far and gives each origin with batches
    /// one immediate attempt (backoff skipped). Returns once every batch is
    /// delivered or its origin failed since the flush began (or cannot be
    /// found), or after `timeout`. What is undelivered stays in the spool for
    /// the next start. Used at shutdown.
    pub async fn flush(&self, timeout: Duration) {
        let shared = self.shared.clone();
        let _ = tokio::time::timeout(timeout, async move {
            cut(&shared, true).await;
            let epoch = shared.flush_epoch.fetch_add(1, Ordering::AcqRel) + 1;
            for worker in shared.lock_state().workers.values() {
                worker.wake.notify_one();
            }
            loop {
                let progress = shared.progress.notified();
                tokio::pin!(progress);
                progress.as_mut().enable();
                if shared.settled(epoch) {
                    break;
                }
                progress.await;
            }
        })
        .await;
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("activity state poisoned")
    }

    /// Counts dropped events and remembers them for the next drop note.
    fn count_drops(
        &self,
        state: &mut State,
        origin: Option<&Arc<dyn Origin>>,
        dropped: impl IntoIterator<Item = Dropped>,
    ) {
        for d in dropped {
            for (kind, n) in &d.kinds {
                self.metrics.dropped.get_or_create(&vec![("kind", *kind)]).inc_by(*n);
            }
            let slot = state.drops.entry((d.origin, d.deployment_id)).or_default();
            if slot.origin.is_none() {
                slot.origin = origin.cloned();
            }
            add_kinds(&mut slot.kinds, &d.kinds);
        }
    }

    /// Wakes the delivery task of `name`, or starts one if the origin is
    /// known (given, or found by the resolver).
    fn ensure_worker(self: &Arc<Self>, state: &mut State, name: &str, origin: Option<Arc<dyn Origin>>) {
        if let Some(worker) = state.workers.get(name) {
            worker.wake.notify_one();
            return;
        }
        let Some(origin) = origin.or_else(|| self.resolver.resolve(name)) else {
            tracing::warn!(
                origin = name,
                batches = self.spool.batches_of(name),
                "activity batches wait in the spool for an origin this runner does not know (any more)"
            );
            return;
        };
        let wake = Arc::new(Notify::new());
        state.workers.insert(name.to_owned(), Worker { wake: wake.clone(), failed_epoch: 0 });
        tokio::spawn(deliver(self.clone(), name.to_owned(), origin, wake));
    }

    /// The delivery task of `name` may end: nothing of its origin is left.
    fn retire(&self, name: &str) -> bool {
        let mut state = self.lock_state();
        if self.spool.has_batches(name) {
            return false;
        }
        state.workers.remove(name);
        true
    }

    /// Whether a flush of `epoch` has nothing more to wait for.
    fn settled(&self, epoch: u64) -> bool {
        let state = self.lock_state();
        self.spool.origins().iter().all(|name| match state.workers.get(name) {
            // Nobody can deliver these in this run; they wait for the next.
            None => true,
            Some(worker) => worker.failed_epoch >= epoch,
        })
    }

    /// Takes what is pending, cut into batches, plus the drop notes due.
    fn take_batches(&self, every_note: bool) -> Vec<NewBatch> {
        let mut guard = self.lock_state();
        let state = &mut *guard;
        let mut out = Vec::new();
        state.pending_events = 0;
        state.pending_log_bytes = 0;
        for ((name, deployment_id, tier), pending) in state.pending.drain() {
            for events in split(pending.events, self.batch_bytes) {
                out.push(NewBatch {
                    origin: Some(pending.origin.clone()),
                    name: name.clone(),
                    deployment_id: deployment_id.clone(),
                    tier,
                    note: false,
                    events,
                    noted_kinds: Kinds::new(),
                });
            }
        }
        let due: Vec<(String, String)> =
            state.drops.keys().filter(|key| every_note || !state.noted.contains(*key)).cloned().collect();
        for key in due {
            let Unreported { origin, kinds } = state.drops.remove(&key).expect("listed");
            let event = drop_note(&key.1, &kinds);
            state.noted.insert(key.clone());
            out.push(NewBatch {
                origin,
                name: key.0,
                deployment_id: key.1,
                tier: Tier::Keep,
                note: true,
                events: vec![event],
                noted_kinds: kinds,
            });
        }
        out
    }

    /// Books the outcome of one delivery attempt.
    fn settle(&self, name: &str, backoff: &mut Backoff, epoch: u64, done: Attempt) {
        match done.outcome {
            Outcome::Delivered => {
                self.spool.delivered(done.claimed.seq);
                if done.claimed.note {
                    self.lock_state().noted.remove(&(name.to_owned(), done.claimed.deployment_id));
                }
                if backoff.failing {
                    tracing::info!(origin = name, "activity delivery recovered");
                }
                *backoff = Backoff::default();
            }
            Outcome::Failed(error) => {
                self.spool.release(done.claimed.seq);
                if let Some(worker) = self.lock_state().workers.get_mut(name) {
                    worker.failed_epoch = worker.failed_epoch.max(done.epoch);
                }
                if backoff.failing {
                    tracing::debug!(origin = name, %error, "activity delivery failed again");
                } else {
                    tracing::warn!(origin = name, %error, "activity delivery failed; batches wait in the spool, retried with backoff");
                }
                // An attempt that began before the latest flush must not push
                // back the attempt that flush asked for.
                if done.epoch == epoch {
                    backoff.failed();
                } else {
                    backoff.failing = true;
                }
            }
            Outcome::Unreadable(error) => {
                if let Some(dropped) = self.spool.forget(done.claimed.seq) {
                    tracing::warn!(origin = name, %error, "unreadable activity batch dropped");
                    let mut state = self.lock_state();
                    if done.claimed.note {
                        // Its counts are lost, but later drops must still be noted.
                        state.noted.remove(&(name.to_owned(), done.claimed.deployment_id));
                    } else {
                        self.count_drops(&mut state, None, [dropped]);
                    }
                }
            }
        }
        self.progress.notify_waiters();
    }
}

async fn cut_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(CUT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.cut_now.notified() => {}
        }
        cut(&shared, false).await;
    }
}

/// Writes what is pending to the spool as batches and wakes their origins'
/// delivery. With `every_note`, drops are noted even where a note already
/// waits, so that nothing counted stays only in memory (shutdown).
async fn cut(shared: &Arc<Shared>, every_note: bool) {
    let _one_at_a_time = shared.cutting.lock().await;
    let batches = shared.take_batches(every_note);
    if batches.is_empty() {
        return;
    }
    let spool = shared.spool.clone();
    let written = tokio::task::spawn_blocking(move || {
        let results: Vec<_> = batches
            .into_iter()
            .map(|mut batch| {
                let events = std::mem::take(&mut batch.events);
                let kinds = spool::count_kinds(events.iter().map(|e| &e.kind));
                // Kept events survive a failed write: they go back to pending.
                let keep = (batch.tier == Tier::Keep && !batch.note).then(|| events.clone());
                let result = spool.push(&batch.name, &batch.deployment_id, batch.tier, batch.note, events);
                (batch, kinds, keep, result)
            })
            .collect();
        if let Err(e) = spool.sync_dir() {
            tracing::warn!(error = %e, "cannot sync the activity spool folder");
        }
        results
    })
    .await;
    let Ok(results) = written else { return };

    let mut state = shared.lock_state();
    let mut touched: HashMap<String, Option<Arc<dyn Origin>>> = HashMap::new();
    for (batch, kinds, keep, result) in results {
        match result {
            Ok(pushed) => {
                shared.count_drops(&mut state, None, pushed.dropped);
                if pushed.batch_id.is_some() {
                    let slot = touched.entry(batch.name).or_default();
                    if slot.is_none() {
                        *slot = batch.origin;
                    }
                }
            }
            Err(e) => {
                tracing::error!(origin = batch.name, deployment_id = batch.deployment_id, error = %e, "cannot write an activity batch to the spool");
                let key = (batch.name.clone(), batch.deployment_id.clone());
                match (keep, batch.origin) {
                    (Some(events), Some(origin)) => {
                        state.pending_events += events.len();
                        let slot = state.pending.entry((key.0, key.1, Tier::Keep)).or_insert_with(|| Pending {
                            origin,
                            events: Vec::new(),
                            bytes: 0,
                        });
                        slot.events.splice(0..0, events);
                    }
                    (_, origin) if batch.note => {
                        // The note's counts go back, to be noted again.
                        state.noted.remove(&key);
                        let slot = state.drops.entry(key).or_default();
                        slot.origin = slot.origin.take().or(origin);
                        add_kinds(&mut slot.kinds, &batch.noted_kinds);
                    }
                    (_, origin) => {
                        let dropped = Dropped { origin: key.0, deployment_id: key.1, kinds };
                        shared.count_drops(&mut state, origin.as_ref(), [dropped]);
                    }
                }
            }
        }
    }
    for (name, origin) in touched {
        shared.ensure_worker(&mut state, &name, origin);
    }
    drop(state);
    shared.progress.notify_waiters();
}

struct Attempt {
    claimed: Claimed,
    /// The flush epoch when the attempt began.
    epoch: u64,
    outcome: Outcome,
}

enum Outcome {
    Delivered,
    /// Non-2xx, unreachable, timed out: retried.
    Failed(String),
    /// The file cannot be read back: never sendable, dropped.
    Unreadable(String),
}

/// The delivery task of one origin: its batches oldest first, a few at a
/// time, with backoff while it fails. Ends when none is left.
async fn deliver(shared: Arc<Shared>, name: String, origin: Arc<dyn Origin>, wake: Arc<Notify>) {
    let mut sends: FuturesUnordered<BoxFuture<'static, Attempt>> = FuturesUnordered::new();
    let mut backoff = Backoff::default();
    let mut epoch = shared.flush_epoch.load(Ordering::Acquire);
    loop {
        let latest = shared.flush_epoch.load(Ordering::Acquire);
        if latest != epoch {
            // A flush: one more try now, whatever the backoff said.
            epoch = latest;
            backoff.until = None;
        }
        let waiting = backoff.until.filter(|until| *until > Instant::now());
        if waiting.is_none() {
            let limit = if backoff.failing { 1 } else { SENDS_PER_ORIGIN };
            while sends.len() < limit {
                let Some(claimed) = shared.spool.claim_next(&name) else { break };
                sends.push(Box::pin(attempt(shared.spool.clone(), origin.clone(), claimed, epoch)));
            }
            if sends.is_empty() {
                if shared.retire(&name) {
                    return;
                }
                // A batch arrived between the claim and the check.
                continue;
            }
        }
        tokio::select! {
            Some(done) = sends.next(), if !sends.is_empty() => shared.settle(&name, &mut backoff, epoch, done),
            () = wake.notified() => {}
            () = tokio::time::sleep_until(waiting.unwrap_or_else(Instant::now)), if waiting.is_some() => {}
        }
    }
}

async fn attempt(spool: Arc<Spool>, origin: Arc<dyn Origin>, claimed: Claimed, epoch: u64) -> Attempt {
    let seq = claimed.seq;
    let outcome = match tokio::task::spawn_blocking(move || spool.read(seq)).await {
        Ok(Ok(batch)) => match origin.report_activity(&claimed.deployment_id, &batch).await {
            Ok(()) => Outcome::Delivered,
            Err(e) => Outcome::Failed(e.to_string()),
        },
        Ok(Err(e)) => Outcome::Unreadable(e.to_string()),
        Err(e) => Outcome::Unreadable(e.to_string()),
    };
    Attempt { claimed, epoch, outcome }
}

/// Per origin: 250 ms, doubling to 30 s, each up to a quarter shorter at
/// random so runners that lost an origin together do not retry in step.
#[derive(Default)]
struct Backoff {
    rounds: u32,
    until: Option<Instant>,
    /// Since the last success: one batch at a time, as a probe.
    failing: bool,
}

impl Backoff {
    fn failed(&mut self) {
        let now = Instant::now();
        self.failing = true;
        if self.until.is_some_and(|until| until > now) {
            // Another send of the same round failed too: one round, one step.
            return;
        }
        let base = BACKOFF_FIRST.saturating_mul(1 << self.rounds.min(16)).min(BACKOFF_MAX);
        self.rounds += 1;
        self.until = Some(now + base.mul_f64(1.0 - random_unit() / 4.0));
    }
}

/// A number in [0, 1) from the OS-seeded uuid generator (no rand dependency
/// for one jitter).
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() as u64 >> 11) as f64 / (1u64 << 53) as f64
}

/// Cuts `events` into batches of at most `MAX_BATCH_EVENTS` events and about
/// `max_bytes` (at least one event each).
fn split(events: Vec<ActivityEvent>, max_bytes: usize) -> Vec<Vec<ActivityEvent>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for event in events {
        let size = estimated_bytes(&event);
        if !current.is_empty() && (current.len() >= MAX_BATCH_EVENTS || bytes + size > max_bytes) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(event);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Roughly the event's JSON size: the fixed fields plus its strings.
fn estimated_bytes(event: &ActivityEvent) -> usize {
    let text = match &event.kind {
        ActivityKind::Log { message, request_id, .. } => message.len() + request_id.as_ref().map_or(0, String::len),
        ActivityKind::BootFailure { message } | ActivityKind::UncaughtException { message } => message.len(),
        ActivityKind::Terminated { reason } => reason.len(),
        _ => 0,
    };
    128 + event.deployment_id.len() + text
}

fn add_kinds(into: &mut Kinds, from: &Kinds) {
    for (kind, n) in from {
        match into.iter_mut().find(|(k, _)| k == kind) {
            Some((_, count)) => *count += n,
            None => into.push((kind, *n)),
        }
    }
}

fn drop_note(deployment_id: &str, kinds: &Kinds) -> ActivityEvent {
    let total: u64 = kinds.iter().map(|(_, n)| n).sum();
    let detail: Vec<String> = kinds.iter().map(|(kind, n)| format!("{kind}={n}")).collect();
    ActivityEvent {
        deployment_id: deployment_id.to_owned(),
        timestamp: now_rfc3339(),
        kind: ActivityKind::Log {
            level: LogLevel::Warning,
            message: format!("{DROP_NOTE_PREFIX} {total} ({})", detail.join(" ")),
            request_id: None,
        },
    }
}

/// RFC 3339 in UTC with millisecond precision, without a date crate.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_shape() {
        let ts = now_rfc3339();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
    }

    #[test]
    fn a_drop_note_says_how_many_of_which_kind() {
        let kinds: Kinds = vec![("log", 1500), ("boot", 2)];
        let note = drop_note("d", &kinds);
        let ActivityKind::Log { level, message, request_id } = &note.kind else { panic!("a log event") };
        assert_eq!(*level, LogLevel::Warning);
        assert!(request_id.is_none());
        assert_eq!(message, "[isocloud] activity events dropped: 1502 (log=1500 boot=2)");
    }

    #[test]
    fn batches_are_cut_by_count_and_size() {
        let event = |message: String| ActivityEvent {
            deployment_id: "d".into(),
            timestamp: now_rfc3339(),
            kind: ActivityKind::Log { level: LogLevel::Info, message, request_id: None },
        };
        let many: Vec<_> = (0..1200).map(|i| event(format!("line {i}"))).collect();
        let sizes: Vec<usize> = split(many, usize::MAX).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![500, 500, 200]);
        let big: Vec<_> = (0..4).map(|_| event("x".repeat(1000))).collect();
        let sizes: Vec<usize> = split(big, 2500).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2]);
        // One event larger than the bound is a batch of its own.
        let sizes: Vec<usize> = split(vec![event("x".repeat(10_000))], 2500).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1]);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let mut waits = Vec::new();
        for _ in 0..10 {
            backoff.until = None;
            let before = Instant::now();
            backoff.failed();
            waits.push(backoff.until.unwrap() - before);
        }
        for (i, wait) in waits.iter().enumerate() {
            let base = BACKOFF_FIRST.saturating_mul(1 << i).min(BACKOFF_MAX);
            assert!(*wait <= base + Duration::from_millis(5) && *wait >= base * 3 / 4, "round {i}: {wait:?}");
        }
        // A second failure of the same round does not step further.
        let until = backoff.until;
        backoff.failed();
        assert_eq!(backoff.until, until);
    }
}
