//! Response bodies: the isolate's streamed through untouched, or our own.

use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use isocloud_pool::{InFlight, Isolate};

pub type ResponseBody = BoxBody<Bytes, hyper::Error>;

pub fn full(bytes: Bytes) -> ResponseBody {
    http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A body that keeps its request counted as in flight until it is done, so
/// an isolate streaming a long answer is never mistaken for idle.
pub struct Tracked<B> {
    inner: B,
    guard: Option<InFlight>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: InFlight) -> Self {
        Self { inner, guard: Some(guard) }
    }
}

impl<B: Body + Unpin> Body for Tracked<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(guard)) = (frame.data_ref(), &self.guard) {
                    guard.isolate().count_egress(data.remaining() as u64);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.guard = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that counts what it carries into an isolate and cuts it
/// off where it passes the edge's bound (the declared length was checked
/// before; this catches bodies without one).
pub struct Counted<B> {
    inner: B,
    isolate: Arc<Isolate>,
    remaining_bytes: usize,
    exceeded: Arc<AtomicBool>,
}

impl<B> Counted<B> {
    /// `exceeded` is set if the body passes `limit_bytes`.
    pub fn new(inner: B, isolate: Arc<Isolate>, limit_bytes: usize, exceeded: Arc<AtomicBool>) -> Self {
        Self { inner, isolate, remaining_bytes: limit_bytes, exceeded }
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
