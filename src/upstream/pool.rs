//! Keep-alive connection pool of one endpoint, and the [`Lease`] a request
//! holds while it uses a connection.
//!
//! The pool is a small LIFO stack behind a per-endpoint mutex held for a push
//! or a pop only (never across an await), so the most recently used — warmest
//! — connection is reused first and stale ones age out at the bottom.

use super::endpoint::Endpoint;
use crate::body::{Body, BodyDone};
use crate::config::model::Protocol;
use crate::error::{ErrorKind, GatewayError};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::TokioIo;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

type H1 = http1::SendRequest<Body>;
type H2 = http2::SendRequest<Body>;

/// A connection's request handle: HTTP/1.1 (one exchange at a time, pooled
/// LIFO) or HTTP/2 (multiplexed, one shared connection per endpoint, with
/// its number in the endpoint's pool so that [`Lease::retire`] retires that
/// connection and no later one).
pub enum Sender {
    H1(H1),
    H2(H2, u64),
}

impl Sender {
    /// Sends the request; an error carries the request back when it was
    /// never written (so it can be re-sent elsewhere).
    pub async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s, _) => s.try_send_request(req).await,
        }
    }
}

struct Idle {
    tx: H1,
    since: Instant,
}

/// The endpoint's HTTP/2 connection: the one every request uses while it
/// is open and not retired, numbered (1, 2, ...) as connections are made.
#[derive(Default)]
struct Shared {
    tx: Option<H2>,
    id: u64,
}

pub struct Pool {
    protocol: Protocol,
    idle: Mutex<Vec<Idle>>,
    /// The shared HTTP/2 connection (h2 and h2c upstreams).
    shared: Mutex<Shared>,
    /// Held while an HTTP/2 connection is being made, so that concurrent
    /// first requests share one connection instead of racing to open many.
    connecting: tokio::sync::Mutex<()>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// How long a checked-out idle connection may take to become ready before
/// it is given up for a fresh one.
const READY_GRACE: Duration = Duration::from_millis(250);

impl Pool {
    pub fn new(protocol: Protocol, max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool {
            protocol,
            shared: Mutex::new(Shared::default()),
            connecting: tokio::sync::Mutex::new(()),
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        }
    }

    pub fn settings(&self) -> (Protocol, usize, Duration) {
        (self.protocol, self.max_idle, self.idle_timeout)
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|g| g.len()).unwrap_or(0)
    }

    fn pop(&self) -> Option<Idle> {
        self.idle.lock().ok()?.pop()
    }

    fn put(&self, tx: H1) {
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

    /// No new request goes to HTTP/2 connection `id` (it received GOAWAY);
    /// the next checkout makes a new one. Its streams in flight finish on
    /// it. A later connection is left alone.
    fn retire_h2(&self, id: u64) {
        if let Ok(mut g) = self.shared.lock() {
            if g.id == id {
                g.tx = None;
            }
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
    if ep.pool.protocol != Protocol::Http1 {
        return checkout_h2(ep, connect_timeout).await;
    }
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
                return Ok(Lease::new(Sender::H1(idle.tx), ep.clone()));
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_GRACE, idle.tx.ready()).await {
                return Ok(Lease::new(Sender::H1(idle.tx), ep.clone()));
            }
        }
    }
    // Boxed: connecting is the rare path and its future is large; keeping it
    // out of line keeps every request's (and idle connection's) state small.
    let tx = Box::pin(connect(ep, connect_timeout)).await?;
    Ok(Lease::new(Sender::H1(tx), ep.clone()))
}

/// HTTP/2: every request shares the endpoint's one connection; a new one is
/// made when there is none, it closed, or it was retired.
///
/// A connection that received GOAWAY is not seen as closed by hyper
/// (`SendRequest::is_closed` and `is_ready` keep saying open) until a new
/// request is tried on it, which comes back unsent, or until its last
/// stream ends; so the exchange retires it as soon as one of its streams is
/// refused by the GOAWAY ([`Lease::retire`]).
async fn checkout_h2(
    ep: &Arc<Endpoint>,
    connect_timeout: Option<Duration>,
) -> Result<Lease, GatewayError> {
    let current = || {
        let g = ep.pool.shared.lock().ok()?;
        let tx = g.tx.as_ref().filter(|s| !s.is_closed())?;
        Some(Sender::H2(tx.clone(), g.id))
    };
    if let Some(tx) = current() {
        return Ok(Lease::new(tx, ep.clone()));
    }
    let _connecting = ep.pool.connecting.lock().await;
    if let Some(tx) = current() {
        return Ok(Lease::new(tx, ep.clone()));
    }
    let tx = Box::pin(connect_h2(ep, connect_timeout)).await?;
    let mut id = 0;
    if let Ok(mut g) = ep.pool.shared.lock() {
        g.id += 1;
        g.tx = Some(tx.clone());
        id = g.id;
    }
    Ok(Lease::new(Sender::H2(tx, id), ep.clone()))
}

/// Connects to `ep`: TCP, then TLS when the upstream uses it (the
/// handshake has its own `connect_timeout`).
async fn tcp(
    ep: &Endpoint,
    connect_timeout: Option<Duration>,
) -> Result<crate::tls::ClientStream, GatewayError> {
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
    let handshake = crate::tls::ClientStream::connect(ep.tls.as_ref(), stream);
    match connect_timeout {
        Some(t) => tokio::time::timeout(t, handshake).await.map_err(|_| {
            unreachable(format!(
                "TLS handshake with {} timed out after {:?}",
                ep.addr, t
            ))
        })?,
        None => handshake.await,
    }
    .map_err(|e| unreachable(format!("TLS handshake with {} failed: {e}", ep.addr)))
}

async fn connect_h2(ep: &Endpoint, connect_timeout: Option<Duration>) -> Result<H2, GatewayError> {
    let stream = tcp(ep, connect_timeout).await?;
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            GatewayError::new(
                ErrorKind::UpstreamUnreachable,
                format!("HTTP/2 handshake with {} failed: {e}", ep.addr),
            )
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}

async fn connect(ep: &Endpoint, connect_timeout: Option<Duration>) -> Result<H1, GatewayError> {
    let unreachable = |msg: String| GatewayError::new(ErrorKind::UpstreamUnreachable, msg);
    let stream = tcp(ep, connect_timeout).await?;
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

    pub fn is_http2(&self) -> bool {
        matches!(self.tx, Some(Sender::H2(..)))
    }

    /// The connection received GOAWAY: the endpoint's pool stops handing
    /// it out (HTTP/2 only; requests in flight on it finish there).
    pub fn retire(&self) {
        if let Some(Sender::H2(_, id)) = &self.tx {
            self.ep.pool.retire_h2(*id);
        }
    }

    /// The exchange completed: the connection goes back to the pool if it can.
    pub fn release(mut self) {
        let body_done = self.request_done.as_ref().is_none_or(|d| d.is_set());
        if let Some(Sender::H1(tx)) = self.tx.take() {
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
