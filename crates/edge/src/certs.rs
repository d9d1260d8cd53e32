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
//!
//! TLS-ALPN-01 (RFC 8737) the same way: the control plane's pending
//! challenges (`GET <rpc root>tls_alpn_challenges`, the key authorization's
//! SHA-256 only) are fetched with the certificates — writing or clearing one
//! is a routing change on its domain — and the edge mints each challenge
//! certificate itself ([`isocloud_ingress::tls_alpn_certificate`], as the
//! control plane does), a table bounded by [`MAX_TLS_ALPN_CHALLENGES`]. A
//! hello offering `acme-tls/1` gets that certificate or none, never the
//! domain's real one.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use isocloud_origin::FailoverRoots;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use url::Url;

use crate::follower::{FollowError, SigningKey, check_roots, control_plane_client};
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
/// The certificate feed, under each root.
const FEED_PATH: &str = "certificates";
/// The pending TLS-ALPN-01 challenges, under each root.
const TLS_ALPN_PATH: &str = "tls_alpn_challenges";
/// The pending TLS-ALPN-01 challenges held at most (the control plane's
/// own bound, and what its answer holds at most). About 1 KiB each.
pub const MAX_TLS_ALPN_CHALLENGES: usize = 1024;
/// A TLS-ALPN-01 answer larger than this is refused (1024 entries of a
/// domain, a 64-character digest and an expiry are well under it).
const MAX_TLS_ALPN_PAGE_BYTES: usize = 1024 * 1024;

/// A TLS-ALPN-01 challenge certificate held, and what it answers.
struct TlsAlpnEntry {
    digest: [u8; 32],
    expires_at_ms: i64,
    certificate: Arc<CertifiedKey>,
}

/// The certificates held, by domain (lowercase, no trailing dot).
#[derive(Default)]
pub struct EdgeCertificates {
    by_domain: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// The TLS-ALPN-01 challenge certificates pending, by domain.
    tls_alpn: RwLock<HashMap<String, TlsAlpnEntry>>,
}

impl std::fmt::Debug for EdgeCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: never the keys.
        let challenges = self.tls_alpn.read().unwrap_or_else(|p| p.into_inner()).len();
        f.debug_struct("EdgeCertificates").field("domains", &self.len()).field("tls_alpn", &challenges).finish()
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

    /// The TLS-ALPN-01 challenge certificate pending for exactly
    /// `server_name` (case and a trailing dot aside), unless expired.
    pub fn tls_alpn_lookup(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.strip_suffix('.').unwrap_or(server_name).to_ascii_lowercase();
        let table = self.tls_alpn.read().unwrap_or_else(|p| p.into_inner());
        let entry = table.get(&name)?;
        (entry.expires_at_ms > now_ms()).then(|| entry.certificate.clone())
    }

    /// The TLS-ALPN-01 challenges held.
    pub fn tls_alpn_len(&self) -> usize {
        self.tls_alpn.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Every pending challenge is now `challenges` (the first
    /// [`MAX_TLS_ALPN_CHALLENGES`]); unchanged ones keep their certificate.
    /// Minted outside the lock: handshakes keep reading the old table.
    fn replace_tls_alpn(&self, challenges: &[TlsAlpnDigest]) {
        let mut table = HashMap::new();
        for challenge in challenges.iter().take(MAX_TLS_ALPN_CHALLENGES) {
            let Some(digest) = challenge.digest_bytes() else { continue };
            let kept = self
                .tls_alpn
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&challenge.domain)
                .and_then(|entry| (entry.digest == digest).then(|| entry.certificate.clone()));
            if let Some(certificate) = kept.or_else(|| minted(&challenge.domain, &digest)) {
                let entry = TlsAlpnEntry { digest, expires_at_ms: challenge.expires_at_ms, certificate };
                table.insert(challenge.domain.clone(), entry);
            }
        }
        *self.tls_alpn.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// `domain`'s pending challenge is now `challenge` (`None`: none). Past
    /// the bound (expired entries pruned first) a new domain is left out,
    /// logged: the ACME server's validation fails and the order is retried.
    fn put_tls_alpn(&self, domain: &str, challenge: Option<&TlsAlpnDigest>) {
        let Some((challenge, digest)) = challenge.and_then(|c| Some((c, c.digest_bytes()?))) else {
            self.tls_alpn.write().unwrap_or_else(|p| p.into_inner()).remove(domain);
            return;
        };
        {
            let mut table = self.tls_alpn.write().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = table.get_mut(domain)
                && entry.digest == digest
            {
                entry.expires_at_ms = challenge.expires_at_ms;
                return;
            }
            let now = now_ms();
            table.retain(|_, entry| entry.expires_at_ms > now);
            if !table.contains_key(domain) && table.len() >= MAX_TLS_ALPN_CHALLENGES {
                tracing::warn!(
                    target: "isocloud::edge",
                    domain,
                    max = MAX_TLS_ALPN_CHALLENGES,
                    "too many pending tls-alpn-01 challenges; this one is not answered here"
                );
                return;
            }
        }
        let certificate = minted(domain, &digest);
        let mut table = self.tls_alpn.write().unwrap_or_else(|p| p.into_inner());
        match certificate {
            Some(certificate) => {
                let entry = TlsAlpnEntry { digest, expires_at_ms: challenge.expires_at_ms, certificate };
                table.insert(domain.to_owned(), entry);
            }
            None => {
                table.remove(domain);
            }
        }
    }
}

impl isocloud_ingress::Certificates for EdgeCertificates {
    fn certificate_for(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        self.lookup(server_name)
    }

    fn acme_tls_alpn_certificate(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn_lookup(server_name)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

/// `domain`'s challenge certificate for `digest`, or `None` logged.
fn minted(domain: &str, digest: &[u8; 32]) -> Option<Arc<CertifiedKey>> {
    match isocloud_ingress::tls_alpn_certificate(domain, digest) {
        Ok(certificate) => Some(Arc::new(certificate)),
        Err(e) => {
            tracing::warn!(target: "isocloud::edge", domain, error = %e, "cannot make the tls-alpn-01 certificate");
            None
        }
    }
}

/// The answer of `GET /tls_alpn_challenges` (the control plane's `TlsAlpnPage`).
#[derive(Debug, Default, Deserialize)]
pub struct TlsAlpnPage {
    pub challenges: Vec<TlsAlpnDigest>,
}

/// A pending TLS-ALPN-01 challenge: its domain, the key authorization's
/// SHA-256 (hex) and when it expires (ms since the epoch).
#[derive(Debug, Clone, Deserialize)]
pub struct TlsAlpnDigest {
    pub domain: String,
    pub digest: String,
    pub expires_at_ms: i64,
}

impl TlsAlpnDigest {
    /// The digest's 32 bytes, `None` (logged) unless 64 hex digits.
    fn digest_bytes(&self) -> Option<[u8; 32]> {
        let mut digest = [0u8; 32];
        let parsed = hex::decode_to_slice(&self.digest, &mut digest).is_ok();
        if !parsed {
            tracing::warn!(target: "isocloud::edge", domain = self.domain, "tls-alpn-01 digest is not SHA-256 hex; not answered");
        }
        parsed.then_some(digest)
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
        check_roots(&roots, TLS_ALPN_PATH)?;
        let client = control_plane_client(&roots, timeout, timeout.min(Duration::from_secs(5)))?;
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
                    let challenges = self.fetch_tls_alpn(&[]).await?;
                    let count = all.len();
                    self.certificates.replace_all(all);
                    self.certificates.replace_tls_alpn(&challenges.challenges);
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
            let challenges = self.fetch_tls_alpn(&[("domain", domain)]).await?;
            let challenge = challenges.challenges.iter().find(|challenge| challenge.domain == *domain);
            self.certificates.put_tls_alpn(domain, challenge);
        }
        Ok(fetched)
    }

    async fn fetch_tls_alpn(&self, query: &[(&str, &str)]) -> Result<TlsAlpnPage, FollowError> {
        match self.get_json(TLS_ALPN_PATH, query, MAX_TLS_ALPN_PAGE_BYTES, "the tls-alpn-01 challenges").await {
            // A control plane older than the route (edges upgraded
            // first): it orders no tls-alpn-01 challenge, and the
            // certificates must keep coming.
            Err(FollowError::Status { status: 404, .. }) => Ok(TlsAlpnPage::default()),
            answer => answer,
        }
    }

    async fn fetch(&self, query: &[(&str, &str)]) -> Result<CertificatePage, FollowError> {
        self.get_json(FEED_PATH, query, MAX_CERTIFICATE_PAGE_BYTES, "the certificate feed").await
    }

    /// `GET <root>path?query` with the edge's token, through the shared
    /// roots; an answer over `limit` bytes or not a `T` is refused.
    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        limit: usize,
        what: &'static str,
    ) -> Result<T, FollowError> {
        let build = |root: &Url| {
            let url = root.join(path).expect("checked in CertificateFeed::from_roots");
            self.client.get(url).query(query).bearer_auth(self.key.routing_token())
        };
        let body = crate::follower::bounded_body(&self.roots, build, limit, what).await?;
        serde_json::from_slice(&body).map_err(|e| FollowError::Malformed(format!("{path}: {e}")))
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
    use isocloud_auth::ROUTING_AUDIENCE;

    use super::*;
    use crate::follower::now_unix_s;

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
        control_plane_node_with(pair, Some(Arc::default())).await
    }

    /// As [`control_plane_node`], with `challenges` the TLS-ALPN-01 ones
    /// pending (changed by the test as the store would be); `None`: a
    /// control plane from before the route.
    async fn control_plane_node_with(
        pair: CertificatePem,
        challenges: Option<Arc<Mutex<Vec<serde_json::Value>>>>,
    ) -> Url {
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
        let (certs_auth, acme_auth, alpn_auth) = (authorized.clone(), authorized.clone(), authorized);
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
        let app = match challenges {
            None => app,
            Some(challenges) => app.route(
                "/v0/tls_alpn_challenges",
                axum::routing::get(
                    move |query: axum::extract::Query<HashMap<String, String>>, headers: http::HeaderMap| {
                        let answer = if alpn_auth(&headers) {
                            let pending = challenges.lock().unwrap().clone();
                            let wanted = query.get("domain");
                            let challenges: Vec<_> =
                                pending.into_iter().filter(|c| wanted.is_none_or(|d| c["domain"] == **d)).collect();
                            (http::StatusCode::OK, serde_json::json!({ "challenges": challenges }).to_string())
                        } else {
                            (http::StatusCode::UNAUTHORIZED, String::new())
                        };
                        async move { answer }
                    },
                ),
            ),
        };
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

    /// An edge upgraded before its control plane: the node has no
    /// `tls_alpn_challenges` route (404), and certificates still arrive,
    /// in full and per domain.
    #[tokio::test]
    async fn a_control_plane_without_the_tls_alpn_route_still_feeds_certificates() {
        let with_route = control_plane_node(self_signed(&["www.shop.test"])).await;
        let probe = feed_over(&Arc::new(FailoverRoots::new(with_route, Vec::new())));
        assert_eq!(probe.refresh().await.unwrap(), 1, "the probe: a current node feeds the certificate");

        let old = control_plane_node_with(self_signed(&["www.shop.test"]), None).await;
        let unknown = reqwest::get(old.join(TLS_ALPN_PATH).unwrap()).await.unwrap();
        assert_eq!(unknown.status(), 404, "the old node does not know the route");
        let feed = feed_over(&Arc::new(FailoverRoots::new(old, Vec::new())));
        assert_eq!(feed.refresh().await.unwrap(), 1);
        assert!(feed.certificates().lookup("www.shop.test").is_some());
        feed.note(Pending::Domains(BTreeSet::from(["www.shop.test".to_owned()])));
        assert_eq!(feed.refresh().await.unwrap(), 1);
        assert!(!feed.is_pending());
        assert_eq!(feed.certificates().tls_alpn_len(), 0);
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

    /// The acmeIdentifier extension as it appears in a certificate's DER:
    /// its OID, critical, an OCTET STRING holding the OCTET STRING `digest`.
    fn acme_identifier_der(digest: &[u8; 32]) -> Vec<u8> {
        let mut der = vec![0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f, 0x01, 0x01, 0xff];
        der.extend_from_slice(&[0x04, 0x22, 0x04, 0x20]);
        der.extend_from_slice(digest);
        der
    }

    /// A handshake with the edge's TLS acceptor over memory, SNI `name`,
    /// offering `alpn`: the leaf the client got and the protocol agreed.
    async fn handshake(
        acceptor: &tokio_rustls::TlsAcceptor,
        name: &str,
        alpn: &[&[u8]],
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
        let connector = isocloud_test_tls::trusting_connector(alpn);
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let (client, server) = tokio::join!(connector.connect(server_name, client_io), acceptor.accept(server_io));
        let client = client.map_err(|e| format!("client: {e}"))?;
        server.map_err(|e| format!("server: {e}"))?;
        let agreed = client.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        Ok((client.get_ref().1.peer_certificates().unwrap()[0].to_vec(), agreed))
    }

    /// A TLS-ALPN-01 challenge pending in the control plane reaches the
    /// edge's TLS listener: a hello offering `acme-tls/1` for that name gets
    /// a self-signed certificate with the critical acmeIdentifier holding the
    /// digest, a browser's hello the domain's real certificate, any other
    /// name with `acme-tls/1` nothing; a delta naming the domain drops it.
    #[tokio::test]
    async fn the_edges_tls_listener_answers_a_pending_tls_alpn_01_challenge_only() {
        let pair = self_signed(&["www.shop.test"]);
        let real = load(&pair).unwrap().cert[0].to_vec();
        let digest: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let far = now_ms() + 600_000;
        let challenges = Arc::new(Mutex::new(vec![
            serde_json::json!({ "domain": "www.shop.test", "digest": hex, "expires_at_ms": far }),
            serde_json::json!({ "domain": "bad.shop.test", "digest": "not hex", "expires_at_ms": far }),
        ]));
        let root = control_plane_node_with(pair, Some(challenges.clone())).await;
        let feed = feed_over(&Arc::new(FailoverRoots::new(root, [])));
        assert_eq!(feed.refresh().await.unwrap(), 1);
        assert_eq!(feed.certificates().tls_alpn_len(), 1, "the malformed digest is left out");
        let acceptor = isocloud_ingress::tls_acceptor(feed.certificates().clone()).unwrap();
        let acme: &[&[u8]] = &[b"acme-tls/1"];
        let browser: &[&[u8]] = &[b"h2", b"http/1.1"];

        let (leaf, agreed) = handshake(&acceptor, "www.shop.test", acme).await.unwrap();
        assert_eq!(agreed.as_deref(), Some(&b"acme-tls/1"[..]));
        assert_ne!(leaf, real, "never the real certificate");
        let extension = acme_identifier_der(&digest);
        assert!(leaf.windows(extension.len()).any(|w| w == extension), "the critical acmeIdentifier");
        let (leaf, agreed) = handshake(&acceptor, "www.shop.test", browser).await.unwrap();
        assert_eq!((leaf, agreed.as_deref()), (real, Some(&b"h2"[..])), "a browser gets the real one");
        assert!(handshake(&acceptor, "api.shop.test", acme).await.is_err(), "no challenge for that name");
        assert!(handshake(&acceptor, "bad.shop.test", acme).await.is_err(), "nor for a malformed one");
        assert!(handshake(&acceptor, "api.shop.test", browser).await.is_err(), "no certificate either");

        // A delta naming the domain after the challenge is cleared drops it.
        let kept = feed.certificates().tls_alpn_lookup("www.shop.test").unwrap();
        feed.note(Pending::Domains(["www.shop.test".to_owned()].into()));
        feed.refresh().await.unwrap();
        assert!(Arc::ptr_eq(&kept, &feed.certificates().tls_alpn_lookup("www.shop.test").unwrap()), "unchanged: kept");
        challenges.lock().unwrap().clear();
        feed.note(Pending::Domains(["www.shop.test".to_owned()].into()));
        feed.refresh().await.unwrap();
        assert!(feed.certificates().tls_alpn_lookup("www.shop.test").is_none());
        assert!(handshake(&acceptor, "www.shop.test", acme).await.is_err(), "cleared: nothing");
    }

    #[test]
    fn the_tls_alpn_table_keeps_its_bound_and_expiries() {
        let table = EdgeCertificates::default();
        let challenge = |domain: &str, expires_at_ms: i64| TlsAlpnDigest {
            domain: domain.into(),
            digest: "ab".repeat(32),
            expires_at_ms,
        };
        let now = now_ms();
        table.put_tls_alpn("old.test", Some(&challenge("old.test", now - 1)));
        assert!(table.tls_alpn_lookup("old.test").is_none(), "expired: not served");
        let many: Vec<_> =
            (0..=MAX_TLS_ALPN_CHALLENGES).map(|i| challenge(&format!("d{i}.test"), now + 60_000)).collect();
        table.replace_tls_alpn(&many);
        assert_eq!(table.tls_alpn_len(), MAX_TLS_ALPN_CHALLENGES);
        assert!(table.tls_alpn_lookup(&format!("d{MAX_TLS_ALPN_CHALLENGES}.test")).is_none(), "past the bound");
        table.put_tls_alpn("new.test", Some(&challenge("new.test", now + 60_000)));
        assert!(table.tls_alpn_lookup("new.test").is_none(), "full: a new name is left out");
        table.put_tls_alpn("d0.test", None);
        table.put_tls_alpn("new.test", Some(&challenge("new.test", now + 60_000)));
        assert!(table.tls_alpn_lookup("NEW.test.").is_some(), "room again");
    }
}
