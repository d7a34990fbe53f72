//! Unit tests of the router: patterns, the segment trie, hosts, conditions
//! and the precedence rules, all without sockets.

use super::path::{Pattern, Seg, MAX_PARAMS};
use super::*;
use http::{HeaderName, HeaderValue};

// ------------------------------------------------------------------ helpers

/// A route as given to [`RouterBuilder::add`].
#[derive(Clone)]
struct R {
    hosts: Vec<String>,
    pattern: Pattern,
    priority: i32,
    conds: Conditions,
}

/// An exact path or template route.
fn path(s: &str) -> R {
    R {
        hosts: Vec::new(),
        pattern: Pattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}")),
        priority: 0,
        conds: Conditions::default(),
    }
}

/// A prefix route.
fn prefix(s: &str) -> R {
    R {
        pattern: Pattern::parse_prefix(s).unwrap_or_else(|e| panic!("{s}: {e}")),
        ..path("/")
    }
}

impl R {
    fn host(mut self, h: &str) -> R {
        self.hosts.push(h.to_string());
        self
    }

    fn priority(mut self, p: i32) -> R {
        self.priority = p;
        self
    }

    fn method(mut self, m: &str) -> R {
        self.conds
            .methods
            .push(Method::from_bytes(m.as_bytes()).unwrap());
        self
    }

    fn header(mut self, name: &str, cond: ValueCond) -> R {
        self.conds
            .headers
            .push((HeaderName::from_bytes(name.as_bytes()).unwrap(), cond));
        self
    }

    fn query(mut self, name: &str, cond: ValueCond) -> R {
        self.conds.query.push((name.to_string(), cond));
        self
    }
}

fn exact(v: &str) -> ValueCond {
    ValueCond::Exact(v.to_string())
}

fn regex(r: &str) -> ValueCond {
    ValueCond::Regex(Regex::new(r).unwrap())
}

fn router(routes: &[R]) -> Router {
    let mut b = RouterBuilder::default();
    for r in routes {
        b.add(&r.hosts, &r.pattern, r.priority, r.conds.clone());
    }
    b.build()
}

/// A request: `target` is `path` or `path?query`.
struct Req {
    host: String,
    path: String,
    query: Option<String>,
    method: Method,
    headers: HeaderMap,
}

fn get(target: &str) -> Req {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    Req {
        host: String::new(),
        path,
        query,
        method: Method::GET,
        headers: HeaderMap::new(),
    }
}

impl Req {
    fn host(mut self, h: &str) -> Req {
        self.host = h.to_string();
        self
    }

    fn method(mut self, m: &str) -> Req {
        self.method = Method::from_bytes(m.as_bytes()).unwrap();
        self
    }

    /// Appends a header value (a name may be given several times).
    fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        self
    }

    fn view(&self) -> RequestView<'_> {
        RequestView {
            host: &self.host,
            path: &self.path,
            query: self.query.as_deref(),
            method: &self.method,
            headers: &self.headers,
        }
    }
}

/// The index of the matching route.
fn find(r: &Router, req: &Req) -> Option<usize> {
    r.find(&req.view()).map(|m| m.route)
}

/// The matching route and its captured values.
fn find_caps(r: &Router, req: &Req) -> Option<(usize, Vec<String>)> {
    r.find(&req.view()).map(|m| {
        let caps = (0..m.captures.len())
            .map(|i| m.captures.get(&req.path, i).unwrap().to_string())
            .collect();
        (m.route, caps)
    })
}

/// Asserts which route (or none) each path selects, for GET without a host.
fn assert_routes(r: &Router, cases: &[(&str, Option<usize>)]) {
    for (target, want) in cases {
        assert_eq!(find(r, &get(target)), *want, "GET {target}");
    }
}

/// Every permutation of `items` (small inputs only).
fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first.clone());
            out.push(p);
        }
    }
    out
}

/// Builds the router from every order of `routes` and checks that each
/// request picks the same *route* (by its position in `routes`), so file
/// order never decides.
fn assert_order_independent(routes: &[R], reqs: &[Req]) -> Vec<Option<usize>> {
    let indexed: Vec<(usize, R)> = routes.iter().cloned().enumerate().collect();
    let mut expected: Option<Vec<Option<usize>>> = None;
    for perm in permutations(&indexed) {
        let rs: Vec<R> = perm.iter().map(|(_, r)| r.clone()).collect();
        let router = router(&rs);
        let got: Vec<Option<usize>> = reqs
            .iter()
            .map(|req| find(&router, req).map(|k| perm[k].0))
            .collect();
        match &expected {
            None => expected = Some(got),
            Some(e) => assert_eq!(
                &got,
                e,
                "order {:?}",
                perm.iter().map(|p| p.0).collect::<Vec<_>>()
            ),
        }
    }
    expected.unwrap()
}

// ------------------------------------------------------------------ paths

#[test]
fn empty_router_matches_nothing() {
    let r = router(&[]);
    assert!(r.is_empty());
    assert_eq!(r.len(), 0);
    assert_eq!(find(&r, &get("/")), None);
}

#[test]
fn exact_paths() {
    let r = router(&[path("/"), path("/users/me"), path("/a/b/c")]);
    assert_eq!(r.len(), 3);
    assert!(!r.is_empty());
    assert_routes(
        &r,
        &[
            ("/", Some(0)),
            ("/users/me", Some(1)),
            ("/a/b/c", Some(2)),
            ("/users", None),
            ("/users/me/", None),
            ("/users/mex", None),
            ("/users/me/x", None),
            ("/USERS/me", None),
            ("/a/b", None),
            ("/a/b/c/d", None),
            ("/x", None),
        ],
    );
}

#[test]
fn paths_not_starting_with_slash_never_match() {
    let r = router(&[path("/a"), prefix("/"), path("/{*rest}")]);
    assert_eq!(find(&r, &get("a")), None);
    assert_eq!(find(&r, &get("")), None);
    assert_eq!(find(&r, &get("*")), None);
}

#[test]
fn exact_match_has_no_captures() {
    let r = router(&[path("/users/me")]);
    assert_eq!(find_caps(&r, &get("/users/me")), Some((0, vec![])));
}

#[test]
fn template_params_capture_one_segment() {
    let r = router(&[
        path("/users/{id}"),
        path("/orgs/{org}/repos/{repo}/issues/{n}"),
    ]);
    assert_eq!(
        find_caps(&r, &get("/users/42")),
        Some((0, vec!["42".into()]))
    );
    assert_eq!(
        find_caps(&r, &get("/orgs/acme/repos/portico/issues/7")),
        Some((1, vec!["acme".into(), "portico".into(), "7".into()]))
    );
    // A param matches exactly one non-empty segment.
    assert_routes(
        &r,
        &[
            ("/users", None),
            ("/users/", None),
            ("/users/42/", None),
            ("/users/42/x", None),
            ("/users//x", None),
            ("/orgs/acme/repos//issues/7", None),
        ],
    );
}

#[test]
fn captures_are_raw_and_indexed() {
    let r = router(&[path("/files/{name}/{v}")]);
    let req = get("/files/a%2Fb/caf%C3%A9");
    let m = r.find(&req.view()).unwrap();
    assert_eq!(m.captures.len(), 2);
    assert!(!m.captures.is_empty());
    // Values are slices of the raw path: no decoding.
    assert_eq!(m.captures.get(&req.path, 0), Some("a%2Fb"));
    assert_eq!(m.captures.get(&req.path, 1), Some("caf%C3%A9"));
    assert_eq!(m.captures.get(&req.path, 2), None);
    assert_eq!(m.captures.get(&req.path, MAX_PARAMS), None);
}

#[test]
fn max_params_are_captured() {
    let names: Vec<String> = (0..MAX_PARAMS).map(|i| format!("/{{p{i}}}")).collect();
    let pattern = names.concat();
    let r = router(&[path(&pattern)]);
    let values: Vec<String> = (0..MAX_PARAMS).map(|i| format!("v{i}")).collect();
    let target = format!("/{}", values.join("/"));
    assert_eq!(find_caps(&r, &get(&target)), Some((0, values)));
}

#[test]
fn catch_all_takes_the_rest_with_slashes() {
    let r = router(&[path("/files/{*rest}"), path("/static/{v}/{*path}")]);
    assert_eq!(
        find_caps(&r, &get("/files/a/b/c.txt")),
        Some((0, vec!["a/b/c.txt".into()]))
    );
    assert_eq!(find_caps(&r, &get("/files/x")), Some((0, vec!["x".into()])));
    // Trailing slashes and empty segments are part of the rest.
    assert_eq!(
        find_caps(&r, &get("/files/a//b/")),
        Some((0, vec!["a//b/".into()]))
    );
    // `/files/` matches with an empty rest; `/files` does not match.
    assert_eq!(find_caps(&r, &get("/files/")), Some((0, vec!["".into()])));
    assert_eq!(find(&r, &get("/files")), None);
    assert_eq!(find(&r, &get("/filesx/a")), None);
    assert_eq!(
        find_caps(&r, &get("/static/v3/css/site.css")),
        Some((1, vec!["v3".into(), "css/site.css".into()]))
    );
}

#[test]
fn root_catch_all_matches_everything() {
    let r = router(&[path("/{*all}")]);
    assert_eq!(find_caps(&r, &get("/")), Some((0, vec!["".into()])));
    assert_eq!(
        find_caps(&r, &get("/a/b?q=1")),
        Some((0, vec!["a/b".into()]))
    );
}

#[test]
fn prefixes_are_segment_aware() {
    let r = router(&[prefix("/api")]);
    assert_routes(
        &r,
        &[
            ("/api", Some(0)),
            ("/api/", Some(0)),
            ("/api/x", Some(0)),
            ("/api/x/y/z", Some(0)),
            ("/api//x", Some(0)),
            ("/apis", None),
            ("/ap", None),
            ("/", None),
            ("/x/api", None),
        ],
    );
    assert_eq!(find_caps(&r, &get("/api/x")), Some((0, vec![])));
}

#[test]
fn prefix_with_trailing_slash_equals_prefix_without() {
    assert_eq!(
        Pattern::parse_prefix("/api/").unwrap(),
        Pattern::parse_prefix("/api").unwrap()
    );
    let r = router(&[prefix("/api/v1/")]);
    assert_routes(
        &r,
        &[
            ("/api/v1", Some(0)),
            ("/api/v1/", Some(0)),
            ("/api/v1/x", Some(0)),
            ("/api/v10", None),
        ],
    );
}

#[test]
fn root_prefix_matches_every_path() {
    let r = router(&[prefix("/")]);
    assert_routes(
        &r,
        &[
            ("/", Some(0)),
            ("/a", Some(0)),
            ("/a/b/c/", Some(0)),
            ("//", Some(0)),
        ],
    );
    assert_eq!(Pattern::parse_prefix("/").unwrap().segs, vec![]);
    assert_eq!(Pattern::parse_prefix("//").unwrap().segs, vec![]);
}

#[test]
fn trailing_slash_is_significant_for_exact_and_templates() {
    let r = router(&[path("/a"), path("/a/"), path("/u/{id}")]);
    assert_routes(
        &r,
        &[
            ("/a", Some(0)),
            ("/a/", Some(1)),
            ("/a//", None),
            ("/u/1", Some(2)),
            ("/u/1/", None),
        ],
    );
    let only_slash = router(&[path("/a/")]);
    assert_eq!(find(&only_slash, &get("/a")), None);
}

#[test]
fn empty_segments_are_literal() {
    let r = router(&[path("/a//b"), path("/c/{x}/d")]);
    assert_routes(
        &r,
        &[
            ("/a//b", Some(0)),
            ("/a/b", None),
            ("/c/1/d", Some(1)),
            ("/c//d", None),
        ],
    );
}

// ------------------------------------------------------------------ precedence

#[test]
fn exact_beats_template_beats_catch_all_beats_prefix() {
    let routes = [
        prefix("/a"),       // 0
        path("/a/{*rest}"), // 1
        path("/a/{x}"),     // 2
        path("/a/b"),       // 3
    ];
    let reqs = [
        get("/a/b"),
        get("/a/c"),
        get("/a/c/d"),
        get("/a"),
        get("/a/"),
    ];
    let got = assert_order_independent(&routes, &reqs);
    assert_eq!(got, vec![Some(3), Some(2), Some(1), Some(0), Some(1)]);
    // With the more specific routes gone, each request falls to the next one.
    let r = router(&routes[..3]);
    assert_eq!(find(&r, &get("/a/b")), Some(2));
    let r = router(&routes[..2]);
    assert_eq!(find(&r, &get("/a/b")), Some(1));
    let r = router(&routes[..1]);
    assert_eq!(find(&r, &get("/a/b")), Some(0));
}

#[test]
fn exact_root_beats_root_prefix_and_catch_all() {
    let routes = [prefix("/"), path("/{*all}"), path("/")];
    let got = assert_order_independent(&routes, &[get("/"), get("/x")]);
    assert_eq!(got, vec![Some(2), Some(1)]);
}

#[test]
fn longer_literal_match_wins() {
    let routes = [prefix("/api"), prefix("/api/v1"), prefix("/api/v1/users")];
    let got = assert_order_independent(
        &routes,
        &[
            get("/api/v1/users/7"),
            get("/api/v1/orders"),
            get("/api/v2"),
            get("/api"),
        ],
    );
    assert_eq!(got, vec![Some(2), Some(1), Some(0), Some(0)]);
}

#[test]
fn specificity_is_compared_segment_by_segment() {
    // `/a/{x}/c` vs `/a/b/{y}`: the literal `b` in the second segment decides.
    let routes = [path("/a/{x}/c"), path("/a/b/{y}")];
    let got = assert_order_independent(
        &routes,
        &[get("/a/b/c"), get("/a/z/c"), get("/a/b/z"), get("/a/z/z")],
    );
    assert_eq!(got, vec![Some(1), Some(0), Some(1), None]);

    // A literal prefix beats a longer template that diverges earlier.
    let routes = [path("/api/{ver}/users"), prefix("/api/v1")];
    let got = assert_order_independent(&routes, &[get("/api/v1/users"), get("/api/v2/users")]);
    assert_eq!(got, vec![Some(1), Some(0)]);

    // A literal first segment beats a param first segment even for a prefix.
    let routes = [path("/{x}"), prefix("/a")];
    let got = assert_order_independent(&routes, &[get("/a"), get("/b")]);
    assert_eq!(got, vec![Some(1), Some(0)]);
}

#[test]
fn captures_belong_to_the_winning_route() {
    let routes = [
        path("/u/{id}/{*rest}"),
        path("/u/{id}/posts/{post}"),
        prefix("/u"),
    ];
    let r = router(&routes);
    assert_eq!(
        find_caps(&r, &get("/u/7/posts/9")),
        Some((1, vec!["7".into(), "9".into()]))
    );
    assert_eq!(
        find_caps(&r, &get("/u/7/likes/9")),
        Some((0, vec!["7".into(), "likes/9".into()]))
    );
    assert_eq!(find_caps(&r, &get("/u/7")), Some((2, vec![])));

    // The specific route refuses the method: the fallback's captures win.
    let routes = [
        path("/u/{id}/posts/{post}").method("POST"),
        path("/u/{*rest}"),
    ];
    let r = router(&routes);
    assert_eq!(
        find_caps(&r, &get("/u/7/posts/9")),
        Some((1, vec!["7/posts/9".into()]))
    );
    assert_eq!(
        find_caps(&r, &get("/u/7/posts/9").method("POST")),
        Some((0, vec!["7".into(), "9".into()]))
    );
}

#[test]
fn priority_overrides_specificity() {
    let routes = [path("/a/b"), prefix("/").priority(10)];
    let got = assert_order_independent(&routes, &[get("/a/b"), get("/x")]);
    assert_eq!(got, vec![Some(1), Some(1)]);

    // Negative priority puts a route below every default one.
    let routes = [path("/a/b").priority(-1), prefix("/")];
    let got = assert_order_independent(&routes, &[get("/a/b")]);
    assert_eq!(got, vec![Some(1)]);

    // Among equal priorities specificity decides again.
    let routes = [
        path("/a/b").priority(5),
        prefix("/").priority(5),
        prefix("/a").priority(1),
    ];
    let got = assert_order_independent(&routes, &[get("/a/b"), get("/a/c")]);
    assert_eq!(got, vec![Some(0), Some(1)]);
}

#[test]
fn priority_overrides_host_specificity() {
    let routes = [prefix("/").host("api.example.com"), path("/x").priority(1)];
    let got = assert_order_independent(
        &routes,
        &[
            get("/x").host("api.example.com"),
            get("/y").host("api.example.com"),
        ],
    );
    assert_eq!(got, vec![Some(1), Some(0)]);
}

// ------------------------------------------------------------------ hosts

#[test]
fn exact_host_beats_wildcard_beats_any_host() {
    let routes = [
        path("/x"),
        path("/x").host("*.example.com"),
        path("/x").host("api.example.com"),
    ];
    let got = assert_order_independent(
        &routes,
        &[
            get("/x").host("api.example.com"),
            get("/x").host("www.example.com"),
            get("/x").host("other.org"),
            get("/x"),
        ],
    );
    assert_eq!(got, vec![Some(2), Some(1), Some(0), Some(0)]);
}

#[test]
fn host_is_compared_before_path() {
    // A catch-all on the exact host beats an exact path on any host.
    let routes = [path("/x"), prefix("/").host("api.example.com")];
    let got = assert_order_independent(
        &routes,
        &[get("/x").host("api.example.com"), get("/x").host("b.org")],
    );
    assert_eq!(got, vec![Some(1), Some(0)]);
}

#[test]
fn longest_wildcard_suffix_wins() {
    let routes = [
        path("/x").host("*.example.com"),
        path("/x").host("*.eu.example.com"),
    ];
    let got = assert_order_independent(
        &routes,
        &[
            get("/x").host("a.eu.example.com"),
            get("/x").host("a.us.example.com"),
            get("/x").host("a.b.eu.example.com"),
        ],
    );
    assert_eq!(got, vec![Some(1), Some(0), Some(1)]);

    // The longer wildcard is the more specific host, so it wins over a more
    // specific path on the shorter wildcard (host is compared before path).
    let routes = [
        path("/x").host("*.example.com"),
        prefix("/").host("*.eu.example.com"),
    ];
    let got = assert_order_independent(
        &routes,
        &[
            get("/x").host("a.eu.example.com"),
            get("/x").host("a.us.example.com"),
        ],
    );
    assert_eq!(got, vec![Some(1), Some(0)]);
}

#[test]
fn wildcard_needs_a_label_before_the_suffix() {
    let r = router(&[path("/x").host("*.example.com")]);
    for host in [
        "example.com",
        ".example.com",
        "notexample.com",
        "example.com.evil",
        "",
    ] {
        assert_eq!(find(&r, &get("/x").host(host)), None, "host {host:?}");
    }
    for host in ["a.example.com", "a.b.example.com", "x-1.example.com"] {
        assert_eq!(find(&r, &get("/x").host(host)), Some(0), "host {host:?}");
    }
}

#[test]
fn exact_host_matches_only_that_name() {
    let r = router(&[path("/x").host("example.com")]);
    assert_eq!(find(&r, &get("/x").host("example.com")), Some(0));
    for host in ["www.example.com", "example.co", "", "example.com.au"] {
        assert_eq!(find(&r, &get("/x").host(host)), None, "host {host:?}");
    }
}

#[test]
fn configured_hosts_are_case_insensitive() {
    // Request hosts arrive lower-cased (see RequestView); configured ones are
    // lower-cased by the builder.
    let r = router(&[
        path("/a").host("API.Example.COM"),
        path("/b").host("*.Example.ORG"),
    ]);
    assert_eq!(find(&r, &get("/a").host("api.example.com")), Some(0));
    assert_eq!(find(&r, &get("/b").host("www.example.org")), Some(1));
}

#[test]
fn route_with_several_hosts() {
    let r = router(&[
        path("/x").host("a.com").host("*.b.com").host("c.com"),
        prefix("/"),
    ]);
    for host in ["a.com", "www.b.com", "c.com"] {
        assert_eq!(find(&r, &get("/x").host(host)), Some(0), "host {host}");
    }
    for host in ["b.com", "d.com", ""] {
        assert_eq!(find(&r, &get("/x").host(host)), Some(1), "host {host}");
    }
}

#[test]
fn falls_back_to_less_specific_host_when_path_has_no_match() {
    let routes = [
        path("/only-exact").host("api.example.com"),
        path("/only-wild").host("*.example.com"),
        path("/only-any"),
        prefix("/").host("*.example.com").method("POST"),
    ];
    let got = assert_order_independent(
        &routes,
        &[
            get("/only-exact").host("api.example.com"),
            get("/only-wild").host("api.example.com"),
            get("/only-any").host("api.example.com"),
            get("/only-exact").host("www.example.com"),
            get("/nothing").host("api.example.com"),
            get("/nothing").host("api.example.com").method("POST"),
        ],
    );
    assert_eq!(got, vec![Some(0), Some(1), Some(2), None, None, Some(3)]);
}

#[test]
fn falls_back_to_any_host_when_host_route_conditions_fail() {
    let routes = [
        path("/x").host("api.example.com").method("POST"),
        path("/x")
            .host("*.example.com")
            .header("x-beta", ValueCond::Present),
        path("/x"),
    ];
    let got = assert_order_independent(
        &routes,
        &[
            get("/x").host("api.example.com").method("POST"),
            get("/x").host("api.example.com").header("x-beta", "1"),
            get("/x").host("api.example.com"),
        ],
    );
    assert_eq!(got, vec![Some(0), Some(1), Some(2)]);
}

// ------------------------------------------------------------------ conditions

#[test]
fn methods() {
    let r = router(&[path("/m").method("GET").method("PUT"), path("/any")]);
    assert_eq!(find(&r, &get("/m")), Some(0));
    assert_eq!(find(&r, &get("/m").method("PUT")), Some(0));
    assert_eq!(find(&r, &get("/m").method("DELETE")), None);
    assert_eq!(find(&r, &get("/m").method("HEAD")), None);
    // No methods listed: every method, extension methods included.
    assert_eq!(find(&r, &get("/any").method("PURGE")), Some(1));
    let r = router(&[path("/p").method("PURGE")]);
    assert_eq!(find(&r, &get("/p").method("PURGE")), Some(0));
    assert_eq!(find(&r, &get("/p")), None);
}

#[test]
fn header_exact() {
    let r = router(&[path("/h").header("accept-version", exact("2"))]);
    assert_eq!(find(&r, &get("/h").header("accept-version", "2")), Some(0));
    // Header names are case-insensitive.
    assert_eq!(find(&r, &get("/h").header("Accept-Version", "2")), Some(0));
    assert_eq!(find(&r, &get("/h").header("accept-version", "1")), None);
    assert_eq!(find(&r, &get("/h").header("accept-version", "2 ")), None);
    assert_eq!(find(&r, &get("/h")), None);
    // Values are compared exactly, case included.
    let r = router(&[path("/h").header("x-env", exact("Prod"))]);
    assert_eq!(find(&r, &get("/h").header("x-env", "prod")), None);
    assert_eq!(find(&r, &get("/h").header("x-env", "Prod")), Some(0));
}

#[test]
fn header_with_several_values_exact_needs_all_regex_needs_one() {
    let r = router(&[path("/h").header("x-tag", exact("b"))]);
    let req = get("/h").header("x-tag", "b").header("x-tag", "b");
    assert_eq!(find(&r, &req), Some(0));
    // Exact values stay exclusive: `a` + `b` satisfies neither `a` nor `b`.
    let req = get("/h").header("x-tag", "a").header("x-tag", "b");
    assert_eq!(find(&r, &req), None);
    let req = get("/h").header("x-tag", "a").header("x-tag", "c");
    assert_eq!(find(&r, &req), None);

    let r = router(&[path("/h").header("x-tag", regex("^v[0-9]+$"))]);
    let req = get("/h").header("x-tag", "x").header("x-tag", "v12");
    assert_eq!(find(&r, &req), Some(0));
    let req = get("/h").header("x-tag", "x").header("x-tag", "v");
    assert_eq!(find(&r, &req), None);
}

#[test]
fn header_regex() {
    let r = router(&[path("/h").header("accept", regex(r"application/vnd\.portico\.v2\+json"))]);
    assert_eq!(
        find(
            &r,
            &get("/h").header("accept", "text/html, application/vnd.portico.v2+json")
        ),
        Some(0)
    );
    assert_eq!(
        find(
            &r,
            &get("/h").header("accept", "application/vnd.portico.v1+json")
        ),
        None
    );
    // A regex needs the header to be there.
    assert_eq!(find(&r, &get("/h")), None);
    // Unanchored regexes match anywhere; anchors are honoured.
    let r = router(&[path("/h").header("x-v", regex("^2$"))]);
    assert_eq!(find(&r, &get("/h").header("x-v", "2")), Some(0));
    assert_eq!(find(&r, &get("/h").header("x-v", "22")), None);
}

#[test]
fn header_present_and_absent() {
    let r = router(&[
        path("/p").header("authorization", ValueCond::Present),
        path("/a").header("authorization", ValueCond::Absent),
    ]);
    assert_eq!(
        find(&r, &get("/p").header("authorization", "Bearer x")),
        Some(0)
    );
    // An empty value is still present.
    assert_eq!(find(&r, &get("/p").header("authorization", "")), Some(0));
    assert_eq!(find(&r, &get("/p")), None);
    assert_eq!(find(&r, &get("/a")), Some(1));
    assert_eq!(find(&r, &get("/a").header("authorization", "")), None);
    assert_eq!(
        find(
            &r,
            &get("/a")
                .header("authorization", "x")
                .header("authorization", "y")
        ),
        None
    );
    // Other headers do not count.
    assert_eq!(find(&r, &get("/a").header("x-other", "1")), Some(1));
}

#[test]
fn every_condition_must_hold() {
    let r = router(&[path("/c")
        .method("POST")
        .header("x-a", exact("1"))
        .header("x-b", ValueCond::Absent)
        .query("q", ValueCond::Present)]);
    let ok = || get("/c?q=1").method("POST").header("x-a", "1");
    assert_eq!(find(&r, &ok()), Some(0));
    assert_eq!(find(&r, &ok().method("GET")), None);
    assert_eq!(find(&r, &ok().header("x-b", "1")), None);
    assert_eq!(find(&r, &get("/c?q=1").method("POST")), None);
    assert_eq!(
        find(&r, &get("/c?r=1").method("POST").header("x-a", "1")),
        None
    );
}

#[test]
fn query_exact_with_percent_decoding() {
    let r = router(&[path("/q").query("name", exact("a b/c"))]);
    for q in [
        "name=a%20b%2Fc",
        "name=a+b/c",
        "name=a%20b/c",
        "n%61me=a+b%2fc",
        "x=1&name=a+b/c&y=2",
        "name=a+b/c&name=a%20b%2Fc",
    ] {
        assert_eq!(find(&r, &get(&format!("/q?{q}"))), Some(0), "?{q}");
    }
    for q in [
        "name=a b",
        "name=zzz&name=a+b/c",
        "name=a%2Bb/c",
        "name=",
        "name",
        "names=a+b/c",
        "",
    ] {
        assert_eq!(find(&r, &get(&format!("/q?{q}"))), None, "?{q}");
    }
    assert_eq!(find(&r, &get("/q")), None);

    let r = router(&[path("/q").query("v", exact("é"))]);
    assert_eq!(find(&r, &get("/q?v=%C3%A9")), Some(0));
}

#[test]
fn query_present_and_absent() {
    let r = router(&[
        path("/p").query("debug", ValueCond::Present),
        path("/a").query("debug", ValueCond::Absent),
    ]);
    for q in ["debug", "debug=", "debug=1", "x=1&debug", "de%62ug=0"] {
        assert_eq!(find(&r, &get(&format!("/p?{q}"))), Some(0), "?{q}");
        assert_eq!(find(&r, &get(&format!("/a?{q}"))), None, "?{q}");
    }
    for q in ["", "x=1", "debugx=1", "xdebug", "&&"] {
        assert_eq!(find(&r, &get(&format!("/p?{q}"))), None, "?{q}");
        assert_eq!(find(&r, &get(&format!("/a?{q}"))), Some(1), "?{q}");
    }
    assert_eq!(find(&r, &get("/p")), None);
    assert_eq!(find(&r, &get("/a")), Some(1));
}

#[test]
fn query_regex() {
    let r = router(&[path("/q").query("id", regex("^[0-9]+$"))]);
    assert_eq!(find(&r, &get("/q?id=123")), Some(0));
    assert_eq!(find(&r, &get("/q?id=abc&id=77")), Some(0));
    assert_eq!(find(&r, &get("/q?id=12a")), None);
    assert_eq!(find(&r, &get("/q")), None);
}

#[test]
fn falls_back_when_conditions_of_a_more_specific_route_fail() {
    let routes = [
        prefix("/"),                                             // 0
        path("/api/{*rest}").query("debug", ValueCond::Present), // 1
        path("/api/{id}").header("x-beta", exact("1")),          // 2
        path("/api/users").method("POST"),                       // 3
    ];
    let got = assert_order_independent(
        &routes,
        &[
            get("/api/users").method("POST"),
            get("/api/users").header("x-beta", "1"),
            get("/api/users?debug"),
            get("/api/users"),
            get("/api/7/x?debug=1"),
            get("/api/7/x"),
        ],
    );
    assert_eq!(
        got,
        vec![Some(3), Some(2), Some(1), Some(0), Some(1), Some(0)]
    );
}

#[test]
fn more_conditions_win_at_equal_path_specificity() {
    let routes = [
        path("/v"),               // 0
        path("/v").method("GET"), // 1
        path("/v")
            .method("GET")
            .header("accept-version", exact("2")), // 2
        path("/v")
            .header("accept-version", exact("3"))
            .query("x", exact("1")), // 3
    ];
    let got = assert_order_independent(
        &routes,
        &[
            get("/v").method("POST"),
            get("/v"),
            get("/v").header("accept-version", "2"),
            get("/v").header("accept-version", "3"),
            get("/v?x=1").header("accept-version", "3"),
            get("/v?x=1").header("accept-version", "3").method("POST"),
        ],
    );
    assert_eq!(
        got,
        vec![Some(0), Some(1), Some(2), Some(1), Some(3), Some(3)]
    );
}

#[test]
fn conditions_count() {
    assert_eq!(Conditions::default().count(), 0);
    // Methods count once, however many are listed.
    assert_eq!(path("/").method("GET").method("POST").conds.count(), 1);
    let c = path("/")
        .method("GET")
        .header("a", ValueCond::Present)
        .header("b", ValueCond::Absent)
        .query("q", exact("1"))
        .conds;
    assert_eq!(c.count(), 4);
}

#[test]
fn conditions_test_directly() {
    let c = path("/")
        .method("GET")
        .header("x", exact("1"))
        .query("q", exact("a b"))
        .conds;
    let mut h = HeaderMap::new();
    h.insert("x", HeaderValue::from_static("1"));
    assert!(c.test(&Method::GET, &h, Some("q=a+b")));
    assert!(!c.test(&Method::GET, &h, None));
    assert!(!c.test(&Method::POST, &h, Some("q=a+b")));
    assert!(!c.test(&Method::GET, &HeaderMap::new(), Some("q=a+b")));
    assert!(Conditions::default().test(&Method::DELETE, &HeaderMap::new(), None));
}

// ------------------------------------------------------------------ disjoint

fn conds(r: R) -> Conditions {
    r.conds
}

#[test]
fn value_cond_disjoint() {
    use ValueCond::*;
    let cases: Vec<(ValueCond, ValueCond, bool)> = vec![
        (exact("a"), exact("b"), true),
        (exact("a"), exact("a"), false),
        (exact("a"), Absent, true),
        (Present, Absent, true),
        (regex("x"), Absent, true),
        (Absent, Absent, false),
        (Present, Present, false),
        (Present, exact("a"), false),
        (regex("^a$"), exact("b"), false), // not proven: regexes are opaque
        (regex("a"), regex("b"), false),
    ];
    for (a, b, want) in cases {
        assert_eq!(a.disjoint(&b), want, "{a:?} vs {b:?}");
        assert_eq!(b.disjoint(&a), want, "{b:?} vs {a:?} (symmetry)");
    }
}

#[test]
fn conditions_disjoint() {
    let base = || path("/");
    let cases: Vec<(Conditions, Conditions, bool)> = vec![
        // Methods.
        (
            conds(base().method("GET")),
            conds(base().method("POST")),
            true,
        ),
        (
            conds(base().method("GET").method("POST")),
            conds(base().method("POST")),
            false,
        ),
        (conds(base()), conds(base().method("GET")), false),
        (conds(base()), conds(base()), false),
        // Headers.
        (
            conds(base().header("v", exact("1"))),
            conds(base().header("v", exact("2"))),
            true,
        ),
        (
            conds(base().header("v", exact("1"))),
            conds(base().header("v", exact("1"))),
            false,
        ),
        (
            conds(base().header("v", ValueCond::Present)),
            conds(base().header("v", ValueCond::Absent)),
            true,
        ),
        (
            conds(base().header("v", exact("1"))),
            conds(base().header("w", exact("2"))),
            false,
        ),
        (
            conds(base().header("v", exact("1"))),
            conds(base().header("v", regex("2"))),
            false,
        ),
        (conds(base().header("v", exact("1"))), conds(base()), false),
        // Query.
        (
            conds(base().query("v", exact("1"))),
            conds(base().query("v", exact("2"))),
            true,
        ),
        (
            conds(base().query("v", ValueCond::Absent)),
            conds(base().query("v", regex("."))),
            true,
        ),
        (
            conds(base().query("v", exact("1"))),
            conds(base().header("v", exact("2"))),
            false,
        ),
        // One disjoint pair is enough, whatever else overlaps.
        (
            conds(
                base()
                    .method("GET")
                    .header("a", exact("1"))
                    .query("q", ValueCond::Present),
            ),
            conds(
                base()
                    .method("GET")
                    .header("a", exact("1"))
                    .query("q", ValueCond::Absent),
            ),
            true,
        ),
    ];
    for (i, (a, b, want)) in cases.iter().enumerate() {
        assert_eq!(a.disjoint(b), *want, "case {i}: {a:?} vs {b:?}");
        assert_eq!(b.disjoint(a), *want, "case {i} reversed");
    }
}

// ------------------------------------------------------------------ patterns

#[test]
fn pattern_parse_errors() {
    let bad = [
        ("users", "must start with `/`"),
        ("", "must start with `/`"),
        ("users/{id}", "must start with `/`"),
        ("/{}", "not a valid param name"),
        ("/{*}", "not a valid param name"),
        ("/{a-b}", "not a valid param name"),
        ("/{a.b}", "not a valid param name"),
        ("/{ id }", "not a valid param name"),
        ("/{{id}}", "not a valid param name"),
        ("/{id}/{id}", "appears twice"),
        ("/{id}/x/{*id}", "appears twice"),
        ("/{*rest}/x", "must be the last segment"),
        ("/{*a}/{*b}", "must be the last segment"),
        ("/a{id}", "must be a whole segment"),
        ("/{id}x", "must be a whole segment"),
        ("/{id", "must be a whole segment"),
        ("/id}", "must be a whole segment"),
        ("/x/{a}{b}", "not a valid param name"),
    ];
    for (p, msg) in bad {
        let err = Pattern::parse(p).expect_err(p);
        assert!(err.contains(msg), "{p}: {err}");
    }
    let too_many: String = (0..=MAX_PARAMS).map(|i| format!("/{{p{i}}}")).collect();
    let err = Pattern::parse(&too_many).unwrap_err();
    assert!(err.contains("more than"), "{err}");

    for (p, msg) in [
        ("api", "must start with `/`"),
        ("", "must start with `/`"),
        ("/api/{id}", "a prefix is literal"),
        ("/api/}", "a prefix is literal"),
    ] {
        let err = Pattern::parse_prefix(p).expect_err(p);
        assert!(err.contains(msg), "{p}: {err}");
    }
}

#[test]
fn pattern_parse_ok() {
    let p = Pattern::parse("/users/{id}/files/{*rest}").unwrap();
    assert_eq!(
        p.segs,
        vec![
            Seg::Lit("users".into()),
            Seg::Param("id".into()),
            Seg::Lit("files".into()),
            Seg::CatchAll("rest".into()),
        ]
    );
    assert!(!p.prefix);
    assert_eq!(p.params(), vec!["id", "rest"]);
    assert_eq!(p.shape(), "/users/{}/files/{*}");

    let p = Pattern::parse("/").unwrap();
    assert_eq!(p.segs, vec![Seg::Lit("".into())]);
    assert!(p.params().is_empty());

    // Names: letters, digits, `_`.
    assert!(Pattern::parse("/{user_id2}/{_x}/{*Rest_1}").is_ok());

    let p = Pattern::parse_prefix("/api/v1").unwrap();
    assert!(p.prefix);
    assert_eq!(p.shape(), "/api/v1/**");
}

#[test]
fn shapes_ignore_param_names() {
    let a = Pattern::parse("/users/{id}").unwrap();
    let b = Pattern::parse("/users/{uid}").unwrap();
    assert_ne!(a, b);
    assert_eq!(a.shape(), b.shape());
    // Exact and prefix on the same literal path differ.
    assert_ne!(
        Pattern::parse("/users").unwrap().shape(),
        Pattern::parse_prefix("/users").unwrap().shape()
    );
    // Catch-all and param differ.
    assert_ne!(
        Pattern::parse("/users/{*r}").unwrap().shape(),
        Pattern::parse("/users/{r}").unwrap().shape()
    );
}

#[test]
fn ranks_order_by_specificity() {
    let rank = |p: &str| Pattern::parse(p).unwrap().rank();
    let prank = |p: &str| Pattern::parse_prefix(p).unwrap().rank();
    // Same literal start: exact > template > catch-all > prefix.
    assert!(rank("/a/b") > rank("/a/{x}"));
    assert!(rank("/a/{x}") > rank("/a/{*x}"));
    assert!(rank("/a/{*x}") > prank("/a"));
    assert!(rank("/a") > prank("/a"));
    // Longer literal prefix wins.
    assert!(prank("/a/b") > prank("/a"));
    assert!(prank("/a") > prank("/"));
    // Segment by segment.
    assert!(rank("/a/b/{y}") > rank("/a/{x}/c"));
}

// ------------------------------------------------------------------ query helpers

fn pairs(q: &str) -> Vec<(String, String)> {
    query_pairs(q)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[test]
fn query_pairs_split_and_decode() {
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        pairs("a=1&b=&c&&d=x%3Dy&e=1=2"),
        vec![
            s("a", "1"),
            s("b", ""),
            s("c", ""),
            s("d", "x=y"),
            s("e", "1=2")
        ]
    );
    assert_eq!(pairs(""), vec![]);
    assert_eq!(pairs("&"), vec![]);
    assert_eq!(pairs("k%20ey=v+al"), vec![s("k ey", "v al")]);
    assert_eq!(pairs("a=1&a=2"), vec![s("a", "1"), s("a", "2")]);
    assert_eq!(pairs("%26=%3D"), vec![s("&", "=")]);
}

#[test]
fn percent_decode_cases() {
    use std::borrow::Cow;
    assert!(matches!(
        percent_decode("plain-text_~"),
        Cow::Borrowed("plain-text_~")
    ));
    assert_eq!(percent_decode("%41%62c"), "Abc");
    assert_eq!(percent_decode("%2f%2F"), "//");
    assert_eq!(percent_decode("a+b"), "a b");
    assert_eq!(percent_decode("%2B"), "+");
    assert_eq!(percent_decode("caf%C3%A9"), "café");
    // Invalid or truncated escapes are kept literally.
    assert_eq!(percent_decode("%zz"), "%zz");
    assert_eq!(percent_decode("%4"), "%4");
    assert_eq!(percent_decode("%"), "%");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%%41"), "%A");
    assert_eq!(percent_decode("%4g"), "%4g");
    // Invalid UTF-8 becomes U+FFFD rather than failing.
    assert_eq!(percent_decode("%FF"), "\u{FFFD}");
    // Decoding happens once.
    assert_eq!(percent_decode("%2541"), "%41");
}

// ------------------------------------------------------------------ through the config

fn compile_yaml(yaml: &str) -> Result<crate::snapshot::Snapshot, crate::config::ConfigErrors> {
    let loaded = crate::config::parse_str("test.yaml", yaml, |_| None)?;
    crate::snapshot::compile(&loaded, None)
}

/// Route name chosen for a request on the first listener.
fn route_name(s: &crate::snapshot::Snapshot, req: &Req) -> Option<String> {
    let lr = &s.listeners[0];
    lr.router
        .find(&req.view())
        .map(|m| lr.routes[m.route].name.to_string())
}

#[test]
fn ten_thousand_routes_compile_and_match() {
    use std::fmt::Write;
    const N: usize = 10_000;
    let hosts = ["", "api.example.com", "*.example.com", "shop.example.org"];
    let mut y = String::from("listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n");
    for i in 0..N {
        let host = hosts[i % hosts.len()];
        let (key, p) = match i % 3 {
            0 => ("path", format!("/svc{i}/static/path")),
            1 => ("path", format!("/svc{i}/v1/items/{{id}}")),
            _ => ("path_prefix", format!("/svc{i}/files")),
        };
        writeln!(y, "  - name: r{i}").unwrap();
        writeln!(y, "    match:").unwrap();
        writeln!(y, "      {key}: {p}").unwrap();
        if !host.is_empty() {
            writeln!(y, "      hosts: ['{host}']").unwrap();
        }
        writeln!(y, "    action: {{echo: {{}}}}").unwrap();
    }
    // Catch-alls to check fallbacks among many routes.
    y.push_str("  - name: fallback\n    match: {path_prefix: /}\n    action: {echo: {}}\n");
    y.push_str(
        "  - name: wild-fallback\n    match: {path_prefix: /, hosts: ['*.example.com']}\n    action: {echo: {}}\n",
    );

    let s = compile_yaml(&y).unwrap_or_else(|e| panic!("{e}"));
    let lr = &s.listeners[0];
    assert_eq!(lr.router.len(), N + 2);
    assert_eq!(lr.routes.len(), N + 2);

    let host_for = |i: usize| match hosts[i % hosts.len()] {
        "*.example.com" => format!("h{i}.example.com"),
        h => h.to_string(),
    };
    let fallback_for = |host: &str| {
        if host.ends_with(".example.com") {
            "wild-fallback"
        } else {
            "fallback"
        }
    };
    for i in (0..N).step_by(37).chain([0, 1, 2, N - 3, N - 2, N - 1]) {
        let host = host_for(i);
        let name = format!("r{i}");
        let (hit, miss) = match i % 3 {
            0 => (
                get(&format!("/svc{i}/static/path")),
                get(&format!("/svc{i}/static/path/x")),
            ),
            1 => (
                get(&format!("/svc{i}/v1/items/abc-{i}")),
                get(&format!("/svc{i}/v1/items/")),
            ),
            _ => (
                get(&format!("/svc{i}/files/a/b.txt")),
                get(&format!("/svc{i}/filesx")),
            ),
        };
        let hit = hit.host(&host);
        assert_eq!(
            route_name(&s, &hit).as_deref(),
            Some(name.as_str()),
            "{}",
            hit.path
        );
        if i % 3 == 1 {
            let m = lr.router.find(&hit.view()).unwrap();
            assert_eq!(
                m.captures.get(&hit.path, 0),
                Some(format!("abc-{i}").as_str())
            );
        }
        let miss = miss.host(&host);
        assert_eq!(
            route_name(&s, &miss).as_deref(),
            Some(fallback_for(&host)),
            "{}",
            miss.path
        );
        // A host-specific route is not served on another host.
        if !host.is_empty() {
            let other = get(&hit.path).host("elsewhere.net");
            assert_eq!(
                route_name(&s, &other).as_deref(),
                Some("fallback"),
                "{}",
                hit.path
            );
        }
    }
    assert_eq!(
        route_name(&s, &get("/nowhere")).as_deref(),
        Some("fallback")
    );
}

#[test]
fn config_rejects_ambiguous_routes() {
    let head = "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n";
    let two = |a: &str, b: &str| {
        format!(
            "{head}  - name: a\n    match: {a}\n    action: {{echo: {{}}}}\n  - name: b\n    match: {b}\n    action: {{echo: {{}}}}\n"
        )
    };
    // Same path shape, same host, no way to order them: rejected.
    for (a, b) in [
        ("{path: /x}", "{path: /x}"),
        ("{path: '/u/{id}'}", "{path: '/u/{uid}'}"),
        ("{path_prefix: /api}", "{path_prefix: /api/}"),
        ("{path: /x, hosts: [A.com]}", "{path: /x, hosts: [a.com]}"),
        (
            "{path: /x, methods: [GET, POST]}",
            "{path: /x, methods: [POST]}",
        ),
        (
            "{path: /x, headers: [{name: v, regex: '1'}]}",
            "{path: /x, headers: [{name: v, exact: '1'}]}",
        ),
    ] {
        let err = compile_yaml(&two(a, b))
            .err()
            .unwrap_or_else(|| panic!("{a} / {b} accepted"));
        let e = &err.0[0];
        assert_eq!(e.path, "routes[1].match", "{e}");
        assert!(e.message.contains("ambiguous"), "{e}");
    }
    // Orderable or exclusive: accepted.
    for (a, b) in [
        ("{path: /x}", "{path_prefix: /x}"),
        ("{path: '/u/{id}'}", "{path: '/u/{*id}'}"),
        ("{path: /x}", "{path: /x, hosts: [a.com]}"),
        (
            "{path: /x, hosts: ['*.a.com']}",
            "{path: /x, hosts: ['*.b.a.com']}",
        ),
        ("{path: /x, methods: [GET]}", "{path: /x, methods: [POST]}"),
        ("{path: /x}", "{path: /x, methods: [GET]}"),
        (
            "{path: /x, headers: [{name: v, exact: '1'}]}",
            "{path: /x, headers: [{name: v, exact: '2'}]}",
        ),
        (
            "{path: /x, query: [{name: v, present: true}]}",
            "{path: /x, query: [{name: v, present: false}]}",
        ),
    ] {
        if let Err(e) = compile_yaml(&two(a, b)) {
            panic!("{a} / {b} rejected: {e}");
        }
    }
    // Different priorities order them.
    let y = format!(
        "{head}  - name: a\n    match: {{path: /x}}\n    action: {{echo: {{}}}}\n  - name: b\n    priority: 1\n    match: {{path: /x}}\n    action: {{echo: {{}}}}\n"
    );
    let s = compile_yaml(&y).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(route_name(&s, &get("/x")).as_deref(), Some("b"));
}

#[test]
fn config_routes_follow_precedence() {
    let y = "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:
  - {name: any, match: {path_prefix: /}, action: {echo: {}}}
  - {name: v1, match: {path_prefix: /v1}, action: {echo: {}}}
  - {name: user, match: {path: '/v1/users/{id}'}, action: {echo: {}}}
  - {name: me, match: {path: /v1/users/me}, action: {echo: {}}}
  - {name: files, match: {path: '/v1/files/{*rest}'}, action: {echo: {}}}
  - {name: v2-header, match: {path_prefix: /v1, headers: [{name: accept-version, exact: '2'}]}, action: {echo: {}}}
  - {name: wild, match: {path_prefix: /, hosts: ['*.example.com']}, action: {echo: {}}}
  - {name: exact-host, match: {path: /v1/users/me, hosts: [api.example.com], methods: [get]}, action: {echo: {}}}
  - {name: override, priority: 100, match: {path_prefix: /, query: [{name: maintenance, present: true}]}, action: {echo: {}}}
";
    let s = compile_yaml(y).unwrap_or_else(|e| panic!("{e}"));
    let cases = [
        (get("/"), "any"),
        (get("/v1"), "v1"),
        (get("/v1/x"), "v1"),
        (get("/v1s"), "any"),
        (get("/v1/users/7"), "user"),
        (get("/v1/users/me"), "me"),
        (get("/v1/files/a/b"), "files"),
        (get("/v1/x").header("accept-version", "2"), "v2-header"),
        (get("/v1/users/7").header("accept-version", "2"), "user"),
        (get("/v1/users/me").host("www.example.com"), "wild"),
        (get("/v1/users/me").host("api.example.com"), "exact-host"),
        (
            get("/v1/users/me").host("api.example.com").method("POST"),
            "wild",
        ),
        (get("/v1/users/me?maintenance"), "override"),
    ];
    for (req, want) in cases {
        assert_eq!(
            route_name(&s, &req).as_deref(),
            Some(want),
            "{} {}{} host={}",
            req.method,
            req.path,
            req.query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default(),
            req.host
        );
    }
}

// ------------------------------------------------------------------ CORS preflight

fn preflight_headers(origin: bool, method: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if origin {
        h.insert("origin", HeaderValue::from_static("https://app.example"));
    }
    h.insert(
        "access-control-request-method",
        HeaderValue::from_static(method),
    );
    h
}

#[test]
fn preflight_reaches_the_route_of_its_actual_request() {
    let mut post = path("/users").method("POST").conds;
    post.preflight = true;
    let mut get = path("/users").method("GET").conds;
    get.preflight = true;
    let opts = Method::OPTIONS;
    assert!(post.test(&opts, &preflight_headers(true, "POST"), None));
    assert!(!post.test(&opts, &preflight_headers(true, "GET"), None));
    assert!(get.test(&opts, &preflight_headers(true, "GET"), None));
    // Not a preflight: no Origin, or not OPTIONS.
    assert!(!post.test(&opts, &preflight_headers(false, "POST"), None));
    assert!(!post.test(&Method::PUT, &preflight_headers(true, "POST"), None));
    // Without a cors policy the method condition is plain.
    let plain = path("/users").method("POST").conds;
    assert!(!plain.test(&opts, &preflight_headers(true, "POST"), None));
    // Routes on different methods stay disjoint; one that lists OPTIONS
    // does not (a preflight matches both).
    assert!(post.disjoint(&get));
    let options = path("/users").method("OPTIONS").conds;
    assert!(!post.disjoint(&options));
    assert!(!options.disjoint(&post));
    assert!(plain.disjoint(&options));

    let mut b = RouterBuilder::default();
    b.add(&[], &Pattern::parse("/users").unwrap(), 0, get);
    b.add(&[], &Pattern::parse("/users").unwrap(), 0, post);
    let r = b.build();
    let find = |h: &HeaderMap| {
        r.find(&RequestView {
            host: "",
            path: "/users",
            query: None,
            method: &Method::OPTIONS,
            headers: h,
        })
        .map(|m| m.route)
    };
    assert_eq!(find(&preflight_headers(true, "GET")), Some(0));
    assert_eq!(find(&preflight_headers(true, "POST")), Some(1));
    assert_eq!(find(&preflight_headers(true, "DELETE")), None);
}
