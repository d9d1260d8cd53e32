//! One uid per live isolate: two tenants' deno processes never share a uid,
//! so should every other layer fail, the kernel still refuses one the
//! other's signals, ptrace probes and files. Seen from outside, as root:
//! `/proc/<pid>/status` of the runner's deno children, and a helper process
//! the test runs as one isolate's uid against the other.
//!
//! Needs root (the runner gives isolates uids; the test takes them): CI runs
//! as root, so there these fail rather than skip.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// Answers its pid (as it sees it: 1 in its own PID namespace) and a file
/// of its deployment.
const MAIN: &str = r#"
Deno.serve(async () => Response.json({ pid: Deno.pid, greeting: await Deno.readTextFile("./greeting.txt") }));
"#;

/// The default range (`UidRange::DEFAULT`).
const DEFAULT_FIRST: u32 = 1_900_000_000;
const DEFAULT_LAST: u32 = 1_900_099_999;

fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs root, and CI runs as root");
    eprintln!("skipping {test}: needs root");
    false
}

fn apps(names: &[&str]) -> AppsDir {
    let apps = AppsDir::new();
    for name in names {
        apps.app(name, &[("main.ts", MAIN), ("greeting.txt", &format!("hello from {name}"))]);
    }
    apps
}

/// The host pid of `app`'s isolate, after checking it serves and reads its file.
async fn serve(runner: &Runner, app: &str) -> u32 {
    let response = runner.get(&format!("{app}.localhost"), "/").await;
    assert_eq!(response.status(), 200, "{app}: {}", runner.stderr());
    checked_pid(runner, app, response.json().await.unwrap()).await
}

/// The host pid of `app`'s isolate, which answered `seen`: its own file, and
/// the pid it has in its innermost PID namespace (1 in one of its own).
async fn checked_pid(runner: &Runner, app: &str, seen: Value) -> u32 {
    assert_eq!(seen["greeting"], format!("hello from {app}"), "{app} reads its own files");
    let pid = runner.isolate_pid(app).await;
    let inside = status_field(pid, "NSpid").split_whitespace().last().unwrap().to_owned();
    assert_eq!(seen["pid"].to_string(), inside, "{app}: host pid {pid}");
    pid
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap();
    line[name.len() + 1..].trim().to_owned()
}

/// The real uid of `pid`, after checking real, effective, saved and file
/// system uids are all the same.
fn uid_of(pid: u32) -> u32 {
    let ids: Vec<u32> = status_field(pid, "Uid").split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{pid}: {ids:?}");
    ids[0]
}

/// Runs `program args` as `uid` (gid 65534, no groups): what a process of
/// that isolate could do, had it got past deno and seccomp.
fn run_as(uid: u32, program: &str, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(program);
    command.args(args).env_clear();
    // SAFETY: between fork and exec only raw id syscalls on integers.
    unsafe {
        command.pre_exec(move || {
            if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().unwrap()
}

/// `kill -SIGNAL pid` as `uid`: `Ok` or the error kill printed.
fn kill_as(uid: u32, signal: &str, pid: u32) -> Result<(), String> {
    let output = run_as(uid, "/bin/kill", &[&format!("-{signal}"), &pid.to_string()]);
    if output.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&output.stderr).into_owned()) }
}

/// `cat /proc/<pid>/environ` as `uid` (ptrace's read check guards it).
fn read_environ_as(uid: u32, pid: u32) -> Result<(), String> {
    let output = run_as(uid, "/bin/cat", &[&format!("/proc/{pid}/environ")]);
    if output.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&output.stderr).into_owned()) }
}

/// Waits until the runner has `count` children, each of them deno (not a
/// child between its fork and exec, still the runner's uid); returns them.
async fn children(runner: &Runner, count: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let is_deno = |pid: &u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "deno");
    loop {
        let pids = runner.isolate_pids();
        if pids.len() == count && pids.iter().all(is_deno) {
            return pids;
        }
        assert!(Instant::now() < deadline, "{pids:?} are not {count} isolates:\n{}", runner.stderr());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn with_one_shared_uid_one_isolate_reaches_another() {
    if !root("with_one_shared_uid_one_isolate_reaches_another") {
        return;
    }
    // The probe, on the runner as it was: every isolate uid 65534.
    let apps = apps(&["a", "b"]);
    let runner = apps.serve(&["--isolate-uid", "65534"]);
    runner.wait_for_log("no-new-privs=on uid=65534 gid=65534");
    let (a, b) = (serve(&runner, "a").await, serve(&runner, "b").await);
    assert_eq!((uid_of(a), uid_of(b)), (65534, 65534));
    // One isolate's uid may read the other's environment and signal it.
    assert_eq!(read_environ_as(65534, b), Ok(()));
    assert_eq!(kill_as(65534, "0", b), Ok(()));
}

#[tokio::test]
async fn each_live_isolate_runs_as_its_own_uid_and_none_reaches_another() {
    if !root("each_live_isolate_runs_as_its_own_uid") {
        return;
    }
    let apps = apps(&["a", "b"]);
    // Every default: a uid per isolate from the default range.
    let runner = apps.serve(&["--prestarted-isolates", "1"]);
    runner.wait_for_log(&format!("no-new-privs=on uid={DEFAULT_FIRST}-{DEFAULT_LAST} gid=65534"));
    let (a, b) = (serve(&runner, "a").await, serve(&runner, "b").await);
    // Two deployments' isolates and one pre-started, waiting: three uids.
    let pids = children(&runner, 3).await;
    assert!(pids.contains(&a) && pids.contains(&b), "{pids:?}");
    let uids: Vec<u32> = pids.iter().map(|pid| uid_of(*pid)).collect();
    let distinct: std::collections::HashSet<&u32> = uids.iter().collect();
    assert_eq!(distinct.len(), 3, "{pids:?} run as {uids:?}");
    for (pid, uid) in pids.iter().zip(&uids) {
        assert!((DEFAULT_FIRST..=DEFAULT_LAST).contains(uid), "{pid} runs as {uid}");
        assert_eq!(status_field(*pid, "Gid"), "65534\t65534\t65534\t65534");
        assert_eq!(status_field(*pid, "Groups"), "");
    }
    let (a_uid, b_uid) = (uid_of(a), uid_of(b));
    let waiting = *pids.iter().find(|pid| ![a, b].contains(pid)).unwrap();

    // Each deployment's deno cache dir is its isolate's uid's, and deno wrote
    // into it as that uid (the transpiled main.ts).
    use std::os::unix::fs::MetadataExt;
    let mut owners = Vec::new();
    for dir in std::fs::read_dir(runner.state_dir.path().join("deno-dir")).unwrap() {
        let dir = dir.unwrap().path();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700, "{}", dir.display());
        let emitted = dir.join("gen/file/src/main.ts.js");
        assert_eq!(std::fs::metadata(&emitted).unwrap().uid(), meta.uid(), "{}", emitted.display());
        owners.push(meta.uid());
    }
    owners.sort();
    let mut expected = vec![a_uid, b_uid];
    expected.sort();
    assert_eq!(owners, expected, "one cache dir per deployment, its isolate's");

    // From a's uid: its own process answers; b's and the waiting one's refuse.
    assert_eq!(kill_as(a_uid, "0", a), Ok(()), "the probe: a signals itself");
    assert_eq!(read_environ_as(a_uid, a), Ok(()), "the probe: a reads its own environment");
    for other in [b, waiting] {
        let refused = kill_as(a_uid, "KILL", other).unwrap_err();
        assert!(refused.contains("Operation not permitted"), "{refused}");
        let refused = read_environ_as(a_uid, other).unwrap_err();
        assert!(refused.contains("Permission denied"), "{refused}");
    }
    assert!(process_alive(b) && process_alive(waiting));
    assert_eq!(serve(&runner, "b").await, b, "b is unharmed");
}

#[tokio::test]
async fn a_uid_goes_to_a_new_isolate_only_after_its_last_one_is_gone() {
    if !root("a_uid_goes_to_a_new_isolate_only_after_its_last_one_is_gone") {
        return;
    }
    // Two uids of its own (outside the default range other tests' runners
    // take from): two isolates at a time, whatever --max-isolates says.
    uid_goes_only_after_its_last_process(DEFAULT_LAST + 100_000, &[]).await;
}

#[tokio::test]
async fn without_a_pid_namespace_a_uid_goes_only_after_its_last_process_too() {
    if !root("without_a_pid_namespace_a_uid_goes_only_after_its_last_process_too") {
        return;
    }
    // The PID namespace goes with the mount namespace: a's leftover is then
    // a process on the host, which c's start kills (`kill(-1)` as its uid).
    uid_goes_only_after_its_last_process(DEFAULT_LAST + 100_010, &["--mount-namespace", "off"]).await;
}

/// `/bin/sleep 60` as `uid` (gid 65534, no groups) in a session of its own,
/// in the PID namespace of process `namespace_of` when given: a process an
/// isolate forked out of its process group, were seccomp off.
fn stray_as(uid: u32, namespace_of: Option<u32>) -> std::process::Child {
    use std::os::fd::AsRawFd;
    let namespace = namespace_of.map(|pid| std::fs::File::open(format!("/proc/{pid}/ns/pid")).unwrap());
    // On a thread of its own: after setns its next child is in that namespace.
    std::thread::spawn(move || {
        if let Some(namespace) = namespace {
            // SAFETY: setns on a namespace descriptor this thread holds open;
            // CLONE_NEWPID moves only the children this thread forks next.
            let joined = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWPID) };
            assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
        }
        let mut stray = std::process::Command::new("/bin/sleep");
        stray.arg("60");
        // SAFETY: between fork and exec only raw syscalls on integers.
        unsafe {
            stray.pre_exec(move || {
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
        stray.spawn().unwrap()
    })
    .join()
    .unwrap()
}

/// A runner with two isolate uids from `first`: a third isolate waits for
/// one, and gets a's only once a and whatever a left running as its uid are
/// gone. With a PID namespace (unless `extra` switches it off) the leftover
/// is in a's namespace and dies with a's deno; without, on the host, and c's
/// start kills it.
async fn uid_goes_only_after_its_last_process(first: u32, extra: &[&str]) {
    let pid_namespace = extra.is_empty();
    let range = format!("{first}-{}", first + 1);
    let apps = apps(&["a", "b", "c"]);
    let runner = apps.serve(&[&["--isolate-uid-range", range.as_str(), "--max-isolates", "4"], extra].concat());
    let namespaces =
        if pid_namespace { "mount-namespace=on pid-namespace=on" } else { "mount-namespace=off pid-namespace=off" };
    runner.wait_for_log(namespaces);
    runner.wait_for_log(&format!("uid={range} gid=65534"));
    let (a, b) = (serve(&runner, "a").await, serve(&runner, "b").await);
    let (a_uid, b_uid) = (uid_of(a), uid_of(b));
    let mut both = [a_uid, b_uid];
    both.sort();
    assert_eq!(both, [first, first + 1]);

    // A third isolate finds no uid free: refused, not given a used one.
    let response = runner.get("c.localhost", "/").await;
    // 500 INTERNAL until the pool answers SandboxError::is_capacity with 503
    // CAPACITY; the operator's log says what happened either way.
    assert!(response.status().is_server_error(), "{}", response.status());
    runner.wait_for_log(&format!("every isolate uid of {range} is taken"));
    assert_eq!(children(&runner, 2).await.len(), 2);

    // A process of a's uid that is not a's deno, then a's end.
    let mut stray = stray_as(a_uid, pid_namespace.then_some(a));
    let stray_pid = stray.id();
    assert_eq!(uid_of(stray_pid), a_uid);
    let namespace = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    assert_eq!(namespace(stray_pid), namespace(a), "the stray is where a's leftover would be");
    assert_eq!(namespace(a) != namespace(std::process::id()), pid_namespace, "a's own PID namespace");
    assert!(process_alive(stray_pid));
    // Reaped as soon as it ends, the way a's deno would reap it: a namespace's
    // pid 1 finishes exiting only once every other process of it is reaped.
    let stray = std::thread::spawn(move || stray.wait().unwrap());
    signal(a, libc::SIGKILL);

    // c boots once a is gone, as a's uid: the only one free.
    let deadline = Instant::now() + Duration::from_secs(20);
    let c = loop {
        let response = runner.get("c.localhost", "/").await;
        if response.status() == 200 {
            break checked_pid(&runner, "c", response.json().await.unwrap()).await;
        }
        assert!(Instant::now() < deadline, "c never booted:\n{}", runner.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!process_alive(a), "a's process is gone before its uid runs c");
    assert_eq!(uid_of(c), a_uid);
    // What a left running as its uid died before c's deno started.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(stray.join().unwrap().signal(), Some(libc::SIGKILL), "the stray was killed");
    // b kept its uid and serves on.
    assert_eq!(uid_of(b), b_uid);
    assert_eq!(serve(&runner, "b").await, b);
    assert_eq!(serve(&runner, "c").await, c);
}

#[tokio::test]
async fn one_shared_uid_and_a_uid_range_exclude_each_other() {
    let apps = apps(&["a"]);
    for args in [
        ["--isolate-uid", "65534", "--isolate-uid-range", "1900000000-1900000009"],
        ["--isolate-uid-range", "0-10", "--isolate-gid", "65534"],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_isocloud"))
            .args(["serve", "--apps", apps.path()])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("isolate_uid_range"), "{stderr}");
    }
}
