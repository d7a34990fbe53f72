//! Header hygiene between client and upstream: hop-by-hop removal
//! (RFC 9110 §7.6.1, plus every header the Connection header names) and the
//! forwarded headers (`X-Forwarded-For/-Proto/-Host`, `Forwarded`).
//!
//! Forwarded headers from the client are kept only when the TCP peer is a
//! trusted proxy; otherwise they are replaced, so a client cannot spoof its
//! address to the upstream.

use crate::net::{canonical, push_ip, CidrSet};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE) && connection_has(h, "upgrade")
}

fn connection_has(h: &HeaderMap, token: &str) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Connection: upgrade`
/// and `Upgrade` survive (for a WebSocket handshake).
/// `TE: trailers` is kept: it is how gRPC asks for trailers end to end.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Nearly every message has none: one pass over the names (cheap
    // comparisons, no hashing) instead of a lookup per hop-by-hop name.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE) && n != header::TE)
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
        if keep_upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::PROXY_AUTHENTICATE);
    h.remove(header::PROXY_AUTHORIZATION);
    h.remove(header::TRANSFER_ENCODING);
    // `Trailer` is end to end (RFC 9110 §6.6.2), not hop-by-hop: it declares
    // the trailer fields, and hyper only sends the trailers it names.
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
    if let Some(te) = h.get(header::TE) {
        let only_trailers = te
            .to_str()
            .map(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false);
        if only_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            h.remove(header::TE);
        }
    }
}

/// Whether `n` is one of the headers [`strip_hop_by_hop`] removes or rewrites
/// regardless of `Connection` (which is one of them).
fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
        || n == header::TE
        || n == header::PROXY_AUTHENTICATE
        || n == header::PROXY_AUTHORIZATION
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
}

/// The real client address: the peer, unless the peer is trusted, in which
/// case the right-most untrusted address of `X-Forwarded-For`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &CidrSet) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let mut hops: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .collect();
    while let Some(hop) = hops.pop() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(ip) => continue,
            Ok(ip) => return canonical(ip),
            Err(_) => break,
        }
    }
    peer
}

/// Every line of a list-valued header, joined with `, ` (a chain may come
/// as several header lines); `None` when absent.
fn joined(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in h.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
        match &mut out {
            Some(s) => {
                s.push_str(", ");
                s.push_str(v);
            }
            None => out = Some(v.to_string()),
        }
    }
    out
}

/// Sets the forwarded headers for the upstream request.
pub fn set_forwarded(
    h: &mut HeaderMap,
    peer: IpAddr,
    peer_trusted: bool,
    tls: bool,
    host: Option<&HeaderValue>,
) {
    let peer = canonical(peer);
    let proto = if tls { "https" } else { "http" };
    let mut ip = Vec::with_capacity(48);
    push_ip(&mut ip, peer);
    // Shared, not copied, when it is the whole X-Forwarded-For value.
    let ip = bytes::Bytes::from(ip);

    // X-Forwarded-For: append to a trusted chain, else start a new one.
    let xff = match peer_trusted.then(|| joined(h, &X_FORWARDED_FOR)).flatten() {
        Some(prev) => {
            let mut prev = prev.into_bytes();
            prev.extend_from_slice(b", ");
            prev.extend_from_slice(&ip);
            bytes::Bytes::from(prev)
        }
        None => ip.clone(),
    };
    if let Ok(v) = HeaderValue::from_maybe_shared(xff) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(peer_trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !(peer_trusted && h.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(v) => {
                h.insert(X_FORWARDED_HOST.clone(), v.clone());
            }
            None => {
                h.remove(&X_FORWARDED_HOST);
            }
        }
    }

    // Forwarded (RFC 7239).
    let mut buf = match peer_trusted
        .then(|| joined(h, &header::FORWARDED))
        .flatten()
    {
        Some(prev) => {
            let mut prev = prev.into_bytes();
            prev.extend_from_slice(b", ");
            prev
        }
        None => Vec::with_capacity(64),
    };
    match peer {
        IpAddr::V4(_) => {
            buf.extend_from_slice(b"for=");
            buf.extend_from_slice(&ip);
        }
        IpAddr::V6(_) => {
            buf.extend_from_slice(b"for=\"[");
            buf.extend_from_slice(&ip);
            buf.extend_from_slice(b"]\"");
        }
    }
    buf.extend_from_slice(b";proto=");
    buf.extend_from_slice(proto.as_bytes());
    if let Some(host) = host.and_then(|v| v.to_str().ok()) {
        // A token (RFC 7239 §4) has no `:`, `[` or `]`: a port or an IPv6
        // literal makes it a quoted string.
        if host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        {
            buf.extend_from_slice(b";host=");
            buf.extend_from_slice(host.as_bytes());
        } else {
            buf.extend_from_slice(b";host=\"");
            buf.extend(host.bytes().filter(|c| !matches!(c, b'"' | b'\\')));
            buf.push(b'"');
        }
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(buf)) {
        h.insert(header::FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Cidr;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = hm(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic x"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-end-to-end"]);
    }

    #[test]
    fn keeps_upgrade_and_te_trailers() {
        let mut h = hm(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("te").unwrap(), "trailers");
    }

    #[test]
    fn untrusted_peer_cannot_spoof() {
        let mut h = hm(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        let peer: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &CidrSet::default()), peer);
        set_forwarded(
            &mut h,
            peer,
            false,
            false,
            Some(&HeaderValue::from_static("api.test")),
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "9.9.9.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "api.test");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=9.9.9.9;proto=http;host=api.test"
        );
    }

    #[test]
    fn trusted_peer_chain_is_extended() {
        let trusted = CidrSet(vec![Cidr::parse("10.0.0.0/8").unwrap()]);
        let mut h = hm(&[
            ("x-forwarded-for", "203.0.113.7, 10.0.0.2"),
            ("x-forwarded-proto", "https"),
        ]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        set_forwarded(&mut h, peer, true, false, None);
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "203.0.113.7, 10.0.0.2, 10.0.0.1"
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        let v6: IpAddr = "::1".parse().unwrap();
        set_forwarded(&mut h, v6, false, true, None);
        assert_eq!(h.get("forwarded").unwrap(), "for=\"[::1]\";proto=https");
    }

    #[test]
    fn ip_text_matches_display() {
        let ips = [
            "0.0.0.0",
            "9.10.99.100",
            "255.254.1.20",
            "127.0.0.1",
            "::1",
            "2001:db8::8a2e:370:7334",
        ];
        for ip in ips {
            let ip: IpAddr = ip.parse().unwrap();
            let mut s = Vec::new();
            push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string().as_bytes());
        }
    }

    #[test]
    fn ordinary_headers_pass_untouched() {
        let mut h = hm(&[("host", "a"), ("accept", "*/*"), ("x-custom", "1")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        let mut h = hm(&[("accept", "*/*"), ("keep-alive", "timeout=5")]);
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("keep-alive"));
    }
}
