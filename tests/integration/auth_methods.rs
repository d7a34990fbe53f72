//! Several methods on one `auth` step (API key, JWT, introspection), with
//! and without anonymous access: each method alone identifies the caller,
//! the first method whose credential is present decides (a bad credential
//! is refused, never handed to the next method), an opaque bearer token
//! goes past the JWT method to introspection, and a request without any
//! credential gets one challenge per scheme.

use super::support::introspection::{self as idp, bearer_claims, SECRET_REF};
use super::support::jwt::{self as jwt, claims_with};
use super::support::{client, gateway, upstream, TestGateway};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use portico::auth::{sha256_hex, Method, Reason};
use serde_json::json;

const APP_KEY: &str = "app-key-0123456789abcdef";

/// Routes, each `/NAME`, with the given `auth` step.
const ROUTES: &[(&str, &str)] = &[
    (
        "keys-first",
        "{methods: [{api_key: {header: x-api-key}}, {jwt: {issuers: [main]}}, {introspection: {server: idp}}]}",
    ),
    (
        "jwt-first",
        "{methods: [{jwt: {issuers: [main]}}, {introspection: {server: idp}}, {api_key: {header: x-api-key}}]}",
    ),
    (
        "introspection-first",
        "{methods: [{introspection: {server: idp}}, {jwt: {issuers: [main]}}]}",
    ),
    (
        "anonymous",
        "{methods: [{api_key: {header: x-api-key}}, {jwt: {issuers: [main]}}, {introspection: {server: idp}}], anonymous: true}",
    ),
];

async fn start(up: std::net::SocketAddr, idp: std::net::SocketAddr) -> TestGateway {
    let mut routes = String::new();
    for (name, auth) in ROUTES {
        routes.push_str(&format!(
            "  - name: {name}\n    match: {{path_prefix: /{name}}}\n    policies:\n      - auth: {auth}\n    action: {{proxy: {{upstream: up}}}}\n"
        ));
    }
    gateway(&format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{{address: "{up}"}}]
consumers:
  - id: app
    credentials: {{api_keys: [{{sha256: {key}}}]}}
auth:
  jwt_issuers:
{issuer}  introspection:
    - name: idp
      url: http://{idp}/introspect
      client_id: gateway
      client_secret: {SECRET_REF}
routes:
{routes}"#,
        key = sha256_hex(APP_KEY.as_bytes()),
        issuer = jwt::issuer(""),
    ))
    .await
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

fn challenges(r: &client::Reply) -> Vec<&str> {
    r.headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

/// The upstream's view of the request: (x-auth-method, x-consumer-id).
fn who(r: &client::Reply) -> (String, Option<String>) {
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    (
        h["x-auth-method"][0].as_str().unwrap().to_string(),
        h["x-consumer-id"][0].as_str().map(String::from),
    )
}

fn good_jwt() -> String {
    format!(
        "Bearer {}",
        jwt::rs256("rsa-1", &claims_with(json!({"scope": "read"})))
    )
}

/// A JWT with the issuer's `kid`, signed by another key.
fn bad_jwt() -> String {
    let forged = jwt::sign(
        jsonwebtoken::Algorithm::RS256,
        Some("rsa-1"),
        &jwt::keys().attacker.sign,
        &claims_with(json!({})),
    );
    format!("Bearer {forged}")
}

fn opaque_token() -> String {
    bearer_claims(json!({"sub": "svc-7"}))
}

const INACTIVE: &str = "Bearer inactive";

#[tokio::test]
async fn each_method_alone_authenticates() {
    let up = upstream::echo().await;
    let server = idp::start().await;
    let gw = start(up.addr, server.addr).await;
    for route in ["/keys-first", "/jwt-first", "/anonymous"] {
        let r = send(&gw, route, &[("x-api-key", APP_KEY)]).await;
        assert_eq!(who(&r), ("api_key".into(), Some("app".into())), "{route}");
        assert!(r.json()["headers"].get("x-api-key").is_none(), "stripped");

        let r = send(&gw, route, &[("authorization", good_jwt().as_str())]).await;
        assert_eq!(who(&r), ("jwt".into(), None), "{route}");
        assert!(r.json()["headers"].get("authorization").is_none());

        // An opaque token: the JWT method leaves it to introspection.
        let r = send(&gw, route, &[("authorization", opaque_token().as_str())]).await;
        assert_eq!(who(&r), ("introspection".into(), None), "{route}");
        assert!(r.json()["headers"].get("authorization").is_none());
    }
    // Only the opaque tokens were introspected (one call, then cached).
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn the_first_method_with_a_credential_decides() {
    let up = upstream::echo().await;
    let server = idp::start().await;
    let gw = start(up.addr, server.addr).await;
    let (token, key) = (good_jwt(), APP_KEY);
    let both = [("authorization", token.as_str()), ("x-api-key", key)];
    // Two valid credentials: the method listed first identifies the caller,
    // and every listed method's credential is stripped.
    let r = send(&gw, "/keys-first", &both).await;
    assert_eq!(who(&r), ("api_key".into(), Some("app".into())));
    let h = &r.json()["headers"];
    assert!(h.get("authorization").is_none() && h.get("x-api-key").is_none());
    let r = send(&gw, "/jwt-first", &both).await;
    assert_eq!(who(&r), ("jwt".into(), None));

    // A JWT on a route that lists introspection first is introspected (and
    // is not an active token there).
    let r = send(
        &gw,
        "/introspection-first",
        &[("authorization", token.as_str())],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(server.hits(), 1);
    assert_eq!(
        failures(
            &gw,
            "introspection-first",
            Method::Introspection,
            Reason::Inactive
        ),
        1
    );
    // On the other routes the JWT method takes JWTs, so introspection is
    // never asked about them.
    for route in ["/keys-first", "/jwt-first"] {
        let r = send(&gw, route, &[("authorization", token.as_str())]).await;
        assert_eq!(who(&r), ("jwt".into(), None), "{route}");
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn a_bad_credential_is_refused_even_beside_a_valid_one() {
    let up = upstream::echo().await;
    let server = idp::start().await;
    let gw = start(up.addr, server.addr).await;
    let token = good_jwt();
    let invalid_token = "Bearer realm=\"portico\", error=\"invalid_token\", error_description=\"the credentials are not valid\"";
    let api_key = "ApiKey realm=\"portico\"";

    // keys-first: a wrong key decides before the valid JWT is looked at.
    let r = send(
        &gw,
        "/keys-first",
        &[("x-api-key", "wrong-key"), ("authorization", &token)],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(challenges(&r), [api_key]);
    assert_eq!(
        failures(&gw, "keys-first", Method::ApiKey, Reason::UnknownKey),
        1
    );
    // ...but a valid key decides before a bad token is looked at.
    for bad in [bad_jwt().as_str(), INACTIVE] {
        let r = send(
            &gw,
            "/keys-first",
            &[("x-api-key", APP_KEY), ("authorization", bad)],
        )
        .await;
        assert_eq!(who(&r), ("api_key".into(), Some("app".into())), "{bad}");
    }

    // jwt-first: a bad JWT is refused although the key is valid, and it is
    // never handed to introspection.
    let r = send(
        &gw,
        "/jwt-first",
        &[
            ("authorization", bad_jwt().as_str()),
            ("x-api-key", APP_KEY),
        ],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(challenges(&r), [invalid_token]);
    assert_eq!(
        failures(&gw, "jwt-first", Method::Jwt, Reason::BadSignature),
        1
    );
    // An inactive opaque token: introspection refuses it; the key after
    // it is not tried.
    let r = send(
        &gw,
        "/jwt-first",
        &[("authorization", INACTIVE), ("x-api-key", APP_KEY)],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(challenges(&r), [invalid_token]);
    assert_eq!(
        failures(&gw, "jwt-first", Method::Introspection, Reason::Inactive),
        1
    );

    // Anonymous access does not rescue a bad credential of any method.
    let bad = bad_jwt();
    for headers in [
        [("x-api-key", "wrong-key")],
        [("authorization", bad.as_str())],
        [("authorization", INACTIVE)],
    ] {
        let r = send(&gw, "/anonymous", &headers).await;
        assert_eq!(r.status, 401, "{headers:?}");
    }
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn no_credential_gets_one_challenge_per_scheme_or_passes_as_anonymous() {
    let up = upstream::echo().await;
    let server = idp::start().await;
    let gw = start(up.addr, server.addr).await;
    // The scheme of each method, in the order of the methods, each once
    // (JWT and introspection are both Bearer).
    for (route, want) in [
        (
            "/keys-first",
            ["ApiKey realm=\"portico\"", "Bearer realm=\"portico\""],
        ),
        (
            "/jwt-first",
            ["Bearer realm=\"portico\"", "ApiKey realm=\"portico\""],
        ),
    ] {
        let r = send(&gw, route, &[]).await;
        assert_eq!(r.status, 401, "{route}");
        assert_eq!(r.json()["error"]["code"], "unauthorized");
        assert_eq!(challenges(&r), want, "{route}");
    }
    let r = send(&gw, "/introspection-first", &[]).await;
    assert_eq!(challenges(&r), ["Bearer realm=\"portico\""]);
    assert_eq!(
        failures(&gw, "keys-first", Method::ApiKey, Reason::Missing),
        1
    );
    assert_eq!(failures(&gw, "jwt-first", Method::Jwt, Reason::Missing), 1);

    // With anonymous access: passes, as the consumer `anonymous`.
    let r = send(&gw, "/anonymous", &[("x-consumer-id", "app")]).await;
    assert_eq!(who(&r), ("anonymous".into(), Some("anonymous".into())));
    assert_eq!(up.hits(), 1);
    assert_eq!(server.hits(), 0);
}
