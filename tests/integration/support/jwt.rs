//! Real signing keys for JWT tests (generated once per test process: RSA
//! generation is the slow part), their public halves in every form the
//! gateway reads (JWK, SPKI PEM, PKCS#1 PEM, certificate), and token
//! signing with `jsonwebtoken`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The `iss` the tests' issuers expect.
pub const ISS: &str = "https://id.test";

/// A key pair: how to sign, and the public key.
pub struct Pair {
    pub sign: EncodingKey,
    pub jwk: Value,
    /// `PUBLIC KEY` (SPKI).
    pub pem: String,
    /// `RSA PUBLIC KEY` (PKCS#1), RSA keys only.
    pub pkcs1_pem: Option<String>,
    /// A self-signed `CERTIFICATE` holding the public key (EC and Ed25519).
    pub cert_pem: Option<String>,
}

fn rsa_pair(kid: &str) -> Pair {
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let public = key.to_public_key();
    Pair {
        sign: EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes()),
        jwk: json!({
            "kty": "RSA", "kid": kid, "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        }),
        pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
        pkcs1_pem: Some(public.to_pkcs1_pem(LineEnding::LF).unwrap()),
        cert_pem: None,
    }
}

fn rcgen_pair(alg: &'static rcgen::SignatureAlgorithm, kid: &str) -> Pair {
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    let raw = kp.public_key_raw();
    let jwk = if alg == &rcgen::PKCS_ED25519 {
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": URL_SAFE_NO_PAD.encode(raw)})
    } else {
        let n = (raw.len() - 1) / 2;
        let crv = if n == 32 { "P-256" } else { "P-384" };
        json!({"kty": "EC", "crv": crv, "kid": kid,
               "x": URL_SAFE_NO_PAD.encode(&raw[1..1 + n]),
               "y": URL_SAFE_NO_PAD.encode(&raw[1 + n..])})
    };
    let der = kp.serialize_der();
    let cert = rcgen::CertificateParams::new(vec![format!("{kid}.keys.test")])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    Pair {
        sign: if alg == &rcgen::PKCS_ED25519 {
            EncodingKey::from_ed_der(&der)
        } else {
            EncodingKey::from_ec_der(&der)
        },
        jwk,
        pem: kp.public_key_pem(),
        pkcs1_pem: None,
        cert_pem: Some(cert.pem()),
    }
}

pub struct Keys {
    /// `kid` rsa-1.
    pub rsa: Pair,
    /// `kid` rsa-2.
    pub rsa2: Pair,
    /// `kid` evil: trusted by no issuer.
    pub attacker: Pair,
    pub ec256: Pair,
    pub ec384: Pair,
    pub ed: Pair,
}

/// Generated once per test process.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa: rsa_pair("rsa-1"),
        rsa2: rsa_pair("rsa-2"),
        attacker: rsa_pair("evil"),
        ec256: rcgen_pair(&rcgen::PKCS_ECDSA_P256_SHA256, "ec256"),
        ec384: rcgen_pair(&rcgen::PKCS_ECDSA_P384_SHA384, "ec384"),
        ed: rcgen_pair(&rcgen::PKCS_ED25519, "ed"),
    })
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(String::from);
    encode(&h, claims, key).unwrap()
}

/// An RS256 token signed by `keys().rsa` under `kid`.
pub fn rs256(kid: &str, claims: &Value) -> String {
    sign(Algorithm::RS256, Some(kid), &keys().rsa.sign, claims)
}

/// Valid claims for `ISS` (expiring in 10 minutes) with `extra` merged in.
pub fn claims_with(extra: Value) -> Value {
    let mut c = json!({"iss": ISS, "sub": "user-1", "exp": now() + 600, "iat": now()});
    for (k, v) in extra.as_object().expect("an object") {
        c[k] = v.clone();
    }
    c
}

/// `auth.jwt_issuers` entry `main` for `ISS` with `keys().rsa` inline
/// (list item, indented 4) plus `extra` lines (indented 6).
pub fn issuer(extra: &str) -> String {
    format!(
        "    - name: main\n      issuer: {ISS}\n      algorithms: [RS256]\n      keys: [{{jwk: {}}}]\n{extra}",
        keys().rsa.jwk
    )
}
