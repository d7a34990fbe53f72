//! Hardening of the HTTP/1.1 front: path normalisation before matching (no
//! route-rule bypass through another spelling of a path) and strict HTTP/1.1
//! (request-smuggling shapes refused with 400 and a closed connection, never
//! forwarded). Every attack goes over a raw socket, byte for byte.
//!
//! Who refuses what (see `portico::strict`):
//! - hyper's parser: a bare `400` (empty body), connection closed;
//! - `strict::io::StrictIo` (raw heads): hyper's bare `400`, closed;
//! - `strict::check_request` (parsed request): the JSON `400 bad_request`
//!   with `Connection: close`, closed;
//! - invalid chunked framing is found while the body streams: the upstream
//!   never receives a complete request, the connection is closed.

use super::support::conn::RawConn;
use super::support::upstream::{self, response, TestUpstream};
use super::support::{client, gateway, simple_config, TestGateway};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

// ------------------------------------------------------------ helpers

/// What the client saw for one raw exchange.
struct Outcome {
    /// Status of the first response, if any.
    status: Option<u16>,
    /// Number of responses received.
    responses: usize,
    /// The raw bytes received.
    text: String,
}

impl Outcome {
    fn first_head(&self) -> &str {
        self.text.split("\r\n\r\n").next().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.first_head().lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }
}

/// Writes `bytes` on a fresh connection and reads until the gateway closes
/// it (panics if it stays open: the connection must be closed).
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Outcome {
    let mut c = RawConn::connect(addr).await;
    c.write(bytes).await;
    let out = c.read_to_close().await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok());
    let responses = text.matches("HTTP/1.1 ").count();
    Outcome {
        status,
        responses,
        text,
    }
}

/// An upstream that records the path of every request it received whole
/// (head and complete body), and counts heads and connections.
struct Recorder {
    up: TestUpstream,
    complete: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let complete = Arc::new(Mutex::new(Vec::new()));
        let c2 = complete.clone();
        let up = upstream::start(move |req: http::Request<Incoming>| {
            let complete = c2.clone();
            async move {
                let pq = req.uri().to_string();
                if req.into_body().collect().await.is_ok() {
                    complete.lock().unwrap().push(pq.clone());
                }
                response(200, pq)
            }
        })
        .await;
        Recorder { up, complete }
    }

    /// Asserts the upstream received nothing at all: no connection, no head.
    fn assert_untouched(&self) {
        assert_eq!(self.up.connections(), 0, "the upstream saw a connection");
        assert_eq!(self.up.hits(), 0, "the upstream saw a request head");
    }

    fn complete(&self) -> Vec<String> {
        self.complete.lock().unwrap().clone()
    }
}

/// A gateway proxying everything to `up`.
async fn proxy_gateway(up: SocketAddr) -> TestGateway {
    gateway(&simple_config(
        &[up],
        "",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ))
    .await
}

/// After an attack the gateway still serves, and the upstream sees exactly
/// the requests it should (no smuggled one).
async fn still_serves(gw: &TestGateway, rec: &Recorder, expect_before: &[&str]) {
    let r = client::get(&gw.url("/after")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut want: Vec<String> = expect_before.iter().map(|s| s.to_string()).collect();
    want.push("/after".into());
    assert_eq!(rec.complete(), want);
}

/// Refused before any request reached the gateway's routing: hyper's bare
/// 400 (no body, `Connection: close`), whether hyper refused the head itself
/// or `StrictIo` made it; one response, connection closed, nothing upstream.
async fn assert_refused_by_parser(attack: &[u8]) {
    let rec = Recorder::start().await;
    let gw = proxy_gateway(rec.up.addr).await;
    let out = send_raw(gw.addr(), attack).await;
    assert_eq!(out.status, Some(400), "{}", out.text);
    assert_eq!(out.responses, 1, "{}", out.text);
    assert_eq!(out.header("connection"), Some("close"), "{}", out.text);
    rec.assert_untouched();
    still_serves(&gw, &rec, &[]).await;
}

/// Refused by `strict::check_request`: the JSON 400 with `Connection: close`,
/// connection closed, nothing upstream.
async fn assert_refused_by_gateway(attack: &[u8], message: &str) {
    let rec = Recorder::start().await;
    let gw = proxy_gateway(rec.up.addr).await;
    let out = send_raw(gw.addr(), attack).await;
    assert_eq!(out.status, Some(400), "{}", out.text);
    assert_eq!(out.responses, 1, "{}", out.text);
    assert_eq!(out.header("connection"), Some("close"), "{}", out.text);
    let doc: serde_json::Value = serde_json::from_str(out.body()).expect("JSON error body");
    assert_eq!(doc["error"]["code"], "bad_request", "{doc}");
    let msg = doc["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(message), "{msg:?} should mention {message:?}");
    rec.assert_untouched();
    still_serves(&gw, &rec, &[]).await;
}

/// A second request hidden after the first one's body, in the same write.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";

fn with_smuggled(head_and_body: &str) -> Vec<u8> {
    format!("{head_and_body}{SMUGGLED}").into_bytes()
}

// ---------------------------------------------------- request smuggling

// Shapes hyper accepts and hides from the gateway once parsed: refused by
// `strict::io::StrictIo`, which `server::serve_connection` must wrap around
// the client connection.

#[tokio::test]
async fn smuggling_cl_te_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_te_cl_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n0\r\n\r\n",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_repeated_equal_content_length_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
    ))
    .await;
}

// Shapes hyper's parser refuses itself (400, connection closed).

#[tokio::test]
async fn smuggling_conflicting_content_length_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 40\r\n\r\nhello",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_content_length_list_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5, 5\r\n\r\nhello",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_signed_content_length_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: +5\r\n\r\nhello",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_te_identity_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: identity\r\ncontent-length: 5\r\n\r\nhello",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_te_chunked_not_last_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_te_in_http10_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_te_with_space_before_colon_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding : chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_obs_fold_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding:\r\n chunked\r\ncontent-length: 5\r\n\r\nhello",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_bare_cr_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\nx-a: 1\rcontent-length: 5\r\n\r\nhello",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_nul_in_header_value_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "GET /a HTTP/1.1\r\nhost: x\r\nx-a: 1\x002\r\n\r\n",
    ))
    .await;
}

#[tokio::test]
async fn smuggling_nul_in_header_name_is_rejected() {
    assert_refused_by_parser(&with_smuggled(
        "GET /a HTTP/1.1\r\nhost: x\r\ncontent\x00-length: 5\r\n\r\n",
    ))
    .await;
}

// Shapes visible in the parsed request: refused by `strict::check_request`
// with the JSON 400 and `Connection: close`.

#[tokio::test]
async fn smuggling_te_gzip_chunked_is_rejected() {
    assert_refused_by_gateway(
        &with_smuggled(
            "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        "Transfer-Encoding",
    )
    .await;
}

#[tokio::test]
async fn smuggling_te_chunked_chunked_is_rejected() {
    assert_refused_by_gateway(
        &with_smuggled(
            "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        ),
        "Transfer-Encoding",
    )
    .await;
}

#[tokio::test]
async fn smuggling_repeated_te_header_is_rejected() {
    assert_refused_by_gateway(
        &with_smuggled(
            "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        "Transfer-Encoding",
    )
    .await;
}

#[tokio::test]
async fn smuggling_two_host_headers_are_rejected() {
    assert_refused_by_gateway(
        &with_smuggled("GET /a HTTP/1.1\r\nhost: x\r\nhost: admin.internal\r\n\r\n"),
        "repeated Host",
    )
    .await;
}

#[tokio::test]
async fn smuggling_host_differing_from_absolute_target_is_rejected() {
    assert_refused_by_gateway(
        &with_smuggled("GET http://public.example/a HTTP/1.1\r\nhost: admin.internal\r\n\r\n"),
        "Host differs",
    )
    .await;
}

#[tokio::test]
async fn missing_or_invalid_host_is_rejected() {
    assert_refused_by_gateway(b"GET /a HTTP/1.1\r\n\r\n", "missing Host").await;
    assert_refused_by_gateway(b"GET /a HTTP/1.1\r\nhost: a b\r\n\r\n", "invalid Host").await;
    assert_refused_by_gateway(b"GET /a HTTP/1.1\r\nhost: x@y\r\n\r\n", "invalid Host").await;
}

#[tokio::test]
async fn absolute_target_with_matching_host_is_served() {
    let rec = Recorder::start().await;
    let gw = proxy_gateway(rec.up.addr).await;
    let mut c = RawConn::connect(gw.addr()).await;
    c.write(b"GET http://Public.Example/a HTTP/1.1\r\nhost: public.example:80\r\n\r\n")
        .await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(c.read_body(&head, false).await, b"/a");
}

// Invalid chunked framing: found by hyper while the body streams, after the
// head was accepted. The upstream may see the head and part of the body,
// never a complete request; the smuggled request is never parsed.

/// Sends a chunked request with broken framing; returns what the client saw.
async fn broken_chunked(rec: &Recorder, gw: &TestGateway, chunks: &str) -> Outcome {
    let attack = with_smuggled(&format!(
        "POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{chunks}"
    ));
    let out = send_raw(gw.addr(), &attack).await;
    assert!(out.responses <= 1, "{}", out.text);
    assert!(rec.complete().is_empty(), "{:?}", rec.complete());
    out
}

#[tokio::test]
async fn smuggling_invalid_chunk_size_is_rejected() {
    let rec = Recorder::start().await;
    let gw = proxy_gateway(rec.up.addr).await;
    for chunks in [
        "zz\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "0x5\r\nhello\r\n0\r\n\r\n",
        "5 5\r\nhello\r\n0\r\n\r\n",
        "10000000000000000\r\nhello\r\n0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5;a\nb\r\nhello\r\n0\r\n\r\n",
    ] {
        let out = broken_chunked(&rec, &gw, chunks).await;
        assert_eq!(out.status, Some(400), "{chunks:?}: {}", out.text);
    }
    // The client's broken framing is not held against the upstream.
    still_serves(&gw, &rec, &[]).await;
}

#[tokio::test]
async fn smuggling_chunk_data_longer_than_its_size_is_rejected() {
    let rec = Recorder::start().await;
    let gw = proxy_gateway(rec.up.addr).await;
    for chunks in [
        "5\r\nhelloXX\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "0\r\n\n",
    ] {
        let out = broken_chunked(&rec, &gw, chunks).await;
        assert_eq!(out.status, Some(400), "{chunks:?}: {}", out.text);
    }
    still_serves(&gw, &rec, &[]).await;
}

#[tokio::test]
async fn pipelined_requests_before_a_smuggling_shape_are_served() {
    let rec = Recorder::start().await;
    let gw = proxy_gateway(rec.up.addr).await;
    let mut attack = b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
    attack.extend(with_smuggled(
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ));
    let out = send_raw(gw.addr(), &attack).await;
    assert_eq!(out.status, Some(200), "{}", out.text);
    assert_eq!(out.responses, 2, "{}", out.text);
    assert!(out.text.contains("HTTP/1.1 400"), "{}", out.text);
    still_serves(&gw, &rec, &["/first"]).await;
}

// --------------------------------------------------- path normalisation

/// `/admin` is refused by a `respond 403` route; `/public` and everything
/// else is proxied, as is `/users/{id}` (rewritten to `/u/{id}`).
async fn protected_gateway(up: SocketAddr) -> TestGateway {
    gateway(&simple_config(
        &[up],
        "",
        concat!(
            "  - name: admin\n    match: {path_prefix: /admin}\n    action: {respond: {status: 403, body: forbidden}}\n",
            "  - name: public\n    match: {path_prefix: /public}\n    action: {proxy: {upstream: up}}\n",
            "  - name: user\n    match: {path: \"/users/{id}\"}\n    action: {proxy: {upstream: up, rewrite: {path: \"/u/{id}\"}}}\n",
            "  - name: rest\n    action: {proxy: {upstream: up}}\n",
        ),
    ))
    .await
}

/// One request on its own connection: (status, body).
async fn get_raw(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut c = RawConn::connect(addr).await;
    c.write(format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await;
    let head = c.read_head().await;
    let body = c.read_body(&head, false).await;
    (head.status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn path_bypass_attempts_meet_the_admin_rule() {
    let up = upstream::echo().await;
    let gw = protected_gateway(up.addr).await;
    for attempt in [
        "/admin",
        "/public/../admin",
        "/public/../admin/users",
        "/%61dmin",
        "/%61%64%6d%69%6e/users",
        "/%41dmin/../admin",
        "/public/%2e%2e/admin",
        "/public/.%2E/admin/x",
        "/public/%2E./admin",
        "//admin",
        "///admin//users",
        "/./admin",
        "/public/./../admin",
        "/public//..//admin",
        "/public/x/../../admin",
        "/admin/./",
    ] {
        let (status, body) = get_raw(gw.addr(), attempt).await;
        assert_eq!((status, body.as_str()), (403, "forbidden"), "{attempt}");
    }
    assert_eq!(up.hits(), 0, "no attempt reached the upstream");
}

#[tokio::test]
async fn malformed_paths_are_400() {
    let up = upstream::echo().await;
    let gw = protected_gateway(up.addr).await;
    for (attempt, why) in [
        ("/%zz", "percent-escape"),
        ("/admin%", "percent-escape"),
        ("/public/%2", "percent-escape"),
        ("/a%00b", "NUL"),
        ("/public/..%00/admin", "NUL"),
        ("/../admin", "above the root"),
        ("/%2e%2e/admin", "above the root"),
        ("/public/../../admin", "above the root"),
        ("/public/..;/admin", "dot segment"),
        ("/public/%2e%2e;x/admin", "dot segment"),
        ("/public\\..\\admin", "backslash"),
    ] {
        let mut c = RawConn::connect(gw.addr()).await;
        c.write(format!("GET {attempt} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await;
        let head = c.read_head().await;
        let body = c.read_body(&head, false).await;
        assert_eq!(head.status, 400, "{attempt}");
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["error"]["code"], "bad_request", "{attempt}");
        let msg = doc["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(why),
            "{attempt}: {msg:?} should mention {why:?}"
        );
        // A malformed path is not a framing problem: the connection stays.
        c.write(b"GET /admin HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(c.read_head().await.status, 403, "{attempt}");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn upstream_receives_the_normalised_path() {
    let up = upstream::echo().await;
    let gw = protected_gateway(up.addr).await;
    for (sent, path, query) in [
        (
            "/public/a/./b/../c//d?x=%2e%2e&y=a//b",
            "/public/a/c/d",
            Some("x=%2e%2e&y=a//b"),
        ),
        ("/public/%7Euser/%c3%a9", "/public/~user/%C3%A9", None),
        ("/%70ublic/x", "/public/x", None),
        ("/public/a/..", "/public/", None),
        ("/public/plain", "/public/plain", None),
        // `%25` is `%` itself: decoded by nobody here, so never twice.
        ("/%2561dmin", "/%2561dmin", None),
    ] {
        let r = client::get(&gw.url(sent)).await;
        assert_eq!(r.status, 200, "{sent}: {}", r.text());
        let doc = r.json();
        assert_eq!(doc["path"], path, "{sent}");
        assert_eq!(doc["query"].as_str(), query, "{sent}");
    }
}

#[tokio::test]
async fn encoded_slash_stays_encoded_and_never_separates() {
    let up = upstream::echo().await;
    let gw = protected_gateway(up.addr).await;
    // `%2F` is data within a segment: `..%2Fadmin` is not a dot segment, so
    // these stay where their literal segments put them and are forwarded
    // with the escape kept (hex upper-cased).
    for (sent, path) in [
        ("/PUBLIC/..%2fadmin", "/PUBLIC/..%2Fadmin"),
        ("/public/..%2Fadmin", "/public/..%2Fadmin"),
        ("/public/%2e%2e%2fadmin", "/public/..%2Fadmin"),
        ("/a%2Fb", "/a%2Fb"),
    ] {
        let (status, body) = get_raw(gw.addr(), sent).await;
        assert_eq!(status, 200, "{sent}: {body}");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["path"], path, "{sent}");
    }
    // `/admin%2Fx` is one segment `admin/x`, not under the `/admin` prefix.
    let (status, body) = get_raw(gw.addr(), "/admin%2fx").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn captures_and_rewrites_use_the_normalised_path() {
    let up = upstream::echo().await;
    let gw = protected_gateway(up.addr).await;
    for (sent, path) in [
        ("/users/x/../%41bc", "/u/Abc"),
        ("/users//42", "/u/42"),
        ("/users/./%34%32", "/u/42"),
        ("/users/a%2fb", "/u/a%2Fb"),
    ] {
        let (status, body) = get_raw(gw.addr(), sent).await;
        assert_eq!(status, 200, "{sent}: {body}");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["path"], path, "{sent}");
    }
}
