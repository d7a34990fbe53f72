//! The `introspection` auth method against a real introspection endpoint on
//! loopback (`support::introspection`): active and inactive tokens, the
//! cache, an endpoint that is down, slow or broken (never a pass),
//! `consumer_claim`, gRPC statuses, configuration errors.

use super::support::introspection::{self as idp, bearer_claims, Config};
use super::support::{client, gateway, start_file, temp_config, upstream, TestGateway};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use portico::auth::{Method, Reason};
use serde_json::json;

/// A route `/api` that needs an introspected token.
const ROUTE: &str = "  - name: api
    match: {path_prefix: /api}
    policies:
      - auth:
          methods: [{introspection: {server: idp}}]
          claims_to_headers: {sub: x-user-id, tenant: x-tenant}
    action: {proxy: {upstream: up}}
";

async fn start(
    idp_addr: std::net::SocketAddr,
    up: std::net::SocketAddr,
    server_extra: &str,
    routes: &str,
) -> TestGateway {
    gateway(
        &Config {
            idp: idp_addr,
            up,
            listener_extra: "",
            consumers: "",
            server_extra,
            more_servers: "",
            routes,
        }
        .yaml(),
    )
    .await
}

async fn get(gw: &TestGateway, path: &str, authorization: &str) -> client::Reply {
    let mut b = Request::get(gw.url(path));
    if !authorization.is_empty() {
        b = b.header("authorization", authorization);
    }
    client::send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// The upstream `echo` saw this request header (first value).
fn seen(r: &client::Reply, name: &str) -> Option<String> {
    r.json()["headers"][name][0].as_str().map(String::from)
}

/// How many refusals the route counted for `(method, reason)`.
fn failures(gw: &TestGateway, route: &str, m: Method, r: Reason) -> u64 {
    let snap = gw.running.shared.snapshot.load();
    let route = snap.routes.iter().find(|x| &*x.name == route).unwrap();
    route.metrics.auth_failures(m.index(), r.index())
}

#[tokio::test]
async fn active_token_passes_with_claims_and_scopes() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let routes = format!(
        "{ROUTE}  - name: admin
    match: {{path_prefix: /admin}}
    policies:
      - auth:
          methods: [{{introspection: {{server: idp}}}}]
      - access: {{scopes: [read, admin]}}
    action: {{proxy: {{upstream: up}}}}
  - name: reader
    match: {{path_prefix: /read}}
    policies:
      - auth:
          methods: [{{introspection: {{server: idp}}}}]
      - access: {{scopes: [read]}}
    action: {{proxy: {{upstream: up}}}}
"
    );
    let gw = start(server.addr, up.addr, "", &routes).await;
    let token = bearer_claims(json!({"sub": "user-1", "tenant": "acme", "scope": "read write"}));

    let r = get(&gw, "/api/x", &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-user-id").as_deref(), Some("user-1"));
    assert_eq!(seen(&r, "x-tenant").as_deref(), Some("acme"));
    assert_eq!(seen(&r, "x-auth-method").as_deref(), Some("introspection"));
    // The token is not forwarded (strip_credentials defaults to true).
    assert_eq!(seen(&r, "authorization"), None);

    let r = get(&gw, "/read", &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&gw, "/admin", &token).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "forbidden");
    let challenge = r.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert_eq!(
        failures(
            &gw,
            "admin",
            Method::Introspection,
            Reason::InsufficientScope
        ),
        1
    );
    // One call for the three requests with the same token.
    assert_eq!(server.hits(), 1);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn answers_are_cached_per_token() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let gw = start(server.addr, up.addr, "", ROUTE).await;
    let a = bearer_claims(json!({"sub": "a"}));
    let b = bearer_claims(json!({"sub": "b"}));
    for _ in 0..3 {
        assert_eq!(get(&gw, "/api", &a).await.status, 200);
    }
    assert_eq!(server.hits(), 1);
    let r = get(&gw, "/api", &b).await;
    assert_eq!(seen(&r, "x-user-id").as_deref(), Some("b"));
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn a_zero_cache_ttl_asks_every_time() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let gw = start(server.addr, up.addr, "      cache_ttl: 0s\n", ROUTE).await;
    let a = bearer_claims(json!({"sub": "a"}));
    assert_eq!(get(&gw, "/api", &a).await.status, 200);
    assert_eq!(get(&gw, "/api", &a).await.status, 200);
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn inactive_tokens_are_refused_and_remembered() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let more = format!(
        "    - name: no-memory\n      url: http://{}/introspect\n      client_id: gateway\n      client_secret: {}\n      inactive_ttl: 0s\n",
        server.addr,
        idp::SECRET_REF
    );
    let routes = format!(
        "{ROUTE}  - name: forgetful
    match: {{path_prefix: /forgetful}}
    policies:
      - auth:
          methods: [{{introspection: {{server: no-memory}}}}]
    action: {{proxy: {{upstream: up}}}}
"
    );
    let gw = gateway(
        &Config {
            idp: server.addr,
            up: up.addr,
            listener_extra: "",
            consumers: "",
            server_extra: "",
            more_servers: &more,
            routes: &routes,
        }
        .yaml(),
    )
    .await;
    for _ in 0..2 {
        let r = get(&gw, "/api", "Bearer inactive").await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"]["code"], "unauthorized");
        let c = r.header("www-authenticate").unwrap();
        assert!(c.starts_with("Bearer realm=\"portico\""), "{c}");
        assert!(c.contains("error=\"invalid_token\""), "{c}");
    }
    assert_eq!(server.hits(), 1, "the inactive answer is cached");
    assert_eq!(
        failures(&gw, "api", Method::Introspection, Reason::Inactive),
        2
    );

    // `inactive_ttl: 0s` remembers nothing.
    for _ in 0..2 {
        assert_eq!(get(&gw, "/forgetful", "Bearer inactive").await.status, 401);
    }
    assert_eq!(server.hits(), 3);

    // An active answer whose `exp` has passed is refused too.
    let r = get(&gw, "/api", "Bearer expired").await;
    assert_eq!(r.status, 401);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn missing_token_is_challenged() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let gw = start(server.addr, up.addr, "", ROUTE).await;
    let r = get(&gw, "/api", "").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"portico\"")
    );
    // Another scheme is not a bearer token: absent, not invalid.
    let r = get(&gw, "/api", "Basic Zm9vOmJhcg==").await;
    assert_eq!(r.status, 401);
    assert_eq!(server.hits(), 0);
    assert_eq!(up.hits(), 0);
}

/// Down, refusing our credentials, answering 500, not JSON, without
/// `active`, too slow: never a pass.
#[tokio::test]
async fn an_unavailable_server_never_lets_requests_through() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let gw = start(server.addr, up.addr, "      timeout: 300ms\n", ROUTE).await;
    for token in ["error", "badjson", "noactive", "slow"] {
        let r = get(&gw, "/api", &format!("Bearer {token}")).await;
        assert_eq!(r.status, 503, "{token}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "auth_unavailable", "{token}");
        assert!(r.header("www-authenticate").is_none(), "{token}");
    }
    // Failures are not cached: the same token is asked about again.
    let hits = server.hits();
    assert_eq!(get(&gw, "/api", "Bearer error").await.status, 503);
    assert_eq!(server.hits(), hits + 1);
    assert_eq!(
        failures(&gw, "api", Method::Introspection, Reason::Unavailable),
        5
    );

    // Nothing listening.
    let dead = upstream::closed_port().await;
    let gw = start(dead, up.addr, "", ROUTE).await;
    let r = get(&gw, "/api", &bearer_claims(json!({"sub": "a"}))).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn wrong_client_credentials_are_unavailable_not_a_pass() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let yaml = Config {
        idp: server.addr,
        up: up.addr,
        listener_extra: "",
        consumers: "",
        server_extra: "",
        more_servers: "",
        routes: ROUTE,
    }
    .yaml()
    .replace(idp::SECRET_REF, "${PORTICO_TEST_WRONG:-wrong-secret}");
    let gw = gateway(&yaml).await;
    let r = get(&gw, "/api", &bearer_claims(json!({"sub": "a"}))).await;
    assert_eq!(r.status, 503);
    assert_eq!(server.hits(), 1);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn unavailable_status_is_configurable() {
    let dead = upstream::closed_port().await;
    let up = upstream::echo().await;
    let token = bearer_claims(json!({"sub": "a"}));

    let gw = start(dead, up.addr, "      unavailable_status: 502\n", ROUTE).await;
    let r = get(&gw, "/api", &token).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "auth_unavailable");

    let gw = start(dead, up.addr, "      unavailable_status: 401\n", ROUTE).await;
    let r = get(&gw, "/api", &token).await;
    assert_eq!(r.status, 401);
    // A 401 always carries a challenge.
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"portico\"")
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn consumer_claim_names_the_consumer() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let gw = gateway(
        &Config {
            idp: server.addr,
            up: up.addr,
            listener_extra: "",
            consumers: "  - id: app\n    groups: [partners]\n    plan: pro\n",
            server_extra: "      consumer_claim: client_id\n",
            more_servers: "",
            routes: ROUTE,
        }
        .yaml(),
    )
    .await;
    let r = get(
        &gw,
        "/api",
        &bearer_claims(json!({"sub": "u", "client_id": "app"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-consumer-id").as_deref(), Some("app"));
    assert_eq!(seen(&r, "x-consumer-groups").as_deref(), Some("partners"));
    assert_eq!(seen(&r, "x-consumer-plan").as_deref(), Some("pro"));

    for claims in [
        json!({"client_id": "stranger"}),
        json!({"sub": "no-client"}),
    ] {
        let r = get(&gw, "/api", &bearer_claims(claims)).await;
        assert_eq!(r.status, 401);
        assert!(r
            .header("www-authenticate")
            .unwrap()
            .contains("invalid_token"));
    }
    assert_eq!(
        failures(&gw, "api", Method::Introspection, Reason::UnknownConsumer),
        2
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn tokens_from_a_header_cookie_or_query_parameter() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let routes = "  - name: cookie
    match: {path_prefix: /cookie}
    policies:
      - auth:
          methods: [{introspection: {server: idp, cookie: session}}]
          claims_to_headers: {sub: x-user-id}
    action: {proxy: {upstream: up}}
  - name: query
    match: {path_prefix: /query}
    policies:
      - auth:
          methods: [{introspection: {server: idp, query: access_token}}]
    action: {proxy: {upstream: up}}
";
    let gw = start(server.addr, up.addr, "", routes).await;
    let r = client::send(
        Request::get(gw.url("/cookie"))
            .header("cookie", "theme=dark; session=claims:{\"sub\":\"c\"}")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-user-id").as_deref(), Some("c"));
    assert_eq!(seen(&r, "cookie").as_deref(), Some("theme=dark"));

    let r = get(
        &gw,
        "/query?a=1&access_token=claims%3A%7B%22sub%22%3A%22q%22%7D",
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["query"], "a=1");
}

#[tokio::test]
async fn grpc_calls_get_grpc_statuses() {
    let dead = upstream::closed_port().await;
    let server = idp::start().await;
    let up = upstream::echo().await;
    let routes = format!(
        "{ROUTE}  - name: scoped
    match: {{path_prefix: /scoped}}
    policies:
      - auth:
          methods: [{{introspection: {{server: idp}}}}]
      - access: {{scopes: [admin]}}
    action: {{proxy: {{upstream: up}}}}
  - name: down
    match: {{path_prefix: /down}}
    policies:
      - auth:
          methods: [{{introspection: {{server: down}}}}]
    action: {{proxy: {{upstream: up}}}}
"
    );
    let more = format!(
        "    - name: down\n      url: http://{dead}/introspect\n      client_id: gateway\n      client_secret: {}\n",
        idp::SECRET_REF
    );
    let gw = gateway(
        &Config {
            idp: server.addr,
            up: up.addr,
            listener_extra: "",
            consumers: "",
            server_extra: "",
            more_servers: &more,
            routes: &routes,
        }
        .yaml(),
    )
    .await;
    let call = |path: &str, auth: Option<&str>| {
        let mut b = Request::post(gw.url(path)).header("content-type", "application/grpc");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        client::send(b.body(Full::new(Bytes::new())).unwrap())
    };
    let token = bearer_claims(json!({"scope": "read"}));
    for (path, auth, code) in [
        ("/api/pkg.Svc/Call", None, "16"),
        ("/api/pkg.Svc/Call", Some("Bearer inactive"), "16"),
        ("/scoped/pkg.Svc/Call", Some(token.as_str()), "7"),
        ("/down/pkg.Svc/Call", Some(token.as_str()), "14"),
    ] {
        let r = call(path, auth).await;
        assert_eq!(r.status, 200, "{path}: gRPC errors are trailers-only 200s");
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert_eq!(r.header("grpc-status"), Some(code), "{path} {auth:?}");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_server_and_its_cache() {
    let server = idp::start().await;
    let up = upstream::echo().await;
    let cfg = Config {
        idp: server.addr,
        up: up.addr,
        listener_extra: "",
        consumers: "",
        server_extra: "",
        more_servers: "",
        routes: ROUTE,
    }
    .yaml();
    let path = temp_config("introspection", "reload", &cfg);
    let gw = start_file(&path).await;
    let token = bearer_claims(json!({"sub": "a"}));
    assert_eq!(get(&gw, "/api", &token).await.status, 200);
    let before = gw.running.shared.snapshot.load().introspection["idp"].clone();

    // Another route changes; the server's entry does not.
    let more_routes = format!(
        "{cfg}  - name: other\n    match: {{path_prefix: /other}}\n    action: {{respond: {{status: 204}}}}\n"
    );
    std::fs::write(&path, &more_routes).unwrap();
    gw.running.shared.reload().unwrap();
    let after = gw.running.shared.snapshot.load().introspection["idp"].clone();
    assert!(std::sync::Arc::ptr_eq(&before, &after));
    assert_eq!(get(&gw, "/other", "").await.status, 204);
    assert_eq!(get(&gw, "/api", &token).await.status, 200);
    assert_eq!(server.hits(), 1, "the cached answer survived the reload");

    // A changed entry is a new server with an empty cache.
    std::fs::write(
        &path,
        more_routes.replace(
            "      client_id: gateway\n",
            "      client_id: gateway\n      timeout: 2s\n",
        ),
    )
    .unwrap();
    gw.running.shared.reload().unwrap();
    let changed = gw.running.shared.snapshot.load().introspection["idp"].clone();
    assert!(!std::sync::Arc::ptr_eq(&before, &changed));
    assert_eq!(get(&gw, "/api", &token).await.status, 200);
    assert_eq!(server.hits(), 2);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Compile errors for `text`, one per line.
fn errors(text: &str) -> String {
    let loaded = portico::config::parse_str("t.yaml", text, |_| None).unwrap();
    match portico::snapshot::compile(&loaded, None) {
        Ok(_) => panic!("expected errors:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configuration_errors_name_their_keys() {
    let base = "listeners: [{name: main, address: '127.0.0.1:0'}]
auth:
  introspection:
    - name: idp
      url: http://127.0.0.1:9/introspect
      client_id: gateway
      client_secret: written-in-the-file
      unavailable_status: 200
    - name: idp
      url: ftp://127.0.0.1:9/
      client_id: gateway
      client_secret: ${S:-x}
      consumer_claim: client_id
routes:
  - name: r
    policies:
      - auth:
          methods: [{introspection: {server: nope}}]
    action: {respond: {status: 200}}
";
    let e = errors(base);
    for want in [
        "auth.introspection[0].client_secret: must come from the environment",
        "auth.introspection[0].unavailable_status: 200 is not a 4xx or 5xx status",
        "auth.introspection[1].name: duplicate introspection server name `idp`",
        "routes[0].policies[0].auth.methods[0].introspection.server: no `auth.introspection` server is named `nope` (known: idp)",
    ] {
        assert!(e.contains(want), "missing `{want}` in:\n{e}");
    }
    let e = errors(
        "listeners: [{name: main, address: '127.0.0.1:0'}]
auth:
  introspection:
    - name: idp
      url: ftp://127.0.0.1:9/
      client_id: gateway
      client_secret: ${S:-x}
      consumer_claim: client_id
      unavailable_status: 700
",
    );
    for want in [
        "auth.introspection[0].url: `ftp://127.0.0.1:9/` must start with http:// or https://",
        "auth.introspection[0].consumer_claim: no consumers are configured",
        "auth.introspection[0].unavailable_status: 700 is not a 4xx or 5xx status",
    ] {
        assert!(e.contains(want), "missing `{want}` in:\n{e}");
    }
    // An empty variable is not a secret.
    let e = errors(
        "listeners: [{name: main, address: '127.0.0.1:0'}]
auth:
  introspection:
    - {name: idp, url: 'http://127.0.0.1:9/', client_id: gw, client_secret: '${S:-}'}
",
    );
    assert!(
        e.contains("auth.introspection[0].client_secret: is empty (is the variable set?)"),
        "{e}"
    );
}
