//! Listeners and connections: binds the configured addresses, accepts
//! connections, serves HTTP on them, and owns the live snapshot.
//!
//! The live [`Snapshot`] sits in an `ArcSwap`: each request takes its own
//! reference at start, so a reload never changes a request mid-flight and the
//! request path takes no lock. A reload also reconciles listeners: new ones
//! are bound (before the swap, so a port in use rejects the reload), removed
//! ones stop accepting while their connections finish. Listener settings
//! (limits, timeouts) are read from the live snapshot for each new
//! connection. The admin listener (`crate::admin`) is reconciled the same
//! way; it is bound first and keeps serving while the gateway drains, so
//! `/readyz` can say "not ready" during start-up and shutdown.
//!
//! Shutdown and the hand-over of a binary upgrade both *drain*
//! ([`Shared::begin_drain`]): listeners stop accepting, HTTP/2 connections
//! are sent GOAWAY, and HTTP/1 connections are closed without racing a client
//! that is sending its next request on them — each response from then on
//! carries `Connection: close` (hyper closes after it), and a connection is
//! closed outright only once it has had no request in flight (and no request
//! head arriving) for [`DRAIN_IDLE_GRACE`] (or at the drain deadline,
//! [`Phase::Closed`]).

pub mod notify;
pub mod service;
mod sys;
pub mod upgrade;

use crate::config::inputs::{self, Inputs};
use crate::config::{self, ConfigErrors};
use crate::metrics::{conn_class, GatewayMetrics, ListenerMetrics};
use crate::snapshot::{compile_with_inputs, ListenerSpec, Snapshot};
use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

/// How often the config file is checked for changes (`watch_config`).
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// While draining, an idle HTTP/1 connection is closed once it has had no
/// request in flight for this long, counted from the start of the drain at
/// the earliest. Busy connections close by themselves after a response with
/// `Connection: close`; the grace only spares a client that is about to
/// reuse a connection that looks idle.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// Where the process is in its life, broadcast to accept loops and
/// connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Not accepting; connections finish (see the module comment).
    Draining,
    /// The drain deadline passed: connections still open are dropped.
    Closed,
}

/// A bound listener and the switch that stops its accept loop.
pub(crate) struct Bound {
    /// The configured address (port 0 stays 0 here).
    configured: SocketAddr,
    local: SocketAddr,
    stop: watch::Sender<bool>,
    /// The socket (shared with the accept loop), for a binary upgrade to
    /// pass on. Let go of when draining starts, so the socket closes as soon
    /// as its accept loop ends.
    listener: Option<Arc<TcpListener>>,
}

/// State shared by every connection.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub config_path: Option<PathBuf>,
    phase: watch::Sender<Phase>,
    /// `phase != Serving`, read by every HTTP/1 request (one relaxed load).
    draining: AtomicBool,
    connections: AtomicUsize,
    /// Accept loops still running.
    accepting: AtomicUsize,
    /// Touched only when listeners are bound or stopped (start, reload).
    listeners: Mutex<HashMap<Arc<str>, Bound>>,
    /// The admin listener, when configured.
    admin: Mutex<Option<Bound>>,
    /// Set once every listener is bound at start.
    ready: AtomicBool,
    pub metrics: GatewayMetrics,
    /// The access log's sink and counters (see `crate::access_log`).
    pub access_log: crate::access_log::Attach,
    pub started_at: SystemTime,
    started: Instant,
    /// Per-consumer request counts over recent windows (admin API).
    pub usage: crate::metrics::usage::UsageHistory,
    /// The files that the last reload read or tried to read, when its
    /// compile was rejected: watched too, so that a key file the new
    /// configuration names but that was missing (or bad) is seen arriving.
    rejected_inputs: Mutex<Arc<Inputs>>,
}

/// Why a reload was rejected (the previous configuration keeps serving).
#[derive(Debug)]
pub enum ReloadError {
    /// The file cannot be read or does not validate.
    Invalid(ConfigErrors),
    /// It validates but cannot be applied (an address cannot be bound), or
    /// there is no file to reload.
    Failed(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Invalid(e) => write!(f, "{e}"),
            ReloadError::Failed(e) => f.write_str(e),
        }
    }
}

/// A reload that went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// False when neither the file nor any file it names changed (nothing
    /// was done).
    pub changed: bool,
    /// The identity of the snapshot in force (`Snapshot::hash`).
    pub hash: u64,
}

impl Shared {
    /// Re-reads the config file and every file it names (TLS, JWT keys,
    /// schemas, OpenAPI documents), compiles it, binds new listeners and
    /// swaps it in. On any error the current configuration keeps serving
    /// and the error (as `portico validate` prints it) is returned. When
    /// neither the file nor any file it names changed it is a no-op, so
    /// the state kept across reloads (JWT keys and token caches, pools,
    /// limits) is kept as it is.
    pub fn reload(self: &Arc<Self>) -> Result<(), String> {
        self.reload_checked().map(|_| ()).map_err(|e| e.to_string())
    }

    /// [`Shared::reload`] with the error kept structured (the admin API
    /// answers a bad configuration with its list of errors). Every call is
    /// counted in `portico_config_reloads_total`.
    pub fn reload_checked(self: &Arc<Self>) -> Result<Reloaded, ReloadError> {
        let r = self.reload_inner();
        self.metrics.reloaded(r.is_ok());
        r
    }

    fn reload_inner(self: &Arc<Self>) -> Result<Reloaded, ReloadError> {
        let failed = |m: String| ReloadError::Failed(m);
        let path = self
            .config_path
            .as_ref()
            .ok_or_else(|| failed("no config file to reload".into()))?;
        let loaded = config::load_file(path).map_err(|e| {
            self.set_rejected_inputs(Default::default());
            ReloadError::Invalid(e)
        })?;
        let current = self.snapshot.load_full();
        let unchanged = Reloaded {
            changed: false,
            hash: current.hash,
        };
        if loaded.hash == current.text_hash && current.inputs.unchanged() {
            self.set_rejected_inputs(Default::default());
            return Ok(unchanged);
        }
        let (compiled, read) = compile_with_inputs(&loaded, Some(&current), None);
        let mut next = match compiled {
            Ok(next) => next,
            Err(e) => {
                self.set_rejected_inputs(read);
                return Err(ReloadError::Invalid(e));
            }
        };
        self.set_rejected_inputs(Default::default());
        if next.hash == current.hash {
            // A file changed and changed back while it was read.
            return Ok(unchanged);
        }

        // Bind what is new or moved before anything changes.
        let mut fresh = Vec::new();
        {
            let bound = self
                .listeners
                .lock()
                .map_err(|_| failed("listener table poisoned".into()))?;
            for l in &next.listeners {
                let same = bound
                    .get(&l.spec.name)
                    .is_some_and(|b| b.configured == l.spec.addr);
                if !same {
                    let reuse_port = bound.values().any(|b| b.local == l.spec.addr);
                    if reuse_port {
                        return Err(failed(format!(
                            "listener `{}`: {} is still bound by another listener; rename or move them in two reloads",
                            l.spec.name, l.spec.addr
                        )));
                    }
                    let listener = bind(l.spec.addr).map_err(|e| {
                        failed(format!(
                            "cannot bind listener `{}` to {}: {e}",
                            l.spec.name, l.spec.addr
                        ))
                    })?;
                    fresh.push((listener, l.spec.clone()));
                }
            }
        }
        // The admin listener: bound now if it is new or moved.
        let next_admin = next.admin.as_ref().map(|a| a.addr);
        let fresh_admin = match next_admin {
            Some(addr) => {
                let current = self.admin.lock().unwrap_or_else(|e| e.into_inner());
                match current.as_ref() {
                    Some(b) if b.configured == addr => None,
                    Some(b) if b.local == addr => {
                        return Err(failed(format!(
                            "admin: {addr} is still bound by the current admin listener"
                        )))
                    }
                    _ => Some(bind(addr).map_err(|e| {
                        failed(format!("cannot bind the admin listener to {addr}: {e}"))
                    })?),
                }
            }
            None => None,
        };
        for up in next.upstreams.values() {
            up.start();
        }
        next.jwt_issuers.start();
        if let Some(t) = &next.tracer {
            t.start();
        }
        for l in &next.listeners {
            if let Some(t) = &l.spec.tls.terminator {
                t.start();
            }
        }
        // Last before the swap: a new destination is opened now, so an
        // unwritable one rejects the reload.
        next.access_logger = self
            .access_log
            .logger(next.access_log.as_ref())
            .map_err(|e| failed(e.to_string()))?;
        let keep: Vec<Arc<str>> = next.listeners.iter().map(|l| l.spec.name.clone()).collect();
        self.snapshot.store(Arc::new(next));
        {
            let mut admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            let stays =
                matches!((admin.as_ref(), next_admin), (Some(b), Some(a)) if b.configured == a);
            if !stays {
                if let Some(b) = admin.take() {
                    let _ = b.stop.send(true);
                    tracing::info!(address = %b.local, "admin listener stopped");
                }
            }
            if let (Some(listener), Some(addr)) = (fresh_admin, next_admin) {
                *admin = Some(self.spawn_admin(listener, addr));
            }
        }
        {
            let mut bound = self
                .listeners
                .lock()
                .map_err(|_| failed("listener table poisoned".into()))?;
            let moved: Vec<Arc<str>> = fresh.iter().map(|(_, s)| s.name.clone()).collect();
            bound.retain(|name, b| {
                let stays = keep.contains(name) && !moved.contains(name);
                if !stays {
                    let _ = b.stop.send(true);
                    tracing::info!(listener = %name, address = %b.local, "listener stopped; its connections drain");
                }
                stays
            });
            for (listener, spec) in fresh {
                self.spawn_listener(&mut bound, listener, spec);
            }
        }
        let hash = self.snapshot.load().hash;
        tracing::info!(file = %path.display(), hash = format!("{hash:016x}"), "configuration reloaded");
        Ok(Reloaded {
            changed: true,
            hash,
        })
    }

    fn set_rejected_inputs(&self, read: Arc<Inputs>) {
        *self
            .rejected_inputs
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = read;
    }

    /// The files the config watcher stats besides the config file, each
    /// with its stamp when it was read: those of the live snapshot, and
    /// those a rejected reload tried.
    fn watched_inputs(&self) -> Vec<(PathBuf, Option<inputs::Stamp>)> {
        let live = self.snapshot.load_full();
        let rejected = self
            .rejected_inputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        live.inputs
            .stamps()
            .chain(rejected.stamps())
            .map(|(p, s)| (p.to_path_buf(), s))
            .collect()
    }

    /// Starts serving the admin API on `listener`.
    fn spawn_admin(self: &Arc<Self>, listener: TcpListener, configured: SocketAddr) -> Bound {
        let local = listener.local_addr().unwrap_or(configured);
        let (stop, stopped) = watch::channel(false);
        tracing::info!(address = %local, "admin listener");
        let listener = Arc::new(listener);
        tokio::spawn(crate::admin::serve(
            listener.clone(),
            configured,
            self.clone(),
            stopped,
        ));
        Bound {
            configured,
            local,
            stop,
            listener: Some(listener),
        }
    }

    /// The bound address of the admin listener (resolves port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.lock().ok()?.as_ref().map(|b| b.local)
    }

    /// Ready for traffic: every listener bound and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The bound addresses of the data listeners, by name.
    pub fn bound_listeners(&self) -> Vec<(Arc<str>, SocketAddr)> {
        let mut v: Vec<_> = self
            .listeners
            .lock()
            .map(|b| b.iter().map(|(n, b)| (n.clone(), b.local)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    fn spawn_listener(
        self: &Arc<Self>,
        bound: &mut HashMap<Arc<str>, Bound>,
        listener: TcpListener,
        spec: Arc<ListenerSpec>,
    ) {
        let local = listener.local_addr().unwrap_or(spec.addr);
        let (stop, stopped) = watch::channel(false);
        tracing::info!(listener = %spec.name, address = %local, "listening");
        let listener = Arc::new(listener);
        bound.insert(
            spec.name.clone(),
            Bound {
                configured: spec.addr,
                local,
                stop,
                listener: Some(listener.clone()),
            },
        );
        self.accepting.fetch_add(1, Ordering::Relaxed);
        let metrics = self.metrics.listener(&spec.name);
        tokio::spawn(accept_loop(
            listener,
            spec.name.clone(),
            self.clone(),
            metrics,
            stopped,
        ));
    }

    /// Starts draining: accept loops stop (the sockets close unless an
    /// upgraded process holds them too), HTTP/2 connections get GOAWAY,
    /// HTTP/1 responses carry `Connection: close` and idle HTTP/1
    /// connections close after [`DRAIN_IDLE_GRACE`].
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        if let Ok(mut bound) = self.listeners.lock() {
            for b in bound.values_mut() {
                b.listener = None;
            }
        }
        self.phase.send_if_modified(|p| {
            let start = *p == Phase::Serving;
            if start {
                *p = Phase::Draining;
            }
            start
        });
    }

    /// Whether draining has started (the process is on its way out).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The bound address of a listener (resolves port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners.lock().ok()?.get(listener).map(|b| b.local)
    }
}

/// A running gateway: its bound addresses and a handle to stop it.
pub struct Running {
    pub shared: Arc<Shared>,
}

impl Running {
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.shared
            .local_addr(listener)
            .unwrap_or_else(|| panic!("no listener named `{listener}`"))
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.shared
            .admin_addr()
            .expect("the configuration has an `admin` listener")
    }

    /// Drains ([`Shared::begin_drain`]) and waits up to `drain` for open
    /// connections (and WebSocket tunnels) to finish; then drops the
    /// connections still open.
    pub async fn shutdown(&self, drain: Duration) {
        self.shared.begin_drain();
        let deadline = tokio::time::Instant::now() + drain;
        let shared = &self.shared;
        let busy = || {
            shared.accepting.load(Ordering::Relaxed)
                + shared.open_connections()
                + crate::proxy::TUNNELS.load(Ordering::Relaxed)
                > 0
        };
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.phase.send_replace(Phase::Closed);
        // Spans of the last requests: exported within a bounded wait.
        if let Some(t) = self.shared.snapshot.load().tracer.clone() {
            t.flush(t.spec.timeout.min(Duration::from_secs(5))).await;
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
/// with port 0 get a free port (see [`Running::addr`]).
pub async fn start(snapshot: Snapshot, config_path: Option<PathBuf>) -> std::io::Result<Running> {
    start_with(snapshot, config_path, &mut upgrade::Inherited::default()).await
}

/// [`start`], taking the sockets a parent process handed over (binary
/// upgrade) for listeners whose name and configured address match, instead
/// of binding them; the inherited sockets no listener takes are closed.
pub async fn start_with(
    mut snapshot: Snapshot,
    config_path: Option<PathBuf>,
    inherited: &mut upgrade::Inherited,
) -> std::io::Result<Running> {
    let admin = snapshot.admin.as_ref().map(|a| a.addr);
    let (phase, _) = watch::channel(Phase::Serving);
    let metrics = GatewayMetrics::default();
    let access_log = crate::access_log::Attach::new(metrics.access_log.clone());
    snapshot.access_logger = access_log.logger(snapshot.access_log.as_ref())?;
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        config_path,
        phase,
        draining: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        accepting: AtomicUsize::new(0),
        listeners: Mutex::new(HashMap::new()),
        admin: Mutex::new(None),
        ready: AtomicBool::new(false),
        metrics,
        access_log,
        started_at: SystemTime::now(),
        started: Instant::now(),
        usage: Default::default(),
        rejected_inputs: Default::default(),
    });
    tokio::spawn(crate::metrics::usage::run(Arc::downgrade(&shared)));
    // The admin listener first: `/readyz` answers (not ready) during start-up.
    if let Some(addr) = admin {
        let listener = take_or_bind(inherited, upgrade::ADMIN_LISTENER, addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot bind the admin listener to {addr}: {e}"),
            )
        })?;
        let b = shared.spawn_admin(listener, addr);
        *shared.admin.lock().expect("fresh mutex") = Some(b);
    }
    let stop_admin = || {
        if let Some(b) = shared.admin.lock().ok().and_then(|mut a| a.take()) {
            let _ = b.stop.send(true);
        }
    };
    let snapshot = shared.snapshot.load_full();
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
    snapshot.jwt_issuers.start();
    if let Some(t) = &snapshot.tracer {
        t.start();
    }
    for l in &snapshot.listeners {
        if let Some(t) = &l.spec.tls.terminator {
            t.start();
        }
    }
    let mut listeners = Vec::new();
    for l in &snapshot.listeners {
        match take_or_bind(inherited, &l.spec.name, l.spec.addr) {
            Ok(listener) => listeners.push((listener, l.spec.clone())),
            Err(e) => {
                stop_admin();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot bind listener `{}` to {}: {e}",
                        l.spec.name, l.spec.addr
                    ),
                ));
            }
        }
    }
    inherited.close_unused();
    drop(snapshot);
    {
        let mut bound = shared.listeners.lock().expect("fresh mutex");
        for (listener, spec) in listeners {
            shared.spawn_listener(&mut bound, listener, spec);
        }
    }
    shared.ready.store(true, Ordering::Release);
    Ok(Running { shared })
}

/// The socket a parent process handed over for listener `name` at `addr`
/// (binary upgrade), else a newly bound one.
fn take_or_bind(
    inherited: &mut upgrade::Inherited,
    name: &str,
    addr: SocketAddr,
) -> std::io::Result<TcpListener> {
    match inherited.take(name, addr) {
        Some(socket) => {
            let shown = if name == upgrade::ADMIN_LISTENER {
                "(admin)"
            } else {
                name
            };
            tracing::info!(listener = %shown, address = %addr, "upgrade: using the inherited socket");
            socket
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(socket))
        }
        None => bind(addr),
    }
}

/// Per-connection facts every request on it needs.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub tls: bool,
    /// The verified client certificate (TLS listeners with `client_auth`).
    pub client_identity: Option<Arc<crate::tls::ClientIdentity>>,
    /// The listener's connection series.
    pub metrics: Arc<ListenerMetrics>,
    /// Forwarded-header values shared by the connection's requests.
    pub forwarded: Arc<crate::proxy::forward::ConnForwarded>,
}

/// Open connections of one listener, in total and per client IP.
#[derive(Default)]
struct ListenerLoad {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection's place in its listener's counts.
pub struct ConnPermit {
    load: Arc<ListenerLoad>,
    ip: Option<IpAddr>,
}

impl ListenerLoad {
    /// Admits a connection under the limits (0 = unlimited), or refuses it.
    fn admit(self: &Arc<Self>, ip: IpAddr, max: usize, max_per_ip: usize) -> Option<ConnPermit> {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut permit = ConnPermit {
            load: self.clone(),
            ip: None,
        };
        if max != 0 && total > max {
            return None;
        }
        if max_per_ip != 0 {
            let mut map = self.per_ip.lock().ok()?;
            let n = map.entry(ip).or_insert(0);
            if *n >= max_per_ip {
                return None;
            }
            *n += 1;
            permit.ip = Some(ip);
        }
        Some(permit)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.load.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            if let Ok(mut map) = self.load.per_ip.lock() {
                if let Some(n) = map.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(&ip);
                    }
                }
            }
        }
    }
}

/// Counts a running accept loop in `Shared::accepting`.
struct AcceptGuard(Arc<Shared>);

impl Drop for AcceptGuard {
    fn drop(&mut self) {
        self.0.accepting.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(
    listener: Arc<TcpListener>,
    name: Arc<str>,
    shared: Arc<Shared>,
    metrics: Arc<ListenerMetrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let _guard = AcceptGuard(shared.clone());
    let mut shutdown = shared.phase.subscribe();
    if *shutdown.borrow_and_update() != Phase::Serving {
        return;
    }
    let load = Arc::new(ListenerLoad::default());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
            _ = stopped.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Settings come from the live snapshot: reloads apply to new connections.
                let snapshot = shared.snapshot.load();
                let Some(spec) = snapshot.listener(&name).map(|l| l.spec.clone()) else {
                    break;
                };
                drop(snapshot);
                let ip = crate::net::canonical(peer.ip());
                let Some(permit) =
                    load.admit(ip, spec.max_connections, spec.max_connections_per_ip)
                else {
                    tracing::debug!(listener = %name, peer = %peer, "connection limit reached; closed");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                if let Some(tls) = spec.tls.terminator.clone() {
                    // The handshake runs in the connection's own task.
                    let (shared, name) = (shared.clone(), name.clone());
                    let metrics = metrics.clone();
                    tokio::spawn(serve_tls(
                        stream, tls, shared, name, metrics, peer, spec, permit,
                    ));
                    continue;
                }
                let ctx = Arc::new(ConnCtx {
                    shared: shared.clone(),
                    listener: name.clone(),
                    peer,
                    tls: false,
                    client_identity: None,
                    metrics: metrics.clone(),
                    forwarded: Arc::new(crate::proxy::forward::ConnForwarded::new(
                        peer.ip(),
                        false,
                    )),
                });
                tokio::spawn(serve_plain(stream, ctx, spec, permit));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A TLS connection: the handshake (within `header_read_timeout`), then
/// HTTP over it like any connection. Failed handshakes are counted in
/// `tls::HANDSHAKE_FAILURES` and in the listener's series.
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    stream: tokio::net::TcpStream,
    tls: Arc<crate::tls::TlsTerminator>,
    shared: Arc<Shared>,
    listener: Arc<str>,
    metrics: Arc<ListenerMetrics>,
    peer: SocketAddr,
    spec: Arc<ListenerSpec>,
    permit: ConnPermit,
) {
    let accepted = match tls.accept(stream, spec.header_read_timeout).await {
        Ok(a) => a,
        Err(e) => {
            metrics.tls_handshake_failed();
            tracing::debug!(listener = %listener, peer = %peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    // Accepted just before draining started: still served (`drive` sees the
    // phase at once), so that the client's first request does not fail.
    let ctx = Arc::new(ConnCtx {
        shared,
        listener,
        peer,
        tls: true,
        client_identity: accepted.identity,
        metrics,
        forwarded: Arc::new(crate::proxy::forward::ConnForwarded::new(peer.ip(), true)),
    });
    let h2 = matches!(accepted.alpn, crate::tls::Alpn::H2);
    serve_connection(accepted.stream, ctx, spec, permit, h2).await
}

/// A plain-text connection: HTTP/2 with prior knowledge when it opens with
/// the preface (and the listener allows HTTP/2), else HTTP/1.
async fn serve_plain(
    stream: tokio::net::TcpStream,
    ctx: Arc<ConnCtx>,
    spec: Arc<ListenerSpec>,
    permit: ConnPermit,
) {
    if spec.http2 && sniff_h2c(&stream, spec.header_read_timeout).await {
        // Boxed: this future is every plain connection's task, and the
        // generic one carries hyper's HTTP/1 connection inline.
        return Box::pin(serve_connection(stream, ctx, spec, permit, true)).await;
    }
    serve_plain_http1(stream, ctx, spec, permit).await
}

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain connection opens with the HTTP/2 preface. Peeks (never
/// consumes) until the first bytes decide it, within `limit`.
async fn sniff_h2c(stream: &tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 24];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return false;
        }
        if n == H2_PREFACE.len() {
            return true;
        }
        // A prefix of the preface so far: wait for more bytes.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What one connection is doing, for its idle timeout: requests in flight
/// (a request counts until its response body is finished or dropped), since
/// when it has had none, and whether a request head is arriving.
pub struct Activity {
    in_flight: AtomicU32,
    /// `clock::now_ms()` when the last request finished (or the connection began).
    idle_since: AtomicU64,
    head_pending: AtomicBool,
    /// HTTP/1 past its lifetime: responses carry `Connection: close`.
    close_soon: AtomicBool,
    /// The server asks an idle plain HTTP/1 connection to park (see
    /// `strict::io::StrictIo`); cleared when bytes arrive.
    park: AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(crate::clock::now_ms()),
            head_pending: AtomicBool::new(false),
            close_soon: AtomicBool::new(false),
            park: AtomicBool::new(false),
        })
    }

    /// Asks the connection to park at its next read between requests.
    pub(crate) fn request_park(&self) {
        self.park.store(true, Ordering::Relaxed);
    }

    pub(crate) fn park_requested(&self) -> bool {
        self.park.load(Ordering::Relaxed)
    }

    /// Bytes arrived: whatever parking was asked for no longer applies.
    pub(crate) fn clear_park_request(&self) {
        if self.park.load(Ordering::Relaxed) {
            self.park.store(false, Ordering::Relaxed);
        }
    }

    /// No request in flight and no head arriving.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && !self.head_pending.load(Ordering::Relaxed)
    }

    /// A request starts: it is in flight until the guard is dropped (the
    /// guard moves into the response body, see [`Tracked`]).
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// strict::io: part of a request head has arrived (or no longer waits).
    pub(crate) fn set_head_pending(&self, pending: bool) {
        self.head_pending.store(pending, Ordering::Relaxed);
    }

    /// Restarts the idle period (after the connection was asked to close).
    fn touch(&self) {
        self.idle_since
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// How long the connection has been idle, or `None` while it is busy.
    fn idle_for(&self) -> Option<Duration> {
        if !self.is_idle() {
            return None;
        }
        let since = self.idle_since.load(Ordering::Relaxed);
        Some(Duration::from_millis(
            crate::clock::now_ms().saturating_sub(since),
        ))
    }
}

/// One request in flight on a connection, until dropped.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0
                .idle_since
                .store(crate::clock::now_ms(), Ordering::Relaxed);
        }
    }
}

/// A response body that keeps its request in flight until it is dropped
/// (hyper drops it once written, or when the exchange is abandoned). It
/// wraps the request's `Observed` body, whose outcome is recorded then too.
pub struct Tracked {
    body: crate::outcome::Observed,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = <crate::outcome::Observed as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A served connection's place in the open-connection counts.
struct ConnGuard(Arc<ConnCtx>, usize);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.shared.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.closed(self.1);
    }
}

/// A served connection's place in the open-connection counts and in its
/// listener's connection limits, for as long as it lives.
struct ConnOpen {
    _guard: ConnGuard,
    _permit: ConnPermit,
}

impl ConnOpen {
    fn new(ctx: &Arc<ConnCtx>, h2: bool, permit: ConnPermit) -> ConnOpen {
        ctx.shared.connections.fetch_add(1, Ordering::Relaxed);
        let class = conn_class(h2, ctx.tls);
        ctx.metrics.opened(class);
        ConnOpen {
            _guard: ConnGuard(ctx.clone(), class),
            _permit: permit,
        }
    }
}

/// The service of one connection: every request goes to
/// [`service::handle`], and its response body keeps the request in flight
/// (see [`Tracked`]).
#[derive(Clone)]
struct ConnService {
    ctx: Arc<ConnCtx>,
    hsts: Option<http::HeaderValue>,
    activity: Arc<Activity>,
    /// HTTP/1 only: HTTP/2 has no `Connection` header (draining sends GOAWAY).
    close_when_draining: bool,
}

type ConnResponse = Result<http::Response<Tracked>, Infallible>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for ConnService {
    type Response = http::Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = ConnResponse> + Send>>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let ctx = self.ctx.clone();
        let hsts = self.hsts.clone();
        let close_when_draining = self.close_when_draining;
        let in_flight = self.activity.begin();
        // Boxed per request: hyper keeps the slot for a connection's
        // request future for the connection's whole life, so an inline future
        // (~5 KB) would cost every idle keep-alive connection that much.
        Box::pin(async move {
            let mut resp = service::handle(&ctx, req).await;
            if let Some(v) = hsts {
                resp.headers_mut()
                    .insert(http::header::STRICT_TRANSPORT_SECURITY, v);
            }
            // Draining: hyper closes the connection after this response.
            if close_when_draining
                && (ctx.shared.is_draining() || in_flight.0.close_soon.load(Ordering::Relaxed))
                && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(resp.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// hyper's HTTP/1 server with the listener's limits.
fn http1_builder(spec: &ListenerSpec) -> hyper::server::conn::http1::Builder {
    let mut h1 = hyper::server::conn::http1::Builder::new();
    // The head deadline is StrictIo's (hyper's would also bound the idle
    // wait between requests, and costs a timer per request).
    h1.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(spec.max_header_bytes)
        .max_headers(spec.max_headers);
    h1
}

/// When a connection accepted now reaches `max_connection_lifetime`.
fn lifetime_end(spec: &ListenerSpec) -> Option<tokio::time::Instant> {
    spec.max_connection_lifetime
        .map(|t| tokio::time::Instant::now() + t)
}

/// Serves one accepted connection with hyper's HTTP/2 server (`h2`: the
/// client sent the prior-knowledge preface, or chose `h2` by ALPN) or its
/// HTTP/1 server, until it closes, its lifetime ends, or the gateway shuts
/// down. (The protocol is chosen here rather than by hyper-util's auto
/// builder: explicit, and one wrapper less around every HTTP/1 socket.)
/// Plain-text HTTP/1 connections are served by [`serve_plain_http1`].
pub async fn serve_connection<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    spec: Arc<ListenerSpec>,
    permit: ConnPermit,
    h2: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = ConnOpen::new(&ctx, h2, permit);
    let activity = Activity::new();
    let svc = ConnService {
        ctx: ctx.clone(),
        hsts: spec.tls.hsts.clone(),
        activity: activity.clone(),
        close_when_draining: !h2,
    };
    let end = lifetime_end(&spec);
    if h2 {
        // Builders are scoped so they are not kept across the await, and
        // the HTTP/2 connection (several KB of state) is boxed: only HTTP/2
        // connections pay for it, not every connection task.
        let conn = {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(spec.max_concurrent_streams)
                .max_header_list_size(spec.max_header_bytes.min(u32::MAX as usize) as u32)
                // Rapid reset (CVE-2023-44487): a client that keeps resetting
                // streams it opened, or provoking resets, is sent GOAWAY.
                .max_pending_accept_reset_streams(Some(spec.max_concurrent_streams as usize * 2))
                .max_local_error_reset_streams(Some(1024));
            b.serve_connection(TokioIo::new(io), svc)
        };
        return Box::pin(drive(conn, &ctx, &spec, &activity, false, end, None)).await;
    }
    let io = crate::strict::io::StrictIo::new(
        io,
        spec.max_header_bytes,
        spec.header_read_timeout,
        Some(activity.clone()),
    );
    let conn = http1_builder(&spec)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    drive(conn, &ctx, &spec, &activity, true, end, None).await
}

/// A plain-text HTTP/1 keep-alive connection idle for this long (no request
/// in flight, no head arriving) is *parked*: hyper's connection, with its
/// read and write buffers (8 KiB each), is dropped and only the socket is
/// kept until the client sends its next request, which a new hyper
/// connection then serves. Thousands of idle keep-alive clients then cost
/// little more than their sockets (nginx frees its buffers the same way).
/// Long enough that a busy connection never parks between two requests.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Serves a plain-text HTTP/1 connection as [`serve_connection`] does, and
/// parks it whenever it has been idle for [`PARK_AFTER`] (see
/// `strict::io::StrictIo` for how hyper is made to let go of the socket).
/// Timeouts, lifetime and draining apply to a parked connection as to an
/// idle one.
pub async fn serve_plain_http1(
    stream: tokio::net::TcpStream,
    ctx: Arc<ConnCtx>,
    spec: Arc<ListenerSpec>,
    permit: ConnPermit,
) {
    let _open = ConnOpen::new(&ctx, false, permit);
    let activity = Activity::new();
    let svc = ConnService {
        ctx: ctx.clone(),
        hsts: None,
        activity: activity.clone(),
        close_when_draining: true,
    };
    let end = lifetime_end(&spec);
    let slot: crate::strict::io::ParkSlot<tokio::net::TcpStream> = Arc::new(Mutex::new(None));
    let mut stream = stream;
    let mut resumed = false;
    loop {
        let io = crate::strict::io::StrictIo::new(
            stream,
            spec.max_header_bytes,
            spec.header_read_timeout,
            Some(activity.clone()),
        )
        .with_park_slot(slot.clone(), resumed);
        // Boxed: a parked connection's task keeps none of hyper's state.
        let conn = Box::pin(
            http1_builder(&spec)
                .serve_connection(TokioIo::new(io), svc.clone())
                .with_upgrades(),
        );
        drive(conn, &ctx, &spec, &activity, true, end, Some(PARK_AFTER)).await;
        let parked = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(parked) = parked else {
            return;
        };
        activity.clear_park_request();
        ctx.metrics.set_parked(true);
        let resume = wait_parked(&parked, &ctx, &spec, &activity, end).await;
        ctx.metrics.set_parked(false);
        if !resume {
            tracing::debug!(peer = %ctx.peer, "parked connection closed");
            return;
        }
        stream = parked;
        resumed = true;
    }
}

/// A parked connection waits here for its client's next request: `true`
/// when bytes have arrived (serve it again), `false` when it is to be
/// closed — the client closed it, it stayed idle for `idle_timeout`, or the
/// gateway is shutting down or the connection reached its lifetime (then,
/// as for an idle HTTP/1 connection, after [`DRAIN_IDLE_GRACE`], so that a
/// request already on its way is still served, with `Connection: close`).
async fn wait_parked(
    stream: &tokio::net::TcpStream,
    ctx: &ConnCtx,
    spec: &ListenerSpec,
    activity: &Activity,
    lifetime_end: Option<tokio::time::Instant>,
) -> bool {
    let mut phase = ctx.shared.phase.subscribe();
    let mut watching = true;
    let mut closing = false;
    let idle = idle_wait(activity, spec.idle_timeout);
    tokio::pin!(idle);
    let lifetime = until(lifetime_end);
    tokio::pin!(lifetime);
    let mut byte = [0u8; 1];
    loop {
        if watching {
            match *phase.borrow_and_update() {
                Phase::Closed => return false,
                Phase::Draining if !closing => {
                    closing = true;
                    activity.touch();
                    idle.set(idle_wait(activity, Some(DRAIN_IDLE_GRACE)));
                }
                _ => {}
            }
        }
        tokio::select! {
            r = stream.peek(&mut byte) => return matches!(r, Ok(n) if n > 0),
            _ = &mut idle => return false,
            _ = &mut lifetime, if !closing => {
                closing = true;
                activity.close_soon.store(true, Ordering::Relaxed);
                activity.touch();
                idle.set(idle_wait(activity, Some(DRAIN_IDLE_GRACE)));
            }
            changed = phase.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                }
            }
        }
    }
}

/// Sleeps until `t`; never without one.
async fn until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A served connection that can be asked to finish gracefully.
trait Graceful: Future {
    fn graceful(self: Pin<&mut Self>);
}

impl<C: Graceful + ?Sized> Graceful for Pin<Box<C>> {
    fn graceful(self: Pin<&mut Self>) {
        self.get_mut().as_mut().graceful()
    }
}

impl<I, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Tracked>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Tracked>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Runs a connection to its end, asking it to finish gracefully at its
/// maximum lifetime (the in-flight request completes), once it has been idle
/// for the listener's `idle_timeout`, or when draining starts: HTTP/2 at once
/// (GOAWAY), HTTP/1 (`http1`) once it has had no request in flight for
/// [`DRAIN_IDLE_GRACE`] — until then each response carries `Connection:
/// close`, so a busy connection closes after its response. A connection
/// still idle one more period after being asked to close is dropped, and at
/// [`Phase::Closed`] every connection is.
///
/// With `park_after` (plain HTTP/1), a connection idle that long is asked to
/// park (see [`serve_plain_http1`]): it then ends like a closed one, and the
/// caller finds its socket in the park slot.
async fn drive<C, E>(
    conn: C,
    ctx: &ConnCtx,
    spec: &ListenerSpec,
    activity: &Activity,
    http1: bool,
    lifetime_end: Option<tokio::time::Instant>,
    park_after: Option<Duration>,
) where
    C: Graceful<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut phase = ctx.shared.phase.subscribe();
    // Accepted as draining started: `changed` would not report it.
    let mut seen = Phase::Serving;
    let mut now = *phase.borrow_and_update();
    tokio::pin!(conn);
    let lifetime = until(lifetime_end);
    tokio::pin!(lifetime);
    let idle = idle_wait(activity, spec.idle_timeout);
    tokio::pin!(idle);
    let park = park_wait(activity, park_after, false);
    tokio::pin!(park);
    // Draining or past its lifetime (HTTP/1): never parked again.
    let mut winding_down = false;
    let mut closing = false;
    let mut watching = true;
    // Past `max_connection_lifetime`.
    let mut old = false;
    loop {
        if now != seen {
            seen = now;
            match now {
                Phase::Closed => {
                    tracing::debug!(peer = %ctx.peer, "drain deadline: connection dropped");
                    break;
                }
                Phase::Draining if !closing && !http1 => {
                    closing = true;
                    conn.as_mut().graceful();
                }
                Phase::Draining if !closing => {
                    // At least a whole grace from now: a client that was
                    // idle may be sending its next request right now.
                    winding_down = true;
                    activity.touch();
                    idle.set(idle_wait(activity, Some(DRAIN_IDLE_GRACE)));
                }
                _ => {}
            }
        }
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %ctx.peer, error = %e, "connection ended with an error");
                }
                break;
            }
            changed = phase.changed(), if watching => {
                match changed {
                    Ok(()) => now = *phase.borrow_and_update(),
                    Err(_) => watching = false,
                }
            }
            _ = &mut lifetime, if !closing && !old => {
                old = true;
                if http1 {
                    // As when draining: the next response closes it, an
                    // idle connection goes after a grace.
                    winding_down = true;
                    activity.close_soon.store(true, Ordering::Relaxed);
                    activity.touch();
                    idle.set(idle_wait(activity, Some(DRAIN_IDLE_GRACE)));
                } else {
                    closing = true;
                    conn.as_mut().graceful();
                }
            }
            _ = &mut park, if !closing && !winding_down => {
                // The next poll of `conn` reads end of stream if the
                // connection is between requests (StrictIo decides); if
                // not, asked again one period later.
                activity.request_park();
                park.set(park_wait(activity, park_after, true));
            }
            _ = &mut idle => {
                if closing {
                    // Asked to finish (GOAWAY, drain) and still there after
                    // another idle period with nothing in flight: a client
                    // that ignores GOAWAY's PING, say.
                    tracing::debug!(peer = %ctx.peer, "idle after being asked to close: dropped");
                    break;
                }
                tracing::debug!(peer = %ctx.peer, "idle: closing the connection");
                closing = true;
                conn.as_mut().graceful();
                activity.touch();
                idle.set(idle_wait(activity, spec.idle_timeout));
            }
        }
    }
}

/// Returns once the connection has been idle (nothing in flight, no head
/// arriving) for `limit`: sleeps until it may have been, re-checks, and so
/// on (one timer per period, not per request). Never with no limit.
async fn idle_wait(activity: &Activity, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let wait = match activity.idle_for() {
            Some(idle) if idle >= limit => return,
            Some(idle) => limit - idle,
            None => limit,
        };
        tokio::time::sleep(wait).await;
    }
}

/// Returns once the connection has been idle for `after` (never without
/// it); with `again`, no sooner than `after` from now.
async fn park_wait(activity: &Activity, after: Option<Duration>, again: bool) {
    let Some(after) = after else {
        return std::future::pending().await;
    };
    if again {
        tokio::time::sleep(after).await;
    }
    idle_wait(activity, Some(after)).await
}

/// Polls the config file and the files it names (through symlinks, so
/// editors' rename-on-save and Kubernetes ConfigMap and Secret swaps are
/// seen) and reloads when one of them changes. A file missing for a moment
/// (being replaced) is looked at again on the next tick.
async fn watch_config(shared: Arc<Shared>, path: PathBuf) {
    // What was last seen of each watched file. A file not seen yet (named
    // by a snapshot compiled since) is compared with its stamp when it was
    // read, so a change between that read and now is not missed.
    let mut seen: HashMap<PathBuf, Option<inputs::Stamp>> = HashMap::new();
    seen.insert(path.clone(), inputs::stamp(&path));
    let mut shutdown = shared.phase.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = shutdown.changed() => break,
        }
        if !shared.snapshot.load().watch_config {
            continue;
        }
        // The config file is always in `seen`: its stamp when read is unused.
        let watched = std::iter::once((path.clone(), None)).chain(shared.watched_inputs());
        let mut changed = None;
        let mut next = HashMap::with_capacity(seen.len());
        for (file, when_read) in watched {
            let before = seen.get(&file).copied().unwrap_or(when_read);
            let now = inputs::stamp(&file);
            if now.is_some() && now != before {
                changed.get_or_insert_with(|| file.clone());
                next.insert(file, now);
            } else {
                next.insert(file, before);
            }
        }
        seen = next;
        if let Some(file) = changed {
            if let Err(e) = shared.reload() {
                tracing::error!("{} changed but the reload was rejected; the previous configuration keeps serving:\n{e}", file.display());
            }
        }
    }
}

/// An upgrade under way: the new process's pid once it serves, or why not.
type Upgrading = Pin<Box<dyn Future<Output = Result<u32, String>>>>;

/// Serves `path` until SIGTERM/SIGINT; SIGHUP and file changes reload;
/// SIGUSR2 upgrades the binary ([`upgrade`]). `launch` says what SIGUSR2
/// starts and what a parent process handed over, if this process is the
/// new one of an upgrade. Returns once drained, after SIGTERM/SIGINT or a
/// completed upgrade.
pub async fn serve_file(
    path: &Path,
    snapshot: Snapshot,
    launch: upgrade::Launch,
) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let upgrade::Launch {
        relaunch,
        mut inherited,
    } = launch;
    // Handlers first: until they are installed, each of these signals would
    // kill the process (signals received while starting wait their turn).
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(|e| e.to_string())?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
    let running = start_with(snapshot, Some(path.to_path_buf()), &mut inherited)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(watch_config(running.shared.clone(), path.to_path_buf()));
    if inherited.is_upgrade() {
        // The unit follows the new process (`NotifyAccess=all`) before the
        // old one, told next, drains and exits.
        notify::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        inherited.signal_ready();
        tracing::info!(
            pid = std::process::id(),
            "upgrade: serving; the old process drains"
        );
    } else {
        notify::notify("READY=1");
    }
    drop(inherited);

    let mut upgrading: Option<Upgrading> = None;
    let handed_over = loop {
        tokio::select! {
            _ = hup.recv() => {
                notify::notify(&notify::reloading());
                match running.shared.reload() {
                    Ok(()) => notify::notify("READY=1"),
                    Err(e) => {
                        tracing::error!("reload rejected, previous configuration keeps serving:\n{e}");
                        notify::notify(&format!("READY=1\n{}", notify::status("reload rejected; the previous configuration keeps serving (see the log)")));
                    }
                }
            }
            _ = usr2.recv() => {
                if upgrading.is_some() {
                    tracing::warn!("SIGUSR2 ignored: an upgrade is already in progress");
                } else if let Some(relaunch) = relaunch.clone() {
                    tracing::info!(binary = %relaunch.exe.display(), "SIGUSR2: upgrading: starting the binary with the listening sockets");
                    let timeout = running.shared.snapshot.load().upgrade_timeout;
                    upgrading = Some(Box::pin(upgrade::hand_over(running.shared.clone(), relaunch, timeout)));
                } else {
                    tracing::error!("SIGUSR2 ignored: the path of this binary is unknown, cannot upgrade");
                }
            }
            r = async { upgrading.as_mut().expect("guarded").await }, if upgrading.is_some() => {
                upgrading = None;
                match r {
                    Ok(pid) => {
                        tracing::info!(new_pid = pid, "upgrade: the new process serves; this one stops accepting and drains");
                        break true;
                    }
                    Err(e) => {
                        tracing::error!("upgrade failed, this process keeps serving: {e}");
                        notify::notify(&notify::status(&format!("upgrade failed: {e}")));
                    }
                }
            }
            _ = usr1.recv() => {
                if !running.shared.access_log.reopen() {
                    tracing::info!("SIGUSR1: no access log file to reopen");
                }
            }
            _ = term.recv() => break false,
            _ = int.recv() => break false,
        }
    };
    if upgrading.take().is_some() {
        tracing::warn!("upgrade abandoned: shutting down; the new process was stopped");
    }
    if handed_over {
        // The new process serves the admin API on the same socket; this one
        // must not answer `/readyz` with "draining" for the service.
        if let Some(b) = running.shared.admin.lock().ok().and_then(|mut a| a.take()) {
            let _ = b.stop.send(true);
        }
    } else {
        // Not after a hand-over: the unit now follows the new process.
        notify::notify("STOPPING=1");
    }
    let drain = running.shared.snapshot.load().drain_timeout;
    tracing::info!(drain = ?drain, "shutting down: draining connections");
    running.shutdown(drain).await;
    // The access log writes in batches: what is queued goes out first.
    let shared = running.shared.clone();
    let _ =
        tokio::task::spawn_blocking(move || shared.access_log.flush(Duration::from_secs(2))).await;
    tracing::info!("drained; exiting");
    Ok(())
}

/// Starts the config-file watcher for a gateway started with [`start`].
pub fn watch(running: &Running) {
    if let Some(path) = running.shared.config_path.clone() {
        tokio::spawn(watch_config(running.shared.clone(), path));
    }
}

#[cfg(test)]
mod size_tests {
    fn size_of_future<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every plain connection's task holds this future for the connection's
    /// whole life, parked or not: it is most of what an idle keep-alive
    /// connection costs (hyper's state is boxed and dropped when parked).
    #[test]
    fn connection_task_stays_small() {
        let plain = size_of_future::<
            tokio::net::TcpStream,
            std::sync::Arc<super::ConnCtx>,
            std::sync::Arc<super::ListenerSpec>,
            super::ConnPermit,
            _,
        >(super::serve_plain);
        eprintln!("plain connection future: {plain} bytes");
        // 1272 in a debug build (2104 with the listener settings by value
        // and the HTTP/2 path inline); release builds are smaller.
        assert!(
            plain <= 1408,
            "plain connection future grew to {plain} bytes"
        );
    }
}
