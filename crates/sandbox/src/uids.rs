//! One uid per live isolate, from a range the operator keeps free of real
//! accounts ([`UidPool`]): two isolates never share a uid, so a compromised
//! deno process that got past every other layer still cannot signal,
//! ptrace-probe or read the files of a neighbour (the kernel checks uids).
//!
//! A uid is taken when an isolate's files are laid out and given back when
//! the last clone of them is gone ([`UidLease`]), and never sooner than its
//! process: a lease records the process it started, and a uid released while
//! that process may still run waits ("drains") until the kernel says the
//! process has exited. Runners on one host coordinate through a lock file per
//! uid ([`CLAIMS_DIR`]): a uid one runner holds is skipped by the others.
//! And a new isolate kills whatever still runs as its uid before it execs
//! deno ([`crate::confine`]): a process an earlier holder left behind (only
//! possible with seccomp off, which lets an isolate fork out of its process
//! group) dies before the uid runs a new tenant's code.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::identity::IsolateIds;

/// Where runners on this host claim isolate uids: one lock file per uid
/// held, locked (`flock`) by the runner that holds it. A runner's locks go
/// with it when it dies. Root's alone (`0700`).
pub const CLAIMS_DIR: &str = "/run/isocloud/isolate-uids";

/// An inclusive range of uids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// 100,000 uids from 1,900,000,000: above every range the usual tools
    /// hand out — regular users (`UID_MAX` 60000 in `/etc/login.defs`),
    /// systemd's dynamic users (61184–65519), shadow-utils' subordinate
    /// ranges for user namespaces (`SUB_UID_MIN`..`SUB_UID_MAX`,
    /// 100000–600100000 by default, 65536 per user: rootless podman, LXD),
    /// systemd's container ranges (524288–1879048191) — and below its
    /// "foreign" range (2147352576–2147418111) and 2^31, past which some
    /// tools mistake a uid for a negative number. systemd lists
    /// 1879048192–2147352575 as unused (docs/UIDS-GIDS.md).
    pub const DEFAULT: UidRange = UidRange { first: 1_900_000_000, last: 1_900_099_999 };

    /// `FIRST-LAST`, e.g. `1900000000-1900099999`. Never root, `nobody`
    /// (65534, shared with NFS and user namespaces), 65535 (16-bit `-1`) or
    /// 4294967295 (`-1`: "leave unchanged" to `setresuid` and `chown`).
    pub fn parse(text: &str) -> Result<UidRange, String> {
        let (first, last) =
            text.split_once('-').ok_or_else(|| format!("{text:?} is not a range like {}", UidRange::DEFAULT))?;
        let number = |part: &str| {
            part.trim().parse::<u32>().map_err(|_| format!("{text:?}: {part:?} is not a uid (0..4294967294)"))
        };
        let range = UidRange { first: number(first)?, last: number(last)? };
        if range.first > range.last {
            return Err(format!("{text:?}: the first uid is above the last"));
        }
        for (uid, what) in [
            (0, "root"),
            (65534, "nobody (shared with NFS and user namespaces)"),
            (65535, "16-bit -1, not a usable uid"),
            (u32::MAX, "-1 to setresuid and chown, not a uid"),
        ] {
            if range.contains(uid) {
                return Err(format!("{text:?} holds {uid}, {what}"));
            }
        }
        Ok(range)
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }

    /// How many uids it holds.
    pub fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Never: a range holds at least its first uid.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn overlaps(&self, first: u64, last: u64) -> bool {
        first <= u64::from(self.last) && u64::from(self.first) <= last
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// What else on this host uses uids of `range` (an isolate would share
/// them): accounts in `passwd`, subordinate ranges in `subuid` (the user
/// namespaces of rootless containers). Reads `etc` (`/etc` in the runner).
/// Accounts only NSS knows (LDAP, SSSD) are not seen: the operator's part.
pub fn range_conflicts(range: UidRange, etc: &Path) -> Vec<String> {
    let mut conflicts = Vec::new();
    if let Ok(passwd) = std::fs::read_to_string(etc.join("passwd")) {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if let Some(uid) = fields.get(2).and_then(|u| u.parse::<u32>().ok())
                && range.contains(uid)
            {
                conflicts.push(format!("account {} has uid {uid} ({}/passwd)", fields[0], etc.display()));
            }
        }
    }
    if let Ok(subuid) = std::fs::read_to_string(etc.join("subuid")) {
        for line in subuid.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let fields: Vec<&str> = line.trim().split(':').collect();
            let (Some(start), Some(count)) =
                (fields.get(1).and_then(|s| s.parse::<u64>().ok()), fields.get(2).and_then(|c| c.parse::<u64>().ok()))
            else {
                continue;
            };
            if count > 0 && range.overlaps(start, start + count - 1) {
                conflicts.push(format!(
                    "{}'s subordinate uids {start}-{} ({}/subuid)",
                    fields[0],
                    start + count - 1,
                    etc.display()
                ));
            }
        }
    }
    conflicts
}

#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error(
        "every isolate uid of {range} is taken ({held} by this runner, {draining} of them waiting for their \
         process to exit; {elsewhere} by other runners on this host): isolates never share a uid; try again \
         shortly, or widen --isolate-uid-range"
    )]
    Exhausted { range: UidRange, held: usize, draining: usize, elsewhere: usize },
    #[error("cannot claim isolate uid {uid} in {}: {error}", dir.display())]
    Claim { uid: u32, dir: PathBuf, error: std::io::Error },
}

impl UidError {
    /// A full range: a capacity problem (retry later), not a fault.
    pub fn is_capacity(&self) -> bool {
        matches!(self, UidError::Exhausted { .. })
    }
}

/// The uids of a range this runner hands to its isolates, one each.
#[derive(Debug)]
pub struct UidPool {
    range: UidRange,
    gid: u32,
    claims_dir: PathBuf,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    /// Where the search for a free uid starts: round robin, so a released
    /// uid is the last to be taken again.
    next: u32,
    /// Leased or draining.
    held: HashSet<u32>,
    draining: Vec<Draining>,
    /// A task frees draining uids as their processes exit.
    settling: bool,
}

/// A uid given back while its process may still run.
#[derive(Debug)]
struct Draining {
    claim: Claim,
    process: ProcessWatch,
}

impl UidPool {
    /// A pool of `range`, every isolate in group `gid`, claiming its uids in
    /// `claims_dir` (created, root's alone; [`CLAIMS_DIR`] in a runner, so
    /// every runner on the host sees every claim).
    pub fn new(range: UidRange, gid: u32, claims_dir: &Path) -> std::io::Result<Arc<UidPool>> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(claims_dir)?;
        std::fs::set_permissions(claims_dir, std::fs::Permissions::from_mode(0o700))?;
        reap_stale_claims(claims_dir);
        Ok(Arc::new(UidPool {
            range,
            gid,
            claims_dir: claims_dir.to_owned(),
            state: Mutex::new(PoolState {
                next: range.first,
                held: HashSet::new(),
                draining: Vec::new(),
                settling: false,
            }),
        }))
    }

    pub fn range(&self) -> UidRange {
        self.range
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Uids this runner holds: leased, or released with their process
    /// still running.
    pub fn held(&self) -> usize {
        self.state.lock().expect("uid pool poisoned").held.len()
    }

    /// Uids released whose process has not exited yet.
    pub fn draining(&self) -> usize {
        let mut state = self.state.lock().expect("uid pool poisoned");
        state.settle();
        state.draining.len()
    }

    /// A uid no live process of this runner's or another's has, for one
    /// isolate, until the lease (and every clone of the isolate's files) is
    /// gone and its process has exited.
    pub fn lease(self: &Arc<Self>) -> Result<Arc<UidLease>, UidError> {
        let mut state = self.state.lock().expect("uid pool poisoned");
        state.settle();
        let mut elsewhere = 0;
        let mut uid = state.next;
        for _ in 0..self.range.len() {
            let candidate = uid;
            uid = if uid == self.range.last { self.range.first } else { uid + 1 };
            if state.held.contains(&candidate) {
                continue;
            }
            match Claim::take(&self.claims_dir, candidate) {
                Ok(Some(claim)) => {
                    state.next = uid;
                    state.held.insert(candidate);
                    return Ok(Arc::new(UidLease {
                        pool: self.clone(),
                        uid: candidate,
                        claim: Some(claim),
                        process: Mutex::new(None),
                        deno_dir: Mutex::new(None),
                    }));
                }
                Ok(None) => elsewhere += 1,
                Err(error) => return Err(UidError::Claim { uid: candidate, dir: self.claims_dir.clone(), error }),
            }
        }
        Err(UidError::Exhausted {
            range: self.range,
            held: state.held.len(),
            draining: state.draining.len(),
            elsewhere,
        })
    }

    fn release(self: &Arc<Self>, claim: Claim, process: Option<ProcessWatch>) {
        let mut state = self.state.lock().expect("uid pool poisoned");
        match process {
            Some(process) if !process.exited(claim.uid) => {
                tracing::debug!(uid = claim.uid, "isolate uid given back; held until its process has exited");
                state.draining.push(Draining { claim, process });
            }
            _ => state.free(claim),
        }
        state.settle();
        if !state.draining.is_empty() && !state.settling {
            // A SIGKILLed process is gone within milliseconds: free its uid
            // (and the two descriptors that watch it) then, not at the next
            // boot. Outside a runtime (tests, shutdown), the next lease does.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                state.settling = true;
                runtime.spawn(settle_draining(self.clone()));
            }
        }
    }
}

/// Frees draining uids as their processes exit, checking every
/// [`SETTLE_EVERY`] for at most [`SETTLE_FOR`] (a process stuck longer in
/// the kernel is found by a later lease or release).
async fn settle_draining(pool: Arc<UidPool>) {
    let deadline = tokio::time::Instant::now() + SETTLE_FOR;
    loop {
        tokio::time::sleep(SETTLE_EVERY).await;
        let mut state = pool.state.lock().expect("uid pool poisoned");
        let before = state.draining.len();
        state.settle();
        if state.draining.len() < before {
            tracing::debug!(freed = before - state.draining.len(), "isolate uids free: their processes exited");
        }
        if state.draining.is_empty() || tokio::time::Instant::now() >= deadline {
            state.settling = false;
            return;
        }
    }
}

const SETTLE_EVERY: std::time::Duration = std::time::Duration::from_millis(20);
const SETTLE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

impl PoolState {
    /// Frees every draining uid whose process has exited.
    fn settle(&mut self) {
        let mut index = 0;
        while index < self.draining.len() {
            if self.draining[index].process.exited(self.draining[index].claim.uid) {
                let done = self.draining.swap_remove(index);
                self.free(done.claim);
            } else {
                index += 1;
            }
        }
    }

    fn free(&mut self, claim: Claim) {
        self.held.remove(&claim.uid);
        drop(claim);
    }
}

/// Removes the claim files nobody holds: those of runners that died
/// (SIGKILL leaves the file, unlocked; its isolates died with it). A file
/// some runner holds stays; taking the lock first makes the removal safe.
fn reap_stale_claims(claims_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(claims_dir) else { return };
    for entry in entries.flatten() {
        if let Some(uid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok())
            && let Ok(Some(claim)) = Claim::take(claims_dir, uid)
        {
            drop(claim);
        }
    }
}

/// One isolate's uid, held while it lives. Shared by the clones of the
/// isolate's [`crate::IsolateFiles`]; the last one gone gives the uid back.
#[derive(Debug)]
pub struct UidLease {
    pool: Arc<UidPool>,
    uid: u32,
    claim: Option<Claim>,
    /// The process started as this uid, once spawned.
    process: Mutex<Option<ProcessWatch>>,
    /// Its deno cache dir (a descriptor: it follows a rename into the
    /// deployment's place), handed back to the runner with the uid.
    deno_dir: Mutex<Option<File>>,
}

impl UidLease {
    pub fn ids(&self) -> IsolateIds {
        IsolateIds { uid: self.uid, gid: self.pool.gid }
    }

    /// The isolate's process: the uid is not given back before it exits.
    pub(crate) fn track(&self, pid: u32) {
        *self.process.lock().expect("uid lease poisoned") = Some(ProcessWatch::new(pid));
    }

    /// Its deno cache dir, just handed over: taken back from the uid
    /// ([`crate::identity::park_dir`]) when the uid is given back, so the
    /// next holder of the uid — another tenant's isolate — does not own it.
    pub(crate) fn hold_deno_dir(&self, dir: &Path) -> std::io::Result<()> {
        let file = File::open(dir)?;
        *self.deno_dir.lock().expect("uid lease poisoned") = Some(file);
        Ok(())
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        if let Some(dir) = self.deno_dir.get_mut().ok().and_then(Option::take)
            && let Err(e) = crate::identity::park_dir(&dir, self.uid)
        {
            tracing::warn!(uid = self.uid, error = %e, "cannot take the isolate's deno cache dir back from its uid");
        }
        let process = self.process.get_mut().ok().and_then(Option::take);
        if let Some(claim) = self.claim.take() {
            self.pool.release(claim, process);
        }
    }
}

/// A uid locked in the claims dir: `<dir>/<uid>`, `flock`ed by this
/// process. Dropped: unlinked, then unlocked (in that order, so a runner
/// that opened the file meanwhile sees it is not the file at that path
/// any more, and tries again).
#[derive(Debug)]
struct Claim {
    uid: u32,
    path: PathBuf,
    _lock: File,
}

impl Claim {
    /// `None`: another runner holds it.
    fn take(dir: &Path, uid: u32) -> std::io::Result<Option<Claim>> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = dir.join(uid.to_string());
        // A holder may unlink it between our open and our lock: then the
        // lock is on a file no longer at the path. Compare, retry.
        for _ in 0..4 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
            let held = file.metadata()?;
            match std::fs::symlink_metadata(&path) {
                Ok(at_path) if at_path.dev() == held.dev() && at_path.ino() == held.ino() => {
                    return Ok(Some(Claim { uid, path, _lock: file }));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a process has exited: a pidfd (it names that process, never
/// one that later gets its pid), else `/proc`.
#[derive(Debug)]
enum ProcessWatch {
    Pidfd(OwnedFd),
    Pid(u32),
}

impl ProcessWatch {
    fn new(pid: u32) -> Self {
        // SAFETY: pidfd_open takes integers and returns a new descriptor
        // or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor; nothing else owns it.
            ProcessWatch::Pidfd(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
        } else {
            ProcessWatch::Pid(pid)
        }
    }

    /// Exited (a zombie counts: it runs nothing), every thread of it.
    fn exited(&self, uid: u32) -> bool {
        match self {
            ProcessWatch::Pidfd(fd) => {
                let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: poll reads and writes one pollfd this function
                // owns; timeout 0 never blocks. A pidfd is readable once the
                // whole thread group has exited.
                match unsafe { libc::poll(&mut poll, 1, 0) } {
                    0 => false,
                    n if n > 0 => poll.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
                    _ => false,
                }
            }
            ProcessWatch::Pid(pid) => !process_runs_as(*pid, uid),
        }
    }
}

/// Whether `pid` is a live (not zombie) process whose real uid is `uid`:
/// a pid reused by another uid's process is not ours.
fn process_runs_as(pid: u32, uid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let zombie = field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X'));
    let real_uid = field("Uid:").and_then(|u| u.split_whitespace().next()?.parse::<u32>().ok());
    !zombie && real_uid == Some(uid)
}

#[cfg(test)]
mod tests;
