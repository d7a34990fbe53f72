//! HTTP/2 cleartext (h2c, prior knowledge) peers: an upstream server and a
//! client, for protocol and gRPC-shaped tests.

use super::upstream::{Handler, TestBody, TestUpstream};
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Starts an h2c-only upstream with an async handler.
pub async fn start<F, Fut>(f: F) -> TestUpstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let handler: Handler = Arc::new(move |req| Box::pin(f(req)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    TestUpstream::from_parts(addr, hits, connections, task)
}

/// An h2c client connection to `addr` (prior knowledge).
pub async fn client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx
}

/// A gRPC message frame: uncompressed flag, big-endian length, payload.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(5 + payload.len());
    v.push(0);
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    Bytes::from(v)
}
