//! The `jwt` method: a signed JSON Web Token from `Authorization: Bearer`
//! (or a configured header, cookie or query parameter), checked against
//! the route's issuers.
//!
//! Order of checks, cheapest first: size (before any parsing), the cache
//! (a hit costs one SHA-256 of the token, one shard lock and `Arc` clones),
//! shape (three base64url parts), header (`alg`, `kid` only: `jku`, `x5u`,
//! `x5c` and `jwk` are never read), the issuer by `iss`, its algorithms,
//! its keys by `kid` (an unknown `kid` refetches the JWKS, rate-limited),
//! the signature, then `exp` (required), `nbf`, `iat`, `aud`, required
//! claims and the consumer claim. Claims are only used after the signature
//! verified.

pub mod cache;
pub mod issuer;
pub mod keys;

pub use issuer::{Issuer, Issuers};

use super::credential::Source;
use super::{Attempt, AttemptStep, AuthFailure, Authenticator, Consumers, Identity, Method};
use super::{Principal, Reason, Scheme};
use crate::body::Body;
use crate::policy::Ctx;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cache::{Entry, TokenCache};
use http::Request;
use jsonwebtoken::Algorithm;
use keys::Key;
use std::sync::Arc;

/// One `jwt` method of a route's `auth` policy.
pub struct JwtAuth {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    issuers: Box<[Arc<Issuer>]>,
    consumers: Arc<Consumers>,
    /// The largest `max_token_size` of the issuers: checked first.
    max_size: usize,
    /// The same policy has an `introspection` method reading the same
    /// source: a token that is not JWT-shaped is left to it (`Absent`).
    opaque_absent: bool,
    /// Any issuer caches tokens (else no hash is computed).
    caching: bool,
}

impl JwtAuth {
    pub fn new(
        source: Source,
        issuers: Vec<Arc<Issuer>>,
        consumers: Arc<Consumers>,
        opaque_absent: bool,
    ) -> JwtAuth {
        JwtAuth {
            inner: Arc::new(Inner {
                source,
                max_size: issuers.iter().map(|i| i.max_token_size).max().unwrap_or(0),
                caching: issuers.iter().any(|i| i.cache.enabled()),
                issuers: issuers.into(),
                consumers,
                opaque_absent,
            }),
        }
    }
}

fn refused(r: Reason) -> AuthFailure {
    AuthFailure::new(r, Method::Jwt, Scheme::Bearer)
}

/// Seconds since the epoch.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Three dot-separated parts of base64url characters, the first two
/// non-empty (the signature may be empty: an unsigned token is a JWT that
/// fails verification, not an opaque token).
pub fn is_jwt_shaped(token: &str) -> bool {
    let mut dots = 0;
    let mut part_len = 0;
    for b in token.bytes() {
        match b {
            b'.' => {
                if part_len == 0 || dots == 2 {
                    return false;
                }
                dots += 1;
                part_len = 0;
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => part_len += 1,
            _ => return false,
        }
    }
    dots == 2
}

/// The header members Portico reads. Everything else (`jku`, `x5u`, `x5c`,
/// `jwk`, `typ`, ...) is ignored; nothing in a token ever selects where
/// keys come from.
#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// What verification needs that it cannot do synchronously.
enum Step {
    Done(Result<Identity, AuthFailure>),
    /// The `kid` is unknown and the issuer's JWKS may be refetched.
    Refetch(Arc<Issuer>),
}

impl Inner {
    fn cached(&self, key: u128, now: u64) -> Option<Result<Identity, AuthFailure>> {
        for iss in self.issuers.iter() {
            let hit = iss.cache.with(key, now, |e| {
                let consumer = match &e.consumer {
                    None => None,
                    Some(id) => match self.consumers.get(id) {
                        Some(c) => Some(c.clone()),
                        None => return Err(unknown_consumer(id)),
                    },
                };
                Ok(Identity {
                    consumer,
                    method: Method::Jwt,
                    principal: Some(e.principal.clone()),
                })
            });
            if hit.is_some() {
                return hit;
            }
        }
        None
    }

    /// Verifies a token that is not in the cache. `refetch`: an unknown
    /// `kid` may ask for a JWKS refresh (false once it happened).
    fn verify(&self, token: &str, cache_key: Option<u128>, now: u64, refetch: bool) -> Step {
        let fail = |r: Reason, d: String| Step::Done(Err(refused(r).detail(d)));
        let Some((message, signature)) = token.rsplit_once('.') else {
            return fail(Reason::Malformed, "not a JWT".into());
        };
        let Some((head, payload)) = message.split_once('.') else {
            return fail(Reason::Malformed, "not a JWT".into());
        };
        let header: Header = match decode_json(head) {
            Ok(h) => h,
            Err(m) => return fail(Reason::Malformed, format!("header: {m}")),
        };
        if header.crit.is_some() {
            return fail(
                Reason::Malformed,
                "the header has `crit` extensions Portico does not implement".into(),
            );
        }
        let alg = match keys::parse_alg(&header.alg) {
            Ok(a) => a,
            Err(m) => return fail(Reason::BadAlgorithm, m),
        };
        let claims: serde_json::Map<String, serde_json::Value> = match decode_json(payload) {
            Ok(c) => c,
            Err(m) => return fail(Reason::Malformed, format!("claims: {m}")),
        };
        let Some(iss) = claims.get("iss").and_then(|v| v.as_str()) else {
            return fail(Reason::MissingClaim, "no `iss` claim".into());
        };
        let Some(issuer) = self.issuers.iter().find(|i| &*i.iss == iss) else {
            return fail(
                Reason::WrongIssuer,
                format!("`iss` {iss:?} is not accepted here"),
            );
        };
        if token.len() > issuer.max_token_size {
            return fail(
                Reason::TooLarge,
                format!("larger than {} bytes", issuer.max_token_size),
            );
        }
        if !issuer.algorithms.contains(&alg) {
            return fail(
                Reason::BadAlgorithm,
                format!("`{alg:?}` is not allowed for issuer {}", issuer.name),
            );
        }
        let kid = header.kid.as_deref();
        let key = match find_key(issuer, kid, alg, signature, message.as_bytes()) {
            Found::Key(k) => k,
            Found::BadSignature => {
                return fail(Reason::BadSignature, "no key verifies the signature".into())
            }
            Found::WrongFamily => {
                return fail(
                    Reason::BadAlgorithm,
                    format!("the key for kid {kid:?} cannot verify {alg:?}"),
                )
            }
            Found::NoKey => {
                if refetch && issuer.may_refresh() {
                    return Step::Refetch(issuer.clone());
                }
                if !issuer.keys_loaded() {
                    return fail(
                        Reason::Unavailable,
                        format!("the JWKS of issuer {} has not been fetched", issuer.name),
                    );
                }
                return fail(
                    Reason::UnknownKid,
                    format!("no key of issuer {} has kid {kid:?}", issuer.name),
                );
            }
        };
        Step::Done(self.check_claims(issuer, key, claims, cache_key, now))
    }

    fn check_claims(
        &self,
        issuer: &Arc<Issuer>,
        key: Arc<Key>,
        claims: serde_json::Map<String, serde_json::Value>,
        cache_key: Option<u128>,
        now: u64,
    ) -> Result<Identity, AuthFailure> {
        let fail = |r: Reason, d: String| Err(refused(r).detail(d));
        let time = |name: &str| -> Result<Option<u64>, AuthFailure> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() => Ok(Some(x.max(0.0) as u64)),
                    _ => Err(refused(Reason::Malformed)
                        .detail(format!("`{name}` is not a number of seconds"))),
                },
            }
        };
        let leeway = issuer.leeway;
        let Some(exp) = time("exp")? else {
            return fail(Reason::MissingClaim, "no `exp` claim".into());
        };
        let valid_until = exp.saturating_add(leeway);
        if now >= valid_until {
            return fail(Reason::Expired, format!("expired at {exp}"));
        }
        if let Some(nbf) = time("nbf")? {
            if nbf > now.saturating_add(leeway) {
                return fail(Reason::NotYetValid, format!("not before {nbf}"));
            }
        }
        if let Some(iat) = time("iat")? {
            if iat > now.saturating_add(leeway) {
                return fail(Reason::NotYetValid, format!("issued in the future ({iat})"));
            }
        }
        if !issuer.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(a)) => issuer.audiences.iter().any(|x| **x == **a),
                Some(serde_json::Value::Array(list)) => list.iter().any(|a| {
                    a.as_str()
                        .is_some_and(|a| issuer.audiences.iter().any(|x| &**x == a))
                }),
                _ => false,
            };
            if !ok {
                return fail(Reason::WrongAudience, "no accepted `aud`".into());
            }
        }
        for c in issuer.required_claims.iter() {
            if claims.get(&**c).is_none_or(|v| v.is_null()) {
                return fail(Reason::MissingClaim, format!("no `{c}` claim"));
            }
        }
        let (consumer, consumer_id) = match &issuer.consumer_claim {
            None => (None, None),
            Some(name) => {
                let Some(id) = claims.get(&**name).and_then(|v| v.as_str()) else {
                    return fail(Reason::UnknownConsumer, format!("no `{name}` claim"));
                };
                match self.consumers.get(id) {
                    Some(c) => (Some(c.clone()), Some(Arc::<str>::from(id))),
                    None => return Err(unknown_consumer(id)),
                }
            }
        };
        let principal = Arc::new(Principal {
            issuer: issuer.name.clone(),
            subject: claims.get("sub").and_then(|v| v.as_str()).map(Box::from),
            scopes: Principal::scopes_from(&claims),
            expires_at: Some(exp),
            claims,
        });
        if let Some(k) = cache_key {
            issuer.cache.insert(
                k,
                Entry {
                    principal: principal.clone(),
                    key,
                    valid_until,
                    consumer: consumer_id,
                },
            );
        }
        Ok(Identity {
            consumer,
            method: Method::Jwt,
            principal: Some(principal),
        })
    }
}

fn unknown_consumer(id: &str) -> AuthFailure {
    refused(Reason::UnknownConsumer).detail(format!("no consumer has the id {id:?}"))
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| "not base64url".to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

enum Found {
    Key(Arc<Key>),
    /// Keys for this `kid` and algorithm exist; none verifies.
    BadSignature,
    /// The `kid` names keys of another family only.
    WrongFamily,
    /// No key for this `kid` (or no key at all for a token without one).
    NoKey,
}

/// The key that verifies the signature: keys with the token's `kid` (or,
/// when none has it, keys without a `kid`); every key of the issuer when
/// the token names no `kid`. Only keys of the algorithm's family are tried.
fn find_key(issuer: &Issuer, kid: Option<&str>, alg: Algorithm, sig: &str, msg: &[u8]) -> Found {
    let remote = issuer.remote_keys();
    let all = || {
        issuer
            .local
            .iter()
            .chain(remote.iter().flat_map(|r| r.iter()))
    };
    let named: Vec<&Arc<Key>> = match kid {
        Some(kid) => {
            let with_kid: Vec<_> = all().filter(|k| k.kid.as_deref() == Some(kid)).collect();
            if with_kid.is_empty() {
                all().filter(|k| k.kid.is_none()).collect()
            } else {
                with_kid
            }
        }
        None => all().collect(),
    };
    if named.is_empty() {
        return Found::NoKey;
    }
    let mut tried = false;
    for k in named {
        if k.allows(alg) {
            tried = true;
            if k.verify(alg, sig, msg) {
                return Found::Key(k.clone());
            }
        }
    }
    if tried {
        Found::BadSignature
    } else {
        Found::WrongFamily
    }
}

impl Authenticator for JwtAuth {
    fn method(&self) -> Method {
        Method::Jwt
    }

    fn authenticate(&self, req: &Request<Body>, _ctx: &Ctx) -> AttemptStep {
        match self.inner.source.find(req) {
            None => AttemptStep::Ready(Attempt::Absent),
            Some(token) => Inner::attempt(&self.inner, token),
        }
    }

    fn strip(&self, req: &mut Request<Body>) {
        self.inner.source.strip(req);
    }

    fn scheme(&self) -> Scheme {
        Scheme::Bearer
    }
}

impl Inner {
    /// Checks a token found in the request.
    fn attempt(inner: &Arc<Inner>, token: std::borrow::Cow<'_, str>) -> AttemptStep {
        if token.len() > inner.max_size {
            return AttemptStep::Ready(Attempt::Refused(refused(Reason::TooLarge).detail(
                format!("{} bytes, more than {}", token.len(), inner.max_size),
            )));
        }
        let now = now();
        let cache_key = inner.caching.then(|| TokenCache::key_of(token.as_bytes()));
        if let Some(k) = cache_key {
            if let Some(r) = inner.cached(k, now) {
                return AttemptStep::Ready(done(r));
            }
        }
        if !is_jwt_shaped(&token) {
            if inner.opaque_absent {
                return AttemptStep::Ready(Attempt::Absent);
            }
            return AttemptStep::Ready(Attempt::Refused(
                refused(Reason::Malformed).detail("not a JWT (three base64url parts)"),
            ));
        }
        match inner.verify(&token, cache_key, now, true) {
            Step::Done(r) => AttemptStep::Ready(done(r)),
            Step::Refetch(issuer) => {
                let inner = inner.clone();
                let token = token.into_owned();
                AttemptStep::Wait(Box::pin(async move {
                    issuer.refresh_for_unknown_kid().await;
                    match inner.verify(&token, cache_key, self::now(), false) {
                        Step::Done(r) => done(r),
                        Step::Refetch(_) => Attempt::Refused(refused(Reason::UnknownKid)),
                    }
                }))
            }
        }
    }
}

fn done(r: Result<Identity, AuthFailure>) -> Attempt {
    match r {
        Ok(id) => Attempt::Verified(id),
        Err(f) => Attempt::Refused(f),
    }
}

#[cfg(test)]
mod tests;
