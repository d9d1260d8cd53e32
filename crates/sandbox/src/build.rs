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
    /// Give it its own mount namespace and root ([`BuildRoot`]).
    pub mount_namespace: bool,
    /// Landlock's [`crate::landlock::BUILD_RULES`]: deno, the system, its
    /// work copy and cache — the layer that also holds without a root.
    pub landlock: Option<crate::LandlockPolicy>,
    /// A memory cgroup of its own per build, capped (`None`: no usable
    /// memory controller; the wall-clock bound still holds).
    pub memory: Option<BuildMemory>,
}

/// Names builds' cgroups apart (the folder is this runner's alone).
static NEXT_BUILD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where builds' memory cgroups go and their cap.
#[derive(Debug, Clone)]
pub struct BuildMemory {
    pub cgroups: std::sync::Arc<crate::Cgroups>,
    pub limit_bytes: u64,
}

/// Where a jailed build step finds its files: deno runs as
/// [`BuildRoot::DENO`], in [`BuildRoot::SRC`] (its working directory),
/// with its download cache at [`BuildRoot::CACHE`].
#[derive(Debug, Clone)]
pub struct BuildRoot {
    /// An empty folder the root's mount points are made in.
    pub root: std::path::PathBuf,
    pub deno: std::path::PathBuf,
    pub src: std::path::PathBuf,
    pub cache: std::path::PathBuf,
}

impl BuildRoot {
    pub const DENO: &str = crate::files::jail::DENO;
    pub const SRC: &str = crate::files::jail::SRC;
    pub const CACHE: &str = crate::files::jail::DENO_DIR;
}

impl BuildConfinement {
    /// Everything this process can give a build: as root, uid and gid 65534
    /// (nobody: a build runs no tenant code, only deno's own, so the
    /// isolates' per-isolate range is not needed), the seccomp denylist and
    /// a PID namespace.
    pub fn available(deno: &std::path::Path) -> Self {
        let root = crate::identity::runner_is_root();
        let deno_free = std::path::Path::new("/bin/true");
        Self {
            ids: root.then_some(IsolateIds { uid: 65534, gid: 65534 }),
            seccomp: SeccompFilters::compile().ok(),
            pid_namespace: root && crate::pidns::probe().is_ok(),
            mount_namespace: root && crate::probe_mount_namespace(deno_free).is_ok(),
            landlock: crate::LandlockPolicy::new(deno).ok(),
            memory: None,
        }
    }

    /// Starts `command` (deno, set up by the caller: arguments, a cleared
    /// environment, its work folder) under this confinement, in a process
    /// group of its own that `kill_on_drop` and [`crate::signal_process_group`]
    /// reach.
    /// `paths`: its files on the host. With
    /// [`BuildConfinement::mount_namespace`] it enters a root of its own
    /// made there (the command then names deno and its files by their
    /// [`BuildRoot`] paths, and has no working directory of its own: the
    /// jail's is `/src`).
    /// The build's memory cgroup comes back beside the child: keep it until
    /// the child has been waited for ([`crate::IsolateCgroup::oom_killed`]
    /// says whether the cap ended it).
    pub fn spawn(
        &self,
        mut command: tokio::process::Command,
        paths: &BuildRoot,
    ) -> io::Result<(tokio::process::Child, Option<crate::IsolateCgroup>)> {
        let jail = if self.mount_namespace {
            crate::files::make_mount_points(&paths.root)?;
            Some(crate::jail::Jail::for_build(&paths.root, &paths.deno, &paths.src, &paths.cache, self.pid_namespace))
        } else {
            None
        };
        let landlock = match &self.landlock {
            Some(policy) => {
                Some(policy.prepare_build(&paths.deno, &paths.src, &paths.cache).map_err(io::Error::other)?)
            }
            None => None,
        };
        let cgroup = match &self.memory {
            Some(memory) => Some(memory.cgroups.create(
                &format!("build-{}", NEXT_BUILD.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
                memory.limit_bytes,
            )?),
            None => None,
        };
        let cgroup_procs = cgroup.as_ref().map(crate::IsolateCgroup::procs_file).transpose()?;
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
                if let Some(procs) = &cgroup_procs {
                    crate::confine::join_cgroup(procs)?;
                }
                // In its own PID namespace the parent is pid 0 to it.
                if !pid_namespace && libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                if let Some(jail) = &jail {
                    jail.enter()?;
                }
                if let Some(ids) = ids {
                    crate::confine::become_ids(ids)?;
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(landlock) = &landlock {
                    landlock.allow_proc_self()?;
                }
                // After the last open: the child holds the runner's
                // descriptors until exec (see `Confinement::enter`).
                crate::rlimits::apply()?;
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(landlock) = &landlock {
                    landlock.restrict_self()?;
                }
                if let Some(seccomp) = &seccomp {
                    seccomp.install()?;
                }
                Ok(())
            });
        }
        let child = if self.pid_namespace {
            let namespace = crate::pidns::ChildrenInNewPidNamespace::enter()?;
            let child = command.spawn();
            namespace.leave()?;
            child
        } else {
            command.spawn()
        }?;
        Ok((child, cgroup))
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn deno() -> Option<PathBuf> {
        let deno = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.isocloud/deno/bin/deno");
        if !crate::identity::runner_is_root() || !deno.is_file() {
            assert!(std::env::var_os("CI").is_none(), "CI runs this as root with the pinned deno");
            return None;
        }
        Some(deno.canonicalize().unwrap())
    }

    /// Runs `deno eval SCRIPT` under `confinement` in a fresh work copy;
    /// its stdout.
    fn eval(confinement: &BuildConfinement, deno: &Path, work: &Path, script: &str) -> String {
        eval_in_cgroup(confinement, deno, work, script).0
    }

    /// [`eval`], and whether its memory cgroup's cap ended it.
    fn eval_in_cgroup(confinement: &BuildConfinement, deno: &Path, work: &Path, script: &str) -> (String, bool) {
        let paths = BuildRoot {
            root: work.join("root"),
            deno: deno.to_owned(),
            src: work.join("src"),
            cache: work.join("cache"),
        };
        for dir in [&paths.src, &paths.cache] {
            std::fs::create_dir_all(dir).unwrap();
            std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
        }
        crate::identity::allow_traversal(work).unwrap();
        let mut command = tokio::process::Command::new(deno);
        command
            .args(["eval", "--quiet", script])
            .current_dir(&paths.src)
            .env_clear()
            .env("DENO_DIR", &paths.cache)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (child, cgroup) = confinement.spawn(command, &paths).unwrap();
            let output = child.wait_with_output().await.unwrap();
            let oom_killed = cgroup.is_some_and(|cgroup| cgroup.oom_killed());
            (String::from_utf8_lossy(&output.stdout).trim().to_owned(), oom_killed)
        })
    }

    #[test]
    fn without_its_root_landlock_still_keeps_a_build_to_its_work_copy() {
        let Some(deno) = deno() else { return };
        let outside = tempfile::tempdir().unwrap();
        let planted = outside.path().join("planted.txt");
        std::fs::write(&planted, "host secret").unwrap();
        crate::identity::allow_traversal(outside.path()).unwrap();
        let script = format!(
            "let read; try {{ read = Deno.readTextFileSync({planted:?}); }} catch (e) {{ read = e.name; }} \
             Deno.writeTextFileSync('own.txt', 'x'); console.log(read + ' ' + Deno.readTextFileSync('own.txt'));"
        );
        let nobody = Some(IsolateIds { uid: 65534, gid: 65534 });
        // The probe: as nobody, without Landlock, the file is read.
        let plain = BuildConfinement { ids: nobody, ..BuildConfinement::default() };
        let work = tempfile::tempdir().unwrap();
        assert_eq!(eval(&plain, &deno, work.path(), &script), "host secret x");
        // With Landlock's build rules: denied; its own work copy is writable.
        let landlock = crate::LandlockPolicy::new(&deno).expect("this kernel has Landlock");
        let confined = BuildConfinement { ids: nobody, landlock: Some(landlock), ..BuildConfinement::default() };
        let work = tempfile::tempdir().unwrap();
        assert_eq!(eval(&confined, &deno, work.path(), &script), "PermissionDenied x");
    }

    #[test]
    fn a_build_lives_in_a_memory_cgroup_of_its_own() {
        let Some(deno) = deno() else { return };
        let cgroups = std::sync::Arc::new(
            crate::Cgroups::detect(&format!("isocloud-build-test-{}", std::process::id())).expect("a memory cgroup"),
        );
        // 256 MiB outside V8's heap: only the cgroup sees it.
        let script = "const b = new Uint8Array(256 << 20); b.fill(1); console.log('allocated ' + b[b.length - 1]);";
        // The probe: without a cap, the allocation succeeds.
        let work = tempfile::tempdir().unwrap();
        assert_eq!(
            eval_in_cgroup(&BuildConfinement::default(), &deno, work.path(), script),
            ("allocated 1".into(), false)
        );
        let capped = BuildConfinement {
            memory: Some(BuildMemory { cgroups: cgroups.clone(), limit_bytes: 128 << 20 }),
            ..BuildConfinement::default()
        };
        let work = tempfile::tempdir().unwrap();
        assert_eq!(eval_in_cgroup(&capped, &deno, work.path(), script), (String::new(), true));
        assert_eq!(cgroups.isolate_count(), 0, "each build's cgroup goes with it");
    }
}
