//! The command line, environment and process attributes of an isolate.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use isocloud_protocol::{IsolateConfig, NetPermission};

use crate::IsolateFiles;
use crate::files::RUNNER_ENV;

/// What the operator decided for every isolate of this runner.
#[derive(Debug, Clone)]
pub struct SandboxPolicy {
    pub deno: PathBuf,
    /// Where `harness.js` lives (see [`crate::install_harness`]).
    pub harness_dir: PathBuf,
    /// deno's own cache (transpiled modules, V8 code cache).
    pub deno_dir: PathBuf,
    /// V8's old-space bound; `None` leaves deno's default.
    pub v8_heap_limit_mb: Option<u64>,
    /// Give each isolate its own mount namespace and root (`/src` is the
    /// deployment, no host path shows). Needs CAP_SYS_ADMIN (a root runner).
    pub mount_namespace: bool,
}

/// A ready-to-spawn isolate process. The only way to start one is
/// [`SandboxedCommand::spawn`], so every isolate gets the same confinement.
pub struct SandboxedCommand {
    command: tokio::process::Command,
    args: Vec<String>,
}

impl SandboxedCommand {
    pub fn new(policy: &SandboxPolicy, files: &IsolateFiles, config: &IsolateConfig) -> Self {
        let guest = &files.guest;
        let socket = guest.socket.clone();
        let control = guest.control.clone();
        let readable = [
            guest.src.clone(),
            guest.modules.clone(),
            guest.harness_dir.clone(),
            guest.bootstrap.clone(),
            guest.tree.clone(),
            socket.clone(),
            control.clone(),
        ];
        // Unix sockets need read, write and `net unix:` permission in deno 2.9;
        // the tenant may write nowhere else.
        let unix = [format!("unix:{socket}"), format!("unix:{control}")];
        let net = match &config.net {
            NetPermission::All => "--allow-net".to_owned(),
            NetPermission::None => format!("--allow-net={}", unix.join(",")),
            NetPermission::Allow(hosts) => {
                format!("--allow-net={},{}", hosts.join(","), unix.join(","))
            }
        };
        let mut args = vec![
            "run".to_owned(),
            "--no-config".to_owned(),
            "--no-lock".to_owned(),
            "--no-prompt".to_owned(),
            "--no-remote".to_owned(),
            "--no-npm".to_owned(),
            "--quiet".to_owned(),
            format!("--import-map={}", guest.import_map),
            format!("--allow-read={}", readable.join(",")),
            format!("--allow-write={socket},{control}"),
            net,
            // The process environment is exactly the configured envs plus
            // RUNNER_ENV, which the harness deletes before tenant code runs.
            "--allow-env".to_owned(),
        ];
        if let Some(mb) = policy.v8_heap_limit_mb {
            args.push(format!("--v8-flags=--max-old-space-size={mb}"));
        }
        args.push(format!("{}/harness.js", guest.harness_dir));
        args.push(guest.bootstrap.clone());

        let mut command = tokio::process::Command::new(&guest.deno);
        command
            .args(&args)
            .current_dir(&files.src)
            .env_clear()
            .envs(&config.envs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so a kill reaches whatever it started.
            .process_group(0);
        for (name, value) in
            [(RUNNER_ENV[0], guest.deno_dir.clone()), (RUNNER_ENV[1], "1".to_owned()), (RUNNER_ENV[2], "1".to_owned())]
        {
            if !config.envs.contains_key(name) {
                command.env(name, value);
            }
        }
        let jail = files.root.as_ref().map(|root| Jail::plan(root, policy, files));
        // SAFETY: getpid has no preconditions.
        let runner_pid = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed: prctl, getppid and the
        // jail's mount/unshare/pivot_root/chdir are plain syscalls on strings
        // prepared before the fork; nothing allocates or takes a lock.
        unsafe {
            command.pre_exec(move || {
                // Die with the runner, even when it is SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The runner may have died between fork and prctl (then the
                // child was re-parented; comparing with 1 would break a runner
                // that is itself pid 1 in a container).
                if libc::getppid() != runner_pid {
                    return Err(std::io::Error::other("runner exited during spawn"));
                }
                if let Some(jail) = &jail {
                    jail.enter()?;
                }
                Ok(())
            });
        }
        Self { command, args }
    }

    /// The arguments deno is started with, for logs and tests.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn spawn(mut self) -> std::io::Result<tokio::process::Child> {
        self.command.spawn()
    }
}

/// Signals the whole process group of an isolate started by
/// [`SandboxedCommand::spawn`] (its leader's pid is the group id).
pub fn signal_process_group(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return Err(std::io::Error::other("pid out of range"));
    };
    if pgid <= 1 {
        return Err(std::io::Error::other("refusing to signal init or every process"));
    }
    // SAFETY: kill has no memory-safety preconditions; a negative pid names
    // the process group, and pgid > 1 was checked so this cannot hit init or
    // "every process" (-1).
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The mounts of an isolate's own root, as C strings made before the fork.
struct Jail {
    root: CString,
    /// (source, target inside `root`, recursive, read-only)
    binds: Vec<(CString, CString, bool, bool)>,
    src: CString,
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("isolate paths hold no NUL")
}

impl Jail {
    fn plan(root: &Path, policy: &SandboxPolicy, files: &IsolateFiles) -> Self {
        use crate::files::jail;
        let inside = |guest: &str| cstring(&root.join(&guest[1..]));
        let mut binds = Vec::new();
        for dir in jail::SHARED_DIRS {
            binds.push((cstring(Path::new(dir)), inside(dir), true, true));
        }
        for name in jail::USR_LINKS {
            let host = Path::new("/").join(name);
            if std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
                binds.push((cstring(&host), cstring(&root.join(name)), true, true));
            }
        }
        binds.extend([
            (cstring(Path::new("/dev")), inside("/dev"), true, false),
            (cstring(Path::new("/proc")), inside("/proc"), true, false),
            (cstring(&policy.deno), inside(jail::DENO), false, true),
            (cstring(&policy.harness_dir), inside(jail::HARNESS), false, true),
            (cstring(&policy.deno_dir), inside(jail::DENO_DIR), false, false),
            (cstring(&files.src), inside(jail::SRC), false, true),
            (cstring(&files.modules), inside(jail::MODULES), false, true),
            (cstring(&files.meta), inside(jail::META), false, true),
            (cstring(&files.run), inside(jail::RUN), false, false),
        ]);
        Self { root: cstring(root), binds, src: CString::new(jail::SRC).expect("no NUL") }
    }

    /// In the child: a private mount namespace whose root holds only the
    /// planned binds, then `/src` as the working directory.
    fn enter(&self) -> std::io::Result<()> {
        fn check(rc: libc::c_int) -> std::io::Result<()> {
            if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        }
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string owned by `self`,
        // which outlives these calls; null is allowed for unused arguments.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done here may propagate back to the host's mounts.
            check(libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            check(libc::mount(self.root.as_ptr(), self.root.as_ptr(), none, libc::MS_BIND, std::ptr::null()))?;
            for (source, target, recursive, read_only) in &self.binds {
                let mut flags = libc::MS_BIND;
                if *recursive {
                    flags |= libc::MS_REC;
                }
                check(libc::mount(source.as_ptr(), target.as_ptr(), none, flags, std::ptr::null()))?;
                if *read_only {
                    let remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
                    check(libc::mount(none, target.as_ptr(), none, remount, std::ptr::null()))?;
                }
            }
            check(libc::chdir(self.root.as_ptr()))?;
            // pivot_root(".", "."): the old root ends up under the new one and
            // is detached right away, so nothing of the host stays reachable.
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(self.src.as_ptr()))?;
        }
        Ok(())
    }
}

/// Whether this process can give isolates their own mount namespace: runs
/// `deno --version` in a fresh, private one.
pub fn probe_mount_namespace(deno: &Path) -> std::io::Result<()> {
    let mut command = std::process::Command::new(deno);
    command.arg("--version").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec, only the unshare and mount syscalls run,
    // on static strings.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let none = std::ptr::null::<libc::c_char>();
            if libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = command.status()?;
    if status.success() { Ok(()) } else { Err(std::io::Error::other(format!("deno --version exited with {status}"))) }
}
