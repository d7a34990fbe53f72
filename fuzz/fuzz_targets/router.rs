//! Route matching on arbitrary requests, against a fixed router (every
//! pattern kind, hosts, conditions) and against routers built from the
//! input's own patterns. Never panics; results are in range; captures are
//! valid slices of the path.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use portico::router::path::Pattern;
use portico::router::{Conditions, RequestView, Router, RouterBuilder, ValueCond};
use std::sync::OnceLock;

const FIXED: &str = r#"
listeners:
  - name: main
    address: 127.0.0.1:0
routes:
  - {name: root, action: {respond: {body: root}}}
  - {name: prefix, match: {path_prefix: /users}, action: {respond: {body: a}}}
  - {name: catch, match: {path: "/users/{*rest}"}, action: {respond: {body: a}}}
  - {name: tmpl, match: {path: "/users/{id}"}, action: {respond: {body: a}}}
  - {name: exact, match: {path: /users/me}, action: {respond: {body: a}}}
  - {name: deep, match: {path: "/users/{id}/posts/{post}"}, action: {respond: {body: a}}}
  - {name: post, match: {path: "/users/{id}", methods: [POST]}, action: {respond: {body: a}}}
  - name: hosted
    match: {hosts: [api.example.com, "*.example.com", "*.b.example.com"], path_prefix: /}
    action: {respond: {body: a}}
  - name: hdr
    match: {path_prefix: /v, headers: [{name: x-version, exact: "2"}]}
    action: {respond: {body: a}}
  - name: hdr_re
    priority: 2
    match: {path_prefix: /v, headers: [{name: x-version, regex: "^[34]$"}]}
    action: {respond: {body: a}}
  - name: q
    priority: 1
    match: {path_prefix: /v, query: [{name: beta, present: true}]}
    action: {respond: {body: a}}
  - {name: prio, priority: 5, match: {path: "/files/{*path}"}, action: {respond: {body: a}}}
"#;

fn fixed() -> &'static portico::snapshot::Snapshot {
    static SNAP: OnceLock<portico::snapshot::Snapshot> = OnceLock::new();
    SNAP.get_or_init(|| {
        let loaded = portico::config::parse_str("router.yaml", FIXED, |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        portico::snapshot::compile(&loaded, None).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn check(router: &Router, req: &RequestView<'_>) {
    if let Some(m) = router.find(req) {
        assert!(m.route < router.len());
        for i in 0..m.captures.len() {
            let v = m
                .captures
                .get(req.path, i)
                .expect("capture within the path");
            assert!(
                !v.contains('/') || i + 1 == m.captures.len(),
                "only a catch-all spans `/`"
            );
        }
    }
}

fn request_parts<'a>(
    u: &mut Unstructured<'a>,
) -> arbitrary::Result<(&'a str, &'a str, Option<&'a str>, Method, HeaderMap)> {
    let host = <&str>::arbitrary(u)?;
    let path = <&str>::arbitrary(u)?;
    let query = Option::<&str>::arbitrary(u)?;
    let method = match u8::arbitrary(u)? % 4 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::DELETE,
        _ => Method::from_bytes(<&str>::arbitrary(u)?.as_bytes()).unwrap_or(Method::PUT),
    };
    let mut headers = HeaderMap::new();
    for _ in 0..u8::arbitrary(u)? % 4 {
        let name = if bool::arbitrary(u)? {
            HeaderName::from_static("x-version")
        } else {
            match HeaderName::from_bytes(<&[u8]>::arbitrary(u)?) {
                Ok(n) => n,
                Err(_) => continue,
            }
        };
        if let Ok(v) = HeaderValue::from_bytes(<&[u8]>::arbitrary(u)?) {
            headers.append(name, v);
        }
    }
    Ok((host, path, query, method, headers))
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(own) = bool::arbitrary(&mut u) else {
        return;
    };
    let router_own;
    let router: &Router = if own {
        // A router from the input's patterns (as the compiler would add them).
        let mut b = RouterBuilder::default();
        for _ in 0..u8::arbitrary(&mut u).unwrap_or(0) % 8 {
            let Ok(s) = <&str>::arbitrary(&mut u) else {
                break;
            };
            let prefix = bool::arbitrary(&mut u).unwrap_or(false);
            let pattern = if prefix {
                Pattern::parse_prefix(s)
            } else {
                Pattern::parse(s)
            };
            let Ok(p) = pattern else { continue };
            let hosts: Vec<String> = match u8::arbitrary(&mut u).unwrap_or(0) % 3 {
                0 => vec![],
                1 => vec!["*.example.com".into()],
                _ => vec![<&str>::arbitrary(&mut u).unwrap_or("a").to_string()],
            };
            let mut cond = Conditions::default();
            if bool::arbitrary(&mut u).unwrap_or(false) {
                cond.methods.push(Method::GET);
            }
            if bool::arbitrary(&mut u).unwrap_or(false) {
                cond.query.push((
                    "q".into(),
                    ValueCond::Exact(<&str>::arbitrary(&mut u).unwrap_or("").into()),
                ));
            }
            let prio = i32::from(i8::arbitrary(&mut u).unwrap_or(0));
            b.add(&hosts, &p, prio, cond);
        }
        router_own = b.build();
        &router_own
    } else {
        &fixed().listener("main").expect("listener main").router
    };
    let Ok((host, path, query, method, headers)) = request_parts(&mut u) else {
        return;
    };
    let host = host.to_ascii_lowercase();
    // The raw path, and the path as the service would match it.
    let normalized = portico::normalize::normalize_path(path).ok();
    for p in [Some(path), normalized.as_deref()].into_iter().flatten() {
        let req = RequestView {
            host: &host,
            path: p,
            query,
            method: &method,
            headers: &headers,
        };
        check(router, &req);
    }
});
