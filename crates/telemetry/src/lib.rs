//! OpenTelemetry export over OTLP/HTTP (protobuf), `--otlp-endpoint`: a span
//! per request the runner answers, and tenants' console lines as log records
//! tagged with their deployment and, while the request is in flight, its
//! trace. This crate owns the export — bounded queues, batching, the
//! exporters of `opentelemetry-otlp`, what is dropped and counted — and the
//! W3C `traceparent` header ([`TraceParent`]); it knows nothing of isolates
//! or routing (the ingress fills a [`RequestSpan`], the pool hands over
//! console lines).
//!
//! It must never block or slow a request, nor grow without bound: spans and
//! log records go into fixed-size queues with `try_send` (a full queue drops
//! the record and counts it), one export per signal is in flight at a time
//! (bounded by [`EXPORT_TIMEOUT`]), and a failed export's batch is dropped
//! and counted (`isocloud_otlp_dropped_total{signal,reason}`). Nothing is
//! retried past the exporter's own deadline: telemetry is best effort,
//! unlike usage reports. Without `--otlp-endpoint` nothing of this exists:
//! the request path holds an `Option<Telemetry>` that is `None`.

mod client;
mod traceparent;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use isocloud_protocol::LogLevel;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, RetryPolicy, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

pub use traceparent::{TRACEPARENT_HEADER, TraceParent};

/// Spans waiting for export, at most (a few seconds of a busy runner's
/// requests while one export is in flight); past it new spans are dropped.
pub const SPAN_QUEUE: usize = 4096;
/// Log records waiting for export, at most, by count …
pub const LOG_QUEUE: usize = 4096;
/// … and by the bytes of their messages (a line may be 32 KiB: a count alone
/// would let a flood of long lines hold 128 MiB).
pub const LOG_QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// Records per export request.
const MAX_BATCH: usize = 512;
/// A record waits at most this long for its batch to fill.
const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// One export, its retries included; then its batch is dropped and counted.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests in flight whose trace a console line can be tied to, at most;
/// past it a line of a further request is exported without its trace.
const MAX_BOUND_REQUESTS: usize = 65_536;
/// Bound of a string attribute the runner takes from a request (host,
/// path): a client cannot make a span larger than this per attribute.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// `--otlp-endpoint` and `--otlp-service-name`, validated.
#[derive(Debug, Clone)]
pub struct OtlpOptions {
    /// The collector's base URL (`http://collector:4318`); `/v1/traces`
    /// and `/v1/logs` are appended.
    pub endpoint: url::Url,
    pub service_name: String,
}

impl OtlpOptions {
    fn signal_url(&self, path: &str) -> String {
        format!("{}/{path}", self.endpoint.as_str().trim_end_matches('/'))
    }
}

/// Export's share of the runner's metrics.
#[derive(Clone, Default)]
struct TelemetryMetrics {
    /// `signal` (spans, logs), `reason` (queue_full, export_failed).
    dropped: Family<[(&'static str, &'static str); 2], Counter>,
    exported: Family<[(&'static str, &'static str); 1], Counter>,
}

impl TelemetryMetrics {
    fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "isocloud_otlp_dropped",
            "Spans and log records not exported, by signal and reason (queue_full: the collector is slower \
             than the traffic; export_failed: it refused or could not be reached)",
            metrics.dropped.clone(),
        );
        registry.register(
            "isocloud_otlp_exported",
            "Spans and log records the collector took",
            metrics.exported.clone(),
        );
        for signal in ["spans", "logs"] {
            let _ = metrics.exported.get_or_create(&[("signal", signal)]);
            for reason in ["queue_full", "export_failed"] {
                let _ = metrics.dropped.get_or_create(&[("signal", signal), ("reason", reason)]);
            }
        }
        metrics
    }

    fn drop(&self, signal: &'static str, reason: &'static str, count: usize) {
        self.dropped.get_or_create(&[("signal", signal), ("reason", reason)]).inc_by(count as u64);
    }
}

/// The exporter handle: cheap to clone, shared by the ingress and the pool.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    spans: mpsc::Sender<SpanData>,
    logs: mpsc::Sender<(SdkLogRecord, usize)>,
    queued_log_bytes: Arc<AtomicUsize>,
    /// Request id → its span, while the request is in flight.
    requests: Mutex<HashMap<Box<str>, (TraceId, SpanId)>>,
    metrics: TelemetryMetrics,
    /// Makes log records (the SDK hands them out only through a logger);
    /// it has no processor: records go to this crate's queue.
    logger: SdkLogger,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
}

impl Telemetry {
    /// Builds the exporters and starts their tasks; call on a tokio runtime.
    pub fn start(options: &OtlpOptions, registry: &mut Registry) -> Result<Self, TelemetryError> {
        let http = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let resource = Resource::builder_empty().with_service_name(options.service_name.clone()).build();
        let mut spans = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client::ReqwestClient(http.clone()))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(options.signal_url("v1/traces"))
            .with_timeout(EXPORT_TIMEOUT)
            .with_retry_policy(RetryPolicy::default())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        spans.set_resource(&resource);
        let mut logs = opentelemetry_otlp::LogExporter::builder()
            .with_http()
            .with_http_client(client::ReqwestClient(http))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(options.signal_url("v1/logs"))
            .with_timeout(EXPORT_TIMEOUT)
            .with_retry_policy(RetryPolicy::default())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        logs.set_resource(&resource);

        let metrics = TelemetryMetrics::new(registry);
        let scope = InstrumentationScope::builder("isocloud").with_version(env!("CARGO_PKG_VERSION")).build();
        let (span_tx, span_rx) = mpsc::channel(SPAN_QUEUE);
        let (log_tx, log_rx) = mpsc::channel(LOG_QUEUE);
        let queued_log_bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(export_spans(span_rx, spans, metrics.clone()));
        tokio::spawn(export_logs(log_rx, logs, metrics.clone(), scope.clone(), queued_log_bytes.clone()));
        let logger = SdkLoggerProvider::builder().build().logger("isocloud");
        Ok(Self {
            inner: Arc::new(Inner {
                spans: span_tx,
                logs: log_tx,
                queued_log_bytes,
                requests: Mutex::new(HashMap::new()),
                metrics,
                logger,
                ids: RandomIdGenerator::default(),
                scope,
            }),
        })
    }

    /// A server span for a request with `method`, in the trace of the
    /// client's `traceparent` (its child) when it sent a valid one, else in a
    /// new trace. It is exported when dropped.
    pub fn request_span(&self, method: &http::Method, traceparent: Option<&http::HeaderValue>) -> RequestSpan {
        let parent = traceparent.and_then(|value| TraceParent::parse(value.as_bytes()));
        let trace_id = parent.map_or_else(|| self.inner.ids.new_trace_id(), |p| p.trace_id);
        let span_id = self.inner.ids.new_span_id();
        let mut attributes = Vec::with_capacity(12);
        attributes.push(KeyValue::new("http.request.method", method_name(method)));
        RequestSpan {
            telemetry: self.clone(),
            name: span_name(method),
            trace_id,
            span_id,
            parent,
            start: SystemTime::now(),
            attributes,
            request_id: None,
            error: false,
        }
    }

    /// A tenant's console line (already bounded by the runner), exported as a
    /// log record of `deployment_id` in its request's trace when that request
    /// is in flight.
    pub fn log(&self, deployment_id: &str, level: LogLevel, message: &str, request_id: Option<&str>) {
        let bytes = message.len() + deployment_id.len();
        let queued = self.inner.queued_log_bytes.fetch_add(bytes, Ordering::Relaxed);
        if queued + bytes > LOG_QUEUE_BYTES {
            self.inner.queued_log_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.inner.metrics.drop("logs", "queue_full", 1);
            return;
        }
        let mut record = self.inner.logger.create_log_record();
        let now = SystemTime::now();
        record.set_timestamp(now);
        record.set_observed_timestamp(now);
        let (severity, text) = match level {
            LogLevel::Debug => (Severity::Debug, "DEBUG"),
            LogLevel::Info => (Severity::Info, "INFO"),
            LogLevel::Warning => (Severity::Warn, "WARN"),
            LogLevel::Error => (Severity::Error, "ERROR"),
        };
        record.set_severity_number(severity);
        record.set_severity_text(text);
        record.set_body(AnyValue::String(message.to_owned().into()));
        record.add_attribute("isocloud.deployment_id", deployment_id.to_owned());
        if let Some(request_id) = request_id {
            // The harness reports it; a tenant could send any string: bounded.
            record.add_attribute("isocloud.request_id", bounded(request_id));
            let bound = self.inner.requests.lock().expect("requests poisoned").get(request_id).copied();
            if let Some((trace_id, span_id)) = bound {
                record.set_trace_context(trace_id, span_id, Some(TraceFlags::SAMPLED));
            }
        }
        if self.inner.logs.try_send((record, bytes)).is_err() {
            self.inner.queued_log_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.inner.metrics.drop("logs", "queue_full", 1);
        }
    }
}

/// `HTTP GET`; a method outside the standard ones is `HTTP _OTHER` (as the
/// semantic conventions say): a client cannot name spans.
fn span_name(method: &http::Method) -> &'static str {
    match method_name(method) {
        "GET" => "HTTP GET",
        "POST" => "HTTP POST",
        "PUT" => "HTTP PUT",
        "DELETE" => "HTTP DELETE",
        "PATCH" => "HTTP PATCH",
        "HEAD" => "HTTP HEAD",
        "OPTIONS" => "HTTP OPTIONS",
        "CONNECT" => "HTTP CONNECT",
        "TRACE" => "HTTP TRACE",
        _ => "HTTP _OTHER",
    }
}

fn method_name(method: &http::Method) -> &'static str {
    const KNOWN: [&str; 9] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE"];
    KNOWN.into_iter().find(|known| *known == method.as_str()).unwrap_or("_OTHER")
}

/// `text` cut to [`MAX_ATTRIBUTE_BYTES`] on a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_ATTRIBUTE_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ATTRIBUTE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// One request's server span, filled as the request goes and exported when
/// dropped (after the response body, or with the runner's error answer).
pub struct RequestSpan {
    telemetry: Telemetry,
    name: &'static str,
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<TraceParent>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    request_id: Option<Box<str>>,
    error: bool,
}

impl RequestSpan {
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The `traceparent` naming this span, for the isolate's request.
    pub fn traceparent(&self) -> http::HeaderValue {
        http::HeaderValue::from_str(&TraceParent::format(self.trace_id, self.span_id))
            .expect("hex and dashes are a valid header value")
    }

    /// The runner's id of the request: console lines carrying it are tied to
    /// this span until it ends.
    pub fn bind_request_id(&mut self, request_id: &str) {
        self.attributes.push(KeyValue::new("isocloud.request_id", request_id.to_owned()));
        let mut requests = self.telemetry.inner.requests.lock().expect("requests poisoned");
        if requests.len() < MAX_BOUND_REQUESTS {
            requests.insert(request_id.into(), (self.trace_id, self.span_id));
            self.request_id = Some(request_id.into());
        }
    }

    /// Where the request went: its public host and path (each bounded), the
    /// deployment and its origin (none at the edge: empty).
    pub fn route(&mut self, host: &str, path: &str, deployment_id: &str, origin: &str) {
        self.attributes.push(KeyValue::new("server.address", bounded(host)));
        self.attributes.push(KeyValue::new("url.path", bounded(path)));
        self.attributes.push(KeyValue::new("isocloud.deployment_id", bounded(deployment_id)));
        if !origin.is_empty() {
            self.attributes.push(KeyValue::new("isocloud.origin", bounded(origin)));
        }
    }

    /// The runner the edge sent the request to (`isocloud edge`).
    pub fn runner(&mut self, name: &str) {
        self.attributes.push(KeyValue::new("isocloud.runner", bounded(name)));
    }

    /// Whether the request waited for a boot (`boot`) or found its isolate
    /// running (`warm`).
    pub fn start_kind(&mut self, booted: bool) {
        self.attributes.push(KeyValue::new("isocloud.start", if booted { "boot" } else { "warm" }));
    }

    /// The response's status, and the runner's error code when the runner
    /// answered instead of the tenant.
    pub fn status(&mut self, status: u16, error_code: Option<&'static str>) {
        self.attributes.push(KeyValue::new("http.response.status_code", i64::from(status)));
        if let Some(code) = error_code {
            self.attributes.push(KeyValue::new("isocloud.error_code", code));
        }
        self.error = status >= 500;
    }

    /// CPU the isolate used while the request was in flight.
    pub fn cpu(&mut self, cpu: Duration) {
        self.attributes.push(KeyValue::new("isocloud.cpu_ms", cpu.as_secs_f64() * 1000.0));
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        let inner = &self.telemetry.inner;
        if let Some(request_id) = self.request_id.take() {
            inner.requests.lock().expect("requests poisoned").remove(&request_id);
        }
        let end = SystemTime::now();
        let duration_ms = end.duration_since(self.start).unwrap_or_default().as_secs_f64() * 1000.0;
        self.attributes.push(KeyValue::new("isocloud.duration_ms", duration_ms));
        let span = SpanData {
            span_context: SpanContext::new(
                self.trace_id,
                self.span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: self.parent.map_or(SpanId::INVALID, |p| p.span_id),
            parent_span_is_remote: self.parent.is_some(),
            span_kind: SpanKind::Server,
            name: Cow::Borrowed(self.name),
            start_time: self.start,
            end_time: end,
            attributes: std::mem::take(&mut self.attributes),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if self.error { Status::error("") } else { Status::Unset },
            instrumentation_scope: inner.scope.clone(),
        };
        if inner.spans.try_send(span).is_err() {
            inner.metrics.drop("spans", "queue_full", 1);
        }
    }
}

/// Waits for a first record, then for the batch to fill or
/// [`FLUSH_INTERVAL`]; `None` once every sender is gone and the queue empty.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>) -> Option<()> {
    if rx.recv_many(batch, MAX_BATCH).await == 0 {
        return None;
    }
    let deadline = tokio::time::Instant::now() + FLUSH_INTERVAL;
    while batch.len() < MAX_BATCH {
        match tokio::time::timeout_at(deadline, rx.recv_many(batch, MAX_BATCH - batch.len())).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Some(())
}

async fn export_spans(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    metrics: TelemetryMetrics,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while next_batch(&mut rx, &mut batch).await.is_some() {
        let count = batch.len();
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(std::mem::take(&mut batch))).await;
        record_export(&metrics, "spans", count, sent);
    }
}

async fn export_logs(
    mut rx: mpsc::Receiver<(SdkLogRecord, usize)>,
    exporter: opentelemetry_otlp::LogExporter,
    metrics: TelemetryMetrics,
    scope: InstrumentationScope,
    queued_log_bytes: Arc<AtomicUsize>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while next_batch(&mut rx, &mut batch).await.is_some() {
        let count = batch.len();
        let bytes: usize = batch.iter().map(|(_, bytes)| bytes).sum();
        let sent = {
            let records: Vec<(&SdkLogRecord, &InstrumentationScope)> =
                batch.iter().map(|(record, _)| (record, &scope)).collect();
            tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(LogBatch::new(&records))).await
        };
        batch.clear();
        queued_log_bytes.fetch_sub(bytes, Ordering::Relaxed);
        record_export(&metrics, "logs", count, sent);
    }
}

fn record_export(
    metrics: &TelemetryMetrics,
    signal: &'static str,
    count: usize,
    sent: Result<opentelemetry_sdk::error::OTelSdkResult, tokio::time::error::Elapsed>,
) {
    match sent {
        Ok(Ok(())) => {
            metrics.exported.get_or_create(&[("signal", signal)]).inc_by(count as u64);
        }
        Ok(Err(e)) => {
            tracing::debug!(signal, count, error = %e, "OTLP export failed: the batch is dropped");
            metrics.drop(signal, "export_failed", count);
        }
        Err(_) => {
            tracing::debug!(signal, count, "OTLP export timed out: the batch is dropped");
            metrics.drop(signal, "export_failed", count);
        }
    }
}

#[cfg(test)]
mod tests;
