//! The isolate's own unprivileged identity, and the ownership of the few
//! places it must write to.
//!
//! What the isolate (as its uid) must reach, and who arranges it:
//! - read: its instance's `src/`, `modules/`, `meta/`, the harness and the
//!   deno binary — created by the runner (root), world-readable (`0755`
//!   dirs, `0644` files: [`normalize_umask`] makes sure of that);
//! - write: its instance's `run/` (it creates `isolate.sock` there) —
//!   [`crate::IsolateFiles::prepare`] hands it over (owner, `0700`);
//! - connect: `run/control.sock`, bound by the runner before the spawn —
//!   [`crate::SandboxedCommand::spawn`] hands it over;
//! - write: deno's cache dir — [`hand_over_dir`] at start-up.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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

/// Whether the runner may give isolates another uid (it is root).
pub fn runner_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `dir` (and everything in it) the isolate's, `0700`: deno's cache
/// dir, which earlier runs may have filled as another uid.
pub fn hand_over_dir(dir: &Path, ids: IsolateIds) -> std::io::Result<()> {
    chown_tree(dir, ids)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
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
