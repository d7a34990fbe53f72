//! Route matching with 10,000 routes (issue 2: "matching must not degrade
//! with size"), and compiling 10,000 routes from YAML.
//!
//!     cargo bench --bench routing
//!     cargo bench --bench routing -- --sample-count 20     # quicker
//!
//! The table: 2,500 services, four routes each, so 10,000 routes:
//! - `/svc{s}/static/path`                 exact, any host
//! - `/svc{s}/v1/items/{id}`               template, `GET`/`HEAD`, any host
//! - `/svc{s}` (prefix)                    any host
//! - `/svc{s}/v1/items/{id}/{*rest}`       on `tenant{s % 50}.example.com`
//!   (even `s`) or `*.region{s % 10}.example.com` (odd `s`)

use divan::{black_box, Bencher};
use http::{HeaderMap, Method};
use portico::router::path::Pattern;
use portico::router::{Conditions, RequestView, Router, RouterBuilder};
use std::fmt::Write;
use std::sync::OnceLock;

const SERVICES: usize = 2_500;
const ROUTES: usize = SERVICES * 4;

fn main() {
    divan::main();
}

fn build_router() -> Router {
    let mut b = RouterBuilder::default();
    let get_head = Conditions {
        methods: vec![Method::GET, Method::HEAD],
        ..Conditions::default()
    };
    for s in 0..SERVICES {
        let exact = Pattern::parse(&format!("/svc{s}/static/path")).unwrap();
        b.add(&[], &exact, 0, Conditions::default());
        let template = Pattern::parse(&format!("/svc{s}/v1/items/{{id}}")).unwrap();
        b.add(&[], &template, 0, get_head.clone());
        let prefix = Pattern::parse_prefix(&format!("/svc{s}")).unwrap();
        b.add(&[], &prefix, 0, Conditions::default());
        let host = if s % 2 == 0 {
            format!("tenant{}.example.com", s % 50)
        } else {
            format!("*.region{}.example.com", s % 10)
        };
        let catch_all = Pattern::parse(&format!("/svc{s}/v1/items/{{id}}/{{*rest}}")).unwrap();
        b.add(&[host], &catch_all, 0, Conditions::default());
    }
    let router = b.build();
    assert_eq!(router.len(), ROUTES);
    router
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(build_router)
}

/// Matches `host` + `path` (GET, no headers) and returns the route index.
fn bench_find(bencher: Bencher, host: &'static str, path: &'static str, want: Option<usize>) {
    let router = router();
    let headers = HeaderMap::new();
    let method = Method::GET;
    let find = |host: &str, path: &str| {
        router
            .find(&RequestView {
                host,
                path,
                query: None,
                method: &method,
                headers: &headers,
            })
            .map(|m| m.route)
    };
    // Check the case measures what its name says.
    assert_eq!(find(host, path), want, "{host} {path}");
    bencher.bench_local(|| find(black_box(host), black_box(path)));
}

/// `/svc1234/static/path`: an exact route.
#[divan::bench]
fn find_exact_hit(bencher: Bencher) {
    bench_find(
        bencher,
        "gw.example.net",
        "/svc1234/static/path",
        Some(1234 * 4),
    );
}

/// `/svc1234/v1/items/98765`: a template route, capturing `id`.
#[divan::bench]
fn find_template_hit(bencher: Bencher) {
    bench_find(
        bencher,
        "gw.example.net",
        "/svc1234/v1/items/98765",
        Some(1234 * 4 + 1),
    );
}

/// `/svc1234/v1/orders/5`: no exact or template route; falls back to the
/// `/svc1234` prefix.
#[divan::bench]
fn find_prefix_fallback(bencher: Bencher) {
    bench_find(
        bencher,
        "gw.example.net",
        "/svc1234/v1/orders/5",
        Some(1234 * 4 + 2),
    );
}

/// `/nosuch/path/at/all`: no route at all (the 404 path).
#[divan::bench]
fn find_miss(bencher: Bencher) {
    bench_find(bencher, "gw.example.net", "/nosuch/path/at/all", None);
}

/// A catch-all on an exact host (`tenant34.example.com`), searched before
/// the wildcard and any-host tables.
#[divan::bench]
fn find_exact_host_catch_all(bencher: Bencher) {
    bench_find(
        bencher,
        "tenant34.example.com",
        "/svc1234/v1/items/7/photos/1.jpg",
        Some(1234 * 4 + 3),
    );
}

/// A catch-all on a wildcard host (`*.region5.example.com`): ten wildcard
/// suffixes are tried, one matches.
#[divan::bench]
fn find_wildcard_host_catch_all(bencher: Bencher) {
    bench_find(
        bencher,
        "eu.region5.example.com",
        "/svc1235/v1/items/7/photos/1.jpg",
        Some(1235 * 4 + 3),
    );
}

/// Building the 10,000-route router directly.
#[divan::bench(sample_count = 10)]
fn build_router_10k() -> Router {
    build_router()
}

/// The same shape of table written as YAML, for `config::parse_str` +
/// `snapshot::compile` (what `portico validate` and a reload do).
fn config_yaml() -> String {
    let mut y = String::from(
        "listeners:\n  - name: main\n    address: 127.0.0.1:18080\n\
         upstreams:\n  - name: origin\n    targets: [{address: '127.0.0.1:18081'}]\n\
         routes:\n",
    );
    for s in 0..SERVICES {
        let host = if s % 2 == 0 {
            format!("tenant{}.example.com", s % 50)
        } else {
            format!("'*.region{}.example.com'", s % 10)
        };
        writeln!(
            y,
            "  - {{name: exact{s}, match: {{path: /svc{s}/static/path}}, action: {{echo: {{}}}}}}\n\
             \x20 - {{name: item{s}, match: {{path: '/svc{s}/v1/items/{{id}}', methods: [GET, HEAD]}}, \
             action: {{proxy: {{upstream: origin, rewrite: {{path: '/items/{{id}}'}}}}}}}}\n\
             \x20 - {{name: prefix{s}, match: {{path_prefix: /svc{s}}}, action: {{proxy: {{upstream: origin}}}}}}\n\
             \x20 - {{name: tenant{s}, match: {{path: '/svc{s}/v1/items/{{id}}/{{*rest}}', hosts: [{host}]}}, \
             action: {{echo: {{}}}}}}"
        )
        .unwrap();
    }
    y
}

#[divan::bench(sample_count = 10)]
fn compile_config_10k(bencher: Bencher) {
    let yaml = config_yaml();
    // Check once that it compiles to the expected table.
    {
        let loaded = portico::config::parse_str("bench.yaml", &yaml, |_| None).unwrap();
        let snapshot = portico::snapshot::compile(&loaded, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(snapshot.listeners[0].router.len(), ROUTES);
    }
    bencher.bench_local(|| {
        let loaded = portico::config::parse_str("bench.yaml", black_box(&yaml), |_| None).unwrap();
        portico::snapshot::compile(&loaded, None).map_err(|e| e.to_string())
    });
}
