//! A real `redis-server` on a free loopback port, for the rate-limit
//! tests: no persistence, killed when dropped, restartable on the same
//! port (outage tests), readable with a client of the test's own (keys,
//! TTLs, counts). A missing binary fails the test. And [`Tap`], a counting
//! relay in front of it, or standing for a Redis that never answers.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisServer { port, child: None };
        r.spawn().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && matches!(s.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server (an outage).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process (`SIGSTOP`): connections are still accepted by
    /// the kernel and commands are buffered, but nothing is answered — a
    /// hung Redis.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run again (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server runs").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill(1)")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Starts it again on the same port (empty).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl RedisServer {
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// A connection of the test's own, to read what the gateway stored.
    pub async fn client(&self) -> ::redis::aio::MultiplexedConnection {
        let c = ::redis::Client::open(self.url()).expect("a Redis URL");
        tokio::time::timeout(
            Duration::from_secs(10),
            c.get_multiplexed_async_connection(),
        )
        .await
        .expect("Redis answers")
        .expect("connected to Redis")
    }

    /// Every key with its remaining time to live in milliseconds, as
    /// `PTTL` reports it (-1: the key never expires), sorted by key.
    pub async fn keys_with_ttl(&self) -> Vec<(String, i64)> {
        let mut c = self.client().await;
        let mut keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .expect("KEYS");
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            let ttl: i64 = ::redis::cmd("PTTL")
                .arg(&k)
                .query_async(&mut c)
                .await
                .expect("PTTL");
            // -2: it expired between KEYS and PTTL.
            if ttl != -2 {
                out.push((k, ttl));
            }
        }
        out
    }

    /// The integer stored at `key` (0 when there is none).
    pub async fn count(&self, key: &str) -> i64 {
        let mut c = self.client().await;
        let v: Option<i64> = ::redis::cmd("GET")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("GET");
        v.unwrap_or(0)
    }
}

/// A TCP relay on a free loopback port standing where the gateway expects
/// Redis, which counts the connections it accepts and the commands clients
/// send through it (by name, upper case): what a gateway asks of Redis,
/// seen from outside.
///
/// - [`Tap::forward`]: relays both ways to a Redis server; when that
///   server is dead, each connection is closed at once (as the server's
///   own port would refuse it).
/// - [`Tap::silent`]: accepts and reads, never answers anything — a Redis
///   hung before it could even greet a client.
/// - [`Tap::hung`]: answers a new connection's handshake (`CLIENT
///   SETINFO`, `PING`) and nothing else — a Redis that accepts clients but
///   hangs on their commands, so each call shows on the wire.
pub struct Tap {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Seen {
    connections: usize,
    commands: Vec<String>,
}

#[derive(Clone, Copy)]
enum Behind {
    Server(SocketAddr),
    Silent,
    Hung,
}

impl Tap {
    pub async fn forward(to: SocketAddr) -> Tap {
        Tap::start(Behind::Server(to)).await
    }

    pub async fn silent() -> Tap {
        Tap::start(Behind::Silent).await
    }

    pub async fn hung() -> Tap {
        Tap::start(Behind::Hung).await
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().connections
    }

    /// Command names received so far, in order.
    pub fn commands(&self) -> Vec<String> {
        self.seen.lock().unwrap().commands.clone()
    }

    /// How many received commands are script calls (`EVALSHA`, `EVAL`).
    pub fn script_calls(&self) -> usize {
        self.commands()
            .iter()
            .filter(|c| *c == "EVALSHA" || *c == "EVAL")
            .count()
    }

    async fn start(behind: Behind) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: every relayed connection ends.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                s.lock().unwrap().connections += 1;
                conns.spawn(relay(client, behind, s.clone()));
            }
        });
        Tap { addr, seen, task }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: tokio::net::TcpStream, behind: Behind, seen: Arc<Mutex<Seen>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let mut parser = Resp::default();
    let mut buf = vec![0u8; 16 * 1024];
    let server = match behind {
        Behind::Server(a) => match tokio::net::TcpStream::connect(a).await {
            Ok(s) => Some(s.into_split()),
            // A dead server: the client's connection closes at once.
            Err(_) => return,
        },
        Behind::Silent | Behind::Hung => None,
    };
    let Some((mut from_server, mut to_server)) = server else {
        // No server: read for ever; `to_client` stays open (not shut down).
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let names = parser.feed(&buf[..n]);
            for name in &names {
                let greeting: &[u8] = match (behind, name.as_str()) {
                    (Behind::Hung, "CLIENT") => b"+OK\r\n",
                    (Behind::Hung, "PING") => b"+PONG\r\n",
                    _ => continue,
                };
                if to_client.write_all(greeting).await.is_err() {
                    return;
                }
            }
            seen.lock().unwrap().commands.extend(names);
        }
    };
    let upstream = async {
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let names = parser.feed(&buf[..n]);
            seen.lock().unwrap().commands.extend(names);
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

/// Splits a client's byte stream into RESP commands (arrays of bulk
/// strings, which is all a Redis client sends).
#[derive(Default)]
struct Resp {
    buf: Vec<u8>,
}

impl Resp {
    /// The names of the commands completed by `data`.
    fn feed(&mut self, data: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(data);
        let mut names = Vec::new();
        while let Some((name, used)) = command(&self.buf) {
            names.push(name);
            self.buf.drain(..used);
        }
        names
    }
}

/// One complete command at the start of `b`: its name and its length.
fn command(b: &[u8]) -> Option<(String, usize)> {
    let (n, mut at) = header(b, 0, b'*')?;
    let mut name = String::new();
    for i in 0..n {
        let (len, start) = header(b, at, b'$')?;
        let end = start + len + 2;
        if b.len() < end {
            return None;
        }
        if i == 0 {
            name = String::from_utf8_lossy(&b[start..start + len]).to_ascii_uppercase();
        }
        at = end;
    }
    Some((name, at))
}

/// `<tag><number>\r\n` at `at`: the number and where the line ends.
fn header(b: &[u8], at: usize, tag: u8) -> Option<(usize, usize)> {
    let rest = b.get(at..)?;
    let first = *rest.first()?;
    assert_eq!(
        first,
        tag,
        "not a RESP command: {:?}",
        String::from_utf8_lossy(rest)
    );
    let eol = rest.windows(2).position(|w| w == b"\r\n")?;
    let n = std::str::from_utf8(&rest[1..eol]).ok()?.parse().ok()?;
    Some((n, at + eol + 2))
}
