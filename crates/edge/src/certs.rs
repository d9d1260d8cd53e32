//! The edge's certificates for `--tls-listen`: the verified domains'
//! chains and keys, fetched from the control plane's origin listener
//! (`GET <rpc root>certificates`, behind the edge's own token) and held in
//! memory, each served by SNI for the one domain it is stored for — the
//! control plane's own rule (`crates/controlplane/src/certs.rs`), which
//! also decides what the feed sends.
//!
//! The routing feed says when to ask: every certificate change (upload,
//! ACME order or renewal, deletion, a domain verified or removed) bumps
//! the routing generation with the domain touched, so a delta naming
//! domains makes the edge fetch those, and a whole table makes it fetch
//! every certificate again. What could not be fetched stays pending and
//! is asked for again after the next poll; the certificates held keep
//! serving meanwhile. Key material never reaches a log line or an answer.
//! The feed is asked of the root the routing feed last reached (one
//! [`FailoverRoots`] for both): a control-plane node that takes no
//! connection hands it to the next `--rpc-root-fallback`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use isocloud_auth::{ROUTING_AUDIENCE, sign_audience_token};
use isocloud_origin::FailoverRoots;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use url::Url;

use crate::follower::{FollowError, SigningKey, check_roots, now_unix_s};
use crate::hosts::RoutingUpdate;
use crate::metrics::Metrics;

/// A page of the certificate feed larger than this is refused: the control
/// plane sends 100 pairs a page, each at most 80 KiB
/// (`MAX_CERT_PEM_BYTES` + `MAX_KEY_PEM_BYTES` there).
pub const MAX_CERTIFICATE_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// The control plane's bounds on one uploaded chain and key; larger ones
/// are not loaded.
const MAX_CERT_PEM_BYTES: usize = 64 * 1024;
const MAX_KEY_PEM_BYTES: usize = 16 * 1024;
/// More domains than this touched in one delta: every certificate is
/// fetched again (one request) rather than one request per domain.
const MAX_DOMAINS_ONE_BY_ONE: usize = 16;
/// Pages one full fetch may take (a million certificates): a feed whose
/// `next` never ends is not followed forever.
const MAX_PAGES: usize = 10_000;
const TOKEN_TTL_S: u64 = 60;
/// The certificate feed, under each root.
const FEED_PATH: &str = "certificates";

/// The certificates held, by domain (lowercase, no trailing dot).
#[derive(Default)]
pub struct EdgeCertificates {
    by_domain: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for EdgeCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: never the keys.
        f.debug_struct("EdgeCertificates").field("domains", &self.len()).finish()
    }
}

impl EdgeCertificates {
    /// The certificate of exactly this domain (case and a trailing dot
    /// aside): no wildcard reading, as the control plane's SNI table.
    pub fn lookup(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.strip_suffix('.').unwrap_or(server_name).to_ascii_lowercase();
        self.by_domain.read().unwrap_or_else(|p| p.into_inner()).get(&name).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_domain.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn replace_all(&self, all: HashMap<String, Arc<CertifiedKey>>) {
        *self.by_domain.write().unwrap_or_else(|p| p.into_inner()) = all;
    }

    pub(crate) fn put(&self, domain: &str, key: Option<Arc<CertifiedKey>>) {
        let mut table = self.by_domain.write().unwrap_or_else(|p| p.into_inner());
        match key {
            Some(key) => table.insert(domain.to_owned(), key),
            None => table.remove(domain),
        };
    }
}

impl isocloud_ingress::Certificates for EdgeCertificates {
    fn certificate_for(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        self.lookup(server_name)
    }
}

/// One page of `GET /certificates` (the control plane's `CertificatePage`).
#[derive(Debug, Deserialize)]
pub struct CertificatePage {
    pub certificates: Vec<CertificatePem>,
    /// The domain the next page starts after; `None`: the last page.
    pub next: Option<String>,
}

#[derive(Deserialize)]
pub struct CertificatePem {
    pub domain: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertificatePem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificatePem").field("domain", &self.domain).finish_non_exhaustive()
    }
}

/// Why a stored pair does not load (its domain is logged with this; never
/// the PEMs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("the chain or key is larger than the control plane allows")]
    TooLarge,
    #[error("the chain is not PEM certificates")]
    Chain,
    #[error("the key is not a PEM private key of a supported type")]
    Key,
    #[error("the key does not match the certificate")]
    Mismatch,
}

/// A pair as rustls serves it: the chain (leaf first) and its signing key,
/// checked to match.
pub fn load(pem: &CertificatePem) -> Result<CertifiedKey, LoadError> {
    if pem.cert_pem.len() > MAX_CERT_PEM_BYTES || pem.key_pem.len() > MAX_KEY_PEM_BYTES {
        return Err(LoadError::TooLarge);
    }
    let chain = CertificateDer::pem_slice_iter(pem.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| LoadError::Chain)?;
    if chain.is_empty() {
        return Err(LoadError::Chain);
    }
    let key = PrivateKeyDer::from_pem_slice(pem.key_pem.as_bytes()).map_err(|_| LoadError::Key)?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|_| LoadError::Key)?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| LoadError::Mismatch)?;
    Ok(certified)
}

/// What the certificates held need from the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Pending {
    #[default]
    Nothing,
    /// Every certificate again.
    All,
    /// These domains' (a certificate each, or none).
    Domains(BTreeSet<String>),
}

impl Pending {
    /// What `update` asks for: a whole table, every certificate; a delta,
    /// the domains it names (attached, moved or gone alike).
    pub fn of(update: &RoutingUpdate) -> Pending {
        if update.full {
            return Pending::All;
        }
        let domains: BTreeSet<String> = update
            .domains
            .iter()
            .map(|(domain, _)| domain.clone())
            .chain(update.deleted_domains.iter().cloned())
            .collect();
        if domains.is_empty() { Pending::Nothing } else { Pending::Domains(domains) }
    }

    fn merge(&mut self, other: Pending) {
        *self = match (std::mem::take(self), other) {
            (Pending::All, _) | (_, Pending::All) => Pending::All,
            (Pending::Nothing, other) | (other, Pending::Nothing) => other,
            (Pending::Domains(mut ours), Pending::Domains(theirs)) => {
                ours.extend(theirs);
                Pending::Domains(ours)
            }
        };
        if let Pending::Domains(domains) = self
            && domains.len() > MAX_DOMAINS_ONE_BY_ONE
        {
            *self = Pending::All;
        }
    }
}

/// The certificates and the feed that keeps them.
pub struct CertificateFeed {
    certificates: Arc<EdgeCertificates>,
    /// The control plane's origin listeners (the follower's).
    roots: Arc<FailoverRoots>,
    key: SigningKey,
    client: reqwest::Client,
    pending: Mutex<Pending>,
    metrics: Metrics,
}

impl CertificateFeed {
    /// `rpc_root`: the control plane's origin listener (as the follower's).
    pub fn new(
        certificates: Arc<EdgeCertificates>,
        rpc_root: &Url,
        key: SigningKey,
        timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, url::ParseError> {
        Self::from_roots(certificates, Arc::new(FailoverRoots::new(rpc_root.clone(), [])), key, timeout, metrics)
    }

    /// As [`CertificateFeed::new`], over the root and its fallbacks: the
    /// follower's [`FailoverRoots`], so the node that answered its last
    /// poll is asked first.
    pub fn from_roots(
        certificates: Arc<EdgeCertificates>,
        roots: Arc<FailoverRoots>,
        key: SigningKey,
        timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, url::ParseError> {
        check_roots(&roots, FEED_PATH)?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| url::ParseError::EmptyHost)?;
        Ok(Self { certificates, roots, key, client, pending: Mutex::new(Pending::All), metrics })
    }

    pub fn certificates(&self) -> &Arc<EdgeCertificates> {
        &self.certificates
    }

    /// Notes what a routing update asks for (fetched by the next [`Self::refresh`]).
    pub fn note(&self, pending: Pending) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).merge(pending);
    }

    /// Whether anything waits to be fetched.
    pub fn is_pending(&self) -> bool {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) != Pending::Nothing
    }

    /// Fetches what is pending; on a failure it stays pending (and what was
    /// held keeps serving). Returns how many certificates were fetched.
    pub async fn refresh(&self) -> Result<usize, FollowError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let result = match &pending {
            Pending::Nothing => return Ok(0),
            Pending::All => self.fetch_all().await,
            Pending::Domains(domains) => self.fetch_domains(domains).await,
        };
        match &result {
            Ok(_) => self.metrics.certificates_held(self.certificates.len()),
            Err(_) => {
                self.metrics.certificates_failed();
                self.note(pending);
            }
        }
        result
    }

    async fn fetch_all(&self) -> Result<usize, FollowError> {
        let mut all = HashMap::new();
        let mut after = String::new();
        for _ in 0..MAX_PAGES {
            let page = self.fetch(&[("after", &after)]).await?;
            for pem in page.certificates {
                if let Some(key) = loaded(&pem) {
                    all.insert(pem.domain, Arc::new(key));
                }
            }
            match page.next {
                // Names only grow: a `next` that does not is a broken feed.
                Some(next) if next > after => after = next,
                Some(_) => return Err(FollowError::Malformed("the certificate pages do not advance".into())),
                None => {
                    let count = all.len();
                    self.certificates.replace_all(all);
                    return Ok(count);
                }
            }
        }
        Err(FollowError::Malformed(format!("more than {MAX_PAGES} pages of certificates")))
    }

    async fn fetch_domains(&self, domains: &BTreeSet<String>) -> Result<usize, FollowError> {
        let mut fetched = 0;
        for domain in domains {
            let page = self.fetch(&[("domain", domain)]).await?;
            let key = page.certificates.into_iter().find(|pem| pem.domain == *domain).and_then(|pem| loaded(&pem));
            fetched += usize::from(key.is_some());
            self.certificates.put(domain, key.map(Arc::new));
        }
        Ok(fetched)
    }

    async fn fetch(&self, query: &[(&str, &str)]) -> Result<CertificatePage, FollowError> {
        let build = |root: &Url| {
            let token =
                sign_audience_token(&self.key.kid, &self.key.secret, ROUTING_AUDIENCE, now_unix_s(), TOKEN_TTL_S);
            let url = root.join(FEED_PATH).expect("checked in CertificateFeed::from_roots");
            self.client.get(url).query(query).bearer_auth(token)
        };
        let body =
            crate::follower::bounded_body(&self.roots, build, MAX_CERTIFICATE_PAGE_BYTES, "the certificate feed")
                .await?;
        serde_json::from_slice(&body).map_err(|e| FollowError::Malformed(format!("certificates: {e}")))
    }
}

/// `pem` loaded, or `None` with its domain and the reason in the log.
fn loaded(pem: &CertificatePem) -> Option<CertifiedKey> {
    match load(pem) {
        Ok(key) => Some(key),
        Err(e) => {
            tracing::warn!(target: "isocloud::edge", domain = pem.domain, error = %e, "certificate not loaded; not served");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> CertificatePem {
        let cert =
            rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        CertificatePem { domain: names[0].into(), cert_pem: cert.cert.pem(), key_pem: cert.key_pair.serialize_pem() }
    }

    const KID: &str = "cp";
    const SECRET: &str = "edge-test-secret-0123456789abcdef0123";

    /// A control-plane node's origin listener: the certificate feed (one
    /// page, `pair`) and the ACME lookup (one pending token), behind the
    /// edge's token as the real one.
    async fn control_plane_node(pair: CertificatePem) -> Url {
        let verifier = isocloud_auth::SubhostVerifier::new(vec![isocloud_auth::Subhoster {
            kid: KID.into(),
            secret: isocloud_auth::Secret::from(SECRET),
            rpc_root: Url::parse("http://origin.invalid/").unwrap(),
            allowed_rpc_root_prefixes: Vec::new(),
        }])
        .unwrap();
        let authorized = move |headers: &http::HeaderMap| {
            let token = headers["authorization"].to_str().unwrap().strip_prefix("Bearer ").unwrap();
            verifier.verify_audience(token, ROUTING_AUDIENCE, now_unix_s()).is_ok()
        };
        let page = serde_json::json!({
            "certificates": [{ "domain": pair.domain, "cert_pem": pair.cert_pem, "key_pem": pair.key_pem }],
            "next": null,
        })
        .to_string();
        let (certs_auth, acme_auth) = (authorized.clone(), authorized);
        let app = axum::Router::new()
            .route(
                "/v0/certificates",
                axum::routing::get(move |headers: http::HeaderMap| {
                    let answer = if certs_auth(&headers) {
                        (http::StatusCode::OK, page.clone())
                    } else {
                        (http::StatusCode::UNAUTHORIZED, String::new())
                    };
                    async move { answer }
                }),
            )
            .route(
                "/v0/acme_challenge",
                axum::routing::get(
                    move |query: axum::extract::Query<HashMap<String, String>>, headers: http::HeaderMap| {
                        let answer = match (acme_auth(&headers), query.get("token").map(String::as_str)) {
                            (false, _) => (http::StatusCode::UNAUTHORIZED, String::new()),
                            (true, Some("pending_token")) => (http::StatusCode::OK, "pending_token.thumbprint".into()),
                            (true, _) => (http::StatusCode::NOT_FOUND, String::new()),
                        };
                        async move { answer }
                    },
                ),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let root = Url::parse(&format!("http://{}/v0/", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        root
    }

    fn feed_over(roots: &Arc<FailoverRoots>) -> CertificateFeed {
        let key = SigningKey { kid: KID.into(), secret: isocloud_auth::Secret::from(SECRET) };
        CertificateFeed::from_roots(
            Arc::new(EdgeCertificates::default()),
            roots.clone(),
            key,
            Duration::from_secs(5),
            Metrics::unregistered(),
        )
        .unwrap()
    }

    /// A control-plane node that takes no connection hands the certificate
    /// feed and the ACME lookups to the next root named, and they share the
    /// roots: the node that answered is the one asked first after.
    #[tokio::test]
    async fn a_root_that_takes_no_connection_hands_the_certificates_and_acme_to_the_fallback() {
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            Url::parse(&format!("http://{}/v0/", listener.local_addr().unwrap())).unwrap()
        };
        let live = control_plane_node(self_signed(&["www.shop.test"])).await;
        let key = SigningKey { kid: KID.into(), secret: isocloud_auth::Secret::from(SECRET) };
        // The probe: the dead root alone gives neither.
        let alone = Arc::new(FailoverRoots::new(dead.clone(), []));
        let feed = feed_over(&alone);
        assert!(matches!(feed.refresh().await, Err(FollowError::Unreachable(_))));
        assert!(feed.is_pending() && feed.certificates().is_empty(), "still pending, nothing held");
        let acme = crate::AcmeLookup::from_roots(alone, key.clone()).unwrap();
        assert_eq!(acme.key_authorization("www.shop.test", "pending_token").await, None);

        let roots = Arc::new(FailoverRoots::new(dead, [live]));
        let feed = feed_over(&roots);
        assert_eq!(feed.refresh().await.unwrap(), 1);
        assert!(feed.certificates().lookup("www.shop.test").is_some());
        assert!(!feed.is_pending());
        assert_eq!(roots.current(), 1, "the node that answered is asked first now");
        let acme = crate::AcmeLookup::from_roots(roots.clone(), key).unwrap();
        let answer = acme.key_authorization("www.shop.test", "pending_token").await;
        assert_eq!(answer.as_deref(), Some("pending_token.thumbprint"));
        assert_eq!(acme.key_authorization("www.shop.test", "other_token").await, None, "not pending");
    }

    #[test]
    fn a_pair_loads_only_when_it_matches() {
        let good = self_signed(&["www.shop.test"]);
        assert!(load(&good).is_ok(), "the probe loads");
        let other = self_signed(&["www.shop.test"]);
        let mismatched = CertificatePem { key_pem: other.key_pem.clone(), ..self_signed(&["www.shop.test"]) };
        assert_eq!(load(&mismatched).err(), Some(LoadError::Mismatch));
        let garbage = CertificatePem { cert_pem: "garbage".into(), ..self_signed(&["a.test"]) };
        assert_eq!(load(&garbage).err(), Some(LoadError::Chain));
        let no_key = CertificatePem { key_pem: "garbage".into(), ..self_signed(&["a.test"]) };
        assert_eq!(load(&no_key).err(), Some(LoadError::Key));
        let huge = CertificatePem { cert_pem: "x".repeat(MAX_CERT_PEM_BYTES + 1), ..self_signed(&["a.test"]) };
        assert_eq!(load(&huge).err(), Some(LoadError::TooLarge));
        assert!(!format!("{good:?}").contains("PRIVATE KEY"), "Debug never shows the key");
    }

    #[test]
    fn lookups_are_exact_domain_names() {
        let table = EdgeCertificates::default();
        let wild = self_signed(&["*.shop.test"]);
        table.put("www.shop.test", Some(Arc::new(load(&wild).unwrap())));
        assert!(table.lookup("www.shop.test").is_some());
        assert!(table.lookup("WWW.shop.test.").is_some());
        // The wildcard's siblings get nothing from it.
        assert!(table.lookup("api.shop.test").is_none());
        assert!(table.lookup("shop.test").is_none());
        table.put("www.shop.test", None);
        assert!(table.is_empty());
    }

    #[test]
    fn routing_updates_say_which_certificates_to_fetch() {
        let mut delta = RoutingUpdate::unchanged(3, "localhost");
        assert_eq!(Pending::of(&delta), Pending::Nothing);
        delta.domains.push(("www.shop.test".into(), "p1".into()));
        delta.deleted_domains.push("old.shop.test".into());
        let named = Pending::of(&delta);
        assert_eq!(named, Pending::Domains(["old.shop.test".to_owned(), "www.shop.test".to_owned()].into()));
        let mut pending = Pending::Nothing;
        pending.merge(named.clone());
        assert_eq!(pending, named);
        pending.merge(Pending::All);
        assert_eq!(pending, Pending::All);
        let mut many = Pending::Nothing;
        for i in 0..=MAX_DOMAINS_ONE_BY_ONE {
            many.merge(Pending::Domains([format!("d{i}.test")].into()));
        }
        assert_eq!(many, Pending::All, "past the bound, one fetch of every certificate");
        let full = RoutingUpdate { full: true, ..RoutingUpdate::unchanged(4, "localhost") };
        assert_eq!(Pending::of(&full), Pending::All);
    }
}
