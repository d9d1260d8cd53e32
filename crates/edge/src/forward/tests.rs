//! The forwarder in process, against runners on loopback: stand-ins that
//! verify the relay token as a runner does and say what they got, and
//! broken ones (connections reset before any answer, a closed port, a
//! draining runner).

use std::net::SocketAddr;
use std::sync::Mutex;

use isocloud_auth::{RUNNER_AUDIENCE, Secret, SubhostVerifier, Subhoster};
use prometheus_client::registry::Registry;
use tokio::io::AsyncReadExt as _;

use super::*;
use crate::hosts::{ProjectRoute, RoutingUpdate};

const KID: &str = "cp";
const SECRET: &str = "edge-test-secret-0123456789abcdef0123";

/// What a stand-in runner does with a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Verifies the token, answers what it got.
    Echo,
    /// 503 `SHUTTING_DOWN`, as a draining runner.
    Draining,
}

struct StandIn {
    addr: SocketAddr,
    /// `METHOD path` of each request it answered.
    seen: Arc<Mutex<Vec<String>>>,
}

async fn stand_in(behaviour: Behaviour) -> StandIn {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verifier = SubhostVerifier::new(vec![Subhoster {
        kid: KID.into(),
        secret: Secret::from(SECRET),
        rpc_root: url::Url::parse("http://origin.invalid/").unwrap(),
        allowed_rpc_root_prefixes: Vec::new(),
    }])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (verifier, log) = (verifier.clone(), log.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            log.lock().unwrap().push(format!("{} {}", parts.method, parts.uri));
            if behaviour == Behaviour::Draining {
                return ErrorCode::ShuttingDown.response("draining").map(axum::body::Body::from);
            }
            let token = parts.headers.get(SUBHOST_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let verified = match verifier.verify(token, now_unix_s()) {
                Ok(claims) => serde_json::json!({
                    "deployment_id": claims.deployment_id(),
                    "audience": claims.audience(),
                }),
                Err(e) => serde_json::json!({ "refused": e.to_string() }),
            };
            let header = |name: &str| parts.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
            let answer = serde_json::json!({
                "runner": addr.port(),
                "token": verified,
                "subhost_headers": parts.headers.get_all(SUBHOST_HEADER).iter().count(),
                "forwarded_host": header("x-forwarded-host"),
                "forwarded_proto": header("x-forwarded-proto"),
                "host": header("host"),
                "version": format!("{:?}", parts.version),
                "path": parts.uri.path_and_query().map(|p| p.as_str().to_owned()),
                "body": String::from_utf8_lossy(&body),
            });
            Response::new(axum::body::Body::from(answer.to_string()))
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    StandIn { addr, seen }
}

/// Accepts connections, reads the request's first bytes and closes them
/// unanswered: a runner dying with the request in flight.
async fn resetting() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf).await;
            drop(stream);
        }
    });
    (addr, accepted)
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

struct Setup {
    edge: Edge,
    runners: Arc<Runners>,
    registry: Registry,
}

/// An edge over `addrs` (in that order) whose table has project `hello`
/// with production deployment `deployment`.
fn edge(addrs: &[SocketAddr], deployment: &str, http2: bool) -> Setup {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let urls: Vec<url::Url> = addrs.iter().map(|a| url::Url::parse(&format!("http://{a}")).unwrap()).collect();
    let runners = Arc::new(Runners::new(&urls, metrics.clone()).unwrap());
    let mut table = HostTable::default();
    table
        .apply(RoutingUpdate {
            projects: vec![ProjectRoute { id: "p1".into(), name: "hello".into(), production: Some(deployment.into()) }],
            deployments: vec![(deployment.into(), "p1".into())],
            domains: vec![("www.shop.test".into(), "p1".into())],
            full: true,
            ..RoutingUpdate::unchanged(1, "localhost")
        })
        .unwrap();
    let edge = Edge::new(
        Arc::new(RwLock::new(table)),
        runners.clone(),
        RunnerClients::new(http2, 8, rustls::RootCertStore::empty()),
        SigningKey { kid: KID.into(), secret: Secret::from(SECRET) },
        ForwardOptions { request_timeout: Duration::from_secs(10), max_request_body_bytes: 1024 },
        metrics,
    );
    Setup { edge, runners, registry }
}

/// A deployment id whose ranking over `addrs` puts `first` first.
fn ranked_first_on(addrs: &[SocketAddr], first: SocketAddr) -> String {
    let names: Vec<String> = addrs.iter().map(|a| format!("http://{a}/")).collect();
    (0..)
        .map(|i| format!("{i:012}"))
        .find(|id| names[crate::rendezvous::rank(id, &names)[0]] == format!("http://{first}/"))
        .unwrap()
}

fn request(method: Method, host: &str, path: &str, body: &'static str) -> Request<EdgeBody> {
    let mut request = Request::new(full(Bytes::from_static(body.as_bytes())));
    *request.method_mut() = method;
    *request.uri_mut() = path.parse().unwrap();
    request.headers_mut().insert(header::HOST, HeaderValue::from_str(host).unwrap());
    request
}

async fn send(edge: &Edge, request: Request<EdgeBody>) -> (StatusCode, HeaderMap, String) {
    let response = edge.handle(request, false).await;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
}

fn metric(registry: &Registry, series: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0)
}

/// The host picks the deployment, its ranking the runner; the runner gets
/// a token for that deployment (aud `isocloud-runner`) in place of the
/// client's own, the client's host in `x-forwarded-host`, and the path,
/// query and body untouched. Over h2c and HTTP/1.1 alike.
#[tokio::test]
async fn a_request_reaches_its_deployments_runner_with_a_relay_token() {
    for http2 in [true, false] {
        let (a, b) = (stand_in(Behaviour::Echo).await, stand_in(Behaviour::Echo).await);
        let addrs = [a.addr, b.addr];
        let deployment = ranked_first_on(&addrs, b.addr);
        let setup = edge(&addrs, &deployment, http2);
        let mut forged = request(Method::POST, "hello.localhost:8080", "/submit?x=1", "payload");
        forged.headers_mut().insert(SUBHOST_HEADER, HeaderValue::from_static("forged.by.client"));
        forged.headers_mut().insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        let (status, _, body) = send(&setup.edge, forged).await;
        assert_eq!(status, 200, "{body}");
        let got: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(got["runner"], b.addr.port(), "the deployment's first runner");
        assert_eq!(got["token"]["deployment_id"], deployment.as_str(), "{got}");
        assert_eq!(got["token"]["audience"], RUNNER_AUDIENCE);
        assert_eq!(got["subhost_headers"], 1, "the client's own token is not passed on");
        assert_eq!(got["forwarded_host"], "hello.localhost:8080");
        assert_eq!(got["forwarded_proto"], "http");
        assert_eq!(got["path"], "/submit?x=1");
        assert_eq!(got["body"], "payload");
        assert_eq!(got["version"], if http2 { "HTTP/2.0" } else { "HTTP/1.1" });
        assert_eq!(got["host"], if http2 { serde_json::Value::Null } else { format!("{}", b.addr).into() });
        // The deployment URL host reaches the same deployment, on the same runner.
        let (status, _, body) =
            send(&setup.edge, request(Method::GET, &format!("hello-{deployment}.localhost"), "/", "")).await;
        assert_eq!(status, 200);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["runner"], b.addr.port());
        assert!(a.seen.lock().unwrap().is_empty(), "the other runner saw nothing");
    }
}

#[tokio::test]
async fn requests_that_route_nowhere_are_refused_by_code() {
    let runner = stand_in(Behaviour::Echo).await;
    let setup = edge(&[runner.addr], "aaaaaaaaaaaa", true);
    let (status, headers, body) = send(&setup.edge, request(Method::GET, "nope.localhost", "/", "")).await;
    assert_eq!((status.as_u16(), &headers[ERROR_HEADER]), (404, &HeaderValue::from_static("DEPLOYMENT_NOT_FOUND")));
    assert!(body.contains("nope.localhost"), "{body}");

    let mut two_hosts = request(Method::GET, "hello.localhost", "/", "");
    two_hosts.headers_mut().append(header::HOST, HeaderValue::from_static("other.localhost"));
    let (status, headers, _) = send(&setup.edge, two_hosts).await;
    assert_eq!((status.as_u16(), &headers[ERROR_HEADER]), (400, &HeaderValue::from_static("BAD_REQUEST")));

    let mut large = request(Method::POST, "hello.localhost", "/", "");
    large.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("4096"));
    let (status, headers, _) = send(&setup.edge, large).await;
    assert_eq!((status.as_u16(), &headers[ERROR_HEADER]), (413, &HeaderValue::from_static("PAYLOAD_TOO_LARGE")));
    assert_eq!(headers[header::CONNECTION], "close");
    assert!(runner.seen.lock().unwrap().is_empty(), "none of them reached the runner");

    // Before the control plane's first answer, a host is not "not found".
    let empty = Edge::new(
        Arc::new(RwLock::new(HostTable::default())),
        setup.runners.clone(),
        RunnerClients::new(true, 8, rustls::RootCertStore::empty()),
        SigningKey { kid: KID.into(), secret: Secret::from(SECRET) },
        ForwardOptions { request_timeout: Duration::from_secs(10), max_request_body_bytes: 1024 },
        Metrics::new(&mut Registry::default()),
    );
    let (status, headers, _) = send(&empty, request(Method::GET, "hello.localhost", "/", "")).await;
    assert_eq!((status.as_u16(), &headers[ERROR_HEADER]), (502, &HeaderValue::from_static("ORIGIN_UNREACHABLE")));
    assert_eq!(setup.edge.in_flight(), 0, "every answer's body was dropped");
}

/// The first runner of the ranking resets every connection before
/// answering: GET, HEAD and OPTIONS go to the next one and succeed; a POST
/// with a body is not sent again (502 `UPSTREAM_FAILED`).
#[tokio::test]
async fn idempotent_requests_fail_over_when_a_runner_dies_before_answering() {
    for http2 in [true, false] {
        let (dying, accepted) = resetting().await;
        let next = stand_in(Behaviour::Echo).await;
        let addrs = [dying, next.addr];
        let deployment = ranked_first_on(&addrs, dying);
        let setup = edge(&addrs, &deployment, http2);
        // The probe works: the same runner answers for a deployment it ranks first.
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let (status, _, _) = send(&setup.edge, request(method.clone(), "hello.localhost", "/again", "")).await;
            assert_eq!(status, 200, "{method} (http2: {http2})");
        }
        assert!(accepted.load(Ordering::SeqCst) >= 1, "the dying runner was tried first");
        assert_eq!(next.seen.lock().unwrap().len(), 3, "each retried once on the next runner");
        assert_eq!(metric(&setup.registry, "isocloud_edge_retries_total"), 3);

        let (status, headers, _) = send(&setup.edge, request(Method::POST, "hello.localhost", "/pay", "once")).await;
        assert_eq!((status.as_u16(), &headers[ERROR_HEADER]), (502, &HeaderValue::from_static("UPSTREAM_FAILED")));
        assert_eq!(next.seen.lock().unwrap().len(), 3, "a POST is never sent twice (http2: {http2})");
        assert!(setup.runners.list()[0].is_up(), "a reset is no failed check: the port answered");
    }
}

/// A runner that refuses connections: GETs go to the next runner at once,
/// and two refusals take the runner out, so requests with a body go to the
/// next one too from then on.
#[tokio::test]
async fn a_refusing_runner_is_taken_out_after_two_refusals() {
    let gone = closed_port().await;
    let next = stand_in(Behaviour::Echo).await;
    let addrs = [gone, next.addr];
    let deployment = ranked_first_on(&addrs, gone);
    let setup = edge(&addrs, &deployment, true);
    let (status, headers, _) = send(&setup.edge, request(Method::POST, "hello.localhost", "/", "x")).await;
    assert_eq!((status.as_u16(), &headers[ERROR_HEADER]), (502, &HeaderValue::from_static("UPSTREAM_UNREACHABLE")));
    assert!(setup.runners.list()[0].is_up(), "one refusal is not enough");
    let (status, _, _) = send(&setup.edge, request(Method::GET, "hello.localhost", "/", "")).await;
    assert_eq!(status, 200, "retried on the next runner");
    assert!(!setup.runners.list()[0].is_up(), "two refusals in a row: out");
    let (status, _, body) = send(&setup.edge, request(Method::POST, "hello.localhost", "/", "x")).await;
    assert_eq!(status, 200, "the next runner takes its deployments: {body}");
    assert_eq!(metric(&setup.registry, &format!("isocloud_edge_runner_up{{runner=\"http://{gone}/\"}}")), 0);
    assert_eq!(metric(&setup.registry, &format!("isocloud_edge_runner_up{{runner=\"http://{}/\"}}", next.addr)), 1);
}

/// A draining runner (503 `SHUTTING_DOWN`) took nothing: a GET goes on to
/// the next runner; a POST gets the 503 as it is (a client may retry it).
#[tokio::test]
async fn a_draining_runners_gets_go_to_the_next_runner() {
    let (draining, next) = (stand_in(Behaviour::Draining).await, stand_in(Behaviour::Echo).await);
    let addrs = [draining.addr, next.addr];
    let deployment = ranked_first_on(&addrs, draining.addr);
    let setup = edge(&addrs, &deployment, true);
    let (status, _, body) = send(&setup.edge, request(Method::GET, "hello.localhost", "/", "")).await;
    assert_eq!(status, 200, "{body}");
    let (status, headers, _) = send(&setup.edge, request(Method::POST, "hello.localhost", "/", "x")).await;
    assert_eq!((status.as_u16(), &headers[ERROR_HEADER]), (503, &HeaderValue::from_static("SHUTTING_DOWN")));
    assert_eq!(draining.seen.lock().unwrap().len(), 2);
    assert_eq!(next.seen.lock().unwrap().len(), 1);
}

#[test]
fn hostnames_lose_their_port() {
    assert_eq!(hostname("hello.localhost:8080"), "hello.localhost");
    assert_eq!(hostname("hello.localhost"), "hello.localhost");
    assert_eq!(hostname("[::1]:80"), "[::1]");
    assert_eq!(hostname("[::1]"), "[::1]");
}

#[test]
fn the_runner_gets_the_clients_address_in_place_of_what_the_client_wrote() {
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
    headers.insert("x-custom", HeaderValue::from_static("kept"));
    let client: IpAddr = "::ffff:192.0.2.1".parse::<IpAddr>().unwrap().to_canonical();
    let forwarded = forwarded_headers(headers.clone(), "app.example", Some(client), false, false).unwrap();
    assert_eq!(forwarded["x-forwarded-for"], "192.0.2.1");
    assert_eq!(forwarded["x-custom"], "kept");
    assert_eq!(forwarded["x-forwarded-host"], "app.example");
    // Not knowing the peer, the edge passes no claim of the client's on.
    let forwarded = forwarded_headers(headers, "app.example", None, false, false).unwrap();
    assert!(forwarded.get("x-forwarded-for").is_none());
}

/// `x-forwarded-proto` is the edge's listener's: `https` only for a request
/// that came over TLS, whatever the client wrote.
#[test]
fn the_runner_hears_https_only_for_requests_over_tls() {
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    let plain = forwarded_headers(headers.clone(), "app.example", None, false, false).unwrap();
    assert_eq!(plain["x-forwarded-proto"], "http");
    assert_eq!(plain.get_all("x-forwarded-proto").iter().count(), 1);
    let tls = forwarded_headers(HeaderMap::new(), "app.example", None, false, true).unwrap();
    assert_eq!(tls["x-forwarded-proto"], "https");
}

/// The control plane's `acme_challenge` route: checks the edge's token as
/// the origin listener does; one token pending for `www.shop.test`.
async fn acme_feed() -> url::Url {
    let verifier = SubhostVerifier::new(vec![Subhoster {
        kid: KID.into(),
        secret: Secret::from(SECRET),
        rpc_root: url::Url::parse("http://origin.invalid/").unwrap(),
        allowed_rpc_root_prefixes: Vec::new(),
    }])
    .unwrap();
    let app = axum::Router::new().route(
        "/v0/acme_challenge",
        axum::routing::get(
            move |query: axum::extract::Query<std::collections::HashMap<String, String>>, headers: HeaderMap| {
                let verifier = verifier.clone();
                async move {
                    let token = headers["authorization"].to_str().unwrap().strip_prefix("Bearer ").unwrap();
                    if verifier.verify_audience(token, isocloud_auth::ROUTING_AUDIENCE, now_unix_s()).is_err() {
                        return (StatusCode::UNAUTHORIZED, String::new());
                    }
                    match (query["host"].as_str(), query["token"].as_str()) {
                        ("www.shop.test", "pending_token") => (StatusCode::OK, "pending_token.thumbprint".into()),
                        _ => (StatusCode::NOT_FOUND, String::new()),
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let root = url::Url::parse(&format!("http://{}/v0/", listener.local_addr().unwrap())).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    root
}

/// With an HTTPS listener: plain HTTP to a domain with a certificate gets
/// 308 to HTTPS (the runner's rule), over TLS it is forwarded with
/// `x-forwarded-proto: https`; a host without one is served over plain
/// HTTP; an ACME challenge path is never redirected: a pending token is
/// answered from the control plane, any other reaches the app.
#[tokio::test]
async fn domains_with_a_certificate_go_to_https_but_acme_challenges_do_not() {
    let runner = stand_in(Behaviour::Echo).await;
    let certificates = Arc::new(crate::certs::EdgeCertificates::default());
    let pair = rcgen::generate_simple_self_signed(vec!["www.shop.test".to_owned()]).unwrap();
    let pem = crate::certs::CertificatePem {
        domain: "www.shop.test".into(),
        cert_pem: pair.cert.pem(),
        key_pem: pair.key_pair.serialize_pem(),
    };
    certificates.put("www.shop.test", Some(Arc::new(crate::certs::load(&pem).unwrap())));
    let acme = AcmeLookup::new(&acme_feed().await, SigningKey { kid: KID.into(), secret: Secret::from(SECRET) });
    let Setup { edge, .. } = edge(&[runner.addr], "aaaaaaaaaaaa", true);
    let edge = edge.with_https(certificates, 8443).with_acme(Arc::new(acme.unwrap()));

    let (status, headers, _) = send(&edge, request(Method::GET, "www.shop.test", "/path?q=1", "")).await;
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(headers[header::LOCATION], "https://www.shop.test:8443/path?q=1");
    let response = edge.handle(request(Method::GET, "www.shop.test", "/path?q=1", ""), true).await;
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((got["forwarded_proto"].as_str(), got["path"].as_str()), (Some("https"), Some("/path?q=1")));
    let (status, _, body) = send(&edge, request(Method::GET, "hello.localhost", "/", "")).await;
    assert_eq!(status, 200, "no certificate, no redirect: {body}");

    let (status, headers, body) =
        send(&edge, request(Method::GET, "www.shop.test", "/.well-known/acme-challenge/pending_token", "")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "pending_token.thumbprint"));
    assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    let (status, _, body) =
        send(&edge, request(Method::GET, "www.shop.test", "/.well-known/acme-challenge/other_token", "")).await;
    assert_eq!(status, 200, "not pending: the app's, not redirected");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["path"],
        "/.well-known/acme-challenge/other_token"
    );
    assert_eq!(runner.seen.lock().unwrap().len(), 3, "the pending token never reached the runner");
}
