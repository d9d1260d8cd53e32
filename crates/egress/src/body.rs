//! Bodies streamed through the proxy, counted as they pass.

use std::any::Any;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

use crate::grant::GrantState;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// Adds every data frame's length to one counter of `grant` (`counter`
/// picks which); keeps `keep` (the upstream connection, the hop link) alive
/// until the body is done or dropped.
pub(crate) struct Counted<B> {
    inner: B,
    grant: Arc<GrantState>,
    counter: fn(&GrantState) -> &AtomicU64,
    keep: Option<Box<dyn Any + Send + Sync>>,
}

impl<B> Counted<B> {
    pub(crate) fn new(
        inner: B,
        grant: Arc<GrantState>,
        counter: fn(&GrantState) -> &AtomicU64,
        keep: Option<Box<dyn Any + Send + Sync>>,
    ) -> Self {
        Self { inner, grant, counter, keep }
    }
}

impl<B> Body for Counted<B>
where
    B: Body + Unpin,
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
                if let Some(data) = frame.data_ref() {
                    (self.counter)(&self.grant).fetch_add(data.remaining() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.keep = None,
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
