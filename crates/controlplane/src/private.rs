//! Files are private whatever the directory was (#21 row 5). The data dir
//! holds every project's env values and certificates' keys (in the
//! database), tenants' code (blobs, git mirrors) and the admin token; the
//! runner's state dir holds tenants' logs on their way (the spool) and code
//! (the cache). Each is made `0700` (files `0600`) with explicit modes, not
//! left to the umask; one that already exists readable or writable by other
//! users — a package, an image or systemd's `StateDirectory=` often makes
//! them `0755` — is tightened at start with a log line, and one owned by
//! another account (which could loosen it again, or swap what is inside) is
//! refused, naming the path and the fix.

#![allow(unsafe_code, reason = "geteuid, umask and statvfs have no safe std equivalent")]

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a directory or file could not be made private.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path} {reason}; {fix}")]
pub struct NotPrivate {
    pub what: String,
    pub path: PathBuf,
    pub reason: String,
    pub fix: String,
}

/// The bits that let other users read or write (search alone is allowed:
/// a build's or an isolate's uid may need to pass through, see
/// `isocloud_sandbox::identity::allow_traversal`).
const OPEN_BITS: u32 = 0o066;

fn our_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn not_private(what: &str, path: &Path, reason: String, fix: String) -> NotPrivate {
    NotPrivate { what: what.to_owned(), path: path.to_owned(), reason, fix }
}

/// Makes `dir` (and missing parents) `0700`, or checks and tightens it when
/// it exists: not ours → refused; readable or writable by others → `0700`,
/// logged. `what` names it in messages ("data dir").
pub fn ensure_dir(dir: &Path, what: &str) -> Result<(), NotPrivate> {
    let io = |e: std::io::Error| {
        not_private(what, dir, format!("cannot be made: {e}"), "check the path and its parents' permissions".into())
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
            Ok(())
        }
        Err(e) => Err(io(e)),
        Ok(meta) if !meta.is_dir() => {
            Err(not_private(what, dir, "is not a directory".into(), "point the option at a directory".into()))
        }
        Ok(meta) => tighten(dir, &meta, what, 0o700),
    }
}

/// Tightens what already exists at `path` (a file to `0600`, a directory
/// to `0700`) when others may read or write it; nothing when it is missing.
pub fn tighten_existing(path: &Path, what: &str) -> Result<(), NotPrivate> {
    match std::fs::metadata(path) {
        Ok(meta) => tighten(path, &meta, what, if meta.is_dir() { 0o700 } else { 0o600 }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(not_private(what, path, format!("cannot be read: {e}"), "check its permissions".into())),
    }
}

fn tighten(path: &Path, meta: &std::fs::Metadata, what: &str, private_mode: u32) -> Result<(), NotPrivate> {
    let uid = our_uid();
    let mode = meta.permissions().mode() & 0o7777;
    if meta.uid() != uid {
        return Err(not_private(
            what,
            path,
            format!("belongs to uid {}, not to this server's uid {uid} (mode {mode:04o})", meta.uid()),
            format!(
                "its owner could open it to others again; run `chown -R {uid} {}` (or run as its owner)",
                path.display()
            ),
        ));
    }
    if mode & OPEN_BITS == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(private_mode)).map_err(|e| {
        not_private(
            what,
            path,
            format!("is open to other users (mode {mode:04o}) and cannot be tightened: {e}"),
            format!("run `chmod {private_mode:o} {}`", path.display()),
        )
    })?;
    tracing::warn!(
        target: "isocloud::private",
        path = %path.display(),
        from = format!("{mode:04o}"),
        to = format!("{private_mode:04o}"),
        "{what} was readable or writable by other users: tightened"
    );
    Ok(())
}

/// Sets the process's umask to `077` (the server's own, whatever it was
/// started with) and returns the one it had. Call once at start, before
/// other threads make files.
pub fn set_private_umask() -> u32 {
    // SAFETY: umask has no preconditions and cannot fail.
    (unsafe { libc::umask(0o077) }) as u32
}

/// Free bytes for an unprivileged writer on the file system of `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes only into `stat`, which is a plain struct it
    // fully initialises on success; `c_path` is NUL-terminated and lives
    // across the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn made_private_and_tightened() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        ensure_dir(&fresh, "data dir").unwrap();
        assert_eq!((mode(&root.path().join("a")), mode(&fresh)), (0o700, 0o700));

        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let db = open.join("isocloud.db");
        std::fs::write(&db, "x").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        ensure_dir(&open, "data dir").unwrap();
        tighten_existing(&db, "database").unwrap();
        tighten_existing(&open.join("missing"), "database").unwrap();
        assert_eq!((mode(&open), mode(&db)), (0o700, 0o600));

        // Search alone (a build uid passing through) is left as it is.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o711)).unwrap();
        ensure_dir(&open, "data dir").unwrap();
        assert_eq!(mode(&open), 0o711);
        assert!(free_bytes(&open).is_some_and(|b| b > 0));
    }

    #[test]
    fn another_accounts_dir_is_refused() {
        if our_uid() != 0 {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("this test chowns a directory: it needs root, and CI runs as root");
            }
            eprintln!("SKIPPED: needs root to chown");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let theirs = root.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let err = ensure_dir(&theirs, "data dir").unwrap_err().to_string();
        assert!(err.contains(&theirs.display().to_string()) && err.contains("uid 65534"), "{err}");
        assert!(err.contains("chown -R 0"), "{err}");
    }
}
