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
    // One pass over the names (cheap comparisons, no hashing) finds which
    // of them are present; nearly every message has none, or only
    // `Connection: keep-alive`.
    let mut present = 0u8;
    for k in h.keys() {
        present |= hop_bit(k);
    }
    if present == 0 {
        return;
    }
    if present & HOP_CONNECTION != 0 {
        // Every header the Connection header names goes too. Removing by
        // `&str` parses the name on the stack: no allocation.
        if h.get_all(header::CONNECTION).iter().nth(1).is_none() {
            if let Some(v) = h.remove(header::CONNECTION) {
                remove_named(h, &v, keep_upgrade);
            }
        } else {
            let all: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
            h.remove(header::CONNECTION);
            for v in &all {
                remove_named(h, v, keep_upgrade);
            }
        }
        if keep_upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    if present & HOP_OTHER != 0 {
        h.remove(&KEEP_ALIVE);
        h.remove(&PROXY_CONNECTION);
        h.remove(header::PROXY_AUTHENTICATE);
        h.remove(header::PROXY_AUTHORIZATION);
        h.remove(header::TRANSFER_ENCODING);
    }
    // `Trailer` is end to end (RFC 9110 §6.6.2), not hop-by-hop: it declares
    // the trailer fields, and hyper only sends the trailers it names.
    if present & HOP_UPGRADE != 0 && !keep_upgrade {
        h.remove(header::UPGRADE);
    }
    if present & HOP_TE != 0 {
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
}

/// Removes the headers a `Connection` value names (not `TE`, which is
/// handled by its own rule, nor `Upgrade` when it is kept).
fn remove_named(h: &mut HeaderMap, v: &HeaderValue, keep_upgrade: bool) {
    let Ok(s) = v.to_str() else { return };
    for t in s.split(',').map(str::trim) {
        let keep =
            t.eq_ignore_ascii_case("te") || (keep_upgrade && t.eq_ignore_ascii_case("upgrade"));
        if !keep && !t.is_empty() {
            h.remove(t);
        }
    }
}

const HOP_CONNECTION: u8 = 1;
const HOP_UPGRADE: u8 = 2;
const HOP_TE: u8 = 4;
const HOP_OTHER: u8 = 8;

/// Whether `n` is a hop-by-hop header (never set on an upstream request
/// by configuration).
pub fn is_hop_by_hop(n: &HeaderName) -> bool {
    hop_bit(n) != 0
}

/// Which group of hop-by-hop headers `n` belongs to (0: none).
#[inline]
fn hop_bit(n: &HeaderName) -> u8 {
    if n == header::CONNECTION {
        HOP_CONNECTION
    } else if n == header::UPGRADE {
        HOP_UPGRADE
    } else if n == header::TE {
        HOP_TE
    } else if n == header::TRANSFER_ENCODING
        || n == header::PROXY_AUTHENTICATE
        || n == header::PROXY_AUTHORIZATION
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
    {
        HOP_OTHER
    } else {
        0
    }
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

/// What every request of one client connection forwards the same way,
/// built once per connection: the peer's address as an `X-Forwarded-For`
/// value, and the last `Forwarded` value with the Host it was built for
/// (a keep-alive client sends the same Host every time). Used when the
/// peer is not a trusted proxy; a trusted peer's chains are built per
/// request.
pub struct ConnForwarded {
    peer: IpAddr,
    tls: bool,
    xff: HeaderValue,
    last: std::sync::Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl ConnForwarded {
    pub fn new(peer: IpAddr, tls: bool) -> ConnForwarded {
        let peer = canonical(peer);
        let mut ip = Vec::with_capacity(48);
        push_ip(&mut ip, peer);
        ConnForwarded {
            peer,
            tls,
            xff: HeaderValue::from_maybe_shared(bytes::Bytes::from(ip))
                .unwrap_or(HeaderValue::from_static("unknown")),
            last: std::sync::Mutex::new(None),
        }
    }

    /// `Forwarded` for `host`: the cached value when the Host is the last
    /// one's, else built (and cached).
    fn forwarded(&self, host: Option<&HeaderValue>) -> Option<HeaderValue> {
        if let Some(host) = host {
            if let Ok(g) = self.last.try_lock() {
                if let Some((h, v)) = &*g {
                    if h == host {
                        return Some(v.clone());
                    }
                }
            }
        }
        let proto = if self.tls { "https" } else { "http" };
        let v = forwarded_value(
            Vec::with_capacity(64),
            self.peer,
            self.xff.as_bytes(),
            proto,
            host,
        )?;
        if let (Some(host), Ok(mut g)) = (host, self.last.try_lock()) {
            // A copy, not a clone: the request's header value shares hyper's
            // read buffer, which a clone kept alive (8 KiB or more) for the
            // connection's whole life.
            if let Ok(own) = HeaderValue::from_bytes(host.as_bytes()) {
                *g = Some((own, v.clone()));
            }
        }
        Some(v)
    }
}

/// Sets the forwarded headers for the upstream request.
///
/// - `X-Forwarded-For`: the client chain (kept only from a trusted peer)
///   plus the peer address;
/// - `X-Forwarded-Proto`, `X-Forwarded-Host`: replaced unless a trusted
///   peer set them;
/// - `Forwarded` (RFC 7239): `for=<peer>;proto=<proto>;host=<host>`, appended
///   to a trusted peer's, else replacing the client's.
pub fn set_forwarded(
    h: &mut HeaderMap,
    conn: &ConnForwarded,
    peer_trusted: bool,
    host: Option<&HeaderValue>,
) {
    let proto = if conn.tls { "https" } else { "http" };

    // X-Forwarded-For: append to a trusted chain, else start a new one.
    let xff = match peer_trusted.then(|| joined(h, &X_FORWARDED_FOR)).flatten() {
        Some(prev) => {
            let mut prev = prev.into_bytes();
            prev.extend_from_slice(b", ");
            prev.extend_from_slice(conn.xff.as_bytes());
            HeaderValue::from_maybe_shared(bytes::Bytes::from(prev)).ok()
        }
        None => Some(conn.xff.clone()),
    };
    if let Some(v) = xff {
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
    let fwd = match peer_trusted
        .then(|| joined(h, &header::FORWARDED))
        .flatten()
    {
        Some(prev) => {
            let mut prev = prev.into_bytes();
            prev.extend_from_slice(b", ");
            forwarded_value(prev, conn.peer, conn.xff.as_bytes(), proto, host)
        }
        None => conn.forwarded(host),
    };
    if let Some(v) = fwd {
        h.insert(header::FORWARDED, v);
    }
}

/// Appends `for=...;proto=...;host=...` to `buf` and makes it a value.
fn forwarded_value(
    mut buf: Vec<u8>,
    peer: IpAddr,
    ip: &[u8],
    proto: &str,
    host: Option<&HeaderValue>,
) -> Option<HeaderValue> {
    match peer {
        IpAddr::V4(_) => {
            buf.extend_from_slice(b"for=");
            buf.extend_from_slice(ip);
        }
        IpAddr::V6(_) => {
            buf.extend_from_slice(b"for=\"[");
            buf.extend_from_slice(ip);
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
    HeaderValue::from_maybe_shared(bytes::Bytes::from(buf)).ok()
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

    /// The per-connection cache keeps a copy of the Host, never a share of
    /// the buffer the request was parsed from (hyper's read buffer, which
    /// would then outlive the request for the connection's whole life).
    #[test]
    fn the_cached_host_does_not_hold_the_request_buffer() {
        let conn = ConnForwarded::new("192.0.2.1".parse().unwrap(), false);
        let mut raw = b"api.example.com".to_vec();
        raw.resize(8192, b' ');
        let buffer = bytes::Bytes::from(raw);
        let host = HeaderValue::from_maybe_shared(buffer.slice(0..15)).unwrap();
        let first = conn.forwarded(Some(&host)).unwrap();
        assert_eq!(first, "for=192.0.2.1;proto=http;host=api.example.com");
        drop(host);
        assert!(buffer.is_unique(), "the cache holds no share of the buffer");
        // And the cache still answers for the same Host.
        let again = HeaderValue::from_static("api.example.com");
        assert_eq!(conn.forwarded(Some(&again)).unwrap(), first);
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
        let conn = ConnForwarded::new(peer, false);
        let host = HeaderValue::from_static("api.test");
        set_forwarded(&mut h, &conn, false, Some(&host));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "9.9.9.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "api.test");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=9.9.9.9;proto=http;host=api.test"
        );
        // The connection's cached value serves the next request with the
        // same Host; another Host gets its own.
        let mut again = HeaderMap::new();
        set_forwarded(&mut again, &conn, false, Some(&host));
        assert_eq!(again["forwarded"], "for=9.9.9.9;proto=http;host=api.test");
        let other = HeaderValue::from_static("[::1]:8080");
        set_forwarded(&mut again, &conn, false, Some(&other));
        assert_eq!(
            again["forwarded"],
            "for=9.9.9.9;proto=http;host=\"[::1]:8080\""
        );
        assert_eq!(again["x-forwarded-host"], "[::1]:8080");
        set_forwarded(&mut again, &conn, false, None);
        assert_eq!(again["forwarded"], "for=9.9.9.9;proto=http");
        assert!(again.get("x-forwarded-host").is_none());
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
        set_forwarded(&mut h, &ConnForwarded::new(peer, false), true, None);
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "203.0.113.7, 10.0.0.2, 10.0.0.1"
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        let v6: IpAddr = "::1".parse().unwrap();
        set_forwarded(&mut h, &ConnForwarded::new(v6, true), false, None);
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
