//! Bounds on what outlives a response's headers: upgraded connections
//! (WebSockets) and response bodies. Each holds its request's [`InFlightGuard`]
//! guard, so its isolate counts as busy and can be neither reaped nor
//! evicted; without a bound, a few idle WebSockets would hold every
//! `--max-isolates` slot forever (issue 11, row 9).
//!
//! One sweeper per proxy looks at every live stream a few times per idle
//! period, rather than a timer per stream polled by the stream itself: a
//! stream whose client stopped reading is never polled, and must still end.
//! A cut drops the guard at once (the isolate may become idle), then wakes
//! the stream so it closes both sides.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::EdgeMetrics;
use crate::isolates::InFlightGuard;

/// How long a stream may last once its response's headers are sent.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// No byte either way for this long: closed.
    pub idle_timeout: Duration,
    /// Closed this long after the response's headers, however busy.
    pub max_lifetime: Duration,
}

/// What kind of stream a bound ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// An upgraded connection (a WebSocket), both ways.
    Upgrade,
    /// A response body (and its request's body, if that still streams).
    Body,
}

impl StreamKind {
    fn as_str(self) -> &'static str {
        match self {
            StreamKind::Upgrade => "upgrade",
            StreamKind::Body => "body",
        }
    }
}

/// Which bound ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    Idle,
    Lifetime,
}

impl Bound {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Bound::Idle => "idle",
            Bound::Lifetime => "lifetime",
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Bound::Idle),
            2 => Some(Bound::Lifetime),
            _ => None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Bound::Idle => 1,
            Bound::Lifetime => 2,
        }
    }
}

/// The error a cut body ends with: the client sees the stream aborted
/// (HTTP/1.1: the connection closes before the body's end; HTTP/2: the
/// stream is reset), never a truncated body passed off as complete.
#[derive(Debug, thiserror::Error)]
#[error("the stream was closed by the runner's {} bound", .0.as_str())]
pub(crate) struct StreamCut(pub(crate) Bound);

/// When a byte last went either way through one request's streams.
pub(crate) struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self { origin: Instant::now(), last_ms: AtomicU64::new(0) })
    }

    pub(crate) fn touch(&self) {
        self.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self, now: Instant) -> Duration {
        let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }
}

/// The live streams of one proxy, and their sweeper.
#[derive(Clone)]
pub(crate) struct Streams {
    registry: Arc<Registry>,
}

struct Registry {
    limits: StreamLimits,
    metrics: EdgeMetrics,
    watches: Mutex<HashMap<u64, Weak<Watch>>>,
    next_id: AtomicU64,
}

impl Streams {
    /// Starts the sweeper (on the current tokio runtime); it ends with the
    /// last clone.
    pub(crate) fn new(limits: StreamLimits, metrics: EdgeMetrics) -> Self {
        let registry =
            Arc::new(Registry { limits, metrics, watches: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1) });
        tokio::spawn(sweep(Arc::downgrade(&registry)));
        Self { registry }
    }

    /// Watches a stream that holds `guard` from now on.
    pub(crate) fn watch(
        &self,
        kind: StreamKind,
        guard: InFlightGuard,
        activity: Arc<Activity>,
        deployment_id: &str,
        request_id: &str,
    ) -> Arc<Watch> {
        // The clock of a stream starts with its response, whatever the
        // request's body did before.
        activity.touch();
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch {
            id,
            registry: self.registry.clone(),
            kind,
            started: Instant::now(),
            activity,
            guard: Mutex::new(Some(guard)),
            cut: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            deployment_id: deployment_id.to_owned(),
            request_id: request_id.to_owned(),
        });
        self.registry.watches.lock().expect("streams poisoned").insert(id, Arc::downgrade(&watch));
        watch
    }
}

/// How often the sweeper looks: a fraction of the shorter bound, so a
/// stream ends at most that much after its bound.
fn sweep_interval(limits: &StreamLimits) -> Duration {
    (limits.idle_timeout.min(limits.max_lifetime) / 8).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

async fn sweep(registry: Weak<Registry>) {
    let interval = match registry.upgrade() {
        Some(registry) => sweep_interval(&registry.limits),
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(registry) = registry.upgrade() else { return };
        let live: Vec<Arc<Watch>> =
            registry.watches.lock().expect("streams poisoned").values().filter_map(Weak::upgrade).collect();
        let now = Instant::now();
        for watch in live {
            if let Some(bound) = watch.breached(&registry.limits, now) {
                watch.cut(bound);
            }
        }
    }
}

/// One stream under watch: holds its request's in-flight guard until the
/// stream ends or a bound cuts it.
pub(crate) struct Watch {
    id: u64,
    registry: Arc<Registry>,
    kind: StreamKind,
    started: Instant,
    activity: Arc<Activity>,
    guard: Mutex<Option<InFlightGuard>>,
    /// 0 while live, else the [`Bound`] that cut it.
    cut: AtomicU8,
    /// The stream's task, woken by a cut.
    waker: AtomicWaker,
    deployment_id: String,
    request_id: String,
}

impl Watch {
    pub(crate) fn activity(&self) -> &Activity {
        &self.activity
    }

    fn breached(&self, limits: &StreamLimits, now: Instant) -> Option<Bound> {
        if self.guard.lock().expect("watch poisoned").is_none() {
            return None;
        }
        if now.saturating_duration_since(self.started) >= limits.max_lifetime {
            Some(Bound::Lifetime)
        } else if self.activity.idle_for(now) >= limits.idle_timeout {
            Some(Bound::Idle)
        } else {
            None
        }
    }

    /// The bound that cut this stream, if one did.
    pub(crate) fn cut_by(&self) -> Option<Bound> {
        Bound::from_u8(self.cut.load(Ordering::Acquire))
    }

    /// Resolves once a bound cuts the stream.
    pub(crate) async fn cut_signal(&self) -> Bound {
        poll_fn(|cx| self.poll_cut(cx)).await
    }

    pub(crate) fn poll_cut(&self, cx: &mut Context<'_>) -> Poll<Bound> {
        self.waker.register(cx.waker());
        match self.cut_by() {
            Some(bound) => Poll::Ready(bound),
            None => Poll::Pending,
        }
    }

    /// The stream ended by itself: its request is no longer in flight.
    pub(crate) fn finish(&self) {
        drop(self.guard.lock().expect("watch poisoned").take());
    }

    fn cut(&self, bound: Bound) {
        let Some(guard) = self.guard.lock().expect("watch poisoned").take() else { return };
        self.cut.store(bound.to_u8(), Ordering::Release);
        let limits = &self.registry.limits;
        let (limit_s, why) = match bound {
            Bound::Idle => (
                limits.idle_timeout.as_secs_f64(),
                "no bytes either way for the idle timeout (--stream-idle-timeout-s)",
            ),
            Bound::Lifetime => {
                (limits.max_lifetime.as_secs_f64(), "open for the maximum lifetime (--stream-max-lifetime-s)")
            }
        };
        // The tenant learns it in its own logs, with the request's id.
        guard.note(
            isocloud_protocol::LogLevel::Warning,
            format!("[isocloud] {} closed by the runner after {limit_s} s: {why}", self.kind.as_str()),
            Some(self.request_id.clone()),
        );
        // The isolate may be idle (reaped, evicted) from here on, even if the
        // stream's client never reads again and so never lets it close.
        drop(guard);
        self.waker.wake();
        self.registry.metrics.count_stream_cut(self.kind.as_str(), bound.as_str());
        tracing::warn!(
            deployment_id = self.deployment_id,
            request_id = self.request_id,
            stream = self.kind.as_str(),
            bound = bound.as_str(),
            limit_s,
            lived_s = self.started.elapsed().as_secs_f64(),
            "stream closed by the runner: {why}"
        );
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.registry.watches.lock().expect("streams poisoned").remove(&self.id);
    }
}

/// An upgraded connection's half that marks activity whenever bytes arrive
/// (each byte read from one side is written to the other).
pub(crate) struct Active<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Active<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweeper_looks_often_enough_but_not_too_often() {
        let limits = |idle_s, life_s| StreamLimits {
            idle_timeout: Duration::from_secs(idle_s),
            max_lifetime: Duration::from_secs(life_s),
        };
        assert_eq!(sweep_interval(&limits(60, 3600)), Duration::from_secs(1));
        assert_eq!(sweep_interval(&limits(1, 3600)), Duration::from_millis(125));
        assert_eq!(sweep_interval(&limits(1, 1)), Duration::from_millis(125));
    }

    #[test]
    fn activity_counts_from_the_last_touch() {
        let activity = Activity::new();
        let later = Instant::now() + Duration::from_secs(5);
        assert!(activity.idle_for(later) >= Duration::from_secs(5));
        activity.touch();
        assert!(activity.idle_for(Instant::now()) < Duration::from_secs(1));
    }
}
