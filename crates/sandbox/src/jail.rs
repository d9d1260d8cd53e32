//! The isolate's own root: a private mount namespace holding only the
//! binds planned here (from strings made before the fork), entered between
//! fork and exec with `pivot_root`.
//!
//! Every bind carries mount flags by what it holds ([`MountFlags`]): the
//! tenant's bytes and every folder the isolate may write are `noexec`, so
//! the kernel refuses to `execve` them or map them `PROT_EXEC` — the dynamic
//! loader cannot load a shared object the tenant shipped, whatever it is
//! called or however it got there. Only deno's binary and the host's
//! `/usr` (its libraries) stay executable, read-only.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use libc::{MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, c_ulong};

use crate::{IsolateFiles, SandboxPolicy};

/// The per-mount flags of one kind of bind, applied by a bind remount
/// (`MS_BIND | MS_REMOUNT | flags`: a plain bind ignores them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MountFlags {
    pub(crate) flags: c_ulong,
    /// Why these flags (read by the tests; the table is the documentation).
    #[cfg_attr(not(test), allow(dead_code, reason = "read by the tests"))]
    pub(crate) reason: &'static str,
}

/// The tenant's files (`/src`, `/isocloud/modules`), the runner's records of
/// them (`/isocloud/meta`) and the harness, read-only.
pub(crate) const TENANT_READ_ONLY: MountFlags = MountFlags {
    flags: MS_RDONLY | MS_NOEXEC | MS_NOSUID | MS_NODEV,
    reason: "the tenant's bytes: read as modules and assets, never executed or mapped executable by the kernel",
};
/// The folders the isolate writes: its sockets (`/isocloud/run`) and deno's
/// cache (`/isocloud/deno-dir`).
pub(crate) const TENANT_WRITABLE: MountFlags = MountFlags {
    flags: MS_NOEXEC | MS_NOSUID | MS_NODEV,
    reason: "written by the isolate: what it writes here must never become code the kernel maps",
};
/// deno's binary and the host's `/usr`, `/etc` and merged-usr folders.
pub(crate) const SYSTEM: MountFlags = MountFlags {
    flags: MS_RDONLY | MS_NOSUID | MS_NODEV,
    reason: "deno and the libraries it links: executable, never written, no set-uid programs or devices",
};
/// `/dev`, without its sub-mounts (`/dev/shm`, a world-writable tmpfs, and
/// `/dev/pts` stay out): device nodes still open for writing on a read-only
/// mount, nothing new can be created.
pub(crate) const DEV: MountFlags = MountFlags {
    flags: MS_RDONLY | MS_NOEXEC | MS_NOSUID,
    reason: "the device nodes deno opens (/dev/null, /dev/urandom); no writable tmpfs to drop a shared object in",
};
pub(crate) const PROC: MountFlags = MountFlags {
    flags: MS_NOEXEC | MS_NOSUID | MS_NODEV,
    reason: "deno reads its own /proc/self; nothing in it is a program",
};
/// The isolate's root folder itself: only mount points and merged-usr links.
pub(crate) const ROOT: MountFlags = MountFlags {
    flags: MS_RDONLY | MS_NOEXEC | MS_NOSUID | MS_NODEV,
    reason: "mount points only: nothing may be created beside them (/tmp included)",
};

/// One bind of the jail, as C strings made before the fork.
struct Bind {
    source: CString,
    /// Inside the isolate's root, as a host path.
    target: CString,
    /// With the mounts below `source` (`MS_REC`).
    recursive: bool,
    flags: MountFlags,
}

/// The mounts of an isolate's own root, as C strings made before the fork.
pub(crate) struct Jail {
    root: CString,
    binds: Vec<Bind>,
    /// In its own PID namespace, a procfs of that namespace here instead of
    /// a bind of the host's `/proc`: the isolate sees only itself.
    fresh_proc: Option<CString>,
    src: CString,
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("isolate paths hold no NUL")
}

impl Jail {
    /// A build step's root (see [`crate::BuildConfinement`]): the system
    /// folders and deno as an isolate has them, the deployment's work copy
    /// at `/src` and deno's download cache at `/isocloud/deno-dir`, both
    /// writable and `noexec`; nothing else of the host.
    pub(crate) fn for_build(root: &Path, deno: &Path, src: &Path, cache: &Path, pid_namespace: bool) -> Self {
        use crate::files::jail;
        let own = vec![
            (src.to_owned(), jail::SRC.to_owned(), TENANT_WRITABLE),
            (cache.to_owned(), jail::DENO_DIR.to_owned(), TENANT_WRITABLE),
        ];
        Self::assemble(root, deno, pid_namespace, own)
    }

    pub(crate) fn plan(root: &Path, policy: &SandboxPolicy, files: &IsolateFiles) -> Self {
        use crate::files::jail;
        let mut own = vec![
            (policy.harness_dir.clone(), jail::HARNESS.to_owned(), TENANT_READ_ONLY),
            (files.deno_dir.clone(), jail::DENO_DIR.to_owned(), TENANT_WRITABLE),
            (files.src.clone(), jail::SRC.to_owned(), TENANT_READ_ONLY),
            (files.modules.clone(), jail::MODULES.to_owned(), TENANT_READ_ONLY),
            (files.meta.clone(), jail::META.to_owned(), TENANT_READ_ONLY),
            (files.run.clone(), jail::RUN.to_owned(), TENANT_WRITABLE),
        ];
        if let Some(packages) = files.project.as_ref().and_then(|p| p.packages.as_ref()) {
            // A build's packages, shared read-only by every isolate of
            // deployments with the same ones (after /src: mounted onto it).
            for name in ["node_modules", "vendor"] {
                if packages.join(name).is_dir() {
                    own.push((packages.join(name), format!("{}/{name}", jail::SRC), TENANT_READ_ONLY));
                }
            }
        }
        Self::assemble(root, &policy.deno, policy.pid_namespace, own)
    }

    /// The binds every jail has — the host's system folders, `/dev`, deno —
    /// then `own` (source, path inside, flags) in order, then `/proc`: a
    /// procfs of its own in a PID namespace, else the host's.
    fn assemble(root: &Path, deno: &Path, pid_namespace: bool, own: Vec<(PathBuf, String, MountFlags)>) -> Self {
        use crate::files::jail;
        let inside = |guest: &str| cstring(&root.join(&guest[1..]));
        let bind = |source: &Path, target: CString, recursive: bool, flags: MountFlags| Bind {
            source: cstring(source),
            target,
            recursive,
            flags,
        };
        let mut binds = Vec::new();
        for dir in jail::SHARED_DIRS {
            binds.push(bind(Path::new(dir), inside(dir), true, SYSTEM));
        }
        for name in jail::USR_LINKS {
            let host = Path::new("/").join(name);
            if std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
                binds.push(bind(&host, cstring(&root.join(name)), true, SYSTEM));
            }
        }
        binds.push(bind(Path::new("/dev"), inside("/dev"), false, DEV));
        binds.push(bind(deno, inside(jail::DENO), false, SYSTEM));
        for (source, target, flags) in &own {
            binds.push(bind(source, inside(target), false, *flags));
        }
        let fresh_proc = if pid_namespace {
            Some(inside("/proc"))
        } else {
            binds.push(bind(Path::new("/proc"), inside("/proc"), true, PROC));
            None
        };
        Self { root: cstring(root), binds, fresh_proc, src: CString::new(jail::SRC).expect("no NUL") }
    }

    /// In the child: a private mount namespace whose root holds only the
    /// planned binds, then `/src` as the working directory.
    pub(crate) fn enter(&self) -> std::io::Result<()> {
        fn check(rc: libc::c_int) -> std::io::Result<()> {
            if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        }
        let none = std::ptr::null::<libc::c_char>();
        let remount = |target: &CString, flags: MountFlags| {
            // SAFETY: `target` is a NUL-terminated string owned by `self`;
            // null is allowed for the unused source, type and data.
            check(unsafe {
                libc::mount(
                    none,
                    target.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | flags.flags,
                    std::ptr::null(),
                )
            })
        };
        // SAFETY: every pointer is a NUL-terminated string owned by `self`,
        // which outlives these calls; null is allowed for unused arguments.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done here may propagate back to the host's mounts.
            check(libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            check(libc::mount(self.root.as_ptr(), self.root.as_ptr(), none, libc::MS_BIND, std::ptr::null()))?;
        }
        remount(&self.root, ROOT)?;
        for bind in &self.binds {
            let mut flags = libc::MS_BIND;
            if bind.recursive {
                flags |= libc::MS_REC;
            }
            // SAFETY: as above.
            check(unsafe { libc::mount(bind.source.as_ptr(), bind.target.as_ptr(), none, flags, std::ptr::null()) })?;
            remount(&bind.target, bind.flags)?;
        }
        if let Some(proc) = &self.fresh_proc {
            // SAFETY: as above; the child is already in its PID namespace
            // (forked there), so this procfs shows that namespace.
            check(unsafe {
                libc::mount(c"proc".as_ptr(), proc.as_ptr(), c"proc".as_ptr(), PROC.flags, std::ptr::null())
            })?;
        }
        // SAFETY: as above.
        unsafe {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_mounts_are_never_executable_and_system_ones_never_writable() {
        for flags in [TENANT_READ_ONLY, TENANT_WRITABLE, DEV, PROC, ROOT] {
            assert_eq!(flags.flags & MS_NOEXEC, MS_NOEXEC, "{}", flags.reason);
            assert_eq!(flags.flags & MS_NOSUID, MS_NOSUID, "{}", flags.reason);
        }
        for flags in [TENANT_READ_ONLY, TENANT_WRITABLE, PROC, ROOT, SYSTEM] {
            assert_eq!(flags.flags & MS_NODEV, MS_NODEV, "{}", flags.reason);
        }
        for flags in [SYSTEM, DEV, ROOT, TENANT_READ_ONLY] {
            assert_eq!(flags.flags & MS_RDONLY, MS_RDONLY, "{}", flags.reason);
        }
        assert_eq!(SYSTEM.flags & MS_NOEXEC, 0, "deno and its libraries must run");
    }
}
