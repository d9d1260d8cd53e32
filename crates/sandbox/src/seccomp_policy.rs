//! The seccomp denylist of every isolate, as data: one entry per syscall,
//! each with the reason it is denied. [`crate::seccomp`] compiles it to BPF
//! once, at start-up.
//!
//! **A denylist, not an allowlist.** deno (V8, tokio, glibc, ICU, rustls)
//! uses a large set of syscalls that changes between releases; an allowlist
//! would break isolates on a deno upgrade in ways only production shows. The
//! list removes the kernel surface that no isolate needs and that container
//! escapes and kernel exploits go through (namespaces and mounts, ptrace and
//! foreign memory, keyrings, BPF, perf, userfaultfd, io_uring, module and
//! kexec loading, process creation); Landlock, the isolate's own uid and its
//! mount namespace bound what the remaining calls can reach.
//!
//! **EPERM, not KILL_PROCESS.** A denied call returns `EPERM`, which deno
//! turns into an ordinary error the tenant (and our logs) can see, and which
//! glibc and Rust code handle as "not allowed here". Killing the process
//! would be a louder alarm, but it would also turn any deno code path that
//! merely *probes* a denied call (a feature check, a fallback) into a crashed
//! isolate whose cause nobody can read; and an attacker learns nothing from
//! EPERM that the call itself would not have told them. The one exception is
//! `clone3`, answered `ENOSYS` so glibc falls back to `clone`, whose flags
//! the filter can inspect.
//!
//! **Not here: `RLIMIT_NPROC`.** Process creation is denied below (threads
//! are allowed), so no per-uid process limit is needed for it.

/// One denied syscall.
#[derive(Debug)]
pub struct Denied {
    /// The `libc::SYS_*` constant the number came from.
    pub constant: &'static str,
    pub nr: i64,
    pub when: When,
    pub answer: Answer,
    /// Why no isolate may make this call.
    pub reason: &'static str,
}

impl Denied {
    /// The syscall's name, as in `man 2`.
    pub fn name(&self) -> &'static str {
        self.constant.strip_prefix("SYS_").unwrap_or(self.constant)
    }
}

/// Which calls of the syscall are denied.
#[derive(Debug)]
pub enum When {
    Always,
    /// When `(args[arg] & mask) == value` (32-bit) for any one of `matches`.
    AnyMasked {
        arg: u8,
        matches: &'static [Masked],
    },
    /// When the (32-bit) `args[arg]` is none of `values`.
    NoneOf {
        arg: u8,
        values: &'static [u32],
    },
}

#[derive(Debug)]
pub struct Masked {
    pub mask: u32,
    pub value: u32,
    pub meaning: &'static str,
}

/// What a denied call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Answer {
    Eperm,
    /// "This kernel has no such call": makes glibc use an older call instead.
    Enosys,
}

impl Answer {
    pub fn errno(self) -> u32 {
        match self {
            Answer::Eperm => libc::EPERM as u32,
            Answer::Enosys => libc::ENOSYS as u32,
        }
    }
}

macro_rules! deny {
    ($sys:ident, $reason:expr) => {
        deny!($sys, When::Always, Answer::Eperm, $reason)
    };
    ($sys:ident, $when:expr, $answer:expr, $reason:expr) => {
        Denied { constant: stringify!($sys), nr: libc::$sys as i64, when: $when, answer: $answer, reason: $reason }
    };
}

const CLONE_THREAD: u32 = libc::CLONE_THREAD as u32;

/// `clone` calls that are not a new thread of the isolate.
const CLONE_DENIED: &[Masked] = &[
    Masked { mask: CLONE_THREAD, value: 0, meaning: "a new process (no CLONE_THREAD): fork" },
    Masked { mask: libc::CLONE_NEWNS as u32, value: libc::CLONE_NEWNS as u32, meaning: "CLONE_NEWNS" },
    Masked { mask: libc::CLONE_NEWCGROUP as u32, value: libc::CLONE_NEWCGROUP as u32, meaning: "CLONE_NEWCGROUP" },
    Masked { mask: libc::CLONE_NEWUTS as u32, value: libc::CLONE_NEWUTS as u32, meaning: "CLONE_NEWUTS" },
    Masked { mask: libc::CLONE_NEWIPC as u32, value: libc::CLONE_NEWIPC as u32, meaning: "CLONE_NEWIPC" },
    Masked { mask: libc::CLONE_NEWUSER as u32, value: libc::CLONE_NEWUSER as u32, meaning: "CLONE_NEWUSER" },
    Masked { mask: libc::CLONE_NEWPID as u32, value: libc::CLONE_NEWPID as u32, meaning: "CLONE_NEWPID" },
    Masked { mask: libc::CLONE_NEWNET as u32, value: libc::CLONE_NEWNET as u32, meaning: "CLONE_NEWNET" },
];

/// Address families deno uses: unix sockets (the runner), TCP/UDP over IPv4
/// and IPv6 (`fetch`, `Deno.connect`), netlink (glibc's `getaddrinfo` asks
/// the kernel for the interface addresses).
const SOCKET_FAMILIES: &[u32] =
    &[libc::AF_UNIX as u32, libc::AF_INET as u32, libc::AF_INET6 as u32, libc::AF_NETLINK as u32];

/// Every isolate's denylist.
pub static DENYLIST: &[Denied] = &[
    // --- other processes
    deny!(SYS_ptrace, "reads and rewrites other processes (a neighbour isolate of the same uid), and escapes seccomp"),
    deny!(SYS_process_vm_readv, "reads another process's memory without ptrace"),
    deny!(SYS_process_vm_writev, "writes another process's memory without ptrace"),
    deny!(SYS_kcmp, "compares kernel objects of other processes: an information leak (kernel pointers ordering)"),
    deny!(SYS_pidfd_getfd, "copies a file descriptor out of another process"),
    // --- process creation: deno serves from threads; Deno.Command is refused
    // by deno's permissions and, here, by the kernel
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_fork, "a new process: isolates never start processes"),
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_vfork, "a new process: isolates never start processes"),
    deny!(
        SYS_clone,
        When::AnyMasked { arg: 0, matches: CLONE_DENIED },
        Answer::Eperm,
        "anything but a thread: a new process (no CLONE_THREAD), or new namespaces (CLONE_NEW*), which turn \
         unprivileged code into root of its own namespace and open the kernel's namespaced-root surface"
    ),
    deny!(
        SYS_clone3,
        When::Always,
        Answer::Enosys,
        "its flags live in memory that BPF cannot read; ENOSYS makes glibc create threads with clone, which is \
         filtered by flag"
    ),
    // --- namespaces, mounts and roots: the jail must stay as built
    deny!(SYS_unshare, "new namespaces (user, mount, net, …): the route to namespaced root and to leaving the jail"),
    deny!(SYS_setns, "joins another namespace, e.g. the host's through a /proc fd"),
    deny!(SYS_mount, "changes the file system view the jail and Landlock were built for"),
    deny!(SYS_umount2, "uncovers what the jail's mounts hide"),
    deny!(SYS_pivot_root, "changes the root the jail set"),
    deny!(SYS_chroot, "changes the root; the classic chroot escape needs it"),
    deny!(SYS_open_tree, "new mount API: clones a mount tree"),
    deny!(SYS_move_mount, "new mount API: attaches a mount"),
    deny!(SYS_fsopen, "new mount API: creates a file system context"),
    deny!(SYS_fsconfig, "new mount API: configures a file system context"),
    deny!(SYS_fsmount, "new mount API: turns a context into a mount"),
    deny!(SYS_fspick, "new mount API: reconfigures an existing mount"),
    deny!(SYS_mount_setattr, "changes mount attributes (read-only, idmapped)"),
    deny!(
        SYS_open_by_handle_at,
        "opens any file of a mounted file system by handle, bypassing paths (the 'shocker' escape)"
    ),
    deny!(SYS_name_to_handle_at, "makes the file handles open_by_handle_at takes; leaks inode identities"),
    // --- kernel attack surface deno never uses
    deny!(SYS_bpf, "eBPF programs and maps: a large, often-exploited kernel surface"),
    deny!(SYS_perf_event_open, "performance counters: kernel and side-channel information, frequent CVEs"),
    deny!(SYS_userfaultfd, "stalls kernel accesses to user memory: the standard tool to win kernel races"),
    deny!(SYS_io_uring_setup, "io_uring: a large kernel surface whose operations bypass this filter"),
    deny!(SYS_io_uring_enter, "io_uring: a large kernel surface whose operations bypass this filter"),
    deny!(SYS_io_uring_register, "io_uring: a large kernel surface whose operations bypass this filter"),
    deny!(SYS_keyctl, "kernel keyrings are not namespaced: keys of other users and containers"),
    deny!(SYS_add_key, "kernel keyrings are not namespaced"),
    deny!(SYS_request_key, "kernel keyrings are not namespaced; may upcall into host helpers"),
    deny!(SYS_fanotify_init, "watches file system events beyond the isolate's own files"),
    deny!(SYS_lookup_dcookie, "resolves kernel directory cookies: host path leak (profiling interface)"),
    deny!(SYS_move_pages, "moves or inspects the pages of other processes"),
    deny!(SYS_migrate_pages, "moves the pages of other processes"),
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_modify_ldt, "x86 segment descriptors: a rarely used path with a history of kernel bugs"),
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_iopl, "raw I/O port access"),
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_ioperm, "raw I/O port access"),
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_uselib, "obsolete a.out library loading"),
    #[cfg(target_arch = "x86_64")]
    deny!(SYS__sysctl, "obsolete binary sysctl interface"),
    deny!(SYS_nfsservctl, "obsolete NFS server control"),
    deny!(
        SYS_socket,
        When::NoneOf { arg: 0, values: SOCKET_FAMILIES },
        Answer::Eperm,
        "address families beyond unix, IPv4, IPv6 and netlink (AF_ALG, AF_VSOCK, AF_PACKET, AF_KEY, bluetooth, …) \
         are kernel code deno never needs, several with local-root CVEs"
    ),
    // --- the machine itself
    deny!(SYS_init_module, "loads kernel code"),
    deny!(SYS_finit_module, "loads kernel code"),
    deny!(SYS_delete_module, "unloads kernel code"),
    deny!(SYS_kexec_load, "replaces the running kernel"),
    deny!(SYS_kexec_file_load, "replaces the running kernel"),
    deny!(SYS_reboot, "reboots the machine"),
    deny!(SYS_swapon, "changes the machine's swap"),
    deny!(SYS_swapoff, "changes the machine's swap"),
    deny!(SYS_acct, "switches process accounting to a file"),
    deny!(SYS_quotactl, "changes disk quotas"),
    deny!(SYS_quotactl_fd, "changes disk quotas"),
    deny!(SYS_settimeofday, "sets the machine's clock"),
    deny!(SYS_clock_settime, "sets the machine's clock"),
    deny!(SYS_clock_adjtime, "adjusts the machine's clock"),
    deny!(SYS_adjtimex, "adjusts the machine's clock (deno never even reads it this way)"),
    deny!(SYS_sethostname, "renames the machine (or its UTS namespace)"),
    deny!(SYS_setdomainname, "renames the machine's NIS domain"),
    deny!(SYS_syslog, "reads the kernel log: kernel addresses, other tenants' traces"),
    deny!(SYS_vhangup, "hangs up the controlling terminal"),
];

#[cfg(test)]
mod tests;
