//! The README's quickstart served for real: the `portico` binary runs
//! examples/quickstart.yaml as shipped (its three addresses moved to free
//! ports through the file's own `${...}` variables) and the README's curl
//! examples are sent to it as requests. Also the worker-thread setting:
//! `workers` in the file and `--workers` on the command line.
//!
//! Every process runs on loopback ports picked by the test and is killed
//! when the test ends; every wait is bounded.

use super::support::client;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::json;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Hang guard for waits on a process (not a timing assertion).
const WAIT: Duration = Duration::from_secs(20);

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `portico` process, its standard error captured; killed when dropped.
struct Process {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Process {
    fn spawn(args: &[&str], env: &[(&str, String)]) -> Process {
        let binary = std::ffi::OsStr::new(env!("CARGO_BIN_EXE_portico"));
        let (child, log) = super::support::process::spawn(binary, args, env);
        Process { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `url` answers (any status), or panics with the log.
    async fn wait_up(&mut self, url: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if try_get(url, &[]).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("portico exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{url} never answered:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET with `headers`: the answer, or why there was none.
async fn try_get(url: &str, headers: &[(&str, &str)]) -> Result<client::Reply, String> {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client::new().request(req))
        .await
        .map_err(|_| "no answer within 10s".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .map_err(|_| "body did not end within 10s".to_string())?
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok(client::Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

async fn get(url: &str, headers: &[(&str, &str)]) -> client::Reply {
    try_get(url, headers)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn quickstart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.yaml")
}

/// The README's "Try it" section, request by request.
#[tokio::test]
async fn the_readme_curl_examples_work_against_the_quickstart() {
    let (public, v1, v2) = (free_port(), free_port(), free_port());
    let config = quickstart();
    let mut gw = Process::spawn(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--workers",
            "2",
        ],
        &[
            ("PORTICO_LISTEN", format!("127.0.0.1:{public}")),
            ("PORTICO_USERS_V1", format!("127.0.0.1:{v1}")),
            ("PORTICO_USERS_V2", format!("127.0.0.1:{v2}")),
        ],
    );
    let base = format!("http://127.0.0.1:{public}");
    let url = |path: &str| format!("{base}{path}");
    gw.wait_up(&url("/healthz")).await;
    // `--workers` is taken.
    assert!(
        gw.log().contains("starting portico workers=2 "),
        "{}",
        gw.log()
    );

    // curl -i localhost:8080/healthz
    let r = get(&url("/healthz"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("x-request-id").is_some());
    assert_eq!(r.json(), json!({"status": "ok"}));

    // curl -i localhost:8080/v1/users/42: rewritten to /users/{id}, sent to
    // the users-v1 stand-in, which shows both forwarding hops.
    let r = get(&url("/v1/users/42"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("users-v1"));
    assert_eq!(r.header("x-api-version"), Some("1"));
    let id = r.header("x-request-id").unwrap().to_string();
    let v = r.json();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/users/42");
    assert_eq!(v["route"], "users-v1-service");
    assert_eq!(v["client"], "127.0.0.1");
    let h = &v["headers"];
    assert_eq!(h["host"], format!("127.0.0.1:{v1}"));
    assert_eq!(h["x-forwarded-for"], "127.0.0.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-host"], format!("127.0.0.1:{public}"));
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(
        h["forwarded"],
        format!(
            "for=127.0.0.1;proto=http;host=\"127.0.0.1:{public}\", for=127.0.0.1;proto=http;host=\"127.0.0.1:{v1}\""
        )
    );
    assert_eq!(h["x-request-id"], id.as_str(), "one id end to end");

    // curl -s localhost:8080/v2/users/42: /v2 stripped, sent to users-v2.
    let v = get(&url("/v2/users/42"), &[]).await.json();
    assert_eq!(
        (&v["path"], &v["route"], &v["headers"]["host"]),
        (
            &json!("/users/42"),
            &json!("users-v2-service"),
            &json!(format!("127.0.0.1:{v2}"))
        )
    );

    // curl -s localhost:8080/users/42: no version header, v1.
    let v = get(&url("/users/42"), &[]).await.json();
    assert_eq!(
        (&v["path"], &v["route"]),
        (&json!("/users/42"), &json!("users-v1-service"))
    );

    // curl -s -H 'Accept-Version: 2' localhost:8080/users/42: v2.
    let v = get(&url("/users/42"), &[("accept-version", "2")])
        .await
        .json();
    assert_eq!(v["route"], "users-v2-service");
    assert_eq!(v["headers"]["accept-version"], "2");

    // curl -s 'localhost:8080/debug/echo?x=1'
    let v = get(&url("/debug/echo?x=1"), &[]).await.json();
    assert_eq!(v["route"], "debug-echo");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/debug/echo");
    assert_eq!(v["query"], "x=1");
    assert_eq!(v["body"], "");
    assert_eq!(v["body_bytes"], 0);
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["headers"]["host"], format!("127.0.0.1:{public}"));

    // curl -s -H 'x-api-key: demo-key-change-me' localhost:8080/partner/echo
    let r = get(
        &url("/partner/echo"),
        &[("x-api-key", "demo-key-change-me")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["route"], "partner-echo");
    let h = &v["headers"];
    assert_eq!(h["x-auth-method"], "api_key");
    assert_eq!(h["x-consumer-id"], "demo-app");
    assert_eq!(h["x-consumer-groups"], "partners");
    assert_eq!(h["x-consumer-plan"], "free");
    assert!(
        h.get("x-api-key").is_none(),
        "the key is not forwarded: {h}"
    );

    // curl -si localhost:8080/partner/echo: no key, 401 with a challenge.
    let r = get(&url("/partner/echo"), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.header("www-authenticate"),
        Some("ApiKey realm=\"portico\"")
    );
    let e = &r.json()["error"];
    assert_eq!(
        (&e["status"], &e["code"], &e["message"]),
        (
            &json!(401),
            &json!("unauthorized"),
            &json!("credentials are required")
        )
    );

    // curl -i localhost:8080/nope: the standard JSON error.
    let r = get(&url("/nope"), &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let id = r.header("x-request-id").unwrap().to_string();
    assert_eq!(
        r.json(),
        json!({"error": {"status": 404, "code": "route_not_found",
            "message": "no route for GET /nope", "request_id": id}})
    );
}

/// A file of its own for a test, in a fresh directory.
fn write(name: &str, yaml: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("portico-quickstart-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("portico.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn run_to_end(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(args)
        .output()
        .expect("run portico");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn serves_with(config: &Path, extra: &[&str], port: u16, workers: usize) {
    let mut args = vec!["run", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut gw = Process::spawn(&args, &[]);
    let url = format!("http://127.0.0.1:{port}/ok");
    gw.wait_up(&url).await;
    let r = get(&url, &[]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "fine"));
    assert!(
        gw.log()
            .contains(&format!("starting portico workers={workers} ")),
        "{}",
        gw.log()
    );
}

#[tokio::test]
async fn workers_in_the_file_and_on_the_command_line() {
    let port = free_port();
    let yaml = format!(
        "watch_config: false\nworkers: 3\nlisteners:\n  - name: main\n    address: 127.0.0.1:{port}\nroutes:\n  - name: ok\n    match: {{path: /ok}}\n    action: {{respond: {{status: 200, body: fine}}}}\n"
    );
    let path = write("workers", &yaml);
    // The file's setting, then `--workers` (and `-w`) over it; 1 is the
    // single-threaded runtime.
    serves_with(&path, &[], port, 3).await;
    serves_with(&path, &["--workers", "2"], port, 2).await;
    serves_with(&path, &["-w", "1"], port, 1).await;

    // `workers: 0` is a located configuration error.
    let zero = write("workers-zero", &yaml.replace("workers: 3", "workers: 0"));
    let (code, stderr) = run_to_end(&["validate", "--config", zero.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:2:1: workers: must be at least 1",
            zero.display()
        )),
        "{stderr}"
    );
    let (code, _) = run_to_end(&["run", "--config", zero.to_str().unwrap()]);
    assert_eq!(code, Some(1));

    // A bad `--workers` is a usage error (exit 2), before anything starts.
    for bad in ["0", "many", "-1"] {
        let (code, stderr) =
            run_to_end(&["run", "--config", path.to_str().unwrap(), "--workers", bad]);
        assert_eq!(code, Some(2), "--workers {bad}: {stderr}");
        assert!(stderr.contains("--workers"), "{stderr}");
    }
    let (code, stderr) = run_to_end(&["run", "--config", path.to_str().unwrap(), "--workers"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--workers needs a number"), "{stderr}");
}
