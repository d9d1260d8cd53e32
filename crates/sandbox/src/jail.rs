//! The isolate's own root: a private mount namespace holding only the
//! binds planned here (from strings made before the fork), entered between
//! fork and exec with `pivot_root`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::{IsolateFiles, SandboxPolicy};

/// The mounts of an isolate's own root, as C strings made before the fork.
pub(crate) struct Jail {
    root: CString,
    /// (source, target inside `root`, recursive, read-only)
    binds: Vec<(CString, CString, bool, bool)>,
    src: CString,
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("isolate paths hold no NUL")
}

impl Jail {
    pub(crate) fn plan(root: &Path, policy: &SandboxPolicy, files: &IsolateFiles) -> Self {
        use crate::files::jail;
        let inside = |guest: &str| cstring(&root.join(&guest[1..]));
        let mut binds = Vec::new();
        for dir in jail::SHARED_DIRS {
            binds.push((cstring(Path::new(dir)), inside(dir), true, true));
        }
        for name in jail::USR_LINKS {
            let host = Path::new("/").join(name);
            if std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
                binds.push((cstring(&host), cstring(&root.join(name)), true, true));
            }
        }
        binds.extend([
            (cstring(Path::new("/dev")), inside("/dev"), true, false),
            (cstring(Path::new("/proc")), inside("/proc"), true, false),
            (cstring(&policy.deno), inside(jail::DENO), false, true),
            (cstring(&policy.harness_dir), inside(jail::HARNESS), false, true),
            (cstring(&files.deno_dir), inside(jail::DENO_DIR), false, false),
            (cstring(&files.src), inside(jail::SRC), false, true),
            (cstring(&files.modules), inside(jail::MODULES), false, true),
            (cstring(&files.meta), inside(jail::META), false, true),
            (cstring(&files.run), inside(jail::RUN), false, false),
        ]);
        Self { root: cstring(root), binds, src: CString::new(jail::SRC).expect("no NUL") }
    }

    /// In the child: a private mount namespace whose root holds only the
    /// planned binds, then `/src` as the working directory.
    pub(crate) fn enter(&self) -> std::io::Result<()> {
        fn check(rc: libc::c_int) -> std::io::Result<()> {
            if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        }
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string owned by `self`,
        // which outlives these calls; null is allowed for unused arguments.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done here may propagate back to the host's mounts.
            check(libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            check(libc::mount(self.root.as_ptr(), self.root.as_ptr(), none, libc::MS_BIND, std::ptr::null()))?;
            for (source, target, recursive, read_only) in &self.binds {
                let mut flags = libc::MS_BIND;
                if *recursive {
                    flags |= libc::MS_REC;
                }
                check(libc::mount(source.as_ptr(), target.as_ptr(), none, flags, std::ptr::null()))?;
                if *read_only {
                    let remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
                    check(libc::mount(none, target.as_ptr(), none, remount, std::ptr::null()))?;
                }
            }
            check(libc::chdir(self.root.as_ptr()))?;
            // pivot_root(".", "."): the old root ends up under the new one and
            // is detached right away, so nothing of the host stays reachable.
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(self.src.as_ptr()))?;
        }
        Ok(())
    }
}
