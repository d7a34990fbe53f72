//! Resilience through a real gateway: passive outlier ejection and recovery,
//! active health checks, 503 when every target is down, safe retries, the
//! retry budget, connect and response-header timeouts, and connection reuse.

use super::support::traffic::{fetch, get_with, request, weighted_config};
use super::support::upstream::{self, response, TestUpstream};
use super::support::{client, eventually, gateway, TestGateway};
use http::Request;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Health of the endpoint at `addr` in upstream `up`: (active checks say
/// healthy, currently ejected by outlier detection).
fn endpoint_state(gw: &TestGateway, addr: SocketAddr) -> (bool, bool) {
    let snap = gw.running.shared.snapshot.load();
    let set = snap.upstreams["up"].set.load();
    let ep = set
        .endpoints
        .iter()
        .find(|e| e.addr == addr)
        .expect("endpoint in the set");
    (ep.health.is_active_ok(), ep.health.is_ejected())
}

fn targets(ups: &[SocketAddr]) -> Vec<(String, u32)> {
    ups.iter().map(|a| (a.to_string(), 1)).collect()
}

/// Answers 200 `label` while `ok` is set, 500 `broken` otherwise.
async fn switchable(label: &'static str, ok: Arc<AtomicBool>) -> TestUpstream {
    upstream::start(move |_req| {
        let ok = ok.load(Ordering::SeqCst);
        async move {
            if ok {
                response(200, label)
            } else {
                response(500, "broken")
            }
        }
    })
    .await
}

/// A loopback listener whose accept queue is full: connecting to it neither
/// succeeds nor is refused (SYNs are dropped), so a connect times out.
/// Returns the address and what must be kept alive for that to hold.
async fn blackhole() -> (SocketAddr, TcpListener, Vec<TcpStream>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..32 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("connecting to the backlog-full listener: {e}"),
            // The queue is full: this connect hung. Later ones will too.
            Err(_) => return (addr, listener, fillers),
        }
    }
    panic!("the accept queue never filled up");
}

#[tokio::test]
async fn passive_outlier_detection_ejects_a_target_returning_5xx_and_readmits_it() {
    let ok = Arc::new(AtomicBool::new(false));
    let flaky = switchable("flaky", ok.clone()).await;
    let good = upstream::fixed(200, "good").await;
    let gw = gateway(&weighted_config(
        &targets(&[flaky.addr, good.addr]),
        "    retries: {attempts: 0}\n    outlier_detection: {consecutive_failures: 3, base_ejection: 500ms, max_ejection: 5s}\n",
    ))
    .await;
    let c = client::new();
    let url = gw.url("/p");

    // Round-robin alternates, so the flaky target sees its 3 failures within
    // a few requests and is ejected on the third.
    let mut sent = 0;
    while flaky.hits() < 3 {
        assert!(sent < 20, "flaky target never reached 3 requests");
        get_with(&c, &url, &[]).await;
        sent += 1;
    }
    assert_eq!(flaky.hits(), 3);
    assert!(
        endpoint_state(&gw, flaky.addr).1,
        "ejected after 3 consecutive 5xx"
    );

    // Ejected: traffic goes to the healthy target. (Round-robin alone would
    // send the flaky one 10 of these 20. A readmission would cost at most 3
    // more failures before the next, longer ejection.)
    let mut failures = 0;
    for _ in 0..20 {
        let r = get_with(&c, &url, &[]).await;
        if r.status != 200 {
            failures += 1;
        }
    }
    assert!(
        flaky.hits() - 3 <= 3 && failures <= 3,
        "ejected target still got {} requests ({failures} failures)",
        flaky.hits() - 3
    );

    // Recovery: the target heals; once its cooldown ends it is tried again,
    // succeeds and takes its share again.
    ok.store(true, Ordering::SeqCst);
    let mut back = false;
    for _ in 0..500 {
        if get_with(&c, &url, &[]).await.text() == "flaky" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the healed target never served again");
    let before = flaky.hits();
    for _ in 0..20 {
        assert_eq!(get_with(&c, &url, &[]).await.status, 200);
    }
    assert!(
        flaky.hits() - before >= 8,
        "readmitted target got {} of 20",
        flaky.hits() - before
    );
    assert!(!endpoint_state(&gw, flaky.addr).1);
}

#[tokio::test]
async fn passive_outlier_detection_ejects_a_refusing_target_and_readmits_it() {
    let refusing = upstream::closed_port().await;
    let good = upstream::fixed(200, "good").await;
    let gw = gateway(&weighted_config(
        &targets(&[refusing, good.addr]),
        "    retries: {attempts: 0}\n    outlier_detection: {consecutive_failures: 2, base_ejection: 500ms, max_ejection: 5s}\n",
    ))
    .await;
    let c = client::new();
    let url = gw.url("/r");
    let mut errors = Vec::new();
    for _ in 0..12 {
        let r = get_with(&c, &url, &[]).await;
        if r.status != 200 {
            assert_eq!(r.status, 502, "{}", r.text());
            assert_eq!(r.json()["error"]["code"], "upstream_unreachable");
            errors.push(r.status);
        }
    }
    // Two refused connections eject it; the rest go to the good target.
    assert!(
        (2..=4).contains(&errors.len()),
        "{} errors out of 12",
        errors.len()
    );
    assert!(good.hits() >= 8);

    // The target comes back on the same port and is readmitted after the
    // cooldown.
    let listener = TcpListener::bind(refusing).await.expect("rebind the port");
    let handler: upstream::Handler = Arc::new(|_req| Box::pin(async { response(200, "revived") }));
    let revived = upstream::start_on(listener, handler).await;
    let mut back = false;
    for _ in 0..500 {
        if get_with(&c, &url, &[]).await.text() == "revived" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the revived target never served");
    assert!(revived.hits() >= 1);
}

#[tokio::test]
async fn active_health_checks_take_a_target_down_and_back_up() {
    let healthy = Arc::new(AtomicBool::new(true));
    let failed_probes = Arc::new(AtomicUsize::new(0));
    let ok_probes = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let a = {
        let (healthy, failed, okp, served) = (
            healthy.clone(),
            failed_probes.clone(),
            ok_probes.clone(),
            served.clone(),
        );
        upstream::start(move |req: Request<Incoming>| {
            let status = if req.uri().path() == "/healthz" {
                if healthy.load(Ordering::SeqCst) {
                    okp.fetch_add(1, Ordering::SeqCst);
                    200
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                    503
                }
            } else {
                served.fetch_add(1, Ordering::SeqCst);
                200
            };
            async move { response(status, "a") }
        })
        .await
    };
    let b = upstream::fixed(200, "b").await;
    let gw = gateway(&weighted_config(
        &targets(&[a.addr, b.addr]),
        "    health_check: {path: /healthz, interval: 50ms, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let c = client::new();
    let url = gw.url("/hc");
    for _ in 0..10 {
        assert_eq!(get_with(&c, &url, &[]).await.status, 200);
    }
    assert!(served.load(Ordering::SeqCst) >= 4, "both serve at first");

    healthy.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(10), || !endpoint_state(&gw, a.addr).0).await,
        "never marked down"
    );
    let failed = failed_probes.load(Ordering::SeqCst);
    assert!(
        failed >= 3,
        "marked down after {failed} failed probes (threshold 3)"
    );
    let before = served.load(Ordering::SeqCst);
    for _ in 0..20 {
        let r = get_with(&c, &url, &[]).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "b"));
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        before,
        "a down target got traffic"
    );

    let ok_before = ok_probes.load(Ordering::SeqCst);
    healthy.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(10), || endpoint_state(&gw, a.addr).0).await,
        "never marked up again"
    );
    let oks = ok_probes.load(Ordering::SeqCst) - ok_before;
    assert!(oks >= 2, "marked up after {oks} good probes (threshold 2)");
    let before = served.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get_with(&c, &url, &[]).await.status, 200);
    }
    assert!(
        served.load(Ordering::SeqCst) - before >= 8,
        "target back up but got {} of 20",
        served.load(Ordering::SeqCst) - before
    );
}

fn assert_no_healthy_target(r: &client::Reply) {
    assert_eq!(r.status, 503, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["status"], 503);
    assert_eq!(v["error"]["code"], "no_healthy_target");
    assert_eq!(
        v["error"]["request_id"].as_str(),
        r.header("x-request-id"),
        "{v}"
    );
}

#[tokio::test]
async fn every_target_down_by_health_checks_gives_503_no_healthy_target() {
    let a = upstream::failing(503).await;
    let b = upstream::failing(503).await;
    let gw = gateway(&weighted_config(
        &targets(&[a.addr, b.addr]),
        "    health_check: {path: /healthz, interval: 50ms, unhealthy_threshold: 1}\n    outlier_detection: {consecutive_failures: 0}\n    retries: {attempts: 0}\n",
    ))
    .await;
    assert!(
        eventually(Duration::from_secs(10), || {
            !endpoint_state(&gw, a.addr).0 && !endpoint_state(&gw, b.addr).0
        })
        .await,
        "targets never marked down"
    );
    let r = client::get(&gw.url("/down")).await;
    assert_no_healthy_target(&r);
}

#[tokio::test]
async fn every_target_ejected_gives_503_no_healthy_target() {
    let a = upstream::closed_port().await;
    let b = upstream::closed_port().await;
    let gw = gateway(&weighted_config(
        &targets(&[a, b]),
        "    retries: {attempts: 0}\n    outlier_detection: {consecutive_failures: 1, base_ejection: 30s, max_ejection: 60s}\n",
    ))
    .await;
    // One refused connection each ejects both.
    for _ in 0..2 {
        let r = client::get(&gw.url("/x")).await;
        assert_eq!(r.status, 502, "{}", r.text());
    }
    let r = client::get(&gw.url("/x")).await;
    assert_no_healthy_target(&r);
}

#[tokio::test]
async fn get_is_retried_on_503_to_a_different_target() {
    // The failing target records the request ids it saw: a retry to the same
    // target would show up as a repeated id.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let bad = {
        let seen = seen.clone();
        upstream::start(move |req: Request<Incoming>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            seen.lock().unwrap().push(id);
            async move { response(503, "unavailable") }
        })
        .await
    };
    let good = upstream::fixed(200, "good").await;
    let gw = gateway(&weighted_config(
        &targets(&[bad.addr, good.addr]),
        "    retries: {attempts: 2, on: [503], backoff: {base: 1ms, max: 2ms}, budget: {ratio: 1.0, min_retries: 100}}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let c = client::new();
    for _ in 0..20 {
        let r = get_with(&c, &gw.url("/g"), &[]).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "good"));
    }
    assert_eq!(good.hits(), 20, "each request answered once by `good`");
    let mut ids = seen.lock().unwrap().clone();
    assert!(
        !ids.is_empty(),
        "`bad` got first tries, so retries happened"
    );
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        n,
        "a request was retried on the target that failed it"
    );
}

#[tokio::test]
async fn requests_with_a_body_or_unsafe_methods_are_never_retried_after_sending() {
    let bad = upstream::failing(503).await;
    let good = upstream::echo().await;
    let gw = gateway(&weighted_config(
        &targets(&[bad.addr, good.addr]),
        "    retries: {attempts: 2, on: [503, reset, timeout], backoff: {base: 1ms, max: 2ms}, budget: {ratio: 1.0, min_retries: 100}}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let c = client::new();
    let url = gw.url("/w");
    for (method, body) in [("POST", "payload"), ("PUT", "payload"), ("POST", "")] {
        let (bad0, good0) = (bad.hits(), good.hits());
        let mut statuses = Vec::new();
        for _ in 0..10 {
            let r = fetch(&c, request(method, &url, &[], body)).await;
            statuses.push(r.status.as_u16());
        }
        let (b, g) = (bad.hits() - bad0, good.hits() - good0);
        assert_eq!(
            b + g,
            10,
            "{method} {body:?}: every request sent exactly once"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 503).count(),
            b,
            "{method} {body:?}: the 503s reach the client"
        );
        assert_eq!(b, 5, "{method} {body:?}: {statuses:?}");
    }
    // The same route retries a bodiless GET.
    for _ in 0..4 {
        assert_eq!(get_with(&c, &url, &[]).await.status, 200);
    }
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_target_even_with_a_body() {
    let refusing = upstream::closed_port().await;
    let good = upstream::echo().await;
    let gw = gateway(&weighted_config(
        &targets(&[refusing, good.addr]),
        "    retries: {attempts: 1, on: [connect_failure], backoff: {base: 1ms, max: 2ms}, budget: {ratio: 1.0, min_retries: 100}}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let c = client::new();
    let payload = "x".repeat(10_000);
    for method in ["GET", "POST", "POST", "PUT"] {
        for _ in 0..4 {
            let body = if method == "GET" {
                ""
            } else {
                payload.as_str()
            };
            let r = fetch(&c, request(method, &gw.url("/cf"), &[], body.to_string())).await;
            assert_eq!(r.status, 200, "{method}: {}", r.text());
            // The request had never been sent, so even a body is intact.
            assert_eq!(r.json()["body_len"], body.len());
        }
    }
    assert_eq!(good.hits(), 16);
}

#[tokio::test]
async fn retry_budget_caps_retries_when_every_target_fails() {
    let a = upstream::failing(503).await;
    let b = upstream::failing(503).await;
    let gw = gateway(&weighted_config(
        &targets(&[a.addr, b.addr]),
        "    retries: {attempts: 3, on: [503], backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0.2, min_retries: 5}}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let c = client::new();
    let n = 200;
    for _ in 0..n {
        let r = get_with(&c, &gw.url("/b"), &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (503, "failing"),
            "the upstream's answer is passed on once retries stop"
        );
    }
    let hits = a.hits() + b.hits();
    // Without a budget: 4 attempts each, 800 hits. With it: at most 20% of the
    // requests plus the reserve of 5 (and a little slack for rounding).
    let max = n + n / 5 + 5 + 2;
    assert!(
        hits > n && hits <= max,
        "{hits} upstream hits for {n} requests (expected {}..={max})",
        n + 1
    );
}

#[tokio::test]
async fn connect_timeout_gives_502_and_is_retried_on_another_target() {
    let (hole, _listener, _fillers) = blackhole().await;
    let gw = gateway(&weighted_config(
        &targets(&[hole]),
        "    timeouts: {connect: 200ms}\n    retries: {attempts: 0}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let r = client::get(&gw.url("/ct")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], "upstream_unreachable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{v}"
    );

    let good = upstream::fixed(200, "good").await;
    let gw = gateway(&weighted_config(
        &targets(&[hole, good.addr]),
        "    timeouts: {connect: 200ms}\n    retries: {attempts: 1, on: [connect_failure], backoff: {base: 1ms, max: 2ms}}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let c = client::new();
    for _ in 0..4 {
        let r = get_with(&c, &gw.url("/ct"), &[]).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "good"));
    }
}

#[tokio::test]
async fn response_header_timeout_gives_504_or_retries_another_target() {
    let slow = upstream::slow(Duration::from_secs(5)).await;
    let gw = gateway(&weighted_config(
        &targets(&[slow.addr]),
        "    timeouts: {response_header: 200ms}\n    retries: {attempts: 0}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let r = client::get(&gw.url("/rt")).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");

    let quick = upstream::fixed(200, "quick").await;
    let gw = gateway(&weighted_config(
        &targets(&[slow.addr, quick.addr]),
        "    timeouts: {response_header: 200ms}\n    retries: {attempts: 1, on: [timeout], backoff: {base: 1ms, max: 2ms}}\n    outlier_detection: {consecutive_failures: 0}\n",
    ))
    .await;
    let c = client::new();
    for _ in 0..4 {
        let r = get_with(&c, &gw.url("/rt"), &[]).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "quick"));
    }
    assert_eq!(quick.hits(), 4);
}

#[tokio::test]
async fn sequential_requests_reuse_pooled_upstream_connections() {
    let up = upstream::fixed(200, "pooled").await;
    let gw = gateway(&weighted_config(&targets(&[up.addr]), "")).await;
    for _ in 0..50 {
        // A new client connection each time: reuse is on the upstream side.
        let r = client::get(&gw.url("/pool")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(up.hits(), 50);
    assert!(
        up.connections() <= 3,
        "{} upstream connections for 50 sequential requests",
        up.connections()
    );
}
