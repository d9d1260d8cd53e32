//! Boot admission: at most `max_concurrent_boots` deno processes start at
//! once; other boots wait their turn in a bounded first-come-first-served
//! queue.
//!
//! Why: a deno start is mostly CPU (V8, the harness, the tenant's modules).
//! Started all at once, N boots share the cores so that none finishes before
//! all do (199 never-seen deployments at once: every answer after ~5.8 s);
//! taking turns, the first answers come after about one cold start and the
//! last no later than before. A turn is held from admission to "serving" (or
//! the boot's failure); `--boot-timeout-s` counts from the spawn, after
//! admission, so time spent queueing never fails a start.
//!
//! What is not admitted: loading the deployment from its origin (network
//! I/O, before the queue), and boots that take a pre-started isolate (their
//! number is bounded by the isolates waiting, a few per profile, and they
//! cost milliseconds).
//!
//! The queue is shared, so each tenant may hold only its share of it (the
//! share of the isolate slots `--max-isolates-per-tenant` gives it): one
//! tenant's flood of new deployments cannot fill the queue and turn every
//! other tenant's boot away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::BootError;

/// What one deno start costs in memory while it starts, for the default
/// concurrency: a hello-world isolate's resident memory peaks at ~44 MiB
/// when it starts serving (VmHWM; ~12 MiB of it its own, the rest deno's
/// shared pages; bench/burst.py prints the latter), counted whole and
/// rounded up for tenant code that does more at start.
pub const BOOT_MEMORY_BYTES: u64 = 64 * 1024 * 1024;

/// How the queue behaves; see `--max-concurrent-boots`, `--max-boot-queue`.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionOptions {
    /// Deno processes starting at once, at most (≥ 1).
    pub max_concurrent_boots: usize,
    /// Boots waiting for a turn, at most; one more is refused (503
    /// `CAPACITY`, `Retry-After`). 0: a boot starts at once or is refused.
    pub max_boot_queue: usize,
    /// How long a boot may wait for its turn; past it the boot is refused
    /// like one the full queue turned away.
    pub max_queue_wait: Duration,
}

impl AdmissionOptions {
    /// The default concurrency on this machine: [`default_concurrency`] of
    /// its cores and the memory available now (the smaller of
    /// `MemAvailable` and what the runner's cgroup still allows).
    pub fn default_concurrency_here() -> (usize, usize, Option<u64>) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let available = memory_available_bytes();
        (default_concurrency(cores, available), cores, available)
    }
}

/// Two starts per core keep the cores busy while one start waits on the
/// disk or its control socket (a start is ~60 ms of CPU in ~90 ms here),
/// and no fewer than two; at most as many as half the available memory holds
/// at [`BOOT_MEMORY_BYTES`] each (never below one).
pub fn default_concurrency(cores: usize, memory_available_bytes: Option<u64>) -> usize {
    let by_cpu = (2 * cores).max(2);
    match memory_available_bytes {
        Some(bytes) => by_cpu.min(usize::try_from(bytes / 2 / BOOT_MEMORY_BYTES).unwrap_or(usize::MAX)).max(1),
        None => by_cpu,
    }
}

/// `MemAvailable` of /proc/meminfo, lowered to what the runner's own cgroup
/// v2 still allows (`memory.max − memory.current`) when that is less.
fn memory_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let host = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)?;
    let cgroup = (|| {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|line| line.strip_prefix("0::"))?;
        let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        let max: u64 = std::fs::read_to_string(dir.join("memory.max")).ok()?.trim().parse().ok()?;
        let current: u64 = std::fs::read_to_string(dir.join("memory.current")).ok()?.trim().parse().ok()?;
        Some(max.saturating_sub(current))
    })();
    Some(cgroup.map_or(host, |c| c.min(host)))
}

/// The admission's share of the pool's metrics.
#[derive(Clone)]
pub(crate) struct AdmissionMetrics {
    /// Boots waiting for a turn now.
    pub queue_length: Gauge,
    /// Deno processes starting now (holding a turn).
    pub running: Gauge,
    /// From asking for a turn to getting it (0 when one was free).
    pub wait_seconds: Histogram,
    /// Boots that had to wait for a turn.
    pub queued: Counter,
    /// Boots refused, by reason.
    pub refusals: Family<Vec<(&'static str, &'static str)>, Counter>,
}

pub(crate) struct Admission {
    permits: Arc<Semaphore>,
    options: AdmissionOptions,
    waiting: AtomicUsize,
    /// Boots one tenant may have waiting, at most.
    max_waiting_per_tenant: usize,
    /// Boots waiting now, per tenant (none listed: none waiting).
    waiting_by_tenant: Mutex<HashMap<String, usize>>,
    /// How long a turn is held, on average lately (µs; 0: none yet).
    held_us: Arc<AtomicU64>,
    metrics: AdmissionMetrics,
}

/// A boot's turn to start its deno process; the next boot in the queue
/// starts when it drops.
pub(crate) struct Turn {
    _permit: OwnedSemaphorePermit,
    running: Gauge,
    since: Instant,
    held_us: Arc<AtomicU64>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.running.dec();
        // An exponential average over the last few dozen turns; races between
        // turns ending together lose a sample, which an average can spare.
        let sample = self.since.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        let average = self.held_us.load(Ordering::Relaxed);
        let next = if average == 0 { sample.max(1) } else { (average * 15 + sample) / 16 };
        self.held_us.store(next.max(1), Ordering::Relaxed);
    }
}

/// Takes a place in the queue back when a waiting boot ends, whichever way.
struct Place<'a>(&'a Admission);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let now = self.0.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        self.0.metrics.queue_length.set(now as i64);
    }
}

/// Takes a tenant's place in its share of the queue back.
struct TenantPlace<'a>(&'a Admission, &'a str);

impl Drop for TenantPlace<'_> {
    fn drop(&mut self) {
        let mut waiting = self.0.waiting_by_tenant.lock().expect("admission poisoned");
        if let Some(count) = waiting.get_mut(self.1) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(self.1);
            }
        }
    }
}

impl Admission {
    /// `max_waiting_per_tenant`: a tenant's share of `max_boot_queue`.
    pub(crate) fn new(options: AdmissionOptions, max_waiting_per_tenant: usize, metrics: AdmissionMetrics) -> Self {
        let permits = Arc::new(Semaphore::new(options.max_concurrent_boots.max(1)));
        Self {
            permits,
            options,
            waiting: AtomicUsize::new(0),
            max_waiting_per_tenant,
            waiting_by_tenant: Mutex::new(HashMap::new()),
            held_us: Arc::new(AtomicU64::new(0)),
            metrics,
        }
    }

    /// Waits for a turn: at once if one is free, else behind every boot that
    /// asked earlier (tokio's semaphore is fair: a free permit goes to the
    /// longest waiter, and `try_acquire` cannot overtake one). Refused at
    /// once when the queue is full or when, at the pace turns have been
    /// taking lately, this one would come after `max_queue_wait` (a client
    /// is better told to retry now than after waiting for nothing); refused
    /// too when the wait passes `max_queue_wait` all the same.
    pub(crate) async fn turn(&self, tenant: &str) -> Result<Turn, BootError> {
        let asked = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(BootError::ShuttingDown),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
                let place = Place(self);
                if ahead >= self.options.max_boot_queue {
                    drop(place);
                    self.refuse("queue_full");
                    return Err(BootError::BootQueueFull(ahead));
                }
                if self.expected_wait(ahead) > self.options.max_queue_wait {
                    drop(place);
                    self.refuse("queue_too_slow");
                    return Err(BootError::BootQueueFull(ahead));
                }
                let tenant_place = {
                    let mut waiting = self.waiting_by_tenant.lock().expect("admission poisoned");
                    let mine = waiting.entry(tenant.to_owned()).or_default();
                    if *mine >= self.max_waiting_per_tenant {
                        let mine = *mine;
                        drop(waiting);
                        drop(place);
                        self.refuse("tenant_queue_full");
                        return Err(BootError::TenantBootQueueFull(mine));
                    }
                    *mine += 1;
                    TenantPlace(self, tenant)
                };
                self.metrics.queue_length.set(ahead as i64 + 1);
                self.metrics.queued.inc();
                let acquired = tokio::time::timeout(self.options.max_queue_wait, self.permits.clone().acquire_owned());
                let result = acquired.await;
                drop(tenant_place);
                drop(place);
                match result {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_closed)) => return Err(BootError::ShuttingDown),
                    Err(_elapsed) => {
                        self.refuse("queue_timeout");
                        return Err(BootError::BootQueueTimeout(self.options.max_queue_wait.as_secs()));
                    }
                }
            }
        };
        self.metrics.wait_seconds.observe(asked.elapsed().as_secs_f64());
        self.metrics.running.inc();
        Ok(Turn {
            _permit: permit,
            running: self.metrics.running.clone(),
            since: Instant::now(),
            held_us: self.held_us.clone(),
        })
    }

    /// When a boot with `ahead` boots waiting before it would get its turn,
    /// if turns go on being held as long as lately (zero before the first).
    fn expected_wait(&self, ahead: usize) -> Duration {
        let held = Duration::from_micros(self.held_us.load(Ordering::Relaxed));
        held.saturating_mul((ahead + 1) as u32) / self.options.max_concurrent_boots.max(1) as u32
    }

    fn refuse(&self, reason: &'static str) {
        self.metrics.refusals.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Boots waiting for a turn now.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Ends every wait with `ShuttingDown`; no turn is given again.
    pub(crate) fn close(&self) {
        self.permits.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> AdmissionMetrics {
        AdmissionMetrics {
            queue_length: Gauge::default(),
            running: Gauge::default(),
            wait_seconds: Histogram::new([0.1]),
            queued: Counter::default(),
            refusals: Family::default(),
        }
    }

    fn admission(concurrent: usize, queue: usize, wait: Duration) -> Arc<Admission> {
        Arc::new(Admission::new(
            AdmissionOptions { max_concurrent_boots: concurrent, max_boot_queue: queue, max_queue_wait: wait },
            queue,
            metrics(),
        ))
    }

    #[test]
    fn default_concurrency_follows_cores_then_memory() {
        assert_eq!(default_concurrency(1, None), 2);
        assert_eq!(default_concurrency(2, None), 4);
        assert_eq!(default_concurrency(16, Some(64 << 30)), 32);
        // 1 GiB available: half of it holds 8 starts.
        assert_eq!(default_concurrency(16, Some(1 << 30)), 8);
        // Almost nothing available: still one at a time.
        assert_eq!(default_concurrency(16, Some(10 << 20)), 1);
        let (here, cores, _) = AdmissionOptions::default_concurrency_here();
        assert!(here >= 1 && here <= 2 * cores.max(1), "{here} on {cores} cores");
    }

    #[tokio::test]
    async fn turns_go_first_come_first_served_and_never_more_at_once_than_allowed() {
        let admission = admission(2, 100, Duration::from_secs(10));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        // The first two hold their turns until every boot has asked, so the
        // other ten must queue, whatever the machine's pace.
        let (gate, opened) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for i in 0..12usize {
            let (admission_, order, running, peak) = (admission.clone(), order.clone(), running.clone(), peak.clone());
            let mut opened = opened.clone();
            tasks.push(tokio::spawn(async move {
                let turn = admission_.turn("t").await.unwrap();
                order.lock().unwrap().push(i);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let _ = opened.wait_for(|open| *open).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                drop(turn);
            }));
            // Each asks only once the one before holds a turn or is queued.
            let expected_queue = i.saturating_sub(1) as i64;
            while admission.metrics.running.get() + admission.metrics.queue_length.get() < (i + 1) as i64
                || (i >= 2 && admission.metrics.queue_length.get() < expected_queue)
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        gate.send(true).unwrap();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..12).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert_eq!(admission.metrics.running.get(), 0);
        assert_eq!(admission.metrics.queue_length.get(), 0);
        assert_eq!(admission.metrics.queued.get(), 10);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_long_wait_is_refused() {
        let admission = admission(1, 2, Duration::from_millis(300));
        let first = admission.turn("t").await.unwrap();
        let queued: Vec<_> = (0..2)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.turn("t").await.map(drop) })
            })
            .collect();
        while admission.waiting() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(matches!(admission.turn("t").await, Err(BootError::BootQueueFull(2))));
        assert_eq!(admission.metrics.refusals.get_or_create(&vec![("reason", "queue_full")]).get(), 1);
        // The turn is held past the wait bound: both waiters give up.
        for task in queued {
            assert!(matches!(task.await.unwrap(), Err(BootError::BootQueueTimeout(_))));
        }
        assert_eq!(admission.metrics.refusals.get_or_create(&vec![("reason", "queue_timeout")]).get(), 2);
        assert_eq!(admission.waiting(), 0);
        drop(first);
        // Free again: the next boot starts at once.
        let started = Instant::now();
        drop(admission.turn("t").await.unwrap());
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_boot_that_would_wait_past_the_bound_at_the_recent_pace_is_refused_at_once() {
        let admission = admission(1, 100, Duration::from_millis(250));
        // Turns held 100 ms each: the pace the queue has been going at.
        for _ in 0..3 {
            let turn = admission.turn("t").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(turn);
        }
        let pace = admission.expected_wait(0);
        assert!(pace >= Duration::from_millis(100) && pace < Duration::from_millis(125), "{pace:?}");
        let first = admission.turn("t").await.unwrap();
        // The first two in line come within the bound (~100 and ~200 ms)...
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.turn("t").await.map(drop) })
            })
            .collect();
        while admission.waiting() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // ...a third would not (~300 ms): refused now, not after 250 ms.
        let asked = Instant::now();
        for _ in 0..10 {
            assert!(matches!(admission.turn("t").await, Err(BootError::BootQueueFull(2))));
        }
        assert!(asked.elapsed() < Duration::from_millis(50));
        assert_eq!(admission.metrics.refusals.get_or_create(&vec![("reason", "queue_too_slow")]).get(), 10);
        drop(first);
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn one_tenant_cannot_fill_the_queue() {
        let admission = Arc::new(Admission::new(
            AdmissionOptions { max_concurrent_boots: 1, max_boot_queue: 8, max_queue_wait: Duration::from_secs(10) },
            2,
            metrics(),
        ));
        let first = admission.turn("a").await.unwrap();
        let wait = |tenant: &'static str| {
            let admission = admission.clone();
            tokio::spawn(async move { admission.turn(tenant).await.map(drop) })
        };
        let waiters = vec![wait("a"), wait("a")];
        while admission.waiting() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // a's share (2) is taken; the queue (8) is not.
        assert!(matches!(admission.turn("a").await, Err(BootError::TenantBootQueueFull(2))));
        assert_eq!(admission.metrics.refusals.get_or_create(&vec![("reason", "tenant_queue_full")]).get(), 1);
        let others = vec![wait("b"), wait("b")];
        while admission.waiting() < 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(first);
        for waiter in waiters.into_iter().chain(others) {
            waiter.await.unwrap().unwrap();
        }
        // Every place given back: a may queue again.
        assert!(admission.waiting_by_tenant.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_queue_of_zero_starts_at_once_or_refuses_and_closing_ends_waits() {
        let admission = admission(1, 0, Duration::from_secs(10));
        let turn = admission.turn("t").await.unwrap();
        assert!(matches!(admission.turn("t").await, Err(BootError::BootQueueFull(0))));
        drop(turn);

        let admission = self::admission(1, 10, Duration::from_secs(10));
        let turn = admission.turn("t").await.unwrap();
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.turn("t").await.map(drop) })
        };
        while admission.waiting() < 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        admission.close();
        assert!(matches!(waiter.await.unwrap(), Err(BootError::ShuttingDown)));
        drop(turn);
        assert!(matches!(admission.turn("t").await, Err(BootError::ShuttingDown)));
    }
}
