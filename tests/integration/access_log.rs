//! JSON access logs through a real gateway: every field of real requests'
//! lines, sampling, dropping (never blocking) under a stalled writer,
//! reopening after a rename (SIGUSR1), reloads and configuration errors.

use super::support::metrics::scrape;
use super::support::{client, eventually, gateway, upstream, TestGateway};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("portico-access-log-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(up: SocketAddr, dead: SocketAddr, access_log: &str) -> String {
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\naccess_log:\n{access_log}upstreams:\n  - name: up\n    targets: [{{address: '{up}'}}]\n  - name: dead\n    targets: [{{address: '{dead}'}}]\n    retries: {{attempts: 0}}\nroutes:\n  - name: api\n    match: {{path_prefix: /api}}\n    action: {{proxy: {{upstream: up}}}}\n  - name: broken\n    match: {{path_prefix: /broken}}\n    action: {{proxy: {{upstream: dead}}}}\n"
    )
}

fn lines_written(gw: &TestGateway) -> u64 {
    gw.running
        .shared
        .metrics
        .access_log
        .lines
        .load(Ordering::Relaxed)
}

fn dropped(gw: &TestGateway) -> u64 {
    gw.running
        .shared
        .metrics
        .access_log
        .dropped
        .load(Ordering::Relaxed)
}

/// The file's lines, each parsed as JSON (panics on anything else).
fn read_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// Waits until the file holds `n` lines (the writer flushes when idle).
async fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    let ok = eventually(Duration::from_secs(5), || read_lines(path).len() >= n).await;
    let lines = read_lines(path);
    assert!(ok, "expected {n} lines, got {}: {lines:?}", lines.len());
    lines
}

fn by_path<'a>(lines: &'a [Value], path: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["path"] == path)
        .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
}

fn check_time(v: &Value, before: SystemTime, after: SystemTime) {
    // 2024-05-01T12:34:56.789Z
    let s = v["time"].as_str().expect("time is a string");
    assert_eq!(s.len(), 24, "{s}");
    assert!(
        s.ends_with('Z') && &s[10..11] == "T" && &s[19..20] == ".",
        "{s}"
    );
    let fmt = |t: SystemTime| {
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        secs / 86_400
    };
    // Same UTC day as the test (or the next, around midnight).
    let days = |y: i64, m: i64, d: i64| {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        (era * 146_097 + doe - 719_468) as u64
    };
    let (y, m, d) = (
        s[0..4].parse().unwrap(),
        s[5..7].parse().unwrap(),
        s[8..10].parse().unwrap(),
    );
    let day = days(y, m, d);
    assert!(day >= fmt(before) && day <= fmt(after), "{s}");
    let hms: u64 = s[11..13].parse::<u64>().unwrap() * 3600
        + s[14..16].parse::<u64>().unwrap() * 60
        + s[17..19].parse::<u64>().unwrap();
    let secs = day * 86_400 + hms;
    let lo = before
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hi = after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(secs >= lo && secs <= hi, "{s} not within the test");
}

fn ms(v: &Value, key: &str, max: f64) -> f64 {
    let n = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number: {v}"));
    assert!(n >= 0.0 && n < max, "{key} = {n}");
    n
}

#[tokio::test]
async fn lines_carry_every_field_for_proxied_unmatched_and_failed_requests() {
    let dir = temp_dir("fields");
    let log = dir.join("access.log");
    let up = upstream::echo().await;
    let dead = upstream::closed_port().await;
    let gw = gateway(&config(
        up.addr,
        dead,
        &format!("  path: {}\n", log.display()),
    ))
    .await;
    let before = SystemTime::now();
    let t0 = Instant::now();

    let r = client::send(
        Request::post(gw.url("/api/items?x=1"))
            .header("user-agent", "tester/1.0 \"quoted\"")
            .header("x-request-id", "req-123")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let proxied_len = r.body.len();
    let r404 = client::get(&gw.url("/nowhere")).await;
    assert_eq!(r404.status, 404);
    let r502 = client::get(&gw.url("/broken")).await;
    assert_eq!(r502.status, 502, "{}", r502.text());
    assert_eq!(r502.json()["error"]["code"], "upstream_unreachable");
    let wall = t0.elapsed().as_secs_f64() * 1000.0;

    let lines = wait_lines(&log, 3).await;
    let after = SystemTime::now();
    assert_eq!(lines.len(), 3, "{lines:?}");

    let p = by_path(&lines, "/api/items?x=1");
    check_time(p, before, after);
    assert_eq!(p["request_id"], "req-123");
    assert_eq!(p["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(p["client_ip"], "127.0.0.1");
    assert_eq!(p["consumer"], "anonymous");
    assert_eq!(p["route"], "api");
    assert_eq!(p["method"], "POST");
    assert_eq!(p["status"], 200);
    assert_eq!(p["upstream"], up.addr.to_string());
    let total = ms(p, "duration_ms", wall);
    let upstream_ms = ms(p, "upstream_ms", wall);
    assert!(upstream_ms <= total, "{p}");
    assert_eq!(p["bytes_in"], 5);
    assert_eq!(p["bytes_out"], proxied_len as u64);
    assert_eq!(p["user_agent"], "tester/1.0 \"quoted\"");
    assert!(p.get("error").is_none(), "{p}");
    assert_eq!(
        p.as_object().unwrap().len(),
        15,
        "every field but error: {p}"
    );

    let n = by_path(&lines, "/nowhere");
    check_time(n, before, after);
    assert_eq!(n["request_id"].as_str(), r404.header("x-request-id"));
    assert_eq!(n["request_id"].as_str().unwrap().len(), 32);
    assert_eq!(n["client_ip"], "127.0.0.1");
    assert_eq!(n["route"], "(unmatched)");
    assert_eq!(n["method"], "GET");
    assert_eq!(n["status"], 404);
    assert_eq!(n["error"], "route_not_found");
    assert_eq!(n["bytes_in"], 0);
    assert_eq!(n["bytes_out"], r404.body.len() as u64);
    ms(n, "duration_ms", wall);
    for absent in ["trace_id", "upstream", "upstream_ms", "user_agent"] {
        assert!(n.get(absent).is_none(), "{absent} in {n}");
    }

    let b = by_path(&lines, "/broken");
    assert_eq!(b["route"], "broken");
    assert_eq!(b["status"], 502);
    assert_eq!(b["error"], "upstream_unreachable");
    assert_eq!(b["upstream"], dead.to_string());
    assert!(
        b.get("upstream_ms").is_none(),
        "no connection, no time: {b}"
    );
    assert_eq!(b["request_id"].as_str(), r502.header("x-request-id"));

    assert_eq!(lines_written(&gw), 3);
    assert_eq!(dropped(&gw), 0);
    let m = scrape(gw.running.admin_addr(), None).await;
    assert_eq!(m.value("portico_access_log_lines_total", &[]), 3.0);
    assert_eq!(m.value("portico_access_log_dropped_total", &[]), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn configured_fields_only_and_in_fixed_order() {
    let dir = temp_dir("subset");
    let log = dir.join("access.log");
    let up = upstream::fixed(200, "ok").await;
    let dead = upstream::closed_port().await;
    let gw = gateway(&config(
        up.addr,
        dead,
        &format!(
            "  path: {}\n  fields: [status, route, error]\n",
            log.display()
        ),
    ))
    .await;
    assert_eq!(client::get(&gw.url("/api")).await.status, 200);
    assert_eq!(client::get(&gw.url("/x")).await.status, 404);
    wait_lines(&log, 2).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(
        got,
        [
            r#"{"route":"api","status":200}"#,
            r#"{"route":"(unmatched)","status":404,"error":"route_not_found"}"#,
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sample_zero_logs_errors_only() {
    let dir = temp_dir("sample");
    let log = dir.join("access.log");
    let up = upstream::fixed(200, "ok").await;
    let dead = upstream::closed_port().await;
    let gw = gateway(&config(
        up.addr,
        dead,
        &format!("  path: {}\n  sample: 0\n", log.display()),
    ))
    .await;
    let c = client::new();
    for i in 0..30 {
        let r = c
            .request(
                Request::get(gw.url(&format!("/api/{i}")))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
    }
    for _ in 0..3 {
        assert_eq!(client::get(&gw.url("/nope")).await.status, 404);
    }
    assert_eq!(client::get(&gw.url("/broken")).await.status, 502);
    let lines = wait_lines(&log, 4).await;
    // Anything sampled would have been queued before the errors.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = if read_lines(&log).len() != lines.len() {
        read_lines(&log)
    } else {
        lines
    };
    let statuses: Vec<u64> = lines
        .iter()
        .map(|l| l["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [404, 404, 404, 502]);
    assert_eq!(lines_written(&gw), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn half_sampling_logs_some_successes() {
    let dir = temp_dir("half");
    let log = dir.join("access.log");
    let up = upstream::fixed(200, "ok").await;
    let dead = upstream::closed_port().await;
    let gw = gateway(&config(
        up.addr,
        dead,
        &format!("  path: {}\n  sample: 0.5\n", log.display()),
    ))
    .await;
    let c = client::new();
    for i in 0..200 {
        let r = c
            .request(
                Request::get(gw.url(&format!("/api/{i}")))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = read_lines(&log).len();
    // Binomial(200, 0.5): outside 50..=150 has probability < 1e-12.
    assert!((50..=150).contains(&n), "{n} of 200 logged");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The log is a FIFO that a reader holds open but never reads: the writer
/// thread blocks on it, the buffer fills, and requests keep completing
/// while lines are dropped and counted.
#[tokio::test]
async fn a_stalled_writer_drops_and_counts_instead_of_blocking() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = temp_dir("fifo");
    let fifo = dir.join("access.fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    // A reader, so that the gateway's open for writing does not wait.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let up = upstream::fixed(200, "ok").await;
    let dead = upstream::closed_port().await;
    let gw = gateway(&config(
        up.addr,
        dead,
        &format!("  path: {}\n  buffer: 4\n", fifo.display()),
    ))
    .await;
    // 4 KiB lines: the pipe (64 KiB) and the writer's buffer (64 KiB) hold
    // about 32 of them.
    let ua = "u".repeat(4096);
    let c = client::new();
    let t0 = Instant::now();
    let n = 300;
    for i in 0..n {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.request(
                Request::get(gw.url(&format!("/api/{i}")))
                    .header("user-agent", ua.as_str())
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
        )
        .await
        .expect("a request never waits for the access log")
        .unwrap();
        assert_eq!(r.status(), 200);
        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
    let ok = eventually(Duration::from_secs(5), || {
        dropped(&gw) + lines_written(&gw) >= n - 4 - 1
    })
    .await;
    let (written, lost) = (lines_written(&gw), dropped(&gw));
    assert!(ok, "written {written}, dropped {lost}");
    assert!(written < 40, "the pipe cannot hold {written} lines");
    assert!(lost >= n - 45, "dropped {lost}");
    let m = scrape(gw.running.admin_addr(), None).await;
    assert_eq!(
        m.value("portico_access_log_dropped_total", &[]),
        dropped(&gw) as f64
    );
    drop(reader);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What SIGUSR1 does: after the file was renamed, reopening sends the next
/// lines to a new file at the configured path.
#[tokio::test]
async fn reopen_after_rename_writes_to_a_new_file() {
    let dir = temp_dir("reopen");
    let log = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let up = upstream::fixed(200, "ok").await;
    let dead = upstream::closed_port().await;
    let gw = gateway(&config(
        up.addr,
        dead,
        &format!("  path: {}\n", log.display()),
    ))
    .await;
    for i in 0..2 {
        assert_eq!(
            client::get(&gw.url(&format!("/api/old{i}"))).await.status,
            200
        );
    }
    wait_lines(&log, 2).await;
    std::fs::rename(&log, &rotated).unwrap();
    // Still written to the renamed file until reopened.
    assert_eq!(client::get(&gw.url("/api/old2")).await.status, 200);
    wait_lines(&rotated, 3).await;
    assert!(!log.exists());

    assert!(gw.running.shared.access_log.reopen());
    for i in 0..3 {
        assert_eq!(
            client::get(&gw.url(&format!("/api/new{i}"))).await.status,
            200
        );
    }
    let new = wait_lines(&log, 3).await;
    let paths: Vec<&str> = new.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/api/new0", "/api/new1", "/api/new2"]);
    let old = read_lines(&rotated);
    let paths: Vec<&str> = old.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/api/old0", "/api/old1", "/api/old2"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload that changes the path writes to the new file; one that removes
/// `access_log` stops logging.
#[tokio::test]
async fn reload_changes_the_destination() {
    let dir = temp_dir("reload");
    let (a, b) = (dir.join("a.log"), dir.join("b.log"));
    let up = upstream::fixed(200, "ok").await;
    let dead = upstream::closed_port().await;
    let file = dir.join("portico.yaml");
    let write = |al: &str| std::fs::write(&file, config(up.addr, dead, al)).unwrap();
    write(&format!("  path: {}\n", a.display()));
    let loaded = portico::config::load_file(&file).unwrap();
    let snap = portico::snapshot::compile(&loaded, None).unwrap();
    let running = portico::server::start(snap, Some(file.clone()))
        .await
        .unwrap();
    let url = |p: &str| format!("http://{}{p}", running.addr("main"));

    assert_eq!(client::get(&url("/api/1")).await.status, 200);
    wait_lines(&a, 1).await;
    write(&format!("  path: {}\n  fields: [path]\n", b.display()));
    running.shared.reload().unwrap();
    assert_eq!(client::get(&url("/api/2")).await.status, 200);
    let lines = wait_lines(&b, 1).await;
    assert_eq!(lines[0], serde_json::json!({"path": "/api/2"}));
    assert_eq!(read_lines(&a).len(), 1);

    // An unwritable destination rejects the reload; logging goes on.
    write("  path: /nonexistent-dir/x/access.log\n");
    let e = running.shared.reload().unwrap_err();
    assert!(e.contains("/nonexistent-dir/x/access.log"), "{e}");
    assert_eq!(client::get(&url("/api/3")).await.status, 200);
    wait_lines(&b, 2).await;

    std::fs::write(
        &file,
        config(up.addr, dead, "").replace("access_log:\n", ""),
    )
    .unwrap();
    running.shared.reload().unwrap();
    assert_eq!(client::get(&url("/api/4")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(read_lines(&b).len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

fn errors(access_log: &str) -> Vec<(String, String)> {
    let yaml = format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\naccess_log:\n{access_log}routes:\n  - name: r\n    action: {{respond: {{status: 200}}}}\n"
    );
    let loaded = match portico::config::parse_str("t.yaml", &yaml, |_| None) {
        Ok(l) => l,
        Err(e) => {
            return e
                .0
                .iter()
                .map(|e| (e.path.clone(), e.message.clone()))
                .collect()
        }
    };
    match portico::snapshot::compile(&loaded, None) {
        Ok(_) => Vec::new(),
        Err(e) => {
            e.0.iter()
                .map(|e| (e.path.clone(), e.message.clone()))
                .collect()
        }
    }
}

#[test]
fn bad_access_log_settings_are_located_errors() {
    assert_eq!(errors("  path: stdout\n"), []);
    assert_eq!(errors("  fields: [time, status]\n  sample: 0.25\n"), []);

    let e = errors("  fields: [time, stauts, time]\n");
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(e[0].0, "access_log.fields[1]");
    assert!(
        e[0].1.contains("unknown field `stauts`") && e[0].1.contains("known: time, request_id"),
        "{e:?}"
    );
    assert_eq!(e[1].0, "access_log.fields[2]");
    assert!(e[1].1.contains("listed twice"), "{e:?}");

    let e = errors("  sample: 1.5\n");
    assert_eq!(e[0].0, "access_log.sample", "{e:?}");
    assert!(e[0].1.contains("between 0 and 1"), "{e:?}");
    let e = errors("  buffer: 0\n");
    assert_eq!(e[0].0, "access_log.buffer", "{e:?}");
    let e = errors("  fields: []\n");
    assert_eq!(e[0].0, "access_log.fields", "{e:?}");
    let e = errors("  path: ''\n");
    assert_eq!(e[0].0, "access_log.path", "{e:?}");
    let e = errors("  format: json\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].1.contains("unknown field `format`"), "{e:?}");
}
