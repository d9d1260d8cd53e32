//! An isolate's own network namespace ([`crate::SandboxPolicy::network_namespace`]).
//!
//! The child enters a fresh one between fork and exec (`confine`): it holds
//! only `lo`, down. Right after the spawn the runner brings `lo` up and binds
//! one listener inside, on the egress proxy's own address, and serves the
//! proxy on it: `HTTP_PROXY` and deno's `--allow-net` stay the same, and the
//! proxy is the isolate's only way out (raw TCP reaches nothing).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Brings `lo` up in the network namespace of process `pid` and binds
/// `addr` there (nonblocking, for tokio). The socket stays in that
/// namespace whichever thread uses it later.
pub fn listen_inside(pid: u32, addr: SocketAddr) -> io::Result<TcpListener> {
    inside(pid, move || {
        loopback_up()?;
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
}

/// Runs `f` on a thread of its own that first joins `pid`'s network
/// namespace. `setns` moves only the calling thread; this one ends right
/// after `f`, so no other work of the runner ever runs inside.
pub(crate) fn inside<T: Send + 'static>(pid: u32, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    let namespace = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::Builder::new()
        .name("isocloud-netns".into())
        .spawn(move || {
            // SAFETY: setns on a descriptor this closure owns; it changes
            // only this thread's network namespace.
            if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            drop(namespace);
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}

/// Whether this runner can give isolates their own network namespace: a
/// thread of its own unshares one, brings `lo` up and binds a listener
/// there, as [`listen_inside`] will (needs CAP_SYS_ADMIN and CAP_NET_ADMIN,
/// a root runner in practice). The namespace ends with the thread.
pub fn probe() -> io::Result<()> {
    std::thread::Builder::new()
        .name("isocloud-netns-probe".into())
        .spawn(|| {
            // SAFETY: unshare takes integer flags only; CLONE_NEWNET moves
            // only this thread, which ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            loopback_up()?;
            TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).map(drop)
        })?
        .join()
        .map_err(|_| io::Error::other("the network namespace probe panicked"))?
}

/// `ip link set lo up`, in the calling thread's network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket takes integers only.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data, for which all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq, which
    // `request` is, on a socket this function owns; the flags field is the
    // union member these requests use.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) != 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &request) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;

    #[test]
    fn the_probe_needs_root() {
        match probe() {
            Ok(()) => assert!(crate::identity::runner_is_root(), "a network namespace without root?"),
            Err(e) if crate::identity::runner_is_root() => panic!("a root runner cannot make a network namespace: {e}"),
            Err(_) => {}
        }
        // The probe moved only its own thread.
        let here = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_eq!(here, std::fs::read_link("/proc/self/ns/net").unwrap());
    }

    /// A child in a fresh network namespace gets a listener on an address
    /// the runner's own namespace already uses, and a connection made from
    /// inside reaches it (not the runner's listener).
    #[test]
    fn a_listener_inside_a_childs_namespace() {
        if !crate::identity::runner_is_root() {
            assert!(std::env::var_os("CI").is_none(), "network namespaces need a root runner, and CI runs as root");
            eprintln!("skipped: network namespaces need a root runner");
            return;
        }
        let outside = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = outside.local_addr().unwrap();
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        // SAFETY: between fork and exec, one unshare syscall on integers.
        unsafe {
            command.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        let pid = child.id();

        let listener = listen_inside(pid, addr).expect("the same address is free in the child's namespace");
        listener.set_nonblocking(false).unwrap();
        let client = inside(pid, move || {
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.write_all(b"inside")?;
            Ok(stream)
        })
        .unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let mut buf = [0u8; 6];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"inside");
        outside.set_nonblocking(true).unwrap();
        assert!(outside.accept().is_err(), "nothing reached the runner's own listener");
        drop(client);

        child.kill().unwrap();
        child.wait().unwrap();
    }
}
