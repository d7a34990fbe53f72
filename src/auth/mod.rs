//! Identity: who is calling.
//!
//! - [`Consumer`] / [`Consumers`]: the known clients of the configuration,
//!   compiled into lookup tables (API key digest, certificate fingerprint,
//!   subject, SAN → consumer) once per snapshot.
//! - [`Identity`]: what an `auth` policy established for a request (in
//!   `policy::Ctx::identity`): the consumer (if any), the method, and the
//!   token's [`Principal`] (claims, scopes) for JWT and introspection.
//! - [`Authenticator`]: one accepted method of a route's `auth` policy
//!   (`policy::auth`), answering [`Attempt`]: no credential of its kind,
//!   verified, or refused with an [`AuthFailure`].
//! - [`AuthFailure`] → the `GatewayError` a client gets: `401` with an RFC
//!   6750 `WWW-Authenticate` challenge, `403`, or the configured answer when
//!   the service checking credentials is down; and the closed [`Reason`] set
//!   counted in `portico_auth_failures_total`.

pub mod apikey;
pub mod consumer;
pub mod credential;
pub mod fetch;
pub mod introspect;
pub mod jwt;

pub use consumer::{Consumer, Consumers};

use crate::body::Body;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::Ctx;
use http::{header, HeaderValue, Request, StatusCode};
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// How a request was identified (the `x-auth-method` value, a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    ApiKey,
    Jwt,
    Introspection,
    Mtls,
    /// No credential, on a route that allows anonymous access.
    Anonymous,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::ApiKey,
        Method::Jwt,
        Method::Introspection,
        Method::Mtls,
        Method::Anonymous,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::ApiKey => "api_key",
            Method::Jwt => "jwt",
            Method::Introspection => "introspection",
            Method::Mtls => "mtls",
            Method::Anonymous => "anonymous",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a request was refused: a closed set (metric label `reason`, access
/// log). The client sees only a generic description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No credential of any accepted method.
    Missing,
    /// Not parseable (a token that is not a JWT, bad base64, bad JSON).
    Malformed,
    /// Larger than the issuer's `max_token_size`.
    TooLarge,
    /// An API key no consumer has.
    UnknownKey,
    /// A revoked API key.
    Revoked,
    /// The signature does not verify.
    BadSignature,
    /// The token's `alg` is not allowed for the issuer or the key.
    BadAlgorithm,
    /// No key of the issuer has the token's `kid`.
    UnknownKid,
    Expired,
    NotYetValid,
    /// `iss` is not an accepted issuer.
    WrongIssuer,
    /// `aud` has none of the accepted audiences.
    WrongAudience,
    /// A required claim is absent.
    MissingClaim,
    /// Introspection says the token is not active.
    Inactive,
    /// The credential is valid but names no known consumer (consumer claim,
    /// client certificate).
    UnknownConsumer,
    /// Introspection endpoint or JWKS down.
    Unavailable,
    /// The consumer or group is not allowed on the route.
    ConsumerDenied,
    /// A required scope is missing.
    InsufficientScope,
    /// No required role.
    MissingRole,
    /// A required claim value differs.
    ClaimMismatch,
    /// The client address is denied or not allowed.
    IpDenied,
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Reason::Missing,
        Reason::Malformed,
        Reason::TooLarge,
        Reason::UnknownKey,
        Reason::Revoked,
        Reason::BadSignature,
        Reason::BadAlgorithm,
        Reason::UnknownKid,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::WrongIssuer,
        Reason::WrongAudience,
        Reason::MissingClaim,
        Reason::Inactive,
        Reason::UnknownConsumer,
        Reason::Unavailable,
        Reason::ConsumerDenied,
        Reason::InsufficientScope,
        Reason::MissingRole,
        Reason::ClaimMismatch,
        Reason::IpDenied,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Malformed => "malformed",
            Reason::TooLarge => "too_large",
            Reason::UnknownKey => "unknown_key",
            Reason::Revoked => "revoked",
            Reason::BadSignature => "bad_signature",
            Reason::BadAlgorithm => "bad_algorithm",
            Reason::UnknownKid => "unknown_kid",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::WrongAudience => "wrong_audience",
            Reason::MissingClaim => "missing_claim",
            Reason::Inactive => "inactive",
            Reason::UnknownConsumer => "unknown_consumer",
            Reason::Unavailable => "unavailable",
            Reason::ConsumerDenied => "consumer_denied",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::MissingRole => "missing_role",
            Reason::ClaimMismatch => "claim_mismatch",
            Reason::IpDenied => "ip_denied",
        }
    }

    /// What the client is told (RFC 6750 keeps it short; details are logged).
    fn description(self) -> &'static str {
        match self {
            Reason::Missing => "credentials are required",
            Reason::UnknownKey | Reason::Revoked => "the API key is not valid",
            Reason::Expired => "the token has expired",
            Reason::NotYetValid => "the token is not valid yet",
            Reason::Malformed
            | Reason::TooLarge
            | Reason::BadSignature
            | Reason::BadAlgorithm
            | Reason::UnknownKid
            | Reason::WrongIssuer
            | Reason::WrongAudience
            | Reason::MissingClaim
            | Reason::Inactive
            | Reason::UnknownConsumer => "the credentials are not valid",
            Reason::Unavailable => "credentials cannot be checked right now",
            Reason::InsufficientScope => "the token lacks a required scope",
            Reason::ConsumerDenied
            | Reason::MissingRole
            | Reason::ClaimMismatch
            | Reason::IpDenied => "access to this route is not allowed",
        }
    }
}

/// The authentication scheme a failure is reported under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `WWW-Authenticate: Bearer ...` (RFC 6750).
    Bearer,
    /// `WWW-Authenticate: ApiKey ...`.
    ApiKey,
    /// Client certificates: no challenge header.
    Certificate,
}

/// A refused request: why, under which scheme, and what the client gets.
#[derive(Debug, Clone)]
pub struct AuthFailure {
    pub reason: Reason,
    pub method: Method,
    pub scheme: Scheme,
    /// For `Unavailable`: the configured status (503 by default).
    pub status: Option<StatusCode>,
    /// Extra detail for the gateway's log (never sent to the client).
    pub detail: Option<Cow<'static, str>>,
}

impl AuthFailure {
    pub fn new(reason: Reason, method: Method, scheme: Scheme) -> AuthFailure {
        AuthFailure {
            reason,
            method,
            scheme,
            status: None,
            detail: None,
        }
    }

    pub fn detail(mut self, d: impl Into<Cow<'static, str>>) -> AuthFailure {
        self.detail = Some(d.into());
        self
    }

    /// The answer: 401 + challenge for bad or missing credentials, 403 for
    /// a known caller without the right, 503 (or the configured status)
    /// when credentials cannot be checked.
    ///
    /// Challenges follow RFC 6750 §3 and RFC 7235: every 401 carries one
    /// (except for client certificates, which have no HTTP scheme); a 403
    /// carries one only for a bearer token lacking a scope
    /// (`error="insufficient_scope"`, so an OAuth client knows to ask for a
    /// wider token); any other 403 carries none — new credentials of the
    /// same caller would not change the answer.
    pub fn to_error(&self, realm: &str) -> GatewayError {
        let (kind, code) = match self.reason {
            Reason::Unavailable => (ErrorKind::AuthUnavailable, None),
            Reason::InsufficientScope => (ErrorKind::Forbidden, Some("insufficient_scope")),
            Reason::ConsumerDenied
            | Reason::MissingRole
            | Reason::ClaimMismatch
            | Reason::IpDenied => (ErrorKind::Forbidden, None),
            Reason::Missing => (ErrorKind::Unauthorized, None),
            _ => (ErrorKind::Unauthorized, Some("invalid_token")),
        };
        let desc = self.reason.description();
        let mut e = GatewayError::new(kind, desc);
        if let Some(s) = self.status {
            e = e.with_status(s);
        }
        let challenges = match kind {
            ErrorKind::Unauthorized => true,
            // A configured `401` still challenges (RFC 7235 requires it).
            ErrorKind::AuthUnavailable => self.status == Some(StatusCode::UNAUTHORIZED),
            _ => self.reason == Reason::InsufficientScope && self.scheme == Scheme::Bearer,
        };
        let challenge = match self.scheme {
            _ if !challenges => None,
            Scheme::Certificate => None,
            Scheme::ApiKey => Some(format!("ApiKey realm=\"{realm}\"")),
            Scheme::Bearer => Some(match code {
                None => format!("Bearer realm=\"{realm}\""),
                Some(code) => format!(
                    "Bearer realm=\"{realm}\", error=\"{code}\", error_description=\"{desc}\""
                ),
            }),
        };
        if let Some(c) = challenge.and_then(|c| HeaderValue::try_from(c).ok()) {
            e = e.with_header(header::WWW_AUTHENTICATE, c);
        }
        e
    }
}

/// Claims of a verified token (JWT or introspection answer), shared by the
/// token cache and every request that presents the same token.
#[derive(Debug, Default)]
pub struct Principal {
    /// The `auth.jwt_issuers` / `auth.introspection` name that verified it.
    pub issuer: Arc<str>,
    pub subject: Option<Box<str>>,
    /// Every claim, as received.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// `scope` (space-separated string or array) or `scp` (array or string).
    pub scopes: Box<[Box<str>]>,
    /// `exp`, seconds since the epoch.
    pub expires_at: Option<u64>,
}

impl Principal {
    /// Scopes from the standard claims: `scope` as a space-separated string
    /// (RFC 8693) or an array, and `scp` (Azure AD, Okta) likewise.
    pub fn scopes_from(claims: &serde_json::Map<String, serde_json::Value>) -> Box<[Box<str>]> {
        let mut out: Vec<Box<str>> = Vec::new();
        for key in ["scope", "scp"] {
            match claims.get(key) {
                Some(serde_json::Value::String(s)) => {
                    out.extend(s.split_ascii_whitespace().map(Box::from))
                }
                Some(serde_json::Value::Array(a)) => {
                    out.extend(a.iter().filter_map(|v| v.as_str()).map(Box::from))
                }
                _ => {}
            }
        }
        out.into_boxed_slice()
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| &**s == scope)
    }

    /// A claim by name or dot path (`realm_access.roles`).
    pub fn claim(&self, path: &str) -> Option<&serde_json::Value> {
        if let Some(v) = self.claims.get(path) {
            return Some(v);
        }
        let mut parts = path.split('.');
        let mut v = self.claims.get(parts.next()?)?;
        for p in parts {
            v = v.as_object()?.get(p)?;
        }
        Some(v)
    }
}

/// Who the request is from, once an `auth` policy ran.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The configured consumer, when the credential names one.
    pub consumer: Option<Arc<Consumer>>,
    pub method: Method,
    /// The token's claims (JWT, introspection).
    pub principal: Option<Arc<Principal>>,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            consumer: None,
            method: Method::Anonymous,
            principal: None,
        }
    }

    /// The consumer id, `anonymous`, or (authenticated without a
    /// configured consumer) `None`.
    pub fn consumer_id(&self) -> Option<&str> {
        match (&self.consumer, self.method) {
            (Some(c), _) => Some(&c.id),
            (None, Method::Anonymous) => Some(ANONYMOUS),
            (None, _) => None,
        }
    }
}

/// What one method found in the request.
pub enum Attempt {
    /// No credential of this method's kind (the next method is tried).
    Absent,
    Verified(Identity),
    Refused(AuthFailure),
}

/// An attempt that must wait. It owns what it needs (an `Arc` of the
/// method's state, the token), so the policy can change the request after it.
pub type AttemptFuture = Pin<Box<dyn Future<Output = Attempt> + Send + 'static>>;

/// An attempt that is known at once (API key, cached token, mTLS) or must
/// wait (introspection, a JWKS refresh for an unknown `kid`).
pub enum AttemptStep {
    Ready(Attempt),
    Wait(AttemptFuture),
}

/// One accepted method of a route's `auth` policy.
pub trait Authenticator: Send + Sync + 'static {
    fn method(&self) -> Method;

    /// Looks for this method's credential in the request and checks it.
    fn authenticate(&self, req: &Request<Body>, ctx: &Ctx) -> AttemptStep;

    /// Removes this method's credential from the request before it is
    /// forwarded (`strip_credentials`).
    fn strip(&self, req: &mut Request<Body>);

    /// The scheme a missing credential is challenged with.
    fn scheme(&self) -> Scheme;
}

/// The consumer id of a caller without credentials on a route that allows
/// it: the `x-consumer-id` value, the `consumer` metric label. Reserved: no
/// configured consumer may have it.
pub const ANONYMOUS: &str = "anonymous";

/// The realm in `WWW-Authenticate` challenges.
pub const REALM: &str = "portico";

/// Lower-case hex of SHA-256: what `portico hash-key` prints and
/// `credentials.api_keys[].sha256` holds.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut s = String::with_capacity(64);
    for b in d.as_ref() {
        s.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
        s.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
    }
    s
}

/// Parses 64 hex digits.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_round_trips() {
        let h = sha256_hex(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let raw = parse_sha256_hex(&h).unwrap();
        assert_eq!(raw[0], 0xba);
        assert!(parse_sha256_hex("zz").is_none());
        assert!(parse_sha256_hex(&h[..63]).is_none());
    }

    #[test]
    fn scopes_from_string_and_arrays() {
        let claims: serde_json::Map<_, _> =
            serde_json::from_str(r#"{"scope":"read write","scp":["admin"]}"#).unwrap();
        let p = Principal {
            scopes: Principal::scopes_from(&claims),
            claims,
            ..Default::default()
        };
        assert!(p.has_scope("read") && p.has_scope("write") && p.has_scope("admin"));
        assert!(!p.has_scope("rea"));
    }

    #[test]
    fn claim_by_dot_path() {
        let claims: serde_json::Map<_, _> =
            serde_json::from_str(r#"{"realm_access":{"roles":["a"]},"x.y":1}"#).unwrap();
        let p = Principal {
            claims,
            ..Default::default()
        };
        assert!(p.claim("realm_access.roles").unwrap().is_array());
        assert_eq!(p.claim("x.y").unwrap(), 1);
        assert!(p.claim("realm_access.nope").is_none());
    }

    #[test]
    fn failures_map_to_rfc6750_answers() {
        let e = AuthFailure::new(Reason::Missing, Method::Jwt, Scheme::Bearer).to_error(REALM);
        assert_eq!(e.status(), 401);
        let resp = e.to_response(None);
        assert_eq!(
            resp.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"portico\""
        );
        let e = AuthFailure::new(Reason::Expired, Method::Jwt, Scheme::Bearer).to_error(REALM);
        let resp = e.to_response(None);
        let c = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(c.contains("error=\"invalid_token\""), "{c}");
        let e = AuthFailure::new(Reason::InsufficientScope, Method::Jwt, Scheme::Bearer)
            .to_error(REALM);
        assert_eq!(e.status(), 403);
        let resp = e.to_response(None);
        let c = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(c.contains("error=\"insufficient_scope\""), "{c}");
        let mut f = AuthFailure::new(Reason::Unavailable, Method::Introspection, Scheme::Bearer);
        f.status = Some(StatusCode::BAD_GATEWAY);
        let e = f.to_error(REALM);
        assert_eq!(e.status(), 502);
        assert_eq!(e.kind(), ErrorKind::AuthUnavailable);
        assert!(e
            .to_response(None)
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .is_none());
    }

    fn challenge(reason: Reason, method: Method, scheme: Scheme) -> Option<String> {
        let e = AuthFailure::new(reason, method, scheme).to_error(REALM);
        let resp = e.to_response(None);
        let all: Vec<_> = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert!(all.len() <= 1, "{all:?}");
        all.into_iter().next()
    }

    #[test]
    fn only_401s_and_a_missing_bearer_scope_challenge() {
        // Refusals of a known caller: 403 without a challenge, whatever
        // the scheme (the access policy reports anonymous callers under
        // the auth step's first scheme, Bearer by default).
        for reason in [
            Reason::IpDenied,
            Reason::ConsumerDenied,
            Reason::MissingRole,
            Reason::ClaimMismatch,
        ] {
            for (method, scheme) in [
                (Method::Jwt, Scheme::Bearer),
                (Method::Introspection, Scheme::Bearer),
                (Method::Anonymous, Scheme::Bearer),
                (Method::ApiKey, Scheme::ApiKey),
                (Method::Mtls, Scheme::Certificate),
            ] {
                let e = AuthFailure::new(reason, method, scheme).to_error(REALM);
                assert_eq!(e.status(), 403, "{reason:?}");
                assert_eq!(
                    challenge(reason, method, scheme),
                    None,
                    "{reason:?} {scheme:?}"
                );
            }
        }
        // A missing scope: the RFC 6750 challenge for a bearer token only.
        assert_eq!(
            challenge(Reason::InsufficientScope, Method::Jwt, Scheme::Bearer).as_deref(),
            Some("Bearer realm=\"portico\", error=\"insufficient_scope\", error_description=\"the token lacks a required scope\"")
        );
        assert_eq!(
            challenge(Reason::InsufficientScope, Method::ApiKey, Scheme::ApiKey),
            None
        );
        assert_eq!(
            challenge(Reason::InsufficientScope, Method::Mtls, Scheme::Certificate),
            None
        );
        // Every 401 challenges under its scheme (certificates have none).
        assert_eq!(
            challenge(Reason::Missing, Method::ApiKey, Scheme::ApiKey).as_deref(),
            Some("ApiKey realm=\"portico\"")
        );
        assert_eq!(
            challenge(Reason::UnknownKey, Method::ApiKey, Scheme::ApiKey).as_deref(),
            Some("ApiKey realm=\"portico\"")
        );
        assert_eq!(
            challenge(Reason::Missing, Method::Anonymous, Scheme::Bearer).as_deref(),
            Some("Bearer realm=\"portico\"")
        );
        assert_eq!(
            challenge(Reason::UnknownConsumer, Method::Mtls, Scheme::Certificate),
            None
        );
        // Unavailable: none, unless the configured status is 401.
        let mut f = AuthFailure::new(Reason::Unavailable, Method::Jwt, Scheme::Bearer);
        assert!(f
            .to_error(REALM)
            .to_response(None)
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .is_none());
        f.status = Some(StatusCode::UNAUTHORIZED);
        assert_eq!(
            f.to_error(REALM).to_response(None).headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"portico\""
        );
    }
}
