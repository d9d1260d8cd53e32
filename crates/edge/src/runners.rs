//! The runners behind the edge, their health, and the connections to them.
//!
//! A runner is in while it answers: every second each one is asked
//! `GET /healthz` on its public listener with the ingress's
//! `HEALTH_PROBE_HEADER` (the runner answers it itself, no isolate involved;
//! any HTTP answer within the interval is a pass, as an older runner's 404
//! is), and a connection the forwarder could not open counts as a failed
//! check too. [`OUT_AFTER_FAILURES`] failures in a row take it out,
//! [`IN_AFTER_SUCCESSES`] passes bring it back. A runner stopping with a
//! drain delay (`--drain-delay-s`) answers 503 with `DRAINING_HEADER`: it is
//! out at once, and the requests it still finishes do not bring it back
//! until a probe finds it staying. A runner that is out gets no requests
//! while another is in; with every runner out, they are all tried in their
//! ranking (a health checker wrong about all of them must not stop the
//! edge).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Uri};
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use url::Url;

use crate::metrics::Metrics;
use crate::rendezvous;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies on their way through the edge.
pub type EdgeBody = UnsyncBoxBody<Bytes, BoxError>;

/// Failed checks in a row that take a runner out (two: one lost probe on a
/// busy machine is not a dead runner; two seconds is).
pub const OUT_AFTER_FAILURES: u32 = 2;
/// Passed checks in a row that bring it back (two: a runner restarting
/// answers once before its listener is ready for load).
pub const IN_AFTER_SUCCESSES: u32 = 2;

/// A connection to a runner must open within this; on a LAN it takes well
/// under a millisecond, so a runner that takes longer is down or drowned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 pings on an idle connection to a runner: a runner whose machine
/// vanished (no reset ever comes) is found within interval + timeout, and
/// the requests waiting on it fail over instead of waiting out their
/// timeout.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a `--runner` URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerUrlError {
    #[error("{0:?} is not an http:// or https:// URL")]
    Scheme(String),
    #[error("{0:?} has a path, query or credentials: a runner is named by its scheme, host and port only")]
    Extra(String),
    #[error("{0:?} is named twice")]
    Duplicate(String),
    #[error("no runner is named: the edge needs at least one --runner URL")]
    None,
}

/// One runner: its name (the normalised URL, what the ranking hashes) and
/// its health.
pub struct Runner {
    name: String,
    scheme: Scheme,
    authority: Authority,
    up: AtomicBool,
    health: Mutex<Streak>,
}

/// The checks in a row that agree.
#[derive(Debug, Default)]
struct Streak {
    failures: u32,
    successes: u32,
    /// The runner said it is stopping: out, whatever requests it still
    /// answers, until a probe finds it staying.
    leaving: bool,
}

/// What one health probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Passed,
    Failed,
    /// The runner answered that it is stopping (its drain delay).
    Leaving,
}

impl Runner {
    pub fn new(url: &Url) -> Result<Self, RunnerUrlError> {
        let scheme = match url.scheme() {
            "http" => Scheme::HTTP,
            "https" => Scheme::HTTPS,
            _ => return Err(RunnerUrlError::Scheme(url.to_string())),
        };
        if url.host_str().is_none() {
            return Err(RunnerUrlError::Scheme(url.to_string()));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(RunnerUrlError::Extra(url.to_string()));
        }
        let authority = url[url::Position::BeforeHost..url::Position::AfterPort]
            .parse::<Authority>()
            .map_err(|_| RunnerUrlError::Extra(url.to_string()))?;
        Ok(Self {
            name: url.to_string(),
            scheme,
            authority,
            up: AtomicBool::new(true),
            health: Mutex::new(Streak::default()),
        })
    }

    /// The normalised URL, e.g. `http://10.0.0.5:8080/`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// In: it takes requests.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// `path_and_query` (starting with `/`) on this runner.
    pub(crate) fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// One check's outcome; `Some(up)` when it moved the runner in or out.
    fn record(&self, passed: bool) -> Option<bool> {
        let mut streak = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if passed && streak.leaving {
            // The requests it still finishes do not bring it back.
            return None;
        }
        if passed {
            streak.failures = 0;
            streak.successes = streak.successes.saturating_add(1);
        } else {
            streak.successes = 0;
            streak.failures = streak.failures.saturating_add(1);
        }
        let up = self.is_up();
        let now_up = if up { streak.failures < OUT_AFTER_FAILURES } else { streak.successes >= IN_AFTER_SUCCESSES };
        (now_up != up).then(|| {
            self.up.store(now_up, Ordering::Release);
            now_up
        })
    }

    /// A probe's outcome: `Leaving` takes the runner out now; `Passed`
    /// ends a leave. `Some(up)` when it moved the runner in or out.
    fn record_probe(&self, probe: Probe) -> Option<bool> {
        match probe {
            Probe::Leaving => {
                let mut streak = self.health.lock().unwrap_or_else(|p| p.into_inner());
                streak.leaving = true;
                streak.successes = 0;
                self.up.swap(false, Ordering::AcqRel).then_some(false)
            }
            Probe::Passed => {
                self.health.lock().unwrap_or_else(|p| p.into_inner()).leaving = false;
                self.record(true)
            }
            Probe::Failed => self.record(false),
        }
    }
}

/// How the edge reaches runners: plain TCP for `http://` runners, TLS for
/// `https://` ones (a runner with `--tls-cert`), whose certificate must
/// chain to the public roots or to a `--runner-ca` certificate.
pub type RunnerConnector = HttpsConnector<HttpConnector>;

/// The connections to the runners: one pool per protocol, shared by the
/// forwarder and the health checks (so a check goes the way requests go).
#[derive(Clone)]
pub struct RunnerClients {
    /// HTTP/1.1 keep-alive: WebSocket upgrades always (HTTP/2 has none the
    /// runner takes), everything when HTTP/2 is off.
    http1: Client<RunnerConnector, EdgeBody>,
    /// HTTP/2 (h2c with prior knowledge, as the runner's plain listener
    /// speaks it; over TLS, agreed by ALPN): one connection per runner
    /// carries every request at once.
    http2: Option<Client<RunnerConnector, EdgeBody>>,
}

/// The certificates an `https://` runner may present beside the public
/// roots (`--runner-ca`): PEM bundles, checked when read.
pub fn runner_roots(pem_files: &[(String, Vec<u8>)]) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for (name, pem) in pem_files {
        let certificates = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{name}: is not PEM: {e}"))?;
        if certificates.is_empty() {
            return Err(format!("{name}: holds no CERTIFICATE block"));
        }
        for certificate in certificates {
            roots.add(certificate).map_err(|e| format!("{name}: a certificate in it cannot be trusted: {e}"))?;
        }
    }
    Ok(roots)
}

impl RunnerClients {
    /// `max_idle_per_runner`: keep-alive connections kept per runner
    /// (HTTP/1.1; HTTP/2 needs one). `roots`: what an `https://` runner's
    /// certificate may chain to.
    pub fn new(http2: bool, max_idle_per_runner: usize, roots: rustls::RootCertStore) -> Self {
        let mut plain = HttpConnector::new();
        plain.set_nodelay(true);
        plain.set_connect_timeout(Some(CONNECT_TIMEOUT));
        plain.enforce_http(false);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Each pool offers only its own protocol by ALPN: the HTTP/1.1 one
        // carries WebSocket upgrades, which HTTP/2 would not.
        let http1_connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(plain.clone());
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http2()
            .wrap_connector(plain);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_idle_per_runner)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(http1_connector);
        let http2 = http2.then(|| {
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .http2_keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
                .http2_keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
                .http2_keep_alive_while_idle(true)
                .build(connector)
        });
        Self { http1, http2 }
    }

    /// The client for a request (`upgrade`: a WebSocket handshake).
    pub(crate) fn for_request(&self, upgrade: bool) -> &Client<RunnerConnector, EdgeBody> {
        match &self.http2 {
            Some(http2) if !upgrade => http2,
            _ => &self.http1,
        }
    }

    /// Whether requests go over h2c.
    pub fn http2(&self) -> bool {
        self.http2.is_some()
    }
}

/// The runners, in the order they were named. The list may be replaced
/// while the edge runs (`--runners-file`): a runner named before and after
/// keeps its health, a new one starts in, and one no longer named gets no
/// more requests (those in flight finish).
pub struct Runners {
    set: RwLock<Arc<RunnerSet>>,
    metrics: Metrics,
}

/// One version of the list, and the names the ranking hashes.
pub struct RunnerSet {
    runners: Vec<Arc<Runner>>,
    names: Vec<String>,
}

impl std::ops::Deref for RunnerSet {
    type Target = [Arc<Runner>];

    fn deref(&self) -> &[Arc<Runner>] {
        &self.runners
    }
}

/// A list of runners as `--runners-file` holds it: one URL per line;
/// blank lines and lines starting with `#` are skipped. Each URL is checked
/// as `--runner`'s; an error names its line.
pub fn parse_runner_list(text: &str) -> Result<Vec<Url>, String> {
    let mut urls = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let url = Url::parse(line).map_err(|e| format!("line {}: {line:?} is not a URL: {e}", number + 1))?;
        Runner::new(&url).map_err(|e| format!("line {}: {e}", number + 1))?;
        urls.push(url);
    }
    if urls.is_empty() {
        return Err(RunnerUrlError::None.to_string());
    }
    Ok(urls)
}

/// What a new list changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunnersChanged {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Runners {
    pub fn new(urls: &[Url], metrics: Metrics) -> Result<Self, RunnerUrlError> {
        let set = Self::set_of(urls, &[])?;
        for runner in set.iter() {
            metrics.runner_up(&runner.name, true);
        }
        Ok(Self { set: RwLock::new(Arc::new(set)), metrics })
    }

    /// The runners of `urls`, in that order: the same [`Runner`] as in
    /// `before` where the name is there, a new one (in) where it is not.
    fn set_of(urls: &[Url], before: &[Arc<Runner>]) -> Result<RunnerSet, RunnerUrlError> {
        if urls.is_empty() {
            return Err(RunnerUrlError::None);
        }
        let mut runners: Vec<Arc<Runner>> = Vec::with_capacity(urls.len());
        for url in urls {
            let runner = Runner::new(url)?;
            if runners.iter().any(|r| r.name == runner.name) {
                return Err(RunnerUrlError::Duplicate(runner.name));
            }
            let kept = before.iter().find(|r| r.name == runner.name).cloned();
            runners.push(kept.unwrap_or_else(|| Arc::new(runner)));
        }
        let names = runners.iter().map(|r| r.name.clone()).collect();
        Ok(RunnerSet { runners, names })
    }

    /// Replaces the list with `urls` (validated as at start; on an error
    /// the list stays as it was). Runners named before keep their health.
    pub fn replace(&self, urls: &[Url]) -> Result<RunnersChanged, RunnerUrlError> {
        let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
        let next = Self::set_of(urls, &set.runners)?;
        let mut changed = RunnersChanged::default();
        for runner in next.iter().filter(|r| !set.names.contains(&r.name)) {
            self.metrics.runner_up(&runner.name, runner.is_up());
            changed.added.push(runner.name.clone());
        }
        for name in set.names.iter().filter(|name| !next.names.contains(name)) {
            self.metrics.runner_gone(name);
            changed.removed.push(name.clone());
        }
        *set = Arc::new(next);
        Ok(changed)
    }

    /// The list as it is now.
    pub fn list(&self) -> Arc<RunnerSet> {
        Arc::clone(&self.set.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether any runner is in.
    pub fn any_up(&self) -> bool {
        self.list().iter().any(|r| r.is_up())
    }

    /// Where `deployment_id`'s requests go, in order: the runners that are
    /// in by their ranking, then those that are out, by theirs.
    pub fn ranked(&self, deployment_id: &str) -> Vec<Arc<Runner>> {
        let set = self.list();
        let order = rendezvous::rank(deployment_id, &set.names);
        let (mut up, down): (Vec<_>, Vec<_>) =
            order.into_iter().map(|i| Arc::clone(&set.runners[i])).partition(|r| r.is_up());
        up.extend(down);
        up
    }

    /// A check of `runner` passed or failed (a probe, or a connection the
    /// forwarder could not open).
    pub fn report(&self, runner: &Runner, passed: bool) {
        let moved = runner.record(passed);
        self.moved(runner, moved);
    }

    /// A health probe of `runner` found `probe`.
    pub fn report_probe(&self, runner: &Runner, probe: Probe) {
        let moved = runner.record_probe(probe);
        if probe == Probe::Leaving && moved.is_some() {
            tracing::info!(target: "isocloud::edge", runner = runner.name, "runner is stopping: out now, before it closes");
            self.metrics.runner_up(&runner.name, false);
            return;
        }
        self.moved(runner, moved);
    }

    fn moved(&self, runner: &Runner, moved: Option<bool>) {
        if let Some(up) = moved {
            self.metrics.runner_up(&runner.name, up);
            if up {
                tracing::info!(target: "isocloud::edge", runner = runner.name, "runner is back: it takes requests again");
            } else {
                tracing::warn!(
                    target: "isocloud::edge",
                    runner = runner.name,
                    failures = OUT_AFTER_FAILURES,
                    "runner is out: its deployments go to the next runner of their ranking"
                );
            }
        }
    }

    /// Checks every runner every `interval` (each probe may take that long)
    /// until dropped.
    pub async fn check(self: Arc<Self>, clients: RunnerClients, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let this = &*self;
            let set = this.list();
            let probes = set.iter().map(|runner| {
                let clients = &clients;
                async move {
                    let found = probe(clients, runner, interval).await;
                    this.report_probe(runner, found);
                }
            });
            futures_util::future::join_all(probes).await;
        }
    }
}

/// `GET /healthz` on `runner` within `timeout`, as the health probe: any
/// HTTP answer passes, but a 503 saying the runner is draining.
async fn probe(clients: &RunnerClients, runner: &Runner, timeout: Duration) -> Probe {
    let Ok(uri) = runner.uri("/healthz") else { return Probe::Failed };
    let empty = http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync();
    let Ok(request) = Request::get(uri).header(isocloud_ingress::HEALTH_PROBE_HEADER, "1").body(empty) else {
        return Probe::Failed;
    };
    match tokio::time::timeout(timeout, clients.for_request(false).request(request)).await {
        Ok(Ok(response)) => {
            let leaving = response.status() == http::StatusCode::SERVICE_UNAVAILABLE
                && response.headers().contains_key(isocloud_ingress::DRAINING_HEADER);
            // Read to its end, so an HTTP/1.1 connection goes back to the pool.
            let _ = response.into_body().collect().await;
            if leaving { Probe::Leaving } else { Probe::Passed }
        }
        Ok(Err(e)) => {
            tracing::debug!(target: "isocloud::edge", runner = runner.name, error = %e, "health check failed");
            Probe::Failed
        }
        Err(_) => {
            tracing::debug!(target: "isocloud::edge", runner = runner.name, "health check timed out");
            Probe::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    fn runners(n: usize) -> Runners {
        let urls: Vec<Url> = (0..n).map(|i| url(&format!("http://127.0.0.1:{}", 9000 + i))).collect();
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        Runners::new(&urls, metrics).unwrap()
    }

    #[test]
    fn runner_urls_are_http_or_https_origins() {
        let runner = Runner::new(&url("HTTP://Runner-1.internal:80")).unwrap();
        assert_eq!(runner.name(), "http://runner-1.internal/", "normalised: what the ranking hashes");
        assert_eq!(runner.uri("/a?b=1").unwrap().to_string(), "http://runner-1.internal/a?b=1");
        let runner = Runner::new(&url("http://127.0.0.1:8080/")).unwrap();
        assert_eq!(runner.uri("/").unwrap().to_string(), "http://127.0.0.1:8080/");
        let runner = Runner::new(&url("https://r.internal:8443")).unwrap();
        assert_eq!(runner.uri("/").unwrap().to_string(), "https://r.internal:8443/", "TLS to a runner with --tls-cert");
        for bad in ["ftp://r.internal/", "http://r.internal/prefix/", "http://u:p@r.internal/", "http://r/?x=1"] {
            assert!(Runner::new(&url(bad)).is_err(), "{bad}");
        }
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let twice = [url("http://r.internal:8080"), url("http://R.internal:8080/")];
        assert!(matches!(Runners::new(&twice, metrics.clone()), Err(RunnerUrlError::Duplicate(_))));
        assert!(matches!(Runners::new(&[], metrics), Err(RunnerUrlError::None)));
    }

    /// Out after two failures in a row, back after two passes in a row; a
    /// pass between failures starts the count again.
    #[test]
    fn health_needs_two_in_a_row_either_way() {
        let set = runners(1);
        let runner = &set.list()[0];
        assert!(runner.is_up(), "in until checked");
        set.report(runner, false);
        set.report(runner, true);
        set.report(runner, false);
        assert!(runner.is_up(), "one failure at a time is not enough");
        set.report(runner, false);
        assert!(!runner.is_up(), "two in a row");
        set.report(runner, true);
        assert!(!runner.is_up(), "one pass is not enough");
        set.report(runner, false);
        set.report(runner, true);
        assert!(!runner.is_up());
        set.report(runner, true);
        assert!(runner.is_up(), "two passes in a row");
    }

    #[test]
    fn a_runner_that_says_it_is_stopping_is_out_at_once_until_a_probe_finds_it_staying() {
        let set = runners(1);
        let runner = &set.list()[0];
        set.report_probe(runner, Probe::Passed);
        assert!(runner.is_up());
        set.report_probe(runner, Probe::Leaving);
        assert!(!runner.is_up(), "out on the first answer saying so");
        for _ in 0..5 {
            set.report(runner, true); // the requests it still finishes
        }
        assert!(!runner.is_up(), "finished requests do not bring a leaving runner back");
        set.report_probe(runner, Probe::Leaving);
        assert!(!runner.is_up());
        // Restarted in its place: probes that pass bring it back as usual.
        set.report_probe(runner, Probe::Passed);
        assert!(!runner.is_up(), "one pass is not enough");
        set.report_probe(runner, Probe::Passed);
        assert!(runner.is_up(), "two passes in a row");
    }

    #[test]
    fn a_new_list_keeps_the_health_of_runners_named_again_and_moves_only_what_it_must() {
        let set = runners(3);
        let [a, b, c] = [0, 1, 2].map(|i| set.list()[i].clone());
        set.report(&b, false);
        set.report(&b, false);
        assert!(!b.is_up());
        let ids: Vec<String> = (0..300).map(|i| format!("{i:012}")).collect();
        let first = |id: &String| set.ranked(id)[0].name().to_owned();
        let before: Vec<String> = ids.iter().map(first).collect();

        // c leaves, d comes: b is still out (its health kept), d starts in.
        let d = url("http://127.0.0.1:9003");
        let changed = set.replace(&[url(a.name()), url(b.name()), d.clone()]).unwrap();
        assert_eq!(changed.added, vec!["http://127.0.0.1:9003/".to_owned()]);
        assert_eq!(changed.removed, vec![c.name().to_owned()]);
        let list = set.list();
        assert!(Arc::ptr_eq(&list[0], &a) && Arc::ptr_eq(&list[1], &b), "the same runners, health and all");
        assert!(!list[1].is_up() && list[2].is_up());
        // Only deployments that were on c, or that d now ranks first, moved.
        for (id, was) in ids.iter().zip(&before) {
            let now = first(id);
            assert!(now == *was || *was == c.name() || now == d.as_str(), "{id}: {was} -> {now}");
            assert_ne!(now, c.name(), "{id}: a runner no longer named gets nothing");
        }

        // A list that does not hold keeps the one before.
        assert_eq!(set.replace(&[]), Err(RunnerUrlError::None));
        assert!(set.replace(&[d.clone(), d.clone()]).is_err());
        assert_eq!(set.list().len(), 3);
    }

    #[test]
    fn a_runners_file_is_one_url_a_line_and_a_bad_line_is_named() {
        let text = "# the runners\nhttp://10.0.0.5:8080\n\n  http://10.0.0.6:8080/  \n";
        let urls = parse_runner_list(text).unwrap();
        assert_eq!(
            urls.iter().map(Url::as_str).collect::<Vec<_>>(),
            ["http://10.0.0.5:8080/", "http://10.0.0.6:8080/"]
        );
        let bad = parse_runner_list("http://10.0.0.5:8080\nftp://x\n").unwrap_err();
        assert!(bad.starts_with("line 2:"), "{bad}");
        assert!(parse_runner_list("# nobody\n").is_err());
        assert!(parse_runner_list("not a url").unwrap_err().contains("line 1"));
    }

    /// A runner out moves only the deployments it ranked first for, to
    /// their second; with every runner out, all are tried in ranking order.
    #[test]
    fn the_ranking_skips_runners_that_are_out() {
        let set = runners(3);
        let ids: Vec<String> = (0..300).map(|i| format!("{i:012}")).collect();
        let before: Vec<Vec<String>> =
            ids.iter().map(|id| set.ranked(id).iter().map(|r| r.name().to_owned()).collect()).collect();
        let out = set.list()[1].clone();
        set.report(&out, false);
        set.report(&out, false);
        for (id, before) in ids.iter().zip(&before) {
            let after: Vec<String> = set.ranked(id).iter().map(|r| r.name().to_owned()).collect();
            let expected: Vec<String> = before
                .iter()
                .filter(|name| *name != out.name())
                .chain(std::iter::once(&out.name().to_owned()))
                .cloned()
                .collect();
            assert_eq!(after, expected, "{id}: the others keep their order, the one out goes last");
        }
        for runner in set.list().iter() {
            set.report(runner, false);
            set.report(runner, false);
        }
        assert!(!set.any_up());
        for (id, before) in ids.iter().zip(&before) {
            let after: Vec<String> = set.ranked(id).iter().map(|r| r.name().to_owned()).collect();
            assert_eq!(&after, before, "{id}: all out, all tried in their ranking");
        }
    }
}
