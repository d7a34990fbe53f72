//! The admin API against its own OpenAPI document: real answers of every
//! endpoint (each status a test can provoke) validated with a JSON Schema
//! validator against the schemas `/openapi.json` serves, which forbid
//! undocumented fields, so the document and the endpoints cannot drift
//! apart. And `/readyz` while the gateway is still starting.

use super::support::client::Reply;
use super::support::metrics::{admin_get, admin_request};
use super::support::{client, start_file, temp_config, upstream};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// Checks `r`, the answer of `method path`, against the OpenAPI document
/// `doc`: the status and content type must be documented for the
/// operation, and a JSON body must validate against the documented schema.
fn check(doc: &Value, method: &str, path: &str, r: &Reply) {
    let what = format!("{method} {path} → {}", r.status);
    let op = &doc["paths"][path][method.to_lowercase()];
    assert!(op.is_object(), "{what}: no such operation in the document");
    let mut resp = &op["responses"][r.status.as_str()];
    if let Some(reference) = resp.get("$ref").and_then(Value::as_str) {
        resp = doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{what}: dangling {reference}"));
    }
    assert!(resp.is_object(), "{what}: status not documented");
    let ct = r.header("content-type").expect("a content type");
    let media = ct.split(';').next().unwrap().trim();
    let content = resp["content"].as_object().expect("documented content");
    let (_, documented) = content
        .iter()
        .find(|(k, _)| k.split(';').next().unwrap().trim() == media)
        .unwrap_or_else(|| panic!("{what}: content type {ct} not documented"));
    if media != "application/json" {
        return;
    }
    // The schema with the document's components beside it, so that its
    // `#/components/...` references resolve.
    let mut schema = documented["schema"].clone();
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
    schema["components"] = doc["components"].clone();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{what}: the documented schema does not compile: {e}"));
    let body = r.json();
    let errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|e| format!("{e} (at `{}`)", e.instance_path().as_str()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: the answer does not match the documented schema:\n{}\n{body:#}",
        errors.join("\n")
    );
}

/// A configuration using what shows up in the admin views: consumers with
/// groups and a plan, an upstream with a health check, one with a circuit
/// breaker and an adaptive concurrency limit, and `proxy`, `respond`,
/// `echo` and `aggregate` routes on two listeners.
fn config(up: SocketAddr, extra_route: &str) -> String {
    format!(
        r#"watch_config: false
listeners:
  - name: main
    address: 127.0.0.1:0
  - name: side
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
  token: t
consumers:
  - id: app
    groups: [mobile, first-party]
    plan: gold
    credentials: {{api_keys: [{{sha256: {key}}}]}}
upstreams:
  - name: plain
    balance: least_request
    targets: [{{address: '{up}'}}]
    health_check: {{path: /, interval: 1s}}
  - name: guarded
    targets: [{{address: '{up}', weight: 3}}]
    circuit_breaker: {{}}
    adaptive_concurrency: {{}}
routes:
  - name: proxied
    match: {{path_prefix: /p}}
    policies:
      - auth: {{methods: [{{api_key: {{header: x-api-key}}}}]}}
    action: {{proxy: {{upstream: guarded}}}}
  - name: fixed
    listeners: [side]
    match: {{path: /fixed}}
    action: {{respond: {{status: 204}}}}
  - name: echoed
    match: {{path: /echo}}
    action: {{echo: {{}}}}
  - name: screen
    match: {{path: /screen}}
    action:
      aggregate:
        calls:
          - {{name: a, upstream: plain, path: /a, group: a}}
          - {{name: b, upstream: guarded, path: /b, group: b}}
{extra_route}"#,
        key = portico::auth::sha256_hex(b"admin-api-test-key-0123"),
    )
}

#[tokio::test]
async fn every_admin_answer_matches_the_served_openapi_document() {
    let up = upstream::start(|_req| async {
        let mut r = upstream::response(200, "{\"ok\": true}");
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await;
    let path = temp_config("admin-api", "openapi", &config(up.addr, ""));
    let gw = start_file(&path).await;
    let admin = gw.running.admin_addr();
    let tok = Some("t");
    // Traffic, so that counts, usage, latencies and the breaker's and
    // adaptive limit's views have something in them.
    let r = client::send(
        http::Request::get(gw.url("/p/1"))
            .header("x-api-key", "admin-api-test-key-0123")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(client::get(&gw.url("/screen")).await.status, 200);
    assert_eq!(client::get(&gw.url("/echo")).await.status, 200);
    assert_eq!(client::get(&gw.url("/p/2")).await.status, 401);

    let doc = admin_get(admin, "/openapi.json", tok).await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    check(
        &doc,
        "GET",
        "/openapi.json",
        &admin_get(admin, "/openapi.json", tok).await,
    );

    // Every endpoint's success answer, as documented.
    let mut seen = std::collections::BTreeSet::new();
    for ep in portico::admin::ENDPOINTS {
        let concrete: Vec<String> = if ep.path.contains("{id}") {
            ["app", "anonymous", "other"]
                .iter()
                .map(|id| ep.path.replace("{id}", id))
                .collect()
        } else {
            vec![ep.path.to_string()]
        };
        for p in concrete {
            let r = admin_request(admin, ep.method, &p, tok, &[]).await;
            assert_eq!(r.status, 200, "{} {p}: {}", ep.method, r.text());
            check(&doc, ep.method, ep.path, &r);
        }
        seen.insert(ep.path);
    }
    assert_eq!(seen.len(), doc["paths"].as_object().unwrap().len());

    // The views have the optional parts filled in, so those schemas were
    // exercised too.
    let ups = admin_get(admin, "/upstreams", tok).await.json();
    let guarded = &ups["upstreams"][0];
    assert_eq!(guarded["name"], "guarded");
    assert_eq!(guarded["circuit_breaker"]["state"], "closed");
    assert!(guarded["adaptive_concurrency"]["limit"].as_u64().unwrap() > 0);
    assert!(ups["upstreams"][1]["circuit_breaker"].is_null());
    let routes = admin_get(admin, "/routes", tok).await.json();
    assert_eq!(routes["routes"][3]["action"], "aggregate");
    assert_eq!(
        routes["routes"][3]["upstream"],
        serde_json::json!(["guarded", "plain"])
    );
    // (A request is counted once its response is over: polled.)
    let mut total = Value::Null;
    for _ in 0..250 {
        total = admin_get(admin, "/consumers/app/usage", tok).await.json()["total"].clone();
        if total == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(total, 1);

    // Documented failures.
    for ep in portico::admin::ENDPOINTS.iter().filter(|e| e.auth) {
        let p = ep.path.replace("{id}", "app");
        let r = admin_request(admin, ep.method, &p, None, &[]).await;
        assert_eq!(r.status, 401, "{} {p}", ep.method);
        check(&doc, ep.method, ep.path, &r);
    }
    let r = admin_get(admin, "/consumers/nobody/usage", tok).await;
    assert_eq!(r.status, 404);
    check(&doc, "GET", "/consumers/{id}/usage", &r);
    // A reload that changes something, then a file that does not compile.
    std::fs::write(
        &path,
        config(
            up.addr,
            "  - name: added\n    match: {path: /added}\n    action: {respond: {status: 200}}\n",
        ),
    )
    .unwrap();
    let r = admin_request(admin, "POST", "/reload", tok, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["changed"], true);
    check(&doc, "POST", "/reload", &r);
    std::fs::write(
        &path,
        config(
            up.addr,
            "  - name: broken\n    action: {proxy: {upstream: nowhere}}\n",
        ),
    )
    .unwrap();
    let r = admin_request(admin, "POST", "/reload", tok, &[]).await;
    assert_eq!(r.status, 422, "{}", r.text());
    check(&doc, "POST", "/reload", &r);

    // Not ready while draining.
    let shared = gw.running.shared.clone();
    portico::server::Running { shared }
        .shutdown(Duration::from_secs(1))
        .await;
    let r = admin_get(admin, "/readyz", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "draining");
    check(&doc, "GET", "/readyz", &r);
}

// ------------------------------------------------------------ start-up

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over a fresh connection, by hand (no name resolution, no
/// pool): the status and the JSON body, or the connection error.
async fn raw_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the admin listener answers")?;
    let text = String::from_utf8_lossy(&buf);
    let status = text[9..12].parse().expect("a status line");
    let body = text.split_once("\r\n\r\n").expect("a head").1;
    Ok((status, serde_json::from_str(body).expect("a JSON body")))
}

/// `/readyz` is `503 starting` from the moment the admin listener answers
/// until every listener is bound.
///
/// Start-up is held between the two deterministically: the gateway
/// resolves upstream host names before it binds its listeners, and that
/// lookup (`getaddrinfo`) runs on the runtime's blocking pool, which this
/// test's runtime limits to one thread and keeps busy until it has looked.
#[test]
fn readyz_is_starting_until_every_listener_is_bound() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (taken, is_taken) = tokio::sync::oneshot::channel();
        let blocker = tokio::task::spawn_blocking(move || {
            let _ = taken.send(());
            // Bounded: a test that fails before releasing it ends anyway.
            let _ = held.recv_timeout(Duration::from_secs(30));
        });
        is_taken.await.unwrap();

        let (admin_port, main_port) = (free_port(), free_port());
        let yaml = format!(
            "listeners:\n  - name: main\n    address: 127.0.0.1:{main_port}\nadmin:\n  address: 127.0.0.1:{admin_port}\nupstreams:\n  - name: named\n    targets: [{{address: 'localhost:{main_port}'}}]\nroutes:\n  - name: ok\n    action: {{respond: {{status: 200, body: ok}}}}\n"
        );
        let loaded = portico::config::parse_str("start.yaml", &yaml, |_| None).unwrap();
        let snap = portico::snapshot::compile(&loaded, None).unwrap();
        let starting = tokio::spawn(portico::server::start(snap, None));

        let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
        let main: SocketAddr = ([127, 0, 0, 1], main_port).into();
        let mut answer = None;
        for _ in 0..500 {
            if let Ok(a) = raw_get(admin, "/readyz").await {
                answer = Some(a);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, body) = answer.expect("the admin listener came up");
        assert_eq!(
            (status, body),
            (503, serde_json::json!({"status": "starting"}))
        );
        let (status, body) = raw_get(admin, "/status").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["ready"], false);
        assert!(
            tokio::net::TcpStream::connect(main).await.is_err(),
            "the data listener is not bound yet"
        );
        assert!(!starting.is_finished());

        release.send(()).unwrap();
        let running = starting.await.unwrap().expect("the gateway starts");
        blocker.await.unwrap();
        let (status, body) = raw_get(admin, "/readyz").await.unwrap();
        assert_eq!(
            (status, body),
            (200, serde_json::json!({"status": "ready"}))
        );
        let r = client::get(&format!("http://{}/", running.addr("main"))).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    });
}
