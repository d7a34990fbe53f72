//! Layer 2 of strict HTTP/1.1: a wrapper around the client connection that
//! reads each raw request head before hyper parses it, and refuses the
//! shapes hyper accepts but hides from the gateway once parsed:
//!
//! - `Content-Length` together with `Transfer-Encoding` (hyper removes the
//!   length, frames the body as chunked, and closes after the response);
//! - `Content-Length` repeated with equal values (hyper keeps one).
//!
//! A refused head never reaches hyper: in its place hyper reads a byte it
//! cannot parse, answers its own `400 Bad Request` and closes the connection
//! (bytes before the refused head, such as earlier pipelined requests, are
//! served normally). Nothing after it is read.
//!
//! To find each head the wrapper follows the message framing exactly as hyper
//! does (the same `httparse` parser for heads, the same rules for
//! `Content-Length` and chunked bodies). Whatever hyper would refuse on its
//! own (a head `httparse` rejects, an invalid length or chunk) and whatever
//! is not HTTP/1 any more (after an `Upgrade` or `CONNECT` request, an
//! HTTP/2 preface, a head over the size limit) switches the wrapper off for
//! the rest of the connection: it then passes bytes through untouched and
//! hyper's own handling applies.
//!
//! Cost: a head that arrives in one read (nearly all of them) is checked
//! where it lies in hyper's buffer, without copying; only a head split across
//! reads is held until complete. Body bytes are counted, not copied (chunked
//! bodies: their size lines are parsed).

use super::Violation;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// What hyper reads instead of a refused head: a method cannot start with
/// NUL, so hyper answers `400` and closes.
const POISON: &[u8] = b"\0\r\n\r\n";

/// Largest chunk size hyper accepts is `u64::MAX`; largest length `u64::MAX - 2`.
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// First hex digit of a size line.
    Start,
    Size,
    /// Whitespace after the size.
    SizeLws,
    Extension,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line or the final CRLF.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a request head.
    Head,
    /// `n` bytes of a `Content-Length` body left.
    Body(u64),
    /// A chunked body, with the size of the chunk being read.
    Chunked(Chunk, u64),
    /// Not checking any more: everything passes.
    Off,
    /// A head was refused: nothing more passes.
    Refused,
}

/// The sans-I/O part of [`StrictIo`]: follows the request framing of one
/// connection and judges each head.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// A head split across reads, held until its end arrives.
    held: Vec<u8>,
    /// Progress towards the blank line ending the held head: 1 after `\n`,
    /// 2 after `\n\r`.
    nl: u8,
    max_head: usize,
    /// Heads passed on so far.
    heads: u64,
}

impl Scanner {
    /// `max_head`: heads longer than this are left to hyper (which refuses
    /// them with 431 when they exceed its own limit).
    pub fn new(max_head: usize) -> Scanner {
        Scanner {
            state: State::Head,
            held: Vec::new(),
            nl: 0,
            max_head,
            heads: 0,
        }
    }

    /// Whether part of a head has arrived and its end has not.
    pub fn head_pending(&self) -> bool {
        self.state == State::Head && !self.held.is_empty()
    }

    /// How many request heads have been passed on.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Whether the bytes so far end exactly after a complete request (head
    /// and body): what hyper reads next starts a new request.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Head && self.held.is_empty()
    }

    /// Whether checking stopped for good (bytes pass untouched).
    pub fn is_off(&self) -> bool {
        self.state == State::Off
    }

    /// Whether a head was refused (nothing more passes).
    pub fn is_refused(&self) -> bool {
        self.state == State::Refused
    }

    /// Processes `data` in place: returns how many leading bytes may be
    /// handed to hyper as they are. Stops at a head that is not complete in
    /// `data`, or that is refused; the rest must go through [`Scanner::feed`].
    pub fn advance(&mut self, data: &[u8]) -> usize {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Off => return data.len(),
                State::Refused => return i,
                State::Head if !self.held.is_empty() => return i,
                State::Head => {
                    // hyper (httparse) skips empty lines before a request.
                    while i < data.len() && matches!(data[i], b'\r' | b'\n') {
                        i += 1;
                    }
                    if i == data.len() {
                        return i;
                    }
                    let mut nl = 0;
                    let Some(len) = find_head_end(&data[i..], &mut nl) else {
                        return i;
                    };
                    match judge(&data[i..i + len]) {
                        Ok(next) => {
                            self.state = next;
                            self.heads += 1;
                            i += len;
                        }
                        Err(_) => return i,
                    }
                }
                State::Body(n) => {
                    let k = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += k;
                    let left = n - k as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::Chunked(Chunk::Data(n), size) => {
                    let k = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += k;
                    let left = n - k as u64;
                    let c = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    };
                    self.state = State::Chunked(c, size);
                }
                State::Chunked(c, size) => {
                    self.state = chunk_step(c, size, data[i]);
                    i += 1;
                }
            }
        }
        i
    }

    /// Processes `data` that cannot be handed on in place: appends what may
    /// go to hyper to `out` and holds an incomplete head. Returns the
    /// violation when a head is refused (`out` then ends with bytes hyper
    /// refuses, and nothing more passes).
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Option<Violation> {
        while !data.is_empty() {
            if self.state == State::Refused {
                return None;
            }
            if self.state != State::Head || self.held.is_empty() {
                let k = self.advance(data);
                out.extend_from_slice(&data[..k]);
                data = &data[k..];
                if data.is_empty() || self.state != State::Head {
                    continue;
                }
            }
            // A head that is incomplete in `data` (or refused): hold it up
            // to its end.
            match find_head_end(data, &mut self.nl) {
                None => {
                    self.held.extend_from_slice(data);
                    if self.held.len() > self.max_head {
                        // Too large to check: hyper decides (431).
                        out.append(&mut self.held);
                        self.state = State::Off;
                    }
                    return None;
                }
                Some(end) => {
                    self.held.extend_from_slice(&data[..end]);
                    data = &data[end..];
                    self.nl = 0;
                    let head = std::mem::take(&mut self.held);
                    match judge(&head) {
                        Ok(next) => {
                            out.extend_from_slice(&head);
                            self.state = next;
                            self.heads += 1;
                        }
                        Err(v) => {
                            out.extend_from_slice(POISON);
                            self.state = State::Refused;
                            return Some(v);
                        }
                    }
                }
            }
        }
        None
    }

    /// The peer closed: releases a held partial head (hyper reports it).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.held);
    }
}

/// Length of the head at the start of `data` up to and including the blank
/// line that ends it (`\n\n` or `\n\r\n`; httparse accepts bare LF), with
/// `nl` carrying progress over from earlier bytes. `None`: not in `data`.
fn find_head_end(data: &[u8], nl: &mut u8) -> Option<usize> {
    for (i, &b) in data.iter().enumerate() {
        *nl = match (b, *nl) {
            (b'\n', 1 | 2) => return Some(i + 1),
            (b'\n', _) => 1,
            (b'\r', 1) => 2,
            _ => 0,
        };
    }
    None
}

/// Judges one complete head: the state that follows it, or the violation.
fn judge(head: &[u8]) -> Result<State, Violation> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => examine(&req),
        Err(httparse::Error::TooManyHeaders) => {
            // Every header line takes at least three bytes (`a:\n`).
            let mut headers = vec![httparse::EMPTY_HEADER; head.len() / 3 + 1];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(head) {
                Ok(httparse::Status::Complete(n)) if n == head.len() => examine(&req),
                _ => Ok(State::Off),
            }
        }
        // hyper refuses it too (or it is not HTTP/1): let hyper answer.
        _ => Ok(State::Off),
    }
}

fn examine(req: &httparse::Request<'_, '_>) -> Result<State, Violation> {
    let http11 = req.version == Some(1);
    let mut upgrade = req.method == Some("CONNECT");
    let mut cl_count = 0;
    let mut cl_value: &[u8] = b"";
    let mut te_count = 0;
    let mut te_chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cl_count += 1;
            cl_value = h.value;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_count += 1;
            // As hyper: the last line decides, by its last coding.
            te_chunked = std::str::from_utf8(h.value).is_ok_and(|s| {
                s.rsplit(',')
                    .next()
                    .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
            });
        } else if h.name.eq_ignore_ascii_case("upgrade") && http11 {
            upgrade = true;
        }
    }
    if cl_count > 0 && te_count > 0 {
        return Err(Violation::ContentLengthWithTransferEncoding);
    }
    if cl_count > 1 {
        return Err(Violation::RepeatedContentLength);
    }
    if upgrade {
        // Possibly not HTTP/1 after this request.
        return Ok(State::Off);
    }
    if te_count > 0 {
        return Ok(if http11 && te_chunked {
            State::Chunked(Chunk::Start, 0)
        } else {
            State::Off
        });
    }
    if cl_count == 1 {
        return Ok(match parse_decimal(cl_value) {
            Some(0) => State::Head,
            Some(n) if n <= MAX_CONTENT_LENGTH => State::Body(n),
            _ => State::Off,
        });
    }
    Ok(State::Head)
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if !super::is_decimal(v) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// One byte of chunked framing, as hyper's decoder reads it. Anything hyper
/// refuses switches checking off (hyper fails the body and closes).
fn chunk_step(c: Chunk, size: u64, b: u8) -> State {
    use Chunk::*;
    let next = match (c, b) {
        (Start, _) => match hex(b) {
            Some(d) => return State::Chunked(Size, d),
            None => return State::Off,
        },
        (Size, _) if hex(b).is_some() => {
            return match size.checked_mul(16).and_then(|s| s.checked_add(hex(b)?)) {
                Some(s) => State::Chunked(Size, s),
                None => State::Off,
            }
        }
        (Size | SizeLws, b'\t' | b' ') => SizeLws,
        (Size | SizeLws, b';') => Extension,
        (Size | SizeLws | Extension, b'\r') => SizeLf,
        (Extension, b'\n') => return State::Off,
        (Extension, _) => Extension,
        (SizeLf, b'\n') if size == 0 => EndCr,
        (SizeLf, b'\n') => Data(size),
        (DataCr, b'\r') => DataLf,
        (DataLf, b'\n') => Start,
        (EndCr, b'\r') => EndLf,
        (EndCr | Trailer, b'\n') => return State::Off,
        (EndCr | Trailer, _) if b != b'\r' => Trailer,
        (Trailer, b'\r') => TrailerLf,
        (TrailerLf, b'\n') => EndCr,
        (EndLf, b'\n') => return State::Head,
        _ => return State::Off,
    };
    State::Chunked(next, size)
}

/// Where a parked connection's socket goes (see [`StrictIo::with_park_slot`]).
pub type ParkSlot<T> = Arc<std::sync::Mutex<Option<T>>>;

/// A client connection whose request heads are checked before hyper reads
/// them (see the module documentation). Writes pass through untouched.
///
/// **Parking.** With a park slot, an idle keep-alive connection can give
/// hyper's buffers back: once the server has asked it to
/// ([`crate::server::Activity::request_park`]) and the connection is
/// exactly between two requests — every request answered, no byte of the
/// next one read, no response bytes waiting to be written — a read reports
/// end of stream. hyper takes that as the client closing an idle connection
/// and shuts the connection down; that shutdown moves the socket, untouched
/// and still open, into the slot instead. The server then waits for the
/// socket to become readable and serves it again with a new hyper
/// connection (`server::serve_plain_http1`).
pub struct StrictIo<T> {
    /// `None` once parked.
    inner: Option<T>,
    scan: Scanner,
    /// Bytes released by the scanner that the reader has not taken yet.
    ready: Vec<u8>,
    taken: usize,
    header_timeout: Duration,
    /// Armed while a head is awaited within `header_timeout`: the first
    /// one from the start, later ones from their first byte. Dropped
    /// otherwise, so an idle connection holds no timer.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Told whether a head is arriving (the connection's idle timeout must
    /// not cut it).
    activity: Option<Arc<crate::server::Activity>>,
    park_slot: Option<ParkSlot<T>>,
    /// End of stream was reported to park the connection: the next
    /// shutdown parks it rather than closing it.
    parking: bool,
    /// The last write to the socket did not complete: hyper holds response
    /// bytes, so the connection must not park.
    write_blocked: bool,
}

/// The socket is gone (parked): hyper is not expected to touch it again.
fn parked_error() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection parked")
}

impl<T> StrictIo<T> {
    /// `max_head`: see [`Scanner::new`] (the listener's header size limit).
    /// `header_timeout`: the longest a request head may take to arrive
    /// (slowloris): from now for the first head, from its first byte for
    /// later ones on a kept-alive connection; past it reads fail with
    /// `TimedOut` and hyper closes the connection.
    pub fn new(
        inner: T,
        max_head: usize,
        header_timeout: Duration,
        activity: Option<Arc<crate::server::Activity>>,
    ) -> StrictIo<T> {
        StrictIo {
            inner: Some(inner),
            scan: Scanner::new(max_head),
            ready: Vec::new(),
            taken: 0,
            header_timeout,
            deadline: Some(Box::pin(tokio::time::sleep(header_timeout))),
            activity,
            park_slot: None,
            parking: false,
            write_blocked: false,
        }
    }

    /// Enables parking (see the type's documentation; needs an activity).
    /// `resumed`: the connection was parked before, so it is idle between
    /// requests now (no first-head deadline from the start: the server
    /// resumes it once bytes have arrived, and hyper's state is fresh).
    pub fn with_park_slot(mut self, slot: ParkSlot<T>, resumed: bool) -> StrictIo<T> {
        self.park_slot = Some(slot);
        if resumed {
            self.deadline = None;
        }
        self
    }

    /// Whether to report end of stream now, to park (see the type's docs).
    fn should_park(&self) -> bool {
        let Some(a) = &self.activity else {
            return false;
        };
        self.park_slot.is_some()
            && !self.write_blocked
            && self.scan.heads() > 0
            && self.scan.at_boundary()
            && self.taken == self.ready.len()
            && a.park_requested()
            && a.is_idle()
    }

    fn io(&mut self) -> io::Result<&mut T> {
        self.inner.as_mut().ok_or_else(parked_error)
    }

    /// Arms or drops the head deadline after the scanner has seen new bytes.
    fn update_deadline(&mut self) {
        let pending = self.scan.head_pending();
        if let Some(a) = &self.activity {
            a.set_head_pending(pending);
        }
        if pending {
            if self.deadline.is_none() {
                self.deadline = Some(Box::pin(tokio::time::sleep(self.header_timeout)));
            }
        } else if self.scan.heads() > 0 || self.scan.is_off() {
            self.deadline = None;
        }
    }

    /// Best effort, before the connection is closed: tells the client why
    /// with the standard `408` (no response is in progress while a head is
    /// awaited). A write that cannot complete at once is abandoned.
    fn answer_timeout(&mut self, cx: &mut Context<'_>)
    where
        T: AsyncWrite + Unpin,
    {
        let e = crate::error::GatewayError::new(
            crate::error::ErrorKind::RequestTimeout,
            format!(
                "request headers not received within {:?} (header_read_timeout)",
                self.header_timeout
            ),
        );
        let raw = e.to_raw_http1(&crate::server::service::new_request_id());
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        if let Poll::Ready(Ok(n)) = Pin::new(&mut *inner).poll_write(cx, &raw) {
            if n == raw.len() {
                let _ = Pin::new(inner).poll_flush(cx);
            }
        }
    }

    /// Whether the head deadline has passed (registers for its wake-up).
    fn head_timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.deadline {
            Some(d) if !self.scan.is_off() => d.as_mut().poll(cx).is_ready(),
            _ => false,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for StrictIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.taken < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.taken);
                buf.put_slice(&this.ready[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.ready.len() {
                    this.ready = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.scan.is_refused() {
                // End of stream for hyper, after the 400 it answers.
                return Poll::Ready(Ok(()));
            }
            if this.scan.is_off() {
                return Pin::new(this.io()?).poll_read(cx, buf);
            }
            if this.should_park() {
                this.parking = true;
                return Poll::Ready(Ok(()));
            }
            let start = buf.filled().len();
            match Pin::new(this.io()?).poll_read(cx, buf) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    if this.head_timed_out(cx) {
                        this.deadline = None;
                        tracing::debug!("request head not received within header_read_timeout");
                        this.answer_timeout(cx);
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not received within header_read_timeout",
                        )));
                    }
                    return Poll::Pending;
                }
            }
            let end = buf.filled().len();
            if end == start {
                // The peer closed: hand over a held partial head, then EOF.
                this.scan.finish(&mut this.ready);
                if this.ready.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if let Some(a) = &this.activity {
                a.clear_park_request();
            }
            let new = &buf.filled()[start..];
            let k = this.scan.advance(new);
            if k < new.len() {
                if let Some(v) = this.scan.feed(&new[k..], &mut this.ready) {
                    tracing::debug!(violation = %v, "refused a request head");
                }
                buf.set_filled(start + k);
            }
            if this.deadline.is_some() || this.scan.head_pending() {
                this.update_deadline();
            }
            if k > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StrictIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(this.io()?).poll_write(cx, buf);
        this.write_blocked = r.is_pending();
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(this.io()?).poll_write_vectored(cx, bufs);
        this.write_blocked = r.is_pending();
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(this.io()?).poll_flush(cx);
        if r.is_pending() {
            this.write_blocked = true;
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.parking {
            // Parked, not closed: the socket goes to the server, open.
            if let (Some(io), Some(slot)) = (this.inner.take(), this.park_slot.as_ref()) {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(io);
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(this.io()?).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `input` through a scanner in pieces of `step` bytes, the way
    /// `StrictIo` does; returns what hyper would read and the violation.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Option<Violation>) {
        let mut s = Scanner::new(64 * 1024);
        let mut out = Vec::new();
        let mut refused = None;
        for piece in input.chunks(step.max(1)) {
            if s.is_refused() {
                break;
            }
            let k = s.advance(piece);
            out.extend_from_slice(&piece[..k]);
            if k < piece.len() {
                if let Some(v) = s.feed(&piece[k..], &mut out) {
                    refused = Some(v);
                }
            }
        }
        s.finish(&mut out);
        (out, refused)
    }

    /// Every split of the input gives the same result.
    #[track_caller]
    fn all_splits(input: &[u8]) -> (Vec<u8>, Option<Violation>) {
        let whole = run(input, input.len());
        for step in [1, 2, 3, 5, 7, 16] {
            assert_eq!(run(input, step), whole, "step {step}");
        }
        whole
    }

    #[track_caller]
    fn passes(input: &[u8]) {
        let (out, v) = all_splits(input);
        assert_eq!(v, None);
        assert_eq!(out, input);
    }

    #[track_caller]
    fn refuses(input: &[u8], before: &[u8], want: Violation) {
        let (out, v) = all_splits(input);
        assert_eq!(v, Some(want));
        let mut expected = before.to_vec();
        expected.extend_from_slice(POISON);
        assert_eq!(out, expected);
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n";

    #[test]
    fn ordinary_traffic_passes_untouched() {
        passes(GET);
        passes(b"GET /a HTTP/1.1\nhost: x\n\n");
        passes(b"\r\n\r\nGET /a HTTP/1.1\r\nhost: x\r\n\r\n");
        passes(b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello");
        passes(b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        passes(b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n");
        // A partial head at the end of the stream is handed over for hyper.
        passes(b"GET /a HTTP/1.1\r\nhost:");
    }

    #[test]
    fn refused_shapes() {
        refuses(
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"",
            Violation::ContentLengthWithTransferEncoding,
        );
        refuses(
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"",
            Violation::ContentLengthWithTransferEncoding,
        );
        refuses(
            b"POST /a HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
            b"",
            Violation::RepeatedContentLength,
        );
    }

    #[test]
    fn framing_is_followed_across_pipelined_requests() {
        // Bodies that look like requests are skipped, not judged.
        let mut s = Vec::new();
        let body = b"GET /x HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n";
        s.extend_from_slice(
            format!(
                "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        s.extend_from_slice(body);
        s.extend_from_slice(GET);
        s.extend_from_slice(b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n");
        s.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        s.extend_from_slice(body);
        s.extend_from_slice(b"\r\n0\r\n\r\n");
        passes(&s);

        // The bad head after good ones: the good ones pass, then poison.
        let good = s.clone();
        s.extend_from_slice(b"POST /d HTTP/1.1\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n");
        s.extend_from_slice(GET);
        refuses(&s, &good, Violation::RepeatedContentLength);
    }

    #[test]
    fn unparseable_or_non_http1_switches_off() {
        // hyper refuses these itself; the scanner steps aside.
        passes(b"\0\0\0 garbage\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n");
        passes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04");
        passes(b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nPOST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n");
        // After an upgrade request the connection may carry anything.
        passes(b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\x81\x05hello\r\n\r\n");
        passes(b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\nanything\n\n");
    }

    #[test]
    fn oversized_heads_are_left_to_hyper() {
        let mut s = Scanner::new(32);
        let mut out = Vec::new();
        let head = b"GET / HTTP/1.1\r\nx-long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n";
        let (a, b) = head.split_at(40);
        assert_eq!(s.advance(a), 0);
        assert_eq!(s.feed(a, &mut out), None);
        assert!(s.is_off());
        assert_eq!(s.advance(b), b.len());
    }

    #[test]
    fn many_headers_are_parsed() {
        let mut h = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..300 {
            h.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        let mut bad = h.clone();
        h.extend_from_slice(b"\r\n");
        passes(&h);
        bad.extend_from_slice(b"content-length: 1\r\ncontent-length: 1\r\n\r\n");
        refuses(&bad, b"", Violation::RepeatedContentLength);
    }

    /// A socket stand-in: reads hand out `input` once, writes succeed
    /// unless `blocked`.
    struct Mock {
        input: Vec<u8>,
        blocked: bool,
        shut: bool,
    }

    impl AsyncRead for Mock {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.input.is_empty() {
                return Poll::Pending;
            }
            let n = buf.remaining().min(this.input.len());
            buf.put_slice(&this.input[..n]);
            this.input.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Mock {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.blocked {
                Poll::Pending
            } else {
                Poll::Ready(Ok(buf.len()))
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// What one `poll_read` gives: `Some(bytes)` (empty = end of stream)
    /// or `None` (pending).
    fn read_once(io: &mut StrictIo<Mock>) -> Option<Vec<u8>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut space = [0u8; 256];
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(io).poll_read(&mut cx, &mut buf) {
            Poll::Ready(r) => {
                r.unwrap();
                Some(buf.filled().to_vec())
            }
            Poll::Pending => None,
        }
    }

    fn write_once(io: &mut StrictIo<Mock>) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(io)
            .poll_write(&mut cx, b"HTTP/1.1 200 OK\r\n")
            .is_ready()
    }

    fn parkable(input: &[u8]) -> (StrictIo<Mock>, Arc<crate::server::Activity>, ParkSlot<Mock>) {
        let activity = crate::server::Activity::new();
        let slot: ParkSlot<Mock> = Arc::new(std::sync::Mutex::new(None));
        let mock = Mock {
            input: input.to_vec(),
            blocked: false,
            shut: false,
        };
        let io = StrictIo::new(
            mock,
            64 * 1024,
            Duration::from_secs(10),
            Some(activity.clone()),
        )
        .with_park_slot(slot.clone(), false);
        (io, activity, slot)
    }

    #[tokio::test]
    async fn parks_only_between_requests_with_nothing_left_to_write() {
        let (mut io, activity, slot) = parkable(GET);
        assert_eq!(read_once(&mut io).as_deref(), Some(GET));
        activity.request_park();
        // Response bytes still waiting for the socket: no parking.
        io.inner.as_mut().unwrap().blocked = true;
        assert!(!write_once(&mut io));
        assert_eq!(read_once(&mut io), None);
        // Written: the next read reports end of stream, and the shutdown
        // that follows parks the socket, open, in the slot.
        io.inner.as_mut().unwrap().blocked = false;
        assert!(write_once(&mut io));
        assert_eq!(read_once(&mut io), Some(Vec::new()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx).is_ready());
        let parked = slot.lock().unwrap().take().expect("parked");
        assert!(!parked.shut, "the socket was not shut down");
        assert!(io.inner.is_none());
    }

    #[tokio::test]
    async fn never_parks_mid_request_before_the_first_or_unasked() {
        // Mid-body: the request's body has not all arrived.
        let (mut io, activity, _slot) =
            parkable(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc");
        assert!(read_once(&mut io).is_some());
        activity.request_park();
        assert_eq!(read_once(&mut io), None);
        // Before any request.
        let (mut io, activity, _slot) = parkable(b"");
        activity.request_park();
        assert_eq!(read_once(&mut io), None);
        // Not asked to.
        let (mut io, _activity, _slot) = parkable(GET);
        assert!(read_once(&mut io).is_some());
        assert_eq!(read_once(&mut io), None);
        // Asked, but bytes of the next request arrived since: the request
        // is withdrawn.
        let mut two = GET.to_vec();
        two.extend_from_slice(GET);
        let (mut io, activity, _slot) = parkable(&two);
        activity.request_park();
        assert!(read_once(&mut io).is_some_and(|b| !b.is_empty()));
        assert!(!activity.park_requested());
    }

    #[tokio::test]
    async fn hyper_answers_400_for_a_refused_head() {
        use http_body_util::Full;
        use hyper_util::rt::TokioIo;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (client, server) = tokio::io::duplex(64 * 1024);
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = calls.clone();
        let svc = hyper::service::service_fn(move |_req| {
            c2.fetch_add(1, Ordering::SeqCst);
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            }
        });
        let server = tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
            TokioIo::new(StrictIo::new(
                server,
                64 * 1024,
                Duration::from_secs(10),
                None,
            )),
            svc,
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        wr.write_all(GET).await.unwrap();
        wr.write_all(
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("HTTP/1.1 400 Bad Request"), "{text}");
        assert_eq!(text.matches("HTTP/1.1").count(), 2, "{text}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "only the first request was served"
        );
        let _ = server.await;
    }
}
