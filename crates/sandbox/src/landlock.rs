//! Landlock: what of the file system an isolate may touch, as data
//! ([`RULES`]), whatever deno's permissions say.
//!
//! Rules are bound to the inodes of paths opened *in the runner*, before the
//! fork, on host paths: the jail bind-mounts those very inodes at `/src`,
//! `/isocloud/…`, `/usr`, `/etc`, `/dev`, so the same ruleset holds inside the
//! isolate's own root and without one. The one rule that cannot be prepared
//! in the runner is the isolate's own `/proc/self` (its pid does not exist
//! yet): the child opens it and adds it with two raw syscalls, then restricts
//! itself — everything else (the `landlock` crate, which allocates) runs
//! before the fork.
//!
//! Why not a re-exec step (firecracker's jailer): it would cost an extra
//! exec of the runner binary on every cold start and a second way to pass
//! the plan across, for what two syscalls on prepared values do here.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, Scope,
};

use crate::{IsolateFiles, SandboxPolicy};

/// The newest Landlock ABI whose rights this policy uses; older kernels get
/// what they support (best effort).
const ABI_USED: ABI = ABI::V6;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("this kernel has no Landlock (needs Linux 5.13+ with landlock in the lsm= list)")]
    Unsupported,
    #[error("cannot find the ELF interpreter of {path}: {source}")]
    Interpreter { path: PathBuf, source: std::io::Error },
    #[error("cannot open {path} for a Landlock rule: {source}")]
    Path { path: PathBuf, source: std::io::Error },
    #[error("landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

/// What a rule allows beneath its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// List and read.
    Read,
    /// Read and run (`execve`, the ELF interpreter).
    Execute,
    /// Read, create, write, remove files and sockets (no execute, no devices,
    /// no symlinks or fifos).
    ReadWrite,
    /// [`Grant::ReadWrite`] and symlinks (a build writes npm's layout).
    ReadWriteLinks,
}

/// Where a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// A fixed host path (skipped when it does not exist).
    Host(&'static str),
    /// The deno binary.
    Deno,
    /// The ELF interpreter deno names (`ld-linux…`).
    Interpreter,
    Harness,
    DenoDir,
    /// The instance's `src/` (`/src`).
    Src,
    Modules,
    Meta,
    /// The instance's socket dir.
    Run,
}

#[derive(Debug)]
pub struct Rule {
    pub place: Place,
    pub grant: Grant,
    pub reason: &'static str,
}

/// Everything an isolate may reach, besides its own `/proc/self` (read).
pub static RULES: &[Rule] = &[
    Rule { place: Place::Deno, grant: Grant::Execute, reason: "the isolate's program; deno also reads itself" },
    Rule { place: Place::Interpreter, grant: Grant::Execute, reason: "the dynamic loader execve runs deno with" },
    Rule { place: Place::Host("/usr"), grant: Grant::Read, reason: "shared libraries (mapped, not executed)" },
    Rule { place: Place::Host("/lib"), grant: Grant::Read, reason: "shared libraries where /lib is not /usr/lib" },
    Rule { place: Place::Host("/lib64"), grant: Grant::Read, reason: "shared libraries where /lib64 is a dir" },
    Rule { place: Place::Host("/etc/ld.so.cache"), grant: Grant::Read, reason: "the dynamic loader's library index" },
    Rule { place: Place::Host("/etc/ld.so.preload"), grant: Grant::Read, reason: "libraries the host preloads" },
    Rule { place: Place::Host("/etc/resolv.conf"), grant: Grant::Read, reason: "DNS for fetch and Deno.connect" },
    Rule { place: Place::Host("/etc/hosts"), grant: Grant::Read, reason: "static host names (getaddrinfo)" },
    Rule { place: Place::Host("/etc/nsswitch.conf"), grant: Grant::Read, reason: "how getaddrinfo resolves" },
    Rule { place: Place::Host("/etc/host.conf"), grant: Grant::Read, reason: "resolver options" },
    Rule { place: Place::Host("/etc/gai.conf"), grant: Grant::Read, reason: "getaddrinfo address ordering" },
    Rule { place: Place::Host("/etc/services"), grant: Grant::Read, reason: "service names in getaddrinfo" },
    Rule { place: Place::Host("/etc/localtime"), grant: Grant::Read, reason: "the local time zone" },
    Rule { place: Place::Host("/etc/ssl"), grant: Grant::Read, reason: "CA certificates (DENO_TLS_CA_STORE=system)" },
    Rule { place: Place::Host("/etc/ca-certificates"), grant: Grant::Read, reason: "CA certificates (Debian)" },
    Rule { place: Place::Host("/etc/pki"), grant: Grant::Read, reason: "CA certificates (RPM systems)" },
    Rule { place: Place::Host("/dev/null"), grant: Grant::ReadWrite, reason: "the isolate's stdin; a sink" },
    Rule { place: Place::Host("/dev/urandom"), grant: Grant::Read, reason: "randomness (crypto.getRandomValues)" },
    Rule { place: Place::Host("/dev/random"), grant: Grant::Read, reason: "randomness" },
    Rule { place: Place::Harness, grant: Grant::Read, reason: "our harness, which runs first" },
    Rule { place: Place::Src, grant: Grant::Read, reason: "the deployment's modules and assets (/src)" },
    Rule { place: Place::Modules, grant: Grant::Read, reason: "the deployment's remote modules" },
    Rule { place: Place::Meta, grant: Grant::Read, reason: "import map, asset manifest, bootstrap record" },
    Rule { place: Place::Run, grant: Grant::ReadWrite, reason: "its own sockets: isolate.sock, control.sock" },
    Rule { place: Place::DenoDir, grant: Grant::ReadWrite, reason: "deno's cache: transpiled modules, V8 code cache" },
];

/// Everything a build step (`deno install`, [`crate::BuildConfinement`])
/// may reach: deno and the system as an isolate has them, its work copy
/// (`Src`) and the download cache (`DenoDir`) read-write; no other host
/// path (the control plane's data dir, its database, other tenants' blobs).
pub static BUILD_RULES: &[Rule] = &[
    Rule { place: Place::Deno, grant: Grant::Execute, reason: "the build's program" },
    Rule { place: Place::Interpreter, grant: Grant::Execute, reason: "the dynamic loader execve runs deno with" },
    Rule { place: Place::Host("/usr"), grant: Grant::Read, reason: "shared libraries" },
    Rule { place: Place::Host("/lib"), grant: Grant::Read, reason: "shared libraries where /lib is not /usr/lib" },
    Rule { place: Place::Host("/lib64"), grant: Grant::Read, reason: "shared libraries where /lib64 is a dir" },
    Rule { place: Place::Host("/etc/ld.so.cache"), grant: Grant::Read, reason: "the dynamic loader's library index" },
    Rule { place: Place::Host("/etc/resolv.conf"), grant: Grant::Read, reason: "DNS, to reach the registries" },
    Rule { place: Place::Host("/etc/hosts"), grant: Grant::Read, reason: "static host names (getaddrinfo)" },
    Rule { place: Place::Host("/etc/nsswitch.conf"), grant: Grant::Read, reason: "how getaddrinfo resolves" },
    Rule { place: Place::Host("/etc/host.conf"), grant: Grant::Read, reason: "resolver options" },
    Rule { place: Place::Host("/etc/gai.conf"), grant: Grant::Read, reason: "getaddrinfo address ordering" },
    Rule { place: Place::Host("/etc/services"), grant: Grant::Read, reason: "service names in getaddrinfo" },
    Rule { place: Place::Host("/etc/ssl"), grant: Grant::Read, reason: "CA certificates of the registries" },
    Rule { place: Place::Host("/etc/ca-certificates"), grant: Grant::Read, reason: "CA certificates (Debian)" },
    Rule { place: Place::Host("/etc/pki"), grant: Grant::Read, reason: "CA certificates (RPM systems)" },
    Rule { place: Place::Host("/dev/null"), grant: Grant::ReadWrite, reason: "its stdin; a sink" },
    Rule { place: Place::Host("/dev/urandom"), grant: Grant::Read, reason: "randomness" },
    Rule {
        place: Place::Src,
        grant: Grant::ReadWriteLinks,
        reason: "the deployment's work copy, where node_modules (npm's symlinked layout) and vendor are written",
    },
    Rule {
        place: Place::DenoDir,
        grant: Grant::ReadWrite,
        reason: "deno's download cache (registry answers, packages)",
    },
];

/// A TCP port an isolate may use ([`TCP_RULES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpPlace {
    /// The runner's egress proxy (in a network namespace: its listener
    /// there, on the same port).
    EgressProxy,
}

#[derive(Debug)]
pub struct TcpRule {
    pub place: TcpPlace,
    pub access: AccessNet,
    pub reason: &'static str,
}

/// Landlock's TCP rules (ABI 4+): every `bind` and `connect` is denied but
/// these. Denied, and why: `bind` — `Deno.listen` would serve clients on the
/// host directly, around routing and metering; `connect` — `Deno.connect`
/// and `Deno.createHttpClient` would reach the host and its network around
/// the egress proxy (its internal-address rule, hop bound and counters).
/// Landlock rules name ports, not addresses: the proxy's port is open on
/// every address, which a network namespace (where only the proxy listens)
/// closes. UDP is not Landlock's to rule.
pub static TCP_RULES: &[TcpRule] = &[TcpRule {
    place: TcpPlace::EgressProxy,
    access: AccessNet::ConnectTcp,
    reason: "outbound HTTP(S) leaves through the runner's egress proxy (HTTP_PROXY), and nothing else",
}];

/// Which of [`TCP_RULES`] apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRules {
    /// The egress proxy's port; `None` (no proxy: isolates call out
    /// directly, checked by deno only): `connect` is not ruled, `bind` is.
    pub proxy_port: Option<u16>,
}

impl TcpRules {
    fn handled(&self) -> BitFlags<AccessNet> {
        match self.proxy_port {
            Some(_) => AccessNet::BindTcp | AccessNet::ConnectTcp,
            None => AccessNet::BindTcp.into(),
        }
    }
}

/// The first Landlock ABI with TCP rules.
const ABI_TCP: i32 = 4;

/// Landlock as the operator turned it on: checked against the kernel once.
#[derive(Debug, Clone)]
pub struct LandlockPolicy {
    abi: i32,
    interpreter: Option<PathBuf>,
    tcp: Option<TcpRules>,
}

impl LandlockPolicy {
    /// Fails when the kernel has no Landlock, or deno's interpreter cannot
    /// be read.
    pub fn new(deno: &Path) -> Result<Self, LandlockError> {
        let abi = kernel_abi();
        let probe: Option<OwnedFd> = Ruleset::default().handle_access(AccessFs::from_all(ABI::V1))?.create()?.into();
        if abi < 1 || probe.is_none() {
            return Err(LandlockError::Unsupported);
        }
        let interpreter = elf_interpreter(deno)
            .map_err(|source| LandlockError::Interpreter { path: deno.to_owned(), source })?
            .map(|p| p.canonicalize().unwrap_or(p));
        Ok(Self { abi, interpreter, tcp: None })
    }

    /// The kernel's Landlock ABI version.
    pub fn abi(&self) -> i32 {
        self.abi
    }

    /// Adds [`TCP_RULES`] (a kernel older than ABI 4 has none:
    /// [`LandlockPolicy::tcp_summary`] says so).
    pub fn with_tcp(mut self, rules: TcpRules) -> Self {
        self.tcp = Some(rules);
        self
    }

    /// The TCP rules in force, for the start-up line: `connect-proxy-only`
    /// (no bind, connect only to the proxy), `no-bind`, `off`, or
    /// `unsupported-abi-N`.
    pub fn tcp_summary(&self) -> String {
        match self.tcp {
            None => "off".to_owned(),
            Some(_) if self.abi < ABI_TCP => format!("unsupported-abi-{}", self.abi),
            Some(TcpRules { proxy_port: Some(_) }) => "connect-proxy-only".to_owned(),
            Some(TcpRules { proxy_port: None }) => "no-bind".to_owned(),
        }
    }

    /// The TCP rules this kernel enforces.
    fn tcp_in_force(&self) -> Option<TcpRules> {
        self.tcp.filter(|_| self.abi >= ABI_TCP)
    }

    /// The ruleset of one isolate (or, without `files`, of the start-up
    /// probe), ready for [`PreparedRuleset::restrict_self`] in the child.
    pub(crate) fn prepare(
        &self,
        policy: &SandboxPolicy,
        files: Option<&IsolateFiles>,
    ) -> Result<PreparedRuleset, LandlockError> {
        let mut handled = Ruleset::default().handle_access(AccessFs::from_all(ABI_USED))?;
        let tcp = self.tcp_in_force();
        if let Some(tcp) = tcp {
            handled = handled.handle_access(tcp.handled())?;
        }
        let mut ruleset = handled
            // No signals to, and no abstract sockets of, anything outside
            // the isolate (the runner, other isolates).
            .scope(Scope::from_all(ABI_USED))?
            .create()?;
        if let Some(tcp) = tcp {
            ruleset = add_tcp_rules(ruleset, tcp)?;
        }
        let ruleset = add_rules(ruleset, RULES, |place| match place {
            Place::Host(path) => Some(PathBuf::from(path)),
            Place::Deno => Some(policy.deno.clone()),
            Place::Interpreter => self.interpreter.clone(),
            Place::Harness => Some(policy.harness_dir.clone()),
            Place::DenoDir => Some(files.map_or_else(|| policy.deno_dir.clone(), |f| f.deno_dir.clone())),
            Place::Src => files.map(|f| f.src.clone()),
            Place::Modules => files.map(|f| f.modules.clone()),
            Place::Meta => files.map(|f| f.meta.clone()),
            Place::Run => files.map(|f| f.run.clone()),
        })?;
        let fd: Option<OwnedFd> = ruleset.into();
        Ok(PreparedRuleset { fd: fd.ok_or(LandlockError::Unsupported)? })
    }

    /// The ruleset of a build step ([`BUILD_RULES`]): `deno`, its work copy
    /// `src` and the download cache `cache` (host paths; the same inodes
    /// inside its jail). No TCP rules: it reaches the registries.
    pub(crate) fn prepare_build(
        &self,
        deno: &Path,
        src: &Path,
        cache: &Path,
    ) -> Result<PreparedRuleset, LandlockError> {
        let ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI_USED))?
            .scope(Scope::from_all(ABI_USED))?
            .create()?;
        let ruleset = add_rules(ruleset, BUILD_RULES, |place| match place {
            Place::Host(path) => Some(PathBuf::from(path)),
            Place::Deno => Some(deno.to_owned()),
            Place::Interpreter => self.interpreter.clone(),
            Place::Src => Some(src.to_owned()),
            Place::DenoDir => Some(cache.to_owned()),
            Place::Harness | Place::Modules | Place::Meta | Place::Run => None,
        })?;
        let fd: Option<OwnedFd> = ruleset.into();
        Ok(PreparedRuleset { fd: fd.ok_or(LandlockError::Unsupported)? })
    }
}

/// `rules` on `ruleset`, each at the path `place_of` gives (a missing host
/// path is skipped; any other missing path is an error).
fn add_rules(
    mut ruleset: RulesetCreated,
    rules: &[Rule],
    place_of: impl Fn(Place) -> Option<PathBuf>,
) -> Result<RulesetCreated, LandlockError> {
    {
        for rule in rules {
            let Some(path) = place_of(rule.place) else { continue };
            let is_dir = match std::fs::metadata(&path) {
                Ok(meta) => meta.is_dir(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && matches!(rule.place, Place::Host(_)) => continue,
                Err(source) => return Err(LandlockError::Path { path, source }),
            };
            let fd: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|source| LandlockError::Path { path: path.clone(), source })?
                .into();
            ruleset = ruleset.add_rule(PathBeneath::new(fd, access(rule.grant, is_dir)))?;
        }
    }
    Ok(ruleset)
}

/// [`TCP_RULES`] on a ruleset that handles `rules.handled()`.
fn add_tcp_rules(mut ruleset: RulesetCreated, rules: TcpRules) -> Result<RulesetCreated, LandlockError> {
    for rule in TCP_RULES {
        let port = match rule.place {
            TcpPlace::EgressProxy => rules.proxy_port,
        };
        if let Some(port) = port {
            ruleset = ruleset.add_rule(NetPort::new(port, rule.access))?;
        }
    }
    Ok(ruleset)
}

fn access(grant: Grant, is_dir: bool) -> BitFlags<AccessFs> {
    let wanted = match grant {
        Grant::Read => AccessFs::ReadFile | AccessFs::ReadDir,
        Grant::Execute => AccessFs::ReadFile | AccessFs::Execute,
        Grant::ReadWriteLinks => access(Grant::ReadWrite, true) | AccessFs::MakeSym,
        Grant::ReadWrite => {
            AccessFs::ReadFile
                | AccessFs::ReadDir
                | AccessFs::WriteFile
                | AccessFs::Truncate
                | AccessFs::RemoveFile
                | AccessFs::RemoveDir
                | AccessFs::MakeReg
                | AccessFs::MakeDir
                | AccessFs::MakeSock
                | AccessFs::Refer
        }
    };
    if is_dir { wanted } else { wanted & AccessFs::from_file(ABI_USED) }
}

/// A created ruleset, carried into the child.
#[derive(Debug)]
pub(crate) struct PreparedRuleset {
    fd: OwnedFd,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's UAPI).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

const LANDLOCK_RULE_PATH_BENEATH: libc::c_long = 1;
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
const ACCESS_FS_READ_FILE: u64 = 1 << 2;
const ACCESS_FS_READ_DIR: u64 = 1 << 3;

impl PreparedRuleset {
    /// In the child: allows reading its own `/proc/self`. The descriptor is
    /// deliberately kept open across exec: procfs makes a new inode for
    /// `/proc/<pid>` whenever its dentry is rebuilt, and the open descriptor
    /// pins the dentry the rule was made on. Only `open` and
    /// `landlock_add_rule` run, on static strings and stack values.
    pub(crate) fn allow_proc_self(&self) -> std::io::Result<()> {
        // SAFETY: a NUL-terminated static path; the fd is owned by the
        // process from here on (kept open on purpose, see above).
        let proc_self = unsafe { libc::open(c"/proc/self".as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
        if proc_self < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let attr = PathBeneathAttr { allowed_access: ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR, parent_fd: proc_self };
        // SAFETY: the ruleset fd is open (owned by self); `attr` is a valid
        // landlock_path_beneath_attr on the stack for the whole call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                LANDLOCK_RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0,
            )
        };
        if rc != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// In the child, after `PR_SET_NO_NEW_PRIVS`: enforces the ruleset on
    /// this process and everything it execs. One syscall.
    pub(crate) fn restrict_self(&self) -> std::io::Result<()> {
        // SAFETY: the ruleset fd is open (owned by self); no pointers.
        let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, self.fd.as_raw_fd(), 0) };
        if rc != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }
}

/// The kernel's Landlock ABI version (0 or negative: none).
pub fn kernel_abi() -> i32 {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the
    // version; no memory is read or written.
    let rc = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0, LANDLOCK_CREATE_RULESET_VERSION)
    };
    rc.try_into().unwrap_or(0)
}

/// The `PT_INTERP` of a 64-bit little-endian ELF file (`None`: static).
fn elf_interpreter(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileExt;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a 64-bit ELF: {what}"));
    let file = std::fs::File::open(path)?;
    let mut header = [0u8; 64];
    file.read_exact_at(&mut header, 0)?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(bad("header"));
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let phoff = u64_at(&header, 0x20);
    let phentsize = u64::from(u16_at(&header, 0x36));
    let phnum = u64::from(u16_at(&header, 0x38));
    if phentsize < 56 || phnum > 512 {
        return Err(bad("program headers"));
    }
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.read_exact_at(&mut ph, phoff + i * phentsize)?;
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(ph[..4].try_into().expect("4 bytes")) == PT_INTERP {
            let (offset, size) = (u64_at(&ph, 0x08), u64_at(&ph, 0x20));
            if size == 0 || size > 4096 {
                return Err(bad("PT_INTERP size"));
            }
            let mut name = vec![0u8; size as usize];
            file.read_exact_at(&mut name, offset)?;
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name))));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_rule_has_a_reason_and_appears_once() {
        let mut seen = HashSet::new();
        for rule in RULES {
            assert!(rule.reason.trim().len() >= 10, "{:?} needs a real reason", rule.place);
            assert!(seen.insert(rule.place), "{:?} is listed twice", rule.place);
        }
        // Writable: only the isolate's socket dir and deno's cache.
        let writable: Vec<Place> = RULES.iter().filter(|r| r.grant == Grant::ReadWrite).map(|r| r.place).collect();
        assert_eq!(writable, [Place::Host("/dev/null"), Place::Run, Place::DenoDir]);
        // Nothing of /etc but named files and certificate dirs; never the
        // account databases.
        for rule in RULES {
            if let Place::Host(path) = rule.place {
                assert_ne!(path, "/etc", "all of /etc would expose /etc/passwd, /etc/shadow");
                assert!(!path.starts_with("/proc"), "the isolate reads only its own /proc/self");
                assert!(!["/etc/passwd", "/etc/shadow", "/etc/group"].contains(&path));
            }
        }
    }

    #[test]
    fn every_tcp_rule_has_a_reason_and_appears_once() {
        let mut seen = HashSet::new();
        for rule in TCP_RULES {
            assert!(rule.reason.trim().len() >= 10, "{:?} needs a real reason", rule.place);
            assert!(seen.insert(rule.place), "{:?} is listed twice", rule.place);
            assert_eq!(rule.access, AccessNet::ConnectTcp, "nothing may bind");
        }
    }

    /// Binds and connects from a thread restricted by the TCP rules alone
    /// (Landlock and no_new_privs hold for the calling thread only).
    fn tcp_from_restricted_thread(rules: TcpRules, proxy: SocketAddr, other: SocketAddr) -> [std::io::Result<()>; 3] {
        std::thread::spawn(move || {
            let ruleset = Ruleset::default().handle_access(rules.handled()).unwrap().create().unwrap();
            let ruleset = add_tcp_rules(ruleset, rules).unwrap();
            // SAFETY: prctl with integer arguments, on this thread only.
            assert_eq!(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, 0);
            let status = ruleset.restrict_self().unwrap();
            assert_eq!(status.ruleset, landlock::RulesetStatus::FullyEnforced);
            [
                TcpStream::connect(proxy).map(drop),
                TcpStream::connect(other).map(drop),
                TcpListener::bind("127.0.0.1:0").map(drop),
            ]
        })
        .join()
        .unwrap()
    }

    use std::net::{SocketAddr, TcpListener, TcpStream};

    #[test]
    fn tcp_rules_leave_only_the_proxy_port() {
        if kernel_abi() < ABI_TCP {
            assert!(std::env::var("CI").is_err(), "CI runs on a kernel with Landlock ABI 4+ (here {})", kernel_abi());
            eprintln!("skipped: Landlock ABI {} has no TCP rules", kernel_abi());
            return;
        }
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let (proxy, other) = (proxy.local_addr().unwrap(), other.local_addr().unwrap());
        // The probe: unrestricted, all three work.
        assert!(TcpStream::connect(other).is_ok() && TcpListener::bind("127.0.0.1:0").is_ok());

        let [to_proxy, to_other, bind] =
            tcp_from_restricted_thread(TcpRules { proxy_port: Some(proxy.port()) }, proxy, other);
        assert!(to_proxy.is_ok(), "{to_proxy:?}");
        assert_eq!(to_other.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(bind.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);

        // Without a proxy, connecting is deno's business; binding still not.
        let [to_proxy, to_other, bind] = tcp_from_restricted_thread(TcpRules { proxy_port: None }, proxy, other);
        assert!(to_proxy.is_ok() && to_other.is_ok());
        assert_eq!(bind.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn finds_the_dynamic_loader_of_an_elf_binary() {
        let exe = std::env::current_exe().unwrap();
        let interpreter = elf_interpreter(&exe).unwrap().expect("test binaries are dynamically linked");
        assert!(interpreter.to_string_lossy().contains("ld-"), "{interpreter:?}");
        assert!(elf_interpreter(Path::new("/etc/hostname")).is_err() || !Path::new("/etc/hostname").exists());
    }
}
