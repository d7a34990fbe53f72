//! Rate limits against a real `redis-server` (started by the test on a free
//! port): three gateways sharing one limit in strict and hybrid mode, in
//! turn and concurrently; every kind of limit and the request cost at its
//! limit; the counter keys and their TTLs read back from Redis; Redis
//! killed, restarted or hung, under fail_open and fail_closed, with the
//! Redis traffic counted by a relay ([`Tap`]) rather than timed.
//!
//! Gateways take their time from a clock pinned at noon UTC ([`pinned`],
//! [`from_noon`]), so no window rolls over during a test whatever the time
//! it runs, and a frozen clock keeps a breaker's cooldown from passing
//! until the test moves it. No assertion is about timing; every loop is
//! bounded.

use super::{admitted, get, pinned, NOON};
use crate::support::client::Reply;
use crate::support::metrics::scrape;
use crate::support::redis::{RedisServer, Tap};
use crate::support::{gateway_with_clock, upstream, TestGateway};
use portico::ratelimit::Clock;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Real time, shifted so the test starts at [`NOON`]: cooldowns pass as
/// they would, windows cannot roll over.
struct FromNoon(Instant);

impl Clock for FromNoon {
    fn now_us(&self) -> u64 {
        NOON + self.0.elapsed().as_micros() as u64
    }
}

fn from_noon() -> Arc<FromNoon> {
    Arc::new(FromNoon(Instant::now()))
}

/// A gateway with one upstream `up` at `{UP}` and `rate_limiting` on
/// `redis` with `backend`; `extra_redis` adds or overrides keys of
/// `rate_limiting.redis` (indented 4). Defaults: `timeout: 500ms`,
/// `cooldown: 1s`.
fn redis_config(redis: &str, backend: &str, extra_redis: &str, routes: &str) -> String {
    let mut settings = String::new();
    for (key, default) in [("timeout", "500ms"), ("cooldown", "1s")] {
        if !extra_redis.contains(&format!("{key}:")) {
            settings.push_str(&format!("    {key}: {default}\n"));
        }
    }
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
{settings}{extra_redis}
routes:
{routes}"#
    )
}

async fn start(cfg: &str, up: std::net::SocketAddr, clock: Arc<dyn Clock>) -> Arc<TestGateway> {
    let cfg = cfg.replace("{UP}", &up.to_string());
    Arc::new(gateway_with_clock(&cfg, clock).await)
}

/// Three instances of one configuration sharing one clock.
async fn three(
    cfg: &str,
    up: std::net::SocketAddr,
    clock: Arc<dyn Clock>,
) -> Vec<Arc<TestGateway>> {
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(start(cfg, up, clock.clone()).await);
    }
    v
}

/// `portico_rate_limit_decisions_total{route,result}`.
async fn decisions(gw: &TestGateway, route: &str, result: &str) -> u64 {
    scrape(gw.running.admin_addr(), None)
        .await
        .find(
            "portico_rate_limit_decisions_total",
            &[("route", route), ("result", result)],
        )
        .unwrap_or(0.0) as u64
}

fn retry_after(r: &Reply) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a 429 without Retry-After: {:?}", r.headers))
}

/// One client: at most `max` GETs of `path`, counting the 200s. With
/// `until_exhausted` (hybrid limits), it stops at a refusal whose
/// `Retry-After` is over a second — Redis said the limit is used up — and
/// pauses briefly after a shorter one (waiting for the next batch).
async fn client_loop(
    gw: Arc<TestGateway>,
    path: &'static str,
    max: usize,
    until_exhausted: bool,
) -> usize {
    let mut ok = 0;
    for _ in 0..max {
        let r = get(&gw, path, &[]).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 if until_exhausted && retry_after(&r) > 1 => break,
            429 if until_exhausted => tokio::time::sleep(Duration::from_millis(5)).await,
            429 => {
                retry_after(&r);
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    ok
}

/// `clients` clients per gateway, all at once; the total admitted.
async fn all_at_once(
    gws: &[Arc<TestGateway>],
    clients: usize,
    max: usize,
    until_exhausted: bool,
) -> usize {
    let mut tasks = Vec::new();
    for gw in gws {
        for _ in 0..clients {
            tasks.push(tokio::spawn(client_loop(
                gw.clone(),
                "/x",
                max,
                until_exhausted,
            )));
        }
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.expect("client");
    }
    ok
}

/// The keys whose hash tag is `{portico:limit:route=NAME|}` (limits keyed
/// by `route`).
async fn route_keys(redis: &RedisServer, route: &str) -> Vec<(String, i64)> {
    let tag = format!("{{portico:limit:route={route}|}}:");
    redis
        .keys_with_ttl()
        .await
        .into_iter()
        .filter(|(k, _)| k.starts_with(&tag))
        .collect()
}

/// Polls (bounded) until `route` has a counter key in Redis; its count.
async fn wait_for_count(redis: &RedisServer, route: &str, at_least: i64) -> i64 {
    let mut last = 0;
    for _ in 0..200 {
        if let Some((k, _)) = route_keys(redis, route).await.first() {
            last = redis.count(k).await;
            if last >= at_least {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("route {route}: Redis count {last}, never reached {at_least}");
}

// ---------------------------------------------------------------- strict

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
    let gws = three(&cfg, up.addr, pinned()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_limits_admit_exactly_the_quota_under_concurrency_across_three_instances() {
    let redis = RedisServer::start().await;
    let up = upstream::echo().await;
    const QUOTA: usize = 50;
    let cfg = redis_config(
        &redis.url(),
        "redis",
        "",
        &format!(
            r#"  - name: api
    match: {{path_prefix: /}}
    policies:
      - rate_limit:
          key: route
          limits: [{{name: daily, quota: {QUOTA}, window: day}}]
    action: {{proxy: {{upstream: up}}}}
"#
        ),
    );
    let gws = three(&cfg, up.addr, pinned()).await;
    // 3 instances × 4 clients × 10 requests, all at once: 120 for 50.
    let ok = all_at_once(&gws, 4, 10, false).await;
    assert_eq!(ok, QUOTA, "one shared count: exactly the quota");
    assert_eq!(
        up.hits(),
        QUOTA,
        "refused requests never reach the upstream"
    );
    let keys = route_keys(&redis, "api").await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(redis.count(&keys[0].0).await, QUOTA as i64);
}

#[tokio::test]
async fn strict_throttles_and_sliding_windows_refuse_at_their_limits() {
    let redis = RedisServer::start().await;
    let up = upstream::echo().await;
    let cfg = redis_config(
        &redis.url(),
        "redis",
        "",
        r#"  - name: throttle
    match: {path_prefix: /throttle}
    policies:
      - rate_limit:
          limits: [{name: burst, rate: 1, per: 1h, burst: 3}]
    action: {proxy: {upstream: up}}
  - name: sliding
    match: {path_prefix: /sliding}
    policies:
      - rate_limit:
          limits: [{name: sliding, quota: 4, sliding: 1h}]
    action: {proxy: {upstream: up}}
"#,
    );
    let gws = three(&cfg, up.addr, pinned()).await;
    let mut ok = [0, 0];
    let mut refused = [Vec::new(), Vec::new()];
    for i in 0..24 {
        let which = i % 2;
        let path = ["/throttle", "/sliding"][which];
        let r = get(&gws[i % 3], path, &[]).await;
        match r.status.as_u16() {
            200 => ok[which] += 1,
            429 => refused[which].push(r),
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    // GCRA: the burst of 3 at once, then nothing for an hour — one unit
    // comes back every `per / rate`; the clock stands still.
    assert_eq!(ok[0], 3, "the throttle's burst");
    for r in &refused[0] {
        assert_eq!(r.header("retry-after"), Some("3600"));
        assert_eq!(r.header("ratelimit-policy"), Some("\"burst\";q=3;w=10800"));
        assert!(r
            .header("ratelimit")
            .unwrap()
            .starts_with("\"burst\";r=0;t="));
        assert_eq!(r.json()["error"]["code"], "rate_limited");
    }
    // Sliding window: exactly the quota from an empty Redis.
    assert_eq!(ok[1], 4, "the sliding window's quota");
    for r in &refused[1] {
        assert!((1..=7200).contains(&retry_after(r)), "{:?}", r.headers);
        assert!(r
            .header("ratelimit")
            .unwrap()
            .starts_with("\"sliding\";r=0;t="));
    }
    assert_eq!(up.hits(), 7);
}

#[tokio::test]
async fn costs_count_in_redis_in_strict_and_hybrid_mode() {
    let redis = RedisServer::start().await;
    let up = upstream::echo().await;
    const BATCH: usize = 10;
    let cfg = redis_config(
        &redis.url(),
        "redis",
        "",
        &format!(
            r#"  - name: strict
    match: {{path_prefix: /strict}}
    policies:
      - rate_limit:
          key: route
          cost: 5
          limits: [{{name: units, quota: 12, window: hour}}]
    action: {{proxy: {{upstream: up}}}}
  - name: hybrid
    match: {{path_prefix: /x}}
    policies:
      - rate_limit:
          key: route
          cost: 5
          limits: [{{name: units, quota: 20, window: day, backend: hybrid, batch: {BATCH}}}]
    action: {{proxy: {{upstream: up}}}}
"#
        ),
    );
    let gw = start(&cfg, up.addr, pinned()).await;
    // Strict: 5 units each out of 12 — two requests, 10 units in Redis.
    assert_eq!(admitted(&gw, "/strict", &[], 4).await, 2);
    let keys = route_keys(&redis, "strict").await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(redis.count(&keys[0].0).await, 10);
    // Hybrid: 20 units are 4 requests, give or take one instance's batch
    // (the documented bound with N = 1): 10 to 30 units, 2 to 6 requests.
    // Counting each request as one unit would admit 20 or more.
    let ok = client_loop(gw.clone(), "/x", 100, true).await;
    assert!(
        (2..=6).contains(&ok),
        "{ok} requests of cost 5 admitted by a hybrid quota of 20 (batch {BATCH})"
    );
    // Redis learns every admitted unit (syncs run in the background).
    let counted = wait_for_count(&redis, "hybrid", 5 * ok as i64).await;
    assert!(
        counted <= 20 + BATCH as i64,
        "Redis counted {counted} units: more than quota + batch"
    );
}

// ---------------------------------------------------------------- keys

#[tokio::test]
async fn counter_keys_carry_a_ttl_bounded_by_their_window_and_expire() {
    let redis = RedisServer::start().await;
    let up = upstream::echo().await;
    let route = |name: &str, limit: &str| {
        format!(
            r#"  - name: {name}
    match: {{path_prefix: /{name}}}
    policies:
      - rate_limit:
          key: route
          limits: [{limit}]
    action: {{proxy: {{upstream: up}}}}
"#
        )
    };
    let routes = [
        route("day", "{name: q, quota: 100, window: day}"),
        route("sliding", "{name: q, quota: 100, sliding: 1m}"),
        route("gcra", "{name: q, rate: 10, per: 1s, burst: 1}"),
        route(
            "hybrid",
            "{name: q, quota: 100, window: hour, backend: hybrid}",
        ),
    ]
    .concat();
    let gw = start(
        &redis_config(&redis.url(), "redis", "", &routes),
        up.addr,
        pinned(),
    )
    .await;
    for path in ["/day", "/sliding", "/gcra", "/hybrid"] {
        assert_eq!(get(&gw, path, &[]).await.status, 200, "{path}");
    }
    wait_for_count(&redis, "hybrid", 1).await;
    let keys = redis.keys_with_ttl().await;
    assert_eq!(keys.len(), 4, "one counter key per limit: {keys:?}");
    // The clock is at noon: a day window ends in 12 h, an hour window in
    // 1 h; each key lives a minute beyond its window. A sliding window
    // keeps its count for two lengths; a throttle's state until its
    // `tat` (here 100 ms ahead) plus a second.
    const H: i64 = 3_600_000;
    for (name, most) in [
        ("day", 12 * H + 60_000),
        ("sliding", 2 * 60_000 + 60_000),
        ("gcra", 100 + 1_000),
        ("hybrid", H + 60_000),
    ] {
        let k = route_keys(&redis, name).await;
        assert_eq!(k.len(), 1, "{name}: {keys:?}");
        let (key, ttl) = &k[0];
        assert!(
            *ttl > 0 && *ttl <= most,
            "{key}: TTL {ttl} ms, expected 1..={most} (-1 is none)"
        );
    }
    // And Redis does drop them: the throttle's key is gone within its TTL
    // (polled, bounded).
    let mut gone = false;
    for _ in 0..500 {
        if route_keys(&redis, "gcra").await.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the throttle's key never expired");
}

// ---------------------------------------------------------------- hybrid

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_limits_stay_within_the_documented_bound() {
    let redis = RedisServer::start().await;
    let up = upstream::echo().await;
    const QUOTA: usize = 60;
    const BATCH: usize = 5;
    let cfg = redis_config(
        &redis.url(),
        "hybrid",
        &format!("    batch: {BATCH}\n"),
        &format!(
            r#"  - name: api
    match: {{path_prefix: /}}
    policies:
      - rate_limit:
          key: route
          limits: [{{name: daily, quota: {QUOTA}, window: day}}]
    action: {{proxy: {{upstream: up}}}}
"#
        ),
    );
    let gws = three(&cfg, up.addr, pinned()).await;
    // 3 instances × 3 clients at once, each until its instance hears from
    // Redis that the quota is used up (at most 150 requests each).
    let ok = all_at_once(&gws, 3, 150, true).await;
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
    assert_eq!(up.hits(), ok);
    // Redis counted every admitted unit, and the grants never beyond the
    // quota: only credit (at most a batch per instance) can pass it.
    let counted = wait_for_count(&redis, "api", ok as i64).await;
    assert!(counted as usize <= QUOTA + bound, "Redis counted {counted}");
}

#[tokio::test]
async fn hybrid_fail_open_uses_the_divided_local_limit_then_recovers() {
    let mut redis = RedisServer::start().await;
    let up = upstream::echo().await;
    let clock = pinned();
    let cfg = redis_config(
        &redis.url(),
        "hybrid",
        "    expected_instances: 2\n    failure_threshold: 1\n    cooldown: 10s\n    batch: 2\n    on_error: fail_open\n",
        r#"  - name: api
    match: {path_prefix: /}
    policies:
      - rate_limit:
          key: route
          limits: [{name: daily, quota: 10, window: day}]
    action: {proxy: {upstream: up}}
"#,
    );
    let gw = start(&cfg, up.addr, clock.clone()).await;
    assert_eq!(admitted(&gw, "/x", &[], 2).await, 2);
    wait_for_count(&redis, "api", 2).await;

    redis.kill();
    // Hybrid decides from what it holds until a sync fails and opens the
    // breaker; from then on (the clock stands still, so it stays open)
    // every decision is the local fallback's: quota / expected_instances.
    let mut fallback = 0;
    let mut fallback_ok = 0;
    let mut seen = decisions(&gw, "api", "fail_open").await;
    for _ in 0..60 {
        let r = get(&gw, "/x", &[]).await;
        assert!(
            matches!(r.status.as_u16(), 200 | 429),
            "fail_open never answers {}",
            r.status
        );
        let now = decisions(&gw, "api", "fail_open").await;
        if now > seen {
            seen = now;
            fallback += 1;
            fallback_ok += usize::from(r.status == 200);
            if fallback == 12 {
                break;
            }
        } else {
            assert_eq!(fallback, 0, "once open, the breaker stays open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(fallback, 12, "the fallback never took over");
    assert_eq!(fallback_ok, 5, "10 / 2 instances");

    // Redis comes back (empty). The cooldown passes; a sync probes it —
    // the client may first need a failed probe to notice the server is
    // back, so a few rounds (bounded).
    redis.restart().await;
    let mut recovered = false;
    for _ in 0..5 {
        clock.advance(Duration::from_secs(11));
        let r = get(&gw, "/x", &[]).await;
        assert!(matches!(r.status.as_u16(), 200 | 429), "{}", r.status);
        for _ in 0..50 {
            if !route_keys(&redis, "api").await.is_empty() {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if recovered {
            break;
        }
    }
    assert!(recovered, "no sync reached Redis after it came back");
    // Decisions come from Redis allowances again: no more fallback, and
    // the quota counts again in Redis, within one batch.
    let before = decisions(&gw, "api", "fail_open").await;
    let ok = client_loop(gw.clone(), "/x", 60, true).await;
    assert!((1..=10 + 2).contains(&ok), "{ok} admitted after recovery");
    assert_eq!(decisions(&gw, "api", "fail_open").await, before);
    wait_for_count(&redis, "api", 10).await;
}

// ---------------------------------------------------------------- outages

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
    );
    // Real time (the cooldown passes by itself), starting at noon.
    let gw = start(&cfg, up.addr, from_noon()).await;
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
    assert!(decisions(&gw, "open", "fail_open").await >= 12);
    assert!(decisions(&gw, "closed", "fail_closed").await >= 10);

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

#[tokio::test]
async fn a_dead_redis_is_called_failure_threshold_times_then_only_probed() {
    let mut redis = RedisServer::start().await;
    let tap = Tap::forward(redis.addr()).await;
    let up = upstream::echo().await;
    let clock = pinned();
    const THRESHOLD: usize = 3;
    const N: usize = 50;
    let cfg = redis_config(
        &tap.url(),
        "redis",
        &format!("    failure_threshold: {THRESHOLD}\n    cooldown: 1h\n"),
        r#"  - name: api
    match: {path_prefix: /}
    policies:
      - rate_limit:
          limits: [{name: daily, quota: 1000, window: day, on_error: fail_open}]
    action: {proxy: {upstream: up}}
"#,
    );
    let gw = start(&cfg, up.addr, clock.clone()).await;
    assert_eq!(admitted(&gw, "/x", &[], 3).await, 3);
    assert!(tap.script_calls() >= 3, "{:?}", tap.commands());

    redis.kill();
    let (conns, cmds) = (tap.connections(), tap.commands().len());
    assert_eq!(
        admitted(&gw, "/x", &[], N).await,
        N,
        "fail_open: the local fallback decides"
    );
    // Only the first THRESHOLD requests try Redis; each failed call makes
    // the client reconnect at most once (a connect and one retry). The
    // other requests never touch the network. (Plus one reconnect the
    // client may start by itself when its connection drops.)
    let (new_conns, new_cmds) = (tap.connections() - conns, tap.commands().len() - cmds);
    eprintln!("dead Redis: {new_conns} connections, {new_cmds} commands for {N} requests");
    assert!(
        new_conns <= 2 * (THRESHOLD + 1),
        "{new_conns} connection attempts for {N} requests"
    );
    assert!(
        new_cmds <= THRESHOLD,
        "{new_cmds} commands for {N} requests"
    );
    assert_eq!(decisions(&gw, "api", "fail_open").await, N as u64);
    assert_eq!(breaker_openings(&gw), 1);

    // Back, but the breaker is open and the clock stands still: no call.
    redis.restart().await;
    let calls = tap.script_calls();
    assert_eq!(admitted(&gw, "/x", &[], 5).await, 5);
    assert_eq!(
        tap.script_calls(),
        calls,
        "called while the breaker is open"
    );
    // After the cooldown one request probes it; its success closes the
    // breaker and decisions come from Redis again (bounded rounds: the
    // client may first need a failed probe to notice the server is back).
    let allowed = decisions(&gw, "api", "allowed").await;
    let mut recovered = false;
    for _ in 0..5 {
        clock.advance(Duration::from_secs(3601));
        assert_eq!(get(&gw, "/x", &[]).await.status, 200);
        if decisions(&gw, "api", "allowed").await > allowed {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "Redis was never used again");
    assert!(tap.script_calls() > calls);
    assert_eq!(admitted(&gw, "/x", &[], 3).await, 3);
    assert!(decisions(&gw, "api", "allowed").await >= allowed + 4);
}

/// Failures that open the breaker in the hung-Redis tests.
const HUNG_THRESHOLD: usize = 2;
/// Clients sending at once in the hung-Redis tests.
const HUNG_CLIENTS: usize = 4;
/// Calls that can reach a hung Redis: only while the breaker is closed,
/// and at most one per client is in flight when the HUNG_THRESHOLD-th
/// timeout opens it.
const HUNG_CALLS: usize = HUNG_THRESHOLD - 1 + HUNG_CLIENTS;

/// A gateway on the Redis at `url` (200 ms timeout, a cooldown that does
/// not pass: the clock stands still) with a fail_open route `/open` and a
/// fail_closed route `/closed`.
async fn hung_gateway(url: &str, up: std::net::SocketAddr) -> Arc<TestGateway> {
    let cfg = redis_config(
        url,
        "redis",
        &format!("    timeout: 200ms\n    failure_threshold: {HUNG_THRESHOLD}\n    cooldown: 1h\n"),
        r#"  - name: open
    match: {path_prefix: /open}
    policies:
      - rate_limit:
          limits: [{name: daily, quota: 1000, window: day, on_error: fail_open}]
    action: {proxy: {upstream: up}}
  - name: closed
    match: {path_prefix: /closed}
    policies:
      - rate_limit:
          limits: [{name: daily, quota: 1000, window: day, on_error: fail_closed}]
    action: {proxy: {upstream: up}}
"#,
    );
    start(&cfg, up, pinned()).await
}

/// HUNG_CLIENTS clients at once, 10 requests each, alternating `/open`
/// and `/closed`: every one is answered — 200 by the local fallback, 503
/// `limiter_unavailable` — and counted as such. Returns how many were sent.
async fn load_while_redis_hangs(gw: &Arc<TestGateway>) -> usize {
    const EACH: usize = 10;
    let mut tasks = Vec::new();
    for c in 0..HUNG_CLIENTS {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                if (c + i) % 2 == 0 {
                    let r = get(&gw, "/open", &[]).await;
                    assert_eq!(r.status, 200, "fail_open: {}", r.text());
                } else {
                    let r = get(&gw, "/closed", &[]).await;
                    assert_eq!(r.status, 503, "fail_closed: {}", r.text());
                    assert_eq!(r.json()["error"]["code"], "limiter_unavailable");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let n = HUNG_CLIENTS * EACH;
    assert_eq!(decisions(gw, "open", "fail_open").await, n as u64 / 2);
    assert_eq!(decisions(gw, "closed", "fail_closed").await, n as u64 / 2);
    assert_eq!(
        breaker_openings(gw),
        1,
        "the breaker opened, and stayed open"
    );
    n
}

/// How many times the gateway's Redis breaker opened.
fn breaker_openings(gw: &TestGateway) -> u64 {
    let snap = gw.running.shared.snapshot.load();
    let redis = snap
        .limiting
        .runtime
        .redis
        .as_ref()
        .expect("a Redis backend");
    redis
        .breaker
        .opened
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_called_a_bounded_number_of_times() {
    // Greets each connection, then never answers: every call is a command
    // on the wire, which the tap counts.
    let tap = Tap::hung().await;
    let up = upstream::echo().await;
    let gw = hung_gateway(&tap.url(), up.addr).await;
    let n = load_while_redis_hangs(&gw).await;
    let (scripts, conns) = (tap.script_calls(), tap.connections());
    eprintln!("hung Redis: {conns} connections, {scripts} script calls for {n} requests");
    assert!(scripts >= 1, "Redis was never called: {:?}", tap.commands());
    assert!(
        scripts <= HUNG_CALLS,
        "{scripts} script calls for {n} requests"
    );
    // Each failed call makes the client reconnect at most once (a connect
    // and one retry), besides its first connection (the same).
    assert!(conns <= 2 * (1 + HUNG_CALLS), "{conns} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_never_greets_is_connected_to_a_bounded_number_of_times() {
    // Accepts and reads, never answers even the connection's handshake.
    let tap = Tap::silent().await;
    let up = upstream::echo().await;
    let gw = hung_gateway(&tap.url(), up.addr).await;
    let n = load_while_redis_hangs(&gw).await;
    let conns = tap.connections();
    eprintln!(
        "silent Redis: {conns} connections, commands {:?} for {n} requests",
        tap.commands()
    );
    assert_eq!(tap.script_calls(), 0);
    assert!(conns <= 2 * (1 + HUNG_CALLS), "{conns} connections");
    // The handshake of each connection: `CLIENT SETINFO` twice.
    assert!(tap.commands().len() <= 2 * conns, "{:?}", tap.commands());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_server_is_called_a_bounded_number_of_times() {
    // A real redis-server, stopped (SIGSTOP) after the gateway connected:
    // the kernel still takes the bytes, nothing answers.
    let redis = RedisServer::start().await;
    let tap = Tap::forward(redis.addr()).await;
    let up = upstream::echo().await;
    let gw = hung_gateway(&tap.url(), up.addr).await;
    assert_eq!(get(&gw, "/open", &[]).await.status, 200);
    let before = tap.script_calls();
    redis.pause();
    let n = load_while_redis_hangs(&gw).await;
    let scripts = tap.script_calls() - before;
    eprintln!("stopped Redis: {scripts} script calls for {n} requests");
    assert!(
        scripts <= HUNG_CALLS,
        "{scripts} script calls for {n} requests"
    );
    redis.resume();
}
