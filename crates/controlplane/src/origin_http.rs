//! The control plane as a remote origin: the RPCs of
//! `subhosting-protocol.md` §2 (`boot`, `layer`, `read_tree`, `read_blob`,
//! `report_activity`) served over HTTP, so an `isocloud runner` on another
//! machine serves first-party deployments as it serves a subhoster's.
//!
//! This is transport only. Every answer comes from an [`Origin`] (the
//! control plane's, [`crate::ControlPlane::origin`], the very object `isocloud
//! serve` hands its own pool in process), so the two paths share one code
//! path above the wire. Every call must carry the runner's RPC token
//! (`Authorization: Bearer <HS256 JWT>`, `kid` picking the shared secret,
//! `deployment_id` equal to the query's), checked by `isocloud-auth`'s
//! verifier, the same rules the runner applies to relays' tokens.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use isocloud_auth::{AuthConfigError, CLOCK_LEEWAY_S, Secret, SubhostVerifier, Subhoster};
use isocloud_origin::{ActivityBatch, IsolateConfig, Origin, OriginError};
use isocloud_protocol::{ErrorCode, LayerSpec, NetPermission};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One key the runners sign their RPC tokens with: the JWT header's `kid`
/// and the HS256 secret (the runner's `--subhost-secret KID=SECRET`).
#[derive(Debug, Clone)]
pub struct OriginKey {
    pub kid: String,
    pub secret: Secret,
}

/// A shorter secret is refused: one captured token lets anyone try secrets
/// offline, and the secret guards every deployment's code and envs. 32
/// bytes is HS256's own key size (RFC 7518 §3.2 asks for at least that).
pub const MIN_SECRET_BYTES: usize = 32;

/// The longest an RPC token may still live when it arrives. The runner
/// signs tokens for 60 s; a token that lives longer (a relay's
/// `x-deno-subhost`, signed with the same secret for a whole session) is
/// not an RPC token, and must not open the origin for its lifetime.
pub const MAX_RPC_TOKEN_TTL_S: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum OriginHttpError {
    #[error("the origin listener needs at least one key: every RPC must be signed")]
    NoKeys,
    #[error("origin key {kid:?}: the secret has {bytes} bytes, fewer than {MIN_SECRET_BYTES}")]
    ShortSecret { kid: String, bytes: usize },
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
}

/// The listener's bounds per RPC (its connections, head and body timeouts
/// are the listener's own, `isocloud_ingress::ListenerBounds`).
#[derive(Debug, Clone)]
pub struct OriginHttpLimits {
    /// RPCs answered at once; each holds at most one store connection and
    /// one blob (a layer or file, up to `--max-blob-mb`) in memory until
    /// its answer is sent.
    pub max_concurrent_rpcs: usize,
    /// How long an RPC waits for its turn before it is answered 503
    /// `CAPACITY` (with `Retry-After`).
    pub queue_wait: Duration,
    /// From its turn to the answer's head (`report_activity`'s body read
    /// included): past it, 504 `REQUEST_TIMEOUT`.
    pub rpc_timeout: Duration,
    /// `report_activity` bodies larger than this get 413.
    pub max_activity_body_bytes: usize,
}

/// The defaults, each with its reason.
pub const ORIGIN_HTTP_LIMITS: OriginHttpLimits = OriginHttpLimits {
    // A runner boots 2 per core at once, each fetching its layers in
    // parallel: 64 keeps several busy runners fed, while 64 blobs of the
    // default 64 MiB bound is the most the answers hold in memory.
    max_concurrent_rpcs: 64,
    // Inside the runner's default origin timeout (10 s), so it hears a
    // clear 503 rather than timing out.
    queue_wait: Duration::from_secs(5),
    // A stuck store query must end; 30 s is three times the runner's
    // default timeout, so only an origin-side fault reaches it.
    rpc_timeout: Duration::from_secs(30),
    // The runner cuts batches at ~256 KiB of text (500 events), one event
    // may add 32 KiB alone, and JSON may escape a control byte into six:
    // 4 MiB holds the largest honest batch.
    max_activity_body_bytes: 4 * 1024 * 1024,
};

/// The RPCs, by path (relative to the listener's root, which is the
/// runner's `--rpc-root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Boot,
    Layer,
    ReadTree,
    ReadBlob,
    ReportActivity,
}

impl Rpc {
    fn of_path(path: &str) -> Option<Rpc> {
        Some(match path {
            "/boot" => Rpc::Boot,
            "/layer" => Rpc::Layer,
            "/read_tree" => Rpc::ReadTree,
            "/read_blob" => Rpc::ReadBlob,
            "/report_activity" => Rpc::ReportActivity,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Rpc::Boot => "boot",
            Rpc::Layer => "layer",
            Rpc::ReadTree => "read_tree",
            Rpc::ReadBlob => "read_blob",
            Rpc::ReportActivity => "report_activity",
        }
    }

    fn method(self) -> Method {
        if self == Rpc::ReportActivity { Method::POST } else { Method::GET }
    }
}

/// The origin RPCs over HTTP, answered by one [`Origin`].
pub struct OriginHttp {
    origin: Arc<dyn Origin>,
    verifier: SubhostVerifier,
    limits: OriginHttpLimits,
    permits: Arc<Semaphore>,
}

/// Checks the keys as [`OriginHttp::new`] would (for settings, so the
/// error can name the option).
pub fn check_keys(keys: &[OriginKey]) -> Result<(), OriginHttpError> {
    verifier(keys).map(drop)
}

fn verifier(keys: &[OriginKey]) -> Result<SubhostVerifier, OriginHttpError> {
    if keys.is_empty() {
        return Err(OriginHttpError::NoKeys);
    }
    if let Some(short) = keys.iter().find(|key| key.secret.len() < MIN_SECRET_BYTES) {
        return Err(OriginHttpError::ShortSecret { kid: short.kid.clone(), bytes: short.secret.len() });
    }
    // The verifier wants a default rpc_root per subhoster, for tokens that
    // carry none. RPC tokens carry none, and where the RPCs go is this
    // listener whatever a claim says: the value is never used, and a token
    // naming any other root is refused.
    let root = url::Url::parse("http://origin.invalid/").expect("a valid URL");
    let subhosters = keys
        .iter()
        .map(|key| Subhoster {
            kid: key.kid.clone(),
            secret: key.secret.clone(),
            rpc_root: root.clone(),
            allowed_rpc_root_prefixes: Vec::new(),
        })
        .collect();
    Ok(SubhostVerifier::new(subhosters)?)
}

impl OriginHttp {
    pub fn new(
        origin: Arc<dyn Origin>,
        keys: &[OriginKey],
        limits: OriginHttpLimits,
    ) -> Result<Arc<Self>, OriginHttpError> {
        let permits = Arc::new(Semaphore::new(limits.max_concurrent_rpcs.max(1)));
        Ok(Arc::new(Self { origin, verifier: verifier(keys)?, limits, permits }))
    }

    /// The routes: the five RPCs at the root, and an unauthenticated
    /// `/healthz` for load balancers' probes.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new().fallback(handle).with_state(Arc::clone(self))
    }

    /// The `deployment_id` of a valid RPC token, else why not (safe to show
    /// the caller: it never holds a secret).
    fn authenticate(&self, headers: &http::HeaderMap, now_unix_s: u64) -> Result<String, String> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err("an RPC needs one Authorization: Bearer <JWT> header".into());
        };
        let value = value.to_str().map_err(|_| "the Authorization header is not ASCII".to_owned())?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err("the Authorization header is not a Bearer token".into()),
        };
        let claims = self.verifier.verify(token, now_unix_s).map_err(|e| e.to_string())?;
        // Verified: the claims part is well-formed JSON with a whole `exp`.
        let exp = token
            .split('.')
            .nth(1)
            .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok())
            .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
            .and_then(|claims| claims["exp"].as_u64())
            .ok_or_else(|| "the token has no exp claim".to_owned())?;
        if exp > now_unix_s.saturating_add(MAX_RPC_TOKEN_TTL_S + CLOCK_LEEWAY_S) {
            return Err(format!("the token lives longer than an RPC token may ({MAX_RPC_TOKEN_TTL_S} s)"));
        }
        Ok(claims.deployment_id().to_owned())
    }
}

/// An error answer: `{"error":{"code","message"}}` with the code in
/// `x-isocloud-error` (the runner's own error form), at `status`.
fn refuse(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let mut response = code.response(message).map(Body::from);
    *response.status_mut() = status;
    response
}

fn bad_request(message: &str) -> Response {
    refuse(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}

fn now_unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The query's pairs; a name given twice is refused, so no two readers of
/// the same query can disagree on which value counts.
fn query_pairs(query: Option<&str>) -> Result<HashMap<String, String>, String> {
    let mut pairs = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if pairs.insert(name.clone().into_owned(), value.into_owned()).is_some() {
            return Err(format!("query parameter {name:?} is given twice"));
        }
    }
    Ok(pairs)
}

async fn handle(State(http): State<Arc<OriginHttp>>, request: Request) -> Response {
    let path = request.uri().path();
    if path == "/healthz" {
        return Response::new(Body::from("ok\n"));
    }
    let Some(rpc) = Rpc::of_path(path) else {
        return refuse(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "no such RPC");
    };
    if request.method() != rpc.method() {
        let mut response = refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::BadRequest,
            &format!("{} takes {}", rpc.name(), rpc.method()),
        );
        let allow = if rpc == Rpc::ReportActivity { "POST" } else { "GET" };
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        return response;
    }
    // Before anything that reads the store or the body.
    let token_deployment = match http.authenticate(request.headers(), now_unix_s()) {
        Ok(deployment_id) => deployment_id,
        Err(reason) => {
            tracing::warn!(target: "isocloud::controlplane", rpc = rpc.name(), reason, "origin: RPC refused");
            return refuse(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &reason);
        }
    };
    let query = match query_pairs(request.uri().query()) {
        Ok(query) => query,
        Err(reason) => return bad_request(&reason),
    };
    let Some(deployment_id) = query.get("deployment_id").cloned() else {
        return bad_request("the query names no deployment_id");
    };
    if deployment_id != token_deployment {
        return refuse(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "the token's deployment_id is not the query's: a token opens its own deployment only",
        );
    }
    let permit = match tokio::time::timeout(http.limits.queue_wait, Arc::clone(&http.permits).acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Capacity, "the origin is busy: try again");
        }
    };
    let started = Instant::now();
    let answer =
        tokio::time::timeout(http.limits.rpc_timeout, answer(&http, rpc, &deployment_id, query, request, permit));
    let response = match answer.await {
        Ok(response) => response,
        Err(_) => refuse(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::RequestTimeout,
            &format!("{} took longer than {} s", rpc.name(), http.limits.rpc_timeout.as_secs()),
        ),
    };
    tracing::debug!(
        target: "isocloud::controlplane",
        rpc = rpc.name(),
        deployment_id,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "origin: RPC answered"
    );
    response
}

/// One authenticated RPC, answered by the origin. `permit` is held by the
/// answer's body until it is sent.
async fn answer(
    http: &OriginHttp,
    rpc: Rpc,
    deployment_id: &str,
    query: HashMap<String, String>,
    request: Request,
    permit: OwnedSemaphorePermit,
) -> Response {
    let origin = &http.origin;
    let result = match rpc {
        Rpc::Boot => origin.boot(deployment_id).await.and_then(|boot| {
            let mut response = bytes_response(boot.inline_layer, permit);
            response.headers_mut().insert("x-deno-config", config_header(&boot.config)?);
            Ok(response)
        }),
        Rpc::Layer => {
            let Some(layer_id) = query.get("layer_id") else {
                return bad_request("the query names no layer_id");
            };
            origin.layer(deployment_id, layer_id).await.map(|bytes| bytes_response(bytes, permit))
        }
        Rpc::ReadTree => origin.read_tree(deployment_id).await.and_then(|tree| {
            let json = serde_json::to_vec(&tree)
                .map_err(|e| OriginError::Malformed { rpc: "read_tree", message: e.to_string() })?;
            let mut response = bytes_response(Bytes::from(json), permit);
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(response)
        }),
        Rpc::ReadBlob => {
            // The protocol sends both, the same (file ids are hashes).
            let (file_id, hash) = (query.get("file_id"), query.get("hash"));
            let Some(file_id) = file_id.or(hash) else {
                return bad_request("the query names no file_id");
            };
            if hash.is_some_and(|hash| hash != file_id) {
                return bad_request("file_id and hash differ");
            }
            origin.read_blob(deployment_id, file_id).await.map(|bytes| bytes_response(bytes, permit))
        }
        Rpc::ReportActivity => {
            let batch = match activity_batch(request, http.limits.max_activity_body_bytes).await {
                Ok(batch) => batch,
                Err(response) => return response,
            };
            origin.report_activity(deployment_id, &batch).await.map(|()| Response::new(Body::empty()))
        }
    };
    result.unwrap_or_else(|e| origin_failure(rpc, deployment_id, &e))
}

/// The `report_activity` body, bounded, as a batch; else the answer saying
/// why not.
async fn activity_batch(request: Request, limit_bytes: usize) -> Result<ActivityBatch, Response> {
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            &format!("an activity batch may have {limit_bytes} bytes at most"),
        )
    };
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit_bytes as u64) {
        return Err(too_large());
    }
    let body = match http_body_util::Limited::new(request.into_body(), limit_bytes).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => return Err(bad_request(&format!("the body did not arrive whole: {e}"))),
    };
    serde_json::from_slice(&body).map_err(|e| bad_request(&format!("the body is not an activity batch: {e}")))
}

/// An origin's failure as the RPC's status. Not-found is the caller's
/// business (and `read_tree`'s 404 means "no files" to the runner); the
/// rest is the control plane's, whose detail (the store's error) goes to
/// its log only.
fn origin_failure(rpc: Rpc, deployment_id: &str, e: &OriginError) -> Response {
    let status = match e {
        OriginError::DeploymentNotFound | OriginError::AssetNotFound(_) | OriginError::Layer { .. } => {
            return refuse(StatusCode::NOT_FOUND, e.code(), &e.to_string());
        }
        OriginError::Unreachable(_) | OriginError::Timeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::error!(target: "isocloud::controlplane", rpc = rpc.name(), deployment_id, error = %e, "origin: RPC failed");
    refuse(status, e.code(), &format!("the control plane could not answer {}; its log says why", rpc.name()))
}

/// A 200 carrying `bytes` (the same buffer, not a copy), holding `permit`
/// until hyper has taken the last of it.
fn bytes_response(bytes: Bytes, permit: OwnedSemaphorePermit) -> Response {
    Response::new(Body::new(HeldBytes { bytes: Some(bytes), _permit: permit }))
}

/// One buffer as a body, with its exact length (so `Content-Length` is
/// sent), and the RPC's permit, released when the body is dropped.
struct HeldBytes {
    bytes: Option<Bytes>,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for HeldBytes {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.as_ref().is_none_or(Bytes::is_empty)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// The config as the protocol's JSON.
pub fn config_json(config: &IsolateConfig) -> serde_json::Value {
    let layers: Vec<serde_json::Value> = config
        .layers()
        .iter()
        .map(|layer| match layer {
            LayerSpec::Bundle { id, specifier } => {
                serde_json::json!({ "kind": "bundle", "id": id, "specifier": specifier.as_str() })
            }
            LayerSpec::Eszip { id } => serde_json::json!({ "kind": "eszip", "id": id }),
        })
        .collect();
    let net = match config.net() {
        NetPermission::All => serde_json::Value::Bool(true),
        NetPermission::None => serde_json::Value::Bool(false),
        NetPermission::Allow(hosts) => serde_json::json!(hosts),
    };
    let mut json = serde_json::json!({
        "entrypoint": config.entrypoint().as_str(),
        "layers": layers,
        "envs": config.envs(),
        "permissions": { "net": net },
    });
    if let Some(inline) = config.inline_layer() {
        json["inline_layer"] = inline.into();
    }
    json
}

/// `x-deno-config`: the JSON itself while it is plain ASCII, else base64url
/// of it (the protocol's other form), since a header value carries no UTF-8
/// reliably and an env value may hold any.
fn config_header(config: &IsolateConfig) -> Result<HeaderValue, OriginError> {
    let json = config_json(config).to_string();
    let value = if json.bytes().all(|b| (0x20..0x7f).contains(&b)) { json } else { URL_SAFE_NO_PAD.encode(json) };
    HeaderValue::from_str(&value).map_err(|e| OriginError::Malformed { rpc: "boot", message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use isocloud_auth::sign_rpc_token;
    use isocloud_origin::{AssetEntry, AssetTree, BootAnswer, RemoteOrigin, RemoteOriginOptions};
    use serde_json::json;

    use super::*;

    const KID: &str = "controlplane";
    const SECRET: &str = "origin-test-secret-0123456789abcdef";
    const DEPLOYMENT: &str = "d1";

    /// An origin with one deployment, counting the calls that reach it.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
        batches: Mutex<Vec<ActivityBatch>>,
        /// `boot` waits this long first.
        boot_delay: Mutex<Option<Duration>>,
    }

    fn config() -> IsolateConfig {
        IsolateConfig::from_json(
            json!({
                "entrypoint": "file:///src/main.js",
                "layers": [
                    { "kind": "bundle", "id": "inline", "specifier": "file:///src/main.js" },
                    { "kind": "eszip", "id": "graph" },
                ],
                "inline_layer": "inline",
                "envs": { "GREETING": "grüß dich", "EMPTY": "" },
                "permissions": { "net": ["api.example.com", "db.example.com:5432"] },
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn tree() -> AssetTree {
        AssetTree {
            entries: [
                (String::new(), AssetEntry::Directory),
                ("/a.txt".to_owned(), AssetEntry::File { size: 5, hash: "h1".into() }),
            ]
            .into(),
        }
    }

    #[async_trait::async_trait]
    impl Origin for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        async fn boot(&self, deployment_id: &str) -> Result<BootAnswer, OriginError> {
            self.calls.lock().unwrap().push(format!("boot {deployment_id}"));
            let delay = *self.boot_delay.lock().unwrap();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            match deployment_id {
                DEPLOYMENT => Ok(BootAnswer { config: config(), inline_layer: Bytes::from_static(b"inline js") }),
                _ => Err(OriginError::DeploymentNotFound),
            }
        }
        async fn layer(&self, deployment_id: &str, layer_id: &str) -> Result<Bytes, OriginError> {
            self.calls.lock().unwrap().push(format!("layer {deployment_id} {layer_id}"));
            match layer_id {
                "graph" => Ok(Bytes::from(vec![7u8; 300_000])),
                _ => Err(OriginError::Layer { layer_id: layer_id.into(), message: "unknown layer".into() }),
            }
        }
        async fn read_tree(&self, deployment_id: &str) -> Result<AssetTree, OriginError> {
            self.calls.lock().unwrap().push(format!("read_tree {deployment_id}"));
            Ok(tree())
        }
        async fn read_blob(&self, deployment_id: &str, file_id: &str) -> Result<Bytes, OriginError> {
            self.calls.lock().unwrap().push(format!("read_blob {deployment_id} {file_id}"));
            match file_id {
                "h1" => Ok(Bytes::from_static(b"hello")),
                "broken" => Err(OriginError::Unreachable("store: connection refused to db.internal:5432".into())),
                _ => Err(OriginError::AssetNotFound(file_id.into())),
            }
        }
        async fn report_activity(&self, deployment_id: &str, batch: &ActivityBatch) -> Result<(), OriginError> {
            self.calls.lock().unwrap().push(format!("report_activity {deployment_id}"));
            self.batches.lock().unwrap().push(batch.clone());
            Ok(())
        }
    }

    /// The listener on a free loopback port, with `limits`.
    async fn serve(limits: OriginHttpLimits) -> (Arc<Fake>, std::net::SocketAddr) {
        let fake = Arc::new(Fake::default());
        let keys = [OriginKey { kid: KID.into(), secret: Secret::from(SECRET) }];
        let http = OriginHttp::new(fake.clone(), &keys, limits).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, http.router()).await });
        (fake, addr)
    }

    fn remote(addr: std::net::SocketAddr, secret: &str) -> RemoteOrigin {
        let options = RemoteOriginOptions::default();
        let root = url::Url::parse(&format!("http://{addr}/")).unwrap();
        RemoteOrigin::new(KID.into(), Secret::from(secret), root, RemoteOrigin::client(&options), options)
    }

    fn token_for(kid: &str, secret: &str, deployment_id: &str, ttl_s: u64) -> String {
        sign_rpc_token(kid, &Secret::from(secret), deployment_id, now_unix_s(), ttl_s)
    }

    async fn get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new().get(format!("http://{addr}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// The runner's own client (`RemoteOrigin`) against the listener: every
    /// RPC answers what the origin behind it answers, on the wire format
    /// the runner reads.
    #[tokio::test]
    async fn the_runners_client_reads_every_rpc_through_the_listener() {
        let (fake, addr) = serve(ORIGIN_HTTP_LIMITS).await;
        let origin = remote(addr, SECRET);

        let boot = origin.boot(DEPLOYMENT).await.unwrap();
        assert_eq!(boot.config, config(), "non-ASCII envs travel base64url-encoded and come back the same");
        assert_eq!(&boot.inline_layer[..], b"inline js");
        assert_eq!(origin.layer(DEPLOYMENT, "graph").await.unwrap(), vec![7u8; 300_000]);
        assert!(matches!(origin.layer(DEPLOYMENT, "nope").await, Err(OriginError::BadStatus { status: 404, .. })));
        assert_eq!(origin.read_tree(DEPLOYMENT).await.unwrap(), tree());
        assert_eq!(&origin.read_blob(DEPLOYMENT, "h1").await.unwrap()[..], b"hello");
        assert!(matches!(origin.read_blob(DEPLOYMENT, "h2").await, Err(OriginError::AssetNotFound(_))));
        assert!(matches!(origin.boot("d2").await, Err(OriginError::BootRefused { status: 404 })));

        let batch: ActivityBatch = serde_json::from_value(json!({
            "batch_id": "b1",
            "events": [{ "type": "log", "deployment_id": DEPLOYMENT, "timestamp": "2025-01-01T00:00:00Z",
                         "level": "info", "message": "hi" }],
        }))
        .unwrap();
        origin.report_activity(DEPLOYMENT, &batch).await.unwrap();
        assert_eq!(*fake.batches.lock().unwrap(), vec![batch]);

        // A store failure's detail stays in the log.
        let response = get(
            addr,
            "/read_blob?deployment_id=d1&file_id=broken&hash=broken",
            Some(&token_for(KID, SECRET, DEPLOYMENT, 60)),
        )
        .await;
        assert_eq!(response.status(), 503);
        assert!(!response.text().await.unwrap().contains("db.internal"));
        assert_eq!(get(addr, "/healthz", None).await.status(), 200, "health needs no token");
    }

    /// A call with the right key works; then each bad credential is
    /// refused 401 `UNAUTHORIZED`, and none reaches the origin.
    #[tokio::test]
    async fn unsigned_wrongly_signed_and_foreign_tokens_are_refused() {
        let (fake, addr) = serve(ORIGIN_HTTP_LIMITS).await;
        let path = "/read_blob?deployment_id=d1&file_id=h1&hash=h1";
        let good = get(addr, path, Some(&token_for(KID, SECRET, DEPLOYMENT, 60))).await;
        assert_eq!(good.status(), 200);
        assert_eq!(fake.calls.lock().unwrap().len(), 1);

        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"controlplane"}"#);
        let claims =
            URL_SAFE_NO_PAD.encode(json!({ "deployment_id": DEPLOYMENT, "exp": now_unix_s() + 60 }).to_string());
        let unsigned = format!("{header}.{claims}.");
        let cases: [(&str, Option<String>); 6] = [
            ("no token", None),
            ("alg none", Some(unsigned)),
            ("wrong secret", Some(token_for(KID, "another-secret-0123456789abcdef0123", DEPLOYMENT, 60))),
            ("unknown kid", Some(token_for("someone", SECRET, DEPLOYMENT, 60))),
            ("another deployment's token", Some(token_for(KID, SECRET, "d2", 60))),
            ("a token for an hour", Some(token_for(KID, SECRET, DEPLOYMENT, 3600))),
        ];
        for (case, token) in cases {
            let response = get(addr, path, token.as_deref()).await;
            assert_eq!(response.status(), 401, "{case}");
            assert_eq!(response.headers()["x-isocloud-error"], "UNAUTHORIZED", "{case}");
        }
        assert!(matches!(
            remote(addr, "another-secret-0123456789abcdef0123").boot(DEPLOYMENT).await,
            Err(OriginError::BootRefused { status: 401 })
        ));
        assert_eq!(fake.calls.lock().unwrap().len(), 1, "no refused call reached the origin");
    }

    #[tokio::test]
    async fn activity_bodies_are_bounded() {
        let limits = OriginHttpLimits { max_activity_body_bytes: 1024, ..ORIGIN_HTTP_LIMITS };
        let (fake, addr) = serve(limits).await;
        let post = |body: String| {
            reqwest::Client::new()
                .post(format!("http://{addr}/report_activity?deployment_id=d1"))
                .bearer_auth(token_for(KID, SECRET, DEPLOYMENT, 60))
                .body(body)
                .send()
        };
        let small = json!({ "batch_id": "b1", "events": [] }).to_string();
        assert_eq!(post(small).await.unwrap().status(), 200);
        let large = json!({ "batch_id": "b2".repeat(1000), "events": [] }).to_string();
        let response = post(large).await.unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(response.headers()["x-isocloud-error"], "PAYLOAD_TOO_LARGE");
        assert_eq!(fake.batches.lock().unwrap().len(), 1);
    }

    /// Past the concurrency bound an RPC waits its turn, then gets 503
    /// `CAPACITY`; an RPC past its deadline gets 504.
    #[tokio::test]
    async fn rpcs_are_bounded_in_number_and_time() {
        let limits = OriginHttpLimits {
            max_concurrent_rpcs: 1,
            queue_wait: Duration::from_millis(200),
            rpc_timeout: Duration::from_millis(1500),
            ..ORIGIN_HTTP_LIMITS
        };
        let (fake, addr) = serve(limits).await;
        let token = token_for(KID, SECRET, DEPLOYMENT, 60);
        assert_eq!(get(addr, "/boot?deployment_id=d1", Some(&token)).await.status(), 200, "alone, it answers");

        *fake.boot_delay.lock().unwrap() = Some(Duration::from_secs(1));
        let slow = tokio::spawn({
            let token = token.clone();
            async move { get(addr, "/boot?deployment_id=d1", Some(&token)).await.status() }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waiting = get(addr, "/boot?deployment_id=d1", Some(&token)).await;
        assert_eq!(waiting.status(), 503);
        assert_eq!(waiting.headers()["x-isocloud-error"], "CAPACITY");
        assert!(waiting.headers().contains_key("retry-after"));
        assert_eq!(slow.await.unwrap(), 200);

        *fake.boot_delay.lock().unwrap() = Some(Duration::from_secs(5));
        let late = get(addr, "/boot?deployment_id=d1", Some(&token)).await;
        assert_eq!(late.status(), 504);
        assert_eq!(late.headers()["x-isocloud-error"], "REQUEST_TIMEOUT");
    }

    #[tokio::test]
    async fn malformed_calls_are_refused_by_name() {
        let (_, addr) = serve(ORIGIN_HTTP_LIMITS).await;
        let token = token_for(KID, SECRET, DEPLOYMENT, 60);
        assert_eq!(get(addr, "/boot?deployment_id=d1&deployment_id=d2", Some(&token)).await.status(), 400);
        assert_eq!(get(addr, "/layer?deployment_id=d1", Some(&token)).await.status(), 400);
        assert_eq!(get(addr, "/read_blob?deployment_id=d1&file_id=h1&hash=h2", Some(&token)).await.status(), 400);
        assert_eq!(get(addr, "/report_activity?deployment_id=d1", Some(&token)).await.status(), 405);
        assert_eq!(get(addr, "/v0/boot?deployment_id=d1", Some(&token)).await.status(), 404);
    }

    #[test]
    fn the_config_json_reads_back_as_the_same_config() {
        for json in [
            json!({ "entrypoint": "file:///src/a.ts", "layers": [{ "kind": "eszip", "id": "e" }] }),
            json!({ "entrypoint": "file:///src/a.ts", "layers": [{ "kind": "eszip", "id": "e" }],
                    "permissions": { "net": false } }),
            config_json(&config()),
        ] {
            let config = IsolateConfig::from_json(json.to_string().as_bytes()).unwrap();
            let again = IsolateConfig::from_json(config_json(&config).to_string().as_bytes()).unwrap();
            assert_eq!(again, config);
            let header = config_header(&config).unwrap();
            assert_eq!(IsolateConfig::from_header(header.as_bytes()).unwrap(), config);
        }
    }

    #[test]
    fn keys_must_exist_and_be_long() {
        assert!(matches!(check_keys(&[]), Err(OriginHttpError::NoKeys)));
        let short = [OriginKey { kid: "k".into(), secret: Secret::from("short") }];
        assert!(matches!(check_keys(&short), Err(OriginHttpError::ShortSecret { bytes: 5, .. })));
        let twice = [
            OriginKey { kid: "k".into(), secret: Secret::from(SECRET) },
            OriginKey { kid: "k".into(), secret: Secret::from(SECRET) },
        ];
        assert!(matches!(check_keys(&twice), Err(OriginHttpError::Auth(AuthConfigError::DuplicateKid(_)))));
        assert!(check_keys(&twice[..1]).is_ok());
    }
}
