//! Listener options around TLS: the redirect of plain HTTP to HTTPS and the
//! `Strict-Transport-Security` header.

use crate::body::Body;
use crate::error::{ErrorKind, GatewayError};
use http::{header, HeaderValue, Request, Response, StatusCode};
use std::time::Duration;

/// `redirect_to_https` of a plain listener: every request is answered with
/// `308 Permanent Redirect` to the same host, path and query over HTTPS (308
/// keeps the method and body, unlike 301).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectToHttps {
    /// The HTTPS port; omitted from `Location` when it is 443.
    pub port: u16,
}

impl RedirectToHttps {
    /// The redirect for `req`, or `400` when the request names no usable host.
    pub fn respond<B>(&self, req: &Request<B>) -> Result<Response<Body>, GatewayError> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .and_then(host_without_port)
            .ok_or_else(|| {
                GatewayError::new(
                    ErrorKind::BadRequest,
                    "cannot redirect to HTTPS: the request has no valid Host",
                )
            })?;
        let path = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .filter(|p| p.starts_with('/'))
            .unwrap_or("/");
        let location = if self.port == 443 {
            format!("https://{host}{path}")
        } else {
            format!("https://{host}:{}{path}", self.port)
        };
        let location = HeaderValue::from_str(&location)
            .map_err(|_| GatewayError::new(ErrorKind::BadRequest, "cannot redirect to HTTPS"))?;
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
        resp.headers_mut().insert(header::LOCATION, location);
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        Ok(resp)
    }
}

/// The host of a `Host` value without its port: a DNS name or IPv4 literal
/// (letters, digits, `-`, `.`, `_`) or a bracketed IPv6 literal. Anything
/// else is refused rather than echoed into a `Location`.
fn host_without_port(h: &str) -> Option<&str> {
    let host = if h.starts_with('[') {
        let end = h.find(']')?;
        let rest = &h[end + 1..];
        if !(rest.is_empty() || rest.starts_with(':')) {
            return None;
        }
        let inner = &h[1..end];
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        &h[..=end]
    } else {
        let host = h.rsplit_once(':').map_or(h, |(a, _)| a);
        let ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !ok {
            return None;
        }
        host
    };
    Some(host)
}

/// The `Strict-Transport-Security` value for these settings.
pub fn hsts_value(max_age: Duration, include_subdomains: bool, preload: bool) -> HeaderValue {
    let mut v = format!("max-age={}", max_age.as_secs());
    if include_subdomains {
        v.push_str("; includeSubDomains");
    }
    if preload {
        v.push_str("; preload");
    }
    HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("max-age=31536000"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(port: u16, host: Option<&str>, uri: &str) -> Result<String, u16> {
        let mut b = Request::get(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        let req = b.body(()).unwrap();
        match (RedirectToHttps { port }).respond(&req) {
            Ok(r) => {
                assert_eq!(r.status(), 308);
                Ok(r.headers()[header::LOCATION].to_str().unwrap().to_string())
            }
            Err(e) => Err(e.kind().status().as_u16()),
        }
    }

    #[test]
    fn redirect_locations() {
        assert_eq!(
            location(443, Some("Example.com:8080"), "/a/b?x=1&y=2"),
            Ok("https://Example.com/a/b?x=1&y=2".into())
        );
        assert_eq!(
            location(8443, Some("example.com"), "/"),
            Ok("https://example.com:8443/".into())
        );
        assert_eq!(
            location(443, Some("[::1]:80"), "/p"),
            Ok("https://[::1]/p".into())
        );
        assert_eq!(
            location(443, None, "http://h.example:80/q?z"),
            Ok("https://h.example/q?z".into())
        );
        assert_eq!(location(443, None, "/no-host"), Err(400));
        assert_eq!(location(443, Some("evil.com/x"), "/"), Err(400));
        assert_eq!(location(443, Some("[zz]"), "/"), Err(400));
    }

    #[test]
    fn hsts_values() {
        let y = Duration::from_secs(365 * 86400);
        assert_eq!(hsts_value(y, false, false), "max-age=31536000");
        assert_eq!(
            hsts_value(y, true, true),
            "max-age=31536000; includeSubDomains; preload"
        );
    }
}
