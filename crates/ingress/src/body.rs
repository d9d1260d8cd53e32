//! Response bodies: the isolate's streamed through untouched, or our own.

use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

use crate::isolates::Upstream;
use crate::streams::{Activity, StreamCut, Watch};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ResponseBody {
    http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A response body that keeps its request counted as in flight until it is
/// done (its [`Watch`] holds the guard), so an isolate streaming a long
/// answer is never mistaken for idle; and that ends with an error when a
/// stream bound cuts it.
pub struct Tracked<B> {
    /// `None` once cut: the isolate's side is dropped at once.
    inner: Option<B>,
    isolate: Arc<dyn Upstream>,
    watch: Arc<Watch>,
    /// A traced request's span: it ends when the body is dropped.
    span: Option<crate::trace::Traced>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, isolate: Arc<dyn Upstream>, watch: Arc<Watch>) -> Self {
        Self { inner: Some(inner), isolate, watch, span: None }
    }

    pub fn with_span(mut self, span: Option<crate::trace::Traced>) -> Self {
        self.span = span;
        self
    }
}

impl<B: Body + Unpin> Body for Tracked<B>
where
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        if let Poll::Ready(bound) = this.watch.poll_cut(cx) {
            this.inner = None;
            return Poll::Ready(Some(Err(Box::new(StreamCut(bound)))));
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.isolate.count_egress(data.remaining() as u64);
                    this.watch.activity().touch();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.watch.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.watch.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|inner| inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(|inner| inner.size_hint()).unwrap_or_default()
    }
}

/// A request body that counts what it carries into an isolate and cuts it
/// off where it passes the edge's bound (the declared length was checked
/// before; this catches bodies without one).
pub struct Counted<B> {
    inner: B,
    isolate: Arc<dyn Upstream>,
    remaining_bytes: usize,
    exceeded: Arc<AtomicBool>,
    /// Bytes still coming in keep a streaming response from idling out.
    activity: Arc<Activity>,
}

impl<B> Counted<B> {
    /// `exceeded` is set if the body passes `limit_bytes`.
    pub fn new(
        inner: B,
        isolate: Arc<dyn Upstream>,
        limit_bytes: usize,
        exceeded: Arc<AtomicBool>,
        activity: Arc<Activity>,
    ) -> Self {
        Self { inner, isolate, remaining_bytes: limit_bytes, exceeded, activity }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the runner allows")]
pub struct BodyTooLarge;

impl<B: Body + Unpin> Body for Counted<B>
where
    B::Data: Buf,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.remaining();
                    if len > self.remaining_bytes {
                        self.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining_bytes -= len;
                    self.isolate.count_ingress(len as u64);
                    self.activity.touch();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
