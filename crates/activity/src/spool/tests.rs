//! The spool on a real temp dir: bounds, what gives way, restarts, and that
//! a batch id always comes with the same bytes.

use super::*;
use isocloud_protocol::LogLevel;

fn event(deployment_id: &str, kind: ActivityKind) -> ActivityEvent {
    ActivityEvent { deployment_id: deployment_id.to_owned(), timestamp: "2026-01-02T03:04:05.678Z".to_owned(), kind }
}

fn log(message: &str) -> ActivityEvent {
    event("d", ActivityKind::Log { level: LogLevel::Info, message: message.to_owned(), request_id: None })
}

fn boot(ms: u64) -> ActivityEvent {
    event("d", ActivityKind::Boot { boot_ms: ms })
}

fn usage(requests: u64) -> ActivityEvent {
    event(
        "d",
        ActivityKind::Usage {
            requests,
            cpu_ms: 3,
            wall_ms: 40,
            ingress_bytes: 100,
            egress_bytes: 2000,
            peak_memory_bytes: 50 << 20,
            errors: 1,
            fetch_requests: 2,
            fetch_sent_bytes: 300,
            fetch_received_bytes: 4000,
            interval_start: "2026-01-02T03:04:00.000Z".into(),
            interval_end: "2026-01-02T03:04:05.000Z".into(),
            latency: None,
            status_classes: None,
        },
    )
}

/// What a batch looks like on the wire.
fn wire(batch: &ActivityBatch) -> String {
    serde_json::to_string(batch).unwrap()
}

fn open(dir: &Path, max_bytes: u64) -> Spool {
    Spool::open(dir, max_bytes, SpoolGauges::default()).unwrap()
}

/// Claims every batch of `origin`, oldest first, and reads each back.
fn drain(spool: &Spool, origin: &str) -> Vec<ActivityBatch> {
    let mut out = Vec::new();
    while let Some(claimed) = spool.claim_next(origin) {
        out.push(spool.read(claimed.seq).unwrap());
        spool.delivered(claimed.seq);
    }
    out
}

fn messages(batches: &[ActivityBatch]) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| &b.events)
        .map(|e| match &e.kind {
            ActivityKind::Log { message, .. } => message.clone(),
            other => kind_name(other).to_owned(),
        })
        .collect()
}

/// The file size one single-event batch of `message` takes.
fn size_of_one(message: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), u64::MAX);
    spool.push("o", "d", Tier::Log, false, vec![log(message)]).unwrap();
    spool.bytes()
}

#[test]
fn a_retry_reads_the_same_id_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let events = vec![log("one"), boot(12), log("two")];
    let expected = ActivityBatch { batch_id: String::new(), events: events.clone() };
    let pushed = spool.push("o", "d", Tier::Log, false, events).unwrap();
    let batch_id = pushed.batch_id.expect("admitted");

    let first = spool.claim_next("o").unwrap();
    let sent_first = spool.read(first.seq).unwrap();
    spool.release(first.seq); // the origin answered 503
    let second = spool.claim_next("o").unwrap();
    assert_eq!(second.seq, first.seq, "the same batch is retried");
    let sent_second = spool.read(second.seq).unwrap();

    assert_eq!(sent_first.batch_id, batch_id);
    assert_eq!(wire(&sent_first), wire(&sent_second), "a retry sends byte-identical content");
    assert_eq!(serde_json::to_value(&sent_first.events).unwrap(), serde_json::to_value(&expected.events).unwrap());
}

#[test]
fn a_batch_being_sent_is_not_claimed_twice() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    spool.push("o", "d", Tier::Log, false, vec![log("a")]).unwrap();
    spool.push("o", "d", Tier::Log, false, vec![log("b")]).unwrap();
    let a = spool.claim_next("o").unwrap();
    let b = spool.claim_next("o").unwrap();
    assert!(a.seq < b.seq, "oldest first");
    assert!(spool.claim_next("o").is_none());
    assert!(spool.claim_next("other").is_none(), "origins are separate");
    spool.delivered(a.seq);
    spool.delivered(b.seq);
    assert_eq!(spool.len(), 0);
    assert_eq!(spool.bytes(), 0);
    assert!(!spool.has_batches("o"));
}

#[test]
fn every_kind_reads_back_byte_for_byte() {
    let kinds = [
        ActivityKind::Boot { boot_ms: 42 },
        ActivityKind::BootFailure { message: "no \"entrypoint\"\n\u{1F600}".into() },
        ActivityKind::Log { level: LogLevel::Debug, message: "d".into(), request_id: None },
        ActivityKind::Log { level: LogLevel::Info, message: "i".into(), request_id: Some("r-1".into()) },
        ActivityKind::Log { level: LogLevel::Warning, message: "w".into(), request_id: None },
        ActivityKind::Log { level: LogLevel::Error, message: "e\u{0}".into(), request_id: Some("r-2".into()) },
        ActivityKind::UncaughtException { message: "boom".into() },
        ActivityKind::CpuTimeLimit { limit: 50, used: 81 },
        ActivityKind::MemoryLimit { limit: 1 << 29, used: (1 << 29) + 1 },
        usage(9).kind,
        ActivityKind::Terminated { reason: "idle".into() },
    ];
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let events: Vec<_> = kinds.into_iter().map(|k| event("dep", k)).collect();
    let original = serde_json::to_string(&events).unwrap();
    let batch_id = spool.push("o", "dep", Tier::Event, false, events).unwrap().batch_id.unwrap();
    let claimed = spool.claim_next("o").unwrap();
    let back = spool.read(claimed.seq).unwrap();
    assert_eq!(back.batch_id, batch_id);
    assert_eq!(serde_json::to_string(&back.events).unwrap(), original);
}

#[test]
fn a_full_spool_drops_the_oldest_logs_first() {
    let one = size_of_one("log 0");
    let dir = tempfile::tempdir().unwrap();
    // Room for exactly four such batches.
    let spool = open(dir.path(), one * 4);
    spool.push("o", "d", Tier::Event, false, vec![boot(7)]).unwrap();
    for i in 0..3 {
        let pushed = spool.push("o", "d", Tier::Log, false, vec![log(&format!("log {i}"))]).unwrap();
        assert!(pushed.dropped.is_empty());
    }
    // Full (a boot event is a little smaller than a log): each new log
    // pushes out the oldest log, never the older lifecycle event.
    let pushed = spool.push("o", "d", Tier::Log, false, vec![log("log 3")]).unwrap();
    assert!(pushed.batch_id.is_some());
    assert_eq!(
        pushed.dropped,
        vec![Dropped { origin: "o".into(), deployment_id: "d".into(), kinds: vec![("log", 1)] }]
    );
    let pushed = spool.push("o", "d", Tier::Log, false, vec![log("log 4")]).unwrap();
    assert_eq!(pushed.dropped.len(), 1);
    assert!(spool.bytes() <= one * 4);
    assert_eq!(messages(&drain(&spool, "o")), vec!["boot", "log 2", "log 3", "log 4"]);
}

#[test]
fn lifecycle_events_give_way_only_once_no_log_is_left() {
    let one = size_of_one("log 0");
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), one * 3);
    spool.push("o", "d", Tier::Event, false, vec![boot(1)]).unwrap();
    spool.push("o", "d", Tier::Log, false, vec![log("log 0")]).unwrap();
    spool.push("o", "d", Tier::Event, false, vec![boot(2)]).unwrap();
    // A new event makes room: the log goes, although both events are older.
    let pushed = spool.push("o", "d", Tier::Event, false, vec![boot(3)]).unwrap();
    assert_eq!(pushed.dropped[0].kinds, vec![("log", 1)]);
    // No log left: now the oldest event goes.
    let pushed = spool.push("o", "d", Tier::Event, false, vec![boot(4)]).unwrap();
    assert_eq!(pushed.dropped[0].kinds, vec![("boot", 1)]);
    // A new log when only events are left: it is the oldest log, so it is
    // the one that goes, and the events stay.
    let pushed = spool.push("o", "d", Tier::Log, false, vec![log("late")]).unwrap();
    assert!(pushed.batch_id.is_none());
    assert_eq!(
        pushed.dropped,
        vec![Dropped { origin: "o".into(), deployment_id: "d".into(), kinds: vec![("log", 1)] }]
    );
    let left = drain(&spool, "o");
    let boots: Vec<u64> = left
        .iter()
        .flat_map(|b| &b.events)
        .map(|e| match e.kind {
            ActivityKind::Boot { boot_ms } => boot_ms,
            _ => panic!("only boots are left"),
        })
        .collect();
    assert_eq!(boots, vec![2, 3, 4]);
}

#[test]
fn usage_is_kept() {
    assert_eq!(tier_of(&usage(1).kind), Tier::Keep);
    assert_eq!(tier_of(&log("x").kind), Tier::Log);
    assert_eq!(tier_of(&boot(1).kind), Tier::Event);
}

/// Usage and drop notes are never dropped, even past the bound.
#[test]
fn kept_batches_are_never_dropped_even_past_the_bound() {
    let one = size_of_one("log 0");
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), one * 2);
    spool.push("o", "d", Tier::Log, false, vec![log("log 0")]).unwrap();
    spool.push("o", "d", Tier::Event, false, vec![boot(1)]).unwrap();
    let mut dropped = Vec::new();
    for i in 0..5 {
        // Usage batches, and one drop note (kept the same way).
        let (note, events) = if i == 2 { (true, vec![log("note")]) } else { (false, vec![usage(i)]) };
        let pushed = spool.push("o", "d", Tier::Keep, note, events).unwrap();
        assert!(pushed.batch_id.is_some(), "a kept batch is always admitted");
        dropped.extend(pushed.dropped);
    }
    // Everything else made room first (log, then event); then the bound was exceeded.
    let kinds: Vec<_> = dropped.iter().map(|d| d.kinds.clone()).collect();
    assert_eq!(kinds, vec![vec![("log", 1)], vec![("boot", 1)]]);
    assert!(spool.bytes() > one * 2, "kept batches may exceed the bound");
    // A log arriving now cannot displace them: it is dropped itself.
    let pushed = spool.push("o", "d", Tier::Log, false, vec![log("no room")]).unwrap();
    assert!(pushed.batch_id.is_none());
    assert_eq!(spool.len(), 5);
    assert_eq!(spool.notes(), HashSet::from([("o".to_owned(), "d".to_owned())]));
    let requests: Vec<u64> = drain(&spool, "o")
        .iter()
        .flat_map(|b| &b.events)
        .filter_map(|e| match e.kind {
            ActivityKind::Usage { requests, .. } => Some(requests),
            _ => None,
        })
        .collect();
    assert_eq!(requests, vec![0, 1, 3, 4], "every usage report is still there");
}

#[test]
fn a_batch_being_sent_is_not_dropped_under_its_delivery() {
    let one = size_of_one("log 0");
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), one * 2);
    spool.push("o", "d", Tier::Log, false, vec![log("log 0")]).unwrap();
    spool.push("o", "d", Tier::Log, false, vec![log("log 1")]).unwrap();
    let sending = spool.claim_next("o").unwrap();
    spool.push("o", "d", Tier::Log, false, vec![log("log 2")]).unwrap();
    // "log 1" went instead of the older "log 0", which was on its way.
    let batch = spool.read(sending.seq).unwrap();
    assert_eq!(messages(std::slice::from_ref(&batch)), vec!["log 0"]);
    spool.delivered(sending.seq);
    assert_eq!(messages(&drain(&spool, "o")), vec!["log 2"]);
}

#[test]
fn a_reopened_spool_has_what_the_last_run_left() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, wires) = {
        let spool = open(dir.path(), 1 << 20);
        let a = spool.push("acme@http://o/v0/", "d1", Tier::Log, false, vec![log("a")]).unwrap();
        let b = spool.push("apps", "d2", Tier::Event, false, vec![boot(5)]).unwrap();
        spool.push("acme@http://o/v0/", "d1", Tier::Keep, true, vec![log("note")]).unwrap();
        // One was delivered before the restart; one was being sent.
        let first = spool.claim_next("acme@http://o/v0/").unwrap();
        let wire_a = wire(&spool.read(first.seq).unwrap());
        let second = spool.claim_next("acme@http://o/v0/").unwrap();
        spool.delivered(second.seq);
        let apps = spool.claim_next("apps").unwrap();
        let wire_b = wire(&spool.read(apps.seq).unwrap());
        spool.release(apps.seq);
        ((a.batch_id.unwrap(), b.batch_id.unwrap()), (wire_a, wire_b))
    };
    let spool = open(dir.path(), 1 << 20);
    let mut origins = spool.origins();
    origins.sort();
    assert_eq!(origins, vec!["acme@http://o/v0/".to_owned(), "apps".to_owned()]);
    assert!(spool.notes().is_empty(), "the note was delivered");
    // A batch of this run queues behind the earlier run's.
    spool.push("acme@http://o/v0/", "d1", Tier::Log, false, vec![log("new")]).unwrap();
    let acme = drain(&spool, "acme@http://o/v0/");
    assert_eq!(messages(&acme), vec!["a", "new"]);
    assert_eq!(acme[0].batch_id, ids.0);
    assert_eq!(wire(&acme[0]), wires.0, "the same id with the same content after a restart");
    let apps = drain(&spool, "apps");
    assert_eq!(apps[0].batch_id, ids.1);
    assert_eq!(wire(&apps[0]), wires.1);
}

#[test]
fn a_crashed_write_is_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path(), 1 << 20);
        spool.push("o", "d", Tier::Log, false, vec![log("whole")]).unwrap();
    }
    let whole = fs::read(dir.path().join(format!("{:020}{BATCH_SUFFIX}", 0))).unwrap();
    // A write that died before its rename, and (should the disk have lied)
    // a renamed file cut short.
    fs::write(dir.path().join(format!("{:020}{TMP_SUFFIX}", 1)), &whole[..whole.len() / 2]).unwrap();
    fs::write(dir.path().join(format!("{:020}{BATCH_SUFFIX}", 2)), &whole[..whole.len() - 3]).unwrap();
    fs::write(dir.path().join(format!("{:020}{BATCH_SUFFIX}", 3)), b"").unwrap();

    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.len(), 1, "only the whole batch is loaded");
    assert_eq!(spool.bytes(), whole.len() as u64);
    assert_eq!(messages(&drain(&spool, "o")), vec!["whole"]);
    let names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec![LOCK_FILE.to_owned()], "the broken files are gone");
    // A new batch does not reuse a number a broken file had.
    spool.push("o", "d", Tier::Log, false, vec![log("next")]).unwrap();
    assert!(spool.claim_next("o").unwrap().seq >= 4);
}

#[test]
fn a_second_runner_cannot_open_the_same_spool() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), 1 << 20);
    let second = Spool::open(dir.path(), 1 << 20, SpoolGauges::default());
    assert!(matches!(second, Err(SpoolError::Locked { .. })), "{:?}", second.err());
    drop(first);
    assert!(Spool::open(dir.path(), 1 << 20, SpoolGauges::default()).is_ok(), "free once the first is gone");
}

#[test]
fn gauges_follow_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let gauges = SpoolGauges::default();
    let spool = Spool::open(dir.path(), 1 << 20, gauges.clone()).unwrap();
    spool.push("o", "d", Tier::Log, false, vec![log("a")]).unwrap();
    spool.push("o", "d", Tier::Log, false, vec![log("b")]).unwrap();
    assert_eq!(gauges.batches.get(), 2);
    assert_eq!(gauges.bytes.get() as u64, spool.bytes());
    let claimed = spool.claim_next("o").unwrap();
    spool.delivered(claimed.seq);
    assert_eq!(gauges.batches.get(), 1);
    assert_eq!(gauges.bytes.get() as u64, spool.bytes());
}
