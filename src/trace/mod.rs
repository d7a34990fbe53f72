//! OpenTelemetry tracing: W3C `traceparent` propagation, a SERVER span per
//! request and a CLIENT span per upstream attempt, exported over OTLP/HTTP
//! (protobuf) in batches by a background task.
//!
//! Configured by the top-level `tracing` key (compiled into
//! `Snapshot::tracer`). Without it nothing here runs: the request path
//! tests one `Option` and the client's `traceparent`/`tracestate` go
//! upstream untouched, like any other header.
//!
//! With it, `service::respond` calls [`Tracer::begin`]: the incoming
//! `traceparent` is continued when valid (else a trace is started and the
//! `tracestate` dropped), and the sampling decision is made once
//! ([`Tracer::sampled`]). The resulting [`TraceCtx`] rides in `policy::Ctx`;
//! the proxy asks it for an [`Attempt`] per upstream attempt, whose span id
//! is the parent in the `traceparent` sent upstream. Only a sampled request
//! records anything: its [`ServerSpan`] is boxed into the request's
//! `Outcome` and finished when the response ends; each attempt's span ends
//! when the attempt's response headers arrive or it fails. Finished spans go
//! to a bounded queue with `try_send` (full: dropped and counted), never
//! blocking a request; `export::run` batches and POSTs them.

pub mod export;
pub mod otlp;
pub mod propagation;

use crate::config::model::Protocol;
use crate::error::ErrorKind;
use crate::rand::fast_u64;
use crate::upstream::endpoint::Endpoint;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use propagation::Parent;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Spans the collector accepted.
pub static SPANS_EXPORTED: AtomicU64 = AtomicU64::new(0);
/// Spans dropped because the export queue was full.
pub static SPANS_DROPPED_QUEUE: AtomicU64 = AtomicU64::new(0);
/// Spans lost with a failed export request.
pub static SPANS_DROPPED_EXPORT: AtomicU64 = AtomicU64::new(0);
/// Export requests that failed (connect, timeout, non-2xx).
pub static EXPORT_FAILURES: AtomicU64 = AtomicU64::new(0);

/// `tracing` as compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSpec {
    /// The collector's `host:port` (what is connected to and sent as Host).
    pub authority: String,
    /// The full endpoint URI (`http://host:port/v1/traces`).
    pub endpoint: Uri,
    pub headers: HeaderMap,
    pub timeout: Duration,
    pub sample_ratio: f64,
    pub parent_based: bool,
    pub service_name: String,
    pub max_spans: usize,
    pub interval: Duration,
    pub queue: usize,
}

pub(crate) enum Msg {
    Span(SpanRecord),
    Flush(oneshot::Sender<()>),
}

/// The compiled tracer: sampling and the export queue. One per
/// configuration of `tracing`; a reload that keeps the key keeps it.
pub struct Tracer {
    pub spec: Arc<TracingSpec>,
    /// `sample_ratio` as a bound on 63 bits of the trace id.
    threshold: u64,
    tx: mpsc::Sender<Msg>,
    /// Taken by [`Tracer::start`].
    rx: Mutex<Option<mpsc::Receiver<Msg>>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("spec", &self.spec).finish()
    }
}

impl Tracer {
    pub fn new(spec: TracingSpec) -> Tracer {
        let (tx, rx) = mpsc::channel(spec.queue.max(1));
        // As OpenTelemetry's TraceIdRatioBased: the trace id's last 8 bytes,
        // shifted to 63 bits, below ratio × 2^63.
        let threshold = (spec.sample_ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
        Tracer {
            spec: Arc::new(spec),
            threshold,
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Spawns the export task (once; later calls do nothing). It ends, after
    /// a last export, when the tracer is dropped.
    pub fn start(&self) {
        let rx = self.rx.lock().ok().and_then(|mut g| g.take());
        if let Some(rx) = rx {
            tokio::spawn(export::run(rx, self.spec.clone()));
        }
    }

    /// Exports what is queued, waiting at most `within`.
    pub async fn flush(&self, within: Duration) {
        if self.rx.lock().map(|g| g.is_some()).unwrap_or(true) {
            return; // not started
        }
        let (tx, rx) = oneshot::channel();
        let _ = tokio::time::timeout(within, async {
            if self.tx.send(Msg::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        })
        .await;
    }

    /// Deterministic on the trace id, so every service sampling by ratio
    /// keeps or drops the same traces.
    fn ratio_sampled(&self, trace_id: &[u8; 16]) -> bool {
        let mut lo = [0u8; 8];
        lo.copy_from_slice(&trace_id[8..]);
        (u64::from_be_bytes(lo) >> 1) < self.threshold
    }

    /// The sampling decision: the parent's flag when parent-based and there
    /// is a parent, else the ratio.
    pub fn sampled(&self, parent: Option<&Parent>, trace_id: &[u8; 16]) -> bool {
        match parent {
            Some(p) if self.spec.parent_based => p.sampled,
            _ => self.ratio_sampled(trace_id),
        }
    }

    fn record(&self, span: SpanRecord) {
        if self.tx.try_send(Msg::Span(span)).is_err() {
            SPANS_DROPPED_QUEUE.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Continues or starts the request's trace and decides sampling. For a
    /// sampled request, also starts its SERVER span.
    pub fn begin<B>(
        self: &Arc<Self>,
        req: &mut Request<B>,
        peer: SocketAddr,
        tls: bool,
        request_id: &HeaderValue,
    ) -> (TraceCtx, Option<Box<ServerSpan>>) {
        let headers = req.headers_mut();
        let mut all = headers.get_all(&TRACEPARENT).iter();
        let parent = match (all.next(), all.next()) {
            (Some(v), None) => propagation::parse(v.as_bytes()),
            _ => None,
        };
        if parent.is_none() && headers.contains_key(&TRACESTATE) {
            // It belongs to a trace this request is not part of.
            headers.remove(&TRACESTATE);
        }
        let trace_id = match &parent {
            Some(p) => p.trace_id,
            None => new_trace_id(),
        };
        let sampled = self.sampled(parent.as_ref(), &trace_id);
        let span_id = new_span_id();
        let ctx = TraceCtx {
            trace_id,
            span_id,
            sampled,
            recorder: sampled.then(|| self.clone()),
        };
        if !sampled {
            return (ctx, None);
        }
        let headers = req.headers();
        let text = |h: &HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
        let trace_state = match (&parent, text(&TRACESTATE)) {
            (Some(_), Some(s)) if s.len() <= 512 => s.to_owned(),
            _ => String::new(),
        };
        let mut attrs = Vec::with_capacity(16);
        attrs.push(("http.request.method", Val::S(req.method().as_str().into())));
        attrs.push(("url.path", Val::S(req.uri().path().into())));
        attrs.push((
            "url.scheme",
            Val::S((if tls { "https" } else { "http" }).into()),
        ));
        let host = text(&header::HOST).or_else(|| req.uri().authority().map(|a| a.as_str()));
        if let Some(a) = host.and_then(|h| h.parse::<http::uri::Authority>().ok()) {
            attrs.push(("server.address", Val::S(a.host().into())));
            if let Some(p) = a.port_u16() {
                attrs.push(("server.port", Val::I(p.into())));
            }
        }
        attrs.push(("network.peer.address", Val::S(peer.ip().to_string())));
        attrs.push(("network.peer.port", Val::I(peer.port().into())));
        attrs.push((
            "network.protocol.version",
            Val::S(protocol_version(req.version()).into()),
        ));
        if let Some(ua) = text(&header::USER_AGENT) {
            attrs.push(("user_agent.original", Val::S(ua.into())));
        }
        if let Ok(id) = request_id.to_str() {
            attrs.push(("portico.request_id", Val::S(id.into())));
        }
        let span = Box::new(ServerSpan {
            tracer: self.clone(),
            started: Instant::now(),
            method: req.method().clone(),
            route: None,
            client: peer.ip(),
            rec: Some(SpanRecord {
                trace_id,
                span_id,
                parent: parent.map(|p| p.span_id),
                remote_parent: parent.is_some(),
                trace_state,
                name: String::new(),
                kind: otlp::span_kind::SERVER,
                start: unix_nanos(),
                end: 0,
                attrs,
                error: None,
            }),
        });
        (ctx, Some(span))
    }
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "other",
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// 128 random bits, never all zero (xorshift* never yields 0).
fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&fast_u64().to_be_bytes());
    id[8..].copy_from_slice(&fast_u64().to_be_bytes());
    id
}

fn new_span_id() -> [u8; 8] {
    fast_u64().to_be_bytes()
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    S(String),
    I(i64),
}

/// A finished span, as queued for export.
#[derive(Debug)]
pub(crate) struct SpanRecord {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    remote_parent: bool,
    trace_state: String,
    name: String,
    kind: i32,
    start: u64,
    end: u64,
    attrs: Vec<(&'static str, Val)>,
    /// Status ERROR with this message.
    error: Option<String>,
}

/// What the request path knows of its trace (in `policy::Ctx`).
#[derive(Debug, Clone)]
pub struct TraceCtx {
    pub trace_id: [u8; 16],
    /// The SERVER span's id: the parent of the attempts' spans.
    pub span_id: [u8; 8],
    pub sampled: bool,
    /// Set when sampled: where the attempts' spans go.
    recorder: Option<Arc<Tracer>>,
}

impl TraceCtx {
    /// A new upstream attempt (a CLIENT span when sampled) and the
    /// `traceparent` to send with it.
    pub fn attempt(
        &self,
        method: &Method,
        uri: &Uri,
        ep: &Endpoint,
        protocol: Protocol,
        upstream: &str,
        resends: u32,
    ) -> (HeaderValue, Attempt) {
        let span_id = new_span_id();
        let rec = self.recorder.as_ref().map(|tracer| {
            let scheme = if ep.tls.is_some() { "https" } else { "http" };
            let (host, port) = match ep.target.rsplit_once(':') {
                Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
                None => (&*ep.target, ""),
            };
            let mut attrs = Vec::with_capacity(12);
            attrs.push(("http.request.method", Val::S(method.as_str().into())));
            attrs.push(("server.address", Val::S(host.into())));
            if let Ok(p) = port.parse::<u16>() {
                attrs.push(("server.port", Val::I(p.into())));
            }
            attrs.push(("network.peer.address", Val::S(ep.addr.ip().to_string())));
            attrs.push(("network.peer.port", Val::I(ep.addr.port().into())));
            // The query is left out: it may carry credentials.
            attrs.push((
                "url.full",
                Val::S(format!("{scheme}://{}{}", ep.target, uri.path())),
            ));
            attrs.push((
                "network.protocol.version",
                Val::S(
                    (if protocol == Protocol::Http1 {
                        "1.1"
                    } else {
                        "2"
                    })
                    .into(),
                ),
            ));
            attrs.push(("portico.upstream", Val::S(upstream.into())));
            if resends > 0 {
                attrs.push(("http.request.resend_count", Val::I(resends.into())));
            }
            Box::new(PendingAttempt {
                tracer: tracer.clone(),
                started: Instant::now(),
                rec: SpanRecord {
                    trace_id: self.trace_id,
                    span_id,
                    parent: Some(self.span_id),
                    remote_parent: false,
                    trace_state: String::new(),
                    name: method.as_str().into(),
                    kind: otlp::span_kind::CLIENT,
                    start: unix_nanos(),
                    end: 0,
                    attrs,
                    error: None,
                },
            })
        });
        let header = propagation::format(&self.trace_id, &span_id, self.sampled);
        (header, Attempt { rec })
    }
}

struct PendingAttempt {
    tracer: Arc<Tracer>,
    started: Instant,
    rec: SpanRecord,
}

/// One upstream attempt's span: its id goes upstream in `traceparent`.
/// (One pointer: it lives in the proxy's per-request future.)
pub struct Attempt {
    rec: Option<Box<PendingAttempt>>,
}

impl Attempt {
    /// Ends the span: the upstream's status, or the error that ended the
    /// attempt. 4xx and 5xx answers are errors for a client span.
    pub fn end(mut self, status: Option<u16>, error: Option<ErrorKind>) {
        self.finish(status, error.map(|k| k.code()));
    }

    /// Ends the span as an error with its own `error.type` (the attempt was
    /// given up without an answer or a gateway error).
    pub fn abandon(mut self, why: &'static str) {
        self.finish(None, Some(why));
    }

    fn finish(&mut self, status: Option<u16>, error: Option<&'static str>) {
        let Some(p) = self.rec.take() else { return };
        let PendingAttempt {
            tracer,
            started,
            mut rec,
        } = *p;
        rec.end = rec.start + started.elapsed().as_nanos() as u64;
        if let Some(s) = status {
            rec.attrs
                .push(("http.response.status_code", Val::I(s.into())));
            if s >= 400 {
                rec.attrs.push(("error.type", Val::S(s.to_string())));
                rec.error = Some(String::new());
            }
        }
        if let Some(code) = error {
            rec.attrs.push(("error.type", Val::S(code.into())));
            rec.error = Some(code.into());
        }
        tracer.record(rec);
    }
}

impl Drop for Attempt {
    /// The exchange was dropped: the whole-request deadline passed (or the
    /// client left) while the attempt was under way.
    fn drop(&mut self) {
        self.finish(None, Some("cancelled"));
    }
}

/// A sampled request's SERVER span, carried by its `Outcome`.
pub struct ServerSpan {
    tracer: Arc<Tracer>,
    started: Instant,
    method: Method,
    route: Option<Arc<str>>,
    client: IpAddr,
    /// Taken when the span ends.
    rec: Option<SpanRecord>,
}

impl ServerSpan {
    /// The matched route (`http.route`, and the span's name).
    pub fn set_route(&mut self, route: Arc<str>) {
        self.route = Some(route);
    }

    /// The real client address (after trusted proxies).
    pub fn set_client(&mut self, ip: IpAddr) {
        self.client = ip;
    }

    /// Ends the span when the response is over. `status` 0: the client left
    /// before there was a response. An error when the status is 5xx or the
    /// gateway made the response.
    pub fn finish(mut self: Box<Self>, status: u16, error: Option<ErrorKind>) {
        self.end(status, error);
    }

    fn end(&mut self, status: u16, error: Option<ErrorKind>) {
        let Some(mut rec) = self.rec.take() else {
            return;
        };
        rec.end = rec.start + self.started.elapsed().as_nanos() as u64;
        rec.attrs
            .push(("client.address", Val::S(self.client.to_string())));
        rec.name = match &self.route {
            Some(r) => format!("{} {r}", self.method),
            None => self.method.as_str().into(),
        };
        if let Some(r) = &self.route {
            rec.attrs.push(("http.route", Val::S(r.to_string())));
        }
        if status != 0 {
            rec.attrs
                .push(("http.response.status_code", Val::I(status.into())));
        }
        if let Some(k) = error {
            rec.attrs
                .push(("portico.error.code", Val::S(k.code().into())));
            rec.attrs.push(("error.type", Val::S(k.code().into())));
            rec.error = Some(k.code().into());
        } else if status >= 500 {
            rec.attrs.push(("error.type", Val::S(status.to_string())));
            rec.error = Some(String::new());
        } else if status == 0 {
            rec.attrs.push(("error.type", Val::S("cancelled".into())));
            rec.error = Some("cancelled".into());
        }
        self.tracer.record(rec);
    }
}

impl Drop for ServerSpan {
    /// The request's future was dropped before it had a response (the
    /// client left): ended as cancelled.
    fn drop(&mut self) {
        self.end(0, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(ratio: f64, parent_based: bool) -> Tracer {
        Tracer::new(TracingSpec {
            authority: "127.0.0.1:4318".into(),
            endpoint: Uri::from_static("http://127.0.0.1:4318/v1/traces"),
            headers: HeaderMap::new(),
            timeout: Duration::from_secs(1),
            sample_ratio: ratio,
            parent_based,
            service_name: "t".into(),
            max_spans: 10,
            interval: Duration::from_secs(1),
            queue: 10,
        })
    }

    #[test]
    fn ratio_sampling_is_deterministic_on_the_trace_id() {
        let mut low = [0u8; 16];
        low[15] = 1;
        let mut high = [0xffu8; 16];
        high[0] = 0;
        assert!(!tracer(0.0, true).sampled(None, &low));
        assert!(tracer(1.0, true).sampled(None, &high));
        let half = tracer(0.5, true);
        assert!(half.sampled(None, &low));
        assert!(!half.sampled(None, &high));
        let n = 10_000;
        let kept = (0..n)
            .filter(|_| tracer(0.25, true).sampled(None, &new_trace_id()))
            .count();
        assert!((2000..3000).contains(&kept), "{kept}");
    }

    #[test]
    fn parent_based_follows_the_parent() {
        let p = |sampled| Parent {
            trace_id: [1; 16],
            span_id: [2; 8],
            sampled,
        };
        assert!(tracer(0.0, true).sampled(Some(&p(true)), &[1; 16]));
        assert!(!tracer(1.0, true).sampled(Some(&p(false)), &[1; 16]));
        // Not parent-based: the ratio decides.
        assert!(tracer(1.0, false).sampled(Some(&p(false)), &[1; 16]));
        assert!(!tracer(0.0, false).sampled(Some(&p(true)), &[1; 16]));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let t = Arc::new(tracer(1.0, true));
        let before = SPANS_DROPPED_QUEUE.load(Ordering::Relaxed);
        for _ in 0..12 {
            let mut req = Request::new(());
            let (ctx, span) = t.begin(
                &mut req,
                "127.0.0.1:1".parse().unwrap(),
                false,
                &HeaderValue::from_static("id"),
            );
            assert!(ctx.sampled);
            span.unwrap().finish(200, None);
        }
        assert!(SPANS_DROPPED_QUEUE.load(Ordering::Relaxed) - before >= 2);
    }
}
