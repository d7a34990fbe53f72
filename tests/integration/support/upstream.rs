//! Real upstream servers on loopback, each in one line.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

/// A running upstream. Counts requests and connections; stops when dropped.
pub struct TestUpstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestUpstream {
    /// Wraps a server started elsewhere (e.g. the h2c one in `h2.rs`).
    pub fn from_parts(
        addr: SocketAddr,
        hits: Arc<AtomicUsize>,
        connections: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    ) -> TestUpstream {
        TestUpstream {
            addr,
            hits,
            connections,
            task,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting (existing connections are dropped with the task).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn response(status: u16, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// Starts an upstream with an async handler.
pub async fn start<F, Fut>(f: F) -> TestUpstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let handler: Handler = Arc::new(move |req| Box::pin(f(req)));
    start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), handler).await
}

/// Starts an upstream on a given listener (e.g. to restart on the same port).
pub async fn start_on(listener: TcpListener, handler: Handler) -> TestUpstream {
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (h2, c2) = (hits.clone(), connections.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            c2.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let hits = h2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    TestUpstream {
        addr,
        hits,
        connections,
        task,
    }
}

/// Always answers `status` with `body`.
pub async fn fixed(status: u16, body: &'static str) -> TestUpstream {
    start(move |_req| async move { response(status, body) }).await
}

/// Answers with a JSON document describing the request it received:
/// `{"method", "path", "query", "headers": {name: [values]}, "body_len"}`.
pub async fn echo() -> TestUpstream {
    start(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut headers = serde_json::Map::new();
        for name in parts.headers.keys() {
            let vals: Vec<serde_json::Value> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
                .collect();
            headers.insert(name.to_string(), vals.into());
        }
        let doc = serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body_len": body.len(),
        });
        let mut r = response(200, serde_json::to_vec(&doc).unwrap());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await
}

/// Waits `delay` before answering 200 `slow`.
pub async fn slow(delay: Duration) -> TestUpstream {
    start(move |_req| async move {
        tokio::time::sleep(delay).await;
        response(200, "slow")
    })
    .await
}

/// A loopback address where nothing listens (connections are refused).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// Answers every request with the given status after reading the body.
pub async fn failing(status: u16) -> TestUpstream {
    start(move |req: Request<Incoming>| async move {
        let _ = req.into_body().collect().await;
        response(status, "failing")
    })
    .await
}

/// The body's data frames, for handlers that stream.
pub fn stream_body(
    rx: tokio::sync::mpsc::Receiver<
        Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
    >,
) -> TestBody {
    let s = http_body_util::StreamBody::new(ReceiverStream(rx));
    BodyExt::boxed(s)
}

/// Minimal Stream over an mpsc receiver (avoids a tokio-stream dependency).
pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);

impl<T> futures_util::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
