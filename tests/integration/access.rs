//! The `access` policy end to end: consumer and group allow lists (API
//! keys, JWTs), scopes, roles and claims (introspected tokens and signed
//! JWTs), IPv4/IPv6 allow and deny lists behind a trusted proxy, which
//! refusals carry a `WWW-Authenticate` challenge, spoofed consumer headers,
//! anonymous callers, configuration errors.

use super::support::introspection::{self as idp, bearer_claims, Config};
use super::support::jwt::{self as jwt, claims_with};
use super::support::{client, gateway, upstream, TestGateway};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use portico::auth::{sha256_hex, Method, Reason};
use serde_json::json;

const APP_KEY: &str = "app-key-0123456789abcdef";
const PARTNER_KEY: &str = "partner-key-0123456789abcdef";
const LONER_KEY: &str = "loner-key-0123456789abcdef";

fn consumers() -> String {
    format!(
        "  - id: app\n    credentials: {{api_keys: [{{sha256: {}}}]}}
  - id: partner\n    groups: [partners, beta]\n    credentials: {{api_keys: [{{sha256: {}}}]}}
  - id: loner\n    credentials: {{api_keys: [{{sha256: {}}}]}}\n",
        sha256_hex(APP_KEY.as_bytes()),
        sha256_hex(PARTNER_KEY.as_bytes()),
        sha256_hex(LONER_KEY.as_bytes()),
    )
}

/// A gateway with the consumers above and an introspection server `idp`
/// (returned: it must live as long as the gateway is used).
async fn start(
    up: std::net::SocketAddr,
    listener_extra: &str,
    routes: &str,
) -> (TestGateway, upstream::TestUpstream) {
    let server = idp::start().await;
    let gw = gateway(
        &Config {
            idp: server.addr,
            up,
            listener_extra,
            consumers: &consumers(),
            server_extra: "",
            more_servers: "",
            routes,
        }
        .yaml(),
    )
    .await;
    (gw, server)
}

async fn send(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> client::Reply {
    let mut b = Request::get(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    client::send(b.body(Full::new(Bytes::new())).unwrap()).await
}

fn failures(gw: &TestGateway, route: &str, m: Method, r: Reason) -> u64 {
    let snap = gw.running.shared.snapshot.load();
    let route = snap.routes.iter().find(|x| &*x.name == route).unwrap();
    route.metrics.auth_failures(m.index(), r.index())
}

fn route(name: &str, auth: &str, access: &str) -> String {
    let auth = if auth.is_empty() {
        String::new()
    } else {
        format!("      - auth: {auth}\n")
    };
    format!(
        "  - name: {name}\n    match: {{path_prefix: /{name}}}\n    policies:\n{auth}      - access: {access}\n    action: {{proxy: {{upstream: up}}}}\n"
    )
}

const API_KEY: &str = "{methods: [{api_key: {header: x-api-key}}]}";
const TOKEN: &str = "{methods: [{introspection: {server: idp}}]}";

fn assert_forbidden(r: &client::Reply, what: &str) {
    assert_eq!(r.status, 403, "{what}: {}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["status"], 403, "{what}");
    assert_eq!(e["code"], "forbidden", "{what}");
    assert_eq!(
        e["message"], "access to this route is not allowed",
        "{what}"
    );
}

#[tokio::test]
async fn consumer_and_group_allow_lists() {
    let up = upstream::echo().await;
    let routes = [
        route("only-app", API_KEY, "{consumers: [app]}"),
        route("partners", API_KEY, "{groups: [partners]}"),
        route("either", API_KEY, "{consumers: [loner], groups: [beta]}"),
    ]
    .concat();
    let (gw, _idp) = start(up.addr, "", &routes).await;
    let key = |k| [("x-api-key", k)];
    for (path, k, ok) in [
        ("/only-app", APP_KEY, true),
        ("/only-app", PARTNER_KEY, false),
        ("/partners", PARTNER_KEY, true),
        ("/partners", APP_KEY, false),
        ("/either", LONER_KEY, true),
        ("/either", PARTNER_KEY, true),
        ("/either", APP_KEY, false),
    ] {
        let r = send(&gw, path, &key(k)).await;
        if ok {
            assert_eq!(r.status, 200, "{path} {k}: {}", r.text());
        } else {
            assert_forbidden(&r, &format!("{path} {k}"));
            assert!(r.header("www-authenticate").is_none());
        }
    }
    assert_eq!(up.hits(), 4);
    assert_eq!(
        failures(&gw, "only-app", Method::ApiKey, Reason::ConsumerDenied),
        1
    );
    assert_eq!(
        failures(&gw, "either", Method::ApiKey, Reason::ConsumerDenied),
        1
    );
}

#[tokio::test]
async fn scopes_roles_and_claims_from_tokens() {
    let up = upstream::echo().await;
    let routes = [
        route("scopes", TOKEN, "{scopes: [orders.read, orders.write]}"),
        route(
            "roles",
            TOKEN,
            "{roles: [admin, ops], roles_claim: realm_access.roles}",
        ),
        route("flat-roles", TOKEN, "{roles: [admin]}"),
        route(
            "tenant",
            TOKEN,
            "{claims: {tenant: acme, teams: blue, level: 3}}",
        ),
    ]
    .concat();
    let (gw, _idp) = start(up.addr, "", &routes).await;
    let call = |path: &'static str, claims: serde_json::Value| {
        let auth = bearer_claims(claims);
        let gw = &gw;
        async move { send(gw, path, &[("authorization", &auth)]).await }
    };

    // Scopes: all of them.
    let r = call("/scopes", json!({"scope": "orders.read orders.write x"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call("/scopes", json!({"scope": "orders.read"})).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["error"]["message"],
        "the token lacks a required scope"
    );
    let c = r.header("www-authenticate").unwrap();
    assert!(c.contains("error=\"insufficient_scope\""), "{c}");
    let r = call("/scopes", json!({"scp": ["orders.read", "orders.write"]})).await;
    assert_eq!(r.status, 200, "`scp` arrays count");

    // Roles: any of them, at a dot path; a string is one role.
    let r = call(
        "/roles",
        json!({"realm_access": {"roles": ["user", "ops"]}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call("/roles", json!({"realm_access": {"roles": "admin"}})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_forbidden(
        &call("/roles", json!({"realm_access": {"roles": ["user"]}})).await,
        "no role",
    );
    assert_forbidden(
        &call("/roles", json!({"roles": ["admin"]})).await,
        "wrong path",
    );
    assert_eq!(
        call("/flat-roles", json!({"roles": ["admin"]}))
            .await
            .status,
        200
    );

    // Claims: equal, or contained in an array claim.
    let good = json!({"tenant": "acme", "teams": ["red", "blue"], "level": 3});
    assert_eq!(call("/tenant", good.clone()).await.status, 200);
    let mut t = good.clone();
    t["teams"] = "blue".into();
    assert_eq!(call("/tenant", t).await.status, 200);
    for (k, v) in [
        ("tenant", json!("globex")),
        ("teams", json!(["red"])),
        ("level", json!("3")),
    ] {
        let mut t = good.clone();
        t[k] = v;
        assert_forbidden(&call("/tenant", t).await, k);
    }
    let mut t = good;
    t.as_object_mut().unwrap().remove("tenant");
    assert_forbidden(&call("/tenant", t).await, "absent claim");
    assert_eq!(
        failures(&gw, "tenant", Method::Introspection, Reason::ClaimMismatch),
        4
    );
    assert_eq!(
        failures(&gw, "roles", Method::Introspection, Reason::MissingRole),
        2
    );
}

/// A gateway with the consumers above, the JWT issuer `main` (RS256, its
/// key inline, `azp` naming the consumer) and `routes`.
async fn start_jwt(up: std::net::SocketAddr, routes: &str) -> TestGateway {
    gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{{address: \"{up}\"}}]\nconsumers:\n{}auth:\n  jwt_issuers:\n{}routes:\n{routes}",
        consumers(),
        jwt::issuer("      consumer_claim: azp\n"),
    ))
    .await
}

const JWT: &str = "{methods: [{jwt: {issuers: [main]}}]}";

/// `Authorization: Bearer` with an RS256 token of consumer `app` carrying
/// `extra` claims.
fn bearer_jwt(extra: serde_json::Value) -> String {
    let mut extra = extra;
    if extra.get("azp").is_none() {
        extra["azp"] = json!("app");
    }
    format!("Bearer {}", jwt::rs256("rsa-1", &claims_with(extra)))
}

#[tokio::test]
async fn scopes_roles_and_claims_from_jwts() {
    let up = upstream::echo().await;
    let routes = [
        route("scopes", JWT, "{scopes: [orders.read, orders.write]}"),
        route(
            "roles",
            JWT,
            "{roles: [admin, ops], roles_claim: realm_access.roles}",
        ),
        route("flat-roles", JWT, "{roles: [admin]}"),
        route(
            "tenant",
            JWT,
            "{claims: {tenant: acme, level: 3, email_verified: true, realm_access.tier: gold}}",
        ),
        route(
            "all",
            JWT,
            "{consumers: [app], scopes: [orders.read], roles: [admin], claims: {tenant: acme}}",
        ),
    ]
    .concat();
    let gw = start_jwt(up.addr, &routes).await;
    let call = |path: &'static str, extra: serde_json::Value| {
        let auth = bearer_jwt(extra);
        let gw = &gw;
        async move { send(gw, path, &[("authorization", &auth)]).await }
    };
    let insufficient = "Bearer realm=\"portico\", error=\"insufficient_scope\", error_description=\"the token lacks a required scope\"";

    // Scopes, all of them: a space-separated `scope`, an array `scope`, `scp`.
    for (what, extra) in [
        ("string", json!({"scope": "orders.read x orders.write"})),
        ("array", json!({"scope": ["orders.write", "orders.read"]})),
        ("scp array", json!({"scp": ["orders.read", "orders.write"]})),
        ("scp string", json!({"scp": "orders.read orders.write"})),
        (
            "scope and scp",
            json!({"scope": "orders.read", "scp": ["orders.write"]}),
        ),
    ] {
        let r = call("/scopes", extra).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        let h = &r.json()["headers"];
        assert_eq!(h["x-auth-method"], json!(["jwt"]), "{what}");
        assert_eq!(h["x-consumer-id"], json!(["app"]), "{what}");
        assert!(h.get("authorization").is_none(), "{what}: stripped");
    }
    for (what, extra) in [
        ("string", json!({"scope": "orders.read"})),
        ("array", json!({"scope": ["orders.read"]})),
        (
            "one string holding both",
            json!({"scope": ["orders.read orders.write"]}),
        ),
        ("prefix", json!({"scope": "orders.read orders.writer"})),
        ("none", json!({})),
    ] {
        let r = call("/scopes", extra).await;
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "forbidden", "{what}");
        assert_eq!(
            r.json()["error"]["message"],
            "the token lacks a required scope"
        );
        assert_eq!(r.header("www-authenticate"), Some(insufficient), "{what}");
    }
    assert_eq!(
        failures(&gw, "scopes", Method::Jwt, Reason::InsufficientScope),
        5
    );

    // Roles: any of them, at a dot path; a string claim is one role.
    for (extra, ok) in [
        (json!({"realm_access": {"roles": ["user", "ops"]}}), true),
        (json!({"realm_access": {"roles": "admin"}}), true),
        (json!({"realm_access": {"roles": ["user"]}}), false),
        (json!({"realm_access": {"roles": "admin ops"}}), false),
        (json!({"roles": ["admin"]}), false),
        (json!({}), false),
    ] {
        let r = call("/roles", extra.clone()).await;
        if ok {
            assert_eq!(r.status, 200, "{extra}: {}", r.text());
        } else {
            assert_forbidden(&r, &extra.to_string());
            assert!(r.header("www-authenticate").is_none(), "{extra}");
        }
    }
    assert_eq!(failures(&gw, "roles", Method::Jwt, Reason::MissingRole), 4);
    assert_eq!(
        call("/flat-roles", json!({"roles": "admin"})).await.status,
        200
    );
    assert_eq!(
        call("/flat-roles", json!({"roles": ["ops", "admin"]}))
            .await
            .status,
        200
    );

    // Claims: all equal (or contained in an array claim), typed, dot paths.
    let good = json!({"tenant": "acme", "level": 3, "email_verified": true,
                      "realm_access": {"tier": "gold"}});
    assert_eq!(call("/tenant", good.clone()).await.status, 200);
    let mut t = good.clone();
    t["tenant"] = json!(["globex", "acme"]);
    assert_eq!(call("/tenant", t).await.status, 200, "array claim");
    let bad = [
        ("tenant", json!("globex")),
        ("tenant", json!(["globex"])),
        ("level", json!("3")),
        ("level", json!(4)),
        ("email_verified", json!(false)),
        ("email_verified", json!("true")),
        ("realm_access", json!({"tier": "silver"})),
    ];
    for (k, v) in &bad {
        let mut t = good.clone();
        t[*k] = v.clone();
        let r = call("/tenant", t).await;
        assert_forbidden(&r, &format!("{k}={v}"));
        assert!(r.header("www-authenticate").is_none(), "{k}={v}");
    }
    let mut t = good;
    t.as_object_mut().unwrap().remove("email_verified");
    assert_forbidden(&call("/tenant", t).await, "absent claim");
    assert_eq!(
        failures(&gw, "tenant", Method::Jwt, Reason::ClaimMismatch),
        bad.len() as u64 + 1
    );

    // Every rule at once, checked in order: consumer, scopes, roles, claims.
    let all = json!({"scope": "orders.read", "roles": ["admin"], "tenant": "acme"});
    assert_eq!(call("/all", all.clone()).await.status, 200);
    for (change, reason) in [
        (json!({"azp": "partner"}), Reason::ConsumerDenied),
        (json!({"scope": "x"}), Reason::InsufficientScope),
        (json!({"roles": []}), Reason::MissingRole),
        (json!({"tenant": "globex"}), Reason::ClaimMismatch),
    ] {
        let mut t = all.clone();
        for (k, v) in change.as_object().unwrap() {
            t[k] = v.clone();
        }
        let before = failures(&gw, "all", Method::Jwt, reason);
        let r = call("/all", t).await;
        assert_eq!(r.status, 403, "{reason:?}");
        assert_eq!(failures(&gw, "all", Method::Jwt, reason), before + 1);
    }
}

/// A request (path, headers) and the answer expected: status and
/// `WWW-Authenticate` values.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16, &'a [&'a str]);

/// `WWW-Authenticate` values of a reply, in order.
fn challenges(r: &client::Reply) -> Vec<&str> {
    r.headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

#[tokio::test]
async fn only_401s_and_a_bearer_tokens_missing_scope_carry_a_challenge() {
    let up = upstream::echo().await;
    let routes = [
        // No `auth` step: the access policy's challenge scheme defaults to
        // Bearer, which must not leak into its 403.
        route("ip-only", "", "{ip_deny: [127.0.0.1]}"),
        route("jwt-ip", JWT, "{ip_deny: [127.0.0.1]}"),
        route("key-ip", API_KEY, "{ip_deny: [127.0.0.1]}"),
        route(
            "anon-ip",
            "{methods: [{jwt: {issuers: [main]}}], anonymous: true}",
            "{ip_deny: [127.0.0.1]}",
        ),
        route("jwt-consumer", JWT, "{consumers: [partner]}"),
        route("key-consumer", API_KEY, "{groups: [partners]}"),
        route("jwt-role", JWT, "{roles: [admin]}"),
        route("jwt-claim", JWT, "{claims: {tenant: acme}}"),
        route("jwt-scope", JWT, "{scopes: [write]}"),
        route("key-scope", API_KEY, "{scopes: [write]}"),
        route(
            "anon-scope",
            "{methods: [{jwt: {issuers: [main]}}], anonymous: true}",
            "{scopes: [write]}",
        ),
        route(
            "anon-key",
            "{methods: [{api_key: {header: x-api-key}}, {jwt: {issuers: [main]}}], anonymous: true}",
            "{consumers: [app]}",
        ),
    ]
    .concat();
    let gw = start_jwt(up.addr, &routes).await;
    let token = bearer_jwt(json!({"scope": "read"}));
    let jwt_h = [("authorization", token.as_str())];
    let key_h = [("x-api-key", APP_KEY)];
    let none: [(&str, &str); 0] = [];
    let insufficient = "Bearer realm=\"portico\", error=\"insufficient_scope\", error_description=\"the token lacks a required scope\"";
    let cases: [Case; 13] = [
        ("/ip-only", &none, 403, &[]),
        ("/jwt-ip", &jwt_h, 403, &[]),
        ("/key-ip", &key_h, 403, &[]),
        ("/anon-ip", &none, 403, &[]),
        ("/jwt-consumer", &jwt_h, 403, &[]),
        ("/key-consumer", &key_h, 403, &[]),
        ("/jwt-role", &jwt_h, 403, &[]),
        ("/jwt-claim", &jwt_h, 403, &[]),
        ("/jwt-scope", &jwt_h, 403, &[insufficient]),
        // An API key has no scopes: refused, but no bearer token would help
        // this caller's key.
        ("/key-scope", &key_h, 403, &[]),
        // No credentials: 401 with the auth step's first scheme.
        ("/anon-scope", &none, 401, &["Bearer realm=\"portico\""]),
        ("/anon-key", &none, 401, &["ApiKey realm=\"portico\""]),
        // A bad credential: the auth step's 401 with its own challenge.
        (
            "/jwt-role",
            &[("authorization", "Bearer x.y.z")],
            401,
            &["Bearer realm=\"portico\", error=\"invalid_token\", error_description=\"the credentials are not valid\""],
        ),
    ];
    for (path, headers, status, want) in cases {
        let r = send(&gw, path, headers).await;
        assert_eq!(r.status.as_u16(), status, "{path}: {}", r.text());
        assert_eq!(challenges(&r), want, "{path}");
    }
    assert_eq!(up.hits(), 0);
    for (route, method, reason) in [
        ("ip-only", Method::Anonymous, Reason::IpDenied),
        ("jwt-ip", Method::Jwt, Reason::IpDenied),
        ("key-ip", Method::ApiKey, Reason::IpDenied),
        ("anon-ip", Method::Anonymous, Reason::IpDenied),
        ("jwt-consumer", Method::Jwt, Reason::ConsumerDenied),
        ("key-consumer", Method::ApiKey, Reason::ConsumerDenied),
        ("jwt-role", Method::Jwt, Reason::MissingRole),
        ("jwt-claim", Method::Jwt, Reason::ClaimMismatch),
        ("jwt-scope", Method::Jwt, Reason::InsufficientScope),
        ("key-scope", Method::ApiKey, Reason::InsufficientScope),
        ("anon-scope", Method::Anonymous, Reason::Missing),
        ("anon-key", Method::Anonymous, Reason::Missing),
    ] {
        assert_eq!(failures(&gw, route, method, reason), 1, "{route}");
    }
    // gRPC callers get the same decisions as statuses.
    let r = client::send(
        Request::post(gw.url("/jwt-role"))
            .header("content-type", "application/grpc")
            .header("authorization", &token)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.header("grpc-status"), Some("7"));
    assert!(r.header("www-authenticate").is_none());
}

#[tokio::test]
async fn ip_allow_and_deny_lists_for_ipv4_and_ipv6() {
    let up = upstream::echo().await;
    let routes = [
        route(
            "office",
            "",
            "{ip_allow: [10.0.0.0/8, '2001:db8::/32'], ip_deny: [10.6.6.0/24, '2001:db8:bad::/48']}",
        ),
        route("blocklist", "", "{ip_deny: [192.0.2.0/24, '2001:db8::/32']}"),
    ]
    .concat();
    // The test client connects from 127.0.0.1, a trusted proxy: the client
    // address is taken from X-Forwarded-For.
    let (gw, _idp) = start(up.addr, "    trusted_proxies: [127.0.0.1/32]\n", &routes).await;
    for (path, client, ok) in [
        ("/office", "10.1.2.3", true),
        ("/office", "10.6.6.7", false),
        ("/office", "192.0.2.1", false),
        ("/office", "2001:db8::5", true),
        ("/office", "2001:db8:bad::5", false),
        ("/office", "2001:db9::1", false),
        ("/blocklist", "198.51.100.1", true),
        ("/blocklist", "192.0.2.77", false),
        ("/blocklist", "2001:db8:1::1", false),
        ("/blocklist", "2001:db9::1", true),
    ] {
        let r = send(&gw, path, &[("x-forwarded-for", client)]).await;
        if ok {
            assert_eq!(r.status, 200, "{path} from {client}: {}", r.text());
        } else {
            assert_forbidden(&r, &format!("{path} from {client}"));
        }
    }
    assert_eq!(
        failures(&gw, "office", Method::Anonymous, Reason::IpDenied),
        4
    );

    // Without the trusted proxy, X-Forwarded-For is not believed: the
    // client is 127.0.0.1, outside the allow list.
    let (gw, _idp) = start(up.addr, "", &routes).await;
    assert_forbidden(
        &send(&gw, "/office", &[("x-forwarded-for", "10.1.2.3")]).await,
        "untrusted XFF",
    );
    assert_eq!(
        send(&gw, "/blocklist", &[("x-forwarded-for", "192.0.2.77")])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn spoofed_consumer_headers_never_reach_the_upstream() {
    let up = upstream::echo().await;
    let routes = format!(
        "{}  - name: open\n    match: {{path_prefix: /open}}\n    action: {{proxy: {{upstream: up}}}}\n",
        route("only-app", API_KEY, "{consumers: [app]}")
    );
    let (gw, _idp) = start(up.addr, "", &routes).await;
    let spoof = [
        ("x-consumer-id", "admin"),
        ("x-consumer-groups", "root"),
        ("x-consumer-plan", "unlimited"),
        ("x-auth-method", "mtls"),
    ];
    let mut with_key = spoof.to_vec();
    with_key.push(("x-api-key", APP_KEY));
    let r = send(&gw, "/only-app", &with_key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(h["x-consumer-id"], json!(["app"]));
    assert_eq!(h["x-auth-method"], json!(["api_key"]));
    assert!(h.get("x-consumer-groups").is_none(), "{h}");
    assert!(h.get("x-consumer-plan").is_none(), "{h}");
    assert!(h.get("x-api-key").is_none(), "the key is stripped: {h}");

    // A route without auth: the client's consumer headers are removed.
    let r = send(&gw, "/open", &spoof).await;
    let h = &r.json()["headers"];
    for (k, _) in spoof {
        assert!(h.get(k).is_none(), "{k} reached the upstream: {h}");
    }
}

#[tokio::test]
async fn anonymous_callers_are_challenged_by_identity_rules() {
    let up = upstream::echo().await;
    let routes = [
        route(
            "anon-key",
            "{methods: [{api_key: {header: x-api-key}}], anonymous: true}",
            "{consumers: [app]}",
        ),
        route(
            "anon-token",
            "{methods: [{introspection: {server: idp}}], anonymous: true}",
            "{scopes: [read]}",
        ),
        route(
            "anon-ip",
            "{methods: [{api_key: {header: x-api-key}}], anonymous: true}",
            "{ip_allow: [127.0.0.1]}",
        ),
    ]
    .concat();
    let (gw, _idp) = start(up.addr, "", &routes).await;
    let r = send(&gw, "/anon-key", &[]).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    assert_eq!(
        r.header("www-authenticate"),
        Some("ApiKey realm=\"portico\"")
    );
    let r = send(&gw, "/anon-token", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"portico\"")
    );
    assert_eq!(
        failures(&gw, "anon-key", Method::Anonymous, Reason::Missing),
        1
    );
    // IP rules alone admit an anonymous caller.
    assert_eq!(send(&gw, "/anon-ip", &[]).await.status, 200);
    // With the key, it passes.
    let r = send(&gw, "/anon-key", &[("x-api-key", APP_KEY)]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn group_access_rules_apply_to_every_member_route() {
    let up = upstream::echo().await;
    let server = idp::start().await;
    let yaml = Config {
        idp: server.addr,
        up: up.addr,
        listener_extra: "",
        consumers: &consumers(),
        server_extra: "",
        more_servers: "",
        routes: "  - name: member\n    group: partners-only\n    match: {path_prefix: /member}\n    action: {proxy: {upstream: up}}\n",
    }
    .yaml()
        + &format!("route_groups:\n  - name: partners-only\n    policies:\n      - auth: {API_KEY}\n      - access: {{groups: [partners]}}\n");
    let gw = gateway(&yaml).await;
    assert_eq!(
        send(&gw, "/member", &[("x-api-key", PARTNER_KEY)])
            .await
            .status,
        200
    );
    assert_forbidden(
        &send(&gw, "/member", &[("x-api-key", APP_KEY)]).await,
        "not a partner",
    );
}

fn errors(text: &str) -> String {
    let loaded = portico::config::parse_str("t.yaml", text, |_| None).unwrap();
    match portico::snapshot::compile(&loaded, None) {
        Ok(_) => panic!("expected errors:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configuration_errors_name_their_keys() {
    let text = format!(
        "listeners: [{{name: main, address: '127.0.0.1:0'}}]
consumers:
{}routes:
  - name: r
    policies:
      - access: {{scopes: [read]}}
      - auth: {API_KEY}
      - access: {{consumers: [app, ghost], groups: [nobody], ip_allow: [10.0.0.0/33], ip_deny: [nope], claims: {{tenant: {{a: 1}}}}}}
      - access: {{}}
    action: {{respond: {{status: 200}}}}
  - name: ip-only
    policies:
      - access: {{ip_deny: ['::1']}}
    action: {{respond: {{status: 200}}}}
",
        consumers()
    );
    let e = errors(&text);
    for want in [
        "routes[0].policies[0].access: its consumers, groups, scopes, roles or claims rules need an identity, but no `auth` step runs before it",
        "routes[0].policies[2].access.consumers[1]: no consumer has the id `ghost`",
        "routes[0].policies[2].access.groups[0]: no consumer is in group `nobody`",
        "routes[0].policies[2].access.ip_allow[0]: `10.0.0.0/33`: prefix length must be 0..=32",
        "routes[0].policies[2].access.ip_deny[0]: `nope` is not an IP address or CIDR",
        "routes[0].policies[2].access.claims.tenant: must be a string, a number or a boolean",
        "routes[0].policies[3].access: names no rule",
    ] {
        assert!(e.contains(want), "missing `{want}` in:\n{e}");
    }
    assert!(!e.contains("routes[1]"), "IP rules need no auth:\n{e}");
    assert!(!e.contains("consumers[0]: no consumer"), "{e}");
}
