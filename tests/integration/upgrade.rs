//! The real `portico` binary as a process: SIGUSR2 binary upgrades (under
//! load, with a bad config, with a bad binary), SIGTERM draining under
//! keep-alive load, and the systemd notifications. Every process runs on a
//! loopback port picked by the test; every loop is bounded in count and time.

use super::support::client;
use super::support::upstream::{self, response};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Hang guard for waits on a process (not a timing assertion).
const WAIT: Duration = Duration::from_secs(20);

/// A directory of its own for each test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portico-upgrade-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Listener `main` on `port`; `/version` answers `version`, everything else
/// is proxied to `upstream`. No file watcher: the running process keeps the
/// configuration it has, so an answer tells which process gave it.
fn config(port: u16, upstream: SocketAddr, version: &str, extra: &str) -> String {
    format!(
        "watch_config: false\ndrain_timeout: 5s\n{extra}listeners:\n  - name: main\n    address: 127.0.0.1:{port}\nupstreams:\n  - name: up\n    targets: [{{address: '{upstream}'}}]\nroutes:\n  - name: version\n    match: {{path: /version}}\n    action: {{respond: {{status: 200, body: {version}}}}}\n  - name: proxied\n    action: {{proxy: {{upstream: up}}}}\n"
    )
}

/// A `portico run` process, its standard error captured line by line (the
/// processes it starts on SIGUSR2 share it). Dropping it kills it and every
/// process it was seen to start.
struct Portico {
    child: Child,
    log: Arc<Mutex<String>>,
    started: Vec<u32>,
}

impl Portico {
    fn spawn(binary: &Path, config: &Path, env: &[(&str, &str)]) -> Portico {
        let args = [
            Path::new("run").as_os_str(),
            Path::new("--config").as_os_str(),
            config.as_os_str(),
        ];
        let (child, log) = super::support::process::spawn(binary.as_os_str(), &args, env);
        Portico {
            child,
            log,
            started: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` `times` times.
    async fn wait_log(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + WAIT;
        while self.log().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "no `{needle}` (×{times}) in the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    async fn exited(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process still running:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The pid of the process the next completed upgrade started (the
    /// first not yet read). Waits for its log line: the log is read from
    /// the process's stderr by another thread (a whole line at a time) and
    /// may lag its exit.
    async fn upgraded_pid(&mut self) -> u32 {
        const NEEDLE: &str = "new_pid=";
        let nth = self.started.len();
        self.wait_log(NEEDLE, nth + 1).await;
        let log = self.log();
        let (at, _) = log.match_indices(NEEDLE).nth(nth).unwrap();
        let pid = log[at + NEEDLE.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no pid after `{NEEDLE}` (#{}):\n{log}", nth + 1));
        self.started.push(pid);
        pid
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in &self.started {
            if alive(*pid) {
                signal(*pid, "KILL");
            }
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -s {sig} {pid}");
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) state ...`; comm may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

async fn wait_gone(pid: u32) {
    let deadline = Instant::now() + WAIT;
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One GET on `c`: the status and body, or why it failed.
async fn try_get(c: &client::TestClient, url: &str) -> Result<(u16, String), String> {
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .map_err(|_| "no answer within 10s".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .map_err(|_| "body did not end within 10s".to_string())?
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GET on a fresh client, retried until the gateway answers (start-up).
async fn get_when_up(url: &str) -> (u16, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        match try_get(&client::new(), url).await {
            Ok(r) => return r,
            Err(e) => assert!(Instant::now() < deadline, "{url}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(url: &str) -> (u16, String) {
    try_get(&client::new(), url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// A strict keep-alive client: one connection at a time (hyper's own HTTP/1
/// client connection, no pool, no retry), replaced only after a response
/// that said `Connection: close`. A connection the gateway closes without
/// saying so fails the next request, even one that was not sent yet.
struct StrictClient {
    addr: SocketAddr,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl StrictClient {
    async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        let r = tokio::time::timeout(Duration::from_secs(10), self.exchange(path))
            .await
            .unwrap_or_else(|_| Err("no answer within 10s".into()));
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn exchange(&mut self, path: &str) -> Result<(u16, String), String> {
        let sender = match &mut self.conn {
            Some(sender) => sender,
            None => {
                let stream = tokio::net::TcpStream::connect(self.addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(conn);
                self.conn.insert(sender)
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("keep-alive connection closed without Connection: close: {e}"))?;
        let req = Request::get(path)
            .header(http::header::HOST, "gateway")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let close = resp
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        if close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Concurrent strict keep-alive clients sending requests until stopped (or
/// a per-client cap), counting answers and failures.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    ok: AtomicUsize,
    /// Set just before SIGTERM: from then on, new connections may be refused,
    /// so requests on connections opened after it are not judged. Requests
    /// on connections opened before it all must succeed.
    cutoff: AtomicBool,
    /// Requests on connections opened after `cutoff`.
    unjudged: AtomicUsize,
    /// Connections the clients opened (each after a `Connection: close`).
    connections: AtomicUsize,
    failures: Mutex<Vec<String>>,
    versions: Mutex<Vec<String>>,
}

/// Per-client cap on requests: bounds the loop whatever the timing.
const MAX_REQUESTS_PER_CLIENT: usize = 20_000;

impl Load {
    fn start(
        self: &Arc<Self>,
        addr: SocketAddr,
        clients: usize,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..clients)
            .map(|i| {
                let load = self.clone();
                tokio::spawn(async move {
                    let mut c = StrictClient { addr, conn: None };
                    let mut opened_after_cutoff = false;
                    for n in 0..MAX_REQUESTS_PER_CLIENT {
                        if load.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let path = if (n + i) % 2 == 0 {
                            "/version"
                        } else {
                            "/api/n"
                        };
                        if c.conn.is_none() {
                            load.connections.fetch_add(1, Ordering::SeqCst);
                            opened_after_cutoff = load.cutoff.load(Ordering::SeqCst);
                        }
                        let r = c.get(path).await;
                        if opened_after_cutoff {
                            load.unjudged.fetch_add(1, Ordering::SeqCst);
                            if r.is_err() {
                                // Refused once the listener is closed: stop.
                                break;
                            }
                            continue;
                        }
                        match r {
                            Ok((200, body)) if path == "/version" => {
                                load.ok.fetch_add(1, Ordering::SeqCst);
                                load.versions.lock().unwrap().push(body);
                            }
                            Ok((200, body)) if body == "upstream" => {
                                load.ok.fetch_add(1, Ordering::SeqCst);
                            }
                            other => load
                                .failures
                                .lock()
                                .unwrap()
                                .push(format!("client {i}, request {n}, {path}: {other:?}")),
                        }
                    }
                })
            })
            .collect()
    }

    async fn finish(&self, clients: Vec<tokio::task::JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        for c in clients {
            tokio::time::timeout(WAIT, c)
                .await
                .expect("load client ends")
                .unwrap();
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrade_under_keep_alive_load_fails_no_request() {
    let up = upstream::fixed(200, "upstream").await;
    let dir = temp_dir("load");
    let path = dir.join("portico.yaml");
    let port = free_port();
    // With an admin listener: its socket is handed over too.
    let admin_port = free_port();
    let admin = format!("admin: {{address: '127.0.0.1:{admin_port}'}}\n");
    std::fs::write(&path, config(port, up.addr, "v1", &admin)).unwrap();
    let mut old = Portico::spawn(Path::new(env!("CARGO_BIN_EXE_portico")), &path, &[]);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        get_when_up(&format!("{base}/version")).await,
        (200, "v1".into())
    );

    let load = Arc::new(Load::default());
    let clients = load.start(([127, 0, 0, 1], port).into(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = load.ok.load(Ordering::SeqCst);
    assert_eq!(load.connections.load(Ordering::SeqCst), 4, "kept alive");

    // The new process reads the changed file; the old one keeps `v1`.
    std::fs::write(&path, config(port, up.addr, "v2", &admin)).unwrap();
    old.signal("USR2");
    let status = old.exited().await;
    assert!(status.success(), "old process: {status}\n{}", old.log());
    let new_pid = old.upgraded_pid().await;
    assert_ne!(new_pid, old.pid());
    assert!(alive(new_pid), "the new process runs");

    // Keep going after the old process is gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.finish(clients).await;

    let failures = load.failures();
    let ok = load.ok.load(Ordering::SeqCst);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:#?}\n{}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(10)],
        old.log()
    );
    assert!(
        before > 0 && ok > before,
        "load ran before and after: {before}, {ok}"
    );
    let versions = load.versions.lock().unwrap().clone();
    assert!(
        versions.iter().all(|v| v == "v1" || v == "v2"),
        "{versions:?}"
    );
    assert!(versions.contains(&"v1".to_string()));
    assert_eq!(versions.last().map(String::as_str), Some("v2"));
    // Only the new process answers now.
    for _ in 0..5 {
        assert_eq!(get(&format!("{base}/version")).await, (200, "v2".into()));
    }
    let log = old.log();
    assert!(log.contains("upgrade: using the inherited socket"), "{log}");
    assert!(
        log.contains("listener=(admin)"),
        "the admin socket was handed over: {log}"
    );
    // The new process serves the admin API, ready.
    let (status, _) = get(&format!("http://127.0.0.1:{admin_port}/readyz")).await;
    assert_eq!(status, 200);

    // The new process drains and exits on SIGTERM like any other.
    signal(new_pid, "TERM");
    wait_gone(new_pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_with_a_bad_config_keeps_the_old_process_serving() {
    let up = upstream::fixed(200, "upstream").await;
    let dir = temp_dir("bad-config");
    let path = dir.join("portico.yaml");
    let port = free_port();
    std::fs::write(&path, config(port, up.addr, "v1", "")).unwrap();
    let mut old = Portico::spawn(Path::new(env!("CARGO_BIN_EXE_portico")), &path, &[]);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        get_when_up(&format!("{base}/version")).await,
        (200, "v1".into())
    );

    std::fs::write(
        &path,
        config(port, up.addr, "v2", "").replace("upstream: up}", "upstream: nope}"),
    )
    .unwrap();
    old.signal("USR2");
    old.wait_log("upgrade failed, this process keeps serving", 1)
        .await;
    let log = old.log();
    // The new process's own error (as `portico validate` prints it), then why.
    assert!(log.contains("routes[1].action.proxy.upstream"), "{log}");
    assert!(log.contains("exit status: 1"), "{log}");
    assert!(old.running());
    assert_eq!(get(&format!("{base}/version")).await, (200, "v1".into()));
    assert_eq!(get(&format!("{base}/api")).await, (200, "upstream".into()));

    old.signal("TERM");
    assert!(old.exited().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_with_a_bad_binary_keeps_the_old_process_serving() {
    let up = upstream::fixed(200, "upstream").await;
    let dir = temp_dir("bad-binary");
    let path = dir.join("portico.yaml");
    let port = free_port();
    std::fs::write(&path, config(port, up.addr, "v1", "upgrade_timeout: 1s\n")).unwrap();
    // A copy of the binary, so that the test can replace it.
    let binary = dir.join("portico");
    std::fs::copy(env!("CARGO_BIN_EXE_portico"), &binary).unwrap();
    let mut old = Portico::spawn(&binary, &path, &[]);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        get_when_up(&format!("{base}/version")).await,
        (200, "v1".into())
    );

    // Replaced (a new file at the same path, as an install does).
    let replace = |content: &[u8]| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::remove_file(&binary).unwrap();
        std::fs::write(&binary, content).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    };

    // 1. A binary that fails at once.
    replace(b"#!/bin/sh\necho 'bad binary: refusing to start' >&2\nexit 1\n");
    old.signal("USR2");
    old.wait_log("upgrade failed, this process keeps serving", 1)
        .await;
    let log = old.log();
    assert!(log.contains("bad binary: refusing to start"), "{log}");
    assert!(log.contains("exit status: 1"), "{log}");
    assert_eq!(get(&format!("{base}/version")).await, (200, "v1".into()));

    // 2. One that never serves: killed at upgrade_timeout. A second SIGUSR2
    //    meanwhile is ignored.
    replace(b"#!/bin/sh\nexec sleep 30\n");
    old.signal("USR2");
    old.wait_log("new process started", 2).await;
    old.signal("USR2");
    old.wait_log("SIGUSR2 ignored: an upgrade is already in progress", 1)
        .await;
    old.wait_log("upgrade failed, this process keeps serving", 2)
        .await;
    assert!(
        old.log().contains("did not serve within 1s"),
        "{}",
        old.log()
    );
    assert_eq!(get(&format!("{base}/version")).await, (200, "v1".into()));

    // 3. Not an executable at all.
    replace(b"\x00\x01\x02 not a program");
    old.signal("USR2");
    old.wait_log("upgrade failed, this process keeps serving", 3)
        .await;
    assert!(old.running());
    assert_eq!(get(&format!("{base}/version")).await, (200, "v1".into()));
    assert_eq!(get(&format!("{base}/api")).await, (200, "upstream".into()));

    old.signal("TERM");
    assert!(old.exited().await.success(), "{}", old.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_keep_alive_load_finishes_started_requests_and_exits_0() {
    let up = upstream::start(|req: Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            return response(200, "slow");
        }
        response(200, "upstream")
    })
    .await;
    let dir = temp_dir("sigterm");
    let path = dir.join("portico.yaml");
    let port = free_port();
    std::fs::write(&path, config(port, up.addr, "v1", "")).unwrap();
    let mut gw = Portico::spawn(Path::new(env!("CARGO_BIN_EXE_portico")), &path, &[]);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        get_when_up(&format!("{base}/version")).await,
        (200, "v1".into())
    );

    let load = Arc::new(Load::default());
    let clients = load.start(([127, 0, 0, 1], port).into(), 4);
    let slow_url = format!("{base}/slow");
    let slow = tokio::spawn(async move { try_get(&client::new(), &slow_url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Connections opened from here on may be refused (the listener closes),
    // as they should be; every request on a connection opened before must
    // be answered, the gateway telling the client to close.
    load.cutoff.store(true, Ordering::SeqCst);
    gw.signal("TERM");
    let status = gw.exited().await;
    assert!(status.success(), "{status}\n{}", gw.log());
    assert_eq!(slow.await.unwrap(), Ok((200, "slow".into())));
    load.finish(clients).await;
    let failures = load.failures();
    assert!(
        failures.is_empty(),
        "requests on connections opened before SIGTERM failed: {failures:#?}\n{}",
        gw.log()
    );
    assert!(load.ok.load(Ordering::SeqCst) > 0);
    // The log is read by a thread: its last lines may arrive after the exit.
    gw.wait_log("shutting down: draining connections", 1).await;
    gw.wait_log("drained; exiting", 1).await;
}

/// The next datagram on `sock`, as text.
async fn next_notification(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
        .await
        .expect("a notification")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_reloading_mainpid_after_upgrade_and_stopping() {
    let up = upstream::fixed(200, "upstream").await;
    let dir = temp_dir("notify");
    let path = dir.join("portico.yaml");
    let port = free_port();
    std::fs::write(&path, config(port, up.addr, "v1", "")).unwrap();
    let socket_path = dir.join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut old = Portico::spawn(
        Path::new(env!("CARGO_BIN_EXE_portico")),
        &path,
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    assert_eq!(next_notification(&sock).await, "READY=1");
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&format!("{base}/version")).await, (200, "v1".into()));

    // SIGHUP: RELOADING=1 with the monotonic time, then READY=1.
    std::fs::write(&path, config(port, up.addr, "v2", "")).unwrap();
    old.signal("HUP");
    let reloading = next_notification(&sock).await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let usec: u64 = reloading.rsplit('=').next().unwrap().parse().unwrap();
    assert!(usec > 0);
    assert_eq!(next_notification(&sock).await, "READY=1");
    assert_eq!(get(&format!("{base}/version")).await, (200, "v2".into()));

    // SIGUSR2: the new process names itself the main process, then the old
    // one exits without a word (no STOPPING=1: the unit follows the new one).
    old.signal("USR2");
    let handover = next_notification(&sock).await;
    let status = old.exited().await;
    assert!(status.success(), "{status}\n{}", old.log());
    let new_pid = old.upgraded_pid().await;
    assert_eq!(handover, format!("MAINPID={new_pid}\nREADY=1"));
    assert!(alive(new_pid));

    // SIGTERM to the new process: STOPPING=1.
    signal(new_pid, "TERM");
    assert_eq!(next_notification(&sock).await, "STOPPING=1");
    wait_gone(new_pid).await;
}

/// logrotate's way: the access log file is renamed, then SIGUSR1 makes the
/// running process reopen it by its path; later lines go to the new file,
/// none is lost.
#[tokio::test]
async fn sigusr1_reopens_the_access_log_file() {
    let up = upstream::fixed(200, "upstream").await;
    let dir = temp_dir("usr1");
    let path = dir.join("portico.yaml");
    let log = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let port = free_port();
    let extra = format!(
        "access_log: {{path: '{}', fields: [path, status]}}\n",
        log.display()
    );
    std::fs::write(&path, config(port, up.addr, "v1", &extra)).unwrap();
    let mut gw = Portico::spawn(Path::new(env!("CARGO_BIN_EXE_portico")), &path, &[]);
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get_when_up(&format!("{base}/version")).await.0, 200);
    assert_eq!(get(&format!("{base}/before")).await.0, 200);
    // Lines are written in batches: wait for the one of `/before`.
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(super::support::eventually(WAIT, || lines(&log).contains("/before")).await);

    std::fs::rename(&log, &rotated).unwrap();
    gw.signal("USR1");
    gw.wait_log("access log reopened", 1).await;
    assert_eq!(get(&format!("{base}/after")).await.0, 200);
    assert!(
        super::support::eventually(WAIT, || lines(&log).contains("/after")).await,
        "the new file gets the new lines"
    );
    let old = lines(&rotated);
    assert!(old.contains("/before") && !old.contains("/after"), "{old}");
    assert!(gw.running());
    gw.signal("TERM");
    assert!(gw.exited().await.success());
}
