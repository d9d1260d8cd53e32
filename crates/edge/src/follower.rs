//! Keeping the host table fresh: the control plane's routing feed
//! (`GET <rpc root>routing?since=G` on its origin listener), polled every
//! second. The first answer is the table whole; after it, the changes past
//! the generation held. When the control plane cannot be reached or answers
//! something unusable, the edge keeps serving the table it holds and asks
//! again; when a delta does not fit (another base domain), it asks for the
//! table whole. A root that takes no connection hands the poll to the
//! next `--rpc-root-fallback` ([`FailoverRoots`], shared with the
//! certificate feed and the ACME lookups).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isocloud_auth::{ROUTING_AUDIENCE, Secret, sign_audience_token};
use isocloud_origin::FailoverRoots;
use url::Url;

use crate::certs::{CertificateFeed, Pending};
use crate::hosts::{HostTable, RoutingUpdate};
use crate::metrics::Metrics;

/// A routing answer larger than this is refused: about 30 bytes go to each
/// ready deployment in a full table, so this holds ~15 million of them.
pub const MAX_ROUTING_BYTES: usize = 512 * 1024 * 1024;

/// The routing feed, under each root.
const FEED_PATH: &str = "routing";

/// How long the feed's tokens live: one poll, with room for a slow answer.
const TOKEN_TTL_S: u64 = 60;

/// The key the edge signs with: the control plane's `--origin-secret` and
/// the runners' `--subhost-secret` (one `KID=SECRET` for the three roles).
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub kid: String,
    pub secret: Secret,
}

impl SigningKey {
    /// A short-lived token for the control plane's edge routes (its
    /// routing audience: no RPC or relay route takes it).
    pub(crate) fn routing_token(&self) -> String {
        sign_audience_token(&self.kid, &self.secret, ROUTING_AUDIENCE, now_unix_s(), TOKEN_TTL_S)
    }
}

/// The client every edge route of the control plane is asked with: the
/// answer is ours to decode, never followed elsewhere; an https root's
/// certificate may also come from the roots' own trust (`--rpc-root-ca`).
pub(crate) fn control_plane_client(
    roots: &FailoverRoots,
    timeout: Duration,
    connect_timeout: Duration,
) -> Result<reqwest::Client, url::ParseError> {
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none());
    roots.trust().apply(builder).build().map_err(|_| url::ParseError::EmptyHost)
}

/// Why a poll brought nothing. Shown in the edge's log; never holds the
/// secret or the token.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("the control plane could not be reached: {0}")]
    Unreachable(String),
    #[error("the control plane answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the control plane's answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the control plane's answer is not what was asked for: {0}")]
    Malformed(String),
}

/// The host table and the feed that keeps it.
pub struct Follower {
    table: Arc<RwLock<HostTable>>,
    /// The control plane's origin listeners: the feed is `routing` under
    /// the one that last answered, or the next when it takes no connection.
    roots: Arc<FailoverRoots>,
    key: SigningKey,
    client: reqwest::Client,
    metrics: Metrics,
    /// `--tls-listen`: the certificates, fetched as the feed names their
    /// domains (`None`: the edge holds no key).
    certificates: Option<Arc<CertificateFeed>>,
}

/// What one poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// The table was replaced whole.
    Full,
    /// Changes were applied (or none had happened).
    Delta,
}

impl Follower {
    /// `rpc_root`: the control plane's origin listener, as the runners'
    /// `--rpc-root` names it (ends in `/`). `timeout`: one poll's.
    pub fn new(
        table: Arc<RwLock<HostTable>>,
        rpc_root: &Url,
        key: SigningKey,
        timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, url::ParseError> {
        Self::from_roots(table, Arc::new(FailoverRoots::new(rpc_root.clone(), [])), key, timeout, metrics)
    }

    /// As [`Follower::new`], over the root and its fallbacks
    /// (`--rpc-root-fallback`), shared with the certificate feed and the
    /// ACME lookups.
    pub fn from_roots(
        table: Arc<RwLock<HostTable>>,
        roots: Arc<FailoverRoots>,
        key: SigningKey,
        timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, url::ParseError> {
        check_roots(&roots, FEED_PATH)?;
        let client = control_plane_client(&roots, timeout, timeout.min(Duration::from_secs(5)))?;
        Ok(Self { table, roots, key, client, metrics, certificates: None })
    }

    /// Keeps `certificates` too: every domain the feed reports changed has
    /// its certificate fetched again after the poll that saw it.
    pub fn with_certificates(mut self, certificates: Arc<CertificateFeed>) -> Self {
        self.certificates = Some(certificates);
        self
    }

    /// Fetches the certificates the feed has named since the last time
    /// (none without `--tls-listen`); a failure leaves them pending for the
    /// next poll.
    pub async fn refresh_certificates(&self) -> Result<usize, FollowError> {
        match &self.certificates {
            Some(feed) => feed.refresh().await,
            None => Ok(0),
        }
    }

    /// The table this follower keeps.
    pub fn table(&self) -> &Arc<RwLock<HostTable>> {
        &self.table
    }

    /// One poll: the changes past the generation held (the table whole when
    /// none is held), applied. On a delta that does not fit, once more for
    /// the table whole.
    pub async fn poll_once(&self) -> Result<Polled, FollowError> {
        let since = self.table.read().unwrap_or_else(|p| p.into_inner()).generation();
        let update = self.fetch(since).await?;
        let full = update.full;
        let touched = Pending::of(&update);
        let applied = self.table.write().unwrap_or_else(|p| p.into_inner()).apply(update);
        match applied {
            Ok(()) => self.note_certificates(touched),
            Err(e) => {
                tracing::warn!(target: "isocloud::edge", error = %e, "routing: reloading the host table whole");
                let whole = self.fetch(None).await?;
                if !whole.full {
                    return Err(FollowError::Malformed("asked for the table whole, got a delta".into()));
                }
                self.table
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .apply(whole)
                    .map_err(|e| FollowError::Malformed(e.to_string()))?;
                self.note_certificates(Pending::All);
                return Ok(Polled::Full);
            }
        }
        Ok(if full { Polled::Full } else { Polled::Delta })
    }

    fn note_certificates(&self, touched: Pending) {
        if let Some(feed) = &self.certificates {
            feed.note(touched);
        }
    }

    /// Asks the root that last answered first; one whose connection cannot
    /// be made passes the poll to the next.
    async fn send(&self, since: Option<i64>) -> Result<reqwest::Response, FollowError> {
        self.roots
            .send("the routing feed", |root| {
                let mut url = root.join(FEED_PATH).expect("checked in Follower::from_roots");
                if let Some(since) = since {
                    url.query_pairs_mut().append_pair("since", &since.to_string());
                }
                self.client.get(url).bearer_auth(self.key.routing_token())
            })
            .await
            .map_err(|e| FollowError::Unreachable(without_url(&e, "the routing feed")))
    }

    async fn fetch(&self, since: Option<i64>) -> Result<RoutingUpdate, FollowError> {
        let response = self.send(since).await?;
        let body = read_bounded(response, MAX_ROUTING_BYTES, "the routing feed").await?;
        serde_json::from_slice(&body).map_err(|e| FollowError::Malformed(e.to_string()))
    }

    /// Polls every `interval` until dropped. A failure is logged when the
    /// feed goes from working to failing (and when it works again), not
    /// every second; the table held keeps serving meanwhile.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let (mut failing, mut certificates_failing) = (false, false);
        loop {
            let started = tokio::time::Instant::now();
            match self.poll_once().await {
                Ok(polled) => {
                    let (generation, (projects, deployments, domains)) = {
                        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
                        (table.generation().unwrap_or(0), table.sizes())
                    };
                    self.metrics.routing_polled(polled == Polled::Full, generation, deployments);
                    if failing || polled == Polled::Full {
                        tracing::info!(
                            target: "isocloud::edge",
                            generation,
                            projects,
                            deployments,
                            domains,
                            full = polled == Polled::Full,
                            "routing: host table up to date"
                        );
                    }
                    failing = false;
                }
                Err(e) => {
                    self.metrics.routing_failed();
                    if !failing {
                        tracing::warn!(
                            target: "isocloud::edge",
                            error = %e,
                            "routing: cannot follow the control plane; serving the host table held"
                        );
                    }
                    failing = true;
                }
            }
            certificates_failing = self.log_certificates(self.refresh_certificates().await, certificates_failing);
            tokio::time::sleep_until(started + interval).await;
        }
    }

    /// Logs a certificate refresh (a change of state, or certificates
    /// fetched: counts and never keys); returns whether it failed.
    pub fn log_certificates(&self, refreshed: Result<usize, FollowError>, was_failing: bool) -> bool {
        let held = self.certificates.as_ref().map_or(0, |feed| feed.certificates().len());
        match refreshed {
            Ok(0) if !was_failing => false,
            Ok(fetched) => {
                tracing::info!(target: "isocloud::edge", fetched, held, "certificates: up to date");
                false
            }
            Err(e) => {
                if !was_failing {
                    tracing::warn!(
                        target: "isocloud::edge",
                        error = %e,
                        held,
                        "certificates: cannot fetch from the control plane; serving those held"
                    );
                }
                true
            }
        }
    }
}

/// Checks that `path` joins onto every root (a root that cannot be a base
/// is refused when the feed is made, not at each request).
pub(crate) fn check_roots(roots: &FailoverRoots, path: &str) -> Result<(), url::ParseError> {
    roots.roots().iter().try_for_each(|root| root.join(path).map(drop))
}

/// The body of a successful answer to the request `build` makes for a root
/// of `roots` (the one that last answered first), at most `limit` bytes
/// (`TooLarge` past it, never read further); `what` names the route in
/// errors.
pub(crate) async fn bounded_body(
    roots: &FailoverRoots,
    build: impl Fn(&Url) -> reqwest::RequestBuilder,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, FollowError> {
    let response = roots.send(what, build).await.map_err(|e| FollowError::Unreachable(without_url(&e, what)))?;
    read_bounded(response, limit, what).await
}

/// A 2xx answer's body, refused past `limit` bytes; another status is an
/// error carrying the start of its text.
pub(crate) async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, FollowError> {
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message: String = text.chars().take(300).collect();
        return Err(FollowError::Status { status: status.as_u16(), message });
    }
    if response.content_length().is_some_and(|len| len > limit as u64) {
        return Err(FollowError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| FollowError::Unreachable(without_url(&e, what)))? {
        if body.len() + chunk.len() > limit {
            return Err(FollowError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// reqwest's message without the URL it names (the query is harmless, but
/// the log line names the control plane once, not per error).
fn without_url(e: &reqwest::Error, what: &str) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(&format!(" ({url})"), "").replace(url.as_str(), what);
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

pub(crate) fn now_unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use isocloud_auth::{SubhostVerifier, Subhoster};
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::hosts::ProjectRoute;

    const KID: &str = "cp";
    const SECRET: &str = "edge-test-secret-0123456789abcdef0123";

    /// A control plane's routing feed: answers from a script, in order,
    /// after checking the token as the origin listener does; records the
    /// `since` of each call.
    #[derive(Default)]
    struct Feed {
        script: Mutex<VecDeque<Result<RoutingUpdate, u16>>>,
        calls: Mutex<Vec<Option<String>>>,
    }

    async fn feed() -> (Arc<Feed>, Url) {
        let feed = Arc::new(Feed::default());
        let verifier = SubhostVerifier::new(vec![Subhoster {
            kid: KID.into(),
            secret: Secret::from(SECRET),
            rpc_root: Url::parse("http://origin.invalid/").unwrap(),
            allowed_rpc_root_prefixes: Vec::new(),
        }])
        .unwrap();
        let state = feed.clone();
        let app = axum::Router::new().route(
            "/v0/routing",
            axum::routing::get(
                move |query: axum::extract::Query<std::collections::HashMap<String, String>>,
                      headers: http::HeaderMap| {
                    let (state, verifier) = (state.clone(), verifier.clone());
                    async move {
                        let token = headers["authorization"].to_str().unwrap().strip_prefix("Bearer ").unwrap();
                        if let Err(e) = verifier.verify_audience(token, ROUTING_AUDIENCE, now_unix_s()) {
                            return (http::StatusCode::UNAUTHORIZED, e.to_string());
                        }
                        state.calls.lock().unwrap().push(query.get("since").cloned());
                        match state.script.lock().unwrap().pop_front() {
                            Some(Ok(update)) => (http::StatusCode::OK, serde_json::to_string(&update).unwrap()),
                            Some(Err(status)) => (http::StatusCode::from_u16(status).unwrap(), "down".into()),
                            None => (http::StatusCode::SERVICE_UNAVAILABLE, "no more answers".into()),
                        }
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let root = Url::parse(&format!("http://{}/v0/", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (feed, root)
    }

    fn follower(root: &Url, secret: &str) -> Follower {
        follower_over(Arc::new(FailoverRoots::new(root.clone(), [])), secret)
    }

    fn follower_over(roots: Arc<FailoverRoots>, secret: &str) -> Follower {
        let key = SigningKey { kid: KID.into(), secret: Secret::from(secret) };
        let metrics = Metrics::new(&mut Registry::default());
        let table = Arc::new(RwLock::new(HostTable::default()));
        Follower::from_roots(table, roots, key, Duration::from_secs(5), metrics).unwrap()
    }

    fn whole(generation: i64, production: &str) -> RoutingUpdate {
        RoutingUpdate {
            full: true,
            projects: vec![ProjectRoute { id: "p1".into(), name: "hello".into(), production: Some(production.into()) }],
            deployments: vec![(production.into(), "p1".into())],
            ..RoutingUpdate::unchanged(generation, "localhost")
        }
    }

    fn resolve(follower: &Follower, host: &str) -> Option<String> {
        follower.table().read().unwrap().resolve(host).map(str::to_owned)
    }

    /// A root that takes no connection (a control-plane node down) hands
    /// the poll to the next; the one that answered is asked first after.
    #[tokio::test]
    async fn a_root_that_takes_no_connection_hands_the_feed_to_the_fallback() {
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            Url::parse(&format!("http://{}/v0/", listener.local_addr().unwrap())).unwrap()
        };
        let (feed, live) = feed().await;
        feed.script
            .lock()
            .unwrap()
            .extend([Ok(whole(7, "aaaaaaaaaaaa")), Ok(RoutingUpdate::unchanged(7, "localhost"))]);
        // The probe: the dead root alone is unreachable.
        assert!(matches!(follower(&dead, SECRET).poll_once().await, Err(FollowError::Unreachable(_))));
        let roots = Arc::new(FailoverRoots::new(dead, [live]));
        let follower = follower_over(roots.clone(), SECRET);
        assert_eq!(follower.poll_once().await.unwrap(), Polled::Full);
        assert_eq!(resolve(&follower, "hello.localhost").as_deref(), Some("aaaaaaaaaaaa"));
        assert_eq!(follower.poll_once().await.unwrap(), Polled::Delta);
        assert_eq!(*feed.calls.lock().unwrap(), vec![None, Some("7".to_owned())]);
        assert_eq!(roots.current(), 1, "the live root is asked first now");
    }

    /// The first poll asks for the table whole, every later one for the
    /// changes past the generation held; a promotion arrives as a delta.
    #[tokio::test]
    async fn the_follower_loads_whole_then_follows_the_changes() {
        let (feed, root) = feed().await;
        feed.script.lock().unwrap().extend([
            Ok(whole(7, "aaaaaaaaaaaa")),
            Ok(RoutingUpdate::unchanged(7, "localhost")),
            Ok(RoutingUpdate {
                projects: vec![ProjectRoute {
                    id: "p1".into(),
                    name: "hello".into(),
                    production: Some("bbbbbbbbbbbb".into()),
                }],
                deployments: vec![("bbbbbbbbbbbb".into(), "p1".into())],
                ..RoutingUpdate::unchanged(9, "localhost")
            }),
        ]);
        let follower = follower(&root, SECRET);
        assert_eq!(follower.poll_once().await.unwrap(), Polled::Full);
        assert_eq!(resolve(&follower, "hello.localhost").as_deref(), Some("aaaaaaaaaaaa"));
        assert_eq!(follower.poll_once().await.unwrap(), Polled::Delta);
        assert_eq!(follower.poll_once().await.unwrap(), Polled::Delta);
        assert_eq!(resolve(&follower, "hello.localhost").as_deref(), Some("bbbbbbbbbbbb"));
        assert_eq!(resolve(&follower, "hello-aaaaaaaaaaaa.localhost").as_deref(), Some("aaaaaaaaaaaa"));
        assert_eq!(follower.table().read().unwrap().generation(), Some(9));
        assert_eq!(*feed.calls.lock().unwrap(), [None, Some("7".into()), Some("7".into())]);
    }

    /// The control plane answering errors, then gone altogether: each poll
    /// fails, and the table held answers as before.
    #[tokio::test]
    async fn the_table_held_keeps_serving_while_the_control_plane_is_away() {
        let (feed, root) = feed().await;
        feed.script.lock().unwrap().extend([Ok(whole(3, "aaaaaaaaaaaa")), Err(503), Err(500)]);
        let follower = follower(&root, SECRET);
        follower.poll_once().await.unwrap();
        for _ in 0..2 {
            assert!(matches!(follower.poll_once().await, Err(FollowError::Status { status: 500 | 503, .. })));
            assert_eq!(resolve(&follower, "hello.localhost").as_deref(), Some("aaaaaaaaaaaa"));
        }
        let gone = Url::parse(&format!("http://127.0.0.1:{}/v0/", closed_port())).unwrap();
        let away = Follower::new(
            follower.table().clone(),
            &gone,
            SigningKey { kid: KID.into(), secret: Secret::from(SECRET) },
            Duration::from_secs(5),
            Metrics::new(&mut Registry::default()),
        )
        .unwrap();
        assert!(matches!(away.poll_once().await, Err(FollowError::Unreachable(_))));
        assert_eq!(resolve(&away, "hello.localhost").as_deref(), Some("aaaaaaaaaaaa"));
        assert_eq!(away.table().read().unwrap().generation(), Some(3));
    }

    /// A delta that does not fit the table held (the control plane now
    /// serves another base domain) makes the follower ask for it whole.
    #[tokio::test]
    async fn a_delta_that_does_not_fit_is_followed_by_the_table_whole() {
        let (feed, root) = feed().await;
        let mut moved = whole(12, "cccccccccccc");
        moved.base_domain = "apps.example.com".into();
        feed.script.lock().unwrap().extend([
            Ok(whole(3, "aaaaaaaaaaaa")),
            Ok(RoutingUpdate::unchanged(12, "apps.example.com")),
            Ok(moved),
        ]);
        let follower = follower(&root, SECRET);
        follower.poll_once().await.unwrap();
        assert_eq!(follower.poll_once().await.unwrap(), Polled::Full);
        assert_eq!(*feed.calls.lock().unwrap(), [None, Some("3".into()), None]);
        assert_eq!(resolve(&follower, "hello.localhost"), None);
        assert_eq!(resolve(&follower, "hello.apps.example.com").as_deref(), Some("cccccccccccc"));
    }

    /// The feed checks the edge's token: one signed with another secret is
    /// refused, and the table stays empty.
    #[tokio::test]
    async fn a_wrong_key_gets_no_table() {
        let (feed, root) = feed().await;
        feed.script.lock().unwrap().push_back(Ok(whole(3, "aaaaaaaaaaaa")));
        let outsider = follower(&root, "another-secret-0123456789abcdef0123");
        assert!(matches!(outsider.poll_once().await, Err(FollowError::Status { status: 401, .. })));
        assert_eq!(outsider.table().read().unwrap().generation(), None);
        assert!(feed.calls.lock().unwrap().is_empty(), "refused before the feed answered");
        follower(&root, SECRET).poll_once().await.unwrap();
    }

    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }
}
