//! What happened to one request, recorded once when it is over.
//!
//! `service::handle` starts an [`Outcome`] when a request arrives, fills in
//! what it learns (route, status, the gateway error if any) and hands it to
//! the response body ([`Observed`]), which counts the body bytes sent. The
//! outcome is finished when it is dropped: when hyper is done with the
//! response body (sent, or the client went away), or when the request's
//! future is dropped before any response existed (the client left first:
//! counted as cancelled). Finishing records the route's metrics; it is the
//! one place where later consumers (access log, tracing) hook in too: a
//! sampled request's SERVER span (`trace::ServerSpan`) ends here.
//!
//! Cost per request: the route's metrics handle (one `Arc` clone), one
//! `Instant` pair and a few relaxed atomic additions; nothing is allocated
//! (a sampled span was allocated when the request began). With an access
//! log configured, `log` carries the request's `access_log::Entry` (one
//! allocation) and finishing writes its line.

use crate::body::Body;
use crate::error::ErrorKind;
use crate::metrics::{ConsumerSlot, RouteMetrics, ANONYMOUS};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

pub struct Outcome {
    pub start: Instant,
    /// The matched route's metrics (the gateway's "unmatched" series when no
    /// route matched).
    pub route: Arc<RouteMetrics>,
    /// `metrics::METHODS` index.
    pub method: u8,
    pub consumer: ConsumerSlot,
    /// The response status; 0 until there is a response.
    pub status: u16,
    /// The gateway-made error the response carries, if any.
    pub error: Option<ErrorKind>,
    /// Response body bytes sent so far.
    pub bytes_out: u64,
    /// The real client address, once known (after routing).
    pub client_ip: Option<std::net::IpAddr>,
    /// The last upstream attempt, set by the `proxy` action.
    pub upstream: Option<Attempt>,
    /// The W3C trace id of the request: from its `traceparent` header (read
    /// when access logging is on), or set by tracing from its own context.
    pub trace_id: Option<[u8; 16]>,
    /// What the access log needs beyond this; `None` when it is off.
    pub log: Option<Box<crate::access_log::Entry>>,
    /// The SERVER span of a sampled request, ended with the outcome.
    pub span: Option<Box<crate::trace::ServerSpan>>,
    /// Concurrency-limit slots (`crate::shed`), released when the outcome
    /// is finished: the response body ended or the client went away.
    pub held: crate::shed::Held,
}

/// One attempt to reach an upstream endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// The endpoint's resolved address.
    pub addr: std::net::SocketAddr,
    /// From sending the request to the response headers (or the failure);
    /// `None` when no connection was made.
    pub took: Option<std::time::Duration>,
}

impl Outcome {
    pub fn new(start: Instant, method: u8, route: Arc<RouteMetrics>) -> Outcome {
        Outcome {
            start,
            route,
            method,
            consumer: ANONYMOUS,
            status: 0,
            error: None,
            bytes_out: 0,
            client_ip: None,
            upstream: None,
            trace_id: None,
            log: None,
            span: None,
            held: crate::shed::Held::default(),
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if let Some(span) = self.span.take() {
            span.finish(self.status, self.error);
        }
        if let Some(e) = &self.log {
            e.logger.log(self, e);
        }
        if self.status == 0 {
            self.route.record_cancelled();
            return;
        }
        self.route.record(
            self.consumer,
            self.method,
            self.status,
            self.start.elapsed(),
            self.bytes_out,
        );
    }
}

/// A response body that carries its request's [`Outcome`] and counts the
/// bytes it yields; the outcome is finished when hyper drops it.
pub struct Observed {
    body: Body,
    outcome: Outcome,
}

impl Observed {
    pub fn new(body: Body, mut outcome: Outcome, status: u16) -> Observed {
        outcome.status = status;
        Observed { body, outcome }
    }

    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    pub fn into_inner(self) -> Body {
        self.body
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = crate::error::BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                this.outcome.bytes_out += d.len() as u64;
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn finishes_once_with_bytes_or_as_cancelled() {
        let m = Arc::new(RouteMetrics::new("r".into()));
        let o = Outcome::new(Instant::now(), 0, m.clone());
        let body = Observed::new(Body::full("hello"), o, 201);
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert_eq!(m.requests(0, 0, 1), 1);
        assert_eq!(m.bytes_out(), 5);
        assert_eq!(m.duration.snapshot().count(), 1);

        drop(Outcome::new(Instant::now(), 0, m.clone()));
        assert_eq!(m.cancelled(), 1);
        assert_eq!(m.total_requests(), 1);
    }
}
