//! Metrics and the admin API, through a real gateway: known traffic, then a
//! scrape of `/metrics` parsed as Prometheus text; the admin endpoints,
//! their authentication, reloads and readiness.

use super::support::conn::RawConn;
use super::support::metrics::{admin_get, admin_request, scrape, scrape_until};
use super::support::{client, gateway, h2, upstream};
use super::support::{start_file, temp_config};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const ANON: (&str, &str) = ("consumer", "anonymous");

fn routes_config(up: SocketAddr, admin: &str) -> String {
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n  - name: side\n    address: 127.0.0.1:0\nadmin:\n{admin}upstreams:\n  - name: up\n    targets: [{{address: '{up}'}}]\nroutes:\n  - name: users\n    match: {{path_prefix: /users}}\n    action: {{proxy: {{upstream: up}}}}\n  - name: fixed\n    match: {{path: /fixed}}\n    action: {{respond: {{status: 201, body: created}}}}\n"
    )
}

const LOOPBACK_ADMIN: &str = "  address: 127.0.0.1:0\n";

async fn send(method: &str, url: &str, body: &'static str) -> client::Reply {
    client::send(
        Request::builder()
            .method(method)
            .uri(url)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn request_metrics_count_known_traffic_by_route_method_and_status() {
    let up = upstream::echo().await;
    let gw = gateway(&routes_config(up.addr, LOOPBACK_ADMIN)).await;
    let admin = gw.running.admin_addr();

    let t0 = Instant::now();
    let mut users_bytes = 0;
    let mut unmatched_bytes = 0;
    for _ in 0..3 {
        let r = send("GET", &gw.url("/users/1"), "").await;
        assert_eq!(r.status, 200);
        users_bytes += r.body.len();
    }
    for _ in 0..2 {
        let r = send("POST", &gw.url("/users"), "abcd").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["body_len"], 4);
        users_bytes += r.body.len();
    }
    let r = send("DELETE", &gw.url("/users/2"), "").await;
    users_bytes += r.body.len();
    let r = send("PURGE", &gw.url("/users/3"), "").await;
    assert_eq!(r.status, 200);
    users_bytes += r.body.len();
    let r = send("GET", &gw.url("/fixed"), "").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (201, "created"));
    for _ in 0..2 {
        let r = send("GET", &gw.url("/nope"), "").await;
        assert_eq!(r.status, 404);
        unmatched_bytes += r.body.len();
    }
    let wall = t0.elapsed().as_secs_f64();

    let m = scrape_until(admin, None, |m| {
        m.find(
            "portico_request_duration_seconds_count",
            &[("route", "users")],
        ) == Some(7.0)
            && m.find(
                "portico_request_duration_seconds_count",
                &[("route", "(unmatched)")],
            ) == Some(2.0)
            && m.find("portico_request_body_bytes_total", &[("route", "users")]) == Some(8.0)
    })
    .await;
    let req = |route, method, class| {
        m.find(
            "portico_requests_total",
            &[
                ("route", route),
                ("method", method),
                ("status_class", class),
                ANON,
            ],
        )
    };
    assert_eq!(req("users", "GET", "2xx"), Some(3.0));
    assert_eq!(req("users", "POST", "2xx"), Some(2.0));
    assert_eq!(req("users", "DELETE", "2xx"), Some(1.0));
    assert_eq!(req("users", "other", "2xx"), Some(1.0));
    assert_eq!(req("users", "GET", "5xx"), None, "no such series yet");
    assert_eq!(req("fixed", "GET", "2xx"), Some(1.0));
    assert_eq!(req("(unmatched)", "GET", "4xx"), Some(2.0));

    // Histograms: buckets cumulative, +Inf == _count, sums within the wall time.
    for (route, n) in [("users", 7.0), ("fixed", 1.0), ("(unmatched)", 2.0)] {
        let (buckets, sum, count) =
            m.histogram("portico_request_duration_seconds", &[("route", route)]);
        assert_eq!(count, n, "{route}");
        assert_eq!(buckets.len(), 16, "15 bounds and +Inf");
        assert!(buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, n));
        assert!(
            sum > 0.0 && sum <= wall,
            "{route}: sum {sum} vs wall {wall}"
        );
    }
    let (_, up_sum, up_count) = m.histogram(
        "portico_upstream_request_duration_seconds",
        &[("upstream", "up"), ("target", &up.addr.to_string())],
    );
    assert_eq!(up_count, 7.0);
    let (_, users_sum, _) = m.histogram("portico_request_duration_seconds", &[("route", "users")]);
    assert!(
        up_sum > 0.0 && up_sum <= users_sum,
        "{up_sum} <= {users_sum}"
    );

    // Bytes.
    let bytes = |name, route| m.value(name, &[("route", route)]);
    assert_eq!(bytes("portico_request_body_bytes_total", "users"), 8.0);
    assert_eq!(
        bytes("portico_response_body_bytes_total", "users"),
        users_bytes as f64
    );
    assert_eq!(bytes("portico_response_body_bytes_total", "fixed"), 7.0);
    assert_eq!(
        bytes("portico_response_body_bytes_total", "(unmatched)"),
        unmatched_bytes as f64
    );

    // Gateway-made errors: only the two 404s.
    assert_eq!(
        m.value(
            "portico_gateway_errors_total",
            &[("code", "route_not_found")]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            "portico_gateway_errors_total",
            &[("code", "upstream_unreachable")]
        ),
        0.0
    );
    // Target gauges.
    let target = up.addr.to_string();
    let t = [("upstream", "up"), ("target", target.as_str())];
    assert_eq!(m.value("portico_upstream_target_healthy", &t), 1.0);
    assert_eq!(m.value("portico_upstream_target_in_flight", &t), 0.0);
    assert_eq!(m.value("portico_upstream_target_ejected", &t), 0.0);
    assert_eq!(
        m.value(
            "portico_upstream_errors_total",
            &[t[0], t[1], ("code", "upstream_unreachable")]
        ),
        0.0
    );

    // Configuration and process.
    let hash = m
        .scrape
        .samples
        .iter()
        .find(|s| s.metric == "portico_config_info")
        .and_then(|s| s.labels.get("hash").map(String::from))
        .expect("config info");
    assert_eq!(hash.len(), 16, "{hash}");
    let status = admin_get(admin, "/status", None).await.json();
    assert_eq!(status["config"]["hash"], hash.as_str());
    let loaded = m.value("portico_config_loaded_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(loaded <= now && loaded > now - 600.0, "{loaded} vs {now}");
    assert_eq!(
        m.value(
            "portico_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        m.value("portico_config_reloads_total", &[("result", "success")]),
        0.0
    );
    assert!(m.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(m.value("process_open_fds", &[]) > 0.0);
    assert!(m.value("process_start_time_seconds", &[]) <= now);
}

#[tokio::test]
async fn open_connections_by_listener_and_protocol() {
    let up = upstream::fixed(200, "ok").await;
    let gw = gateway(&routes_config(up.addr, LOOPBACK_ADMIN)).await;
    let admin = gw.running.admin_addr();
    let side = gw.running.addr("side");
    let open = |proto: &'static str| {
        move |m: &super::support::metrics::Metrics| {
            m.value(
                "portico_connections_open",
                &[("listener", "side"), ("protocol", proto), ("tls", "false")],
            )
        }
    };

    let m = scrape(admin, None).await;
    assert_eq!(open("http1")(&m), 0.0);
    // Two keep-alive HTTP/1.1 connections, each after one request.
    let mut conns = Vec::new();
    for _ in 0..2 {
        let mut c = RawConn::connect(side).await;
        c.write(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let head = c.read_head().await;
        assert_eq!(head.status, 201);
        conns.push(c);
    }
    // And one HTTP/2 (h2c) connection.
    let mut h2c = h2::client(side).await;
    let resp = h2c
        .send_request(
            Request::get(format!("http://{side}/fixed"))
                .body(upstream::full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let _ = resp.into_body().collect().await;

    let m = scrape_until(admin, None, |m| {
        open("http1")(m) == 2.0 && open("h2")(m) == 1.0
    })
    .await;
    assert_eq!(
        m.value(
            "portico_connections_total",
            &[
                ("listener", "side"),
                ("protocol", "http1"),
                ("tls", "false")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            "portico_connections_open",
            &[("listener", "side"), ("protocol", "h2"), ("tls", "true")]
        ),
        0.0
    );
    drop(conns.pop());
    drop(h2c);
    scrape_until(admin, None, |m| {
        open("http1")(m) == 1.0 && open("h2")(m) == 0.0
    })
    .await;
}

#[tokio::test]
async fn upstream_errors_by_target_and_ejection() {
    let dead = upstream::closed_port().await;
    let slow = upstream::slow(Duration::from_secs(3)).await;
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  - name: dead\n    targets: [{{address: '{dead}'}}]\n    retries: {{attempts: 0}}\n  - name: slow\n    targets: [{{address: '{}'}}]\n    timeouts: {{response_header: 100ms}}\n    retries: {{attempts: 0}}\nroutes:\n  - name: dead\n    match: {{path: /dead}}\n    action: {{proxy: {{upstream: dead}}}}\n  - name: slow\n    match: {{path: /slow}}\n    action: {{proxy: {{upstream: slow}}}}\n",
        slow.addr
    ))
    .await;
    let admin = gw.running.admin_addr();
    for _ in 0..3 {
        assert_eq!(client::get(&gw.url("/dead")).await.status, 502);
    }
    assert_eq!(client::get(&gw.url("/slow")).await.status, 504);

    let dead_t = dead.to_string();
    let slow_t = slow.addr.to_string();
    let m = scrape_until(admin, None, |m| {
        m.find(
            "portico_request_duration_seconds_count",
            &[("route", "slow")],
        ) == Some(1.0)
            && m.find(
                "portico_request_duration_seconds_count",
                &[("route", "dead")],
            ) == Some(3.0)
    })
    .await;
    let err = |up, target: &str, code| {
        m.value(
            "portico_upstream_errors_total",
            &[("upstream", up), ("target", target), ("code", code)],
        )
    };
    assert_eq!(err("dead", &dead_t, "upstream_unreachable"), 3.0);
    assert_eq!(err("dead", &dead_t, "upstream_timeout"), 0.0);
    assert_eq!(err("slow", &slow_t, "upstream_timeout"), 1.0);
    assert_eq!(err("slow", &slow_t, "upstream_unreachable"), 0.0);
    let gw_err = |code| m.value("portico_gateway_errors_total", &[("code", code)]);
    assert_eq!(gw_err("upstream_unreachable"), 3.0);
    assert_eq!(gw_err("upstream_timeout"), 1.0);
    assert_eq!(
        m.value(
            "portico_requests_total",
            &[
                ("route", "dead"),
                ("method", "GET"),
                ("status_class", "5xx"),
                ANON
            ]
        ),
        3.0
    );
    // No attempt got response headers.
    let (_, _, n) = m.histogram(
        "portico_upstream_request_duration_seconds",
        &[("upstream", "dead")],
    );
    assert_eq!(n, 0.0);

    // Two more failures reach outlier detection's 5: the target is ejected.
    for _ in 0..2 {
        assert_eq!(client::get(&gw.url("/dead")).await.status, 502);
    }
    assert_eq!(client::get(&gw.url("/dead")).await.status, 503);
    let m = scrape_until(admin, None, |m| {
        m.find(
            "portico_gateway_errors_total",
            &[("code", "no_healthy_target")],
        ) == Some(1.0)
    })
    .await;
    let t = [("upstream", "dead"), ("target", dead_t.as_str())];
    assert_eq!(m.value("portico_upstream_target_ejected", &t), 1.0);
    assert_eq!(m.value("portico_upstream_target_healthy", &t), 0.0);
    assert_eq!(
        m.value(
            "portico_upstream_errors_total",
            &[t[0], t[1], ("code", "upstream_unreachable")]
        ),
        5.0
    );

    // The admin view agrees.
    let ups = admin_get(admin, "/upstreams", None).await.json();
    let dead_up = ups["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "dead")
        .unwrap();
    let target = &dead_up["targets"][0];
    assert_eq!(target["address"], dead_t.as_str());
    assert_eq!(target["errors"]["upstream_unreachable"], 5);
    let ep = &target["endpoints"][0];
    assert_eq!(ep["state"], "ejected");
    assert_eq!(ep["ejected"], true);
    assert_eq!(ep["available"], false);
    assert!(ep["ejected_for_ms"].as_u64().unwrap() > 0, "{ep}");
    assert_eq!(ep["ejections"], 1);
}

fn reload_config(upstream: SocketAddr, answer: &str) -> String {
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\n  token: s3cret\nupstreams:\n  - name: up\n    targets: [{{address: '{upstream}'}}]\nroutes:\n  - name: fixed\n    match: {{path: /fixed}}\n    action: {{respond: {{status: 200, body: {answer}}}}}\n  - name: proxied\n    action: {{proxy: {{upstream: up}}}}\n"
    )
}

#[tokio::test]
async fn reloads_are_counted_and_post_reload_reports_validation_errors() {
    let up = upstream::fixed(200, "upstream").await;
    let path = temp_config("obs", "reload", &reload_config(up.addr, "one"));
    let gw = start_file(&path).await;
    let admin = gw.running.admin_addr();
    let tok = Some("s3cret");
    assert_eq!(client::get(&gw.url("/fixed")).await.text(), "one");
    let first_hash = admin_get(admin, "/status", tok).await.json()["config"]["hash"].clone();

    // A good reload through the admin API.
    std::fs::write(&path, reload_config(up.addr, "two")).unwrap();
    let r = admin_request(admin, "POST", "/reload", tok, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["changed"], true);
    let second_hash = body["config"]["hash"].clone();
    assert_ne!(second_hash, first_hash);
    assert_eq!(client::get(&gw.url("/fixed")).await.text(), "two");

    let m = scrape_until(admin, tok, |m| {
        m.find(
            "portico_request_duration_seconds_count",
            &[("route", "fixed")],
        ) == Some(2.0)
    })
    .await;
    // The route's counters survived the reload.
    assert_eq!(
        m.value(
            "portico_requests_total",
            &[
                ("route", "fixed"),
                ("method", "GET"),
                ("status_class", "2xx")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.value("portico_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(
        m.value("portico_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    assert_eq!(
        m.value(
            "portico_config_info",
            &[("hash", second_hash.as_str().unwrap())]
        ),
        1.0
    );

    // A bad reload: 422 with the validation errors; the old config serves.
    std::fs::write(
        &path,
        reload_config(up.addr, "three").replace("upstream: up}", "upstream: nope}"),
    )
    .unwrap();
    let r = admin_request(admin, "POST", "/reload", tok, &[]).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let e = r.json();
    assert_eq!(e["error"]["status"], 422);
    assert_eq!(e["error"]["code"], "invalid_config");
    assert!(e["error"]["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let first = &e["error"]["details"]["errors"][0];
    assert_eq!(first["path"], "routes[1].action.proxy.upstream");
    assert!(first["line"].as_u64().unwrap() > 0);
    assert!(first["message"].as_str().unwrap().contains("nope"));
    // SIGHUP's path counts the same way.
    std::fs::write(&path, "listeners: [\n").unwrap();
    assert!(gw.running.shared.reload().is_err());
    assert_eq!(client::get(&gw.url("/fixed")).await.text(), "two");

    let m = scrape(admin, tok).await;
    assert_eq!(
        m.value("portico_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(
        m.value("portico_config_reloads_total", &[("result", "failure")]),
        2.0
    );
    assert_eq!(m.value("portico_config_last_reload_successful", &[]), 0.0);
    assert_eq!(
        m.value(
            "portico_config_info",
            &[("hash", second_hash.as_str().unwrap())]
        ),
        1.0,
        "the configuration in force did not change"
    );

    // Back to a good file; an unchanged file is a successful no-op.
    std::fs::write(&path, reload_config(up.addr, "two")).unwrap();
    let r = admin_request(admin, "POST", "/reload", tok, &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["changed"].clone()),
        (200, false.into())
    );
    let status = admin_get(admin, "/status", tok).await.json();
    assert_eq!(status["reloads"]["success"], 2);
    assert_eq!(status["reloads"]["failure"], 2);
    assert_eq!(status["reloads"]["last_successful"], true);
    assert_eq!(status["config"]["hash"], second_hash);
}

#[tokio::test]
async fn the_config_hash_covers_the_files_the_configuration_names() {
    let path = temp_config(
        "obs",
        "hash-files",
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nroutes:\n  - name: r\n    policies:\n      - validate: {json_schema_file: schema.json}\n    action: {respond: {status: 200}}\n",
    );
    let schema = path.parent().unwrap().join("schema.json");
    std::fs::write(&schema, r#"{"type": "object"}"#).unwrap();
    let gw = start_file(&path).await;
    let admin = gw.running.admin_addr();
    let status = admin_get(admin, "/status", None).await.json();
    assert_eq!(
        status["config"]["files"],
        serde_json::json!([schema.display().to_string()])
    );
    let first = status["config"]["hash"].as_str().unwrap().to_string();

    // Only the named file changes: `POST /reload` reads it, the hash moves.
    std::fs::write(&schema, r#"{"type": "array"}"#).unwrap();
    let r = admin_request(admin, "POST", "/reload", None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["changed"], true);
    let second = r.json()["config"]["hash"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    let m = scrape(admin, None).await;
    assert_eq!(m.value("portico_config_info", &[("hash", &second)]), 1.0);
    assert_eq!(m.find("portico_config_info", &[("hash", &first)]), None);

    // Nothing changed since: a no-op with the same hash.
    let r = admin_request(admin, "POST", "/reload", None, &[]).await;
    assert_eq!(r.json()["changed"], false);
    assert_eq!(r.json()["config"]["hash"], second.as_str());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn admin_token_is_required_except_for_probes() {
    let up = upstream::fixed(200, "ok").await;
    let gw = gateway(&routes_config(
        up.addr,
        "  address: 127.0.0.1:0\n  token: right-token\n",
    ))
    .await;
    let admin = gw.running.admin_addr();
    for path in [
        "/status",
        "/metrics",
        "/routes",
        "/upstreams",
        "/config",
        "/openapi.json",
    ] {
        for token in [None, Some("wrong-token"), Some("right-token-")] {
            let r = admin_get(admin, path, token).await;
            assert_eq!(r.status, 401, "{path} with {token:?}");
            let e = r.json();
            assert_eq!(e["error"]["code"], "unauthorized");
            assert_eq!(e["error"]["status"], 401);
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer realm=\"portico-admin\"")
            );
            assert!(r.header("x-request-id").is_some());
        }
        let r = admin_get(admin, path, Some("right-token")).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    // Not `Bearer`: refused.
    let r = admin_request(
        admin,
        "GET",
        "/status",
        None,
        &[("authorization", "Basic right-token")],
    )
    .await;
    assert_eq!(r.status, 401);
    let r = admin_request(admin, "POST", "/reload", Some("wrong"), &[]).await;
    assert_eq!(r.status, 401);
    // Probes are open.
    let r = admin_get(admin, "/healthz", None).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["status"].clone()),
        (200, "ok".into())
    );
    assert_eq!(admin_get(admin, "/readyz", None).await.status, 200);
    // Unknown paths and wrong methods use the standard error body.
    let r = admin_get(admin, "/nope", Some("right-token")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "route_not_found");
    let r = admin_get(admin, "/reload", Some("right-token")).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    let r = admin_request(admin, "DELETE", "/status", Some("right-token"), &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.header("allow")),
        (405, Some("GET, HEAD"))
    );
    // Admin requests are not gateway traffic.
    let m = scrape(admin, Some("right-token")).await;
    assert_eq!(
        m.value("portico_gateway_errors_total", &[("code", "unauthorized")]),
        0.0
    );
}

#[test]
fn non_loopback_admin_without_token_is_a_config_error() {
    let text =
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nadmin:\n  address: 0.0.0.0:0\n";
    let loaded = portico::config::parse_str("admin.yaml", text, |_| None).unwrap();
    let errors = match portico::snapshot::compile(&loaded, None) {
        Ok(_) => panic!("accepted a non-loopback admin listener without a token"),
        Err(e) => e,
    };
    let e = &errors.0[0];
    assert_eq!(e.path, "admin.token");
    assert!(
        e.to_string().starts_with("admin.yaml:4:"),
        "located at the admin key: {e}"
    );
    assert!(e.message.contains("0.0.0.0:0"), "{e}");
    // With a token it compiles.
    let ok = format!("{text}  token: ${{ADMIN_TOKEN}}\n");
    let loaded = portico::config::parse_str("admin.yaml", &ok, |v| {
        (v == "ADMIN_TOKEN").then(|| "t".into())
    })
    .unwrap();
    assert!(portico::snapshot::compile(&loaded, None).is_ok());
}

#[tokio::test]
async fn readyz_turns_503_once_shutdown_starts() {
    let up = upstream::slow(Duration::from_millis(400)).await;
    let gw = gateway(&routes_config(up.addr, LOOPBACK_ADMIN)).await;
    let admin = gw.running.admin_addr();
    let r = admin_get(admin, "/readyz", None).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["status"].clone()),
        (200, "ready".into())
    );
    assert_eq!(
        admin_get(admin, "/status", None).await.json()["ready"],
        true
    );

    // A request in flight keeps the drain going while we look.
    let url = gw.url("/users/slow");
    let in_flight = tokio::spawn(async move { client::get(&url).await });
    assert!(super::support::eventually(Duration::from_secs(5), || up.hits() == 1).await);
    let shutdown = {
        let shared = gw.running.shared.clone();
        tokio::spawn(async move {
            portico::server::Running { shared }
                .shutdown(Duration::from_secs(5))
                .await
        })
    };
    assert!(
        super::support::eventually(Duration::from_secs(5), || gw.running.shared.is_draining())
            .await
    );
    let r = admin_get(admin, "/readyz", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "draining");
    assert_eq!(admin_get(admin, "/healthz", None).await.status, 200);
    let status = admin_get(admin, "/status", None).await.json();
    assert_eq!(
        (status["ready"].clone(), status["draining"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(in_flight.await.unwrap().status, 200);
    shutdown.await.unwrap();
    // Still answering (not ready) after the drain.
    assert_eq!(admin_get(admin, "/readyz", None).await.status, 503);
}

#[tokio::test]
async fn routes_and_upstreams_describe_the_compiled_config() {
    let up = upstream::fixed(200, "ok").await;
    let gw = gateway(&routes_config(up.addr, LOOPBACK_ADMIN)).await;
    let admin = gw.running.admin_addr();
    assert_eq!(client::get(&gw.url("/users/9")).await.status, 200);

    let routes = admin_get(admin, "/routes", None).await.json();
    let list = routes["routes"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let users = &list[0];
    assert_eq!(users["name"], "users");
    assert_eq!(users["action"], "proxy");
    assert_eq!(users["upstream"], "up");
    assert_eq!(users["match"]["path_prefix"], "/users");
    assert_eq!(users["listeners"], serde_json::json!(["main", "side"]));
    let fixed = &list[1];
    assert_eq!(
        (fixed["name"].clone(), fixed["action"].clone()),
        ("fixed".into(), "respond".into())
    );
    assert!(fixed["upstream"].is_null());

    let ups = admin_get(admin, "/upstreams", None).await.json();
    let u = &ups["upstreams"][0];
    assert_eq!(u["name"], "up");
    assert_eq!(u["protocol"], "http1");
    assert_eq!(u["balance"], "round_robin");
    let t = &u["targets"][0];
    assert_eq!(t["address"], up.addr.to_string());
    assert_eq!(t["weight"], 1);
    assert_eq!(t["attempts"], 1);
    let ep = &t["endpoints"][0];
    assert_eq!(ep["address"], up.addr.to_string());
    assert_eq!(ep["state"], "healthy");
    assert_eq!(ep["active_check"], "disabled");
    assert_eq!(ep["in_flight"], 0);
    assert!(ep["ejected_for_ms"].is_null());
    assert!(ep["latency_ewma_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(ep["idle_connections"], 1, "the pooled connection");

    let status = admin_get(admin, "/status", None).await.json();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].as_f64().unwrap() >= 0.0);
    assert!(status["started_at"].as_str().unwrap().ends_with('Z'));
    let names: Vec<&str> = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main", "side"]);
    assert_eq!(status["listeners"][0]["address"], gw.addr().to_string());
}

#[tokio::test]
async fn config_is_effective_and_redacted() {
    let up = upstream::fixed(200, "ok").await;
    let text = routes_config(up.addr, "  address: 127.0.0.1:0\n  token: admin-secret-123\n")
        .replace(
            "    action: {proxy: {upstream: up}}\n",
            "    policies:\n      - headers: {request: {set: {authorization: 'Bearer upstream-secret-456', x-env: prod}}}\n    action: {proxy: {upstream: up}}\n",
        );
    let gw = gateway(&text).await;
    let r = admin_get(gw.running.admin_addr(), "/config", Some("admin-secret-123")).await;
    assert_eq!(r.status, 200);
    let body = r.text();
    assert!(!body.contains("admin-secret-123"), "{body}");
    assert!(!body.contains("upstream-secret-456"), "{body}");
    let c = r.json();
    assert_eq!(c["admin"]["token"], "<redacted>");
    let set = &c["routes"][0]["policies"][0]["headers"]["request"]["set"];
    assert_eq!(set["authorization"], "<redacted>");
    assert_eq!(set["x-env"], "prod");
    // Defaults are filled in.
    assert_eq!(c["listeners"][0]["header_read_timeout"], "10s");
    assert_eq!(c["upstreams"][0]["pool"]["max_idle"], 256);
    assert_eq!(c["drain_timeout"], "10s");
}

#[tokio::test]
async fn openmetrics_on_request() {
    let up = upstream::fixed(200, "ok").await;
    let gw = gateway(&routes_config(up.addr, LOOPBACK_ADMIN)).await;
    let admin = gw.running.admin_addr();
    assert_eq!(client::get(&gw.url("/fixed")).await.status, 201);
    let r = admin_request(
        admin,
        "GET",
        "/metrics",
        None,
        &[(
            "accept",
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        )],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = r.text();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(text.matches("# EOF").count(), 1);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.contains(&"# TYPE portico_requests counter"));
    assert!(lines.contains(&"# TYPE portico_build info"));
    assert!(lines.contains(&"# TYPE portico_request_duration_seconds histogram"));
    assert!(lines
        .iter()
        .any(|l| l
            .starts_with("portico_request_duration_seconds_bucket{route=\"fixed\",le=\"+Inf\"} ")));
    // Every sample belongs to the family declared before it.
    let mut family = "";
    for l in &lines {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap();
        } else if !l.starts_with('#') {
            assert!(l.starts_with(family), "{l} outside {family}");
        }
    }
}

#[tokio::test]
async fn openapi_lists_every_endpoint_and_each_answers() {
    let up = upstream::fixed(200, "ok").await;
    let gw = gateway(&routes_config(
        up.addr,
        "  address: 127.0.0.1:0\n  token: t\n",
    ))
    .await;
    let admin = gw.running.admin_addr();
    let r = admin_get(admin, "/openapi.json", Some("t")).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), portico::admin::ENDPOINTS.len());
    for ep in portico::admin::ENDPOINTS {
        let op = &paths
            .get(ep.path)
            .unwrap_or_else(|| panic!("{} is not documented", ep.path))[ep.method.to_lowercase()];
        assert!(
            op.is_object(),
            "{} {} is not documented",
            ep.method,
            ep.path
        );
        if ep.method == "POST" {
            continue; // /reload: exercised by the reload test
        }
        // A path param gets a value every configuration has.
        let path = ep.path.replace("{id}", "anonymous");
        let r = admin_request(admin, ep.method, &path, Some("t"), &[]).await;
        assert_eq!(r.status, 200, "{} {}: {}", ep.method, path, r.text());
        let documented = op["responses"]["200"]["content"]
            .as_object()
            .unwrap()
            .keys()
            .any(|ct| {
                r.header("content-type")
                    .unwrap()
                    .starts_with(ct.split(';').next().unwrap())
            });
        assert!(
            documented,
            "{} answers an undocumented content type",
            ep.path
        );
    }
}
