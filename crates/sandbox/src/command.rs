//! The command line, environment and process attributes of an isolate.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use isocloud_protocol::{IsolateConfig, NetPermission};

use crate::confine::Confinement;
use crate::uids::{UidError, UidLease};
use crate::{EgressRoute, IsolateFiles, IsolateIds, IsolateUids, LandlockError, LandlockPolicy, SeccompFilters};

/// What the operator decided for every isolate of this runner.
#[derive(Debug, Clone)]
pub struct SandboxPolicy {
    pub deno: PathBuf,
    /// Where `harness.js` lives (see [`crate::install_harness`]).
    pub harness_dir: PathBuf,
    /// The root of deno's caches (transpiled modules, V8 code cache): each
    /// deployment gets its own folder below it ([`IsolateFiles::deno_dir`]).
    pub deno_dir: PathBuf,
    /// V8's old-space bound; `None` leaves deno's default.
    pub v8_heap_limit_mb: Option<u64>,
    /// Give each isolate its own mount namespace and root (`/src` is the
    /// deployment, no host path shows). Needs CAP_SYS_ADMIN (a root runner).
    pub mount_namespace: bool,
    /// Give each isolate its own network namespace, where only the egress
    /// proxy listens ([`crate::netns`]): raw TCP cannot leave. Needs
    /// CAP_SYS_ADMIN (a root runner).
    pub network_namespace: bool,
    /// Who isolates run as (needs a root runner): a uid of its own each,
    /// or one shared; `None` keeps the runner's own.
    pub isolate_uids: Option<IsolateUids>,
    /// Landlock's file system rules ([`crate::landlock::RULES`]); `None`: off.
    pub landlock: Option<LandlockPolicy>,
    /// The compiled seccomp denylist ([`crate::seccomp_policy::DENYLIST`]);
    /// `None`: off.
    pub seccomp: Option<SeccompFilters>,
    /// Make each isolate pid 1 of its own PID namespace ([`crate::pidns`]):
    /// it sees no other process. Needs CAP_SYS_ADMIN (a root runner); with
    /// the mount namespace its `/proc` is that namespace's alone.
    pub pid_namespace: bool,
    /// Apply [`crate::rlimits::RLIMITS`].
    pub rlimits: bool,
}

impl SandboxPolicy {
    /// Every layer, for the start-up line: `mount-namespace=on pid-namespace=on landlock=on
    /// seccomp=on no-new-privs=on uid=1900000000-1900099999 gid=65534
    /// rlimits=on netns=off` (a range: a uid per isolate; one number: shared).
    pub fn summary(&self) -> String {
        let on = |yes: bool| if yes { "on" } else { "off" };
        let (uid, gid) = match &self.isolate_uids {
            Some(uids) => (uids.uid_summary(), uids.gid().to_string()),
            None => ("off".to_owned(), "off".to_owned()),
        };
        format!(
            "mount-namespace={} pid-namespace={} landlock={} seccomp={} no-new-privs=on uid={uid} gid={gid} rlimits={} netns={}",
            on(self.mount_namespace),
            on(self.pid_namespace),
            on(self.landlock.is_some()),
            on(self.seccomp.is_some()),
            on(self.rlimits),
            on(self.network_namespace),
        )
    }
}

/// A ready-to-spawn isolate process. The only way to start one is
/// [`SandboxedCommand::spawn`], so every isolate gets the same confinement.
pub struct SandboxedCommand {
    command: tokio::process::Command,
    args: Vec<String>,
    /// The planned confinement, entered by the child in `spawn`; planning
    /// failed: [`SandboxedCommand::spawn`] says so instead of starting an
    /// unconfined process.
    confinement: Result<Confinement, LandlockError>,
    /// The runner binds the control socket before the spawn; the isolate's
    /// uid must be able to connect to it.
    control: PathBuf,
    ids: Option<IsolateIds>,
    /// The isolate's own uid: learns the process it runs, so the uid is not
    /// given back before that process exits.
    uid_lease: Option<Arc<UidLease>>,
    network_namespace: bool,
    pid_namespace: bool,
}

impl SandboxedCommand {
    /// `egress`: route the isolate's outbound HTTP(S) through the runner's
    /// egress proxy (its address joins `--allow-net`, since deno checks the
    /// proxy too when the harness probes it).
    /// The tenant's envs (`config.envs()`) are not passed: they are in the
    /// bootstrap record ([`IsolateFiles::prepare`]), for the harness.
    pub fn new(
        policy: &SandboxPolicy,
        files: &IsolateFiles,
        config: &IsolateConfig,
        egress: Option<&EgressRoute>,
    ) -> Self {
        Self::build(policy, files, config.net(), egress)
    }

    /// An isolate started before it has a deployment
    /// ([`IsolateFiles::prepare_blank`]): `net` is fixed now (deno's
    /// permissions cannot grow later), the tenant's environment comes with
    /// its assignment.
    pub fn blank(
        policy: &SandboxPolicy,
        files: &IsolateFiles,
        net: &NetPermission,
        egress: Option<&EgressRoute>,
    ) -> Self {
        Self::build(policy, files, net, egress)
    }

    fn build(policy: &SandboxPolicy, files: &IsolateFiles, net: &NetPermission, egress: Option<&EgressRoute>) -> Self {
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
        let mut unix = vec![format!("unix:{socket}"), format!("unix:{control}")];
        if let Some(route) = egress {
            unix.push(route.proxy_authority.clone());
        }
        let net = match net {
            NetPermission::All => "--allow-net".to_owned(),
            NetPermission::None => format!("--allow-net={}", unix.join(",")),
            NetPermission::Allow(hosts) => {
                format!("--allow-net={},{}", hosts.join(","), unix.join(","))
            }
        };
        let mut args = vec!["run".to_owned()];
        match &files.project {
            // A built deployment: deno reads its deno.json, node_modules and
            // vendor from /src, from disk only (never the network).
            Some(project) => {
                match &project.config {
                    Some(config) => args.push(format!("--config={config}")),
                    None => {
                        args.push("--no-config".to_owned());
                        args.push(format!("--import-map={}", guest.import_map));
                    }
                }
                args.push("--cached-only".to_owned());
                if project.node_modules {
                    args.push("--node-modules-dir=manual".to_owned());
                } else {
                    args.push("--no-npm".to_owned());
                }
                if project.vendor {
                    args.push("--vendor".to_owned());
                }
            }
            None => args.extend([
                "--no-config".to_owned(),
                "--no-remote".to_owned(),
                "--no-npm".to_owned(),
                format!("--import-map={}", guest.import_map),
            ]),
        }
        let mut readable = readable.to_vec();
        if files.root.is_none()
            && let Some(packages) = files.project.as_ref().and_then(|p| p.packages.as_ref())
        {
            // Without its own root, /src/node_modules is a link into the store.
            readable.push(packages.to_string_lossy().into_owned());
        }
        args.extend([
            "--no-lock".to_owned(),
            "--no-prompt".to_owned(),
            "--quiet".to_owned(),
            format!("--allow-read={}", readable.join(",")),
            format!("--allow-write={socket},{control}"),
            net,
            // The harness replaces the runner's environment with the
            // tenant's envs, and the tenant may change its own.
            "--allow-env".to_owned(),
        ]);
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
            .envs(runner_env(&guest.deno_dir, egress))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so a kill reaches whatever it started.
            .process_group(0);
        // Everything that allocates or opens files happens here, before the
        // fork; the child only enters what was planned (see `confine`).
        let confinement = Confinement::plan(policy, Some(files), files.ids);
        Self {
            command,
            args,
            confinement,
            control: files.control.clone(),
            ids: files.ids,
            uid_lease: files.uid_lease().cloned(),
            network_namespace: policy.network_namespace,
            pid_namespace: policy.pid_namespace,
        }
    }

    /// The arguments deno is started with, for logs and tests.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Whether the isolate gets its own network namespace: then the runner
    /// must put the egress proxy's listener in it ([`crate::netns::listen_inside`]).
    pub fn network_namespace(&self) -> bool {
        self.network_namespace
    }

    /// The child joins this memory cgroup (`cgroup.procs` of an
    /// [`crate::IsolateCgroup`], open for writing) before it execs deno, so
    /// deno's start-up is charged to the isolate too.
    pub fn join_cgroup(&mut self, procs: std::os::fd::OwnedFd) {
        if let Ok(confinement) = &mut self.confinement {
            confinement.cgroup_procs = Some(procs);
        }
    }

    pub fn spawn(mut self) -> std::io::Result<tokio::process::Child> {
        let confinement = self.confinement.map_err(std::io::Error::other)?;
        // SAFETY: the hook runs in the child between fork and exec and makes
        // only async-signal-safe syscalls on values prepared before the fork:
        // no allocation, no locks (see `Confinement::enter`).
        unsafe {
            self.command.pre_exec(confinement.into_hook());
        }
        if let Some(ids) = self.ids {
            match std::os::unix::fs::lchown(&self.control, Some(ids.uid), Some(ids.gid)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let child = if self.pid_namespace {
            // Bracketed on this thread, with nothing in between but the fork.
            let namespace = crate::pidns::ChildrenInNewPidNamespace::enter()?;
            let child = self.command.spawn();
            namespace.leave()?;
            child?
        } else {
            self.command.spawn()?
        };
        if let (Some(lease), Some(pid)) = (&self.uid_lease, child.id()) {
            lease.track(pid);
        }
        Ok(child)
    }
}

/// The whole environment deno starts with, of the runner's choosing: the
/// dynamic loader, the C library, V8 and deno read theirs at exec and
/// start-up, so no tenant value may be there (the harness installs the
/// tenant's envs before tenant code runs, and removes these).
fn runner_env(deno_dir: &str, egress: Option<&EgressRoute>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        // The deployment's own cache (V8 code cache), not one under $HOME.
        ("DENO_DIR", deno_dir.to_owned()),
        // deno never calls home from an isolate.
        ("DENO_NO_UPDATE_CHECK", "1".to_owned()),
        // Plain text in what deno itself writes to stderr (the runner logs it).
        ("NO_COLOR", "1".to_owned()),
    ];
    if let Some(route) = egress {
        // deno reads these when it builds its HTTP client, on the harness's
        // probe: every outbound call then goes through the egress proxy.
        env.extend([("HTTP_PROXY", route.proxy_url.clone()), ("HTTPS_PROXY", route.proxy_url.clone())]);
    }
    env
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

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    #[error(transparent)]
    Uid(#[from] UidError),
    #[error(
        "cannot start {} under the sandbox: {error}{stderr} (with --mount-namespace off, the isolate uid must be \
         able to reach it by that path)",
        deno.display()
    )]
    Spawn { deno: PathBuf, error: std::io::Error, stderr: String },
    #[error("`deno --version` under the sandbox exited with {status}{stderr}")]
    Exit { status: std::process::ExitStatus, stderr: String },
}

/// Runs `deno --version` under every layer of `policy` but the mount
/// namespace (see [`probe_mount_namespace`]): a kernel or a file layout the
/// policy does not fit (deno unreachable for the isolate uid, a filter that
/// breaks deno's start) fails here, at start-up, not at the first request.
pub fn probe_sandbox(policy: &SandboxPolicy) -> Result<(), ProbeError> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let spawn_error =
        |error: std::io::Error| ProbeError::Spawn { deno: policy.deno.clone(), error, stderr: String::new() };
    let (mut reader, writer) = std::io::pipe().map_err(spawn_error)?;
    // In its jail an isolate reaches deno at /isocloud/bin/deno, whatever the
    // host path's folders allow its uid; the probe runs without a jail, so it
    // starts deno through a descriptor the runner opened, not the host path.
    let deno_file = std::fs::File::open(&policy.deno).map_err(spawn_error)?;
    let program = if policy.mount_namespace {
        use std::os::fd::AsRawFd;
        let fd = deno_file.as_raw_fd();
        // SAFETY: clears FD_CLOEXEC on a descriptor this function owns, so
        // the child inherits it; it is closed when `deno_file` drops.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(spawn_error(std::io::Error::last_os_error()));
        }
        PathBuf::from(format!("/proc/self/fd/{fd}"))
    } else {
        policy.deno.clone()
    };
    let mut command = std::process::Command::new(&program);
    command.arg("--version").env_clear().env("NO_COLOR", "1").stdin(Stdio::null()).stdout(Stdio::null());
    command.stderr(writer);
    // A uid like an isolate's (its own, held until `status` has reaped it).
    let (ids, _lease) = match &policy.isolate_uids {
        Some(uids) => {
            let (ids, lease) = uids.take()?;
            (Some(ids), lease)
        }
        None => (None, None),
    };
    let confinement = Confinement::plan(policy, None, ids)?;
    // SAFETY: as in `SandboxedCommand::new`: the hook only makes
    // async-signal-safe syscalls on values prepared before the fork.
    unsafe {
        command.pre_exec(confinement.into_hook());
    }
    let status = if policy.pid_namespace {
        crate::pidns::ChildrenInNewPidNamespace::enter().and_then(|namespace| {
            let status = command.status();
            namespace.leave()?;
            status
        })
    } else {
        command.status()
    };
    // The command holds the pipe's write end: drop it so the read ends.
    drop(command);
    drop(deno_file);
    let mut stderr = String::new();
    let _ = reader.read_to_string(&mut stderr);
    let stderr = if stderr.trim().is_empty() { String::new() } else { format!(" ({})", stderr.trim()) };
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(ProbeError::Exit { status, stderr }),
        Err(error) => Err(ProbeError::Spawn { deno: policy.deno.clone(), error, stderr }),
    }
}

#[cfg(test)]
mod tests;
