//! JSON access logs: one line per request, written by one thread.
//!
//! `snapshot::compile` turns the `access_log` key into a [`Spec`] (fields,
//! sampling, where, buffer size) without any I/O. The server attaches a
//! [`Logger`] to each snapshot before publishing it (`attach`): the spec's
//! fields and sampling plus a [`Sink`] — a bounded channel to a dedicated
//! writer thread that owns the open file (or stdout). A reload keeps the
//! sink when the destination and buffer size are unchanged, and opens a new
//! one otherwise (the old thread drains and exits once the last request of
//! the old configuration is done with it).
//!
//! On the request path: `service::handle` captures an [`Entry`] (method,
//! URI, user agent, `traceparent` trace id) only when the snapshot has a
//! logger; when the request's `Outcome` finishes, [`Logger::log`] decides
//! sampling, writes the line into one `Vec` sized up front and `try_send`s
//! it. A full channel drops the line and counts it
//! (`portico_access_log_dropped_total`): writing never waits. The writer
//! batches lines in a `BufWriter`, flushes whenever the channel is
//! momentarily empty, and reopens its file when asked ([`Sink::reopen`],
//! SIGUSR1) so that logrotate can rename the file and signal.

use crate::config::model;
use crate::net::push_u64;
use crate::outcome::Outcome;
use http::{HeaderValue, Method, Uri};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Every field a line can carry, in the order they are written.
pub const FIELDS: [&str; 16] = [
    "time",
    "request_id",
    "trace_id",
    "client_ip",
    "consumer",
    "route",
    "method",
    "path",
    "status",
    "upstream",
    "duration_ms",
    "upstream_ms",
    "bytes_in",
    "bytes_out",
    "user_agent",
    "error",
];

const F_TIME: u32 = 1 << 0;
const F_REQUEST_ID: u32 = 1 << 1;
const F_TRACE_ID: u32 = 1 << 2;
const F_CLIENT_IP: u32 = 1 << 3;
const F_CONSUMER: u32 = 1 << 4;
const F_ROUTE: u32 = 1 << 5;
const F_METHOD: u32 = 1 << 6;
const F_PATH: u32 = 1 << 7;
const F_STATUS: u32 = 1 << 8;
const F_UPSTREAM: u32 = 1 << 9;
const F_DURATION: u32 = 1 << 10;
const F_UPSTREAM_MS: u32 = 1 << 11;
const F_BYTES_IN: u32 = 1 << 12;
const F_BYTES_OUT: u32 = 1 << 13;
const F_USER_AGENT: u32 = 1 << 14;
const F_ERROR: u32 = 1 << 15;

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// The compiled `access_log` key.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub target: Target,
    /// A bit per [`FIELDS`] entry.
    pub fields: u32,
    /// Share of successful requests logged, in `[0, 1]`.
    pub sample: f64,
    /// Lines the channel holds before dropping.
    pub buffer: usize,
}

/// Compiles `access_log`; `err(path, message)` reports a problem.
pub fn compile(a: &model::AccessLog, mut err: impl FnMut(String, String)) -> Option<Spec> {
    let mut ok = true;
    let target = match a.path.as_str() {
        "stdout" | "-" => Target::Stdout,
        "" => {
            err(
                "access_log.path".into(),
                "must not be empty (a file path or `stdout`)".into(),
            );
            ok = false;
            Target::Stdout
        }
        p => Target::File(PathBuf::from(p)),
    };
    let fields = match &a.fields {
        None => (1u32 << FIELDS.len()) - 1,
        Some(list) => {
            let mut mask = 0u32;
            if list.is_empty() {
                err(
                    "access_log.fields".into(),
                    "must name at least one field (omit it for all)".into(),
                );
                ok = false;
            }
            for (i, f) in list.iter().enumerate() {
                match FIELDS.iter().position(|k| k == f) {
                    Some(bit) if mask & (1 << bit) != 0 => {
                        err(
                            format!("access_log.fields[{i}]"),
                            format!("`{f}` is listed twice"),
                        );
                        ok = false;
                    }
                    Some(bit) => mask |= 1 << bit,
                    None => {
                        err(
                            format!("access_log.fields[{i}]"),
                            format!("unknown field `{f}` (known: {})", FIELDS.join(", ")),
                        );
                        ok = false;
                    }
                }
            }
            mask
        }
    };
    if !(0.0..=1.0).contains(&a.sample) {
        err(
            "access_log.sample".into(),
            format!("must be between 0 and 1 (a ratio), got {}", a.sample),
        );
        ok = false;
    }
    if a.buffer == 0 || a.buffer > 1_000_000 {
        err(
            "access_log.buffer".into(),
            format!("must be between 1 and 1000000 lines, got {}", a.buffer),
        );
        ok = false;
    }
    ok.then_some(Spec {
        target,
        fields,
        sample: a.sample,
        buffer: a.buffer,
    })
}

/// Lines written and dropped, kept by the gateway across sinks.
#[derive(Default)]
pub struct Counters {
    pub lines: AtomicU64,
    pub dropped: AtomicU64,
}

enum Msg {
    Line(Vec<u8>),
    /// Makes the writer look at its reopen flag.
    Wake,
    /// Write out everything queued before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The writer sleeps this long between batches (a line reaches the file
/// within about this), unless the queue fills to half first. Writing in
/// batches means no wake-up of the writer thread, and no `write`, per
/// request.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The channel to one writer thread and its destination.
pub struct Sink {
    target: Target,
    buffer: usize,
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    counters: Arc<Counters>,
    /// Lines queued and not yet taken by the writer (approximate).
    queued: Arc<std::sync::atomic::AtomicUsize>,
    writer: std::thread::Thread,
}

impl Sink {
    /// Opens the destination (so an unwritable path fails here, at start or
    /// reload) and starts the writer thread.
    pub fn open(
        target: Target,
        buffer: usize,
        counters: Arc<Counters>,
    ) -> std::io::Result<Arc<Sink>> {
        let out = Output::open(&target)?;
        let (tx, rx) = sync_channel(buffer);
        let reopen = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = Writer {
            out: BufWriter::with_capacity(64 * 1024, out),
            target: target.clone(),
            reopen: reopen.clone(),
            counters: counters.clone(),
            queued: queued.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(Arc::new(Sink {
            target,
            buffer,
            tx,
            reopen,
            counters,
            queued,
            writer: handle.thread().clone(),
        }))
    }

    /// Queues `line` (a complete line, newline included); when the channel
    /// is full it is dropped and counted.
    #[inline]
    pub fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {
                // The writer sleeps between batches: wake it early when
                // the queue is half full.
                if self.queued.fetch_add(1, Ordering::Relaxed) + 1 == self.buffer.div_ceil(2) {
                    self.writer.unpark();
                }
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Asks the writer to reopen its file (by path) before it writes its
    /// next line: what SIGUSR1 does, after logrotate renamed the file.
    /// Lines queued after this call go to the reopened file.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        let _ = self.tx.try_send(Msg::Wake);
        self.writer.unpark();
    }

    /// Waits (up to `limit`) until every line queued so far is written.
    pub fn flush(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let (ack, done) = std::sync::mpsc::channel();
        let mut msg = Msg::Flush(ack);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    msg = m;
                    self.writer.unpark();
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        self.writer.unpark();
        done.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

enum Output {
    Stdout(std::io::Stdout),
    File(File),
}

impl Output {
    fn open(target: &Target) -> std::io::Result<Output> {
        Ok(match target {
            Target::Stdout => Output::Stdout(std::io::stdout()),
            Target::File(p) => Output::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("access log {}: {e}", p.display()))
                    })?,
            ),
        })
    }
}

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::Stdout(s) => s.lock().write(b),
            Output::File(f) => f.write(b),
        }
    }
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout(s) => s.lock().write_all(b),
            Output::File(f) => f.write_all(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::Stdout(s) => s.lock().flush(),
            Output::File(f) => f.flush(),
        }
    }
}

struct Writer {
    out: BufWriter<Output>,
    target: Target,
    reopen: Arc<AtomicBool>,
    counters: Arc<Counters>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut failing = false;
        // Drains what is queued, flushes, sleeps (never blocks in `recv`:
        // a sender would have to wake it for every line).
        loop {
            let mut lines = 0;
            let mut closed = false;
            loop {
                let msg = match rx.try_recv() {
                    Ok(m) => m,
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                };
                if self.reopen.swap(false, Ordering::AcqRel) {
                    self.do_reopen();
                }
                match msg {
                    Msg::Line(line) => {
                        lines += 1;
                        match self.out.write_all(&line) {
                            Ok(()) => {
                                failing = false;
                                self.counters.lines.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                                if !failing {
                                    tracing::error!("access log: write failed: {e}");
                                    failing = true;
                                }
                            }
                        }
                    }
                    Msg::Wake => {}
                    Msg::Flush(ack) => {
                        let _ = self.out.flush();
                        let _ = ack.send(());
                    }
                }
            }
            if self.reopen.swap(false, Ordering::AcqRel) {
                self.do_reopen();
            }
            if lines > 0 {
                self.queued.fetch_sub(lines, Ordering::Relaxed);
                if let Err(e) = self.out.flush() {
                    if !failing {
                        tracing::error!("access log: write failed: {e}");
                        failing = true;
                    }
                }
            }
            if closed {
                break;
            }
            std::thread::park_timeout(FLUSH_INTERVAL);
        }
        let _ = self.out.flush();
    }

    fn do_reopen(&mut self) {
        if self.target == Target::Stdout {
            return;
        }
        let _ = self.out.flush();
        match Output::open(&self.target) {
            Ok(o) => {
                // The old buffer was flushed above; nothing is lost.
                let old = std::mem::replace(&mut self.out, BufWriter::with_capacity(64 * 1024, o));
                let _ = old.into_inner();
                tracing::info!("access log reopened");
            }
            Err(e) => {
                tracing::error!("access log: reopen failed, keeps writing to the old file: {e}")
            }
        }
    }
}

/// A snapshot's access log: its fields and sampling, and the sink.
pub struct Logger {
    fields: u32,
    /// Successful requests are logged when a random `u64` is below this
    /// (`u64::MAX` with `sample: 1` logs all).
    threshold: u64,
    all: bool,
    pub sink: Arc<Sink>,
}

impl Logger {
    pub fn new(spec: &Spec, sink: Arc<Sink>) -> Logger {
        Logger {
            fields: spec.fields,
            threshold: (spec.sample * u64::MAX as f64) as u64,
            all: spec.sample >= 1.0,
            sink,
        }
    }

    /// Writes the line of a finished request (if sampled) and queues it.
    pub fn log(&self, o: &Outcome, e: &Entry) {
        let error = o.error.is_some() || o.status >= 400 || o.status == 0;
        if !error && !self.all && crate::rand::fast_u64() >= self.threshold {
            return;
        }
        let mut line = Vec::with_capacity(
            512 + e.uri.path().len() + e.user_agent.as_ref().map_or(0, |u| u.len()),
        );
        write_line(&mut line, self.fields, o, e, SystemTime::now());
        self.sink.send(line);
    }
}

/// What the access log needs of a request beyond the `Outcome`, captured
/// when it arrives (only when access logging is on).
pub struct Entry {
    pub logger: Arc<Logger>,
    pub method: Method,
    /// The request target as the client sent it.
    pub uri: Uri,
    pub user_agent: Option<HeaderValue>,
    /// Set from the response (the id the gateway kept or generated).
    pub request_id: Option<HeaderValue>,
    /// Request body bytes read, added by `ClientBody` when it is dropped.
    pub bytes_in: Option<Arc<AtomicU64>>,
    /// The trace id of the request's `traceparent` header; the outcome's
    /// `trace_id` unless tracing set one.
    pub traceparent: Option<[u8; 16]>,
    /// The consumer an `auth` policy identified.
    pub consumer: Option<Arc<str>>,
    /// Authenticated without a configured consumer (logged as `other`).
    pub authenticated: bool,
}

impl Entry {
    pub fn capture(logger: &Arc<Logger>, req: &http::Request<hyper::body::Incoming>) -> Box<Entry> {
        Box::new(Entry {
            logger: logger.clone(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
            request_id: None,
            bytes_in: None,
            traceparent: traceparent_trace_id(req.headers()),
            consumer: None,
            authenticated: false,
        })
    }
}

/// The trace id of a W3C `traceparent` header
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`), if valid and
/// not all zeros.
pub fn traceparent_trace_id(h: &http::HeaderMap) -> Option<[u8; 16]> {
    let v = h.get("traceparent")?.as_bytes();
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' || &v[..2] == b"ff" {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        let hi = hex_val(v[3 + 2 * i])?;
        let lo = hex_val(v[4 + 2 * i])?;
        *b = hi << 4 | lo;
    }
    (id != [0; 16]).then_some(id)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Writes one JSON line (with its newline) into `out`.
pub fn write_line(out: &mut Vec<u8>, fields: u32, o: &Outcome, e: &Entry, now: SystemTime) {
    let mut w = Obj { out, first: true };
    let elapsed = o.start.elapsed();
    if fields & F_TIME != 0 {
        // When the request arrived.
        let at = now.checked_sub(elapsed).unwrap_or(now);
        w.key("time");
        w.out.push(b'"');
        rfc3339_ms(w.out, at);
        w.out.push(b'"');
    }
    if fields & F_REQUEST_ID != 0 {
        if let Some(id) = &e.request_id {
            w.key("request_id");
            w.string(id.as_bytes());
        }
    }
    if fields & F_TRACE_ID != 0 {
        if let Some(t) = &o.trace_id {
            w.key("trace_id");
            w.out.push(b'"');
            for b in t {
                w.out.push(HEX[(b >> 4) as usize]);
                w.out.push(HEX[(b & 15) as usize]);
            }
            w.out.push(b'"');
        }
    }
    if fields & F_CLIENT_IP != 0 {
        if let Some(ip) = o.client_ip {
            w.key("client_ip");
            w.out.push(b'"');
            crate::net::push_ip(w.out, ip);
            w.out.push(b'"');
        }
    }
    if fields & F_CONSUMER != 0 {
        w.key("consumer");
        let name = match (&e.consumer, e.authenticated) {
            (Some(c), _) => c,
            (None, true) => "other",
            (None, false) => "anonymous",
        };
        w.string(name.as_bytes());
    }
    if fields & F_ROUTE != 0 {
        w.key("route");
        w.string(o.route.name.as_bytes());
    }
    if fields & F_METHOD != 0 {
        w.key("method");
        w.string(e.method.as_str().as_bytes());
    }
    if fields & F_PATH != 0 {
        w.key("path");
        let pq = e.uri.path_and_query().map_or("/", |p| p.as_str());
        w.string(pq.as_bytes());
    }
    if fields & F_STATUS != 0 {
        w.key("status");
        push_u64(w.out, u64::from(o.status));
    }
    if fields & F_UPSTREAM != 0 {
        if let Some(up) = &o.upstream {
            w.key("upstream");
            w.out.push(b'"');
            if up.addr.is_ipv6() {
                w.out.push(b'[');
                crate::net::push_ip(w.out, up.addr.ip());
                w.out.push(b']');
            } else {
                crate::net::push_ip(w.out, up.addr.ip());
            }
            w.out.push(b':');
            push_u64(w.out, u64::from(up.addr.port()));
            w.out.push(b'"');
        }
    }
    if fields & F_DURATION != 0 {
        w.key("duration_ms");
        ms(w.out, elapsed);
    }
    if fields & F_UPSTREAM_MS != 0 {
        if let Some(t) = o.upstream.and_then(|u| u.took) {
            w.key("upstream_ms");
            ms(w.out, t);
        }
    }
    if fields & F_BYTES_IN != 0 {
        w.key("bytes_in");
        let n = e.bytes_in.as_ref().map_or(0, |b| b.load(Ordering::Relaxed));
        push_u64(w.out, n);
    }
    if fields & F_BYTES_OUT != 0 {
        w.key("bytes_out");
        push_u64(w.out, o.bytes_out);
    }
    if fields & F_USER_AGENT != 0 {
        if let Some(ua) = &e.user_agent {
            w.key("user_agent");
            w.string(ua.as_bytes());
        }
    }
    if fields & F_ERROR != 0 {
        let code = match (o.error, o.status) {
            (Some(k), _) => Some(k.code()),
            (None, 0) => Some("cancelled"),
            _ => None,
        };
        if let Some(code) = code {
            w.key("error");
            w.string(code.as_bytes());
        }
    }
    w.out.extend_from_slice(b"}\n");
}

const HEX: &[u8; 16] = b"0123456789abcdef";

struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl Obj<'_> {
    fn key(&mut self, k: &str) {
        self.out.push(if self.first { b'{' } else { b',' });
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A JSON string of `s`: escapes quotes, backslashes and control
    /// characters; bytes that are not UTF-8 become U+FFFD.
    fn string(&mut self, s: &[u8]) {
        self.out.push(b'"');
        match std::str::from_utf8(s) {
            Ok(s) => escape(self.out, s),
            Err(_) => escape(self.out, &String::from_utf8_lossy(s)),
        }
        self.out.push(b'"');
    }
}

fn escape(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    // Nearly always nothing to escape: one pass, one copy.
    if !b
        .iter()
        .any(|&c| c < 0x20 || c == b'"' || c == b'\\' || c == 0x7f)
    {
        out.extend_from_slice(b);
        return;
    }
    let mut from = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&b[from..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{:04x}", c);
        } else {
            out.extend_from_slice(esc);
        }
        from = i + 1;
    }
    out.extend_from_slice(&b[from..]);
}

/// Milliseconds with microsecond precision, e.g. `12.345`.
fn ms(out: &mut Vec<u8>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, us / 1000);
    out.push(b'.');
    push_padded(out, us % 1000, 3);
}

/// `n` with at least `width` digits, zero-padded.
fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let start = out.len();
    push_u64(out, n);
    let len = out.len() - start;
    if len < width {
        out.splice(start..start, std::iter::repeat_n(b'0', width - len));
    }
}

/// `2024-05-01T12:34:56.789Z`.
fn rfc3339_ms(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(days as i64);
    push_padded(out, y.max(0) as u64, 4);
    out.push(b'-');
    push_padded(out, u64::from(m), 2);
    out.push(b'-');
    push_padded(out, u64::from(dd), 2);
    out.push(b'T');
    push_padded(out, rem / 3600, 2);
    out.push(b':');
    push_padded(out, rem % 3600 / 60, 2);
    out.push(b':');
    push_padded(out, rem % 60, 2);
    out.push(b'.');
    push_padded(out, u64::from(d.subsec_millis()), 3);
    out.push(b'Z');
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The server's side: builds each snapshot's logger, keeping the sink
/// across reloads when its destination and size did not change.
pub struct Attach {
    current: Mutex<Option<Arc<Sink>>>,
    counters: Arc<Counters>,
}

impl Attach {
    /// Sinks count into `counters` (the gateway's, `GatewayMetrics::access_log`).
    pub fn new(counters: Arc<Counters>) -> Attach {
        Attach {
            current: Mutex::new(None),
            counters,
        }
    }

    /// The logger for a snapshot with access log `spec`; opens a new sink
    /// when the destination or buffer size changed.
    pub fn logger(&self, spec: Option<&Spec>) -> std::io::Result<Option<Arc<Logger>>> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let Some(spec) = spec else {
            *cur = None;
            return Ok(None);
        };
        let sink = match cur.as_ref() {
            Some(s) if s.target == spec.target && s.buffer == spec.buffer => s.clone(),
            _ => Sink::open(spec.target.clone(), spec.buffer, self.counters.clone())?,
        };
        *cur = Some(sink.clone());
        Ok(Some(Arc::new(Logger::new(spec, sink))))
    }

    /// At exit: waits (up to `limit`) for the current sink's queued lines
    /// to be written.
    pub fn flush(&self, limit: std::time::Duration) {
        let cur = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(s) = cur {
            if !s.flush(limit) {
                tracing::warn!("access log: not every line could be written before exit");
            }
        }
    }

    /// SIGUSR1: the current sink reopens its file.
    pub fn reopen(&self) -> bool {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match cur.as_ref() {
            Some(s) => {
                s.reopen();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::metrics::RouteMetrics;
    use std::time::Instant;

    #[test]
    fn dates() {
        let mut v = Vec::new();
        rfc3339_ms(
            &mut v,
            UNIX_EPOCH + Duration::from_millis(1_714_566_896_789),
        );
        assert_eq!(String::from_utf8(v).unwrap(), "2024-05-01T12:34:56.789Z");
        let mut v = Vec::new();
        rfc3339_ms(&mut v, UNIX_EPOCH + Duration::from_secs(951_782_400)); // 2000-02-29
        assert_eq!(String::from_utf8(v).unwrap(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn milliseconds() {
        for (us, want) in [
            (0, "0.000"),
            (7, "0.007"),
            (12_345, "12.345"),
            (3_000_000, "3000.000"),
        ] {
            let mut v = Vec::new();
            ms(&mut v, Duration::from_micros(us));
            assert_eq!(String::from_utf8(v).unwrap(), want);
        }
    }

    #[test]
    fn traceparent() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let id = traceparent_trace_id(&h).unwrap();
        assert_eq!(id[0], 0x4b);
        assert_eq!(id[15], 0x36);
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        assert_eq!(traceparent_trace_id(&h), None);
        h.insert("traceparent", HeaderValue::from_static("00-XYZ"));
        assert_eq!(traceparent_trace_id(&h), None);
    }

    fn spec(buffer: usize) -> Spec {
        Spec {
            target: Target::Stdout,
            fields: (1 << FIELDS.len()) - 1,
            sample: 1.0,
            buffer,
        }
    }

    #[test]
    fn line_is_json_with_escapes() {
        let counters = Arc::new(Counters::default());
        let sink = Sink::open(Target::Stdout, 1, counters).unwrap();
        let logger = Arc::new(Logger::new(&spec(1), sink));
        let mut o = Outcome::new(
            Instant::now(),
            0,
            Arc::new(RouteMetrics::new("r\"1".into())),
        );
        o.status = 502;
        o.error = Some(ErrorKind::UpstreamUnreachable);
        o.trace_id = Some([0xab; 16]);
        o.client_ip = Some("10.0.0.1".parse().unwrap());
        let e = Entry {
            logger,
            method: Method::GET,
            uri: Uri::from_static("/a%20b?q=1"),
            user_agent: Some(HeaderValue::from_bytes(b"ua\\\"\t\xff").unwrap()),
            request_id: Some(HeaderValue::from_static("abc")),
            bytes_in: None,
            traceparent: None,
            consumer: Some("app\"1".into()),
            authenticated: true,
        };
        let mut v = Vec::new();
        write_line(&mut v, (1 << FIELDS.len()) - 1, &o, &e, SystemTime::now());
        assert_eq!(v.last(), Some(&b'\n'));
        let j: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(j["route"], "r\"1");
        assert_eq!(j["consumer"], "app\"1");
        assert_eq!(j["path"], "/a%20b?q=1");
        assert_eq!(j["user_agent"], "ua\\\"\t\u{fffd}");
        assert_eq!(j["error"], "upstream_unreachable");
        assert_eq!(j["trace_id"], "abababababababababababababababab");
        assert_eq!(j["status"], 502);
        assert!(j.get("upstream").is_none());
        o.status = 0; // not recorded in metrics as a request
        o.error = None;
    }

    /// A sink whose writer is stuck never blocks the sender: lines beyond
    /// the buffer are dropped and counted.
    #[test]
    fn full_channel_drops_and_counts() {
        let counters = Arc::new(Counters::default());
        let (tx, rx) = sync_channel(2);
        let sink = Sink {
            target: Target::Stdout,
            buffer: 2,
            tx,
            reopen: Arc::new(AtomicBool::new(false)),
            counters: counters.clone(),
            queued: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            writer: std::thread::current(),
        };
        let t = Instant::now();
        for _ in 0..10 {
            sink.send(b"x\n".to_vec());
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 8);
        drop(rx);
    }

    /// Lines are written in batches; `flush` waits until the queued ones are
    /// in the file, without waiting for the batch interval to pass.
    #[test]
    fn flush_writes_what_is_queued() {
        let dir = std::env::temp_dir().join(format!("portico-al-flush-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let counters = Arc::new(Counters::default());
        let sink = Sink::open(Target::File(path.clone()), 100, counters.clone()).unwrap();
        for i in 0..10 {
            sink.send(format!("{i}\n").into_bytes());
        }
        assert!(sink.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 10, "{text}");
        assert_eq!(counters.lines.load(Ordering::Relaxed), 10);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
