//! Routing through a real gateway: path precedence, priority, hosts,
//! methods, header and query conditions, API versioning, rewrites from path
//! params, 404, and the compile-time ambiguity check.

use super::support::client::{self, Reply};
use super::support::traffic::{fetch, get_with, request};
use super::support::{gateway, upstream, TestGateway};

/// A gateway with listener `main`, the given upstreams section (may be empty)
/// and routes (YAML list items, indented 2).
async fn routes_gateway(upstreams: &str, routes: &str) -> TestGateway {
    gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n{upstreams}routes:\n{routes}"
    ))
    .await
}

/// A route answering 200 with its own name.
fn named(name: &str, extra: &str) -> String {
    format!("  - name: {name}\n{extra}    action: {{respond: {{body: {name}}}}}\n")
}

/// Extra request headers.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// Which route answered: the body of a `named` route, or `404`.
async fn which(gw: &TestGateway, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let r = fetch(&client::new(), request(method, &gw.url(path), headers, "")).await;
    match r.status.as_u16() {
        200 => r.text(),
        404 => "404".into(),
        s => panic!("{method} {path}: unexpected {s}: {}", r.text()),
    }
}

#[tokio::test]
async fn most_specific_path_wins() {
    let routes = [
        named("root", ""),
        named("prefix", "    match: {path_prefix: /users}\n"),
        named("catch_all", "    match: {path: \"/users/{*rest}\"}\n"),
        named("template", "    match: {path: \"/users/{id}\"}\n"),
        named("exact", "    match: {path: /users/me}\n"),
        named(
            "deeper_template",
            "    match: {path: \"/users/{id}/posts\"}\n",
        ),
        named("literal_first", "    match: {path: \"/users/me/{tab}\"}\n"),
    ]
    .concat();
    let gw = routes_gateway("", &routes).await;
    for (path, want) in [
        ("/users/me", "exact"),
        ("/users/42", "template"),
        ("/users/42/posts", "deeper_template"),
        ("/users/42/posts/7", "catch_all"),
        ("/users/me/posts", "literal_first"),
        ("/users/me/a/b", "catch_all"),
        ("/users", "prefix"),
        ("/usersx", "root"),
        ("/other", "root"),
        ("/", "root"),
    ] {
        assert_eq!(which(&gw, "GET", path, &[]).await, want, "{path}");
    }
}

#[tokio::test]
async fn prefix_matches_whole_segments_and_longer_prefix_wins() {
    let routes = [
        named("api", "    match: {path_prefix: /api}\n"),
        named("api_v2", "    match: {path_prefix: /api/v2/}\n"),
    ]
    .concat();
    let gw = routes_gateway("", &routes).await;
    for (path, want) in [
        ("/api", "api"),
        ("/api/", "api"),
        ("/api/v1/x", "api"),
        ("/api/v2", "api_v2"),
        ("/api/v2/users/1", "api_v2"),
        ("/api/v2x", "api"),
        ("/apis", "404"),
    ] {
        assert_eq!(which(&gw, "GET", path, &[]).await, want, "{path}");
    }
}

#[tokio::test]
async fn explicit_priority_overrides_specificity() {
    let routes = [
        named("exact", "    match: {path: /api/health}\n"),
        named(
            "maintenance",
            "    priority: 10\n    match: {path_prefix: /api}\n",
        ),
        named("other", "    match: {path: /other}\n"),
    ]
    .concat();
    let gw = routes_gateway("", &routes).await;
    assert_eq!(which(&gw, "GET", "/api/health", &[]).await, "maintenance");
    assert_eq!(which(&gw, "GET", "/api/x", &[]).await, "maintenance");
    assert_eq!(which(&gw, "GET", "/other", &[]).await, "other");
}

#[tokio::test]
async fn exact_host_beats_wildcard_beats_any_host() {
    let routes = [
        named("any", "    match: {path: /h}\n"),
        named(
            "wild",
            "    match: {hosts: [\"*.example.com\"], path: /h}\n",
        ),
        named(
            "deep_wild",
            "    match: {hosts: [\"*.eu.example.com\"], path: /h}\n",
        ),
        named("exact", "    match: {hosts: [api.example.com], path: /h}\n"),
        // Host specificity is compared before path specificity: an
        // exact-host catch-all beats wildcard and any-host exact paths.
        named("exact_prefix", "    match: {hosts: [shop.example.com]}\n"),
        // Likewise a longer wildcard beats a shorter one whatever the paths.
        named(
            "de_wild_prefix",
            "    match: {hosts: [\"*.de.example.com\"]}\n",
        ),
    ]
    .concat();
    let gw = routes_gateway("", &routes).await;
    for (host, want) in [
        ("api.example.com", "exact"),
        ("API.Example.com:8080", "exact"),
        ("www.example.com", "wild"),
        ("a.b.example.com", "wild"),
        ("x.eu.example.com", "deep_wild"),
        ("example.com", "any"),
        ("example.org", "any"),
        ("shop.example.com", "exact_prefix"),
        ("x.de.example.com", "de_wild_prefix"),
    ] {
        assert_eq!(
            which(&gw, "GET", "/h", &[("host", host)]).await,
            want,
            "{host}"
        );
    }
    assert_eq!(
        which(&gw, "GET", "/elsewhere", &[("host", "api.example.com")]).await,
        "404"
    );
}

#[tokio::test]
async fn methods_select_routes() {
    let routes = [
        named("read", "    match: {path: /items, methods: [GET, HEAD]}\n"),
        named("write", "    match: {path: /items, methods: [post, PUT]}\n"),
    ]
    .concat();
    let gw = routes_gateway("", &routes).await;
    assert_eq!(which(&gw, "GET", "/items", &[]).await, "read");
    assert_eq!(which(&gw, "POST", "/items", &[]).await, "write");
    assert_eq!(which(&gw, "PUT", "/items", &[]).await, "write");
    assert_eq!(which(&gw, "DELETE", "/items", &[]).await, "404");
    let head = fetch(&client::new(), request("HEAD", &gw.url("/items"), &[], "")).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn header_conditions_exact_regex_present_absent() {
    let routes = [
        named("fallback", "    match: {path_prefix: /h}\n"),
        named(
            "gold",
            "    match: {path: /h/exact, headers: [{name: x-tier, exact: gold}]}\n",
        ),
        named(
            "silver",
            "    match: {path: /h/regex, headers: [{name: x-tier, regex: \"^silver-[0-9]+$\"}]}\n",
        ),
        named(
            "debug",
            "    match: {path: /h/present, headers: [{name: X-Debug, present: true}]}\n",
        ),
        named(
            "no_debug",
            "    match: {path: /h/absent, headers: [{name: x-debug, present: false}]}\n",
        ),
    ]
    .concat();
    let gw = routes_gateway("", &routes).await;
    let cases: &[(&str, Headers, &str)] = &[
        ("/h/exact", &[("x-tier", "gold")], "gold"),
        ("/h/exact", &[("x-tier", "Gold")], "fallback"),
        ("/h/exact", &[("x-tier", "golden")], "fallback"),
        ("/h/exact", &[], "fallback"),
        ("/h/regex", &[("x-tier", "silver-12")], "silver"),
        ("/h/regex", &[("x-tier", "silver-x")], "fallback"),
        ("/h/regex", &[], "fallback"),
        ("/h/present", &[("x-debug", "")], "debug"),
        ("/h/present", &[("x-debug", "1")], "debug"),
        ("/h/present", &[], "fallback"),
        ("/h/absent", &[], "no_debug"),
        ("/h/absent", &[("x-debug", "1")], "fallback"),
    ];
    for (path, headers, want) in cases {
        assert_eq!(
            which(&gw, "GET", path, headers).await,
            *want,
            "{path} {headers:?}"
        );
    }
}

#[tokio::test]
async fn query_conditions_exact_and_present() {
    let routes = [
        named("plain", "    match: {path: /q}\n"),
        named(
            "fast",
            "    match: {path: /q, query: [{name: mode, exact: fast}]}\n",
        ),
        named(
            "spaced",
            "    match: {path: /q, query: [{name: mode, exact: very fast}]}\n",
        ),
        named(
            "debug",
            "    match: {path: /q, query: [{name: debug, present: true}, {name: mode, present: false}]}\n",
        ),
    ]
    .concat();
    let gw = routes_gateway("", &routes).await;
    for (path, want) in [
        ("/q", "plain"),
        ("/q?mode=fast", "fast"),
        ("/q?a=1&mode=fast&b=2", "fast"),
        ("/q?mode=slow", "plain"),
        ("/q?mode=very+fast", "spaced"),
        ("/q?mode=very%20fast", "spaced"),
        ("/q?debug", "debug"),
        ("/q?debug=1", "debug"),
        ("/q?debug=1&mode=slow", "plain"),
    ] {
        assert_eq!(which(&gw, "GET", path, &[]).await, want, "{path}");
    }
}

fn two_upstreams(v1: &upstream::TestUpstream, v2: &upstream::TestUpstream) -> String {
    format!(
        "upstreams:\n  - name: v1\n    targets: [{{address: \"{}\"}}]\n  - name: v2\n    targets: [{{address: \"{}\"}}]\n",
        v1.addr, v2.addr
    )
}

#[tokio::test]
async fn api_version_in_the_path() {
    let v1 = upstream::echo().await;
    let v2 = upstream::echo().await;
    let routes = "  - name: users-v1\n    match: {path_prefix: /v1}\n    action: {proxy: {upstream: v1, rewrite: {strip_prefix: /v1}}}\n  - name: users-v2\n    match: {path_prefix: /v2}\n    action: {proxy: {upstream: v2, rewrite: {strip_prefix: /v2}}}\n";
    let gw = routes_gateway(&two_upstreams(&v1, &v2), routes).await;
    let c = client::new();
    let r = get_with(&c, &gw.url("/v1/users/42?x=1"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/users/42");
    assert_eq!(r.json()["query"], "x=1");
    let r = get_with(&c, &gw.url("/v2/users/42"), &[]).await;
    assert_eq!(r.json()["path"], "/users/42");
    assert_eq!((v1.hits(), v2.hits()), (1, 1));
    let r = get_with(&c, &gw.url("/v3/users/42"), &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!((v1.hits(), v2.hits()), (1, 1));
}

#[tokio::test]
async fn api_version_in_a_header_or_media_type() {
    let v1 = upstream::fixed(200, "v1").await;
    let v2 = upstream::fixed(200, "v2").await;
    // Two conditions on different headers could both hold, so one of them
    // needs an explicit priority (see the ambiguity tests below).
    let routes = "  - name: by-header\n    match:\n      path_prefix: /users\n      headers: [{name: accept-version, exact: \"2\"}]\n    action: {proxy: {upstream: v2}}\n  - name: by-media-type\n    priority: 1\n    match:\n      path_prefix: /users\n      headers: [{name: accept, regex: \"^application/vnd\\\\.x\\\\+json;\\\\s*version=2$\"}]\n    action: {proxy: {upstream: v2}}\n  - name: default\n    match: {path_prefix: /users}\n    action: {proxy: {upstream: v1}}\n";
    let gw = routes_gateway(&two_upstreams(&v1, &v2), routes).await;
    let c = client::new();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "v1"),
        (&[("accept-version", "2")], "v2"),
        (&[("accept-version", "1")], "v1"),
        (&[("accept", "application/vnd.x+json; version=2")], "v2"),
        (&[("accept", "application/vnd.x+json;version=2")], "v2"),
        (&[("accept", "application/vnd.x+json; version=1")], "v1"),
        (&[("accept", "application/json")], "v1"),
    ];
    for (headers, want) in cases {
        let r: Reply = get_with(&c, &gw.url("/users/7"), headers).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), *want, "{headers:?}");
    }
}

#[tokio::test]
async fn path_params_feed_a_rewrite_template() {
    let up = upstream::echo().await;
    let upstreams = format!(
        "upstreams:\n  - name: up\n    targets: [{{address: \"{}\"}}]\n",
        up.addr
    );
    let routes = "  - name: posts\n    match: {path: \"/users/{id}/posts/{post}\"}\n    action: {proxy: {upstream: up, rewrite: {path: \"/internal/posts/{post}/by/{id}\"}}}\n  - name: files\n    match: {path: \"/files/{*rest}\"}\n    action: {proxy: {upstream: up, rewrite: {path: \"/static/{rest}\"}}}\n";
    let gw = routes_gateway(&upstreams, routes).await;
    let c = client::new();
    let r = get_with(&c, &gw.url("/users/42/posts/7?full=1"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/internal/posts/7/by/42");
    assert_eq!(r.json()["query"], "full=1");
    let r = get_with(&c, &gw.url("/files/a/b/c.txt"), &[]).await;
    assert_eq!(r.json()["path"], "/static/a/b/c.txt");
}

#[tokio::test]
async fn no_route_is_404_with_the_json_error_body() {
    let gw = routes_gateway("", &named("only", "    match: {path: /only}\n")).await;
    let r = client::get(&gw.url("/nothing/here")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["error"]["status"], 404);
    assert_eq!(v["error"]["code"], "route_not_found");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/nothing/here"));
    assert_eq!(v["error"]["request_id"].as_str(), r.header("x-request-id"));
}

/// Compiles a config of `routes` (respond actions only); the error text if any.
fn compile(routes: &str) -> Result<(), String> {
    let yaml = format!("listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n{routes}");
    let loaded =
        portico::config::parse_str("t.yaml", &yaml, |_| None).map_err(|e| e.to_string())?;
    portico::snapshot::compile(&loaded, None)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn overlapping_conditions_on_different_headers_are_ambiguous() {
    let err = compile(
        &[
            named(
                "a",
                "    match: {path: /x, headers: [{name: x-a, present: true}]}\n",
            ),
            named(
                "b",
                "    match: {path: /x, headers: [{name: x-b, exact: \"1\"}]}\n",
            ),
        ]
        .concat(),
    )
    .unwrap_err();
    assert!(err.contains("routes[1].match"), "{err}");
    assert!(err.contains("priority"), "{err}");
    assert!(err.contains("`a`") && err.contains("`b`"), "{err}");
    // Same with a template param named differently: same shape.
    let err = compile(
        &[
            named("c", "    match: {path: \"/u/{id}\"}\n"),
            named("d", "    match: {path: \"/u/{name}\"}\n"),
        ]
        .concat(),
    )
    .unwrap_err();
    assert!(err.contains("priority"), "{err}");
    // A priority resolves it.
    compile(
        &[
            named(
                "a",
                "    match: {path: /x, headers: [{name: x-a, present: true}]}\n",
            ),
            named(
                "b",
                "    priority: 1\n    match: {path: /x, headers: [{name: x-b, exact: \"1\"}]}\n",
            ),
        ]
        .concat(),
    )
    .unwrap();
}

#[tokio::test]
async fn exclusive_conditions_are_not_ambiguous() {
    // Different exact values of one header.
    compile(
        &[
            named(
                "a",
                "    match: {path: /x, headers: [{name: x-v, exact: \"1\"}]}\n",
            ),
            named(
                "b",
                "    match: {path: /x, headers: [{name: x-v, exact: \"2\"}]}\n",
            ),
        ]
        .concat(),
    )
    .unwrap();
    // Disjoint method sets.
    compile(
        &[
            named("r", "    match: {path: /x, methods: [GET, HEAD]}\n"),
            named("w", "    match: {path: /x, methods: [POST]}\n"),
        ]
        .concat(),
    )
    .unwrap();
    // Present vs absent, different query values, different hosts.
    compile(
        &[
            named(
                "p",
                "    match: {path: /y, headers: [{name: x-a, present: true}]}\n",
            ),
            named(
                "q",
                "    match: {path: /y, headers: [{name: x-a, present: false}]}\n",
            ),
            named(
                "s",
                "    match: {path: /z, query: [{name: v, exact: \"1\"}]}\n",
            ),
            named(
                "t",
                "    match: {path: /z, query: [{name: v, exact: \"2\"}]}\n",
            ),
            named("h1", "    match: {hosts: [a.test], path: /w}\n"),
            named("h2", "    match: {hosts: [b.test], path: /w}\n"),
        ]
        .concat(),
    )
    .unwrap();
    // And the exclusive routes really do select by their condition.
    let gw = routes_gateway(
        "",
        &[
            named(
                "one",
                "    match: {path: /x, headers: [{name: x-v, exact: \"1\"}]}\n",
            ),
            named(
                "two",
                "    match: {path: /x, headers: [{name: x-v, exact: \"2\"}]}\n",
            ),
        ]
        .concat(),
    )
    .await;
    assert_eq!(which(&gw, "GET", "/x", &[("x-v", "1")]).await, "one");
    assert_eq!(which(&gw, "GET", "/x", &[("x-v", "2")]).await, "two");
    assert_eq!(which(&gw, "GET", "/x", &[("x-v", "3")]).await, "404");
}
