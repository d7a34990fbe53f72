//! Listeners and connections: binds the configured addresses, accepts
//! connections, serves HTTP on them, and owns the live snapshot.
//!
//! The live [`Snapshot`] sits in an `ArcSwap`: each request takes its own
//! reference at start, so a reload never changes a request mid-flight and the
//! request path takes no lock.

pub mod service;

use crate::config;
use crate::snapshot::{compile, ListenerSpec, Snapshot};
use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// State shared by every connection.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub config_path: Option<PathBuf>,
    shutdown: watch::Sender<bool>,
    connections: AtomicUsize,
}

impl Shared {
    /// Re-reads the config file, compiles it and swaps it in. On any error the
    /// current snapshot keeps serving and the error is returned.
    pub fn reload(&self) -> Result<(), String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or("no config file to reload")?;
        let loaded = config::load_file(path).map_err(|e| e.to_string())?;
        let current = self.snapshot.load_full();
        let next = compile(&loaded, Some(&current)).map_err(|e| e.to_string())?;
        let old_listeners: Vec<_> = current.listeners.iter().map(|l| l.spec.clone()).collect();
        let new_listeners: Vec<_> = next.listeners.iter().map(|l| l.spec.clone()).collect();
        if old_listeners != new_listeners {
            tracing::warn!("listener changes need a restart; routes and upstreams were reloaded");
        }
        for up in next.upstreams.values() {
            up.start();
        }
        self.snapshot.store(Arc::new(next));
        tracing::info!(file = %path.display(), hash = format!("{:016x}", loaded.hash), "configuration reloaded");
        Ok(())
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A running gateway: its bound addresses and a handle to stop it.
pub struct Running {
    pub shared: Arc<Shared>,
    pub addrs: HashMap<String, SocketAddr>,
}

impl Running {
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    /// Stops accepting, asks open connections to close once idle and waits
    /// up to `drain` for them.
    pub async fn shutdown(&self, drain: Duration) {
        let _ = self.shared.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + drain;
        let busy =
            || self.shared.open_connections() + crate::proxy::TUNNELS.load(Ordering::Relaxed) > 0;
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Binds every listener of `snapshot` and starts serving. Listener addresses
/// with port 0 get a free port (see [`Running::addrs`]).
pub async fn start(snapshot: Snapshot, config_path: Option<PathBuf>) -> std::io::Result<Running> {
    // Named targets are resolved before the first request (bounded wait).
    let resolving: Vec<_> = snapshot.upstreams.values().cloned().collect();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        for up in &resolving {
            up.resolve().await;
        }
    })
    .await;
    for up in snapshot.upstreams.values() {
        up.start();
    }
    let mut listeners = Vec::new();
    let mut addrs = HashMap::new();
    for l in &snapshot.listeners {
        let listener = bind(l.spec.addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot bind listener `{}` to {}: {e}",
                    l.spec.name, l.spec.addr
                ),
            )
        })?;
        addrs.insert(l.spec.name.to_string(), listener.local_addr()?);
        listeners.push((listener, l.spec.clone()));
    }
    let (tx, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        config_path,
        shutdown: tx,
        connections: AtomicUsize::new(0),
    });
    for (listener, spec) in listeners {
        tracing::info!(listener = %spec.name, address = %listener.local_addr()?, "listening");
        tokio::spawn(accept_loop(listener, spec, shared.clone()));
    }
    Ok(Running { shared, addrs })
}

/// Per-connection facts every request on it needs.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub tls: bool,
}

async fn accept_loop(listener: TcpListener, spec: ListenerSpec, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let ctx = Arc::new(ConnCtx {
                    shared: shared.clone(),
                    listener: spec.name.clone(),
                    peer,
                    tls: false,
                });
                tokio::spawn(serve_connection(
                    stream,
                    ctx,
                    spec.header_read_timeout,
                    spec.max_header_bytes,
                ));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(listener = %spec.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    stream: TcpStream,
    ctx: Arc<ConnCtx>,
    header_timeout: Duration,
    max_header: usize,
) {
    let _ = stream.set_nodelay(true);
    ctx.shared.connections.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(ctx.shared.clone());
    let mut shutdown = ctx.shared.shutdown.subscribe();
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req| {
        let ctx = svc_ctx.clone();
        // Boxed per request: hyper keeps the slot for a connection's
        // request future for the connection's whole life, so an inline future
        // (~5 KB) would cost every idle keep-alive connection that much.
        Box::pin(async move { Ok::<_, Infallible>(service::handle(&ctx, req).await) })
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_header);
    let conn = builder
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %ctx.peer, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Loads, compiles and serves `path` until SIGTERM/SIGINT. SIGHUP reloads.
pub async fn serve_file(path: &Path, snapshot: Snapshot) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let running = start(snapshot, Some(path.to_path_buf()))
        .await
        .map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Err(e) = running.shared.reload() {
                    tracing::error!("reload rejected, previous configuration keeps serving:\n{e}");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down: draining connections");
    running.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
