//! One-line fixtures for integration tests: real upstream servers on
//! loopback, a real gateway started in-process from a YAML string, and a real
//! HTTP client.
//!
//! ```ignore
//! let up = upstream::fixed(200, "hello").await;
//! let gw = gateway(&format!("...{}...", up.addr)).await;
//! let r = client::get(&gw.url("/x")).await;
//! ```
#![allow(dead_code)]

pub mod client;
pub mod conn;
pub mod grpc;
pub mod h2;
pub mod h2raw;
pub mod introspection;
pub mod jwt;
pub mod live;
pub mod metrics;
pub mod process;
pub mod redis;
pub mod tls;
pub mod traffic;
pub mod upstream;

use portico::server::Running;
use std::net::SocketAddr;
use std::time::Duration;

/// Writes `text` as `portico.yaml` in a directory of its own for the test
/// (`area` and `name` make it unique within this process), for gateways
/// that reload their file.
pub fn temp_config(area: &str, name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("portico-{area}-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("portico.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A gateway started from a config file, which `reload` re-reads.
pub async fn start_file(path: &std::path::Path) -> TestGateway {
    let snap = portico::load(path).unwrap_or_else(|e| panic!("{e}"));
    let running = portico::server::start(snap, Some(path.to_path_buf()))
        .await
        .unwrap();
    TestGateway { running }
}

/// A gateway started from YAML. Its first listener should be named `main`.
pub struct TestGateway {
    pub running: Running,
}

impl TestGateway {
    pub fn addr(&self) -> SocketAddr {
        self.running.addr("main")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }
}

/// Parses, compiles and starts a gateway. Panics with the config error.
pub async fn gateway(yaml: &str) -> TestGateway {
    gateway_with_env(yaml, &[]).await
}

/// [`gateway`] with `${NAME}` interpolated from `env` (and nothing else).
pub async fn gateway_with_env(yaml: &str, env: &[(&str, &str)]) -> TestGateway {
    let loaded = portico::config::parse_str("test.yaml", yaml, |n| {
        env.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let snap = portico::snapshot::compile(&loaded, None).unwrap_or_else(|e| panic!("{e}"));
    let running = portico::server::start(snap, None)
        .await
        .expect("gateway starts");
    TestGateway { running }
}

/// A gateway whose rate limits take their time from `clock`
/// (`snapshot::compile_with_clock`): a pinned `ManualClock` keeps windows
/// from rolling over and breaker cooldowns from passing until the test
/// moves it.
pub async fn gateway_with_clock(
    yaml: &str,
    clock: std::sync::Arc<dyn portico::ratelimit::Clock>,
) -> TestGateway {
    let loaded =
        portico::config::parse_str("test.yaml", yaml, |_| None).unwrap_or_else(|e| panic!("{e}"));
    let snap = portico::snapshot::compile_with_clock(&loaded, None, clock)
        .unwrap_or_else(|e| panic!("{e}"));
    let running = portico::server::start(snap, None)
        .await
        .expect("gateway starts");
    TestGateway { running }
}

/// A minimal config: listener `main` on a free port and one upstream `up`
/// with the given targets, plus `routes` (YAML list items, indented 2).
pub fn simple_config(targets: &[SocketAddr], upstream_extra: &str, routes: &str) -> String {
    let mut t = String::new();
    for a in targets {
        t.push_str(&format!("      - address: {a}\n"));
    }
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets:\n{t}{upstream_extra}\nroutes:\n{routes}"
    )
}

/// Polls `cond` until it holds or `timeout` passes (for asynchronous state).
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
