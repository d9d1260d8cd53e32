//! The resource limits of every isolate, as data: one entry per limit, with
//! its reason. Applied between fork and exec (soft = hard, so the isolate
//! cannot raise them again; never above the runner's own hard limit).
//!
//! Not here, on purpose:
//! - `RLIMIT_NPROC` counts every process of the *uid*, not of the isolate:
//!   all isolates share it, so it would be a host-wide ceiling, not a budget.
//!   Process creation is denied by seccomp instead (threads are allowed).
//! - `RLIMIT_AS` / `RLIMIT_DATA`: V8 reserves far more address space than it
//!   uses (pointer cage, WebAssembly guard regions); memory is bounded by
//!   V8's heap flag and the memory controller.
//! - `RLIMIT_CPU`: CPU time is measured and enforced from outside, per
//!   request (the supervisor).

#[cfg(target_env = "gnu")]
pub type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub type Resource = libc::c_int;

#[derive(Debug)]
pub struct Limit {
    pub name: &'static str,
    pub resource: Resource,
    pub value: u64,
    pub reason: &'static str,
}

/// Every isolate's limits.
pub static RLIMITS: &[Limit] = &[
    Limit {
        name: "RLIMIT_NOFILE",
        resource: libc::RLIMIT_NOFILE,
        value: 8192,
        reason: "bounds the kernel memory one isolate can pin with descriptors; leaves room for a few thousand \
                 concurrent connections from the runner and outbound sockets",
    },
    Limit {
        name: "RLIMIT_FSIZE",
        resource: libc::RLIMIT_FSIZE,
        value: 256 * 1024 * 1024,
        reason: "the isolate writes nothing but its socket and deno's own cache (transpiled modules, V8 code cache); \
                 no file of its may grow past this (SIGXFSZ is ignored, so a breach is an EFBIG error, not a kill)",
    },
    Limit {
        name: "RLIMIT_CORE",
        resource: libc::RLIMIT_CORE,
        value: 0,
        reason: "a crashed isolate must not dump its memory (the tenant's secrets, request bodies) onto the host disk",
    },
    Limit {
        name: "RLIMIT_MEMLOCK",
        resource: libc::RLIMIT_MEMLOCK,
        value: 0,
        reason: "nothing in deno pins memory; locked pages escape reclaim and swap",
    },
    Limit {
        name: "RLIMIT_MSGQUEUE",
        resource: libc::RLIMIT_MSGQUEUE,
        value: 0,
        reason: "POSIX message queues are kernel memory deno never uses",
    },
    Limit {
        name: "RLIMIT_NICE",
        resource: libc::RLIMIT_NICE,
        value: 0,
        reason: "the isolate may lower its priority, never raise it above the runner's and its neighbours'",
    },
    Limit {
        name: "RLIMIT_RTPRIO",
        resource: libc::RLIMIT_RTPRIO,
        value: 0,
        reason: "a real-time thread would starve the runner and every other isolate on its CPU",
    },
];

/// Applies [`RLIMITS`] to the calling process and ignores `SIGXFSZ`.
/// Async-signal-safe: `getrlimit`, `setrlimit` and `signal` are plain
/// syscalls on stack values.
pub(crate) fn apply() -> std::io::Result<()> {
    for limit in RLIMITS {
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit through a valid pointer to a local.
        if unsafe { libc::getrlimit(limit.resource, &mut current) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let value = (limit.value as libc::rlim_t).min(current.rlim_max);
        let wanted = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit reads one rlimit through a valid pointer to a local.
        if unsafe { libc::setrlimit(limit.resource, &wanted) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: installing SIG_IGN has no preconditions; an ignored disposition
    // survives exec, so deno sees EFBIG instead of dying.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The runner's own descriptor limit: raises the soft limit to the hard one
/// (every client connection, isolate socket and pipe is one) and returns
/// `(soft before, soft now)`.
pub fn raise_descriptor_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a struct this function owns.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads a struct this function owns; raising the
        // soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_max))
}

/// The calling process's soft descriptor limit (0 if unreadable).
pub fn descriptor_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a struct this function owns.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_limit_has_a_reason_and_appears_once() {
        let mut seen = HashSet::new();
        for limit in RLIMITS {
            assert!(limit.name.starts_with("RLIMIT_"), "{}", limit.name);
            assert!(limit.reason.trim().len() >= 10, "{} needs a real reason", limit.name);
            assert!(seen.insert(limit.resource), "{} is listed twice", limit.name);
        }
        for never in [libc::RLIMIT_NPROC, libc::RLIMIT_AS, libc::RLIMIT_DATA, libc::RLIMIT_STACK] {
            assert!(!seen.contains(&never), "see the module doc for why {never} is not limited here");
        }
    }
}
