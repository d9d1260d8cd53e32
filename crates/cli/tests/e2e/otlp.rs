//! OpenTelemetry export (`--otlp-endpoint`) end to end: a real OTLP/HTTP
//! receiver in the test (hyper on a free loopback port, the protobuf decoded
//! with `opentelemetry-proto`), the real runner and deno isolates, an
//! upstream on loopback reached through the egress proxy.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// The upstream listens on loopback, which the egress proxy refuses unless
/// the operator opens it.
const OPEN_LOOPBACK: [&str; 2] = ["--egress-allow-private", "127.0.0.0/8"];

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// Logs what it saw, calls `?target=` (with its own traceparent when
/// `?own=` names one), answers what it was given.
const APP: &str = r#"
Deno.serve(async (req) => {
  const url = new URL(req.url);
  const traceparent = req.headers.get("traceparent");
  console.log(`traced line ${traceparent}`);
  let upstream = null;
  const target = url.searchParams.get("target");
  if (target) {
    const own = url.searchParams.get("own");
    const res = await fetch(target, own ? { headers: { traceparent: own } } : undefined);
    upstream = await res.text();
  }
  return Response.json({ traceparent, upstream });
});
"#;

/// What the collector received, by path (`/v1/traces`, `/v1/logs`).
#[derive(Default)]
struct Collector {
    bodies: Mutex<Vec<(String, Bytes)>>,
}

impl Collector {
    async fn start() -> (Arc<Collector>, String) {
        let collector = Arc::new(Collector::default());
        let (addr, _task) = serve_http(collector.clone(), |collector: Arc<Collector>, request| async move {
            let path = request.uri().path().to_owned();
            let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            collector.bodies.lock().unwrap().push((path, body));
            hyper::Response::new(Full::new(Bytes::new()))
        })
        .await;
        (collector, format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Span> {
        self.decoded("/v1/traces", |body| {
            let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
            request.resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans).collect()
        })
    }

    fn logs(&self) -> Vec<LogRecord> {
        self.decoded("/v1/logs", |body| {
            let request = ExportLogsServiceRequest::decode(body).expect("an OTLP logs export");
            request.resource_logs.into_iter().flat_map(|r| r.scope_logs).flat_map(|s| s.log_records).collect()
        })
    }

    fn decoded<T>(&self, path: &str, decode: impl Fn(Bytes) -> Vec<T>) -> Vec<T> {
        let bodies = self.bodies.lock().unwrap().clone();
        bodies.into_iter().filter(|(p, _)| p == path).flat_map(|(_, body)| decode(body)).collect()
    }

    /// The first item `find` picks within 15 s.
    async fn wait<T: std::fmt::Debug>(&self, what: &str, find: impl Fn(&Collector) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(found) = find(self) {
                return found;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: not exported; spans {:?}", self.spans());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A plain HTTP server on loopback that records each request head.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let recorded = heads.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                recorded.lock().unwrap().push(String::from_utf8_lossy(&head).to_lowercase());
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nupstream")
                    .await;
            });
        }
    });
    (addr, heads)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
}

fn text(value: Option<&any_value::Value>) -> Option<&str> {
    match value {
        Some(any_value::Value::StringValue(text)) => Some(text),
        _ => None,
    }
}

/// GET `path` of `deployment` as a relay sends it, with `headers`.
async fn get(runner: &Runner, deployment: &str, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .get(format!("http://{}{path}", runner.addr))
        .timeout(Duration::from_secs(60))
        .header("x-deno-subhost", subhost_token(claims_for(deployment)));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("request to the runner")
}

#[tokio::test]
async fn a_traced_request_continues_the_clients_trace_into_the_isolate_its_logs_and_its_fetch() {
    let (collector, endpoint) = Collector::start().await;
    let (up, heads) = upstream().await;
    let origin = TestOrigin::start().await;
    origin.deploy("traced", TestDeployment::inline_js(APP));
    let runner =
        origin.runner(&[&["--otlp-endpoint", &endpoint, "--cpu-limit-ms", "5000"][..], &OPEN_LOOPBACK].concat());

    let client_traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let target = format!("http://{up}/called");
    let response = get(&runner, "traced", &format!("/?target={target}"), &[("traceparent", &client_traceparent)]).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["upstream"], "upstream", "{answer}");

    // The isolate's parent is the runner's span, in the client's trace.
    let inside = answer["traceparent"].as_str().unwrap_or_else(|| panic!("a traceparent inside: {answer}")).to_owned();
    let prefix = format!("00-{CLIENT_TRACE}-");
    assert!(inside.starts_with(&prefix) && inside.ends_with("-01"), "{inside}");
    let runner_span = inside[prefix.len()..prefix.len() + 16].to_owned();
    assert_ne!(runner_span, CLIENT_SPAN);

    // The tenant's outbound fetch carried it, through the egress proxy.
    let head = heads.lock().unwrap().last().cloned().expect("the upstream was called");
    assert!(head.contains("x-isocloud-hops: 1"), "through the egress proxy: {head}");
    assert!(head.contains(&format!("traceparent: {inside}")), "{head}");

    let span =
        collector.wait("the request's span", |c| c.spans().into_iter().find(|s| hex(&s.span_id) == runner_span)).await;
    assert_eq!(span.name, "HTTP GET");
    assert_eq!(hex(&span.trace_id), CLIENT_TRACE);
    assert_eq!(hex(&span.parent_span_id), CLIENT_SPAN);
    assert_eq!(text(attribute(&span.attributes, "isocloud.deployment_id")), Some("traced"), "{span:?}");
    assert_eq!(attribute(&span.attributes, "http.response.status_code"), Some(&any_value::Value::IntValue(200)));
    assert_eq!(text(attribute(&span.attributes, "isocloud.start")), Some("boot"), "{span:?}");
    assert!(
        matches!(attribute(&span.attributes, "isocloud.cpu_ms"), Some(any_value::Value::DoubleValue(ms)) if *ms >= 0.0)
    );
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);

    let line = collector
        .wait("the console line", |c| {
            c.logs().into_iter().find(|l| {
                matches!(&l.body, Some(AnyValue { value: Some(any_value::Value::StringValue(b)) }) if b.starts_with("traced line"))
            })
        })
        .await;
    assert_eq!(text(attribute(&line.attributes, "isocloud.deployment_id")), Some("traced"), "{line:?}");
    assert!(text(attribute(&line.attributes, "isocloud.request_id")).is_some(), "{line:?}");
    assert_eq!(line.severity_text, "INFO");
    assert_eq!(hex(&line.trace_id), CLIENT_TRACE, "the line is in the request's trace");
    assert_eq!(hex(&line.span_id), runner_span);

    // No traceparent: a new trace, the isolate warm; a tenant's own
    // traceparent on its fetch is left as it set it.
    let own = "00-11111111111111111111111111111111-2222222222222222-01";
    let response = get(&runner, "traced", &format!("/?target={target}&own={own}"), &[]).await;
    let answer: Value = response.json().await.unwrap();
    let inside = answer["traceparent"].as_str().unwrap().to_owned();
    assert!(!inside.contains(CLIENT_TRACE), "{inside}");
    let head = heads.lock().unwrap().last().cloned().unwrap();
    assert!(head.contains(&format!("traceparent: {own}")), "the tenant's own header wins: {head}");
    let warm =
        collector.wait("the second span", |c| c.spans().into_iter().find(|s| hex(&s.span_id) == inside[36..52])).await;
    assert_eq!(hex(&warm.parent_span_id), "", "a root span");
    assert_eq!(text(attribute(&warm.attributes, "isocloud.start")), Some("warm"), "{warm:?}");
}

#[tokio::test]
async fn the_runners_error_answer_is_a_span_with_its_code() {
    let (collector, endpoint) = Collector::start().await;
    let origin = TestOrigin::start().await;
    let runner = origin.runner(&["--otlp-endpoint", &endpoint]);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    // The test origin knows no such deployment: the runner answers.
    let response = get(&runner, "missing", "/", &[("traceparent", &traceparent)]).await;
    let status = i64::from(response.status().as_u16());
    let code = response.headers()["x-isocloud-error"].to_str().unwrap().to_owned();
    assert!(status >= 400, "{status}");
    let span =
        collector.wait("the error's span", |c| c.spans().into_iter().find(|s| hex(&s.trace_id) == CLIENT_TRACE)).await;
    assert_eq!(attribute(&span.attributes, "http.response.status_code"), Some(&any_value::Value::IntValue(status)));
    assert_eq!(text(attribute(&span.attributes, "isocloud.error_code")), Some(code.as_str()), "{span:?}");
    assert_eq!(text(attribute(&span.attributes, "isocloud.deployment_id")), Some("missing"));
}

#[tokio::test]
async fn a_collector_that_is_down_fails_no_request_and_counts_the_drops() {
    // A port that was free a moment ago: the collector refuses connections.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let origin = TestOrigin::start().await;
    origin.deploy("untraced", TestDeployment::inline_js(APP));
    let runner = origin.runner(&["--otlp-endpoint", &format!("http://{closed}")]);
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let response = get(&runner, "untraced", "/", &[]).await;
        assert_eq!(response.status(), 200);
    }
    let spent = started.elapsed();
    let series = "isocloud_otlp_dropped_total{signal=\"spans\",reason=\"export_failed\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = runner.metrics().await;
        if metric_value(&metrics, series) >= 20 {
            assert!(metric_value(&metrics, "isocloud_otlp_exported_total{signal=\"spans\"}") == 0, "{metrics}");
            assert!(
                metric_value(&metrics, "isocloud_otlp_dropped_total{signal=\"logs\",reason=\"export_failed\"}") >= 1,
                "the console lines too: {metrics}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the drops are counted: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(spent < Duration::from_secs(20), "20 requests (one boot) took {spent:?}");
}

#[tokio::test]
async fn the_edges_span_is_the_parent_of_the_runners() {
    let (collector, endpoint) = Collector::start().await;
    let (serve, origin) = ControlPlaneServe::start_with_origin(&[]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    let app = work.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("main.ts"), "Deno.serve((req) => new Response(req.headers.get(\"traceparent\")));\n")
        .unwrap();
    let cli = |args: &[&str]| isocloud_cli(&serve.control_url(), &serve.admin_token(), &config, args);
    cli(&["projects", "create", "edged"]);
    cli(&["deploy", "--project", "edged", "--prod", app.to_str().unwrap()]);
    let rpc_root = format!("http://{origin}/");
    let key = format!("{KID}={SECRET}");
    let runner =
        Runner::start(&["runner", "--rpc-root", &rpc_root, "--subhost-secret", &key, "--otlp-endpoint", &endpoint]);
    let edge = crate::support::edge::Edge::start(origin, &[&runner], &["--otlp-endpoint", &endpoint]);

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let response = reqwest::Client::builder()
        .resolve("edged.localhost", edge.addr)
        .build()
        .unwrap()
        .get(format!("http://edged.localhost:{}/", edge.addr.port()))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "edge:\n{}", edge.stderr());
    let inside = response.text().await.unwrap();
    assert!(inside.starts_with(&format!("00-{CLIENT_TRACE}-")), "{inside}");

    let in_trace = |c: &Collector| {
        let spans: Vec<Span> = c.spans().into_iter().filter(|s| hex(&s.trace_id) == CLIENT_TRACE).collect();
        (spans.len() >= 2).then_some(spans)
    };
    let spans = collector.wait("the edge's and the runner's spans", in_trace).await;
    let at_edge =
        spans.iter().find(|s| hex(&s.parent_span_id) == CLIENT_SPAN).expect("the edge's span: the client's child");
    assert!(attribute(&at_edge.attributes, "isocloud.runner").is_some(), "{at_edge:?}");
    assert_eq!(attribute(&at_edge.attributes, "http.response.status_code"), Some(&any_value::Value::IntValue(200)));
    let at_runner =
        spans.iter().find(|s| s.parent_span_id == at_edge.span_id).expect("the runner's span: the edge's child");
    assert_eq!(inside, format!("00-{CLIENT_TRACE}-{}-01", hex(&at_runner.span_id)));
    assert_eq!(
        text(attribute(&at_runner.attributes, "isocloud.deployment_id")),
        text(attribute(&at_edge.attributes, "isocloud.deployment_id"))
    );
}
