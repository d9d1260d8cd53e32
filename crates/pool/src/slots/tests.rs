use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use futures_util::FutureExt;

use super::*;

/// A stand-in isolate whose liveness and idleness the test sets.
#[derive(Default)]
struct Fake {
    exited: AtomicBool,
    condemned: AtomicBool,
    /// Idle for this many seconds; `u64::MAX`: serving a request.
    idle_s: AtomicU64,
}

impl Fake {
    fn idle(seconds: u64) -> Arc<Self> {
        let fake = Self::default();
        fake.idle_s.store(seconds, Ordering::Relaxed);
        Arc::new(fake)
    }

    fn busy() -> Arc<Self> {
        Self::idle(u64::MAX)
    }
}

impl Occupancy for Fake {
    fn is_running(&self) -> bool {
        !self.exited.load(Ordering::Relaxed)
    }

    fn is_condemned(&self) -> bool {
        self.condemned.load(Ordering::Relaxed)
    }

    fn idle_for(&self) -> Option<Duration> {
        match self.idle_s.load(Ordering::Relaxed) {
            u64::MAX => None,
            seconds => Some(Duration::from_secs(seconds)),
        }
    }
}

fn key(id: &str) -> Key {
    ("origin".to_owned(), id.to_owned())
}

const ROOMY: Capacity = Capacity { max_isolates: 100, max_per_tenant: 100 };

fn ready(isolate: Arc<Fake>) -> BootFuture<Fake> {
    futures_util::future::ready(Ok(isolate)).boxed().shared()
}

/// A table holding `occupants` (`(id, tenant, isolate)`), all running.
fn table(occupants: Vec<(&str, &str, Arc<Fake>)>) -> Slots<Fake> {
    let mut slots = Slots::new();
    for (id, tenant, isolate) in occupants {
        let looked = slots.lookup(&key(id), ROOMY, || tenant.into(), || ready(isolate.clone()));
        assert!(matches!(looked.answer, Ok(Lookup::Started(_))));
        assert!(slots.settle(&key(id), Some(isolate)));
    }
    slots
}

/// What a request does with the table, as the pool does: look up, and on
/// a new boot run it as a task that settles the slot when it ends.
async fn request(
    slots: &Arc<Mutex<Slots<Fake>>>,
    id: &str,
    boots: &Arc<AtomicUsize>,
    gate: &tokio::sync::watch::Receiver<bool>,
    succeed: bool,
) -> Result<Arc<Fake>, BootError> {
    let looked = slots.lock().unwrap().lookup(
        &key(id),
        ROOMY,
        || "tenant".into(),
        || {
            boots.fetch_add(1, Ordering::SeqCst);
            let (slots, key, mut gate) = (slots.clone(), key(id), gate.clone());
            let task = tokio::spawn(async move {
                // Every request arrives while the boot is under way.
                gate.wait_for(|open| *open).await.unwrap();
                let booted = succeed.then(|| Arc::new(Fake::default()));
                slots.lock().unwrap().settle(&key, booted.clone());
                booted.ok_or(BootError::Capacity(0))
            });
            async move { task.await.unwrap() }.boxed().shared()
        },
    );
    match looked.answer? {
        Lookup::Ready(isolate) => Ok(isolate),
        Lookup::Join(boot) | Lookup::Started(Started { boot, .. }) => boot.await,
    }
}

#[tokio::test]
async fn concurrent_first_requests_for_one_deployment_share_one_boot() {
    let slots = Arc::new(Mutex::new(Slots::new()));
    let boots = Arc::new(AtomicUsize::new(0));
    let (open, gate) = tokio::sync::watch::channel(false);
    let waiters: Vec<_> = (0..32)
        .map(|_| {
            let (slots, boots, gate) = (slots.clone(), boots.clone(), gate.clone());
            tokio::spawn(async move { request(&slots, "d1", &boots, &gate, true).await })
        })
        .collect();
    tokio::task::yield_now().await;
    open.send(true).unwrap();
    let mut isolates = Vec::new();
    for waiter in waiters {
        isolates.push(waiter.await.unwrap().expect("every waiter gets the booted isolate"));
    }
    assert_eq!(boots.load(Ordering::SeqCst), 1, "32 concurrent requests boot once");
    assert!(isolates.iter().all(|isolate| Arc::ptr_eq(isolate, &isolates[0])), "and share one isolate");
    // The next request is served from the table, no boot.
    let again = request(&slots, "d1", &boots, &gate, true).await.unwrap();
    assert!(Arc::ptr_eq(&again, &isolates[0]));
    assert_eq!(boots.load(Ordering::SeqCst), 1);
    // Another deployment boots on its own.
    request(&slots, "d2", &boots, &gate, true).await.unwrap();
    assert_eq!(boots.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failed_boot_fails_its_waiters_once_and_the_next_request_boots_again() {
    let slots = Arc::new(Mutex::new(Slots::new()));
    let boots = Arc::new(AtomicUsize::new(0));
    let (open, gate) = tokio::sync::watch::channel(false);
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let (slots, boots, gate) = (slots.clone(), boots.clone(), gate.clone());
            tokio::spawn(async move { request(&slots, "d1", &boots, &gate, false).await })
        })
        .collect();
    tokio::task::yield_now().await;
    open.send(true).unwrap();
    for waiter in waiters {
        assert!(waiter.await.unwrap().is_err());
    }
    assert_eq!(boots.load(Ordering::SeqCst), 1);
    assert_eq!(slots.lock().unwrap().keys().count(), 0, "a failed boot leaves no slot");
    request(&slots, "d1", &boots, &gate, true).await.expect("a later request boots anew");
    assert_eq!(boots.load(Ordering::SeqCst), 2);
}

#[test]
fn an_isolate_that_exited_or_was_condemned_is_not_served_but_handed_back_and_booted_anew() {
    for kill in
        [|f: &Fake| f.exited.store(true, Ordering::Relaxed), |f: &Fake| f.condemned.store(true, Ordering::Relaxed)]
    {
        let old = Fake::idle(1);
        let mut slots = table(vec![("d1", "t", old.clone())]);
        assert!(matches!(
            slots.lookup(&key("d1"), ROOMY, || "t".into(), || unreachable!()).answer,
            Ok(Lookup::Ready(isolate)) if Arc::ptr_eq(&isolate, &old)
        ));
        kill(&old);
        assert!(!slots.holds(&key("d1"), &old));
        let new = Fake::busy();
        let looked = slots.lookup(&key("d1"), ROOMY, || "t".into(), || ready(new.clone()));
        assert!(matches!(looked.answer, Ok(Lookup::Started(_))), "a new boot starts");
        assert!(looked.exited.is_some_and(|exited| Arc::ptr_eq(&exited, &old)), "the old one is handed back to book");
        assert!(slots.settle(&key("d1"), Some(new.clone())));
        assert!(slots.holds(&key("d1"), &new));
    }
}

#[test]
fn a_full_table_evicts_the_least_recently_used_idle_isolate_for_a_boot_or_refuses_it() {
    let full = Capacity { max_isolates: 3, max_per_tenant: 3 };
    let (a1, b1, b2) = (Fake::idle(5), Fake::idle(60), Fake::busy());
    let mut slots = table(vec![("a1", "a", a1.clone()), ("b1", "b", b1.clone()), ("b2", "b", b2.clone())]);
    let looked = slots.lookup(&key("c1"), full, || "c".into(), || ready(Fake::busy()));
    let Ok(Lookup::Started(Started { evicted: Some((victim, isolate, reason)), .. })) = looked.answer else {
        panic!("expected a boot that evicts");
    };
    assert_eq!((victim.1.as_str(), reason), ("b1", "evicted"));
    assert!(Arc::ptr_eq(&isolate, &b1));
    assert!(!slots.holds(&key("b1"), &b1), "the evicted one left the table");
    // Now everyone busy or booting: refused, and the table unchanged.
    a1.idle_s.store(u64::MAX, Ordering::Relaxed);
    let looked = slots.lookup(&key("c2"), full, || "c".into(), || unreachable!("no boot when refused"));
    assert!(matches!(looked.answer, Err(BootError::Capacity(3))));
    assert_eq!(slots.keys().count(), 3);
    // A dead isolate of a refused deployment still comes back to be booked.
    a1.exited.store(true, Ordering::Relaxed);
    let looked = slots.lookup(
        &key("a1"),
        Capacity { max_isolates: 2, max_per_tenant: 2 },
        || "a".into(),
        || unreachable!("no boot when refused"),
    );
    assert!(looked.answer.is_err());
    assert!(looked.exited.is_some_and(|exited| Arc::ptr_eq(&exited, &a1)));
}

#[test]
fn the_sweep_takes_isolates_idle_past_the_timeout_and_exited_ones_and_keeps_serving_and_booting_ones() {
    let (idle, fresh, serving, dead) = (Fake::idle(31), Fake::idle(29), Fake::busy(), Fake::busy());
    dead.exited.store(true, Ordering::Relaxed);
    let mut slots =
        table(vec![("idle", "t", idle), ("fresh", "t", fresh), ("serving", "t", serving), ("dead", "t", dead)]);
    // And one still booting.
    let looked = slots.lookup(&key("booting"), ROOMY, || "t".into(), || ready(Fake::busy()));
    assert!(matches!(looked.answer, Ok(Lookup::Started(_))));
    let sweep = slots.sweep(Duration::from_secs(30));
    let ids = |list: &[(Key, Arc<Fake>)]| list.iter().map(|(key, _)| key.1.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&sweep.idle), ["idle"]);
    assert_eq!(ids(&sweep.exited), ["dead"]);
    let mut left: Vec<_> = slots.keys().map(|key| key.1.clone()).collect();
    left.sort();
    assert_eq!(left, ["booting", "fresh", "serving"]);
}

#[test]
fn a_boot_that_ends_after_the_table_was_drained_is_handed_back_to_be_stopped() {
    let mut slots: Slots<Fake> = Slots::new();
    let looked = slots.lookup(&key("d1"), ROOMY, || "t".into(), || ready(Fake::busy()));
    assert!(matches!(looked.answer, Ok(Lookup::Started(_))));
    assert!(slots.drain_ready().is_empty(), "a booting slot holds no isolate yet");
    assert!(!slots.settle(&key("d1"), Some(Fake::busy())), "nothing holds it: the caller must stop it");
    assert_eq!(slots.keys().count(), 0);
}

/// `(id, tenant, idle seconds or None for busy)`.
fn plan(occupants: &[(&str, &str, Option<u64>)], tenant: &str, max: usize, per_tenant: usize) -> Room {
    let keys: Vec<Key> = occupants.iter().map(|(id, _, _)| key(id)).collect();
    let iter = occupants.iter().zip(&keys).map(|((_, tenant, idle), key)| Occupant {
        key,
        tenant,
        idle_for: idle.map(Duration::from_secs),
    });
    plan_room(iter, tenant, max, per_tenant)
}

fn evicts(room: Room) -> (String, &'static str) {
    match room {
        Room::Evict(key, reason) => (key.1, reason),
        other => panic!("expected an eviction, got {other:?}"),
    }
}

#[test]
fn under_both_caps_there_is_room() {
    assert!(matches!(plan(&[], "a", 1, 1), Room::Free));
    assert!(matches!(plan(&[("a1", "a", None), ("b1", "b", None)], "a", 4, 2), Room::Free));
}

#[test]
fn a_tenant_at_its_cap_evicts_its_own_least_recently_used_idle_isolate_only() {
    // b1 has been idle longest, but it is not a's to evict.
    let occupants = [("a1", "a", Some(5)), ("a2", "a", Some(9)), ("b1", "b", Some(60))];
    assert_eq!(evicts(plan(&occupants, "a", 10, 2)), ("a2".to_owned(), "evicted_tenant_cap"));
    // Every one of a's busy or booting: a is refused, however free the runner is.
    let busy = [("a1", "a", None), ("a2", "a", None), ("b1", "b", Some(60))];
    assert!(matches!(plan(&busy, "a", 10, 2), Room::Refuse(BootError::TenantCapacity(2))));
    // ...while b, under its own cap, still boots.
    assert!(matches!(plan(&busy, "b", 10, 2), Room::Free));
}

#[test]
fn a_full_runner_evicts_anyones_least_recently_used_idle_isolate_or_refuses() {
    let occupants = [("a1", "a", Some(5)), ("b1", "b", Some(60)), ("b2", "b", None)];
    assert_eq!(evicts(plan(&occupants, "c", 3, 3)), ("b1".to_owned(), "evicted"));
    let busy = [("a1", "a", None), ("b1", "b", None), ("b2", "b", None)];
    assert!(matches!(plan(&busy, "c", 3, 3), Room::Refuse(BootError::Capacity(3))));
    // One tenant with every slot (apps mode): the runner's bound, not a tenant's.
    let alone = [("a1", "a", Some(5)), ("a2", "a", None)];
    assert_eq!(evicts(plan(&alone, "a", 2, 2)), ("a1".to_owned(), "evicted"));
}
