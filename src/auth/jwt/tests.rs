//! Verification without sockets: HS256 and Ed25519 tokens made here,
//! checked at chosen times.

use super::*;
use crate::config::model;
use jsonwebtoken::{encode, EncodingKey, Header as JwtHeader};
use serde_json::json;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const NOW: u64 = 1_900_000_000;

fn issuers(yaml: &str, consumers: &Consumers) -> Result<Issuers, Vec<(String, String)>> {
    let auth: model::Auth = serde_yaml::from_str(yaml).unwrap();
    let mut errors = Vec::new();
    let out = Issuers::compile(
        &auth,
        None,
        consumers,
        std::path::Path::new("."),
        &mut |p, m| errors.push((p, m)),
        &|_| Some("secret: ${JWT_SECRET}".into()),
    );
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn hs_issuer(extra: &str) -> Issuers {
    issuers(
        &format!(
            "jwt_issuers:\n  - name: main\n    issuer: https://id.example\n    audiences: [api]\n    algorithms: [HS256]\n    leeway: 0s\n    keys: [{{secret: \"{SECRET}\"}}]\n{extra}"
        ),
        &Consumers::default(),
    )
    .unwrap()
}

fn method(is: &Issuers) -> JwtAuth {
    JwtAuth::new(
        Source::Bearer,
        is.list.clone(),
        Arc::new(Consumers::default()),
        false,
    )
}

fn hs(claims: serde_json::Value) -> String {
    encode(
        &JwtHeader::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn good() -> serde_json::Value {
    json!({"iss": "https://id.example", "aud": "api", "sub": "u1", "exp": NOW + 60, "scope": "a b"})
}

fn check(auth: &JwtAuth, token: &str, now: u64) -> Result<Identity, Reason> {
    match auth.inner.verify(token, None, now, false) {
        Step::Done(r) => r.map_err(|f| f.reason),
        Step::Refetch(_) => panic!("no JWKS here"),
    }
}

#[test]
fn shape() {
    assert!(is_jwt_shaped("a.b.c"));
    assert!(is_jwt_shaped("a.b."));
    assert!(!is_jwt_shaped("a.b"));
    assert!(!is_jwt_shaped(".b.c"));
    assert!(!is_jwt_shaped("a..c"));
    assert!(!is_jwt_shaped("a.b.c.d"));
    assert!(!is_jwt_shaped("a.b+.c"));
    assert!(!is_jwt_shaped("opaque-token"));
}

#[test]
fn a_good_token_gives_a_principal() {
    let is = hs_issuer("");
    let id = check(&method(&is), &hs(good()), NOW).unwrap();
    let p = id.principal.unwrap();
    assert_eq!(&*p.issuer, "main");
    assert_eq!(p.subject.as_deref(), Some("u1"));
    assert!(p.has_scope("a") && p.has_scope("b"));
    assert_eq!(p.expires_at, Some(NOW + 60));
    assert!(id.consumer.is_none());
    assert_eq!(id.method, Method::Jwt);
}

#[test]
fn time_claims_with_and_without_leeway() {
    let is = hs_issuer("");
    let m = method(&is);
    let mut c = good();
    c["exp"] = json!(NOW);
    assert_eq!(check(&m, &hs(c.clone()), NOW).unwrap_err(), Reason::Expired);
    assert!(check(&m, &hs(c), NOW - 1).is_ok());
    let mut c = good();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(check(&m, &hs(c), NOW).unwrap_err(), Reason::MissingClaim);
    let mut c = good();
    c["exp"] = json!("soon");
    assert_eq!(check(&m, &hs(c), NOW).unwrap_err(), Reason::Malformed);
    let mut c = good();
    c["nbf"] = json!(NOW + 1);
    assert_eq!(check(&m, &hs(c), NOW).unwrap_err(), Reason::NotYetValid);
    let mut c = good();
    c["iat"] = json!(NOW + 5);
    assert_eq!(check(&m, &hs(c), NOW).unwrap_err(), Reason::NotYetValid);

    let lenient = hs_issuer("    required_claims: [sub]\n");
    let lenient = &lenient.list[0];
    assert_eq!(lenient.leeway, 0);
    let is = hs_issuer("");
    drop(is);
    let is = issuers(
        &format!("jwt_issuers:\n  - name: main\n    issuer: https://id.example\n    algorithms: [HS256]\n    leeway: 30s\n    keys: [{{secret: \"{SECRET}\"}}]\n"),
        &Consumers::default(),
    )
    .unwrap();
    let m = method(&is);
    let mut c = good();
    c["exp"] = json!(NOW - 10);
    c["nbf"] = json!(NOW + 10);
    assert!(check(&m, &hs(c.clone()), NOW).is_ok());
    assert_eq!(check(&m, &hs(c), NOW + 21).unwrap_err(), Reason::Expired);
}

#[test]
fn issuer_audience_and_required_claims() {
    let is = hs_issuer("    required_claims: [tenant]\n");
    let m = method(&is);
    let mut c = good();
    assert_eq!(
        check(&m, &hs(c.clone()), NOW).unwrap_err(),
        Reason::MissingClaim
    );
    c["tenant"] = json!("t");
    assert!(check(&m, &hs(c.clone()), NOW).is_ok());
    c["aud"] = json!(["other", "api"]);
    assert!(check(&m, &hs(c.clone()), NOW).is_ok());
    c["aud"] = json!(["other"]);
    assert_eq!(
        check(&m, &hs(c.clone()), NOW).unwrap_err(),
        Reason::WrongAudience
    );
    c["aud"] = json!("api");
    c["iss"] = json!("https://evil.example");
    assert_eq!(check(&m, &hs(c), NOW).unwrap_err(), Reason::WrongIssuer);
}

#[test]
fn header_tricks_are_refused() {
    let is = hs_issuer("");
    let m = method(&is);
    let token = hs(good());
    let (head, rest) = token.split_once('.').unwrap();
    let (payload, _sig) = rest.split_once('.').unwrap();
    let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    // alg none, unsigned.
    let none = format!("{}.{payload}.", b64(json!({"alg": "none"})));
    assert_eq!(check(&m, &none, NOW).unwrap_err(), Reason::BadAlgorithm);
    // Stripped signature.
    assert_eq!(
        check(&m, &format!("{head}.{payload}."), NOW).unwrap_err(),
        Reason::BadSignature
    );
    // Tampered payload.
    let mut c = good();
    c["sub"] = json!("admin");
    let forged = format!("{head}.{}.{}", b64(c), token.rsplit_once('.').unwrap().1);
    assert_eq!(check(&m, &forged, NOW).unwrap_err(), Reason::BadSignature);
    // An unknown critical extension.
    let crit = encode(
        &JwtHeader {
            alg: Algorithm::HS256,
            ..Default::default()
        },
        &good(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert!(check(&m, &crit, NOW).is_ok());
    let crit_head = b64(json!({"alg": "HS256", "crit": ["exp"]}));
    assert_eq!(
        check(&m, &format!("{crit_head}.{payload}.x"), NOW).unwrap_err(),
        Reason::Malformed
    );
    assert_eq!(check(&m, "a.b.c", NOW).unwrap_err(), Reason::Malformed);
}

#[test]
fn ed25519_keys_and_kids() {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let x = URL_SAFE_NO_PAD.encode(kp.public_key_raw());
    let is = issuers(
        &format!("jwt_issuers:\n  - name: ed\n    issuer: https://id.example\n    algorithms: [EdDSA]\n    keys:\n      - jwk: {{kty: OKP, crv: Ed25519, kid: k1, x: \"{x}\"}}\n"),
        &Consumers::default(),
    )
    .unwrap();
    let m = method(&is);
    let key = EncodingKey::from_ed_der(&kp.serialize_der());
    let mut h = JwtHeader::new(Algorithm::EdDSA);
    h.kid = Some("k1".into());
    assert!(check(&m, &encode(&h, &good(), &key).unwrap(), NOW).is_ok());
    h.kid = Some("../../etc/passwd".into());
    assert_eq!(
        check(&m, &encode(&h, &good(), &key).unwrap(), NOW).unwrap_err(),
        Reason::UnknownKid
    );
    // HS256 with the public key bytes as the secret: not an allowed
    // algorithm, and the key is not an HMAC key anyway.
    let mut h = JwtHeader::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let t = encode(&h, &good(), &EncodingKey::from_secret(kp.public_key_raw())).unwrap();
    assert_eq!(check(&m, &t, NOW).unwrap_err(), Reason::BadAlgorithm);
}

#[test]
fn cache_hits_share_the_principal_until_exp() {
    let is = hs_issuer("");
    let m = method(&is);
    let mut c = good();
    c["exp"] = json!(NOW + 10);
    let t = hs(c);
    let key = TokenCache::key_of(t.as_bytes());
    let first = match m.inner.verify(&t, Some(key), NOW, false) {
        Step::Done(r) => r.unwrap(),
        Step::Refetch(_) => unreachable!(),
    };
    let hit = m.inner.cached(key, NOW + 9).unwrap().unwrap();
    assert!(Arc::ptr_eq(
        first.principal.as_ref().unwrap(),
        hit.principal.as_ref().unwrap()
    ));
    assert!(m.inner.cached(key, NOW + 10).is_none());
}

#[test]
fn consumer_claim_names_a_consumer() {
    let consumers: Vec<model::Consumer> =
        serde_yaml::from_str("- id: mobile\n- id: web\n").unwrap();
    let consumers = Arc::new(Consumers::compile(&consumers, None, |_, _| {}, |_| None));
    let is = issuers(
        &format!("jwt_issuers:\n  - name: main\n    issuer: https://id.example\n    algorithms: [HS256]\n    consumer_claim: azp\n    keys: [{{secret: \"{SECRET}\"}}]\n"),
        &consumers,
    )
    .unwrap();
    let m = JwtAuth::new(Source::Bearer, is.list.clone(), consumers, false);
    let mut c = good();
    c["azp"] = json!("web");
    let id = check(&m, &hs(c.clone()), NOW).unwrap();
    assert_eq!(&*id.consumer.unwrap().id, "web");
    c["azp"] = json!("nobody");
    assert_eq!(check(&m, &hs(c), NOW).unwrap_err(), Reason::UnknownConsumer);
    assert_eq!(
        check(&m, &hs(good()), NOW).unwrap_err(),
        Reason::UnknownConsumer
    );
}

#[test]
fn configuration_errors_name_their_keys() {
    let none = Consumers::default();
    let errs = |yaml: &str| issuers(yaml, &none).unwrap_err();
    let e = errs("jwt_issuers:\n  - {name: a, issuer: x, algorithms: [none], keys: [{secret: \"0123456789abcdef0123456789abcdef\"}]}\n");
    assert_eq!(e[0].0, "auth.jwt_issuers[0].algorithms[0]");
    assert!(e[0].1.contains("never"), "{e:?}");
    let e = errs("jwt_issuers:\n  - {name: a, issuer: x, algorithms: [RS256], keys: [{secret: \"0123456789abcdef0123456789abcdef\"}]}\n");
    assert_eq!(e[0].0, "auth.jwt_issuers[0].keys[0].secret");
    assert!(e[0].1.contains("HMAC secret cannot verify"), "{e:?}");
    let e = errs("jwt_issuers:\n  - {name: a, issuer: x, algorithms: [ES256], keys: [{jwk: {kty: EC, crv: P-256, x: AA}}]}\n");
    assert_eq!(e[0].0, "auth.jwt_issuers[0].keys[0].jwk");
    let e = errs("jwt_issuers:\n  - {name: a, issuer: x, algorithms: [HS256]}\n");
    assert!(e[0].1.contains("keys"), "{e:?}");
    let e = errs("jwt_issuers:\n  - {name: a, issuer: x, algorithms: [HS256], consumer_claim: azp, keys: [{secret: \"0123456789abcdef0123456789abcdef\"}]}\n");
    assert_eq!(e[0].0, "auth.jwt_issuers[0].consumer_claim");
    let auth: model::Auth = serde_yaml::from_str(
        "jwt_issuers:\n  - {name: a, issuer: x, algorithms: [HS256], keys: [{secret: \"0123456789abcdef0123456789abcdef\"}]}\n",
    )
    .unwrap();
    let mut e = Vec::new();
    Issuers::compile(
        &auth,
        None,
        &none,
        std::path::Path::new("."),
        &mut |p, m| e.push((p, m)),
        &|_| Some("secret: plain-text".into()),
    );
    assert_eq!(e[0].0, "auth.jwt_issuers[0].keys[0].secret");
    assert!(e[0].1.contains("environment"), "{e:?}");
}

#[test]
fn unchanged_issuers_are_kept_across_compiles() {
    let auth: model::Auth = serde_yaml::from_str(&format!(
        "jwt_issuers:\n  - {{name: a, issuer: x, algorithms: [HS256], keys: [{{secret: \"{SECRET}\"}}]}}\n"
    ))
    .unwrap();
    let none = Consumers::default();
    let compile = |prev: Option<&Issuers>, auth: &model::Auth| {
        Issuers::compile(
            auth,
            prev,
            &none,
            std::path::Path::new("."),
            &mut |p, m| panic!("{p}: {m}"),
            &|_| Some("${S}".into()),
        )
    };
    let one = compile(None, &auth);
    let two = compile(Some(&one), &auth);
    assert!(Arc::ptr_eq(&one.list[0], &two.list[0]));
    let mut changed = auth.clone();
    changed.jwt_issuers[0].leeway = crate::config::units::Dur(std::time::Duration::from_secs(1));
    let three = compile(Some(&two), &changed);
    assert!(!Arc::ptr_eq(&two.list[0], &three.list[0]));
    assert!(Arc::ptr_eq(&two.list[0].stats, &three.list[0].stats));
}

#[test]
fn opaque_tokens_are_left_to_introspection_when_it_reads_the_same_source() {
    let is = hs_issuer("");
    let alone = method(&is);
    let with_introspection = JwtAuth::new(
        Source::Bearer,
        is.list.clone(),
        Arc::new(Consumers::default()),
        true,
    );
    let attempt = |m: &JwtAuth, t: &str| match Inner::attempt(&m.inner, t.into()) {
        AttemptStep::Ready(a) => a,
        AttemptStep::Wait(_) => panic!("no JWKS here"),
    };
    assert!(matches!(
        attempt(&alone, "opaque"),
        Attempt::Refused(AuthFailure {
            reason: Reason::Malformed,
            ..
        })
    ));
    assert!(matches!(
        attempt(&with_introspection, "opaque"),
        Attempt::Absent
    ));
    // A JWT-shaped token is still the JWT method's to decide.
    assert!(matches!(
        attempt(&with_introspection, "a.b.c"),
        Attempt::Refused(AuthFailure {
            reason: Reason::Malformed,
            ..
        })
    ));
    let mut c = good();
    c["exp"] = json!(now() + 60);
    assert!(matches!(
        attempt(&with_introspection, &hs(c)),
        Attempt::Verified(_)
    ));
}
