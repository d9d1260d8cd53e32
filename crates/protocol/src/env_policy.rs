//! Which environment variable names a tenant may configure, as data: one
//! entry per refused name or prefix, with its reason, and the common names a
//! prefix would refuse that stay allowed, with theirs.
//!
//! deno never starts with a tenant's envs in its process environment (the
//! harness installs them before tenant code runs), so a name read only at
//! exec or start-up (`LD_PRELOAD`, `DENO_V8_FLAGS`) could no longer act even
//! if it got through. These names are refused anyway, by the runner
//! (`INVALID_ISOLATE_CONFIG`) and by the control plane's env API (a field
//! error), because each is read by deno, V8, the dynamic loader, the C
//! library or a library deno links to change how *they* behave — some lazily,
//! after start-up — and no honest app needs one: a config naming one is an
//! attack or a mistake, and should be told so at once.
//!
//! A name is matched regardless of ASCII case: some readers fold case, and a
//! lower-case twin of a refused name has no honest use either.
//!
//! Not refused, on purpose:
//! - `HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY` (any case): a tenant's own proxy
//!   for its own calls, permission-checked by deno; with the egress proxy the
//!   runner's value is the one deno uses (the harness shows the tenant its own).
//! - `PATH`, `HOME`, `TZ`, `LANG`, `LC_*`, `TMP`, `TEMP`, `NO_COLOR`,
//!   `FORCE_COLOR`, `XDG_*`: read by deno only at start-up, if at all (which
//!   tenant envs never reach), or only by JS; apps set them.
//! - `OTEL_*` other than `OTEL_DENO*`: read by apps' own OpenTelemetry SDKs;
//!   deno's own exporter reads them only once `OTEL_DENO` turned it on.

/// How an entry matches a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvMatch {
    /// The name itself.
    Exact,
    /// Every name that starts with it.
    Prefix,
}

/// A refused name or prefix.
#[derive(Debug)]
pub struct DeniedEnv {
    pub name: &'static str,
    pub matches: EnvMatch,
    pub reason: &'static str,
}

/// A name a prefix of [`DENIED_ENV`] covers that a tenant may still set.
#[derive(Debug)]
pub struct AllowedEnv {
    pub name: &'static str,
    pub reason: &'static str,
}

/// Names and prefixes no tenant may configure.
pub static DENIED_ENV: &[DeniedEnv] = &[
    DeniedEnv {
        name: "LD_",
        matches: EnvMatch::Prefix,
        reason: "the dynamic loader's settings: LD_PRELOAD and LD_AUDIT load native code into deno before any \
                 permission is checked, LD_LIBRARY_PATH swaps its libraries, LD_DEBUG_OUTPUT writes files",
    },
    DeniedEnv {
        name: "GLIBC_TUNABLES",
        matches: EnvMatch::Exact,
        reason: "tunes the C library's loader and allocator at start-up (CVE-2023-4911 ran code through it)",
    },
    DeniedEnv {
        name: "MALLOC_",
        matches: EnvMatch::Prefix,
        reason: "the C library's and jemalloc's allocator settings (MALLOC_CHECK_, MALLOC_PERTURB_, MALLOC_ARENA_MAX, \
                 MALLOC_CONF; MALLOC_TRACE writes a file): the memory layout under V8",
    },
    DeniedEnv {
        name: "GCONV_PATH",
        matches: EnvMatch::Exact,
        reason: "iconv loads its conversion modules (shared objects) from here: native code (the pkexec exploit, \
                 CVE-2021-4034)",
    },
    DeniedEnv {
        name: "LOCPATH",
        matches: EnvMatch::Exact,
        reason: "the C library loads compiled locale data from here: binary files of the tenant's parsed by native code",
    },
    DeniedEnv {
        name: "NLSPATH",
        matches: EnvMatch::Exact,
        reason: "the C library loads message catalogs (printf formats) from here",
    },
    DeniedEnv {
        name: "TZDIR",
        matches: EnvMatch::Exact,
        reason: "the C library reads time zone files from here: binary files of the tenant's parsed by native code",
    },
    DeniedEnv {
        name: "TMPDIR",
        matches: EnvMatch::Exact,
        reason: "where deno and the C library put temporary files; the isolate writes nowhere, and the C library \
                 distrusts it in privileged programs",
    },
    DeniedEnv {
        name: "HOSTALIASES",
        matches: EnvMatch::Exact,
        reason: "the C resolver reads host aliases from a file named here: name resolution by the tenant's file",
    },
    DeniedEnv {
        name: "LOCALDOMAIN",
        matches: EnvMatch::Exact,
        reason: "changes the C resolver's search domains for every name deno resolves",
    },
    DeniedEnv {
        name: "RES_OPTIONS",
        matches: EnvMatch::Exact,
        reason: "changes the C resolver's options (timeouts, attempts, ndots) for every name deno resolves",
    },
    DeniedEnv {
        name: "RESOLV_HOST_CONF",
        matches: EnvMatch::Exact,
        reason: "points the C resolver at another host.conf",
    },
    DeniedEnv {
        name: "NIS_PATH",
        matches: EnvMatch::Exact,
        reason: "NIS+ lookup path of the C library, which distrusts it in privileged programs; no app needs it",
    },
    DeniedEnv {
        name: "GETCONF_DIR",
        matches: EnvMatch::Exact,
        reason: "where the C library's getconf finds its helpers (programs); distrusted in privileged programs",
    },
    DeniedEnv {
        name: "DENO_",
        matches: EnvMatch::Prefix,
        reason: "deno's own settings: DENO_V8_FLAGS (V8 flags, e.g. --allow-natives-syntax), DENO_DIR, \
                 DENO_TLS_CA_STORE and DENO_CERT (TLS trust), DENO_AUTH_TOKENS, DENO_UNSTABLE_*, … — new ones in \
                 every release, so the whole prefix",
    },
    DeniedEnv {
        name: "NODE_",
        matches: EnvMatch::Prefix,
        reason: "deno's Node compatibility reads these: NODE_OPTIONS, NODE_EXTRA_CA_CERTS and NODE_USE_SYSTEM_CA \
                 (TLS trust), NODE_TLS_REJECT_UNAUTHORIZED, NODE_V8_COVERAGE (writes files), NODE_CHANNEL_FD (an \
                 inherited descriptor as IPC), NODE_ICU_DATA, …",
    },
    DeniedEnv {
        name: "V8_",
        matches: EnvMatch::Prefix,
        reason: "reserved for the engine: V8 takes its settings only from the runner (--v8-flags); no app reads these",
    },
    DeniedEnv {
        name: "ICU_",
        matches: EnvMatch::Prefix,
        reason: "ICU (inside V8) loads data and time zone files from ICU_DATA and ICU_TIMEZONE_FILES_DIR: binary \
                 files of the tenant's parsed by native code",
    },
    DeniedEnv {
        name: "RUST_",
        matches: EnvMatch::Prefix,
        reason: "deno's Rust runtime: RUST_MIN_STACK sizes every thread it starts, RUST_LOG turns on its internal \
                 logging, RUST_BACKTRACE what it prints when it fails",
    },
    DeniedEnv {
        name: "OPENSSL_",
        matches: EnvMatch::Prefix,
        reason: "OpenSSL (node:crypto) reads OPENSSL_CONF, which loads engines and providers (shared objects: native \
                 code), OPENSSL_MODULES and OPENSSL_ENGINES",
    },
    DeniedEnv {
        name: "SSL_CERT_FILE",
        matches: EnvMatch::Exact,
        reason: "TLS trust anchors deno's client may load from a file: the tenant would pick which servers deno trusts",
    },
    DeniedEnv {
        name: "SSL_CERT_DIR",
        matches: EnvMatch::Exact,
        reason: "TLS trust anchors deno's client may load from a folder: the tenant would pick which servers deno trusts",
    },
    DeniedEnv {
        name: "SSLKEYLOGFILE",
        matches: EnvMatch::Exact,
        reason: "TLS libraries write every session's secrets to the file named here",
    },
    DeniedEnv {
        name: "NPM_CONFIG_",
        matches: EnvMatch::Prefix,
        reason: "deno's npm resolver reads its registry here (NPM_CONFIG_REGISTRY): an isolate's modules come only \
                 from its layers",
    },
    DeniedEnv {
        name: "OTEL_DENO",
        matches: EnvMatch::Prefix,
        reason: "turns on deno's own OpenTelemetry exporter, which connects out by itself, outside deno's \
                 permission checks",
    },
];

/// Names a prefix of [`DENIED_ENV`] covers that tenants may still set: each
/// common, and read by no one but JS code. Matched exactly (case too).
pub static ALLOWED_ENV: &[AllowedEnv] = &[AllowedEnv {
    name: "NODE_ENV",
    reason: "the most common switch of Node and npm apps (`production`, `development`), read only by the app and \
             its libraries (express, react, …); neither deno nor its Node compatibility reads it",
}];

impl DeniedEnv {
    /// `LD_*` for a prefix, the name itself otherwise.
    pub fn pattern(&self) -> String {
        match self.matches {
            EnvMatch::Exact => self.name.to_owned(),
            EnvMatch::Prefix => format!("{}*", self.name),
        }
    }
}

/// The entry of [`DENIED_ENV`] that refuses `name`, unless [`ALLOWED_ENV`]
/// lets it through.
pub fn denied_env(name: &str) -> Option<&'static DeniedEnv> {
    if ALLOWED_ENV.iter().any(|allowed| allowed.name == name) {
        return None;
    }
    DENIED_ENV.iter().find(|entry| {
        let rule = entry.name.as_bytes();
        let name = name.as_bytes();
        match entry.matches {
            EnvMatch::Exact => name.eq_ignore_ascii_case(rule),
            EnvMatch::Prefix => name.len() >= rule.len() && name[..rule.len()].eq_ignore_ascii_case(rule),
        }
    })
}

/// The env-name rule of tenants: `Err` says why `name` is refused, naming
/// its entry of [`DENIED_ENV`] and the reason.
pub fn check_env_name(name: &str) -> Result<(), String> {
    match denied_env(name) {
        None => Ok(()),
        Some(entry) => Err(format!("{name} may not be set by a tenant ({}: {})", entry.pattern(), entry.reason)),
    }
}

#[cfg(test)]
mod tests;
