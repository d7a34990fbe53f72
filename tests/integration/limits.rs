//! Listener limits and timeouts (hardening), and listener changes on reload.

use super::support::conn::RawConn;
use super::support::upstream;
use super::support::{client, gateway, TestGateway};
use std::time::Duration;

/// A gateway whose listener `main` has `listener_extra` settings, proxying
/// everything to `up` (routes may add `route_extra` keys).
async fn limited(up: std::net::SocketAddr, listener_extra: &str, route_extra: &str) -> TestGateway {
    gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n{listener_extra}upstreams:\n  - name: up\n    targets: [{{address: '{up}'}}]\nroutes:\n  - name: all\n{route_extra}    action: {{proxy: {{upstream: up}}}}\n"
    ))
    .await
}

fn error_code(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let start = text.find('{').unwrap_or(0);
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).unwrap_or_else(|_| panic!("{text}"));
    v["error"]["code"].as_str().unwrap_or("").to_string()
}

#[tokio::test]
async fn long_uri_is_414() {
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(up.addr, "    max_uri_bytes: 100\n", "").await;
    let r = client::get(&gw.url(&format!("/{}", "a".repeat(200)))).await;
    assert_eq!(r.status, 414);
    assert_eq!(r.json()["error"]["code"], "uri_too_long");
    assert_eq!(client::get(&gw.url("/short")).await.status, 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn too_many_or_too_large_headers_are_431() {
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(
        up.addr,
        "    max_headers: 10\n    max_header_bytes: 8KiB\n",
        "",
    )
    .await;
    let mut many = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
    for i in 0..20 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let mut c = RawConn::connect(gw.addr()).await;
    c.write(many.as_bytes()).await;
    assert_eq!(c.read_head().await.status, 431);

    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(16 * 1024)
    );
    let mut c = RawConn::connect(gw.addr()).await;
    c.write(big.as_bytes()).await;
    assert_eq!(c.read_head().await.status, 431);
    assert_eq!(up.hits(), 0, "nothing was forwarded");
}

#[tokio::test]
async fn declared_body_over_the_limit_is_413_without_reaching_the_upstream() {
    let up = upstream::echo().await;
    let gw = limited(up.addr, "    max_body_bytes: 1KiB\n", "").await;
    let mut c = RawConn::connect(gw.addr()).await;
    c.write(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n")
        .await;
    let head = c.read_head().await;
    assert_eq!(head.status, 413);
    assert_eq!(head.header("connection"), Some("close"));
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413_and_small_bodies_pass() {
    let up = upstream::echo().await;
    let gw = limited(up.addr, "    max_body_bytes: 1KiB\n", "").await;
    let mut c = RawConn::connect(gw.addr()).await;
    let chunk = "a".repeat(600);
    c.write(format!("POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n").as_bytes()).await;
    let head = c.read_head().await;
    assert_eq!(head.status, 413);

    let mut c = RawConn::connect(gw.addr()).await;
    c.write(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        .await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
}

#[tokio::test]
async fn route_overrides_the_listener_body_limit() {
    let up = upstream::echo().await;
    let gw = limited(
        up.addr,
        "    max_body_bytes: 10\n",
        "    max_body_bytes: 1MiB\n",
    )
    .await;
    let mut c = RawConn::connect(gw.addr()).await;
    c.write(
        format!(
            "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{}",
            "z".repeat(100)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.read_head().await.status, 200);
}

#[tokio::test]
async fn stalled_request_body_is_408() {
    let up = upstream::echo().await;
    let gw = limited(up.addr, "    body_read_timeout: 200ms\n", "").await;
    let mut c = RawConn::connect(gw.addr()).await;
    // Promises 100 bytes, sends 3, then stalls.
    c.write(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
        .await;
    let got = c.read_to_close().await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(error_code(&got), "request_timeout");
}

#[tokio::test]
async fn connections_beyond_the_listener_limits_are_closed() {
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(up.addr, "    max_connections: 2\n", "").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = RawConn::connect(gw.addr()).await;
        c.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(c.read_head().await.status, 200);
        held.push(c);
    }
    let mut third = RawConn::connect(gw.addr()).await;
    assert!(
        third.read_to_close().await.is_empty(),
        "refused without an answer"
    );
    // A slot frees up when a connection closes.
    drop(held.pop());
    let mut retry_ok = false;
    for _ in 0..50 {
        let mut c = RawConn::connect(gw.addr()).await;
        c.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let got = c.read_to_close().await;
        if got.starts_with(b"HTTP/1.1 200") {
            retry_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(retry_ok, "a freed slot admits a new connection");
}

#[tokio::test]
async fn connections_beyond_the_per_ip_limit_are_closed() {
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(up.addr, "    max_connections_per_ip: 1\n", "").await;
    let mut first = RawConn::connect(gw.addr()).await;
    first.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(first.read_head().await.status, 200);
    let mut second = RawConn::connect(gw.addr()).await;
    assert!(second.read_to_close().await.is_empty());
}

#[tokio::test]
async fn connection_past_its_lifetime_closes_after_its_request() {
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(up.addr, "    max_connection_lifetime: 200ms\n", "").await;
    let mut c = RawConn::connect(gw.addr()).await;
    c.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("connection"), None);
    assert_eq!(c.read_body(&head, false).await, b"ok");
    // Past the lifetime, a request on the connection is still served, with
    // `Connection: close` (no race with a client reusing it) ...
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("connection"), Some("close"));
    // ... and then the gateway closes it.
    let rest = c.read_to_close().await;
    assert_eq!(rest, b"ok", "only the second response's body, then close");
    // A connection left idle past its lifetime is closed too.
    let mut idle = RawConn::connect(gw.addr()).await;
    idle.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let head = idle.read_head().await;
    assert_eq!(idle.read_body(&head, false).await, b"ok");
    assert!(closes_within(&mut idle, Duration::from_secs(10)).await);
}

fn config_with(listeners: &str) -> String {
    format!("watch_config: true\nlisteners:\n{listeners}routes:\n  - name: r\n    action: {{respond: {{status: 200, body: hi}}}}\n")
}

#[tokio::test]
async fn reload_binds_new_listeners_and_stops_removed_ones() {
    let dir = std::env::temp_dir().join(format!("portico-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("listeners.yaml");
    let main = "  - name: main\n    address: 127.0.0.1:0\n";
    let extra = "  - name: extra\n    address: 127.0.0.1:0\n";
    std::fs::write(&path, config_with(main)).unwrap();
    let snap = portico::load(&path).unwrap();
    let running = portico::server::start(snap, Some(path.clone()))
        .await
        .unwrap();
    assert!(running.shared.local_addr("extra").is_none());

    std::fs::write(&path, config_with(&format!("{main}{extra}"))).unwrap();
    running.shared.reload().unwrap();
    let extra_addr = running.addr("extra");
    assert_eq!(
        client::get(&format!("http://{extra_addr}/")).await.text(),
        "hi"
    );

    std::fs::write(&path, config_with(main)).unwrap();
    running.shared.reload().unwrap();
    assert!(running.shared.local_addr("extra").is_none());
    assert!(
        super::support::eventually(Duration::from_secs(5), || std::net::TcpStream::connect(
            extra_addr
        )
        .is_err())
        .await
    );
    let main_addr = running.addr("main");
    assert_eq!(
        client::get(&format!("http://{main_addr}/")).await.text(),
        "hi"
    );
}

#[tokio::test]
async fn config_file_changes_are_reloaded() {
    let dir = std::env::temp_dir().join(format!("portico-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("watched.yaml");
    let text = |body: &str| {
        format!("listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n  - name: r\n    action: {{respond: {{status: 200, body: {body}}}}}\n")
    };
    std::fs::write(&path, text("before")).unwrap();
    let snap = portico::load(&path).unwrap();
    let running = portico::server::start(snap, Some(path.clone()))
        .await
        .unwrap();
    portico::server::watch(&running);
    let url = format!("http://{}/", running.addr("main"));
    assert_eq!(client::get(&url).await.text(), "before");
    // Editors save by writing a new file and renaming it over the old one.
    let tmp = dir.join("watched.yaml.tmp");
    std::fs::write(&tmp, text("after")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let mut seen = false;
    for _ in 0..100 {
        if client::get(&url).await.text() == "after" {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the watcher reloaded the changed file");
}

/// Slowloris: a client dribbling its headers is cut off at
/// `header_read_timeout`, while other clients are served meanwhile.
#[tokio::test]
async fn slowloris_client_is_cut_off_while_others_are_served() {
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(up.addr, "    header_read_timeout: 300ms\n", "").await;
    let mut slow = RawConn::connect(gw.addr()).await;
    slow.write(b"GET / HTTP/1.1\r\nhost: x\r\n").await;
    let dribble = async {
        // One header line every 100 ms, never finishing the head.
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow
                .try_write(format!("x-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return true;
            }
        }
        false
    };
    let served = async {
        for _ in 0..5 {
            assert_eq!(client::get(&gw.url("/")).await.status, 200);
        }
    };
    let (cut, ()) = tokio::join!(dribble, served);
    assert!(
        cut,
        "the slow client was disconnected before sending 100 lines"
    );
    assert_eq!(up.hits(), 5, "the slow request never reached the upstream");
}

/// Reads from `conn` until the server closes it; `true` if it closed within
/// `limit` (a hang guard, not a timing assertion).
async fn closes_within(conn: &mut RawConn, limit: Duration) -> bool {
    tokio::time::timeout(limit, conn.read_to_close())
        .await
        .is_ok()
}

fn get_head() -> &'static [u8] {
    b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n"
}

/// `idle_timeout` closes a kept-alive connection with nothing in flight;
/// `header_read_timeout` does not apply to the wait between requests.
#[tokio::test]
async fn idle_keep_alive_connections_close_at_idle_timeout_not_header_timeout() {
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(
        up.addr,
        "    header_read_timeout: 200ms\n    idle_timeout: 1500ms\n",
        "",
    )
    .await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.write(get_head()).await;
    let head = conn.read_head().await;
    assert_eq!(head.status, 200);
    conn.read_body(&head, false).await;
    // Idle for well over header_read_timeout: still open, and serves.
    tokio::time::sleep(Duration::from_millis(600)).await;
    conn.write(get_head()).await;
    let head = conn.read_head().await;
    assert_eq!(
        head.status, 200,
        "served after an idle wait longer than header_read_timeout"
    );
    conn.read_body(&head, false).await;
    // Then idle past idle_timeout: closed by the gateway.
    assert!(closes_within(&mut conn, Duration::from_secs(10)).await);
    assert_eq!(up.hits(), 2);
}

/// A request that takes longer than `idle_timeout` is in flight, not idle.
#[tokio::test]
async fn slow_responses_are_not_cut_by_the_idle_timeout() {
    let up = upstream::slow(Duration::from_millis(800)).await;
    let gw = limited(up.addr, "    idle_timeout: 200ms\n", "").await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.write(get_head()).await;
    let head = conn.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(conn.read_body(&head, false).await, b"slow");
}

/// After a first request, a later head that stalls half-way is cut at
/// `header_read_timeout` (counted from its first byte), although the idle
/// timeout is long.
#[tokio::test]
async fn a_stalled_later_head_is_cut_at_header_read_timeout() {
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(
        up.addr,
        "    header_read_timeout: 300ms\n    idle_timeout: 60s\n",
        "",
    )
    .await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.write(get_head()).await;
    let head = conn.read_head().await;
    conn.read_body(&head, false).await;
    conn.write(b"GET /y HTTP/1.1\r\nhost: a\r\nx-part").await;
    let rest = tokio::time::timeout(Duration::from_secs(10), conn.read_to_close())
        .await
        .expect("closed");
    assert_timeout_answer(&rest);
    assert_eq!(up.hits(), 1);
    // A connection that never sends anything is cut at the same timeout.
    let mut silent = RawConn::connect(gw.addr()).await;
    let rest = tokio::time::timeout(Duration::from_secs(10), silent.read_to_close())
        .await
        .expect("closed");
    assert_timeout_answer(&rest);
}

/// The `408` a client gets when its request head did not arrive in time:
/// the standard JSON error body, then the connection closes.
fn assert_timeout_answer(raw: &[u8]) {
    let text = String::from_utf8_lossy(raw);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(text.contains("\r\nx-request-id: "), "{text}");
    assert_eq!(error_code(raw), "request_timeout", "{text}");
}

/// An idle HTTP/2 connection gets GOAWAY at `idle_timeout` and is closed.
#[tokio::test]
async fn idle_http2_connections_get_goaway() {
    use super::support::h2raw::{self, RawH2};
    let up = upstream::fixed(200, "ok").await;
    let gw = limited(up.addr, "    idle_timeout: 300ms\n", "").await;
    let mut conn = RawH2::connect(gw.addr()).await;
    let (frames, closed) = conn.frames_until_close(Duration::from_secs(10)).await;
    assert!(closed, "the idle connection was closed");
    assert!(
        frames.iter().any(|f| f.kind == h2raw::GOAWAY),
        "GOAWAY before closing: {frames:?}"
    );
}

/// `limited`, plus an admin listener for `/metrics`.
async fn limited_with_admin(up: std::net::SocketAddr, listener_extra: &str) -> TestGateway {
    gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n{listener_extra}admin:\n  address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{{address: '{up}'}}]\nroutes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n"
    ))
    .await
}

fn parked(m: &super::support::metrics::Metrics) -> f64 {
    m.value("portico_connections_parked", &[("listener", "main")])
}

fn open(m: &super::support::metrics::Metrics) -> f64 {
    m.value(
        "portico_connections_open",
        &[
            ("listener", "main"),
            ("protocol", "http1"),
            ("tls", "false"),
        ],
    )
}

/// Sends one request on `conn` and reads the whole answer.
async fn exchange(conn: &mut RawConn, req: &[u8]) -> (u16, Vec<u8>) {
    conn.write(req).await;
    let head = conn.read_head().await;
    let body = conn.read_body(&head, false).await;
    (head.status, body)
}

/// An idle keep-alive connection parks (hyper's connection and buffers
/// dropped, the socket kept) and is served again, on the same socket, when
/// its client sends more: a plain request, a body, pipelined requests.
#[tokio::test]
async fn idle_keep_alive_connections_park_and_resume() {
    use super::support::metrics::scrape_until;
    let up = upstream::echo().await;
    let gw = limited_with_admin(up.addr, "").await;
    let admin = gw.running.admin_addr();
    let mut conn = RawConn::connect(gw.addr()).await;
    assert_eq!(exchange(&mut conn, get_head()).await.0, 200);
    scrape_until(admin, None, |m| parked(m) == 1.0 && open(m) == 1.0).await;

    // A request with a body on the parked connection.
    let (status, body) = exchange(
        &mut conn,
        b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body_len"], 5);
    scrape_until(admin, None, |m| parked(m) == 1.0).await;

    // Two pipelined requests in one write, after parking again.
    conn.write(b"GET /one HTTP/1.1\r\nhost: a\r\n\r\nGET /two HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    for path in ["/one", "/two"] {
        let head = conn.read_head().await;
        assert_eq!(head.status, 200);
        let body = conn.read_body(&head, false).await;
        assert!(String::from_utf8_lossy(&body).contains(path), "{path}");
    }
    assert_eq!(up.hits(), 4, "every request reached the upstream once");

    // The client closes a parked connection: it is gone from both gauges.
    scrape_until(admin, None, |m| parked(m) == 1.0).await;
    drop(conn);
    scrape_until(admin, None, |m| parked(m) == 0.0 && open(m) == 0.0).await;
}

/// A request split around the moment of parking is not lost: the head's
/// first bytes arrive on the parked socket, the rest later.
#[tokio::test]
async fn a_head_arriving_in_pieces_on_a_parked_connection_is_served() {
    use super::support::metrics::scrape_until;
    let up = upstream::fixed(200, "ok").await;
    let gw = limited_with_admin(up.addr, "").await;
    let admin = gw.running.admin_addr();
    let mut conn = RawConn::connect(gw.addr()).await;
    assert_eq!(exchange(&mut conn, get_head()).await.0, 200);
    scrape_until(admin, None, |m| parked(m) == 1.0).await;
    conn.write(b"GET /x HTT").await;
    scrape_until(admin, None, |m| parked(m) == 0.0).await;
    conn.write(b"P/1.1\r\nhost: a\r\n\r\n").await;
    let head = conn.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(conn.read_body(&head, false).await, b"ok");
}

/// Draining closes parked connections (after the grace that spares a
/// request already on its way), and a request that arrives on one while
/// draining is served with `Connection: close`.
#[tokio::test]
async fn draining_closes_parked_connections_and_serves_one_last_request() {
    use super::support::metrics::scrape_until;
    let up = upstream::fixed(200, "ok").await;
    let gw = limited_with_admin(up.addr, "").await;
    let admin = gw.running.admin_addr();
    let mut quiet = RawConn::connect(gw.addr()).await;
    let mut late = RawConn::connect(gw.addr()).await;
    assert_eq!(exchange(&mut quiet, get_head()).await.0, 200);
    assert_eq!(exchange(&mut late, get_head()).await.0, 200);
    scrape_until(admin, None, |m| parked(m) == 2.0).await;
    gw.running.shared.begin_drain();
    late.write(get_head()).await;
    let head = late.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("connection"), Some("close"));
    assert_eq!(late.read_body(&head, false).await, b"ok");
    assert!(closes_within(&mut late, Duration::from_secs(10)).await);
    assert!(
        closes_within(&mut quiet, Duration::from_secs(10)).await,
        "the idle parked connection was closed"
    );
    assert_eq!(up.hits(), 3);
}

/// `max_connection_lifetime` applies to a parked connection: once it has
/// passed, the connection is closed (a request arriving within the grace is
/// still served, with `Connection: close`).
#[tokio::test]
async fn parked_connections_close_at_their_lifetime() {
    use super::support::metrics::scrape_until;
    let up = upstream::fixed(200, "ok").await;
    let gw = limited_with_admin(up.addr, "    max_connection_lifetime: 1500ms\n").await;
    let admin = gw.running.admin_addr();
    let mut conn = RawConn::connect(gw.addr()).await;
    assert_eq!(exchange(&mut conn, get_head()).await.0, 200);
    scrape_until(admin, None, |m| parked(m) == 1.0).await;
    assert!(closes_within(&mut conn, Duration::from_secs(10)).await);
    scrape_until(admin, None, |m| parked(m) == 0.0 && open(m) == 0.0).await;
}
