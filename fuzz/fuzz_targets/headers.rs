//! Header handling on arbitrary header bytes: the strict-HTTP checks, the
//! hop-by-hop removal, the forwarded headers and the real-client-IP logic.
//! Never panics, and the hygiene guarantees hold for any input.
#![no_main]

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use portico::net::{Cidr, CidrSet};
use portico::proxy::forward;
use std::net::IpAddr;

const NAMES: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "proxy-authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-other",
];

fn headers(u: &mut Unstructured<'_>) -> arbitrary::Result<HeaderMap> {
    let mut h = HeaderMap::new();
    for _ in 0..u8::arbitrary(u)? % 12 {
        let name = if bool::arbitrary(u)? {
            HeaderName::from_static(NAMES[usize::from(u8::arbitrary(u)?) % NAMES.len()])
        } else {
            match HeaderName::from_bytes(<&[u8]>::arbitrary(u)?) {
                Ok(n) => n,
                Err(_) => continue,
            }
        };
        if let Ok(v) = HeaderValue::from_bytes(<&[u8]>::arbitrary(u)?) {
            h.append(name, v);
        }
    }
    Ok(h)
}

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let mut h = headers(u)?;
    let uri = Uri::try_from(<&[u8]>::arbitrary(u)?).unwrap_or_else(|_| Uri::from_static("/"));
    let version = match u8::arbitrary(u)? % 3 {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => Version::HTTP_2,
    };
    let peer = if bool::arbitrary(u)? {
        IpAddr::from(u32::arbitrary(u)?.to_be_bytes())
    } else {
        IpAddr::from(u128::arbitrary(u)?.to_be_bytes())
    };
    let keep_upgrade = bool::arbitrary(u)?;
    let tls = bool::arbitrary(u)?;

    // Strict checks: an accepted head has unambiguous framing and one Host.
    if portico::strict::check_head(version, &uri, &h).is_ok() {
        let te: Vec<_> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
        let cl: Vec<_> = h.get_all(header::CONTENT_LENGTH).iter().collect();
        assert!(te.len() <= 1 && cl.len() <= 1 && te.len() + cl.len() <= 1);
        if let Some(v) = te.first() {
            assert!(v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        if let Some(v) = cl.first() {
            assert!(!v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit));
        }
        assert!(h.get_all(header::HOST).iter().count() <= 1);
    }

    // Real client address.
    let trusted = CidrSet(vec![
        Cidr::parse("10.0.0.0/8").unwrap(),
        Cidr::parse("::1/128").unwrap(),
        Cidr::parse("127.0.0.1/32").unwrap(),
    ]);
    let peer_trusted = trusted.contains(peer);
    let _ = forward::client_ip(peer, &h, &trusted);
    let _ = forward::wants_upgrade(&h);

    // Hop-by-hop removal.
    let had_connection = h.contains_key(header::CONNECTION);
    forward::strip_hop_by_hop(&mut h, keep_upgrade);
    for gone in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        assert!(!h.contains_key(gone), "{gone} survived");
    }
    match h.get_all(header::CONNECTION).iter().collect::<Vec<_>>()[..] {
        [] => {}
        [v] => assert!(keep_upgrade && had_connection && v == "upgrade"),
        _ => panic!("several Connection headers survived"),
    }
    if !keep_upgrade {
        assert!(!h.contains_key(header::UPGRADE));
    }
    if let Some(te) = h.get(header::TE) {
        assert_eq!(te, "trailers");
    }

    // Forwarded headers: one X-Forwarded-For line ending with the peer.
    let host = h.get(header::HOST).cloned();
    let conn = forward::ConnForwarded::new(peer, tls);
    forward::set_forwarded(&mut h, &conn, peer_trusted, host.as_ref());
    let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff.len(), 1);
    let last = xff[0].to_str().unwrap().rsplit(',').next().unwrap().trim();
    assert_eq!(last, portico::net::canonical(peer).to_string());
    assert_eq!(h.get_all("forwarded").iter().count(), 1);
    if peer_trusted {
        // A trusted proxy's own X-Forwarded-Proto/-Host lines are kept.
        assert!(h.contains_key("x-forwarded-proto"));
    } else {
        // Nothing the client sent survives.
        let proto: Vec<_> = h.get_all("x-forwarded-proto").iter().collect();
        assert_eq!(proto, [if tls { "https" } else { "http" }]);
        let fwd_host: Vec<_> = h.get_all("x-forwarded-host").iter().collect();
        assert_eq!(fwd_host, host.iter().collect::<Vec<_>>());
        let fwd = h.get("forwarded").unwrap().to_str().unwrap();
        assert!(fwd.starts_with("for="), "a new Forwarded chain: {fwd}");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
