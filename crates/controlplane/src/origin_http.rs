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
//!
//! Beside them, for `isocloud edge`, the routing feed (`GET
//! /routing?since=G`): the host table whole, or the changes past routing
//! generation `G` as each touched subject is now, read from the store's
//! change log as every control-plane node reads it. Its token is the
//! edge's own (`aud` [`isocloud_auth::ROUTING_AUDIENCE`], no deployment),
//! signed with the same key; a token minted for anything else (`aud` set)
//! opens no deployment RPC. Behind the same token, the edge's other
//! routes (`edge_feed`): `GET /certificates` (the verified domains'
//! certificates and keys, for its HTTPS listener), `GET
//! /tls_alpn_challenges` (TLS-ALPN-01 digests, for the same) and `GET
//! /acme_challenge` (HTTP-01 answers, for its plain one).

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
use isocloud_auth::{AuthConfigError, CLOCK_LEEWAY_S, ROUTING_AUDIENCE, Secret, SubhostVerifier, Subhoster};
use isocloud_origin::{ActivityBatch, IsolateConfig, Origin, OriginError};
use isocloud_protocol::ErrorCode;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::{self, StoreError, Touched};
use crate::{ControlPlane, MAX_ROUTING_DELTA, validate};

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
    /// The routing feed's source: the control plane whose origin this is
    /// (`None`: `/routing` is 404).
    routing: Option<Arc<ControlPlane>>,
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
        Ok(Arc::new(Self { origin, routing: None, verifier: verifier(keys)?, limits, permits }))
    }

    /// `control_plane`'s origin RPCs and its routing feed for edges.
    pub fn for_control_plane(
        control_plane: &Arc<ControlPlane>,
        keys: &[OriginKey],
        limits: OriginHttpLimits,
    ) -> Result<Arc<Self>, OriginHttpError> {
        let permits = Arc::new(Semaphore::new(limits.max_concurrent_rpcs.max(1)));
        Ok(Arc::new(Self {
            origin: control_plane.origin(),
            routing: Some(Arc::clone(control_plane)),
            verifier: verifier(keys)?,
            limits,
            permits,
        }))
    }

    /// The routes: the five RPCs at the root, and an unauthenticated
    /// `/healthz` for load balancers' probes.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new().fallback(handle).with_state(Arc::clone(self))
    }

    /// The `deployment_id` of a valid RPC token, else why not (safe to show
    /// the caller: it never holds a secret).
    fn authenticate(&self, headers: &http::HeaderMap, now_unix_s: u64) -> Result<String, String> {
        let token = bearer(headers)?;
        let claims = self.verifier.verify(token, now_unix_s).map_err(|e| e.to_string())?;
        if let Some(audience) = claims.audience() {
            // An edge's relay token (for a runner) or the like: signed with
            // the same key, but never meant to open the origin.
            return Err(format!("the token was minted for {audience:?}, not for an origin RPC"));
        }
        check_lifetime(token, now_unix_s)?;
        Ok(claims.deployment_id().to_owned())
    }

    /// Whether the routing feed's token is valid (an edge's, `aud`
    /// [`ROUTING_AUDIENCE`]), else why not.
    fn authenticate_routing(&self, headers: &http::HeaderMap, now_unix_s: u64) -> Result<(), String> {
        let token = bearer(headers)?;
        self.verifier.verify_audience(token, ROUTING_AUDIENCE, now_unix_s).map_err(|e| e.to_string())?;
        check_lifetime(token, now_unix_s)
    }
}

/// The token of the one `Authorization: Bearer` header.
fn bearer(headers: &http::HeaderMap) -> Result<&str, String> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err("an RPC needs one Authorization: Bearer <JWT> header".into());
    };
    let value = value.to_str().map_err(|_| "the Authorization header is not ASCII".to_owned())?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err("the Authorization header is not a Bearer token".into()),
    }
}

/// A verified token must not live longer than an RPC token may.
fn check_lifetime(token: &str, now_unix_s: u64) -> Result<(), String> {
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
    Ok(())
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
    if path == "/routing" {
        // Its parts only: the body (not `Sync`) is never read.
        let (parts, _) = request.into_parts();
        return routing(&http, &parts).await;
    }
    if path == "/certificates" || path == "/acme_challenge" || path == "/tls_alpn_challenges" {
        let (parts, _) = request.into_parts();
        return edge_feed(&http, &parts).await;
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

/// `GET /routing?since=G`: the routing feed of an edge. `since` absent:
/// the table whole; else the changes past generation `G`, or the table
/// whole when the log no longer reaches back that far (or `G` is ahead of
/// the store: another database).
async fn routing(http: &OriginHttp, request: &http::request::Parts) -> Response {
    if request.method != Method::GET {
        let mut response = refuse(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::BadRequest, "routing takes GET");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    if let Err(reason) = http.authenticate_routing(&request.headers, now_unix_s()) {
        tracing::warn!(target: "isocloud::controlplane", rpc = "routing", reason, "origin: RPC refused");
        return refuse(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &reason);
    }
    let Some(control_plane) = http.routing.clone() else {
        return refuse(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "this origin has no routing feed");
    };
    let query = match query_pairs(request.uri.query()) {
        Ok(query) => query,
        Err(reason) => return bad_request(&reason),
    };
    let since = match query.get("since").map(|text| text.parse::<i64>()) {
        None => None,
        Some(Ok(since)) if since >= 0 => Some(since),
        Some(_) => return bad_request("since is not a routing generation (a whole number, 0 or more)"),
    };
    let permit = match tokio::time::timeout(http.limits.queue_wait, Arc::clone(&http.permits).acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Capacity, "the origin is busy: try again");
        }
    };
    let started = Instant::now();
    let (answer, json) = match read_feed(http, "routing", routing_answer(&control_plane, since)).await {
        Ok(read) => read,
        Err(refusal) => return refusal,
    };
    tracing::debug!(
        target: "isocloud::controlplane",
        rpc = "routing",
        since,
        generation = answer.generation,
        full = answer.full,
        bytes = json.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "origin: RPC answered"
    );
    json_response(json, permit, false)
}

/// Certificates a page of [`certificates`] holds at most: each pair is at
/// most `MAX_CERT_PEM_BYTES + MAX_KEY_PEM_BYTES` (80 KiB), so a page stays
/// under 8 MiB (the edge refuses larger answers).
pub const CERTIFICATES_PAGE: usize = 100;

/// The edge's other routes, behind the routing feed's token (`aud`
/// [`ROUTING_AUDIENCE`]: the edge's; an RPC or relay token opens neither):
///
/// - `GET /certificates?after=D` (or `?domain=D`): the verified domains'
///   certificate chains and keys, PEM, a page of [`CERTIFICATES_PAGE`] by
///   name after `D` (`next`: where the following page starts), or the one
///   domain's. Only what the control plane's own SNI table would serve
///   ([`certs::servable`]): each pair for the one domain it is stored for.
///   Key material is never logged.
/// - `GET /acme_challenge?host=H&token=T`: the key authorization of an
///   HTTP-01 challenge pending for `H` (`text/plain`), else 404: the lookup
///   the runner's public listener makes, bounded the same way.
/// - `GET /tls_alpn_challenges` (or `?domain=D`): the TLS-ALPN-01
///   challenges pending (domain, the key authorization's SHA-256 in hex,
///   expiry), for the edge's TLS listener to answer `acme-tls/1` hellos.
async fn edge_feed(http: &OriginHttp, request: &http::request::Parts) -> Response {
    let name = request.uri.path().trim_start_matches('/');
    if request.method != Method::GET {
        let mut response = refuse(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::BadRequest, &format!("{name} takes GET"));
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    if let Err(reason) = http.authenticate_routing(&request.headers, now_unix_s()) {
        tracing::warn!(target: "isocloud::controlplane", rpc = name, reason, "origin: RPC refused");
        return refuse(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &reason);
    }
    let Some(control_plane) = http.routing.clone() else {
        return refuse(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "this origin serves no edges");
    };
    let query = match query_pairs(request.uri.query()) {
        Ok(query) => query,
        Err(reason) => return bad_request(&reason),
    };
    if name == "acme_challenge" {
        let (Some(host), Some(token)) = (query.get("host"), query.get("token")) else {
            return bad_request("acme_challenge needs host and token");
        };
        // Bounded in number and time by the control plane itself.
        let found = tokio::time::timeout(http.limits.rpc_timeout, control_plane.acme_key_authorization(host, token));
        return match found.await {
            Ok(Some(key_authorization)) => {
                let mut response = Response::new(Body::from(key_authorization));
                response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            _ => refuse(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "no such challenge pending"),
        };
    }
    let permit = match tokio::time::timeout(http.limits.queue_wait, Arc::clone(&http.permits).acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Capacity, "the origin is busy: try again");
        }
    };
    if name == "tls_alpn_challenges" {
        let found = tls_alpn_challenges(&control_plane, query.get("domain").map(String::as_str));
        return match read_feed(http, name, found).await {
            Ok((_, json)) => json_response(json, permit, true),
            Err(refusal) => refusal,
        };
    }
    let page = certificates(&control_plane, query.get("domain").map(String::as_str), query.get("after"));
    let (answer, json) = match read_feed(http, name, page).await {
        Ok(read) => read,
        Err(refusal) => return refusal,
    };
    // How many, never which keys.
    tracing::debug!(
        target: "isocloud::controlplane",
        rpc = name,
        certificates = answer.certificates.len(),
        more = answer.next.is_some(),
        "origin: RPC answered"
    );
    json_response(json, permit, true)
}

/// One feed's read from the store under the RPC timeout, and its JSON; a
/// failure is the refusal to answer with (the store's error logged, never sent).
async fn read_feed<T: Serialize>(
    http: &OriginHttp,
    name: &str,
    read: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<(T, Vec<u8>), Response> {
    let answer = match tokio::time::timeout(http.limits.rpc_timeout, read).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            tracing::error!(target: "isocloud::controlplane", rpc = name, error = %e, "origin: RPC failed");
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::OriginUnreachable,
                &format!("the control plane could not answer {name}; its log says why"),
            ));
        }
        Err(_) => {
            return Err(refuse(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::RequestTimeout,
                &format!("{name} took longer than {} s", http.limits.rpc_timeout.as_secs()),
            ));
        }
    };
    match serde_json::to_vec(&answer) {
        Ok(json) => Ok((answer, json)),
        Err(e) => {
            tracing::error!(target: "isocloud::controlplane", rpc = name, error = %e, "origin: RPC failed");
            Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, &format!("{name} could not be encoded")))
        }
    }
}

/// A feed's JSON answer; `no_store` for those that carry certificates or
/// challenges (nothing on the way may keep them).
fn json_response(json: Vec<u8>, permit: OwnedSemaphorePermit, no_store: bool) -> Response {
    let mut response = bytes_response(Bytes::from(json), permit);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if no_store {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// One answer of `GET /tls_alpn_challenges` (the edge reads it as
/// `isocloud_edge::TlsAlpnPage`): the SHA-256 of each key authorization,
/// hex, never the key authorization itself; the edge mints the challenge
/// certificate from it ([`isocloud_ingress::tls_alpn_certificate`]).
#[derive(Serialize)]
struct TlsAlpnPage {
    challenges: Vec<TlsAlpnDigest>,
}

#[derive(Serialize)]
struct TlsAlpnDigest {
    domain: String,
    digest: String,
    expires_at_ms: i64,
}

/// `domain`'s pending TLS-ALPN-01 challenge (none or one), or every one
/// pending, at most the nodes' table bound, the latest to expire first.
async fn tls_alpn_challenges(control_plane: &ControlPlane, domain: Option<&str>) -> Result<TlsAlpnPage, StoreError> {
    let now_ms = crate::time::now_ms();
    let mut conn = control_plane.store.read().await?;
    let rows = match domain {
        Some(domain) => {
            let domain = domain.strip_suffix('.').unwrap_or(domain).to_ascii_lowercase();
            store::acme::tls_alpn_challenge(&mut conn, &domain, now_ms).await?.into_iter().collect()
        }
        None => {
            let max = i64::try_from(crate::acme::MAX_TLS_ALPN_CHALLENGES).unwrap_or(i64::MAX);
            store::acme::tls_alpn_challenges(&mut conn, now_ms, max).await?
        }
    };
    let challenges = rows
        .into_iter()
        .map(|row| TlsAlpnDigest {
            digest: hex::encode(crate::acme::key_authorization_digest(&row.key_authorization)),
            domain: row.domain,
            expires_at_ms: row.expires_at_ms,
        })
        .collect();
    Ok(TlsAlpnPage { challenges })
}

/// One answer of `GET /certificates` (the edge reads it as
/// `isocloud_edge::CertificatePage`).
#[derive(Serialize)]
struct CertificatePage {
    certificates: Vec<CertificatePem>,
    /// The name the next page starts after; `None`: this was the last.
    next: Option<String>,
}

#[derive(Serialize)]
struct CertificatePem {
    domain: String,
    cert_pem: String,
    key_pem: String,
}

/// `domain`'s certificate (none or one), or the page after `after`.
async fn certificates(
    control_plane: &ControlPlane,
    domain: Option<&str>,
    after: Option<&String>,
) -> Result<CertificatePage, StoreError> {
    let base_domain = control_plane.options.base_domain.as_str();
    let mut conn = control_plane.store.read().await?;
    let (rows, next) = match domain {
        Some(domain) => {
            let domain = domain.strip_suffix('.').unwrap_or(domain).to_ascii_lowercase();
            let (_, row) = store::domains::routing_of(&mut conn, &domain).await?;
            (row.into_iter().collect(), None)
        }
        None => {
            let after = after.map_or("", String::as_str);
            let mut rows =
                store::domains::certificate_rows_after(&mut conn, after, CERTIFICATES_PAGE as i64 + 1).await?;
            let next = (rows.len() > CERTIFICATES_PAGE).then(|| {
                rows.truncate(CERTIFICATES_PAGE);
                rows.last().map(|row| row.domain.clone()).unwrap_or_default()
            });
            (rows, next)
        }
    };
    let certificates = rows
        .into_iter()
        .filter(|row| crate::certs::servable(row, base_domain).is_some())
        .map(|row| CertificatePem { domain: row.domain, cert_pem: row.cert_pem, key_pem: row.key_pem })
        .collect();
    Ok(CertificatePage { certificates, next })
}

/// The routing feed's answer (the edge reads it as `isocloud_edge::RoutingUpdate`;
/// `the_edges_table_answers_as_the_control_planes` holds the two together).
#[derive(Debug, Serialize)]
struct RoutingAnswer {
    generation: i64,
    full: bool,
    base_domain: String,
    projects: Vec<ProjectAnswer>,
    deleted_projects: Vec<String>,
    deployments: Vec<(String, String)>,
    deleted_deployments: Vec<String>,
    domains: Vec<(String, String)>,
    deleted_domains: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ProjectAnswer {
    id: String,
    name: String,
    production: Option<String>,
}

impl RoutingAnswer {
    fn new(generation: i64, full: bool, base_domain: &str) -> Self {
        Self {
            generation,
            full,
            base_domain: base_domain.to_owned(),
            projects: Vec::new(),
            deleted_projects: Vec::new(),
            deployments: Vec::new(),
            deleted_deployments: Vec::new(),
            domains: Vec::new(),
            deleted_domains: Vec::new(),
        }
    }

    /// Domain `domain` routes to `project` now (`None`: it does not). One
    /// at or under the base domain never routes (the control plane's own
    /// table shadows it; see `RoutingTable::put_domain`).
    fn put_domain(&mut self, domain: String, project: Option<String>) {
        match project {
            Some(project) if !validate::is_at_or_under(&domain, &self.base_domain) => {
                self.domains.push((domain, project))
            }
            _ => self.deleted_domains.push(domain),
        }
    }
}

/// What the feed answers for `since`, read from the store as
/// `ControlPlane::reload_routing` reads it: the generation first, then the
/// rows, so a change committed in between is sent now and again next time,
/// never missed.
async fn routing_answer(control_plane: &ControlPlane, since: Option<i64>) -> Result<RoutingAnswer, StoreError> {
    let base_domain = control_plane.options.base_domain.as_str();
    let mut conn = control_plane.store.read().await?;
    let generation = store::routing_generation(&mut conn).await?;
    match since {
        Some(since) if since == generation => return Ok(RoutingAnswer::new(generation, false, base_domain)),
        Some(since) if since < generation => {
            let changes = store::routing_changes_since(&mut conn, since, MAX_ROUTING_DELTA + 1).await?;
            // Every generation up to the one read is in the log (none
            // pruned), and not too many to send one by one: the rule of
            // `ControlPlane::reload_routing`.
            let contiguous = changes.first().is_some_and(|(first, _)| *first == since + 1)
                && changes.windows(2).all(|pair| pair[1].0 - pair[0].0 <= 1)
                && changes.last().is_some_and(|(last, _)| *last >= generation);
            if contiguous && changes.len() as i64 <= MAX_ROUTING_DELTA {
                let newest = changes.last().map_or(generation, |(g, _)| *g);
                let touched: std::collections::HashSet<Touched> = changes.into_iter().map(|(_, t)| t).collect();
                return routing_delta(&mut conn, RoutingAnswer::new(newest, false, base_domain), touched).await;
            }
        }
        // None, or ahead of this store: the table whole.
        _ => {}
    }
    let mut answer = RoutingAnswer::new(generation, true, base_domain);
    for (id, name, production) in store::projects::routing_rows(&mut conn).await? {
        answer.projects.push(ProjectAnswer { id, name, production });
    }
    store::deployments::each_routing_row(&mut conn, |id, project| answer.deployments.push((id, project))).await?;
    for (domain, project) in store::domains::routing_rows(&mut conn).await? {
        answer.put_domain(domain, Some(project));
    }
    Ok(answer)
}

/// Each touched subject as it is now; a ready deployment brings its
/// project along (the edge may not have seen it yet).
async fn routing_delta(
    conn: &mut sqlx::AnyConnection,
    mut answer: RoutingAnswer,
    touched: std::collections::HashSet<Touched>,
) -> Result<RoutingAnswer, StoreError> {
    let mut project_ids = std::collections::BTreeSet::new();
    for subject in touched {
        match subject {
            Touched::Project(id) => {
                project_ids.insert(id);
            }
            Touched::Deployment(id) => match store::deployments::routing_of(conn, &id).await? {
                Some(project) => {
                    project_ids.insert(project.clone());
                    answer.deployments.push((id, project));
                }
                None => answer.deleted_deployments.push(id),
            },
            Touched::Domain(domain) => {
                let (project, _) = store::domains::routing_of(conn, &domain).await?;
                answer.put_domain(domain, project);
            }
        }
    }
    for id in project_ids {
        match store::projects::routing_of(conn, &id).await? {
            Some((name, production)) => answer.projects.push(ProjectAnswer { id, name, production }),
            None => answer.deleted_projects.push(id),
        }
    }
    Ok(answer)
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

/// `x-deno-config`: the JSON itself while it is plain ASCII, else base64url
/// of it (the protocol's other form), since a header value carries no UTF-8
/// reliably and an env value may hold any.
fn config_header(config: &IsolateConfig) -> Result<HeaderValue, OriginError> {
    let json = config.to_json().to_string();
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
            config().to_json(),
        ] {
            let config = IsolateConfig::from_json(json.to_string().as_bytes()).unwrap();
            let again = IsolateConfig::from_json(config.to_json().to_string().as_bytes()).unwrap();
            assert_eq!(again, config);
            let header = config_header(&config).unwrap();
            assert_eq!(IsolateConfig::from_header(header.as_bytes()).unwrap(), config);
        }
    }

    /// A control plane on SQLite in a temp dir, its origin listener with the
    /// routing feed on loopback, and an edge's follower of that feed.
    async fn control_plane_and_edge()
    -> (tempfile::TempDir, Arc<ControlPlane>, std::net::SocketAddr, isocloud_edge::Follower) {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(crate::ControlPlaneOptions::new(dir.path().to_owned())).await.unwrap();
        let keys = [OriginKey { kid: KID.into(), secret: Secret::from(SECRET) }];
        let http = OriginHttp::for_control_plane(&cp, &keys, ORIGIN_HTTP_LIMITS).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, http.router()).await });
        let root = url::Url::parse(&format!("http://{addr}/")).unwrap();
        let follower = isocloud_edge::Follower::new(
            Arc::new(std::sync::RwLock::new(isocloud_edge::HostTable::default())),
            &root,
            isocloud_edge::SigningKey { kid: KID.into(), secret: Secret::from(SECRET) },
            Duration::from_secs(5),
            isocloud_edge::Metrics::unregistered(),
        )
        .unwrap();
        (dir, cp, addr, follower)
    }

    async fn write(cp: &ControlPlane, change: impl AsyncFnOnce(&mut sqlx::AnyConnection)) {
        let mut tx = cp.store.write().await.unwrap();
        change(&mut tx).await;
        tx.commit().await.unwrap();
    }

    async fn ready(conn: &mut sqlx::AnyConnection, project_id: &str, id: &str) {
        let new = crate::store::deployments::NewDeployment {
            id: id.into(),
            project_id: project_id.into(),
            created_at_ms: 0,
            status: crate::store::deployments::Status::Ready,
            entrypoint: "main.ts".into(),
            eszip_sha256: None,
            permissions_json: "null".into(),
            envs: Default::default(),
            git: None,
            files: Vec::new(),
            build_promote: false,
            error: None,
            build_log: None,
        };
        store::deployments::insert(conn, &new).await.unwrap();
    }

    async fn domain(conn: &mut sqlx::AnyConnection, domain: &str, project_id: &str) {
        store::domains::insert(conn, domain, Some(project_id), "token", 0).await.unwrap();
        store::domains::set_verified(conn, domain, 0).await.unwrap();
    }

    fn name(text: &str) -> crate::validate::ProjectName {
        crate::validate::project_name(text).unwrap()
    }

    /// Every host of these projects and deployments, and some of none.
    fn hosts() -> Vec<String> {
        let mut hosts: Vec<String> =
            ["www.example.com", "shop.example.com", "new.example.com", "old.localhost", "localhost", "example.com"]
                .map(str::to_owned)
                .into();
        for project in ["hello", "hi", "shop", "gone"] {
            hosts.push(format!("{project}.localhost"));
            for id in ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd", "eeeeeeeeeeee"] {
                hosts.push(format!("{project}-{id}.localhost"));
            }
        }
        hosts
    }

    /// The edge's table and the control plane's own answer every host the
    /// same; returns how many route somewhere.
    async fn same_answers(cp: &ControlPlane, follower: &isocloud_edge::Follower, when: &str) -> usize {
        cp.reload_routing(false).await.unwrap();
        let table = follower.table().read().unwrap();
        let mut routed = 0;
        for host in hosts() {
            let ours = cp.resolve_host(&host).map(|found| found.deployment_id);
            assert_eq!(table.resolve(&host), ours.as_deref(), "{when}: {host}");
            routed += usize::from(ours.is_some());
        }
        routed
    }

    /// The edge's table, kept by the feed (whole at first, then deltas, then
    /// whole again once the log no longer reaches back), answers every host
    /// as the control plane's own table does, through creation, promotion,
    /// rename, domains attached and moved, and deletion.
    #[tokio::test]
    async fn the_edges_table_answers_as_the_control_planes() {
        let (_dir, cp, _, follower) = control_plane_and_edge().await;
        write(&cp, async |conn| {
            store::projects::insert(conn, "p1", &name("hello"), 0).await.unwrap();
            ready(conn, "p1", "aaaaaaaaaaaa").await;
            store::projects::promote(conn, "p1", "aaaaaaaaaaaa", 0).await.unwrap();
            store::projects::insert(conn, "p2", &name("shop"), 0).await.unwrap();
            ready(conn, "p2", "bbbbbbbbbbbb").await;
            domain(conn, "www.example.com", "p1").await;
            // Stored data of an older base domain: never routed.
            domain(conn, "old.localhost", "p1").await;
        })
        .await;
        assert_eq!(follower.poll_once().await.unwrap(), isocloud_edge::Polled::Full);
        assert!(same_answers(&cp, &follower, "the table whole").await >= 4);

        // Deltas: a promotion, a new project, a rename, a domain moved and one added.
        write(&cp, async |conn| {
            store::projects::promote(conn, "p2", "bbbbbbbbbbbb", 0).await.unwrap();
            store::projects::insert(conn, "p3", &name("gone"), 0).await.unwrap();
            ready(conn, "p3", "cccccccccccc").await;
            store::projects::promote(conn, "p3", "cccccccccccc", 0).await.unwrap();
            store::projects::rename(conn, "p1", &name("hi"), 1).await.unwrap();
            ready(conn, "p1", "dddddddddddd").await;
            store::domains::set_project(conn, "www.example.com", Some("p2")).await.unwrap();
            domain(conn, "new.example.com", "p1").await;
        })
        .await;
        assert_eq!(follower.poll_once().await.unwrap(), isocloud_edge::Polled::Delta);
        let routed = same_answers(&cp, &follower, "after the deltas").await;
        assert!(routed >= 8, "{routed}");
        assert_eq!(follower.poll_once().await.unwrap(), isocloud_edge::Polled::Delta, "nothing new: an empty delta");

        // A deletion, as a delta.
        write(&cp, async |conn| store::projects::delete(conn, "p3").await.unwrap()).await;
        assert_eq!(follower.poll_once().await.unwrap(), isocloud_edge::Polled::Delta);
        same_answers(&cp, &follower, "after a deletion").await;
        assert!(follower.table().read().unwrap().resolve("gone.localhost").is_none());

        // The log no longer reaches back to the edge's generation: whole again.
        write(&cp, async |conn| {
            ready(conn, "p2", "eeeeeeeeeeee").await;
            store::projects::promote(conn, "p2", "eeeeeeeeeeee", 2).await.unwrap();
        })
        .await;
        write(&cp, async |conn| {
            assert!(store::prune_routing_changes(conn, i64::MAX).await.unwrap() >= 2);
        })
        .await;
        assert_eq!(follower.poll_once().await.unwrap(), isocloud_edge::Polled::Full);
        same_answers(&cp, &follower, "after the log was pruned").await;
        assert_eq!(
            follower.table().read().unwrap().resolve("shop.localhost"),
            Some("eeeeeeeeeeee"),
            "the promotion the edge missed"
        );
    }

    /// The feed takes the edge's token only: a deployment's RPC token, a
    /// relay token and a wrong key are refused; and an edge's tokens open
    /// no deployment RPC. An origin without the control plane has no feed.
    #[tokio::test]
    async fn the_routing_feed_and_the_rpcs_keep_their_tokens_apart() {
        let (_dir, cp, addr, _) = control_plane_and_edge().await;
        write(&cp, async |conn| {
            store::projects::insert(conn, "p1", &name("hello"), 0).await.unwrap();
            ready(conn, "p1", "aaaaaaaaaaaa").await;
        })
        .await;
        let secret = Secret::from(SECRET);
        let routing = isocloud_auth::sign_audience_token(KID, &secret, ROUTING_AUDIENCE, now_unix_s(), 60);
        let answer = get(addr, "/routing", Some(&routing)).await;
        assert_eq!(answer.status(), 200);
        let update: isocloud_edge::RoutingUpdate = answer.json().await.unwrap();
        assert!(update.full);
        assert_eq!(update.deployments, [("aaaaaaaaaaaa".to_owned(), "p1".to_owned())]);
        assert_eq!(get(addr, &format!("/routing?since={}", update.generation), Some(&routing)).await.status(), 200);

        let relay = isocloud_auth::sign_relay_token(KID, &secret, "aaaaaaaaaaaa", now_unix_s(), 60);
        let wrong = isocloud_auth::sign_audience_token(
            KID,
            &Secret::from("another-secret-0123456789abcdef0123"),
            ROUTING_AUDIENCE,
            now_unix_s(),
            60,
        );
        let long = isocloud_auth::sign_audience_token(KID, &secret, ROUTING_AUDIENCE, now_unix_s(), 3600);
        for (case, token) in [
            ("no token", None),
            ("a deployment's RPC token", Some(token_for(KID, SECRET, "aaaaaaaaaaaa", 60))),
            ("a relay token", Some(relay.clone())),
            ("a wrong key", Some(wrong)),
            ("a token for an hour", Some(long)),
        ] {
            let response = get(addr, "/routing", token.as_deref()).await;
            assert_eq!(response.status(), 401, "{case}");
        }
        // The deployment RPCs: its own token works, an edge's tokens do not.
        let boot = "/read_tree?deployment_id=aaaaaaaaaaaa";
        assert_eq!(get(addr, boot, Some(&token_for(KID, SECRET, "aaaaaaaaaaaa", 60))).await.status(), 200);
        let refused = get(addr, boot, Some(&relay)).await;
        assert_eq!(refused.status(), 401);
        assert!(refused.text().await.unwrap().contains("isocloud-runner"));
        assert_eq!(get(addr, boot, Some(&routing)).await.status(), 401);
        assert_eq!(get(addr, "/routing?since=-1", Some(&routing)).await.status(), 400);
        assert_eq!(get(addr, "/routing?since=1&since=2", Some(&routing)).await.status(), 400);

        // An origin over any `Origin` has no feed.
        let (_, plain) = serve(ORIGIN_HTTP_LIMITS).await;
        assert_eq!(get(plain, "/routing", Some(&routing)).await.status(), 404);
    }

    /// An edge's certificate feed from the listener at `addr`, with the
    /// edge's key, and the table it fills.
    fn edge_certificate_feed(
        addr: std::net::SocketAddr,
    ) -> (Arc<isocloud_edge::EdgeCertificates>, isocloud_edge::CertificateFeed) {
        let certificates = Arc::new(isocloud_edge::EdgeCertificates::default());
        let feed = isocloud_edge::CertificateFeed::new(
            certificates.clone(),
            &url::Url::parse(&format!("http://{addr}/")).unwrap(),
            isocloud_edge::SigningKey { kid: KID.into(), secret: Secret::from(SECRET) },
            Duration::from_secs(5),
            isocloud_edge::Metrics::unregistered(),
        )
        .unwrap();
        (certificates, feed)
    }

    /// A self-signed certificate for `names`, stored for `domain`.
    async fn stored_certificate(conn: &mut sqlx::AnyConnection, domain: &str, names: &[&str]) {
        let cert =
            rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
        store::domains::put_certificate(conn, domain, &cert_pem, &key_pem, &names, i64::MAX / 2, 0).await.unwrap();
    }

    /// The edge's certificate feed gives what the control plane's own SNI
    /// table serves — verified domains' certificates that cover them, none
    /// under the base domain — in pages an edge follows to the end, or one
    /// domain's; HTTP-01 answers for pending tokens. Both only to the
    /// edge's token.
    #[tokio::test]
    async fn the_edge_gets_the_certificates_the_sni_table_serves_and_acme_answers_with_its_token_only() {
        let (_dir, cp, addr, _) = control_plane_and_edge().await;
        let many: Vec<String> = (0..CERTIFICATES_PAGE + 5).map(|i| format!("d{i:03}.example.net")).collect();
        write(&cp, async |conn| {
            store::projects::insert(conn, "p1", &name("hello"), 0).await.unwrap();
            domain(conn, "www.example.com", "p1").await;
            stored_certificate(conn, "www.example.com", &["www.example.com"]).await;
            // Stored data the API refuses or the SNI table leaves out.
            domain(conn, "api.example.com", "p1").await;
            stored_certificate(conn, "api.example.com", &["other.example.com"]).await;
            domain(conn, "old.localhost", "p1").await;
            stored_certificate(conn, "old.localhost", &["old.localhost"]).await;
            store::domains::insert(conn, "pending.example.com", Some("p1"), "token", 0).await.unwrap();
            stored_certificate(conn, "pending.example.com", &["pending.example.com"]).await;
            for name in &many {
                domain(conn, name, "p1").await;
                stored_certificate(conn, name, &[name]).await;
            }
            store::acme::put_challenge(conn, "www.example.com", "tok_1", "tok_1.thumb", i64::MAX / 2).await.unwrap();
        })
        .await;
        cp.reload_routing(true).await.unwrap();
        let secret = Secret::from(SECRET);
        let edge = isocloud_auth::sign_audience_token(KID, &secret, ROUTING_AUDIENCE, now_unix_s(), 60);

        // One domain's: the probe, then what the SNI table does not serve.
        let one = |domain: &str| format!("/certificates?domain={domain}");
        let page: serde_json::Value = get(addr, &one("www.example.com"), Some(&edge)).await.json().await.unwrap();
        assert_eq!(page["certificates"][0]["domain"], "www.example.com");
        assert!(page["certificates"][0]["key_pem"].as_str().unwrap().contains("PRIVATE KEY"));
        for domain in ["api.example.com", "old.localhost", "pending.example.com", "nope.example.com"] {
            let page: serde_json::Value = get(addr, &one(domain), Some(&edge)).await.json().await.unwrap();
            assert_eq!(page["certificates"], json!([]), "{domain}");
            assert!(cp.certificate_for(domain).is_none(), "{domain}: the SNI table agrees");
        }
        // Every page, as the edge reads them.
        let (certificates, feed) = edge_certificate_feed(addr);
        assert_eq!(feed.refresh().await.unwrap(), many.len() + 1, "two pages");
        assert!(certificates.lookup("www.example.com").is_some());
        assert!(many.iter().all(|name| certificates.lookup(name).is_some()));
        assert!(certificates.lookup("api.example.com").is_none() && certificates.lookup("old.localhost").is_none());

        let challenge = "/acme_challenge?host=www.example.com&token=tok_1";
        let answer = get(addr, challenge, Some(&edge)).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.text().await.unwrap(), "tok_1.thumb");
        assert_eq!(get(addr, "/acme_challenge?host=www.example.com&token=tok_2", Some(&edge)).await.status(), 404);
        assert_eq!(get(addr, "/acme_challenge?host=api.example.com&token=tok_1", Some(&edge)).await.status(), 404);

        // Nobody else's token opens either.
        let relay = isocloud_auth::sign_relay_token(KID, &secret, "aaaaaaaaaaaa", now_unix_s(), 60);
        for (case, token) in [
            ("no token", None),
            ("a deployment's RPC token", Some(token_for(KID, SECRET, "aaaaaaaaaaaa", 60))),
            ("a relay token", Some(relay)),
        ] {
            for path in [one("www.example.com").as_str(), "/certificates", challenge] {
                assert_eq!(get(addr, path, token.as_deref()).await.status(), 401, "{case}: {path}");
            }
        }
        let (_, plain) = serve(ORIGIN_HTTP_LIMITS).await;
        assert_eq!(get(plain, "/certificates", Some(&edge)).await.status(), 404);
    }

    /// The pending TLS-ALPN-01 challenges reach the edge's token only, as
    /// the key authorization's SHA-256 (never the key authorization), and
    /// the edge's feed turns them into the challenge certificate its TLS
    /// listener answers `acme-tls/1` with; a cleared one leaves it.
    #[tokio::test]
    async fn the_edge_gets_the_pending_tls_alpn_challenges_with_its_token_only() {
        let (_dir, cp, addr, _) = control_plane_and_edge().await;
        write(&cp, async |conn| {
            store::projects::insert(conn, "p1", &name("hello"), 0).await.unwrap();
            domain(conn, "www.example.com", "p1").await;
            store::acme::put_tls_alpn_challenge(conn, "www.example.com", "tok_1", "tok_1.thumb", i64::MAX / 2)
                .await
                .unwrap();
            // An HTTP-01 one is not a TLS-ALPN-01 one.
            domain(conn, "api.example.com", "p1").await;
            store::acme::put_challenge(conn, "api.example.com", "tok_2", "tok_2.thumb", i64::MAX / 2).await.unwrap();
        })
        .await;
        let secret = Secret::from(SECRET);
        let edge = isocloud_auth::sign_audience_token(KID, &secret, ROUTING_AUDIENCE, now_unix_s(), 60);
        let digest = hex::encode(crate::acme::key_authorization_digest("tok_1.thumb"));
        let expected = json!([{ "domain": "www.example.com", "digest": digest, "expires_at_ms": i64::MAX / 2 }]);

        // The probe: the edge's token gets it, all or by domain.
        for path in ["/tls_alpn_challenges", "/tls_alpn_challenges?domain=WWW.example.com."] {
            let answer = get(addr, path, Some(&edge)).await;
            assert_eq!(answer.status(), 200, "{path}");
            let text = answer.text().await.unwrap();
            assert!(!text.contains("tok_1"), "never the key authorization");
            let page: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(page["challenges"], expected, "{path}");
        }
        let other: serde_json::Value =
            get(addr, "/tls_alpn_challenges?domain=api.example.com", Some(&edge)).await.json().await.unwrap();
        assert_eq!(other["challenges"], json!([]));

        // Nobody else's token opens it.
        let relay = isocloud_auth::sign_relay_token(KID, &secret, "aaaaaaaaaaaa", now_unix_s(), 60);
        let wrong_key = isocloud_auth::sign_audience_token(
            KID,
            &Secret::from("another-secret-0123456789abcdef0123456"),
            ROUTING_AUDIENCE,
            now_unix_s(),
            60,
        );
        for (case, token) in [
            ("no token", None),
            ("a deployment's RPC token", Some(token_for(KID, SECRET, "aaaaaaaaaaaa", 60))),
            ("a relay token", Some(relay)),
            ("another key's edge token", Some(wrong_key)),
        ] {
            let status = get(addr, "/tls_alpn_challenges", token.as_deref()).await.status();
            assert_eq!(status, 401, "{case}");
        }

        // The edge's feed: the challenge certificate, then none once cleared.
        let (certificates, feed) = edge_certificate_feed(addr);
        feed.refresh().await.unwrap();
        let key = certificates.tls_alpn_lookup("www.example.com").expect("the challenge certificate");
        let (_, parsed) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        let acme = parsed.extensions().iter().find(|ext| ext.oid.to_id_string() == "1.3.6.1.5.5.7.1.31").unwrap();
        assert!(acme.critical);
        assert_eq!(hex::encode(&acme.value[2..]), digest);
        assert!(certificates.tls_alpn_lookup("api.example.com").is_none());
        write(&cp, async |conn| store::acme::clear_challenges(conn, "www.example.com").await.unwrap()).await;
        feed.note(isocloud_edge::Pending::Domains(["www.example.com".to_owned()].into()));
        feed.refresh().await.unwrap();
        assert!(certificates.tls_alpn_lookup("www.example.com").is_none(), "cleared");
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
