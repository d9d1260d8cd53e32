//! The confinement of a build step: the pinned deno resolving and
//! downloading a deployment's module graph (`deno install`) at deploy time.
//!
//! The graph is tenant input, so the step runs like an isolate does, minus
//! what it needs to do its job (write its work folder, reach the
//! registries): its own process group and PID namespace (when the runner may
//! make one), death with its parent, the isolates' rlimits, an unprivileged
//! uid, no new privileges, and the seccomp denylist (no process of its own:
//! npm lifecycle scripts cannot run even if asked). deno itself refuses a
//! remote import of a host outside its allow-list (loopback and private
//! addresses included), so a tenant's `import` is not a way into the
//! control plane's network.

use std::io;

use crate::{IsolateIds, SeccompFilters};

/// Who a build step runs as, and under which filters.
#[derive(Debug, Clone, Default)]
pub struct BuildConfinement {
    /// `None`: the control plane's own uid (a runner that is not root).
    pub ids: Option<IsolateIds>,
    pub seccomp: Option<SeccompFilters>,
    /// Start it as pid 1 of its own PID namespace.
    pub pid_namespace: bool,
}

impl BuildConfinement {
    /// Everything this process can give a build: as root, uid and gid 65534
    /// (nobody: a build runs no tenant code, only deno's own, so the
    /// isolates' per-isolate range is not needed), the seccomp denylist and
    /// a PID namespace.
    pub fn available() -> Self {
        let root = crate::identity::runner_is_root();
        Self {
            ids: root.then_some(IsolateIds { uid: 65534, gid: 65534 }),
            seccomp: SeccompFilters::compile().ok(),
            pid_namespace: root && crate::pidns::probe().is_ok(),
        }
    }

    /// Starts `command` (deno, set up by the caller: arguments, a cleared
    /// environment, its work folder) under this confinement, in a process
    /// group of its own that `kill_on_drop` and [`crate::signal_process_group`]
    /// reach.
    pub fn spawn(&self, mut command: tokio::process::Command) -> io::Result<tokio::process::Child> {
        let ids = self.ids;
        let seccomp = self.seccomp.clone();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let pid_namespace = self.pid_namespace;
        command.process_group(0).kill_on_drop(true);
        // SAFETY: the hook runs between fork and exec and makes only
        // async-signal-safe syscalls on values prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // In its own PID namespace the parent is pid 0 to it.
                if !pid_namespace && libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                crate::rlimits::apply()?;
                if let Some(ids) = ids {
                    crate::confine::become_ids(ids)?;
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(seccomp) = &seccomp {
                    seccomp.install()?;
                }
                Ok(())
            });
        }
        if self.pid_namespace {
            let namespace = crate::pidns::ChildrenInNewPidNamespace::enter()?;
            let child = command.spawn();
            namespace.leave()?;
            child
        } else {
            command.spawn()
        }
    }
}
