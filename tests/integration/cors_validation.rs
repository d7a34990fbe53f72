//! CORS, `validate` and `openapi` policies on real traffic: preflights
//! answered by the gateway, CORS headers on proxied and gateway-made
//! responses, body size / media type / JSON Schema checks, OpenAPI
//! parameters and bodies, and the configuration errors of each.

use super::support::{client, gateway, simple_config, start_file, temp_config, upstream};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};

fn req(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// The `error.details` of a gateway-made error.
fn details(r: &client::Reply) -> Vec<Value> {
    r.json()["error"]["details"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("no details: {}", r.text()))
}

/// The key paths of a file's configuration errors.
fn load_errors(path: &std::path::Path) -> Vec<(String, String)> {
    match portico::load(path) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

fn yaml_errors(yaml: &str) -> Vec<(String, String)> {
    let loaded = match portico::config::parse_str("t.yaml", yaml, |_| None) {
        Ok(l) => l,
        Err(e) => return e.0.into_iter().map(|e| (e.path, e.message)).collect(),
    };
    match portico::snapshot::compile(&loaded, None) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.into_iter().map(|e| (e.path, e.message)).collect(),
    }
}

fn has_error(errors: &[(String, String)], path: &str, text: &str) -> bool {
    errors.iter().any(|(p, m)| p == path && m.contains(text))
}

// ------------------------------------------------------------------ CORS

const CORS_ROUTES: &str = r#"  - name: api
    match: {path_prefix: /api, methods: [GET, PUT]}
    policies:
      - cors:
          allow_origins: ["https://app.example.com", "https://*.partner.example"]
          allow_methods: [GET, PUT]
          allow_headers: [content-type, x-api-key]
          expose_headers: [x-total-count]
          allow_credentials: true
          max_age: 10m
      - validate: {content_types: [application/json]}
    action: {proxy: {upstream: up}}
  - name: public
    match: {path_prefix: /public}
    policies:
      - cors: {allow_origins: ["*"], allow_headers: ["*"]}
    action: {proxy: {upstream: up}}
"#;

#[tokio::test]
async fn cors_preflight_is_answered_by_the_gateway() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", CORS_ROUTES)).await;
    // The route's `methods` lack OPTIONS: the preflight still reaches it.
    let r = client::send(req(
        "OPTIONS",
        &gw.url("/api/items"),
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "Content-Type, X-Api-Key"),
        ],
        "",
    ))
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type, x-api-key")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert!(r.header("vary").unwrap().contains("origin"));
    assert!(r.body.is_empty());
    assert_eq!(up.hits(), 0, "a preflight never reaches the upstream");
}

#[tokio::test]
async fn cors_preflight_refusals_are_403() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", CORS_ROUTES)).await;
    let cases: [(&str, &str, Option<&str>); 4] = [
        ("https://evil.example", "PUT", None),
        ("https://app.example.com", "DELETE", None),
        ("https://app.example.com", "PUT", Some("x-other")),
        ("https://partner.example", "GET", None),
    ];
    for (origin, method, headers) in cases {
        let mut h = vec![
            ("origin", origin),
            ("access-control-request-method", method),
        ];
        if let Some(x) = headers {
            h.push(("access-control-request-headers", x));
        }
        let r = client::send(req("OPTIONS", &gw.url("/api/items"), &h, "")).await;
        // DELETE is not a method of the route either: no route at all.
        if method == "DELETE" {
            assert_eq!(r.status, 404, "{origin} {method}");
            continue;
        }
        assert_eq!(r.status, 403, "{origin} {method} {headers:?}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "forbidden");
        assert!(r.header("access-control-allow-origin").is_none());
    }
    // A method the route has but CORS does not allow: refused by the policy.
    let gw2 = gateway(&simple_config(
        &[up.addr],
        "",
        "  - name: r\n    policies:\n      - cors: {allow_origins: ['https://app.example.com'], allow_methods: [GET]}\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let r = client::send(req(
        "OPTIONS",
        &gw2.url("/x"),
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "DELETE"),
        ],
        "",
    ))
    .await;
    assert_eq!(r.status, 403);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("method"));
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn cors_pattern_origins_and_credentials() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", CORS_ROUTES)).await;
    for origin in ["https://a.partner.example", "https://x.y.partner.example"] {
        let r = client::send(req("GET", &gw.url("/api/items"), &[("origin", origin)], "")).await;
        assert_eq!(r.status, 200);
        // Credentials: the origin is echoed, never `*`.
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        assert_eq!(
            r.header("access-control-expose-headers"),
            Some("x-total-count")
        );
        let vary: Vec<_> = r.headers.get_all("vary").iter().collect();
        assert!(vary.iter().any(|v| *v == "origin"), "{vary:?}");
    }
    for origin in [
        "https://partner.example",
        "http://a.partner.example",
        "https://a.partner.example.evil",
    ] {
        let r = client::send(req("GET", &gw.url("/api/items"), &[("origin", origin)], "")).await;
        // Not refused: the browser withholds the response without the headers.
        assert_eq!(r.status, 200, "{origin}");
        assert!(
            r.header("access-control-allow-origin").is_none(),
            "{origin}"
        );
        assert!(r.header("access-control-allow-credentials").is_none());
        assert!(r.header("vary").is_some_and(|v| v.contains("origin")));
    }
}

#[tokio::test]
async fn cors_headers_on_actual_and_error_responses() {
    // The upstream sends its own, wrong CORS header: the gateway decides.
    let up = upstream::start(|_req| async {
        let mut r = upstream::response(200, "ok");
        r.headers_mut()
            .insert("access-control-allow-origin", "*".parse().unwrap());
        r
    })
    .await;
    let gw = gateway(&simple_config(&[up.addr], "", CORS_ROUTES)).await;
    let r = client::send(req(
        "GET",
        &gw.url("/public/x"),
        &[("origin", "https://anyone.example")],
        "",
    ))
    .await;
    assert_eq!(r.status, 200);
    // Any origin without credentials: `*`.
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r.header("access-control-allow-credentials").is_none());

    // `validate` (after `cors`) refuses: the error still carries CORS headers.
    let r = client::send(req(
        "PUT",
        &gw.url("/api/items"),
        &[
            ("origin", "https://app.example.com"),
            ("content-type", "text/plain"),
        ],
        "hello",
    ))
    .await;
    assert_eq!(r.status, 415);
    assert_eq!(r.json()["error"]["code"], "unsupported_media_type");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));

    // A disallowed origin: the upstream's header is removed too.
    let r = client::send(req(
        "GET",
        &gw.url("/api/items"),
        &[("origin", "https://evil.example")],
        "",
    ))
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());
    // No Origin at all: not a CORS request, no CORS headers.
    let r = client::get(&gw.url("/api/items")).await;
    assert!(r.header("access-control-allow-origin").is_none());
    assert!(r.header("vary").is_some_and(|v| v.contains("origin")));
}

#[tokio::test]
async fn cors_star_headers_echo_the_request() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", CORS_ROUTES)).await;
    let r = client::send(req(
        "OPTIONS",
        &gw.url("/public/x"),
        &[
            ("origin", "https://anyone.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "authorization, x-custom"),
        ],
        "",
    ))
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization, x-custom")
    );
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, HEAD, POST")
    );
    assert!(r.header("access-control-max-age").is_none());
}

#[test]
fn cors_config_errors() {
    let base = "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n  - name: r\n    policies:\n      - cors: ";
    let end = "\n    action: {respond: {status: 200}}\n";
    let e = yaml_errors(&format!(
        "{base}{{allow_origins: ['*'], allow_credentials: true}}{end}"
    ));
    assert!(
        has_error(
            &e,
            "routes[0].policies[0].cors.allow_origins[0]",
            "allow_credentials"
        ),
        "{e:?}"
    );
    let e = yaml_errors(&format!(
        "{base}{{allow_origins: ['https://*example.com', 'https://a.example/']}}{end}"
    ));
    assert!(
        has_error(
            &e,
            "routes[0].policies[0].cors.allow_origins[0]",
            "wildcard"
        ),
        "{e:?}"
    );
    assert!(
        has_error(&e, "routes[0].policies[0].cors.allow_origins[1]", "no path"),
        "{e:?}"
    );
    let e = yaml_errors(&format!(
        "{base}{{allow_origins: ['https://a.example'], allow_methods: ['GE T'], allow_headers: ['bad header']}}{end}"
    ));
    assert!(
        has_error(
            &e,
            "routes[0].policies[0].cors.allow_methods[0]",
            "not an HTTP method"
        ),
        "{e:?}"
    );
    assert!(
        has_error(
            &e,
            "routes[0].policies[0].cors.allow_headers[0]",
            "not a valid header name"
        ),
        "{e:?}"
    );
    let e = yaml_errors(&format!(
        "{base}{{allow_origins: ['https://a.example'], nope: 1}}{end}"
    ));
    assert!(e.iter().any(|(_, m)| m.contains("nope")), "{e:?}");
}

// ------------------------------------------------------------------ validate

const SCHEMA_ROUTE: &str = r#"  - name: users
    match: {path: /users}
    policies:
      - validate:
          max_body: 1KiB
          content_types: [application/json, "text/*"]
          json_schema:
            type: object
            required: [user]
            properties:
              user:
                type: object
                required: [email, age]
                properties:
                  email: {type: string, pattern: "^[^@]+@[^@]+$"}
                  age: {type: integer, minimum: 0}
    action: {proxy: {upstream: up}}
  - name: uploads
    match: {path: /uploads}
    policies:
      - validate: {max_body: 100B, content_types: ["image/*"], require_body: true}
    action: {proxy: {upstream: up}}
"#;

fn json_post(url: &str, body: &str) -> Request<Full<Bytes>> {
    req(
        "POST",
        url,
        &[("content-type", "application/json; charset=utf-8")],
        body,
    )
}

#[tokio::test]
async fn validate_content_types() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", SCHEMA_ROUTE)).await;
    // Parameters are ignored; wildcard subtypes match.
    let r = client::send(req(
        "POST",
        &gw.url("/uploads"),
        &[("content-type", "image/png; q=1")],
        "PNG",
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for ct in ["application/json", "text/plain"] {
        let r = client::send(req(
            "POST",
            &gw.url("/uploads"),
            &[("content-type", ct)],
            "x",
        ))
        .await;
        assert_eq!(r.status, 415, "{ct}");
        assert_eq!(r.json()["error"]["code"], "unsupported_media_type");
    }
    let r = client::send(req("POST", &gw.url("/uploads"), &[], "x")).await;
    assert_eq!(r.status, 415, "no content type");
    // require_body: a request without one is refused.
    let r = client::send(req(
        "POST",
        &gw.url("/uploads"),
        &[("content-type", "image/png")],
        "",
    ))
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "validation_failed");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn validate_body_too_large_is_413() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", SCHEMA_ROUTE)).await;
    // Streamed (no schema) and read (schema) bodies alike.
    let big = "x".repeat(200);
    let r = client::send(req(
        "POST",
        &gw.url("/uploads"),
        &[("content-type", "image/png")],
        &big,
    ))
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");
    let big_json = format!("{{\"pad\": \"{}\"}}", "x".repeat(2000));
    let r = client::send(json_post(&gw.url("/users"), &big_json)).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn validate_body_too_large_without_content_length() {
    // A chunked body (no Content-Length) is cut while streaming.
    use http_body_util::StreamBody;
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", SCHEMA_ROUTE)).await;
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = (0..10)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 50]))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let r = client
        .request(
            Request::post(gw.url("/uploads"))
                .header("content-type", "image/png")
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn validate_invalid_json_and_schema_failures() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", SCHEMA_ROUTE)).await;
    let r = client::send(json_post(&gw.url("/users"), "{\"user\": ")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "validation_failed");
    let d = details(&r);
    assert_eq!(d[0]["pointer"], "");
    assert!(d[0]["reason"].as_str().unwrap().contains("line 1"), "{d:?}");

    let r = client::send(json_post(
        &gw.url("/users"),
        r#"{"user": {"email": "not-an-email", "age": -3}}"#,
    ))
    .await;
    assert_eq!(r.status, 400);
    let d = details(&r);
    let pointers: Vec<&str> = d.iter().map(|x| x["pointer"].as_str().unwrap()).collect();
    assert!(pointers.contains(&"/user/email"), "{d:?}");
    assert!(pointers.contains(&"/user/age"), "{d:?}");
    // Reasons do not quote the client's value, nor the schema.
    assert!(!r.text().contains("not-an-email"), "{}", r.text());
    assert!(!r.text().contains("^[^@]+@"), "{}", r.text());

    let r = client::send(json_post(&gw.url("/users"), r#"{"user": {"age": 3}}"#)).await;
    assert_eq!(
        details(&r),
        vec![json!({"pointer": "/user/email", "reason": "is required"})]
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn validate_valid_body_reaches_the_upstream_intact() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(&[up.addr], "", SCHEMA_ROUTE)).await;
    let body = r#"{"user": {"email": "a@example.com", "age": 30}, "extra": [1, 2, 3]}"#;
    let r = client::send(json_post(&gw.url("/users"), body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], body.len());
    assert_eq!(r.json()["method"], "POST");
    // Also when it arrives in many chunks, without Content-Length.
    use http_body_util::StreamBody;
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = body
        .as_bytes()
        .chunks(7)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client
        .request(
            Request::post(gw.url("/users"))
                .header("content-type", "application/json")
                .body(StreamBody::new(futures_util::stream::iter(chunks)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["body_len"], body.len());
    // A request without a body is not checked (no `require_body`).
    let r = client::get(&gw.url("/users")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn validate_schema_file() {
    let up = upstream::echo().await;
    let path = temp_config(
        "cors-validation",
        "schema-file",
        &simple_config(
            &[up.addr],
            "",
            "  - name: r\n    policies:\n      - validate: {json_schema_file: schemas/order.yaml}\n    action: {proxy: {upstream: up}}\n",
        ),
    );
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    std::fs::write(
        dir.join("schemas/order.yaml"),
        "type: object\nrequired: [qty]\nproperties:\n  qty: {type: integer, maximum: 10}\n",
    )
    .unwrap();
    let gw = start_file(&path).await;
    let r = client::send(json_post(&gw.url("/o"), r#"{"qty": 11}"#)).await;
    assert_eq!(r.status, 400);
    assert_eq!(details(&r)[0]["pointer"], "/qty");
    let r = client::send(json_post(&gw.url("/o"), r#"{"qty": 2}"#)).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_changed_schema_file_applies_after_a_reload() {
    let up = upstream::echo().await;
    let path = temp_config(
        "cors-validation",
        "schema-reload",
        &simple_config(
            &[up.addr],
            "",
            "  - name: r\n    policies:\n      - validate: {json_schema_file: schemas/order.json}\n    action: {proxy: {upstream: up}}\n",
        ),
    );
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    let schema = |max: u32| {
        format!(
            r#"{{"type": "object", "properties": {{"qty": {{"type": "integer", "maximum": {max}}}}}}}"#
        )
    };
    std::fs::write(dir.join("schemas/order.json"), schema(10)).unwrap();
    let gw = start_file(&path).await;
    let post = |qty: u32| client::send(json_post(&gw.url("/o"), &format!(r#"{{"qty": {qty}}}"#)));
    assert_eq!(post(20).await.status, 400);

    // Only the schema file changes; the configuration file is not touched.
    std::fs::write(dir.join("schemas/order.json"), schema(50)).unwrap();
    assert_eq!(post(20).await.status, 400, "not before the reload");
    let r = gw.running.shared.reload_checked().unwrap();
    assert!(r.changed);
    assert_eq!(post(20).await.status, 200);
    assert_eq!(post(60).await.status, 400);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn validate_config_errors() {
    let path = temp_config(
        "cors-validation",
        "validate-errors",
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n  - name: r\n    policies:\n      - validate: {json_schema: {type: strin}}\n      - validate: {json_schema_file: missing.json}\n      - validate: {content_types: [json]}\n      - validate: {json_schema: {type: object}, json_schema_file: bad.json}\n      - validate: {json_schema_file: bad.json}\n    action: {respond: {status: 200}}\n",
    );
    std::fs::write(path.parent().unwrap().join("bad.json"), "{not json").unwrap();
    let e = load_errors(&path);
    let p = "routes[0].policies";
    assert!(
        has_error(
            &e,
            &format!("{p}[0].validate.json_schema"),
            "invalid JSON Schema"
        ),
        "{e:?}"
    );
    assert!(
        has_error(
            &e,
            &format!("{p}[1].validate.json_schema_file"),
            "file not found"
        ),
        "{e:?}"
    );
    assert!(
        has_error(
            &e,
            &format!("{p}[2].validate.content_types[0]"),
            "not a media type"
        ),
        "{e:?}"
    );
    assert!(
        has_error(&e, &format!("{p}[3].validate.json_schema_file"), "not both"),
        "{e:?}"
    );
    assert!(
        has_error(
            &e,
            &format!("{p}[4].validate.json_schema_file"),
            "not valid JSON"
        ),
        "{e:?}"
    );
}

// ------------------------------------------------------------------ openapi

const OPENAPI: &str = r##"openapi: 3.0.3
info: {title: Users, version: "1"}
paths:
  /users:
    get:
      parameters:
        - {name: limit, in: query, required: true, schema: {type: integer, minimum: 1, maximum: 100}}
        - {name: tags, in: query, schema: {type: array, items: {type: string, enum: [a, b]}}}
    post:
      parameters:
        - {$ref: "#/components/parameters/Tenant"}
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/NewUser"}
  /users/{id}:
    parameters:
      - {name: id, in: path, required: true, schema: {type: integer}}
    get:
      parameters:
        - {name: verbose, in: query, schema: {type: boolean}}
    delete: {}
components:
  parameters:
    Tenant: {name: x-tenant, in: header, required: true, schema: {type: string, pattern: "^[a-z]+$"}}
  schemas:
    NewUser:
      type: object
      required: [email]
      properties:
        email: {type: string}
        address: {$ref: "#/components/schemas/Address"}
    Address:
      type: object
      required: [city]
      properties:
        city: {type: string, minLength: 1}
"##;

/// A gateway whose routes use `api.yaml` (the `OPENAPI` document) through a
/// route group, plus `extra` routes.
async fn openapi_gateway(
    name: &str,
    up: std::net::SocketAddr,
    extra: &str,
) -> super::support::TestGateway {
    let yaml = format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{{address: '{up}'}}]\nroute_groups:\n  - name: users-api\n    policies:\n      - openapi: {{spec: api.yaml, base_path: /v1}}\nroutes:\n  - name: list\n    group: users-api\n    match: {{path: /v1/users}}\n    action: {{proxy: {{upstream: up}}}}\n  - name: one\n    group: users-api\n    match: {{path_prefix: /v1/users}}\n    action: {{proxy: {{upstream: up}}}}\n{extra}"
    );
    let path = temp_config("cors-validation", name, &yaml);
    std::fs::write(path.parent().unwrap().join("api.yaml"), OPENAPI).unwrap();
    start_file(&path).await
}

#[tokio::test]
async fn openapi_valid_requests_pass() {
    let up = upstream::echo().await;
    let gw = openapi_gateway("valid", up.addr, "").await;
    let r = client::get(&gw.url("/v1/users?limit=10&tags=a&tags=b")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client::get(&gw.url("/v1/users/42?verbose=true")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r#"{"email": "a@example.com", "address": {"city": "Oslo"}}"#;
    let r = client::send(req(
        "POST",
        &gw.url("/v1/users"),
        &[("content-type", "application/json"), ("x-tenant", "acme")],
        body,
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], body.len());
    let r = client::send(req("DELETE", &gw.url("/v1/users/7"), &[], "")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn openapi_failures_name_each_location() {
    let up = upstream::echo().await;
    let gw = openapi_gateway("failures", up.addr, "").await;
    let find = |d: &[Value], at: &str, key: &str, val: &str| {
        d.iter().any(|x| x["in"] == at && x[key] == val)
    };
    // Path: not an integer.
    let r = client::get(&gw.url("/v1/users/abc")).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "validation_failed");
    assert!(find(&details(&r), "path", "name", "id"), "{}", r.text());
    // Query: required missing; typed; array items.
    let r = client::get(&gw.url("/v1/users?tags=c")).await;
    let d = details(&r);
    assert!(
        d.iter()
            .any(|x| x["in"] == "query" && x["name"] == "limit" && x["reason"] == "is required"),
        "{d:?}"
    );
    assert!(find(&d, "query", "name", "tags"), "{d:?}");
    let r = client::get(&gw.url("/v1/users?limit=1000")).await;
    assert!(find(&details(&r), "query", "name", "limit"));
    let r = client::get(&gw.url("/v1/users?limit=ten")).await;
    assert!(find(&details(&r), "query", "name", "limit"));
    let r = client::get(&gw.url("/v1/users/1?verbose=maybe")).await;
    assert!(find(&details(&r), "query", "name", "verbose"));
    // Header (from a $ref'd parameter) and body (through two $refs) at once.
    let r = client::send(req(
        "POST",
        &gw.url("/v1/users"),
        &[("content-type", "application/json"), ("x-tenant", "ACME!")],
        r#"{"address": {"city": ""}}"#,
    ))
    .await;
    assert_eq!(r.status, 400);
    let d = details(&r);
    assert!(find(&d, "header", "name", "x-tenant"), "{d:?}");
    assert!(find(&d, "body", "pointer", "/email"), "{d:?}");
    assert!(find(&d, "body", "pointer", "/address/city"), "{d:?}");
    // Missing header and body.
    let r = client::send(req("POST", &gw.url("/v1/users"), &[], "")).await;
    let d = details(&r);
    assert!(
        d.iter()
            .any(|x| x["in"] == "header" && x["reason"] == "is required"),
        "{d:?}"
    );
    assert!(
        d.iter().any(|x| x["in"] == "body" && x["pointer"] == ""),
        "{d:?}"
    );
    // Invalid JSON.
    let r = client::send(req(
        "POST",
        &gw.url("/v1/users"),
        &[("content-type", "application/json"), ("x-tenant", "acme")],
        "{",
    ))
    .await;
    assert!(find(&details(&r), "body", "pointer", ""));
    // A media type the operation does not take.
    let r = client::send(req(
        "POST",
        &gw.url("/v1/users"),
        &[("content-type", "text/plain"), ("x-tenant", "acme")],
        "hi",
    ))
    .await;
    assert_eq!(r.status, 415);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn openapi_unknown_paths_and_methods() {
    let up = upstream::echo().await;
    let gw = openapi_gateway(
        "unknown",
        up.addr,
        "  - name: lenient\n    match: {path_prefix: /lenient}\n    policies:\n      - openapi: {spec: api.yaml, base_path: /lenient, reject_unknown: false}\n    action: {proxy: {upstream: up}}\n",
    )
    .await;
    let r = client::get(&gw.url("/v1/users/1/friends")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "route_not_found");
    let r = client::send(req("PUT", &gw.url("/v1/users/1"), &[], "")).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, DELETE"));
    // reject_unknown: false passes what the document does not describe,
    // but still checks what it does.
    let r = client::get(&gw.url("/lenient/other")).await;
    assert_eq!(r.status, 200);
    let r = client::send(req("PUT", &gw.url("/lenient/users/1"), &[], "")).await;
    assert_eq!(r.status, 200);
    let r = client::get(&gw.url("/lenient/users/x")).await;
    assert_eq!(r.status, 400);
    assert_eq!(up.hits(), 2);
}

#[test]
fn openapi_document_compiled_once_for_many_routes() {
    let path = temp_config(
        "cors-validation",
        "shared-doc",
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroute_groups:\n  - name: g\n    policies:\n      - openapi: {spec: api.yaml}\nroutes:\n  - {name: a, group: g, match: {path: /a}, action: {respond: {status: 200}}}\n  - {name: b, group: g, match: {path: /b}, action: {respond: {status: 200}}}\n  - {name: c, match: {path: /c}, policies: [{openapi: {spec: ./api.yaml}}], action: {respond: {status: 200}}}\n",
    );
    std::fs::write(path.parent().unwrap().join("api.yaml"), OPENAPI).unwrap();
    assert!(load_errors(&path).is_empty());
    // A broken document: one error per key that names it, each naming the file.
    std::fs::write(path.parent().unwrap().join("api.yaml"), "openapi: 3.0.0\ninfo: {}\npaths:\n  /x:\n    get:\n      parameters: [{name: q, in: query, schema: {type: nonsense}}]\n").unwrap();
    let e = load_errors(&path);
    assert!(
        has_error(&e, "route_groups[0].policies[0].openapi.spec", "api.yaml"),
        "{e:?}"
    );
    assert!(
        has_error(
            &e,
            "routes[2].policies[0].openapi.spec",
            "paths./x.get.parameters[0].schema"
        ),
        "{e:?}"
    );
    std::fs::write(path.parent().unwrap().join("api.yaml"), "swagger: '2.0'\n").unwrap();
    let e = load_errors(&path);
    assert!(
        has_error(&e, "routes[2].policies[0].openapi.spec", "Swagger 2"),
        "{e:?}"
    );
    std::fs::remove_file(path.parent().unwrap().join("api.yaml")).unwrap();
    let e = load_errors(&path);
    assert!(
        has_error(&e, "routes[2].policies[0].openapi.spec", "cannot read"),
        "{e:?}"
    );
}
