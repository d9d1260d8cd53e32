//! The pool's table of deployments: which are booting (one shared boot per
//! deployment, however many requests wait for it), which run, whose each is,
//! and what goes when there is no room or an isolate idles out.
//!
//! Generic over the isolate ([`Occupancy`]: alive? idle for how long?) so
//! single-flight boots, eviction and the idle sweep are tested in process
//! with a stand-in isolate; the pool uses it with the supervisor's. The
//! table only decides: whatever it takes out (a dead isolate, an evicted or
//! idle one) it hands back, and the caller books, reports and stops it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, Shared};

use crate::BootError;

/// Deployments are named by origin and id: two subhosters may both have a
/// deployment "1".
pub(crate) type Key = (String, String);

/// A boot every request for its deployment awaits; it resolves once.
pub(crate) type BootFuture<I> = Shared<BoxFuture<'static, Result<Arc<I>, BootError>>>;

/// What the table needs to know of a running isolate.
pub(crate) trait Occupancy {
    /// Its process has not exited.
    fn is_running(&self) -> bool;
    /// The runner has condemned it (a limit): dead already, even if the
    /// kernel has not reaped it yet.
    fn is_condemned(&self) -> bool;
    /// How long it has been without requests; `None` while it serves one.
    fn idle_for(&self) -> Option<Duration>;

    fn is_serving(&self) -> bool {
        self.is_running() && !self.is_condemned()
    }
}

pub(crate) enum Slot<I> {
    Booting(BootFuture<I>),
    Ready(Arc<I>),
}

/// A deployment's place in the pool, and whose it is.
pub(crate) struct Entry<I> {
    pub(crate) tenant: Arc<str>,
    pub(crate) slot: Slot<I>,
}

/// What a request for a deployment gets from [`Slots::lookup`].
pub(crate) enum Lookup<I> {
    /// Its isolate runs: serve it.
    Ready(Arc<I>),
    /// Its boot is under way: await it with the others.
    Join(BootFuture<I>),
    /// A boot of it started now (the table holds its future).
    Started(Started<I>),
}

/// A boot [`Slots::lookup`] started, and the idle isolate it evicted to
/// make room (with the metric's reason): the caller books and stops it.
pub(crate) struct Started<I> {
    pub(crate) boot: BootFuture<I>,
    pub(crate) evicted: Option<(Key, Arc<I>, &'static str)>,
}

/// A lookup's answer, and the deployment's previous isolate if it had died
/// since its last request (out of the table now, whatever the answer): the
/// caller books it.
pub(crate) struct Looked<I> {
    pub(crate) answer: Result<Lookup<I>, BootError>,
    pub(crate) exited: Option<Arc<I>>,
}

/// What one idle sweep took out of the table.
pub(crate) struct Sweep<I> {
    /// Exited by themselves (crash, `Deno.exit`).
    pub(crate) exited: Vec<(Key, Arc<I>)>,
    /// Idle past the timeout: to be terminated.
    pub(crate) idle: Vec<(Key, Arc<I>)>,
}

/// The bounds a new boot must fit in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Capacity {
    pub(crate) max_isolates: usize,
    pub(crate) max_per_tenant: usize,
}

pub(crate) struct Slots<I> {
    map: HashMap<Key, Entry<I>>,
}

impl<I: Occupancy> Slots<I> {
    pub(crate) fn new() -> Self {
        Self { map: HashMap::new() }
    }

    /// The isolate for `key`, the boot to wait for, or a new boot from
    /// `start` (called at most once, under the caller's lock) after making
    /// room. `tenant` is asked only when a boot starts.
    pub(crate) fn lookup(
        &mut self,
        key: &Key,
        capacity: Capacity,
        tenant: impl FnOnce() -> Arc<str>,
        start: impl FnOnce() -> BootFuture<I>,
    ) -> Looked<I> {
        let exited = match self.map.get(key).map(|entry| &entry.slot) {
            Some(Slot::Ready(isolate)) if isolate.is_serving() => {
                return Looked { answer: Ok(Lookup::Ready(isolate.clone())), exited: None };
            }
            Some(Slot::Booting(boot)) => return Looked { answer: Ok(Lookup::Join(boot.clone())), exited: None },
            // It died since the last request: booked by the caller, booted anew.
            Some(Slot::Ready(_)) => match self.map.remove(key) {
                Some(Entry { slot: Slot::Ready(isolate), .. }) => Some(isolate),
                _ => None,
            },
            None => None,
        };
        let tenant = tenant();
        let evicted = match self.plan_room(&tenant, capacity) {
            Room::Free => None,
            Room::Refuse(refusal) => return Looked { answer: Err(refusal), exited },
            Room::Evict(victim, reason) => match self.map.remove(&victim) {
                Some(Entry { slot: Slot::Ready(isolate), .. }) => Some((victim, isolate, reason)),
                _ => None,
            },
        };
        let boot = start();
        self.map.insert(key.clone(), Entry { tenant, slot: Slot::Booting(boot.clone()) });
        Looked { answer: Ok(Lookup::Started(Started { boot, evicted })), exited }
    }

    /// A boot ended: its isolate takes the slot, or a failed boot leaves
    /// none (the next request boots again). `false` when the slot is gone
    /// (the table was drained): the caller must stop the isolate, which
    /// nothing else would.
    pub(crate) fn settle(&mut self, key: &Key, booted: Option<Arc<I>>) -> bool {
        match (booted, self.map.get_mut(key)) {
            (Some(isolate), Some(entry @ Entry { slot: Slot::Booting(_), .. })) => {
                entry.slot = Slot::Ready(isolate);
                true
            }
            (Some(_), _) => false,
            (None, Some(Entry { slot: Slot::Booting(_), .. })) => {
                self.map.remove(key);
                true
            }
            (None, _) => true,
        }
    }

    /// Whether `isolate` still holds `key`'s slot and serves: a boot's
    /// waiter may get the lock after an eviction took it.
    pub(crate) fn holds(&self, key: &Key, isolate: &Arc<I>) -> bool {
        self.map.get(key).is_some_and(|entry| matches!(&entry.slot, Slot::Ready(ready) if Arc::ptr_eq(ready, isolate)))
            && isolate.is_serving()
    }

    /// Takes out the isolates that exited and those idle for `idle_timeout`
    /// or more; booting and serving ones stay.
    pub(crate) fn sweep(&mut self, idle_timeout: Duration) -> Sweep<I> {
        let mut sweep = Sweep { exited: Vec::new(), idle: Vec::new() };
        self.map.retain(|key, entry| {
            let Slot::Ready(isolate) = &entry.slot else { return true };
            if !isolate.is_running() {
                sweep.exited.push((key.clone(), isolate.clone()));
                false
            } else if isolate.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                sweep.idle.push((key.clone(), isolate.clone()));
                false
            } else {
                true
            }
        });
        sweep
    }

    pub(crate) fn remove(&mut self, key: &Key) -> Option<Entry<I>> {
        self.map.remove(key)
    }

    /// Empties the table, handing back the running isolates.
    pub(crate) fn drain_ready(&mut self) -> Vec<(Key, Arc<I>)> {
        self.map
            .drain()
            .filter_map(|(key, entry)| match entry.slot {
                Slot::Ready(isolate) => Some((key, isolate)),
                Slot::Booting(_) => None,
            })
            .collect()
    }

    /// Every running isolate with its key and tenant.
    pub(crate) fn ready(&self) -> impl Iterator<Item = (&Key, &Arc<str>, &Arc<I>)> {
        self.map.iter().filter_map(|(key, entry)| match &entry.slot {
            Slot::Ready(isolate) => Some((key, &entry.tenant, isolate)),
            Slot::Booting(_) => None,
        })
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &Key> {
        self.map.keys()
    }

    fn plan_room(&self, tenant: &str, capacity: Capacity) -> Room {
        let occupants = self.map.iter().map(|(key, entry)| Occupant {
            key,
            tenant: &entry.tenant,
            idle_for: match &entry.slot {
                Slot::Ready(isolate) => isolate.idle_for(),
                Slot::Booting(_) => None,
            },
        });
        plan_room(occupants, tenant, capacity.max_isolates, capacity.max_per_tenant)
    }
}

/// One isolate (running or booting) as [`plan_room`] sees it.
struct Occupant<'a> {
    key: &'a Key,
    tenant: &'a str,
    /// How long it has been idle; `None`: booting or serving (not evictable).
    idle_for: Option<Duration>,
}

/// What a new boot needs done first.
#[derive(Debug)]
enum Room {
    Free,
    /// Evict this idle isolate (the `reason` for the terminations metric).
    Evict(Key, &'static str),
    Refuse(BootError),
}

/// A new boot of `tenant`'s, among `occupants`: at its own cap it evicts
/// its own least recently used idle isolate (never another tenant's: its
/// cap is its own business) or is refused; under its cap but at
/// `max_isolates` it evicts anyone's least recently used idle isolate, or
/// is refused.
fn plan_room<'a>(
    occupants: impl Iterator<Item = Occupant<'a>>,
    tenant: &str,
    max_isolates: usize,
    max_per_tenant: usize,
) -> Room {
    let (mut total, mut own) = (0, 0);
    // The longest idle of all, and of the tenant's own.
    let mut oldest: Option<(&Key, Duration)> = None;
    let mut own_oldest: Option<(&Key, Duration)> = None;
    for occupant in occupants {
        total += 1;
        let mine = occupant.tenant == tenant;
        own += usize::from(mine);
        if let Some(idle) = occupant.idle_for {
            if oldest.is_none_or(|(_, longest)| idle > longest) {
                oldest = Some((occupant.key, idle));
            }
            if mine && own_oldest.is_none_or(|(_, longest)| idle > longest) {
                own_oldest = Some((occupant.key, idle));
            }
        }
    }
    // A cap as large as the runner is no cap: the runner's own bound binds first.
    if max_per_tenant < max_isolates && own >= max_per_tenant {
        return match own_oldest {
            Some((key, _)) => Room::Evict(key.clone(), "evicted_tenant_cap"),
            None => Room::Refuse(BootError::TenantCapacity(own)),
        };
    }
    if total >= max_isolates {
        return match oldest {
            Some((key, _)) => Room::Evict(key.clone(), "evicted"),
            None => Room::Refuse(BootError::Capacity(total)),
        };
    }
    Room::Free
}

#[cfg(test)]
mod tests;
