//! The request lifecycle, in order:
//! 1. take the live snapshot and the listener's router;
//! 2. establish the request id; refuse request-smuggling shapes
//!    (`strict`) and normalise the path (`normalize`), 400 on failure;
//!    on a `redirect_to_https` listener answer 308; replace the client
//!    identity header (`tls`); establish the real client address;
//! 3. match a route (404 when none);
//! 4. run the route's policies' `on_request` in order (any may answer);
//! 5. run the action;
//! 6. run `on_response` of the policies that ran, in reverse order;
//! 7. stamp `x-request-id` on the response.
//!
//! Any [`GatewayError`] becomes the standard JSON error response here (and
//! is counted in `portico_gateway_errors_total`). Every request carries an
//! [`Outcome`] from its arrival; the response body takes it along and it is
//! recorded when hyper is done with the body (see `crate::outcome`).

use super::ConnCtx;
use crate::access_log::Entry;
use crate::body::{Body, ClientBody};
use crate::error::{ErrorKind, GatewayError};
use crate::outcome::{Observed, Outcome};
use crate::policy::{Ctx, Flow};
use crate::proxy::{forward, X_REQUEST_ID};
use crate::rand::fast_u64;
use crate::router::RequestView;
use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use std::borrow::Cow;
use std::time::Instant;

/// A response and the gateway error it carries, if it is one.
type Answer = (Response<Body>, Option<ErrorKind>);

pub async fn handle(conn: &ConnCtx, req: Request<Incoming>) -> Response<Observed> {
    let start = Instant::now();
    let method = crate::metrics::method_class(req.method());
    // Set once a route matched; dropped unfinished (cancelled) if this
    // future is dropped before there is a response.
    let mut outcome: Option<Outcome> = None;
    // Captured only when the access log is on; moves into the outcome.
    let mut entry: Option<Box<Entry>> = None;
    // A sampled request's SERVER span (`crate::trace`).
    let mut trace = Traced::default();
    let (resp, error) = respond(
        conn,
        req,
        start,
        method,
        &mut outcome,
        &mut entry,
        &mut trace,
    )
    .await;
    let mut outcome = outcome
        .unwrap_or_else(|| Outcome::new(start, method, conn.shared.metrics.unmatched.clone()));
    outcome.trace_id = trace.trace_id;
    outcome.span = trace.span;
    if let Some(kind) = error {
        conn.shared.metrics.error(kind);
        outcome.error = Some(kind);
    }
    if let Some(e) = entry.or_else(|| outcome.log.take()) {
        outcome.log = Some(finish_entry(e, &mut outcome, conn, &resp));
    }
    let status = resp.status().as_u16();
    resp.map(|b| Observed::new(b, outcome, status))
}

/// Completes the access-log entry from the response (out of line: only
/// with an access log).
#[inline(never)]
fn finish_entry(
    mut e: Box<Entry>,
    outcome: &mut Outcome,
    conn: &ConnCtx,
    resp: &Response<Body>,
) -> Box<Entry> {
    e.request_id = resp.headers().get(&X_REQUEST_ID).cloned();
    outcome.trace_id = outcome.trace_id.or(e.traceparent);
    if outcome.client_ip.is_none() {
        outcome.client_ip = Some(crate::net::canonical(conn.peer.ip()));
    }
    e
}

/// What `respond` learnt of the request's trace.
#[derive(Default)]
struct Traced {
    trace_id: Option<[u8; 16]>,
    span: Option<Box<crate::trace::ServerSpan>>,
}

/// The gateway-made error response for `e`.
fn fail(e: GatewayError, request_id: HeaderValue, grpc: bool) -> Answer {
    let kind = e.kind();
    (
        finish(e.respond(Some(&request_id), grpc), request_id),
        Some(kind),
    )
}

async fn respond(
    conn: &ConnCtx,
    mut req: Request<Incoming>,
    start: Instant,
    method: u8,
    outcome: &mut Option<Outcome>,
    entry: &mut Option<Box<Entry>>,
    traced: &mut Traced,
) -> Answer {
    let snapshot = conn.shared.snapshot.load_full();
    if let Some(logger) = &snapshot.access_logger {
        *entry = Some(Entry::capture(logger, &req));
    }
    // Gateway-made errors for gRPC calls are gRPC errors, not JSON.
    let grpc = crate::error::is_grpc(req.headers());
    let mut request_id = match req.headers().get(&X_REQUEST_ID) {
        Some(v) if valid_request_id(v) => v.clone(),
        _ => new_request_id(),
    };
    // Unique per request: HPACK must not add it to its dynamic table (which
    // would only evict useful entries), so it is sent as never-indexed.
    request_id.set_sensitive(true);
    let Some(lr) = snapshot.listener(&conn.listener) else {
        let e = GatewayError::new(ErrorKind::RouteNotFound, "listener no longer configured");
        return fail(e, request_id, grpc);
    };
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > lr.spec.max_uri_bytes {
        let e = GatewayError::new(
            ErrorKind::UriTooLong,
            format!("request target longer than {} bytes", lr.spec.max_uri_bytes),
        );
        return fail(e, request_id, grpc);
    }
    // Tracing: continue or start the trace (not configured: nothing, and
    // the client's `traceparent` goes upstream untouched).
    let trace = snapshot.tracer.as_ref().map(|t| {
        let (ctx, span) = t.begin(&mut req, conn.peer, conn.tls, &request_id);
        traced.trace_id = Some(ctx.trace_id);
        traced.span = span;
        ctx
    });
    // After the length check, so the limit applies to the target as sent.
    if let Err(e) = harden(&mut req) {
        return fail(e, request_id, grpc);
    }
    if let Some(r) = &lr.spec.tls.redirect_to_https {
        return match r.respond(&req) {
            Ok(resp) => (finish(resp, request_id), None),
            Err(e) => fail(e, request_id, grpc),
        };
    }
    // The client's own identity header is always dropped; ours is set.
    crate::tls::apply_identity_header(
        req.headers_mut(),
        lr.spec.tls.client_identity_header.as_ref(),
        conn.client_identity.as_ref(),
    );
    // Consumer headers are the gateway's to set (`auth` policy): a client
    // cannot claim an identity by sending them.
    snapshot.consumer_headers.strip(req.headers_mut());

    let host_header = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let host = host_header
        .as_ref()
        .map(normalize_host)
        .unwrap_or(Cow::Borrowed(""));
    let matched = lr.router.find(&RequestView {
        host: &host,
        path: req.uri().path(),
        query: req.uri().query(),
        method: req.method(),
        headers: req.headers(),
    });
    let Some(matched) = matched else {
        let e = GatewayError::new(
            ErrorKind::RouteNotFound,
            format!("no route for {} {}", req.method(), req.uri().path()),
        );
        return fail(e, request_id, grpc);
    };
    drop(host);
    let route = &lr.routes[matched.route];
    let o = outcome.insert(Outcome::new(start, method, route.metrics.clone()));
    o.log = entry.take();
    if let Some(span) = &mut traced.span {
        span.set_route(route.name.clone());
    }

    let peer_ip = conn.peer.ip();
    let peer_trusted = !lr.trusted.is_empty() && lr.trusted.contains(peer_ip);
    let client_ip = if peer_trusted {
        forward::client_ip(peer_ip, req.headers(), &lr.trusted)
    } else {
        crate::net::canonical(peer_ip)
    };
    o.client_ip = Some(client_ip);
    let bytes_in = o.log.as_mut().map(|e| {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        e.bytes_in = Some(n.clone());
        n
    });
    if let Some(span) = &mut traced.span {
        span.set_client(client_ip);
    }
    let mut ctx = Ctx {
        request_id,
        peer: conn.peer,
        client_ip,
        peer_trusted,
        tls: conn.tls,
        forwarded: conn.forwarded.clone(),
        listener: conn.listener.clone(),
        route: route.name.clone(),
        captures: matched.captures,
        original_uri: req.uri().clone(),
        host_header,
        upstream: None,
        trace,
        identity: None,
        client_cert: conn.client_identity.clone(),
        cors: None,
        priority: 0,
        priority_share: 1.0,
        upstream_slot: None,
        rate_limits: Vec::new(),
    };
    let body_limit = route.max_body_bytes.unwrap_or(lr.spec.max_body_bytes);
    if let Some(e) = declared_body_too_large(req.headers(), body_limit) {
        return fail(e, ctx.request_id, grpc);
    }
    // A body is read through `ClientBody` (limits, and the route's byte
    // count); the proxy would box an unwrapped one anyway.
    let mut req = if http_body::Body::is_end_stream(req.body()) {
        req.map(Body::Incoming)
    } else {
        req.map(|b| {
            Body::Client(Box::new(
                ClientBody::new(b, body_limit, lr.spec.body_read_timeout)
                    .count_into(route.metrics.clone())
                    .count_also(bytes_in),
            ))
        })
    };

    let mut ran = 0;
    let mut answered = None;
    for policy in &route.policies {
        ran += 1;
        match policy.on_request(&mut req, &mut ctx).resolve().await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Respond(r)) => {
                answered = Some(Ok(*r));
                break;
            }
            Err(e) => {
                answered = Some(Err(e));
                break;
            }
        }
    }
    let result = match answered {
        Some(r) => r,
        None => match admit(&snapshot, route, &req, &mut ctx, outcome).await {
            Ok(()) => route.action.run(req, &mut ctx).await,
            Err(e) => Err(e),
        },
    };
    if let Some(o) = outcome.as_mut() {
        o.upstream = ctx.upstream;
        o.held.upstream = ctx.upstream_slot.take();
        if let Some(id) = &ctx.identity {
            o.consumer = match &id.consumer {
                Some(c) => c.slot,
                None if id.method == crate::auth::Method::Anonymous => crate::metrics::ANONYMOUS,
                None => crate::auth::consumer::SLOT_OTHER,
            };
            if let Some(e) = o.log.as_mut() {
                e.consumer = id.consumer.as_ref().map(|c| c.id.clone());
                e.authenticated = id.method != crate::auth::Method::Anonymous;
            }
        }
    }
    let (mut resp, error) = match result {
        Ok(r) => (r, None),
        Err(e) => {
            tracing::debug!(route = %ctx.route, request_id = ?ctx.request_id, error = %e, "request failed");
            (e.respond(Some(&ctx.request_id), grpc), Some(e.kind()))
        }
    };
    for policy in route.policies[..ran].iter().rev() {
        policy.on_response(&mut resp, &ctx);
    }
    (finish(resp, ctx.request_id), error)
}

/// Load shedding (`crate::shed`), after the policies (the consumer is
/// known) and before the action: the request's priority class, then a slot
/// of the route's limit and one of the gateway's, kept in the `Outcome`
/// until the response body ends. Nothing to do when none is configured.
async fn admit(
    snapshot: &crate::snapshot::Snapshot,
    route: &crate::snapshot::Route,
    req: &Request<Body>,
    ctx: &mut Ctx,
    outcome: &mut Option<Outcome>,
) -> Result<(), GatewayError> {
    let pr = &snapshot.priorities;
    if pr.configured {
        ctx.priority = pr.classify(req.headers(), ctx, route.priority_class);
        ctx.priority_share = pr
            .shares
            .get(usize::from(ctx.priority))
            .map_or(1.0, |s| *s as f32);
    }
    use crate::shed::{take, Scope};
    if let Some(l) = &route.concurrency {
        let p = take(l, Scope::Route, ctx.priority, &route.metrics).await?;
        if let Some(o) = outcome.as_mut() {
            o.held.route = Some(p);
        }
    }
    if let Some(l) = &snapshot.overload {
        let p = take(l, Scope::Global, ctx.priority, &route.metrics).await?;
        if let Some(o) = outcome.as_mut() {
            o.held.global = Some(p);
        }
    }
    Ok(())
}

/// 413 at once when `Content-Length` already exceeds the limit.
fn declared_body_too_large(h: &http::HeaderMap, limit: u64) -> Option<GatewayError> {
    if limit == u64::MAX {
        return None;
    }
    let len: u64 = h
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (len > limit).then(|| GatewayError::from_body(crate::body::BodyError::TooLarge(limit)))
}

/// Strict HTTP/1.1 and path normalisation (docs/hardening.md): refuses smuggling shapes (and closes the connection), then
/// normalises the path in place, so routing, captures, policies and the
/// upstream all see the same path.
fn harden(req: &mut Request<Incoming>) -> Result<(), GatewayError> {
    if let Err(v) = crate::strict::check_request(req) {
        return Err(GatewayError::new(ErrorKind::BadRequest, v.message())
            .with_header(header::CONNECTION, HeaderValue::from_static("close")));
    }
    match crate::normalize::normalize_uri(req.uri()) {
        Ok(Some(uri)) => *req.uri_mut() = uri,
        Ok(None) => {}
        Err(e) => return Err(GatewayError::new(ErrorKind::BadRequest, e.to_string())),
    }
    Ok(())
}

fn finish(mut resp: Response<Body>, request_id: HeaderValue) -> Response<Body> {
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    resp
}

/// Lower-case host without the port.
fn normalize_host(v: &HeaderValue) -> Cow<'_, str> {
    let s = v.to_str().unwrap_or("");
    let s = if s.starts_with('[') {
        // IPv6 literal: keep the brackets' content.
        s.split(']')
            .next()
            .map(|h| h.trim_start_matches('['))
            .unwrap_or(s)
    } else {
        s.rsplit_once(':').map_or(s, |(h, _)| h)
    };
    let s = s.trim_end_matches('.');
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// 32 hex characters from 128 random bits.
pub(crate) fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    let (a, b) = (fast_u64(), fast_u64());
    for i in 0..16 {
        buf[i] = HEX[((a >> (i * 4)) & 0xf) as usize];
        buf[16 + i] = HEX[((b >> (i * 4)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalisation() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            normalize_host(&h("API.Example.com:8080")),
            "api.example.com"
        );
        assert_eq!(normalize_host(&h("example.com.")), "example.com");
        assert_eq!(normalize_host(&h("[::1]:80")), "::1");
        assert_eq!(normalize_host(&h("plain")), "plain");
    }

    #[test]
    fn request_ids() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(valid_request_id(&a));
        assert!(!valid_request_id(&HeaderValue::from_static("has space")));
    }
}

#[cfg(test)]
mod size_tests {
    /// The request future is allocated per request (see server::serve_connection)
    /// and touched on every request: guard against it ballooning. Rare paths
    /// (connecting) are boxed out of line.
    #[test]
    fn request_future_stays_small() {
        fn size_of_future<A, B, F>(_: fn(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size_of_future::<&'static super::ConnCtx, http::Request<hyper::body::Incoming>, _>(
            super::handle,
        );
        eprintln!("handle future: {size} bytes");
        // 6416 in a debug build with access-log, tracing and load-shedding
        // state (6,232 before load shedding, 6,144 before tracing); release
        // builds are smaller.
        assert!(size <= 6528, "request future grew to {size} bytes");
    }
}
