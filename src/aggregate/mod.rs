//! The `aggregate` action: one client request fans out to several named
//! upstream calls and is answered with one merged JSON document
//! (docs/aggregation.md is the reference).
//!
//! Per request, within the request's own task (no spawn): every call whose
//! dependencies are settled is built from its templates ([`template`]) and
//! started; ready calls run concurrently in a `FuturesUnordered`, so the
//! latency is the critical path of the dependency graph (checked for
//! unknown names and cycles at load, [`compile`]). Each call goes through
//! [`ProxyAction::send`] — the proxy's balancer, pools, health, retries and
//! timeouts, and the upstream's circuit breaker and adaptive concurrency
//! limit — optionally behind single-flight and a cache ([`share`]), and
//! its body is read up to the call's and the action's limits and parsed.
//! A settled call is shaped ([`shape`]); a failed required call ends the
//! request (502, 504 on timeout, 503 when the upstream's protections
//! refused it; calls still running are dropped), a failed
//! optional one leaves its fallback (if any) and an entry in `_errors`.

pub mod compile;
pub mod doc;
pub mod shape;
pub mod share;
pub mod template;

use crate::body::Body;
use crate::error::{ErrorKind, GatewayError};
use crate::outcome::Attempt;
use crate::policy::Ctx;
use crate::proxy::ProxyAction;
use bytes::Bytes;
use doc::Node;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use shape::{Fields, Path, Shape};
use share::{Cache, Flights, Join, Shared};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use template::{Enc, Inputs, JsonT, Template};

/// Set on a `200` when an optional call failed.
pub static PORTICO_PARTIAL: HeaderName = HeaderName::from_static("portico-partial");

/// Sparse fieldsets: at most this many fields, each at most this long.
const MAX_FIELDS: usize = 100;
const MAX_FIELD_LEN: usize = 256;

pub struct AggregateAction {
    pub calls: Box<[Call]>,
    /// The query parameter of the sparse fieldset, when enabled.
    pub fields_param: Option<Box<str>>,
    /// Upstream body bytes one request may read, all calls together.
    pub max_total_body: u64,
}

/// One compiled call.
pub struct Call {
    pub name: Arc<str>,
    /// The upstream and its timeouts and retries, as a proxy route gets them.
    pub proxy: ProxyAction,
    pub method: Method,
    pub path: Template,
    /// The path and query when no template varies them (parsed once).
    pub static_uri: Option<Uri>,
    /// Percent-encoded name → value template.
    pub query: Vec<(String, Template)>,
    pub headers: Vec<(HeaderName, Template)>,
    pub body: Option<JsonT>,
    pub timeout: Duration,
    pub required: bool,
    pub fallback: Option<Value>,
    pub max_body: u64,
    /// Calls this one waits for (indexes, sorted, unique).
    pub deps: Box<[usize]>,
    /// Whether another call's templates read this one's response.
    pub referenced: bool,
    pub flights: Option<Flights>,
    pub cache: Option<Cache>,
    pub public: bool,
    pub shape: Shape,
    /// Where the result goes; `None`: its fields are merged at the top.
    pub group: Option<Path>,
}

/// Why a call counts as failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub reason: String,
}

impl Failure {
    fn new(kind: ErrorKind, reason: impl Into<String>) -> Failure {
        Failure {
            kind,
            reason: reason.into(),
        }
    }

    fn from_error(e: &GatewayError) -> Failure {
        Failure::new(e.kind(), e.message())
    }
}

/// A call's request, ready to send.
struct Built {
    parts: http::request::Parts,
    body: Bytes,
    /// The single-flight / cache key, when either is on.
    key: Option<Vec<u8>>,
    /// Whether the key names no identity (shared by several callers).
    shared_key: bool,
}

/// A settled call: its shaped result, or why it failed.
type Settled = Result<Node, Failure>;

impl AggregateAction {
    pub async fn run(
        &self,
        req: Request<Body>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, GatewayError> {
        // The client's body is not used: it is dropped unread.
        let (parts, _) = req.into_parts();
        let fields = self.fields(ctx)?;
        let mut last = None;
        let gathered = self.gather(&parts.headers, ctx, &mut last).await;
        if last.is_some() {
            ctx.upstream = last;
        }
        Ok(self.assemble(gathered?, fields))
    }

    /// The client's sparse fieldset, if the route enables one and the
    /// request has it.
    fn fields(&self, ctx: &Ctx) -> Result<Option<Fields>, GatewayError> {
        let Some(name) = &self.fields_param else {
            return Ok(None);
        };
        let Some(v) = crate::auth::credential::query_param(&ctx.original_uri, name) else {
            return Ok(None);
        };
        let bad = |why: String| {
            GatewayError::new(
                ErrorKind::BadRequest,
                format!("query parameter `{name}`: {why}"),
            )
        };
        let mut paths = Vec::new();
        for f in v.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            if paths.len() == MAX_FIELDS {
                return Err(bad(format!("more than {MAX_FIELDS} fields")));
            }
            if f.len() > MAX_FIELD_LEN {
                return Err(bad(format!("a field is longer than {MAX_FIELD_LEN} bytes")));
            }
            paths.push(shape::path(f).ok_or_else(|| bad(format!("`{f}` is not a dot path")))?);
        }
        if paths.is_empty() {
            return Ok(None);
        }
        Ok(Some(Fields::from_paths(paths.iter().map(|p| &**p))))
    }

    /// Runs every call, ready ones concurrently, and returns each call's
    /// settled result in config order; `Err` as soon as a required call
    /// fails (calls still running are dropped).
    async fn gather(
        &self,
        headers: &HeaderMap,
        ctx: &Ctx,
        last: &mut Option<Attempt>,
    ) -> Result<Vec<Settled>, GatewayError> {
        let n = self.calls.len();
        let mut settled: Vec<Option<Settled>> = vec![None; n];
        // Raw responses, for the templates of dependent calls.
        let mut raw: Vec<Option<Arc<Value>>> = vec![None; n];
        let mut started = vec![false; n];
        let total = AtomicU64::new(0);
        let mut running = FuturesUnordered::new();
        loop {
            // Start every call whose dependencies are settled (or settle it
            // as failed when one of them failed); repeat, since a call
            // settled here may unblock another.
            let mut progress = true;
            while progress {
                progress = false;
                for (i, call) in self.calls.iter().enumerate() {
                    if started[i] || call.deps.iter().any(|d| settled[*d].is_none()) {
                        continue;
                    }
                    started[i] = true;
                    progress = true;
                    let failed_dep = call.deps.iter().find_map(|d| match &settled[*d] {
                        Some(Err(f)) => Some((*d, f.kind)),
                        _ => None,
                    });
                    let built = match failed_dep {
                        Some((d, kind)) => Err(Failure::new(
                            kind,
                            format!("depends on call `{}`, which failed", self.calls[d].name),
                        )),
                        None => self.build(
                            call,
                            &Inputs {
                                ctx,
                                headers,
                                calls: &raw,
                            },
                        ),
                    };
                    match built {
                        Ok(b) => running.push(self.exec(i, b, ctx, &total)),
                        Err(f) => self.settle(i, Err(f), &mut settled, &mut raw)?,
                    }
                }
            }
            let Some((i, outcome, attempt)) = running.next().await else {
                break;
            };
            if attempt.is_some() {
                *last = attempt;
            }
            self.settle(i, outcome, &mut settled, &mut raw)?;
        }
        Ok(settled
            .into_iter()
            .map(|s| s.unwrap_or_else(|| Err(Failure::new(ErrorKind::Internal, "never ran"))))
            .collect())
    }

    /// Records call `i`'s outcome, shaped; `Err` when a required call
    /// failed.
    fn settle(
        &self,
        i: usize,
        outcome: Shared,
        settled: &mut [Option<Settled>],
        raw: &mut [Option<Arc<Value>>],
    ) -> Result<(), GatewayError> {
        let call = &self.calls[i];
        let result = outcome.and_then(|text| {
            let failed = |r| Failure::new(ErrorKind::UpstreamProtocol, r);
            // A tree only when templates read the answer or the shape
            // needs one; otherwise the text is placed as it is ([`doc`]).
            let merge = call.group.is_none();
            let place = || {
                doc::place(
                    &text,
                    call.shape.target.as_ref(),
                    call.shape.collection,
                    merge,
                )
                .map_err(failed)
            };
            if !call.referenced && !call.shape.needs_tree() {
                return place();
            }
            let v: Value =
                serde_json::from_slice(&text).map_err(|e| failed(format!("invalid JSON: {e}")))?;
            let v = if call.referenced {
                let v = Arc::new(v);
                raw[i] = Some(v.clone());
                if !call.shape.needs_tree() {
                    return place();
                }
                Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone())
            } else {
                v
            };
            let v = call.shape.apply(v).map_err(failed)?;
            if merge && !matches!(v, Value::Object(_) | Value::Null) {
                return Err(failed(format!(
                    "answered {}, not an object: set `group` or `collection` to place it",
                    shape::type_name(&v)
                )));
            }
            Ok(Node::Tree(v))
        });
        if let (Err(f), true) = (&result, call.required) {
            let kind = match f.kind {
                ErrorKind::UpstreamTimeout => ErrorKind::UpstreamTimeout,
                ErrorKind::UpstreamUnreachable | ErrorKind::NoHealthyTarget => {
                    ErrorKind::UpstreamUnreachable
                }
                // The upstream's protections refused the call (it was not
                // sent): the same answer as a proxied request would get.
                ErrorKind::Overloaded | ErrorKind::CircuitOpen => f.kind,
                _ => ErrorKind::UpstreamProtocol,
            };
            return Err(GatewayError::new(
                kind,
                format!("required call `{}` failed: {}", call.name, f.reason),
            )
            .with_details(serde_json::json!({"call": &*call.name, "reason": &f.reason})));
        }
        settled[i] = Some(result);
        Ok(())
    }

    /// Renders call `call`'s path and query from its templates.
    fn uri(&self, call: &Call, inp: &Inputs<'_>) -> Result<Uri, Failure> {
        let missing = |r: String| Failure::new(ErrorKind::UpstreamProtocol, r);
        let mut pq = String::with_capacity(64);
        call.path.render(inp, Enc::Path, &mut pq).map_err(missing)?;
        let mut sep = '?';
        for (name, t) in &call.query {
            let mark = pq.len();
            pq.push(sep);
            pq.push_str(name);
            pq.push('=');
            if t.render(inp, Enc::Query, &mut pq).map_err(missing)? {
                sep = '&';
            } else {
                pq.truncate(mark);
            }
        }
        Uri::try_from(pq).map_err(|e| {
            Failure::new(
                ErrorKind::Internal,
                format!("the path is not a valid URI: {e}"),
            )
        })
    }

    /// Renders call `call`'s request from its templates.
    fn build(&self, call: &Call, inp: &Inputs<'_>) -> Result<Built, Failure> {
        let missing = |r: String| Failure::new(ErrorKind::UpstreamProtocol, r);
        let uri = match &call.static_uri {
            Some(u) => u.clone(),
            None => self.uri(call, inp)?,
        };
        let mut headers = HeaderMap::with_capacity(call.headers.len() + 8);
        let mut v = String::new();
        for (name, t) in &call.headers {
            v.clear();
            if !t.render(inp, Enc::Raw, &mut v).map_err(missing)? {
                continue;
            }
            let hv = HeaderValue::from_str(&v).map_err(|_| {
                Failure::new(
                    ErrorKind::UpstreamProtocol,
                    format!("header `{name}`: the value is not a valid header value"),
                )
            })?;
            headers.insert(name.clone(), hv);
        }
        let body = match &call.body {
            Some(t) => {
                let doc = t.render(inp).map_err(missing)?;
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
            }
            None => Bytes::new(),
        };
        let mut req = Request::new(());
        *req.method_mut() = call.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let (parts, ()) = req.into_parts();
        let (key, shared_key) = if call.flights.is_some() || call.cache.is_some() {
            let (k, shared) = key_of(&parts, &body, call.public, inp.ctx);
            (Some(k), shared)
        } else {
            (None, true)
        };
        Ok(Built {
            parts,
            body,
            key,
            shared_key,
        })
    }

    /// Runs call `i` under its timeout.
    async fn exec<'a>(
        &'a self,
        i: usize,
        built: Built,
        ctx: &'a Ctx,
        total: &'a AtomicU64,
    ) -> (usize, Shared, Option<Attempt>) {
        let call = &self.calls[i];
        let mut last = None;
        let outcome = match tokio::time::timeout(
            call.timeout,
            self.shared(call, built, ctx, total, &mut last),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Failure::new(
                ErrorKind::UpstreamTimeout,
                format!("timed out after {:?}", call.timeout),
            )),
        };
        (i, outcome, last)
    }

    /// The call's answer from the cache, from an identical call in flight,
    /// or fetched (and then offered to both).
    async fn shared(
        &self,
        call: &Call,
        built: Built,
        ctx: &Ctx,
        total: &AtomicU64,
        last: &mut Option<Attempt>,
    ) -> Shared {
        let Built {
            parts,
            body,
            key,
            shared_key,
        } = built;
        let key = key.as_deref();
        if let (Some(c), Some(k)) = (&call.cache, key) {
            if let Some(v) = c.get(k) {
                return Ok(v);
            }
        }
        let leader = match (&call.flights, key) {
            (Some(f), Some(k)) => match f.join(k) {
                Join::Lead(l) => Some(l),
                Join::Follow(rx) => match share::follow(rx).await {
                    Some(r) => return r,
                    // The leader was cancelled: make the call ourselves.
                    None => None,
                },
            },
            _ => None,
        };
        let fetched = self.fetch(call, parts, body, ctx, total, last).await;
        let outcome = fetched.map(|(v, cc)| {
            if let (Some(c), Some(k)) = (&call.cache, key) {
                c.put(k, &v, cc.as_ref(), shared_key);
            }
            v
        });
        if let Some(l) = leader {
            l.finish(&outcome);
        }
        outcome
    }

    /// Sends the call and reads its JSON answer (and `Cache-Control`).
    async fn fetch(
        &self,
        call: &Call,
        parts: http::request::Parts,
        body: Bytes,
        ctx: &Ctx,
        total: &AtomicU64,
        last: &mut Option<Attempt>,
    ) -> Result<(Bytes, Option<HeaderValue>), Failure> {
        // Boxed: the exchange's state is most of a call's future, which is
        // otherwise copied at each layer (timeout, single-flight, the set
        // of running calls) as the call starts.
        let resp = Box::pin(call.proxy.send(parts, body, ctx, call.timeout, last))
            .await
            .map_err(|e| Failure::from_error(&e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(Failure::new(
                ErrorKind::UpstreamProtocol,
                format!("answered status {}", status.as_u16()),
            ));
        }
        if let Some(ct) = resp.headers().get(CONTENT_TYPE) {
            if !is_json(ct) {
                return Err(Failure::new(
                    ErrorKind::UpstreamProtocol,
                    format!(
                        "answered `{}`, not JSON",
                        String::from_utf8_lossy(ct.as_bytes())
                    ),
                ));
            }
        }
        let cc = resp.headers().get(CACHE_CONTROL).cloned();
        let mut body = resp.into_body();
        // The first chunk is kept as it is; a second one starts a copy.
        let (mut first, mut buf) = (Bytes::new(), None::<Vec<u8>>);
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Failure::new(
                    ErrorKind::UpstreamProtocol,
                    format!("the response body broke off: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            len += data.len();
            if len as u64 > call.max_body {
                return Err(Failure::new(
                    ErrorKind::UpstreamProtocol,
                    format!("the response body is larger than {} bytes", call.max_body),
                ));
            }
            let before = total.fetch_add(data.len() as u64, Ordering::Relaxed);
            if before + data.len() as u64 > self.max_total_body {
                return Err(Failure::new(
                    ErrorKind::UpstreamProtocol,
                    format!(
                        "the calls' bodies together are larger than {} bytes (max_total_body)",
                        self.max_total_body
                    ),
                ));
            }
            match &mut buf {
                Some(b) => b.extend_from_slice(&data),
                None if first.is_empty() => first = data,
                None => {
                    let mut b = Vec::with_capacity(first.len() + data.len());
                    b.extend_from_slice(&first);
                    b.extend_from_slice(&data);
                    buf = Some(b);
                }
            }
        }
        let text = buf.map_or(first, Bytes::from);
        if text.is_empty() {
            return Ok((Bytes::from_static(b"null"), cc));
        }
        // Checked when it settles; an answer other requests may receive is
        // checked before it is shared (and settles checked again).
        if call.cache.is_some() || call.flights.is_some() {
            doc::check(&text).map_err(|e| {
                Failure::new(ErrorKind::UpstreamProtocol, format!("invalid JSON: {e}"))
            })?;
        }
        Ok((text, cc))
    }

    /// The merged document: results in call order (a later call's
    /// top-level field wins), the sparse fieldset, `_errors`.
    fn assemble(&self, settled: Vec<Settled>, fields: Option<Fields>) -> Response<Body> {
        let mut root = BTreeMap::new();
        let mut errors = Vec::new();
        for (call, s) in self.calls.iter().zip(settled) {
            let v = match s {
                Ok(v) => v,
                Err(f) => {
                    let mut e = Map::new();
                    e.insert("call".into(), Value::from(&*call.name));
                    e.insert("reason".into(), Value::from(f.reason));
                    if call.fallback.is_some() {
                        e.insert("fallback".into(), Value::Bool(true));
                    }
                    errors.push(Value::Object(e));
                    match &call.fallback {
                        Some(fb) => Node::Tree(fb.clone()),
                        None => continue,
                    }
                }
            };
            match &call.group {
                Some(g) => doc::put(&mut root, g, v),
                // A non-object without a group is refused when settled (a
                // fallback: at load); `null` adds nothing.
                None => doc::merge(&mut root, v),
            }
        }
        let mut doc = Node::Obj(root);
        if let Some(f) = fields {
            doc.keep(&f);
        }
        let partial = !errors.is_empty();
        if let (true, Node::Obj(m)) = (partial, &mut doc) {
            m.insert("_errors".into(), Node::Tree(Value::Array(errors)));
        }
        let mut out = Vec::with_capacity(doc.size_hint());
        doc.write(&mut out);
        let mut resp = Response::new(Body::full(out));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if partial {
            h.insert(PORTICO_PARTIAL.clone(), HeaderValue::from_static("true"));
        }
        resp
    }

    /// Every upstream the calls use (for the admin API).
    pub fn upstreams(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.calls.iter().map(|c| &*c.proxy.upstream.name).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// `application/json`, or any `+json` type.
fn is_json(ct: &HeaderValue) -> bool {
    let Ok(s) = ct.to_str() else {
        return false;
    };
    let mime = s.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
        || mime
            .get(mime.len().saturating_sub(5)..)
            .is_some_and(|t| t.eq_ignore_ascii_case("+json"))
}

/// The single-flight / cache key: everything the call sends, then who asks
/// (unless `public`). Also whether the key names no identity.
fn key_of(parts: &http::request::Parts, body: &[u8], public: bool, ctx: &Ctx) -> (Vec<u8>, bool) {
    let mut k = Vec::with_capacity(128 + body.len());
    k.extend_from_slice(parts.method.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(parts.uri.to_string().as_bytes());
    k.push(0);
    for (n, v) in &parts.headers {
        k.extend_from_slice(n.as_str().as_bytes());
        k.push(b':');
        k.extend_from_slice(v.as_bytes());
        k.push(0);
    }
    k.push(0);
    k.extend_from_slice(body);
    k.push(0);
    if public {
        k.push(b'P');
        return (k, true);
    }
    let id = ctx.identity.as_ref();
    match (
        id.and_then(|i| i.consumer.as_ref()),
        id.and_then(|i| i.principal.as_ref()),
    ) {
        (Some(c), _) => {
            k.extend_from_slice(b"C:");
            k.extend_from_slice(c.id.as_bytes());
            (k, false)
        }
        (None, Some(p)) => {
            k.extend_from_slice(b"S:");
            k.extend_from_slice(p.issuer.as_bytes());
            k.push(0);
            k.extend_from_slice(p.subject.as_deref().unwrap_or("").as_bytes());
            (k, false)
        }
        (None, None) => {
            k.push(b'-');
            (k, true)
        }
    }
}
