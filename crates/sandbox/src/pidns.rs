//! An isolate's own PID namespace ([`crate::SandboxPolicy::pid_namespace`]).
//!
//! deno is the first process of a fresh namespace, so it is pid 1 there and
//! sees no other process: not the runner (`Deno.ppid` is 0), not another
//! isolate, not the host. With the jail, its `/proc` is a procfs of that
//! namespace alone. When deno exits the kernel kills whatever else the
//! namespace holds, so nothing an isolate started can outlive it.
//!
//! `unshare(CLONE_NEWPID)` moves the calling thread's *children* only, and
//! a thread may make one such namespace before its next child: so the
//! spawn is bracketed on the spawning thread ([`ChildrenInNewPidNamespace`]),
//! which then goes back to the runner's own namespace (`setns`), and the
//! next fork of that thread — of any code — is an ordinary one again. The
//! runner still knows deno by its host pid (the CPU clock, signals and
//! `/proc/<pid>` work as before), and SIGKILL from the runner reaches a
//! namespace's pid 1 as any other; other signals reach it only if it
//! handles them (the harness handles SIGTERM).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

/// The runner's own (active) PID namespace, to come back to.
fn runner_namespace() -> io::Result<&'static OwnedFd> {
    static NAMESPACE: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = NAMESPACE.get() {
        return Ok(fd);
    }
    // `ns/pid` is the process's active namespace (not `pid_for_children`),
    // the same for every thread whatever one of them unshared.
    let fd = OwnedFd::from(std::fs::File::open("/proc/self/ns/pid")?);
    Ok(NAMESPACE.get_or_init(|| fd))
}

/// A pidfd of the runner itself: readable once the runner has exited. A
/// child in its own PID namespace sees its parent as pid 0 whoever that is,
/// so it checks the runner is still there through this, not `getppid`.
pub(crate) fn runner_pidfd() -> io::Result<libc::c_int> {
    static PIDFD: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = PIDFD.get() {
        return Ok(fd.as_raw_fd());
    }
    // SAFETY: pidfd_open takes integers; a non-negative result is a new
    // descriptor (O_CLOEXEC) this process owns from here on.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by no one else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as libc::c_int) };
    Ok(PIDFD.get_or_init(|| fd).as_raw_fd())
}

/// In the child between fork and exec: whether the process behind
/// `pidfd` has exited (async-signal-safe: one `poll`).
pub(crate) fn has_exited(pidfd: libc::c_int) -> bool {
    let mut poll = libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd on the stack, without waiting.
    unsafe { libc::poll(&mut poll, 1, 0) != 0 }
}

/// While it lives, the next child forked by this thread is pid 1 of a new
/// PID namespace. [`ChildrenInNewPidNamespace::leave`] (or the drop) puts
/// the thread back, so it must not cross an `.await`: it is not `Send`.
pub(crate) struct ChildrenInNewPidNamespace {
    runner: &'static OwnedFd,
    left: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl ChildrenInNewPidNamespace {
    pub(crate) fn enter() -> io::Result<Self> {
        let runner = runner_namespace()?;
        // SAFETY: unshare takes integer flags; CLONE_NEWPID changes only the
        // namespace this thread's future children are created in.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            let error = io::Error::last_os_error();
            // EINVAL: a namespace made earlier on this thread was not left
            // (only one per child): go back, then make a fresh one.
            if error.raw_os_error() != Some(libc::EINVAL) {
                return Err(error);
            }
            restore(runner)?;
            // SAFETY: as above.
            if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { runner, left: false, _not_send: std::marker::PhantomData })
    }

    /// Back to the runner's namespace for this thread's next children.
    pub(crate) fn leave(mut self) -> io::Result<()> {
        self.left = true;
        restore(self.runner)
    }
}

impl Drop for ChildrenInNewPidNamespace {
    fn drop(&mut self) {
        if !self.left {
            // A failure here is repaired by the next `enter` (EINVAL above).
            let _ = restore(self.runner);
        }
    }
}

fn restore(runner: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns on a descriptor owned for the process's life; for a PID
    // namespace it sets only this thread's namespace for children.
    if unsafe { libc::setns(runner.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this runner can give isolates their own PID namespace (needs
/// CAP_SYS_ADMIN, a root runner in practice): starts `true` as the first
/// process of a fresh one, twice on one thread (the second proves the
/// thread came back), and checks the child saw itself as pid 1.
pub fn probe() -> io::Result<()> {
    std::thread::Builder::new()
        .name("isocloud-pidns-probe".into())
        .spawn(|| {
            for _ in 0..2 {
                let namespace = ChildrenInNewPidNamespace::enter()?;
                let mut command = std::process::Command::new("/bin/sh");
                command.args(["-c", "test $$ = 1"]).stdin(std::process::Stdio::null());
                let status = command.status();
                namespace.leave()?;
                let status = status?;
                if !status.success() {
                    return Err(io::Error::other(format!(
                        "the first process of a new PID namespace was not pid 1 ({status})"
                    )));
                }
            }
            let after = std::process::Command::new("/bin/sh").args(["-c", "echo $$"]).output()?;
            if String::from_utf8_lossy(&after.stdout).trim() == "1" {
                return Err(io::Error::other("a child forked after leaving the PID namespace was still in one"));
            }
            Ok(())
        })?
        .join()
        .map_err(|_| io::Error::other("the PID namespace probe panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn a_child_is_pid_1_of_its_own_namespace_and_the_thread_comes_back() {
        if !root() {
            assert!(std::env::var_os("CI").is_none(), "CI runs the sandbox tests as root");
            return;
        }
        probe().unwrap();
        // Many spawns on one thread: each child is pid 1 of a namespace of
        // its own (one namespace per child, never shared).
        std::thread::spawn(|| {
            for _ in 0..20 {
                let namespace = ChildrenInNewPidNamespace::enter().unwrap();
                let out = std::process::Command::new("/bin/sh").args(["-c", "echo $$ $PPID"]).output();
                namespace.leave().unwrap();
                assert_eq!(String::from_utf8(out.unwrap().stdout).unwrap().trim(), "1 0");
            }
            // A namespace not left (a dropped guard) is left by the drop.
            drop(ChildrenInNewPidNamespace::enter().unwrap());
            let out = std::process::Command::new("/bin/sh").args(["-c", "echo $$"]).output().unwrap();
            assert_ne!(String::from_utf8(out.stdout).unwrap().trim(), "1");
        })
        .join()
        .unwrap();
    }
}
