//! HTTP/2: h2c clients (prior knowledge) downstream, h2c upstreams, and
//! gRPC-shaped streams with trailers end to end.

use super::support::conn::guard;
use super::support::h2::{self, grpc_frame};
use super::support::upstream::{self, full, response, stream_body, TestBody};
use super::support::{gateway, simple_config};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use std::time::Duration;

fn empty() -> TestBody {
    full(Bytes::new())
}

fn h2c_config(upstream: std::net::SocketAddr, protocol: &str) -> String {
    simple_config(
        &[upstream],
        &format!("    protocol: {protocol}\n"),
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    )
}

#[tokio::test]
async fn h2c_client_is_served_and_proxied_to_an_http1_upstream() {
    let up = upstream::echo().await;
    let gw = gateway(&h2c_config(up.addr, "http1")).await;
    let mut tx = h2::client(gw.addr()).await;
    let req = Request::get(format!("http://api.test:{}/hello?x=1", gw.addr().port()))
        .body(empty())
        .unwrap();
    let resp = guard("response", tx.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["path"], "/hello");
    assert_eq!(v["query"], "x=1");
    // The HTTP/1.1 upstream gets a Host header (the target's by default) and
    // the client's authority as X-Forwarded-Host.
    assert_eq!(v["headers"]["host"][0], up.addr.to_string());
    assert_eq!(
        v["headers"]["x-forwarded-host"][0],
        format!("api.test:{}", gw.addr().port())
    );
}

#[tokio::test]
async fn h2c_upstream_multiplexes_requests_on_one_connection() {
    let up = h2::start(|req: Request<Incoming>| async move {
        assert_eq!(req.version(), http::Version::HTTP_2);
        let auth = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        response(200, auth)
    })
    .await;
    let gw = gateway(&h2c_config(up.addr, "h2c")).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = gw.url("/m");
        tasks.push(tokio::spawn(async move {
            super::support::client::get(&url).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.text(),
            up.addr.to_string(),
            "the target is the :authority"
        );
    }
    assert_eq!(up.hits(), 20);
    assert_eq!(up.connections(), 1, "one multiplexed upstream connection");
}

/// A gRPC-shaped bidirectional stream through h2c on both sides: each
/// message is echoed before the next is sent (so both directions stream),
/// and the trailers (`grpc-status`, `grpc-message`) reach the client.
#[tokio::test]
async fn grpc_bidi_stream_and_trailers_pass_end_to_end() {
    let up = h2::start(|req: Request<Incoming>| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut body = req.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    if tx.send(Ok(Frame::data(data))).await.is_err() {
                        return;
                    }
                }
            }
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            trailers.insert("grpc-message", "done".parse().unwrap());
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        });
        let mut r = Response::new(stream_body(rx));
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        r
    })
    .await;
    let gw = gateway(&h2c_config(up.addr, "h2c")).await;
    let mut tx = h2::client(gw.addr()).await;
    let (body_tx, body_rx) = tokio::sync::mpsc::channel(4);
    let req = Request::post(format!("http://svc:{}/chat.Chat/Talk", gw.addr().port()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(stream_body(body_rx))
        .unwrap();
    let resp = guard("response head", tx.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    for i in 0..10u8 {
        let msg = grpc_frame(&[i; 16]);
        body_tx.send(Ok(Frame::data(msg.clone()))).await.unwrap();
        let frame = guard("echoed message", body.frame())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            frame.into_data().unwrap(),
            msg,
            "message {i} echoed before the next is sent"
        );
    }
    drop(body_tx);
    let trailers = loop {
        let frame = guard("trailers", body.frame())
            .await
            .expect("trailers frame")
            .unwrap();
        if let Ok(t) = frame.into_trailers() {
            break t;
        }
    };
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "done");
}

#[tokio::test]
async fn http2_can_be_turned_off_per_listener() {
    let up = upstream::fixed(200, "ok").await;
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    http2: false\nupstreams:\n  - name: up\n    targets: [{{address: '{}'}}]\nroutes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n",
        up.addr
    ))
    .await;
    let stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let handshake = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake::<_, TestBody>(hyper_util::rt::TokioIo::new(stream))
        .await;
    let failed = match handshake {
        Err(_) => true,
        Ok((mut tx, conn)) => {
            tokio::spawn(conn);
            let req = Request::get(format!("http://x:{}/", gw.addr().port()))
                .body(empty())
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), tx.send_request(req))
                .await
                .map_or(true, |r| r.is_err())
        }
    };
    assert!(failed, "an HTTP/1-only listener does not speak h2c");
    assert_eq!(up.hits(), 0);
}

async fn grpc_call(
    gw: &super::support::TestGateway,
    path: &str,
    extra: &[(&str, &str)],
) -> Response<Incoming> {
    let mut tx = h2::client(gw.addr()).await;
    let mut req = Request::post(format!("http://svc:{}{path}", gw.addr().port()))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let req = req.body(full(grpc_frame(b"hi"))).unwrap();
    guard("grpc response", tx.send_request(req)).await.unwrap()
}

#[tokio::test]
async fn gateway_errors_for_grpc_calls_are_grpc_statuses() {
    let dead = upstream::closed_port().await;
    let slow = h2::start(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        response(200, "late")
    })
    .await;
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: dead\n    protocol: h2c\n    targets: [{{address: '{dead}'}}]\n  - name: slow\n    protocol: h2c\n    targets: [{{address: '{}'}}]\nroutes:\n  - name: dead\n    match: {{path_prefix: /dead.Svc}}\n    action: {{proxy: {{upstream: dead}}}}\n  - name: slow\n    match: {{path_prefix: /slow.Svc}}\n    action: {{proxy: {{upstream: slow}}}}\n",
        slow.addr
    ))
    .await;
    let cases = [
        ("/dead.Svc/Call", vec![], "14"), // UNAVAILABLE
        ("/slow.Svc/Call", vec![("grpc-timeout", "200m")], "4"), // DEADLINE_EXCEEDED
        ("/nope.Svc/Call", vec![], "12"), // UNIMPLEMENTED
    ];
    for (path, extra, status) in cases {
        let resp = grpc_call(&gw, path, &extra).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/grpc", "{path}");
        assert_eq!(resp.headers()["grpc-status"], status, "{path}");
        assert!(resp.headers().contains_key("grpc-message"), "{path}");
    }
}

/// Active health checks speak HTTP/2 to h2c upstreams: the healthy target
/// stays in, the failing one is taken out.
#[tokio::test]
async fn active_health_checks_work_on_h2c_upstreams() {
    let good = h2::start(|req: Request<Incoming>| async move {
        assert_eq!(req.version(), http::Version::HTTP_2);
        response(200, "good")
    })
    .await;
    let bad = h2::start(|req: Request<Incoming>| async move {
        if req.uri().path() == "/healthz" {
            response(503, "down")
        } else {
            response(200, "bad")
        }
    })
    .await;
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    protocol: h2c\n    targets: [{{address: '{}'}}, {{address: '{}'}}]\n    health_check: {{path: /healthz, interval: 50ms, timeout: 1s, unhealthy_threshold: 2, healthy_threshold: 1}}\nroutes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n",
        good.addr, bad.addr
    ))
    .await;
    // Wait until the failing target has been probed out.
    let mut settled = false;
    for _ in 0..200 {
        let mut all_good = true;
        for _ in 0..4 {
            if super::support::client::get(&gw.url("/x")).await.text() != "good" {
                all_good = false;
            }
        }
        if all_good {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(settled, "the 503-probed target was never taken out");
    for _ in 0..20 {
        let r = super::support::client::get(&gw.url("/x")).await;
        assert_eq!((r.status.as_u16(), r.text()), (200, "good".to_string()));
    }
}
