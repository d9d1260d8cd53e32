//! Wiring of `isocloud edge`: the host table and its follower, the runners
//! and their health checks, the public and admin listeners, and a graceful
//! stop. What each part does is `isocloud-edge`'s.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use isocloud_edge::{
    AcmeLookup, CertificateFeed, Edge, EdgeCertificates, FailoverRoots, Follower, ForwardOptions, HostTable, Metrics,
    RunnerClients, Runners,
};
use isocloud_ingress::ListenerMetrics;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::settings::EdgeSettings;

/// How often `--runners-file` is looked at.
const RUNNERS_FILE_LOOK: Duration = Duration::from_secs(1);

/// The file's modification time and length, to notice a change.
fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Replaces the runner list whenever `path` changes (a Kubernetes ConfigMap
/// swaps its files; an operator edits one). A list that does not read or
/// parse keeps the one before, and says why.
async fn follow_runners_file(path: std::path::PathBuf, runners: Arc<Runners>) {
    let mut seen = file_stamp(&path);
    loop {
        tokio::time::sleep(RUNNERS_FILE_LOOK).await;
        let now = file_stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let listed = match tokio::fs::read_to_string(&path).await {
            Ok(text) => isocloud_edge::parse_runner_list(&text),
            Err(e) => Err(e.to_string()),
        };
        let changed = listed.and_then(|urls| runners.replace(&urls).map_err(|e| e.to_string()));
        match changed {
            Ok(changed) if changed.added.is_empty() && changed.removed.is_empty() => {}
            Ok(changed) => tracing::info!(
                target: "isocloud::edge",
                added = ?changed.added,
                removed = ?changed.removed,
                runners = runners.list().len(),
                "runners file changed: the list is replaced (deployments move only to or from the runners added or removed)"
            ),
            Err(e) => tracing::warn!(
                target: "isocloud::edge",
                file = %path.display(),
                error = %e,
                "runners file changed but does not read as a list: the runners stay as they were"
            ),
        }
    }
}

pub async fn run(settings: EdgeSettings) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let listener_metrics = ListenerMetrics::new(&mut registry);

    let table = Arc::new(RwLock::new(HostTable::default()));
    // One set of roots for the routing feed, the certificates and the ACME
    // lookups: the node the feed last reached is the one the others ask.
    let roots = Arc::new(
        FailoverRoots::new(settings.rpc_root.clone(), settings.rpc_root_fallbacks.clone())
            .with_trust(settings.rpc_trust.clone()),
    );
    let mut follower = Follower::from_roots(
        table.clone(),
        roots.clone(),
        settings.key.clone(),
        settings.origin_timeout,
        metrics.clone(),
    )
    .context("invalid --rpc-root")?;
    // Only with --tls-listen does the edge ask for (and hold) private keys.
    let certificates = match settings.tls_listen {
        Some(_) => {
            let certificates = Arc::new(EdgeCertificates::default());
            let feed = CertificateFeed::from_roots(
                certificates.clone(),
                roots.clone(),
                settings.key.clone(),
                settings.origin_timeout,
                metrics.clone(),
            )
            .context("invalid --rpc-root")?;
            follower = follower.with_certificates(Arc::new(feed));
            Some(certificates)
        }
        None => None,
    };
    let follower = Arc::new(follower);
    // One poll before listening, so the first requests find a table; a
    // control plane that does not answer yet is waited for by the loop.
    match follower.poll_once().await {
        Ok(_) => {
            let table = table.read().unwrap_or_else(|p| p.into_inner());
            let (projects, deployments, domains) = table.sizes();
            tracing::info!(
                target: "isocloud::edge",
                generation = table.generation(),
                projects,
                deployments,
                domains,
                "routing: host table loaded"
            );
        }
        Err(e) => tracing::warn!(
            target: "isocloud::edge",
            error = %e,
            "routing: no host table yet; requests get 502 ORIGIN_UNREACHABLE until the control plane answers"
        ),
    }
    // The certificates too, before the TLS listener opens (a failure leaves
    // them pending: the loop asks again after each poll).
    follower.log_certificates(follower.refresh_certificates().await, false);
    tokio::spawn(follower.run(isocloud_edge::ROUTING_POLL_INTERVAL));

    let runners = Arc::new(Runners::new(&settings.runners, metrics.clone()).context("invalid --runner")?);
    let clients = RunnerClients::new(settings.runner_http2, settings.runner_max_idle, settings.runner_roots.clone());
    tokio::spawn(runners.clone().check(clients.clone(), settings.health_interval));
    if let Some(path) = settings.runners_file.clone() {
        tokio::spawn(follow_runners_file(path, runners.clone()));
    }
    let mut edge = Edge::new(
        table.clone(),
        runners.clone(),
        clients,
        settings.key.clone(),
        ForwardOptions {
            request_timeout: settings.request_timeout,
            max_request_body_bytes: settings.max_request_body_bytes,
        },
        metrics,
    );
    edge = edge.with_acme(Arc::new(AcmeLookup::from_roots(roots, settings.key.clone()).context("invalid --rpc-root")?));
    let tls = match (settings.tls_listen, &certificates) {
        (Some(addr), Some(certificates)) => {
            let tcp = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (TLS)"))?;
            let port = tcp.local_addr()?.port();
            edge = edge.with_https(certificates.clone(), port);
            let acceptor = isocloud_ingress::tls_acceptor(certificates.clone()).context("cannot set up TLS")?;
            Some((tcp, acceptor))
        }
        _ => None,
    };
    if let Some(otlp) = &settings.otlp {
        edge = edge.with_telemetry(isocloud_telemetry::Telemetry::start(otlp, &mut registry)?);
        tracing::info!(target: "isocloud::edge", endpoint = %otlp.endpoint, "OTLP export on");
    }
    let edge = Arc::new(edge);

    let listener =
        TcpListener::bind(settings.listen).await.with_context(|| format!("cannot listen on {}", settings.listen))?;
    let public = listener.local_addr()?;
    let readiness = isocloud_ingress::Readiness::default();
    if let Some(addr) = settings.admin_listen {
        let admin = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (admin)"))?;
        let admin_addr = admin.local_addr()?;
        tokio::spawn(isocloud_edge::serve_admin(
            admin,
            settings.admin_bounds.clone(),
            listener_metrics.clone(),
            Arc::new(registry),
            table,
            runners.clone(),
            readiness.clone(),
        ));
        println!("isocloud: admin on http://{admin_addr}");
    }
    let tls_serving = match tls {
        Some((tcp, acceptor)) => {
            let tls_addr = tcp.local_addr()?;
            let serving = tokio::spawn(isocloud_edge::serve_public(
                tcp,
                Some(acceptor),
                settings.tls_bounds.clone(),
                listener_metrics.clone(),
                edge.clone(),
            ));
            // Tests and scripts read this line to learn the port of `--tls-listen …:0`.
            println!("isocloud: tls on https://{tls_addr}");
            Some(serving)
        }
        None => None,
    };
    let serving = tokio::spawn(isocloud_edge::serve_public(
        listener,
        None,
        settings.public_bounds.clone(),
        listener_metrics,
        edge.clone(),
    ));
    let list = runners.list();
    let names: Vec<&str> = list.iter().map(|r| r.name()).collect();
    tracing::info!(
        target: "isocloud::edge",
        runners = ?names,
        protocol = if settings.runner_http2 { "h2c" } else { "http/1.1" },
        control_plane = %settings.rpc_root,
        kid = settings.key.kid,
        "edge: forwarding the control plane's hosts to the runners by rendezvous hashing of the deployment id"
    );
    // Tests and scripts read this line to learn the port of `--listen …:0`.
    println!("isocloud: listening on http://{public}");

    crate::stop_requested(readiness, settings.drain_delay).await;
    serving.abort();
    if let Some(tls_serving) = tls_serving {
        tls_serving.abort();
    }
    tracing::info!(
        target: "isocloud::edge",
        drain_timeout_s = settings.drain_timeout.as_secs_f64(),
        in_flight = edge.in_flight(),
        "shutting down: no new connections; draining in-flight requests"
    );
    let deadline = tokio::time::Instant::now() + settings.drain_timeout;
    while edge.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if edge.in_flight() > 0 {
        tracing::warn!(target: "isocloud::edge", in_flight = edge.in_flight(), "drain timeout reached");
    }
    Ok(())
}
