//! Turns the operator's sandbox settings into the `SandboxPolicy` every
//! isolate is started with: probes what `auto` layers the machine supports,
//! refuses to start when an `on` layer is missing, sets up the isolate uids
//! (a uid per isolate from a range no account or subordinate range of this
//! host uses), proves the whole policy on a throw-away `deno --version`, and
//! reports every layer in one start-up line.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use isocloud_sandbox::landlock::TcpRules;
use isocloud_sandbox::{
    IsolateIds, IsolateUids, LandlockError, LandlockPolicy, SandboxPolicy, SeccompFilters, UidPool, UidRange, identity,
};

use crate::settings::{IsolateUid, Settings, Toggle};

pub fn policy(
    settings: &Settings,
    deno: &Path,
    state_dir: &Path,
    harness_dir: PathBuf,
    egress_proxy_port: Option<u16>,
) -> anyhow::Result<SandboxPolicy> {
    let mount_namespace = match (settings.mount_namespace, isocloud_sandbox::probe_mount_namespace(deno)) {
        (Toggle::Off, _) => false,
        (_, Ok(())) => true,
        (Toggle::On, Err(e)) => anyhow::bail!("--mount-namespace on, but this runner cannot make one: {e}"),
        (Toggle::Auto, Err(e)) => {
            tracing::warn!(error = %e, "no mount namespace for isolates (needs root); they will see host paths");
            false
        }
    };

    // Same privilege as the mount namespace, and its /proc is a procfs of
    // the isolate's own namespace only inside the jail: on with it.
    let pid_namespace = mount_namespace
        && match isocloud_sandbox::pidns::probe() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "no PID namespace for isolates: they see the runner's pid as their parent");
                false
            }
        };

    let root = identity::runner_is_root();
    let isolate_uids = match settings.isolate_uid {
        IsolateUid::Off => None,
        IsolateUid::Auto if root => Some(uid_per_isolate(settings, UidRange::DEFAULT)?),
        IsolateUid::Auto => {
            tracing::warn!("the runner is not root: isolates run as its own uid");
            None
        }
        IsolateUid::Id(uid) if root => Some(IsolateUids::Shared(IsolateIds { uid, gid: settings.isolate_gid })),
        IsolateUid::Id(uid) => anyhow::bail!("--isolate-uid {uid} needs a root runner (or --isolate-uid off)"),
        IsolateUid::Range(range) if root => Some(uid_per_isolate(settings, range)?),
        IsolateUid::Range(range) => {
            anyhow::bail!("--isolate-uid-range {range} needs a root runner (or --isolate-uid off)")
        }
    };

    // The proxy is the way out of a network namespace: without it, none.
    let network_namespace = match (settings.network_namespace, egress_proxy_port) {
        (Toggle::Off, _) => false,
        (Toggle::Auto, None) => {
            tracing::info!("no network namespace for isolates: the egress proxy is off");
            false
        }
        (mode, _) => match isocloud_sandbox::netns::probe() {
            Ok(()) => true,
            Err(e) if mode == Toggle::On => {
                anyhow::bail!("--network-namespace on, but this runner cannot make one (needs root): {e}")
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "no network namespace for isolates (needs root): raw TCP is held by Landlock's TCP rules only"
                );
                false
            }
        },
    };

    let landlock = match settings.landlock {
        Toggle::Off => None,
        mode => match LandlockPolicy::new(deno) {
            // Bind nothing, connect only to the egress proxy: the second
            // layer under the network namespace, the only one without it.
            Ok(landlock) => Some(landlock.with_tcp(TcpRules { proxy_port: egress_proxy_port })),
            Err(LandlockError::Unsupported) if mode == Toggle::Auto => {
                tracing::warn!("this kernel has no Landlock: isolates' file access rests on deno and the jail");
                None
            }
            Err(e) => anyhow::bail!("--landlock {}: {e}", if mode == Toggle::On { "on" } else { "auto" }),
        },
    };
    let seccomp = if settings.seccomp { Some(SeccompFilters::compile().context("--seccomp on")?) } else { None };

    let deno_dir = state_dir.join("deno-dir");
    std::fs::create_dir_all(&deno_dir)?;
    if isolate_uids.is_some() {
        let umask = identity::normalize_umask();
        if umask & 0o055 != 0 {
            tracing::info!(umask = format!("{umask:03o}"), "umask relaxed to 022: isolates must read their files");
        }
        // The root of the per-deployment cache dirs stays the runner's; each
        // deployment's own folder is handed to the isolate uid at boot. (An
        // older runner handed the root itself over: take it back.)
        use std::os::unix::fs::MetadataExt;
        let runner = std::fs::metadata(state_dir)?;
        std::os::unix::fs::chown(&deno_dir, Some(runner.uid()), Some(runner.gid()))?;
        identity::allow_traversal(&deno_dir)?;
        if !mount_namespace {
            // Isolates reach their files by host path, through the state dir.
            identity::allow_traversal(state_dir)?;
        }
    }

    let policy = SandboxPolicy {
        deno: deno.to_owned(),
        harness_dir,
        deno_dir,
        v8_heap_limit_mb: Some(settings.memory_limit_mb),
        mount_namespace,
        network_namespace,
        pid_namespace,
        isolate_uids,
        landlock,
        seccomp,
        rlimits: settings.rlimits,
    };
    isocloud_sandbox::probe_sandbox(&policy).context(
        "deno does not start under the isolate sandbox on this machine \
         (turn a layer off explicitly: --landlock off, --seccomp off, --rlimits off, --isolate-uid off)",
    )?;
    let landlock_abi = policy.landlock.as_ref().map(LandlockPolicy::abi);
    let landlock_tcp = policy.landlock.as_ref().map_or_else(|| "off".to_owned(), LandlockPolicy::tcp_summary);
    tracing::info!(landlock_abi, "sandbox: {} landlock-tcp={landlock_tcp}", policy.summary());
    Ok(policy)
}

/// A uid per live isolate from `range`, all in `--isolate-gid`. Refuses a
/// range an account or a subordinate range (a rootless container's user
/// namespace) of this host uses: its processes would share uids with
/// isolates, and a new isolate kills whatever runs as its uid.
fn uid_per_isolate(settings: &Settings, range: UidRange) -> anyhow::Result<IsolateUids> {
    let conflicts = isocloud_sandbox::uids::range_conflicts(range, Path::new("/etc"));
    if !conflicts.is_empty() {
        anyhow::bail!(
            "the isolate uid range {range} is in use on this host: {}; pick a range no account uses \
             (--isolate-uid-range FIRST-LAST)",
            conflicts.join(", ")
        );
    }
    // Live isolates, pre-started ones (a few per profile) and isolates
    // still ending each hold one.
    let wanted = settings.max_isolates as u64 + 4 * settings.prestarted_isolates as u64 + 1;
    if range.len() < wanted {
        tracing::warn!(
            range = %range,
            uids = range.len(),
            max_isolates = settings.max_isolates,
            "the isolate uid range is smaller than the isolates this runner may hold: boots past it fail"
        );
    }
    let claims = Path::new(isocloud_sandbox::uids::CLAIMS_DIR);
    let pool = UidPool::new(range, settings.isolate_gid, claims)
        .with_context(|| format!("cannot prepare {} (isolate uid claims)", claims.display()))?;
    Ok(IsolateUids::PerIsolate(pool))
}
