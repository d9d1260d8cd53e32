//! Everything one isolate costs the runner besides its process, owned in
//! one place and released on every end path.
//!
//! An isolate's tasks (the control socket's accept loop, each control
//! connection and its writer, `materialize` requests, the output pumps) are
//! spawned through its [`Lifetime`]: each runs until its own work ends or
//! the lifetime ends, whichever is first. The lifetime ends when the process
//! has exited (the exit watcher says so) or when whatever owned the process
//! — an [`crate::Isolate`], a [`crate::Prestarted`], a spawn that failed
//! half-way — is dropped, whichever is first. Nothing per isolate is
//! `tokio::spawn`ed outside it, so nothing outlives the isolate.
//!
//! The counts in [`held`] are what an operator graphs beside the number of
//! isolates alive: a gap between them that grows is a leak.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};

/// How long the output pumps may drain a process's pipes after it exited:
/// the last lines (a V8 out-of-memory report, a start error) come then.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// The ending of one isolate's lifetime. Cheap to clone; every clone is the
/// same lifetime.
#[derive(Clone)]
pub(crate) struct Lifetime {
    ended: CancellationToken,
}

impl Lifetime {
    pub(crate) fn new() -> (Self, LifetimeOwner) {
        let ended = CancellationToken::new();
        HELD.lifetimes.fetch_add(1, Ordering::Relaxed);
        (Self { ended: ended.clone() }, LifetimeOwner { _guard: ended.drop_guard(), _count: Count(&HELD.lifetimes) })
    }

    /// Ends the lifetime: every task spawned through it stops.
    pub(crate) fn end(&self) {
        self.ended.cancel();
    }

    /// Resolves once the lifetime has ended.
    pub(crate) async fn ended(&self) {
        self.ended.cancelled().await;
    }

    #[cfg(test)]
    pub(crate) fn is_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Runs `work` until it finishes or the lifetime ends.
    pub(crate) fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let ended = self.ended.clone();
        tokio::spawn(async move {
            let _count = Count::new(&HELD.tasks);
            tokio::select! {
                () = work => {}
                () = ended.cancelled() => {}
            }
        });
    }

    /// Like [`Lifetime::spawn`], but `work` may go on for
    /// [`DRAIN_AFTER_EXIT`] after the lifetime ended (reading what is left
    /// in a pipe).
    pub(crate) fn spawn_draining(&self, work: impl Future<Output = ()> + Send + 'static) {
        let ended = self.ended.clone();
        tokio::spawn(async move {
            let _count = Count::new(&HELD.tasks);
            tokio::select! {
                () = work => {}
                () = async {
                    ended.cancelled().await;
                    tokio::time::sleep(DRAIN_AFTER_EXIT).await;
                } => {}
            }
        });
    }
}

/// Held by whatever owns the isolate's process; dropping it ends the
/// lifetime (and so every task of the isolate), whatever path led there.
pub(crate) struct LifetimeOwner {
    _guard: DropGuard,
    _count: Count,
}

/// Resources held for isolates right now, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Isolate lifetimes not yet ended (live, starting or pre-started).
    pub lifetimes: i64,
    /// Control socket listeners bound.
    pub control_listeners: i64,
    /// Control connections open.
    pub control_connections: i64,
    /// Per-isolate tasks running.
    pub tasks: i64,
    /// `materialize` requests being served.
    pub materializing: i64,
    /// Since start: control connections refused past the per-isolate bound.
    pub control_connections_refused: i64,
    /// Since start: control messages dropped for being over the line bound.
    pub control_messages_dropped: i64,
    /// Since start: asset reads refused past the per-isolate bound.
    pub materialize_refused: i64,
}

/// What isolates hold now, summed over the process.
pub fn held() -> Held {
    let read = |counter: &AtomicI64| counter.load(Ordering::Relaxed);
    Held {
        lifetimes: read(&HELD.lifetimes),
        control_listeners: read(&HELD.control_listeners),
        control_connections: read(&HELD.control_connections),
        tasks: read(&HELD.tasks),
        materializing: read(&HELD.materializing),
        control_connections_refused: read(&HELD.control_connections_refused),
        control_messages_dropped: read(&HELD.control_messages_dropped),
        materialize_refused: read(&HELD.materialize_refused),
    }
}

pub(crate) struct Counters {
    lifetimes: AtomicI64,
    pub(crate) control_listeners: AtomicI64,
    pub(crate) control_connections: AtomicI64,
    pub(crate) tasks: AtomicI64,
    pub(crate) materializing: AtomicI64,
    pub(crate) control_connections_refused: AtomicI64,
    pub(crate) control_messages_dropped: AtomicI64,
    pub(crate) materialize_refused: AtomicI64,
}

pub(crate) static HELD: Counters = Counters {
    lifetimes: AtomicI64::new(0),
    control_listeners: AtomicI64::new(0),
    control_connections: AtomicI64::new(0),
    tasks: AtomicI64::new(0),
    materializing: AtomicI64::new(0),
    control_connections_refused: AtomicI64::new(0),
    control_messages_dropped: AtomicI64::new(0),
    materialize_refused: AtomicI64::new(0),
};

/// Counts one breach of a bound in `counter` (never given back).
pub(crate) fn breach(counter: &AtomicI64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One unit of a counter in [`HELD`], given back on drop.
pub(crate) struct Count(&'static AtomicI64);

impl Count {
    pub(crate) fn new(counter: &'static AtomicI64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_the_owner_ends_every_task() {
        let (lifetime, owner) = Lifetime::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        lifetime.spawn(async move {
            std::future::pending::<()>().await;
            drop(tx);
        });
        assert!(!lifetime.is_ended());
        drop(owner);
        assert!(lifetime.is_ended());
        // The task was cancelled: its captured sender is dropped.
        tokio::time::timeout(Duration::from_secs(1), rx).await.expect("task ended").unwrap_err();
    }

    #[tokio::test]
    async fn ending_stops_tasks_before_the_owner_goes() {
        let (lifetime, _owner) = Lifetime::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        lifetime.spawn(async move {
            std::future::pending::<()>().await;
            drop(tx);
        });
        lifetime.end();
        tokio::time::timeout(Duration::from_secs(1), rx).await.expect("task ended").unwrap_err();
    }
}
