//! The built-in control plane of isocloud: the store of projects, immutable
//! deployments (files as content-addressed blobs), env vars, custom domains
//! with their verification and certificates, logs and usage; the HTTP API
//! of `docs/control-plane-api.md` under `/api/v1` with the dashboard at `/`;
//! and the same store seen as an in-process [`isocloud_origin::Origin`], plus
//! the host → deployment and SNI → certificate tables the runner's edge
//! consults on every request (in memory, no database call on that path).
//! State lives in SQLite (in the data dir) or PostgreSQL (several control
//! plane nodes may share one), blobs in a [`BlobStore`].
//!
//! It must not start isolates or proxy public traffic: the runner (`pool`,
//! `ingress`) does that and asks this crate only "which deployment is this
//! host?", "which certificate for this name?" and the origin RPCs. Every API
//! input is untrusted: each field is checked and refused with an error that
//! names it, and every mutation is one transaction.

mod acme;
mod api;
pub mod blobs;
mod build;
mod certs;
mod dashboard;
mod error;
mod git;
mod ids;
mod origin;
pub mod origin_http;
pub mod private;
mod routing;
mod storage;
mod store;
mod time;
mod validate;
mod verify;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use acme::{
    AcmeOptions, ChallengeKind, DEFAULT_RENEW_BEFORE_DAYS, DEFAULT_RETRY_MIN_S, LETS_ENCRYPT_DIRECTORY,
    key_authorization_digest, tls_alpn_certificate,
};
pub use blobs::{BlobError, BlobGcError, BlobGcReport, BlobStore, DiskBlobStore, S3BlobStore, S3Config};
pub use build::{AppFolderBuilder, BuildFailure, BuildOptions, BuildOutput};
pub use error::{ApiError, ControlPlaneError};
pub use routing::ResolvedHost;
pub use storage::StorageFigures;
pub use store::StoreError;
#[doc(hidden)]
pub use store::{Arg as StoreArg, Sql as StoreSql, hot_queries};

use certs::CertTable;
use routing::{ProjectRoute, RoutingTable};
use store::Store;

/// The control plane's defaults, declared here once: the runner's option
/// table (`isocloud serve --help`, the README) and [`ControlPlaneOptions::new`]
/// both take them from here.
pub mod defaults {
    pub const BASE_DOMAIN: &str = "localhost";
    pub const PUBLIC_HTTP_PORT: u16 = 8080;
    pub const LOG_RETENTION_H: u64 = 72;
    pub const USAGE_RETENTION_D: u64 = 30;
    pub const MAX_BLOB_MB: u64 = 64;
    pub const DOMAIN_VERIFY_HTTP_PORT: u16 = 80;
    /// A blob no deployment references is deleted this long after it was
    /// stored or last confirmed: a day outlasts any deploy in progress.
    pub const BLOB_GC_GRACE_S: u64 = 86_400;
}

/// How the control plane is set up. Units are in the names.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Created on first start: `isocloud.db` (SQLite), `blobs/`, `git/`,
    /// `admin-token`.
    pub data_dir: PathBuf,
    /// `postgres://…`; `None` keeps SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// Projects are `<name>.<base_domain>`.
    pub base_domain: String,
    /// The public HTTP port, for URLs shown to users (`:80` is left out).
    pub public_http_port: u16,
    /// The public HTTPS port, if any. Not shown in URLs yet: the API shows
    /// only base-domain URLs, which stay `http` (certificates are uploaded
    /// for custom domains).
    pub public_https_port: Option<u16>,
    pub log_retention: Duration,
    pub usage_retention: Duration,
    pub max_blob_bytes: u64,
    /// The port of the HTTP-token domain verification (80 in production).
    pub domain_verify_http_port: u16,
    /// The nameserver for domain verification (TXT, and the domain's address
    /// for the HTTP check); `None` uses the system's.
    pub dns_resolver: Option<SocketAddr>,
    /// The build step of deployments made from files (`build`); `None`
    /// keeps them as uploaded.
    pub build: Option<BuildOptions>,
    /// Blobs in an S3-compatible bucket; `None` keeps them in `data_dir/blobs`.
    pub blob_store: Option<S3Config>,
    /// Unreferenced blobs are deleted this long after they were stored or
    /// last confirmed (see `blobs::gc`).
    pub blob_gc_grace: Duration,
}

impl ControlPlaneOptions {
    /// The documented defaults ([`defaults`]), with SQLite in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            database_url: None,
            base_domain: defaults::BASE_DOMAIN.into(),
            public_http_port: defaults::PUBLIC_HTTP_PORT,
            public_https_port: None,
            log_retention: Duration::from_secs(defaults::LOG_RETENTION_H * 3600),
            usage_retention: Duration::from_secs(defaults::USAGE_RETENTION_D * 24 * 3600),
            max_blob_bytes: defaults::MAX_BLOB_MB * 1024 * 1024,
            domain_verify_http_port: defaults::DOMAIN_VERIFY_HTTP_PORT,
            dns_resolver: None,
            build: None,
            blob_store: None,
            blob_gc_grace: Duration::from_secs(defaults::BLOB_GC_GRACE_S),
        }
    }

    fn validate(&self) -> Result<(), ControlPlaneError> {
        if !is_base_domain(&self.base_domain) {
            let base = &self.base_domain;
            return Err(ControlPlaneError::Options(format!("base domain {base:?} is not a lowercase DNS name")));
        }
        if self.max_blob_bytes == 0 {
            return Err(ControlPlaneError::Options("the blob bound must be above 0 bytes".into()));
        }
        if self.blob_gc_grace.is_zero() {
            return Err(ControlPlaneError::Options("the blob GC grace period must be above 0 s".into()));
        }
        Ok(())
    }
}

/// Whether `domain` can be the base domain: a lowercase DNS name (labels of
/// 1–63 of `a-z0-9-`, not starting or ending with `-`, 200 bytes at most,
/// so `<project>-<id>.` still fits in a name).
pub fn is_base_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 200
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Past this many changes since the generation a node loaded, it reloads
/// whole rather than change by change.
const MAX_ROUTING_DELTA: i64 = 10_000;
/// How long the routing change log is kept: a node further behind (down,
/// or partitioned) reloads whole.
const ROUTING_CHANGES_KEPT: Duration = Duration::from_secs(3600);
/// HTTP-01 lookups in the store at once (the rest wait, then route as any
/// other request).
const ACME_CHALLENGE_LOOKUPS: usize = 8;
/// How long an HTTP-01 lookup waits for its turn, and for the store.
const ACME_CHALLENGE_WAIT: Duration = Duration::from_secs(2);
/// How often `run_background` checks whether another node changed routing.
pub(crate) const ROUTING_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// How often old logs, usage and batch ids are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// How often unreferenced blobs are collected (a pass lists the whole
/// store); the first pass comes a tenth of this after start.
const BLOB_GC_INTERVAL: Duration = Duration::from_secs(3600);
const ADMIN_TOKEN_FILE: &str = "admin-token";
/// What an earlier start (or an older version, under a loose umask) may
/// have left readable in the data dir, tightened at every start. Blob
/// files and git mirrors sit in directories made `0700` here.
const PRIVATE_ENTRIES: [(&str, &str); 8] = [
    ("isocloud.db", "database"),
    ("isocloud.db-wal", "database WAL"),
    ("isocloud.db-shm", "database shared memory"),
    ("admin-token", "admin token"),
    ("admin-token.tmp", "admin token"),
    ("blobs", "blob store"),
    ("blobs/tmp", "blob store"),
    ("git", "git mirrors dir"),
];

pub struct ControlPlane {
    options: ControlPlaneOptions,
    store: Store,
    blobs: Arc<dyn BlobStore>,
    routing: RwLock<RoutingTable>,
    certs: RwLock<CertTable>,
    /// The TLS-ALPN-01 challenge certificates pending (any node's orders).
    tls_alpn: RwLock<acme::TlsAlpnTable>,
    /// Serialises table reloads; holds the routing generation last loaded.
    reload: tokio::sync::Mutex<i64>,
    created_admin_token: Option<PathBuf>,
    verifier: verify::Verifier,
    /// Woken when a webhook queued a git build.
    builds: tokio::sync::Notify,
    /// One git mirror is updated by one build at a time.
    git_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    log_follows: AtomicUsize,
    builder: Option<build::Builder>,
    storage: storage::Gauges,
    /// Bounds what the public git webhook reads before it is authenticated.
    webhook_gate: git::WebhookGate,
    /// Recently booted deployments' file listings (see `origin`).
    deployment_files: origin::FilesCache,
    /// Automatic certificates, when this node orders them ([`ControlPlane::start_acme`]).
    acme: std::sync::OnceLock<Arc<acme::Acme>>,
    /// Bounds the store lookups of HTTP-01 answers the public listener asks for.
    challenge_lookups: tokio::sync::Semaphore,
}

impl ControlPlane {
    /// Opens (creating) the data dir and the database, brings the schema up
    /// to date, creates the admin token on a fresh store and loads the
    /// routing and certificate tables.
    pub async fn open(options: ControlPlaneOptions) -> Result<Arc<ControlPlane>, ControlPlaneError> {
        options.validate()?;
        let data_dir_error = |source| ControlPlaneError::DataDir { path: options.data_dir.clone(), source };
        // It holds env var values, private keys and tenants' code: private
        // whatever it was (what an earlier start or a package left open is
        // tightened; see `private`).
        private::ensure_dir(&options.data_dir, "data dir")?;
        let data_dir = std::fs::canonicalize(&options.data_dir).map_err(data_dir_error)?;
        let options = ControlPlaneOptions { data_dir, ..options };
        for (entry, what) in PRIVATE_ENTRIES {
            private::tighten_existing(&options.data_dir.join(entry), what)?;
        }
        private::ensure_dir(&options.data_dir.join("git"), "git mirrors dir")?;

        let blobs: Arc<dyn BlobStore> = match &options.blob_store {
            Some(s3) => Arc::new(S3BlobStore::open(s3, options.blob_gc_grace).await?),
            None => Arc::new(DiskBlobStore::open(options.data_dir.join("blobs"))?.with_gc_grace(options.blob_gc_grace)),
        };
        let store = Store::open(options.database_url.as_deref(), &options.data_dir.join("isocloud.db")).await?;
        let created_admin_token = create_admin_token(&store, &options.data_dir).await?;
        let verifier = verify::Verifier::new(options.dns_resolver, options.domain_verify_http_port);
        let builder = match &options.build {
            Some(build) => Some(
                build::Builder::new(build.clone(), &options.data_dir)
                    .map_err(|source| ControlPlaneError::DataDir { path: options.data_dir.join("builds"), source })?,
            ),
            None => None,
        };
        let cp = Arc::new(ControlPlane {
            options,
            store,
            blobs,
            routing: RwLock::new(RoutingTable::default()),
            certs: RwLock::new(CertTable::default()),
            tls_alpn: RwLock::new(acme::TlsAlpnTable::default()),
            reload: tokio::sync::Mutex::new(i64::MIN),
            created_admin_token,
            verifier,
            builds: tokio::sync::Notify::new(),
            git_locks: std::sync::Mutex::new(HashMap::new()),
            log_follows: AtomicUsize::new(0),
            builder,
            storage: storage::Gauges::default(),
            webhook_gate: git::WebhookGate::new(),
            deployment_files: origin::FilesCache::default(),
            acme: std::sync::OnceLock::new(),
            challenge_lookups: tokio::sync::Semaphore::new(ACME_CHALLENGE_LOOKUPS),
        });
        cp.reload_routing(true).await?;
        cp.measure_storage().await;
        Ok(cp)
    }

    /// The admin token file, when this start created it.
    pub fn created_admin_token(&self) -> Option<&Path> {
        self.created_admin_token.as_deref()
    }

    /// `/api/v1/*` and the dashboard.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        api::router(Arc::clone(self))
            .merge(dashboard::router())
            .layer(axum::middleware::from_fn_with_state(Arc::clone(self), storage::log_storage_full))
    }

    /// The store as the runner's origin.
    pub fn origin(self: &Arc<Self>) -> Arc<dyn isocloud_origin::Origin> {
        Arc::new(origin::ControlPlaneOrigin { control_plane: Arc::clone(self) })
    }

    /// The deployment serving `hostname` (lowercase, no port). In memory.
    pub fn resolve_host(&self, hostname: &str) -> Option<ResolvedHost> {
        let deployment_id = self.routing.read().unwrap_or_else(|p| p.into_inner()).resolve(hostname)?.to_owned();
        Some(ResolvedHost { deployment_id, has_certificate: self.certificate_for(hostname).is_some() })
    }

    /// The certificate for an SNI server name: exact, then a one-label
    /// wildcard. In memory.
    pub fn certificate_for(&self, server_name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.certs.read().unwrap_or_else(|p| p.into_inner()).lookup(server_name)
    }

    /// The TLS-ALPN-01 challenge certificate (RFC 8737) pending for an SNI
    /// server name, for a ClientHello offering ALPN `acme-tls/1` only: any
    /// node's order, exact name, unexpired. In memory.
    pub fn acme_tls_alpn_certificate(&self, server_name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.tls_alpn.read().unwrap_or_else(|p| p.into_inner()).lookup(server_name, time::now_ms())
    }

    /// Turns automatic certificates on for this node; returns the loop to
    /// spawn (it runs forever). Every node sharing the store may run one:
    /// a lease row per domain keeps their orders apart.
    pub fn start_acme(
        self: &Arc<Self>,
        options: AcmeOptions,
    ) -> Result<impl std::future::Future<Output = ()> + Send + 'static, ControlPlaneError> {
        let acme = Arc::new(acme::Acme::new(options).map_err(ControlPlaneError::Options)?);
        if self.acme.set(Arc::clone(&acme)).is_err() {
            return Err(ControlPlaneError::Options("ACME is already on".into()));
        }
        Ok(acme.run(Arc::clone(self)))
    }

    /// Tells this node's ACME loop to look for work now (a domain was
    /// verified, a certificate deleted).
    pub(crate) fn acme_wake(&self) {
        if let Some(acme) = self.acme.get() {
            acme.wake();
        }
    }

    /// The HTTP-01 answer (RFC 8555 §8.3) for `token` on `host`, if that
    /// token is pending for that host in the store (any node may have
    /// ordered it). Lookups are bounded in number and time: one that waits
    /// too long answers `None`, and the request routes as any other.
    pub async fn acme_key_authorization(&self, host: &str, token: &str) -> Option<String> {
        if !acme::is_token(token) || host.len() > 253 {
            return None;
        }
        let permit = tokio::time::timeout(ACME_CHALLENGE_WAIT, self.challenge_lookups.acquire()).await.ok()?.ok()?;
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let lookup = async {
            let mut conn = self.store.read().await.ok()?;
            store::acme::challenge(&mut conn, &host, token, time::now_ms()).await.ok().flatten()
        };
        let answer = tokio::time::timeout(ACME_CHALLENGE_WAIT, lookup).await.ok().flatten();
        drop(permit);
        answer
    }

    /// Log follow streams open now (they end when their client goes away).
    pub fn active_log_follows(&self) -> usize {
        self.log_follows.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs forever: git builds, reloading the routing and certificate
    /// tables when another node changed them, and pruning old logs, usage
    /// and batch ids. Dropping the future stops it (builds already running
    /// finish on their own).
    pub async fn run_background(self: Arc<Self>) {
        let builds = Arc::clone(&self).build_loop();
        let reload = async {
            loop {
                tokio::time::sleep(ROUTING_RELOAD_INTERVAL).await;
                if let Err(e) = self.reload_routing(false).await {
                    tracing::warn!(target: "isocloud::controlplane", error = %e, "reloading routing failed");
                }
            }
        };
        let prune = async {
            loop {
                if let Err(e) = self.prune().await {
                    tracing::warn!(target: "isocloud::controlplane", error = %e, "pruning failed");
                }
                tokio::time::sleep(PRUNE_INTERVAL).await;
            }
        };
        let measure = async {
            loop {
                tokio::time::sleep(storage::REFRESH_INTERVAL).await;
                self.measure_storage().await;
            }
        };
        let collect_blobs = async {
            tokio::time::sleep(BLOB_GC_INTERVAL / 10).await;
            loop {
                if let Err(e) = self.collect_blob_garbage().await {
                    tracing::warn!(target: "isocloud::controlplane", error = %e, "collecting unreferenced blobs failed");
                }
                tokio::time::sleep(BLOB_GC_INTERVAL).await;
            }
        };
        tokio::join!(builds, reload, prune, measure, collect_blobs);
    }

    /// One blob garbage collection pass (`run_background` runs one hourly):
    /// deletes the blobs no deployment references that are past their grace
    /// period. Safe while other nodes serve and collect (see `blobs::gc`).
    pub async fn collect_blob_garbage(&self) -> Result<BlobGcReport, BlobGcError> {
        let started = std::time::Instant::now();
        let report =
            blobs::collect(self.blobs.as_ref(), &self.store, self.options.blob_gc_grace, std::time::SystemTime::now())
                .await?;
        if report.deleted > 0 {
            tracing::info!(
                target: "isocloud::controlplane",
                store = self.blobs.describe(),
                deleted = report.deleted,
                deleted_bytes = report.deleted_bytes,
                scanned = report.scanned,
                ms = started.elapsed().as_millis() as u64,
                "collected unreferenced blobs"
            );
        }
        Ok(report)
    }

    /// Deletes what is past its retention now.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        let now = time::now_ms();
        let logs_before = now - time::duration_ms(self.options.log_retention);
        let usage_before = now - time::duration_ms(self.options.usage_retention);
        // A batch id must be remembered as long as its events are kept.
        let batches_before = logs_before.min(usage_before);
        let deleted = store::activity::prune(&self.store, logs_before, usage_before, batches_before).await?;
        let mut tx = self.store.write().await?;
        store::prune_routing_changes(&mut tx, now - time::duration_ms(ROUTING_CHANGES_KEPT)).await?;
        store::audit::prune(&mut tx, now - store::audit::RETENTION_MS).await?;
        tx.commit().await?;
        if deleted > 0 {
            tracing::info!(target: "isocloud::controlplane", rows = deleted, "pruned old logs and usage");
        }
        Ok(deleted)
    }

    /// Brings the routing and certificate tables up to the database: with
    /// `force`, rebuilt whole (at start); otherwise only the projects,
    /// deployments and domains the change log names past the generation
    /// loaded, or whole when the log no longer reaches back that far.
    pub(crate) async fn reload_routing(&self, force: bool) -> Result<(), StoreError> {
        let mut loaded = self.reload.lock().await;
        let mut conn = self.store.read().await?;
        // The generation is read before the rows: a change committed in
        // between is loaded now and again next time, never missed.
        let generation = store::routing_generation(&mut conn).await?;
        if !force && generation == *loaded {
            return Ok(());
        }
        if !force && *loaded != i64::MIN {
            let changes = store::routing_changes_since(&mut conn, *loaded, MAX_ROUTING_DELTA + 1).await?;
            // Every generation up to the one read is in the log (none pruned,
            // none bumped without a note), and not too many to apply one by one.
            let contiguous = changes.first().is_some_and(|(first, _)| *first == *loaded + 1)
                && changes.windows(2).all(|pair| pair[1].0 - pair[0].0 <= 1)
                && changes.last().is_some_and(|(last, _)| *last >= generation);
            if contiguous && changes.len() as i64 <= MAX_ROUTING_DELTA {
                let newest = changes.last().map_or(generation, |(g, _)| *g);
                let touched: std::collections::HashSet<store::Touched> = changes.into_iter().map(|(_, t)| t).collect();
                self.apply_routing_changes(&mut conn, touched).await?;
                *loaded = newest;
                return Ok(());
            }
        }
        let mut routing = RoutingTable::new(&self.options.base_domain);
        for (id, name, production_deployment_id) in store::projects::routing_rows(&mut conn).await? {
            routing.put_project(&id.clone(), Some(ProjectRoute { id, name, production_deployment_id }));
        }
        // Streamed into the table: a million rows never sit in memory at once.
        store::deployments::each_routing_row(&mut conn, |id, project| routing.put_deployment(&id, Some(&project)))
            .await?;
        for (domain, project) in store::domains::routing_rows(&mut conn).await? {
            routing.put_domain(&domain, Some(&project));
        }
        let cert_rows = store::domains::certificate_rows(&mut conn).await?;
        let max_tls_alpn = i64::try_from(acme::MAX_TLS_ALPN_CHALLENGES).unwrap_or(i64::MAX);
        let tls_alpn_rows = store::acme::tls_alpn_challenges(&mut conn, time::now_ms(), max_tls_alpn).await?;
        drop(conn);
        routing.report_collisions();
        let certs = CertTable::build(&cert_rows, &self.options.base_domain);
        // Built outside the lock: handshakes keep reading the old one.
        let tls_alpn = self.tls_alpn.read().unwrap_or_else(|p| p.into_inner()).rebuilt(&tls_alpn_rows);
        *self.routing.write().unwrap_or_else(|p| p.into_inner()) = routing;
        *self.certs.write().unwrap_or_else(|p| p.into_inner()) = certs;
        *self.tls_alpn.write().unwrap_or_else(|p| p.into_inner()) = tls_alpn;
        *loaded = generation;
        Ok(())
    }

    /// Reads what each touched subject is now, then patches the tables
    /// (the reads first: no lock is held across the database).
    async fn apply_routing_changes(
        &self,
        conn: &mut sqlx::AnyConnection,
        touched: std::collections::HashSet<store::Touched>,
    ) -> Result<(), StoreError> {
        let mut projects = Vec::new();
        let mut deployments = Vec::new();
        let mut domains = Vec::new();
        let mut tls_alpn = Vec::new();
        let mut project_ids: std::collections::HashSet<String> = std::collections::HashSet::new();
        for subject in &touched {
            match subject {
                store::Touched::Project(id) => {
                    project_ids.insert(id.clone());
                }
                store::Touched::Deployment(id) => {
                    let project = store::deployments::routing_of(conn, id).await?;
                    if let Some(project) = &project {
                        // A project routing has not seen yet (new since).
                        let known = self.routing.read().unwrap_or_else(|p| p.into_inner()).has_project(project);
                        if !known {
                            project_ids.insert(project.clone());
                        }
                    }
                    deployments.push((id.clone(), project));
                }
                store::Touched::Domain(domain) => {
                    domains.push((domain.clone(), store::domains::routing_of(conn, domain).await?));
                    tls_alpn
                        .push((domain.clone(), store::acme::tls_alpn_challenge(conn, domain, time::now_ms()).await?));
                }
            }
        }
        for id in project_ids {
            let route = store::projects::routing_of(conn, &id).await?.map(|(name, production_deployment_id)| {
                ProjectRoute { id: id.clone(), name, production_deployment_id }
            });
            projects.push((id, route));
        }
        {
            let mut routing = self.routing.write().unwrap_or_else(|p| p.into_inner());
            for (id, route) in projects {
                routing.put_project(&id, route);
            }
            for (id, project) in &deployments {
                routing.put_deployment(id, project.as_deref());
            }
            for (domain, (project, _)) in &domains {
                routing.put_domain(domain, project.as_deref());
            }
        }
        {
            let mut certs = self.certs.write().unwrap_or_else(|p| p.into_inner());
            for (domain, (_, cert)) in &domains {
                certs.put(domain, cert.as_ref(), &self.options.base_domain);
            }
        }
        if !tls_alpn.is_empty() {
            // A challenge certificate is made here (a P-256 key, well under a
            // millisecond) under the lock; an order's writes are few.
            let now = time::now_ms();
            let mut table = self.tls_alpn.write().unwrap_or_else(|p| p.into_inner());
            for (domain, row) in &tls_alpn {
                table.put(domain, row.as_ref(), now);
            }
            tracing::debug!(target: "isocloud::controlplane", pending = table.len(), "acme: tls-alpn-01 challenges loaded");
        }
        Ok(())
    }

    /// After a mutation: the change is committed, so a failure here is only
    /// logged (the periodic reload catches up).
    pub(crate) async fn reload_routing_logged(&self) {
        if let Err(e) = self.reload_routing(false).await {
            tracing::warn!(target: "isocloud::controlplane", error = %e, "reloading routing after a change failed");
        }
    }
}

/// On a store without tokens: writes a new admin token to
/// `<data dir>/admin-token` (mode 0600), then stores its hash. Two nodes
/// racing on a fresh database: one insert wins, the loser removes its file.
async fn create_admin_token(store: &Store, data_dir: &Path) -> Result<Option<PathBuf>, ControlPlaneError> {
    let mut conn = store.read().await?;
    if store::tokens::count(&mut conn).await? > 0 {
        return Ok(None);
    }
    drop(conn);
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let token = ids::secret_token();
    write_secret_file(&path, &token).map_err(|source| ControlPlaneError::AdminToken { path: path.clone(), source })?;
    let mut tx = store.write().await?;
    let inserted = store::tokens::insert_if_absent(
        &mut tx,
        store::tokens::ADMIN_TOKEN_NAME,
        &ids::sha256_hex(token.as_bytes()),
        time::now_ms(),
    )
    .await?;
    tx.commit().await?;
    if inserted {
        Ok(Some(path))
    } else {
        let _ = std::fs::remove_file(&path);
        Ok(None)
    }
}

/// Writes `content` to `path` with mode 0600: a temp file, fsynced, renamed.
fn write_secret_file(path: &Path, content: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.write_all(format!("{content}\n").as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod routing_change_tests {
    use super::*;
    use crate::store::deployments::{NewDeployment, Status};

    async fn ready(cp: &ControlPlane, project_id: &str, id: &str) {
        let mut tx = cp.store.write().await.unwrap();
        store::deployments::insert(
            &mut tx,
            &NewDeployment {
                id: id.into(),
                project_id: project_id.into(),
                created_at_ms: 0,
                status: Status::Ready,
                entrypoint: "main.ts".into(),
                eszip_sha256: None,
                permissions_json: "null".into(),
                envs: Default::default(),
                git: None,
                files: Vec::new(),
                build_promote: false,
                error: None,
                build_log: None,
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn a_node_follows_the_change_log_and_reloads_whole_once_it_no_longer_reaches_back() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(ControlPlaneOptions::new(dir.path().to_owned())).await.unwrap();
        let name = |n: &str| crate::validate::project_name(n).unwrap();
        let mut tx = cp.store.write().await.unwrap();
        store::projects::insert(&mut tx, "p1", &name("hello"), 0).await.unwrap();
        tx.commit().await.unwrap();
        ready(&cp, "p1", "aaaaaaaaaaaa").await;
        // Another node's write: this node learns it from the log alone.
        cp.reload_routing(false).await.unwrap();
        assert_eq!(cp.resolve_host("hello-aaaaaaaaaaaa.localhost").unwrap().deployment_id, "aaaaaaaaaaaa");
        assert_eq!(
            *cp.reload.lock().await,
            store::routing_generation(&mut cp.store.read().await.unwrap()).await.unwrap()
        );

        let mut tx = cp.store.write().await.unwrap();
        store::projects::rename(&mut tx, "p1", &name("hi"), 1).await.unwrap();
        tx.commit().await.unwrap();
        ready(&cp, "p1", "bbbbbbbbbbbb").await;
        // The log no longer reaches back to this node's generation.
        let mut tx = cp.store.write().await.unwrap();
        assert!(store::prune_routing_changes(&mut tx, i64::MAX).await.unwrap() >= 2);
        tx.commit().await.unwrap();
        cp.reload_routing(false).await.unwrap();
        assert!(cp.resolve_host("hello-aaaaaaaaaaaa.localhost").is_none());
        assert_eq!(cp.resolve_host("hi-aaaaaaaaaaaa.localhost").unwrap().deployment_id, "aaaaaaaaaaaa");
        assert_eq!(cp.resolve_host("hi-bbbbbbbbbbbb.localhost").unwrap().deployment_id, "bbbbbbbbbbbb");

        // Deleted: its hosts go, by the log again.
        let mut tx = cp.store.write().await.unwrap();
        store::projects::delete(&mut tx, "p1").await.unwrap();
        tx.commit().await.unwrap();
        let changes = store::routing_changes_since(&mut cp.store.read().await.unwrap(), *cp.reload.lock().await, 10)
            .await
            .unwrap();
        let touched: std::collections::HashSet<store::Touched> = changes.into_iter().map(|(_, t)| t).collect();
        let expected = [
            store::Touched::Deployment("aaaaaaaaaaaa".into()),
            store::Touched::Deployment("bbbbbbbbbbbb".into()),
            store::Touched::Project("p1".into()),
        ];
        assert_eq!(touched, expected.into_iter().collect(), "the project and each of its ready deployments");
        cp.reload_routing(false).await.unwrap();
        assert!(cp.resolve_host("hi-aaaaaaaaaaaa.localhost").is_none());
        assert!(cp.resolve_host("hi-bbbbbbbbbbbb.localhost").is_none());
    }
}
