//! The boot sequence of one isolate and the hooks it runs with.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use isocloud_egress::EgressProxy;
use isocloud_origin::{AssetTree, DiskCache, Origin, OriginError, StaleBoots, load_deployment_with};
use isocloud_protocol::{ActivityKind, ErrorCode, LogLevel, NetPermission};
use isocloud_sandbox::{Cgroups, EgressRoute, IsolateFiles, SandboxError, SandboxPolicy, SandboxedCommand};
use isocloud_supervisor::{Isolate, IsolateHooks, IsolateLimits, StartError};

use crate::ActivitySink;
use crate::admission::Admission;
use crate::warm::Warm;

/// Why a deployment could not be booted. Cloneable: every request waiting on
/// one boot gets the same answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Origin(Arc<OriginError>),
    #[error(transparent)]
    Sandbox(Arc<SandboxError>),
    #[error(transparent)]
    Start(Arc<StartError>),
    #[error("the runner is shutting down")]
    ShuttingDown,
    #[error("every isolate slot is busy ({0} isolates run); try again shortly")]
    Capacity(usize),
    #[error("too many deployments are starting ({0} wait their turn); try again shortly")]
    BootQueueFull(usize),
    #[error("the deployment waited {0} s for its turn to start; try again shortly")]
    BootQueueTimeout(u64),
    #[error("this tenant's share of the runner is busy ({0} isolates run); try again shortly")]
    TenantCapacity(usize),
    #[error("this tenant's share of the boot queue is full ({0} of its deployments wait to start); try again shortly")]
    TenantBootQueueFull(usize),
}

impl BootError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BootError::Origin(e) => e.code(),
            BootError::Sandbox(e) => match **e {
                SandboxError::BadSpecifier(_) => ErrorCode::LayerFailed,
                // Every isolate uid of the range is held: a full runner.
                ref e if e.is_capacity() => ErrorCode::Capacity,
                _ => ErrorCode::Internal,
            },
            BootError::Start(e) => e.code(),
            BootError::ShuttingDown => ErrorCode::ShuttingDown,
            BootError::Capacity(_)
            | BootError::BootQueueFull(_)
            | BootError::BootQueueTimeout(_)
            | BootError::TenantCapacity(_)
            | BootError::TenantBootQueueFull(_) => ErrorCode::Capacity,
        }
    }
}

pub(crate) struct BootContext {
    /// Built deployments' packages, laid out once per set.
    pub packages: Arc<crate::packages::PackageStore>,
    pub npm_registry: crate::NpmRegistry,
    pub cache: Arc<DiskCache>,
    pub policy: SandboxPolicy,
    pub instances_dir: PathBuf,
    pub start_timeout: std::time::Duration,
    pub limits: IsolateLimits,
    /// Memory cgroups for isolates; `None` where no controller is usable.
    pub cgroups: Option<Arc<Cgroups>>,
    pub activity: ActivitySink,
    /// The runner's egress proxy; `None`: isolates call out directly
    /// (deno's allow-list is then the only check).
    pub egress: Option<EgressProxy>,
    /// Pre-started isolates; `None`: every boot starts its own process.
    pub warm: Option<Arc<Warm>>,
    /// Turns to start a deno process (see `admission`).
    pub admission: Arc<Admission>,
    pub metrics: crate::PoolMetrics,
    /// How old a kept boot answer may be to stand in for the origin's.
    pub stale: StaleBoots,
    /// Where the deployments' log lines go besides their origins.
    pub log_tap: Option<crate::LogTap>,
}

/// What the pre-started pool had for a boot.
enum Prestart {
    /// No pre-started isolates, or not for this boot (the runner's own).
    Off,
    /// Its code cache beats a pre-started isolate (see [`code_cache_wins`]).
    CodeCache,
    /// None waiting for its profile.
    Miss,
    /// The deployment needs a process of its own.
    Unfit,
    Hit(Box<isocloud_supervisor::Prestarted>),
}

impl Prestart {
    fn label(&self) -> &'static str {
        match self {
            Prestart::Off => "off",
            Prestart::CodeCache => "code_cache",
            Prestart::Miss => "miss",
            Prestart::Unfit => "unfit",
            Prestart::Hit(_) => "hit",
        }
    }
}

/// Takes a pre-started isolate for `deployment` if one waits and fits.
fn take_prestarted(
    ctx: &BootContext,
    tenant: bool,
    deployment_id: &str,
    deployment: &isocloud_origin::Deployment,
    deno_dir: &std::path::Path,
) -> Prestart {
    let Some(pool) = ctx.warm.as_ref().filter(|_| tenant) else { return Prestart::Off };
    if code_cache_wins(deployment, deno_dir) {
        return Prestart::CodeCache;
    }
    let net = deployment.config.net();
    let set = isocloud_sandbox::package_set_key(&deployment.tree);
    match pool.take(net, set.as_deref()) {
        None => Prestart::Miss,
        Some(prestarted) => match prestarted.files().fits_blank(deployment) {
            Ok(()) => Prestart::Hit(Box::new(prestarted)),
            Err(reason) => {
                tracing::debug!(deployment_id, reason, "booting without a pre-started isolate");
                pool.give_back(net, set.as_deref(), prestarted);
                Prestart::Unfit
            }
        },
    }
}

/// Refills the profile `deployment` boots with: its permissions, and its
/// package set once one boot has laid the set out.
fn refill_for(pool: &Arc<crate::warm::Warm>, deployment: &isocloud_origin::Deployment) {
    match isocloud_sandbox::package_set_key(&deployment.tree) {
        Some(set) => pool.refill_packages(deployment.config.net(), &set, None),
        None => pool.refill(deployment.config.net()),
    }
}

/// A built deployment with no file deno reads at start (deno.json,
/// package.json) can run on an isolate pre-started with its package set.
fn prestartable_with_packages(deployment: &isocloud_origin::Deployment) -> bool {
    !deployment
        .tree
        .entries
        .keys()
        .any(|path| isocloud_sandbox::PROJECT_CONFIG_FILES.iter().any(|f| path.strip_prefix('/') == Some(*f)))
}

/// `tenant`: a deployment's boot, which takes a pre-started isolate when
/// one fits and else waits for its turn to start a deno process; the
/// runner's own template isolate does neither.
pub(crate) async fn boot(
    ctx: &BootContext,
    origin: Arc<dyn Origin>,
    deployment_id: String,
    instance: u64,
    tenant: bool,
) -> Result<(Arc<Isolate>, u64), BootError> {
    let started = Instant::now();
    // Network I/O, not CPU: before admission. The runner's own template
    // isolate keeps no boot answer.
    let stale = if tenant { ctx.stale } else { StaleBoots::OFF };
    let loaded = load_deployment_with(origin.as_ref(), &ctx.cache, &deployment_id, stale)
        .await
        .map_err(|e| BootError::Origin(Arc::new(e)))?;
    if let Some(stale) = &loaded.stale {
        report_stale_boot(ctx, &origin, &deployment_id, stale);
    }
    let deployment = loaded.deployment;
    tracing::debug!(deployment_id, origin_us = started.elapsed().as_micros() as u64, "deployment loaded");
    if let Some(error) = &deployment.tree_error {
        // Boot is the only required RPC: the isolate runs without files.
        tracing::warn!(deployment_id, error, "read_tree failed: the deployment runs without its files");
        let message = format!("isocloud: the origin's read_tree failed ({error}); this isolate has no files");
        ctx.activity.report(
            &origin,
            &deployment_id,
            ActivityKind::Log { level: LogLevel::Error, message, request_id: None },
        );
    }
    let deno_dir = ctx.policy.deno_dir.join(deno_dir_name(origin.name(), &deployment_id));
    let net = deployment.config.net().clone();
    let mut prestart = take_prestarted(ctx, tenant, &deployment_id, &deployment, &deno_dir);
    let mut turn = None;
    if tenant && !matches!(prestart, Prestart::Hit(_)) {
        if let Some(pool) = &ctx.warm {
            // Learns the profile, and may have one ready by our turn.
            refill_for(pool, &deployment);
        }
        turn = Some(ctx.admission.turn(&origin.tenant_of(&deployment_id)).await?);
        if matches!(prestart, Prestart::Miss) {
            prestart = take_prestarted(ctx, tenant, &deployment_id, &deployment, &deno_dir);
        }
    }
    if !matches!(prestart, Prestart::Off) {
        ctx.metrics.prestarted_boots.get_or_create(&vec![("result", prestart.label())]).inc();
    }
    if let Prestart::Hit(prestarted) = prestart {
        // Costs milliseconds: the turn goes to the next in the queue.
        drop(turn);
        let refill = ctx.warm.clone().map(|pool| (pool, deployment.clone()));
        let booted = boot_prestarted(ctx, *prestarted, origin, deployment_id, deployment, &deno_dir).await;
        // Only now: starting the next deno (tens of ms of CPU) must not
        // compete with this deployment's module evaluation.
        if let Some((pool, deployment)) = refill {
            refill_for(&pool, &deployment);
        }
        return booted.map(|isolate| (isolate, started.elapsed().as_millis() as u64));
    }
    let dir = ctx.instances_dir.join(format!("{instance}-{}", sanitize(&deployment_id)));
    let (grant, route) =
        egress_grant(ctx.egress.as_ref(), &format!("{}/{deployment_id}", origin.name()), deployment.config.net());
    // A built deployment's packages and deno.json: on disk before deno starts.
    let project_error =
        |message: String| BootError::Origin(Arc::new(isocloud_origin::OriginError::Unreachable(message)));
    let (packages, lease) = match ctx.packages.ensure(&deployment.tree, &origin, &ctx.cache, &deployment_id).await {
        Ok(Some((dir, lease))) => (Some(dir), Some(lease)),
        Ok(None) => match &deployment.npm {
            // An ESZIP's npm snapshot: its packages from the runner's registry.
            Some(snapshot) => match ctx.packages.ensure_npm(snapshot, &ctx.npm_registry).await {
                Ok((dir, lease)) => (Some(dir), Some(lease)),
                Err(e) => return Err(BootError::Origin(Arc::new(npm_boot_error(e)))),
            },
            None => (None, None),
        },
        Err(e) => return Err(project_error(e)),
    };
    // The set is on disk now: the next never-seen deployment of it may find
    // an isolate started with it.
    if let (Some(pool), Some(dir), Some(set)) =
        (ctx.warm.as_ref().filter(|_| tenant), &packages, isocloud_sandbox::package_set_key(&deployment.tree))
        && prestartable_with_packages(&deployment)
    {
        let lease = Arc::new(ctx.packages.lease(&set, None)) as Arc<dyn std::any::Any + Send + Sync>;
        pool.refill_packages(&net, &set, Some(crate::warm::WarmPackages { key: set.clone(), dir: dir.clone(), lease }));
    }
    let configs = crate::packages::project_configs(&deployment.tree, &origin, &ctx.cache, &deployment_id)
        .await
        .map_err(project_error)?;
    let prepared = {
        let deployment = deployment.clone();
        let dir = dir.clone();
        let policy = ctx.policy.clone();
        let route = route.clone();
        tokio::task::spawn_blocking(move || {
            let mut files = IsolateFiles::prepare(&dir, &deployment, &policy, &deno_dir, route.as_ref())?;
            if packages.is_some() || !configs.is_empty() {
                files.add_project(packages.as_deref(), &configs)?;
            }
            if let (Some(project), Some(lease)) = (files.project.as_mut(), lease) {
                // Held by the isolate's files: its set stays while it runs.
                project.lease = Some(Arc::new(lease));
            }
            Ok(files)
        })
        .await
        .map_err(|e| BootError::Sandbox(Arc::new(SandboxError::Io(std::io::Error::other(e)))))?
    };
    let files = match prepared {
        Ok(files) => files,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(BootError::Sandbox(Arc::new(e)));
        }
    };
    let command = SandboxedCommand::new(&ctx.policy, &files, &deployment.config, route.as_ref());
    let hooks = Arc::new(DeploymentHooks {
        origin,
        deployment_id,
        tree: tree_cell(&deployment),
        files: files.clone(),
        cache: ctx.cache.clone(),
        activity: ctx.activity.clone(),
        keep_tree: stale.enabled(),
        log_tap: ctx.log_tap.clone(),
    });
    let cgroup = match &ctx.cgroups {
        Some(cgroups) => match cgroups.create(&instance.to_string(), ctx.limits.memory_limit_bytes) {
            Ok(cgroup) => Some(cgroup),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(BootError::Sandbox(Arc::new(SandboxError::Io(e))));
            }
        },
        None => None,
    };
    // `start_timeout` counts from here: the wait for a turn is behind us.
    let result = Isolate::start(command, files, hooks, ctx.start_timeout, ctx.limits, cgroup, grant).await;
    drop(turn);
    match result {
        Ok(isolate) => Ok((isolate, started.elapsed().as_millis() as u64)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(BootError::Start(Arc::new(e)))
        }
    }
}

/// A boot from the deployment's kept answer: counted, in the runner's log
/// (with the origin, whose address the visitor never sees) and in the
/// deployment's own (as a warning: it runs on an answer up to
/// `--boot-stale-max-age-s` old).
fn report_stale_boot(
    ctx: &BootContext,
    origin: &Arc<dyn Origin>,
    deployment_id: &str,
    stale: &isocloud_origin::StaleBoot,
) {
    ctx.metrics.stale_boots.inc();
    let age_s = stale.age.as_secs();
    tracing::warn!(
        origin = origin.name(),
        deployment_id,
        age_s,
        code = %stale.cause.code(),
        error = %stale.cause,
        "the origin could not answer boot: booting from the last boot answer"
    );
    let message = format!(
        "isocloud: the origin could not answer ({}); booting from its last boot answer, {age_s} s old",
        stale.cause.code()
    );
    ctx.activity.report(
        origin,
        deployment_id,
        ActivityKind::Log { level: LogLevel::Warning, message, request_id: None },
    );
}

/// Gives `deployment` to a pre-started isolate: its modules and asset tree
/// into the isolate's `/src`, its envs and entrypoint to the harness.
async fn boot_prestarted(
    ctx: &BootContext,
    prestarted: isocloud_supervisor::Prestarted,
    origin: Arc<dyn Origin>,
    deployment_id: String,
    deployment: isocloud_origin::Deployment,
    deno_dir: &std::path::Path,
) -> Result<Arc<Isolate>, BootError> {
    let started = Instant::now();
    let deno_dir = deno_dir.to_owned();
    if let Some(grant) = prestarted.egress() {
        grant.name_deployment(&format!("{}/{deployment_id}", origin.name()));
    }
    let blank = prestarted.files().clone();
    let deployment = Arc::new(deployment);
    let filled = {
        let deployment = deployment.clone();
        tokio::task::spawn_blocking(move || blank.fill(&deployment, &deno_dir))
            .await
            .map_err(|e| BootError::Sandbox(Arc::new(SandboxError::Io(std::io::Error::other(e)))))?
    };
    // On failure `prestarted` drops: killed, its files removed.
    let files = filled.map_err(|e| BootError::Sandbox(Arc::new(e)))?;
    let filled_at = Instant::now();
    let assignment = files.assignment(&deployment);
    let hooks = Arc::new(DeploymentHooks {
        origin,
        deployment_id,
        tree: tree_cell(&deployment),
        files: files.clone(),
        cache: ctx.cache.clone(),
        activity: ctx.activity.clone(),
        keep_tree: ctx.stale.enabled(),
        log_tap: ctx.log_tap.clone(),
    });
    let isolate = prestarted
        .assign(files, hooks, assignment, ctx.start_timeout, ctx.limits)
        .await
        .map_err(|e| BootError::Start(Arc::new(e)))?;
    tracing::debug!(
        fill_us = (filled_at - started).as_micros() as u64,
        assign_us = filled_at.elapsed().as_micros() as u64,
        "pre-started isolate assigned"
    );
    Ok(isolate)
}

/// Code past which a re-boot starts its own deno on the deployment's cache
/// dir rather than taking a pre-started isolate. A pre-started deno opened
/// its own (empty) caches when it started, so it compiles every module
/// again (~130 ms per MB here); a deno of its own starts slower (~30 ms more)
/// but compiles nothing. They break even near 250 KB (bench/eszip_boot.py:
/// a 10 MB deployment re-boots in ~0.19 s instead of ~1.4 s).
pub(crate) const CODE_CACHE_WINS_BYTES: usize = 256 * 1024;

/// Whether `deployment` has compiled before (its deno cache dir exists) and
/// has enough code for that cache to beat a pre-started isolate.
fn code_cache_wins(deployment: &isocloud_origin::Deployment, deno_dir: &std::path::Path) -> bool {
    let code_bytes: usize = deployment.modules.values().map(|module| module.source.len()).sum();
    code_bytes > CODE_CACHE_WINS_BYTES && deno_dir.is_dir()
}

/// An isolate's egress proxy credentials and the route its process is
/// given; none without a proxy or without network (nothing to count, and
/// one probe less at start).
pub(crate) fn egress_grant(
    proxy: Option<&EgressProxy>,
    name: &str,
    net: &NetPermission,
) -> (Option<isocloud_egress::EgressGrant>, Option<EgressRoute>) {
    let grant = match proxy {
        Some(proxy) if !matches!(net, NetPermission::None) => Some(proxy.grant(name, net.clone())),
        _ => None,
    };
    let route = grant.as_ref().map(|grant| EgressRoute {
        proxy_url: grant.proxy_url().to_owned(),
        proxy_authority: grant.proxy_authority().to_owned(),
    });
    (grant, route)
}

/// A deployment's deno cache folder: one per (origin, deployment), so no
/// tenant's cache is another's, and a re-boot finds its code cache.
pub(crate) fn deno_dir_name(origin: &str, deployment_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::new().chain_update(origin).chain_update([0]).chain_update(deployment_id).finalize();
    hex::encode(&digest[..16])
}

/// Keeps instance directory names readable and safe whatever the id is.
fn sanitize(id: &str) -> String {
    let mut out: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(48).collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// A deployment's asset manifest for one isolate: given at boot, or fetched
/// once when the harness first needs it (a failure is kept: no files).
type TreeCell = tokio::sync::OnceCell<Result<Arc<AssetTree>, String>>;

struct DeploymentHooks {
    origin: Arc<dyn Origin>,
    deployment_id: String,
    tree: Arc<TreeCell>,
    files: IsolateFiles,
    cache: Arc<DiskCache>,
    activity: ActivitySink,
    /// Keep the tree once read, for a boot while the origin is down.
    keep_tree: bool,
    log_tap: Option<crate::LogTap>,
}

/// The manifest cell of a boot: filled now unless the tree was deferred.
fn tree_cell(deployment: &isocloud_origin::Deployment) -> Arc<TreeCell> {
    if deployment.tree_deferred {
        Arc::new(TreeCell::new())
    } else {
        Arc::new(TreeCell::new_with(Some(Ok(Arc::new(deployment.tree.clone())))))
    }
}

impl DeploymentHooks {
    /// The manifest: the one given at boot, or `read_tree` (once; a failure
    /// is reported to the origin as an event and kept).
    fn tree(&self) -> BoxFuture<'static, Result<Arc<AssetTree>, String>> {
        let (cell, origin, deployment_id, activity) =
            (self.tree.clone(), self.origin.clone(), self.deployment_id.clone(), self.activity.clone());
        let keep = self.keep_tree.then(|| self.cache.clone());
        Box::pin(async move {
            cell.get_or_init(|| async {
                match origin.read_tree(&deployment_id).await {
                    Ok(tree) => {
                        if let Some(cache) = keep {
                            isocloud_origin::remember_tree(&cache, origin.name(), &deployment_id, &tree).await;
                        }
                        Ok(Arc::new(tree))
                    }
                    Err(e) => {
                        tracing::warn!(deployment_id, error = %e, "read_tree failed: the isolate runs without its files");
                        let message = format!("isocloud: the origin's read_tree failed ({e}); this isolate has no files");
                        let kind = ActivityKind::Log { level: LogLevel::Error, message, request_id: None };
                        activity.report(&origin, &deployment_id, kind);
                        Err(format!("the deployment's files are unavailable: {e}"))
                    }
                }
            })
            .await
            .clone()
        })
    }
}

impl IsolateHooks for DeploymentHooks {
    fn load_tree(&self) -> BoxFuture<'static, Result<(), String>> {
        let tree = self.tree();
        let files = self.files.clone();
        Box::pin(async move {
            let tree = tree.await?;
            tokio::task::spawn_blocking(move || files.write_tree(&tree))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }

    fn log(&self, level: LogLevel, message: String, request_id: Option<String>) {
        tracing::debug!(target: "isocloud::tenant", deployment_id = %self.deployment_id, request_id = request_id.as_deref().unwrap_or(""), ?level, "{message}");
        if let Some(tap) = &self.log_tap {
            (tap.0)(&self.deployment_id, level, &message, request_id.as_deref());
        }
        self.activity.report(&self.origin, &self.deployment_id, ActivityKind::Log { level, message, request_id });
    }

    fn materialize(&self, tree_path: String) -> BoxFuture<'static, Result<(), String>> {
        let origin = self.origin.clone();
        let deployment_id = self.deployment_id.clone();
        let tree = self.tree();
        let files = self.files.clone();
        let cache = self.cache.clone();
        Box::pin(async move {
            let tree = tree.await?;
            let Some((path, size, file_id)) = tree.resolve_file(&tree_path) else {
                return Err(format!("no such asset: {tree_path}"));
            };
            let bytes =
                crate::packages::fetch_file(&origin, &cache, &deployment_id, &tree_path, file_id, size, false).await?;
            let path = path.to_owned();
            tokio::task::spawn_blocking(move || files.materialize_asset(&path, &bytes))
                .await
                .map_err(|e| e.to_string())?
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// How a snapshot's packages that cannot be laid out reach the visitor: a
/// package the registry lacks is the deployment's `MODULE_NOT_FOUND`, a bad
/// snapshot or tarball its layer's fault, a registry that is down the
/// runner's `ORIGIN_UNREACHABLE`.
fn npm_boot_error(error: crate::npm::NpmError) -> isocloud_origin::OriginError {
    use crate::npm::NpmError;
    use isocloud_origin::OriginError;
    match error {
        NpmError::Missing { ref package, .. } => {
            OriginError::ModuleNotFound { specifier: format!("npm:{package}"), context: error.to_string() }
        }
        NpmError::BadSnapshot(_) | NpmError::BadPackage { .. } => {
            OriginError::Layer { layer_id: "npm snapshot".into(), message: error.to_string() }
        }
        NpmError::Registry { .. } | NpmError::Io(_) => OriginError::Unreachable(error.to_string()),
    }
}
