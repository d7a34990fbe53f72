//! Where credentials are read from, and how they are removed before a
//! request is forwarded: `Authorization: Bearer`, another header, a cookie,
//! a query parameter.

use crate::body::Body;
use crate::router::percent_decode;
use http::{header, HeaderName, HeaderValue, Request, Uri};
use std::borrow::Cow;

/// Where one method reads its token or key.
#[derive(Debug, Clone)]
pub enum Source {
    /// `Authorization: Bearer <token>` (scheme case-insensitive).
    Bearer,
    /// The whole value of a header; a `Bearer ` prefix is removed.
    Header(HeaderName),
    Cookie(Box<str>),
    Query(Box<str>),
}

impl Source {
    /// A source from the method's optional `header`/`cookie`/`query` keys
    /// (at most one; none = `Authorization: Bearer`).
    pub fn from_keys(
        header: Option<&str>,
        cookie: Option<&str>,
        query: Option<&str>,
    ) -> Result<Source, String> {
        match (header, cookie, query) {
            (None, None, None) => Ok(Source::Bearer),
            (Some(h), None, None) => {
                let name = HeaderName::try_from(h)
                    .map_err(|_| format!("`{h}` is not a valid header name"))?;
                if name == header::AUTHORIZATION {
                    Ok(Source::Bearer)
                } else {
                    Ok(Source::Header(name))
                }
            }
            (None, Some(c), None) if !c.is_empty() => Ok(Source::Cookie(c.into())),
            (None, None, Some(q)) if !q.is_empty() => Ok(Source::Query(q.into())),
            _ => Err("give at most one of `header`, `cookie`, `query` (non-empty)".into()),
        }
    }

    /// The credential in the request, if any (empty values count as absent).
    pub fn find<'r>(&self, req: &'r Request<Body>) -> Option<Cow<'r, str>> {
        let found = match self {
            Source::Bearer => {
                let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
                let (scheme, rest) = v.split_once(' ')?;
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return None;
                }
                Cow::Borrowed(rest.trim())
            }
            Source::Header(name) => {
                let v = req.headers().get(name)?.to_str().ok()?.trim();
                let v = match v.split_once(' ') {
                    Some((s, rest)) if s.eq_ignore_ascii_case("bearer") => rest.trim(),
                    _ => v,
                };
                Cow::Borrowed(v)
            }
            Source::Cookie(name) => Cow::Borrowed(cookie(req, name)?),
            Source::Query(name) => query_param(req.uri(), name)?,
        };
        (!found.is_empty()).then_some(found)
    }

    /// Removes the credential from the request.
    pub fn strip(&self, req: &mut Request<Body>) {
        match self {
            Source::Bearer => {
                let bearer = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_once(' '))
                    .is_some_and(|(s, _)| s.eq_ignore_ascii_case("bearer"));
                if bearer {
                    req.headers_mut().remove(header::AUTHORIZATION);
                }
            }
            Source::Header(name) => {
                req.headers_mut().remove(name);
            }
            Source::Cookie(name) => remove_cookie(req, name),
            Source::Query(name) => {
                if let Some(uri) = remove_query_param(req.uri(), name) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
}

/// The value of cookie `name` (first occurrence) across `Cookie` headers.
pub fn cookie<'r>(req: &'r Request<Body>, name: &str) -> Option<&'r str> {
    for v in req.headers().get_all(header::COOKIE) {
        let Ok(s) = v.to_str() else { continue };
        for pair in s.split(';') {
            if let Some((k, val)) = pair.trim().split_once('=') {
                if k.trim() == name {
                    return Some(val.trim().trim_matches('"'));
                }
            }
        }
    }
    None
}

fn remove_cookie(req: &mut Request<Body>, name: &str) {
    let values: Vec<HeaderValue> = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .cloned()
        .collect();
    if values.is_empty() {
        return;
    }
    req.headers_mut().remove(header::COOKIE);
    for v in values {
        let Ok(s) = v.to_str() else {
            req.headers_mut().append(header::COOKIE, v);
            continue;
        };
        let kept: Vec<&str> = s
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .filter(|p| p.split_once('=').is_none_or(|(k, _)| k.trim() != name))
            .collect();
        if !kept.is_empty() {
            if let Ok(nv) = HeaderValue::try_from(kept.join("; ")) {
                req.headers_mut().append(header::COOKIE, nv);
            }
        }
    }
}

/// The percent-decoded value of query parameter `name` (first occurrence;
/// `+` is a space).
pub fn query_param<'u>(uri: &'u Uri, name: &str) -> Option<Cow<'u, str>> {
    crate::router::query_pairs(uri.query()?).find_map(|(k, v)| (k == name).then_some(v))
}

/// `uri` without every occurrence of query parameter `name`; `None` when it
/// has none.
pub fn remove_query_param(uri: &Uri, name: &str) -> Option<Uri> {
    let q = uri.query()?;
    let mut removed = false;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let hit = percent_decode(k) == name;
            removed |= hit;
            !hit
        })
        .collect();
    if !removed {
        return None;
    }
    let mut pq = uri.path().to_string();
    if !kept.is_empty() {
        pq.push('?');
        pq.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn bearer_header_cookie_query() {
        let r = req(
            "/x?a=1&access_token=t%2Bq&b=2",
            &[
                ("authorization", "bearer  tok "),
                ("x-token", "Bearer h"),
                ("cookie", "a=1; session=\"c\"; z=2"),
            ],
        );
        assert_eq!(Source::Bearer.find(&r).unwrap(), "tok");
        let h = Source::from_keys(Some("x-token"), None, None).unwrap();
        assert_eq!(h.find(&r).unwrap(), "h");
        let c = Source::from_keys(None, Some("session"), None).unwrap();
        assert_eq!(c.find(&r).unwrap(), "c");
        let q = Source::from_keys(None, None, Some("access_token")).unwrap();
        assert_eq!(q.find(&r).unwrap(), "t+q");
        assert!(Source::from_keys(Some("a"), Some("b"), None).is_err());
        let basic = req("/", &[("authorization", "Basic abc")]);
        assert!(Source::Bearer.find(&basic).is_none());
    }

    #[test]
    fn strip_removes_only_the_credential() {
        let mut r = req(
            "/x?a=1&key=k&b=2&key=k2",
            &[("cookie", "a=1; session=c"), ("authorization", "Bearer t")],
        );
        Source::Query("key".into()).strip(&mut r);
        assert_eq!(r.uri().to_string(), "/x?a=1&b=2");
        Source::Cookie("session".into()).strip(&mut r);
        assert_eq!(r.headers()["cookie"], "a=1");
        Source::Bearer.strip(&mut r);
        assert!(r.headers().get("authorization").is_none());
        let mut r = req("/x?key=k", &[("cookie", "session=c")]);
        Source::Query("key".into()).strip(&mut r);
        assert_eq!(r.uri().to_string(), "/x");
        Source::Cookie("session".into()).strip(&mut r);
        assert!(r.headers().get("cookie").is_none());
    }
}
