use std::collections::HashSet;

use super::*;

#[test]
fn every_entry_has_a_reason_and_appears_once() {
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for entry in DENYLIST {
        assert!(entry.reason.trim().len() >= 10, "{} needs a real reason", entry.name());
        assert!(entry.constant.starts_with("SYS_"), "{}", entry.constant);
        assert!(names.insert(entry.name()), "{} is listed twice", entry.name());
        assert!(numbers.insert(entry.nr), "{} shares its number with another entry", entry.name());
        match &entry.when {
            When::Always => {}
            When::AnyMasked { arg, matches } => {
                assert!(*arg < 6 && !matches.is_empty(), "{}", entry.name());
                for m in *matches {
                    assert!(!m.meaning.is_empty() && m.value & !m.mask == 0, "{}: {m:?}", entry.name());
                }
            }
            When::NoneOf { arg, values } => assert!(*arg < 6 && !values.is_empty(), "{}", entry.name()),
        }
    }
}

#[test]
fn the_design_notes_calls_are_all_denied() {
    let names: HashSet<&str> = DENYLIST.iter().map(Denied::name).collect();
    for required in [
        "ptrace",
        "mount",
        "umount2",
        "unshare",
        "setns",
        "pivot_root",
        "chroot",
        "bpf",
        "keyctl",
        "add_key",
        "request_key",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "perf_event_open",
        "userfaultfd",
        "process_vm_readv",
        "process_vm_writev",
        "open_by_handle_at",
        "swapon",
        "swapoff",
        "reboot",
        "acct",
        "quotactl",
    ] {
        assert!(names.contains(required), "{required} is missing from the denylist");
    }
}

#[test]
fn threads_stay_allowed() {
    let clone = DENYLIST.iter().find(|d| d.name() == "clone").expect("clone is filtered");
    let When::AnyMasked { matches, .. } = &clone.when else { panic!("clone is filtered by flags, not always") };
    // The flags glibc's pthread_create passes.
    let thread = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID) as u32;
    assert!(matches.iter().all(|m| thread & m.mask != m.value), "a thread's clone would be denied");
    let fork = libc::SIGCHLD as u32;
    assert!(matches.iter().any(|m| fork & m.mask == m.value), "fork's clone would be allowed");
    let clone3 = DENYLIST.iter().find(|d| d.name() == "clone3").expect("clone3 is answered");
    assert_eq!(clone3.answer, Answer::Enosys, "glibc falls back to clone only on ENOSYS");
}
