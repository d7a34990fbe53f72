//! Verification keys: parsed from a JWK, a PEM public key (SPKI, PKCS#1 or
//! a certificate) or an HMAC secret, each tagged with its [`Family`] so that
//! a key only ever verifies algorithms of its own kind (an RSA key is never
//! an HMAC secret, and the other way round).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// The kind of a key, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Hmac,
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Family {
    /// The only family that can verify `alg`.
    pub fn of(alg: Algorithm) -> Family {
        use Algorithm::*;
        match alg {
            HS256 | HS384 | HS512 => Family::Hmac,
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
            ES256 => Family::P256,
            ES384 => Family::P384,
            EdDSA => Family::Ed25519,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Family::Hmac => "an HMAC secret",
            Family::Rsa => "an RSA key",
            Family::P256 => "an EC P-256 key",
            Family::P384 => "an EC P-384 key",
            Family::Ed25519 => "an Ed25519 key",
        }
    }
}

/// The algorithm names accepted in `algorithms` (`none` never is).
pub fn parse_alg(s: &str) -> Result<Algorithm, String> {
    if s.eq_ignore_ascii_case("none") {
        return Err("`none` (unsigned tokens) is never accepted".into());
    }
    Algorithm::from_str(s).map_err(|_| {
        format!("unknown algorithm `{s}` (HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)")
    })
}

/// One verification key.
pub struct Key {
    /// Matched against a token's `kid`; a key without one is tried for any.
    pub kid: Option<Box<str>>,
    pub family: Family,
    /// A JWK's `alg`: the one algorithm this key may verify.
    pub alg: Option<Algorithm>,
    decoding: DecodingKey,
    /// SHA-256 of the kid, family and key material: the same key keeps its
    /// identity (and its `Arc`) across JWKS refreshes.
    pub id: [u8; 32],
    /// Set when a JWKS refresh no longer lists the key: cached tokens it
    /// verified stop being accepted.
    retired: AtomicBool,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("alg", &self.alg)
            .finish()
    }
}

impl Key {
    fn new(
        kid: Option<&str>,
        family: Family,
        alg: Option<Algorithm>,
        decoding: DecodingKey,
        material: &[u8],
    ) -> Key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(kid.unwrap_or("").as_bytes());
        ctx.update(&[0, family as u8]);
        ctx.update(material);
        let mut id = [0u8; 32];
        id.copy_from_slice(ctx.finish().as_ref());
        Key {
            kid: kid.map(Box::from),
            family,
            alg,
            decoding,
            id,
            retired: AtomicBool::new(false),
        }
    }

    /// Whether this key may verify `alg`: same family, and the JWK's own
    /// `alg` when it has one.
    pub fn allows(&self, alg: Algorithm) -> bool {
        Family::of(alg) == self.family && self.alg.is_none_or(|a| a == alg)
    }

    /// Checks `signature` (base64url) over `message`. The family is checked
    /// again here, so no caller can make an RSA key act as an HMAC secret.
    pub fn verify(&self, alg: Algorithm, signature: &str, message: &[u8]) -> bool {
        if !self.allows(alg) || signature.is_empty() {
            return false;
        }
        jsonwebtoken::crypto::verify(signature, message, &self.decoding, alg).unwrap_or(false)
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        !self.retired.load(Ordering::Acquire)
    }

    /// An HMAC secret (raw bytes, at least 32).
    pub fn from_secret(kid: Option<&str>, secret: &[u8]) -> Result<Key, String> {
        if secret.len() < 32 {
            return Err(format!(
                "an HMAC secret must be at least 32 bytes (this one has {})",
                secret.len()
            ));
        }
        Ok(Key::new(
            kid,
            Family::Hmac,
            None,
            DecodingKey::from_secret(secret),
            secret,
        ))
    }

    /// A public key in PEM: `PUBLIC KEY` (SPKI: RSA, EC P-256/P-384,
    /// Ed25519), `RSA PUBLIC KEY` (PKCS#1) or a `CERTIFICATE` (its key).
    pub fn from_pem(kid: Option<&str>, pem: &[u8]) -> Result<Key, String> {
        use x509_parser::prelude::FromDer;
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
            .map_err(|e| format!("not a PEM document: {e}"))?;
        match pem.label.as_str() {
            "PUBLIC KEY" => {
                let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&pem.contents)
                    .map_err(|e| format!("not a public key: {e}"))?;
                Key::from_spki(kid, &spki)
            }
            "CERTIFICATE" => {
                let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&pem.contents)
                    .map_err(|e| format!("not a certificate: {e}"))?;
                Key::from_spki(kid, cert.public_key())
            }
            "RSA PUBLIC KEY" => {
                let (_, rsa) = x509_parser::public_key::RSAPublicKey::from_der(&pem.contents)
                    .map_err(|e| format!("not an RSA public key: {e}"))?;
                check_rsa_size(rsa.key_size())?;
                Ok(Key::new(
                    kid,
                    Family::Rsa,
                    None,
                    DecodingKey::from_rsa_der(&pem.contents),
                    &pem.contents,
                ))
            }
            l if l.contains("PRIVATE") => {
                Err("this is a private key: give the public key (`openssl pkey -pubout`)".into())
            }
            l => Err(format!(
                "a `{l}` PEM block is not a public key (PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE)"
            )),
        }
    }

    fn from_spki(
        kid: Option<&str>,
        spki: &x509_parser::x509::SubjectPublicKeyInfo,
    ) -> Result<Key, String> {
        use x509_parser::public_key::PublicKey;
        let raw = &spki.subject_public_key.data;
        if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" {
            if raw.len() != 32 {
                return Err("an Ed25519 public key has 32 bytes".into());
            }
            return Ok(Key::new(
                kid,
                Family::Ed25519,
                None,
                DecodingKey::from_ed_der(raw),
                raw,
            ));
        }
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                check_rsa_size(rsa.key_size())?;
                Ok(Key::new(
                    kid,
                    Family::Rsa,
                    None,
                    DecodingKey::from_rsa_der(raw),
                    raw,
                ))
            }
            Ok(PublicKey::EC(point)) => {
                let family = match point.data().len() {
                    65 => Family::P256,
                    97 => Family::P384,
                    _ => {
                        return Err("only uncompressed EC P-256 and P-384 keys are supported".into())
                    }
                };
                Ok(Key::new(
                    kid,
                    family,
                    None,
                    DecodingKey::from_ec_der(point.data()),
                    point.data(),
                ))
            }
            _ => Err("unsupported key type (RSA, EC P-256/P-384 and Ed25519 are)".into()),
        }
    }

    /// A public JWK (`kty` RSA, EC or OKP). Symmetric (`oct`) JWKs and
    /// private keys are refused; so are keys marked for encryption. Only
    /// the key members are read: `x5c`, `x5u` and `jku` are ignored.
    pub fn from_jwk(kid: Option<&str>, jwk: &serde_json::Value) -> Result<Key, String> {
        let obj = jwk.as_object().ok_or("a JWK is a JSON object")?;
        let s = |k: &str| -> Result<Option<&str>, String> {
            match obj.get(k) {
                None => Ok(None),
                Some(serde_json::Value::String(v)) => Ok(Some(v.as_str())),
                Some(_) => Err(format!("`{k}` must be a string")),
            }
        };
        let need = |k: &str| -> Result<Vec<u8>, String> {
            let v = s(k)?.ok_or_else(|| format!("`{k}` is missing"))?;
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|_| format!("`{k}` is not base64url"))
        };
        let kid = match kid {
            Some(k) => Some(k),
            None => s("kid")?,
        };
        if let Some(u) = s("use")? {
            if u != "sig" {
                return Err(format!("`use: {u}`: not a signature key"));
            }
        }
        if let Some(ops) = obj.get("key_ops") {
            let verify = ops
                .as_array()
                .is_some_and(|a| a.iter().any(|o| o == "verify"));
            if !verify {
                return Err("`key_ops` does not allow `verify`".into());
            }
        }
        if obj.contains_key("d") {
            return Err("this JWK is a private key (`d`): give the public key only".into());
        }
        let alg = s("alg")?.map(parse_alg).transpose()?;
        let kty = s("kty")?.ok_or("`kty` is missing")?;
        let key = match kty {
            "RSA" => {
                let n = need("n")?;
                let e = need("e")?;
                let n = strip_zeros(&n);
                check_rsa_size(n.len() * 8)?;
                let mut material = n.to_vec();
                material.extend_from_slice(&e);
                Key::new(
                    kid,
                    Family::Rsa,
                    alg,
                    DecodingKey::from_rsa_raw_components(n, strip_zeros(&e)),
                    &material,
                )
            }
            "EC" => {
                let (family, len) = match s("crv")? {
                    Some("P-256") => (Family::P256, 32),
                    Some("P-384") => (Family::P384, 48),
                    Some(c) => return Err(format!("unsupported curve `{c}` (P-256, P-384)")),
                    None => return Err("`crv` is missing".into()),
                };
                let (x, y) = (need("x")?, need("y")?);
                if x.len() != len || y.len() != len {
                    return Err(format!("`x` and `y` must have {len} bytes for this curve"));
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Key::new(kid, family, alg, DecodingKey::from_ec_der(&point), &point)
            }
            "OKP" => {
                match s("crv")? {
                    Some("Ed25519") => {}
                    Some(c) => return Err(format!("unsupported curve `{c}` (Ed25519)")),
                    None => return Err("`crv` is missing".into()),
                }
                let x = need("x")?;
                if x.len() != 32 {
                    return Err("`x` must have 32 bytes".into());
                }
                Key::new(kid, Family::Ed25519, alg, DecodingKey::from_ed_der(&x), &x)
            }
            "oct" => return Err(
                "symmetric (`oct`) JWKs are not accepted: give an HMAC key as `secret: ${ENV_VAR}`"
                    .into(),
            ),
            k => return Err(format!("unsupported `kty` `{k}` (RSA, EC, OKP)")),
        };
        if let Some(a) = key.alg {
            if Family::of(a) != key.family {
                return Err(format!(
                    "`alg: {a:?}` cannot be verified with {}",
                    key.family.describe()
                ));
            }
        }
        Ok(key)
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[i..]
}

fn check_rsa_size(bits: usize) -> Result<(), String> {
    if bits < 2048 {
        return Err(format!(
            "RSA keys must have at least 2048 bits (this one has {bits})"
        ));
    }
    Ok(())
}

/// A JWKS document: `{"keys": [...]}`. Returns the keys it could use and a
/// message for each it could not (skipped).
pub fn parse_jwks(body: &[u8]) -> Result<(Vec<Key>, Vec<String>), String> {
    #[derive(serde::Deserialize)]
    struct Jwks {
        keys: Vec<serde_json::Value>,
    }
    let doc: Jwks =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, k) in doc.keys.iter().enumerate() {
        match Key::from_jwk(None, k) {
            Ok(key) => keys.push(key),
            Err(e) => skipped.push(format!("keys[{i}]: {e}")),
        }
    }
    Ok((keys, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_parse_and_none_is_refused() {
        assert_eq!(parse_alg("RS256").unwrap(), Algorithm::RS256);
        assert!(parse_alg("none").unwrap_err().contains("never"));
        assert!(parse_alg("NONE").is_err());
        assert!(parse_alg("HS1").is_err());
        assert_eq!(Family::of(Algorithm::PS384), Family::Rsa);
        assert_eq!(Family::of(Algorithm::ES384), Family::P384);
    }

    #[test]
    fn jwks_refuses_secrets_private_and_encryption_keys() {
        let doc = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","d":"AA"},
            {"kty":"OKP","crv":"Ed25519","use":"enc","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","kid":"a","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"EC","crv":"P-521","x":"AA","y":"AA"},
            {"kty":"OKP","crv":"Ed25519","alg":"RS256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let (keys, skipped) = parse_jwks(doc).unwrap();
        assert_eq!(keys.len(), 1, "{skipped:?}");
        assert_eq!(keys[0].kid.as_deref(), Some("a"));
        assert_eq!(keys[0].family, Family::Ed25519);
        assert!(keys[0].allows(Algorithm::EdDSA));
        assert!(!keys[0].allows(Algorithm::HS256));
        assert_eq!(skipped.len(), 5);
        assert!(skipped[0].contains("oct"));
        assert!(skipped[1].contains("private"));
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn hmac_secrets_are_long_and_only_hmac() {
        assert!(Key::from_secret(None, b"short").is_err());
        let k = Key::from_secret(Some("k"), &[7u8; 32]).unwrap();
        assert!(k.allows(Algorithm::HS512));
        assert!(!k.allows(Algorithm::RS256));
        // The family check holds even when a caller asks directly.
        assert!(!k.verify(Algorithm::RS256, "AAAA", b"a.b"));
    }

    #[test]
    fn pem_private_keys_are_refused() {
        let pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(Key::from_pem(None, pem.as_bytes())
            .unwrap_err()
            .contains("private"));
        assert!(Key::from_pem(None, b"garbage").is_err());
    }

    #[test]
    fn retired_keys_are_not_live() {
        let k = Key::from_secret(None, &[1u8; 40]).unwrap();
        assert!(k.is_live());
        k.retire();
        assert!(!k.is_live());
    }
}
