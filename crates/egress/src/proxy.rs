//! The proxy listener: `CONNECT` tunnels (HTTPS, and anything else deno
//! tunnels) and absolute-form plain-HTTP requests, HTTP/1.1 on loopback.
//!
//! Bounded: the shared listener holds at most
//! [`EgressOptions::max_shared_connections`] client connections, a listener
//! inside an isolate's network namespace and each grant's outbound
//! connections at most [`EgressOptions::max_connections_per_isolate`]; a
//! client connection must send each request head within
//! [`EgressOptions::header_timeout`] (idle keep-alive ones close then too).
//! Each bound holds a slot for as long as the descriptor it guards lives
//! ([`Held`]), tunnels included.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use isocloud_protocol::{ErrorCode, NetPermission};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::HOPS_HEADER;
use crate::address::{Cidr, Destinations, parse_ipv4_loosely};
use crate::body::{Counted, ProxyBody, full};
use crate::grant::{EgressGrant, GrantState, allows, split_host_port};
use crate::links::Links;

/// Outbound connections and tunnels one isolate may hold at once, and
/// client connections its network namespace's listener serves at once.
pub const MAX_CONNECTIONS_PER_ISOLATE: usize = 256;
/// Client connections the shared listener (the one isolates without a
/// network namespace reach) serves at once, all isolates together.
pub const MAX_SHARED_CONNECTIONS: usize = 4096;
/// A client connection must send each request head within this time; an
/// idle keep-alive connection is closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct EgressOptions {
    /// Calls may pass through isolates this many times; one more is a loop.
    pub max_hops: u32,
    pub connect_timeout: Duration,
    /// Internal ranges the operator opened (`--egress-allow-private`).
    pub allow_private: Vec<Cidr>,
    pub max_connections_per_isolate: usize,
    pub max_shared_connections: usize,
    pub header_timeout: Duration,
}

impl EgressOptions {
    /// The documented bounds, no internal range open.
    pub fn new(max_hops: u32) -> Self {
        Self {
            max_hops,
            connect_timeout: Duration::from_secs(10),
            allow_private: Vec::new(),
            max_connections_per_isolate: MAX_CONNECTIONS_PER_ISOLATE,
            max_shared_connections: MAX_SHARED_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// Calls the proxy refused for a bound or an internal address, since it
/// started (for the runner's metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EgressRefusals {
    /// Destinations in an internal range, or the runner's own private listeners.
    pub internal_address: u64,
    /// Past [`EgressOptions::max_connections_per_isolate`] (client
    /// connections inside a namespace, or outbound connections of a grant).
    pub isolate_connections: u64,
    /// Past [`EgressOptions::max_shared_connections`].
    pub shared_connections: u64,
}

/// Headers that describe the hop between the isolate and the proxy.
const HOP_BY_HOP: [&str; 7] =
    ["proxy-authorization", "proxy-connection", "connection", "keep-alive", "te", "trailer", "upgrade"];

pub(crate) struct Shared {
    addr: SocketAddr,
    pub(crate) options: EgressOptions,
    grants: Mutex<HashMap<String, Weak<GrantState>>>,
    links: Arc<Links>,
    destinations: Destinations,
    /// Client connections the proxy holds now, for metrics and tests.
    open_connections: AtomicU64,
    refused_internal: AtomicU64,
    refused_isolate: AtomicU64,
    refused_shared: AtomicU64,
}

impl Shared {
    pub(crate) fn revoke(&self, token: &str) {
        self.grants.lock().expect("grants poisoned").remove(token);
    }

    fn grant_for(&self, request: &Request<Incoming>) -> Option<Arc<GrantState>> {
        let value = request.headers().get(header::PROXY_AUTHORIZATION)?.to_str().ok()?;
        let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
        let credentials = std::str::from_utf8(&decoded).ok()?;
        let (_, token) = credentials.split_once(':')?;
        self.grants.lock().expect("grants poisoned").get(token)?.upgrade()
    }
}

/// The egress proxy of one runner. Cheap to clone.
#[derive(Clone)]
pub struct EgressProxy {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy").field("addr", &self.shared.addr).finish_non_exhaustive()
    }
}

impl EgressProxy {
    /// Binds `addr` (loopback, port 0 in practice) and serves until the
    /// runtime ends.
    pub async fn start(addr: SocketAddr, options: EgressOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let slots = Arc::new(Semaphore::new(options.max_shared_connections));
        let shared = Arc::new(Shared {
            addr: listener.local_addr()?,
            destinations: Destinations::new(options.allow_private.clone()),
            options,
            grants: Mutex::new(HashMap::new()),
            links: Arc::new(Links::default()),
            open_connections: AtomicU64::new(0),
            refused_internal: AtomicU64::new(0),
            refused_isolate: AtomicU64::new(0),
            refused_shared: AtomicU64::new(0),
        });
        // Calls through the proxy back to the proxy: never.
        shared.destinations.add_private(shared.addr, "egress proxy");
        tokio::spawn(accept_loop(listener, Arc::downgrade(&shared), slots, Bound::Shared));
        Ok(Self { shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn max_hops(&self) -> u32 {
        self.shared.options.max_hops
    }

    /// A public listener of this runner (`--listen`, `--tls-listen`):
    /// isolates may call it, as they would from outside, with hop counting;
    /// on 0.0.0.0 or :: it is reached at any loopback or local address.
    pub fn add_public_listener(&self, addr: SocketAddr, name: &'static str) {
        self.shared.destinations.add_public(addr, name);
    }

    /// A listener of this runner isolates never reach (the admin listener,
    /// the control plane's), whatever `--egress-allow-private` opens.
    pub fn add_private_listener(&self, addr: SocketAddr, name: &'static str) {
        self.shared.destinations.add_private(addr, name);
    }

    /// Credentials for one isolate of `deployment`, allowed `net`.
    pub fn grant(&self, deployment: &str, net: NetPermission) -> EgressGrant {
        let token = format!("{:032x}", rand::random::<u128>());
        let grant = EgressGrant::new(
            token.clone(),
            deployment.to_owned(),
            net,
            Arc::downgrade(&self.shared),
            self.shared.addr,
            self.shared.options.max_connections_per_isolate,
        );
        self.shared.grants.lock().expect("grants poisoned").insert(token, Arc::downgrade(&grant.state));
        grant
    }

    /// The hop count of a connection the proxy itself opened, when `peer`
    /// (the address a connection to the ingress came from) is one of them.
    pub fn hops_of_peer(&self, peer: SocketAddr) -> Option<u32> {
        self.shared.links.hops_of(peer)
    }

    /// Client connections held now (all listeners, tunnels included).
    pub fn open_connections(&self) -> u64 {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    pub fn refusals(&self) -> EgressRefusals {
        EgressRefusals {
            internal_address: self.shared.refused_internal.load(Ordering::Relaxed),
            isolate_connections: self.shared.refused_isolate.load(Ordering::Relaxed),
            shared_connections: self.shared.refused_shared.load(Ordering::Relaxed),
        }
    }
}

/// Which bound a listener's connections count against.
pub(crate) enum Bound {
    /// The proxy's own listener, shared by every isolate without a network
    /// namespace.
    Shared,
    /// A listener inside one isolate's network namespace.
    Isolate(Weak<GrantState>),
}

/// A descriptor and the slot it takes: the slot is free again when the
/// descriptor closes, wherever it went (a tunnel keeps the client connection
/// after its HTTP exchange ended).
pub(crate) struct Held<S> {
    io: S,
    _slot: Slot,
}

struct Slot {
    _permit: OwnedSemaphorePermit,
    /// Counted in [`Shared::open_connections`] (client connections only).
    open: Option<Arc<Shared>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(shared) = &self.open {
            shared.open_connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves the proxy on `listener` (its own, or one inside an isolate's
/// network namespace) until the proxy is gone or the task is aborted, at
/// most `slots` connections at once; past that a connection is answered
/// with a refusal and closed at once, so it holds no descriptor.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Weak<Shared>, slots: Arc<Semaphore>, bound: Bound) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "egress proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(shared) = shared.upgrade() else { return };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse_connection(&shared, &bound, stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        shared.open_connections.fetch_add(1, Ordering::Relaxed);
        let stream = Held { io: stream, _slot: Slot { _permit: permit, open: Some(shared.clone()) } };
        tokio::spawn(async move {
            let service = {
                let shared = shared.clone();
                service_fn(move |request| {
                    let shared = shared.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&shared, request).await) }
                })
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(shared.options.header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "egress proxy: connection ended with an error");
            }
        });
    }
}

/// Answers a connection past its listener's bound with a short HTTP
/// refusal (if the socket takes it without waiting) and closes it.
fn refuse_connection(shared: &Shared, bound: &Bound, stream: TcpStream) {
    let (code, message) = match bound {
        Bound::Shared => {
            shared.refused_shared.fetch_add(1, Ordering::Relaxed);
            (
                ErrorCode::Capacity,
                format!("the egress proxy holds {} connections", shared.options.max_shared_connections),
            )
        }
        Bound::Isolate(grant) => {
            shared.refused_isolate.fetch_add(1, Ordering::Relaxed);
            if let Some(grant) = grant.upgrade() {
                grant.over_limit.fetch_add(1, Ordering::Relaxed);
            }
            (
                ErrorCode::EgressConnectionLimit,
                format!(
                    "this isolate holds {} connections to the egress proxy",
                    shared.options.max_connections_per_isolate
                ),
            )
        }
    };
    let _ = stream.try_write(&closing_http1(code.response(&message)));
}

/// `response` as HTTP/1.1 bytes for a socket hyper does not serve, with
/// `connection: close` and its length.
fn closing_http1(response: Response<Bytes>) -> Vec<u8> {
    let status = response.status();
    let mut out = format!("HTTP/1.1 {} {}\r\n", status.as_str(), status.canonical_reason().unwrap_or("")).into_bytes();
    for (name, value) in response.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("connection: close\r\ncontent-length: {}\r\n\r\n", response.body().len()).as_bytes());
    out.extend_from_slice(response.body());
    out
}

/// The proxy's own answer for `code`, rendered as the ingress renders its own.
fn refuse(code: ErrorCode, message: String) -> Response<ProxyBody> {
    code.response(&message).map(full)
}

/// The target of a proxied call: `CONNECT host:port` or `GET http://host:port/…`.
fn target_of(request: &Request<Incoming>) -> Result<(String, u16), String> {
    let uri = request.uri();
    if request.method() == Method::CONNECT {
        let authority = uri.authority().ok_or("CONNECT needs host:port")?;
        let port = authority.port_u16().ok_or("CONNECT needs host:port")?;
        return Ok((split_host_port(authority.host()).0.to_owned(), port));
    }
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(format!("{other}: URLs go through CONNECT")),
        None => return Err("the proxy takes absolute-form requests (http://host/path)".into()),
    }
    let authority = uri.authority().ok_or("the request target names no host")?;
    Ok((split_host_port(authority.host()).0.to_owned(), authority.port_u16().unwrap_or(80)))
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<ProxyBody> {
    let Some(grant) = shared.grant_for(&request) else {
        return refuse(ErrorCode::EgressAuthRequired, "the egress proxy serves live isolates only".into());
    };
    let (host, port) = match target_of(&request) {
        Ok(target) => target,
        Err(message) => return refuse(ErrorCode::BadRequest, message),
    };
    // The harness's probe at start-up: it makes deno build its HTTP client
    // with the proxy settings before the environment is scrubbed.
    if request.method() == Method::GET
        && port == shared.addr.port()
        && host.parse::<IpAddr>().is_ok_and(|ip| ip == shared.addr.ip())
    {
        return Response::builder().status(StatusCode::NO_CONTENT).body(full(Bytes::new())).expect("static response");
    }
    if !allows(&grant.net, &host, port) {
        grant.denied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(deployment_id = grant.deployment(), host, port, "egress proxy: host outside permissions.net");
        return refuse(ErrorCode::EgressDenied, format!("{host}:{port} is not in this deployment's permissions.net"));
    }
    let hops = grant.outbound_hops();
    if hops > shared.options.max_hops {
        grant.loops.fetch_add(1, Ordering::Relaxed);
        tracing::info!(deployment_id = grant.deployment(), hops, "egress proxy: loop refused");
        return refuse(
            ErrorCode::LoopDetected,
            format!("this call would be hop {hops}; the bound is {}", shared.options.max_hops),
        );
    }
    let Ok(permit) = grant.upstream_slots.clone().try_acquire_owned() else {
        grant.over_limit.fetch_add(1, Ordering::Relaxed);
        shared.refused_isolate.fetch_add(1, Ordering::Relaxed);
        tracing::info!(deployment_id = grant.deployment(), "egress proxy: outbound connections at the bound");
        return refuse(
            ErrorCode::EgressConnectionLimit,
            format!(
                "this isolate holds {} outbound connections, the bound; close some first",
                shared.options.max_connections_per_isolate
            ),
        );
    };
    let upstream = match connect(shared, &host, port).await {
        Ok(stream) => stream,
        Err(Unreachable::Internal(why)) => {
            grant.internal_denied.fetch_add(1, Ordering::Relaxed);
            shared.refused_internal.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                deployment_id = grant.deployment(),
                host,
                port,
                why,
                "egress proxy: internal address refused"
            );
            // `why` names the address connected to; the name too if it was one.
            let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            let message = if why.starts_with(&target) { why } else { format!("{target}: {why}") };
            return refuse(ErrorCode::EgressDenied, message);
        }
        Err(Unreachable::Failed(message)) => {
            return refuse(ErrorCode::UpstreamUnreachable, format!("{host}:{port}: {message}"));
        }
    };
    let link = upstream.local_addr().ok().map(|local| shared.links.register(local, hops));
    let upstream = Held { io: upstream, _slot: Slot { _permit: permit, open: None } };
    grant.requests.fetch_add(1, Ordering::Relaxed);
    if request.method() == Method::CONNECT {
        tunnel(grant, request, upstream, link)
    } else {
        forward(grant, request, upstream, link, hops).await
    }
}

enum Unreachable {
    /// Every address the host stands for is internal: the reason for the first.
    Internal(String),
    Failed(String),
}

/// The addresses `host` stands for: an IP address in any spelling, the
/// loopback addresses for `localhost` and `*.localhost` (RFC 6761, whatever
/// the resolver says), else what the system resolver answers.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Ok(vec![(Ipv4Addr::LOCALHOST, port).into(), (Ipv6Addr::LOCALHOST, port).into()]);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![(ip, port).into()]);
    }
    if let Some(ip) = parse_ipv4_loosely(host) {
        return Ok(vec![(ip, port).into()]);
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => Ok(addrs.collect()),
        Err(e) => Err(format!("cannot resolve: {e}")),
    }
}

/// Resolves `host`, checks every address, and connects to the first
/// allowed one that answers: exactly the address checked, never a second
/// lookup.
async fn connect(shared: &Shared, host: &str, port: u16) -> Result<TcpStream, Unreachable> {
    let timeout = shared.options.connect_timeout;
    let connecting = async {
        let addrs = resolve(host, port).await.map_err(Unreachable::Failed)?;
        let mut first_refusal = None;
        let mut last_error = None;
        for addr in addrs {
            let addr = match shared.destinations.check(addr) {
                Ok(addr) => addr,
                Err(why) => {
                    first_refusal.get_or_insert(why);
                    continue;
                }
            };
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = Some(format!("cannot connect to {addr}: {e}")),
            }
        }
        Err(match (last_error, first_refusal) {
            (Some(error), _) => Unreachable::Failed(error),
            (None, Some(why)) => Unreachable::Internal(why),
            (None, None) => Unreachable::Failed("the name has no addresses".into()),
        })
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(unreachable)) => Err(unreachable),
        Err(_) => Err(Unreachable::Failed(format!("no connection within {} s", timeout.as_secs()))),
    }
}

fn tunnel(
    grant: Arc<GrantState>,
    mut request: Request<Incoming>,
    mut upstream: Held<TcpStream>,
    link: Option<crate::links::LinkGuard>,
) -> Response<ProxyBody> {
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _link = link;
        let Ok(upgraded) = upgrade.await else { return };
        let mut client = TokioIo::new(upgraded);
        let copied = tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => copied.ok(),
            () = grant.revoked.cancelled() => None,
        };
        if let Some((sent, received)) = copied {
            grant.bytes_sent.fetch_add(sent, Ordering::Relaxed);
            grant.bytes_received.fetch_add(received, Ordering::Relaxed);
        }
    });
    Response::new(full(Bytes::new()))
}

async fn forward(
    grant: Arc<GrantState>,
    request: Request<Incoming>,
    upstream: Held<TcpStream>,
    link: Option<crate::links::LinkGuard>,
    hops: u32,
) -> Response<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    parts.headers.insert(HOPS_HEADER, HeaderValue::from(hops));
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, authority);
    }
    // Origin-form on the wire: the upstream is a server, not a proxy.
    parts.uri = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").parse().unwrap_or_default();
    parts.version = http::Version::HTTP_11;
    let body = Counted::new(body, grant.clone(), |g| &g.bytes_sent, None);
    let request = Request::from_parts(parts, body);

    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(handshake) => handshake,
        // Nothing was written yet: as good as never connected.
        Err(e) => return refuse(ErrorCode::UpstreamUnreachable, format!("upstream: {e}")),
    };
    let revoked = grant.revoked.clone();
    let driver = tokio::spawn(async move {
        tokio::select! {
            _ = connection => {}
            () = revoked.cancelled() => {}
        }
    });
    match sender.try_send_request(request).await {
        Ok(response) => {
            let keep: Box<dyn std::any::Any + Send + Sync> = Box::new((link, AbortOnDrop(driver)));
            response
                .map(|body| Counted::new(body, grant, |g| &g.bytes_received, Some(keep)).map_err(Into::into).boxed())
        }
        Err(mut e) => {
            // hyper hands the request back only if none of it was written;
            // otherwise the upstream may have acted on it: not retryable.
            let code =
                if e.take_message().is_some() { ErrorCode::UpstreamUnreachable } else { ErrorCode::UpstreamFailed };
            refuse(code, format!("upstream: {}", e.into_error()))
        }
    }
}

/// Ends the upstream connection's driver when the response body is done.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
