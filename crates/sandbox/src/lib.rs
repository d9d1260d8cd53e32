//! How an isolate process is confined, and the only code that may start one.
//!
//! This crate owns the isolate's view of the world: the files it may see
//! (its module graph and lazily-fetched assets under one deployment root,
//! [`IsolateFiles`]), and the command that starts it ([`SandboxedCommand`]):
//! deno's permission flags (read only its own files, write nothing, net per
//! `permissions.net`), an environment of the runner's choosing only (the
//! tenant's envs reach the harness in the bootstrap record, never the exec),
//! its own process group, and death with the runner — and, under them, the
//! operating system's layers ([`SandboxPolicy`]): its own mount namespace and
//! root, the tenant's mounts `noexec` (`jail`), its own PID namespace where it is
//! pid 1 and sees no other process (`pidns`), optionally its own network namespace
//! where only the egress proxy listens (`netns`), rlimits (`rlimits`), its own
//! unprivileged uid, one per live isolate (`identity`, `uids`), `PR_SET_NO_NEW_PRIVS`, Landlock
//! (`landlock`) and a seccomp denylist (`seccomp_policy`), entered in that
//! order between fork and exec (`confine`). Policies are data: each rule,
//! limit and denied syscall sits in one table with its reason.
//!
//! It must not decide *when* an isolate runs (the pool does), talk to an
//! origin, or proxy requests. Unsafe code for process control lives here and
//! nowhere else.

// The confinement crate: 12 of its 15 modules make raw system calls (fork and
// exec hooks, namespaces, rlimits, Landlock, seccomp, uids), so unsafe code is
// allowed crate-wide here rather than module by module; every block still
// carries its `// SAFETY:` (clippy::undocumented_unsafe_blocks).
#![allow(unsafe_code, reason = "process confinement is system calls")]

mod build;
mod cgroup;
mod command;
mod confine;
mod cpu;
mod files;
pub mod identity;
mod jail;
pub mod landlock;
pub mod netns;
pub mod pidns;
pub mod rlimits;
mod seccomp;
pub mod seccomp_policy;
pub mod uids;

pub use build::{BuildConfinement, BuildMemory, BuildRoot};
pub use cgroup::{CgroupVersion, Cgroups, IsolateCgroup, ResidentMemory};
pub use command::{
    ProbeError, SandboxPolicy, SandboxedCommand, probe_mount_namespace, probe_sandbox, signal_process_group,
};
pub use cpu::{CpuClock, process_cpu_time};
pub use files::{
    EgressRoute, GuestPaths, IsolateFiles, PACKAGE_DIRS, PROJECT_CONFIG_FILES, Project, SandboxError,
    deno_template_dir, is_package_path, package_set_key, prune_deno_dirs,
};
pub use identity::{IsolateIds, IsolateUids};
pub use landlock::{LandlockError, LandlockPolicy};
pub use libc::{SIGKILL, SIGTERM};
pub use seccomp::{SeccompError, SeccompFilters};
pub use uids::{UidError, UidPool, UidRange};

/// The harness every isolate runs first, embedded so a runner binary is
/// self-contained.
pub const HARNESS_JS: &str = include_str!("../../../harness/harness.js");
pub const SYNC_WORKER_JS: &str = include_str!("../../../harness/sync_worker.js");

/// Writes the harness into `dir` (content-addressed, so runners of different
/// versions sharing a state dir never see each other's harness).
pub fn install_harness(state_dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(HARNESS_JS);
    hasher.update(SYNC_WORKER_JS);
    let dir = state_dir.join("harness").join(&hex::encode(hasher.finalize())[..16]);
    std::fs::create_dir_all(&dir)?;
    // Isolates of another uid read it, whatever the runner's umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = |bits| std::fs::Permissions::from_mode(bits);
    for parent in [state_dir.join("harness"), dir.clone()] {
        std::fs::set_permissions(parent, mode(0o755))?;
    }
    for (name, text) in [("harness.js", HARNESS_JS), ("sync_worker.js", SYNC_WORKER_JS)] {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)?;
        }
        std::fs::set_permissions(&path, mode(0o644))?;
    }
    Ok(dir)
}
