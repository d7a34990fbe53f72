//! Consumers and the `auth` policy's API-key and mTLS methods through a real
//! gateway: keys from a header or a query parameter, wrong and revoked
//! keys, anonymous access, consumer headers (set by the gateway, never by
//! the client; custom names included), route groups, per-consumer metrics,
//! failure counters and the admin API's usage endpoint; `portico hash-key`.

use super::support::metrics::{admin_get, scrape, scrape_until, Metrics};
use super::support::tls::{self as t, ClientOpts, Pki, H1};
use super::support::{client, gateway, upstream};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

const KEY_APP: &str = "app-key-0123456789abcdef";
const KEY_OLD: &str = "old-key-0123456789abcdef";
const KEY_PARTNER: &str = "partner-key-0123456789ab";

fn sha(k: &str) -> String {
    portico::auth::sha256_hex(k.as_bytes())
}

fn config(up: std::net::SocketAddr) -> String {
    format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
consumers:
  - id: app
    groups: [mobile, internal]
    plan: pro
    credentials:
      api_keys: [{{sha256: {app}}}, {{sha256: {old}, revoked: true}}]
  - id: partner
    groups: [partners]
    credentials:
      api_keys: [{{sha256: {partner}}}]
upstreams:
  - name: up
    targets: [{{address: '{up}'}}]
route_groups:
  - name: keyed
    policies:
      - auth: {{methods: [{{api_key: {{header: x-api-key, query: api_key}}}}]}}
routes:
  - name: keyed
    group: keyed
    match: {{path_prefix: /keyed}}
    action: {{proxy: {{upstream: up}}}}
  - name: keyed-too
    group: keyed
    match: {{path_prefix: /also}}
    action: {{proxy: {{upstream: up}}}}
  - name: open
    match: {{path_prefix: /open}}
    policies:
      - auth: {{methods: [{{api_key: {{}}}}], anonymous: true, strip_credentials: false}}
    action: {{proxy: {{upstream: up}}}}
  - name: public
    match: {{path_prefix: /public}}
    action: {{proxy: {{upstream: up}}}}
"#,
        app = sha(KEY_APP),
        old = sha(KEY_OLD),
        partner = sha(KEY_PARTNER),
    )
}

async fn req(url: String, headers: &[(&str, &str)]) -> client::Reply {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    client::send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// The echo upstream's view of a header (first value).
fn seen(r: &client::Reply, name: &str) -> Option<String> {
    r.json()["headers"][name][0].as_str().map(String::from)
}

#[tokio::test]
async fn api_keys_identify_consumers_from_a_header_or_the_query() {
    let up = upstream::echo().await;
    let gw = gateway(&config(up.addr)).await;

    let r = req(gw.url("/keyed/a"), &[("x-api-key", KEY_APP)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-consumer-id").as_deref(), Some("app"));
    assert_eq!(
        seen(&r, "x-consumer-groups").as_deref(),
        Some("mobile,internal")
    );
    assert_eq!(seen(&r, "x-consumer-plan").as_deref(), Some("pro"));
    assert_eq!(seen(&r, "x-auth-method").as_deref(), Some("api_key"));
    // The credential is removed before forwarding.
    assert_eq!(seen(&r, "x-api-key"), None);

    let r = req(gw.url("/keyed/b?x=1&api_key=") + KEY_PARTNER + "&y=2", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-consumer-id").as_deref(), Some("partner"));
    assert_eq!(seen(&r, "x-consumer-plan"), None);
    assert_eq!(r.json()["query"], "x=1&y=2");

    // The group's policy applies to every member route.
    let r = req(gw.url("/also"), &[]).await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn wrong_revoked_and_missing_keys_are_refused_with_a_challenge() {
    let up = upstream::echo().await;
    let gw = gateway(&config(up.addr)).await;

    for (headers, reason) in [
        (vec![], "missing"),
        (vec![("x-api-key", "not-a-key")], "unknown_key"),
        (vec![("x-api-key", KEY_OLD)], "revoked"),
    ] {
        let r = req(gw.url("/keyed"), &headers).await;
        assert_eq!(r.status, 401, "{reason}: {}", r.text());
        assert_eq!(
            r.header("www-authenticate"),
            Some("ApiKey realm=\"portico\"")
        );
        let body = r.json();
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(body["error"]["status"], 401);
        // The client is not told which key was close or revoked.
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(!msg.contains("revoked"), "{msg}");
    }
    assert_eq!(up.hits(), 0);

    let m = scrape(gw.running.admin_addr(), None).await;
    for reason in ["missing", "unknown_key", "revoked"] {
        assert_eq!(
            m.value(
                "portico_auth_failures_total",
                &[
                    ("route", "keyed"),
                    ("method", "api_key"),
                    ("reason", reason)
                ]
            ),
            1.0,
            "{reason}"
        );
    }
}

#[tokio::test]
async fn consumer_headers_sent_by_the_client_never_reach_the_upstream() {
    let up = upstream::echo().await;
    let gw = gateway(&config(up.addr)).await;
    let spoof = [
        ("x-consumer-id", "admin"),
        ("x-consumer-groups", "root"),
        ("x-consumer-plan", "enterprise"),
        ("x-auth-method", "mtls"),
    ];
    // A route without any auth policy: removed all the same.
    let r = req(gw.url("/public"), &spoof).await;
    assert_eq!(r.status, 200);
    for (name, _) in spoof {
        assert_eq!(seen(&r, name), None, "{name}");
    }
    // With a key: the gateway's values, not the client's.
    let mut with_key = spoof.to_vec();
    with_key.push(("x-api-key", KEY_PARTNER));
    let r = req(gw.url("/keyed"), &with_key).await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert_eq!(h["x-consumer-id"], serde_json::json!(["partner"]));
    assert_eq!(h["x-consumer-groups"], serde_json::json!(["partners"]));
    assert_eq!(h["x-consumer-plan"], Value::Null);
    assert_eq!(h["x-auth-method"], serde_json::json!(["api_key"]));
}

#[tokio::test]
async fn anonymous_access_and_metrics_by_consumer() {
    let up = upstream::echo().await;
    let gw = gateway(&config(up.addr)).await;

    // The anonymous caller is passed upstream as the consumer `anonymous`
    // (no configured consumer can have that id), whatever the client says.
    let r = req(
        gw.url("/open"),
        &[
            ("x-consumer-id", "app"),
            ("x-consumer-groups", "mobile"),
            ("x-consumer-plan", "pro"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(seen(&r, "x-auth-method").as_deref(), Some("anonymous"));
    assert_eq!(
        r.json()["headers"]["x-consumer-id"],
        serde_json::json!(["anonymous"])
    );
    assert_eq!(seen(&r, "x-consumer-groups"), None);
    assert_eq!(seen(&r, "x-consumer-plan"), None);
    // A present credential still decides: a bad key is refused, not
    // downgraded to anonymous.
    let r = req(gw.url("/open"), &[("x-api-key", "bad")]).await;
    assert_eq!(r.status, 401);
    // `strip_credentials: false` forwards the key.
    let r = req(gw.url("/open"), &[("x-api-key", KEY_APP)]).await;
    assert_eq!(seen(&r, "x-api-key").as_deref(), Some(KEY_APP));
    let r = req(gw.url("/open"), &[("x-api-key", KEY_APP)]).await;
    assert_eq!(r.status, 200);

    // A request is counted once its response is over, a moment after the
    // client has read it: polled until all four are.
    let n = |m: &Metrics, consumer: &str, class: &str| {
        m.find(
            "portico_requests_total",
            &[
                ("route", "open"),
                ("consumer", consumer),
                ("status_class", class),
            ],
        )
    };
    scrape_until(gw.running.admin_addr(), None, |m| {
        n(m, "anonymous", "2xx") == Some(1.0)
            && n(m, "anonymous", "4xx") == Some(1.0)
            && n(m, "app", "2xx") == Some(2.0)
    })
    .await;

    let u = admin_get(gw.running.admin_addr(), "/consumers/app/usage", None)
        .await
        .json();
    assert_eq!(u["consumer"]["id"], "app");
    assert_eq!(u["consumer"]["plan"], "pro");
    assert_eq!(u["total"], 2);
    assert_eq!(u["windows"]["1m"], 2);
    assert_eq!(u["routes"][0]["route"], "open");
    assert_eq!(u["routes"][0]["windows"]["5m"], 2);
    let partner = admin_get(gw.running.admin_addr(), "/consumers/partner/usage", None)
        .await
        .json();
    assert_eq!(partner["total"], 0);
    let missing = admin_get(gw.running.admin_addr(), "/consumers/nobody/usage", None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "route_not_found");
}

#[tokio::test]
async fn custom_consumer_header_names_are_set_and_stripped() {
    let up = upstream::echo().await;
    let yaml = config(up.addr).replacen(
        "consumers:\n",
        "auth:\n  consumer_headers: {id: X-Client-Id, groups: x-client-groups, plan: x-client-plan, method: x-client-auth}\nconsumers:\n",
        1,
    );
    let gw = gateway(&yaml).await;
    let spoof = [
        ("x-client-id", "admin"),
        ("X-Client-Groups", "root"),
        ("x-client-plan", "enterprise"),
        ("x-client-auth", "mtls"),
    ];
    // A route without any auth policy: the client's copies are removed.
    let r = req(gw.url("/public"), &spoof).await;
    assert_eq!(r.status, 200);
    for (name, _) in spoof {
        assert_eq!(seen(&r, &name.to_ascii_lowercase()), None, "{name}");
    }
    // With a key: the gateway's values under the configured names, each
    // once, and nothing under the default names.
    let mut with_key = spoof.to_vec();
    with_key.push(("x-api-key", KEY_APP));
    let r = req(gw.url("/keyed"), &with_key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(h["x-client-id"], serde_json::json!(["app"]));
    assert_eq!(h["x-client-groups"], serde_json::json!(["mobile,internal"]));
    assert_eq!(h["x-client-plan"], serde_json::json!(["pro"]));
    assert_eq!(h["x-client-auth"], serde_json::json!(["api_key"]));
    for name in [
        "x-consumer-id",
        "x-consumer-groups",
        "x-consumer-plan",
        "x-auth-method",
    ] {
        assert_eq!(seen(&r, name), None, "{name}");
    }
    // A consumer without a plan: the client's plan header is not left over.
    let mut partner = spoof.to_vec();
    partner.push(("x-api-key", KEY_PARTNER));
    let r = req(gw.url("/keyed"), &partner).await;
    assert_eq!(seen(&r, "x-client-id").as_deref(), Some("partner"));
    assert_eq!(seen(&r, "x-client-plan"), None);
    // Anonymous: the id `anonymous` under the configured name.
    let r = req(gw.url("/open"), &spoof).await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert_eq!(h["x-client-id"], serde_json::json!(["anonymous"]));
    assert_eq!(h["x-client-auth"], serde_json::json!(["anonymous"]));
    assert_eq!(h["x-client-groups"], Value::Null);
    assert_eq!(h["x-client-plan"], Value::Null);
}

#[test]
fn consumer_header_names_are_checked() {
    let errors = |auth: &str, route_auth: &str| {
        let yaml = format!(
            "listeners: [{{name: main, address: '127.0.0.1:0'}}]\nauth:\n  consumer_headers: {auth}\nconsumers:\n  - id: a\n    credentials: {{api_keys: [{{sha256: {}}}]}}\nroutes:\n  - name: r\n    policies:\n      - auth: {{methods: [{{api_key: {{}}}}]{route_auth}}}\n    action: {{respond: {{}}}}\n",
            sha(KEY_APP)
        );
        let loaded = portico::config::parse_str("gw.yaml", &yaml, |_| None).unwrap();
        match portico::snapshot::compile(&loaded, None) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    for (auth, route_auth, want) in [
        (
            "{id: 'bad name'}",
            "",
            "gw.yaml:3:",
        ),
        (
            "{id: 'bad name'}",
            "",
            "auth.consumer_headers.id: `bad name` is not a valid header name",
        ),
        (
            "{id: authorization}",
            "",
            "auth.consumer_headers.id: `authorization` is a header the gateway manages",
        ),
        (
            "{groups: Host}",
            "",
            "auth.consumer_headers.groups: `Host` is a header the gateway manages",
        ),
        (
            "{plan: X-Consumer-Id}",
            "",
            "auth.consumer_headers.plan: `X-Consumer-Id` is already the name of `auth.consumer_headers.id`",
        ),
        (
            "{id: x-who}",
            ", claims_to_headers: {sub: x-who}",
            "routes[0].policies[0].auth.claims_to_headers.sub: `x-who` is one of `auth.consumer_headers`",
        ),
        (
            "{}",
            ", claims_to_headers: {sub: x-auth-method}",
            "routes[0].policies[0].auth.claims_to_headers.sub: `x-auth-method` is one of `auth.consumer_headers`",
        ),
    ] {
        let got = errors(auth, route_auth);
        assert!(got.contains(want), "{auth} {route_auth}: want {want}\ngot {got}");
    }
    assert_eq!(
        errors(
            "{id: x-who, method: x-how}",
            ", claims_to_headers: {sub: x-consumer-id}"
        ),
        "",
        "the default names are free once renamed"
    );
}

#[tokio::test]
async fn reload_revokes_and_adds_keys() {
    let up = upstream::echo().await;
    let dir = std::env::temp_dir().join(format!("portico-auth-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gw.yaml");
    std::fs::write(&path, config(up.addr)).unwrap();
    let gw = super::support::start_file(&path).await;
    let r = req(gw.url("/keyed"), &[("x-api-key", KEY_APP)]).await;
    assert_eq!(r.status, 200);
    // Revoke the key (as an operator would) and reload.
    let text = config(up.addr).replace(
        &format!("{{sha256: {}}}", sha(KEY_APP)),
        &format!("{{sha256: {}, revoked: true}}", sha(KEY_APP)),
    );
    std::fs::write(&path, text).unwrap();
    gw.running.shared.reload().expect("reload");
    let r = req(gw.url("/keyed"), &[("x-api-key", KEY_APP)]).await;
    assert_eq!(r.status, 401);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn client_certificates_identify_consumers() {
    let pki = Pki::new("Consumer CA");
    let server = pki.issue("server", "server", &["mtls.test"]);
    let known = pki.issue("known", "svc-billing", &["billing.internal"]);
    let by_fp = pki.issue("byfp", "svc-feed", &["feed.internal"]);
    let stranger = pki.issue("stranger", "svc-unknown", &["unknown.internal"]);
    let fp = portico::auth::sha256_hex(&by_fp.der);
    let up = upstream::echo().await;
    let yaml = format!(
        r#"listeners:
  - name: main
    address: 127.0.0.1:0
    tls:
      certificates:
        - {{cert: '{cert}', key: '{key}'}}
      client_auth: {{mode: optional, ca: '{ca}'}}
consumers:
  - id: billing
    credentials: {{mtls: [{{san: 'DNS:billing.internal'}}]}}
  - id: feed
    credentials: {{mtls: [{{fingerprint: '{fp}'}}]}}
upstreams:
  - name: up
    targets: [{{address: '{up}'}}]
routes:
  - name: svc
    policies:
      - auth: {{methods: [{{mtls: {{}}}}]}}
    action: {{proxy: {{upstream: up}}}}
"#,
        cert = server.cert_path,
        key = server.key_path,
        ca = pki.ca_path(),
        up = up.addr
    );
    let gw = gateway(&yaml).await;
    let addr = gw.addr();
    let r = call(addr, Some(&known)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&r, "x-consumer-id").as_deref(), Some("billing"));
    assert_eq!(seen(&r, "x-auth-method").as_deref(), Some("mtls"));
    let r = call(addr, Some(&by_fp)).await;
    assert_eq!(seen(&r, "x-consumer-id").as_deref(), Some("feed"));
    // A valid certificate that names no consumer, and no certificate.
    let r = call(addr, Some(&stranger)).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), None);
    let r = call(addr, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
}

async fn call(addr: std::net::SocketAddr, leaf: Option<&t::Leaf>) -> client::Reply {
    let opts = ClientOpts {
        client_cert: leaf,
        ..Default::default()
    };
    let s = t::connect(addr, Some("mtls.test"), &opts).await.unwrap();
    H1::over(s).await.get("mtls.test", "/x", &[]).await
}

#[tokio::test]
async fn identity_config_errors_are_located() {
    let bad = r#"listeners: [{name: main, address: '127.0.0.1:0'}]
consumers:
  - id: a
    credentials:
      api_keys: [{sha256: nothex}]
  - id: a
  - id: anonymous
routes:
  - name: r
    group: nope
    policies:
      - auth: {methods: [{api_key: {header: 'bad header'}}, {}]}
    action: {respond: {}}
"#;
    let loaded = portico::config::parse_str("gw.yaml", bad, |_| None).unwrap();
    let errs = portico::snapshot::compile(&loaded, None)
        .err()
        .expect("invalid")
        .to_string();
    for want in [
        "gw.yaml:5:",
        "consumers[0].credentials.api_keys[0].sha256: must be 64 hex digits",
        "consumers[1].id: duplicate consumer id `a`",
        "consumers[2].id: must be non-empty and not `anonymous`",
        "routes[0].group: no route group is named `nope`",
        "routes[0].policies[0].auth.methods[0].api_key.header: `bad header` is not a valid header name",
        "routes[0].policies[0].auth.methods[1]: a method names exactly one of",
    ] {
        assert!(errs.contains(want), "missing `{want}` in:\n{errs}");
    }
    // `anonymous` is the id anonymous callers get: reserved, with its line.
    let line = errs
        .lines()
        .find(|l| l.contains("consumers[2].id"))
        .unwrap();
    assert!(line.contains("gw.yaml:7:"), "{line}");
    // A plaintext key written in the file is refused; from the environment
    // it is accepted.
    let plain = "listeners: [{name: main, address: '127.0.0.1:0'}]\nconsumers:\n  - id: a\n    credentials:\n      api_keys: [{key: written-in-the-file-1234}]\nroutes: [{name: r, action: {respond: {}}}]\n";
    let loaded = portico::config::parse_str("gw.yaml", plain, |_| None).unwrap();
    let errs = portico::snapshot::compile(&loaded, None)
        .err()
        .unwrap()
        .to_string();
    assert!(errs.contains("must come from the environment"), "{errs}");
    let env = plain.replace("written-in-the-file-1234", "${APP_KEY}");
    let loaded = portico::config::parse_str("gw.yaml", &env, |v| {
        (v == "APP_KEY").then(|| "from-the-environment-123".to_string())
    })
    .unwrap();
    let snap = portico::snapshot::compile(&loaded, None).expect("valid");
    let d = portico::auth::parse_sha256_hex(&sha("from-the-environment-123")).unwrap();
    assert_eq!(&*snap.consumers.api_key(&d).unwrap().1.id, "a");
}

#[test]
fn hash_key_prints_the_sha256_of_stdin_or_a_new_key() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_portico");
    let mut child = Command::new(bin)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"my-secret-key\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        sha("my-secret-key")
    );
    let out = Command::new(bin)
        .args(["hash-key", "--generate"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .next()
        .unwrap()
        .strip_prefix("key:")
        .unwrap()
        .trim();
    let hash = text
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .trim();
    assert_eq!(key.len(), 32);
    assert_eq!(hash, sha(key));
    let bad = Command::new(bin).args(["hash-key", "x"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
