//! The operating system's layers, each proven on its own: a real deno with
//! *every* deno permission (`deno eval` runs with `-A`) and FFI, started
//! through the same confinement as an isolate, tries what a tenant who got
//! past deno's permissions would try. Needs root (the jail, setuid) and the
//! pinned deno; skipped, loudly, without them — except under `CI`, which
//! runs as root with the pinned deno: there a test that cannot run fails.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use isocloud_model::{AssetTree, Deployment, ModuleFile};
use isocloud_protocol::IsolateConfig;
use serde_json::Value;

use super::*;

fn pinned_deno() -> Option<PathBuf> {
    let deno = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.isocloud/deno/bin/deno");
    deno.is_file().then(|| deno.canonicalize().unwrap())
}

/// The pinned deno and a root runner, or (outside CI) `None` and a note to
/// skip.
fn requirements(test: &str) -> Option<PathBuf> {
    let missing = if !crate::identity::runner_is_root() {
        "needs root (the jail and setuid)"
    } else if let Some(deno) = pinned_deno() {
        return Some(deno);
    } else {
        "the pinned deno is missing (run ./scripts/install-deno)"
    };
    assert!(std::env::var_os("CI").is_none(), "{test}: {missing}; CI runs as root with the pinned deno");
    eprintln!("skipping {test}: {missing}");
    None
}

#[derive(Clone, Copy)]
struct Layers {
    landlock: bool,
    seccomp: bool,
    ids: bool,
    rlimits: bool,
    pid_namespace: bool,
}

const ALL: Layers = Layers { landlock: true, seccomp: true, ids: true, rlimits: true, pid_namespace: false };

struct Sandbox {
    _dir: tempfile::TempDir,
    policy: SandboxPolicy,
    files: IsolateFiles,
}

impl Sandbox {
    fn new(deno: &Path, layers: Layers) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ids = layers.ids.then_some(IsolateIds::NOBODY);
        let deno_dir = dir.path().join("deno-dir");
        std::fs::create_dir(&deno_dir).unwrap();
        if let Some(ids) = ids {
            crate::identity::hand_over_dir(&deno_dir, ids).unwrap();
        }
        let policy = SandboxPolicy {
            deno: deno.to_owned(),
            harness_dir: crate::install_harness(dir.path()).unwrap(),
            deno_dir,
            v8_heap_limit_mb: None,
            mount_namespace: true,
            network_namespace: false,
            pid_namespace: layers.pid_namespace,
            isolate_uids: ids.map(IsolateUids::Shared),
            landlock: layers.landlock.then(|| LandlockPolicy::new(deno).expect("this kernel has Landlock")),
            seccomp: layers.seccomp.then(|| SeccompFilters::compile().unwrap()),
            rlimits: layers.rlimits,
        };
        let config = IsolateConfig::from_json(
            br#"{"entrypoint":"file:///src/main.ts","layers":[{"kind":"bundle","id":"x","specifier":"file:///src/main.ts"}]}"#,
        )
        .unwrap();
        let specifier = url::Url::parse("file:///src/main.ts").unwrap();
        let module = ModuleFile {
            specifier: specifier.clone(),
            kind: isocloud_eszip::ModuleKind::JavaScript,
            source: Bytes::from_static(b"export {};"),
        };
        let deployment = Deployment {
            deployment_id: "d".into(),
            config,
            modules: [(specifier, module)].into(),
            redirects: Default::default(),
            tree: AssetTree::default(),
            tree_error: None,
            tree_deferred: false,
            import_maps: Vec::new(),
            npm: None,
        };
        let files =
            IsolateFiles::prepare(&dir.path().join("instance"), &deployment, &policy, &policy.deno_dir.join("d"), None)
                .unwrap();
        Sandbox { _dir: dir, policy, files }
    }

    /// Runs `script` with `deno eval` (all deno permissions) inside the
    /// isolate's confinement; the script prints one JSON value.
    fn eval(&self, script: &str) -> Value {
        let confinement = Confinement::plan(&self.policy, Some(&self.files), self.files.ids).unwrap();
        let mut command = std::process::Command::new(&self.files.guest.deno);
        command
            .args(["eval", "--quiet", script])
            .env_clear()
            .env("DENO_DIR", &self.files.guest.deno_dir)
            .env("NO_COLOR", "1")
            .env("DENO_NO_UPDATE_CHECK", "1")
            .current_dir(&self.files.src);
        // SAFETY: the same hook as every isolate's (see SandboxedCommand::new).
        unsafe {
            command.pre_exec(confinement.into_hook());
        }
        let output = if self.policy.pid_namespace {
            let namespace = crate::pidns::ChildrenInNewPidNamespace::enter().unwrap();
            let output = command.output();
            namespace.leave().unwrap();
            output
        } else {
            command.output()
        };
        let output = output.expect("deno starts under the confinement");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "deno eval failed: {}\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }
}

/// What an attacker with every deno permission tries. Results: a value, or
/// `"error:<Deno error name>"`; raw syscalls give `-errno` on failure.
const ATTACKS: &str = r#"
const attempt = (f) => { try { const v = f(); return v === undefined ? "ok" : v; } catch (e) { return "error:" + e.name; } };
const libc = Deno.dlopen("libc.so.6", {
  unshare: { parameters: ["i32"], result: "i32" },
  ptrace: { parameters: ["i64", "i64", "pointer", "pointer"], result: "i64" },
  process_vm_readv: { parameters: ["i32", "pointer", "u64", "pointer", "u64", "u64"], result: "i64" },
  getpid: { parameters: [], result: "i32" },
  getppid: { parameters: [], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
}).symbols;
const sys = (f) => { const rc = Number(f()); return rc < 0 ? -new Deno.UnsafePointerView(libc.__errno_location()).getInt32() : rc; };
console.log(JSON.stringify({
  passwd: attempt(() => Deno.readTextFileSync("/etc/passwd").length),
  status: attempt(() => Deno.readTextFileSync("/proc/self/status")),
  limits: attempt(() => Deno.readTextFileSync("/proc/self/limits")),
  proc1: attempt(() => Deno.readTextFileSync("/proc/1/environ").length),
  runnerEnviron: attempt(() => Deno.readTextFileSync(`/proc/${libc.getppid()}/environ`).length),
  writeTmp: attempt(() => Deno.writeTextFileSync("/tmp/escape", "x")),
  writeSrc: attempt(() => Deno.writeTextFileSync("/src/escape", "x")),
  writeRun: attempt(() => Deno.writeTextFileSync("/isocloud/run/scratch", "x")),
  command: attempt(() => new Deno.Command("/usr/bin/true").outputSync().code),
  unshare: sys(() => libc.unshare(0x10000000)),
  ptrace: sys(() => libc.ptrace(2n, BigInt(libc.getppid()), null, null)),
  vmRead: sys(() => libc.process_vm_readv(libc.getpid(), null, 0n, null, 0n, 0n)),
}));
"#;

fn status_field<'a>(status: &'a Value, name: &str) -> &'a str {
    let text = status.as_str().unwrap_or_else(|| panic!("/proc/self/status unreadable: {status}"));
    let line = text.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name}?"));
    line[name.len() + 1..].trim()
}

#[test]
fn every_layer_holds_against_a_process_with_all_deno_permissions() {
    let Some(deno) = requirements("every_layer_holds") else { return };
    let sandbox = Sandbox::new(&deno, ALL);
    let out = sandbox.eval(ATTACKS);

    assert_eq!(out["passwd"], "error:PermissionDenied", "{out}");
    assert_eq!(out["proc1"], "error:PermissionDenied", "{out}");
    assert_eq!(out["runnerEnviron"], "error:PermissionDenied", "{out}");
    assert!(out["writeTmp"].as_str().unwrap().starts_with("error:"), "{out}");
    assert!(out["writeSrc"].as_str().unwrap().starts_with("error:"), "{out}");
    assert_eq!(out["writeRun"], "ok", "its socket dir stays writable: {out}");
    assert!(out["command"].as_str().unwrap().starts_with("error:"), "{out}");
    assert_eq!(out["unshare"], -libc::EPERM, "{out}");
    assert_eq!(out["ptrace"], -libc::EPERM, "{out}");
    assert_eq!(out["vmRead"], -libc::EPERM, "{out}");

    let status = &out["status"];
    assert_eq!(status_field(status, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(status, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(status, "Groups"), "");
    assert_eq!(status_field(status, "CapEff"), "0000000000000000");
    assert_eq!(status_field(status, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(status, "NoNewPrivs"), "1");
    assert_eq!(status_field(status, "Seccomp"), "2");

    let limits = out["limits"].as_str().unwrap();
    let limit = |name: &str| -> Vec<&str> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..].split_whitespace().take(2).collect()
    };
    assert_eq!(limit("Max open files"), ["8192", "8192"]);
    assert_eq!(limit("Max core file size"), ["0", "0"]);
    assert_eq!(limit("Max file size"), ["268435456", "268435456"]);
    assert_eq!(limit("Max realtime priority"), ["0", "0"]);
}

/// What a tenant learns of the other processes on the machine.
const PROCESSES: &str = r#"
const entries = [...Deno.readDirSync("/proc")].map((e) => e.name).filter((n) => /^[0-9]+$/.test(n));
console.log(JSON.stringify({ pid: Deno.pid, ppid: Deno.ppid, processes: entries.length }));
"#;

#[test]
fn in_its_own_pid_namespace_an_isolate_sees_only_itself() {
    let Some(deno) = requirements("pid_namespace") else { return };
    let layers = Layers { landlock: false, seccomp: true, ids: true, rlimits: true, pid_namespace: false };
    // The probe works: without the namespace the runner's pid shows, and
    // every process of the host is listed in /proc.
    let outside = Sandbox::new(&deno, layers).eval(PROCESSES);
    assert_eq!(outside["ppid"], std::process::id(), "{outside}");
    assert!(outside["processes"].as_u64().unwrap() > 2, "{outside}");

    let inside = Sandbox::new(&deno, Layers { pid_namespace: true, ..layers }).eval(PROCESSES);
    assert_eq!(inside["pid"], 1, "{inside}");
    assert_eq!(inside["ppid"], 0, "the runner is not in its namespace: {inside}");
    assert_eq!(inside["processes"], 1, "its /proc lists itself alone: {inside}");

    // With every layer on it still starts and still holds.
    let all = Sandbox::new(&deno, Layers { pid_namespace: true, ..ALL }).eval(ATTACKS);
    assert_eq!(all["passwd"], "error:PermissionDenied", "{all}");
    assert_eq!(all["unshare"], -libc::EPERM, "{all}");
    assert_eq!(all["ptrace"], -libc::EPERM, "{all}");
}

#[test]
fn landlock_alone_denies_what_deno_and_the_file_modes_would_allow() {
    let Some(deno) = requirements("landlock_alone") else { return };
    // /etc/passwd is world-readable and inside the jail; deno may read
    // anything: only Landlock stands in the way.
    let only_landlock = Layers { landlock: true, seccomp: false, ids: true, rlimits: false, pid_namespace: false };
    let out = Sandbox::new(&deno, only_landlock).eval(ATTACKS);
    assert_eq!(out["passwd"], "error:PermissionDenied", "{out}");
    assert_eq!(out["command"], "error:PermissionDenied", "nothing but deno may be executed: {out}");
    assert!(out["status"].as_str().is_some(), "its own /proc/self stays readable: {out}");

    let without = Layers { landlock: false, ..only_landlock };
    let out = Sandbox::new(&deno, without).eval(ATTACKS);
    assert!(out["passwd"].as_u64().is_some_and(|n| n > 0), "control: readable without Landlock: {out}");
    assert_eq!(out["command"], 0, "control: /usr/bin/true runs without Landlock: {out}");
}

#[test]
fn seccomp_alone_denies_ptrace_unshare_and_fork_through_ffi() {
    let Some(deno) = requirements("seccomp_alone") else { return };
    let only_seccomp = Layers { landlock: false, seccomp: true, ids: true, rlimits: false, pid_namespace: false };
    let out = Sandbox::new(&deno, only_seccomp).eval(ATTACKS);
    assert_eq!(out["unshare"], -libc::EPERM, "{out}");
    assert_eq!(out["ptrace"], -libc::EPERM, "{out}");
    assert_eq!(out["vmRead"], -libc::EPERM, "{out}");
    assert_eq!(out["command"], "error:PermissionDenied", "no new processes: {out}");

    let without = Layers { seccomp: false, ..only_seccomp };
    let out = Sandbox::new(&deno, without).eval(ATTACKS);
    // The kernel answers these itself without the filter (unshare of a
    // multi-threaded process: EINVAL; ptrace of a process not traced:
    // ESRCH; an empty process_vm_readv: 0).
    for key in ["unshare", "ptrace", "vmRead"] {
        assert_ne!(out[key], -libc::EPERM, "control: {key} reaches the kernel without the filter: {out}");
    }
    assert_eq!(out["command"], 0, "control: processes start without the filter: {out}");
}

#[test]
fn the_start_up_probe_passes_with_every_layer() {
    let Some(deno) = requirements("the_start_up_probe") else { return };
    let sandbox = Sandbox::new(&deno, Layers { pid_namespace: true, ..ALL });
    probe_sandbox(&sandbox.policy).expect("deno --version runs under every layer");
    assert_eq!(
        sandbox.policy.summary(),
        "mount-namespace=on pid-namespace=on landlock=on seccomp=on no-new-privs=on uid=65534 gid=65534 rlimits=on netns=off"
    );
}

/// A busy runner holds more descriptors than an isolate may (~11 per
/// isolate: at ~750 isolates it passes the isolate's `RLIMIT_NOFILE`). The
/// child holds the runner's descriptors until exec, so a step between fork
/// and exec that opens one (Landlock's `/proc/self` rule) fails with EMFILE
/// once the isolate's limit is in force: every boot then failed, INTERNAL.
#[test]
fn an_isolate_starts_while_the_runner_holds_more_descriptors_than_an_isolate_may() {
    let Some(deno) = requirements("an_isolate_starts_while_the_runner_holds_more_descriptors") else { return };
    let sandbox = Sandbox::new(&deno, ALL);
    probe_sandbox(&sandbox.policy).expect("the probe: it starts while the runner holds few descriptors");

    let isolate_limit = crate::rlimits::RLIMITS.iter().find(|l| l.resource == libc::RLIMIT_NOFILE).unwrap().value;
    let wanted = isolate_limit + 1024;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a local; setrlimit reads one (root may
    // raise the hard limit).
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let raised = libc::rlimit { rlim_cur: wanted.max(limit.rlim_cur), rlim_max: wanted.max(limit.rlim_max) };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raised), 0, "{}", std::io::Error::last_os_error());
    }
    let mut held = Vec::new();
    loop {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file) as u64;
        held.push(file);
        if fd > isolate_limit + 16 {
            break;
        }
    }
    probe_sandbox(&sandbox.policy)
        .expect("deno starts under every layer while the runner holds descriptors past the isolate's limit");
    drop(held);
}

#[test]
fn deno_starts_with_the_runners_environment_only() {
    // Only planned here, never spawned: no root or deno needed.
    let sandbox = Sandbox::new(
        Path::new("/nonexistent/deno"),
        Layers { landlock: false, seccomp: false, ids: false, rlimits: false, pid_namespace: false },
    );
    let config = IsolateConfig::from_json(
        br#"{"entrypoint":"file:///src/main.ts","layers":[{"kind":"bundle","id":"x","specifier":"file:///src/main.ts"}],
             "envs":{"GREETING":"tenant-value-1","NODE_ENV":"tenant-value-2","HTTP_PROXY":"http://tenant.example:1"}}"#,
    )
    .unwrap();
    let egress = EgressRoute {
        proxy_url: "http://isolate:credential@127.0.0.1:9".into(),
        proxy_authority: "127.0.0.1:9".into(),
    };
    for (route, names) in [
        (None, vec!["DENO_DIR", "DENO_NO_UPDATE_CHECK", "NO_COLOR"]),
        (Some(&egress), vec!["DENO_DIR", "DENO_NO_UPDATE_CHECK", "HTTPS_PROXY", "HTTP_PROXY", "NO_COLOR"]),
    ] {
        let command = SandboxedCommand::new(&sandbox.policy, &sandbox.files, &config, route);
        let mut env: Vec<(String, String)> = command
            .command
            .as_std()
            .get_envs()
            .map(|(name, value)| {
                let value = value.expect("set, not removed").to_string_lossy().into_owned();
                (name.to_string_lossy().into_owned(), value)
            })
            .collect();
        env.sort();
        assert_eq!(env.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), names);
        assert!(!format!("{env:?}").contains("tenant"), "no tenant value reaches the exec: {env:?}");
        if route.is_some() {
            assert!(env.contains(&("HTTP_PROXY".into(), egress.proxy_url.clone())), "the runner's proxy: {env:?}");
        }
    }
    let blank = SandboxedCommand::blank(&sandbox.policy, &sandbox.files, config.net(), None);
    assert_eq!(blank.command.as_std().get_envs().count(), 3);
}

/// A shared object exporting `int probe(void)` (42), built with `cc`.
fn shared_object(dir: &Path) -> PathBuf {
    let source = dir.join("probe.c");
    std::fs::write(&source, "int probe(void) { return 42; }\n").unwrap();
    let out = dir.join("probe.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("cc is installed");
    assert!(status.success(), "cc failed");
    out
}

/// Maps `/src/x.so` executable (dlopen, and a bare mmap), reads its own
/// mount table and writes where a shared object could be dropped.
const MAP_TENANT_CODE: &str = r#"
const attempt = (f) => { try { const v = f(); return v === undefined ? "ok" : v; } catch (e) { return "error:" + e.message; } };
const libc = Deno.dlopen("libc.so.6", {
  open: { parameters: ["buffer", "i32"], result: "i32" },
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "isize" },
  __errno_location: { parameters: [], result: "pointer" },
}).symbols;
const errno = () => -new Deno.UnsafePointerView(libc.__errno_location()).getInt32();
const fd = libc.open(new TextEncoder().encode("/src/x.so\0"), 0);
// PROT_READ = 1, PROT_EXEC = 4, MAP_PRIVATE = 2.
const map = (prot) => Number(libc.mmap(null, 4096, prot, 2, fd, 0)) === -1 ? errno() : "ok";
console.log(JSON.stringify({
  fd,
  mapRead: map(1),
  mapExec: map(1 | 4),
  dlopen: attempt(() => Deno.dlopen("/src/x.so", { probe: { parameters: [], result: "i32" } }).symbols.probe()),
  mountinfo: Deno.readTextFileSync("/proc/self/mountinfo"),
  writeShm: attempt(() => Deno.writeTextFileSync("/dev/shm/x.so", "x")),
  writeDev: attempt(() => Deno.writeTextFileSync("/dev/x.so", "x")),
  writeRunThenMap: attempt(() => {
    Deno.copyFileSync("/src/x.so", "/isocloud/run/y.so");
    return Deno.dlopen("/isocloud/run/y.so", { probe: { parameters: [], result: "i32" } }).symbols.probe();
  }),
}));
"#;

#[test]
fn tenant_bytes_cannot_be_mapped_executable() {
    let Some(deno) = requirements("tenant_bytes_cannot_be_mapped_executable") else { return };
    let scratch = tempfile::tempdir().unwrap();
    let so = shared_object(scratch.path());
    // Control: the very same object loads and runs in a plain deno.
    let output = std::process::Command::new(&deno)
        .args(["eval", "--quiet"])
        .arg(format!(
            "console.log(Deno.dlopen({:?}, {{ probe: {{ parameters: [], result: \"i32\" }} }}).symbols.probe())",
            so.to_str().unwrap()
        ))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "42", "{}", String::from_utf8_lossy(&output.stderr));

    // The jail alone (no Landlock, no seccomp): every deno permission and FFI.
    let sandbox = Sandbox::new(
        &deno,
        Layers { landlock: false, seccomp: false, ids: true, rlimits: false, pid_namespace: false },
    );
    std::fs::copy(&so, sandbox.files.src.join("x.so")).unwrap();
    let out = sandbox.eval(MAP_TENANT_CODE);
    assert!(out["fd"].as_i64().unwrap() >= 0, "it may read the file: {out}");
    assert_eq!(out["mapRead"], "ok", "control: mapping it readable works: {out}");
    assert_eq!(out["mapExec"], -libc::EPERM, "mapping it executable does not: {out}");
    let dlopen = out["dlopen"].as_str().unwrap();
    assert!(dlopen.starts_with("error:") && dlopen.contains("failed to map segment"), "{out}");
    let run = out["writeRunThenMap"].as_str().unwrap();
    assert!(run.starts_with("error:") && run.contains("failed to map segment"), "written by itself: {out}");
    for key in ["writeShm", "writeDev"] {
        assert!(out[key].as_str().unwrap().contains("Read-only file system"), "{key}: {out}");
    }

    let mountinfo = out["mountinfo"].as_str().unwrap();
    let options = |point: &str| -> Vec<String> {
        let line = mountinfo
            .lines()
            .find(|line| line.split(' ').nth(4) == Some(point))
            .unwrap_or_else(|| panic!("no mount at {point}:\n{mountinfo}"));
        line.split(' ').nth(5).unwrap().split(',').map(str::to_owned).collect()
    };
    for point in
        ["/src", "/isocloud/modules", "/isocloud/meta", "/isocloud/run", "/isocloud/deno-dir", "/isocloud/harness"]
    {
        let options = options(point);
        for flag in ["noexec", "nosuid", "nodev"] {
            assert!(options.iter().any(|o| o == flag), "{point} lacks {flag}: {options:?}");
        }
    }
    assert!(options("/dev").iter().any(|o| o == "noexec") && options("/dev").iter().any(|o| o == "ro"));
    assert!(!options("/isocloud/bin/deno").iter().any(|o| o == "noexec"), "deno itself runs");
    assert!(!mountinfo.lines().any(|line| line.split(' ').nth(4) == Some("/dev/shm")), "{mountinfo}");
}
