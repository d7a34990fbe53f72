//! Streaming: bodies far larger than any buffer pass in both directions in
//! bounded memory, the first byte is forwarded before the upstream finishes,
//! SSE events arrive one by one, and chunked trailers cross the gateway in
//! both directions.

use super::support::conn::{guard, rss_bytes, send_streaming, PatternBody, PatternCheck};
use super::support::live::{self, BodyFrame};
use super::support::upstream::{self, response, stream_body, TestBody};
use super::support::{client, gateway, simple_config};
use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Far larger than any buffer in the path.
const BIG: u64 = 256 * 1024 * 1024;
/// Allowed growth of the process's resident memory while `BIG` bytes pass
/// (client, gateway and upstream all live in this process).
const RSS_BUDGET: u64 = 64 * 1024 * 1024;

/// The two big transfers run one at a time so each one's memory reading is
/// its own.
static BIG_TRANSFER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn proxy_all() -> &'static str {
    "  - name: all\n    action: {proxy: {upstream: up}}\n"
}

/// Samples this process's RSS until stopped; reports the peak.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    baseline: u64,
}

impl RssWatch {
    fn start() -> RssWatch {
        let baseline = rss_bytes();
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(baseline));
        let (s, p) = (stop.clone(), peak.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        RssWatch {
            stop,
            peak,
            task,
            baseline,
        }
    }

    /// Peak growth over the baseline.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak
            .load(Ordering::Relaxed)
            .max(rss_bytes())
            .saturating_sub(self.baseline)
    }
}

#[tokio::test]
async fn streamed_upload_far_larger_than_buffers_arrives_intact_in_bounded_memory() {
    let _one_at_a_time = BIG_TRANSFER.lock().await;
    let up = upstream::start(|req: Request<Incoming>| async move {
        let mut body = req.into_body();
        let mut check = PatternCheck::default();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        check.feed(d);
                    }
                }
                Err(e) => return response(500, format!("body error: {e}")),
            }
        }
        let doc = serde_json::json!({"bytes": check.bytes, "mismatches": check.mismatches});
        response(200, doc.to_string())
    })
    .await;
    let gw = gateway(&simple_config(&[up.addr], "", proxy_all())).await;

    let watch = RssWatch::start();
    let req = Request::post("/upload")
        .header("host", "gw")
        .body(PatternBody::new(BIG, 64 * 1024).boxed())
        .unwrap();
    let resp = guard("the upload's answer", async {
        let resp = send_streaming(gw.addr(), req).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    })
    .await;
    let growth = watch.finish().await;

    assert_eq!(resp.0, 200, "{:?}", resp.1);
    let doc: serde_json::Value = serde_json::from_slice(&resp.1).unwrap();
    assert_eq!(doc["bytes"], BIG, "{doc}");
    assert_eq!(doc["mismatches"], 0, "{doc}");
    assert!(
        growth < RSS_BUDGET,
        "resident memory grew by {} MiB while {} MiB streamed",
        growth >> 20,
        BIG >> 20
    );
}

#[tokio::test]
async fn streamed_download_far_larger_than_buffers_arrives_intact_in_bounded_memory() {
    let _one_at_a_time = BIG_TRANSFER.lock().await;
    let up = upstream::start(|_req: Request<Incoming>| async {
        let mut r = http::Response::new(PatternBody::new(BIG, 64 * 1024).boxed());
        r.headers_mut()
            .insert("content-type", "application/octet-stream".parse().unwrap());
        r
    })
    .await;
    let gw = gateway(&simple_config(&[up.addr], "", proxy_all())).await;

    let watch = RssWatch::start();
    let check = guard("the download", async {
        let resp = client::new()
            .request(
                Request::get(gw.url("/download"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .expect("response head");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "application/octet-stream"
        );
        let mut body = resp.into_body();
        let mut check = PatternCheck::default();
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.expect("body frame").data_ref() {
                check.feed(d);
            }
        }
        check
    })
    .await;
    let growth = watch.finish().await;

    assert_eq!(check.bytes, BIG);
    assert_eq!(check.mismatches, 0);
    assert!(
        growth < RSS_BUDGET,
        "resident memory grew by {} MiB while {} MiB streamed",
        growth >> 20,
        BIG >> 20
    );
}

fn data(s: &str) -> BodyFrame {
    Ok(Frame::data(Bytes::copy_from_slice(s.as_bytes())))
}

#[tokio::test]
async fn first_byte_is_forwarded_before_the_upstream_finishes() {
    let (up, mut bodies) = live::controlled(200, &[("content-type", "text/plain")]).await;
    let gw = gateway(&simple_config(&[up.addr], "", proxy_all())).await;

    let resp = guard(
        "response head",
        client::new().request(
            Request::get(gw.url("/slowly"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .expect("response head");
    assert_eq!(resp.status(), 200);
    let upstream_body = guard("the upstream's request", bodies.recv())
        .await
        .unwrap();
    let mut body = resp.into_body();

    // The upstream has sent one chunk and waits for us before going on.
    upstream_body.send(data("first chunk")).await.unwrap();
    let f = guard(
        "the first chunk, while the upstream still waits",
        body.frame(),
    )
    .await
    .expect("a frame")
    .expect("no error");
    assert_eq!(f.into_data().unwrap(), "first chunk");

    upstream_body.send(data("second chunk")).await.unwrap();
    drop(upstream_body);
    let rest = guard("the end of the body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "second chunk");
}

#[tokio::test]
async fn sse_events_reach_the_client_one_by_one_as_sent() {
    let (up, mut streams) = live::sse().await;
    let gw = gateway(&simple_config(&[up.addr], "", proxy_all())).await;

    let resp = guard(
        "SSE response head",
        client::new().request(
            Request::get(gw.url("/events"))
                .header("accept", "text/event-stream")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .expect("response head");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    assert!(resp.headers().get("content-length").is_none());
    let events = guard("the upstream's request", streams.recv())
        .await
        .unwrap();
    let mut body = resp.into_body();

    const EVENTS: usize = 20;
    let mut buf = Vec::<u8>::new();
    for i in 0..EVENTS {
        let event = format!("id: {i}\nevent: notification\ndata: {{\"n\":{i}}}\n\n");
        events.send(data(&event)).await.unwrap();
        // The next event is only sent once this one arrived in full.
        while !buf.ends_with(b"\n\n") {
            let f = guard("an SSE event", body.frame())
                .await
                .expect("stream still open")
                .expect("no error");
            if let Ok(d) = f.into_data() {
                buf.extend_from_slice(&d);
            }
        }
        assert_eq!(String::from_utf8_lossy(&buf), event, "event {i}");
        buf.clear();
    }
    drop(events);
    let tail = guard("the end of the stream", body.collect())
        .await
        .unwrap()
        .to_bytes();
    assert!(tail.is_empty());
}

fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, v.parse().unwrap());
    }
    h
}

#[tokio::test]
async fn response_trailers_reach_the_client() {
    let (up, mut bodies) = live::controlled(
        200,
        &[
            ("content-type", "application/grpc"),
            ("trailer", "grpc-status, grpc-message"),
        ],
    )
    .await;
    let gw = gateway(&simple_config(&[up.addr], "", proxy_all())).await;

    let feeder = tokio::spawn(async move {
        let tx = bodies.recv().await.unwrap();
        tx.send(data("payload-1;")).await.unwrap();
        tx.send(data("payload-2")).await.unwrap();
        tx.send(Ok(Frame::trailers(trailers(&[
            ("grpc-status", "0"),
            ("grpc-message", "all good"),
        ]))))
        .await
        .unwrap();
    });
    let resp = guard(
        "the response",
        client::new().request(
            Request::post(gw.url("/svc/Method"))
                .header("te", "trailers")
                .body(Full::new(Bytes::from("req")))
                .unwrap(),
        ),
    )
    .await
    .expect("response head");
    assert_eq!(resp.status(), 200);
    let collected = guard("body and trailers", resp.into_body().collect())
        .await
        .unwrap();
    let t = collected.trailers().cloned().expect("trailers arrived");
    assert_eq!(collected.to_bytes(), "payload-1;payload-2");
    assert_eq!(t.get("grpc-status").unwrap(), "0");
    assert_eq!(t.get("grpc-message").unwrap(), "all good");
    feeder.await.unwrap();
}

#[tokio::test]
async fn request_trailers_reach_the_upstream() {
    let up = upstream::start(|req: Request<Incoming>| async move {
        let declared = req
            .headers()
            .get("trailer")
            .map(|v| v.to_str().unwrap().to_string());
        let collected = req.into_body().collect().await.unwrap();
        let t = collected.trailers().cloned().unwrap_or_default();
        let doc = serde_json::json!({
            "declared": declared,
            "body": String::from_utf8_lossy(&collected.to_bytes()),
            "checksum": t.get("x-checksum").map(|v| v.to_str().unwrap().to_string()),
        });
        response(200, doc.to_string())
    })
    .await;
    let gw = gateway(&simple_config(&[up.addr], "", proxy_all())).await;

    let (tx, rx) = tokio::sync::mpsc::channel::<BodyFrame>(4);
    tx.send(data("part one, ")).await.unwrap();
    tx.send(data("part two")).await.unwrap();
    tx.send(Ok(Frame::trailers(trailers(&[("x-checksum", "abc123")]))))
        .await
        .unwrap();
    drop(tx);
    let body: TestBody = stream_body(rx);
    let req = Request::post("/upload")
        .header("host", "gw")
        .header("trailer", "x-checksum")
        .body(body)
        .unwrap();
    let resp = guard("the answer", async {
        let resp = send_streaming(gw.addr(), req).await;
        resp.into_body().collect().await.unwrap().to_bytes()
    })
    .await;
    let doc: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(doc["body"], "part one, part two", "{doc}");
    assert_eq!(doc["checksum"], "abc123", "{doc}");
}

/// `timeouts.response_header` starts once the request has been fully sent:
/// an upload that takes longer than it is not a slow upstream.
#[tokio::test]
async fn slow_upload_is_not_cut_by_the_response_header_timeout() {
    let up = upstream::start(|req: Request<Incoming>| async move {
        let n = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes().len())
            .unwrap_or(0);
        response(200, n.to_string())
    })
    .await;
    let gw = gateway(&simple_config(
        &[up.addr],
        "    timeouts: {response_header: 200ms}\n",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = Request::post("/upload")
        .header("host", "gw")
        .body(stream_body(rx))
        .unwrap();
    let sending = tokio::spawn(send_streaming(gw.addr(), req));
    // Three chunks, 150 ms apart: the upload lasts well past 200 ms.
    for _ in 0..3 {
        tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 1000]))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    drop(tx);
    let resp = guard("response", sending).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"3000");
}
