//! Metrics: the counters, gauges and histograms the gateway keeps, and their
//! rendering in the Prometheus text format (0.0.4) or OpenMetrics
//! ([`render`], served by the admin listener at `/metrics`).
//!
//! The request path never looks a metric up: every handle is resolved when
//! the snapshot is compiled and sits next to what it measures — a route's
//! [`RouteMetrics`] in the compiled route, a target's [`TargetMetrics`] in
//! each of its endpoints, a listener's [`ListenerMetrics`] in its accept loop —
//! and recording is a few relaxed atomic additions on fixed arrays indexed by
//! small enums (method class, status class, consumer, error kind). There is no
//! lock, no hashing and no allocation per request. Label values come from the
//! configuration (route, upstream, target, listener names) or from closed sets,
//! so every label set is bounded.
//!
//! Handles are carried across reloads by name (routes; upstream and target;
//! listeners), so a route or target that survives a reload keeps counting.
//! Series of routes and targets a reload removed disappear from the next
//! scrape (counters restart from zero if they come back).
//!
//! Adding a series: a field in the struct that owns its dimension, recorded
//! where the event happens, and a family in [`render`] (plus
//! docs/observability.md).

pub mod encode;
pub mod process;
pub mod render;
pub mod usage;

use crate::error::ErrorKind;
use http::Method;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds of the duration histograms, in seconds (plus `+Inf`): from
/// half a millisecond (a cached answer on loopback) to 30 s (a slow upstream
/// at the default response-header timeout).
pub const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// [`BUCKETS`] in nanoseconds, for comparing without floating point.
const BUCKETS_NS: [u64; 15] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];

/// A fixed-bucket histogram of durations: one atomic per bucket (not
/// cumulative, so an observation touches one) and the sum in nanoseconds.
/// The count is the sum of the buckets, so a scrape always sees
/// `_count == _bucket{le="+Inf"}`.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A histogram read at one moment: cumulative bucket counts (the last one is
/// `+Inf`, the count) and the sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: [u64; BUCKETS.len() + 1],
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative[BUCKETS.len()]
    }
}

impl Histogram {
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; BUCKETS.len() + 1];
        let mut total = 0u64;
        for (c, b) in cumulative.iter_mut().zip(self.buckets.iter()) {
            total += b.load(Relaxed);
            *c = total;
        }
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// Method label values; anything else is `other`.
pub const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

/// The [`METHODS`] index of a request method.
#[inline]
pub fn method_class(m: &Method) -> u8 {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

/// Status class label values.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[inline]
pub fn status_class(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

/// A consumer's metrics slot (`crate::auth::consumer::Slots`): 0 is
/// `anonymous`, 1 is `other`, then one per consumer id ever configured.
pub type ConsumerSlot = u32;
pub const ANONYMOUS: ConsumerSlot = crate::auth::consumer::SLOT_ANONYMOUS;

/// Requests of one consumer on one route: method class × status class.
type Counts = [[AtomicU64; STATUS_CLASSES.len()]; METHODS.len()];

fn zero_counts() -> Counts {
    std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0)))
}

/// Consumer slots per lazily allocated chunk of a route's table.
const CHUNK: usize = 16;
const CHUNKS: usize = (crate::auth::consumer::MAX_SLOTS as usize).div_ceil(CHUNK);

/// One lazily allocated run of [`CHUNK`] consumer slots.
type Chunk = OnceLock<Box<[Counts; CHUNK]>>;

/// A route's per-consumer counters: nothing is allocated until a consumer
/// other than `anonymous` is counted, then one chunk of [`CHUNK`] slots at a
/// time (allocated once, never per request).
#[derive(Default)]
struct ByConsumer {
    chunks: OnceLock<Box<[Chunk]>>,
}

impl ByConsumer {
    fn counts(&self, slot: usize) -> &Counts {
        let slot = slot.min(CHUNKS * CHUNK - 1);
        let top = self
            .chunks
            .get_or_init(|| (0..CHUNKS).map(|_| OnceLock::new()).collect());
        let chunk =
            top[slot / CHUNK].get_or_init(|| Box::new(std::array::from_fn(|_| zero_counts())));
        &chunk[slot % CHUNK]
    }

    fn get(&self, slot: usize) -> Option<&Counts> {
        let chunk = self.chunks.get()?.get(slot / CHUNK)?.get()?;
        Some(&chunk[slot % CHUNK])
    }

    /// Slots with a chunk allocated (some may still be all zero).
    fn slots(&self) -> impl Iterator<Item = (usize, &Counts)> {
        self.chunks.get().into_iter().flat_map(|top| {
            top.iter().enumerate().flat_map(|(ci, c)| {
                c.get().into_iter().flat_map(move |chunk| {
                    chunk
                        .iter()
                        .enumerate()
                        .map(move |(i, x)| (ci * CHUNK + i, x))
                })
            })
        })
    }
}

/// The label value of requests that matched no route (refused before
/// routing, redirected to HTTPS, or `route_not_found`). No route may be
/// named like this.
pub const UNMATCHED_ROUTE: &str = "(unmatched)";

/// One route's series. Shared by every listener that serves the route and
/// carried across reloads by route name.
/// How a `rate_limit` policy decided a request (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitResult {
    Allowed,
    Limited,
    /// Decided by the local fallback because Redis was unavailable.
    FailOpen,
    /// Refused with 503 because Redis was unavailable.
    FailClosed,
}

impl LimitResult {
    pub const ALL: [LimitResult; 4] = [
        LimitResult::Allowed,
        LimitResult::Limited,
        LimitResult::FailOpen,
        LimitResult::FailClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitResult::Allowed => "allowed",
            LimitResult::Limited => "limited",
            LimitResult::FailOpen => "fail_open",
            LimitResult::FailClosed => "fail_closed",
        }
    }
}

pub struct RouteMetrics {
    pub name: Arc<str>,
    /// Requests without a consumer (slot 0), allocated up front.
    anonymous: Counts,
    /// Requests of other consumer slots.
    by_consumer: ByConsumer,
    /// Refused authentications, by auth method and reason.
    auth_failures: [[AtomicU64; crate::auth::Reason::COUNT]; crate::auth::Method::ALL.len()],
    /// Requests whose client went away before the response headers.
    cancelled: AtomicU64,
    /// `rate_limit` decisions by [`LimitResult`].
    rate_limits: [AtomicU64; LimitResult::ALL.len()],
    pub duration: Histogram,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Requests shed (503 `overloaded`), by priority class, scope and
    /// reason (`crate::shed`).
    shed: ShedCounts,
    /// How long requests waited in a concurrency limit's queue (granted or
    /// not).
    pub queue_wait: Histogram,
}

/// Priority class × `shed::Scope` × `shed::limiter::Shed`.
type ShedCounts = [[[AtomicU64; 3]; 3]; crate::shed::MAX_CLASSES];

impl RouteMetrics {
    pub fn new(name: Arc<str>) -> RouteMetrics {
        RouteMetrics {
            name,
            anonymous: zero_counts(),
            by_consumer: ByConsumer::default(),
            auth_failures: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            cancelled: AtomicU64::new(0),
            rate_limits: std::array::from_fn(|_| AtomicU64::new(0)),
            duration: Histogram::default(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            shed: std::array::from_fn(|_| {
                std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0)))
            }),
            queue_wait: Histogram::default(),
        }
    }

    /// One request shed.
    #[inline]
    pub fn shed(&self, class: u8, scope: crate::shed::Scope, why: crate::shed::limiter::Shed) {
        let c = usize::from(class).min(crate::shed::MAX_CLASSES - 1);
        self.shed[c][scope.index()][why.index()].fetch_add(1, Relaxed);
    }

    pub fn shed_count(&self, class: usize, scope: usize, why: usize) -> u64 {
        self.shed[class][scope][why].load(Relaxed)
    }

    /// One request answered with `status`, its response body ended (or the
    /// client left) after `elapsed`, having sent `bytes_out` body bytes.
    #[inline]
    pub fn record(
        &self,
        consumer: ConsumerSlot,
        method: u8,
        status: u16,
        elapsed: Duration,
        bytes_out: u64,
    ) {
        let counts = if consumer == ANONYMOUS {
            &self.anonymous
        } else {
            self.by_consumer.counts(consumer as usize)
        };
        counts[method as usize % METHODS.len()][status_class(status)].fetch_add(1, Relaxed);
        self.duration.observe(elapsed);
        if bytes_out > 0 {
            self.bytes_out.fetch_add(bytes_out, Relaxed);
        }
    }

    #[inline]
    pub fn record_cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }

    /// Request body bytes read from the client.
    #[inline]
    pub fn add_bytes_in(&self, n: u64) {
        if n > 0 {
            self.bytes_in.fetch_add(n, Relaxed);
        }
    }

    /// One refused authentication.
    #[inline]
    pub fn auth_failure(&self, method: crate::auth::Method, reason: crate::auth::Reason) {
        self.auth_failures[method.index()][reason.index()].fetch_add(1, Relaxed);
    }

    /// One `rate_limit` policy decision.
    #[inline]
    pub fn rate_limit(&self, r: LimitResult) {
        self.rate_limits[r as usize].fetch_add(1, Relaxed);
    }

    pub fn rate_limits(&self, r: LimitResult) -> u64 {
        self.rate_limits[r as usize].load(Relaxed)
    }

    pub fn auth_failures(&self, method: usize, reason: usize) -> u64 {
        self.auth_failures[method][reason].load(Relaxed)
    }

    pub fn requests(&self, consumer: usize, method: usize, class: usize) -> u64 {
        let counts = if consumer == ANONYMOUS as usize {
            Some(&self.anonymous)
        } else {
            self.by_consumer.get(consumer)
        };
        counts.map_or(0, |c| c[method][class].load(Relaxed))
    }

    /// Consumer slots that may have requests counted (`anonymous` first).
    pub fn consumer_slots(&self) -> Vec<usize> {
        let mut v = vec![ANONYMOUS as usize];
        v.extend(
            self.by_consumer
                .slots()
                .filter(|(s, c)| *s != 0 && c.iter().flatten().any(|x| x.load(Relaxed) > 0))
                .map(|(s, _)| s),
        );
        v
    }

    /// Requests of one consumer slot on this route, all methods and statuses.
    pub fn consumer_requests(&self, consumer: usize) -> u64 {
        (0..METHODS.len())
            .flat_map(|m| (0..STATUS_CLASSES.len()).map(move |s| (m, s)))
            .map(|(m, s)| self.requests(consumer, m, s))
            .sum()
    }

    pub fn total_requests(&self) -> u64 {
        self.consumer_slots()
            .into_iter()
            .map(|c| self.consumer_requests(c))
            .sum()
    }

    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Relaxed)
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Relaxed)
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Relaxed)
    }
}

/// One upstream target's series (`upstream`, `target` labels), shared by
/// every endpoint the target resolves to and carried across reloads by
/// upstream name and target address.
pub struct TargetMetrics {
    /// From sending a request to the response headers, per attempt.
    pub duration: Histogram,
    /// Failed attempts by error kind (only upstream kinds occur).
    errors: [AtomicU64; ErrorKind::COUNT],
}

impl Default for TargetMetrics {
    fn default() -> Self {
        TargetMetrics {
            duration: Histogram::default(),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl TargetMetrics {
    #[inline]
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind.index()].fetch_add(1, Relaxed);
    }

    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()].load(Relaxed)
    }
}

/// Protocol label values of connections, indexed by [`conn_class`].
pub const CONN_CLASSES: [(&str, &str); 4] = [
    ("http1", "false"),
    ("h2", "false"),
    ("http1", "true"),
    ("h2", "true"),
];

#[inline]
pub fn conn_class(h2: bool, tls: bool) -> usize {
    h2 as usize + 2 * tls as usize
}

/// One listener's connection series, kept by listener name for the life
/// of the process (so a rebind or reload does not reset them).
#[derive(Default)]
pub struct ListenerMetrics {
    open: [AtomicI64; 4],
    accepted: [AtomicU64; 4],
    tls_handshake_failures: AtomicU64,
    /// Idle plain HTTP/1 connections parked (holding no buffers).
    parked: AtomicI64,
}

impl ListenerMetrics {
    pub fn opened(&self, class: usize) {
        self.open[class].fetch_add(1, Relaxed);
        self.accepted[class].fetch_add(1, Relaxed);
    }

    pub fn closed(&self, class: usize) {
        self.open[class].fetch_sub(1, Relaxed);
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.fetch_add(1, Relaxed);
    }

    /// A connection parks (`true`) or resumes or closes while parked.
    pub fn set_parked(&self, parked: bool) {
        self.parked.fetch_add(if parked { 1 } else { -1 }, Relaxed);
    }

    pub fn parked(&self) -> i64 {
        self.parked.load(Relaxed)
    }

    pub fn open(&self, class: usize) -> i64 {
        self.open[class].load(Relaxed)
    }

    pub fn open_total(&self) -> i64 {
        self.open.iter().map(|o| o.load(Relaxed)).sum()
    }

    pub fn accepted(&self, class: usize) -> u64 {
        self.accepted[class].load(Relaxed)
    }

    pub fn tls_handshake_failures(&self) -> u64 {
        self.tls_handshake_failures.load(Relaxed)
    }
}

/// The series of one running gateway that belong to no route, target or
/// listener. One per `server::Shared` (tests run many gateways in one
/// process, so nothing here is a global).
pub struct GatewayMetrics {
    /// Requests that matched no route.
    pub unmatched: Arc<RouteMetrics>,
    /// Gateway-made error responses by kind.
    errors: [AtomicU64; ErrorKind::COUNT],
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_reload_ok: AtomicBool,
    /// Touched when a listener starts and on scrape only.
    listeners: Mutex<Vec<(Arc<str>, Arc<ListenerMetrics>)>>,
    /// Access-log lines written and dropped.
    pub access_log: Arc<crate::access_log::Counters>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        GatewayMetrics {
            unmatched: Arc::new(RouteMetrics::new(UNMATCHED_ROUTE.into())),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_ok: AtomicBool::new(true),
            listeners: Mutex::new(Vec::new()),
            access_log: Arc::default(),
        }
    }
}

impl GatewayMetrics {
    #[inline]
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind.index()].fetch_add(1, Relaxed);
    }

    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()].load(Relaxed)
    }

    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Relaxed);
        }
        self.last_reload_ok.store(ok, Relaxed);
    }

    /// (successful, failed) reloads.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Relaxed),
            self.reloads_failed.load(Relaxed),
        )
    }

    pub fn last_reload_ok(&self) -> bool {
        self.last_reload_ok.load(Relaxed)
    }

    /// The series of listener `name`, created on first use.
    pub fn listener(&self, name: &Arc<str>) -> Arc<ListenerMetrics> {
        let mut all = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = all.iter().find(|(n, _)| n == name) {
            return m.clone();
        }
        let m = Arc::new(ListenerMetrics::default());
        all.push((name.clone(), m.clone()));
        m
    }

    /// Every listener's series, in the order they were first started.
    pub fn listeners(&self) -> Vec<(Arc<str>, Arc<ListenerMetrics>)> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // == 0.0005: first bucket
        h.observe(Duration::from_micros(501)); // second
        h.observe(Duration::from_millis(30)); // le=0.05
        h.observe(Duration::from_secs(30)); // last finite bucket
        h.observe(Duration::from_secs(31)); // +Inf only
        h.observe(Duration::ZERO); // first
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 2);
        assert_eq!(s.cumulative[1], 3);
        let le_005 = BUCKETS.iter().position(|&b| b == 0.05).unwrap();
        assert_eq!(s.cumulative[le_005 - 1], 3);
        assert_eq!(s.cumulative[le_005], 4);
        assert_eq!(s.cumulative[BUCKETS.len() - 1], 5);
        assert_eq!(s.count(), 6);
        let want = 0.0005 + 0.000501 + 0.03 + 30.0 + 31.0;
        assert!((s.sum_seconds - want).abs() < 1e-9, "{}", s.sum_seconds);
        // Cumulative counts never decrease.
        assert!(s.cumulative.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn bucket_tables_agree() {
        for (s, ns) in BUCKETS.iter().zip(BUCKETS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
        assert!(BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn classes() {
        assert_eq!(status_class(101), 0);
        assert_eq!(status_class(204), 1);
        assert_eq!(status_class(308), 2);
        assert_eq!(status_class(404), 3);
        assert_eq!(status_class(599), 4);
        assert_eq!(METHODS[method_class(&Method::PATCH) as usize], "PATCH");
        let odd = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(METHODS[method_class(&odd) as usize], "other");
        assert_eq!(CONN_CLASSES[conn_class(true, true)], ("h2", "true"));
        assert_eq!(CONN_CLASSES[conn_class(false, true)], ("http1", "true"));
    }

    #[test]
    fn route_records() {
        let r = RouteMetrics::new("r".into());
        r.record(
            ANONYMOUS,
            method_class(&Method::POST),
            503,
            Duration::from_millis(2),
            10,
        );
        r.record(
            ANONYMOUS,
            method_class(&Method::POST),
            503,
            Duration::from_millis(2),
            0,
        );
        r.add_bytes_in(7);
        r.record_cancelled();
        assert_eq!(r.requests(0, 2, 4), 2);
        assert_eq!(r.total_requests(), 2);
        assert_eq!(r.duration.snapshot().count(), 2);
        assert_eq!((r.bytes_in(), r.bytes_out(), r.cancelled()), (7, 10, 1));
    }
}
