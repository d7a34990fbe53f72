//! JWT authentication: every algorithm, keys from PEM and JWKS files, JWKS
//! from a live loopback server that rotates keys (picked up on an unknown
//! `kid` and by the periodic refresh) and goes down, the token sources, the
//! cache, and one test per attack. Scope, role and claim rules for JWT
//! callers are in `access.rs`, several methods on one route in
//! `auth_methods.rs`.

use super::support::jwt::{keys, now, rs256, sign, ISS};
use super::support::{client, eventually, metrics, upstream};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use portico::auth::{Method, Reason};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "a-test-hmac-secret-of-at-least-32-bytes";

// ---------------------------------------------------------------- tokens

fn claims() -> Value {
    json!({"iss": ISS, "aud": "api", "sub": "user-1", "exp": now() + 600,
           "iat": now(), "scope": "feed.read feed.write", "azp": "web"})
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

// ---------------------------------------------------------------- gateway

/// Starts a gateway from YAML with `${JWT_SECRET}` set.
async fn gateway(yaml: &str) -> super::support::TestGateway {
    super::support::gateway_with_env(yaml, &[("JWT_SECRET", SECRET)]).await
}

/// The compile errors of a configuration (empty when it compiles).
fn config_errors(yaml: &str) -> String {
    let loaded = match portico::config::parse_str("test.yaml", yaml, |n| {
        (n == "JWT_SECRET").then(|| SECRET.to_string())
    }) {
        Ok(l) => l,
        Err(e) => return e.to_string(),
    };
    match portico::snapshot::compile(&loaded, None) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// An issuer `main` with the RSA key inline, a route `api` (jwt from
/// `Authorization: Bearer`, `sub` → `X-User-Id`) proxying to `up`.
fn config(up: std::net::SocketAddr, issuer_extra: &str, method_extra: &str) -> String {
    let jwk = keys().rsa.jwk.to_string();
    format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{{address: "{up}"}}]
auth:
  jwt_issuers:
    - name: main
      issuer: {ISS}
      audiences: [api]
      algorithms: [RS256]
      keys:
        - jwk: {jwk}
{issuer_extra}
routes:
  - name: api
    policies:
      - auth:
          methods:
            - jwt: {{issuers: [main]{method_extra}}}
          claims_to_headers: {{sub: X-User-Id}}
    action: {{proxy: {{upstream: up}}}}
"#
    )
}

async fn call(gw: &super::support::TestGateway, token: Option<&str>) -> client::Reply {
    let mut b = Request::get(gw.url("/x"));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    client::send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// Refusals of the `api` route counted under `reason`.
fn refused(gw: &super::support::TestGateway, reason: Reason) -> u64 {
    let snap = gw.running.shared.snapshot.load();
    let route = snap.routes.iter().find(|r| &*r.name == "api").unwrap();
    route
        .metrics
        .auth_failures(Method::Jwt.index(), reason.index())
}

/// Asserts a 401 with an `invalid_token` challenge, counted as `reason`.
async fn assert_refused(gw: &super::support::TestGateway, token: &str, reason: Reason) {
    let before = refused(gw, reason);
    let r = call(gw, Some(token)).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let c = r.header("www-authenticate").unwrap();
    assert!(c.starts_with("Bearer realm=\"portico\""), "{c}");
    assert!(c.contains("error=\"invalid_token\""), "{c}");
    assert_eq!(refused(gw, reason), before + 1, "not refused as {reason:?}");
}

async fn echo_gateway() -> (upstream::TestUpstream, super::support::TestGateway) {
    let up = upstream::echo().await;
    let gw = gateway(&config(up.addr, "", "")).await;
    // The control: a good token passes.
    assert_eq!(
        call(&gw, Some(&rs256("rsa-1", &claims()))).await.status,
        200
    );
    (up, gw)
}

// ---------------------------------------------------------------- a JWKS server

struct JwksServer {
    up: upstream::TestUpstream,
    doc: Arc<Mutex<Value>>,
    down: Arc<AtomicBool>,
}

impl JwksServer {
    async fn start(keys: &[&Value]) -> JwksServer {
        let doc = Arc::new(Mutex::new(json!({ "keys": keys })));
        let down = Arc::new(AtomicBool::new(false));
        let (d, dn) = (doc.clone(), down.clone());
        let up = upstream::start(move |_req| {
            let body = d.lock().unwrap().to_string();
            let down = dn.load(Ordering::SeqCst);
            async move {
                if down {
                    upstream::response(503, "down")
                } else {
                    upstream::response(200, body)
                }
            }
        })
        .await;
        JwksServer { up, doc, down }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.up.addr)
    }

    fn serve(&self, keys: &[&Value]) {
        *self.doc.lock().unwrap() = json!({ "keys": keys });
    }
}

fn jwks_config(up: std::net::SocketAddr, url: &str, min_refresh: &str) -> String {
    format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{{address: "{up}"}}]
auth:
  jwt_issuers:
    - name: main
      issuer: {ISS}
      algorithms: [RS256]
      jwks_url: {url}
      jwks_refresh: 1h
      jwks_min_refresh: {min_refresh}
routes:
  - name: api
    policies:
      - auth:
          methods:
            - jwt: {{issuers: [main]}}
    action: {{proxy: {{upstream: up}}}}
"#
    )
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn every_algorithm_verifies() {
    let k = keys();
    let up = upstream::echo().await;
    let yaml = format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{{address: "{}"}}]
auth:
  jwt_issuers:
    - name: all
      issuer: {ISS}
      algorithms: [HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA]
      keys:
        - {{kid: hs, secret: "${{JWT_SECRET}}"}}
        - jwk: {}
        - kid: ec256
          pem: |
{}
        - jwk: {}
        - jwk: {}
routes:
  - name: api
    policies:
      - auth: {{methods: [{{jwt: {{issuers: [all]}}}}]}}
    action: {{proxy: {{upstream: up}}}}
"#,
        up.addr,
        k.rsa.jwk,
        k.ec256
            .pem
            .lines()
            .map(|l| format!("            {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
        k.ec384.jwk,
        k.ed.jwk,
    );
    let gw = gateway(&yaml).await;
    let hmac = EncodingKey::from_secret(SECRET.as_bytes());
    use Algorithm::*;
    let cases: [(Algorithm, &str, &EncodingKey); 12] = [
        (HS256, "hs", &hmac),
        (HS384, "hs", &hmac),
        (HS512, "hs", &hmac),
        (RS256, "rsa-1", &k.rsa.sign),
        (RS384, "rsa-1", &k.rsa.sign),
        (RS512, "rsa-1", &k.rsa.sign),
        (PS256, "rsa-1", &k.rsa.sign),
        (PS384, "rsa-1", &k.rsa.sign),
        (PS512, "rsa-1", &k.rsa.sign),
        (ES256, "ec256", &k.ec256.sign),
        (ES384, "ec384", &k.ec384.sign),
        (EdDSA, "ed", &k.ed.sign),
    ];
    for (alg, kid, key) in cases {
        let t = sign(alg, Some(kid), key, &claims());
        let r = call(&gw, Some(&t)).await;
        assert_eq!(r.status, 200, "{alg:?}: {}", r.text());
        assert_eq!(r.json()["headers"]["x-auth-method"][0], "jwt");
        // The same token signed by the wrong key of the same family fails.
        if matches!(alg, RS256 | PS256) {
            let bad = sign(alg, Some(kid), &k.attacker.sign, &claims());
            assert_eq!(call(&gw, Some(&bad)).await.status, 401, "{alg:?}");
        }
    }
    // Without a kid, every key of the algorithm's family is tried.
    let t = sign(ES384, None, &k.ec384.sign, &claims());
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
}

#[tokio::test]
async fn attack_alg_none() {
    let (_up, gw) = echo_gateway().await;
    let t = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims())
    );
    assert_refused(&gw, &t, Reason::BadAlgorithm).await;
    let t = format!("{}.{}.", b64(&json!({"alg": "None"})), b64(&claims()));
    assert_refused(&gw, &t, Reason::BadAlgorithm).await;
}

#[tokio::test]
async fn attack_rs256_public_key_as_hs256_secret() {
    let up = upstream::echo().await;
    // Even an issuer that allows both algorithms never uses its RSA key as
    // an HMAC secret.
    let yaml = config(up.addr, "", "").replace("[RS256]", "[RS256, HS256]");
    let gw = gateway(&yaml).await;
    let k = keys();
    for secret in [
        k.rsa.pem.as_bytes(),
        k.rsa.jwk["n"].as_str().unwrap().as_bytes(),
    ] {
        let t = sign(
            Algorithm::HS256,
            Some("rsa-1"),
            &EncodingKey::from_secret(secret),
            &claims(),
        );
        assert_refused(&gw, &t, Reason::BadAlgorithm).await;
    }
    // With only RS256 allowed, HS256 is refused outright.
    let (_up2, strict) = echo_gateway().await;
    let t = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(k.rsa.pem.as_bytes()),
        &claims(),
    );
    assert_refused(&strict, &t, Reason::BadAlgorithm).await;
}

#[tokio::test]
async fn attack_stripped_signature() {
    let (_up, gw) = echo_gateway().await;
    let t = rs256("rsa-1", &claims());
    let unsigned = format!("{}.", t.rsplit_once('.').unwrap().0);
    assert_refused(&gw, &unsigned, Reason::BadSignature).await;
}

#[tokio::test]
async fn attack_tampered_payload() {
    let (_up, gw) = echo_gateway().await;
    let t = rs256("rsa-1", &claims());
    let parts: Vec<&str> = t.split('.').collect();
    let mut c = claims();
    c["sub"] = json!("admin");
    let forged = format!("{}.{}.{}", parts[0], b64(&c), parts[2]);
    assert_refused(&gw, &forged, Reason::BadSignature).await;
}

#[tokio::test]
async fn attack_expired_token() {
    let (_up, gw) = echo_gateway().await;
    let mut c = claims();
    c["exp"] = json!(now() - 120);
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::Expired).await;
    let r = call(&gw, Some(&rs256("rsa-1", &c))).await;
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("error_description=\"the token has expired\""));
}

#[tokio::test]
async fn attack_future_nbf() {
    let (_up, gw) = echo_gateway().await;
    let mut c = claims();
    c["nbf"] = json!(now() + 600);
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::NotYetValid).await;
    let mut c = claims();
    c["iat"] = json!(now() + 600);
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::NotYetValid).await;
}

#[tokio::test]
async fn attack_wrong_issuer() {
    let (_up, gw) = echo_gateway().await;
    let mut c = claims();
    c["iss"] = json!("https://evil.test");
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::WrongIssuer).await;
}

#[tokio::test]
async fn attack_wrong_audience() {
    let (_up, gw) = echo_gateway().await;
    let mut c = claims();
    c["aud"] = json!(["other", "another"]);
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::WrongAudience).await;
    c.as_object_mut().unwrap().remove("aud");
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::WrongAudience).await;
    let mut c = claims();
    c["aud"] = json!(["other", "api"]);
    assert_eq!(call(&gw, Some(&rs256("rsa-1", &c))).await.status, 200);
}

#[tokio::test]
async fn attack_unknown_kid() {
    let (_up, gw) = echo_gateway().await;
    assert_refused(&gw, &rs256("rsa-9", &claims()), Reason::UnknownKid).await;
}

#[tokio::test]
async fn attack_kid_path_traversal() {
    let (_up, gw) = echo_gateway().await;
    for kid in ["../../../../etc/passwd", "../rsa-1", "rsa-1/../rsa-1"] {
        assert_refused(&gw, &rs256(kid, &claims()), Reason::UnknownKid).await;
    }
}

/// The attacker's own JWKS, on loopback: it must never be requested.
async fn attacker_jwks() -> JwksServer {
    JwksServer::start(&[&keys().attacker.jwk]).await
}

#[tokio::test]
async fn attack_jku_header_is_never_fetched() {
    let (_up, gw) = echo_gateway().await;
    let evil = attacker_jwks().await;
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("evil".into());
    h.jku = Some(evil.url());
    let t = encode(&h, &claims(), &keys().attacker.sign).unwrap();
    assert_refused(&gw, &t, Reason::UnknownKid).await;
    // Same kid as the real key: the real key is used, not the attacker's.
    h.kid = Some("rsa-1".into());
    let t = encode(&h, &claims(), &keys().attacker.sign).unwrap();
    assert_refused(&gw, &t, Reason::BadSignature).await;
    assert_eq!(evil.up.hits(), 0);
    assert_eq!(evil.up.connections(), 0);
}

#[tokio::test]
async fn attack_x5u_header_is_never_fetched() {
    let (_up, gw) = echo_gateway().await;
    let evil = attacker_jwks().await;
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    h.x5u = Some(evil.url());
    let t = encode(&h, &claims(), &keys().attacker.sign).unwrap();
    assert_refused(&gw, &t, Reason::BadSignature).await;
    assert_eq!(evil.up.connections(), 0);
}

#[tokio::test]
async fn attack_embedded_jwk_is_never_trusted() {
    let (_up, gw) = echo_gateway().await;
    let k = keys();
    for kid in ["evil", "rsa-1"] {
        let head = json!({"alg": "RS256", "kid": kid, "jwk": k.attacker.jwk,
                          "x5c": ["MIIB"], "jku": "http://127.0.0.1:9/jwks"});
        let h: Header = serde_json::from_value(head).unwrap();
        let t = encode(&h, &claims(), &k.attacker.sign).unwrap();
        let reason = if kid == "evil" {
            Reason::UnknownKid
        } else {
            Reason::BadSignature
        };
        assert_refused(&gw, &t, reason).await;
    }
}

#[tokio::test]
async fn attack_oversized_token() {
    let up = upstream::echo().await;
    let gw = gateway(&config(up.addr, "      max_token_size: 2KiB\n", "")).await;
    let mut c = claims();
    c["pad"] = json!("x".repeat(2048));
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::TooLarge).await;
    // Refused before parsing: not even JWT-shaped.
    assert_refused(&gw, &"%".repeat(4096), Reason::TooLarge).await;
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn attack_token_signed_with_another_issuers_key() {
    let up = upstream::echo().await;
    let k = keys();
    let other = format!(
        "    - name: other\n      issuer: https://other.test\n      algorithms: [RS256]\n      keys: [{{jwk: {}}}]\n",
        k.rsa2.jwk
    );
    let gw = gateway(&config(up.addr, &other, "").replace("[main]", "[main, other]")).await;
    // Claims `main` but is signed by `other`'s key (kid and all).
    let t = sign(Algorithm::RS256, Some("rsa-2"), &k.rsa2.sign, &claims());
    assert_refused(&gw, &t, Reason::UnknownKid).await;
    let t = sign(Algorithm::RS256, Some("rsa-1"), &k.rsa2.sign, &claims());
    assert_refused(&gw, &t, Reason::BadSignature).await;
    // `other`'s own token passes.
    let mut c = claims();
    c["iss"] = json!("https://other.test");
    let t = sign(Algorithm::RS256, Some("rsa-2"), &k.rsa2.sign, &c);
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
}

#[tokio::test]
async fn non_jwt_bearer_token_is_malformed() {
    let (_up, gw) = echo_gateway().await;
    assert_refused(&gw, "an-opaque-token", Reason::Malformed).await;
    assert_refused(&gw, "a.b", Reason::Malformed).await;
}

#[tokio::test]
async fn jwks_rotation_and_outage() {
    let k = keys();
    let jwks = JwksServer::start(&[&k.rsa.jwk]).await;
    let up = upstream::echo().await;
    let gw = gateway(&jwks_config(up.addr, &jwks.url(), "0s")).await;
    let old = rs256("rsa-1", &claims());
    assert_eq!(call(&gw, Some(&old)).await.status, 200);
    assert_eq!(call(&gw, Some(&old)).await.status, 200, "cached");
    let fetched = jwks.up.hits();
    assert!(fetched >= 1);

    // Rotation: rsa-1 is withdrawn, rsa-2 published. The new kid is
    // fetched on first sight; the old token is refused though cached.
    jwks.serve(&[&k.rsa2.jwk]);
    let new = sign(Algorithm::RS256, Some("rsa-2"), &k.rsa2.sign, &claims());
    assert_eq!(call(&gw, Some(&new)).await.status, 200);
    assert_eq!(jwks.up.hits(), fetched + 1);
    assert_refused(&gw, &old, Reason::UnknownKid).await;

    // Outage: the last good set stays in use.
    jwks.down.store(true, Ordering::SeqCst);
    let hits = jwks.up.hits();
    assert_refused(&gw, &rs256("rsa-3", &claims()), Reason::UnknownKid).await;
    assert!(jwks.up.hits() > hits, "an unknown kid refetched");
    let fresh = sign(Algorithm::RS256, Some("rsa-2"), &k.rsa2.sign, &{
        let mut c = claims();
        c["jti"] = json!("another token, not cached");
        c
    });
    assert_eq!(call(&gw, Some(&fresh)).await.status, 200);
    let m = metrics::scrape(gw.running.admin_addr(), None).await;
    assert!(
        m.value(
            "portico_jwks_fetches_total",
            &[("issuer", "main"), ("result", "failed")]
        ) >= 1.0
    );
    assert!(
        m.value(
            "portico_jwks_fetches_total",
            &[("issuer", "main"), ("result", "ok")]
        ) >= 2.0
    );
    assert_eq!(m.value("portico_jwt_keys", &[("issuer", "main")]), 1.0);
}

/// Whether the issuer's fetched key set holds a key with `kid`.
fn fetched_kid(gw: &super::support::TestGateway, kid: &str) -> bool {
    let snap = gw.running.shared.snapshot.load();
    let issuer = snap.jwt_issuers.get("main").unwrap();
    let keys = issuer.remote_keys().unwrap();
    keys.iter().any(|k| k.kid.as_deref() == Some(kid))
}

#[tokio::test]
async fn periodic_refresh_picks_up_a_rotated_key_set() {
    let k = keys();
    let jwks = JwksServer::start(&[&k.rsa.jwk]).await;
    let up = upstream::echo().await;
    // `jwks_min_refresh: 1h`: an unknown `kid` cannot cause a fetch in this
    // test (the start-up fetch was less than an hour ago), and no token
    // with the new kid is sent before the new set is in force anyway. Only
    // the periodic refresh (`jwks_refresh: 1s`, the minimum) can fetch.
    let yaml =
        jwks_config(up.addr, &jwks.url(), "1h").replace("jwks_refresh: 1h", "jwks_refresh: 1s");
    let gw = gateway(&yaml).await;
    assert!(eventually(Duration::from_secs(10), || fetched_kid(&gw, "rsa-1")).await);
    let old = rs256("rsa-1", &claims());
    assert_eq!(call(&gw, Some(&old)).await.status, 200);
    assert_eq!(call(&gw, Some(&old)).await.status, 200, "cached");

    // Rotation at the provider; the gateway is not asked anything.
    jwks.serve(&[&k.rsa2.jwk]);
    assert!(
        eventually(Duration::from_secs(10), || fetched_kid(&gw, "rsa-2")
            && !fetched_kid(&gw, "rsa-1"))
        .await,
        "the periodic refresh never brought the rotated set"
    );
    let new = sign(Algorithm::RS256, Some("rsa-2"), &k.rsa2.sign, &claims());
    assert_eq!(call(&gw, Some(&new)).await.status, 200);
    // The withdrawn key's cached token is refused at once.
    assert_refused(&gw, &old, Reason::UnknownKid).await;
    let m = metrics::scrape(gw.running.admin_addr(), None).await;
    assert!(
        m.value(
            "portico_jwks_fetches_total",
            &[("issuer", "main"), ("result", "ok")]
        ) >= 2.0
    );
    assert_eq!(m.value("portico_jwt_keys", &[("issuer", "main")]), 1.0);

    // The provider goes down: periodic fetches fail, the last good set
    // stays in force.
    jwks.down.store(true, Ordering::SeqCst);
    let failed = || {
        let snap = gw.running.shared.snapshot.load();
        let issuer = snap.jwt_issuers.get("main").unwrap();
        issuer.stats.failed.load(Ordering::Relaxed)
    };
    assert!(eventually(Duration::from_secs(10), || failed() >= 1).await);
    let fresh = sign(Algorithm::RS256, Some("rsa-2"), &k.rsa2.sign, &{
        let mut c = claims();
        c["jti"] = json!("not cached");
        c
    });
    assert_eq!(call(&gw, Some(&fresh)).await.status, 200);
    assert!(fetched_kid(&gw, "rsa-2"));
}

/// The files of `key_files_verify_tokens`, written in `dir`.
fn write_key_files(dir: &std::path::Path, jwks: &[&Value]) {
    let k = keys();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/rsa-spki.pem"), &k.rsa.pem).unwrap();
    std::fs::write(
        dir.join("keys/rsa-pkcs1.pem"),
        k.rsa2.pkcs1_pem.as_ref().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("keys/ec256-cert.pem"),
        k.ec256.cert_pem.as_ref().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("keys/jwks.json"),
        json!({ "keys": jwks }).to_string(),
    )
    .unwrap();
}

#[tokio::test]
async fn pem_file_and_jwks_file_keys_verify_tokens() {
    let k = keys();
    let up = upstream::echo().await;
    let yaml = format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{{address: "{}"}}]
auth:
  jwt_issuers:
    - name: main
      issuer: {ISS}
      algorithms: [RS256, ES256, ES384, EdDSA]
      # Relative to the configuration file's directory.
      keys:
        - {{kid: rsa-1, pem_file: keys/rsa-spki.pem}}
        - {{kid: rsa-2, pem_file: keys/rsa-pkcs1.pem}}
        - {{kid: ec256, pem_file: keys/ec256-cert.pem}}
      jwks_file: keys/jwks.json
routes:
  - name: api
    policies:
      - auth: {{methods: [{{jwt: {{issuers: [main]}}}}]}}
    action: {{proxy: {{upstream: up}}}}
"#,
        up.addr
    );
    let path = super::support::temp_config("jwt", "key-files", &yaml);
    let dir = path.parent().unwrap();
    write_key_files(dir, &[&k.ec384.jwk, &k.ed.jwk]);
    let gw = super::support::start_file(&path).await;
    let ec384 = sign(Algorithm::ES384, Some("ec384"), &k.ec384.sign, &claims());
    let ed = sign(Algorithm::EdDSA, Some("ed"), &k.ed.sign, &claims());
    for (what, t) in [
        ("pem_file, PUBLIC KEY", rs256("rsa-1", &claims())),
        (
            "pem_file, RSA PUBLIC KEY",
            sign(Algorithm::RS256, Some("rsa-2"), &k.rsa2.sign, &claims()),
        ),
        (
            "pem_file, CERTIFICATE",
            sign(Algorithm::ES256, Some("ec256"), &k.ec256.sign, &claims()),
        ),
        ("jwks_file, EC P-384", ec384.clone()),
        ("jwks_file, Ed25519", ed.clone()),
    ] {
        let r = call(&gw, Some(&t)).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(r.json()["headers"]["x-auth-method"][0], "jwt", "{what}");
    }
    // Each file's key verifies only its own signatures.
    let forged = sign(Algorithm::RS256, Some("rsa-1"), &k.attacker.sign, &claims());
    assert_refused(&gw, &forged, Reason::BadSignature).await;
    let forged = sign(Algorithm::RS256, Some("rsa-2"), &k.rsa.sign, &claims());
    assert_refused(&gw, &forged, Reason::BadSignature).await;
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let other = EncodingKey::from_ec_der(&other.serialize_der());
    let forged = sign(Algorithm::ES384, Some("ec384"), &other, &claims());
    assert_refused(&gw, &forged, Reason::BadSignature).await;

    // A reload reads the key files again, the configuration file itself
    // unchanged: a key removed from the JWKS file is no longer accepted,
    // even for a token verified (and cached) before.
    write_key_files(dir, &[&k.ec384.jwk]);
    gw.running.shared.reload().expect("reload");
    assert_refused(&gw, &ed, Reason::UnknownKid).await;
    assert_eq!(call(&gw, Some(&ec384)).await.status, 200);

    // A key file that cannot be used is a located configuration error.
    std::fs::write(dir.join("keys/rsa-spki.pem"), "not a PEM").unwrap();
    let e = gw.running.shared.reload().unwrap_err().to_string();
    assert!(
        e.contains("auth.jwt_issuers[0].keys[0].pem_file: not a PEM document"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_min_refresh() {
    let k = keys();
    let jwks = JwksServer::start(&[&k.rsa.jwk]).await;
    let up = upstream::echo().await;
    let gw = gateway(&jwks_config(up.addr, &jwks.url(), "1h")).await;
    assert!(eventually(Duration::from_secs(5), || jwks.up.hits() == 1).await);
    assert_eq!(
        call(&gw, Some(&rs256("rsa-1", &claims()))).await.status,
        200
    );
    for i in 0..5 {
        assert_refused(&gw, &rs256(&format!("k{i}"), &claims()), Reason::UnknownKid).await;
    }
    assert_eq!(jwks.up.hits(), 1);
}

#[tokio::test]
async fn jwks_down_at_start_answers_unavailable() {
    let jwks = JwksServer::start(&[&keys().rsa.jwk]).await;
    jwks.down.store(true, Ordering::SeqCst);
    let up = upstream::echo().await;
    let gw = gateway(&jwks_config(up.addr, &jwks.url(), "0s")).await;
    let r = call(&gw, Some(&rs256("rsa-1", &claims()))).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("www-authenticate").is_none());
    jwks.down.store(false, Ordering::SeqCst);
    assert_eq!(
        call(&gw, Some(&rs256("rsa-1", &claims()))).await.status,
        200
    );
}

#[tokio::test]
async fn header_cookie_and_query_sources_are_stripped() {
    let up = upstream::echo().await;
    let t = rs256("rsa-1", &claims());
    for (extra, build) in [
        (", header: X-Token", "header"),
        (", cookie: session", "cookie"),
        (", query: access_token", "query"),
    ] {
        let gw = gateway(&config(up.addr, "", extra)).await;
        let (uri, name, value) = match build {
            "header" => (gw.url("/x?a=1"), "x-token", t.clone()),
            "cookie" => (gw.url("/x?a=1"), "cookie", format!("a=1; session={t}")),
            _ => (
                gw.url(&format!("/x?a=1&access_token={t}")),
                "x-other",
                "1".into(),
            ),
        };
        let req = Request::get(uri)
            .header(name, value)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = client::send(req).await;
        assert_eq!(r.status, 200, "{build}: {}", r.text());
        let doc = r.json();
        assert_eq!(doc["headers"]["x-user-id"][0], "user-1", "{build}");
        assert!(doc["headers"].get("x-token").is_none());
        if build == "cookie" {
            assert_eq!(doc["headers"]["cookie"], json!(["a=1"]));
        } else {
            assert!(doc["headers"].get("cookie").is_none());
        }
        assert_eq!(doc["query"], "a=1", "{build}");
        // Bearer is not read when another source is configured.
        let r = call(&gw, Some(&t)).await;
        assert_eq!(r.status, 401, "{build}");
    }
}

#[tokio::test]
async fn strip_credentials_off_keeps_the_token() {
    let up = upstream::echo().await;
    let yaml = config(up.addr, "", "").replace(
        "          claims_to_headers",
        "          strip_credentials: false\n          claims_to_headers",
    );
    let gw = gateway(&yaml).await;
    let t = rs256("rsa-1", &claims());
    let doc = call(&gw, Some(&t)).await.json();
    assert_eq!(doc["headers"]["authorization"][0], format!("Bearer {t}"));
    let (_up2, stripping) = echo_gateway().await;
    let doc = call(&stripping, Some(&t)).await.json();
    assert!(doc["headers"].get("authorization").is_none());
}

#[tokio::test]
async fn claims_become_headers_and_client_copies_are_removed() {
    let (_up, gw) = echo_gateway().await;
    let req = Request::get(gw.url("/x"))
        .header(
            "authorization",
            format!("Bearer {}", rs256("rsa-1", &claims())),
        )
        .header("x-user-id", "spoofed")
        .header("x-consumer-id", "spoofed")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let doc = client::send(req).await.json();
    assert_eq!(doc["headers"]["x-user-id"], json!(["user-1"]));
    assert!(doc["headers"].get("x-consumer-id").is_none());
    assert_eq!(doc["headers"]["x-auth-method"], json!(["jwt"]));
}

#[tokio::test]
async fn consumer_claim_names_the_consumer() {
    let up = upstream::echo().await;
    let yaml = config(up.addr, "      consumer_claim: azp\n", "").replacen(
        "auth:\n",
        "consumers:\n  - id: web\n    groups: [apps]\nauth:\n",
        1,
    );
    let gw = gateway(&yaml).await;
    let doc = call(&gw, Some(&rs256("rsa-1", &claims()))).await.json();
    assert_eq!(doc["headers"]["x-consumer-id"], json!(["web"]));
    assert_eq!(doc["headers"]["x-consumer-groups"], json!(["apps"]));
    let mut c = claims();
    c["azp"] = json!("stranger");
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::UnknownConsumer).await;
    c.as_object_mut().unwrap().remove("azp");
    assert_refused(&gw, &rs256("rsa-1", &c), Reason::UnknownConsumer).await;
    // Counted once each response is over: polled.
    metrics::scrape_until(gw.running.admin_addr(), None, |m| {
        m.find(
            "portico_requests_total",
            &[("route", "api"), ("consumer", "web")],
        )
        .is_some()
    })
    .await;
}

#[tokio::test]
async fn without_consumer_claim_requests_count_as_other() {
    let (_up, gw) = echo_gateway().await;
    let doc = call(&gw, Some(&rs256("rsa-1", &claims()))).await.json();
    assert!(doc["headers"].get("x-consumer-id").is_none());
    // Counted once each response is over: polled.
    metrics::scrape_until(gw.running.admin_addr(), None, |m| {
        m.find(
            "portico_requests_total",
            &[("route", "api"), ("consumer", "other")],
        )
        .is_some()
    })
    .await;
}

#[tokio::test]
async fn cached_tokens_are_refused_after_exp() {
    let up = upstream::echo().await;
    let gw = gateway(&config(up.addr, "      leeway: 0s\n", "")).await;
    let mut c = claims();
    let exp = now() + 2;
    c["exp"] = json!(exp);
    c.as_object_mut().unwrap().remove("iat");
    let t = rs256("rsa-1", &c);
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
    let m = metrics::scrape(gw.running.admin_addr(), None).await;
    assert_eq!(
        m.value("portico_jwt_cache_entries", &[("issuer", "main")]),
        1.0
    );
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_refused(&gw, &t, Reason::Expired).await;
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn cache_disabled_still_verifies() {
    let up = upstream::echo().await;
    let yaml = config(up.addr, "", "").replacen("auth:\n", "auth:\n  token_cache_size: 0\n", 1);
    let gw = gateway(&yaml).await;
    let t = rs256("rsa-1", &claims());
    for _ in 0..3 {
        assert_eq!(call(&gw, Some(&t)).await.status, 200);
    }
    let m = metrics::scrape(gw.running.admin_addr(), None).await;
    assert_eq!(
        m.value("portico_jwt_cache_entries", &[("issuer", "main")]),
        0.0
    );
}

#[tokio::test]
async fn unauthorized_answers_and_challenges() {
    let (_up, gw) = echo_gateway().await;
    let r = call(&gw, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"portico\"")
    );
    let body = r.json();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(body["error"]["status"], 401);
    assert_eq!(body["error"]["message"], "credentials are required");
    let r = call(&gw, Some("x.y.z")).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"portico\", error=\"invalid_token\", error_description=\"the credentials are not valid\"")
    );
    assert_eq!(
        r.json()["error"]["message"],
        "the credentials are not valid"
    );
}

#[tokio::test]
async fn grpc_calls_get_unauthenticated() {
    let (_up, gw) = echo_gateway().await;
    for token in [None, Some("x.y.z")] {
        let mut b =
            Request::post(gw.url("/pkg.Svc/Call")).header("content-type", "application/grpc");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let r = client::send(b.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("grpc-status"), Some("16"), "{token:?}");
    }
}

#[tokio::test]
async fn config_errors_name_their_keys() {
    let up: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let base = config(up, "", "");
    let cases = [
        (
            base.replace("[main]}", "[nope]}"),
            "routes[0].policies[0].auth.methods[0].jwt.issuers[0]: no `auth.jwt_issuers` entry is named `nope`",
        ),
        (
            base.replace("[RS256]", "[RS256, none]"),
            "auth.jwt_issuers[0].algorithms[1]: `none` (unsigned tokens) is never accepted",
        ),
        (
            base.replace("[RS256]", "[HS256]"),
            "auth.jwt_issuers[0].keys[0].jwk: an RSA key cannot verify any of the issuer's algorithms (HS256)",
        ),
        (
            base.replace(&keys().rsa.jwk.to_string(), r#"{"kty": "RSA", "n": "AQAB"}"#),
            "auth.jwt_issuers[0].keys[0].jwk: `e` is missing",
        ),
        (
            base.replace("      keys:\n", "      keys:\n        - secret: ${MISSING_SECRET}\n"),
            "auth.jwt_issuers[0].keys[0].secret: environment variable `MISSING_SECRET` is not set",
        ),
        (
            base.replace("      keys:\n", "      keys:\n        - secret: plain-text-secret-plain-text-secret\n"),
            "auth.jwt_issuers[0].keys[0].secret: an HMAC secret must come from the environment",
        ),
    ];
    for (yaml, want) in cases {
        let got = config_errors(&yaml);
        assert!(got.contains(want), "want {want}\ngot {got}");
    }
    assert_eq!(config_errors(&base), "");
}

/// An issuer `main` whose only keys are the JWKS file `keys/jwks.json`
/// (next to the configuration file), a route `api` proxying to `up`.
fn jwks_file_config(up: std::net::SocketAddr) -> String {
    format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
upstreams:
  - name: up
    targets: [{{address: "{up}"}}]
auth:
  jwt_issuers:
    - name: main
      issuer: {ISS}
      algorithms: [RS256]
      jwks_file: keys/jwks.json
routes:
  - name: api
    policies:
      - auth: {{methods: [{{jwt: {{issuers: [main]}}}}]}}
    action: {{proxy: {{upstream: up}}}}
"#
    )
}

/// Writes `keys/jwks.json` in `dir` as a secret volume or `mv` would: a
/// new file renamed over the old one.
fn write_jwks(dir: &std::path::Path, keys: &[&Value]) {
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let tmp = dir.join("keys/.jwks.json.tmp");
    std::fs::write(&tmp, json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(&tmp, dir.join("keys/jwks.json")).unwrap();
}

fn issuer_of(gw: &super::support::TestGateway) -> Arc<portico::auth::jwt::Issuer> {
    gw.running.shared.snapshot.load().jwt_issuers.list[0].clone()
}

#[tokio::test]
async fn a_reload_reads_a_rotated_jwks_file_and_forgets_tokens_of_the_old_key() {
    let k = keys();
    let up = upstream::echo().await;
    let path = super::support::temp_config("jwt", "rotate-reload", &jwks_file_config(up.addr));
    let dir = path.parent().unwrap();
    write_jwks(dir, &[&k.rsa.jwk]);
    let gw = super::support::start_file(&path).await;
    let old = rs256("rsa-1", &claims());
    assert_eq!(call(&gw, Some(&old)).await.status, 200);
    assert_eq!(issuer_of(&gw).cache.len(), 1, "the token is cached");
    let hash = gw.running.shared.snapshot.load().hash;

    // The same kid now names another key; the configuration file is not
    // touched.
    let mut rotated = k.rsa2.jwk.clone();
    rotated["kid"] = "rsa-1".into();
    write_jwks(dir, &[&rotated]);
    let r = gw.running.shared.reload_checked().expect("reload");
    assert!(r.changed, "a changed key file is a changed configuration");
    assert_ne!(r.hash, hash);
    assert_eq!(gw.running.shared.snapshot.load().hash, r.hash);
    assert_eq!(issuer_of(&gw).cache.len(), 0, "the issuer starts over");

    // The token verified (and cached) with the old key is checked again,
    // against the new key: refused.
    assert_refused(&gw, &old, Reason::BadSignature).await;
    let new = sign(Algorithm::RS256, Some("rsa-1"), &k.rsa2.sign, &claims());
    assert_eq!(call(&gw, Some(&new)).await.status, 200);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_reload_with_unchanged_key_files_keeps_the_issuer_and_its_cache() {
    let k = keys();
    let up = upstream::echo().await;
    let yaml = jwks_file_config(up.addr);
    let path = super::support::temp_config("jwt", "unchanged-files", &yaml);
    let dir = path.parent().unwrap();
    write_jwks(dir, &[&k.rsa.jwk]);
    let gw = super::support::start_file(&path).await;
    let t = rs256("rsa-1", &claims());
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
    let before = issuer_of(&gw);
    let hash = gw.running.shared.snapshot.load().hash;

    // Nothing changed, or the key file was rewritten with the same keys
    // (a new inode and modification time, the same contents): a no-op.
    for what in ["nothing changed", "same contents rewritten"] {
        if what != "nothing changed" {
            write_jwks(dir, &[&k.rsa.jwk]);
        }
        let r = gw.running.shared.reload_checked().expect("reload");
        assert!(!r.changed, "{what}");
        assert_eq!(r.hash, hash, "{what}");
        assert!(Arc::ptr_eq(&before, &issuer_of(&gw)), "{what}");
        assert_eq!(before.cache.len(), 1, "{what}");
    }

    // The configuration file changed but not the issuer or its key file:
    // a new snapshot, the same issuer with its keys and cache.
    std::fs::write(&path, format!("{yaml}# touched\n")).unwrap();
    let r = gw.running.shared.reload_checked().expect("reload");
    assert!(r.changed);
    assert_ne!(r.hash, hash);
    assert!(Arc::ptr_eq(&before, &issuer_of(&gw)));
    assert_eq!(before.cache.len(), 1);
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_config_watcher_applies_a_rotated_jwks_file() {
    let k = keys();
    let up = upstream::echo().await;
    let path = super::support::temp_config("jwt", "rotate-watch", &jwks_file_config(up.addr));
    let dir = path.parent().unwrap();
    write_jwks(dir, &[&k.rsa.jwk]);
    let gw = super::support::start_file(&path).await;
    portico::server::watch(&gw.running);
    let old = rs256("rsa-1", &claims());
    assert_eq!(call(&gw, Some(&old)).await.status, 200);
    let hash = gw.running.shared.snapshot.load().hash;

    // Only the key file changes (`watch_config` is on by default).
    write_jwks(dir, &[&k.rsa2.jwk]);
    let reloaded = eventually(Duration::from_secs(10), || {
        gw.running.shared.snapshot.load().hash != hash
    });
    assert!(reloaded.await, "the watcher reloaded the changed key file");
    assert_refused(&gw, &old, Reason::UnknownKid).await;
    let new = sign(Algorithm::RS256, Some("rsa-2"), &k.rsa2.sign, &claims());
    assert_eq!(call(&gw, Some(&new)).await.status, 200);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn reload_keeps_an_unchanged_issuers_keys_and_restarts_a_changed_one() {
    let k = keys();
    let jwks = JwksServer::start(&[&k.rsa.jwk]).await;
    let up = upstream::echo().await;
    let yaml = jwks_config(up.addr, &jwks.url(), "1h");
    let path = super::support::temp_config("jwt", "reload", &yaml);
    let gw = super::support::start_file(&path).await;
    assert!(eventually(Duration::from_secs(5), || jwks.up.hits() == 1).await);
    let t = rs256("rsa-1", &claims());
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
    let before = gw.running.shared.snapshot.load().jwt_issuers.list[0].clone();

    // Same file: the issuer, its keys and its cache are kept; no fetch.
    std::fs::write(&path, format!("{yaml}\n# touched\n")).unwrap();
    gw.running.shared.reload().unwrap();
    let after = gw.running.shared.snapshot.load().jwt_issuers.list[0].clone();
    assert!(Arc::ptr_eq(&before, &after));
    assert_eq!(after.cache.len(), 1);
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(jwks.up.hits(), 1);

    // A changed issuer starts over: a new fetch, an empty cache.
    std::fs::write(
        &path,
        yaml.replace("jwks_min_refresh: 1h", "jwks_min_refresh: 2h"),
    )
    .unwrap();
    gw.running.shared.reload().unwrap();
    drop(before);
    drop(after);
    let changed = gw.running.shared.snapshot.load().jwt_issuers.list[0].clone();
    assert!(eventually(Duration::from_secs(5), || jwks.up.hits() == 2).await);
    assert_eq!(changed.cache.len(), 0);
    assert_eq!(call(&gw, Some(&t)).await.status, 200);
}
