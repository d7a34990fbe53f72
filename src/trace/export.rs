//! The export task: takes finished spans from the tracer's queue, batches
//! them (`batch.max_spans`, or whatever waits every `batch.interval`) and
//! POSTs each batch as an OTLP `ExportTraceServiceRequest`
//! (`application/x-protobuf`) over one kept-alive HTTP/1.1 connection to
//! the collector. A failed export is counted and its spans dropped (no
//! retry); the task never holds up a request, it only lets the queue fill.

use super::otlp::{self, KeyValue};
use super::{
    Msg, SpanRecord, TracingSpec, Val, EXPORT_FAILURES, SPANS_DROPPED_EXPORT, SPANS_EXPORTED,
};
use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prost::Message;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

pub(crate) async fn run(mut rx: mpsc::Receiver<Msg>, spec: Arc<TracingSpec>) {
    let mut batch: Vec<SpanRecord> = Vec::new();
    let mut client = Client::default();
    // The first tick one interval from now (`interval`'s first is
    // immediate, and would export whatever arrived before it early).
    let first = tokio::time::Instant::now() + spec.interval;
    let mut tick = tokio::time::interval_at(first, spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(Msg::Span(s)) => {
                    batch.push(s);
                    if batch.len() >= spec.max_spans {
                        client.export(&spec, &mut batch).await;
                    }
                }
                Some(Msg::Flush(done)) => {
                    client.export(&spec, &mut batch).await;
                    let _ = done.send(());
                }
                None => {
                    client.export(&spec, &mut batch).await;
                    return;
                }
            },
            _ = tick.tick() => client.export(&spec, &mut batch).await,
        }
    }
}

#[derive(Default)]
struct Client {
    conn: Option<http1::SendRequest<Full<Bytes>>>,
    /// Whether the last export failed (only the first failure is a warning).
    failing: bool,
}

impl Client {
    async fn export(&mut self, spec: &TracingSpec, batch: &mut Vec<SpanRecord>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = encode(spec, batch.drain(..)).encode_to_vec();
        let sent = tokio::time::timeout(spec.timeout, self.post(spec, body.into())).await;
        match sent.unwrap_or_else(|_| Err(format!("no answer within {:?}", spec.timeout))) {
            Ok(()) => {
                SPANS_EXPORTED.fetch_add(n, Ordering::Relaxed);
                if self.failing {
                    tracing::info!(endpoint = %spec.endpoint, "span export works again");
                }
                self.failing = false;
            }
            Err(e) => {
                self.conn = None;
                EXPORT_FAILURES.fetch_add(1, Ordering::Relaxed);
                SPANS_DROPPED_EXPORT.fetch_add(n, Ordering::Relaxed);
                if self.failing {
                    tracing::debug!(endpoint = %spec.endpoint, error = %e, spans = n, "span export failed");
                } else {
                    tracing::warn!(endpoint = %spec.endpoint, error = %e, spans = n, "span export failed");
                }
                self.failing = true;
            }
        }
    }

    async fn post(&mut self, spec: &TracingSpec, body: Bytes) -> Result<(), String> {
        let mut tx = match self.conn.take() {
            Some(tx) if !tx.is_closed() => tx,
            _ => connect(&spec.authority).await?,
        };
        tx.ready().await.map_err(|e| e.to_string())?;
        let mut req = Request::post(spec.endpoint.path())
            .header(header::HOST, &spec.authority)
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-protobuf"),
            )
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        for (k, v) in &spec.headers {
            req.headers_mut().insert(k, v.clone());
        }
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // The answer is small (a partial-success note at most): bounded.
        let answer = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the collector answered {status}: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(200)])
            ));
        }
        if let Ok(r) = otlp::ExportTraceServiceResponse::decode(answer) {
            if let Some(p) = r.partial_success.filter(|p| p.rejected_spans > 0) {
                tracing::debug!(rejected = p.rejected_spans, message = %p.error_message, "the collector rejected spans");
            }
        }
        self.conn = Some(tx);
        Ok(())
    }
}

async fn connect(authority: &str) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (tx, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}

fn value(v: Val) -> otlp::AnyValue {
    otlp::AnyValue {
        value: Some(match v {
            Val::S(s) => otlp::any_value::Value::StringValue(s),
            Val::I(i) => otlp::any_value::Value::IntValue(i),
        }),
    }
}

fn span(r: SpanRecord) -> otlp::Span {
    // Trace flags: sampled (everything exported is); bit 8: the remote bit
    // (bit 9) is set.
    let flags = 0x1 | 0x100 | if r.remote_parent { 0x200 } else { 0 };
    otlp::Span {
        trace_id: r.trace_id.to_vec(),
        span_id: r.span_id.to_vec(),
        trace_state: r.trace_state,
        parent_span_id: r.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: r.name,
        kind: r.kind,
        start_time_unix_nano: r.start,
        end_time_unix_nano: r.end,
        attributes: r
            .attrs
            .into_iter()
            .map(|(k, v)| KeyValue {
                key: k.into(),
                value: Some(value(v)),
            })
            .collect(),
        status: Some(match r.error {
            Some(message) => otlp::Status {
                message,
                code: otlp::status_code::ERROR,
            },
            None => otlp::Status {
                message: String::new(),
                code: otlp::status_code::UNSET,
            },
        }),
        flags,
    }
}

fn encode(
    spec: &TracingSpec,
    spans: impl Iterator<Item = SpanRecord>,
) -> otlp::ExportTraceServiceRequest {
    otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(otlp::Resource {
                attributes: vec![
                    KeyValue::string("service.name", spec.service_name.as_str()),
                    KeyValue::string("telemetry.sdk.name", "portico"),
                    KeyValue::string("telemetry.sdk.language", "rust"),
                    KeyValue::string("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
                ],
                dropped_attributes_count: 0,
            }),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(otlp::InstrumentationScope {
                    name: "portico".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans: spans.map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}
