//! The isolate's own unprivileged identity, and the ownership of the few
//! places it must write to.
//!
//! Who an isolate runs as ([`IsolateUids`]): by default (a root runner) a
//! uid of its own from a range, held while it lives ([`crate::uids`]), all
//! isolates in one gid; or one uid shared by every isolate
//! (`--isolate-uid N`).
//!
//! What the isolate (as its uid) must reach, and who arranges it:
//! - read: its instance's `src/`, `modules/`, `meta/`, the harness and the
//!   deno binary — created by the runner (root), world-readable (`0755`
//!   dirs, `0644` files: [`normalize_umask`] makes sure of that);
//! - read: its bootstrap record (the tenant's envs) — the isolate's uid's
//!   alone (`0600`), written by [`crate::IsolateFiles::prepare`];
//! - write: its instance's `run/` (it creates `isolate.sock` there) —
//!   [`crate::IsolateFiles::prepare`] hands it over (owner, `0700`);
//! - connect: `run/control.sock`, bound by the runner before the spawn —
//!   [`crate::SandboxedCommand::spawn`] hands it over;
//! - write: its deployment's deno cache dir, kept across boots and handed
//!   to each boot's uid ([`hand_over_dir`]); with a uid per isolate it is
//!   taken back ([`park_dir`]) when the uid is given back, so the uid's next
//!   holder — another tenant, perhaps — owns nothing of it.
//!
//! The group is shared: nothing an isolate may reach is group-accessible
//! (`0700` dirs, a `0600` record), and signals and ptrace check uids only;
//! one gid lets an operator grant isolates a host path (deno, with
//! `--mount-namespace off`) by group.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use crate::uids::{UidError, UidLease, UidPool};

/// The uid and gid an isolate runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsolateIds {
    pub uid: u32,
    pub gid: u32,
}

impl IsolateIds {
    /// `nobody` / `nogroup`.
    pub const NOBODY: IsolateIds = IsolateIds { uid: 65534, gid: 65534 };
}

/// Who isolates run as (a root runner's choice).
#[derive(Debug, Clone)]
pub enum IsolateUids {
    /// Every isolate the same uid and gid (`--isolate-uid N`): should the
    /// other layers fail, one isolate's process may signal, ptrace-probe and
    /// read the files of another.
    Shared(IsolateIds),
    /// Each live isolate a uid of its own from the pool
    /// (`--isolate-uid-range`, the default), all in the pool's gid.
    PerIsolate(Arc<UidPool>),
}

impl IsolateUids {
    /// `65534`, or the range: `1900000000-1900099999`.
    pub fn uid_summary(&self) -> String {
        match self {
            IsolateUids::Shared(ids) => ids.uid.to_string(),
            IsolateUids::PerIsolate(pool) => pool.range().to_string(),
        }
    }

    pub fn gid(&self) -> u32 {
        match self {
            IsolateUids::Shared(ids) => ids.gid,
            IsolateUids::PerIsolate(pool) => pool.gid(),
        }
    }

    pub fn per_isolate(&self) -> bool {
        matches!(self, IsolateUids::PerIsolate(_))
    }

    /// The ids of one new isolate; per isolate, held until the lease (and
    /// every clone of it) is gone and the isolate's process has exited.
    pub(crate) fn take(&self) -> Result<(IsolateIds, Option<Arc<UidLease>>), UidError> {
        match self {
            IsolateUids::Shared(ids) => Ok((*ids, None)),
            IsolateUids::PerIsolate(pool) => {
                let lease = pool.lease()?;
                Ok((lease.ids(), Some(lease)))
            }
        }
    }
}

/// Changes of a deno cache dir's owner take turns: a boot handing a
/// deployment's dir to its uid and an ended isolate taking it back from
/// its own must not interleave.
static OWNERSHIP: Mutex<()> = Mutex::new(());

/// Whether the runner may give isolates another uid (it is root).
pub fn runner_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `dir` (and everything in it) the isolate's, `0700`: deno's cache
/// dir, which earlier runs may have filled as another uid.
pub fn hand_over_dir(dir: &Path, ids: IsolateIds) -> std::io::Result<()> {
    let _turn = OWNERSHIP.lock().unwrap_or_else(PoisonError::into_inner);
    chown_tree(dir, ids)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Takes a deno cache dir back from `uid` (its isolate ended, the uid goes
/// back to the pool): the dir itself becomes the runner's, `0700`, so no
/// process of `uid` can enter it. What is inside keeps its owner until the
/// deployment's next boot hands the whole tree to that boot's uid: one
/// `chown`, not a walk. Left alone if a later isolate has it already.
pub(crate) fn park_dir(dir: &std::fs::File, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let _turn = OWNERSHIP.lock().unwrap_or_else(PoisonError::into_inner);
    if dir.metadata()?.uid() != uid {
        return Ok(());
    }
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    let (runner_uid, runner_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    std::os::unix::fs::fchown(dir, Some(runner_uid), Some(runner_gid))?;
    dir.set_permissions(std::fs::Permissions::from_mode(0o700))
}

fn chown_tree(path: &Path, ids: IsolateIds) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(ids.uid), Some(ids.gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), ids)?;
        }
    }
    Ok(())
}

/// Lets any uid pass through `dir` by name (`o+x`) without listing it: the
/// state dir, when isolates see host paths (no mount namespace) and must
/// reach their files below it.
pub fn allow_traversal(dir: &Path) -> std::io::Result<()> {
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode((mode & 0o7777) | 0o711))?;
    }
    Ok(())
}

/// Files the runner writes for an isolate of another uid must be readable by
/// it: clears the group/other read and search bits from the runner's umask
/// (a `077` umask becomes `022`). Returns the umask in force before.
pub fn normalize_umask() -> u32 {
    // SAFETY: umask has no preconditions and cannot fail; it is
    // process-wide, set once at start-up.
    let old = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(old & 0o022) };
    old as u32
}
