//! Compiles [`crate::seccomp_policy::DENYLIST`] to seccomp BPF with the
//! `seccompiler` crate — once, at start-up, in the runner — and installs the
//! prepared programs in an isolate between fork and exec.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch, sock_filter,
};

use crate::seccomp_policy::{Answer, DENYLIST, When};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filters are not built for this CPU architecture ({0}); run with --seccomp off")]
    UnsupportedArch(&'static str),
    #[error("the seccomp denylist does not compile: {0}")]
    Compile(#[from] seccompiler::BackendError),
}

/// The compiled denylist: one BPF program per answer (EPERM, ENOSYS), plus
/// the x32 guard on x86_64. Cheap to clone.
#[derive(Clone)]
pub struct SeccompFilters {
    programs: Arc<[BpfProgram]>,
}

impl std::fmt::Debug for SeccompFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lengths: Vec<usize> = self.programs.iter().map(Vec::len).collect();
        f.debug_struct("SeccompFilters").field("instructions", &lengths).finish()
    }
}

impl SeccompFilters {
    pub fn compile() -> Result<Self, SeccompError> {
        let arch = target_arch()?;
        let mut by_answer: BTreeMap<Answer, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        for entry in DENYLIST {
            by_answer.entry(entry.answer).or_default().insert(entry.nr, rules(&entry.when)?);
        }
        let mut programs = Vec::new();
        for (answer, rules) in by_answer {
            let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(answer.errno()), arch)?;
            programs.push(BpfProgram::try_from(filter)?);
        }
        #[cfg(target_arch = "x86_64")]
        programs.push(x32_guard());
        Ok(Self { programs: programs.into() })
    }

    /// Installs every program on the calling thread. Called in the child
    /// between fork and exec: `seccompiler::apply_filter` only makes the
    /// `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)`
    /// syscalls on the prepared buffer (a `sock_fprog` on the stack) and
    /// builds its errors from `errno` without allocating; this function maps
    /// them to an `io::Error` the same way.
    pub(crate) fn install(&self) -> std::io::Result<()> {
        for program in self.programs.iter() {
            if let Err(e) = seccompiler::apply_filter(program) {
                return Err(match e {
                    seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                    _ => std::io::Error::from_raw_os_error(libc::EINVAL),
                });
            }
        }
        Ok(())
    }
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
    }
}

fn rules(when: &When) -> Result<Vec<SeccompRule>, SeccompError> {
    let condition = |arg: u8, op: SeccompCmpOp, value: u32| {
        // The kernel reads these arguments as 32-bit ints (flags, address
        // family): compare only the low half, so garbage in the high half
        // cannot make a call slip past.
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, u64::from(value))
    };
    Ok(match when {
        // An empty chain matches every call of the syscall.
        When::Always => Vec::new(),
        When::AnyMasked { arg, matches } => matches
            .iter()
            .map(|m| SeccompRule::new(vec![condition(*arg, SeccompCmpOp::MaskedEq(u64::from(m.mask)), m.value)?]))
            .collect::<Result<_, _>>()?,
        When::NoneOf { arg, values } => {
            let all_different =
                values.iter().map(|v| condition(*arg, SeccompCmpOp::Ne, *v)).collect::<Result<Vec<_>, _>>()?;
            vec![SeccompRule::new(all_different)?]
        }
    })
}

/// On x86_64 the x32 ABI reaches the same kernel functions with the
/// syscall number plus `__X32_SYSCALL_BIT` and the same `AUDIT_ARCH`, which
/// would walk around every entry of a denylist keyed by number: deny the
/// whole x32 range (deno is a 64-bit program and never uses it).
#[cfg(target_arch = "x86_64")]
fn x32_guard() -> BpfProgram {
    // BPF_LD (0) | BPF_W (0) | BPF_ABS
    const LD_W_ABS: u16 = 0x20;
    // BPF_JMP | BPF_JEQ / BPF_JGE | BPF_K (0); BPF_RET | BPF_K
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    const ARCH_OFFSET: u32 = 4;
    const NR_OFFSET: u32 = 0;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let op = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    vec![
        op(LD_W_ABS, ARCH_OFFSET, 0, 0),
        // Not x86_64: the other programs' architecture check kills it.
        op(JEQ_K, AUDIT_ARCH_X86_64, 0, 3),
        op(LD_W_ABS, NR_OFFSET, 0, 0),
        op(JGE_K, X32_SYSCALL_BIT, 0, 1),
        op(RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32, 0, 0),
        op(RET_K, libc::SECCOMP_RET_ALLOW, 0, 0),
    ]
}

#[cfg(test)]
mod tests;
