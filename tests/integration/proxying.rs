//! Proxy semantics: transparency, header hygiene, forwarded headers, request
//! ids, rewrites, header policies, Host, the `respond`/`echo` actions, the
//! error responses, bodyless answers and `Expect: 100-continue`.

use super::support::conn::{guard, header_multimap, RawConn};
use super::support::live;
use super::support::upstream::{self, response};
use super::support::{client, gateway, simple_config, TestGateway};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

fn proxy_all() -> &'static str {
    "  - name: all\n    action: {proxy: {upstream: up}}\n"
}

async fn proxy_to(up: SocketAddr) -> TestGateway {
    gateway(&simple_config(&[up], "", proxy_all())).await
}

fn req(method: Method, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// What the echo upstream saw.
fn seen(r: &client::Reply) -> Value {
    assert_eq!(r.status, 200, "echo upstream answered: {}", r.text());
    r.json()
}

/// All values of one request header as the echo upstream received it.
fn seen_header(doc: &Value, name: &str) -> Vec<String> {
    doc["headers"][name]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn seen_one(doc: &Value, name: &str) -> Option<String> {
    let v = seen_header(doc, name);
    assert!(v.len() <= 1, "{name} sent {} times: {v:?}", v.len());
    v.into_iter().next()
}

fn assert_error(r: &client::Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let e = &v["error"];
    assert_eq!(e["status"], status, "{v}");
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let rid = r.header("x-request-id").expect("x-request-id on errors");
    assert_eq!(e["request_id"], rid, "{v}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "only `error`: {v}");
    assert_eq!(e.as_object().map(|o| o.len()), Some(4), "{v}");
}

/// An upstream with varied answers: `/status/NNN` answers NNN; response
/// headers include repeated and custom ones; the body describes the request.
async fn varied_upstream() -> upstream::TestUpstream {
    upstream::start(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let status: u16 = parts
            .uri
            .path()
            .strip_prefix("/status/")
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        let text = if status == 204 || status == 304 {
            String::new()
        } else {
            format!(
                "{} {} query={:?} body={:?} x-req={:?}",
                parts.method,
                parts.uri.path(),
                parts.uri.query(),
                String::from_utf8_lossy(&body),
                parts.headers.get("x-req"),
            )
        };
        let mut r = response(status, text);
        let h = r.headers_mut();
        h.insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
        h.insert("etag", "\"v1\"".parse().unwrap());
        h.insert("cache-control", "max-age=5".parse().unwrap());
        h.append("set-cookie", "a=1; Path=/".parse().unwrap());
        h.append("set-cookie", "b=2; HttpOnly".parse().unwrap());
        h.insert("x-custom", "custom value".parse().unwrap());
        if status == 201 {
            h.insert("location", "/things/1".parse().unwrap());
        }
        r
    })
    .await
}

#[tokio::test]
async fn transparency_direct_and_proxied_answers_match() {
    let up = varied_upstream().await;
    let gw = proxy_to(up.addr).await;

    type Case = (
        Method,
        &'static str,
        &'static str,
        Vec<(&'static str, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        (Method::GET, "/status/200", "", vec![]),
        (Method::GET, "/status/200?a=1&b=two%20words&a=3", "", vec![]),
        (
            Method::POST,
            "/status/201",
            "{\"name\":\"x\"}",
            vec![("content-type", "application/json")],
        ),
        (Method::PUT, "/status/200", "replace me", vec![]),
        (Method::HEAD, "/status/200", "", vec![]),
        (Method::DELETE, "/status/200?hard=true", "", vec![]),
        (Method::GET, "/status/204", "", vec![]),
        (
            Method::GET,
            "/status/304",
            "",
            vec![("if-none-match", "\"v1\"")],
        ),
        (Method::GET, "/status/404", "", vec![]),
        (Method::GET, "/status/500", "", vec![]),
        (
            Method::GET,
            "/custom",
            "",
            vec![("x-req", "custom header"), ("accept", "text/plain")],
        ),
        (Method::OPTIONS, "/status/200", "", vec![]),
        (Method::PATCH, "/status/200", "patch body", vec![]),
    ];

    for (method, path, body, headers) in cases {
        let mut replies = Vec::new();
        for base in [up.addr, gw.addr()] {
            let mut b = req(method.clone(), &format!("http://{base}{path}"));
            for (k, v) in &headers {
                b = b.header(*k, *v);
            }
            replies.push(client::send(b.body(Full::new(Bytes::from(body))).unwrap()).await);
        }
        let (direct, proxied) = (&replies[0], &replies[1]);
        let what = format!("{method} {path}");
        assert_eq!(direct.status, proxied.status, "{what}");
        assert_eq!(direct.body, proxied.body, "{what}");
        let skip = ["date", "x-request-id"];
        assert_eq!(
            header_multimap(&direct.headers, &skip),
            header_multimap(&proxied.headers, &skip),
            "{what}"
        );
        assert!(proxied.header("x-request-id").is_some(), "{what}");
        if method == Method::HEAD || direct.status == 204 || direct.status == 304 {
            assert!(proxied.body.is_empty(), "{what}");
        }
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_from_requests() {
    let up = upstream::echo().await;
    let gw = proxy_to(up.addr).await;
    let r = client::send(
        req(Method::GET, &gw.url("/hop"))
            .header("connection", "keep-alive, x-named-hop")
            .header("keep-alive", "timeout=5")
            .header("x-named-hop", "secret")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("proxy-connection", "keep-alive")
            .header("te", "gzip, deflate")
            .header("upgrade", "h2c")
            .header("x-end-to-end", "kept")
            .header("authorization", "Bearer kept")
            .body(empty())
            .unwrap(),
    )
    .await;
    let doc = seen(&r);
    for h in [
        "connection",
        "keep-alive",
        "x-named-hop",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(
            doc["headers"].get(h).is_none(),
            "{h} reached upstream: {doc}"
        );
    }
    assert_eq!(seen_one(&doc, "x-end-to-end").as_deref(), Some("kept"));
    assert_eq!(
        seen_one(&doc, "authorization").as_deref(),
        Some("Bearer kept")
    );

    // `TE: trailers` is end-to-end (how gRPC asks for trailers): kept.
    let r = client::send(
        req(Method::GET, &gw.url("/te"))
            .header("te", "trailers")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(seen_one(&seen(&r), "te").as_deref(), Some("trailers"));
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_from_responses() {
    let up = upstream::start(|_req: Request<Incoming>| async {
        let mut r = response(200, "body");
        let h = r.headers_mut();
        h.insert("connection", "x-resp-hop".parse().unwrap());
        h.insert("x-resp-hop", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5, max=100".parse().unwrap());
        h.insert("proxy-authenticate", "Basic realm=\"x\"".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        r
    })
    .await;
    let gw = proxy_to(up.addr).await;
    let r = client::get(&gw.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "body");
    for h in [
        "connection",
        "x-resp-hop",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(r.header(h).is_none(), "{h} reached the client");
    }
    assert_eq!(r.header("x-end-to-end"), Some("kept"));
}

fn config_with_listener(listener_extra: &str, up: SocketAddr, routes: &str) -> String {
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n{listener_extra}upstreams:\n  - name: up\n    targets:\n      - address: {up}\nroutes:\n{routes}"
    )
}

fn spoofing_request(url: &str) -> Request<Full<Bytes>> {
    req(Method::GET, url)
        .header("host", "api.example.com")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "original.example.com")
        .header("forwarded", "for=203.0.113.7;proto=https")
        .body(empty())
        .unwrap()
}

#[tokio::test]
async fn forwarded_headers_are_set_and_client_values_replaced_from_untrusted_peers() {
    let up = upstream::echo().await;
    let gw = proxy_to(up.addr).await;

    // Without client-supplied values.
    let r = client::get(&gw.url("/fwd")).await;
    let doc = seen(&r);
    let host = gw.addr().to_string();
    assert_eq!(
        seen_one(&doc, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(seen_one(&doc, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen_one(&doc, "x-forwarded-host").as_deref(),
        Some(host.as_str())
    );
    assert_eq!(
        seen_one(&doc, "forwarded"),
        Some(format!("for=127.0.0.1;proto=http;host=\"{host}\""))
    );

    // Spoofed values from an untrusted peer are replaced, not extended.
    let r = client::send(spoofing_request(&gw.url("/fwd"))).await;
    let doc = seen(&r);
    assert_eq!(
        seen_one(&doc, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(seen_one(&doc, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen_one(&doc, "x-forwarded-host").as_deref(),
        Some("api.example.com")
    );
    assert_eq!(
        seen_one(&doc, "forwarded").as_deref(),
        Some("for=127.0.0.1;proto=http;host=api.example.com")
    );
}

#[tokio::test]
async fn forwarded_headers_from_trusted_proxies_are_extended() {
    let up = upstream::echo().await;
    let gw = gateway(&config_with_listener(
        "    trusted_proxies: [127.0.0.1]\n",
        up.addr,
        &format!(
            "{}  - name: who\n    match: {{path: /who}}\n    action: {{echo: {{}}}}\n",
            proxy_all()
        ),
    ))
    .await;

    let r = client::send(spoofing_request(&gw.url("/fwd"))).await;
    let doc = seen(&r);
    assert_eq!(
        seen_one(&doc, "x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(
        seen_one(&doc, "x-forwarded-proto").as_deref(),
        Some("https")
    );
    assert_eq!(
        seen_one(&doc, "x-forwarded-host").as_deref(),
        Some("original.example.com")
    );
    assert_eq!(
        seen_one(&doc, "forwarded").as_deref(),
        Some("for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host=api.example.com")
    );

    // The real client address is the right-most untrusted hop.
    let r = client::send(spoofing_request(&gw.url("/who"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["client"], "203.0.113.7");

    // A chain split over several header lines is extended as a whole.
    let split_chain = |url: &str| {
        req(Method::GET, url)
            .header("host", "[2001:db8::1]:8443")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-for", "198.51.100.2, 127.0.0.1")
            .header("forwarded", "for=203.0.113.7")
            .header("forwarded", "for=198.51.100.2")
            .body(empty())
            .unwrap()
    };
    let doc = seen(&client::send(split_chain(&gw.url("/fwd"))).await);
    assert_eq!(
        seen_one(&doc, "x-forwarded-for").as_deref(),
        Some("203.0.113.7, 198.51.100.2, 127.0.0.1, 127.0.0.1")
    );
    assert_eq!(
        seen_one(&doc, "forwarded").as_deref(),
        Some("for=203.0.113.7, for=198.51.100.2, for=127.0.0.1;proto=http;host=\"[2001:db8::1]:8443\"")
    );
    let r = client::send(split_chain(&gw.url("/who"))).await;
    assert_eq!(r.json()["client"], "198.51.100.2");
}

#[tokio::test]
async fn request_id_generated_when_absent_and_kept_when_supplied() {
    let up = upstream::echo().await;
    let gw = proxy_to(up.addr).await;

    let r = client::get(&gw.url("/id")).await;
    let doc = seen(&r);
    let rid = r.header("x-request-id").expect("generated id").to_string();
    assert!(rid.len() >= 16, "{rid}");
    assert_eq!(seen_one(&doc, "x-request-id"), Some(rid.clone()));

    let r2 = client::get(&gw.url("/id")).await;
    assert_ne!(r2.header("x-request-id"), Some(rid.as_str()), "ids differ");

    let r = client::send(
        req(Method::GET, &gw.url("/id"))
            .header("x-request-id", "client-chosen-42")
            .body(empty())
            .unwrap(),
    )
    .await;
    let doc = seen(&r);
    assert_eq!(r.header("x-request-id"), Some("client-chosen-42"));
    assert_eq!(
        seen_one(&doc, "x-request-id").as_deref(),
        Some("client-chosen-42")
    );

    // The upstream cannot change it on the way back.
    let liar = upstream::start(|_req: Request<Incoming>| async {
        let mut r = response(200, "x");
        r.headers_mut()
            .insert("x-request-id", "from-upstream".parse().unwrap());
        r
    })
    .await;
    let gw2 = proxy_to(liar.addr).await;
    let r = client::send(
        req(Method::GET, &gw2.url("/"))
            .header("x-request-id", "abc-123")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(r.headers.get_all("x-request-id").iter().count(), 1);
}

#[tokio::test]
async fn path_rewrites_strip_replace_and_template_keep_the_query() {
    let up = upstream::echo().await;
    let routes = "
  - name: strip
    match: {path_prefix: /api}
    action: {proxy: {upstream: up, rewrite: {strip_prefix: /api}}}
  - name: replace
    match: {path_prefix: /old}
    action: {proxy: {upstream: up, rewrite: {replace_prefix: {from: /old, to: /new/v2}}}}
  - name: template
    match: {path: \"/users/{id}/posts/{post}\"}
    action: {proxy: {upstream: up, rewrite: {path: \"/internal/users/{id}/p/{post}\"}}}
  - name: rest
    match: {path: \"/files/{*rest}\"}
    action: {proxy: {upstream: up, rewrite: {path: \"/storage/{rest}\"}}}
";
    let gw = gateway(&simple_config(&[up.addr], "", routes)).await;
    let cases = [
        ("/api/users?x=1&y=2", "/users", Some("x=1&y=2")),
        ("/api", "/", None),
        ("/api/", "/", None),
        ("/old/things/7?q=%20a", "/new/v2/things/7", Some("q=%20a")),
        ("/old", "/new/v2", None),
        (
            "/users/42/posts/abc?full=true",
            "/internal/users/42/p/abc",
            Some("full=true"),
        ),
        ("/files/a/b/c.txt?v=3", "/storage/a/b/c.txt", Some("v=3")),
    ];
    for (path, want_path, want_query) in cases {
        let doc = seen(&client::get(&gw.url(path)).await);
        assert_eq!(doc["path"], want_path, "{path}");
        assert_eq!(doc["query"].as_str(), want_query, "{path}");
    }
}

#[tokio::test]
async fn headers_policy_sets_adds_and_removes_on_request_and_response() {
    let up = upstream::start(|req: Request<Incoming>| async move {
        let seen: Vec<String> = req
            .headers()
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("x-"))
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap()))
            .collect();
        let mut r = response(200, seen.join("\n"));
        let h = r.headers_mut();
        h.insert("x-resp-set", "from-upstream".parse().unwrap());
        h.insert("x-resp-add", "from-upstream".parse().unwrap());
        h.insert("x-resp-remove", "secret".parse().unwrap());
        h.insert("server", "upstream/1.0".parse().unwrap());
        r
    })
    .await;
    let routes = "
  - name: all
    policies:
      - headers:
          request:
            set: {x-req-set: gateway}
            add: {x-req-add: gateway}
            remove: [x-req-remove]
          response:
            set: {x-resp-set: gateway}
            add: {x-resp-add: gateway}
            remove: [x-resp-remove, server]
    action: {proxy: {upstream: up}}
";
    let gw = gateway(&simple_config(&[up.addr], "", routes)).await;
    let r = client::send(
        req(Method::GET, &gw.url("/h"))
            .header("x-req-set", "client")
            .header("x-req-add", "client")
            .header("x-req-remove", "client")
            .header("x-other", "client")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen: Vec<&str> = r
        .body
        .split(|b| *b == b'\n')
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    assert!(seen.contains(&"x-req-set=gateway"), "{seen:?}");
    assert!(!seen.contains(&"x-req-set=client"), "{seen:?}");
    assert!(seen.contains(&"x-req-add=client"), "{seen:?}");
    assert!(seen.contains(&"x-req-add=gateway"), "{seen:?}");
    assert!(
        !seen.iter().any(|l| l.starts_with("x-req-remove")),
        "{seen:?}"
    );
    assert!(seen.contains(&"x-other=client"), "{seen:?}");

    let all = |n: &str| -> Vec<&str> {
        r.headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-resp-set"), vec!["gateway"]);
    assert_eq!(all("x-resp-add"), vec!["from-upstream", "gateway"]);
    assert!(all("x-resp-remove").is_empty());
    assert!(all("server").is_empty());
}

#[tokio::test]
async fn host_header_target_preserve_and_literal() {
    let up = upstream::echo().await;
    let routes = "
  - name: target
    match: {path: /target}
    action: {proxy: {upstream: up}}
  - name: explicit-target
    match: {path: /explicit-target}
    action: {proxy: {upstream: up, host_header: target}}
  - name: preserve
    match: {path: /preserve}
    action: {proxy: {upstream: up, host_header: preserve}}
  - name: literal
    match: {path: /literal}
    action: {proxy: {upstream: up, host_header: backend.internal}}
";
    let gw = gateway(&simple_config(&[up.addr], "", routes)).await;
    let target = up.addr.to_string();
    for (path, want) in [
        ("/target", target.as_str()),
        ("/explicit-target", target.as_str()),
        ("/preserve", "api.example.com:8443"),
        ("/literal", "backend.internal"),
    ] {
        let r = client::send(
            req(Method::GET, &gw.url(path))
                .header("host", "api.example.com:8443")
                .body(empty())
                .unwrap(),
        )
        .await;
        let doc = seen(&r);
        assert_eq!(seen_header(&doc, "host"), vec![want.to_string()], "{path}");
        // The client's Host always reaches the upstream as X-Forwarded-Host.
        assert_eq!(
            seen_one(&doc, "x-forwarded-host").as_deref(),
            Some("api.example.com:8443"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn respond_action_answers_with_status_headers_and_body() {
    let routes = "
  - name: health
    match: {path: /healthz}
    action:
      respond:
        status: 200
        json: {status: ok, checks: [db, cache], n: 3}
  - name: maintenance
    match: {path_prefix: /maint}
    action:
      respond:
        status: 503
        headers: {retry-after: \"120\", content-type: text/html}
        body: \"<h1>Back soon</h1>\"
  - name: created
    match: {path: /created}
    action: {respond: {status: 201}}
";
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n{routes}"
    ))
    .await;

    let r = client::get(&gw.url("/healthz")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        serde_json::json!({"status": "ok", "checks": ["db", "cache"], "n": 3})
    );
    assert!(r.header("x-request-id").is_some());

    let r = client::send(
        req(Method::POST, &gw.url("/maint/anything"))
            .body(Full::new(Bytes::from("ignored")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("120"));
    assert_eq!(r.header("content-type"), Some("text/html"));
    assert_eq!(r.text(), "<h1>Back soon</h1>");

    let r = client::get(&gw.url("/created")).await;
    assert_eq!(r.status, 201);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn echo_action_describes_the_request() {
    let gw = gateway(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n  - name: echo\n    action: {echo: {status: 202}}\n",
    )
    .await;
    let r = client::send(
        req(Method::PUT, &gw.url("/some/path?a=1&b=2"))
            .header("x-thing", "one")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from("hello echo")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(v["query"], "a=1&b=2");
    assert_eq!(v["headers"]["x-thing"], "one");
    assert_eq!(v["body"], "hello echo");
    assert_eq!(v["body_bytes"], 10);
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["route"], "echo");
    // As an upstream of this route would receive it.
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["headers"]["x-forwarded-proto"], "http");
    assert_eq!(
        v["headers"]["x-request-id"],
        r.header("x-request-id").unwrap()
    );
}

#[tokio::test]
async fn no_route_is_404_with_the_standard_json_error() {
    let gw = gateway(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n  - name: only\n    match: {path: /only}\n    action: {respond: {status: 200}}\n",
    )
    .await;
    let r = client::get(&gw.url("/nope?x=1")).await;
    assert_error(&r, 404, "route_not_found");

    let r = client::send(
        req(Method::GET, &gw.url("/nope"))
            .header("x-request-id", "trace-me")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_error(&r, 404, "route_not_found");
    assert_eq!(r.json()["error"]["request_id"], "trace-me");
}

#[tokio::test]
async fn connect_refused_is_502_upstream_unreachable() {
    let dead = upstream::closed_port().await;
    let gw = proxy_to(dead).await;
    let r = client::get(&gw.url("/x")).await;
    assert_error(&r, 502, "upstream_unreachable");
}

#[tokio::test]
async fn response_header_timeout_is_504_upstream_timeout() {
    let up = upstream::slow(Duration::from_secs(2)).await;
    let gw = gateway(&simple_config(
        &[up.addr],
        "    timeouts: {response_header: 200ms}\n",
        proxy_all(),
    ))
    .await;
    let r = client::get(&gw.url("/slow")).await;
    assert_error(&r, 504, "upstream_timeout");
}

#[tokio::test]
async fn whole_request_timeout_is_504_upstream_timeout() {
    let up = upstream::slow(Duration::from_secs(2)).await;
    let routes = "  - name: all\n    action: {proxy: {upstream: up, timeouts: {request: 200ms}}}\n";
    let gw = gateway(&simple_config(&[up.addr], "", routes)).await;
    let r = client::get(&gw.url("/slow")).await;
    assert_error(&r, 504, "upstream_timeout");

    // Also when set on the upstream.
    let gw = gateway(&simple_config(
        &[up.addr],
        "    timeouts: {request: 200ms}\n",
        proxy_all(),
    ))
    .await;
    let r = client::get(&gw.url("/slow")).await;
    assert_error(&r, 504, "upstream_timeout");
}

#[tokio::test]
async fn whole_request_timeout_cuts_a_body_that_stalls() {
    let (up, mut bodies) = live::controlled(200, &[]).await;
    let routes = "  - name: all\n    action: {proxy: {upstream: up, timeouts: {request: 300ms}}}\n";
    let gw = gateway(&simple_config(&[up.addr], "", routes)).await;
    let resp = guard(
        "response head",
        client::new().request(req(Method::GET, &gw.url("/stall")).body(empty()).unwrap()),
    )
    .await
    .expect("head before the deadline");
    assert_eq!(resp.status(), 200);
    let upstream_body = guard("the upstream's request", bodies.recv())
        .await
        .unwrap();
    upstream_body
        .send(Ok(hyper::body::Frame::data(Bytes::from("partial"))))
        .await
        .unwrap();
    // The upstream never finishes; the deadline ends the body with an error
    // (the client sees a truncated response, not a hang).
    let result = guard("the cut body", resp.into_body().collect()).await;
    assert!(result.is_err(), "a stalled body must not end cleanly");
    drop(upstream_body);
}

/// Sends `first` then a plain GET on the same connection; the second answer
/// must start right after the first one's head, proving no body bytes sat
/// in between.
async fn bodyless_then_next(gw: SocketAddr, first: &str) -> (u16, Option<String>) {
    let mut c = RawConn::connect(gw).await;
    c.write(first.as_bytes()).await;
    let head = c.read_head().await;
    c.write(b"GET /status/200 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let next = c.read_head().await;
    assert_eq!(next.status, 200, "the next answer follows directly");
    let body = c.read_body(&next, false).await;
    assert!(body.starts_with(b"GET /status/200"), "{body:?}");
    (head.status, head.header("content-length").map(String::from))
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body() {
    let up = varied_upstream().await;
    let gw = proxy_to(up.addr).await;

    // HEAD: the upstream's content-length, no body.
    let head = "HEAD /status/200 HTTP/1.1\r\nhost: x\r\n\r\n";
    let (_, direct_len) = bodyless_then_next(up.addr, head).await;
    let (status, len) = bodyless_then_next(gw.addr(), head).await;
    assert_eq!(status, 200);
    assert!(direct_len.is_some());
    assert_eq!(len, direct_len);

    let (status, _) =
        bodyless_then_next(gw.addr(), "GET /status/204 HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(status, 204);

    let (status, _) = bodyless_then_next(
        gw.addr(),
        "GET /status/304 HTTP/1.1\r\nhost: x\r\nif-none-match: \"v1\"\r\n\r\n",
    )
    .await;
    assert_eq!(status, 304);
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let up = upstream::echo().await;
    let gw = proxy_to(up.addr).await;
    let body = "x".repeat(5000);
    let mut c = RawConn::connect(gw.addr()).await;
    c.write(
        format!(
            "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let interim = c.read_head().await;
    assert_eq!(interim.status, 100, "100 Continue before any body byte");
    assert!(c.buffered().is_empty(), "nothing after the 100 yet");
    c.write(body.as_bytes()).await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    let resp = c.read_body(&head, false).await;
    let doc: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(doc["method"], "POST");
    assert_eq!(doc["body_len"], 5000);
    assert!(
        doc["headers"].get("expect").is_none(),
        "the gateway handled the expectation itself: {doc}"
    );

    // Without reading our body first, a gateway-made answer needs no 100.
    let gw2 = gateway(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n  - name: r\n    action: {respond: {status: 403, body: no}}\n",
    )
    .await;
    let mut c = RawConn::connect(gw2.addr()).await;
    c.write(
        b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\nexpect: 100-continue\r\n\r\n",
    )
    .await;
    let head = guard("final answer", c.read_head()).await;
    assert_eq!(head.status, 403);
}
