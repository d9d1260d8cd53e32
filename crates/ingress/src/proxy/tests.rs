//! The proxy in process: a fake pool behind [`Isolates`], requests with
//! in-memory bodies; no root, no deno, no sockets. The e2e tests drive the
//! same paths with real isolates.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http_body_util::Full;
use isocloud_origin::{Origin, OriginError};
use isocloud_pool::Termination;
use isocloud_protocol::LogLevel;
use prometheus_client::registry::Registry;

use super::*;
use crate::isolates::{InFlightGuard, RequestGuard, Reservation, Upstream};
use crate::routing::tests::{KID, RPC_ROOT, subhost_router, token};

/// What the fake isolate answers.
#[derive(Clone)]
enum Answer {
    /// This status and these headers; the body echoes the request's.
    Echo(u16, Vec<(&'static str, &'static str)>),
    Crash,
    Terminated(Termination),
    /// Never answers.
    Hang,
}

/// What a request looked like when it reached the isolate.
struct Seen {
    parts: http::request::Parts,
    body: Bytes,
}

/// One fake isolate that serves every deployment, and the pool around it.
struct Fake {
    /// Set: every boot is refused with it.
    refuse: Option<BootError>,
    answer: Answer,
    /// (origin, deployment) of every `isolate` call.
    booted: Mutex<Vec<(String, String)>>,
    hops: Mutex<Vec<u32>>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    errors: AtomicUsize,
    /// Every answer counted: its status and time to the response head.
    answers: Mutex<Vec<(u16, Duration)>>,
    ingress_bytes: AtomicU64,
    egress_bytes: AtomicU64,
}

impl Fake {
    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            refuse: None,
            answer,
            booted: Mutex::default(),
            hops: Mutex::default(),
            seen: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
            answers: Mutex::default(),
            ingress_bytes: AtomicU64::new(0),
            egress_bytes: AtomicU64::new(0),
        })
    }

    fn refusing(error: BootError) -> Arc<Self> {
        let mut fake = Arc::into_inner(Self::new(Answer::Echo(200, Vec::new()))).unwrap();
        fake.refuse = Some(error);
        Arc::new(fake)
    }

    fn booted(&self) -> Vec<(String, String)> {
        self.booted.lock().unwrap().clone()
    }

    fn last_seen(&self) -> Seen {
        self.seen.lock().unwrap().pop().expect("a request reached the isolate")
    }
}

struct FakePool(Arc<Fake>);

impl Isolates for FakePool {
    fn isolate<'a>(
        &'a self,
        origin: &'a Arc<dyn Origin>,
        deployment_id: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Reservation>, BootError>> {
        self.0.booted.lock().unwrap().push((origin.name().to_owned(), deployment_id.to_owned()));
        let result = match &self.0.refuse {
            Some(error) => Err(error.clone()),
            None => {
                self.0.in_flight.fetch_add(1, Ordering::SeqCst);
                Ok(Box::new(Lease(self.0.clone())) as Box<dyn Reservation>)
            }
        };
        async move { result }.boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

/// A reservation, then the request's guard: the isolate is busy until it drops.
struct Lease(Arc<Fake>);

impl Reservation for Lease {
    fn upstream(&self) -> Arc<dyn Upstream> {
        self.0.clone()
    }

    fn begin_request(self: Box<Self>, hops: u32) -> InFlightGuard {
        self.0.hops.lock().unwrap().push(hops);
        self
    }
}

impl RequestGuard for Lease {
    fn note(&self, _: LogLevel, _: String, _: Option<String>) {}
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Upstream for Fake {
    fn forward(
        self: Arc<Self>,
        request: Request<RequestBody>,
    ) -> BoxFuture<'static, Result<Response<ResponseBody>, ForwardError>> {
        async move {
            let (parts, body) = request.into_parts();
            // A body cut off by the edge is a connection error to the
            // isolate, which the supervisor reports as a crash.
            let body = body.collect().await.map_err(|e| ForwardError::Crashed(e.to_string()))?.to_bytes();
            self.seen.lock().unwrap().push(Seen { parts, body: body.clone() });
            match self.answer.clone() {
                Answer::Echo(status, headers) => {
                    let mut response = Response::builder().status(status);
                    for (name, value) in headers {
                        response = response.header(name, value);
                    }
                    Ok(response.body(full(body)).unwrap())
                }
                Answer::Crash => Err(ForwardError::Crashed("the fake died".into())),
                Answer::Terminated(termination) => Err(ForwardError::Terminated(termination)),
                Answer::Hang => std::future::pending().await,
            }
        }
        .boxed()
    }

    fn count_ingress(&self, bytes: u64) {
        self.ingress_bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    fn count_egress(&self, bytes: u64) {
        self.egress_bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    fn count_response(&self, status: u16, elapsed: Duration) {
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::SeqCst);
        }
        self.answers.lock().unwrap().push((status, elapsed));
    }
}

const MAX_BODY_BYTES: usize = 1024;
const MAX_HOPS: u32 = 3;

fn limits() -> EdgeLimits {
    EdgeLimits {
        request_timeout: Duration::from_secs(5),
        max_request_body_bytes: MAX_BODY_BYTES,
        max_hops: MAX_HOPS,
        streams: StreamLimits { idle_timeout: Duration::from_secs(60), max_lifetime: Duration::from_secs(60) },
    }
}

fn proxy_with(router: Router, fake: &Arc<Fake>, limits: EdgeLimits) -> Proxy {
    Proxy::new(router, FakePool(fake.clone()), EdgeMetrics::new(&mut Registry::default()), limits)
}

fn proxy(fake: &Arc<Fake>) -> Proxy {
    proxy_with(subhost_router(), fake, limits())
}

fn get(host: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    request(host, headers, Bytes::new())
}

fn request(host: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut builder = Request::post("/p?q=1").header(header::HOST, host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(body.into())).unwrap()
}

const PEER: ConnectionInfo =
    ConnectionInfo { peer: SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000), secure: false };

/// The response's status, headers and whole body.
async fn send(proxy: &Proxy, request: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Bytes) {
    let response = proxy.handle(request, PEER).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body arrives").to_bytes();
    (parts.status, parts.headers, body)
}

/// A runner's own error: the status, the code in `x-isocloud-error`, and
/// the JSON body's code and message.
fn runner_error(status: StatusCode, headers: &http::HeaderMap, body: &Bytes) -> (u16, String, String) {
    let json: serde_json::Value = serde_json::from_slice(body).expect("a JSON error body");
    let code = json["error"]["code"].as_str().unwrap().to_owned();
    assert_eq!(headers.get(ERROR_HEADER).map(|v| v.to_str().unwrap()), Some(code.as_str()), "header and body agree");
    (status.as_u16(), code, json["error"]["message"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_request_reaches_its_deployment_at_its_public_url_with_only_end_to_end_headers() {
    let tenant_headers = vec![
        ("x-tenant", "kept"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("trailer", "x-checksum"),
        // A tenant cannot pass its answer off as one of the runner's errors.
        (ERROR_HEADER, "CAPACITY"),
    ];
    let fake = Fake::new(Answer::Echo(200, tenant_headers));
    let proxy = proxy(&fake);
    let hop_by_hop = [
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("connection", "keep-alive"),
        // Not an upgrade (Connection does not name it): dropped as well.
        ("upgrade", "websocket"),
    ];
    let mut headers = vec![
        ("x-custom", "kept"),
        (HOPS_HEADER, "1"),
        // Not from a verified relay: it chooses neither the route nor the URL.
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
    ];
    headers.extend(hop_by_hop);
    let (status, response_headers, body) = send(&proxy, request("Hello.localhost:8080", &headers, "hello")).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello");
    assert_eq!(fake.booted(), [("apps".to_owned(), "hello".to_owned())]);
    let seen = fake.last_seen();
    assert_eq!(seen.parts.uri, "http://hello.localhost:8080/p?q=1");
    assert_eq!(seen.parts.version, http::Version::HTTP_11);
    assert_eq!(seen.parts.headers[header::HOST], "hello.localhost:8080");
    assert_eq!(seen.body, "hello");
    assert_eq!(seen.parts.headers["x-custom"], "kept");
    assert_eq!(seen.parts.headers["x-forwarded-host"], "evil.example", "passed on as the client sent it");
    assert!(seen.parts.headers.contains_key(REQUEST_ID_HEADER));
    for (name, _) in hop_by_hop.iter().chain([&(HOPS_HEADER, "")]) {
        assert!(!seen.parts.headers.contains_key(*name), "{name} was forwarded");
    }
    // The hop count is the request's, for the egress proxy to carry on.
    assert_eq!(*fake.hops.lock().unwrap(), [1]);

    assert_eq!(response_headers["x-tenant"], "kept");
    for name in ["keep-alive", "proxy-connection", "trailer", ERROR_HEADER] {
        assert!(!response_headers.contains_key(name), "{name} was passed back");
    }
    assert_eq!(fake.ingress_bytes.load(Ordering::SeqCst), 5);
    assert_eq!(fake.egress_bytes.load(Ordering::SeqCst), 5);
    assert_eq!(fake.errors.load(Ordering::SeqCst), 0);
    assert_eq!(fake.in_flight.load(Ordering::SeqCst), 0, "the body is done: the isolate is idle");
}

#[tokio::test]
async fn a_verified_relay_names_the_public_url_and_its_token_is_never_forwarded() {
    let fake = Fake::new(Answer::Echo(200, Vec::new()));
    let proxy = proxy(&fake);
    let token = token("dep-1");
    let headers =
        [(SUBHOST_HEADER, token.as_str()), ("x-forwarded-host", "shop.example"), ("x-forwarded-proto", "https")];
    let (status, _, _) = send(&proxy, get("runner.internal:8000", &headers)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fake.booted(), [(format!("{KID}@{RPC_ROOT}"), "dep-1".to_owned())]);
    let seen = fake.last_seen();
    assert_eq!(seen.parts.uri, "https://shop.example/p?q=1");
    assert_eq!(seen.parts.headers[header::HOST], "shop.example");
    assert!(!seen.parts.headers.contains_key(SUBHOST_HEADER), "the relay's token reached the tenant");

    // A token that does not verify: 401, and nothing boots.
    let forged = format!("{token}x");
    let (status, headers, body) = send(&proxy, get("hello.localhost", &[(SUBHOST_HEADER, &forged)])).await;
    assert_eq!(runner_error(status, &headers, &body).1, "UNAUTHORIZED");
    assert_eq!(fake.booted().len(), 1);
}

#[tokio::test]
async fn a_request_past_the_hop_bound_is_508_before_anything_boots() {
    let fake = Fake::new(Answer::Echo(200, Vec::new()));
    let proxy = proxy(&fake);
    // The probe: at the bound, and with a hop count that is not a number.
    for hops in [MAX_HOPS.to_string(), " 2 ".to_owned(), "many".to_owned()] {
        let (status, _, _) = send(&proxy, get("hello.localhost", &[(HOPS_HEADER, &hops)])).await;
        assert_eq!(status, StatusCode::OK, "{hops:?}");
    }
    assert_eq!(*fake.hops.lock().unwrap(), [MAX_HOPS, 2, 0]);
    let boots = fake.booted().len();
    for hops in [MAX_HOPS + 1, u32::MAX] {
        let (status, headers, body) = send(&proxy, get("hello.localhost", &[(HOPS_HEADER, &hops.to_string())])).await;
        let (status, code, message) = runner_error(status, &headers, &body);
        assert_eq!((status, code.as_str()), (508, "LOOP_DETECTED"));
        assert!(message.contains(&hops.to_string()), "{message}");
    }
    assert_eq!(fake.booted().len(), boots, "a loop boots nothing");
}

#[tokio::test]
async fn each_boot_refusal_is_its_code_s_status_and_error_header() {
    let cases = [
        (BootError::ShuttingDown, 503, "SHUTTING_DOWN"),
        (BootError::Capacity(8), 503, "CAPACITY"),
        (BootError::BootQueueFull(64), 503, "CAPACITY"),
        (BootError::BootQueueTimeout(30), 503, "CAPACITY"),
        (BootError::TenantCapacity(2), 503, "CAPACITY"),
        (BootError::TenantBootQueueFull(4), 503, "CAPACITY"),
        (BootError::Origin(Arc::new(OriginError::DeploymentNotFound)), 404, "DEPLOYMENT_NOT_FOUND"),
        (BootError::Origin(Arc::new(OriginError::Unreachable("refused".into()))), 502, "ORIGIN_UNREACHABLE"),
        (BootError::Origin(Arc::new(OriginError::BootRefused { status: 403 })), 502, "BOOT_FAILED"),
        (
            BootError::Origin(Arc::new(OriginError::ModuleNotFound { specifier: "x".into(), context: "y".into() })),
            502,
            "MODULE_NOT_FOUND",
        ),
        (
            BootError::Origin(Arc::new(OriginError::Layer { layer_id: "l".into(), message: "bad".into() })),
            502,
            "LAYER_FAILED",
        ),
        (
            BootError::Origin(Arc::new(OriginError::Cache(std::io::Error::other("/var/lib/secret/cache: EIO")))),
            500,
            "INTERNAL",
        ),
    ];
    for (error, expected_status, expected_code) in cases {
        let described = error.to_string();
        let fake = Fake::refusing(error);
        let proxy = proxy(&fake);
        let (status, headers, body) = send(&proxy, get("hello.localhost", &[])).await;
        let (status, code, message) = runner_error(status, &headers, &body);
        assert_eq!((status, code.as_str()), (expected_status, expected_code), "{described}");
        assert_eq!(headers.contains_key(header::RETRY_AFTER), code == "CAPACITY", "{described}");
        if code == "INTERNAL" {
            // The runner's own failures are for its log, not the client.
            assert!(!message.contains("secret"), "{message}");
        } else if described.starts_with("origin unreachable:") {
            // How the connection failed says where the origin lives: the log's.
            assert!(message.starts_with("origin unreachable:") && !message.contains("refused"), "{message}");
        } else {
            assert_eq!(message, described);
        }
        assert_eq!(fake.booted().len(), 1);
    }
}

#[tokio::test]
async fn requests_that_route_nowhere_are_refused_before_the_pool() {
    let fake = Fake::new(Answer::Echo(200, Vec::new()));
    let proxy = proxy(&fake);
    let (status, headers, body) = send(&proxy, get("example.com", &[])).await;
    assert_eq!(runner_error(status, &headers, &body).1, "DEPLOYMENT_NOT_FOUND");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let two_hosts = Request::get("/").header("host", "a.localhost").header("host", "b.localhost");
    let (status, headers, body) = send(&proxy, two_hosts.body(Full::default()).unwrap()).await;
    assert_eq!(
        runner_error(status, &headers, &body),
        (400, "BAD_REQUEST".to_owned(), "the request has more than one Host header".to_owned())
    );
    assert!(fake.booted().is_empty());
}

#[tokio::test]
async fn each_forwarding_failure_is_its_code_and_counts_as_the_isolate_s_error() {
    let cases = [
        (Answer::Crash, 502, "ISOLATE_CRASHED"),
        (Answer::Terminated(Termination::CpuTimeLimit { limit_ms: 50, used_ms: 51 }), 502, "CPU_TIME_LIMIT"),
        (
            Answer::Terminated(Termination::MemoryLimit { limit_bytes: 1 << 20, used_bytes: 2 << 20 }),
            502,
            "MEMORY_LIMIT",
        ),
        (Answer::Hang, 504, "REQUEST_TIMEOUT"),
    ];
    let short = EdgeLimits { request_timeout: Duration::from_millis(50), ..limits() };
    for (answer, expected_status, expected_code) in cases {
        let fake = Fake::new(answer);
        let proxy = proxy_with(subhost_router(), &fake, short);
        let (status, headers, body) = send(&proxy, get("hello.localhost", &[])).await;
        let (status, code, _) = runner_error(status, &headers, &body);
        assert_eq!((status, code.as_str()), (expected_status, expected_code));
        assert_eq!(fake.errors.load(Ordering::SeqCst), 1, "{code}");
        let answers = fake.answers.lock().unwrap().clone();
        assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), [expected_status], "{code}: counted as answered");
        if expected_code == "REQUEST_TIMEOUT" {
            assert!(answers[0].1 >= Duration::from_millis(50), "the wait is in its latency: {answers:?}");
        }
        assert_eq!(fake.in_flight.load(Ordering::SeqCst), 0, "{code}: the isolate is released");
    }
    // The tenant's own 5xx is its answer, not the runner's, and an error in its usage.
    let fake = Fake::new(Answer::Echo(503, Vec::new()));
    let (status, headers, _) = send(&proxy(&fake), get("hello.localhost", &[])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!headers.contains_key(ERROR_HEADER));
    assert_eq!(fake.errors.load(Ordering::SeqCst), 1);
    assert_eq!(fake.answers.lock().unwrap()[0].0, 503);
}

#[tokio::test]
async fn a_body_past_the_bound_is_413_declared_or_not() {
    let fake = Fake::new(Answer::Echo(200, Vec::new()));
    let proxy = proxy(&fake);
    // The probe: a body at the bound, with and without a declared length.
    let at_bound = vec![b'a'; MAX_BODY_BYTES];
    let length = MAX_BODY_BYTES.to_string();
    let (status, _, body) =
        send(&proxy, request("hello.localhost", &[("content-length", &length)], at_bound.clone())).await;
    assert_eq!((status, body.len()), (StatusCode::OK, MAX_BODY_BYTES));
    let (status, _, _) = send(&proxy, request("hello.localhost", &[], at_bound)).await;
    assert_eq!(status, StatusCode::OK);
    let boots = fake.booted().len();

    // Declared too large: refused unread, before the pool, and the
    // connection must close (the body is still on it).
    let over = vec![b'a'; MAX_BODY_BYTES + 1];
    let length = (MAX_BODY_BYTES + 1).to_string();
    let (status, headers, body) =
        send(&proxy, request("hello.localhost", &[("content-length", &length)], over.clone())).await;
    assert_eq!(runner_error(status, &headers, &body).1, "PAYLOAD_TOO_LARGE");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers[header::CONNECTION], "close");
    assert_eq!(fake.booted().len(), boots);

    // Undeclared: cut off where it passes the bound; the isolate never
    // sees the end of it.
    let (status, headers, body) = send(&proxy, request("hello.localhost", &[], over)).await;
    assert_eq!(runner_error(status, &headers, &body).1, "PAYLOAD_TOO_LARGE");
    assert_eq!(fake.seen.lock().unwrap().len(), 2, "only the two probes reached the isolate");
}

#[tokio::test]
async fn a_response_keeps_its_isolate_busy_until_its_body_is_done() {
    let fake = Fake::new(Answer::Echo(200, Vec::new()));
    let proxy = proxy(&fake);
    let response = proxy.handle(request("hello.localhost", &[], "streamed"), PEER).await;
    assert_eq!(fake.in_flight.load(Ordering::SeqCst), 1, "the body is still to come");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "streamed");
    assert_eq!(fake.in_flight.load(Ordering::SeqCst), 0);
}

#[test]
fn a_request_id_is_the_prefix_and_the_sequence_in_lower_hex() {
    for seq in [0, 1, 0xf, 0x10, 0xdead_beef, u64::MAX] {
        assert_eq!(request_id("0badc0de", seq), format!("0badc0de-{seq:x}"));
    }
}

#[tokio::test]
async fn a_target_that_is_not_a_path_is_400_before_the_isolate() {
    let fake = Fake::new(Answer::Echo(200, Vec::new()));
    let proxy = proxy(&fake);
    let asterisk = Request::options("*").header(header::HOST, "hello.localhost").body(Full::new(Bytes::new())).unwrap();
    let (status, headers, body) = send(&proxy, asterisk).await;
    assert_eq!(runner_error(status, &headers, &body).1, "BAD_REQUEST");
    assert!(fake.seen.lock().unwrap().is_empty(), "the isolate saw it");
    // The same request with a path goes through.
    let (status, _, _) = send(&proxy, get("hello.localhost", &[])).await;
    assert_eq!(status, StatusCode::OK);
}
