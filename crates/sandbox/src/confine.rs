//! Every layer of an isolate's confinement, planned in the runner and
//! entered by the child between fork and exec.
//!
//! The plan ([`Confinement::plan`]) does everything that allocates or reads
//! the file system: the jail's mount strings, the Landlock ruleset (opened
//! paths, created ruleset fd), the compiled seccomp programs. The child
//! ([`Confinement::enter`]) then only makes syscalls on those prepared
//! values — no allocation, no locks — in this order:
//!
//! 0. (in the runner, around the fork) a PID namespace of its own when the
//!    policy asks: the child is its pid 1 (`pidns`);
//! 1. die with the runner (`PR_SET_PDEATHSIG`), and check it is still there;
//!    join the isolate's memory cgroup (its pid into `cgroup.procs`, through
//!    a descriptor the runner opened), so every page deno touches from its
//!    first instruction is charged to the isolate;
//! 2. the jail: own mount namespace and root (needs CAP_SYS_ADMIN, so first),
//!    then its own network namespace when the policy asks (the same);
//! 3. rlimits (while still root: they may be lowered, never raised after);
//! 4. Landlock's `/proc/self` rule (the child's pid exists only now);
//! 5. its own uid: `setgroups([])`, `setresgid`, `setresuid` — this drops
//!    every capability — then the death signal again (a credential change
//!    clears it); with a uid per isolate, `kill(-1, SIGKILL)` as that uid:
//!    whatever an earlier holder of the uid left running dies before this
//!    isolate's deno starts (see `uids`; in a PID namespace there is none:
//!    a namespace's processes die with its pid 1);
//! 6. `PR_SET_NO_NEW_PRIVS` (always; Landlock and seccomp need it);
//! 7. `landlock_restrict_self`;
//! 8. the seccomp filters, last, so nothing above is denied by them.

use crate::jail::Jail;
use crate::landlock::{LandlockError, PreparedRuleset};
use crate::{IsolateFiles, IsolateIds, IsolateUids, SandboxPolicy};

pub(crate) struct Confinement {
    runner_pid: libc::pid_t,
    /// In its own PID namespace the child's parent is pid 0 to it: the
    /// runner's pidfd says whether the runner is still there.
    runner_pidfd: Option<libc::c_int>,
    /// The isolate's `cgroup.procs`, opened for writing by the runner.
    pub(crate) cgroup_procs: Option<std::os::fd::OwnedFd>,
    jail: Option<Jail>,
    network_namespace: bool,
    rlimits: bool,
    landlock: Option<PreparedRuleset>,
    ids: Option<IsolateIds>,
    /// The uid is this isolate's alone: kill what else runs as it.
    sweep_uid: bool,
    seccomp: Option<crate::SeccompFilters>,
}

impl Confinement {
    /// The confinement `policy` asks for. `files`: the isolate's instance
    /// (its jail and Landlock paths); `None` plans the start-up probe, which
    /// runs without a jail. `ids`: who it runs as (the isolate's own,
    /// [`IsolateFiles::ids`]; `None`: the runner's).
    pub(crate) fn plan(
        policy: &SandboxPolicy,
        files: Option<&IsolateFiles>,
        ids: Option<IsolateIds>,
    ) -> Result<Self, LandlockError> {
        let jail = files.and_then(|f| f.root.as_ref().map(|root| Jail::plan(root, policy, f)));
        let landlock = policy.landlock.as_ref().map(|l| l.prepare(policy, files)).transpose()?;
        // Without a pidfd (Linux < 5.3) the check is skipped: the death
        // signal still covers all but a runner dying within the fork.
        let runner_pidfd = if policy.pid_namespace { Some(crate::pidns::runner_pidfd().unwrap_or(-1)) } else { None };
        Ok(Self {
            runner_pidfd,
            // SAFETY: getpid has no preconditions.
            runner_pid: unsafe { libc::getpid() },
            cgroup_procs: None,
            jail,
            network_namespace: policy.network_namespace,
            rlimits: policy.rlimits,
            landlock,
            ids,
            sweep_uid: ids.is_some() && policy.isolate_uids.as_ref().is_some_and(IsolateUids::per_isolate),
            seccomp: policy.seccomp.clone(),
        })
    }

    /// The `pre_exec` hook that enters this confinement.
    pub(crate) fn into_hook(self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        move || self.enter()
    }

    /// In the child, between fork and exec. Each failing step names itself
    /// on the child's stderr (a static string, one `write`) and returns the
    /// errno, which is all std passes back to the runner.
    fn enter(&self) -> std::io::Result<()> {
        self.die_with_runner().map_err(|e| failed(e, "PR_SET_PDEATHSIG"))?;
        if let Some(procs) = &self.cgroup_procs {
            join_cgroup(procs).map_err(|e| failed(e, "joining the memory cgroup"))?;
        }
        if let Some(jail) = &self.jail {
            jail.enter().map_err(|e| failed(e, "the jail (mount namespace, pivot_root)"))?;
        }
        // Only `lo`, down: the runner puts the egress proxy's listener there
        // (`netns::listen_inside`) once the process exists.
        // SAFETY: unshare takes integer flags only.
        if self.network_namespace && unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(failed(std::io::Error::last_os_error(), "unshare(CLONE_NEWNET)"));
        }
        if let Some(landlock) = &self.landlock {
            landlock.allow_proc_self().map_err(|e| failed(e, "landlock_add_rule(/proc/self)"))?;
        }
        // After the last step that opens a descriptor: until exec the child
        // holds the runner's (thousands on a busy runner), so any open past
        // the isolate's RLIMIT_NOFILE would fail with EMFILE.
        if self.rlimits {
            crate::rlimits::apply().map_err(|e| failed(e, "setrlimit"))?;
        }
        if let Some(ids) = self.ids {
            become_ids(ids).map_err(|e| failed(e, "setgroups/setresgid/setresuid"))?;
            self.die_with_runner().map_err(|e| failed(e, "PR_SET_PDEATHSIG after setuid"))?;
            if self.sweep_uid {
                // Every process this uid may signal but this one (Linux
                // spares the caller and init): none, unless an earlier
                // holder left one behind. ESRCH when there is none.
                // SAFETY: kill takes integers only; without capabilities
                // it reaches processes of this uid alone.
                unsafe { libc::kill(-1, libc::SIGKILL) };
            }
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(failed(std::io::Error::last_os_error(), "PR_SET_NO_NEW_PRIVS"));
        }
        if let Some(landlock) = &self.landlock {
            landlock.restrict_self().map_err(|e| failed(e, "landlock_restrict_self"))?;
        }
        if let Some(seccomp) = &self.seccomp {
            seccomp.install().map_err(|e| failed(e, "seccomp"))?;
        }
        Ok(())
    }

    fn die_with_runner(&self) -> std::io::Result<()> {
        // SAFETY: prctl takes integers only.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // The runner may have died before the signal was armed (then the
        // child was re-parented; comparing with 1 would break a runner that
        // is itself pid 1 in a container).
        let runner_gone = match self.runner_pidfd {
            Some(pidfd) => pidfd >= 0 && crate::pidns::has_exited(pidfd),
            // SAFETY: getppid has no preconditions.
            None => (unsafe { libc::getppid() }) != self.runner_pid,
        };
        if runner_gone {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    }
}

/// Writes this process's pid, in decimal, into `cgroup.procs`: formatted
/// on the stack (no allocation between fork and exec).
pub(crate) fn join_cgroup(procs: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: getpid has no preconditions.
    let mut pid = unsafe { libc::getpid() } as u32;
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    let text = &digits[start..];
    // SAFETY: write(2) of a valid stack buffer to a descriptor the runner
    // opened and this process owns until exec (CLOEXEC).
    let written = unsafe { libc::write(procs.as_raw_fd(), text.as_ptr().cast(), text.len()) };
    if written != text.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops supplementary groups, then the gid, then the uid (real, effective
/// and saved: no way back). Raw syscalls: glibc's wrappers go through its
/// all-threads "setxid" machinery, whose state the fork copied from the
/// multi-threaded runner.
pub(crate) fn become_ids(ids: IsolateIds) -> std::io::Result<()> {
    // SAFETY: setgroups with size 0 reads no memory; the id calls take
    // integers only.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresgid, ids.gid, ids.gid, ids.gid) != 0
            || libc::syscall(libc::SYS_setresuid, ids.uid, ids.uid, ids.uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Names the failed step on stderr without allocating, and passes the
/// error on.
fn failed(error: std::io::Error, step: &'static str) -> std::io::Error {
    let parts: [&[u8]; 3] = [b"isocloud sandbox: ", step.as_bytes(), b" failed\n"];
    for part in parts {
        // SAFETY: write(2) on fd 2 from a valid buffer; a short or failed
        // write only loses the diagnostic.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    error
}
