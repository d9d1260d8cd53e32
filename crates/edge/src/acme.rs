//! HTTP-01 answers (RFC 8555 §8.3) through the edge: with DNS pointing at
//! the edges, the ACME server's `GET /.well-known/acme-challenge/<token>`
//! arrives here, and the key authorization is in the control plane's
//! store. The edge asks it (`GET <rpc root>acme_challenge?host=H&token=T`,
//! behind the edge's token), as the runner's public listener asks its
//! control plane in process, and bounded the same way: a few lookups at
//! once, each within a short timeout; one that waits or fails answers
//! `None`, and the request is forwarded as any other (a tenant's own
//! `/.well-known/acme-challenge/` still reaches its app). A lookup goes to
//! the root the routing feed last reached (one [`FailoverRoots`] for both),
//! or the next `--rpc-root-fallback` when that root takes no connection.

use std::sync::Arc;
use std::time::Duration;

use isocloud_origin::FailoverRoots;
use tokio::sync::Semaphore;
use url::Url;

use crate::follower::{SigningKey, check_roots, control_plane_client};

/// Lookups at once; more wait for a turn within the timeout. The ACME
/// server asks a few times per order: 16 is room for many orders while a
/// flood of challenge paths costs the control plane 16 lookups at most.
pub const ACME_LOOKUPS: usize = 16;
/// A lookup's turn and answer, together: the ACME server waits longer, and
/// a request stuck here is a visitor's.
pub const ACME_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// A root that has not taken the connection by then hands the lookup to
/// the next: half the lookup's time, so the next root has the other half.
pub const ACME_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A key authorization is `token.thumbprint` (under 200 bytes).
const MAX_ANSWER_BYTES: usize = 1024;
/// The lookup, under each root.
const LOOKUP_PATH: &str = "acme_challenge";

/// The control plane's pending HTTP-01 challenges, asked over the origin
/// listener.
pub struct AcmeLookup {
    /// The control plane's origin listeners (the follower's).
    roots: Arc<FailoverRoots>,
    key: SigningKey,
    client: reqwest::Client,
    turns: Semaphore,
}

impl AcmeLookup {
    pub fn new(rpc_root: &Url, key: SigningKey) -> Result<Self, url::ParseError> {
        Self::from_roots(Arc::new(FailoverRoots::new(rpc_root.clone(), [])), key)
    }

    /// As [`AcmeLookup::new`], over the root and its fallbacks: the
    /// follower's [`FailoverRoots`], so the node that answered its last
    /// poll is asked first.
    pub fn from_roots(roots: Arc<FailoverRoots>, key: SigningKey) -> Result<Self, url::ParseError> {
        check_roots(&roots, LOOKUP_PATH)?;
        let client = control_plane_client(&roots, ACME_LOOKUP_TIMEOUT, ACME_CONNECT_TIMEOUT)?;
        Ok(Self { roots, key, client, turns: Semaphore::new(ACME_LOOKUPS) })
    }

    /// The key authorization for `token` pending on `host` (lowercase, no
    /// port), or `None`: none pending, or no answer in time.
    pub async fn key_authorization(&self, host: &str, token: &str) -> Option<String> {
        tokio::time::timeout(ACME_LOOKUP_TIMEOUT, self.ask(host, token)).await.ok().flatten()
    }

    async fn ask(&self, host: &str, token: &str) -> Option<String> {
        let _turn = self.turns.acquire().await.ok()?;
        let build = |root: &Url| {
            let url = root.join(LOOKUP_PATH).expect("checked in AcmeLookup::from_roots");
            self.client.get(url).query(&[("host", host), ("token", token)]).bearer_auth(self.key.routing_token())
        };
        match crate::follower::bounded_body(&self.roots, build, MAX_ANSWER_BYTES, "the ACME lookup").await {
            Ok(body) => String::from_utf8(body).ok().filter(|text| !text.is_empty()),
            Err(crate::FollowError::Status { status: 404, .. }) => None,
            Err(e) => {
                tracing::debug!(target: "isocloud::edge", host, error = %e, "ACME challenge lookup failed");
                None
            }
        }
    }
}
