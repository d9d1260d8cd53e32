//! An origin spoken to over HTTP: the subhoster's server, or a remote
//! isocloud control plane.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use isocloud_auth::{Secret, sign_rpc_token};
use isocloud_protocol::{ActivityBatch, IsolateConfig};
use url::Url;

use crate::{AssetTree, BootAnswer, FailoverRoots, Origin, OriginError, RpcTrust};

#[derive(Debug, Clone)]
pub struct RemoteOriginOptions {
    /// Whole-RPC deadline: an origin that hangs is cut off after this.
    pub rpc_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Upper bound of a layer, inline layer or blob answer.
    pub max_body_bytes: u64,
    /// Certificates an https root may present beside the public roots.
    pub trust: RpcTrust,
}

impl Default for RemoteOriginOptions {
    fn default() -> Self {
        Self {
            rpc_timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            max_body_bytes: 256 * 1024 * 1024,
            trust: RpcTrust::default(),
        }
    }
}

/// Lifetime of the JWTs the runner signs for its RPCs.
const RPC_TOKEN_TTL_S: u64 = 60;
const MAX_TREE_BYTES: u64 = 64 * 1024 * 1024;

pub struct RemoteOrigin {
    name: String,
    kid: String,
    secret: Secret,
    /// The root, then the other nodes that answer for it (`--rpc-root-fallback`):
    /// an RPC whose connection cannot be made goes to the next.
    roots: FailoverRoots,
    client: reqwest::Client,
    options: RemoteOriginOptions,
}

impl RemoteOrigin {
    pub fn new(
        kid: String,
        secret: Secret,
        rpc_root: Url,
        client: reqwest::Client,
        options: RemoteOriginOptions,
    ) -> Self {
        Self::with_fallbacks(kid, secret, rpc_root, Vec::new(), client, options)
    }

    /// As [`RemoteOrigin::new`], with other roots that serve the same
    /// origin (the nodes of one control plane). The origin keeps its name:
    /// whichever node answers, it is one origin.
    pub fn with_fallbacks(
        kid: String,
        secret: Secret,
        rpc_root: Url,
        fallbacks: Vec<Url>,
        client: reqwest::Client,
        options: RemoteOriginOptions,
    ) -> Self {
        let name = format!("{kid}@{rpc_root}");
        let roots = FailoverRoots::new(rpc_root, fallbacks);
        Self { name, kid, secret, roots, client, options }
    }

    /// The HTTP client every remote origin of one runner shares (one
    /// connection pool), with the connect timeout and the trust of
    /// `options`.
    pub fn client(options: &RemoteOriginOptions) -> reqwest::Client {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(options.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none());
        options.trust.apply(builder).build().expect("RpcTrust's certificates were each built into a client when read")
    }

    fn url(root: &Url, rpc: &str, query: &[(&str, &str)]) -> Url {
        let mut url = root.join(rpc).expect("rpc names are valid relative URLs");
        url.query_pairs_mut().extend_pairs(query);
        url
    }

    fn token(&self, deployment_id: &str) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        sign_rpc_token(&self.kid, &self.secret, deployment_id, now, RPC_TOKEN_TTL_S)
    }

    /// Sends the request `build` makes for a root, signed and with the RPC
    /// deadline, to the root that last answered or, when its connection
    /// cannot be made, the next ([`FailoverRoots::send`]).
    async fn send(
        &self,
        rpc: &'static str,
        deployment_id: &str,
        build: impl Fn(&Url) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, OriginError> {
        self.roots
            .send(&self.name, |root| {
                build(root)
                    .bearer_auth(self.token(deployment_id))
                    .timeout(Duration::from_millis(self.options.rpc_timeout_ms))
            })
            .await
            .map_err(|e| self.transport_error(rpc, e))
    }

    /// The error a visitor may read: the origin's address is not in it
    /// (the runner's log names the origin beside it).
    fn transport_error(&self, rpc: &'static str, e: reqwest::Error) -> OriginError {
        if e.is_timeout() {
            OriginError::Timeout { rpc, timeout_ms: self.options.rpc_timeout_ms }
        } else {
            let e = e.without_url();
            // reqwest's Display hides the cause chain; the chain says why.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            OriginError::Unreachable(message)
        }
    }

    /// Reads a body, refusing it once it passes `limit_bytes`, and keeping the
    /// RPC deadline while it streams.
    async fn body(
        &self,
        rpc: &'static str,
        response: reqwest::Response,
        limit_bytes: u64,
    ) -> Result<Bytes, OriginError> {
        if response.content_length().is_some_and(|len| len > limit_bytes) {
            return Err(OriginError::TooLarge { rpc, limit_bytes });
        }
        let mut stream = response.bytes_stream();
        let mut body = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.transport_error(rpc, e))?;
            if (body.len() + chunk.len()) as u64 > limit_bytes {
                return Err(OriginError::TooLarge { rpc, limit_bytes });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    async fn get_ok(
        &self,
        rpc: &'static str,
        deployment_id: &str,
        query: &[(&str, &str)],
    ) -> Result<reqwest::Response, OriginError> {
        let response = self.send(rpc, deployment_id, |root| self.client.get(Self::url(root, rpc, query))).await?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(match (rpc, status) {
                ("boot", _) => OriginError::BootRefused { status },
                _ => OriginError::BadStatus { rpc, status },
            });
        }
        Ok(response)
    }
}

#[async_trait]
impl Origin for RemoteOrigin {
    /// The tree is fetched when the isolate first needs a file.
    fn tree_at_boot(&self) -> bool {
        false
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// The subhoster, whichever of its allowed rpc roots a token named: one
    /// share of the runner however many roots it spreads over.
    fn tenant_of(&self, _deployment_id: &str) -> String {
        format!("subhoster:{}", self.kid)
    }

    async fn boot(&self, deployment_id: &str) -> Result<BootAnswer, OriginError> {
        let response = self.get_ok("boot", deployment_id, &[("deployment_id", deployment_id)]).await?;
        let Some(header) = response.headers().get("x-deno-config") else {
            return Err(OriginError::InvalidConfig(isocloud_protocol::ConfigError {
                field: "x-deno-config".into(),
                message: "the boot answer carries no x-deno-config header".into(),
            }));
        };
        let config = IsolateConfig::from_header(header.as_bytes())?;
        let inline_layer = self.body("boot", response, self.options.max_body_bytes).await?;
        if config.inline_layer().is_none() && !inline_layer.is_empty() {
            tracing::debug!(deployment_id, "boot body ignored: config names no inline layer");
        }
        Ok(BootAnswer { config, inline_layer })
    }

    async fn layer(&self, deployment_id: &str, layer_id: &str) -> Result<Bytes, OriginError> {
        let response =
            self.get_ok("layer", deployment_id, &[("deployment_id", deployment_id), ("layer_id", layer_id)]).await?;
        self.body("layer", response, self.options.max_body_bytes).await
    }

    async fn read_tree(&self, deployment_id: &str) -> Result<AssetTree, OriginError> {
        let query = [("deployment_id", deployment_id)];
        let response =
            self.send("read_tree", deployment_id, |root| self.client.get(Self::url(root, "read_tree", &query))).await?;
        // An origin without assets may not implement read_tree at all.
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(AssetTree::default());
        }
        if !response.status().is_success() {
            return Err(OriginError::BadStatus { rpc: "read_tree", status: response.status().as_u16() });
        }
        let body = self.body("read_tree", response, MAX_TREE_BYTES).await?;
        AssetTree::parse(&body).map_err(|e| OriginError::Malformed { rpc: "read_tree", message: e.to_string() })
    }

    async fn read_blob(&self, deployment_id: &str, file_id: &str) -> Result<Bytes, OriginError> {
        let query = [("deployment_id", deployment_id), ("file_id", file_id), ("hash", file_id)];
        let response =
            self.send("read_blob", deployment_id, |root| self.client.get(Self::url(root, "read_blob", &query))).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(OriginError::AssetNotFound(file_id.to_owned()));
        }
        if !response.status().is_success() {
            return Err(OriginError::BadStatus { rpc: "read_blob", status: response.status().as_u16() });
        }
        self.body("read_blob", response, self.options.max_body_bytes).await
    }

    async fn report_activity(&self, deployment_id: &str, batch: &ActivityBatch) -> Result<(), OriginError> {
        let query = [("deployment_id", deployment_id)];
        let response = self
            .send("report_activity", deployment_id, |root| {
                self.client.post(Self::url(root, "report_activity", &query)).json(batch)
            })
            .await?;
        if !response.status().is_success() {
            return Err(OriginError::BadStatus { rpc: "report_activity", status: response.status().as_u16() });
        }
        Ok(())
    }
}
