//! `isocloud`: the runner binary. It parses and validates settings, finds
//! deno, wires origin, pool and ingress together (or, for `isocloud edge`,
//! the edge's parts: `edge.rs`), and turns SIGTERM/SIGINT into a graceful
//! shutdown. It holds no logic of its own beyond that wiring.

#![forbid(unsafe_code)]

/// mimalloc rather than glibc's malloc: on the warm hop (`bench/warm.py`)
/// glibc's malloc, free and consolidation were ~7% of the runner's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod control_plane;
mod deno;
mod edge;
mod origins;
mod resources;
mod sandbox;
mod settings;
mod store_metrics;
mod webhook_metrics;

#[cfg(test)]
mod client_dispatch_tests;

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use isocloud_auth::SubhostVerifier;
// The client commands are a crate of their own; settings.rs names them as
// `crate::client::ClientCommand`.
use isocloud_client as client;
use isocloud_egress::{EgressOptions, EgressProxy};
use isocloud_ingress::{
    EdgeLimits, EdgeMetrics, HostRouting, Listener, ListenerMetrics, Proxy, Router, ServeOptions, StreamLimits,
    SubhostRouting,
};
use isocloud_origin::{AppsOrigin, DiskCache, Origin};
use isocloud_pool::{
    ActivityOptions, AdmissionOptions, BOOT_MEMORY_BYTES, IsolateLimits, Pool, PoolMetrics, PoolOptions,
};
use prometheus_client::registry::Registry;
use settings::{Cli, Command, LogFormat, Mode, Settings};
use tokio::net::TcpListener;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Client(command) => return client::run(command),
        Command::Edge { common, serve, subhost, edge } => return run_edge(common, *serve, subhost, edge),
        command => command,
    };
    let settings = match Settings::from_cli(command) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("isocloud: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(settings.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = settings.runtime_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isocloud: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `isocloud edge`: settings of its own, no deno, no isolates.
fn run_edge(
    common: settings::CommonFlags,
    serve: settings::ServeFlags,
    subhost: settings::SubhostFlags,
    edge: settings::EdgeFlags,
) -> std::process::ExitCode {
    let settings = match settings::EdgeSettings::from_flags(common, serve, subhost, edge) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("isocloud: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(settings.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(edge::run(settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isocloud: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ISOCLOUD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    resources::raise_descriptor_limit();
    let (deno, deno_version) = deno::find_deno(settings.deno.as_deref())?;
    set_umask();
    // Tenants' logs on their way (the spool) and code (the cache) live
    // here: private whatever the directory was (#21).
    isocloud_controlplane::private::ensure_dir(&settings.state_dir, "state dir")?;
    let state_dir = settings.state_dir.canonicalize()?;
    for (dir, what) in [("spool", "activity spool"), ("cache", "cache")] {
        isocloud_controlplane::private::ensure_dir(&state_dir.join(dir), what)?;
    }
    let harness_dir = isocloud_sandbox::install_harness(&state_dir).context("cannot install the isolate harness")?;
    let cache =
        Arc::new(DiskCache::open(&state_dir.join("cache"), settings.cache_max_bytes).context("cannot open the cache")?);

    let mut registry = Registry::default();
    let pool_metrics = PoolMetrics::new(&mut registry);
    let edge_metrics = EdgeMetrics::new(&mut registry);
    let listener_metrics = ListenerMetrics::new(&mut registry);
    log_listener_bounds(&settings);
    register_cache_metrics(&mut registry, cache.clone());

    // Before the sandbox policy: Landlock's TCP rules name the proxy's port.
    let egress = if settings.egress_proxy {
        let mut options = EgressOptions::new(settings.max_hops);
        options.allow_private = settings.egress_allow_private.clone();
        let proxy = EgressProxy::start((std::net::Ipv4Addr::LOCALHOST, 0).into(), options)
            .await
            .context("cannot start the egress proxy")?;
        let allow_private: Vec<String> = settings.egress_allow_private.iter().map(ToString::to_string).collect();
        tracing::info!(
            addr = %proxy.local_addr(),
            max_hops = settings.max_hops,
            max_connections_per_isolate = isocloud_egress::MAX_CONNECTIONS_PER_ISOLATE,
            allow_private = ?allow_private,
            "egress: isolates' HTTP(S) goes through the runner's proxy, to public addresses only"
        );
        register_egress_metrics(&mut registry, proxy.clone());
        Some(proxy)
    } else {
        tracing::warn!(
            "egress: proxy off (--egress-proxy off): isolates call out directly, checked by deno's allow-list only"
        );
        None
    };
    let egress_port = egress.as_ref().map(|proxy| proxy.local_addr().port());
    let policy = sandbox::policy(&settings, &deno, &state_dir, harness_dir, egress_port)?;
    let cgroups = match isocloud_sandbox::Cgroups::detect(&format!("isocloud-{}", std::process::id())) {
        Ok(cgroups) => {
            tracing::info!(
                "limits: memory={} MB per isolate (cgroup {} + V8 heap), cpu={} ms per request",
                settings.memory_limit_mb,
                cgroups.version(),
                settings.cpu_limit_ms
            );
            Some(Arc::new(cgroups))
        }
        Err(reason) => {
            tracing::warn!(%reason, "no usable memory cgroup: isolates' resident memory is watched instead");
            tracing::info!(
                "limits: memory={} MB per isolate (RSS watch + V8 heap), cpu={} ms per request",
                settings.memory_limit_mb,
                settings.cpu_limit_ms
            );
            None
        }
    };
    // Bound before anything that reports URLs: `…:0` picks the ports.
    let listener =
        TcpListener::bind(settings.listen).await.with_context(|| format!("cannot listen on {}", settings.listen))?;
    let public = listener.local_addr()?;
    // Isolates may call other deployments by the public listeners (with hop
    // counting), never the runner's other listeners.
    if let Some(egress) = &egress {
        egress.add_public_listener(public, "public listener");
        if let Mode::ControlPlane(control) = &settings.mode {
            egress.add_private_listener(control.control_listen, "control plane listener");
        }
        if let Some(admin) = settings.admin_listen {
            egress.add_private_listener(admin, "admin listener");
        }
    }
    let public_tls = match &settings.listen_tls {
        Some(files) => {
            Some(isocloud_ingress::certificate_files_acceptor(files.clone()).context("cannot set up TLS on --listen")?)
        }
        None => None,
    };
    let public_scheme = if public_tls.is_some() { "https" } else { "http" };
    let mut listeners = vec![Listener { tcp: listener, tls: public_tls, bounds: settings.listeners.public.clone() }];
    let control_plane = match &settings.mode {
        Mode::ControlPlane(control) => {
            let tls = match control.tls_listen {
                Some(addr) => {
                    Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (TLS)"))?)
                }
                None => None,
            };
            let https_port = tls.as_ref().map(|l| l.local_addr()).transpose()?.map(|a| a.port());
            let control_listener = control_plane::ControlListener {
                bounds: settings.listeners.control.clone(),
                metrics: listener_metrics.clone(),
            };
            let (control_plane, control_addr) = control_plane::start(
                control,
                &settings.build,
                public.port(),
                https_port,
                &deno,
                cgroups.clone(),
                control_listener,
            )
            .await?;
            // Its real address: `--control-listen …:0` picks the port now.
            if let Some(egress) = &egress {
                egress.add_private_listener(control_addr, "control plane listener");
            }
            if let Some(origin) = &control.origin {
                let origin_listener = control_plane::ControlListener {
                    bounds: settings.listeners.control.clone(),
                    metrics: listener_metrics.clone(),
                };
                let origin_addr = control_plane::start_origin(&control_plane, origin, origin_listener).await?;
                if let Some(egress) = &egress {
                    egress.add_private_listener(origin_addr, "origin listener");
                }
            }
            if let Some(tcp) = tls {
                let tls_addr = tcp.local_addr()?;
                if let Some(egress) = &egress {
                    egress.add_public_listener(tls_addr, "TLS listener");
                }
                let acceptor = isocloud_ingress::tls_acceptor(Arc::new(control_plane::Certs(control_plane.clone())))
                    .context("cannot set up TLS")?;
                listeners.push(Listener { tcp, tls: Some(acceptor), bounds: settings.listeners.tls.clone() });
                println!("isocloud: tls on https://{tls_addr}");
            }
            Some((control_plane, https_port))
        }
        _ => None,
    };
    let control_plane_origin = control_plane.as_ref().map(|(cp, _)| cp.origin());
    if let Some((control_plane, _)) = &control_plane {
        store_metrics::register(&mut registry, control_plane.clone());
    }
    if let Some((control_plane, _)) = &control_plane {
        webhook_metrics::register(&mut registry, control_plane.clone());
    }

    // One registry for the router and the activity spool alike.
    let remote_origins = origins::remote_origins(&settings);
    let telemetry = match &settings.otlp {
        Some(otlp) => {
            let telemetry = isocloud_telemetry::Telemetry::start(otlp, &mut registry)?;
            tracing::info!(endpoint = %otlp.endpoint, service_name = otlp.service_name, "OTLP export on");
            Some(telemetry)
        }
        None => None,
    };
    let pool_options = PoolOptions {
        idle_timeout: settings.idle_timeout,
        start_timeout: settings.boot_timeout,
        kill_grace: std::time::Duration::from_secs(1),
        instances_dir: state_dir.join(format!("isolates-{}", std::process::id())),
        max_isolates: settings.max_isolates,
        max_isolates_per_tenant: settings.max_isolates_per_tenant,
        admission: admission_options(&settings),
        limits: IsolateLimits {
            cpu_limit_ms: settings.cpu_limit_ms,
            memory_limit_bytes: settings.memory_limit_mb * 1024 * 1024,
            watch_rss: cgroups.is_none(),
        },
        cgroups: cgroups.clone(),
        activity: ActivityOptions {
            spool_dir: state_dir.join("spool"),
            spool_max_bytes: settings.spool_max_bytes,
            resolver: origins::resolver(&settings.mode, remote_origins.clone(), control_plane_origin.clone()),
        },
        usage_interval: settings.usage_interval,
        egress: egress.clone(),
        max_deno_dirs: MAX_DENO_DIRS,
        package_store_max_bytes: settings.package_store_max_bytes,
        npm_registry: match &settings.build.npm_registry {
            Some(url) => isocloud_pool::NpmRegistry::new(url.clone(), settings.origin_timeout),
            None => isocloud_pool::NpmRegistry::public(settings.origin_timeout),
        },
        prestarted_per_profile: settings.prestarted_isolates,
        boot_stale_max_age: settings.boot_stale_max_age,
        log_tap: telemetry.clone().map(|telemetry| {
            isocloud_pool::LogTap(Arc::new(move |deployment_id, level, message, request_id| {
                telemetry.log(deployment_id, level, message, request_id)
            }))
        }),
    };
    resources::register(&mut registry, pool_options.cgroups.clone(), pool_options.instances_dir.clone());
    match (settings.prestarted_isolates, policy.mount_namespace) {
        (0, _) => tracing::info!("pre-started isolates: off"),
        (n, true) => tracing::info!(per_profile = n, "pre-started isolates: on"),
        (_, false) => tracing::warn!("pre-started isolates: off (they need --mount-namespace on)"),
    }
    let pool = Pool::new(pool_options, policy, cache, pool_metrics)
        .context("cannot prepare the isolate directory or the activity spool")?;
    pool.build_deno_template().await;

    let router = match &settings.mode {
        Mode::Apps(dir) => {
            // Dev mode builds apps that import packages, as `serve` builds
            // deployments: the same step, on a copy of the folder.
            let options = control_plane::build_options(&settings.build, &deno, cgroups.clone());
            if options.confinement.ids.is_some() {
                // The build's uid reaches its work folders below the state dir.
                isocloud_sandbox::identity::allow_traversal(&state_dir)?;
            }
            let builder = isocloud_controlplane::AppFolderBuilder::new(options, &state_dir.join("app-builds"))
                .context("cannot prepare the apps' build folders")?;
            let work_root = builder.work_root();
            let apps = AppsOrigin::new(dir.clone()).with_builder(Arc::new(builder), work_root);
            Router::new(Some(Arc::new(apps) as Arc<dyn Origin>), None)
        }
        Mode::Subhost(subhosters) => {
            let verifier = SubhostVerifier::new(subhosters.clone()).context("invalid subhoster configuration")?;
            let remote_origins = remote_origins.clone().expect("subhosting has its registry of remote origins");
            Router::new(None, Some(SubhostRouting::new(verifier, remote_origins)))
        }
        Mode::ControlPlane(_) => {
            let (control_plane, https_port) = control_plane.clone().expect("opened above in this mode");
            Router::default().with_hosts(HostRouting {
                routes: Arc::new(control_plane::Hosts {
                    control_plane: control_plane.clone(),
                    https: https_port.is_some(),
                }),
                origin: control_plane.origin(),
                https_port,
            })
        }
    };
    let mut proxy = Proxy::new(
        router,
        pool.clone(),
        edge_metrics,
        EdgeLimits {
            request_timeout: settings.request_timeout,
            max_request_body_bytes: settings.max_request_body_bytes,
            max_hops: settings.max_hops,
            streams: StreamLimits {
                idle_timeout: settings.stream_idle_timeout,
                max_lifetime: settings.stream_max_lifetime,
            },
        },
    );
    if let Some(egress) = egress.clone() {
        proxy = proxy.with_egress(egress);
    }
    if let Some(telemetry) = telemetry {
        proxy = proxy.with_telemetry(telemetry);
    }
    if let Some((control_plane, _)) = &control_plane {
        // Answered whether or not this node orders: another node sharing
        // the store may, and the ACME server may reach this one.
        proxy = proxy.with_acme(Arc::new(control_plane::AcmeChallenges(control_plane.clone())));
    }
    let proxy = Arc::new(proxy);
    let readiness = isocloud_ingress::Readiness::default();

    if let Some(addr) = settings.admin_listen {
        let admin = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (admin)"))?;
        let admin_addr = admin.local_addr()?;
        if let Some(egress) = &egress {
            // Its port, where `--admin-listen` said 0.
            egress.add_private_listener(admin_addr, "admin listener");
        }
        tokio::spawn(isocloud_ingress::serve_admin(
            admin,
            settings.listeners.admin.clone(),
            listener_metrics.clone(),
            Arc::new(registry),
            pool.clone(),
            readiness.clone(),
        ));
        println!("isocloud: admin on http://{admin_addr}");
    }
    match &settings.mode {
        Mode::Apps(dir) => {
            tracing::info!(apps = %dir.display(), "serving apps: DIR/<name>/ at http://<name>.localhost:{}", public.port())
        }
        Mode::Subhost(subhosters) => tracing::info!(subhosters = subhosters.len(), "serving subhosted deployments"),
        Mode::ControlPlane(control) => tracing::info!(
            "serving the control plane's deployments: http://<project>.{}:{} and http://<project>-<deployment>.{0}:{1}",
            control.base_domain,
            public.port()
        ),
    }
    tracing::info!(deno = %deno.display(), version = deno_version, state_dir = %state_dir.display(), "isolates run on deno");
    // Tests and scripts read this line to learn the port of `--listen …:0`.
    println!("isocloud: listening on {public_scheme}://{public}");

    let options = ServeOptions {
        drain_timeout: settings.drain_timeout,
        max_header_bytes: settings.max_header_bytes,
        metrics: listener_metrics,
        readiness: readiness.clone(),
    };
    isocloud_ingress::serve(listeners, proxy, options, stop_requested(readiness, settings.drain_delay)).await;
    Ok(())
}

/// Resolves when the listeners should close: at SIGTERM/SIGINT, after
/// `drain_delay` (`--drain-delay-s`) of still serving while the health
/// checks say this process is leaving (a second signal cuts it short).
async fn stop_requested(readiness: isocloud_ingress::Readiness, drain_delay: std::time::Duration) {
    shutdown_signal().await;
    if drain_delay.is_zero() {
        return;
    }
    readiness.start_draining();
    tracing::info!(
        drain_delay_s = drain_delay.as_secs_f64(),
        "draining: still serving while health checks answer 503 (edges and load balancers move away); a second \
         signal stops now"
    );
    tokio::select! {
        () = tokio::time::sleep(drain_delay) => {}
        () = shutdown_signal() => tracing::info!("stopping now"),
    }
}

/// Every listener's bounds, once at start: what the defaults came to.
fn log_listener_bounds(settings: &Settings) {
    let set = &settings.listeners;
    let (body_timeout_s, min_body_rate_kb_s) =
        set.control.body.map_or((0, 0), |body| (body.timeout.as_secs(), body.min_rate_bytes_per_s / 1024));
    tracing::info!(
        header_timeout_s = settings.header_timeout.as_secs(),
        body_timeout_s,
        min_body_rate_kb_s,
        public = format!("{}/{}", set.public.max_connections_per_peer, set.public.max_connections),
        control = format!("{}/{}", set.control.max_connections_per_peer, set.control.max_connections),
        admin = format!("{}/{}", set.admin.max_connections_per_peer, set.admin.max_connections),
        "listener bounds (connections per peer/in all; public includes TLS, each its own)"
    );
}

/// The server's own umask, whatever it was started with: nothing it makes
/// is open to other users unless made so on purpose. The sandbox relaxes it
/// to `022` when isolates run as other uids and must read the files made
/// for them; what must stay private (the data dir, the state dir, the
/// spool) is made `0700`/`0600` with explicit modes either way.
fn set_umask() {
    // Before any other thread makes files.
    let inherited = isocloud_controlplane::private::set_private_umask();
    if inherited != 0o077 {
        tracing::info!(inherited = format!("{inherited:03o}"), "umask set to 077");
    }
}

/// Boot admission as set, or from this machine's cores and memory (logged:
/// the operator sees what the defaults came to). A boot waits for its turn
/// at most the request timeout: a client would not wait longer for a
/// running isolate's answer either.
fn admission_options(settings: &Settings) -> AdmissionOptions {
    let (concurrent, why) = match settings.max_concurrent_boots {
        Some(n) => (n, "set".to_owned()),
        None => {
            let (n, cores, available) = AdmissionOptions::default_concurrency_here();
            let mb = available.map_or("unknown".to_owned(), |bytes| (bytes >> 20).to_string());
            (
                n,
                format!(
                    "2 per core ({cores}), within half of {mb} MB available at {} MB a start",
                    BOOT_MEMORY_BYTES >> 20
                ),
            )
        }
    };
    let queue = settings.max_boot_queue.unwrap_or(concurrent.saturating_mul(settings::BOOT_QUEUE_PER_CONCURRENT_BOOT));
    tracing::info!(
        max_concurrent_boots = concurrent,
        max_boot_queue = queue,
        max_queue_wait_s = settings.request_timeout.as_secs(),
        max_isolates_per_tenant = settings.max_isolates_per_tenant,
        "boot admission: {why}"
    );
    AdmissionOptions {
        max_concurrent_boots: concurrent,
        max_boot_queue: queue,
        max_queue_wait: settings.request_timeout,
    }
}

/// The egress proxy's own figures: calls refused for an internal address or
/// a connection bound, and client connections held now.
fn register_egress_metrics(registry: &mut Registry, egress: EgressProxy) {
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;

    #[derive(Debug)]
    struct EgressCollector(EgressProxy);
    impl Collector for EgressCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let refusals = self.0.refusals();
            let mut family = encoder.encode_descriptor(
                "isocloud_egress_refused",
                "Egress proxy refusals: internal destinations, and connections past a bound",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, count) in [
                ("internal_address", refusals.internal_address),
                ("isolate_connections", refusals.isolate_connections),
                ("shared_connections", refusals.shared_connections),
            ] {
                let labels = [("reason", reason)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
            let open = ConstGauge::new(self.0.open_connections() as i64);
            open.encode(encoder.encode_descriptor(
                "isocloud_egress_open_connections",
                "Client connections the egress proxy holds (tunnels included)",
                None,
                open.metric_type(),
            )?)?;
            Ok(())
        }
    }
    registry.register_collector(Box::new(EgressCollector(egress)));
}

/// Deployments whose deno cache dir (V8 code cache) is kept between boots.
const MAX_DENO_DIRS: usize = 2_000;

fn register_cache_metrics(registry: &mut Registry, cache: Arc<DiskCache>) {
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;

    struct CacheCollector(Arc<DiskCache>);
    impl std::fmt::Debug for CacheCollector {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("CacheCollector")
        }
    }
    impl Collector for CacheCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let hits = ConstCounter::new(self.0.hits());
            hits.encode(encoder.encode_descriptor(
                "isocloud_cache_hits",
                "Layer and blob cache hits",
                None,
                hits.metric_type(),
            )?)?;
            let misses = ConstCounter::new(self.0.misses());
            misses.encode(encoder.encode_descriptor(
                "isocloud_cache_misses",
                "Layer and blob cache misses",
                None,
                misses.metric_type(),
            )?)?;
            let bytes = ConstGauge::new(self.0.total_bytes() as i64);
            bytes.encode(encoder.encode_descriptor(
                "isocloud_cache_bytes",
                "Bytes held by the cache",
                None,
                bytes.metric_type(),
            )?)?;
            Ok(())
        }
    }
    registry.register_collector(Box::new(CacheCollector(cache)));
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
