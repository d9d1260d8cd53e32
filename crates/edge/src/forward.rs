//! A request's way through the edge: its host → a deployment (the host
//! table), the deployment → runners (their ranking, those that are in
//! first), a relay token for the deployment, and the request forwarded to
//! the first runner, its answer streamed back.
//!
//! A request without a body whose method is idempotent (GET, HEAD,
//! OPTIONS) goes to the next runner of the ranking when a runner's
//! connection fails before the answer's head — refused, reset, closed
//! under it — or when the runner answers `SHUTTING_DOWN` (it is draining
//! and took nothing), at most [`MAX_ATTEMPTS`] runners in all. Anything
//! else is sent once: its body is gone, or the tenant may have acted on it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use isocloud_auth::sign_relay_token;
use isocloud_ingress::{EdgeError, PeerAddr};
use isocloud_protocol::{ERROR_HEADER, ErrorCode};
use isocloud_telemetry::{RequestSpan, TRACEPARENT_HEADER, Telemetry};

use crate::acme::AcmeLookup;
use crate::certs::EdgeCertificates;
use crate::follower::{SigningKey, now_unix_s};
use crate::hosts::HostTable;
use crate::metrics::Metrics;
use crate::runners::{BoxError, EdgeBody, Runner, RunnerClients, Runners};

/// Runners one idempotent request may be sent to.
pub const MAX_ATTEMPTS: usize = 3;

/// How long a relay token the edge signs lives: the runner checks it once,
/// when the request arrives, so a minute is room for clock skew only.
pub const RELAY_TOKEN_TTL_S: u64 = 60;

pub const SUBHOST_HEADER: &str = "x-deno-subhost";

/// Connection-scoped headers (RFC 9110 §7.6.1); they describe one hop and
/// are not passed on. `connection`/`upgrade` stay on upgrade requests.
const HOP_BY_HOP: [&str; 6] =
    ["keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "proxy-authorization"];

#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    /// From sending a request to a runner to its answer's head.
    pub request_timeout: Duration,
    /// Larger declared request bodies get 413 here (the runner bounds
    /// undeclared ones as they stream).
    pub max_request_body_bytes: usize,
}

/// The edge's request handling.
pub struct Edge {
    table: Arc<RwLock<HostTable>>,
    runners: Arc<Runners>,
    clients: RunnerClients,
    key: SigningKey,
    options: ForwardOptions,
    metrics: Metrics,
    in_flight: Arc<AtomicUsize>,
    /// `--otlp-endpoint`: a span per request; `None` costs one branch.
    telemetry: Option<Telemetry>,
    /// `--tls-listen`: plain HTTP to a domain with a certificate gets 308.
    https: Option<HttpsRedirect>,
    /// HTTP-01 answers from the control plane.
    acme: Option<Arc<AcmeLookup>>,
}

/// The redirect rule's inputs: which hosts have a certificate, and the
/// HTTPS listener's port.
struct HttpsRedirect {
    certificates: Arc<EdgeCertificates>,
    port: Option<u16>,
}

impl Edge {
    pub fn new(
        table: Arc<RwLock<HostTable>>,
        runners: Arc<Runners>,
        clients: RunnerClients,
        key: SigningKey,
        options: ForwardOptions,
        metrics: Metrics,
    ) -> Self {
        Self {
            table,
            runners,
            clients,
            key,
            options,
            metrics,
            in_flight: Arc::new(AtomicUsize::new(0)),
            telemetry: None,
            https: None,
            acme: None,
        }
    }

    /// With an HTTPS listener on `port`: plain HTTP to a host with a
    /// certificate in `certificates` gets 308 to HTTPS (the runner's rule,
    /// [`isocloud_ingress::https_location`]), ACME challenge paths aside.
    pub fn with_https(mut self, certificates: Arc<EdgeCertificates>, port: u16) -> Self {
        self.https = Some(HttpsRedirect { certificates, port: Some(port) });
        self
    }

    /// Answers pending HTTP-01 challenges (asked of the control plane).
    pub fn with_acme(mut self, acme: Arc<AcmeLookup>) -> Self {
        self.acme = Some(acme);
        self
    }

    /// Exports a span per request; the runner's span becomes its child
    /// (the request goes on with a `traceparent` naming it).
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// Requests between their head and their answer's end (a graceful stop
    /// waits for this to reach 0).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Serves one request; never fails: every error becomes an answer.
    /// `secure`: it came over TLS (the edge's `--tls-listen`).
    pub async fn handle<B>(&self, request: Request<B>, secure: bool) -> Response<EdgeBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let guard = InFlight::new(&self.in_flight);
        let mut span = self
            .telemetry
            .as_ref()
            .map(|telemetry| telemetry.request_span(request.method(), request.headers().get(TRACEPARENT_HEADER)));
        let response = match self.forward(request, secure, &mut span).await {
            Ok(response) => {
                self.metrics.requests.count(response.status().as_u16(), None);
                if let Some(span) = &mut span {
                    // A runner's own error answer says its code.
                    let code = response.headers().get(ERROR_HEADER).and_then(|v| {
                        ErrorCode::ALL.into_iter().map(ErrorCode::as_str).find(|code| code.as_bytes() == v.as_bytes())
                    });
                    span.status(response.status().as_u16(), code);
                }
                response
            }
            Err(error) => {
                self.metrics.requests.count(error.code.http_status(), Some(error.code.as_str()));
                if let Some(span) = &mut span {
                    span.status(error.code.http_status(), Some(error.code.as_str()));
                }
                let refused_body = error.code == ErrorCode::PayloadTooLarge;
                let mut response = error.code.response(&error.message).map(full);
                if refused_body {
                    // The body was never read: this connection cannot carry
                    // another request, and the client must know it.
                    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        };
        response.map(|body| Tracked { inner: body, _guard: guard, _span: span }.boxed_unsync())
    }

    /// `span`: the request's, when traced (it ends with the answer's body).
    async fn forward<B>(
        &self,
        mut request: Request<B>,
        secure: bool,
        span: &mut Option<RequestSpan>,
    ) -> Result<Response<EdgeBody>, EdgeError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let authority = isocloud_ingress::request_authority(request.version(), request.headers(), request.uri())?
            .ok_or_else(|| EdgeError::new(ErrorCode::BadRequest, "the request names no host"))?;
        // An HTTP-01 challenge path: answered when pending, never redirected
        // (the ACME server asks over plain HTTP), else forwarded as any request.
        let challenge = isocloud_ingress::challenge_of(&request, Some(&authority));
        if let (Some(acme), Some((host, token))) = (&self.acme, &challenge)
            && let Some(key_authorization) = acme.key_authorization(host, token).await
        {
            return Ok(challenge_answer(key_authorization));
        }
        let deployment_id = {
            let table = self.table.read().unwrap_or_else(|p| p.into_inner());
            match table.resolve(hostname(&authority)) {
                Some(_) if !secure && challenge.is_none() && self.https_only(hostname(&authority)) => {
                    let port = self.https.as_ref().and_then(|https| https.port);
                    return Ok(redirect(&isocloud_ingress::https_location(&authority, request.uri(), port)));
                }
                Some(id) => id.to_owned(),
                None if table.generation().is_none() => {
                    return Err(EdgeError::new(
                        ErrorCode::OriginUnreachable,
                        "the edge has no host table yet: the control plane has not answered",
                    ));
                }
                None => {
                    return Err(EdgeError::new(
                        ErrorCode::DeploymentNotFound,
                        format!("no deployment serves {authority}"),
                    ));
                }
            }
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|length| length > self.options.max_request_body_bytes) {
            return Err(EdgeError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than {} bytes", self.options.max_request_body_bytes),
            ));
        }

        let upgrade = is_upgrade(&request);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let idempotent = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        let retryable = idempotent && !upgrade && request.body().is_end_stream();
        let (parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let client = parts.extensions.get::<PeerAddr>().map(|peer| peer.0.ip().to_canonical());
        let mut headers = forwarded_headers(parts.headers, &authority, client, upgrade, secure)?;
        if let Some(span) = span {
            span.route(hostname(&authority), parts.uri.path(), &deployment_id, "");
            // The runner's span is this one's child, not the client's.
            headers.insert(HeaderName::from_static(TRACEPARENT_HEADER), span.traceparent());
        }

        let candidates = self.runners.ranked(&deployment_id);
        let attempts = if retryable { candidates.len().min(MAX_ATTEMPTS) } else { 1 };
        let mut body = Some(body.map_err(Into::into).boxed_unsync());
        let mut failure = EdgeError::new(ErrorCode::UpstreamUnreachable, "no runner could be reached");
        for (attempt, runner) in candidates.iter().take(attempts).enumerate() {
            let last = attempt + 1 == attempts;
            if let Some(span) = span {
                span.runner(runner.name());
            }
            // A retried request has no body: an empty one is the same.
            let body = body.take().unwrap_or_else(empty);
            let outgoing = self.outgoing(runner, &parts.method, &path, &headers, &deployment_id, body)?;
            let sent = self.clients.for_request(upgrade).request(outgoing);
            match tokio::time::timeout(self.options.request_timeout, sent).await {
                Ok(Ok(response)) => {
                    self.runners.report(runner, true);
                    if retryable && !last && is_shutting_down(&response) {
                        tracing::debug!(target: "isocloud::edge", runner = runner.name(), "runner is draining: next");
                        self.metrics.retried();
                        continue;
                    }
                    return Ok(answer(response, client_upgrade));
                }
                Ok(Err(e)) => {
                    if e.is_connect() {
                        // Nothing was sent: the runner is likely gone.
                        self.runners.report(runner, false);
                        failure = EdgeError::new(ErrorCode::UpstreamUnreachable, "no runner could be reached");
                    } else {
                        failure = EdgeError::new(
                            ErrorCode::UpstreamFailed,
                            "the runner's connection failed before it answered",
                        );
                    }
                    tracing::debug!(
                        target: "isocloud::edge",
                        runner = runner.name(),
                        deployment_id,
                        error = %error_chain(&e),
                        retry = retryable && !last,
                        "forwarding failed"
                    );
                    if retryable && !last {
                        self.metrics.retried();
                        continue;
                    }
                    if !retryable {
                        tracing::warn!(
                            target: "isocloud::edge",
                            runner = runner.name(),
                            deployment_id,
                            error = %error_chain(&e),
                            "forwarding failed; not retried (the request has a body or is not idempotent)"
                        );
                    }
                    break;
                }
                Err(_) => {
                    // The runner may still be working on it: never sent twice.
                    return Err(EdgeError::new(
                        ErrorCode::RequestTimeout,
                        format!("no answer within {} s", self.options.request_timeout.as_secs()),
                    ));
                }
            }
        }
        Err(failure)
    }

    /// Whether `host` has a certificate to send plain HTTP to (only with
    /// an HTTPS listener).
    fn https_only(&self, host: &str) -> bool {
        self.https.as_ref().is_some_and(|https| https.certificates.lookup(host).is_some())
    }

    /// The request for `runner`: the client's, with the relay token.
    fn outgoing(
        &self,
        runner: &Runner,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        deployment_id: &str,
        body: EdgeBody,
    ) -> Result<Request<EdgeBody>, EdgeError> {
        let uri =
            runner.uri(path).map_err(|_| EdgeError::new(ErrorCode::BadRequest, "the request target is invalid"))?;
        let token = sign_relay_token(&self.key.kid, &self.key.secret, deployment_id, now_unix_s(), RELAY_TOKEN_TTL_S);
        let mut request = Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers.clone();
        let token = HeaderValue::from_str(&token)
            .map_err(|_| EdgeError::new(ErrorCode::Internal, "the relay token is not a header value"))?;
        request.headers_mut().insert(HeaderName::from_static(SUBHOST_HEADER), token);
        Ok(request)
    }
}

/// Serves `edge` on `listener` within `bounds` (the ingress's bounded
/// listener: head timeout, connection caps, HTTP/1.1 and h2c) until the
/// task is dropped. With `tls`, over TLS (the ingress's bounded TLS
/// listener: certificates by SNI, ALPN h2 and http/1.1, the handshake
/// within its timeout), and the runners hear `x-forwarded-proto: https`.
pub async fn serve_public(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    bounds: isocloud_ingress::ListenerBounds,
    metrics: isocloud_ingress::ListenerMetrics,
    edge: Arc<Edge>,
) {
    let secure = tls.is_some();
    let service = hyper::service::service_fn(move |request: Request<isocloud_ingress::BoundedBody>| {
        let edge = Arc::clone(&edge);
        async move { Ok::<_, std::convert::Infallible>(edge.handle(request, secure).await) }
    });
    match tls {
        None => isocloud_ingress::serve_bounded(listener, bounds, metrics, service).await,
        Some(tls) => isocloud_ingress::serve_bounded_tls(listener, tls, bounds, metrics, service).await,
    }
}

/// 308 to `location` (the runner's answer for the same rule).
fn redirect(location: &str) -> Response<EdgeBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// The HTTP-01 answer: the key authorization as `text/plain`, never cached
/// (as the runner's public listener answers it).
fn challenge_answer(key_authorization: String) -> Response<EdgeBody> {
    let mut response = Response::new(full(Bytes::from(key_authorization)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The client's headers as a runner gets them: hop-by-hop ones and any
/// `x-deno-subhost` of the client's own dropped, `Host` left to the
/// connection (`:authority` on h2c), and the host the client asked for in
/// `x-forwarded-host` (the runner takes it from a verified relay as the
/// isolate's `request.url` host), with `x-forwarded-proto`, and the client's
/// address in `x-forwarded-for` (replacing whatever the client wrote there:
/// the runner believes a relay's, and the edge is one). `x-forwarded-proto`
/// is the edge's listener's (`https` over TLS), never the client's.
fn forwarded_headers(
    mut headers: HeaderMap,
    authority: &str,
    client: Option<IpAddr>,
    upgrade: bool,
    secure: bool,
) -> Result<HeaderMap, EdgeError> {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove(header::HOST);
    headers.remove(SUBHOST_HEADER);
    let host = HeaderValue::from_str(authority)
        .map_err(|_| EdgeError::new(ErrorCode::BadRequest, "the Host header does not name a host"))?;
    headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    let proto = HeaderValue::from_static(if secure { "https" } else { "http" });
    headers.insert(HeaderName::from_static("x-forwarded-proto"), proto);
    headers.remove("x-forwarded-for");
    if let Some(client) = client {
        let value = HeaderValue::from_str(&client.to_string()).expect("an address is a valid header value");
        headers.insert(HeaderName::from_static("x-forwarded-for"), value);
    }
    Ok(headers)
}

/// The runner's answer as the client gets it; a WebSocket handshake's 101
/// joins the two upgraded connections.
fn answer(
    mut response: Response<hyper::body::Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<EdgeBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let runner_upgrade = hyper::upgrade::on(&mut response);
            // Bounded by the runner's stream limits: it closes its side.
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, runner_upgrade) {
                    Ok((client, runner)) => {
                        let _ =
                            tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(runner)).await;
                    }
                    Err(e) => tracing::debug!(target: "isocloud::edge", error = %e, "upgrade failed"),
                }
            });
        }
    } else {
        for name in HOP_BY_HOP {
            response.headers_mut().remove(name);
        }
        response.headers_mut().remove(header::CONNECTION);
    }
    response.map(|body| body.map_err(Into::into).boxed_unsync())
}

/// The runner is draining: it took nothing, another runner may.
fn is_shutting_down<B>(response: &Response<B>) -> bool {
    response.status() == StatusCode::SERVICE_UNAVAILABLE
        && response.headers().get(ERROR_HEADER).is_some_and(|v| v == ErrorCode::ShuttingDown.as_str())
}

fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == http::Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
fn hostname(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_once(']').map_or(authority, |(h, _)| &authority[..=h.len()]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn empty() -> EdgeBody {
    http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

fn full(bytes: Bytes) -> EdgeBody {
    http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// One request counted in flight until its answer's body is dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, holding its request's place in the count.
struct Tracked {
    inner: EdgeBody,
    _guard: InFlight,
    /// Exported when the answer's body is done (or dropped).
    _span: Option<RequestSpan>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
