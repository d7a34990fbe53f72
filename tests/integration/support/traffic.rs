//! Traffic helpers for balancing, resilience and routing tests: one
//! keep-alive client reused across many requests, requests with extra
//! headers, bounded concurrent load, and config builders for weighted
//! targets.

use super::client::{self, Reply, TestClient};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::time::Duration;

/// Upper bound for one request in these helpers (a hang guard, not a timing
/// assertion).
const REQUEST_GUARD: Duration = Duration::from_secs(30);

/// Sends `req` on the shared client `c` and reads the whole answer.
pub async fn fetch(c: &TestClient, req: Request<Full<Bytes>>) -> Reply {
    let what = format!("{} {}", req.method(), req.uri());
    let resp = tokio::time::timeout(REQUEST_GUARD, c.request(req))
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {REQUEST_GUARD:?}"))
        .unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(REQUEST_GUARD, body.collect())
        .await
        .unwrap_or_else(|_| panic!("{what}: body did not end within {REQUEST_GUARD:?}"))
        .expect("body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A request with extra headers (and an optional body).
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

/// GET `url` with extra headers on the shared client.
pub async fn get_with(c: &TestClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    fetch(c, request("GET", url, headers, Bytes::new())).await
}

/// Sends `n` GETs to `url` from `concurrency` workers sharing one keep-alive
/// client. Asserts every answer is 200 and returns how many answers carried
/// each body.
pub async fn load(url: &str, n: usize, concurrency: usize) -> HashMap<String, usize> {
    let c = client::new();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let share = n / concurrency + usize::from(w < n % concurrency);
        let c = c.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            for _ in 0..share {
                let r = get_with(&c, &url, &[]).await;
                assert_eq!(r.status, 200, "{}", r.text());
                *seen.entry(r.text()).or_default() += 1;
            }
            seen
        }));
    }
    let mut total: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.expect("load worker") {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

/// A config with listener `main`, one upstream `up` whose targets are
/// `(address, weight)`, `upstream_extra` (keys of the upstream, indented 4)
/// and a single catch-all route proxying to it.
pub fn weighted_config(targets: &[(String, u32)], upstream_extra: &str) -> String {
    let mut t = String::new();
    for (a, w) in targets {
        t.push_str(&format!("      - {{address: \"{a}\", weight: {w}}}\n"));
    }
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets:\n{t}{upstream_extra}routes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n"
    )
}
