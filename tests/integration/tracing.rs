//! OpenTelemetry tracing through a real gateway: an OTLP/HTTP receiver in
//! the test decodes the exported protobuf; upstreams record the
//! `traceparent`/`tracestate` they received.

use super::support::{gateway, upstream, TestGateway};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portico::trace::otlp::{any_value::Value, span_kind, status_code, ExportTraceServiceRequest};
use portico::trace::otlp::{KeyValue, Span};
use portico::trace::propagation::to_hex;
use prost::Message;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// An OTLP/HTTP receiver: every POST body decoded as an
/// `ExportTraceServiceRequest`, with its content type.
struct Collector {
    addr: SocketAddr,
    exports: Arc<Mutex<Vec<(String, ExportTraceServiceRequest)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = Arc::new(Mutex::new(Vec::new()));
        let store = exports.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let store = store.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let store = store.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            let ct = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let decoded = ExportTraceServiceRequest::decode(body)
                                .expect("a valid ExportTraceServiceRequest");
                            store.lock().unwrap().push((ct, decoded));
                            let mut r = Response::new(Full::new(Bytes::new()));
                            r.headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector {
            addr,
            exports,
            task,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.exports
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, e)| e.resource_spans.iter())
            .flat_map(|r| r.scope_spans.iter())
            .flat_map(|s| s.spans.iter().cloned())
            .collect()
    }

    /// The spans of trace `trace_id`, once there are `n` (5 s at most).
    async fn trace(&self, trace_id: &[u8], n: usize) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let got: Vec<Span> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} spans of trace {}, got {got:?}",
                to_hex(trace_id)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// An upstream that records the trace headers it receives and answers
/// `statuses[i]` to its i-th request (the last one after that).
struct Recorder {
    up: upstream::TestUpstream,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// `traceparent` and `tracestate` as an upstream received them.
type Seen = (Option<String>, Option<String>);

async fn recorder(statuses: &'static [u16], counter: Arc<AtomicUsize>) -> Recorder {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let store = seen.clone();
    let up = upstream::start(move |req: Request<Incoming>| {
        let store = store.clone();
        let counter = counter.clone();
        async move {
            let h = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
            store
                .lock()
                .unwrap()
                .push((h("traceparent"), h("tracestate")));
            let i = counter.fetch_add(1, Ordering::SeqCst);
            upstream::response(statuses[i.min(statuses.len() - 1)], "ok")
        }
    })
    .await;
    Recorder { up, seen }
}

impl Recorder {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn config(
    targets: &[SocketAddr],
    collector: SocketAddr,
    tracing_extra: &str,
    up_extra: &str,
) -> String {
    let mut t = String::new();
    for a in targets {
        t.push_str(&format!("      - address: {a}\n"));
    }
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n\
upstreams:\n  - name: up\n    targets:\n{t}{up_extra}\
routes:\n  - name: api\n    match: {{path_prefix: /api}}\n    action: {{proxy: {{upstream: up}}}}\n\
tracing:\n  otlp: {{endpoint: 'http://{collector}/v1/traces'}}\n  service_name: edge\n  batch: {{interval: 20ms}}\n{tracing_extra}"
    )
}

async fn get(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
    let mut req = Request::get(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = super::support::client::new()
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = r.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr<'a>(s: &'a Span, key: &str) -> &'a str {
    match attr(s, key) {
        Some(Value::StringValue(v)) => v,
        other => panic!("{key}: {other:?} in {}", s.name),
    }
}

fn int_attr(s: &Span, key: &str) -> i64 {
    match attr(s, key) {
        Some(Value::IntValue(v)) => *v,
        other => panic!("{key}: {other:?} in {}", s.name),
    }
}

fn status(s: &Span) -> i32 {
    s.status.as_ref().map_or(status_code::UNSET, |s| s.code)
}

/// `(trace id, parent id, sampled)` of a `traceparent` value.
fn parse_tp(v: &str) -> (String, String, bool) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "{v}");
    assert_eq!(p[0], "00", "{v}");
    (p[1].to_owned(), p[2].to_owned(), p[3] == "01")
}

fn of_kind(spans: &[Span], kind: i32) -> Vec<Span> {
    spans.iter().filter(|s| s.kind == kind).cloned().collect()
}

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const INCOMING_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A sampled request of a trace of its own, whose spans arriving show that
/// everything queued before it was exported too (the queue is FIFO).
async fn marker(gw: &TestGateway, c: &Collector, trace: &str) -> Vec<Span> {
    let tp = format!("00-{trace}-1111111111111111-01");
    let r = get(gw, "/api/marker", &[("traceparent", &tp)]).await;
    assert_eq!(r.status(), 200);
    c.trace(&hex_bytes(trace), 2).await
}

#[tokio::test]
async fn a_new_trace_has_a_server_span_and_a_client_span_that_the_upstream_continues() {
    let c = Collector::start().await;
    let up = recorder(&[200], Default::default()).await;
    let gw = gateway(&config(&[up.up.addr], c.addr, "", "")).await;

    let r = get(&gw, "/api/items?secret=1", &[("user-agent", "probe/1.0")]).await;
    assert_eq!(r.status(), 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let (trace, parent, sampled) = parse_tp(seen[0].0.as_deref().expect("traceparent sent"));
    assert!(sampled, "sample_ratio defaults to 1");
    assert_ne!(trace, "0".repeat(32));
    assert_eq!(seen[0].1, None, "no tracestate was invented");

    let spans = c.trace(&hex_bytes(&trace), 2).await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let server = &of_kind(&spans, span_kind::SERVER)[0];
    let client = &of_kind(&spans, span_kind::CLIENT)[0];
    // Links: the server span is the root; the client span its child; the
    // upstream's parent is the client span.
    assert!(server.parent_span_id.is_empty());
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(to_hex(&client.span_id), parent);
    assert_ne!(client.span_id, server.span_id);
    assert!(server.start_time_unix_nano <= client.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= server.end_time_unix_nano);
    assert!(client.start_time_unix_nano < client.end_time_unix_nano);

    assert_eq!(server.name, "GET api");
    assert_eq!(str_attr(server, "http.request.method"), "GET");
    assert_eq!(str_attr(server, "url.path"), "/api/items");
    assert_eq!(str_attr(server, "url.scheme"), "http");
    assert_eq!(str_attr(server, "server.address"), "127.0.0.1");
    assert_eq!(int_attr(server, "server.port"), gw.addr().port() as i64);
    assert_eq!(str_attr(server, "http.route"), "api");
    assert_eq!(int_attr(server, "http.response.status_code"), 200);
    assert_eq!(str_attr(server, "client.address"), "127.0.0.1");
    assert_eq!(str_attr(server, "user_agent.original"), "probe/1.0");
    assert_eq!(str_attr(server, "network.protocol.version"), "1.1");
    assert_eq!(
        str_attr(server, "portico.request_id"),
        r.headers()["x-request-id"].to_str().unwrap()
    );
    assert!(attr(server, "portico.error.code").is_none());
    assert_eq!(status(server), status_code::UNSET);

    assert_eq!(client.name, "GET");
    assert_eq!(str_attr(client, "http.request.method"), "GET");
    assert_eq!(str_attr(client, "server.address"), "127.0.0.1");
    assert_eq!(int_attr(client, "server.port"), up.up.addr.port() as i64);
    assert_eq!(
        str_attr(client, "url.full"),
        format!("http://{}/api/items", up.up.addr),
        "the query is not recorded"
    );
    assert_eq!(int_attr(client, "http.response.status_code"), 200);
    assert_eq!(str_attr(client, "portico.upstream"), "up");
    assert!(attr(client, "http.request.resend_count").is_none());
    assert_eq!(status(client), status_code::UNSET);

    let exports = c.exports.lock().unwrap();
    let (ct, e) = &exports[0];
    assert_eq!(ct, "application/x-protobuf");
    let resource = e.resource_spans[0].resource.as_ref().unwrap();
    let name = resource
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value);
    assert_eq!(name, Some(Value::StringValue("edge".into())));
}

#[tokio::test]
async fn an_incoming_sampled_traceparent_is_continued_with_its_tracestate() {
    let c = Collector::start().await;
    let up = recorder(&[200], Default::default()).await;
    let gw = gateway(&config(&[up.up.addr], c.addr, "  sample_ratio: 0\n", "")).await;

    let r = get(
        &gw,
        "/api/x",
        &[
            ("traceparent", INCOMING),
            ("tracestate", "vendor=abc,other=1"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    let spans = c.trace(&hex_bytes(INCOMING_TRACE), 2).await;
    let server = &of_kind(&spans, span_kind::SERVER)[0];
    let client = &of_kind(&spans, span_kind::CLIENT)[0];
    assert_eq!(to_hex(&server.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(server.trace_state, "vendor=abc,other=1");
    assert_eq!(server.flags & 0x300, 0x300, "the parent is remote");
    assert_eq!(client.parent_span_id, server.span_id);

    let seen = up.seen();
    let (trace, parent, sampled) = parse_tp(seen[0].0.as_deref().unwrap());
    assert_eq!(trace, INCOMING_TRACE);
    assert_eq!(parent, to_hex(&client.span_id));
    assert!(sampled);
    assert_eq!(seen[0].1.as_deref(), Some("vendor=abc,other=1"));
}

#[tokio::test]
async fn an_unsampled_traceparent_propagates_but_exports_nothing() {
    let c = Collector::start().await;
    let up = recorder(&[200], Default::default()).await;
    let gw = gateway(&config(&[up.up.addr], c.addr, "", "")).await;

    let unsampled = INCOMING.replace("-01", "-00");
    let r = get(
        &gw,
        "/api/x",
        &[("traceparent", &unsampled), ("tracestate", "vendor=abc")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let seen = up.seen();
    let (trace, parent, sampled) = parse_tp(seen[0].0.as_deref().unwrap());
    assert_eq!(trace, INCOMING_TRACE);
    assert!(!sampled);
    assert_ne!(
        parent, "00f067aa0ba902b7",
        "the gateway's hop has its own id"
    );
    assert_eq!(seen[0].1.as_deref(), Some("vendor=abc"));

    marker(&gw, &c, "22222222222222222222222222222222").await;
    let spans = c.spans();
    assert!(
        spans.iter().all(|s| to_hex(&s.trace_id) != INCOMING_TRACE),
        "{spans:?}"
    );
    assert_eq!(spans.len(), 2);
}

#[tokio::test]
async fn sample_ratio_zero_exports_no_new_trace_and_still_propagates() {
    let c = Collector::start().await;
    let up = recorder(&[200], Default::default()).await;
    let gw = gateway(&config(&[up.up.addr], c.addr, "  sample_ratio: 0.0\n", "")).await;

    for _ in 0..5 {
        assert_eq!(get(&gw, "/api/x", &[]).await.status(), 200);
    }
    // An invalid traceparent is a new trace too (and its tracestate dropped).
    let bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let r = get(
        &gw,
        "/api/x",
        &[("traceparent", bad), ("tracestate", "a=b")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 6);
    let mut traces = std::collections::HashSet::new();
    for (tp, ts) in &seen {
        let (trace, _, sampled) = parse_tp(tp.as_deref().unwrap());
        assert!(!sampled);
        assert_ne!(trace, "0".repeat(32));
        traces.insert(trace);
        assert_eq!(ts, &None);
    }
    assert_eq!(traces.len(), 6, "each request starts its own trace");

    marker(&gw, &c, "33333333333333333333333333333333").await;
    assert_eq!(c.spans().len(), 2, "only the marker's spans");
}

#[tokio::test]
async fn a_retry_is_a_second_client_span_under_the_same_server_span() {
    let c = Collector::start().await;
    let counter = Arc::new(AtomicUsize::new(0));
    // Whichever target is asked first answers 503, the next one 200.
    let a = recorder(&[503, 200], counter.clone()).await;
    let b = recorder(&[503, 200], counter).await;
    let gw = gateway(&config(
        &[a.up.addr, b.up.addr],
        c.addr,
        "",
        "    retries: {attempts: 1, on: [503]}\n",
    ))
    .await;

    let r = get(&gw, "/api/x", &[]).await;
    assert_eq!(r.status(), 200);
    let mut seen = a.seen();
    seen.extend(b.seen());
    assert_eq!(seen.len(), 2);
    let (trace, _, _) = parse_tp(seen[0].0.as_deref().unwrap());
    let spans = c.trace(&hex_bytes(&trace), 3).await;
    let server = &of_kind(&spans, span_kind::SERVER)[0];
    let mut clients = of_kind(&spans, span_kind::CLIENT);
    clients.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(clients.len(), 2);
    for (cl, (tp, _)) in clients.iter().zip(&seen) {
        assert_eq!(cl.parent_span_id, server.span_id);
        let (t, parent, _) = parse_tp(tp.as_deref().unwrap());
        assert_eq!(t, trace);
        assert!(
            clients.iter().any(|c| to_hex(&c.span_id) == parent),
            "each upstream request's parent is its attempt's span"
        );
    }
    assert_ne!(clients[0].span_id, clients[1].span_id);
    assert_eq!(int_attr(&clients[0], "http.response.status_code"), 503);
    assert_eq!(status(&clients[0]), status_code::ERROR);
    assert!(attr(&clients[0], "http.request.resend_count").is_none());
    assert_eq!(int_attr(&clients[1], "http.response.status_code"), 200);
    assert_eq!(int_attr(&clients[1], "http.request.resend_count"), 1);
    assert_eq!(status(&clients[1]), status_code::UNSET);
    assert_eq!(status(server), status_code::UNSET);
}

#[tokio::test]
async fn gateway_errors_mark_the_server_span_as_an_error() {
    let c = Collector::start().await;
    let down = upstream::closed_port().await;
    let gw = gateway(&config(&[down], c.addr, "", "    retries: {attempts: 0}\n")).await;

    let tp = "00-44444444444444444444444444444444-00f067aa0ba902b7-01";
    let r = get(&gw, "/nowhere", &[("traceparent", tp)]).await;
    assert_eq!(r.status(), 404);
    let spans = c
        .trace(&hex_bytes("44444444444444444444444444444444"), 1)
        .await;
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    assert_eq!(s.name, "GET");
    assert!(attr(s, "http.route").is_none());
    assert_eq!(int_attr(s, "http.response.status_code"), 404);
    assert_eq!(str_attr(s, "portico.error.code"), "route_not_found");
    assert_eq!(status(s), status_code::ERROR);
    assert_eq!(s.status.as_ref().unwrap().message, "route_not_found");

    let tp = "00-55555555555555555555555555555555-00f067aa0ba902b7-01";
    let r = get(&gw, "/api/x", &[("traceparent", tp)]).await;
    assert_eq!(r.status(), 502);
    let spans = c
        .trace(&hex_bytes("55555555555555555555555555555555"), 2)
        .await;
    let server = &of_kind(&spans, span_kind::SERVER)[0];
    let client = &of_kind(&spans, span_kind::CLIENT)[0];
    assert_eq!(int_attr(server, "http.response.status_code"), 502);
    assert_eq!(
        str_attr(server, "portico.error.code"),
        "upstream_unreachable"
    );
    assert_eq!(status(server), status_code::ERROR);
    assert_eq!(str_attr(client, "error.type"), "upstream_unreachable");
    assert!(attr(client, "http.response.status_code").is_none());
    assert_eq!(status(client), status_code::ERROR);
}

#[tokio::test]
async fn without_tracing_the_trace_headers_pass_through_untouched() {
    let up = recorder(&[200], Default::default()).await;
    let gw = gateway(&super::support::simple_config(
        &[up.up.addr],
        "",
        "  - name: api\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let r = get(
        &gw,
        "/x",
        &[("traceparent", INCOMING), ("tracestate", "vendor=abc")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(get(&gw, "/y", &[]).await.status(), 200);
    let seen = up.seen();
    assert_eq!(seen[0].0.as_deref(), Some(INCOMING));
    assert_eq!(seen[0].1.as_deref(), Some("vendor=abc"));
    assert_eq!(seen[1], (None, None), "nothing is started");
}

#[tokio::test]
async fn shutdown_flushes_queued_spans_and_failed_exports_are_counted() {
    use portico::trace::{EXPORT_FAILURES, SPANS_DROPPED_EXPORT, SPANS_EXPORTED};
    let c = Collector::start().await;
    let up = recorder(&[200], Default::default()).await;
    // A long interval and a large batch: only the shutdown flush exports.
    let yaml = config(&[up.up.addr], c.addr, "", "").replace("interval: 20ms", "interval: 1h");
    let gw = gateway(&yaml).await;
    let exported = SPANS_EXPORTED.load(Ordering::Relaxed);
    let tp = "00-66666666666666666666666666666666-00f067aa0ba902b7-01";
    assert_eq!(
        get(&gw, "/api/x", &[("traceparent", tp)]).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(c.spans().is_empty(), "nothing exported before the flush");
    gw.running.shutdown(Duration::from_millis(200)).await;
    let spans = c
        .trace(&hex_bytes("66666666666666666666666666666666"), 2)
        .await;
    assert_eq!(spans.len(), 2);
    assert!(SPANS_EXPORTED.load(Ordering::Relaxed) >= exported + 2);

    // A collector that refuses connections: the export fails, is counted,
    // and requests are served as usual.
    let nowhere = upstream::closed_port().await;
    let failures = EXPORT_FAILURES.load(Ordering::Relaxed);
    let dropped = SPANS_DROPPED_EXPORT.load(Ordering::Relaxed);
    let gw = gateway(&config(&[up.up.addr], nowhere, "", "")).await;
    assert_eq!(get(&gw, "/api/x", &[]).await.status(), 200);
    assert!(
        super::support::eventually(Duration::from_secs(5), || {
            EXPORT_FAILURES.load(Ordering::Relaxed) > failures
                && SPANS_DROPPED_EXPORT.load(Ordering::Relaxed) >= dropped + 2
        })
        .await
    );
}
