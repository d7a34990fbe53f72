//! Rate limits against a real `redis-server` (started by the test on a free
//! port): three gateways sharing one limit in strict and hybrid mode, and
//! Redis killed and restarted under fail_open and fail_closed. No
//! assertion is about timing; every loop is bounded.

use super::{admitted, get};
use crate::support::metrics::scrape;
use crate::support::redis::RedisServer;
use crate::support::{gateway, upstream, TestGateway};
use std::time::Duration;

fn redis_config(redis: &str, backend: &str, extra_redis: &str, routes: &str) -> String {
    format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{{address: '{{UP}}'}}]
rate_limiting:
  backend: {backend}
  redis:
    url: {redis}
    timeout: 500ms
    cooldown: 1s
{extra_redis}
routes:
{routes}"#
    )
}

async fn three(cfg: &str, up: std::net::SocketAddr) -> Vec<TestGateway> {
    let cfg = cfg.replace("{UP}", &up.to_string());
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(gateway(&cfg).await);
    }
    v
}

#[tokio::test]
async fn strict_redis_limits_are_exact_across_three_instances() {
    let redis = RedisServer::start().await;
    let up = upstream::echo().await;
    let cfg = redis_config(
        &redis.url(),
        "redis",
        "",
        r#"  - name: api
    match: {path_prefix: /}
    policies:
      - rate_limit:
          limits:
            - {name: daily, quota: 20, window: day}
            - {name: sliding, quota: 1000, sliding: 1m}
            - {name: burst, rate: 1000, burst: 500}
    action: {proxy: {upstream: up}}
"#,
    );
    let gws = three(&cfg, up.addr).await;
    let mut ok = 0;
    for i in 0..60 {
        let r = get(&gws[i % 3], "/x", &[]).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => assert!(r.header("retry-after").is_some()),
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!(ok, 20, "one shared count: exactly the quota");
    assert_eq!(up.hits(), 20);
}

#[tokio::test]
async fn hybrid_limits_stay_within_the_documented_bound() {
    let redis = RedisServer::start().await;
    let up = upstream::echo().await;
    const QUOTA: usize = 60;
    const BATCH: usize = 5;
    let cfg = redis_config(
        &redis.url(),
        "hybrid",
        &format!("    batch: {BATCH}"),
        &format!(
            r#"  - name: api
    match: {{path_prefix: /}}
    policies:
      - rate_limit:
          limits: [{{name: daily, quota: {QUOTA}, window: day}}]
    action: {{proxy: {{upstream: up}}}}
"#
        ),
    );
    let gws = three(&cfg, up.addr).await;
    let mut ok = 0;
    // Enough requests to exhaust the quota many times over; a short pause
    // now and then lets the background syncs land.
    for i in 0..400 {
        if admitted(&gws[i % 3], "/x", &[], 1).await == 1 {
            ok += 1;
        }
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let bound = 3 * BATCH;
    eprintln!("hybrid: {ok} admitted of quota {QUOTA} (bound ±{bound})");
    assert!(
        ok <= QUOTA + bound,
        "admitted {ok}, more than quota {QUOTA} + N×batch {bound}"
    );
    assert!(
        ok + bound >= QUOTA,
        "admitted {ok}, less than quota {QUOTA} − N×batch {bound}"
    );
}

#[tokio::test]
async fn redis_outage_fail_open_and_fail_closed_then_recovery() {
    let mut redis = RedisServer::start().await;
    let up = upstream::echo().await;
    let cfg = redis_config(
        &redis.url(),
        "redis",
        "    expected_instances: 2\n    failure_threshold: 2",
        r#"  - name: open
    match: {path_prefix: /open}
    policies:
      - rate_limit:
          limits: [{name: daily, quota: 10, window: day, on_error: fail_open}]
    action: {proxy: {upstream: up}}
  - name: closed
    match: {path_prefix: /closed}
    policies:
      - rate_limit:
          limits: [{name: daily, quota: 100, window: day, on_error: fail_closed}]
    action: {proxy: {upstream: up}}
  - name: hybrid
    match: {path_prefix: /hybrid}
    policies:
      - rate_limit:
          limits: [{name: daily, quota: 1000, window: day, backend: hybrid, on_error: fail_closed}]
    action: {proxy: {upstream: up}}
"#,
    )
    .replace("{UP}", &up.addr.to_string());
    let gw = gateway(&cfg).await;
    assert_eq!(admitted(&gw, "/open", &[], 2).await, 2);
    assert_eq!(get(&gw, "/closed", &[]).await.status, 200);
    assert_eq!(get(&gw, "/hybrid", &[]).await.status, 200);

    redis.kill();
    // fail_open: the local fallback allows quota / expected_instances = 5.
    assert_eq!(admitted(&gw, "/open", &[], 12).await, 5);
    // fail_closed: 503 limiter_unavailable, answered every time.
    for _ in 0..10 {
        let r = get(&gw, "/closed", &[]).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["code"], "limiter_unavailable");
    }
    // Hybrid fails closed once the breaker knows Redis is down (bounded).
    let mut saw_503 = false;
    for _ in 0..50 {
        let r = get(&gw, "/hybrid", &[]).await;
        assert!(matches!(r.status.as_u16(), 200 | 429 | 503), "{}", r.status);
        if r.status == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "hybrid never noticed the outage");
    let m = scrape(gw.running.admin_addr(), None).await;
    assert!(
        m.value(
            "portico_rate_limit_decisions_total",
            &[("route", "open"), ("result", "fail_open")]
        ) >= 12.0
    );
    assert!(
        m.value(
            "portico_rate_limit_decisions_total",
            &[("route", "closed"), ("result", "fail_closed")]
        ) >= 10.0
    );

    // Redis comes back (empty): recovery is automatic after the cooldown.
    redis.restart().await;
    let mut recovered = false;
    for _ in 0..200 {
        if get(&gw, "/closed", &[]).await.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "fail_closed limit never recovered");
    // And the Redis count is used again: 10 per day from an empty Redis.
    assert_eq!(admitted(&gw, "/open", &[], 12).await, 10);
}
