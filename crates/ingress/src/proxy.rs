//! A request's way through the runner: route, isolate, forward, stream back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use isocloud_egress::{EgressProxy, HOPS_HEADER};
use isocloud_pool::{BootError, ForwardError, RequestBody};
use isocloud_protocol::ErrorCode;

use crate::Routed;
use crate::body::{BoxError, Counted, ResponseBody, Tracked, full};
use crate::error::ERROR_HEADER;
use crate::isolates::Isolates;
use crate::routing::SUBHOST_HEADER;
use crate::streams::{Active, Activity, StreamKind, StreamLimits, Streams};
use crate::trace::Traced;
use crate::{EdgeError, EdgeMetrics, Router};

pub const REQUEST_ID_HEADER: &str = "x-isocloud-request-id";
/// The client's address, for the isolate.
pub const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";

/// What the listener knows of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// It came over TLS.
    pub secure: bool,
}

/// Connection-scoped headers (RFC 9110 §7.6.1); they describe one hop and
/// must not be passed on. `connection`/`upgrade` stay on upgrade requests.
/// Names built once: a `&str` name is parsed and hashed on every lookup.
const HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHORIZATION,
];
const SUBHOST: HeaderName = HeaderName::from_static(SUBHOST_HEADER);
const HOPS: HeaderName = HeaderName::from_static(HOPS_HEADER);
const ERROR: HeaderName = HeaderName::from_static(ERROR_HEADER);
const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const FORWARDED_FOR: HeaderName = HeaderName::from_static(FORWARDED_FOR_HEADER);

/// Bounds the edge puts on every request.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    pub request_timeout: std::time::Duration,
    pub max_request_body_bytes: usize,
    /// A request that has passed through this many isolates of the cloud
    /// already (`x-isocloud-hops`, or the egress proxy's own connection
    /// table) is a loop: 508 `LOOP_DETECTED`.
    pub max_hops: u32,
    /// Upgraded connections and response bodies: idle and total lifetime.
    pub streams: StreamLimits,
}

pub struct Proxy {
    router: Router,
    /// From forwarding to the response's headers; a body may stream longer.
    request_timeout: std::time::Duration,
    max_request_body_bytes: usize,
    max_hops: u32,
    /// The runner's egress proxy: connections it opened into this listener
    /// are isolates calling back into the cloud.
    egress: Option<EgressProxy>,
    /// The pool ([`isocloud_pool::Pool`] in the runner).
    isolates: Arc<dyn Isolates>,
    metrics: EdgeMetrics,
    streams: Streams,
    request_id_prefix: String,
    request_seq: AtomicU64,
    /// `--otlp-endpoint`: a span per request; `None` costs one branch.
    telemetry: Option<isocloud_telemetry::Telemetry>,
    /// HTTP-01 answers for the control plane's ACME orders.
    acme: Option<Arc<dyn crate::AcmeChallenges>>,
}

impl Proxy {
    /// Call on a tokio runtime (the stream bounds' sweeper starts here).
    pub fn new(router: Router, isolates: impl Isolates, metrics: EdgeMetrics, limits: EdgeLimits) -> Self {
        let request_id_prefix = format!("{:08x}", rand::random::<u32>());
        let streams = Streams::new(limits.streams, metrics.clone());
        Self {
            router,
            request_timeout: limits.request_timeout,
            max_request_body_bytes: limits.max_request_body_bytes,
            max_hops: limits.max_hops,
            egress: None,
            isolates: Arc::new(isolates),
            metrics,
            streams,
            request_id_prefix,
            request_seq: AtomicU64::new(0),
            telemetry: None,
            acme: None,
        }
    }

    /// Answers `GET /.well-known/acme-challenge/<token>` for the tokens
    /// `challenges` has pending for the request's Host (see `acme.rs`).
    pub fn with_acme(mut self, challenges: Arc<dyn crate::AcmeChallenges>) -> Self {
        self.acme = Some(challenges);
        self
    }

    /// Exports a span per request (and passes its `traceparent` in).
    pub fn with_telemetry(mut self, telemetry: isocloud_telemetry::Telemetry) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// Tells calls that come back through `egress` by their connection.
    pub fn with_egress(mut self, egress: EgressProxy) -> Self {
        self.egress = Some(egress);
        self
    }

    pub fn isolates(&self) -> &dyn Isolates {
        &*self.isolates
    }

    /// Serves one request; never fails: every error becomes a response.
    /// `B`: hyper's `Incoming` from a listener; any body in tests.
    pub async fn handle<B>(&self, request: Request<B>, connection: ConnectionInfo) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let started = std::time::Instant::now();
        let mut traced = self.telemetry.as_ref().map(|telemetry| {
            let parent = request.headers().get(isocloud_telemetry::TRACEPARENT_HEADER);
            Traced::new(telemetry.request_span(request.method(), parent))
        });
        match self.forward(request, connection, &mut traced, started).await {
            Ok(response) => {
                self.metrics.count(response.status().as_u16(), None);
                self.metrics.observe_head(response.status().as_u16(), started.elapsed());
                if let Some(traced) = &mut traced {
                    traced.span.status(response.status().as_u16(), None);
                }
                response
            }
            Err(error) => {
                self.metrics.count(error.code.http_status(), Some(error.code.as_str()));
                self.metrics.observe_head(error.code.http_status(), started.elapsed());
                if let Some(traced) = &mut traced {
                    traced.span.status(error.code.http_status(), Some(error.code.as_str()));
                }
                let refused_body = error.code == ErrorCode::PayloadTooLarge;
                let mut response = error.into_response();
                if refused_body {
                    // The body was never read: this connection cannot carry
                    // another request, and the client must know it.
                    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        }
    }

    /// How many isolates of this cloud the request has passed through: what
    /// the egress proxy knows of its own connection, or the header it put on
    /// a call that came back by another way (a relay). A client can only
    /// make its own request look deeper, never a loop shallower.
    fn hops_of<B>(&self, request: &Request<B>, peer: SocketAddr) -> u32 {
        let declared = request
            .headers()
            .get(HOPS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let linked = self.egress.as_ref().and_then(|egress| egress.hops_of_peer(peer)).unwrap_or(0);
        declared.max(linked)
    }

    /// `traced`: the request's span, taken into the response body on
    /// success (it ends with the body), else left to the caller. `started`:
    /// when the request's head arrived (its answer's latency counts from it).
    async fn forward<B>(
        &self,
        mut request: Request<B>,
        connection: ConnectionInfo,
        traced: &mut Option<Traced>,
        started: std::time::Instant,
    ) -> Result<Response<ResponseBody>, EdgeError>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let hops = self.hops_of(&request, connection.peer);
        if hops > self.max_hops {
            return Err(EdgeError::new(
                ErrorCode::LoopDetected,
                format!("this request has passed through {hops} isolates; the bound is {}", self.max_hops),
            ));
        }
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|length| length > self.max_request_body_bytes) {
            return Err(EdgeError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than {} bytes", self.max_request_body_bytes),
            ));
        }
        if let Some(acme) = &self.acme
            && !request.headers().contains_key(SUBHOST)
            && let Ok(authority) = crate::request_authority(request.version(), request.headers(), request.uri())
            && let Some((host, token)) = crate::acme::challenge_of(&request, authority.as_deref())
            && let Some(key_authorization) = acme.key_authorization(&host, &token).await
        {
            return Ok(crate::acme::answer(key_authorization));
        }
        let route = match self.router.route(&request, connection.secure)? {
            Routed::Serve(route) => route,
            Routed::RedirectToHttps(location) => {
                let mut response = Response::new(full(Bytes::new()));
                *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
                if let Ok(location) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                return Ok(response);
            }
        };
        let request_id = request_id(&self.request_id_prefix, self.request_seq.fetch_add(1, Ordering::Relaxed));

        if let Some(traced) = traced {
            let path = request.uri().path();
            traced.span.route(&route.public_host, path, &route.deployment_id, route.origin.name());
            traced.span.bind_request_id(&request_id);
        }

        let reserved = self.isolates.isolate(&route.origin, &route.deployment_id).await.map_err(boot_error)?;
        let isolate = reserved.upstream();
        if let Some(traced) = traced {
            traced.span.start_kind(reserved.booted());
            traced.measure_cpu(&isolate);
        }

        let public_uri = public_uri(&route, request.uri())?;
        let upgrade = is_upgrade(&request);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));

        let (mut parts, body) = request.into_parts();
        parts.uri = public_uri;
        // The isolate speaks HTTP/1.1 whatever the client spoke.
        parts.version = http::Version::HTTP_11;
        let headers = &mut parts.headers;
        headers.remove(SUBHOST);
        headers.remove(HOPS);
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        if !upgrade {
            headers.remove(header::CONNECTION);
            headers.remove(header::UPGRADE);
        }
        if let Ok(host) = HeaderValue::from_str(&route.public_host) {
            headers.insert(header::HOST, host);
        }
        headers
            .insert(REQUEST_ID, HeaderValue::from_str(&request_id).expect("hex and dashes are a valid header value"));
        if let Some(traced) = traced {
            // The isolate's parent is the runner's span, not the client's.
            headers.insert(HeaderName::from_static(isocloud_telemetry::TRACEPARENT_HEADER), traced.span.traceparent());
        }
        // The client's address, as the runner knows it: whatever a client
        // wrote there itself is replaced (only a verified relay speaks for
        // another). The harness gives it to the handler as `info.remoteAddr`.
        let client_ip = route.relayed_client.unwrap_or_else(|| connection.peer.ip().to_canonical());
        headers.insert(
            FORWARDED_FOR,
            HeaderValue::from_str(&client_ip.to_string()).expect("an address is a valid header value"),
        );

        // A declared length over the bound was refused up front; an
        // undeclared one is cut off where it passes it (the isolate then
        // sees a body error).
        let body_too_large = Arc::new(AtomicBool::new(false));
        let activity = Activity::new();
        let body: RequestBody =
            Counted::new(body, isolate.clone(), self.max_request_body_bytes, body_too_large.clone(), activity.clone())
                .boxed();
        let guard = reserved.begin_request(hops);
        let forwarded =
            tokio::time::timeout(self.request_timeout, isolate.clone().forward(Request::from_parts(parts, body)));
        let outcome = forwarded.await;
        // The deployment's usage: the status its request was answered with
        // (the tenant's own, or the runner's answer for this isolate: a
        // limit, a crash, a timeout; 5xx are its errors) and the time to
        // the response head, a boot included.
        let status = match &outcome {
            Ok(Ok(response)) => response.status().as_u16(),
            Ok(Err(ForwardError::Crashed(_))) if body_too_large.load(Ordering::Relaxed) => {
                ErrorCode::PayloadTooLarge.http_status()
            }
            Ok(Err(ForwardError::Crashed(_))) => ErrorCode::IsolateCrashed.http_status(),
            Ok(Err(ForwardError::Terminated(termination))) => termination.code().http_status(),
            Err(_) => ErrorCode::RequestTimeout.http_status(),
        };
        isolate.count_response(status, started.elapsed());
        let mut response = match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(ForwardError::Crashed(_))) if body_too_large.load(Ordering::Relaxed) => {
                return Err(EdgeError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the request body is larger than {} bytes", self.max_request_body_bytes),
                ));
            }
            Ok(Err(ForwardError::Crashed(reason))) => {
                tracing::warn!(
                    deployment_id = route.deployment_id,
                    request_id,
                    reason,
                    "isolate crashed with the request in flight"
                );
                return Err(EdgeError::new(ErrorCode::IsolateCrashed, "the isolate crashed while serving the request"));
            }
            Ok(Err(ForwardError::Terminated(termination))) => {
                return Err(EdgeError::new(termination.code(), format!("the isolate was terminated: {termination}")));
            }
            Err(_) => {
                return Err(EdgeError::new(
                    ErrorCode::RequestTimeout,
                    format!("the deployment did not answer within {} s", self.request_timeout.as_secs()),
                ));
            }
        };
        // The header tells a relay the runner failed; a tenant must not be
        // able to pass its own answer off as one of the runner's errors.
        response.headers_mut().remove(ERROR);

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let isolate_upgrade = hyper::upgrade::on(&mut response);
                let watch =
                    self.streams.watch(StreamKind::Upgrade, guard, activity.clone(), &route.deployment_id, &request_id);
                tokio::spawn(async move {
                    let relay = async {
                        match tokio::try_join!(client_upgrade, isolate_upgrade) {
                            Ok((client, isolate)) => {
                                let mut client = Active::new(TokioIo::new(client), activity.clone());
                                let mut isolate = Active::new(TokioIo::new(isolate), activity);
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut isolate).await;
                            }
                            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                        }
                    };
                    // A cut drops both connections here, which closes them.
                    tokio::select! {
                        () = relay => watch.finish(),
                        _ = watch.cut_signal() => {}
                    }
                });
            }
            return Ok(response);
        }

        for name in &HOP_BY_HOP {
            response.headers_mut().remove(name);
        }
        let watch = self.streams.watch(StreamKind::Body, guard, activity, &route.deployment_id, &request_id);
        let span = traced.take().map(|mut traced| {
            traced.span.status(response.status().as_u16(), None);
            traced
        });
        Ok(response.map(|body| Tracked::new(body, isolate, watch).with_span(span).boxed()))
    }
}

/// `<prefix>-<seq in hex>`, without the formatting machinery (once per request).
fn request_id(prefix: &str, seq: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (64 - seq.leading_zeros()).div_ceil(4).max(1) as usize;
    let mut id = String::with_capacity(prefix.len() + 1 + digits);
    id.push_str(prefix);
    id.push('-');
    for shift in (0..digits).rev() {
        id.push(HEX[((seq >> (shift * 4)) & 0xf) as usize] as char);
    }
    id
}

/// The URL the isolate sees: the public scheme and host, the request's own
/// path and query (already parsed, so only the host is checked here).
fn public_uri(route: &crate::routing::Route, target: &Uri) -> Result<Uri, EdgeError> {
    let invalid = || EdgeError::new(ErrorCode::BadRequest, "the request target is not a valid URL");
    let mut parts = http::uri::Parts::default();
    parts.scheme =
        Some(if route.public_scheme == "https" { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP });
    parts.authority = Some(route.public_host.parse::<http::uri::Authority>().map_err(|_| invalid())?);
    parts.path_and_query = match target.path_and_query() {
        None => Some(http::uri::PathAndQuery::from_static("/")),
        // `OPTIONS *` and the like: the isolate only takes origin-form.
        Some(path) if !path.as_str().starts_with('/') => return Err(invalid()),
        Some(path) => Some(path.clone()),
    };
    Uri::from_parts(parts).map_err(|_| invalid())
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

fn boot_error(error: BootError) -> EdgeError {
    let code = error.code();
    let message = match (&error, code) {
        // Runner-side failures: the details are for the operator's log only.
        (_, ErrorCode::Internal) => "the runner could not start the deployment".to_owned(),
        // How the connection failed (refused, a DNS name, a TLS error) says
        // where the origin lives: the pool's log has it, visitors need not.
        (BootError::Origin(origin), _) if matches!(**origin, isocloud_origin::OriginError::Unreachable(_)) => {
            "origin unreachable: the deployment's origin could not be reached; try again shortly".to_owned()
        }
        _ => error.to_string(),
    };
    EdgeError::new(code, message)
}

#[cfg(test)]
mod tests;
