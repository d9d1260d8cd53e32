//! The exporter against a real OTLP/HTTP receiver on loopback (hyper,
//! protobuf decoded with `opentelemetry-proto`), and against none.

use std::sync::Mutex as StdMutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;

use super::*;

type Received = Arc<StdMutex<Vec<(String, Bytes)>>>;

async fn receiver() -> (url::Url, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let path = request.uri().path().to_owned();
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        store.lock().unwrap().push((path, body));
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}").parse().unwrap(), received)
}

fn options(endpoint: url::Url) -> OtlpOptions {
    OtlpOptions { endpoint, service_name: "isocloud-test".into() }
}

async fn wait_for(received: &Received, path: &str) -> Bytes {
    for _ in 0..100 {
        if let Some((_, body)) = received.lock().unwrap().iter().find(|(p, _)| p == path) {
            return body.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing arrived at {path}");
}

fn metric(registry: &Registry, series: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{series} in {text}"))
}

#[tokio::test]
async fn a_span_continues_the_clients_trace_and_a_line_of_its_request_joins_it() {
    let (endpoint, received) = receiver().await;
    let mut registry = Registry::default();
    let telemetry = Telemetry::start(&options(endpoint), &mut registry).unwrap();
    let incoming = http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    let mut span = telemetry.request_span(&http::Method::GET, Some(&incoming));
    span.bind_request_id("abc-1");
    span.route(&"h".repeat(1000), "/x", "dep1", "origin1");
    span.start_kind(true);
    span.status(502, Some("BOOT_FAILED"));
    span.cpu(Duration::from_micros(1500));
    let traceparent = span.traceparent();
    telemetry.log("dep1", LogLevel::Warning, "hello", Some("abc-1"));
    drop(span);
    telemetry.log("dep1", LogLevel::Info, "after", Some("abc-1"));

    let traces = ExportTraceServiceRequest::decode(wait_for(&received, "/v1/traces").await).unwrap();
    let resource = traces.resource_spans[0].resource.as_ref().unwrap();
    assert!(format!("{:?}", resource.attributes).contains("isocloud-test"));
    let span = &traces.resource_spans[0].scope_spans[0].spans[0];
    assert_eq!(span.name, "HTTP GET");
    assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(traceparent.to_str().unwrap(), format!("00-{}-{}-01", hex(&span.trace_id), hex(&span.span_id)));
    let attribute = |key: &str| {
        span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()).and_then(|v| v.value)
    };
    assert_eq!(attribute("isocloud.deployment_id"), Some(any_value::Value::StringValue("dep1".into())));
    assert_eq!(attribute("http.response.status_code"), Some(any_value::Value::IntValue(502)));
    assert_eq!(attribute("isocloud.error_code"), Some(any_value::Value::StringValue("BOOT_FAILED".into())));
    assert_eq!(attribute("isocloud.start"), Some(any_value::Value::StringValue("boot".into())));
    assert_eq!(attribute("isocloud.cpu_ms"), Some(any_value::Value::DoubleValue(1.5)));
    match attribute("server.address") {
        Some(any_value::Value::StringValue(host)) => assert_eq!(host.len(), MAX_ATTRIBUTE_BYTES),
        other => panic!("{other:?}"),
    }

    let mut records = Vec::new();
    for _ in 0..100 {
        records = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == "/v1/logs")
            .flat_map(|(_, body)| {
                let logs = ExportLogsServiceRequest::decode(body.clone()).unwrap();
                logs.resource_logs.into_iter().flat_map(|r| r.scope_logs).flat_map(|s| s.log_records)
            })
            .collect();
        if records.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records.len(), 2, "{records:?}");
    let line = records.iter().find(|r| format!("{:?}", r.body).contains("hello")).unwrap();
    assert_eq!(line.severity_text, "WARN");
    assert_eq!(hex(&line.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736", "a line of the request is in its trace");
    assert_eq!(hex(&line.span_id), hex(&span.span_id));
    assert!(format!("{:?}", line.attributes).contains("dep1"));
    let late = records.iter().find(|r| format!("{:?}", r.body).contains("after")).unwrap();
    assert!(late.trace_id.is_empty(), "the request had ended: no trace to tie it to");
    assert_eq!(metric(&registry, "isocloud_otlp_exported_total{signal=\"spans\"}"), 1);
    assert!(telemetry.inner.requests.lock().unwrap().is_empty(), "the binding ended with the span");
}

#[tokio::test]
async fn no_traceparent_or_a_bad_one_starts_a_new_trace() {
    let (endpoint, _received) = receiver().await;
    let telemetry = Telemetry::start(&options(endpoint), &mut Registry::default()).unwrap();
    let bad = http::HeaderValue::from_static("00-zz");
    let a = telemetry.request_span(&http::Method::from_bytes(b"BREW").unwrap(), Some(&bad));
    let b = telemetry.request_span(&http::Method::GET, None);
    assert_ne!(a.trace_id(), b.trace_id());
    assert_ne!(a.trace_id(), TraceId::INVALID);
    assert_eq!(a.name, "HTTP _OTHER", "a client cannot name the span");
}

#[tokio::test]
async fn a_collector_that_is_down_drops_and_counts_without_blocking() {
    // A port that was just free: connections are refused.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut registry = Registry::default();
    let telemetry = Telemetry::start(&options(format!("http://{closed}").parse().unwrap()), &mut registry).unwrap();
    let started = std::time::Instant::now();
    for _ in 0..(SPAN_QUEUE + 100) {
        drop(telemetry.request_span(&http::Method::GET, None));
    }
    for _ in 0..10 {
        telemetry.log("d", LogLevel::Info, &"x".repeat(32 * 1024), None);
    }
    assert!(started.elapsed() < Duration::from_secs(1), "recording never waits: {:?}", started.elapsed());
    let dropped = || {
        metric(&registry, "isocloud_otlp_dropped_total{signal=\"spans\",reason=\"queue_full\"}")
            + metric(&registry, "isocloud_otlp_dropped_total{signal=\"spans\",reason=\"export_failed\"}")
    };
    assert!(dropped() >= 100, "the queue is bounded: {}", dropped());
    let deadline = std::time::Instant::now() + EXPORT_TIMEOUT + Duration::from_secs(5);
    while metric(&registry, "isocloud_otlp_dropped_total{signal=\"logs\",reason=\"export_failed\"}") < 10 {
        assert!(std::time::Instant::now() < deadline, "failed exports are counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(telemetry.inner.queued_log_bytes.load(Ordering::Relaxed), 0, "a dropped batch's bytes are freed");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
