//! Load shedding and upstream protection (docs/overload.md), through a real
//! gateway: concurrency limits with their queue, priority classes, adaptive
//! concurrency and the circuit breaker. Upstreams are held with a gate (a
//! semaphore the test opens) rather than timed, and every wait is a bounded
//! poll; the assertions are on counts and states, never on durations.

use super::support::metrics::{admin_get, scrape};
use super::support::upstream::{self, response, TestUpstream};
use super::support::{client, eventually, gateway, TestGateway};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(10);

/// An upstream whose requests wait until the test lets them through.
async fn gated() -> (TestUpstream, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let up = upstream::start(move |_req| {
        let g = g.clone();
        async move {
            g.acquire().await.expect("gate").forget();
            response(200, "through")
        }
    })
    .await;
    (up, gate)
}

fn config(up: SocketAddr, top: &str, upstream_extra: &str, routes: &str) -> String {
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\n{top}upstreams:\n  - name: up\n    targets: [{{address: '{up}'}}]\n    retries: {{attempts: 0}}\n{upstream_extra}routes:\n{routes}"
    )
}

fn get(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// Sends a request in the background.
fn spawn_get(
    gw: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
) -> tokio::task::JoinHandle<client::Reply> {
    let req = get(gw, path, headers);
    tokio::spawn(client::send(req))
}

fn assert_overloaded(r: &client::Reply, retry_after: &str) {
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "overloaded", "{}", r.text());
    assert_eq!(r.header("retry-after"), Some(retry_after));
    assert_eq!(r.header("content-type"), Some("application/json"));
}

async fn wait_hits(up: &TestUpstream, n: usize) {
    assert!(
        eventually(WAIT, || up.hits() >= n).await,
        "upstream saw {} of {n} requests",
        up.hits()
    );
}

#[tokio::test]
async fn route_limit_serves_n_in_flight_and_q_queued_and_sheds_the_rest() {
    let (up, gate) = gated().await;
    let gw = gateway(&config(
        up.addr,
        "",
        "",
        "  - name: limited\n    concurrency: {max_concurrent: 2, queue: 2, queue_timeout: 30s, retry_after: 3s}\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let tasks: Vec<_> = (0..6).map(|_| spawn_get(&gw, "/x", &[])).collect();
    wait_hits(&up, 2).await;
    // Two in flight, two queued: the other two are refused at once.
    let admin = gw.running.admin_addr();
    assert!(
        eventually(WAIT, || tasks.iter().filter(|t| t.is_finished()).count()
            == 2)
        .await,
        "two requests are shed"
    );
    let m = scrape(admin, None).await;
    let labels = [("scope", "route"), ("route", "limited")];
    assert_eq!(m.value("portico_concurrency_in_flight", &labels), 2.0);
    assert_eq!(m.value("portico_concurrency_queued", &labels), 2.0);
    gate.add_permits(100);
    let mut ok = 0;
    let mut shed = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 200 {
            ok += 1;
        } else {
            assert_overloaded(&r, "3");
            shed += 1;
        }
    }
    assert_eq!((ok, shed), (4, 2));
    assert_eq!(up.hits(), 4, "shed requests never reach the upstream");
    let m = scrape(admin, None).await;
    let shed_labels = [
        ("route", "limited"),
        ("priority", "default"),
        ("scope", "route"),
        ("reason", "rejected"),
    ];
    assert_eq!(m.value("portico_requests_shed_total", &shed_labels), 2.0);
    assert_eq!(
        m.value("portico_concurrency_in_flight", &labels),
        0.0,
        "slots are released with the response"
    );
    let (_, _, waited) = m.histogram("portico_queue_wait_seconds", &[("route", "limited")]);
    assert_eq!(waited, 2.0, "two requests waited in the queue");
}

#[tokio::test]
async fn a_queued_request_times_out_with_overloaded() {
    let (up, gate) = gated().await;
    let gw = gateway(&config(
        up.addr,
        "overload: {max_concurrent: 1, queue: 4, queue_timeout: 100ms}\n",
        "",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let first = spawn_get(&gw, "/a", &[]);
    wait_hits(&up, 1).await;
    let r = client::send(get(&gw, "/b", &[])).await;
    assert_overloaded(&r, "1");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no slot freed in time"));
    let m = scrape(gw.running.admin_addr(), None).await;
    let labels = [
        ("route", "all"),
        ("priority", "default"),
        ("scope", "global"),
        ("reason", "queue_timeout"),
    ];
    assert_eq!(m.value("portico_requests_shed_total", &labels), 1.0);
    gate.add_permits(10);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn the_global_limit_spans_routes_and_a_route_limit_only_its_route() {
    let (up, gate) = gated().await;
    let gw = gateway(&config(
        up.addr,
        "overload: {max_concurrent: 2}\n",
        "",
        "  - name: a\n    match: {path_prefix: /a}\n    action: {proxy: {upstream: up}}\n  - name: b\n    match: {path_prefix: /b}\n    concurrency: {max_concurrent: 1}\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let b1 = spawn_get(&gw, "/b", &[]);
    wait_hits(&up, 1).await;
    let r = client::send(get(&gw, "/b", &[])).await;
    assert_overloaded(&r, "1");
    assert!(r.text().contains("this route is at its concurrency limit"));
    // Route `a` has no limit of its own: it takes the gateway's last slot...
    let a1 = spawn_get(&gw, "/a", &[]);
    wait_hits(&up, 2).await;
    // ... after which the gateway is full for every route.
    let r = client::send(get(&gw, "/a", &[])).await;
    assert_overloaded(&r, "1");
    assert!(r.text().contains("the gateway is at its concurrency limit"));
    gate.add_permits(10);
    assert_eq!(b1.await.unwrap().status, 200);
    assert_eq!(a1.await.unwrap().status, 200);
    // Slots came back: both routes serve again.
    assert_eq!(client::send(get(&gw, "/a", &[])).await.status, 200);
    assert_eq!(client::send(get(&gw, "/b", &[])).await.status, 200);
    assert_eq!(up.hits(), 4);
}

const PRIORITIES: &str = "priorities:\n  classes:\n    - {name: high}\n    - {name: low, share: 0.5}\n  header: x-priority\n";

#[tokio::test]
async fn under_overload_high_priority_is_served_while_low_priority_is_shed() {
    let up = upstream::slow(Duration::from_millis(20)).await;
    let gw = Arc::new(
        gateway(&config(
            up.addr,
            &format!("{PRIORITIES}  trusted_peers: [127.0.0.1]\noverload: {{max_concurrent: 8, queue: 8, queue_timeout: 5s}}\n"),
            "",
            "  - name: all\n    action: {proxy: {upstream: up}}\n",
        ))
        .await,
    );
    let low_ok = Arc::new(AtomicUsize::new(0));
    let low_shed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // 32 low-priority clients, 20 requests each, far beyond the limit ...
    for _ in 0..32 {
        let (gw, ok, shed) = (gw.clone(), low_ok.clone(), low_shed.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let r = client::send(get(&gw, "/low", &[("x-priority", "low")])).await;
                if r.status == 200 {
                    ok.fetch_add(1, SeqCst);
                } else {
                    assert_overloaded(&r, "1");
                    shed.fetch_add(1, SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }));
    }
    // ... while 4 high-priority clients send 50 requests each.
    let high_ok = Arc::new(AtomicUsize::new(0));
    let mut high = Vec::new();
    for _ in 0..4 {
        let (gw, ok) = (gw.clone(), high_ok.clone());
        high.push(tokio::spawn(async move {
            for _ in 0..50 {
                let r = client::send(get(&gw, "/high", &[("x-priority", "high")])).await;
                if r.status == 200 {
                    ok.fetch_add(1, SeqCst);
                }
            }
        }));
    }
    for t in high {
        t.await.unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (h, lo, ls) = (
        high_ok.load(SeqCst),
        low_ok.load(SeqCst),
        low_shed.load(SeqCst),
    );
    assert!(h * 100 >= 200 * 99, "high priority served {h} of 200");
    assert!(ls > 0, "low priority is shed ({lo} served)");
    assert!(lo > 0, "low priority still gets its share ({ls} shed)");
    let m = scrape(gw.running.admin_addr(), None).await;
    let shed: f64 = ["rejected", "evicted", "queue_timeout"]
        .iter()
        .map(|r| {
            m.find(
                "portico_requests_shed_total",
                &[
                    ("route", "all"),
                    ("priority", "low"),
                    ("scope", "global"),
                    ("reason", r),
                ],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(shed as usize, ls);
    assert!(m
        .find(
            "portico_requests_shed_total",
            &[
                ("route", "all"),
                ("priority", "high"),
                ("scope", "global"),
                ("reason", "rejected")
            ]
        )
        .is_none());
}

#[tokio::test]
async fn the_priority_header_counts_only_from_trusted_peers_and_routes_set_a_class() {
    for (trusted, high_served) in [("127.0.0.1/32", true), ("10.0.0.0/8", false)] {
        let (up, gate) = gated().await;
        // max 2: `high` may hold 2 slots, `low` (the default) 1.
        let gw = gateway(&config(
            up.addr,
            &format!("{PRIORITIES}  trusted_peers: ['{trusted}']\noverload: {{max_concurrent: 2}}\n"),
            "",
            "  - name: all\n    action: {proxy: {upstream: up}}\n  - name: vip\n    match: {path_prefix: /vip}\n    priority_class: high\n    action: {proxy: {upstream: up}}\n",
        ))
        .await;
        let first = spawn_get(&gw, "/x", &[]);
        wait_hits(&up, 1).await;
        // A second default (low) request finds its class's share used.
        assert_overloaded(&client::send(get(&gw, "/x", &[])).await, "1");
        let claimed = spawn_get(&gw, "/x", &[("x-priority", "high")]);
        if high_served {
            wait_hits(&up, 2).await;
        } else {
            assert_overloaded(&claimed.await.unwrap(), "1");
            // The route's class is not a claim: it always counts.
            let vip = spawn_get(&gw, "/vip", &[]);
            wait_hits(&up, 2).await;
            gate.add_permits(10);
            assert_eq!(vip.await.unwrap().status, 200);
            assert_eq!(first.await.unwrap().status, 200);
            continue;
        }
        gate.add_permits(10);
        assert_eq!(claimed.await.unwrap().status, 200);
        assert_eq!(first.await.unwrap().status, 200);
    }
}

/// An upstream whose delay the test changes, and a load of `clients`
/// looping until `stop` (or a minute) with a pause after a refusal.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: &Arc<TestGateway>, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (gw, stop) = (gw.clone(), stop.clone());
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    while !stop.load(SeqCst) && tokio::time::Instant::now() < deadline {
                        let r = client::send(get(&gw, "/x", &[])).await;
                        if r.status != 200 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

async fn adaptive_limit(admin: SocketAddr) -> u64 {
    let v = admin_get(admin, "/upstreams", None).await.json();
    v["upstreams"][0]["adaptive_concurrency"]["limit"]
        .as_u64()
        .expect("adaptive_concurrency.limit")
}

/// Polls the adaptive limit until `cond` holds (bounded).
async fn limit_until(admin: SocketAddr, what: &str, cond: impl Fn(u64) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = 0;
    while tokio::time::Instant::now() < deadline {
        last = adaptive_limit(admin).await;
        if cond(last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("adaptive limit never {what} (last {last})");
}

async fn adaptive_follows_latency(settings: &str) {
    let delay = Arc::new(AtomicU64::new(5));
    let d = delay.clone();
    let up = upstream::start(move |_req| {
        let ms = d.load(SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            response(200, "ok")
        }
    })
    .await;
    let gw = Arc::new(
        gateway(&config(
            up.addr,
            "",
            &format!("    adaptive_concurrency: {{min_limit: 2, max_limit: 40, initial_limit: 40, window: 50ms, min_samples: 5, {settings}}}\n"),
            "  - name: all\n    action: {proxy: {upstream: up}}\n",
        ))
        .await,
    );
    let admin = gw.running.admin_addr();
    assert_eq!(adaptive_limit(admin).await, 40);
    let load = Load::start(&gw, 30);
    // Fast upstream: latency is learnt, the limit stays high.
    wait_hits(&up, 300).await;
    limit_until(admin, "stayed high", |l| l >= 36).await;
    // Latency x30: the limit falls.
    delay.store(150, SeqCst);
    limit_until(admin, "fell", |l| l <= 20).await;
    // Fast again: it recovers.
    delay.store(5, SeqCst);
    limit_until(admin, "recovered", |l| l >= 36).await;
    load.finish().await;
    let m = scrape(admin, None).await;
    assert!(m.value("portico_upstream_concurrency_limit", &[("upstream", "up")]) >= 36.0);
}

#[tokio::test]
async fn gradient_limit_falls_when_latency_rises_and_recovers_when_it_falls() {
    adaptive_follows_latency("algorithm: gradient, smoothing: 1.0, long_window: 20").await;
}

#[tokio::test]
async fn aimd_limit_falls_when_latency_rises_and_recovers_when_it_falls() {
    adaptive_follows_latency("algorithm: aimd, latency_threshold: 50ms, backoff_ratio: 0.5").await;
}

#[tokio::test]
async fn requests_beyond_the_adaptive_limit_are_refused_at_once() {
    let (up, gate) = gated().await;
    let gw = gateway(&config(
        up.addr,
        "",
        "    adaptive_concurrency: {min_limit: 1, max_limit: 2, initial_limit: 2}\n",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let held: Vec<_> = (0..2).map(|_| spawn_get(&gw, "/x", &[])).collect();
    wait_hits(&up, 2).await;
    let r = client::send(get(&gw, "/x", &[])).await;
    assert_overloaded(&r, "1");
    assert!(r.text().contains("adaptive concurrency limit"));
    gate.add_permits(10);
    for t in held {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let m = scrape(gw.running.admin_addr(), None).await;
    assert_eq!(
        m.value(
            "portico_upstream_concurrency_rejected_total",
            &[("upstream", "up")]
        ),
        1.0
    );
    let labels = [
        ("route", "all"),
        ("priority", "default"),
        ("scope", "upstream"),
        ("reason", "rejected"),
    ];
    assert_eq!(m.value("portico_requests_shed_total", &labels), 1.0);
    assert_eq!(
        m.value(
            "portico_upstream_concurrency_in_flight",
            &[("upstream", "up")]
        ),
        0.0
    );
}

/// An upstream answering with a status the test changes.
async fn switchable(status: u16) -> (TestUpstream, Arc<AtomicU16>) {
    let s = Arc::new(AtomicU16::new(status));
    let s2 = s.clone();
    let up = upstream::start(move |_req| {
        let st = s2.load(SeqCst);
        async move { response(st, "answer") }
    })
    .await;
    (up, s)
}

async fn circuit(admin: SocketAddr) -> serde_json::Value {
    let v = admin_get(admin, "/upstreams", None).await.json();
    v["upstreams"][0]["circuit_breaker"].clone()
}

#[tokio::test]
async fn an_open_circuit_answers_without_touching_the_upstream() {
    let (up, _) = switchable(500).await;
    let gw = gateway(&config(
        up.addr,
        "",
        "    circuit_breaker: {failure_ratio: 0.5, min_requests: 4, window: 1h, open_for: 1h}\n",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let admin = gw.running.admin_addr();
    for _ in 0..4 {
        assert_eq!(client::get(&gw.url("/x")).await.status, 500);
    }
    assert_eq!(circuit(admin).await["state"], "open");
    for _ in 0..5 {
        let r = client::get(&gw.url("/x")).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["code"], "circuit_open");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(retry > 3000, "Retry-After is the time left: {retry}");
    }
    assert_eq!(up.hits(), 4, "no request reached the upstream");
    let m = scrape(admin, None).await;
    let st = |s| {
        m.value(
            "portico_upstream_circuit_state",
            &[("upstream", "up"), ("state", s)],
        )
    };
    assert_eq!((st("closed"), st("open"), st("half_open")), (0.0, 1.0, 0.0));
    assert_eq!(
        m.value(
            "portico_upstream_circuit_rejected_total",
            &[("upstream", "up")]
        ),
        5.0
    );
    assert_eq!(
        m.value(
            "portico_gateway_errors_total",
            &[("code", "circuit_open"), ("source", "gateway")]
        ),
        5.0
    );
}

#[tokio::test]
async fn a_failed_probe_reopens_the_circuit_and_a_successful_one_closes_it() {
    let (up, status) = switchable(502).await;
    let gw = gateway(&config(
        up.addr,
        "",
        "    circuit_breaker: {failure_ratio: 0.5, min_requests: 4, window: 1h, open_for: 300ms, half_open_probes: 1}\n",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let admin = gw.running.admin_addr();
    // Successes alone never open it; then failures pass the ratio.
    assert_eq!(client::get(&gw.url("/x")).await.status, 502);
    status.store(200, SeqCst);
    assert_eq!(client::get(&gw.url("/x")).await.status, 200);
    status.store(502, SeqCst);
    assert_eq!(client::get(&gw.url("/x")).await.status, 502);
    assert_eq!(
        circuit(admin).await["state"],
        "closed",
        "3 requests < min_requests"
    );
    assert_eq!(client::get(&gw.url("/x")).await.status, 502);
    assert_eq!(circuit(admin).await["state"], "open", "3 of 4 failed");
    assert_eq!(up.hits(), 4);

    // Poll until a request gets through: the half-open probe, which fails.
    let probe = poll_past_open(&gw).await;
    assert_eq!(probe, 502);
    assert_eq!(up.hits(), 5, "only the probe reached the upstream");
    assert_eq!(
        circuit(admin).await["state"],
        "open",
        "a failed probe reopens"
    );

    status.store(200, SeqCst);
    let probe = poll_past_open(&gw).await;
    assert_eq!(probe, 200);
    assert_eq!(up.hits(), 6);
    assert_eq!(
        circuit(admin).await["state"],
        "closed",
        "a successful probe closes"
    );
    assert_eq!(client::get(&gw.url("/x")).await.status, 200);

    let m = scrape(admin, None).await;
    let to = |s| {
        m.value(
            "portico_upstream_circuit_transitions_total",
            &[("upstream", "up"), ("to", s)],
        )
    };
    assert_eq!((to("open"), to("half_open"), to("closed")), (2.0, 2.0, 1.0));
}

/// Sends requests (bounded) until one is not answered `circuit_open`;
/// returns its status.
async fn poll_past_open(gw: &TestGateway) -> u16 {
    for _ in 0..200 {
        let r = client::get(&gw.url("/x")).await;
        if r.status != 503 || r.json()["error"]["code"] != "circuit_open" {
            return r.status.as_u16();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the circuit never let a probe through");
}

#[test]
fn configuration_errors_name_their_key() {
    let yaml = "listeners:\n  - name: main\n    address: 127.0.0.1:0\noverload:\n  max_concurrent: 0\npriorities:\n  classes:\n    - {name: high, share: 0.5}\n    - {name: low, share: 0.9}\n  default: nope\nupstreams:\n  - name: up\n    targets: [{address: '127.0.0.1:1'}]\n    circuit_breaker:\n      failure_ratio: 2\n    adaptive_concurrency:\n      algorithm: aimd\n      min_limit: 10\n      max_limit: 5\nroutes:\n  - name: all\n    priority_class: urgent\n    concurrency:\n      max_concurrent: 5\n      queue: 3\n      queue_timeout: 0s\n    action: {proxy: {upstream: up}}\n";
    let loaded = portico::config::parse_str("test.yaml", yaml, |_| None).unwrap();
    let err = match portico::snapshot::compile(&loaded, None) {
        Ok(_) => panic!("compiles"),
        Err(e) => e.to_string(),
    };
    let line_of = |needle: &str| yaml.lines().position(|l| l.contains(needle)).unwrap() + 1;
    for (needle, path, msg) in [
        ("max_concurrent: 0", "overload.max_concurrent", "at least 1"),
        (
            "share: 0.9",
            "priorities.classes[1].share",
            "not be more than",
        ),
        (
            "default: nope",
            "priorities.default",
            "no class is named `nope`",
        ),
        (
            "failure_ratio: 2",
            "upstreams[0].circuit_breaker.failure_ratio",
            "at most 1",
        ),
        (
            "max_limit: 5",
            "upstreams[0].adaptive_concurrency.max_limit",
            "at least `min_limit`",
        ),
        (
            "algorithm: aimd",
            "upstreams[0].adaptive_concurrency.latency_threshold",
            "needs a `latency_threshold`",
        ),
        (
            "priority_class: urgent",
            "routes[0].priority_class",
            "no class is named `urgent`",
        ),
        (
            "queue_timeout: 0s",
            "routes[0].concurrency.queue_timeout",
            "more than 0",
        ),
    ] {
        let want = format!("test.yaml:{}:", line_of(needle));
        let found = err
            .lines()
            .any(|l| l.starts_with(&want) && l.contains(&format!(" {path}: ")) && l.contains(msg));
        // A key that is absent is reported at its parent's line.
        let found_anywhere = err
            .lines()
            .any(|l| l.contains(&format!(" {path}: ")) && l.contains(msg));
        assert!(
            found || (path.ends_with("latency_threshold") && found_anywhere),
            "{path} at {want} `{msg}` not in:\n{err}"
        );
    }
}

#[tokio::test]
async fn a_consumers_group_sets_its_priority_class() {
    const ALICE: &str = "alice-key-0123456789abcdef";
    const BOB: &str = "bob-key-0123456789abcdef00";
    const CAROL: &str = "carol-key-0123456789abcdef";
    let sha = |k: &str| portico::auth::sha256_hex(k.as_bytes());
    let (up, gate) = gated().await;
    // max 4: `critical` may hold 4 slots, `high` 3, `low` (the default) 2.
    // The header is trusted from 10/8 only: not from the test's loopback.
    let top = format!(
        r#"priorities:
  classes:
    - {{name: critical, groups: [ops]}}
    - {{name: high, share: 0.75, groups: [gold]}}
    - {{name: low, share: 0.5, groups: [free-tier]}}
  header: x-priority
  trusted_peers: ['10.0.0.0/8']
overload: {{max_concurrent: 4}}
consumers:
  - id: alice
    groups: [gold]
    credentials: {{api_keys: [{{sha256: {a}}}]}}
  - id: bob
    groups: [free-tier]
    credentials: {{api_keys: [{{sha256: {b}}}]}}
  - id: carol
    groups: [free-tier, ops]
    credentials: {{api_keys: [{{sha256: {c}}}]}}
"#,
        a = sha(ALICE),
        b = sha(BOB),
        c = sha(CAROL)
    );
    let routes = "  - name: all\n    policies:\n      - auth: {methods: [{api_key: {}}], anonymous: true}\n    action: {proxy: {upstream: up}}\n  - name: vip\n    match: {path_prefix: /vip}\n    priority_class: high\n    policies:\n      - auth: {methods: [{api_key: {}}], anonymous: true}\n    action: {proxy: {upstream: up}}\n";
    let gw = gateway(&config(up.addr, &top, "", routes)).await;
    // Two anonymous requests (the default class, low) hold 2 slots.
    let mut held = vec![spawn_get(&gw, "/x", &[]), spawn_get(&gw, "/x", &[])];
    wait_hits(&up, 2).await;
    // bob's group is in `low`: its share is used up ...
    let bob = [("x-api-key", BOB)];
    assert_overloaded(&client::send(get(&gw, "/x", &bob)).await, "1");
    // ... on a route of class `high` too (the group's class comes first),
    assert_overloaded(&client::send(get(&gw, "/vip", &bob)).await, "1");
    // ... and a class named in the header from an untrusted peer is ignored.
    let bob_claims = [("x-api-key", BOB), ("x-priority", "critical")];
    assert_overloaded(&client::send(get(&gw, "/x", &bob_claims)).await, "1");
    // alice's group is in `high`: a third slot.
    let alice = [("x-api-key", ALICE)];
    held.push(spawn_get(&gw, "/x", &alice));
    wait_hits(&up, 3).await;
    // `high` is full at 3 in flight: alice is not `critical`.
    assert_overloaded(&client::send(get(&gw, "/x", &alice)).await, "1");
    // carol is in free-tier (low) and ops (critical): the highest counts.
    held.push(spawn_get(&gw, "/x", &[("x-api-key", CAROL)]));
    wait_hits(&up, 4).await;
    gate.add_permits(10);
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    // The refusals are counted under the consumers' classes.
    let m = scrape(gw.running.admin_addr(), None).await;
    let by_route = |route: &str, class: &str| {
        m.find(
            "portico_requests_shed_total",
            &[
                ("route", route),
                ("priority", class),
                ("scope", "global"),
                ("reason", "rejected"),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(by_route("all", "low"), 2.0, "bob, twice");
    assert_eq!(by_route("vip", "low"), 1.0, "bob on the high route");
    assert_eq!(by_route("all", "high"), 1.0, "alice's second request");
    assert_eq!(by_route("vip", "high") + by_route("all", "critical"), 0.0);
}
