//! HTTP/2 by hand: frames written byte by byte, for abuse a real client
//! would never send (rapid reset, CONTINUATION floods), and for upstreams
//! that do what a library server will not on cue (GOAWAY with a chosen
//! `last_stream_id`).

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
/// SETTINGS and PING acknowledgement.
pub const ACK: u8 = 0x1;

/// RST_STREAM / GOAWAY error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One frame as read off the wire.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// For GOAWAY: the error code.
    pub fn goaway_code(&self) -> Option<u32> {
        (self.kind == GOAWAY && self.payload.len() >= 8)
            .then(|| u32::from_be_bytes(self.payload[4..8].try_into().unwrap()))
    }
}

/// Encodes one frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut v = Vec::with_capacity(9 + payload.len());
    v.extend_from_slice(&len.to_be_bytes()[1..]);
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A GOAWAY frame: the last stream the sender processes, and the error code.
pub fn goaway(last_stream: u32, code: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(8);
    p.extend_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    frame(GOAWAY, 0, 0, &p)
}

/// A complete `200` answer to `stream`: one HEADERS frame with `:status:
/// 200` (HPACK static index 8) that ends the stream.
pub fn ok_response(stream: u32) -> Vec<u8> {
    frame(HEADERS, END_HEADERS | END_STREAM, stream, &[0x88])
}

/// An HPACK block for `GET {path}` on `authority` (static-table indices and
/// literals without indexing, so blocks can be repeated or dropped freely).
pub fn get_block(authority: &str, path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    literal(&mut b, 4, path); // :path
    literal(&mut b, 1, authority); // :authority
    b
}

/// An HPACK literal header field without indexing, with an indexed name.
pub fn literal(b: &mut Vec<u8>, name_index: u8, value: &str) {
    assert!(name_index < 15 && value.len() < 127);
    b.push(name_index);
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
}

/// An HPACK literal header field without indexing, with a new name.
pub fn literal_named(b: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    b.push(0);
    b.push(name.len() as u8);
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
}

/// A raw HTTP/2 connection that has sent the preface and its SETTINGS.
pub struct RawH2 {
    pub stream: TcpStream,
}

impl RawH2 {
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(PREFACE).await.unwrap();
        stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        RawH2 { stream }
    }

    /// Writes `bytes`; an error means the server has closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads frames until the server closes the connection (or `limit`
    /// passes: the returned flag says whether it closed).
    pub async fn frames_until_close(&mut self, limit: Duration) -> (Vec<Frame>, bool) {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(limit, async {
            let mut chunk = [0u8; 16384];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .is_ok();
        (parse(&buf), closed)
    }
}

/// The server's side of a raw HTTP/2 connection: the client's preface has
/// been read and the server's (empty) SETTINGS sent. [`RawServer::next`]
/// acknowledges SETTINGS and PINGs itself.
pub struct RawServer {
    stream: TcpStream,
    buf: Vec<u8>,
    frames: std::collections::VecDeque<Frame>,
}

impl RawServer {
    pub async fn accept(mut stream: TcpStream) -> std::io::Result<RawServer> {
        let mut preface = [0u8; PREFACE.len()];
        stream.read_exact(&mut preface).await?;
        if preface != PREFACE {
            return Err(std::io::Error::other("not an HTTP/2 connection preface"));
        }
        stream.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        Ok(RawServer {
            stream,
            buf: Vec::new(),
            frames: Default::default(),
        })
    }

    /// The client's next frame; `None` once it closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.frames.pop_front() {
                // A SETTINGS acknowledgement is empty; a PING's echoes it.
                let reply = match (f.kind, f.flags & ACK) {
                    (SETTINGS, 0) => Some(frame(SETTINGS, ACK, 0, &[])),
                    (PING, 0) => Some(frame(PING, ACK, 0, &f.payload)),
                    _ => None,
                };
                if let Some(reply) = reply {
                    self.stream.write_all(&reply).await.ok()?;
                }
                return Some(f);
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
            let whole = parse(&self.buf);
            let used: usize = whole.iter().map(|f| 9 + f.payload.len()).sum();
            self.buf.drain(..used);
            self.frames.extend(whole);
        }
    }

    /// Writes `bytes`; an error means the client has closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Closes gracefully: ends the server's side, then reads (and drops)
    /// what the client still sends until it closes too, at most `limit`
    /// (closing with unread bytes would reset the connection and could
    /// destroy frames the client has not read yet).
    pub async fn close(mut self, limit: Duration) {
        let _ = self.stream.shutdown().await;
        let _ = tokio::time::timeout(limit, async {
            let mut chunk = [0u8; 16384];
            while let Ok(n) = self.stream.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// Splits bytes into whole frames (a trailing partial frame is dropped).
pub fn parse(mut b: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
        if b.len() < 9 + len {
            break;
        }
        out.push(Frame {
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes(b[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload: b[9..9 + len].to_vec(),
        });
        b = &b[9 + len..];
    }
    out
}
