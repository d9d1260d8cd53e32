//! Wiring of the built-in control plane into `isocloud serve`: its API and
//! dashboard listener, its host table and certificates for the ingress, its
//! origin for the pool, and the same origin over HTTP for runners on other
//! machines (`--origin-listen`).

use std::sync::Arc;

use anyhow::Context as _;
use isocloud_controlplane::{ControlPlane, ControlPlaneOptions};
use isocloud_ingress::{Certificates, HostRoute, HostRoutes, ListenerBounds, ListenerMetrics};
use tokio::net::TcpListener;
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::settings::{ControlPlaneSettings, OriginListen};

/// How builds run on this node (control-plane deployments, apps mode).
pub fn build_options(
    build: &crate::settings::BuildSettings,
    deno: &std::path::Path,
    cgroups: Option<Arc<isocloud_sandbox::Cgroups>>,
) -> isocloud_controlplane::BuildOptions {
    let mut confinement = isocloud_sandbox::BuildConfinement::available(deno);
    confinement.memory =
        cgroups.map(|cgroups| isocloud_sandbox::BuildMemory { cgroups, limit_bytes: build.memory_limit_bytes });
    isocloud_controlplane::BuildOptions {
        deno: deno.to_owned(),
        npm_registry: build.npm_registry.clone(),
        jsr_registry: build.jsr_registry.clone(),
        allow_import: build.allow_import.clone(),
        timeout: build.timeout,
        max_concurrent: 2,
        confinement,
    }
}

/// How the control plane's listener is served: its bounds (head timeout,
/// body bound, connection caps) and where their breaches are counted.
pub struct ControlListener {
    pub bounds: ListenerBounds,
    pub metrics: ListenerMetrics,
}

/// Opens the control plane (migrations, first admin token) and serves its
/// API and dashboard on `control_listen` within `listener`'s bounds; returns
/// it and the address it listens on (the port of `…:0` picked).
pub async fn start(
    settings: &ControlPlaneSettings,
    build: &crate::settings::BuildSettings,
    public_http_port: u16,
    public_https_port: Option<u16>,
    deno: &std::path::Path,
    cgroups: Option<Arc<isocloud_sandbox::Cgroups>>,
    listener: ControlListener,
) -> anyhow::Result<(Arc<ControlPlane>, std::net::SocketAddr)> {
    // Every field from the settings, whose defaults are the control plane's own.
    let options = ControlPlaneOptions {
        data_dir: settings.data_dir.clone(),
        database_url: settings.database_url.clone(),
        base_domain: settings.base_domain.clone(),
        public_http_port: settings.public_http_port.unwrap_or(public_http_port),
        public_https_port,
        log_retention: settings.log_retention,
        usage_retention: settings.usage_retention,
        max_blob_bytes: settings.max_blob_bytes,
        domain_verify_http_port: settings.domain_verify_http_port,
        dns_resolver: settings.dns_resolver,
        build: Some(build_options(build, deno, cgroups)),
        blob_store: settings.blob_store.clone(),
        blob_gc_grace: settings.blob_gc_grace,
    };
    let store = if settings.database_url.is_some() { "postgres" } else { "sqlite" };
    let blobs = settings.blob_store.as_ref().map_or("the data dir", |s3| s3.url.as_str());
    let control_plane = ControlPlane::open(options).await.with_context(|| {
        format!("cannot open the control plane ({store}, data in {}, blobs in {blobs})", settings.data_dir.display())
    })?;
    if let Some(path) = control_plane.created_admin_token() {
        println!("isocloud: admin token written to {}", path.display());
    }
    tokio::spawn(control_plane.clone().run_background());
    if let Some(acme) = &settings.acme {
        let run = control_plane.start_acme(acme.clone()).context("cannot start ACME")?;
        tokio::spawn(run);
    }

    let tcp = TcpListener::bind(settings.control_listen)
        .await
        .with_context(|| format!("cannot listen on {} (control plane)", settings.control_listen))?;
    let addr = tcp.local_addr()?;
    // Not `axum::serve`: it has no head timeout, body bound or connection
    // caps. The router is served like every other listener of the runner.
    let service = hyper_util::service::TowerToHyperService::new(control_plane.router());
    tokio::spawn(isocloud_ingress::serve_bounded(tcp, listener.bounds, listener.metrics, service));
    tracing::info!(
        %addr,
        store,
        blobs,
        base_domain = settings.base_domain,
        "control plane: API at /api/v1, dashboard at /"
    );
    // Tests and scripts read this line to learn the port of `…:0`.
    println!("isocloud: control plane on http://{addr}");
    Ok((control_plane, addr))
}

/// Serves the control plane's origin RPCs on `origin.addr` for `isocloud
/// runner`s elsewhere: the same origin the pool of this process calls, behind
/// the RPC tokens' check; and the routing feed for `isocloud edge`s. Returns
/// the address (the port of `…:0` picked).
pub async fn start_origin(
    control_plane: &Arc<ControlPlane>,
    origin: &OriginListen,
    listener: ControlListener,
) -> anyhow::Result<std::net::SocketAddr> {
    use isocloud_controlplane::origin_http::{ORIGIN_HTTP_LIMITS, OriginHttp};
    // With the routing feed: edges (`isocloud edge`) follow the host table here.
    let http = OriginHttp::for_control_plane(control_plane, &origin.keys, ORIGIN_HTTP_LIMITS)
        .context("cannot set up the origin listener")?;
    let tcp = TcpListener::bind(origin.addr)
        .await
        .with_context(|| format!("cannot listen on {} (origin RPCs)", origin.addr))?;
    let addr = tcp.local_addr()?;
    // The control listener's head and body timeouts and its cap in all, but
    // no cap per peer: the callers are a few runners, each opening many
    // connections at once (a boot fetches its layers in parallel). What
    // bounds them is the RPC bound behind the token check.
    let mut bounds = listener.bounds;
    bounds.max_connections_per_peer = 0;
    let service = hyper_util::service::TowerToHyperService::new(http.router());
    let scheme = match &origin.tls {
        Some(files) => {
            let acceptor = isocloud_ingress::certificate_files_acceptor(files.clone())
                .context("cannot set up TLS on the origin listener")?;
            tokio::spawn(isocloud_ingress::serve_bounded_tls(tcp, acceptor, bounds, listener.metrics, service));
            "https"
        }
        None => {
            tokio::spawn(isocloud_ingress::serve_bounded(tcp, bounds, listener.metrics, service));
            "http"
        }
    };
    let kids: Vec<&str> = origin.keys.iter().map(|key| key.kid.as_str()).collect();
    tracing::info!(
        %addr,
        kids = ?kids,
        max_concurrent_rpcs = ORIGIN_HTTP_LIMITS.max_concurrent_rpcs,
        "control plane: origin RPCs for remote runners (their --rpc-root {scheme}://{addr}/)"
    );
    // Tests and scripts read this line to learn the port of `…:0`.
    println!("isocloud: origin on {scheme}://{addr}");
    Ok(addr)
}

/// The control plane's host table, as the ingress asks it.
pub struct Hosts {
    pub control_plane: Arc<ControlPlane>,
    /// Redirect to HTTPS only where there is an HTTPS listener to go to.
    pub https: bool,
}

impl HostRoutes for Hosts {
    fn resolve(&self, hostname: &str) -> Option<HostRoute> {
        let found = self.control_plane.resolve_host(hostname)?;
        Some(HostRoute { deployment_id: found.deployment_id, https_only: self.https && found.has_certificate })
    }
}

/// The HTTP-01 answers of the control plane's ACME orders (any node's).
pub struct AcmeChallenges(pub Arc<ControlPlane>);

impl isocloud_ingress::AcmeChallenges for AcmeChallenges {
    fn key_authorization<'a>(
        &'a self,
        host: &'a str,
        token: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + 'a>> {
        Box::pin(self.0.acme_key_authorization(host, token))
    }
}

/// The domains' certificates (uploaded, or ordered by ACME), by SNI.
pub struct Certs(pub Arc<ControlPlane>);

impl Certificates for Certs {
    fn certificate_for(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        self.0.certificate_for(server_name)
    }

    /// Answered whether or not this node orders (as HTTP-01 is): another
    /// node sharing the store may, and the ACME server may reach this one.
    fn acme_tls_alpn_certificate(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        self.0.acme_tls_alpn_certificate(server_name)
    }
}
