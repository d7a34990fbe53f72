//! Protocol upgrades: WebSocket proxied and spliced for the life of the
//! connection; routes that disallow upgrades; non-101 answers passed through.

use super::support::conn::guard;
use super::support::live;
use super::support::upstream::{self, response};
use super::support::{client, gateway, simple_config};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const MESSAGES: usize = 1000;

/// Message `i`: text and binary alternate; sizes vary, some span many TCP
/// segments.
fn message(i: usize) -> Message {
    if i.is_multiple_of(2) {
        Message::text(format!("message {i}: {}", "é".repeat(i % 50)))
    } else {
        let len = if i % 100 == 1 { 64 * 1024 + i } else { i % 300 };
        Message::binary((0..len).map(|k| (k * 31 + i) as u8).collect::<Vec<u8>>())
    }
}

fn upgrade_request(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn websocket_echo_many_messages_in_order_and_clean_close() {
    let up = live::ws_echo().await;
    let gw = gateway(&simple_config(
        &[up.addr],
        "",
        "  - name: ws\n    match: {path: /chat}\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;

    let (ws, resp) = guard(
        "the WebSocket handshake",
        connect_async(format!("ws://{}/chat", gw.addr())),
    )
    .await
    .expect("handshake through the gateway");
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().get("x-request-id").is_some());
    let (mut tx, mut rx) = ws.split();

    // Send everything while reading: both directions at once.
    let sender = tokio::spawn(async move {
        for i in 0..MESSAGES {
            tx.send(message(i)).await.expect("send");
        }
        tx
    });
    for i in 0..MESSAGES {
        let got = guard("an echoed message", rx.next())
            .await
            .expect("stream open")
            .expect("message");
        assert_eq!(got, message(i), "message {i} out of order or altered");
    }
    let mut tx = guard("the sender", sender).await.unwrap();

    // Close handshake: our close is answered and the stream ends.
    tx.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .expect("send close");
    let mut answered = false;
    for _ in 0..4 {
        match guard("the close answer", rx.next()).await {
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal));
                answered = true;
            }
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            None | Some(Err(WsError::ConnectionClosed)) => break,
            Some(Err(e)) => panic!("close handshake failed: {e}"),
        }
    }
    assert!(answered, "the upstream's close frame came back");
    assert_eq!(up.hits(), 1);

    // The gateway keeps serving ordinary requests.
    let r = client::get(&gw.url("/chat")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn route_with_upgrades_disabled_does_not_upgrade() {
    let up = live::ws_echo().await;
    let gw = gateway(&simple_config(
        &[up.addr],
        "",
        "  - name: no-ws\n    action: {proxy: {upstream: up, upgrades: false}}\n",
    ))
    .await;

    // The upstream sees a plain request, without Upgrade or Connection.
    let r = client::send(upgrade_request(&gw.url("/chat"))).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["upgrade"].is_null(), "{doc}");
    assert!(doc["connection"].is_null(), "{doc}");
    assert!(r.header("upgrade").is_none());

    // A WebSocket client is refused the upgrade.
    match guard(
        "the refused handshake",
        connect_async(format!("ws://{}/chat", gw.addr())),
    )
    .await
    {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 200),
        Err(e) => panic!("expected a plain HTTP answer, got {e}"),
        Ok(_) => panic!("the connection was upgraded on a route with upgrades: false"),
    }
}

#[tokio::test]
async fn non_101_answer_to_an_upgrade_request_is_passed_through() {
    let up = upstream::start(|req: Request<Incoming>| async move {
        let saw = format!(
            "{}|{}",
            req.headers()
                .get("upgrade")
                .map_or("-", |v| v.to_str().unwrap()),
            req.headers()
                .get("connection")
                .map_or("-", |v| v.to_str().unwrap()),
        );
        let mut r = response(403, "no websockets for you");
        r.headers_mut().insert("x-saw", saw.parse().unwrap());
        r
    })
    .await;
    let gw = gateway(&simple_config(
        &[up.addr],
        "",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;

    let r = client::send(upgrade_request(&gw.url("/chat"))).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "no websockets for you");
    assert_eq!(
        r.header("x-saw"),
        Some("websocket|upgrade"),
        "the upgrade was asked of the upstream"
    );
    assert!(r.header("upgrade").is_none());

    match guard(
        "the refused handshake",
        connect_async(format!("ws://{}/chat", gw.addr())),
    )
    .await
    {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403),
        Err(e) => panic!("expected the upstream's 403, got {e}"),
        Ok(_) => panic!("upgraded although the upstream refused"),
    }

    let r = client::get(&gw.url("/after")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-saw"), Some("-|-"));
}
