//! The command line, environment and process attributes of an isolate.

use std::path::PathBuf;
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
}

/// A ready-to-spawn isolate process. The only way to start one is
/// [`SandboxedCommand::spawn`], so every isolate gets the same confinement.
pub struct SandboxedCommand {
    command: tokio::process::Command,
    args: Vec<String>,
}

impl SandboxedCommand {
    pub fn new(policy: &SandboxPolicy, files: &IsolateFiles, config: &IsolateConfig) -> Self {
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let socket = path(&files.socket);
        let control = path(&files.control);
        let readable = [
            path(&files.src),
            path(&files.modules),
            path(&policy.harness_dir),
            path(&files.bootstrap),
            path(&files.tree),
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
            format!("--import-map={}", path(&files.import_map)),
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
        args.push(path(&policy.harness_dir.join("harness.js")));
        args.push(path(&files.bootstrap));

        let mut command = tokio::process::Command::new(&policy.deno);
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
            [(RUNNER_ENV[0], path(&policy.deno_dir)), (RUNNER_ENV[1], "1".to_owned()), (RUNNER_ENV[2], "1".to_owned())]
        {
            if !config.envs.contains_key(name) {
                command.env(name, value);
            }
        }
        // SAFETY: the closure runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed; prctl and getppid are
        // plain syscalls that allocate nothing and take no locks.
        unsafe {
            command.pre_exec(|| {
                // Die with the runner, even when it is SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The runner may have died between fork and prctl.
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("runner exited during spawn"));
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
