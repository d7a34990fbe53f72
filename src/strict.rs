//! Strict HTTP/1.1: request shapes that let two HTTP parsers disagree about
//! where a request ends or whom it is for (request smuggling, Host
//! confusion) are refused with `400` and a closed connection, never
//! forwarded.
//!
//! Three layers, each catching what the one before lets through:
//! 1. **hyper's parser** refuses, with a bare `400` and a closed connection,
//!    before any request reaches the gateway: differing `Content-Length`s,
//!    a non-numeric or list `Content-Length` (`5, 5`, `+5`), a
//!    `Transfer-Encoding` whose last coding is not `chunked`, any
//!    `Transfer-Encoding` in HTTP/1.0, obs-fold, bare CR, NUL and other
//!    control characters in header lines, whitespace before a header's colon.
//!    Invalid chunk sizes and chunk framing are found while the body streams:
//!    the body fails, the exchange with the upstream is aborted (it never
//!    gets a complete request) and the client connection is closed.
//! 2. **[`io::StrictIo`]**, a wrapper around the client connection, sees the
//!    raw request heads before hyper parses them and refuses the two shapes
//!    hyper accepts *and hides* from the gateway: `Content-Length` together
//!    with `Transfer-Encoding` (hyper drops the length and uses chunked) and
//!    a repeated `Content-Length` with equal values (hyper keeps one).
//! 3. **[`check_request`]**, first thing in `server::service::handle`,
//!    refuses what is visible in the parsed request: any `Transfer-Encoding`
//!    other than exactly one `chunked` (`gzip, chunked`, `chunked, chunked`,
//!    two header lines), `Content-Length` with `Transfer-Encoding` or
//!    repeated (defence in depth), a missing (HTTP/1.1), repeated or invalid
//!    `Host`, and a `Host` that disagrees with an absolute-form target's
//!    authority. The answer is the JSON `400 bad_request` with
//!    `Connection: close`, so hyper closes the connection after it.

pub mod io;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Uri, Version};
use std::fmt;

/// One refused request shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// `Content-Length` and `Transfer-Encoding` in one request.
    ContentLengthWithTransferEncoding,
    /// More than one `Content-Length` field line, even with equal values.
    RepeatedContentLength,
    /// A `Content-Length` that is not one decimal number.
    InvalidContentLength,
    /// A `Transfer-Encoding` other than exactly one `chunked`: unknown,
    /// stacked (`gzip, chunked`) or repeated codings.
    UnsupportedTransferEncoding,
    /// An HTTP/1.1 request without `Host`.
    MissingHost,
    /// More than one `Host` field line.
    RepeatedHost,
    /// A `Host` that is not `host[:port]`.
    InvalidHost,
    /// `Host` differs from the authority of an absolute-form target.
    HostMismatch,
}

impl Violation {
    pub fn message(self) -> &'static str {
        match self {
            Violation::ContentLengthWithTransferEncoding => {
                "both Content-Length and Transfer-Encoding"
            }
            Violation::RepeatedContentLength => "repeated Content-Length",
            Violation::InvalidContentLength => "invalid Content-Length",
            Violation::UnsupportedTransferEncoding => {
                "unsupported Transfer-Encoding (only a single `chunked` is accepted)"
            }
            Violation::MissingHost => "missing Host",
            Violation::RepeatedHost => "repeated Host",
            Violation::InvalidHost => "invalid Host",
            Violation::HostMismatch => "Host differs from the request target's authority",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Violation {}

/// Checks a parsed request (layer 3 in the module documentation).
pub fn check_request<B>(req: &Request<B>) -> Result<(), Violation> {
    check_head(req.version(), req.uri(), req.headers())
}

/// [`check_request`] on the parts of a request head.
pub fn check_head(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<(), Violation> {
    check_framing(headers)?;
    check_host(version, uri, headers)
}

fn check_framing(headers: &HeaderMap) -> Result<(), Violation> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let has_te = match te.next() {
        None => false,
        Some(v) => {
            if te.next().is_some() || !is_single_chunked(v.as_bytes()) {
                return Err(Violation::UnsupportedTransferEncoding);
            }
            true
        }
    };
    let mut cl = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(v) = cl.next() {
        if has_te {
            return Err(Violation::ContentLengthWithTransferEncoding);
        }
        if cl.next().is_some() {
            return Err(Violation::RepeatedContentLength);
        }
        if !is_decimal(v.as_bytes()) {
            return Err(Violation::InvalidContentLength);
        }
    }
    Ok(())
}

/// Exactly `chunked` (case-insensitive), optional whitespace around it.
pub(crate) fn is_single_chunked(v: &[u8]) -> bool {
    v.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// One or more ASCII digits, nothing else (no sign, no list, no spaces).
pub(crate) fn is_decimal(v: &[u8]) -> bool {
    !v.is_empty() && v.iter().all(u8::is_ascii_digit)
}

fn check_host(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<(), Violation> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Violation::RepeatedHost);
    }
    let Some(host) = host else {
        // HTTP/2 carries the authority in the URI instead; HTTP/1.0 may omit it.
        return if version == Version::HTTP_11 {
            Err(Violation::MissingHost)
        } else {
            Ok(())
        };
    };
    let (name, port) = split_host(host).ok_or(Violation::InvalidHost)?;
    if let Some(auth) = uri.authority() {
        let default_port = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => Some(443),
            Some(s) if s.eq_ignore_ascii_case("http") => Some(80),
            _ => None,
        };
        let same_name = auth.host().eq_ignore_ascii_case(name);
        let same_port = auth.port_u16().or(default_port) == port.or(default_port);
        if !same_name || !same_port {
            return Err(Violation::HostMismatch);
        }
    }
    Ok(())
}

/// Splits a `Host` value (`uri-host [ ":" port ]`, RFC 9110 §7.2) into the
/// host and the port; `None` when it is not one. An empty value is allowed
/// (for a target without authority).
fn split_host(v: &HeaderValue) -> Option<(&str, Option<u16>)> {
    let s = v.to_str().ok()?;
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        // IP-literal.
        let end = rest.find(']')?;
        let inner = &rest[..end];
        if inner.is_empty()
            || !inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'))
        {
            return None;
        }
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return None,
        };
        (&s[..end + 2], port)
    } else {
        let (name, port) = match s.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        };
        // A name or IPv4 address: unreserved characters only. (RFC 3986
        // also allows escapes and sub-delims `!$&'()*+,;=` in a reg-name; no
        // DNS name has them, and they would reach the upstream inside
        // `X-Forwarded-Host` and `Forwarded`, where `,`, `;` and `=` are
        // syntax.)
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            return None;
        }
        (name, port)
    };
    let port = match port {
        // `host:` (empty port) is allowed by the grammar.
        None | Some("") => None,
        Some(p) if is_decimal(p.as_bytes()) => Some(p.parse::<u16>().ok()?),
        Some(_) => return None,
    };
    Some((name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Headers<'a> = &'a [(&'a str, &'a [u8])];

    fn head(version: Version, uri: &str, headers: Headers) -> Result<(), Violation> {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        check_head(version, &uri.parse().unwrap(), &h)
    }

    fn h11(headers: Headers) -> Result<(), Violation> {
        head(Version::HTTP_11, "/", headers)
    }

    #[test]
    fn ordinary_requests_pass() {
        assert_eq!(h11(&[("host", b"example.com")]), Ok(()));
        assert_eq!(
            h11(&[("host", b"example.com:8080"), ("content-length", b"12")]),
            Ok(())
        );
        assert_eq!(
            h11(&[("host", b"x"), ("transfer-encoding", b"chunked")]),
            Ok(())
        );
        assert_eq!(
            h11(&[("host", b"x"), ("transfer-encoding", b" Chunked ")]),
            Ok(())
        );
        assert_eq!(h11(&[("host", b"[::1]:80")]), Ok(()));
        assert_eq!(h11(&[("host", b"127.0.0.1")]), Ok(()));
        assert_eq!(h11(&[("host", b"")]), Ok(()));
        assert_eq!(head(Version::HTTP_10, "/", &[]), Ok(()));
        assert_eq!(head(Version::HTTP_2, "http://a/", &[]), Ok(()));
        assert_eq!(
            head(
                Version::HTTP_11,
                "http://API.example.com/x",
                &[("host", b"api.EXAMPLE.com:80")]
            ),
            Ok(())
        );
        assert_eq!(
            head(Version::HTTP_11, "https://a:443/x", &[("host", b"a")]),
            Ok(())
        );
    }

    #[test]
    fn framing_conflicts_are_refused() {
        use Violation::*;
        let cases: &[(Headers, Violation)] = &[
            (
                &[("content-length", b"5"), ("transfer-encoding", b"chunked")],
                ContentLengthWithTransferEncoding,
            ),
            (
                &[("content-length", b"5"), ("content-length", b"5")],
                RepeatedContentLength,
            ),
            (&[("content-length", b"5, 5")], InvalidContentLength),
            (&[("content-length", b"+5")], InvalidContentLength),
            (&[("content-length", b"")], InvalidContentLength),
            (
                &[("transfer-encoding", b"gzip, chunked")],
                UnsupportedTransferEncoding,
            ),
            (
                &[("transfer-encoding", b"chunked, chunked")],
                UnsupportedTransferEncoding,
            ),
            (
                &[
                    ("transfer-encoding", b"chunked"),
                    ("transfer-encoding", b"chunked"),
                ],
                UnsupportedTransferEncoding,
            ),
            (
                &[("transfer-encoding", b"identity")],
                UnsupportedTransferEncoding,
            ),
            (
                &[("transfer-encoding", b"xchunked")],
                UnsupportedTransferEncoding,
            ),
            (&[("transfer-encoding", b"")], UnsupportedTransferEncoding),
        ];
        for (headers, want) in cases {
            let mut hs = vec![("host", &b"x"[..])];
            hs.extend_from_slice(headers);
            assert_eq!(h11(&hs), Err(*want), "{headers:?}");
        }
    }

    #[test]
    fn host_problems_are_refused() {
        use Violation::*;
        assert_eq!(h11(&[]), Err(MissingHost));
        assert_eq!(h11(&[("host", b"a"), ("host", b"a")]), Err(RepeatedHost));
        for bad in [
            &b"a b"[..],
            b"user@a",
            b"a:b",
            b"a:80:80",
            b"a:99999",
            b"[::1",
            b"[::1]x",
            b"[]",
            b"a/b",
            b"a\\b",
            b"x,for=6.6.6.6",
            b"a;b",
            b"a%41",
        ] {
            assert_eq!(h11(&[("host", bad)]), Err(InvalidHost), "{bad:?}");
        }
        assert_eq!(
            head(
                Version::HTTP_11,
                "http://a.example/x",
                &[("host", b"b.example")]
            ),
            Err(HostMismatch)
        );
        assert_eq!(
            head(
                Version::HTTP_11,
                "http://a.example:8080/x",
                &[("host", b"a.example")]
            ),
            Err(HostMismatch)
        );
        assert_eq!(
            head(Version::HTTP_11, "http://a.example/x", &[]),
            Err(MissingHost)
        );
    }
}
