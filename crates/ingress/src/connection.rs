//! One connection on a bounded listener, from its accept to its close: the
//! head watchdog (no complete request head within the head timeout of the
//! accept or of the last response's end: closed), request bodies timed by
//! their [`BodyBound`], and the per-peer and total caps (by the
//! [`Permit`] it holds for as long as its socket lives, upgrades included).
//!
//! The watchdog is ours, not hyper's `header_read_timeout`: hyper's starts
//! once it reads a head, but the version sniffing before it (HTTP/1 or the
//! HTTP/2 preface) waits for bytes untimed, and HTTP/2 has no head timeout
//! at all. hyper's is off: it armed a boxed timer for every request head,
//! which the watchdog (one timer per connection) makes redundant.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::body::BoxError;
use crate::bounds::{BodyBound, Breach, Gate, ListenerBounds, Permit};
use crate::metrics::ListenerMetrics;

/// A TLS client must finish its handshake within this (and within the head
/// timeout, which counts from the accept).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's shared state: what it has read, and its requests in
/// flight (from head to the response body's end).
pub(crate) struct ConnState {
    bytes_read: AtomicU64,
    /// `bytes_read` when the last request in flight ended.
    bytes_at_idle: AtomicU64,
    requests: AtomicU64,
    /// HTTP/2: control frames (window updates, pings, settings) may arrive
    /// between requests, so bytes read say nothing of a head under way.
    http2: AtomicBool,
    /// Requests in flight. Counted, not signalled: the head watchdog looks
    /// at it when its timer fires, so a request costs no wake-up or timer.
    in_flight: AtomicUsize,
    /// When the last request in flight ended, in ns since `born` plus one;
    /// 0: none has yet.
    idle_since_ns: AtomicU64,
    born: tokio::time::Instant,
    /// A bound cut the connection (a body too slow): close it now.
    cut: Notify,
}

impl ConnState {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            bytes_read: AtomicU64::new(0),
            bytes_at_idle: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since_ns: AtomicU64::new(0),
            born: tokio::time::Instant::now(),
            cut: Notify::new(),
        })
    }

    fn begin(self: &Arc<Self>, version: http::Version) -> InFlight {
        if version == http::Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// A keep-alive connection between requests that has sent nothing since
    /// its last one (HTTP/1; any HTTP/2 one that has had a request):
    /// closing it at the head timeout is ordinary, not a breach. An HTTP/2
    /// peer trickling a new stream's headers is still closed within the
    /// graceful close's grace.
    fn idle_keep_alive(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
            && (self.http2.load(Ordering::Relaxed)
                || self.bytes_read.load(Ordering::Relaxed) == self.bytes_at_idle.load(Ordering::Relaxed))
    }

    /// Returns once the connection has had no request in flight until
    /// `first_deadline` (the first head's), or for `timeout` since its last
    /// request ended.
    async fn head_watchdog(&self, first_deadline: tokio::time::Instant, timeout: Duration) {
        let mut deadline = first_deadline;
        loop {
            tokio::time::sleep_until(deadline).await;
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // Busy now: idle at the earliest `timeout` after it ends.
                deadline = tokio::time::Instant::now() + timeout;
                continue;
            }
            match self.idle_since_ns.load(Ordering::Acquire) {
                0 => return,
                since_ns => {
                    let idle_deadline = self.born + Duration::from_nanos(since_ns - 1) + timeout;
                    if idle_deadline <= tokio::time::Instant::now() {
                        return;
                    }
                    deadline = idle_deadline;
                }
            }
        }
    }
}

/// One request, from its head to its response body's end.
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        if conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            conn.bytes_at_idle.store(conn.bytes_read.load(Ordering::Relaxed), Ordering::Relaxed);
            let since_ns = u64::try_from(conn.born.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            conn.idle_since_ns.store(since_ns + 1, Ordering::Release);
        }
    }
}

/// The socket, counting what it reads (see [`ConnState::idle_keep_alive`])
/// and holding the connection's permit as long as it lives (through an
/// upgrade too).
struct CountingIo<T> {
    // Dropped before the socket: once a peer sees its connection closed,
    // its place is free again.
    _permit: Permit,
    inner: T,
    conn: Arc<ConnState>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            this.conn.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request in flight until it is done.
pub(crate) struct InFlightBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body on a listener whose bodies are timed (control, admin):
/// past its [`BodyBound`] it ends with an error and the connection is cut.
pub struct BoundedBody {
    inner: Incoming,
    timer: Option<BodyTimer>,
    /// The bound was broken: the connection is being cut.
    cut: bool,
}

struct BodyTimer {
    bound: BodyBound,
    started: tokio::time::Instant,
    received: u64,
    sleep: Pin<Box<tokio::time::Sleep>>,
    gate: Arc<Gate>,
    conn: Arc<ConnState>,
}

/// What a request body that broke its bound ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived too slowly")]
pub struct BodyTooSlow;

impl BoundedBody {
    fn new(inner: Incoming, gate: &Arc<Gate>, conn: &Arc<ConnState>) -> Self {
        let timer = match gate.bounds.body {
            Some(bound) if !inner.is_end_stream() => {
                let started = tokio::time::Instant::now();
                Some(BodyTimer {
                    bound,
                    started,
                    received: 0,
                    sleep: Box::pin(tokio::time::sleep_until(started + bound.allowed(0))),
                    gate: gate.clone(),
                    conn: conn.clone(),
                })
            }
            _ => None,
        };
        Self { inner, timer, cut: false }
    }
}

impl Body for BoundedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(Some(Err(Box::new(BodyTooSlow))));
        }
        // The bytes first: a body that has arrived is never cut for the
        // handler's slowness in reading it.
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(timer), Some(data)) = (this.timer.as_mut(), frame.data_ref()) {
                    timer.received += data.len() as u64;
                    let deadline = timer.started + timer.bound.allowed(timer.received);
                    timer.sleep.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.timer = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some(timer) = this.timer.as_mut()
                    && timer.sleep.as_mut().poll(cx).is_ready()
                {
                    timer.gate.breach(Breach::BodyTimeout);
                    tracing::debug!(listener = timer.gate.bounds.listener.label(), "request body too slow: cut");
                    timer.conn.cut.notify_one();
                    this.timer = None;
                    this.cut = true;
                    // Not the error yet: on HTTP/1 the handler would answer
                    // it (axum: 400) in this very poll. The connection's
                    // task drops the connection first (its select is
                    // biased to the cut); on HTTP/2, where the handler has
                    // a task of its own, the next poll ends the body.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.cut && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection builder with the listener's head size bound. The head
/// timeout is the watchdog's (see the module's note).
pub(crate) fn builder(max_header_bytes: Option<usize>) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);
    if let Some(max) = max_header_bytes {
        // hyper answers 431 itself when the head does not fit (HTTP/1.1),
        // and refuses an oversized header list (HTTP/2).
        builder.http1().max_buf_size(max.max(8192));
        builder.http2().max_header_list_size(max as u32);
    }
    builder
}

/// A connection admitted under its listener's caps.
pub(crate) struct Accepted {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    permit: Permit,
}

/// Admits a just-accepted connection through `gate`, or closes it (the
/// breach is counted).
pub(crate) fn admit(gate: &Arc<Gate>, stream: TcpStream, peer: SocketAddr) -> Option<Accepted> {
    match gate.admit(peer.ip()) {
        Ok(permit) => {
            let _ = stream.set_nodelay(true);
            Some(Accepted { stream, peer, permit })
        }
        Err(breach) => {
            // Debug, not warn: a flood of these must not flood the log too.
            tracing::debug!(listener = gate.bounds.listener.label(), %peer, reason = breach.label(), "connection refused");
            None
        }
    }
}

/// How long an idle connection's graceful close may take before it is
/// dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves one admitted connection with `make_service`'s service until it
/// ends, the head watchdog fires or a bound cuts it. `drain`: the runner's
/// shutdown (the connection then closes gracefully, and the runner waits
/// for the receiver to drop). Breaches are counted before the socket
/// closes: a peer that sees the close finds it in `/metrics`.
pub(crate) async fn serve_connection<F, S, B>(
    accepted: Accepted,
    tls: Option<TlsAcceptor>,
    gate: Arc<Gate>,
    builder: auto::Builder<TokioExecutor>,
    drain: Option<watch::Receiver<()>>,
    make_service: F,
) where
    F: FnOnce(&Arc<ConnState>) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let accepted_at = tokio::time::Instant::now();
    let Accepted { stream, peer, permit } = accepted;
    let conn = ConnState::new();
    let inner = make_service(&conn);
    let tracked = conn.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let in_flight = tracked.begin(request.version());
        let answer = inner.call(request);
        async move {
            let response = answer.await?;
            Ok::<_, S::Error>(response.map(|body| InFlightBody { inner: body, _in_flight: in_flight }))
        }
    });
    let io = CountingIo { _permit: permit, inner: stream, conn: conn.clone() };
    let head = HeadBound {
        gate: &gate,
        conn: &conn,
        peer,
        // The first head is due this long after the accept, TLS handshake included.
        first_deadline: accepted_at + gate.bounds.header_timeout,
    };
    let serve = async {
        match tls {
            None => run(builder, TokioIo::new(io), service, drain, &head).await,
            Some(acceptor) => {
                let handshake_deadline = head.first_deadline.min(accepted_at + TLS_HANDSHAKE_TIMEOUT);
                // Pinned here so the socket outlives a timed-out handshake
                // until its breach is counted; the timeout (and its timer)
                // ends with the `let`.
                let handshake = acceptor.accept(io);
                tokio::pin!(handshake);
                let shaken = tokio::time::timeout_at(handshake_deadline, handshake.as_mut()).await;
                match shaken {
                    Ok(Ok(stream)) if crate::tls::is_acme_tls_alpn(stream.get_ref().1) => {
                        close_acme_tls_alpn(stream, peer).await;
                    }
                    Ok(Ok(stream)) => run(builder, TokioIo::new(stream), service, drain, &head).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => head.timed_out(),
                }
            }
        }
    };
    tokio::select! {
        // A cut first (counted where the bound broke): see `BoundedBody::poll_frame`.
        biased;
        () = conn.cut.notified() => {}
        () = serve => {}
    }
}

/// A TLS-ALPN-01 validation's connection (RFC 8737 §3): the handshake with
/// the challenge certificate was the whole answer; it is closed (a
/// close_notify, at most a second's wait) and no HTTP is served on it.
async fn close_acme_tls_alpn<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, peer: SocketAddr) {
    use tokio::io::AsyncWriteExt as _;
    tracing::debug!(%peer, "TLS-ALPN-01 validation answered; closing");
    let _ = tokio::time::timeout(ACME_CLOSE_GRACE, stream.shutdown()).await;
}

/// How long closing a TLS-ALPN-01 validation's connection may take.
const ACME_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A connection's head timeout, and where its breach is counted.
struct HeadBound<'a> {
    gate: &'a Gate,
    conn: &'a ConnState,
    peer: SocketAddr,
    first_deadline: tokio::time::Instant,
}

impl HeadBound<'_> {
    /// The head timeout passed: a breach unless the connection was merely
    /// idle between requests.
    fn timed_out(&self) {
        if !self.conn.idle_keep_alive() {
            tracing::debug!(
                listener = self.gate.bounds.listener.label(),
                peer = %self.peer,
                "no request head within the head timeout: cut"
            );
            self.gate.breach(Breach::HeadTimeout);
        }
    }
}

/// Runs the connection until it ends; at the head timeout, drops it when
/// a head was under way (or never came), else closes it gracefully.
async fn run<I, S, B>(
    builder: auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    drain: Option<watch::Receiver<()>>,
    head: &HeadBound<'_>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let watchdog = head.conn.head_watchdog(head.first_deadline, head.gate.bounds.header_timeout);
    tokio::pin!(watchdog);
    // The receiver lives until the connection ends: the runner's drain
    // waits for every one to drop.
    let mut drain = drain;
    let drain_signal = async {
        match drain.as_mut() {
            // Sent at shutdown (or its sender gone): either way, drain.
            Some(drain) => {
                let _ = drain.changed().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(drain_signal);
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    let (mut draining, mut closing_idle) = (false, false);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    // hyper's own HTTP/1 head timeout (the second line).
                    if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                        if !closing_idle {
                            head.timed_out();
                        }
                    } else {
                        tracing::trace!(peer = %head.peer, error = %e, "connection ended with an error");
                    }
                }
                return;
            }
            () = &mut drain_signal, if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            () = &mut watchdog, if !closing_idle && !draining => {
                if !head.conn.idle_keep_alive() {
                    // A head under way, or never one: counted, then dropped unanswered.
                    head.timed_out();
                    return;
                }
                connection.as_mut().graceful_shutdown();
                grace.as_mut().reset(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                closing_idle = true;
            }
            () = &mut grace, if closing_idle => return,
        }
    }
}

/// The address a request's connection came from, in its extensions (for a
/// service of [`serve_bounded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Serves `service` on `listener` within `bounds` until the task is
/// dropped: the control plane's and the admin listener's loop. Request
/// bodies reach the service as [`BoundedBody`].
pub async fn serve_bounded<S, B>(listener: TcpListener, bounds: ListenerBounds, metrics: ListenerMetrics, service: S)
where
    S: Service<Request<BoundedBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_bounded_with(listener, None, bounds, metrics, service).await;
}

/// [`serve_bounded`] over TLS (`tls`: ALPN h2 and http/1.1, certificates by
/// SNI, see [`crate::tls_acceptor`]): each connection's handshake within
/// the TLS handshake timeout and the head timeout, as on the runner's own
/// TLS listener (`isocloud edge --tls-listen`).
pub async fn serve_bounded_tls<S, B>(
    listener: TcpListener,
    tls: TlsAcceptor,
    bounds: ListenerBounds,
    metrics: ListenerMetrics,
    service: S,
) where
    S: Service<Request<BoundedBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_bounded_with(listener, Some(tls), bounds, metrics, service).await;
}

async fn serve_bounded_with<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    bounds: ListenerBounds,
    metrics: ListenerMetrics,
    service: S,
) where
    S: Service<Request<BoundedBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = builder(None);
    let gate = Gate::new(bounds, metrics);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = gate.bounds.listener.label(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(accepted) = admit(&gate, stream, peer) else { continue };
        let service = service.clone();
        let for_bodies = gate.clone();
        tokio::spawn(serve_connection(
            accepted,
            tls.clone(),
            gate.clone(),
            builder.clone(),
            None,
            move |conn: &Arc<ConnState>| {
                let conn = conn.clone();
                service_fn(move |request: Request<Incoming>| {
                    let mut request = request.map(|body| BoundedBody::new(body, &for_bodies, &conn));
                    request.extensions_mut().insert(PeerAddr(peer));
                    service.call(request)
                })
            },
        ));
    }
}
