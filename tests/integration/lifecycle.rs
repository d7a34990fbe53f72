//! Reload (SIGHUP's work) and graceful shutdown, through a real gateway.

use super::support::upstream;
use super::support::{client, TestGateway};
use std::path::PathBuf;
use std::time::Duration;

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portico-lifecycle-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("portico.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn start_file(path: &std::path::Path) -> TestGateway {
    let snap = portico::load(path).unwrap_or_else(|e| panic!("{e}"));
    let running = portico::server::start(snap, Some(path.to_path_buf()))
        .await
        .unwrap();
    TestGateway { running }
}

fn config(upstream: std::net::SocketAddr, answer: &str) -> String {
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{{address: '{upstream}'}}]\nroutes:\n  - name: fixed\n    match: {{path: /fixed}}\n    action: {{respond: {{status: 200, body: {answer}}}}}\n  - name: proxied\n    action: {{proxy: {{upstream: up}}}}\n"
    )
}

#[tokio::test]
async fn reload_swaps_routes_keeps_pools_and_rejects_bad_configs() {
    let up = upstream::fixed(200, "upstream").await;
    let path = temp_config("reload", &config(up.addr, "one"));
    let gw = start_file(&path).await;
    assert_eq!(client::get(&gw.url("/fixed")).await.text(), "one");
    assert_eq!(client::get(&gw.url("/p")).await.text(), "upstream");
    assert_eq!(up.connections(), 1);

    std::fs::write(&path, config(up.addr, "two")).unwrap();
    gw.running.shared.reload().expect("valid config reloads");
    assert_eq!(client::get(&gw.url("/fixed")).await.text(), "two");
    // The unchanged upstream kept its pooled connection.
    assert_eq!(client::get(&gw.url("/p")).await.text(), "upstream");
    assert_eq!(up.connections(), 1, "pooled connection survives the reload");

    // A broken config is rejected with the validate-style error; the old one serves.
    std::fs::write(&path, "listeners: [\n").unwrap();
    let err = gw.running.shared.reload().unwrap_err();
    assert!(err.contains("portico.yaml:"), "{err}");
    std::fs::write(
        &path,
        config(up.addr, "three").replace("upstream: up}", "upstream: nope}"),
    )
    .unwrap();
    let err = gw.running.shared.reload().unwrap_err();
    assert!(err.contains("routes[1].action.proxy.upstream"), "{err}");
    assert_eq!(client::get(&gw.url("/fixed")).await.text(), "two");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_stops_accepting() {
    let up = upstream::slow(Duration::from_millis(300)).await;
    let path = temp_config("shutdown", &config(up.addr, "x"));
    let gw = start_file(&path).await;
    let url = gw.url("/slow");
    let in_flight = tokio::spawn(async move { client::get(&url).await });
    // Wait until the request reached the upstream, then shut down.
    assert!(super::support::eventually(Duration::from_secs(5), || up.hits() == 1).await);
    gw.running.shutdown(Duration::from_secs(5)).await;
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slow");
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(gw.addr()).await.is_err());
}
