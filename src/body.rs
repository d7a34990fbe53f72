//! The body type that flows through the gateway in both directions.
//!
//! An enum rather than a boxed trait object: the common cases (empty, a fixed
//! buffer, a streamed hyper body) cost no allocation. Streamed variants carry
//! the bookkeeping the proxy needs at end of stream: returning the upstream
//! connection to its pool and ending the whole-request deadline.

use crate::error::BoxError;
use crate::upstream::pool::Lease;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::sync::Notify;
use tokio::time::Sleep;

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    /// A streamed body passed through untouched.
    Incoming(Incoming),
    /// A client request body streamed upstream; flags `done` at its end so the
    /// connection is only reused once the request was fully written.
    Request {
        inner: Incoming,
        done: Arc<BodyDone>,
    },
    /// An upstream response body streamed to the client.
    Response(ResponseBody),
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

pub struct ResponseBody {
    inner: Incoming,
    lease: Option<Lease>,
    deadline: Option<Pin<Box<Sleep>>>,
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

    pub fn response(inner: Incoming, lease: Lease, deadline: Option<Pin<Box<Sleep>>>) -> Body {
        let mut body = ResponseBody {
            inner,
            lease: Some(lease),
            deadline,
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

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request timeout exceeded while streaming the response body")
    }
}

impl std::error::Error for DeadlineExceeded {}

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
            Body::Request { inner, done } => {
                let r = ready!(Pin::new(&mut *inner).poll_frame(cx));
                match &r {
                    None => done.set(),
                    Some(Ok(f)) if f.is_trailers() || inner.is_end_stream() => done.set(),
                    _ => {}
                }
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Body::Response(b) => {
                if let Some(d) = b.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        b.lease = None;
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
            Body::Request { inner, .. } => inner.is_end_stream(),
            Body::Response(b) => b.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(i) => i.size_hint(),
            Body::Request { inner, .. } => inner.size_hint(),
            Body::Response(b) => b.inner.size_hint(),
        }
    }
}
