//! The body type that flows through the gateway in both directions.
//!
//! An enum rather than a boxed trait object: the common cases (empty, a fixed
//! buffer, a streamed hyper body) cost no allocation. Streamed variants carry
//! the bookkeeping the proxy needs at end of stream: returning the upstream
//! connection to its pool and ending the whole-request deadline.

use crate::error::{BoxError, ErrorKind, GatewayError};
use crate::upstream::pool::Lease;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Sleep;

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    /// A streamed body passed through untouched.
    Incoming(Incoming),
    /// A client request body under the listener's (or route's) limits:
    /// size and time between reads. Flags `done` at its end so the upstream
    /// connection is only reused once the request was fully written.
    Client(Box<ClientBody>),
    /// An upstream response body streamed to the client.
    Response(ResponseBody),
    /// A body that keeps something alive (a concurrency-limit slot) until
    /// it ends or is dropped.
    Held(Box<Held>),
}

/// Something kept alive as long as a response (or a tunnel) needs it.
#[derive(Clone)]
pub struct Keep(pub Arc<dyn Send + Sync>);

pub struct Held {
    pub body: Body,
    pub keep: Option<Keep>,
}

/// Set once a request body has been read to its end (and so fully handed to
/// the upstream connection); awaitable.
#[derive(Default)]
pub struct BodyDone {
    flag: AtomicBool,
    notify: Notify,
}

impl BodyDone {
    pub fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub async fn wait(&self) {
        loop {
            // Registered before the check, so a `set` in between is not lost.
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

/// Why a client body was cut short by the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The body exceeded this many bytes.
    TooLarge(u64),
    /// No body data arrived for this long.
    Timeout(Duration),
    /// The client's body framing was invalid (bad chunk size, truncated).
    Malformed,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(n) => write!(f, "request body larger than {n} bytes"),
            BodyError::Timeout(t) => write!(f, "no request body data for {t:?}"),
            BodyError::Malformed => f.write_str("malformed or truncated request body"),
        }
    }
}

impl std::error::Error for BodyError {}

impl BodyError {
    /// Finds a `BodyError` in an error's source chain (e.g. inside the
    /// upstream client's error when the body it was sending failed).
    pub fn find<'a>(mut e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
        loop {
            if let Some(b) = e.downcast_ref::<BodyError>() {
                return Some(b);
            }
            e = e.source()?;
        }
    }
}

pub struct ClientBody {
    inner: Incoming,
    /// Bytes still allowed (`u64::MAX`: unlimited).
    remaining: u64,
    limit: u64,
    idle: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    done: Option<Arc<BodyDone>>,
    /// The route whose `portico_request_body_bytes` counts this body (added
    /// once, when the body is dropped).
    tally: Option<Arc<crate::metrics::RouteMetrics>>,
    /// The request's access-log byte count (set only when logging is on).
    log_tally: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(t) = &self.tally {
            t.add_bytes_in(self.limit - self.remaining);
        }
        if let Some(t) = &self.log_tally {
            t.fetch_add(
                self.limit - self.remaining,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

impl ClientBody {
    pub fn new(inner: Incoming, limit: u64, idle: Option<Duration>) -> ClientBody {
        ClientBody {
            inner,
            remaining: limit,
            limit,
            idle,
            timer: None,
            done: None,
            tally: None,
            log_tally: None,
        }
    }

    /// Also adds the bytes read to `n` (the access log's `bytes_in`).
    pub fn count_also(mut self, n: Option<Arc<std::sync::atomic::AtomicU64>>) -> ClientBody {
        self.log_tally = n;
        self
    }

    /// Counts the bytes read into `route`'s request body bytes.
    pub fn count_into(mut self, route: Arc<crate::metrics::RouteMetrics>) -> ClientBody {
        self.tally = Some(route);
        self
    }

    /// Lowers the limit to `max` bytes (a policy's own, smaller limit);
    /// a larger `max` changes nothing. Bytes already read still count.
    pub fn lower_limit(&mut self, max: u64) {
        if max < self.limit {
            let read = self.limit - self.remaining;
            self.limit = max.max(read);
            self.remaining = max.saturating_sub(read);
        }
    }

    /// Sets `done` once the body has been read to its end.
    pub fn track(&mut self, done: Arc<BodyDone>) {
        self.done = Some(done);
    }

    fn finish(&self) {
        if let Some(d) = &self.done {
            d.set();
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                if let Some(idle) = self.idle {
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(BodyError::Timeout(idle).into())));
                    }
                }
                return Poll::Pending;
            }
            Poll::Ready(r) => r,
        };
        match &r {
            None => self.finish(),
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    let n = data.len() as u64;
                    if n > self.remaining {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(self.limit).into())));
                    }
                    self.remaining -= n;
                }
                if f.is_trailers() || self.inner.is_end_stream() {
                    self.finish();
                }
                if let (Some(idle), Some(t)) = (self.idle, self.timer.as_mut()) {
                    t.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
            // Bad framing from the client is the client's fault, never the
            // upstream's (it must not count against the upstream's health).
            Some(Err(_)) => return Poll::Ready(Some(Err(BodyError::Malformed.into()))),
        }
        Poll::Ready(r.map(|r| r.map_err(Into::into)))
    }
}

pub struct ResponseBody {
    inner: Incoming,
    lease: Option<Lease>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// A gRPC response: a deadline mid-body ends it with DEADLINE_EXCEEDED
    /// trailers (what gRPC clients read) rather than a reset.
    grpc: bool,
    /// Ended by the gateway (those trailers sent).
    ended: bool,
}

impl Body {
    pub fn empty() -> Body {
        Body::Empty
    }

    pub fn full(b: impl Into<Bytes>) -> Body {
        let b = b.into();
        if b.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(b))
        }
    }

    pub fn response(
        inner: Incoming,
        lease: Lease,
        deadline: Option<Pin<Box<Sleep>>>,
        grpc: bool,
    ) -> Body {
        let mut body = ResponseBody {
            inner,
            lease: Some(lease),
            deadline,
            grpc,
            ended: false,
        };
        body.release_if_done();
        Body::Response(body)
    }
}

impl ResponseBody {
    fn release_if_done(&mut self) {
        if http_body::Body::is_end_stream(&self.inner) {
            if let Some(lease) = self.lease.take() {
                lease.release();
            }
        }
    }
}

/// The error when a whole-request deadline expires mid-body.
#[derive(Debug)]
pub struct DeadlineExceeded;

const DEADLINE_MESSAGE: &str = "request timeout exceeded while streaming the response body";

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(DEADLINE_MESSAGE)
    }
}

impl std::error::Error for DeadlineExceeded {}

/// The trailers that end a gRPC response cut at the deadline.
fn grpc_deadline_status() -> http::HeaderMap {
    GatewayError::new(ErrorKind::UpstreamTimeout, DEADLINE_MESSAGE).grpc_status_headers()
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Body::Client(c) => c.poll_frame(cx),
            Body::Held(h) => {
                let r = ready!(Pin::new(&mut h.body).poll_frame(cx));
                if !matches!(r, Some(Ok(_))) {
                    h.keep = None;
                }
                Poll::Ready(r)
            }
            Body::Response(b) => {
                if b.ended {
                    return Poll::Ready(None);
                }
                if let Some(d) = b.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        b.lease = None;
                        if b.grpc {
                            b.ended = true;
                            return Poll::Ready(Some(Ok(Frame::trailers(grpc_deadline_status()))));
                        }
                        return Poll::Ready(Some(Err(DeadlineExceeded.into())));
                    }
                }
                let r = ready!(Pin::new(&mut b.inner).poll_frame(cx));
                match &r {
                    None => {
                        if let Some(l) = b.lease.take() {
                            l.release()
                        }
                    }
                    Some(Ok(f)) if f.is_trailers() => {
                        if let Some(l) = b.lease.take() {
                            l.release()
                        }
                    }
                    Some(Ok(_)) => b.release_if_done(),
                    Some(Err(_)) => b.lease = None,
                }
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Incoming(i) => i.is_end_stream(),
            Body::Client(c) => c.inner.is_end_stream(),
            Body::Response(b) => b.ended || b.inner.is_end_stream(),
            Body::Held(h) => h.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(i) => i.size_hint(),
            Body::Client(c) => c.inner.size_hint(),
            Body::Response(b) => b.inner.size_hint(),
            Body::Held(h) => h.body.size_hint(),
        }
    }
}
