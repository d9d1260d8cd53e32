//! The proxy listener: `CONNECT` tunnels (HTTPS, and anything else deno
//! tunnels) and absolute-form plain-HTTP requests, HTTP/1.1 on loopback.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use isocloud_protocol::{ErrorCode, NetPermission};
use tokio::net::{TcpListener, TcpStream};

use crate::HOPS_HEADER;
use crate::body::{Counted, ProxyBody, full};
use crate::grant::{EgressGrant, GrantState, allows, split_host_port};
use crate::links::Links;

#[derive(Debug, Clone, Copy)]
pub struct EgressOptions {
    /// Calls may pass through isolates this many times; one more is a loop.
    pub max_hops: u32,
    pub connect_timeout: Duration,
}

/// Headers that describe the hop between the isolate and the proxy.
const HOP_BY_HOP: [&str; 7] =
    ["proxy-authorization", "proxy-connection", "connection", "keep-alive", "te", "trailer", "upgrade"];

pub(crate) struct Shared {
    addr: SocketAddr,
    options: EgressOptions,
    grants: Mutex<HashMap<String, Weak<GrantState>>>,
    links: Arc<Links>,
    /// Connections the proxy serves now, for metrics and tests.
    open_connections: AtomicU64,
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
        let shared = Arc::new(Shared {
            addr: listener.local_addr()?,
            options,
            grants: Mutex::new(HashMap::new()),
            links: Arc::new(Links::default()),
            open_connections: AtomicU64::new(0),
        });
        tokio::spawn(accept_loop(listener, Arc::downgrade(&shared)));
        Ok(Self { shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn max_hops(&self) -> u32 {
        self.shared.options.max_hops
    }

    /// Credentials for one isolate of `deployment`, allowed `net`.
    pub fn grant(&self, deployment: &str, net: NetPermission) -> EgressGrant {
        let token = format!("{:032x}", rand::random::<u128>());
        let grant =
            EgressGrant::new(token.clone(), deployment.to_owned(), net, Arc::downgrade(&self.shared), self.shared.addr);
        self.shared.grants.lock().expect("grants poisoned").insert(token, Arc::downgrade(&grant.state));
        grant
    }

    /// The hop count of a connection the proxy itself opened, when `peer`
    /// (the address a connection to the ingress came from) is one of them.
    pub fn hops_of_peer(&self, peer: SocketAddr) -> Option<u32> {
        self.shared.links.hops_of(peer)
    }

    pub fn open_connections(&self) -> u64 {
        self.shared.open_connections.load(Ordering::Relaxed)
    }
}

/// Serves the proxy on `listener` (its own, or one inside an isolate's
/// network namespace) until the proxy is gone or the task is aborted.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Weak<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "egress proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(shared) = shared.upgrade() else { return };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            shared.open_connections.fetch_add(1, Ordering::Relaxed);
            let service = {
                let shared = shared.clone();
                service_fn(move |request| {
                    let shared = shared.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&shared, request).await) }
                })
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "egress proxy: connection ended with an error");
            }
            shared.open_connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn refuse(status: StatusCode, code: ErrorCode, message: String) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": { "code": code.as_str(), "message": message } });
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("x-isocloud-error", HeaderValue::from_static(code.as_str()));
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        headers.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"isocloud egress\""));
    }
    response
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
        return refuse(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ErrorCode::EgressDenied,
            "the egress proxy serves live isolates only".into(),
        );
    };
    let (host, port) = match target_of(&request) {
        Ok(target) => target,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, ErrorCode::EgressDenied, message),
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
        return refuse(
            StatusCode::FORBIDDEN,
            ErrorCode::EgressDenied,
            format!("{host}:{port} is not in this deployment's permissions.net"),
        );
    }
    let hops = grant.outbound_hops();
    if hops > shared.options.max_hops {
        grant.loops.fetch_add(1, Ordering::Relaxed);
        tracing::info!(deployment_id = grant.deployment(), hops, "egress proxy: loop refused");
        return refuse(
            StatusCode::LOOP_DETECTED,
            ErrorCode::LoopDetected,
            format!("this call would be hop {hops}; the bound is {}", shared.options.max_hops),
        );
    }
    let upstream = match connect(&host, port, shared.options.connect_timeout).await {
        Ok(stream) => stream,
        Err(message) => {
            return refuse(StatusCode::BAD_GATEWAY, ErrorCode::EgressDenied, format!("{host}:{port}: {message}"));
        }
    };
    let link = upstream.local_addr().ok().map(|local| shared.links.register(local, hops));
    grant.requests.fetch_add(1, Ordering::Relaxed);
    if request.method() == Method::CONNECT {
        tunnel(grant, request, upstream, link)
    } else {
        forward(grant, request, upstream, link, hops).await
    }
}

/// `*.localhost` is loopback (RFC 6761) whatever the resolver says.
async fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let connecting = async {
        if host == "localhost" || host.ends_with(".localhost") {
            TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            TcpStream::connect(SocketAddr::from((ip, port))).await
        } else {
            TcpStream::connect((host, port)).await
        }
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(format!("cannot connect: {e}")),
        Err(_) => Err(format!("no connection within {} s", timeout.as_secs())),
    }
}

fn tunnel(
    grant: Arc<GrantState>,
    mut request: Request<Incoming>,
    mut upstream: TcpStream,
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
    upstream: TcpStream,
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
        Err(e) => return refuse(StatusCode::BAD_GATEWAY, ErrorCode::EgressDenied, format!("upstream: {e}")),
    };
    let revoked = grant.revoked.clone();
    let driver = tokio::spawn(async move {
        tokio::select! {
            _ = connection => {}
            () = revoked.cancelled() => {}
        }
    });
    match sender.send_request(request).await {
        Ok(response) => {
            let keep: Box<dyn std::any::Any + Send + Sync> = Box::new((link, AbortOnDrop(driver)));
            response
                .map(|body| Counted::new(body, grant, |g| &g.bytes_received, Some(keep)).map_err(Into::into).boxed())
        }
        Err(e) => refuse(StatusCode::BAD_GATEWAY, ErrorCode::EgressDenied, format!("upstream: {e}")),
    }
}

/// Ends the upstream connection's driver when the response body is done.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
