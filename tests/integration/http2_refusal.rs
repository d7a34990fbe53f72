//! HTTP/2 upstreams that turn requests away unprocessed (RFC 9113 §6.8,
//! §8.7): streams reset with `REFUSED_STREAM`, and streams above the
//! `last_stream_id` of a graceful GOAWAY (what nginx sends after
//! `keepalive_requests`). Portico re-sends a bodyless request whatever its
//! method, answers 502 naming the refusal for one with a body, and never
//! counts a refusal against the target (outlier detection, circuit breaker).
//! Each upstream counts what it saw; no timing assertion.

use super::support::client::{self, Reply};
use super::support::h2raw::{self, RawServer};
use super::support::traffic::{fetch, request};
use super::support::{gateway, metrics::admin_get, simple_config, TestGateway};
use bytes::Bytes;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One h2c target; any single failure counted against it would eject it
/// for 30 s, and any one failed result would open the circuit. No retries:
/// what gets a request through here is the free re-send, not the budget.
fn config(up: SocketAddr) -> String {
    simple_config(
        &[up],
        "    protocol: h2c\n    retries: {attempts: 0}\n    outlier_detection: {consecutive_failures: 1, base_ejection: 30s, max_ejection: 60s}\n    circuit_breaker: {failure_ratio: 0.5, min_requests: 1, open_for: 30s}\n",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ) + "admin:\n  address: 127.0.0.1:0\n"
}

/// The upstream as `/upstreams` shows it.
async fn upstream_view(gw: &TestGateway) -> Value {
    let v = admin_get(gw.running.admin_addr(), "/upstreams", None)
        .await
        .json();
    v["upstreams"][0].clone()
}

/// Asserts that nothing was counted against the target: not ejected, never
/// ejected, the circuit never opened, and no `upstream_protocol_error`
/// beyond `protocol_errors` (the requests a refusal ended).
async fn assert_never_blamed(gw: &TestGateway, protocol_errors: u64) {
    let up = upstream_view(gw).await;
    let target = &up["targets"][0];
    let ep = &target["endpoints"][0];
    assert_eq!(ep["state"], "healthy", "{up}");
    assert_eq!(ep["ejections"], 0, "{up}");
    assert_eq!(up["circuit_breaker"]["state"], "closed", "{up}");
    assert_eq!(up["circuit_breaker"]["opened"], 0, "{up}");
    let errors = target["errors"]["upstream_protocol_error"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(errors, protocol_errors, "{up}");
}

// === REFUSED_STREAM ===

/// An h2c upstream built on the `h2` crate's server: it resets with
/// `REFUSED_STREAM` the first request for each path, and every request for
/// a path under `/always-refuse`; it answers the others `200` with the path.
struct Refusing {
    addr: SocketAddr,
    /// Requests received, by path (refused or not).
    arrivals: Arc<Mutex<HashMap<String, usize>>>,
    task: JoinHandle<()>,
}

impl Drop for Refusing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Refusing {
    async fn start() -> Refusing {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrivals: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let seen = arrivals.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(sock).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let path = req.uri().path().to_owned();
                        let n = {
                            let mut g = seen.lock().unwrap();
                            let n = g.entry(path.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        if n == 1 || path.starts_with("/always-refuse") {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let head = http::Response::new(());
                        if let Ok(mut body) = respond.send_response(head, false) {
                            let _ = body.send_data(Bytes::from(path), true);
                        }
                    }
                });
            }
        });
        Refusing {
            addr,
            arrivals,
            task,
        }
    }

    fn arrivals(&self, path: &str) -> usize {
        self.arrivals
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

fn error_message(r: &Reply) -> String {
    r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn refused_streams_are_resent_and_never_count_against_the_target() {
    let up = Refusing::start().await;
    let gw = gateway(&config(up.addr)).await;
    let c = client::new();

    // Refused every time: the first send and 3 free re-sends, then 502
    // naming the refusal. Done first: had it counted, the target would be
    // ejected and the circuit open for everything below.
    let r = fetch(&c, request("GET", &gw.url("/always-refuse/get"), &[], "")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_protocol_error");
    let msg = error_message(&r);
    assert!(
        msg.contains(
            "refused the request unprocessed (HTTP/2 REFUSED_STREAM) after 3 free re-sends"
        ),
        "{msg}"
    );
    assert_eq!(up.arrivals("/always-refuse/get"), 4, "bounded re-sends");

    // A request with a body cannot be replayed: 502, sent once.
    let r = fetch(
        &c,
        request(
            "POST",
            &gw.url("/always-refuse/post"),
            &[("content-type", "text/plain")],
            "payload",
        ),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    let msg = error_message(&r);
    assert!(
        msg.contains("refused the request unprocessed (HTTP/2 REFUSED_STREAM)")
            && msg.contains("has a body"),
        "{msg}"
    );
    assert_eq!(up.arrivals("/always-refuse/post"), 1, "never replayed");

    // Refused once, then served: GETs one after another and at once, and a
    // bodyless POST (not idempotent, but it was not processed).
    for i in 0..10 {
        let path = format!("/seq/{i}");
        let r = fetch(&c, request("GET", &gw.url(&path), &[], "")).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.text(), path);
        assert_eq!(up.arrivals(&path), 2);
    }
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (c, url) = (c.clone(), gw.url(&format!("/par/{i}")));
        tasks.push(tokio::spawn(async move {
            fetch(&c, request("GET", &url, &[], "")).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = fetch(&c, request("POST", &gw.url("/post"), &[], "")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.arrivals("/post"), 2);

    // Only the two requests a refusal ended count as protocol errors; the
    // target was never ejected and the circuit never opened.
    assert_never_blamed(&gw, 2).await;
    let r = fetch(&c, request("GET", &gw.url("/seq/0"), &[], "")).await;
    assert_eq!(r.status, 200, "a later request is served: {}", r.text());
}

// === GOAWAY ===

/// A raw h2c upstream. On its first connection it waits until it holds
/// HEADERS for at least two streams, then sends GOAWAY(NO_ERROR,
/// last_stream_id = the first stream), answers that stream only and closes:
/// every other stream was refused unprocessed. Later connections answer
/// every stream `200`.
struct GoingAway {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Streams the first connection saw before its GOAWAY.
    first_streams: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for GoingAway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GoingAway {
    async fn start() -> GoingAway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let first_streams = Arc::new(AtomicUsize::new(0));
        let (conns, firsts) = (connections.clone(), first_streams.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let nth = conns.fetch_add(1, Ordering::SeqCst);
                let firsts = firsts.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = RawServer::accept(sock).await else {
                        return;
                    };
                    if nth == 0 {
                        go_away_after_two(conn, &firsts).await;
                        return;
                    }
                    while let Some(f) = conn.next().await {
                        if f.kind == h2raw::HEADERS
                            && conn.send(&h2raw::ok_response(f.stream)).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        GoingAway {
            addr,
            connections,
            first_streams,
            task,
        }
    }
}

async fn go_away_after_two(mut conn: RawServer, seen: &AtomicUsize) {
    let mut streams = Vec::new();
    while streams.len() < 2 {
        let Some(f) = conn.next().await else { return };
        if f.kind == h2raw::HEADERS {
            streams.push(f.stream);
        }
    }
    seen.store(streams.len(), Ordering::SeqCst);
    let mut out = h2raw::goaway(streams[0], h2raw::NO_ERROR);
    out.extend(h2raw::ok_response(streams[0]));
    if conn.send(&out).await.is_ok() {
        conn.close(Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn streams_above_a_goaway_are_resent_on_a_new_connection() {
    let up = GoingAway::start().await;
    let gw = gateway(&config(up.addr)).await;
    let c = client::new();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (c, url) = (c.clone(), gw.url(&format!("/g/{i}")));
        tasks.push(tokio::spawn(async move {
            fetch(&c, request("GET", &url, &[], "")).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(
        up.first_streams.load(Ordering::SeqCst) >= 2,
        "the first connection carried several streams"
    );
    assert!(
        up.connections.load(Ordering::SeqCst) >= 2,
        "the refused streams went to a new connection"
    );
    assert_never_blamed(&gw, 0).await;
    let r = fetch(&c, request("GET", &gw.url("/later"), &[], "")).await;
    assert_eq!(r.status, 200, "a later request is served: {}", r.text());
}
