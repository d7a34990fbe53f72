//! The `introspection` method: OAuth2 token introspection (RFC 7662) for
//! opaque tokens.
//!
//! - [`IntrospectionServer`]: one `auth.introspection` entry, compiled once
//!   per snapshot and kept across reloads while its configuration is the
//!   same (its cache and its connections with it). It POSTs
//!   `token=…&token_type_hint=access_token` with the client's credentials
//!   in HTTP Basic (RFC 6749 §2.3.1) through a [`Fetcher`], and caches the
//!   answer by the token's SHA-256: active tokens until their `exp`, at
//!   most `cache_ttl`; inactive ones for `inactive_ttl`. Concurrent
//!   requests with the same uncached token share one call (single-flight);
//!   the call runs in its own task, so a client that goes away does not
//!   cancel it for the others.
//! - [`IntrospectionAuth`]: the method of one route's `auth` policy: where
//!   the token is read, the server, and the consumers a `consumer_claim`
//!   names. A cached answer costs no allocation and no wait.
//!
//! A server that cannot answer (refused, timed out, non-2xx, not JSON, no
//! boolean `active`) never lets a request through: it is refused with
//! `Reason::Unavailable` and the configured `unavailable_status`.

mod cache;

pub use cache::TokenCache;

use super::credential::Source;
use super::fetch::Fetcher;
use super::{Attempt, AttemptStep, AuthFailure, Authenticator, Consumers, Identity, Method};
use super::{Principal, Reason, Scheme};
use crate::body::Body;
use crate::config::model;
use crate::policy::Ctx;
use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Largest introspection answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// What the server said about a token (what the cache holds).
#[derive(Debug, Clone)]
enum Verdict {
    Active(Arc<Principal>),
    Inactive,
    /// Active, but its `exp` has passed (the server's clock disagrees).
    Expired,
}

/// The result of one call: a verdict, or why there is none.
type Outcome = Result<Verdict, Arc<str>>;

/// One `auth.introspection` server and its runtime state.
pub struct IntrospectionServer {
    pub name: Arc<str>,
    /// What it was compiled from: a reload keeps this server (cache,
    /// connections) when the entry and the cache size are unchanged.
    spec: model::Introspection,
    cache_size: usize,
    fetcher: Fetcher,
    /// `Basic base64(urlencode(id):urlencode(secret))`, marked sensitive.
    authorization: HeaderValue,
    cache: TokenCache<Verdict>,
    /// Calls in progress, by token digest: later requests for the same
    /// token wait on the first one's answer.
    flights: Mutex<HashMap<[u8; 32], watch::Receiver<Option<Outcome>>>>,
    cache_ttl_ms: u64,
    inactive_ttl_ms: u64,
    unavailable_status: StatusCode,
    consumer_claim: Option<Box<str>>,
    max_token_size: usize,
}

impl std::fmt::Debug for IntrospectionServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectionServer")
            .field("name", &self.name)
            .field("url", &self.fetcher.url())
            .finish()
    }
}

impl IntrospectionServer {
    /// Compiles `auth.introspection[i]` (key path `p`): `raw_line(key)` is
    /// the line of the file before `${VAR}` interpolation (the secret must
    /// come from the environment), `base` the configuration's directory
    /// (relative `ca` paths), `previous` the server of the same name in the
    /// running snapshot (reused as it is when nothing changed). No network
    /// I/O; only the `ca` file is read.
    pub fn compile(
        p: &str,
        spec: &model::Introspection,
        cache_size: usize,
        base: &Path,
        raw_line: impl Fn(&str) -> Option<String>,
        previous: Option<&Arc<IntrospectionServer>>,
        mut err: impl FnMut(String, String),
    ) -> Option<Arc<IntrospectionServer>> {
        let mut errs: Vec<(String, String)> = Vec::new();
        let mut e = |k: String, m: String| errs.push((k, m));
        if spec.name.is_empty() {
            e(format!("{p}.name"), "must not be empty".into());
        }
        if spec.client_id.is_empty() {
            e(format!("{p}.client_id"), "must not be empty".into());
        }
        let raw = raw_line(&format!("{p}.client_secret")).unwrap_or_default();
        if !raw.contains("${") {
            e(
                format!("{p}.client_secret"),
                "must come from the environment (`client_secret: ${INTROSPECTION_SECRET}`), never be written in the file".into(),
            );
        } else if spec.client_secret.is_empty() {
            e(
                format!("{p}.client_secret"),
                "is empty (is the variable set?)".into(),
            );
        }
        if spec.timeout.0.is_zero() {
            e(format!("{p}.timeout"), "must be more than 0".into());
        }
        let unavailable_status = match StatusCode::from_u16(spec.unavailable_status) {
            Ok(s) if s.is_client_error() || s.is_server_error() => Some(s),
            _ => {
                e(
                    format!("{p}.unavailable_status"),
                    format!(
                        "{} is not a 4xx or 5xx status (the request is never let through)",
                        spec.unavailable_status
                    ),
                );
                None
            }
        };
        if spec.consumer_claim.as_deref() == Some("") {
            e(format!("{p}.consumer_claim"), "must not be empty".into());
        }
        if spec.max_token_size.0 == 0 {
            e(format!("{p}.max_token_size"), "must be more than 0".into());
        }
        let authorization = basic_credentials(&spec.client_id, &spec.client_secret);
        if authorization.is_none() {
            e(
                format!("{p}.client_id"),
                "the credentials do not make a valid header value".into(),
            );
        }
        let reusable = previous.filter(|prev| prev.spec == *spec && prev.cache_size == cache_size);
        if let (Some(prev), true) = (reusable, errs.is_empty()) {
            return Some(prev.clone());
        }
        let ca = spec.ca.as_deref().map(|c| base.join(c));
        let fetcher = match Fetcher::new(&spec.url, ca, spec.timeout.0, MAX_ANSWER) {
            Ok(f) => Some(f),
            Err(m) => {
                errs.push((format!("{p}.url"), m));
                None
            }
        };
        if !errs.is_empty() {
            for (k, m) in errs {
                err(k, m);
            }
            return None;
        }
        Some(Arc::new(IntrospectionServer {
            name: spec.name.as_str().into(),
            spec: spec.clone(),
            cache_size,
            fetcher: fetcher?,
            authorization: authorization?,
            cache: TokenCache::new(cache_size),
            flights: Mutex::new(HashMap::new()),
            cache_ttl_ms: spec.cache_ttl.0.as_millis() as u64,
            inactive_ttl_ms: spec.inactive_ttl.0.as_millis() as u64,
            unavailable_status: unavailable_status?,
            consumer_claim: spec.consumer_claim.as_deref().map(Box::from),
            max_token_size: spec.max_token_size.0 as usize,
        }))
    }

    /// Whether tokens of this server name consumers.
    pub fn consumer_claim(&self) -> Option<&str> {
        self.consumer_claim.as_deref()
    }

    /// The cached answer for a token digest.
    fn cached(&self, key: &[u8; 32]) -> Option<Verdict> {
        self.cache.get(key, crate::clock::now_ms())
    }

    /// The answer for `token` (digest `key`): from the cache, from a call
    /// already in progress for it, or from a new call.
    async fn lookup(self: Arc<Self>, key: [u8; 32], token: String) -> Outcome {
        let mut rx = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            // Checked again under the lock: a call that just finished
            // stored its answer before leaving `flights`.
            if let Some(v) = self.cached(&key) {
                return Ok(v);
            }
            match flights.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key, rx.clone());
                    let me = self.clone();
                    tokio::spawn(async move {
                        let out = me.introspect(&token).await;
                        me.remember(key, &out);
                        let _ = tx.send(Some(out));
                        me.flights
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key);
                    });
                    rx
                }
            }
        };
        let out = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_else(|| Err("no answer".into())),
            Err(_) => Err(format!("{}: the introspection call was abandoned", self.name).into()),
        };
        out
    }

    /// One call to the endpoint.
    async fn introspect(&self, token: &str) -> Outcome {
        let mut body = String::with_capacity(token.len() + 48);
        body.push_str("token=");
        form_encode(token, &mut body);
        body.push_str("&token_type_hint=access_token");
        let answer = self
            .fetcher
            .post_form(
                &[(header::AUTHORIZATION, self.authorization.clone())],
                Bytes::from(body),
            )
            .await?;
        if !answer.status.is_success() {
            return Err(format!("{} answered {}", self.fetcher.url(), answer.status).into());
        }
        let claims = match serde_json::from_slice::<serde_json::Value>(&answer.body) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => {
                return Err(
                    format!("{}: the answer is not a JSON object", self.fetcher.url()).into(),
                )
            }
            Err(e) => {
                return Err(format!("{}: the answer is not JSON: {e}", self.fetcher.url()).into())
            }
        };
        match claims.get("active") {
            Some(serde_json::Value::Bool(true)) => {}
            Some(serde_json::Value::Bool(false)) => return Ok(Verdict::Inactive),
            _ => {
                return Err(
                    format!("{}: the answer has no boolean `active`", self.fetcher.url()).into(),
                )
            }
        }
        let expires_at = claims.get("exp").and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        });
        if expires_at.is_some_and(|exp| exp <= now_secs()) {
            return Ok(Verdict::Expired);
        }
        Ok(Verdict::Active(Arc::new(Principal {
            issuer: self.name.clone(),
            subject: claims.get("sub").and_then(|v| v.as_str()).map(Box::from),
            scopes: Principal::scopes_from(&claims),
            expires_at,
            claims,
        })))
    }

    /// Caches a verdict: active until `exp`, at most `cache_ttl`; inactive
    /// or expired for `inactive_ttl`. Failures are not cached.
    fn remember(&self, key: [u8; 32], out: &Outcome) {
        let now = crate::clock::now_ms();
        let ttl = match out {
            Ok(Verdict::Active(p)) => match p.expires_at {
                Some(exp) => {
                    let left = exp.saturating_mul(1000).saturating_sub(now_epoch_ms());
                    left.min(self.cache_ttl_ms)
                }
                None => self.cache_ttl_ms,
            },
            Ok(Verdict::Inactive | Verdict::Expired) => self.inactive_ttl_ms,
            Err(_) => return,
        };
        if let Ok(v) = out {
            self.cache.insert(key, v.clone(), now, ttl);
        }
    }

    /// Entries in the cache (tests).
    pub fn cached_entries(&self) -> usize {
        self.cache.len()
    }
}

/// The `introspection` method of one route's `auth` policy.
pub struct IntrospectionAuth {
    pub server: Arc<IntrospectionServer>,
    pub source: Source,
    /// The snapshot's consumers, for `consumer_claim`.
    pub consumers: Arc<Consumers>,
}

fn refuse(reason: Reason) -> AuthFailure {
    AuthFailure::new(reason, Method::Introspection, Scheme::Bearer)
}

impl IntrospectionAuth {
    /// The attempt's result for a verdict.
    fn decide(server: &IntrospectionServer, consumers: &Consumers, out: Outcome) -> Attempt {
        let p = match out {
            Ok(Verdict::Active(p)) => p,
            Ok(Verdict::Inactive) => return Attempt::Refused(refuse(Reason::Inactive)),
            Ok(Verdict::Expired) => return Attempt::Refused(refuse(Reason::Expired)),
            Err(detail) => {
                let mut f = refuse(Reason::Unavailable).detail(detail.to_string());
                f.status = Some(server.unavailable_status);
                return Attempt::Refused(f);
            }
        };
        if p.expires_at.is_some_and(|exp| exp <= now_secs()) {
            return Attempt::Refused(refuse(Reason::Expired));
        }
        let consumer = match server.consumer_claim.as_deref() {
            None => None,
            Some(claim) => match p.claim(claim).and_then(|v| v.as_str()) {
                Some(id) => match consumers.get(id) {
                    Some(c) => Some(c.clone()),
                    None => {
                        return Attempt::Refused(
                            refuse(Reason::UnknownConsumer)
                                .detail(format!("`{claim}` names no consumer: `{id}`")),
                        )
                    }
                },
                None => {
                    return Attempt::Refused(
                        refuse(Reason::UnknownConsumer)
                            .detail(format!("the answer has no string `{claim}`")),
                    )
                }
            },
        };
        Attempt::Verified(Identity {
            consumer,
            method: Method::Introspection,
            principal: Some(p),
        })
    }
}

impl Authenticator for IntrospectionAuth {
    fn method(&self) -> Method {
        Method::Introspection
    }

    fn authenticate(&self, req: &Request<Body>, _ctx: &Ctx) -> AttemptStep {
        let Some(token) = self.source.find(req) else {
            return AttemptStep::Ready(Attempt::Absent);
        };
        if token.len() > self.server.max_token_size {
            return AttemptStep::Ready(Attempt::Refused(refuse(Reason::TooLarge)));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
        if let Some(v) = self.server.cached(&key) {
            return AttemptStep::Ready(Self::decide(&self.server, &self.consumers, Ok(v)));
        }
        let server = self.server.clone();
        let consumers = self.consumers.clone();
        let token = token.into_owned();
        AttemptStep::Wait(Box::pin(async move {
            let out = server.clone().lookup(key, token).await;
            Self::decide(&server, &consumers, out)
        }))
    }

    fn strip(&self, req: &mut Request<Body>) {
        self.source.strip(req);
    }

    fn scheme(&self) -> Scheme {
        Scheme::Bearer
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `application/x-www-form-urlencoded` (the WHATWG serializer): ASCII
/// alphanumerics and `*-._` as they are, space as `+`, every other byte
/// `%XX`.
pub fn form_encode(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 15) as usize] as char);
            }
        }
    }
}

/// The `Authorization` value of RFC 6749 §2.3.1: id and secret each
/// form-urlencoded, joined by `:`, in base64.
fn basic_credentials(id: &str, secret: &str) -> Option<HeaderValue> {
    let mut plain = String::new();
    form_encode(id, &mut plain);
    plain.push(':');
    form_encode(secret, &mut plain);
    let mut v = HeaderValue::try_from(format!("Basic {}", base64(plain.as_bytes()))).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn form_encoding_escapes_reserved_bytes() {
        let mut s = String::new();
        form_encode("a b+c&d=e/é~*-._", &mut s);
        assert_eq!(s, "a+b%2Bc%26d%3De%2F%C3%A9%7E*-._");
    }

    #[test]
    fn basic_credentials_encode_id_and_secret_first() {
        // RFC 6749 §2.3.1: "gateway client" / "s:cret" → form-encoded.
        let v = basic_credentials("gateway client", "s:cret").unwrap();
        assert_eq!(v, format!("Basic {}", base64(b"gateway+client:s%3Acret")));
        assert!(v.is_sensitive());
    }

    fn spec(yaml: &str) -> model::Introspection {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn compile(
        s: &model::Introspection,
        raw: &str,
        prev: Option<&Arc<IntrospectionServer>>,
    ) -> (Option<Arc<IntrospectionServer>>, Vec<String>) {
        let mut errs = Vec::new();
        let raw = raw.to_string();
        let out = IntrospectionServer::compile(
            "auth.introspection[0]",
            s,
            100,
            Path::new("."),
            |_| Some(raw.clone()),
            prev,
            |k, m| errs.push(format!("{k}: {m}")),
        );
        (out, errs)
    }

    const OK: &str =
        "{name: idp, url: 'http://127.0.0.1:9/introspect', client_id: gw, client_secret: s3cret}";

    #[test]
    fn compile_checks_keys() {
        let (s, errs) = compile(&spec(OK), "client_secret: ${S}", None);
        assert!(errs.is_empty(), "{errs:?}");
        let s = s.unwrap();
        assert_eq!(s.unavailable_status, StatusCode::SERVICE_UNAVAILABLE);
        let (_, errs) = compile(&spec(OK), "client_secret: s3cret", None);
        assert!(
            errs[0].contains("client_secret: must come from the environment"),
            "{errs:?}"
        );
        let bad = spec("{name: idp, url: 'ftp://x/', client_id: gw, client_secret: s, unavailable_status: 200, timeout: 0s}");
        let (s, errs) = compile(&bad, "${S}", None);
        assert!(s.is_none());
        let all = errs.join("\n");
        assert!(
            all.contains("unavailable_status: 200 is not a 4xx or 5xx"),
            "{all}"
        );
        assert!(all.contains("timeout: must be more than 0"), "{all}");
        assert!(
            all.contains("url: `ftp://x/` must start with http"),
            "{all}"
        );
    }

    /// A loopback endpoint answering every call with `answer`; counts calls.
    async fn endpoint(answer: &'static str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use http_body_util::{BodyExt, Full};
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let c = c.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            c.fetch_add(1, Ordering::SeqCst);
                            async move {
                                let _ = req.into_body().collect().await;
                                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                    Bytes::from_static(answer.as_bytes()),
                                )))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (format!("http://{addr}/introspect"), calls)
    }

    fn server_at(url: &str) -> Arc<IntrospectionServer> {
        let s = spec(&format!(
            "{{name: idp, url: '{url}', client_id: gw, client_secret: s}}"
        ));
        compile(&s, "${S}", None).0.unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_lookups_of_one_token_make_one_call() {
        let (url, calls) = endpoint(r#"{"active":true,"scope":"read","sub":"u"}"#).await;
        let s = server_at(&url);
        let key = [7u8; 32];
        // On one thread, all three are polled (and find the first one's
        // call in `flights`) before the call's task runs.
        let (a, b, c) = tokio::join!(
            s.clone().lookup(key, "t".into()),
            s.clone().lookup(key, "t".into()),
            s.clone().lookup(key, "t".into()),
        );
        for out in [a, b, c] {
            let Ok(Verdict::Active(p)) = out else {
                panic!("active: {out:?}")
            };
            assert_eq!(p.subject.as_deref(), Some("u"));
            assert!(p.has_scope("read"));
            assert_eq!(&*p.issuer, "idp");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(s.flights.lock().unwrap().is_empty());
        assert_eq!(s.cached_entries(), 1);
        assert!(s.clone().lookup(key, "t".into()).await.is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn active_answers_are_cached_no_longer_than_their_exp() {
        let s = server_at("http://127.0.0.1:9/");
        let soon = now_secs() + 2;
        let p = Principal {
            expires_at: Some(soon),
            ..Default::default()
        };
        s.remember([1; 32], &Ok(Verdict::Active(Arc::new(p))));
        let now = crate::clock::now_ms();
        assert!(s.cache.get(&[1; 32], now).is_some());
        assert!(s.cache.get(&[1; 32], now + 2_100).is_none());
        // Without `exp`: `cache_ttl` (300 s by default).
        s.remember([2; 32], &Ok(Verdict::Active(Arc::default())));
        assert!(s.cache.get(&[2; 32], now + 299_000).is_some());
        assert!(s.cache.get(&[2; 32], now + 301_000).is_none());
        // Failures are not remembered.
        s.remember([3; 32], &Err("down".into()));
        assert!(s.cache.get(&[3; 32], now).is_none());
    }

    #[test]
    fn an_unchanged_server_is_kept_across_recompiles() {
        let (a, _) = compile(&spec(OK), "${S}", None);
        let a = a.unwrap();
        let (b, _) = compile(&spec(OK), "${S}", Some(&a));
        assert!(Arc::ptr_eq(&a, &b.unwrap()));
        let changed = spec("{name: idp, url: 'http://127.0.0.1:9/introspect', client_id: gw, client_secret: other}");
        let (c, _) = compile(&changed, "${S}", Some(&a));
        assert!(!Arc::ptr_eq(&a, &c.unwrap()));
    }
}
