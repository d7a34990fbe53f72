//! Reload (SIGHUP's work) and graceful shutdown, through a real gateway.

use super::support::conn::RawConn;
use super::support::upstream;
use super::support::{client, TestGateway};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    assert_eq!(
        r.header("connection"),
        Some("close"),
        "finished while draining"
    );
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(gw.addr()).await.is_err());
}

#[tokio::test]
async fn draining_spares_keep_alive_clients_and_closes_idle_connections_after_a_grace() {
    let up = upstream::fixed(200, "upstream").await;
    let path = temp_config("drain", &config(up.addr, "x"));
    let gw = start_file(&path).await;
    let request = b"GET /fixed HTTP/1.1\r\nhost: x\r\n\r\n";
    let (mut busy, mut idle) = (
        RawConn::connect(gw.addr()).await,
        RawConn::connect(gw.addr()).await,
    );
    for c in [&mut busy, &mut idle] {
        c.write(request).await;
        let head = c.read_head().await;
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("connection"),
            None,
            "keep-alive before draining"
        );
        assert_eq!(c.read_body(&head, false).await, b"x");
    }

    let started = Instant::now();
    let shared = gw.running.shared.clone();
    let shutdown = tokio::spawn(async move {
        portico::server::Running { shared }
            .shutdown(Duration::from_secs(10))
            .await
    });
    // A client reusing its keep-alive connection right after draining began
    // is answered, told to close, and the connection ends after the answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    busy.write(request).await;
    let head = busy.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("connection"), Some("close"));
    assert_eq!(busy.read_body(&head, false).await, b"x");
    assert!(busy.read_to_close().await.is_empty());

    // The idle connection is closed once idle for the grace, not at once.
    assert!(idle.read_to_close().await.is_empty());
    let closed_after = started.elapsed();
    assert!(
        closed_after >= portico::server::DRAIN_IDLE_GRACE,
        "closed after {closed_after:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown returns once the connections closed, before its deadline")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}
