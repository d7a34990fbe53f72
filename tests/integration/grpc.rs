//! gRPC end to end with tonic on both sides: a tonic client (h2c, prior
//! knowledge) → the gateway → a tonic server behind an `h2c` upstream. All
//! four call kinds, statuses and trailers, deadlines, the gateway's own
//! errors as gRPC statuses, and a stream that lives through a reload.

use super::support::grpc::{self, Msg};
use super::support::{client, gateway, simple_config};
use super::support::{start_file, temp_config};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::{Code, Request, Status};

/// Upper bound for one step of a call (a hang guard, shorter than the
/// server's `grpc::GATE_TIMEOUT`).
const STEP: Duration = Duration::from_secs(5);

/// How long the slow calls below would take at the server.
const SLOW_MS: u64 = 5_000;

async fn step<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

const ECHO_ROUTE: &str =
    "  - name: echo\n    match: {path_prefix: /portico.test.Echo}\n    action: {proxy: {upstream: up}}\n";

/// Listener `main`, upstream `up` (h2c) with the given targets, and `routes`.
fn config(target: SocketAddr, upstream_extra: &str, routes: &str) -> String {
    simple_config(
        &[target],
        &format!("    protocol: h2c\n{upstream_extra}"),
        routes,
    )
}

/// The status of a call that must fail.
fn status<T: std::fmt::Debug>(r: Result<T, Status>) -> Status {
    r.expect_err("the call fails")
}

#[tokio::test]
async fn unary_call_round_trips_payload_and_metadata() {
    let server = grpc::start().await;
    let gw = gateway(&config(server.addr, "", ECHO_ROUTE)).await;
    let mut client = grpc::connect(gw.addr()).await;

    // Larger than HTTP/2's initial 64 KiB window, so flow control is
    // exercised on both legs.
    let text = "zoë ".repeat(64 * 1024);
    let mut req = Request::new(Msg {
        text: text.clone(),
        number: 42,
        ..Msg::default()
    });
    req.metadata_mut()
        .insert("x-custom", "abc-123".parse().unwrap());
    let resp = step("unary reply", client.unary(req))
        .await
        .expect("unary call");
    assert_eq!(
        resp.metadata()
            .get("x-echo-custom")
            .map(|v| v.to_str().unwrap()),
        Some("abc-123"),
        "request metadata reached the server and response metadata the client"
    );
    let m = resp.into_inner();
    assert_eq!(m.number, 42);
    assert!(
        m.text == text,
        "payload of {} bytes echoed intact",
        text.len()
    );
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn client_streaming_call_sums_every_message() {
    let server = grpc::start().await;
    let gw = gateway(&config(server.addr, "", ECHO_ROUTE)).await;
    let mut client = grpc::connect(gw.addr()).await;

    let (tx, requests) = grpc::request_stream();
    let sender = tokio::spawn(async move {
        for i in 1..=100 {
            tx.send(Msg::number(i))
                .await
                .expect("the call is still sending");
        }
    });
    let m = step("sum", client.sum(requests))
        .await
        .expect("client-streaming call")
        .into_inner();
    step("sender", sender).await.unwrap();
    assert_eq!((m.number, m.text.as_str()), (5050, "100"));
}

/// The server sends its first message, then waits until the client has
/// received it: the client can only see it if the gateway streams the
/// response rather than waiting for its end.
#[tokio::test]
async fn server_streaming_call_delivers_each_message_as_it_is_sent() {
    let server = grpc::start().await;
    let gw = gateway(&config(server.addr, "", ECHO_ROUTE)).await;
    let mut client = grpc::connect(gw.addr()).await;

    let req = Msg {
        number: 5,
        delay_ms: 20,
        wait: true,
        ..Msg::default()
    };
    let mut replies = step("stream head", client.count(req))
        .await
        .expect("server-streaming call")
        .into_inner();
    let first = step("message 1", replies.message())
        .await
        .expect("message 1")
        .expect("message 1");
    assert_eq!(first.number, 1);
    assert_eq!(
        server.sent(),
        1,
        "the server has not sent the rest before being released"
    );
    server.release();
    for i in 2..=5 {
        let m = step("next message", replies.message())
            .await
            .expect("streamed message")
            .expect("a message, not the end");
        assert_eq!(m.number, i);
    }
    let end = step("end of stream", replies.message()).await;
    assert!(
        matches!(end, Ok(None)),
        "clean end (grpc-status 0): {end:?}"
    );
    assert_eq!(server.sent(), 5);
}

/// Ping-pong: each message is answered before the next one is sent, so
/// both directions stream through the gateway at the same time.
#[tokio::test]
async fn bidirectional_call_interleaves_requests_and_replies() {
    let server = grpc::start().await;
    let gw = gateway(&config(server.addr, "", ECHO_ROUTE)).await;
    let mut client = grpc::connect(gw.addr()).await;

    let (tx, requests) = grpc::request_stream();
    let mut replies = step("stream head", client.chat(requests))
        .await
        .expect("bidirectional call")
        .into_inner();
    for i in 1..=10 {
        ping(&tx, &mut replies, i).await;
    }
    drop(tx);
    let end = step("end of stream", replies.message()).await;
    assert!(
        matches!(end, Ok(None)),
        "clean end (grpc-status 0): {end:?}"
    );
}

/// Sends `ping{i}` and waits for its answer, which must be the `i`-th.
async fn ping(tx: &tokio::sync::mpsc::Sender<Msg>, replies: &mut tonic::Streaming<Msg>, i: i64) {
    step(
        "room for a request message",
        tx.send(Msg::text(&format!("ping{i}"))),
    )
    .await
    .expect("the call is still sending");
    let reply = step("pong", replies.message())
        .await
        .expect("reply")
        .expect("a reply, not the end");
    assert_eq!(
        (reply.text, reply.number),
        (format!("pong:ping{i}"), i),
        "answer to message {i}, before message {} is sent",
        i + 1
    );
}

/// Status code, message and custom metadata of a server's error reach the
/// client: as a trailers-only answer (unary) and as trailers after data
/// (server streaming).
#[tokio::test]
async fn server_status_message_and_trailers_are_preserved() {
    let server = grpc::start().await;
    let gw = gateway(&config(server.addr, "", ECHO_ROUTE)).await;
    let mut client = grpc::connect(gw.addr()).await;
    let check = |s: &Status| {
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
        assert_eq!(s.message(), "no such user: zoë", "{s:?}");
        assert_eq!(
            s.metadata()
                .get("x-error-detail")
                .map(|v| v.to_str().unwrap()),
            Some("see-trailers"),
            "{s:?}"
        );
    };

    let unary = Msg {
        fail: "no such user: zoë".into(),
        ..Msg::default()
    };
    check(&status(step("unary status", client.unary(unary)).await));

    let streamed = Msg {
        number: 2,
        fail: "no such user: zoë".into(),
        ..Msg::default()
    };
    let mut replies = step("stream head", client.count(streamed))
        .await
        .expect("the stream starts")
        .into_inner();
    for i in 1..=2 {
        let m = step("message", replies.message())
            .await
            .expect("a message before the status")
            .expect("a message");
        assert_eq!(m.number, i);
    }
    check(&status(step("trailers", replies.message()).await));
}

/// The client's `grpc-timeout` becomes the gateway's deadline: the server
/// would take 5 s, the client allows 300 ms, and the gateway answers
/// DEADLINE_EXCEEDED itself.
///
/// This client uses a bare HTTP/2 connection instead of a tonic `Channel`:
/// a `Channel` enforces `grpc-timeout` on its own side too and reports
/// CANCELLED when it passes, which would hide whether the gateway honoured
/// it. Here the status can only come from the gateway (its message says
/// so), and tonic's server, which also honours the header, answers later
/// than the gateway that started the clock first.
#[tokio::test]
async fn grpc_timeout_from_the_client_is_honoured_by_the_gateway() {
    let server = grpc::start().await;
    let gw = gateway(&config(server.addr, "", ECHO_ROUTE)).await;
    let mut client = grpc::connect_bare(gw.addr());

    let mut req = Request::new(Msg {
        delay_ms: SLOW_MS,
        ..Msg::default()
    });
    req.set_timeout(Duration::from_millis(300));
    assert_eq!(req.metadata().get("grpc-timeout").unwrap(), "300000u");
    let started = Instant::now();
    let s = status(step("deadline", client.unary(req)).await);
    let took = started.elapsed();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(
        s.message().starts_with("upstream_timeout: "),
        "made by the gateway: {s:?}"
    );
    assert!(
        took >= Duration::from_millis(300),
        "not before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_millis(SLOW_MS),
        "at the deadline, not when the server finished: {took:?}"
    );
    assert!(
        super::support::eventually(STEP, || server.calls() == 1).await,
        "the call was forwarded, not refused up front"
    );
}

/// A deadline that passes while the response streams (its head and first
/// message came in time) ends the call with DEADLINE_EXCEEDED in the
/// trailers, not with a reset. (Neither tonic's `Channel` nor its server
/// enforce `grpc-timeout` once the response head is out.)
#[tokio::test]
async fn grpc_timeout_passing_mid_stream_ends_it_with_deadline_exceeded() {
    let server = grpc::start().await;
    let gw = gateway(&config(server.addr, "", ECHO_ROUTE)).await;
    let mut client = grpc::connect(gw.addr()).await;

    let mut req = Request::new(Msg {
        number: 3,
        delay_ms: SLOW_MS,
        ..Msg::default()
    });
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let mut replies = step("stream head", client.count(req))
        .await
        .expect("the stream starts")
        .into_inner();
    let first = step("message 1", replies.message())
        .await
        .expect("message 1 comes before the deadline")
        .expect("message 1");
    assert_eq!(first.number, 1);
    let s = status(step("status", replies.message()).await);
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(s.message().starts_with("upstream_timeout: "), "{s:?}");
    assert!(
        started.elapsed() < Duration::from_millis(SLOW_MS),
        "at the deadline, not when message 2 was due"
    );
}

#[tokio::test]
async fn no_route_is_unimplemented() {
    let server = grpc::start().await;
    let gw = gateway(&config(
        server.addr,
        "",
        "  - name: other\n    match: {path_prefix: /other.Service}\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let mut client = grpc::connect(gw.addr()).await;
    let s = status(step("status", client.unary(Msg::text("x"))).await);
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
    assert!(s.message().starts_with("route_not_found: "), "{s:?}");
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn unreachable_upstream_is_unavailable() {
    let dead = super::support::upstream::closed_port().await;
    let gw = gateway(&config(dead, "", ECHO_ROUTE)).await;
    let mut client = grpc::connect(gw.addr()).await;
    let s = status(step("status", client.unary(Msg::text("x"))).await);
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(s.message().starts_with("upstream_unreachable: "), "{s:?}");
}

/// A slow call with no client deadline ends at the gateway's own timeout:
/// the route's whole-request timeout, or the upstream's response-header one.
#[tokio::test]
async fn route_and_upstream_timeouts_are_deadline_exceeded() {
    let server = grpc::start().await;
    let route_timeout = "  - name: echo\n    match: {path_prefix: /portico.test.Echo}\n    action: {proxy: {upstream: up, timeouts: {request: 300ms}}}\n";
    let upstream_timeout = "    timeouts: {response_header: 300ms}\n";
    for (what, yaml) in [
        ("route", config(server.addr, "", route_timeout)),
        (
            "upstream",
            config(server.addr, upstream_timeout, ECHO_ROUTE),
        ),
    ] {
        let gw = gateway(&yaml).await;
        let mut client = grpc::connect(gw.addr()).await;
        let slow = Msg {
            delay_ms: SLOW_MS,
            ..Msg::default()
        };
        let started = Instant::now();
        let s = status(step("status", client.unary(slow)).await);
        assert_eq!(s.code(), Code::DeadlineExceeded, "{what}: {s:?}");
        assert!(
            s.message().starts_with("upstream_timeout: "),
            "{what}: {s:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(SLOW_MS),
            "{what}: answered at the timeout"
        );
    }
    assert_eq!(server.calls(), 2, "both calls reached the server");
}

/// A bidirectional stream opened before reloads that keep its route goes on
/// after them, and new calls work after them.
#[tokio::test]
async fn bidirectional_stream_survives_reloads_that_keep_its_route() {
    let server = grpc::start().await;
    let before = config(server.addr, "", ECHO_ROUTE);
    let path = temp_config("grpc", "reload", &before);
    let gw = start_file(&path).await;
    let mut client = grpc::connect(gw.addr()).await;

    let (tx, requests) = grpc::request_stream();
    let mut replies = step("stream head", client.chat(requests))
        .await
        .expect("bidirectional call")
        .into_inner();
    ping(&tx, &mut replies, 1).await;

    let added = "  - name: added\n    match: {path: /added}\n    action: {respond: {status: 200, body: added}}\n";
    std::fs::write(&path, format!("{before}{added}")).unwrap();
    gw.running.shared.reload().expect("the new config reloads");
    let r = step("new route", client::get(&gw.url("/added"))).await;
    assert_eq!(r.text(), "added", "the reload took effect");

    for i in 2..=3 {
        ping(&tx, &mut replies, i).await;
    }

    // A second reload changes the upstream's settings (not its target), so
    // the upstream is rebuilt: the stream keeps the connection it runs on.
    let changed = config(
        server.addr,
        "    timeouts: {response_header: 10s}\n",
        ECHO_ROUTE,
    );
    std::fs::write(&path, format!("{changed}{added}")).unwrap();
    gw.running
        .shared
        .reload()
        .expect("the changed upstream reloads");
    for i in 4..=6 {
        ping(&tx, &mut replies, i).await;
    }
    drop(tx);
    let end = step("end of stream", replies.message()).await;
    assert!(
        matches!(end, Ok(None)),
        "clean end (grpc-status 0): {end:?}"
    );

    // New calls after the reload: on the same channel and on a new one.
    let m = step("unary", client.unary(Msg::text("after")))
        .await
        .expect("call on the old channel")
        .into_inner();
    assert_eq!(m.text, "after");
    let mut fresh = grpc::connect(gw.addr()).await;
    let m = step("unary", fresh.unary(Msg::text("fresh")))
        .await
        .expect("call on a new channel")
        .into_inner();
    assert_eq!(m.text, "fresh");
    assert_eq!(server.calls(), 3);
}
