//! The `cors` policy: cross-origin resource sharing for browsers.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
//! is answered here: `204` with the `Access-Control-Allow-*` headers when
//! the origin, the method and every requested header are allowed, else
//! `403 forbidden`. The router sends a preflight to the route that would
//! receive the actual request even when that route's `methods` lack
//! `OPTIONS` (`router::Conditions::preflight`).
//!
//! Any other request with an allowed `Origin` goes on, and `on_response`
//! stamps `Access-Control-Allow-Origin` (the origin echoed, or `*` when any
//! origin is allowed without credentials), `-Allow-Credentials` and
//! `-Expose-Headers` on its response, gateway-made errors included. A
//! disallowed origin is not refused: the request proceeds without those
//! headers (and any the upstream sent are removed), so the browser withholds
//! the response from the page. Every response of the route gets
//! `Vary: Origin`.
//!
//! Everything sent is built at compile time; a request costs header
//! lookups and byte comparisons, no formatting.

use super::{Ctx, Flow, Policy, Step};
use crate::body::Body;
use crate::error::{ErrorKind, GatewayError};
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};

/// What the policy decided for one request, kept in [`Ctx::cors`] for
/// `on_response`.
#[derive(Debug, Clone)]
pub enum Seen {
    /// A preflight answered by the policy (its response is complete).
    Preflight,
    /// An allowed cross-origin request: the `Access-Control-Allow-Origin`
    /// value to send (the request's own `Origin`, or `*`).
    Allowed(HeaderValue),
}

/// Allowed origins, lower-case.
#[derive(Debug)]
pub enum Origins {
    /// `*`: every origin.
    Any,
    List {
        exact: Vec<Box<str>>,
        patterns: Vec<OriginPattern>,
    },
}

/// `scheme://*.suffix[:port]`: `prefix` is `scheme://`, `suffix` is
/// `.suffix[:port]`; the `*` stands for one or more host labels.
#[derive(Debug, PartialEq)]
pub struct OriginPattern {
    prefix: Box<str>,
    suffix: Box<str>,
}

impl OriginPattern {
    fn matches(&self, origin: &str) -> bool {
        let (p, s) = (self.prefix.as_bytes(), self.suffix.as_bytes());
        let o = origin.as_bytes();
        if o.len() <= p.len() + s.len()
            || !o[..p.len()].eq_ignore_ascii_case(p)
            || !o[o.len() - s.len()..].eq_ignore_ascii_case(s)
        {
            return false;
        }
        // One or more non-empty labels of host-name characters.
        let labels = &o[p.len()..o.len() - s.len()];
        labels
            .split(|b| *b == b'.')
            .all(|l| !l.is_empty() && l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-'))
    }
}

impl Origins {
    fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::List { exact, patterns } => {
                exact.iter().any(|e| e.eq_ignore_ascii_case(origin))
                    || patterns.iter().any(|p| p.matches(origin))
            }
        }
    }
}

#[derive(Debug)]
pub enum AllowHeaders {
    /// `*`: whatever the preflight asks for is allowed (and echoed back, so
    /// that it also works with credentials and for `Authorization`).
    Any,
    /// Lower-case names, and the prebuilt `Access-Control-Allow-Headers`.
    List(Vec<HeaderName>, Option<HeaderValue>),
}

#[derive(Debug)]
pub struct CorsPolicy {
    pub origins: Origins,
    pub methods: Vec<Method>,
    /// `Access-Control-Allow-Methods`.
    pub methods_value: HeaderValue,
    pub headers: AllowHeaders,
    /// `Access-Control-Expose-Headers`, when any.
    pub expose_value: Option<HeaderValue>,
    pub credentials: bool,
    /// `Access-Control-Max-Age`, when set.
    pub max_age_value: Option<HeaderValue>,
}

const VARY_ORIGIN: HeaderValue = HeaderValue::from_static("origin");
const VARY_PREFLIGHT: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);
const TRUE: HeaderValue = HeaderValue::from_static("true");
const STAR: HeaderValue = HeaderValue::from_static("*");

fn forbidden(message: &'static str) -> Step<'static> {
    Step::Ready(Err(GatewayError::new(ErrorKind::Forbidden, message)))
}

impl CorsPolicy {
    /// The `Access-Control-Allow-Origin` value for an allowed origin.
    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if matches!(self.origins, Origins::Any) && !self.credentials {
            STAR
        } else {
            origin.clone()
        }
    }

    fn preflight(
        &self,
        origin: &HeaderValue,
        req: &Request<Body>,
    ) -> Result<Response<Body>, GatewayError> {
        let h = req.headers();
        let method = h
            .get(ACCESS_CONTROL_REQUEST_METHOD)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if !self.methods.iter().any(|m| m.as_str().as_bytes() == method) {
            return Err(GatewayError::new(
                ErrorKind::Forbidden,
                "CORS preflight: method not allowed",
            ));
        }
        let requested = h.get_all(ACCESS_CONTROL_REQUEST_HEADERS);
        let mut asked: Option<&HeaderValue> = None;
        for v in requested.iter() {
            let Ok(s) = v.to_str() else {
                return Err(GatewayError::new(
                    ErrorKind::Forbidden,
                    "CORS preflight: header not allowed",
                ));
            };
            for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let ok = match &self.headers {
                    AllowHeaders::Any => HeaderName::from_bytes(name.as_bytes()).is_ok(),
                    AllowHeaders::List(names, _) => {
                        names.iter().any(|n| n.as_str().eq_ignore_ascii_case(name))
                    }
                };
                if !ok {
                    return Err(GatewayError::new(
                        ErrorKind::Forbidden,
                        "CORS preflight: header not allowed",
                    ));
                }
                asked = Some(v);
            }
        }
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let out = resp.headers_mut();
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin(origin));
        out.insert(ACCESS_CONTROL_ALLOW_METHODS, self.methods_value.clone());
        match (&self.headers, asked) {
            (_, None) => {}
            (AllowHeaders::Any, Some(_)) => {
                // Echo what was asked (every value, all checked above).
                for v in requested.iter() {
                    out.append(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
                }
            }
            (AllowHeaders::List(_, Some(v)), Some(_)) => {
                out.insert(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
            (AllowHeaders::List(_, None), Some(_)) => {}
        }
        if self.credentials {
            out.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
        }
        if let Some(v) = &self.max_age_value {
            out.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        out.insert(VARY, VARY_PREFLIGHT);
        Ok(resp)
    }
}

impl Policy for CorsPolicy {
    fn name(&self) -> &'static str {
        "cors"
    }

    fn on_request<'a>(&'a self, req: &'a mut Request<Body>, ctx: &'a mut Ctx) -> Step<'a> {
        let Some(origin) = req.headers().get(ORIGIN) else {
            return Step::Ready(Ok(Flow::Continue));
        };
        let allowed = origin.to_str().is_ok_and(|o| self.origins.allows(o));
        let preflight = req.method() == Method::OPTIONS
            && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            if !allowed {
                return forbidden("CORS preflight: origin not allowed");
            }
            ctx.cors = Some(Seen::Preflight);
            return Step::Ready(
                self.preflight(origin, req)
                    .map(|r| Flow::Respond(Box::new(r))),
            );
        }
        if allowed {
            ctx.cors = Some(Seen::Allowed(self.allow_origin(origin)));
        }
        Step::Ready(Ok(Flow::Continue))
    }

    fn on_response(&self, resp: &mut Response<Body>, ctx: &Ctx) {
        let h = resp.headers_mut();
        match &ctx.cors {
            Some(Seen::Preflight) => {}
            Some(Seen::Allowed(origin)) => {
                h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                if self.credentials {
                    h.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
                } else {
                    h.remove(ACCESS_CONTROL_ALLOW_CREDENTIALS);
                }
                match &self.expose_value {
                    Some(v) => {
                        h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
                    }
                    None => {
                        h.remove(ACCESS_CONTROL_EXPOSE_HEADERS);
                    }
                }
                h.append(VARY, VARY_ORIGIN);
            }
            None => {
                // Not a cross-origin request, or a refused origin: the
                // upstream's own CORS headers must not let it through.
                h.remove(ACCESS_CONTROL_ALLOW_ORIGIN);
                h.remove(ACCESS_CONTROL_ALLOW_CREDENTIALS);
                h.remove(ACCESS_CONTROL_EXPOSE_HEADERS);
                h.append(VARY, VARY_ORIGIN);
            }
        }
    }
}

/// Compiles a `cors` step; `p` is its key path (`...policies[0].cors`).
pub fn compile(
    p: &str,
    c: &crate::config::model::CorsPolicy,
    err: super::compile::Err,
) -> Option<CorsPolicy> {
    let mut failed = false;
    let mut e = |k: String, m: String| {
        failed = true;
        err(k, m)
    };
    if c.allow_origins.is_empty() {
        e(
            format!("{p}.allow_origins"),
            "list at least one origin (`https://app.example.com`, `https://*.example.com` or `*`)"
                .into(),
        );
    }
    let mut any = false;
    let mut exact = Vec::new();
    let mut patterns = Vec::new();
    for (i, o) in c.allow_origins.iter().enumerate() {
        let k = format!("{p}.allow_origins[{i}]");
        if o == "*" {
            any = true;
            if c.allow_origins.len() > 1 {
                e(
                    k.clone(),
                    "`*` allows every origin: list it alone or list no `*`".into(),
                );
            }
            if c.allow_credentials {
                e(
                    k,
                    "`*` cannot be used with `allow_credentials: true`: list the origins".into(),
                );
            }
            continue;
        }
        match parse_origin(o) {
            Ok(Parsed::Exact(x)) => exact.push(x),
            Ok(Parsed::Pattern(x)) => patterns.push(x),
            Err(m) => e(k, m),
        }
    }
    let mut methods = Vec::new();
    for (i, m) in c.allow_methods.iter().enumerate() {
        match Method::from_bytes(m.as_bytes()) {
            Ok(mm) if m.bytes().all(|b| b.is_ascii_uppercase()) => {
                if !methods.contains(&mm) {
                    methods.push(mm);
                }
            }
            Ok(_) => e(
                format!("{p}.allow_methods[{i}]"),
                format!("write `{m}` in upper case (methods are case-sensitive)"),
            ),
            Err(_) => e(
                format!("{p}.allow_methods[{i}]"),
                format!("`{m}` is not an HTTP method"),
            ),
        }
    }
    if c.allow_methods.is_empty() {
        e(
            format!("{p}.allow_methods"),
            "list at least one method".into(),
        );
    }
    let names = |key: &str, list: &[String], e: &mut dyn FnMut(String, String)| {
        let mut out: Vec<HeaderName> = Vec::new();
        for (i, n) in list.iter().enumerate() {
            match HeaderName::from_bytes(n.as_bytes()) {
                Ok(h) => {
                    if !out.contains(&h) {
                        out.push(h)
                    }
                }
                Err(_) => e(
                    format!("{p}.{key}[{i}]"),
                    format!("`{n}` is not a valid header name"),
                ),
            }
        }
        out
    };
    let headers = if c.allow_headers.iter().any(|h| h == "*") {
        if c.allow_headers.len() > 1 {
            e(
                format!("{p}.allow_headers"),
                "`*` allows every header: list it alone".into(),
            );
        }
        AllowHeaders::Any
    } else {
        let list = names("allow_headers", &c.allow_headers, &mut e);
        let value = join(&list);
        AllowHeaders::List(list, value)
    };
    if c.expose_headers.iter().any(|h| h == "*") {
        e(
            format!("{p}.expose_headers"),
            "list the header names (`*` is not honoured with credentials and hides intent)".into(),
        );
    }
    let expose = names(
        "expose_headers",
        &c.expose_headers
            .iter()
            .filter(|h| *h != "*")
            .cloned()
            .collect::<Vec<_>>(),
        &mut e,
    );
    let methods_value = HeaderValue::from_str(
        &methods
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", "),
    );
    let max_age_value = c.max_age.map(|d| HeaderValue::from(d.0.as_secs()));
    if failed {
        return None;
    }
    Some(CorsPolicy {
        origins: if any {
            Origins::Any
        } else {
            Origins::List { exact, patterns }
        },
        methods,
        methods_value: methods_value.ok()?,
        headers,
        expose_value: join(&expose),
        credentials: c.allow_credentials,
        max_age_value,
    })
}

fn join(names: &[HeaderName]) -> Option<HeaderValue> {
    if names.is_empty() {
        return None;
    }
    let s = names
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::from_str(&s).ok()
}

enum Parsed {
    Exact(Box<str>),
    Pattern(OriginPattern),
}

/// `scheme://host[:port]`, host possibly `*.suffix`; no path, no user info.
fn parse_origin(o: &str) -> Result<Parsed, String> {
    let bad = |why: &str| Err(format!("`{o}` is not an origin: {why}"));
    if o == "null" {
        return bad("`null` is what sandboxed documents and local files send; allowing it would allow them all");
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return bad("write `scheme://host[:port]`, like `https://app.example.com`");
    };
    if scheme.is_empty()
        || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
    {
        return bad("the scheme is invalid");
    }
    if rest.contains('/') {
        return bad("an origin has no path (not even a trailing `/`)");
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, port)) if !rest.starts_with('[') || h.ends_with(']') => {
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
                return bad("the port is invalid");
            }
            (h, Some(port))
        }
        _ => (rest, None),
    };
    let (wild, bare) = match host.strip_prefix("*.") {
        Some(b) => (true, b),
        None => (false, host),
    };
    let ip6 = bare.starts_with('[') && bare.ends_with(']') && !wild;
    let valid_host = !bare.is_empty()
        && (ip6
            || bare.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    if !valid_host {
        return bad(if host.contains('*') && !wild {
            "a wildcard must be the whole first label, as in `https://*.example.com`"
        } else {
            "the host is invalid"
        });
    }
    let lower = o.to_ascii_lowercase();
    if wild {
        let prefix = format!("{}://", scheme.to_ascii_lowercase());
        let mut suffix = format!(".{}", bare.to_ascii_lowercase());
        if let Some(port) = port {
            suffix.push(':');
            suffix.push_str(port);
        }
        return Ok(Parsed::Pattern(OriginPattern {
            prefix: prefix.into(),
            suffix: suffix.into(),
        }));
    }
    Ok(Parsed::Exact(lower.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model;

    fn policy(yaml: &str) -> Result<CorsPolicy, Vec<(String, String)>> {
        let c: model::CorsPolicy = serde_yaml::from_str(yaml).unwrap();
        let mut errors = Vec::new();
        let p = compile("cors", &c, &mut |k, m| errors.push((k, m)));
        p.ok_or(errors)
    }

    #[test]
    fn patterns_match_one_or_more_labels() {
        let Parsed::Pattern(p) = parse_origin("https://*.example.com").ok().unwrap() else {
            panic!("not a pattern")
        };
        assert!(p.matches("https://app.example.com"));
        assert!(p.matches("https://a.b.example.com"));
        assert!(p.matches("HTTPS://App.Example.COM"));
        assert!(!p.matches("https://example.com"));
        assert!(!p.matches("https://.example.com"));
        assert!(!p.matches("https://a..example.com"));
        assert!(!p.matches("http://app.example.com"));
        assert!(!p.matches("https://app.example.com:8443"));
        assert!(!p.matches("https://evil.com/.example.com"));
        assert!(!p.matches("https://app.example.com.evil.com"));
        assert!(!p.matches("https://a@b.example.com"));
        let Parsed::Pattern(p) = parse_origin("https://*.example.com:8443").ok().unwrap() else {
            panic!("not a pattern")
        };
        assert!(p.matches("https://app.example.com:8443"));
        assert!(!p.matches("https://app.example.com"));
    }

    #[test]
    fn invalid_origins_are_config_errors() {
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://*example.com",
            "https://a.*.example.com",
            "https://*",
            "https://app.example.com:port",
            "null",
            "://x",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        assert!(parse_origin("http://localhost:3000").is_ok());
        assert!(parse_origin("http://[::1]:3000").is_ok());
    }

    #[test]
    fn compile_errors_name_their_keys() {
        let e = policy("{allow_origins: ['*'], allow_credentials: true}").unwrap_err();
        assert_eq!(e[0].0, "cors.allow_origins[0]");
        assert!(e[0].1.contains("allow_credentials"), "{e:?}");
        let e = policy("{allow_origins: ['https://a.example'], allow_methods: [GET, 'B@D']}")
            .unwrap_err();
        assert_eq!(e[0].0, "cors.allow_methods[1]");
        let e = policy("{allow_origins: ['https://a.example'], allow_methods: [get]}").unwrap_err();
        assert_eq!(e[0].0, "cors.allow_methods[0]");
        let e =
            policy("{allow_origins: ['https://a.example'], allow_headers: ['x ok']}").unwrap_err();
        assert_eq!(e[0].0, "cors.allow_headers[0]");
        let e = policy("{allow_origins: ['https://a.example'], expose_headers: ['bad:name']}")
            .unwrap_err();
        assert_eq!(e[0].0, "cors.expose_headers[0]");
        let e = policy("{allow_origins: []}").unwrap_err();
        assert_eq!(e[0].0, "cors.allow_origins");
        let e = policy("{allow_origins: ['*', 'https://a.example']}").unwrap_err();
        assert_eq!(e[0].0, "cors.allow_origins[0]");
    }

    #[test]
    fn values_are_prebuilt() {
        let p = policy(
            "{allow_origins: ['https://a.example'], allow_methods: [GET, PUT], allow_headers: [X-Api-Key, content-type], expose_headers: [x-total], max_age: 10m}",
        )
        .unwrap();
        assert_eq!(p.methods_value, "GET, PUT");
        let AllowHeaders::List(_, Some(v)) = &p.headers else {
            panic!("list expected")
        };
        assert_eq!(v, "x-api-key, content-type");
        assert_eq!(p.expose_value.as_ref().unwrap(), "x-total");
        assert_eq!(p.max_age_value.as_ref().unwrap(), "600");
        assert!(p.origins.allows("https://A.example"));
        assert!(!p.origins.allows("https://b.example"));
    }
}
