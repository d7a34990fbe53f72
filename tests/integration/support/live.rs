//! Upstreams whose behaviour over time the test controls: responses whose
//! body frames the test sends one by one (first byte, SSE, trailers), and a
//! WebSocket echo server.

use super::upstream::{self, stream_body, TestUpstream};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

pub type BodyFrame = Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>;

/// The test's end of one streamed response body: every frame sent here is
/// written by the upstream as it comes; dropping it ends the body.
pub type BodySender = mpsc::Sender<BodyFrame>;

/// An upstream whose every response has `status` and `headers` and streams
/// the body frames the test sends. For each request the test receives the
/// body's [`BodySender`] on the returned channel.
pub async fn controlled(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
) -> (TestUpstream, mpsc::Receiver<BodySender>) {
    let (senders_tx, senders_rx) = mpsc::channel::<BodySender>(16);
    let up = upstream::start(move |_req: Request<Incoming>| {
        let senders_tx = senders_tx.clone();
        async move {
            let (tx, rx) = mpsc::channel(1);
            let _ = senders_tx.send(tx).await;
            let mut r = Response::new(stream_body(rx));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            for (k, v) in headers {
                r.headers_mut().append(*k, v.parse().unwrap());
            }
            r
        }
    })
    .await;
    (up, senders_rx)
}

/// A Server-Sent Events upstream (`text/event-stream`) fed by the test.
pub async fn sse() -> (TestUpstream, mpsc::Receiver<BodySender>) {
    controlled(
        200,
        &[
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
    )
    .await
}

/// A WebSocket echo server: text and binary messages come back unchanged and
/// in order, close is answered. A request that is not a WebSocket upgrade
/// gets `200` with a JSON body `{"upgrade": .., "connection": ..}` (the
/// values of those request headers, or null).
pub async fn ws_echo() -> TestUpstream {
    upstream::start(|mut req: Request<Incoming>| async move {
        let h = req.headers();
        let is_ws = h
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let key = h.get("sec-websocket-key").cloned();
        match (is_ws, key) {
            (true, Some(key)) => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(upgraded) = on_upgrade.await else {
                        return;
                    };
                    let mut ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    // Bounded by the peer: ends when it closes.
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
                let mut r = upstream::response(101, "");
                let rh = r.headers_mut();
                rh.insert(header::UPGRADE, "websocket".parse().unwrap());
                rh.insert(header::CONNECTION, "upgrade".parse().unwrap());
                rh.insert(
                    "sec-websocket-accept",
                    derive_accept_key(key.as_bytes()).parse().unwrap(),
                );
                r
            }
            _ => {
                let get = |n: header::HeaderName| {
                    req.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(String::from)
                };
                let doc = serde_json::json!({
                    "upgrade": get(header::UPGRADE),
                    "connection": get(header::CONNECTION),
                });
                upstream::response(200, serde_json::to_vec(&doc).unwrap())
            }
        }
    })
    .await
}
