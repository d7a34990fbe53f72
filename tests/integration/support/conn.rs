//! Lower-level clients: a raw TCP HTTP/1.1 connection (for exchanges a
//! high-level client hides: `Expect: 100-continue`, bodyless responses on a
//! kept-alive connection), a hyper connection that sends streamed bodies, and
//! a deterministic pattern body for transfers far larger than any buffer.

use super::upstream::TestBody;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any single read in these helpers (a hang guard, not a
/// timing assertion).
pub const GUARD: Duration = Duration::from_secs(20);

/// Awaits `f`, panicking with `what` if it takes longer than [`GUARD`].
pub async fn guard<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ------------------------------------------------------------ raw TCP client

/// A parsed response head.
#[derive(Debug)]
pub struct RawHead {
    pub status: u16,
    /// Lower-cased names, in wire order.
    pub headers: Vec<(String, String)>,
}

impl RawHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One TCP connection speaking HTTP/1.1 by hand.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = guard("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        guard("write", self.stream.write_all(bytes))
            .await
            .expect("write");
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = guard("bytes from the gateway", self.stream.read(&mut chunk))
            .await
            .expect("read");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one response head (status line and headers).
    pub async fn read_head(&mut self) -> RawHead {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                let text = String::from_utf8(head).expect("UTF-8 response head");
                let mut lines = text.split("\r\n");
                let status_line = lines.next().unwrap_or("");
                let mut parts = status_line.splitn(3, ' ');
                assert_eq!(
                    parts.next(),
                    Some("HTTP/1.1"),
                    "status line: {status_line:?}"
                );
                let status = parts
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("status line: {status_line:?}"));
                let headers = lines
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (n, v) = l.split_once(':').expect("header line");
                        (n.trim().to_ascii_lowercase(), v.trim().to_string())
                    })
                    .collect();
                return RawHead { status, headers };
            }
            assert!(self.fill().await > 0, "connection closed before a head");
        }
    }

    /// Reads the body of a response whose framing is given by `head`
    /// (content-length or chunked; `bodyless` for HEAD/204/304 answers).
    pub async fn read_body(&mut self, head: &RawHead, bodyless: bool) -> Vec<u8> {
        if bodyless {
            return Vec::new();
        }
        if head
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let line = self.read_line().await;
                let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                    .expect("chunk size");
                if size == 0 {
                    // Trailers until an empty line.
                    while !self.read_line().await.is_empty() {}
                    return body;
                }
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await > 0, "closed inside a chunk");
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
            }
        }
        let len: usize = head
            .header("content-length")
            .map(|v| v.parse().expect("content-length"))
            .unwrap_or(0);
        while self.buf.len() < len {
            assert!(self.fill().await > 0, "closed inside a body");
        }
        self.buf.drain(..len).collect()
    }

    async fn read_line(&mut self) -> String {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            assert!(self.fill().await > 0, "closed inside a line");
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ------------------------------------------------- streaming hyper client

/// Sends one request with a streamed body on a fresh connection and returns
/// the response as soon as its head arrives (the body streams on).
pub async fn send_streaming(addr: SocketAddr, req: Request<TestBody>) -> Response<Incoming> {
    let stream = guard("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx.send_request(req).await.expect("response head")
}

// ------------------------------------------------------------ pattern body

/// Length of the repeating pattern; prime, so it never lines up with
/// buffer or chunk sizes and a lost, duplicated or reordered chunk shows.
pub const PATTERN_LEN: usize = 100_003;

/// The pattern twice in a row, so any window of up to `PATTERN_LEN` bytes
/// starting anywhere in the pattern is one contiguous slice.
fn pattern2() -> &'static Bytes {
    static P: OnceLock<Bytes> = OnceLock::new();
    P.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut v = Vec::with_capacity(PATTERN_LEN * 2);
        for _ in 0..PATTERN_LEN {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push((x >> 24) as u8);
        }
        v.extend_from_within(..PATTERN_LEN);
        Bytes::from(v)
    })
}

/// A body of `len` pattern bytes made on the fly in `chunk`-sized frames,
/// without a known length (sent chunked).
pub struct PatternBody {
    sent: u64,
    len: u64,
    chunk: usize,
}

impl PatternBody {
    pub fn new(len: u64, chunk: usize) -> PatternBody {
        assert!(chunk <= PATTERN_LEN);
        PatternBody {
            sent: 0,
            len,
            chunk,
        }
    }
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.sent >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.sent).min(self.chunk as u64) as usize;
        let start = (self.sent % PATTERN_LEN as u64) as usize;
        self.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(pattern2().slice(start..start + n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        // Unknown on purpose: the body goes chunked.
        SizeHint::default()
    }
}

/// Checks a received stream against the pattern: counts bytes and compares
/// every byte with the value expected at its offset (stronger than a
/// checksum: any lost, duplicated, reordered or corrupted byte shows).
#[derive(Default)]
pub struct PatternCheck {
    pub bytes: u64,
    pub mismatches: u64,
}

impl PatternCheck {
    pub fn feed(&mut self, mut data: &[u8]) {
        let p = pattern2();
        while !data.is_empty() {
            let start = (self.bytes % PATTERN_LEN as u64) as usize;
            let n = data.len().min(PATTERN_LEN);
            if data[..n] != p[start..start + n] {
                self.mismatches += 1;
            }
            self.bytes += n as u64;
            data = &data[n..];
        }
    }

    pub fn intact(&self, len: u64) -> bool {
        self.bytes == len && self.mismatches == 0
    }
}

/// The resident set size of this process (the in-process gateway included).
pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Response headers as a comparable multimap, minus `skip`.
pub fn header_multimap(
    h: &HeaderMap,
    skip: &[&str],
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut m = std::collections::BTreeMap::new();
    for name in h.keys() {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let vals = h
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        m.insert(name.as_str().to_string(), vals);
    }
    m
}

impl RawConn {
    /// Reads until the gateway closes the connection (EOF or reset) and
    /// returns whatever it sent first.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        loop {
            let mut chunk = [0u8; 4096];
            match guard("the gateway to close", self.stream.read(&mut chunk)).await {
                Ok(0) | Err(_) => return std::mem::take(&mut self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

impl RawConn {
    /// Writes without panicking: an error means the peer closed.
    pub async fn try_write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let r = self.stream.write_all(bytes).await;
        if r.is_ok() {
            // A reset often shows only on the next read: peek for EOF.
            let mut probe = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), self.stream.peek(&mut probe)).await
            {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        r
    }
}
