//! Metering and limiting a running isolate: its CPU clock against the budget
//! its requests fill, and its resident memory.
//!
//! The clock is read only as often as the budget needs. Between two reads an
//! isolate can burn at most `pause × parallelism` of CPU (every core the
//! runner may use, which its isolates inherit), so the next read is planned
//! for when the remaining credit could first run out, never later than
//! [`CPU_SAMPLE_IDLE`] and never sooner than [`CPU_SAMPLE_BUSY`]. An isolate
//! with nothing in flight that used next to nothing is quiet: its reads back
//! off to [`CPU_SAMPLE_IDLE`], and a request that starts on it wakes the
//! monitor to plan again. A thousand resting tenants then cost the runner ten
//! reads a second each instead of two hundred.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{
    CPU_BUDGET_CAP_PERCENT, CPU_SAMPLE_BUSY, CPU_SAMPLE_IDLE, CPU_WARM_UP_REQUESTS, Isolate, IsolateLimits, Termination,
};

/// How often, at most, resident memory is read for the usage report's peak
/// when a cgroup enforces the cap (the kernel does that; this is a figure).
const RSS_SAMPLE: Duration = Duration::from_millis(100);

/// Below this share of one core over a read's interval, with nothing in
/// flight, an isolate counts as quiet (idle timers, GC finishing).
const QUIET_CPU_PERCENT: u128 = 2;

/// The request path's handle on the monitor: one atomic load per request,
/// and a wake-up only when the monitor rests.
#[derive(Default)]
pub(crate) struct MonitorLink {
    quiet: AtomicBool,
    wake: Notify,
}

impl MonitorLink {
    /// Called after the request was counted (`requests_started`): either the
    /// monitor sees the new count, or this sees it quiet and wakes it.
    pub(crate) fn request_started(&self) {
        if self.quiet.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }
}

/// Cores an isolate can burn at once: what the runner itself may use.
fn parallelism() -> u32 {
    static CORES: OnceLock<u32> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1))
}

/// The CPU budget: each request adds `cpu_limit_ms`; what is saved from
/// finished requests is capped (see [`CPU_BUDGET_CAP_PERCENT`]); CPU used at
/// any time is taken from it; below zero the isolate is terminated.
#[derive(Debug)]
pub(crate) struct CpuBudget {
    limit_ns: i128,
    savings_ns: i128,
    credit_ns: i128,
    last_requests: u64,
    /// CPU burned since the isolate last had nothing to do: what a runaway
    /// request used, for the report.
    busy_ns: i128,
}

impl CpuBudget {
    pub(crate) fn new(cpu_limit_ms: u64) -> Self {
        let limit_ns = i128::from(cpu_limit_ms) * 1_000_000;
        // What an isolate may keep from requests that are done: half a request.
        let savings_ns = limit_ns * (i128::from(CPU_BUDGET_CAP_PERCENT) - 100) / 100;
        Self {
            limit_ns,
            savings_ns,
            credit_ns: savings_ns + limit_ns * i128::from(CPU_WARM_UP_REQUESTS),
            last_requests: 0,
            busy_ns: 0,
        }
    }

    /// Charges `used_ns` of CPU since the last read, with `requests` started
    /// in all and `in_flight` of them not finished. `Err` carries the CPU
    /// the runaway used, in ms.
    pub(crate) fn charge(&mut self, used_ns: i128, requests: u64, in_flight: u64) -> Result<(), u64> {
        // Charge first, then cap: requests that came and went between two
        // reads still brought their allowance. The cap only bounds what is
        // saved: every request in flight keeps its own limit, so a thousand
        // concurrent cheap requests are not mistaken for one expensive one.
        let in_flight = i128::from(in_flight);
        // Until a first request has finished, V8 is still compiling the
        // tenant's code lazily: that request may use the warm-up allowance.
        let warming = requests as i128 == in_flight;
        let warm_up_ns = if warming { self.limit_ns * i128::from(CPU_WARM_UP_REQUESTS) } else { 0 };
        let new_requests = i128::from(requests.saturating_sub(self.last_requests));
        self.credit_ns = (self.credit_ns + new_requests * self.limit_ns - used_ns)
            .min(self.savings_ns + in_flight * self.limit_ns + warm_up_ns);
        self.last_requests = requests;
        self.busy_ns = if in_flight == 0 && used_ns < 1_000_000 { 0 } else { self.busy_ns + used_ns };
        if self.credit_ns < 0 { Err((self.busy_ns / 1_000_000) as u64) } else { Ok(()) }
    }

    /// The longest pause before the next read that the credit allows: no
    /// isolate can use it all up sooner on `parallelism` cores.
    pub(crate) fn pause(&self, parallelism: u32) -> Duration {
        pause_for_credit(self.credit_ns, parallelism)
    }

    /// After a request started on a quiet isolate `since_read` after the last
    /// read: the credit can be no lower than what the read left plus that
    /// request's allowance, minus what every core could have burnt since.
    pub(crate) fn pause_after_wake(&self, since_read: Duration, parallelism: u32) -> Duration {
        let burnt_at_most = since_read.as_nanos() as i128 * i128::from(parallelism);
        pause_for_credit(self.credit_ns + self.limit_ns - burnt_at_most, parallelism)
    }
}

fn pause_for_credit(credit_ns: i128, parallelism: u32) -> Duration {
    let ns = (credit_ns / i128::from(parallelism.max(1))).max(0);
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).clamp(CPU_SAMPLE_BUSY, CPU_SAMPLE_IDLE)
}

/// Whether a read found the isolate resting: nothing in flight, and next to
/// no CPU over the interval.
pub(crate) fn is_quiet(used_ns: i128, interval: Duration, in_flight: u64) -> bool {
    in_flight == 0 && used_ns.max(0) as u128 * 100 <= interval.as_nanos() * QUIET_CPU_PERCENT
}

/// Reads the isolate's CPU clock on the plan above and terminates it when
/// the budget is gone; reads its resident memory for the usage report (and,
/// without a cgroup, against the memory limit). Module evaluation before
/// `ready` is free.
pub(crate) async fn monitor(isolate: Weak<Isolate>, limits: IsolateLimits) {
    let Some((pid, link)) = isolate.upgrade().map(|i| (i.pid, i.monitor.clone())) else { return };
    // Found and opened once: each read below is one syscall.
    let Ok(clock) = isocloud_sandbox::CpuClock::of(pid) else { return };
    let Ok(mut last_cpu) = clock.read() else { return };
    let mut memory = isocloud_sandbox::ResidentMemory::open(pid).ok();
    let cores = parallelism();
    let mut budget = CpuBudget::new(limits.cpu_limit_ms);
    let mut last_read = Instant::now();
    let mut last_rss_read: Option<Instant> = None;
    let mut ran_since_rss_read = false;
    let mut pause = CPU_SAMPLE_BUSY;
    let mut quiet = false;
    loop {
        let mut due = last_read + pause;
        if quiet {
            let woken = tokio::select! {
                () = tokio::time::sleep_until(due) => false,
                () = link.wake.notified() => true,
            };
            if woken {
                // A request started: plan the next read from the credit it
                // brought, without reading now.
                link.quiet.store(false, Ordering::SeqCst);
                due = due.min(Instant::now() + budget.pause_after_wake(last_read.elapsed(), cores));
                tokio::time::sleep_until(due).await;
            }
        } else {
            tokio::time::sleep_until(due).await;
        }

        let Some(isolate) = isolate.upgrade() else { return };
        if !isolate.is_running() {
            return;
        }
        let Ok(cpu) = clock.read() else { return };
        let now = Instant::now();
        let interval = now - last_read;
        last_read = now;
        let used_ns = (cpu.as_nanos() as i128) - (last_cpu.as_nanos() as i128);
        last_cpu = cpu;
        isolate.meter.cpu_ns.fetch_add(used_ns.max(0) as u64, Ordering::Relaxed);
        let requests = isolate.requests_started.load(Ordering::SeqCst);
        let in_flight = isolate.in_flight() as u64;
        if let Err(used_ms) = budget.charge(used_ns, requests, in_flight) {
            isolate.terminate_for(Termination::CpuTimeLimit { limit_ms: limits.cpu_limit_ms, used_ms });
            return;
        }

        let resting = is_quiet(used_ns, interval, in_flight);
        // Memory only grows while the isolate runs: read it again once it
        // has used CPU since the last reading (and at least once).
        ran_since_rss_read |= used_ns > 0;
        let rss_due = match last_rss_read {
            None => true,
            Some(at) => ran_since_rss_read && now - at >= RSS_SAMPLE,
        };
        if limits.watch_rss || rss_due {
            last_rss_read = Some(now);
            ran_since_rss_read = false;
            if memory.is_none() {
                // Opened again if it failed (a runner short of descriptors):
                // without a cgroup, this read is what enforces the cap.
                memory = isocloud_sandbox::ResidentMemory::open(pid).ok();
            }
            let resident = memory.as_ref().and_then(isocloud_sandbox::ResidentMemory::read_bytes);
            if let Some(resident) = resident {
                isolate.note_memory(resident);
            }
            if limits.watch_rss
                && let Some(resident) = resident
                && resident > limits.memory_limit_bytes
            {
                isolate.terminate_for(Termination::MemoryLimit {
                    limit_bytes: limits.memory_limit_bytes,
                    used_bytes: resident,
                });
                return;
            }
        }

        quiet = resting && {
            // Say "quiet" before the last look at the request count: either
            // this sees a request that started meanwhile, or that request
            // sees the flag and wakes the monitor.
            link.quiet.store(true, Ordering::SeqCst);
            let unchanged = isolate.requests_started.load(Ordering::SeqCst) == requests;
            if !unchanged {
                link.quiet.store(false, Ordering::SeqCst);
            }
            unchanged
        };
        pause = if quiet { (pause * 2).clamp(CPU_SAMPLE_BUSY, CPU_SAMPLE_IDLE) } else { budget.pause(cores) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i128 = 1_000_000;

    #[test]
    fn a_runaway_is_stopped_after_its_limit_and_half_of_one_more() {
        let mut budget = CpuBudget::new(50);
        // The first request is warming up (three requests' worth more);
        // finish it cheaply so that the next one is an ordinary request.
        assert!(budget.charge(MS / 2, 1, 0).is_ok());
        let mut used_ms = 0;
        let mut result = Ok(());
        for _ in 0..100 {
            result = budget.charge(5 * MS, 2, 1);
            used_ms += 5;
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(used_ms), "the report names what the runaway used");
        // 50 ms of its own plus 25 saved, and the 5 ms read that crossed it.
        assert!((75..=80).contains(&used_ms), "stopped after {used_ms} ms");
    }

    #[test]
    fn concurrent_cheap_requests_are_not_one_expensive_one() {
        let mut budget = CpuBudget::new(50);
        // 2,000 requests in flight that used 10 s together: 5 ms each.
        assert!(budget.charge(10_000 * MS, 2_000, 2_000).is_ok());
    }

    #[test]
    fn a_sustained_average_over_the_limit_is_stopped() {
        let mut budget = CpuBudget::new(50);
        let mut requests = 1;
        assert!(budget.charge(MS, requests, 0).is_ok());
        let stopped = (0..20).any(|_| {
            requests += 1;
            budget.charge(70 * MS, requests, 0).is_err()
        });
        assert!(stopped, "70 ms per request under a 50 ms limit must not last");
        let mut budget = CpuBudget::new(50);
        requests = 1;
        assert!(budget.charge(MS, requests, 0).is_ok());
        for cost in [20, 60, 20, 60, 20, 60, 20, 60] {
            requests += 1;
            assert!(budget.charge(cost * MS, requests, 0).is_ok(), "alternating 20/60 ms averages 40 ms");
        }
    }

    #[test]
    fn the_pause_never_lets_the_credit_run_out_unseen() {
        let budget = CpuBudget::new(50);
        for cores in [1, 2, 8, 64] {
            let pause = budget.pause(cores);
            let burnable = pause.as_nanos() as i128 * i128::from(cores);
            assert!(
                burnable <= budget.credit_ns || pause == CPU_SAMPLE_BUSY,
                "{cores} cores: a {pause:?} pause could burn {burnable} ns of {} ns credit",
                budget.credit_ns
            );
            assert!((CPU_SAMPLE_BUSY..=CPU_SAMPLE_IDLE).contains(&pause));
        }
        // An empty budget is read as often as it can be; a large one rests.
        assert_eq!(pause_for_credit(0, 2), CPU_SAMPLE_BUSY);
        assert_eq!(pause_for_credit(-5 * MS, 2), CPU_SAMPLE_BUSY);
        assert_eq!(pause_for_credit(10_000 * MS, 2), CPU_SAMPLE_IDLE);
        assert_eq!(pause_for_credit(60 * MS, 2), Duration::from_millis(30));
    }

    #[test]
    fn a_wake_counts_what_could_have_burnt_since_the_last_read() {
        let mut budget = CpuBudget::new(50);
        assert!(budget.charge(MS, 1, 0).is_ok());
        // Resting with 25 ms saved; a request brings 50 more: on 2 cores the
        // 75 ms could go in 37.5 ms.
        assert_eq!(budget.credit_ns, 25 * MS);
        assert_eq!(budget.pause_after_wake(Duration::ZERO, 2), Duration::from_micros(37_500));
        // 30 ms after the read, 60 ms may have gone on 2 cores already.
        assert_eq!(budget.pause_after_wake(Duration::from_millis(30), 2), Duration::from_micros(7_500));
        assert_eq!(budget.pause_after_wake(Duration::from_millis(90), 2), CPU_SAMPLE_BUSY);
    }

    #[test]
    fn quiet_means_nothing_in_flight_and_next_to_no_cpu() {
        let interval = Duration::from_millis(100);
        assert!(is_quiet(0, interval, 0));
        assert!(is_quiet(2 * MS, interval, 0));
        assert!(!is_quiet(3 * MS, interval, 0));
        assert!(!is_quiet(0, interval, 1));
    }
}
