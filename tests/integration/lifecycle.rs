//! Reload (SIGHUP's work) and graceful shutdown, through a real gateway.

use super::support::client;
use super::support::conn::RawConn;
use super::support::upstream;
use super::support::{eventually, start_file, temp_config};
use std::time::{Duration, Instant};

fn config(upstream: std::net::SocketAddr, answer: &str) -> String {
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{{address: '{upstream}'}}]\nroutes:\n  - name: fixed\n    match: {{path: /fixed}}\n    action: {{respond: {{status: 200, body: {answer}}}}}\n  - name: proxied\n    action: {{proxy: {{upstream: up}}}}\n"
    )
}

#[tokio::test]
async fn reload_swaps_routes_keeps_pools_and_rejects_bad_configs() {
    let up = upstream::fixed(200, "upstream").await;
    let path = temp_config("lifecycle", "reload", &config(up.addr, "one"));
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

/// Replaces `path` at once (a new file renamed over it), so a watcher
/// never sees it half-written.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One route `r` answering `answer`, after a `validate` step with a schema
/// file when `schema` names one.
fn named_file_config(answer: &str, schema: Option<&str>) -> String {
    let policies = schema.map_or(String::new(), |f| {
        format!("    policies:\n      - validate: {{json_schema_file: {f}}}\n")
    });
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nroutes:\n  - name: r\n{policies}    action: {{respond: {{status: 200, body: {answer}}}}}\n"
    )
}

#[tokio::test]
async fn the_watcher_retries_a_rejected_reload_when_its_missing_file_arrives() {
    let path = temp_config(
        "lifecycle",
        "missing-file",
        &named_file_config("before", None),
    );
    let gw = start_file(&path).await;
    portico::server::watch(&gw.running);
    let shared = gw.running.shared.clone();
    assert_eq!(client::get(&gw.url("/")).await.text(), "before");

    // The configuration now names a file that is not there yet (a
    // ConfigMap updated before the Secret it refers to): rejected.
    write_atomically(&path, &named_file_config("after", Some("schema.json")));
    let rejected = eventually(Duration::from_secs(10), || shared.metrics.reloads().1 == 1);
    assert!(rejected.await, "the watcher tried the new configuration");
    assert_eq!(client::get(&gw.url("/")).await.text(), "before");

    // The file arrives, the configuration file unchanged: the watcher
    // tries again, and this time the reload goes through.
    let schema = path.parent().unwrap().join("schema.json");
    write_atomically(&schema, r#"{"type": "object"}"#);
    let applied = eventually(Duration::from_secs(10), || shared.metrics.reloads().0 == 1);
    assert!(applied.await, "the watcher reloaded once the file arrived");
    assert_eq!(client::get(&gw.url("/")).await.text(), "after");
    assert!(shared.snapshot.load().inputs.paths().any(|p| p == schema));
    assert_eq!(shared.metrics.reloads().1, 1, "rejected once");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_stops_accepting() {
    let up = upstream::slow(Duration::from_millis(300)).await;
    let path = temp_config("lifecycle", "shutdown", &config(up.addr, "x"));
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

/// The reload test config with `extra` routes appended.
fn config_with(upstream: std::net::SocketAddr, answer: &str, extra: &str) -> String {
    config(upstream, answer).replace(
        "  - name: proxied\n",
        &format!("{extra}  - name: proxied\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let up = upstream::fixed(200, "upstream").await;
    let path = temp_config("lifecycle", "reload-load", &config(up.addr, "v0"));
    let gw = start_file(&path).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    // Four keep-alive clients, alternating a proxied and a fixed route;
    // bounded by count (5,000 each) and time (60 s each).
    for c in 0..4 {
        let (stop, sent) = (stop.clone(), sent.clone());
        let (fixed, proxied) = (gw.url("/fixed"), gw.url("/p"));
        clients.push(tokio::spawn(async move {
            let http = client::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut failures = Vec::new();
            for i in 0..5000 {
                if stop.load(Ordering::Relaxed) || tokio::time::Instant::now() > deadline {
                    break;
                }
                let url = if (i + c) % 2 == 0 { &fixed } else { &proxied };
                let req = http::Request::get(url.as_str())
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                match tokio::time::timeout(Duration::from_secs(10), http.request(req)).await {
                    Ok(Ok(r)) if r.status() == 200 => {
                        use http_body_util::BodyExt;
                        if let Err(e) = r.into_body().collect().await {
                            failures.push(format!("{url}: body: {e}"));
                        }
                    }
                    Ok(Ok(r)) => failures.push(format!("{url}: status {}", r.status())),
                    Ok(Err(e)) => failures.push(format!("{url}: {e}")),
                    Err(_) => failures.push(format!("{url}: no answer in 10 s")),
                }
            }
            failures
        }));
    }
    // 50 reloads while the clients run: the fixed answer changes every
    // time and a route comes and goes.
    for i in 1..=50 {
        let extra = if i % 2 == 0 {
            "  - name: extra\n    match: {path: /extra}\n    action: {respond: {status: 204}}\n"
        } else {
            ""
        };
        std::fs::write(&path, config_with(up.addr, &format!("v{i}"), extra)).unwrap();
        gw.running.shared.reload().expect("valid config reloads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        sent.load(Ordering::Relaxed) >= 200,
        "the load ran during the reloads"
    );
    assert_eq!(client::get(&gw.url("/fixed")).await.text(), "v50");
    assert_eq!(client::get(&gw.url("/extra")).await.status, 204);
}

#[tokio::test]
async fn websocket_and_sse_streams_survive_reloads_that_keep_their_route() {
    use super::support::live;
    use futures_util::{SinkExt, StreamExt};
    use http_body_util::BodyExt;
    use tokio_tungstenite::tungstenite::Message;

    let ws_up = live::ws_echo().await;
    let (sse_up, mut streams) = live::sse().await;
    let yaml = |answer: &str| {
        format!(
            "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: ws\n    targets: [{{address: '{}'}}]\n  - name: sse\n    targets: [{{address: '{}'}}]\nroutes:\n  - name: fixed\n    match: {{path: /fixed}}\n    action: {{respond: {{status: 200, body: {answer}}}}}\n  - name: chat\n    match: {{path: /chat}}\n    action: {{proxy: {{upstream: ws}}}}\n  - name: events\n    match: {{path: /events}}\n    action: {{proxy: {{upstream: sse}}}}\n",
            ws_up.addr, sse_up.addr
        )
    };
    let path = temp_config("lifecycle", "streams", &yaml("one"));
    let gw = start_file(&path).await;

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/chat", gw.addr()))
        .await
        .expect("WebSocket through the gateway");
    let resp = client::new()
        .request(
            http::Request::get(gw.url("/events"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("SSE response");
    let events = tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();

    for round in 0..3 {
        std::fs::write(&path, yaml(&format!("reloaded-{round}"))).unwrap();
        gw.running.shared.reload().expect("reload");
        assert_eq!(
            client::get(&gw.url("/fixed")).await.text(),
            format!("reloaded-{round}")
        );

        let text = format!("after reload {round}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo in time")
            .expect("stream open")
            .expect("message");
        assert_eq!(echoed, Message::text(text));

        let event = format!("data: {round}\n\n");
        events
            .send(Ok(hyper::body::Frame::data(bytes::Bytes::from(
                event.clone(),
            ))))
            .await
            .unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("event in time")
            .expect("stream open")
            .expect("frame");
        assert_eq!(frame.into_data().unwrap(), event.as_bytes());
    }
}

#[tokio::test]
async fn draining_spares_keep_alive_clients_and_closes_idle_connections_after_a_grace() {
    let up = upstream::fixed(200, "upstream").await;
    let path = temp_config("lifecycle", "drain", &config(up.addr, "x"));
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
