//! The `aggregate` action through a real gateway: concurrent and chained
//! calls, templates (path params, query, headers, consumers, JWT claims,
//! previous responses; a POSTed JSON body), shaping, sparse fieldsets,
//! partial answers, required-call failures, invalid JSON, `max_total_body`,
//! single-flight, caching (TTL, `Cache-Control`, per-consumer keys), auth
//! and rate limits on aggregate routes, the upstream's adaptive
//! concurrency limit on calls, located configuration errors, and the
//! guide's worked example as written.
//!
//! Test upstreams record events (`start /a`, `end /a`) so concurrency is
//! asserted by order, never by wall time; every wait is bounded.

use super::support::upstream::{self, TestBody};
use super::support::{client, eventually, gateway};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY_APP: &str = "app-key-0123456789abcdef";
const KEY_PARTNER: &str = "partner-key-0123456789ab";

/// What the test upstream saw, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn index(&self, s: &str) -> usize {
        let all = self.all();
        all.iter()
            .position(|e| e == s)
            .unwrap_or_else(|| panic!("no `{s}` in {all:?}"))
    }
}

/// Hits per path.
#[derive(Clone, Default)]
struct Hits(Arc<Mutex<HashMap<String, usize>>>);

impl Hits {
    fn add(&self, path: &str) -> usize {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(path.to_string()).or_default();
        *n += 1;
        *n
    }
    fn get(&self, path: &str) -> usize {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn json_resp(status: u16, v: Value) -> Response<TestBody> {
    let mut r = upstream::response(status, v.to_string());
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn with_header(mut r: Response<TestBody>, k: &'static str, v: &'static str) -> Response<TestBody> {
    r.headers_mut().insert(k, v.parse().unwrap());
    r
}

/// A config with listener `main`, upstream `up` (and `dead`, where nothing
/// listens), two API-key consumers and `routes` (YAML list items, indented
/// 2). `UP` and `DEAD` in `routes` are replaced by nothing: the names are
/// fixed.
fn config(up: SocketAddr, dead: SocketAddr, routes: &str) -> String {
    format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
consumers:
  - id: app
    credentials: {{api_keys: [{{sha256: {app}}}]}}
  - id: partner
    credentials: {{api_keys: [{{sha256: {partner}}}]}}
upstreams:
  - name: up
    targets: [{{address: '{up}'}}]
  - name: dead
    targets: [{{address: '{dead}'}}]
routes:
{routes}"#,
        app = portico::auth::sha256_hex(KEY_APP.as_bytes()),
        partner = portico::auth::sha256_hex(KEY_PARTNER.as_bytes()),
    )
}

const KEYED: &str = "    policies:\n      - auth: {methods: [{api_key: {header: x-api-key}}]}\n";

async fn get(url: String, headers: &[(&str, &str)]) -> client::Reply {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    client::send(b.body(Full::new(Bytes::new())).unwrap()).await
}

fn path_and_query(req: &Request<Incoming>) -> String {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn independent_calls_run_concurrently() {
    let log = Log::default();
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let (l, b) = (log.clone(), barrier.clone());
    let up = upstream::start(move |req: Request<Incoming>| {
        let (log, barrier) = (l.clone(), b.clone());
        async move {
            let p = req.uri().path().to_string();
            log.push(format!("start {p}"));
            // All three must be in flight at once; sequential calls would
            // wait here until the bound and record it.
            if tokio::time::timeout(Duration::from_secs(5), barrier.wait())
                .await
                .is_err()
            {
                log.push(format!("alone {p}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            log.push(format!("end {p}"));
            json_resp(200, json!({ p.trim_start_matches('/'): 1 }))
        }
    })
    .await;
    let dead = upstream::closed_port().await;
    let routes = r#"  - name: screen
    match: {path: /screen}
    action:
      aggregate:
        calls:
          - {name: a, upstream: up, path: /a}
          - {name: b, upstream: up, path: /b}
          - {name: c, upstream: up, path: /c}
"#;
    let gw = gateway(&config(up.addr, dead, routes)).await;
    let r = client::get(&gw.url("/screen")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"a": 1, "b": 1, "c": 1}));
    assert_eq!(r.header("portico-partial"), None);
    let events = log.all();
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(
        events[..3].iter().all(|e| e.starts_with("start ")),
        "every call started before any finished: {events:?}"
    );
}

#[tokio::test]
async fn dependent_calls_wait_and_fill_templates() {
    let log = Log::default();
    let l = log.clone();
    let up = upstream::start(move |req: Request<Incoming>| {
        let log = l.clone();
        async move {
            let pq = path_and_query(&req);
            let consumer = req
                .headers()
                .get("x-consumer")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let lang = req
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            log.push(format!("start {pq} consumer={consumer} lang={lang}"));
            let body = if pq.starts_with("/users/") {
                tokio::time::sleep(Duration::from_millis(50)).await;
                json!({"id": 7, "name": "Ann", "team": "t 1/x"})
            } else if pq.starts_with("/teams/") {
                json!({"team": {"name": "Blue"}})
            } else {
                json!({"posts": [{"id": 1}]})
            };
            log.push(format!("end {}", req.uri().path()));
            json_resp(200, body)
        }
    })
    .await;
    let dead = upstream::closed_port().await;
    let routes = format!(
        r#"  - name: profile
    match: {{path: '/profile/{{id}}'}}
{KEYED}    action:
      aggregate:
        calls:
          - name: user
            upstream: up
            path: '/users/{{path.id}}'
            headers: {{x-consumer: '{{consumer.id}}'}}
          - name: team
            upstream: up
            path: '/teams/{{calls.user.team}}'
            headers: {{accept-language: '{{header.accept-language}}'}}
          - name: posts
            upstream: up
            path: /posts
            query: {{author: '{{calls.user.id}}', page: '{{query.page|1}}', sort: '{{query.sort}}'}}
"#
    );
    let gw = gateway(&config(up.addr, dead, &routes)).await;
    let r = get(
        gw.url("/profile/a%2Fb?page=2"),
        &[("x-api-key", KEY_APP), ("accept-language", "fr-CH")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"id": 7, "name": "Ann", "team": {"name": "Blue"}, "posts": [{"id": 1}]})
    );
    // Path params are decoded, then encoded: `/` cannot add a segment.
    let user = log.index("start /users/a%2Fb consumer=app lang=");
    let user_end = log.index("end /users/a%2Fb");
    let team = log.index("start /teams/t%201%2Fx consumer= lang=fr-CH");
    // A missing query value without a default is left out.
    let posts = log.index("start /posts?author=7&page=2 consumer= lang=");
    assert!(user < user_end && user_end < team && user_end < posts);
}

#[tokio::test]
async fn shaping_operations() {
    let up = upstream::start(|req: Request<Incoming>| async move {
        let v = match req.uri().path() {
            "/user" => json!({"data": {"user": {"id": 7, "name": "Ann", "email": "a@x", "password": "p", "meta": {"tz": "UTC", "internal": 1}}}}),
            "/posts" => json!([
                {"id": 1, "title": "One", "body": "long", "author": {"id": 7, "secret": 1}},
                {"id": 2, "title": "Two", "body": "long", "author": {"id": 7, "secret": 1}}
            ]),
            "/counts" => json!({"unread": 3, "total": 10}),
            _ => json!({"items": [{"title": "a", "x": 1}, {"title": "b", "x": 2}], "cursor": "c2"}),
        };
        json_resp(200, v)
    })
    .await;
    let dead = upstream::closed_port().await;
    let routes = r#"  - name: shaped
    match: {path: /shaped}
    action:
      aggregate:
        calls:
          - name: user
            upstream: up
            path: /user
            target: data.user
            allow: [id, name, meta]
            deny: [meta.internal]
            mapping: {name: display_name}
          - name: posts
            upstream: up
            path: /posts
            collection: true
            deny: [body, author.secret]
            mapping: {title: headline}
          - name: notifications
            upstream: up
            path: /counts
            group: badges.notifications
            allow: [unread]
          - name: feed
            upstream: up
            path: /feed
            group: feed
            allow: [items.title]
"#;
    let gw = gateway(&config(up.addr, dead, routes)).await;
    let r = client::get(&gw.url("/shaped")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({
            "id": 7, "display_name": "Ann", "meta": {"tz": "UTC"},
            "posts": [
                {"id": 1, "headline": "One", "author": {"id": 7}},
                {"id": 2, "headline": "Two", "author": {"id": 7}}
            ],
            "badges": {"notifications": {"unread": 3}},
            "feed": {"items": [{"title": "a"}, {"title": "b"}]}
        })
    );
}

/// Calls that are only placed (merged, grouped, `target`, `collection`) are
/// copied as the backend wrote them — member order, number digits, escapes —
/// next to calls shaped as trees; their whole body is still checked.
#[tokio::test]
async fn placed_answers_are_copied_as_written() {
    fn text(body: &'static str) -> Response<TestBody> {
        let mut r = upstream::response(200, body.to_string());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    }
    let up = upstream::start(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/profile" => text("{\"zeta\": 1.10, \"alpha\": {\"z\": 1, \"a\": \"caf\\u00e9\"}, \"big\": 12345678901234567890}"),
            "/posts" => text(" {\"cursor\": \"c2\", \"items\": [ {\"t\": \"x\", \"n\": 2}, {\"t\": \"y\", \"n\": 1} ]}\n"),
            "/badges" => text("{\"unread\": 3e0}"),
            "/shaped" => text("{\"beta\": {\"b\": 2}, \"keep\": 1, \"drop\": 2}"),
            _ => text("{\"items\": [1], \"rest\": [1, }"),
        }
    })
    .await;
    let dead = upstream::closed_port().await;
    let routes = r#"  - name: placed
    match: {path: /placed}
    action:
      aggregate:
        calls:
          - {name: profile, upstream: up, path: /profile}
          - {name: posts, upstream: up, path: /posts, target: items, collection: true}
          - {name: shaped, upstream: up, path: /shaped, deny: [drop]}
          - {name: badges, upstream: up, path: /badges, group: alpha.badges}
          - {name: badges2, upstream: up, path: /badges, group: beta.badges}
  - name: broken
    match: {path: /broken}
    action:
      aggregate:
        calls:
          - {name: profile, upstream: up, path: /profile}
          - {name: part, upstream: up, path: /broken, target: items, required: false}
"#;
    let gw = gateway(&config(up.addr, dead, routes)).await;
    let r = client::get(&gw.url("/placed")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Group paths enter a copied object (`alpha`, its members then sorted)
    // and a tree (`beta`). Top-level keys are sorted; the rest is copied.
    assert_eq!(
        r.text(),
        concat!(
            r#"{"alpha":{"a":"caf\u00e9","badges":{"unread": 3e0},"z":1},"#,
            r#""beta":{"b":2,"badges":{"unread": 3e0}},"big":12345678901234567890,"keep":1,"#,
            r#""posts":[ {"t": "x", "n": 2}, {"t": "y", "n": 1} ],"zeta":1.10}"#
        )
    );
    // Invalid JSON outside the `target` still fails the call.
    let r = client::get(&gw.url("/broken")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["alpha"], json!({"z": 1, "a": "café"}), "{v}");
    assert_eq!(v["_errors"][0]["call"], "part", "{v}");
    let reason = v["_errors"][0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("invalid JSON: "), "{reason}");
}

#[tokio::test]
async fn sparse_fieldsets_select_within_the_document() {
    let up = upstream::start(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/user" => json_resp(200, json!({"name": "Ann", "email": "a@x"})),
            "/fail" => json_resp(500, json!({})),
            _ => json_resp(200, json!([{"title": "t", "body": "b"}])),
        }
    })
    .await;
    let dead = upstream::closed_port().await;
    let routes = r#"  - name: sparse
    match: {path: /sparse}
    action:
      aggregate:
        fields_param: fields
        calls:
          - {name: user, upstream: up, path: /user, group: user}
          - {name: posts, upstream: up, path: /posts, collection: true}
          - {name: extra, upstream: up, path: /fail, required: false}
  - name: dense
    match: {path: /dense}
    action:
      aggregate:
        calls:
          - {name: user, upstream: up, path: /user, group: user}
"#;
    let gw = gateway(&config(up.addr, dead, routes)).await;
    let r = client::get(&gw.url("/sparse?fields=user.name,posts.title,nope.x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["user"], json!({"name": "Ann"}));
    assert_eq!(v["posts"], json!([{"title": "t"}]));
    assert!(v.get("nope").is_none());
    // The failure list is kept whatever the fieldset.
    assert_eq!(v["_errors"][0]["call"], "extra");
    // Without the parameter: everything the route exposes.
    let r = client::get(&gw.url("/sparse")).await;
    assert_eq!(r.json()["user"], json!({"name": "Ann", "email": "a@x"}));
    // A malformed field is the client's error.
    let r = client::get(&gw.url("/sparse?fields=user..name")).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // A route without `fields_param` ignores the parameter.
    let r = client::get(&gw.url("/dense?fields=user.name")).await;
    assert_eq!(r.json()["user"], json!({"name": "Ann", "email": "a@x"}));
}

#[tokio::test]
async fn optional_failures_give_a_partial_answer() {
    let up = upstream::start(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/ok" => json_resp(200, json!({"ok": true})),
            "/error" => json_resp(503, json!({"down": true})),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                json_resp(200, json!({"late": true}))
            }
            "/html" => with_header(
                upstream::response(200, "<h1>hi</h1>"),
                "content-type",
                "text/html",
            ),
            "/broken" => json_resp(200, json!({})).map(|_| upstream::full("{\"a\": ")),
            _ => json_resp(200, json!({"big": "x".repeat(100)})),
        }
    })
    .await;
    let dead = upstream::closed_port().await;
    let routes = r#"  - name: partial
    match: {path: /partial}
    action:
      aggregate:
        calls:
          - {name: main, upstream: up, path: /ok}
          - {name: status, upstream: up, path: /error, required: false}
          - {name: slow, upstream: up, path: /slow, required: false, timeout: 100ms, fallback: {late: false}}
          - {name: html, upstream: up, path: /html, required: false}
          - {name: broken, upstream: up, path: /broken, required: false}
          - {name: big, upstream: up, path: /big, required: false, max_body: 50B}
          - {name: gone, upstream: dead, path: /x, required: false, group: gone, fallback: []}
          - {name: after, upstream: up, path: '/ok/{calls.status.id}', required: false}
"#;
    let gw = gateway(&config(up.addr, dead, routes)).await;
    let r = client::get(&gw.url("/partial")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("portico-partial"), Some("true"));
    let v = r.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["late"], false, "the fallback is used");
    assert_eq!(v["gone"], json!([]));
    let errors = v["_errors"].as_array().unwrap();
    let reason = |call: &str| -> String {
        let e = errors
            .iter()
            .find(|e| e["call"] == call)
            .unwrap_or_else(|| panic!("no error for {call}: {errors:?}"));
        e["reason"].as_str().unwrap().to_string()
    };
    let names: Vec<&str> = errors.iter().map(|e| e["call"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["status", "slow", "html", "broken", "big", "gone", "after"],
        "in config order"
    );
    assert!(reason("status").contains("status 503"), "{errors:?}");
    assert!(reason("slow").contains("timed out"), "{errors:?}");
    assert!(reason("html").contains("not JSON"), "{errors:?}");
    assert!(reason("broken").contains("invalid JSON"), "{errors:?}");
    assert!(reason("big").contains("larger than 50 bytes"), "{errors:?}");
    assert!(
        reason("after").contains("depends on call `status`"),
        "{errors:?}"
    );
    assert_eq!(errors[1]["fallback"], true);
    assert!(errors[0].get("fallback").is_none());
}

#[tokio::test]
async fn a_failed_required_call_fails_the_request() {
    let up = upstream::start(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/error" => json_resp(500, json!({})),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                json_resp(200, json!({}))
            }
            "/invalid" => with_header(
                upstream::response(200, "nope"),
                "content-type",
                "application/json",
            ),
            _ => json_resp(200, json!({"ok": true})),
        }
    })
    .await;
    let dead = upstream::closed_port().await;
    let route = |name: &str, call: &str| {
        format!(
            "  - name: {name}\n    match: {{path: /{name}}}\n    action:\n      aggregate:\n        calls:\n          - {{name: fine, upstream: up, path: /ok}}\n          - {call}\n"
        )
    };
    let routes = [
        route("status", "{name: profile, upstream: up, path: /error}"),
        route(
            "timeout",
            "{name: profile, upstream: up, path: /slow, timeout: 100ms}",
        ),
        route("refused", "{name: profile, upstream: dead, path: /x}"),
        route("invalid", "{name: profile, upstream: up, path: /invalid}"),
    ]
    .concat();
    let gw = gateway(&config(up.addr, dead, &routes)).await;
    for (path, status, code, reason) in [
        ("/status", 502, "upstream_protocol_error", "status 500"),
        ("/timeout", 504, "upstream_timeout", "timed out"),
        ("/refused", 502, "upstream_unreachable", ""),
        ("/invalid", 502, "upstream_protocol_error", "invalid JSON"),
    ] {
        let r = client::get(&gw.url(path)).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code, "{path}");
        assert_eq!(e["details"]["call"], "profile", "{path}");
        assert!(
            e["message"].as_str().unwrap().contains("`profile`"),
            "{path}: {e}"
        );
        assert!(
            e["details"]["reason"].as_str().unwrap().contains(reason),
            "{path}: {e}"
        );
    }
}

/// An upstream for the sharing tests: `/item` answers `{"n": hits}` (the
/// consumer header echoed) with `Cache-Control` from the query, after the
/// gate opens when `gated`.
struct Counting {
    up: upstream::TestUpstream,
    hits: Hits,
    gate: Arc<tokio::sync::Semaphore>,
}

async fn counting() -> Counting {
    let hits = Hits::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (h, g) = (hits.clone(), gate.clone());
    let up = upstream::start(move |req: Request<Incoming>| {
        let (hits, gate) = (h.clone(), g.clone());
        async move {
            let path = req.uri().path().to_string();
            let n = hits.add(&path);
            if path == "/gated" {
                // Bounded: a test that never opens the gate fails, not hangs.
                let _ = tokio::time::timeout(Duration::from_secs(5), gate.acquire()).await;
            }
            let who = req
                .headers()
                .get("x-who")
                .map(|v| v.to_str().unwrap().to_string());
            let mut r = json_resp(200, json!({ "n": n, "who": who }));
            if let Some(cc) = req.uri().query().and_then(|q| q.strip_prefix("cc=")) {
                let cc = cc
                    .replace("%20", " ")
                    .replace("%2C", ",")
                    .replace("%3D", "=");
                r.headers_mut().insert("cache-control", cc.parse().unwrap());
            }
            r
        }
    })
    .await;
    Counting { up, hits, gate }
}

#[tokio::test]
async fn single_flight_collapses_identical_concurrent_calls() {
    let c = counting().await;
    let dead = upstream::closed_port().await;
    let routes = r#"  - name: sf
    match: {path: /sf}
    action:
      aggregate:
        calls:
          - {name: shared, upstream: up, path: /gated, single_flight: true, public: true, group: shared}
          - {name: arrive, upstream: up, path: /arrive, group: arrive}
"#;
    let gw = gateway(&config(c.up.addr, dead, routes)).await;
    const N: usize = 5;
    let url = gw.url("/sf");
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client::get(&url).await })
        })
        .collect();
    // Each client request's calls start together: once every `/arrive`
    // was seen, every `/gated` call has joined the flight.
    let hits = c.hits.clone();
    assert!(
        eventually(Duration::from_secs(5), || hits.get("/arrive") == N).await,
        "arrivals: {}",
        hits.get("/arrive")
    );
    c.gate.add_permits(N);
    for h in clients {
        let r = h.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["shared"]["n"],
            1,
            "every client got the one answer"
        );
    }
    assert_eq!(
        c.hits.get("/gated"),
        1,
        "one backend request for {N} clients"
    );
}

#[tokio::test]
async fn single_flight_is_per_consumer_unless_public() {
    let c = counting().await;
    let dead = upstream::closed_port().await;
    let routes = format!(
        r#"  - name: sf
    match: {{path: /sf}}
{KEYED}    action:
      aggregate:
        calls:
          - {{name: mine, upstream: up, path: /gated, single_flight: true, group: mine}}
          - {{name: arrive, upstream: up, path: /arrive, group: arrive}}
"#
    );
    let gw = gateway(&config(c.up.addr, dead, &routes)).await;
    let url = gw.url("/sf");
    let clients: Vec<_> = [KEY_APP, KEY_PARTNER]
        .into_iter()
        .map(|k| {
            let url = url.clone();
            tokio::spawn(async move { get(url, &[("x-api-key", k)]).await })
        })
        .collect();
    let hits = c.hits.clone();
    assert!(eventually(Duration::from_secs(5), || hits.get("/arrive") == 2).await);
    c.gate.add_permits(2);
    for h in clients {
        assert_eq!(h.await.unwrap().status, 200);
    }
    assert_eq!(
        c.hits.get("/gated"),
        2,
        "two consumers, two backend requests"
    );
}

#[tokio::test]
async fn cache_honours_ttl_and_cache_control() {
    let c = counting().await;
    let dead = upstream::closed_port().await;
    let routes = r#"  - name: cached
    match: {path: /cached}
    action:
      aggregate:
        calls:
          - {name: long, upstream: up, path: /long, group: long, public: true, cache: {ttl: 60s}}
          - {name: short, upstream: up, path: /short, group: short, public: true, cache: {ttl: 200ms}}
          - {name: nostore, upstream: up, path: /nostore, query: {cc: no-store}, group: nostore, public: true, cache: {ttl: 60s}}
          - {name: maxage0, upstream: up, path: /maxage0, query: {cc: 'max-age=0'}, group: maxage0, public: true, cache: {ttl: 60s}}
          - {name: private, upstream: up, path: /private, query: {cc: 'private, max-age=60'}, group: private, public: true, cache: {ttl: 60s}}
"#;
    let gw = gateway(&config(c.up.addr, dead, routes)).await;
    let n = |r: &client::Reply, k: &str| r.json()[k]["n"].as_u64().unwrap();
    let first = client::get(&gw.url("/cached")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = client::get(&gw.url("/cached")).await;
    assert_eq!(n(&second, "long"), 1, "served from the cache");
    assert_eq!(n(&second, "short"), 1, "still fresh");
    assert_eq!(n(&second, "nostore"), 2, "no-store is never kept");
    assert_eq!(n(&second, "maxage0"), 2, "max-age=0 is never kept");
    assert_eq!(
        n(&second, "private"),
        2,
        "private is not kept in a shared entry"
    );
    // Past its TTL (200ms) the short entry is fetched again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let third = client::get(&gw.url("/cached")).await;
    assert_eq!(n(&third, "short"), 2);
    assert_eq!(n(&third, "long"), 1);
    assert_eq!(c.hits.get("/long"), 1);
}

#[tokio::test]
async fn cache_never_shares_answers_across_consumers() {
    let c = counting().await;
    let dead = upstream::closed_port().await;
    let routes = format!(
        r#"  - name: cached
    match: {{path: /cached}}
{KEYED}    action:
      aggregate:
        calls:
          - {{name: mine, upstream: up, path: /mine, group: mine, headers: {{x-who: '{{consumer.id}}'}}, cache: {{ttl: 60s}}}}
          - {{name: nohdr, upstream: up, path: /nohdr, group: nohdr, cache: {{ttl: 60s}}}}
          - {{name: private, upstream: up, path: /private, query: {{cc: 'private, max-age=60'}}, group: private, cache: {{ttl: 60s}}}}
          - {{name: everyone, upstream: up, path: /everyone, group: everyone, public: true, cache: {{ttl: 60s}}}}
"#
    );
    let gw = gateway(&config(c.up.addr, dead, &routes)).await;
    let url = gw.url("/cached");
    let as_ = |k: &'static str| {
        let url = url.clone();
        async move { get(url, &[("x-api-key", k)]).await }
    };
    let a1 = as_(KEY_APP).await;
    assert_eq!(a1.status, 200, "{}", a1.text());
    let b1 = as_(KEY_PARTNER).await;
    let a2 = as_(KEY_APP).await;
    let b2 = as_(KEY_PARTNER).await;
    assert_eq!(a1.json()["mine"], json!({"n": 1, "who": "app"}));
    assert_eq!(b1.json()["mine"], json!({"n": 2, "who": "partner"}));
    assert_eq!(a2.json()["mine"], a1.json()["mine"]);
    assert_eq!(b2.json()["mine"], b1.json()["mine"]);
    // The same request sent for two consumers: still one entry each.
    assert_eq!(a2.json()["nohdr"]["n"], 1);
    assert_eq!(b2.json()["nohdr"]["n"], 2);
    assert_eq!(c.hits.get("/nohdr"), 2);
    // `private` answers are kept per consumer.
    assert_eq!(b2.json()["private"]["n"], 2);
    assert_eq!(c.hits.get("/private"), 2);
    // A public call is shared.
    assert_eq!(b1.json()["everyone"]["n"], 1);
    assert_eq!(c.hits.get("/everyone"), 1);
}

#[tokio::test]
async fn auth_applies_to_aggregate_routes() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let up = upstream::start(move |_req: Request<Incoming>| {
        h.fetch_add(1, Ordering::SeqCst);
        async move { json_resp(200, json!({"ok": true})) }
    })
    .await;
    let dead = upstream::closed_port().await;
    let routes = format!(
        "  - name: agg\n    match: {{path: /agg}}\n{KEYED}    action:\n      aggregate:\n        calls:\n          - {{name: a, upstream: up, path: /a}}\n"
    );
    let gw = gateway(&config(up.addr, dead, &routes)).await;
    let r = client::get(&gw.url("/agg")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = get(gw.url("/agg"), &[("x-api-key", "wrong-key-0123456789abc")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "no call without a valid key"
    );
    let r = get(gw.url("/agg"), &[("x-api-key", KEY_APP)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok": true}));
    assert!(r.header("x-request-id").is_some());
}

// ------------------------------------------------------------ policies

#[tokio::test]
async fn rate_limits_apply_to_aggregate_routes() {
    let hits = Hits::default();
    let h = hits.clone();
    let up = upstream::start(move |req: Request<Incoming>| {
        let n = h.add(req.uri().path());
        async move { json_resp(200, json!({ "n": n })) }
    })
    .await;
    let dead = upstream::closed_port().await;
    let routes = r#"  - name: limited
    match: {path: /limited}
    policies:
      - rate_limit:
          limits: [{name: screen, quota: 2, window: hour}]
    action:
      aggregate:
        calls:
          - {name: a, upstream: up, path: /a, group: a}
          - {name: b, upstream: up, path: /b, group: b}
"#;
    let gw = gateway(&config(up.addr, dead, routes)).await;
    for i in 0..2u64 {
        let r = client::get(&gw.url("/limited")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({"a": {"n": i + 1}, "b": {"n": i + 1}}));
        assert_eq!(r.header("ratelimit-policy"), Some("\"screen\";q=2;w=3600"));
        let state = r.header("ratelimit").unwrap();
        assert!(
            state.starts_with(&format!("\"screen\";r={};t=", 1 - i)),
            "{state}"
        );
    }
    let r = client::get(&gw.url("/limited")).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let e = &r.json()["error"];
    assert_eq!(e["code"], "rate_limited");
    assert_eq!(e["status"], 429);
    assert!(e["request_id"].is_string());
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    assert_eq!(r.header("ratelimit-policy"), Some("\"screen\";q=2;w=3600"));
    assert!(r
        .header("ratelimit")
        .unwrap()
        .starts_with("\"screen\";r=0;t="));
    assert!(r.header("x-request-id").is_some());
    assert_eq!(
        (hits.get("/a"), hits.get("/b")),
        (2, 2),
        "the refused request made no call"
    );
}

// ------------------------------------------------------------ JWT claims

const JWT_SECRET: &str = "an-aggregate-test-hmac-secret-of-32-bytes";

/// A gateway whose configuration may use `${AGG_JWT_SECRET}`.
async fn jwt_gateway(yaml: &str) -> super::support::TestGateway {
    super::support::gateway_with_env(yaml, &[("AGG_JWT_SECRET", JWT_SECRET)]).await
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims from a verified JWT, a path param and a previous call's field
/// fill a chained GET and a POST whose body is a JSON template; the
/// upstream receives the rendered JSON with its content type.
#[tokio::test]
async fn jwt_claims_path_params_and_previous_calls_fill_a_posted_body() {
    let log = Log::default();
    let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (l, b) = (log.clone(), bodies.clone());
    let up = upstream::start(move |req: Request<Incoming>| {
        let (log, bodies) = (l.clone(), b.clone());
        async move {
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let h = |n: &str| {
                parts
                    .headers
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            };
            let pq = parts.uri.path_and_query().unwrap().as_str().to_string();
            log.push(format!(
                "{} {pq} ct={} org={}",
                parts.method,
                h("content-type"),
                h("x-org")
            ));
            let body = body.collect().await.unwrap().to_bytes();
            if parts.uri.path().starts_with("/accounts/") {
                assert!(body.is_empty(), "a GET call sends no body");
                return json_resp(200, json!({"account": {"id": "acc 9/x", "plan": "pro"}}));
            }
            let received: Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
            bodies.lock().unwrap().push(received.clone());
            json_resp(201, json!({ "stored": received }))
        }
    })
    .await;
    let yaml = format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
auth:
  jwt_issuers:
    - name: id
      issuer: https://id.test
      audiences: [api]
      algorithms: [HS256]
      keys:
        - {{kid: k1, secret: "${{AGG_JWT_SECRET}}"}}
upstreams:
  - name: up
    targets: [{{address: '{}'}}]
routes:
  - name: feed
    match: {{path: '/teams/{{team}}/feed', methods: [GET]}}
    policies:
      - auth: {{methods: [{{jwt: {{issuers: [id]}}}}]}}
    action:
      aggregate:
        calls:
          - name: me
            upstream: up
            path: '/accounts/{{claims.sub}}'
            headers: {{x-org: '{{claims.org.id}}'}}
            group: me
          - name: post
            upstream: up
            method: POST
            path: '/teams/{{path.team}}/feeds'
            query: {{account: '{{calls.me.account.id}}'}}
            body:
              owner: '{{claims.sub}}'
              account: '{{calls.me.account.id}}'
              team: '{{path.team}}'
              level: '{{claims.level}}'
              tags: '{{claims.tags}}'
              note: 'for {{claims.sub}} in {{path.team}}'
              missing: '{{claims.nope}}'
              fixed: [1, true]
            group: feed
"#,
        up.addr
    );
    let gw = jwt_gateway(&yaml).await;
    let claims = json!({
        "iss": "https://id.test", "aud": "api", "sub": "user 7", "exp": unix_now() + 600,
        "org": {"id": "o-1"}, "level": 3, "tags": ["a", "b"],
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();

    // No token: refused before any call.
    let r = client::get(&gw.url("/teams/blue%20team/feed")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(log.all().is_empty(), "{:?}", log.all());

    let r = get(
        gw.url("/teams/blue%20team/feed"),
        &[("authorization", format!("Bearer {token}").as_str())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let expected_body = json!({
        "owner": "user 7",
        "account": "acc 9/x",
        "team": "blue team",
        "level": 3,
        "tags": ["a", "b"],
        "note": "for user 7 in blue team",
        "missing": null,
        "fixed": [1, true],
    });
    assert_eq!(*bodies.lock().unwrap(), vec![expected_body.clone()]);
    assert_eq!(
        log.all(),
        [
            "GET /accounts/user%207 ct= org=o-1",
            "POST /teams/blue%20team/feeds?account=acc%209%2Fx ct=application/json org=",
        ],
        "the POST waited for `me`, values encoded for where they go"
    );
    assert_eq!(
        r.json(),
        json!({
            "me": {"account": {"id": "acc 9/x", "plan": "pro"}},
            "feed": {"stored": expected_body},
        })
    );
}

// ------------------------------------------------------------ limits

#[tokio::test]
async fn max_total_body_bounds_what_all_calls_read_together() {
    // 67 and 60 bytes: each fits 100 bytes, both together do not.
    let up = upstream::start(|req: Request<Incoming>| async move {
        if req.uri().path() == "/first" {
            json_resp(200, json!({"id": 1, "pad": "x".repeat(50)}))
        } else {
            json_resp(200, json!({"pad": "y".repeat(50)}))
        }
    })
    .await;
    let dead = upstream::closed_port().await;
    // `second` waits for `first`, so it is the one that crosses the limit.
    let route = |name: &str, total: &str, required: bool| {
        format!(
            r#"  - name: {name}
    match: {{path: /{name}}}
    action:
      aggregate:
        max_total_body: {total}
        calls:
          - {{name: first, upstream: up, path: /first, group: first}}
          - {{name: second, upstream: up, path: '/second/{{calls.first.id}}', group: second, required: {required}}}
"#
        )
    };
    let routes = [
        route("over", "100B", true),
        route("optional", "100B", false),
        route("within", "127B", true),
    ]
    .concat();
    let gw = gateway(&config(up.addr, dead, &routes)).await;

    let r = client::get(&gw.url("/over")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["code"], "upstream_protocol_error");
    assert_eq!(e["details"]["call"], "second");
    let reason = e["details"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("larger than 100 bytes (max_total_body)"),
        "{reason}"
    );
    assert!(e["message"].as_str().unwrap().contains("`second`"), "{e}");

    let r = client::get(&gw.url("/optional")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("portico-partial"), Some("true"));
    let v = r.json();
    assert_eq!(v["first"]["id"], 1);
    assert!(v.get("second").is_none(), "{v}");
    assert_eq!(v["_errors"][0]["call"], "second");
    assert!(v["_errors"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("max_total_body"));

    // Exactly the sum of both bodies fits.
    let r = client::get(&gw.url("/within")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["second"]["pad"], "y".repeat(50));
}

// ------------------------------------------------------------ upstream protection

async fn upstreams_view(admin: SocketAddr) -> Value {
    super::support::metrics::admin_get(admin, "/upstreams", None)
        .await
        .json()
}

/// Aggregate calls take a slot of the upstream's adaptive concurrency
/// limit, as proxied requests do (refused at once when it is full, the
/// call not sent), hold it until their body is read, and give the limit
/// their latency.
#[tokio::test]
async fn calls_pass_the_upstream_adaptive_concurrency_limit() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let up = upstream::start(move |_req: Request<Incoming>| {
        let gate = g.clone();
        async move {
            // Bounded: a test that never opens the gate fails, not hangs.
            let _ = tokio::time::timeout(Duration::from_secs(5), gate.acquire()).await;
            json_resp(200, json!({"ok": true}))
        }
    })
    .await;
    let yaml = format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
upstreams:
  - name: guarded
    targets: [{{address: '{}'}}]
    adaptive_concurrency: {{min_limit: 1, max_limit: 1, initial_limit: 1, window: 1ms, min_samples: 1}}
routes:
  - name: screen
    match: {{path: /screen}}
    action:
      aggregate:
        calls:
          - {{name: held, upstream: guarded, path: /held}}
"#,
        up.addr
    );
    let gw = gateway(&yaml).await;
    let admin = gw.running.admin_addr();
    let limit = |v: &Value| v["upstreams"][0]["adaptive_concurrency"].clone();
    assert_eq!(limit(&upstreams_view(admin).await)["latency_ms"], 0.0);

    let url = gw.url("/screen");
    let first = tokio::spawn(async move { client::get(&url).await });
    assert!(eventually(Duration::from_secs(5), || up.hits() == 1).await);
    let a = limit(&upstreams_view(admin).await);
    assert_eq!(a["in_flight"], 1, "the call holds a slot: {a}");

    // The limit is full: the second request's call is refused, not sent.
    let r = client::get(&gw.url("/screen")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["code"], "overloaded");
    assert_eq!(e["details"]["call"], "held");
    assert!(e["message"].as_str().unwrap().contains("`held`"), "{e}");
    assert_eq!(up.hits(), 1);
    let a = limit(&upstreams_view(admin).await);
    assert_eq!(a["rejected"], 1, "{a}");
    let m = super::support::metrics::scrape_until(admin, None, |m| {
        m.find(
            "portico_requests_shed_total",
            &[("route", "screen"), ("scope", "upstream")],
        )
        .is_some()
    })
    .await;
    assert_eq!(
        m.value(
            "portico_requests_shed_total",
            &[
                ("route", "screen"),
                ("scope", "upstream"),
                ("reason", "rejected")
            ]
        ),
        1.0
    );

    gate.add_permits(1);
    let r = first.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok": true}));
    // The slot was given back with the body; the call's latency reached
    // the limit (its window closed on that sample).
    let a = limit(&upstreams_view(admin).await);
    assert_eq!(a["in_flight"], 0, "{a}");
    assert!(a["latency_ms"].as_f64().unwrap() > 0.0, "{a}");
    // With the slot back, the next call goes through.
    gate.add_permits(1);
    let r = client::get(&gw.url("/screen")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits(), 2);
}

// ------------------------------------------------------------ configuration errors

/// Every error of a configuration that does not compile, as printed.
fn config_errors(file: &str, yaml: &str) -> Vec<String> {
    let loaded = portico::config::parse_str(file, yaml, |_| None).unwrap_or_else(|e| panic!("{e}"));
    match portico::snapshot::compile(&loaded, None) {
        Ok(_) => panic!("compiled:\n{yaml}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

const ERR_HEAD: &str = "listeners:
  - name: main
    address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{address: '127.0.0.1:1'}]
routes:
";

#[test]
fn cycles_and_unknown_calls_are_located_in_block_yaml() {
    // Line 16 is call `b`, line 33 the header of the second route's call.
    let yaml = format!(
        "{ERR_HEAD}  - name: cycle
    match: {{path: /cycle}}
    action:
      aggregate:
        calls:
          - name: a
            upstream: up
            path: /a
          - name: b
            upstream: up
            path: '/b/{{calls.c.id}}'
          - name: c
            upstream: up
            path: /c
            query:
              x: '{{calls.b.x}}'
  - name: unknown
    match: {{path: /unknown}}
    action:
      aggregate:
        calls:
          - name: a
            upstream: up
            path: /a
            headers:
              x-y: '{{calls.zz.id}}'
"
    );
    let errors = config_errors("portico.yaml", &yaml);
    let expected = [
        "portico.yaml:16:13: routes[0].action.aggregate.calls[1]: the calls depend on each other in a cycle: b → c → b",
        "portico.yaml:33:15: routes[1].action.aggregate.calls[0].headers.x-y: `{calls.zz.id}`: no call is named `zz` (calls: a)",
    ];
    assert_eq!(errors, expected);
    // The guide shows these very lines.
    let guide =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/aggregation.md"))
            .unwrap();
    for line in expected {
        assert!(guide.contains(line), "docs/aggregation.md lacks: {line}");
    }
}

#[test]
fn cycles_and_unknown_calls_are_located_in_flow_yaml() {
    let yaml = format!(
        "{ERR_HEAD}  - name: cycle
    match: {{path: /cycle}}
    action:
      aggregate:
        calls:
          - {{name: a, upstream: up, path: '/a/{{calls.b.id}}'}}
          - {{name: b, upstream: up, path: /b, headers: {{x-a: '{{calls.a.id}}'}}}}
  - name: unknown
    match: {{path: /unknown}}
    action: {{aggregate: {{calls: [{{name: a, upstream: up, path: /a}}, {{name: b, upstream: up, path: '/b/{{calls.nope.x}}'}}]}}}}
"
    );
    let errors = config_errors("flow.yaml", &yaml);
    assert_eq!(
        errors,
        [
            // The `{` of the first call on the cycle.
            "flow.yaml:13:13: routes[0].action.aggregate.calls[0]: the calls depend on each other in a cycle: a → b → a",
            // The key `path` of the second call.
            "flow.yaml:17:93: routes[1].action.aggregate.calls[1].path: `{calls.nope.x}`: no call is named `nope` (calls: a, b)",
        ]
    );
}

// ------------------------------------------------------------ the guide

/// The text between the first "```{lang}\n" after `after` and its end.
fn block<'a>(doc: &'a str, after: &str, lang: &str) -> &'a str {
    let from = doc
        .find(after)
        .unwrap_or_else(|| panic!("no `{after}` in the guide"));
    doc[from..]
        .split(&format!("```{lang}\n"))
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .unwrap_or_else(|| panic!("no ```{lang} block after `{after}`"))
}

/// The worked example of docs/aggregation.md as written there (its
/// addresses and JWKS URL pointed at test servers): the services answer
/// what the guide shows them answering, and the app gets what the guide
/// says, for a real ES256 token.
#[tokio::test]
async fn the_guide_worked_example_answers_as_documented() {
    let guide =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/aggregation.md"))
            .unwrap();
    let yaml = block(&guide, "## A worked example", "yaml");
    // `GET PATH → JSON` entries, JSON continued on the following lines.
    let mut answers: HashMap<String, Value> = HashMap::new();
    let listing = block(&guide, "with these answers from the services", "");
    for entry in listing.split("GET ").filter(|e| !e.trim().is_empty()) {
        let (pq, json) = entry.split_once('→').expect("GET PATH → JSON");
        let json: String = json.lines().map(str::trim).collect::<Vec<_>>().join(" ");
        let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        answers.insert(pq.trim().to_string(), v);
    }
    assert_eq!(answers.len(), 3, "{answers:?}");
    let expected: Value = serde_json::from_str(block(&guide, "the app receives", "json")).unwrap();

    // The three services, sharing one handler: what the guide shows for a
    // request it lists, 404 for any other.
    let log = Log::default();
    let slow_unread = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failing_profiles = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = Arc::new(answers);
    let service = || {
        let (log, answers) = (log.clone(), answers.clone());
        let (slow, failing) = (slow_unread.clone(), failing_profiles.clone());
        upstream::start(move |req: Request<Incoming>| {
            let (log, answers) = (log.clone(), answers.clone());
            let slow = slow.load(Ordering::SeqCst);
            let failing = failing.load(Ordering::SeqCst);
            async move {
                let pq = path_and_query(&req);
                let app = req
                    .headers()
                    .get("x-client-app")
                    .map(|v| v.to_str().unwrap().to_string());
                log.push(format!("{pq} app={app:?}"));
                if pq.ends_with("/unread-count") && slow {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                if pq == "/users/42" && failing {
                    return json_resp(500, json!({"error": "down"}));
                }
                match answers.get(&pq) {
                    Some(v) => json_resp(200, v.clone()),
                    None => json_resp(404, json!({"unknown": pq})),
                }
            }
        })
    };
    let (profiles, posts, notifications) = (service().await, service().await, service().await);

    // The identity provider's keys (ES256).
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]})
    .to_string();
    let idp = upstream::start(move |_req: Request<Incoming>| {
        let body = jwks.clone();
        async move { upstream::response(200, body) }
    })
    .await;

    let yaml = yaml
        .replace("address: 127.0.0.1:8080", "address: 127.0.0.1:0")
        .replace("127.0.0.1:9001", &profiles.addr.to_string())
        .replace("127.0.0.1:9002", &posts.addr.to_string())
        .replace("127.0.0.1:9003", &notifications.addr.to_string())
        .replace(
            "https://accounts.example.com/.well-known/jwks.json",
            &format!("http://{}/jwks.json", idp.addr),
        );
    let gw = gateway(&yaml).await;
    let url = |pq: &str| format!("http://{}{pq}", gw.running.addr("public"));
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let claims = json!({"iss": "https://accounts.example.com/", "aud": "social-api",
        "sub": "42", "azp": "mobile-app", "exp": unix_now() + 600});
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&kp.serialize_der()),
    )
    .unwrap();
    let bearer = format!("Bearer {token}");
    let screen = |pq: &'static str| {
        let (u, bearer) = (url(pq), bearer.clone());
        async move {
            // Until the first JWKS fetch, an unknown key is `503`.
            for _ in 0..100 {
                let r = get(u.clone(), &[("authorization", bearer.as_str())]).await;
                if r.status != 503 || r.json()["error"]["code"] != "auth_unavailable" {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the JWKS was never fetched");
        }
    };

    // A slow notification service: still 200, with the fallback.
    slow_unread.store(true, Ordering::SeqCst);
    let r = screen("/screens/home").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("portico-partial"), Some("true"));
    let mut partial = expected.clone();
    partial["notifications"] = json!({"count": null});
    partial["_errors"] =
        json!([{"call": "unread", "reason": "timed out after 300ms", "fallback": true}]);
    assert_eq!(r.json(), partial);

    slow_unread.store(false, Ordering::SeqCst);
    let r = screen("/screens/home").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("portico-partial"), None);
    assert_eq!(r.json(), expected);
    // `recent` waited for `me`; the user id is the token's subject.
    let me = log.index("/users/42 app=Some(\"mobile-app\")");
    let recent = log.index("/posts?author=42&limit=5 app=None");
    assert!(me < recent);
    log.index("/users/42/unread-count app=None");

    let r = screen("/screens/home?fields=name,notifications.count").await;
    assert_eq!(
        r.json(),
        json!({"name": "Ada", "notifications": {"count": 3}})
    );

    failing_profiles.store(true, Ordering::SeqCst);
    let r = screen("/screens/home").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["details"]["call"], "me");

    // Without a token: refused, nothing called.
    let calls = log.all().len();
    let r = client::get(&url("/screens/home")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(log.all().len(), calls);
}
