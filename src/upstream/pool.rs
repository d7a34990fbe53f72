//! Keep-alive connection pool of one endpoint, and the [`Lease`] a request
//! holds while it uses a connection.
//!
//! The pool is a small LIFO stack behind a per-endpoint mutex held for a push
//! or a pop only (never across an await), so the most recently used — warmest
//! — connection is reused first and stale ones age out at the bottom.

use super::endpoint::Endpoint;
use crate::body::{Body, BodyDone};
use crate::error::{ErrorKind, GatewayError};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

type Sender = http1::SendRequest<Body>;

struct Idle {
    tx: Sender,
    since: Instant,
}

pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// How long a checked-out idle connection may take to become ready before
/// it is given up for a fresh one.
const READY_GRACE: Duration = Duration::from_millis(250);

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        }
    }

    pub fn settings(&self) -> (usize, Duration) {
        (self.max_idle, self.idle_timeout)
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|g| g.len()).unwrap_or(0)
    }

    fn pop(&self) -> Option<Idle> {
        self.idle.lock().ok()?.pop()
    }

    fn put(&self, tx: Sender) {
        if self.max_idle == 0 || tx.is_closed() {
            return;
        }
        if let Ok(mut g) = self.idle.lock() {
            if g.len() < self.max_idle {
                g.push(Idle {
                    tx,
                    since: Instant::now(),
                });
            }
        }
    }

    /// Drops idle connections that expired or were closed by the target.
    pub fn evict_expired(&self) {
        let timeout = self.idle_timeout;
        if let Ok(mut g) = self.idle.lock() {
            g.retain(|i| !i.tx.is_closed() && i.since.elapsed() < timeout);
        }
    }

    /// Drops every idle connection.
    pub fn clear(&self) {
        if let Ok(mut g) = self.idle.lock() {
            g.clear();
        }
    }
}

/// Takes an idle connection to `ep` or opens a new one.
///
/// `fresh` forces a new connection (used for upgrades, whose connection
/// leaves HTTP for good). Errors here happen before anything was sent, so the
/// request is always safe to retry elsewhere.
pub async fn checkout(
    ep: &Arc<Endpoint>,
    connect_timeout: Option<Duration>,
    fresh: bool,
) -> Result<Lease, GatewayError> {
    if !fresh {
        while let Some(mut idle) = ep.pool.pop() {
            if idle.tx.is_closed() {
                continue;
            }
            if idle.since.elapsed() >= ep.pool.idle_timeout {
                // LIFO: everything below is older still.
                ep.pool.clear();
                break;
            }
            if idle.tx.is_ready() {
                return Ok(Lease::new(idle.tx, ep.clone()));
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_GRACE, idle.tx.ready()).await {
                return Ok(Lease::new(idle.tx, ep.clone()));
            }
        }
    }
    // Boxed: connecting is the rare path and its future is large; keeping it
    // out of line keeps every request's (and idle connection's) state small.
    let tx = Box::pin(connect(ep, connect_timeout)).await?;
    Ok(Lease::new(tx, ep.clone()))
}

async fn connect(ep: &Endpoint, connect_timeout: Option<Duration>) -> Result<Sender, GatewayError> {
    let unreachable = |msg: String| GatewayError::new(ErrorKind::UpstreamUnreachable, msg);
    let connecting = TcpStream::connect(ep.addr);
    let stream = match connect_timeout {
        Some(t) => tokio::time::timeout(t, connecting).await.map_err(|_| {
            unreachable(format!("connecting to {} timed out after {:?}", ep.addr, t))
        })?,
        None => connecting.await,
    }
    .map_err(|e| unreachable(format!("cannot connect to {}: {e}", ep.addr)))?;
    let _ = stream.set_nodelay(true);
    let (tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(format!("handshake with {} failed: {e}", ep.addr)))?;
    tokio::spawn(async move {
        // Errors surface through the SendRequest; the task only drives I/O.
        let _ = conn.with_upgrades().await;
    });
    Ok(tx)
}

/// One request's use of one upstream connection. Counts as in-flight on its
/// endpoint while it lives. [`Lease::release`] returns the connection to the
/// pool; dropping the lease instead closes it (the exchange did not end
/// cleanly, so the connection's state is unknown).
pub struct Lease {
    tx: Option<Sender>,
    ep: Arc<Endpoint>,
    request_done: Option<Arc<BodyDone>>,
    reusable: bool,
}

impl Lease {
    fn new(tx: Sender, ep: Arc<Endpoint>) -> Lease {
        ep.load.start();
        Lease {
            tx: Some(tx),
            ep,
            request_done: None,
            reusable: true,
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.ep
    }

    /// The connection may only be reused once this flag is set (the request
    /// body was fully sent).
    pub fn track_request_body(&mut self, done: Arc<BodyDone>) {
        self.request_done = Some(done);
    }

    /// The connection will not be reused (e.g. it is being upgraded).
    pub fn forbid_reuse(&mut self) {
        self.reusable = false;
    }

    pub fn sender(&mut self) -> &mut Sender {
        self.tx
            .as_mut()
            .expect("lease holds a connection until released")
    }

    /// The exchange completed: the connection goes back to the pool if it can.
    pub fn release(mut self) {
        let body_done = self.request_done.as_ref().is_none_or(|d| d.is_set());
        if let Some(tx) = self.tx.take() {
            if self.reusable && body_done {
                self.ep.pool.put(tx);
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ep.load.finish();
    }
}
