//! The `proxy` action: forwards a request to an upstream and streams the
//! answer back.
//!
//! Per attempt: pick an endpoint (balancer, skipping unhealthy and already
//! tried ones) → check out a connection → send → wait for response headers.
//! Bodies are never buffered: the client's body is handed to the upstream
//! connection as a stream and the upstream's body is returned as a stream.
//!
//! Retries happen only when safe: a connection that could not be made (or a
//! pooled one that closed before the request was written) never saw the
//! request; after sending, only requests without a body and with an
//! idempotent method are retried, on the configured statuses and errors.
//! Every retry is paid from the upstream's retry budget.
//!
//! An HTTP/2 upstream may also say that it did not process a request: a
//! stream above the `last_stream_id` of its GOAWAY, or one it reset with
//! `REFUSED_STREAM` (RFC 9113 §6.8, §8.7). Such a request is re-sent like a
//! never-written one, whatever its method, when it has no body, and a
//! refusal counts against neither the target's health nor the upstream's
//! protections.

pub mod forward;
pub mod rewrite;

use crate::body::{Body, BodyDone, BodyError, ClientBody};
use crate::config::model::Protocol;
use crate::error::{ErrorKind, GatewayError};
use crate::outcome::Attempt;
use crate::policy::Ctx;
use crate::rand::fast_u64;
use crate::upstream::endpoint::Endpoint;
use crate::upstream::pool::{self, Lease};
use crate::upstream::Upstream;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use rewrite::Rewrite;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (num, unit) = s.split_at(s.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Upgraded connections (WebSocket tunnels) being spliced right now, in this
/// process. Shutdown waits for them during the drain period.
pub static TUNNELS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct TunnelGuard;

impl TunnelGuard {
    fn new() -> TunnelGuard {
        TUNNELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TunnelGuard
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        TUNNELS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Free re-sends when a pooled connection closed before our request was
/// written (the keep-alive race), or an HTTP/2 upstream refused it
/// unprocessed ([`Refusal`]); these do not use the retry budget.
const MAX_UNSENT_RESENDS: u32 = 3;

/// How an HTTP/2 upstream said it did not process a request, so that it may
/// be sent again whatever its method (RFC 9113 §6.8, §8.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The stream was above the `last_stream_id` of the upstream's GOAWAY
    /// (graceful, as nginx sends after `keepalive_requests`, or not).
    GoAway,
    /// The upstream reset the stream with `REFUSED_STREAM`.
    RefusedStream,
}

impl Refusal {
    /// The refusal in an error's source chain (hyper's error wraps h2's).
    ///
    /// h2 (0.4) fails a stream with the peer's GOAWAY (`is_go_away`,
    /// `is_remote`) only when the stream is above the frame's
    /// `last_stream_id` (`Streams::recv_go_away`), or when the request is
    /// started after the GOAWAY arrived (`send_request` fails, nothing is
    /// written). Streams at or below it keep running, and if the
    /// connection then breaks they fail with an I/O or a local error, never
    /// this one. `REFUSED_STREAM` counts only as the peer's reset. Errors
    /// of our side (`is_remote` false) are never refusals.
    ///
    /// One gap is hyper's: a GOAWAY processed between its dispatch task's
    /// `send_request` and the `poll_ready` right after it fails that request
    /// with the same error although its stream was opened, so with a
    /// GOAWAY whose `last_stream_id` covers it (a shutdown notice's
    /// 2^31-1) it may still be processed. The window is microseconds wide.
    fn of(mut e: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
        loop {
            if let Some(h) = e.downcast_ref::<h2::Error>() {
                return if !h.is_remote() {
                    None
                } else if h.is_go_away() {
                    Some(Refusal::GoAway)
                } else if h.is_reset() && h.reason() == Some(h2::Reason::REFUSED_STREAM) {
                    Some(Refusal::RefusedStream)
                } else {
                    None
                };
            }
            e = e.source()?;
        }
    }

    /// What the upstream sent, for messages and span errors.
    fn frame(self) -> &'static str {
        match self {
            Refusal::GoAway => "GOAWAY",
            Refusal::RefusedStream => "REFUSED_STREAM",
        }
    }

    /// The `error.type` of an attempt's span when the request is re-sent.
    fn span_error(self) -> &'static str {
        match self {
            Refusal::GoAway => "http2_goaway_unprocessed",
            Refusal::RefusedStream => "http2_refused_stream",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum HostHeader {
    /// The target's `host:port` as configured (default).
    Target,
    /// The client's Host header.
    Preserve,
    Fixed(HeaderValue),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    pub response_header: Option<Duration>,
    pub request: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_timeout: bool,
    pub on_reset: bool,
    pub statuses: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Whether anything could trigger a retry after the request was sent.
    fn after_send(&self) -> bool {
        self.attempts > 0 && (self.on_timeout || self.on_reset || !self.statuses.is_empty())
    }

    async fn backoff(&self, attempt: u32) {
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.backoff_max);
        let nanos = cap.as_nanos() as u64;
        if nanos > 0 {
            tokio::time::sleep(Duration::from_nanos(fast_u64() % nanos)).await;
        }
    }
}

pub struct ProxyAction {
    pub upstream: Arc<Upstream>,
    pub rewrite: Option<Rewrite>,
    pub host: HostHeader,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    pub upgrades: bool,
    /// The route's series (requests shed by the adaptive limit).
    pub metrics: Arc<crate::metrics::RouteMetrics>,
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// What is needed to send (or re-send) the request.
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    /// The client's Host (or HTTP/2 authority), for `host_header: preserve`.
    client_host: Option<HeaderValue>,
}

impl Outgoing {
    fn copy(&self) -> Outgoing {
        Outgoing {
            method: self.method.clone(),
            uri: self.uri.clone(),
            headers: self.headers.clone(),
            client_host: self.client_host.clone(),
        }
    }

    /// The request as sent to `ep`: HTTP/1.1 with an origin-form target and
    /// a Host header, or HTTP/2 with an absolute URI (its authority becomes
    /// `:authority`) and no Host header.
    fn into_request(
        self,
        body: Body,
        ep: &Endpoint,
        host: &HostHeader,
        protocol: Protocol,
    ) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.headers_mut() = self.headers;
        let authority = match host {
            HostHeader::Target => Some(ep.host_value.clone()),
            HostHeader::Preserve => self.client_host,
            HostHeader::Fixed(v) => Some(v.clone()),
        };
        if protocol == Protocol::Http1 {
            *req.version_mut() = http::Version::HTTP_11;
            *req.uri_mut() = self.uri;
            if let Some(v) = authority {
                req.headers_mut().insert(header::HOST, v);
            }
        } else {
            *req.version_mut() = http::Version::HTTP_2;
            let scheme = if protocol == Protocol::H2 {
                "https"
            } else {
                "http"
            };
            let pq = self.uri.path_and_query().map_or("/", |p| p.as_str());
            let auth = authority
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or(&ep.target);
            *req.uri_mut() = Uri::try_from(format!("{scheme}://{auth}{pq}")).unwrap_or(self.uri);
            req.headers_mut().remove(header::HOST);
        }
        req
    }
}

impl ProxyAction {
    pub async fn run(
        &self,
        req: Request<Body>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, GatewayError> {
        // Upstream protection first: an open circuit or a full adaptive
        // limit answers at once, before any work on the request.
        let (ticket, slot) = self.admit(ctx)?;
        if slot.is_some() {
            ctx.upstream_slot = slot;
        }
        let (mut parts, body) = req.into_parts();
        let protocol = self.upstream.spec.protocol;
        // Upgrades (WebSocket) need an HTTP/1.1 upstream.
        let upgrade =
            self.upgrades && protocol == Protocol::Http1 && forward::wants_upgrade(&parts.headers);
        let client_upgrade = if upgrade {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        // What a policy wants kept for the tunnel's life (a WebSocket
        // connection limit's slot).
        let keep = if upgrade {
            parts.extensions.remove::<crate::body::Keep>()
        } else {
            None
        };

        // Request target: origin-form, rewritten if configured.
        let needs_new_uri = self.rewrite.is_some() || parts.uri.scheme().is_some();
        if needs_new_uri {
            let path = match &self.rewrite {
                Some(r) => r.apply(parts.uri.path(), ctx),
                None => parts.uri.path().into(),
            };
            let pq = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.into_owned(),
            };
            parts.uri = Uri::try_from(pq).map_err(|e| {
                GatewayError::new(ErrorKind::Internal, "path rewrite produced an invalid URI")
                    .with_cause(e)
            })?;
        }

        let headers = &mut parts.headers;
        // Room for what is added below (forwarded headers, request id, Host)
        // in one allocation: an HTTP/2 request's map starts small.
        headers.reserve(6);
        forward::strip_hop_by_hop(headers, upgrade);
        // The gateway answers `Expect: 100-continue` itself (hyper sends the
        // 100 when the body is first read), so it is not forwarded.
        headers.remove(header::EXPECT);
        forward::set_forwarded(
            headers,
            &ctx.forwarded,
            ctx.peer_trusted,
            ctx.host_header.as_ref(),
        );
        headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());

        let key = self.upstream.hash_of(&parts, ctx.client_ip);
        let (body, done) = match body {
            b if http_body::Body::is_end_stream(&b) => (Body::Empty, None),
            Body::Incoming(inc) => {
                let mut c = Box::new(ClientBody::new(inc, u64::MAX, None));
                let done = Arc::new(BodyDone::default());
                c.track(done.clone());
                (Body::Client(c), Some(done))
            }
            Body::Client(mut c) => {
                let done = Arc::new(BodyDone::default());
                c.track(done.clone());
                (Body::Client(c), Some(done))
            }
            other => (other, None),
        };
        let out = Outgoing {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            client_host: ctx.host_header.clone(),
        };

        self.upstream.budget.on_request();
        // gRPC clients state their deadline; the tighter of it and the
        // route's `request` timeout applies (the header goes upstream as is).
        let grpc_timeout = out.headers.get(&GRPC_TIMEOUT).and_then(parse_grpc_timeout);
        let limit = match (self.timeouts.request, grpc_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = limit.map(|d| tokio::time::Instant::now() + d);
        let trace = ctx.trace.as_ref();
        let last = &mut ctx.upstream;
        let started_ms = self.started_ms();
        let exchange = self.exchange(
            out,
            body,
            done,
            key,
            upgrade,
            self.timeouts.response_header,
            last,
            trace,
        );
        let result = match deadline {
            Some(d) => tokio::time::timeout_at(d, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(GatewayError::new(
                        ErrorKind::UpstreamTimeout,
                        "request timeout exceeded",
                    ))
                }),
            None => exchange.await,
        };
        if ticket.is_some() || started_ms > 0 {
            self.protect(&result, ticket, started_ms, ctx.upstream);
        }
        let (resp, lease) = result?;
        Ok(self.respond(resp, lease, upgrade, (client_upgrade, keep), deadline))
    }

    /// The upstream's protections, before anything is sent: the circuit
    /// breaker's admission (open: `503 circuit_open`) and a slot of the
    /// adaptive concurrency limit (full: `503 overloaded`, counted in the
    /// route's series). The slot must live as long as the exchange and its
    /// response body.
    fn admit(
        &self,
        ctx: &Ctx,
    ) -> Result<
        (
            Option<crate::upstream::breaker::Ticket<'_>>,
            Option<crate::upstream::adaptive::Permit>,
        ),
        GatewayError,
    > {
        let up = &*self.upstream;
        let ticket = match &up.breaker {
            Some(b) => Some(
                b.admit(crate::clock::now_ms())
                    .map_err(|ms| circuit_open(&up.name, ms))?,
            ),
            None => None,
        };
        let slot = match &up.adaptive {
            Some(a) => match a.try_acquire(ctx.priority_share) {
                Some(p) => Some(p),
                None => {
                    use crate::shed::{limiter::Shed, Scope};
                    self.metrics
                        .shed(ctx.priority, Scope::Upstream, Shed::Rejected);
                    return Err(crate::shed::overloaded(Scope::Upstream, Shed::Rejected, 1));
                }
            },
            None => None,
        };
        Ok((ticket, slot))
    }

    /// When the exchange starts, in milliseconds, for the adaptive limit's
    /// latency sample of a timeout (answers use the attempt's own time);
    /// 0 without an adaptive limit.
    fn started_ms(&self) -> u64 {
        if self.upstream.adaptive.is_some() {
            crate::clock::now_ms().max(1)
        } else {
            0
        }
    }

    /// Reports the exchange's result to the circuit breaker and its latency
    /// to the adaptive limit (which samples answers and timeouts only, so a
    /// refusal never reaches it).
    fn protect(
        &self,
        result: &Result<(Response<Incoming>, Lease), GatewayError>,
        ticket: Option<crate::upstream::breaker::Ticket<'_>>,
        started_ms: u64,
        last: Option<Attempt>,
    ) {
        let up = &*self.upstream;
        let now = crate::clock::now_ms();
        let status = result.as_ref().ok().map(|(r, _)| r.status().as_u16());
        let kind = result.as_ref().err().map(|e| e.kind());
        if let (Some(t), Some(b)) = (ticket, &up.breaker) {
            let failed = match (status, kind) {
                (Some(s), _) => Some(b.is_failure_status(s)),
                // Refused unprocessed (HTTP/2 GOAWAY, REFUSED_STREAM): the
                // upstream turned the request away, it did not fail it.
                (None, _) if result.as_ref().is_err_and(|e| Refusal::of(e).is_some()) => None,
                (None, Some(k)) => (k.source() == crate::error::ErrorSource::Upstream
                    || k == ErrorKind::NoHealthyTarget)
                    .then_some(true),
                (None, None) => None,
            };
            // Anything else (the client's body broke a limit) says nothing
            // about the upstream: a probe gives its slot back.
            if let Some(f) = failed {
                t.record(f, now);
            }
        }
        if let Some(a) = &up.adaptive {
            let elapsed = Duration::from_millis(now.saturating_sub(started_ms));
            match (status, kind) {
                (Some(s), _) => {
                    let took = last.and_then(|l| l.took).unwrap_or(elapsed);
                    a.record(took, matches!(s, 429 | 503 | 504), now);
                }
                (None, Some(ErrorKind::UpstreamTimeout)) => a.record(elapsed, true, now),
                _ => {}
            }
        }
    }

    /// Sends a request the gateway built itself (an `aggregate` call)
    /// through the same machinery as a proxied one: the upstream's circuit
    /// breaker and adaptive concurrency limit, balancer, pools, health,
    /// retries (it has no client body, so a GET is replayable), timeouts,
    /// tracing and target metrics. The forwarded headers and `x-request-id`
    /// are set from the client's request; `last` gets the last attempt.
    /// The adaptive limit's slot travels with the response body, released
    /// when the body ends or is dropped.
    ///
    /// `within` is the caller's own time limit on the whole call (it reads
    /// the body under it too): the upstream's request and response-header
    /// timeouts only get a timer when they are shorter, since a longer one
    /// could never fire first. The answer's headers are returned as the
    /// upstream sent them (they are read, never forwarded).
    pub async fn send(
        &self,
        parts: http::request::Parts,
        body: bytes::Bytes,
        ctx: &Ctx,
        within: Duration,
        last: &mut Option<Attempt>,
    ) -> Result<Response<Body>, GatewayError> {
        // Protections as for a proxied request: an open circuit or a full
        // adaptive limit fails the call at once, before it is sent.
        let (ticket, slot) = self.admit(ctx)?;
        let key = self.upstream.hash_of(&parts, ctx.client_ip);
        let mut headers = parts.headers;
        headers.reserve(6);
        forward::set_forwarded(
            &mut headers,
            &ctx.forwarded,
            false,
            ctx.host_header.as_ref(),
        );
        headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
        let body = Body::full(body);
        let out = Outgoing {
            method: parts.method,
            uri: parts.uri,
            headers,
            client_host: ctx.host_header.clone(),
        };
        self.upstream.budget.on_request();
        let shorter = |t: Option<Duration>| t.filter(|t| *t < within);
        let deadline = shorter(self.timeouts.request).map(|d| tokio::time::Instant::now() + d);
        let started_ms = self.started_ms();
        let exchange = self.exchange(
            out,
            body,
            None,
            key,
            false,
            shorter(self.timeouts.response_header),
            last,
            ctx.trace.as_ref(),
        );
        let result = match deadline {
            Some(d) => tokio::time::timeout_at(d, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(GatewayError::new(
                        ErrorKind::UpstreamTimeout,
                        "request timeout exceeded",
                    ))
                }),
            None => exchange.await,
        };
        if ticket.is_some() || started_ms > 0 {
            self.protect(&result, ticket, started_ms, *last);
        }
        let (resp, lease) = result?;
        let (parts, incoming) = resp.into_parts();
        let deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        let resp = Response::from_parts(parts, Body::response(incoming, lease, deadline, false));
        Ok(match slot {
            Some(p) => resp.map(|body| {
                Body::Held(Box::new(crate::body::Held {
                    body,
                    keep: Some(crate::body::Keep(Arc::new(p))),
                }))
            }),
            None => resp,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        mut out: Outgoing,
        mut body: Body,
        done: Option<Arc<BodyDone>>,
        key: Option<u64>,
        upgrade: bool,
        header_timeout: Option<Duration>,
        last: &mut Option<Attempt>,
        trace: Option<&crate::trace::TraceCtx>,
    ) -> Result<(Response<Incoming>, Lease), GatewayError> {
        let up = &*self.upstream;
        let mut excluded: Vec<usize> = Vec::new();
        let mut attempt = 0u32;
        let mut resends = 0u32;
        let retry = &self.retry;
        let can_retry = |attempt: u32| attempt < retry.attempts && up.budget.try_withdraw();
        let bodyless = http_body::Body::is_end_stream(&body);
        // May be retried after it was sent (per the retry policy).
        let replayable = bodyless && idempotent(&out.method);
        // May be re-sent if an HTTP/2 upstream refuses it unprocessed
        // (`Refusal`), whatever the method; HTTP/1 has no such signal.
        let refusable = bodyless && up.spec.protocol != Protocol::Http1;
        loop {
            let (index, ep) = {
                let set = up.set.load();
                let Some(i) = set.balancer.pick(&set.endpoints, key, &excluded) else {
                    return Err(GatewayError::new(
                        ErrorKind::NoHealthyTarget,
                        format!("upstream `{}` has no healthy target", up.name),
                    ));
                };
                (i, set.endpoints[i].clone())
            };
            // Tracing: this attempt's span; its id is the upstream's parent.
            let span = trace.map(|t| {
                let (traceparent, a) = t.attempt(
                    &out.method,
                    &out.uri,
                    &ep,
                    up.spec.protocol,
                    &up.name,
                    attempt + resends,
                );
                out.headers
                    .insert(crate::trace::TRACEPARENT.clone(), traceparent);
                a
            });

            let mut lease = match pool::checkout(&ep, self.timeouts.connect, upgrade).await {
                Ok(l) => l,
                Err(e) => {
                    *last = Some(Attempt {
                        addr: ep.addr,
                        took: None,
                    });
                    if let Some(s) = span {
                        s.end(None, Some(e.kind()));
                    }
                    ep.health.record_failure(&up.outlier);
                    ep.metrics.error(e.kind());
                    if retry.on_connect_failure && can_retry(attempt) {
                        attempt += 1;
                        excluded.push(index);
                        retry.backoff(attempt).await;
                        continue;
                    }
                    return Err(e);
                }
            };
            if let Some(d) = &done {
                lease.track_request_body(d.clone());
            }
            if upgrade {
                lease.forbid_reuse();
            }

            // Keep a copy only when a retry after sending is possible, or a
            // re-send after a refusal (bodyless, HTTP/2): never for a
            // request that has a body, nor for HTTP/1 without retries.
            let retryable = replayable && retry.after_send() && attempt < retry.attempts;
            let spare = (retryable || refusable).then(|| out.copy());
            let out_host = out.client_host.clone();
            let req = out.into_request(body, &ep, &self.host, up.spec.protocol);
            let started = Instant::now();
            let sending = lease.sender().send(req);
            // The response-header timeout starts once the request is fully
            // sent: a long upload is not a slow upstream.
            let waited = match (header_timeout, &done) {
                (Some(t), None) => tokio::time::timeout(t, sending).await.ok(),
                (Some(t), Some(d)) => {
                    let d = d.clone();
                    let timer = async move {
                        d.wait().await;
                        tokio::time::sleep(t).await
                    };
                    tokio::select! {
                        r = sending => Some(r),
                        _ = timer => None,
                    }
                }
                (None, _) => Some(sending.await),
            };
            *last = Some(Attempt {
                addr: ep.addr,
                took: Some(started.elapsed()),
            });
            // Each outcome says whether the retry policy wants another
            // attempt; whether one happens is decided once, below.
            let (wanted, outcome) = match waited {
                // (Spans end in each arm: borrowing `outcome` after the
                // match would keep it alive across the backoff's await in
                // this future's layout, 300+ bytes.)
                None => {
                    if let Some(s) = span {
                        s.end(None, Some(ErrorKind::UpstreamTimeout));
                    }
                    ep.health.record_failure(&up.outlier);
                    ep.metrics.error(ErrorKind::UpstreamTimeout);
                    let t = header_timeout.unwrap_or_default();
                    let e = GatewayError::new(
                        ErrorKind::UpstreamTimeout,
                        format!("upstream `{}` did not answer within {:?}", up.name, t),
                    );
                    (retry.on_timeout, Err(e))
                }
                Some(Err(mut e)) => {
                    if let Some(unsent) = e.take_message() {
                        // Never written: a pooled connection closed under us.
                        if resends < MAX_UNSENT_RESENDS {
                            if let Some(s) = span {
                                s.abandon("connection_closed_before_sending");
                            }
                            resends += 1;
                            let (p, b) = unsent.into_parts();
                            out = Outgoing {
                                method: p.method,
                                uri: p.uri,
                                headers: p.headers,
                                client_host: out_host.clone(),
                            };
                            body = b;
                            continue;
                        }
                    }
                    let e = e.into_error();
                    // The client's body broke the limits: the client's fault.
                    if let Some(b) = BodyError::find(&e) {
                        let e = GatewayError::from_body(*b);
                        if let Some(s) = span {
                            s.end(None, Some(e.kind()));
                        }
                        return Err(e);
                    }
                    let refused = Refusal::of(&e);
                    if let Some(r) = refused {
                        if r == Refusal::GoAway {
                            lease.retire();
                        }
                        // Not processed: sent again from the spare copy, like
                        // a request never written.
                        if refusable && resends < MAX_UNSENT_RESENDS {
                            if let Some(copy) = spare {
                                if let Some(s) = span {
                                    s.abandon(r.span_error());
                                }
                                tracing::debug!(
                                    upstream = %up.name,
                                    address = %ep.addr,
                                    refused = r.frame(),
                                    "re-sending a request the upstream refused unprocessed"
                                );
                                resends += 1;
                                out = copy;
                                body = Body::Empty;
                                continue;
                            }
                        }
                    }
                    if let Some(s) = span {
                        s.end(None, Some(ErrorKind::UpstreamProtocol));
                    }
                    ep.metrics.error(ErrorKind::UpstreamProtocol);
                    let message = match refused {
                        // A refusal says nothing about the target's health.
                        Some(r) if refusable => format!(
                            "upstream `{}` refused the request unprocessed (HTTP/2 {}) after {resends} free re-sends",
                            up.name,
                            r.frame()
                        ),
                        Some(r) => format!(
                            "upstream `{}` refused the request unprocessed (HTTP/2 {}); it has a body, so it cannot be replayed",
                            up.name,
                            r.frame()
                        ),
                        None => {
                            ep.health.record_failure(&up.outlier);
                            format!("upstream `{}` failed the exchange", up.name)
                        }
                    };
                    let e = GatewayError::new(ErrorKind::UpstreamProtocol, message).with_cause(e);
                    (retry.on_reset, Err(e))
                }
                Some(Ok(resp)) => {
                    let took = started.elapsed();
                    ep.load.observe(took);
                    ep.metrics.duration.observe(took);
                    let status = resp.status();
                    if let Some(s) = span {
                        s.end(Some(status.as_u16()), None);
                    }
                    if status.is_server_error() {
                        ep.health.record_failure(&up.outlier);
                    } else {
                        ep.health.record_success(&up.outlier);
                    }
                    (retry.statuses.contains(&status.as_u16()), Ok(resp))
                }
            };
            // Only a replayable request is retried after it was sent.
            if let (true, Some(s)) = (retryable, spare) {
                if wanted && can_retry(attempt) {
                    drop(outcome);
                    drop(lease);
                    attempt += 1;
                    excluded.push(index);
                    out = s;
                    body = Body::Empty;
                    retry.backoff(attempt).await;
                    continue;
                }
            }
            return outcome.map(|resp| (resp, lease));
        }
    }

    fn respond(
        &self,
        resp: Response<Incoming>,
        mut lease: Lease,
        upgrade: bool,
        (client_upgrade, keep): (Option<hyper::upgrade::OnUpgrade>, Option<crate::body::Keep>),
        deadline: Option<tokio::time::Instant>,
    ) -> Response<Body> {
        let (mut parts, incoming) = resp.into_parts();
        let switching = upgrade && parts.status == StatusCode::SWITCHING_PROTOCOLS;
        forward::strip_hop_by_hop(&mut parts.headers, switching);
        if switching {
            lease.forbid_reuse();
            drop(incoming);
            let upstream_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
            if let (Some(client_upgrade), Some(upstream_upgrade)) =
                (client_upgrade, upstream_upgrade)
            {
                tokio::spawn(splice(client_upgrade, upstream_upgrade, lease, keep));
            }
            return Response::from_parts(parts, Body::Empty);
        }
        let deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        let grpc = crate::error::is_grpc(&parts.headers);
        Response::from_parts(parts, Body::response(incoming, lease, deadline, grpc))
    }
}

/// The answer while an upstream's circuit is open; probes start in `ms`.
fn circuit_open(upstream: &str, ms: u64) -> GatewayError {
    GatewayError::new(
        ErrorKind::CircuitOpen,
        format!("upstream `{upstream}` is failing: its circuit breaker is open"),
    )
    .with_header(
        header::RETRY_AFTER,
        HeaderValue::from(ms.div_ceil(1000).max(1)),
    )
}

/// Joins the client's and the upstream's upgraded connections and copies
/// bytes both ways until either side closes.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    lease: Lease,
    keep: Option<crate::body::Keep>,
) {
    let _tunnel = TunnelGuard::new();
    let (c, u) = tokio::join!(client, upstream);
    match (c, u) {
        (Ok(c), Ok(u)) => {
            let mut c = hyper_util::rt::TokioIo::new(c);
            let mut u = hyper_util::rt::TokioIo::new(u);
            let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
        }
        (c, u) => {
            tracing::debug!(
                client_ok = c.is_ok(),
                upstream_ok = u.is_ok(),
                "upgrade failed"
            );
        }
    }
    drop(lease);
    drop(keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        let p = |s: &'static str| parse_grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(p("10S"), Some(Duration::from_secs(10)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("5u"), Some(Duration::from_micros(5)));
        assert_eq!(p("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(p("S"), None);
        assert_eq!(p("123456789S"), None);
        assert_eq!(p("10s"), None);
        assert_eq!(p("-1S"), None);
    }
}
