//! Rate limits through real gateways: the RateLimit headers on allowed,
//! limited and gateway-error responses, the 429 body and `Retry-After`,
//! keys of every kind, plan limits and per-consumer overrides, costs,
//! concurrency and WebSocket-connection limits. The Redis backends are in
//! [`redis`]. Gateways with windows or throttles read a clock pinned at
//! noon UTC ([`pinned`]), so nothing rolls over or refills mid-test. No
//! assertion is about timing; every loop is bounded.

mod redis;

use super::support::metrics::scrape;
use super::support::{client, gateway, gateway_with_clock, live, upstream, TestGateway};
use bytes::Bytes;
use futures_util::StreamExt;
use http::Request;
use http_body_util::Full;
use portico::ratelimit::ManualClock;
use std::sync::Arc;
use std::time::Duration;

const KEY_ALICE: &str = "alice-key-0123456789abcdef";
const KEY_BOB: &str = "bob-key-0123456789abcdef00";
const KEY_CAROL: &str = "carol-key-0123456789abcdef";

/// 2024-10-04 12:00:00 UTC in µs: twelve hours from either end of its day,
/// and on the hour.
const NOON: u64 = (20_000 * 86_400 + 43_200) * 1_000_000;

/// A clock standing still at [`NOON`] until the test moves it: no window
/// rolls over and no throttle refills during a test, whenever and however
/// slowly it runs.
fn pinned() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(NOON))
}

/// A gateway whose rate limits read the [`pinned`] clock.
async fn pinned_gateway(yaml: &str) -> TestGateway {
    gateway_with_clock(yaml, pinned()).await
}

fn sha(k: &str) -> String {
    portico::auth::sha256_hex(k.as_bytes())
}

async fn get(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> client::Reply {
    let mut b = Request::get(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        client::send(b.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("the gateway answers")
}

/// How many of `n` requests were admitted (200), checking that every
/// other answer is a 429.
async fn admitted(gw: &TestGateway, path: &str, headers: &[(&str, &str)], n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let r = get(gw, path, headers).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {}
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    ok
}

fn base(up: std::net::SocketAddr, extra: &str, routes: &str) -> String {
    format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{{address: '{up}'}}]
  - name: dead
    targets: [{{address: '127.0.0.1:1'}}]
{extra}
routes:
{routes}"#
    )
}

#[tokio::test]
async fn headers_on_allowed_limited_and_gateway_error_responses() {
    let up = upstream::echo().await;
    let gw = pinned_gateway(&base(
        up.addr,
        "",
        r#"  - name: limited
    match: {path_prefix: /limited}
    policies:
      - rate_limit:
          legacy_headers: true
          limits:
            - {name: daily, quota: 3, window: day}
            - {name: burst, rate: 100, burst: 50}
    action: {proxy: {upstream: up}}
  - name: broken
    match: {path_prefix: /broken}
    policies:
      - rate_limit:
          limits: [{name: hourly, quota: 5, window: hour}]
    action: {proxy: {upstream: dead}}
"#,
    ))
    .await;

    for i in 0..3u64 {
        let r = get(&gw, "/limited", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"daily\";q=3;w=86400, \"burst\";q=50;w=1")
        );
        let state = r.header("ratelimit").unwrap();
        assert!(
            state.starts_with(&format!("\"daily\";r={};t=", 2 - i)),
            "{state}"
        );
        assert!(
            state.contains(&format!("\"burst\";r={};t=", 49 - i)),
            "{state}"
        );
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some((2 - i).to_string().as_str())
        );
    }
    let r = get(&gw, "/limited", &[]).await;
    assert_eq!(r.status, 429);
    let body = r.json();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(body["error"]["status"], 429);
    // The clock stands at noon: the day's quota is back at midnight.
    assert_eq!(r.header("retry-after"), Some("43200"));
    assert!(r
        .header("ratelimit")
        .unwrap()
        .starts_with("\"daily\";r=0;t="));
    assert!(r.header("ratelimit-policy").is_some());
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert!(r.header("x-request-id").is_some());
    assert_eq!(
        up.hits(),
        3,
        "the refused request never reached the upstream"
    );

    // A gateway-made error (502) still carries the headers.
    let r = get(&gw, "/broken", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("ratelimit-policy"), Some("\"hourly\";q=5;w=3600"));
    assert!(r
        .header("ratelimit")
        .unwrap()
        .starts_with("\"hourly\";r=4;t="));

    let m = scrape(gw.running.admin_addr(), None).await;
    let d = |route: &str, result: &str| {
        m.find(
            "portico_rate_limit_decisions_total",
            &[("route", route), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(d("limited", "allowed"), 3.0);
    assert_eq!(d("limited", "limited"), 1.0);
    assert_eq!(d("broken", "allowed"), 1.0);
}

#[tokio::test]
async fn keys_of_every_kind() {
    let up = upstream::echo().await;
    let consumers = format!(
        r#"consumers:
  - id: alice
    groups: [team-a]
    plan: free
    credentials: {{api_keys: [{{sha256: {a}}}]}}
  - id: bob
    groups: [team-a]
    plan: pro
    credentials: {{api_keys: [{{sha256: {b}}}]}}
  - id: carol
    groups: [team-c]
    plan: free
    credentials: {{api_keys: [{{sha256: {c}}}]}}"#,
        a = sha(KEY_ALICE),
        b = sha(KEY_BOB),
        c = sha(KEY_CAROL)
    );
    let route = |name: &str, key: &str, extra: &str| {
        format!(
            r#"  - name: {name}
    match: {{path_prefix: /{name}}}
    policies:
      - auth: {{methods: [{{api_key: {{}}}}], anonymous: true}}
      - rate_limit:
          key: {key}
          plans: false
          {extra}
          limits: [{{name: q, quota: 2, window: day}}]
    action: {{proxy: {{upstream: up}}}}
"#
        )
    };
    let routes = [
        route("by-ip", "client_ip", ""),
        route("by-consumer", "consumer", ""),
        route("by-group", "group", ""),
        route("by-plan", "plan", ""),
        route("by-header", "header:x-tenant", ""),
        route("by-pair", "[consumer, header:x-tenant]", ""),
        route("skip-missing", "header:x-tenant", "missing_key: skip"),
        route("by-route-a", "route", ""),
        route("by-route-b", "route", ""),
    ]
    .concat();
    let gw = pinned_gateway(&base(up.addr, &consumers, &routes)).await;
    let a = [("x-api-key", KEY_ALICE)];
    let b = [("x-api-key", KEY_BOB)];
    let c = [("x-api-key", KEY_CAROL)];

    // Client IP: everyone on loopback shares it.
    assert_eq!(admitted(&gw, "/by-ip", &a, 1).await, 1);
    assert_eq!(admitted(&gw, "/by-ip", &b, 3).await, 1);
    // Consumer: each their own; anonymous requests fall back to the IP.
    assert_eq!(admitted(&gw, "/by-consumer", &a, 3).await, 2);
    assert_eq!(admitted(&gw, "/by-consumer", &b, 3).await, 2);
    assert_eq!(admitted(&gw, "/by-consumer", &[], 3).await, 2);
    // Group: alice and bob share team-a; carol has team-c.
    assert_eq!(admitted(&gw, "/by-group", &a, 1).await, 1);
    assert_eq!(admitted(&gw, "/by-group", &b, 3).await, 1);
    assert_eq!(admitted(&gw, "/by-group", &c, 3).await, 2);
    // Plan: alice and carol share free.
    assert_eq!(admitted(&gw, "/by-plan", &a, 1).await, 1);
    assert_eq!(admitted(&gw, "/by-plan", &c, 3).await, 1);
    assert_eq!(admitted(&gw, "/by-plan", &b, 3).await, 2);
    // Header: per tenant; absent falls back to the client IP.
    assert_eq!(
        admitted(&gw, "/by-header", &[("x-tenant", "t1")], 3).await,
        2
    );
    assert_eq!(
        admitted(&gw, "/by-header", &[("x-tenant", "t2")], 3).await,
        2
    );
    assert_eq!(admitted(&gw, "/by-header", &[], 3).await, 2);
    // A combination: consumer × tenant.
    let at1 = [("x-api-key", KEY_ALICE), ("x-tenant", "t1")];
    let at2 = [("x-api-key", KEY_ALICE), ("x-tenant", "t2")];
    let bt1 = [("x-api-key", KEY_BOB), ("x-tenant", "t1")];
    assert_eq!(admitted(&gw, "/by-pair", &at1, 3).await, 2);
    assert_eq!(admitted(&gw, "/by-pair", &at2, 3).await, 2);
    assert_eq!(admitted(&gw, "/by-pair", &bt1, 3).await, 2);
    // `missing_key: skip`: no tenant, no limit (and no headers).
    assert_eq!(admitted(&gw, "/skip-missing", &[], 5).await, 5);
    let r = get(&gw, "/skip-missing", &[]).await;
    assert!(r.header("ratelimit").is_none());
    assert_eq!(
        admitted(&gw, "/skip-missing", &[("x-tenant", "t9")], 3).await,
        2
    );
    // Route: each route its own counter.
    assert_eq!(admitted(&gw, "/by-route-a", &a, 3).await, 2);
    assert_eq!(admitted(&gw, "/by-route-b", &b, 3).await, 2);
}

/// An EC P-256 key: the issuer's public JWK and the key to sign with.
fn es256_key() -> (serde_json::Value, jsonwebtoken::EncodingKey) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": "k1",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    });
    (
        jwk,
        jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der()),
    )
}

#[tokio::test]
async fn claim_keys_from_a_verified_jwt() {
    let up = upstream::echo().await;
    let (jwk, key) = es256_key();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = |extra: serde_json::Value| {
        let mut claims = serde_json::json!({
            "iss": "https://id.test", "aud": "api", "sub": "user-1", "exp": exp,
        });
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        let t = jsonwebtoken::encode(&h, &claims, &key).unwrap();
        format!("Bearer {t}")
    };
    let route = |name: &str, key: &str, extra: &str| {
        format!(
            r#"  - name: {name}
    match: {{path_prefix: /{name}}}
    policies:
      - auth: {{methods: [{{jwt: {{issuers: [main]}}}}]}}
      - rate_limit:
          key: {key}
          {extra}
          limits: [{{name: q, quota: 2, window: day}}]
    action: {{proxy: {{upstream: up}}}}
"#
        )
    };
    let issuer = format!(
        r#"auth:
  jwt_issuers:
    - name: main
      issuer: https://id.test
      audiences: [api]
      algorithms: [ES256]
      keys: [{{jwk: {jwk}}}]"#
    );
    let routes = [
        route("by-tenant", "claim:tenant", ""),
        route("by-org", "claim:org", ""),
        route("skip", "claim:tenant", "missing_key: skip"),
    ]
    .concat();
    let gw = pinned_gateway(&base(up.addr, &issuer, &routes)).await;
    let t1 = token(serde_json::json!({"tenant": "t1"}));
    let t1_other_user = token(serde_json::json!({"tenant": "t1", "sub": "user-2"}));
    let t2 = token(serde_json::json!({"tenant": "t2"}));
    let no_tenant = token(serde_json::json!({}));
    let object_tenant = token(serde_json::json!({"tenant": {"id": "t1"}}));
    let auth = |t: &str| [("authorization", t.to_string())];
    let call = |t: &str, path: &'static str, n: usize| {
        let h = auth(t);
        let gw = &gw;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            admitted(gw, path, &h, n).await
        }
    };
    // Without a valid token there is no claim to key on: 401, not counted.
    assert_eq!(get(&gw, "/by-tenant", &[]).await.status, 401);
    // A string claim: one count per tenant, whoever the user.
    assert_eq!(call(&t1, "/by-tenant", 1).await, 1);
    assert_eq!(call(&t1_other_user, "/by-tenant", 3).await, 1);
    assert_eq!(call(&t2, "/by-tenant", 3).await, 2);
    // A missing claim, or one that is not a string, number or boolean,
    // falls back to the client IP: those two share one count.
    assert_eq!(call(&no_tenant, "/by-tenant", 1).await, 1);
    assert_eq!(call(&object_tenant, "/by-tenant", 3).await, 1);
    // A number claim.
    let org7 = token(serde_json::json!({"org": 7}));
    let org8 = token(serde_json::json!({"org": 8}));
    assert_eq!(call(&org7, "/by-org", 3).await, 2);
    assert_eq!(call(&org8, "/by-org", 3).await, 2);
    // `missing_key: skip`: no tenant, no limit (and no headers).
    assert_eq!(call(&no_tenant, "/skip", 5).await, 5);
    let r = get(&gw, "/skip", &[("authorization", no_tenant.as_str())]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit").is_none());
    assert_eq!(call(&t1, "/skip", 3).await, 2);
    let r = get(&gw, "/skip", &[("authorization", t1.as_str())]).await;
    assert_eq!(r.header("ratelimit"), Some("\"q\";r=0;t=43200"));
}

#[tokio::test]
async fn plan_limits_consumer_overrides_and_costs() {
    let up = upstream::echo().await;
    let extra = format!(
        r#"rate_limiting:
  plans:
    free: [{{name: daily, quota: 2, window: day}}]
    pro: [{{name: daily, quota: 4, window: day}}]
consumers:
  - id: alice
    plan: free
    credentials: {{api_keys: [{{sha256: {a}}}]}}
  - id: bob
    plan: free
    limits: [{{name: special, quota: 3, window: month}}]
    credentials: {{api_keys: [{{sha256: {b}}}]}}
  - id: carol
    plan: pro
    credentials: {{api_keys: [{{sha256: {c}}}]}}"#,
        a = sha(KEY_ALICE),
        b = sha(KEY_BOB),
        c = sha(KEY_CAROL)
    );
    let routes = r#"  - name: api
    match: {path_prefix: /api}
    policies:
      - auth: {methods: [{api_key: {}}], anonymous: true}
      - rate_limit:
          limits: [{name: route-wide, quota: 100, window: day}]
    action: {proxy: {upstream: up}}
  - name: costly
    match: {path_prefix: /costly}
    policies:
      - rate_limit:
          cost: 5
          plans: false
          limits: [{name: units, quota: 12, window: hour}]
    action: {proxy: {upstream: up}}
"#;
    let gw = pinned_gateway(&base(up.addr, &extra, routes)).await;
    assert_eq!(
        admitted(&gw, "/api", &[("x-api-key", KEY_ALICE)], 4).await,
        2
    );
    assert_eq!(admitted(&gw, "/api", &[("x-api-key", KEY_BOB)], 5).await, 3);
    assert_eq!(
        admitted(&gw, "/api", &[("x-api-key", KEY_CAROL)], 6).await,
        4
    );
    // Anonymous: only the route's own limit.
    assert_eq!(admitted(&gw, "/api", &[], 5).await, 5);
    let r = get(&gw, "/api", &[("x-api-key", KEY_BOB)]).await;
    assert_eq!(
        r.header("ratelimit-policy")
            .map(|p| p.starts_with("\"route-wide\";q=100;w=86400, \"special\";q=3;w=")),
        Some(true),
        "{:?}",
        r.header("ratelimit-policy")
    );
    // Cost 5 out of 12: two requests.
    assert_eq!(admitted(&gw, "/costly", &[], 4).await, 2);
}

#[tokio::test]
async fn a_plan_limit_keyed_by_group_is_shared_by_the_team() {
    // As in docs/traffic-control.md: limits attach to the plan; a plan
    // limit with `key: group` counts for everyone whose first group it is.
    let up = upstream::echo().await;
    let extra = format!(
        r#"rate_limiting:
  plans:
    partner:
      - {{name: per-consumer, quota: 2, window: day}}
      - {{name: per-team, quota: 3, window: day, key: group}}
consumers:
  - id: alice
    plan: partner
    groups: [team-a]
    credentials: {{api_keys: [{{sha256: {a}}}]}}
  - id: bob
    plan: partner
    groups: [team-a, team-c]
    credentials: {{api_keys: [{{sha256: {b}}}]}}
  - id: carol
    plan: partner
    groups: [team-c, team-a]
    credentials: {{api_keys: [{{sha256: {c}}}]}}"#,
        a = sha(KEY_ALICE),
        b = sha(KEY_BOB),
        c = sha(KEY_CAROL)
    );
    let routes = r#"  - name: api
    match: {path_prefix: /api}
    policies:
      - auth: {methods: [{api_key: {}}]}
      - rate_limit: {}
    action: {proxy: {upstream: up}}
"#;
    let gw = pinned_gateway(&base(up.addr, &extra, routes)).await;
    // Everyone calls from the same address: a plan's limit without a key
    // of its own counts per consumer, not by the policy's key (client_ip).
    // alice: her own 2.
    assert_eq!(
        admitted(&gw, "/api", &[("x-api-key", KEY_ALICE)], 3).await,
        2
    );
    // bob: team-a has 1 of its 3 left.
    assert_eq!(admitted(&gw, "/api", &[("x-api-key", KEY_BOB)], 3).await, 1);
    // carol's first group is team-c: a count of its own.
    assert_eq!(
        admitted(&gw, "/api", &[("x-api-key", KEY_CAROL)], 3).await,
        2
    );
    let r = get(&gw, "/api", &[("x-api-key", KEY_BOB)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"per-consumer\";q=2;w=86400, \"per-team\";q=3;w=86400")
    );
}

#[tokio::test]
async fn concurrency_limit_releases_when_the_body_ends() {
    let up = upstream::slow(Duration::from_millis(1500)).await;
    let gw = gateway(&base(
        up.addr,
        "",
        r#"  - name: slow
    match: {path_prefix: /slow}
    policies:
      - rate_limit:
          limits: [{name: inflight, concurrent: 2}]
    action: {proxy: {upstream: up}}
"#,
    ))
    .await;
    let url = gw.url("/slow");
    let first: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client::get(&url).await })
        })
        .collect();
    // Bounded wait until both are in flight at the upstream.
    for _ in 0..200 {
        if up.hits() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.hits(), 2);
    let r = get(&gw, "/slow", &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    assert_eq!(r.header("ratelimit-policy"), Some("\"inflight\";q=2"));
    for h in first {
        let r = h.await.unwrap();
        assert_eq!(r.status, 200);
    }
    // Both finished: slots are free again.
    let r = get(&gw, "/slow", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit"), Some("\"inflight\";r=1;t=0"));
}

#[tokio::test]
async fn websocket_connections_per_consumer() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let up = live::ws_echo().await;
    let extra = format!(
        r#"consumers:
  - id: alice
    credentials: {{api_keys: [{{sha256: {a}}}]}}
  - id: bob
    credentials: {{api_keys: [{{sha256: {b}}}]}}"#,
        a = sha(KEY_ALICE),
        b = sha(KEY_BOB)
    );
    let gw = gateway(&base(
        up.addr,
        &extra,
        r#"  - name: ws
    match: {path: /chat}
    policies:
      - auth: {methods: [{api_key: {}}]}
      - rate_limit:
          key: consumer
          limits: [{name: sockets, websockets: 1}]
    action: {proxy: {upstream: up}}
"#,
    ))
    .await;
    let connect = |key: &'static str| {
        let mut req = format!("ws://{}/chat", gw.addr())
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("x-api-key", key.parse().unwrap());
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                tokio_tungstenite::connect_async(req),
            )
            .await
            .expect("handshake answered")
        }
    };
    let (mut ws1, resp) = connect(KEY_ALICE).await.expect("first socket");
    assert_eq!(resp.status(), 101);
    // Plain requests do not count against a WebSocket limit.
    assert_eq!(
        admitted(&gw, "/chat", &[("x-api-key", KEY_ALICE)], 2).await,
        2
    );
    // A second socket for alice is refused; bob has his own.
    match connect(KEY_ALICE).await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|x| x.1.status())),
    }
    let (mut ws_bob, resp) = connect(KEY_BOB).await.expect("bob's socket");
    assert_eq!(resp.status(), 101);
    // The tunnel works while it holds the slot.
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    ws1.send(Message::text("hi")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws1.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("hi"));
    // Closing the tunnel frees the slot (released when it ends: bounded retries).
    ws1.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws1.next()).await {}
    drop(ws1);
    let mut reopened = None;
    for _ in 0..100 {
        match connect(KEY_ALICE).await {
            Ok((ws, r)) => {
                assert_eq!(r.status(), 101);
                reopened = Some(ws);
                break;
            }
            Err(WsError::Http(r)) if r.status() == 429 => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(reopened.is_some(), "the slot was never released");
    ws_bob.close(None).await.unwrap();
}
