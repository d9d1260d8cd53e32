//! Automatic certificates (ACME, RFC 8555) for verified custom domains.
//!
//! Every control-plane node with ACME on runs [`Acme::run`]: it asks the
//! store which verified domains need an order (no certificate, or an ACME
//! one due for renewal; never one with an uploaded certificate, which always
//! wins), takes the domain's lease row (several nodes share one store: one
//! orders a domain at a time), and orders through `instant-acme`. The
//! challenge (`--acme-challenge`) is written to the store before the ACME
//! server is told to validate, so whichever node it reaches answers: an
//! HTTP-01 key authorization on the public listener, looked up in the store
//! per request ([`crate::ControlPlane::acme_key_authorization`]); a
//! TLS-ALPN-01 one (RFC 8737) on the TLS listener, from a table every node
//! keeps in memory ([`TlsAlpnTable`], fed by the routing change feed: a
//! handshake's certificate choice cannot wait on the store). The certificate lands in
//! the `certificates` table (`source = 'acme'`) under a routing change, so
//! every node's SNI table picks it up as it does an upload. A failure is kept
//! on the domain (the ACME server's error text, the next attempt) and retried
//! with exponential backoff.
//!
//! Everything the ACME server sends is untrusted: each response is bounded in
//! size and time ([`BoundedHttp`]), a whole attempt in time
//! ([`ATTEMPT_TIMEOUT`]), its error text in length and characters, and the
//! certificate is parsed and checked to cover the domain before it is stored.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

use crate::store::{self, Store};
use crate::time::now_ms;

/// Let's Encrypt's production directory, `--acme-directory`'s default.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// `--acme-renew-before-days`' default: what Let's Encrypt advises for its
/// 90-day certificates.
pub const DEFAULT_RENEW_BEFORE_DAYS: u64 = 30;
/// `--acme-retry-min-s`' default: the first retry after a failure; each
/// further failure doubles it up to [`RETRY_MAX`].
pub const DEFAULT_RETRY_MIN_S: u64 = 60;
/// The longest wait between attempts for a failing domain.
pub const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);

/// One ACME response body, at most (a certificate chain is a few KiB; the
/// largest answers are directories and orders, under a few KiB too).
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// One request to the ACME server, headers and body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One whole attempt (account, order, validation, finalization, download).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a node holds a domain's lease: past an attempt's bound, so a
/// node that died mid-order frees it for another.
const LEASE: Duration = Duration::from_secs(360);
/// A pending key authorization is answered this long at most.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// Waiting on the server: validation, then issuance.
const POLL: RetryPolicy =
    RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(Duration::from_secs(120));
/// The loop looks at the store at least this often (another node may have
/// verified a domain; a lease may have run out).
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Domains ordered at once by one node.
const CONCURRENT_ORDERS: usize = 4;
/// The error text kept on a domain, at most (characters).
const MAX_ERROR_CHARS: usize = 1000;

/// The pending TLS-ALPN-01 challenges one node holds in memory, at most.
/// Each node orders [`CONCURRENT_ORDERS`] domains at once, so this is room
/// for 256 nodes' orders; past it the latest to expire are kept. About 1 KiB
/// each (a certificate and its P-256 key).
pub(crate) const MAX_TLS_ALPN_CHALLENGES: usize = 1024;
/// Between writing a TLS-ALPN-01 challenge and telling the ACME server to
/// validate it: every other node's periodic reload has loaded it by then (an
/// HTTP-01 answer is read from the store at request time and needs none).
const TLS_ALPN_SETTLE: Duration = crate::ROUTING_RELOAD_INTERVAL.saturating_add(Duration::from_millis(500));

/// The challenge type ordered with (`--acme-challenge`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChallengeKind {
    /// HTTP-01 (RFC 8555 §8.3): the CA fetches a token over port 80.
    #[default]
    Http01,
    /// TLS-ALPN-01 (RFC 8737): the CA makes a TLS handshake on port 443
    /// offering ALPN `acme-tls/1`.
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => store::acme::HTTP_01,
            ChallengeKind::TlsAlpn01 => store::acme::TLS_ALPN_01,
        }
    }

    fn acme_type(self) -> ChallengeType {
        match self {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }
}

/// How ACME runs (the `--acme-*` options, validated by the binary).
#[derive(Clone)]
pub struct AcmeOptions {
    /// The directory URL (https).
    pub directory_url: String,
    /// The account's contact (`mailto:`), if any.
    pub email: Option<String>,
    /// Extra roots (PEM) trusted for the ACME server's own HTTPS, beside the
    /// public ones (a test CA such as Pebble's).
    pub ca_pem: Option<Vec<u8>>,
    pub renew_before: Duration,
    /// The first retry after a failure.
    pub retry_min: Duration,
    /// The challenge type each order is validated with.
    pub challenge: ChallengeKind,
}

impl std::fmt::Debug for AcmeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeOptions")
            .field("directory_url", &self.directory_url)
            .field("email", &self.email)
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| pem.len()))
            .field("renew_before", &self.renew_before)
            .field("retry_min", &self.retry_min)
            .field("challenge", &self.challenge)
            .finish()
    }
}

/// Why an ACME attempt failed: the text shown on the domain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AcmeFailure(String);

impl From<instant_acme::Error> for AcmeFailure {
    fn from(e: instant_acme::Error) -> Self {
        AcmeFailure(describe(&e))
    }
}

/// An ACME error as shown: the problem document's detail and type for the
/// server's own errors, the chain of causes for the others.
fn describe(e: &instant_acme::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Untrusted text made fit to show: control characters dropped, bounded.
pub(crate) fn clean_error(text: &str) -> String {
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(MAX_ERROR_CHARS).collect();
    if text.chars().filter(|c| !c.is_control()).count() > MAX_ERROR_CHARS {
        out.push('…');
    }
    out
}

/// The wait before retry number `failures` (1 for the first): `min`
/// doubled per failure before it, at most [`RETRY_MAX`].
pub(crate) fn backoff(min: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1).min(30)).unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(RETRY_MAX).max(min.min(RETRY_MAX))
}

/// When to renew a certificate valid from `not_before_ms` to `not_after_ms`:
/// `renew_before` ahead of its end, or when a third of its lifetime is left
/// if that comes first (a short-lived certificate, shorter than
/// `renew_before`, is then renewed once per lifetime, not continuously).
pub(crate) fn renew_at(not_before_ms: i64, not_after_ms: i64, renew_before: Duration) -> i64 {
    let lifetime = not_after_ms.saturating_sub(not_before_ms).max(0);
    let ahead = crate::time::duration_ms(renew_before).min(lifetime / 3);
    not_after_ms.saturating_sub(ahead)
}

/// The ACME side of one control-plane node.
pub struct Acme {
    options: AcmeOptions,
    http: reqwest::Client,
    /// This node's name on the lease rows.
    node: String,
    /// The account, once loaded or created.
    account: tokio::sync::Mutex<Option<Account>>,
    /// Woken when a domain may need an order now (verified, certificate
    /// deleted on this node).
    wake: tokio::sync::Notify,
}

impl Acme {
    pub fn new(options: AcmeOptions) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("isocloud/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &options.ca_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("the ACME CA file is not PEM certificates: {e}"))?;
            if roots.is_empty() {
                return Err("the ACME CA file holds no certificate".into());
            }
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder.build().map_err(|e| format!("cannot set up the ACME client: {e}"))?;
        Ok(Acme {
            options,
            http,
            node: crate::ids::secret_token(),
            account: tokio::sync::Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Looks for work now rather than at the next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs forever: orders what is due, sleeps until the next renewal or
    /// retry (at most [`MAX_SLEEP`]) or a wake-up.
    pub async fn run(self: Arc<Self>, cp: Arc<crate::ControlPlane>) {
        use futures_util::StreamExt as _;
        tracing::info!(
            target: "isocloud::controlplane",
            directory = self.options.directory_url,
            challenge = self.options.challenge.name(),
            renew_before_days = self.options.renew_before.as_secs() / 86_400,
            "acme: automatic certificates for verified domains"
        );
        loop {
            let due = match self.due(&cp.store).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(target: "isocloud::controlplane", error = %e, "acme: reading due domains failed");
                    Vec::new()
                }
            };
            futures_util::stream::iter(due)
                .for_each_concurrent(CONCURRENT_ORDERS, |domain| {
                    let (acme, cp) = (&self, &cp);
                    async move { acme.order_logged(cp, &domain).await }
                })
                .await;
            let sleep = match next_wakeup(&cp.store).await {
                Some(at) => Duration::from_millis(u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0)),
                None => MAX_SLEEP,
            };
            // At least a beat, so a row that stays due (a store error) never spins.
            let sleep = sleep.clamp(Duration::from_millis(200), MAX_SLEEP);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn due(&self, store: &Store) -> Result<Vec<String>, store::StoreError> {
        let mut conn = store.read().await?;
        store::acme::due(&mut conn, now_ms(), 64).await
    }

    async fn order_logged(&self, cp: &crate::ControlPlane, domain: &str) {
        if let Err(e) = self.order(cp, domain).await {
            tracing::warn!(target: "isocloud::controlplane", domain, error = %e, "acme: recording an order failed");
        }
    }

    /// One attempt for `domain`, if this node gets its lease; the outcome
    /// recorded on the domain.
    async fn order(&self, cp: &crate::ControlPlane, domain: &str) -> Result<(), store::StoreError> {
        let now = now_ms();
        let mut tx = cp.store.write().await?;
        let leased =
            store::acme::take_lease(&mut tx, domain, &self.node, now, now + crate::time::duration_ms(LEASE)).await?;
        tx.commit().await?;
        if !leased {
            return Ok(());
        }
        tracing::info!(target: "isocloud::controlplane", domain, "acme: ordering a certificate");
        let outcome = match tokio::time::timeout(ATTEMPT_TIMEOUT, self.issue(cp, domain)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(AcmeFailure(format!("the order took longer than {} s", ATTEMPT_TIMEOUT.as_secs()))),
        };
        let now = now_ms();
        let checked = outcome.and_then(|(chain, key)| {
            let parsed = crate::certs::certified_key(&chain, &key)
                .map_err(|e| AcmeFailure(format!("the ACME server's certificate does not load: {e}")))?;
            if !parsed.names.iter().any(|name| crate::certs::covers(name, domain)) {
                return Err(AcmeFailure(format!(
                    "the ACME server's certificate does not cover {domain} (its names: {})",
                    parsed.names.join(", ")
                )));
            }
            if parsed.not_after_ms <= now {
                return Err(AcmeFailure("the ACME server's certificate has expired".into()));
            }
            Ok((chain, key, parsed))
        });
        let mut tx = cp.store.write().await?;
        match checked {
            Ok((chain, key, parsed)) => {
                let renew = renew_at(parsed.not_before_ms, parsed.not_after_ms, self.options.renew_before);
                let stored = store::acme::succeed(
                    &mut tx,
                    domain,
                    &self.node,
                    &chain,
                    &key,
                    &parsed.names,
                    parsed.not_after_ms,
                    renew,
                    now,
                )
                .await?;
                tx.commit().await?;
                tracing::info!(
                    target: "isocloud::controlplane",
                    domain,
                    stored,
                    not_after = crate::time::format_ms(parsed.not_after_ms),
                    renew_at = crate::time::format_ms(renew),
                    "acme: certificate issued"
                );
                cp.reload_routing_logged().await;
            }
            Err(failure) => {
                let failures = store::acme::failures(&mut tx, domain).await?.saturating_add(1);
                let wait = backoff(self.options.retry_min, u32::try_from(failures).unwrap_or(u32::MAX));
                let error = clean_error(&failure.0);
                let retry_at = now + crate::time::duration_ms(wait);
                store::acme::fail(&mut tx, domain, &self.node, &error, retry_at, now).await?;
                tx.commit().await?;
                tracing::warn!(
                    target: "isocloud::controlplane",
                    domain,
                    error,
                    failures,
                    retry_in_s = wait.as_secs(),
                    "acme: ordering a certificate failed"
                );
            }
        }
        Ok(())
    }

    /// The account: from memory, else the store, else created on the
    /// server and stored (a node that lost the race uses the winner's).
    async fn account(&self, store: &Store) -> Result<Account, AcmeFailure> {
        let mut cached = self.account.lock().await;
        if let Some(account) = cached.as_ref() {
            return Ok(account.clone());
        }
        let directory = &self.options.directory_url;
        let stored = {
            let mut conn = store.read().await.map_err(store_failure)?;
            store::acme::account(&mut conn, directory).await.map_err(store_failure)?
        };
        let credentials_json = match stored {
            Some(json) => json,
            None => {
                let contact = self.options.email.as_ref().map(|email| format!("mailto:{email}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
                let (_, credentials) = Account::builder_with_http(Box::new(self.bounded_http()))
                    .create(&new, directory.clone(), None)
                    .await?;
                let json = serde_json::to_string(&credentials)
                    .map_err(|e| AcmeFailure(format!("cannot keep the ACME account: {e}")))?;
                let mut tx = store.write().await.map_err(store_failure)?;
                let json = store::acme::put_account_if_absent(
                    &mut tx,
                    directory,
                    &json,
                    self.options.email.as_deref(),
                    now_ms(),
                )
                .await
                .map_err(store_failure)?;
                tx.commit().await.map_err(store_failure)?;
                tracing::info!(target: "isocloud::controlplane", directory, "acme: account created");
                json
            }
        };
        let credentials: AccountCredentials = serde_json::from_str(&credentials_json)
            .map_err(|e| AcmeFailure(format!("the stored ACME account does not load: {e}")))?;
        let account = Account::builder_with_http(Box::new(self.bounded_http())).from_credentials(credentials).await?;
        *cached = Some(account.clone());
        Ok(account)
    }

    fn bounded_http(&self) -> BoundedHttp {
        BoundedHttp { client: self.http.clone() }
    }

    /// Orders a certificate for `domain` with the configured challenge: the
    /// chain and its key, PEM.
    async fn issue(&self, cp: &crate::ControlPlane, domain: &str) -> Result<(String, String), AcmeFailure> {
        let store = &cp.store;
        let kind = self.options.challenge;
        let account = self.account(store).await?;
        let identifiers = [Identifier::Dns(domain.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(AcmeFailure(format!("the authorization for {domain} is {other:?}"))),
            }
            let mut challenge = authorization.challenge(kind.acme_type()).ok_or_else(|| {
                AcmeFailure(format!("the ACME server offers no {} challenge (see --acme-challenge)", kind.name()))
            })?;
            let token = challenge.token.clone();
            if !is_token(&token) {
                return Err(AcmeFailure("the ACME server's challenge token is not base64url".into()));
            }
            let key_authorization = challenge.key_authorization().as_str().to_owned();
            let mut tx = store.write().await.map_err(store_failure)?;
            let expires = now_ms() + crate::time::duration_ms(CHALLENGE_TTL);
            match kind {
                ChallengeKind::Http01 => {
                    store::acme::put_challenge(&mut tx, domain, &token, &key_authorization, expires).await
                }
                ChallengeKind::TlsAlpn01 => {
                    store::acme::put_tls_alpn_challenge(&mut tx, domain, &token, &key_authorization, expires).await
                }
            }
            .map_err(store_failure)?;
            tx.commit().await.map_err(store_failure)?;
            if kind == ChallengeKind::TlsAlpn01 {
                // This node's table now; the other nodes' at their next reload.
                cp.reload_routing_logged().await;
                tokio::time::sleep(TLS_ALPN_SETTLE).await;
            }
            challenge.set_ready().await?;
        }
        let status = order.poll_ready(&POLL).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeFailure(self.why_invalid(&mut order, status).await));
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&POLL).await?;
        Ok((chain_pem, key_pem))
    }

    /// The challenges' errors of an order that did not become ready (the
    /// reason the ACME server gives for a failed validation).
    async fn why_invalid(&self, order: &mut instant_acme::Order, status: OrderStatus) -> String {
        let mut reasons = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authorization)) = authorizations.next().await {
            if let Ok(state) = authorization.refresh().await {
                for challenge in &state.challenges {
                    if let Some(problem) = &challenge.error {
                        reasons.push(problem.to_string());
                    }
                }
            }
        }
        if reasons.is_empty() { format!("the order is {status:?}") } else { reasons.join("; ") }
    }
}

fn store_failure(e: store::StoreError) -> AcmeFailure {
    AcmeFailure(format!("the store: {e}"))
}

async fn next_wakeup(store: &Store) -> Option<i64> {
    let mut conn = store.read().await.ok()?;
    store::acme::next_wakeup(&mut conn).await.ok().flatten()
}

/// A TLS-ALPN-01 challenge certificate (RFC 8737 §3) and what it answers.
struct TlsAlpnEntry {
    /// SHA-256 of the key authorization: the acmeIdentifier's value.
    digest: [u8; 32],
    expires_at_ms: i64,
    certificate: Arc<rustls::sign::CertifiedKey>,
}

/// The TLS-ALPN-01 challenge certificates pending, by domain: what the TLS
/// listener answers a ClientHello offering `acme-tls/1` with. Loaded from
/// the store (a whole reload, or a touched domain's row), bounded by
/// [`MAX_TLS_ALPN_CHALLENGES`]; an entry past its expiry is never served.
#[derive(Default)]
pub struct TlsAlpnTable {
    by_domain: std::collections::HashMap<String, TlsAlpnEntry>,
}

impl TlsAlpnTable {
    /// A table of `rows` (at most the bound, the first kept), reusing this
    /// one's certificates where a row's digest is unchanged.
    pub(crate) fn rebuilt(&self, rows: &[store::acme::TlsAlpnChallenge]) -> TlsAlpnTable {
        let mut table = TlsAlpnTable::default();
        for row in rows.iter().take(MAX_TLS_ALPN_CHALLENGES) {
            let digest = key_authorization_digest(&row.key_authorization);
            let certificate = match self.by_domain.get(&row.domain) {
                Some(entry) if entry.digest == digest => Some(entry.certificate.clone()),
                _ => tls_alpn_certificate_logged(&row.domain, &digest),
            };
            if let Some(certificate) = certificate {
                table
                    .by_domain
                    .insert(row.domain.clone(), TlsAlpnEntry { digest, expires_at_ms: row.expires_at_ms, certificate });
            }
        }
        table
    }

    /// `domain`'s pending challenge is now `row` (`None`: none). Past the
    /// bound a new domain is left out (logged): the ACME server's
    /// validation then fails and the order is retried.
    pub(crate) fn put(&mut self, domain: &str, row: Option<&store::acme::TlsAlpnChallenge>, now_ms: i64) {
        let Some(row) = row else {
            self.by_domain.remove(domain);
            return;
        };
        let digest = key_authorization_digest(&row.key_authorization);
        if let Some(entry) = self.by_domain.get_mut(domain)
            && entry.digest == digest
        {
            entry.expires_at_ms = row.expires_at_ms;
            return;
        }
        self.by_domain.retain(|_, entry| entry.expires_at_ms > now_ms);
        if !self.by_domain.contains_key(domain) && self.by_domain.len() >= MAX_TLS_ALPN_CHALLENGES {
            tracing::warn!(
                target: "isocloud::controlplane",
                domain,
                max = MAX_TLS_ALPN_CHALLENGES,
                "acme: too many pending tls-alpn-01 challenges; this one is not answered here"
            );
            return;
        }
        match tls_alpn_certificate_logged(domain, &digest) {
            Some(certificate) => {
                self.by_domain
                    .insert(domain.to_owned(), TlsAlpnEntry { digest, expires_at_ms: row.expires_at_ms, certificate });
            }
            None => {
                self.by_domain.remove(domain);
            }
        }
    }

    /// The challenge certificate pending for exactly `server_name` (case
    /// and a trailing dot aside), unless expired.
    pub(crate) fn lookup(&self, server_name: &str, now_ms: i64) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = server_name.strip_suffix('.').unwrap_or(server_name).to_ascii_lowercase();
        let entry = self.by_domain.get(&name)?;
        (entry.expires_at_ms > now_ms).then(|| entry.certificate.clone())
    }

    pub(crate) fn len(&self) -> usize {
        self.by_domain.len()
    }
}

/// SHA-256 of a key authorization (RFC 8737 §3: the acmeIdentifier's value).
pub fn key_authorization_digest(key_authorization: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(key_authorization.as_bytes()).into()
}

/// The TLS-ALPN-01 challenge certificate for `domain` (RFC 8737 §3), made
/// as the edge makes it from the digest it is sent.
pub use isocloud_ingress::tls_alpn_certificate;

fn tls_alpn_certificate_logged(domain: &str, digest: &[u8; 32]) -> Option<Arc<rustls::sign::CertifiedKey>> {
    match tls_alpn_certificate(domain, digest) {
        Ok(certificate) => Some(Arc::new(certificate)),
        Err(e) => {
            tracing::warn!(target: "isocloud::controlplane", domain, error = %e, "acme: cannot make the tls-alpn-01 certificate");
            None
        }
    }
}

/// An HTTP-01 token as RFC 8555 §8.3 makes them: base64url, and bounded.
pub fn is_token(token: &str) -> bool {
    (1..=128).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// instant-acme's HTTP client: the control plane's reqwest (HTTPS only, the
/// extra root, no redirects, timeouts), each response body bounded.
struct BoundedHttp {
    client: reqwest::Client,
}

impl HttpClient for BoundedHttp {
    fn request(
        &self,
        request: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.client.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            let mut response = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| instant_acme::Error::Other(Box::new(e)))? {
                if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(instant_acme::Error::Other(
                        format!("the ACME server's answer is larger than {MAX_RESPONSE_BYTES} bytes").into(),
                    ));
                }
                bytes.extend_from_slice(&chunk);
            }
            let mut answer = http::Response::new(http_body_util::Full::new(Bytes::from(bytes)));
            *answer.status_mut() = response.status();
            *answer.headers_mut() = std::mem::take(response.headers_mut());
            Ok(BytesResponse::from(answer))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_minimum_up_to_six_hours() {
        let min = Duration::from_secs(60);
        assert_eq!(backoff(min, 1), Duration::from_secs(60));
        assert_eq!(backoff(min, 2), Duration::from_secs(120));
        assert_eq!(backoff(min, 3), Duration::from_secs(240));
        assert_eq!(backoff(min, 9), Duration::from_secs(60 * 256));
        assert_eq!(backoff(min, 10), RETRY_MAX, "60 s × 512 is past 6 h");
        assert_eq!(backoff(min, u32::MAX), RETRY_MAX);
        assert_eq!(backoff(min, 0), min);
        assert_eq!(backoff(Duration::from_secs(1), 2), Duration::from_secs(2));
    }

    #[test]
    fn renewal_comes_ahead_or_at_a_third_of_a_short_lifetime() {
        let day = 86_400_000;
        // 90 days, 30 ahead: day 60.
        assert_eq!(renew_at(0, 90 * day, Duration::from_secs(30 * 86_400)), 60 * day);
        // 6 days with 30 ahead: a third of the lifetime, day 4.
        assert_eq!(renew_at(0, 6 * day, Duration::from_secs(30 * 86_400)), 4 * day);
        // Nonsense dates never renew in the past of the end by more than the lifetime.
        assert_eq!(renew_at(10, 0, Duration::from_secs(1)), 0);
    }

    #[test]
    fn tokens_and_errors_are_checked() {
        assert!(is_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        for bad in ["", "a/b", "..", "a b", "a%2F", &"a".repeat(129)] {
            assert!(!is_token(bad), "{bad:?}");
        }
        assert_eq!(clean_error("bad\r\n\x1b[31mred"), "bad[31mred");
        let long = clean_error(&"x".repeat(5000));
        assert_eq!(long.chars().count(), MAX_ERROR_CHARS + 1);
    }

    #[test]
    fn the_tls_alpn_certificate_names_the_domain_and_carries_the_digest_critically() {
        let digest = key_authorization_digest("token.thumbprint");
        // RFC 8737 §3's value: SHA-256 of the key authorization's ASCII.
        assert_eq!(hex::encode(digest), "eb5ac167fe249c76e53b430da3116c5d9fde4c5507ba6d01e885516e1bd49f92");
        let key = tls_alpn_certificate("www.example.com", &digest).unwrap();
        assert_eq!(key.cert.len(), 1, "self-signed, no chain");
        let (_, parsed) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        let names: Vec<String> = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert_eq!(names, ["DNSName(www.example.com)"]);
        let acme = parsed
            .extensions()
            .iter()
            .find(|ext| ext.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("the acmeIdentifier extension");
        assert!(acme.critical);
        let mut der = vec![0x04, 0x20];
        der.extend_from_slice(&digest);
        assert_eq!(acme.value, der.as_slice(), "a DER OCTET STRING of the digest");
        // (`keys_match` parses with webpki, which refuses the critical
        // extension it does not know: the ACME server's own parser is asked.)
        assert_eq!(key.key.algorithm(), rustls::SignatureAlgorithm::ECDSA);
    }

    fn row(domain: &str, key_authorization: &str, expires_at_ms: i64) -> store::acme::TlsAlpnChallenge {
        store::acme::TlsAlpnChallenge {
            domain: domain.into(),
            key_authorization: key_authorization.into(),
            expires_at_ms,
        }
    }

    #[test]
    fn the_tls_alpn_table_serves_pending_unexpired_names_within_its_bound() {
        let now = 1_000_000;
        let mut table = TlsAlpnTable::default();
        table.put("a.example.com", Some(&row("a.example.com", "t1.k", now + 600_000)), now);
        let first = table.lookup("A.example.com.", now).expect("pending");
        assert!(table.lookup("b.example.com", now).is_none(), "not pending");
        assert!(table.lookup("x.a.example.com", now).is_none(), "exact names only");
        assert!(table.lookup("a.example.com", now + 600_000).is_none(), "expired");
        // The same challenge again keeps its certificate; a new one replaces it.
        table.put("a.example.com", Some(&row("a.example.com", "t1.k", now + 700_000)), now);
        assert!(Arc::ptr_eq(&first, &table.lookup("a.example.com", now).unwrap()));
        table.put("a.example.com", Some(&row("a.example.com", "t2.k", now + 700_000)), now);
        assert!(!Arc::ptr_eq(&first, &table.lookup("a.example.com", now).unwrap()));
        table.put("a.example.com", None, now);
        assert!(table.lookup("a.example.com", now).is_none(), "cleared");

        // A whole reload reuses unchanged certificates and keeps the bound.
        table.put("a.example.com", Some(&row("a.example.com", "t1.k", now + 600_000)), now);
        let kept = table.lookup("a.example.com", now).unwrap();
        let mut rows: Vec<_> =
            (0..MAX_TLS_ALPN_CHALLENGES + 1).map(|i| row(&format!("d{i}.example.com"), "t.k", now + 1_000)).collect();
        rows.insert(0, row("a.example.com", "t1.k", now + 600_000));
        let rebuilt = table.rebuilt(&rows);
        assert_eq!(rebuilt.len(), MAX_TLS_ALPN_CHALLENGES);
        assert!(Arc::ptr_eq(&kept, &rebuilt.lookup("a.example.com", now).unwrap()));
        assert!(rebuilt.lookup(&format!("d{}.example.com", MAX_TLS_ALPN_CHALLENGES - 1), now).is_none());
        // Full: a new name is left out, unless expired entries make room.
        let mut full = rebuilt;
        full.put("new.example.com", Some(&row("new.example.com", "t.k", now + 1_000)), now);
        assert!(full.lookup("new.example.com", now).is_none(), "past the bound");
        full.put("new.example.com", Some(&row("new.example.com", "t.k", now + 10_000)), now + 2_000);
        assert!(full.lookup("new.example.com", now + 2_000).is_some(), "the expired ones pruned");
        assert_eq!(full.len(), 2);
    }
}
