//! The upstream connection pool through a real gateway: `pool.max_idle`
//! (connections beyond it are closed when their request ends; `0` disables
//! reuse) and `pool.idle_timeout` (an idle connection is closed by the
//! sweep). Counted where it shows: the connections a test upstream accepts
//! and sees closed, and the pool as `/upstreams` reports it. No timing
//! assertion: every wait is for a state, and bounded.

use super::support::metrics::admin_get;
use super::support::{client, gateway, simple_config};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// An upstream that counts connections accepted and closed (by the peer),
/// and holds each request until the test lets it go when `gated`.
struct Counted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    hits: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Counted {
    async fn start(gated: bool) -> Counted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let (a, c, h, g) = (accepted.clone(), closed.clone(), hits.clone(), gate.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (c, h, g) = (c.clone(), h.clone(), g.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let g = g.clone();
                        async move {
                            if gated {
                                // Bounded: a test that never opens the
                                // gate fails, not hangs.
                                if let Ok(Ok(p)) =
                                    tokio::time::timeout(Duration::from_secs(10), g.acquire()).await
                                {
                                    p.forget();
                                }
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"pooled",
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Counted {
            addr,
            accepted,
            closed,
            hits,
            gate,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections the gateway holds open now.
    fn open(&self) -> usize {
        self.accepted() - self.closed.load(Ordering::SeqCst)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Upstream `up` (one target) with `pool` settings, a catch-all proxy
/// route and an admin listener.
fn config(up: SocketAddr, pool: &str) -> String {
    simple_config(
        &[up],
        &format!("    pool: {pool}\n"),
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ) + "admin:\n  address: 127.0.0.1:0\n"
}

/// The upstream's one endpoint as `/upstreams` shows it.
async fn endpoint(admin: SocketAddr) -> Value {
    let v = admin_get(admin, "/upstreams", None).await.json();
    v["upstreams"][0]["targets"][0]["endpoints"][0].clone()
}

/// Polls until `cond` holds for the gateway's pool and the upstream's
/// connections; panics with the last view after 5 s.
async fn wait_for(
    admin: SocketAddr,
    up: &Counted,
    what: &str,
    mut cond: impl FnMut(&Value, &Counted) -> bool,
) {
    let mut last = Value::Null;
    for _ in 0..250 {
        last = endpoint(admin).await;
        if cond(&last, up) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "never {what}: endpoint {last}, upstream open {}, accepted {}",
        up.open(),
        up.accepted()
    );
}

/// `n` requests in flight at once: each is held at the upstream until all
/// `n` have arrived (so each needs a connection of its own), then all are
/// answered.
async fn concurrent(gw: &super::support::TestGateway, up: &Counted, n: usize) {
    let before = up.hits();
    let url = gw.url("/x");
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client::get(&url).await })
        })
        .collect();
    assert!(
        super::support::eventually(Duration::from_secs(5), || up.hits() == before + n).await,
        "{} of {n} requests arrived",
        up.hits() - before
    );
    up.gate.add_permits(n);
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "pooled"));
    }
}

#[tokio::test]
async fn max_idle_bounds_the_connections_kept() {
    let up = Counted::start(true).await;
    let gw = gateway(&config(up.addr, "{max_idle: 2}")).await;
    let admin = gw.running.admin_addr();

    concurrent(&gw, &up, 4).await;
    assert_eq!(up.accepted(), 4);
    // Once every request is over, two connections are kept idle and the
    // other two were closed.
    wait_for(admin, &up, "2 kept, 2 closed", |e, up| {
        e["in_flight"] == 0 && e["idle_connections"] == 2 && up.open() == 2
    })
    .await;

    // Four at once again: the two idle ones are reused, two are new.
    concurrent(&gw, &up, 4).await;
    assert_eq!(up.accepted(), 6, "two reused, two new");
    wait_for(admin, &up, "2 kept, 2 closed", |e, up| {
        e["in_flight"] == 0 && e["idle_connections"] == 2 && up.open() == 2
    })
    .await;
}

#[tokio::test]
async fn max_idle_zero_opens_a_connection_per_request() {
    let up = Counted::start(false).await;
    let gw = gateway(&config(up.addr, "{max_idle: 0}")).await;
    let admin = gw.running.admin_addr();
    for i in 1..=3 {
        let r = client::get(&gw.url("/x")).await;
        assert_eq!(r.status, 200);
        assert_eq!(up.accepted(), i, "request {i} opened its own connection");
        wait_for(admin, &up, "closed after its request", |e, up| {
            e["in_flight"] == 0 && e["idle_connections"] == 0 && up.open() == 0
        })
        .await;
    }
}

#[tokio::test]
async fn idle_connections_are_reused_until_idle_timeout_closes_them() {
    // Control: a long idle timeout, so the one connection is reused.
    let up = Counted::start(false).await;
    let gw = gateway(&config(up.addr, "{idle_timeout: 60s}")).await;
    let admin = gw.running.admin_addr();
    for _ in 0..3 {
        assert_eq!(client::get(&gw.url("/x")).await.status, 200);
        wait_for(admin, &up, "back in the pool", |e, _| {
            e["in_flight"] == 0 && e["idle_connections"] == 1
        })
        .await;
    }
    assert_eq!(up.accepted(), 1);
    assert_eq!(up.open(), 1);

    // 200 ms: the sweep (every 100 ms at least) closes the idle
    // connection, and the next request needs a new one.
    let up = Counted::start(false).await;
    let gw = gateway(&config(up.addr, "{idle_timeout: 200ms}")).await;
    let admin = gw.running.admin_addr();
    assert_eq!(client::get(&gw.url("/x")).await.status, 200);
    assert_eq!(up.accepted(), 1);
    wait_for(admin, &up, "closed by the idle timeout", |e, up| {
        e["in_flight"] == 0 && e["idle_connections"] == 0 && up.open() == 0
    })
    .await;
    assert_eq!(client::get(&gw.url("/x")).await.status, 200);
    assert_eq!(up.accepted(), 2, "a new connection after the eviction");
}
