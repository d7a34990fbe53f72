//! HTTP/2 abuse, written frame by frame: rapid reset (CVE-2023-44487) and
//! CONTINUATION floods. The abusing connection gets GOAWAY and is closed;
//! a well-behaved client on another connection is served throughout.

use super::support::conn::guard;
use super::support::h2;
use super::support::h2raw::{self, frame, get_block, RawH2};
use super::support::upstream::full;
use super::support::{gateway, TestGateway};
use bytes::Bytes;
use http::Request;
use std::time::Duration;
use tokio::task::JoinHandle;

const CONFIG: &str = "listeners:
  - name: main
    address: 127.0.0.1:0
    max_concurrent_streams: 10
routes:
  - name: hello
    action: {respond: {status: 200, body: hello}}
";

/// A well-behaved h2c client sending `n` requests one after another; returns
/// how many were answered 200.
fn bystander(gw: &TestGateway, n: usize) -> JoinHandle<usize> {
    let addr = gw.addr();
    tokio::spawn(async move {
        let mut tx = h2::client(addr).await;
        let mut ok = 0;
        for _ in 0..n {
            let req = Request::get(format!("http://api.test:{}/", addr.port()))
                .body(full(Bytes::new()))
                .unwrap();
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(10), tx.send_request(req)).await
            {
                if r.status() == 200 {
                    ok += 1;
                }
            }
            tokio::task::yield_now().await;
        }
        ok
    })
}

/// Writes `bytes` in pieces until done or the server closes, then reads
/// what the server sent until it closes. Returns the GOAWAY error code, if
/// any, and whether the connection was closed.
async fn abuse(conn: &mut RawH2, bytes: &[u8]) -> (Option<u32>, bool) {
    for piece in bytes.chunks(64 * 1024) {
        if conn.send(piece).await.is_err() {
            break;
        }
    }
    let (frames, closed) = conn.frames_until_close(Duration::from_secs(10)).await;
    (frames.iter().find_map(|f| f.goaway_code()), closed)
}

#[tokio::test]
async fn rapid_reset_gets_goaway_and_spares_other_connections() {
    let gw = gateway(CONFIG).await;
    let good = bystander(&gw, 200);
    let authority = format!("api.test:{}", gw.addr().port());
    let block = get_block(&authority, "/");
    let mut flood = Vec::new();
    // 5,000 streams, each opened and cancelled at once: far more than the
    // 10 concurrent streams the listener allows.
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        let flags = h2raw::END_HEADERS | h2raw::END_STREAM;
        flood.extend(frame(h2raw::HEADERS, flags, id, &block));
        flood.extend(frame(
            h2raw::RST_STREAM,
            0,
            id,
            &h2raw::CANCEL.to_be_bytes(),
        ));
    }
    let mut conn = RawH2::connect(gw.addr()).await;
    let (code, closed) = abuse(&mut conn, &flood).await;
    assert_eq!(
        code,
        Some(h2raw::ENHANCE_YOUR_CALM),
        "GOAWAY for the reset flood"
    );
    assert!(closed, "the abusing connection is closed");
    assert_eq!(guard("bystander", good).await.unwrap(), 200);
}

#[tokio::test]
async fn continuation_flood_gets_goaway_and_spares_other_connections() {
    let gw = gateway(CONFIG).await;
    let good = bystander(&gw, 200);
    let authority = format!("api.test:{}", gw.addr().port());

    // Endless empty CONTINUATION frames: a header block that never ends
    // (CVE-2024-27316 family).
    let mut flood = frame(h2raw::HEADERS, 0, 1, &get_block(&authority, "/"));
    for _ in 0..20_000 {
        flood.extend(frame(h2raw::CONTINUATION, 0, 1, &[]));
    }
    let mut conn = RawH2::connect(gw.addr()).await;
    let (code, closed) = abuse(&mut conn, &flood).await;
    assert_eq!(
        code,
        Some(h2raw::ENHANCE_YOUR_CALM),
        "GOAWAY for empty CONTINUATIONs"
    );
    assert!(closed);

    // Full CONTINUATION frames growing one header list far past the
    // listener's header limit.
    let mut flood = frame(h2raw::HEADERS, 0, 1, &get_block(&authority, "/"));
    let mut fat = Vec::new();
    let value = "v".repeat(100);
    while fat.len() < 16_000 {
        h2raw::literal_named(&mut fat, "x-padding", &value);
    }
    for _ in 0..200 {
        flood.extend(frame(h2raw::CONTINUATION, 0, 1, &fat));
    }
    let mut conn = RawH2::connect(gw.addr()).await;
    let (code, closed) = abuse(&mut conn, &flood).await;
    assert!(code.is_some(), "GOAWAY for an oversized header block");
    assert!(closed);

    assert_eq!(guard("bystander", good).await.unwrap(), 200);
}
