//! What the edge asks of the pool, as a seam: [`isocloud_pool::Pool`] in the
//! runner, a fake in the in-process tests (no root, no deno, no sockets).
//! The proxy sees an isolate only through these traits: it is reserved,
//! forwarded to, counted, and released; how it was booted is the pool's.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::BodyExt;
use isocloud_origin::Origin;
use isocloud_pool::{BootError, ForwardError, InFlight, Isolate, Pool, RequestBody};
use isocloud_protocol::LogLevel;

use crate::body::ResponseBody;

/// Held while a request (or its response body, or its upgraded connection)
/// is inside an isolate: the pool counts the isolate busy until it drops.
pub trait RequestGuard: Send + Sync {
    /// A note of the runner's about the request (a stream it cut) into the
    /// deployment's own logs.
    fn note(&self, level: LogLevel, message: String, request_id: Option<String>);
}

pub type InFlightGuard = Box<dyn RequestGuard>;

/// The isolates of deployments, booted on demand.
pub trait Isolates: Send + Sync + 'static {
    /// The running isolate of (`origin`, `deployment_id`), booted if need
    /// be (concurrent callers share one boot), and reserved: nothing ends it
    /// before its request begins. A refusal carries its [`ErrorCode`] in
    /// [`BootError::code`].
    ///
    /// [`ErrorCode`]: isocloud_protocol::ErrorCode
    fn isolate<'a>(
        &'a self,
        origin: &'a Arc<dyn Origin>,
        deployment_id: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Reservation>, BootError>>;

    /// Refuses new boots and ends every isolate.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// An isolate reserved for one request.
pub trait Reservation: Send {
    fn upstream(&self) -> Arc<dyn Upstream>;

    /// The request begins: the reservation becomes its in-flight guard;
    /// `hops` is how many isolates of the cloud it passed through already.
    fn begin_request(self: Box<Self>, hops: u32) -> InFlightGuard;

    /// The request waited for a boot (its span says `boot`, else `warm`).
    fn booted(&self) -> bool {
        false
    }
}

/// One isolate, as the edge forwards to it and counts what it served.
pub trait Upstream: Send + Sync + 'static {
    /// Sends `request` in (HTTP/1.1) and answers with the isolate's response
    /// head; its body streams. An upgrade's `OnUpgrade` is in the
    /// response's extensions.
    fn forward(
        self: Arc<Self>,
        request: Request<RequestBody>,
    ) -> BoxFuture<'static, Result<Response<ResponseBody>, ForwardError>>;
    fn count_ingress(&self, bytes: u64);
    fn count_egress(&self, bytes: u64);
    /// A request's answer: its status (the tenant's, or the runner's for
    /// it: a crash, a limit, a timeout) and its time from the request's
    /// head to the response head. Counted per deployment in its usage.
    fn count_response(&self, status: u16, elapsed: std::time::Duration);

    /// The CPU the isolate has used so far, read now (traced requests only).
    fn cpu_time(&self) -> Option<std::time::Duration> {
        None
    }
}

impl Isolates for Pool {
    fn isolate<'a>(
        &'a self,
        origin: &'a Arc<dyn Origin>,
        deployment_id: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Reservation>, BootError>> {
        async move {
            let (reserved, booted) = Pool::isolate_and_start(self, origin, deployment_id).await?;
            let upstream: Arc<dyn Upstream> = reserved.isolate().clone();
            // Dropped unused, the closure drops the reservation, which
            // releases the isolate as the pool's own type does.
            let begin = Box::new(move |hops| Box::new(reserved.begin_request(hops)) as InFlightGuard);
            Ok(Box::new(PoolReservation { upstream, begin, booted }) as Box<dyn Reservation>)
        }
        .boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Pool::shutdown(self).boxed()
    }
}

/// The pool's reservation behind the seam.
struct PoolReservation {
    upstream: Arc<dyn Upstream>,
    begin: Box<dyn FnOnce(u32) -> InFlightGuard + Send>,
    booted: bool,
}

impl Reservation for PoolReservation {
    fn upstream(&self) -> Arc<dyn Upstream> {
        self.upstream.clone()
    }

    fn begin_request(self: Box<Self>, hops: u32) -> InFlightGuard {
        (self.begin)(hops)
    }

    fn booted(&self) -> bool {
        self.booted
    }
}

impl RequestGuard for InFlight {
    fn note(&self, level: LogLevel, message: String, request_id: Option<String>) {
        self.isolate().note(level, message, request_id);
    }
}

impl Upstream for Isolate {
    fn forward(
        self: Arc<Self>,
        request: Request<RequestBody>,
    ) -> BoxFuture<'static, Result<Response<ResponseBody>, ForwardError>> {
        async move {
            let response = Isolate::forward(&self, request).await?;
            Ok(response.map(|body| body.map_err(Into::into).boxed()))
        }
        .boxed()
    }

    fn count_ingress(&self, bytes: u64) {
        Isolate::count_ingress(self, bytes);
    }

    fn count_egress(&self, bytes: u64) {
        Isolate::count_egress(self, bytes);
    }

    fn count_response(&self, status: u16, elapsed: std::time::Duration) {
        Isolate::count_response(self, status, elapsed);
    }

    fn cpu_time(&self) -> Option<std::time::Duration> {
        Isolate::cpu_time(self)
    }
}
