//! A hard memory cap per isolate that ArrayBuffers cannot escape: each
//! isolate gets its own memory cgroup (v2 or v1, detected at start-up) under
//! one folder of this runner's. Where no memory controller is usable, the
//! supervisor's RSS watch is the fallback.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// This runner's folder of isolate cgroups; removed when dropped.
#[derive(Debug)]
pub struct Cgroups {
    version: CgroupVersion,
    base: PathBuf,
}

/// One isolate's memory cgroup; removed when dropped (after its process).
#[derive(Debug)]
pub struct IsolateCgroup {
    version: CgroupVersion,
    dir: PathBuf,
}

impl Cgroups {
    /// Finds a usable memory controller (v2 first, then v1) and creates this
    /// runner's folder in the runner's own cgroup.
    pub fn detect(runner_name: &str) -> Result<Self, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let mut reasons = Vec::new();
        // v2: "0::/path", with "memory" among the controllers of that folder.
        if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
            let mount = unified_mount();
            let parent = mount.join(path.trim_start_matches('/'));
            match try_v2(&parent, runner_name) {
                Ok(cgroups) => return Ok(cgroups),
                Err(e) => reasons.push(format!("v2: {e}")),
            }
        }
        // v1: "N:memory:/path" (possibly "N:cpu,memory:/path").
        if let Some(path) = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "memory").then_some(path)
        }) {
            let parent = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            let base = parent.join(runner_name);
            match std::fs::create_dir_all(&base) {
                Ok(()) if base.join("memory.limit_in_bytes").exists() => {
                    let cgroups = Self { version: CgroupVersion::V1, base };
                    cgroups.reap_stale_siblings();
                    return Ok(cgroups);
                }
                Ok(()) => reasons.push("v1: no memory.limit_in_bytes".into()),
                Err(e) => reasons.push(format!("v1: {}: {e}", base.display())),
            }
        } else {
            reasons.push("v1: no memory hierarchy".into());
        }
        Err(reasons.join("; "))
    }

    /// Removes the folders of runners that died without cleaning up (a
    /// SIGKILLed runner's isolates died with it, so their cgroups are empty).
    fn reap_stale_siblings(&self) {
        let Some(parent) = self.base.parent() else { return };
        let Ok(entries) = std::fs::read_dir(parent) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("isocloud-")).and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Ok(children) = std::fs::read_dir(entry.path()) {
                for child in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            let _ = std::fs::remove_dir(entry.path());
        }
    }

    /// Isolate cgroups that exist now (for `/metrics`: beside the isolates
    /// alive, a growing gap is a leak).
    pub fn isolate_count(&self) -> usize {
        std::fs::read_dir(&self.base)
            .map(|entries| entries.filter_map(Result::ok).filter(|e| e.path().is_dir()).count())
            .unwrap_or(0)
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// A fresh cgroup capped at `memory_limit_bytes` (swap included where
    /// the kernel accounts it, so the cap cannot be dodged by swapping).
    pub fn create(&self, name: &str, memory_limit_bytes: u64) -> std::io::Result<IsolateCgroup> {
        let dir = self.base.join(name);
        std::fs::create_dir(&dir)?;
        let cgroup = IsolateCgroup { version: self.version, dir };
        let limit = memory_limit_bytes.to_string();
        match self.version {
            CgroupVersion::V2 => {
                std::fs::write(cgroup.dir.join("memory.max"), &limit)?;
                let _ = std::fs::write(cgroup.dir.join("memory.swap.max"), "0");
            }
            CgroupVersion::V1 => {
                std::fs::write(cgroup.dir.join("memory.limit_in_bytes"), &limit)?;
                let _ = std::fs::write(cgroup.dir.join("memory.memsw.limit_in_bytes"), &limit);
            }
        }
        Ok(cgroup)
    }
}

fn unified_mount() -> PathBuf {
    // A pure v2 host mounts it at /sys/fs/cgroup; a hybrid one at .../unified.
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        PathBuf::from("/sys/fs/cgroup/unified")
    }
}

fn try_v2(parent: &Path, runner_name: &str) -> Result<Cgroups, String> {
    let controllers = std::fs::read_to_string(parent.join("cgroup.controllers")).map_err(|e| e.to_string())?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(format!("no memory controller in {}", parent.display()));
    }
    let base = parent.join(runner_name);
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    // Children only get the controller if their parent hands it down.
    if let Err(e) = std::fs::write(base.join("cgroup.subtree_control"), "+memory") {
        let _ = std::fs::remove_dir(&base);
        return Err(format!("cannot enable memory for children of {}: {e}", base.display()));
    }
    let cgroups = Cgroups { version: CgroupVersion::V2, base };
    cgroups.reap_stale_siblings();
    Ok(cgroups)
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.base);
    }
}

impl IsolateCgroup {
    /// `cgroup.procs`, open for writing (close-on-exec): an isolate joins
    /// with it between fork and exec ([`crate::SandboxedCommand::join_cgroup`]).
    pub fn procs_file(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(std::fs::OpenOptions::new().write(true).open(self.dir.join("cgroup.procs"))?.into())
    }

    /// Whether the kernel's OOM killer ended a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let file = match self.version {
            CgroupVersion::V2 => "memory.events",
            CgroupVersion::V1 => "memory.oom_control",
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse::<u64>().ok()))
            })
            .is_some_and(|kills| kills > 0)
    }

    /// The most memory the cgroup held, where the kernel reports it.
    pub fn peak_bytes(&self) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V2 => "memory.peak",
            CgroupVersion::V1 => "memory.max_usage_in_bytes",
        };
        std::fs::read_to_string(self.dir.join(file)).ok()?.trim().parse().ok()
    }
}

impl Drop for IsolateCgroup {
    fn drop(&mut self) {
        // The kernel frees an emptied cgroup lazily; a few tries cover it.
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// A process's resident memory (the usage report's peak, and the fallback
/// watch where no cgroup is usable), read again and again through one open
/// `/proc/<pid>/statm`: no path lookup, open and close per read (the
/// monitor's largest cost with many tenants), and never a later process
/// that took the same pid.
#[derive(Debug)]
pub struct ResidentMemory {
    statm: std::fs::File,
    page_bytes: u64,
}

impl ResidentMemory {
    pub fn open(pid: u32) -> std::io::Result<ResidentMemory> {
        let statm = std::fs::File::open(format!("/proc/{pid}/statm"))?;
        // SAFETY: sysconf has no preconditions.
        let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        Ok(ResidentMemory { statm, page_bytes })
    }

    /// Resident bytes now; `None` once the process has gone (a process that
    /// has exited but is not yet reaped reads 0).
    pub fn read_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt as _;
        // Seven page counts: well under 256 bytes.
        let mut line = [0u8; 256];
        let read = self.statm.read_at(&mut line, 0).ok()?;
        let text = std::str::from_utf8(&line[..read]).ok()?;
        let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * self.page_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_reads_one_process_through_one_open_file_until_it_has_gone() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let memory = ResidentMemory::open(child.id()).unwrap();
        let first = memory.read_bytes().expect("a live process's resident memory");
        assert!(first > 0 && first.is_multiple_of(4096), "{first}");
        assert_eq!(memory.read_bytes().map(|b| b > 0), Some(true), "read again through the same file");
        child.kill().unwrap();
        // Exited, not yet reaped: no memory left.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let zombie = memory.read_bytes();
        child.wait().unwrap();
        assert!(zombie.unwrap_or(0) == 0, "an exited process holds no memory: {zombie:?}");
        assert_eq!(memory.read_bytes(), None, "a reaped process reads nothing");
        assert!(ResidentMemory::open(u32::MAX).is_err());
    }
}
