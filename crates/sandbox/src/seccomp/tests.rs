//! Each denied call is made twice in a forked child: without the filter (it
//! reaches the kernel, whatever the kernel answers) and with it (EPERM or
//! ENOSYS from the filter). The children do only raw syscalls.

use super::*;

/// Forks; the child installs `filters` (when given), makes `call` and exits
/// with the errno it failed with (0 on success). Returns that code.
fn errno_in_child(filters: Option<&SeccompFilters>, call: Call) -> i32 {
    // SAFETY: the child only installs prepared BPF programs (no allocation,
    // see `SeccompFilters::install`), makes raw syscalls and `_exit`s, all
    // async-signal-safe, so forking a multi-threaded test binary is sound.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        if let Some(filters) = filters
            && filters.install().is_err()
        {
            // SAFETY: _exit never returns and is async-signal-safe.
            unsafe { libc::_exit(250) };
        }
        let rc = call();
        let code = if rc < 0 { std::io::Error::last_os_error().raw_os_error().unwrap_or(251) } else { 0 };
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    assert!(libc::WIFEXITED(status), "child died: {status:#x}");
    libc::WEXITSTATUS(status)
}

/// A raw syscall made in the child.
type Call = fn() -> libc::c_long;

/// A fork-like call whose child (if the call succeeds) leaves at once.
fn leave_if_child(rc: libc::c_long) -> libc::c_long {
    if rc == 0 {
        // SAFETY: _exit never returns and is async-signal-safe.
        unsafe { libc::_exit(0) };
    }
    rc
}

// SAFETY (every call below): raw syscalls with null pointers or harmless
// arguments; the kernel validates them and answers with an errno at worst.
#[allow(clippy::undocumented_unsafe_blocks, reason = "the SAFETY comment above covers every entry")]
const DENIED: &[(&str, Call, i32)] = &[
    ("unshare(CLONE_NEWUSER)", || unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) }, libc::EPERM),
    (
        "ptrace(PTRACE_TRACEME)",
        || unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) },
        libc::EPERM,
    ),
    (
        "process_vm_readv(self)",
        || unsafe { libc::syscall(libc::SYS_process_vm_readv, libc::getpid(), 0, 0, 0, 0, 0) },
        libc::EPERM,
    ),
    ("bpf(BPF_PROG_LOAD, NULL)", || unsafe { libc::syscall(libc::SYS_bpf, 5, 0, 0) }, libc::EPERM),
    ("perf_event_open(NULL)", || unsafe { libc::syscall(libc::SYS_perf_event_open, 0, 0, -1, -1, 0) }, libc::EPERM),
    ("userfaultfd", || unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) }, libc::EPERM),
    ("io_uring_setup(0, NULL)", || unsafe { libc::syscall(libc::SYS_io_uring_setup, 0, 0) }, libc::EPERM),
    ("keyctl(GET_KEYRING_ID)", || unsafe { libc::syscall(libc::SYS_keyctl, 0, -2, 0) }, libc::EPERM),
    ("mount(NULL)", || unsafe { libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0) }, libc::EPERM),
    ("setns(-1)", || unsafe { libc::syscall(libc::SYS_setns, -1, 0) }, libc::EPERM),
    (
        "clone(SIGCHLD): a fork",
        || leave_if_child(unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) }),
        libc::EPERM,
    ),
    (
        "clone(CLONE_NEWUSER)",
        || leave_if_child(unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_NEWUSER | libc::SIGCHLD, 0, 0, 0, 0) }),
        libc::EPERM,
    ),
    ("clone3(NULL)", || unsafe { libc::syscall(libc::SYS_clone3, 0, 0) }, libc::ENOSYS),
    (
        "socket(AF_ALG)",
        || unsafe { libc::syscall(libc::SYS_socket, libc::AF_ALG, libc::SOCK_SEQPACKET, 0) },
        libc::EPERM,
    ),
    (
        "socket(AF_VSOCK)",
        || unsafe { libc::syscall(libc::SYS_socket, libc::AF_VSOCK, libc::SOCK_STREAM, 0) },
        libc::EPERM,
    ),
    #[cfg(target_arch = "x86_64")]
    ("fork", || leave_if_child(unsafe { libc::syscall(libc::SYS_fork) }), libc::EPERM),
    #[cfg(target_arch = "x86_64")]
    ("x32 getpid", || unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) }, libc::EPERM),
];

#[test]
fn denied_calls_are_denied_by_the_filter_and_only_by_it() {
    let filters = SeccompFilters::compile().expect("the denylist compiles");
    for (name, call, expected) in DENIED {
        let filtered = errno_in_child(Some(&filters), *call);
        assert_eq!(filtered, *expected, "{name} under the filter");
        let unfiltered = errno_in_child(None, *call);
        assert_ne!(unfiltered, filtered, "{name} gets the same answer without the filter: the test proves nothing");
    }
}

#[test]
fn what_deno_needs_stays_allowed() {
    let filters = SeccompFilters::compile().expect("the denylist compiles");
    // SAFETY (every call): raw syscalls without pointers.
    #[allow(clippy::undocumented_unsafe_blocks, reason = "the SAFETY comment above covers every entry")]
    let allowed: &[(&str, Call)] = &[
        ("getpid", || unsafe { libc::syscall(libc::SYS_getpid) }),
        ("socket(AF_UNIX)", || unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) }),
        ("socket(AF_INET6)", || unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET6, libc::SOCK_STREAM, 0) }),
        ("socket(AF_NETLINK)", || unsafe { libc::syscall(libc::SYS_socket, libc::AF_NETLINK, libc::SOCK_RAW, 0) }),
        ("prctl(PR_GET_NO_NEW_PRIVS)", || unsafe {
            libc::syscall(libc::SYS_prctl, libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
        }),
    ];
    for (name, call) in allowed {
        assert_eq!(errno_in_child(Some(&filters), *call), 0, "{name} must stay allowed");
    }
}

#[test]
fn programs_fit_the_kernel_limit() {
    let filters = SeccompFilters::compile().unwrap();
    for program in filters.programs.iter() {
        assert!(!program.is_empty() && program.len() < 4096, "{} instructions", program.len());
    }
}
