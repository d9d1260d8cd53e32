//! The kernel's CPU clock of an isolate process, read from outside it, so a
//! tenant cannot forge what it used.

use std::time::Duration;

/// CPU time (user + system, every thread) the process `pid` has used so far.
pub fn process_cpu_time(pid: u32) -> std::io::Result<Duration> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes one clockid_t through a valid
    // pointer to a local; it has no other preconditions.
    let rc = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a
    // local; an invalid clock (the process has gone) is reported as an error.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_busy_child() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let first = process_cpu_time(pid).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let second = process_cpu_time(pid);
        child.wait().unwrap();
        if let Ok(second) = second {
            assert!(second >= first);
        }
        assert!(process_cpu_time(u32::MAX).is_err());
    }
}
