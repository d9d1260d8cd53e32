use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use isocloud_model::{AssetTree, Deployment, ModuleFile};
use isocloud_protocol::IsolateConfig;

use super::*;
use crate::{IsolateFiles, IsolateUids, SandboxPolicy};

/// Uids the tests of this module use: beyond the default range, so a
/// runner started by another test (which claims from that one) never holds
/// them; each test its own few, so parallel tests never meet either.
fn test_range(offset: u32, len: u32) -> UidRange {
    let first = UidRange::DEFAULT.last + 1_000 + offset;
    UidRange { first, last: first + len - 1 }
}

fn pool(range: UidRange, claims: &tempfile::TempDir) -> Arc<UidPool> {
    UidPool::new(range, 65534, claims.path()).unwrap()
}

/// Root, or (outside CI) a note and `false`: CI runs as root, and a test
/// that cannot run there must fail, not pass by skipping.
fn root(test: &str) -> bool {
    if crate::identity::runner_is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs root (setuid, chown), and CI runs as root");
    eprintln!("skipping {test}: needs root (setuid, chown)");
    false
}

/// A process running `program` as `uid` (in its own session: not in any
/// isolate's process group), the way a process an isolate forked would.
fn spawn_as(uid: u32, program: &str, args: &[&str]) -> std::process::Child {
    let mut command = std::process::Command::new(program);
    command.args(args).stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec, only raw id syscalls on integers.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0
                || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn ranges_parse_and_never_hold_root_nobody_or_minus_one() {
    assert_eq!(UidRange::parse("200000-299999"), Ok(UidRange { first: 200000, last: 299999 }));
    assert_eq!(UidRange::parse("7-7").unwrap().len(), 1);
    assert_eq!(UidRange::DEFAULT.to_string(), "1900000000-1900099999");
    assert_eq!(UidRange::parse(&UidRange::DEFAULT.to_string()), Ok(UidRange::DEFAULT));
    for (text, why) in [
        ("0-10", "root"),
        ("60000-70000", "nobody"),
        ("65535-65535", "16-bit"),
        ("4294967290-4294967295", "-1"),
        ("10-5", "above the last"),
        ("100", "not a range"),
        ("a-b", "not a uid"),
        ("1-4294967296", "not a uid"),
    ] {
        let error = UidRange::parse(text).unwrap_err();
        assert!(error.contains(why), "{text}: {error}");
    }
}

#[test]
fn the_default_range_lies_outside_the_usual_allocations() {
    let default = UidRange::DEFAULT;
    // (first, last, who hands them out)
    let taken: [(u64, u64, &str); 6] = [
        (0, 60000, "login.defs UID_MIN..UID_MAX: regular and system users"),
        (60001, 65535, "systemd-homed, dynamic users, nobody, 16-bit -1"),
        (100000, 600100000 + 65535, "login.defs SUB_UID_MIN..SUB_UID_MAX: subordinate ranges"),
        (524288, 1879048191, "systemd container ranges"),
        (2147352576, 2147418111, "systemd foreign range"),
        (2147483648, 4294967295, "2^31 and above: mistaken for negative"),
    ];
    for (first, last, who) in taken {
        assert!(!default.overlaps(first, last), "the default range overlaps {who}");
    }
    assert!(default.len() >= 65536, "room for many more isolates than one runner holds");
}

#[test]
fn conflicts_name_accounts_and_subordinate_ranges_in_the_range() {
    let etc = tempfile::tempdir().unwrap();
    std::fs::write(
        etc.path().join("passwd"),
        "root:x:0:0::/root:/bin/sh\nbuilder:x:200100:200100::/home/b:/bin/sh\nalice:x:1000:1000::/home/a:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(etc.path().join("subuid"), "# comment\nalice:100000:65536\nbob:165536:65536\n").unwrap();
    let conflicts = range_conflicts(UidRange::parse("200000-299999").unwrap(), etc.path());
    assert_eq!(conflicts.len(), 2, "{conflicts:?}");
    assert!(conflicts[0].contains("builder") && conflicts[0].contains("200100"), "{conflicts:?}");
    assert!(conflicts[1].contains("bob") && conflicts[1].contains("165536-231071"), "{conflicts:?}");
    assert!(range_conflicts(UidRange::DEFAULT, etc.path()).is_empty());
    // A host without the files: nothing known, nothing in the way.
    assert!(range_conflicts(UidRange::DEFAULT, &etc.path().join("missing")).is_empty());
}

#[test]
fn each_lease_has_its_own_uid_until_the_range_is_exhausted() {
    let claims = tempfile::tempdir().unwrap();
    let range = test_range(0, 3);
    let pool = pool(range, &claims);
    let leases: Vec<_> = (0..3).map(|_| pool.lease().unwrap()).collect();
    let uids: HashSet<u32> = leases.iter().map(|l| l.ids().uid).collect();
    assert_eq!(uids, (range.first..=range.last).collect(), "three leases, three uids");
    assert!(leases.iter().all(|l| l.ids().gid == 65534), "one gid for all");
    assert_eq!(pool.held(), 3);
    for uid in &uids {
        assert!(claims.path().join(uid.to_string()).exists(), "uid {uid} is claimed on the host");
    }

    let error = pool.lease().unwrap_err();
    assert!(error.is_capacity());
    let message = error.to_string();
    assert!(message.contains(&range.to_string()) && message.contains("3 by this runner"), "{message}");
    assert!(message.contains("never share"), "{message}");

    // Given back (no process was started): free again at once.
    let given_back = leases[1].ids().uid;
    drop(leases);
    assert_eq!(pool.held(), 0);
    assert!(!claims.path().join(given_back.to_string()).exists(), "the host-wide claim goes with the lease");
    assert!(pool.lease().is_ok());
}

#[test]
fn a_uid_given_back_is_the_last_to_be_taken_again() {
    let claims = tempfile::tempdir().unwrap();
    let pool = pool(test_range(10, 3), &claims);
    let a = pool.lease().unwrap();
    let a_uid = a.ids().uid;
    drop(a);
    let next: Vec<u32> = (0..3).map(|_| pool.lease().unwrap()).map(|l| l.ids().uid).collect();
    // Each lease above is dropped at once: round robin still walks on.
    assert_eq!(next.last(), Some(&a_uid), "{next:?}");
    assert!(!next[..2].contains(&a_uid), "{next:?}");
}

#[test]
fn a_uid_is_not_given_again_while_its_process_runs() {
    let claims = tempfile::tempdir().unwrap();
    let pool = pool(test_range(20, 1), &claims);
    let lease = pool.lease().unwrap();
    let uid = lease.ids().uid;
    // Any process: the pool watches the one the lease was told about.
    let mut process = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    lease.track(process.id());
    drop(lease);

    // Released, but its process runs: the uid waits.
    assert_eq!((pool.held(), pool.draining()), (1, 1));
    let error = pool.lease().unwrap_err().to_string();
    assert!(error.contains("1 of them waiting for their process to exit"), "{error}");
    assert!(claims.path().join(uid.to_string()).exists(), "still claimed on the host");

    // Killed but not reaped yet (a zombie runs nothing): free.
    process.kill().unwrap();
    wait_until("the process becomes a zombie", || {
        std::fs::read_to_string(format!("/proc/{}/stat", process.id()))
            .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
    });
    let again = pool.lease().expect("the process has exited");
    assert_eq!(again.ids().uid, uid);
    assert_eq!(pool.draining(), 0);
    process.wait().unwrap();
}

#[tokio::test]
async fn a_draining_uid_is_freed_when_its_process_exits_without_waiting_for_the_next_boot() {
    let claims = tempfile::tempdir().unwrap();
    let pool = pool(test_range(25, 1), &claims);
    let lease = pool.lease().unwrap();
    let uid = lease.ids().uid;
    let mut process = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    lease.track(process.id());
    drop(lease);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pool.held(), 1, "its process runs");
    process.kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // `held` does not settle by itself: the pool's own task did.
    while pool.held() > 0 {
        assert!(Instant::now() < deadline, "the uid was never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!claims.path().join(uid.to_string()).exists(), "its host-wide claim went with it");
    process.wait().unwrap();
}

#[test]
fn the_proc_fallback_sees_a_process_by_its_uid() {
    // The pidfd path needs Linux 5.3; the fallback reads /proc.
    let me = std::process::id();
    // SAFETY: getuid has no preconditions.
    let my_uid = unsafe { libc::getuid() };
    assert!(process_runs_as(me, my_uid));
    assert!(!process_runs_as(me, my_uid.wrapping_add(12345)), "a pid now run by another uid is not ours");
    assert!(!ProcessWatch::Pid(me).exited(my_uid));
    assert!(ProcessWatch::Pid(u32::MAX - 1).exited(my_uid), "no such process");
}

#[test]
fn runners_on_one_host_never_hand_out_the_same_uid() {
    let claims = tempfile::tempdir().unwrap();
    let range = test_range(30, 2);
    // Two runners: two pools, each with its own locks, on the host's claims.
    let first = pool(range, &claims);
    let second = pool(range, &claims);
    let a = first.lease().unwrap();
    let b = second.lease().unwrap();
    assert_ne!(a.ids().uid, b.ids().uid, "the second runner skips the uid the first holds");
    let error = second.lease().unwrap_err().to_string();
    assert!(error.contains("1 by other runners"), "{error}");
    drop(a);
    assert_eq!(second.lease().unwrap().ids().uid, range.first, "free once the first runner gave it back");
}

// ---------------------------------------------------------------- files

fn deployment() -> Deployment {
    let config =
        IsolateConfig::from_json(br#"{"entrypoint":"file:///src/main.ts","layers":[{"kind":"eszip","id":"x"}]}"#)
            .unwrap();
    let specifier = url::Url::parse("file:///src/main.ts").unwrap();
    let module = ModuleFile {
        specifier: specifier.clone(),
        kind: isocloud_eszip::ModuleKind::JavaScript,
        source: Bytes::from_static(b"export {};"),
    };
    Deployment {
        deployment_id: "d".into(),
        config,
        modules: [(specifier, module)].into(),
        redirects: Default::default(),
        tree: AssetTree::default(),
        tree_error: None,
        tree_deferred: false,
        import_maps: Vec::new(),
        npm: None,
    }
}

fn policy(dir: &Path, uids: Option<IsolateUids>, mount_namespace: bool) -> SandboxPolicy {
    SandboxPolicy {
        deno: dir.join("deno"),
        harness_dir: dir.join("harness"),
        deno_dir: dir.join("deno-dir"),
        v8_heap_limit_mb: None,
        mount_namespace,
        network_namespace: false,
        pid_namespace: false,
        isolate_uids: uids,
        landlock: None,
        seccomp: None,
        rlimits: false,
    }
}

fn owner(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.mode() & 0o777)
}

#[test]
fn each_isolates_files_are_its_own_uids_and_the_uid_goes_back_with_the_last_clone() {
    if !root("each_isolates_files_are_its_own_uids") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let claims = tempfile::tempdir().unwrap();
    let pool = pool(test_range(40, 2), &claims);
    let policy = policy(dir.path(), Some(IsolateUids::PerIsolate(pool.clone())), false);
    let deno_dir = |name: &str| policy.deno_dir.join(name);
    let a = IsolateFiles::prepare(&dir.path().join("a"), &deployment(), &policy, &deno_dir("da"), None).unwrap();
    let b = IsolateFiles::prepare(&dir.path().join("b"), &deployment(), &policy, &deno_dir("db"), None).unwrap();
    let (a_uid, b_uid) = (a.ids.unwrap().uid, b.ids.unwrap().uid);
    assert_ne!(a_uid, b_uid);
    for (files, uid) in [(&a, a_uid), (&b, b_uid)] {
        assert_eq!(owner(&files.run), (uid, 0o700), "its sockets' folder");
        assert_eq!(owner(&files.bootstrap), (uid, 0o600), "its bootstrap record (the tenant's envs)");
        assert_eq!(owner(&files.deno_dir), (uid, 0o700), "its deployment's deno cache dir");
    }
    // A third isolate finds none free: it is refused, never given a used uid.
    let refused = IsolateFiles::prepare(&dir.path().join("c"), &deployment(), &policy, &deno_dir("dc"), None);
    assert!(matches!(&refused, Err(e) if e.is_capacity()), "{refused:?}");

    // Files are cloned (the pool's hooks hold a copy): the uid is held until
    // the last copy goes.
    let a_copy = a.clone();
    drop(a);
    assert_eq!(pool.held(), 2);
    drop(a_copy);
    assert_eq!(pool.held(), 1);
    // The cache dir is taken back from the uid with it: the uid's next
    // holder cannot enter it.
    assert_eq!(owner(&deno_dir("da")), (0, 0o700));
    assert_eq!(owner(&deno_dir("db")), (b_uid, 0o700), "the live isolate keeps its own");
}

#[test]
fn a_deployments_deno_dir_follows_each_boots_uid_and_an_ended_isolate_never_takes_it_from_a_live_one() {
    if !root("a_deployments_deno_dir_follows_each_boots_uid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let claims = tempfile::tempdir().unwrap();
    let pool = pool(test_range(50, 3), &claims);
    let policy = policy(dir.path(), Some(IsolateUids::PerIsolate(pool)), false);
    let deno_dir = policy.deno_dir.join("deployment");
    let first = IsolateFiles::prepare(&dir.path().join("1"), &deployment(), &policy, &deno_dir, None).unwrap();
    let first_uid = first.ids.unwrap().uid;
    // What deno writes as the first isolate's uid.
    let compiled = deno_dir.join("gen/file/src");
    std::fs::create_dir_all(&compiled).unwrap();
    std::fs::write(compiled.join("main.ts.js"), "compiled").unwrap();
    std::fs::write(deno_dir.join("v8_code_cache_v2"), "cache").unwrap();
    crate::identity::hand_over_dir(&deno_dir, first.ids.unwrap()).unwrap();

    // The next boot overlaps the first isolate's end (an eviction's grace):
    // the whole tree becomes the new uid's, and the old isolate's end leaves
    // it alone.
    let second = IsolateFiles::prepare(&dir.path().join("2"), &deployment(), &policy, &deno_dir, None).unwrap();
    let second_uid = second.ids.unwrap().uid;
    assert_ne!(first_uid, second_uid);
    drop(first);
    for path in [deno_dir.clone(), deno_dir.join("gen"), compiled.join("main.ts.js"), deno_dir.join("v8_code_cache_v2")]
    {
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), second_uid, "{}", path.display());
    }
    drop(second);
    assert_eq!(owner(&deno_dir), (0, 0o700), "parked with the runner between boots");
    assert_eq!(
        std::fs::metadata(compiled.join("main.ts.js")).unwrap().uid(),
        second_uid,
        "inside: untouched till next boot"
    );
}

#[test]
fn a_prestarted_isolates_cache_dir_is_taken_back_where_it_was_moved() {
    if !root("a_prestarted_isolates_cache_dir_is_taken_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let claims = tempfile::tempdir().unwrap();
    let pool = pool(test_range(60, 2), &claims);
    let policy = policy(dir.path(), Some(IsolateUids::PerIsolate(pool.clone())), true);
    let blank = IsolateFiles::prepare_blank(&dir.path().join("blank"), &policy, None).unwrap();
    let uid = blank.ids.unwrap().uid;
    assert_eq!(owner(&blank.deno_dir), (uid, 0o700));
    let deployment_deno_dir = policy.deno_dir.join("deployment");
    let filled = blank.fill(&deployment(), &deployment_deno_dir).unwrap();
    assert_eq!(filled.deno_dir, deployment_deno_dir, "its own cache dir became the deployment's");
    assert_eq!(filled.ids, blank.ids, "same process, same uid");
    drop((blank, filled));
    assert_eq!(pool.held(), 0);
    assert_eq!(owner(&deployment_deno_dir), (0, 0o700));
}

#[test]
fn a_new_isolate_kills_what_an_earlier_holder_of_its_uid_left_running() {
    if !root("a_new_isolate_kills_what_an_earlier_holder_left") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let claims = tempfile::tempdir().unwrap();
    let range = test_range(70, 1);
    // A process of the uid that outlived its isolate (one forked out of its
    // process group: possible with seccomp off).
    let mut stray = spawn_as(range.first, "sleep", &["30"]);
    wait_until("the stray runs as the uid", || process_runs_as(stray.id(), range.first));

    // Control: an isolate of a shared uid leaves processes of that uid alone
    // (they are its neighbours).
    let shared = IsolateUids::Shared(IsolateIds { uid: range.first, gid: 65534 });
    let shared_policy = policy(dir.path(), Some(shared.clone()), false);
    let (ids, _) = shared.take().unwrap();
    run_confined(&shared_policy, ids);
    assert!(stray.try_wait().unwrap().is_none(), "a shared uid's new isolate killed a neighbour");

    let pool = pool(range, &claims);
    let per_isolate = IsolateUids::PerIsolate(pool);
    let own_policy = policy(dir.path(), Some(per_isolate.clone()), false);
    let (ids, _lease) = per_isolate.take().unwrap();
    assert_eq!(ids.uid, range.first);
    run_confined(&own_policy, ids);
    let status = stray.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the stray died before the new isolate's program ran");
}

/// Runs `true` under `policy`'s confinement (no jail) as `ids`.
fn run_confined(policy: &SandboxPolicy, ids: IsolateIds) {
    let confinement = crate::confine::Confinement::plan(policy, None, Some(ids)).unwrap();
    let mut command = std::process::Command::new("/bin/true");
    // SAFETY: the isolate's own hook (see SandboxedCommand::spawn).
    unsafe {
        command.pre_exec(confinement.into_hook());
    }
    assert!(command.status().unwrap().success());
}

#[test]
fn a_dead_runners_claims_are_cleared_and_a_live_ones_kept() {
    let claims = tempfile::tempdir().unwrap();
    let range = test_range(85, 2);
    let live = pool(range, &claims);
    let held = live.lease().unwrap();
    // A runner killed by SIGKILL leaves its file, unlocked.
    let stale = claims.path().join(range.last.to_string());
    std::fs::write(&stale, "").unwrap();
    let _next = pool(range, &claims);
    assert!(!stale.exists(), "a dead runner's claim is cleared at start-up");
    assert!(claims.path().join(held.ids().uid.to_string()).exists(), "a live runner's stays");
}

#[test]
fn claims_live_in_a_folder_of_roots_alone() {
    let parent = tempfile::tempdir().unwrap();
    let claims = parent.path().join("run/isocloud/isolate-uids");
    UidPool::new(test_range(80, 1), 65534, &claims).unwrap();
    assert_eq!(std::fs::metadata(&claims).unwrap().permissions().mode() & 0o777, 0o700);
}

/// The price of handing a deployment's deno cache dir to each boot's uid
/// (a walk and one `lchown` per entry), for the notes:
/// `cargo test -p isocloud-sandbox --release -- --ignored hand_over_cost --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn hand_over_cost() {
    if !root("hand_over_cost") {
        return;
    }
    for modules in [10, 100, 300, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let deno_dir = dir.path().join("deno-dir");
        // What deno keeps: four SQLite caches (with -wal and -shm), and a
        // transpiled file per TypeScript module in folders like the sources'.
        for name in ["dep_analysis_cache_v2", "node_analysis_cache_v2", "v8_code_cache_v2", "check_cache_v2"] {
            for suffix in ["", "-wal", "-shm"] {
                std::fs::create_dir_all(&deno_dir).unwrap();
                std::fs::write(deno_dir.join(format!("{name}{suffix}")), [0u8; 4096]).unwrap();
            }
        }
        for i in 0..modules {
            let folder = deno_dir.join(format!("gen/file/src/lib{}", i / 20));
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join(format!("m{i}.ts.js")), [b'x'; 2048]).unwrap();
        }
        let entries = walkdir_count(&deno_dir);
        // A uid per boot (each boot's differs from the last) against one
        // shared uid (the walk was there before: nothing changes owner).
        for (label, uids) in [("a uid per boot", 2u32), ("one shared uid", 1)] {
            let mut times = Vec::new();
            for round in 0..41u32 {
                let ids = IsolateIds { uid: test_range(90, 2).first + round % uids, gid: 65534 };
                let started = Instant::now();
                crate::identity::hand_over_dir(&deno_dir, ids).unwrap();
                times.push(started.elapsed());
            }
            times.sort();
            println!(
                "hand_over_dir, {label}: {modules:>4} modules, {entries:>4} entries: median {:?}, max {:?}",
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
    }
}

fn walkdir_count(path: &Path) -> usize {
    1 + match std::fs::read_dir(path) {
        Ok(entries) => entries.flatten().map(|e| walkdir_count(&e.path())).sum(),
        Err(_) => 0,
    }
}
