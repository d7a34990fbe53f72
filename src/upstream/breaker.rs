//! The circuit breaker (`upstreams[].circuit_breaker`): stops sending
//! requests to an upstream that keeps failing, so it can recover and clients
//! get a fast answer instead of a slow failure.
//!
//! - **Closed**: every request goes through; its result (a connect failure,
//!   timeout, broken exchange, no healthy target, or a status listed in
//!   `failure_statuses` is a failure; anything else a success) is counted in
//!   a sliding window of 10 buckets covering `window`. When a failure finds
//!   at least `min_requests` results in the window and a failed share of at
//!   least `failure_ratio`, the circuit opens.
//! - **Open**: requests are answered 503 `circuit_open` at once (with
//!   `Retry-After`: the time left), without touching the network, for
//!   `open_for`.
//! - **Half-open**: after `open_for`, the next `half_open_probes` requests go
//!   through as probes (others are still refused); when that many probes
//!   succeeded the circuit closes (with an empty window), and the first
//!   failed probe opens it again for `open_for`.
//!
//! Lock-free: the state is one `AtomicU64` (state, generation, since when),
//! the probes another (generation, admitted, succeeded), each bucket a third
//! (bucket number, failures, results), all changed by compare-and-swap. The
//! generation, bumped by every transition, keeps results of an earlier
//! half-open period from counting in a later one. The thread whose
//! compare-and-swap makes a transition logs it and counts it. Time is passed
//! in (milliseconds, `crate::clock`), so tests drive it by hand.

use crate::config::model;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSpec {
    pub failure_ratio: f64,
    pub min_requests: u32,
    pub window_ms: u64,
    pub open_for_ms: u64,
    pub half_open_probes: u32,
    /// Inclusive status ranges counted as failures.
    pub failure_statuses: Vec<(u16, u16)>,
}

/// Checks `circuit_breaker` at `p`.
pub fn compile(
    p: &str,
    b: &model::CircuitBreaker,
    err: &mut dyn FnMut(String, String),
) -> Option<BreakerSpec> {
    let mut ok = true;
    let mut e = |k: String, m: &str| {
        ok = false;
        err(format!("{p}.{k}"), m.into())
    };
    if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
        e("failure_ratio".into(), "must be more than 0 and at most 1");
    }
    if b.min_requests == 0 {
        e("min_requests".into(), "must be at least 1");
    }
    if b.window.0.as_millis() < 10 {
        e("window".into(), "must be at least 10ms");
    }
    if b.open_for.0.is_zero() {
        e("open_for".into(), "must be more than 0");
    }
    if b.half_open_probes == 0 || b.half_open_probes > 1000 {
        e("half_open_probes".into(), "must be between 1 and 1000");
    }
    let mut statuses = Vec::new();
    for (k, s) in b.failure_statuses.iter().enumerate() {
        let range = match s {
            model::StatusRange::Code(code) => Some((*code, *code)),
            model::StatusRange::Range(r) => r
                .split_once('-')
                .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?))),
        };
        match range {
            Some((a, b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => {
                statuses.push((a, b))
            }
            _ => e(
                format!("failure_statuses[{k}]"),
                "expected a status code or a range like `500-599`",
            ),
        }
    }
    ok.then(|| BreakerSpec {
        failure_ratio: b.failure_ratio,
        min_requests: b.min_requests,
        window_ms: b.window.0.as_millis() as u64,
        open_for_ms: b.open_for.0.as_millis().max(1) as u64,
        half_open_probes: b.half_open_probes,
        failure_statuses: statuses,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    pub const ALL: [State; 3] = [State::Closed, State::Open, State::HalfOpen];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    fn from_bits(b: u64) -> State {
        match b & 3 {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
}

const BUCKETS: u64 = 10;

// State word: [since_ms: 46][generation: 16][state: 2].
fn pack(state: State, generation: u64, since: u64) -> u64 {
    (since << 18) | ((generation & 0xffff) << 2) | state as u64
}

fn unpack(w: u64) -> (State, u64, u64) {
    (State::from_bits(w), (w >> 2) & 0xffff, w >> 18)
}

// Probe word: [generation: 16][admitted: 24][succeeded: 24].
fn pack_probes(generation: u64, admitted: u64, ok: u64) -> u64 {
    ((generation & 0xffff) << 48) | (admitted << 24) | ok
}

fn unpack_probes(w: u64) -> (u64, u64, u64) {
    (w >> 48, (w >> 24) & 0xff_ffff, w & 0xff_ffff)
}

// Bucket word: [bucket number: 28][failures: 18][results: 18].
const COUNT_MAX: u64 = (1 << 18) - 1;
const INDEX_MASK: u64 = (1 << 28) - 1;

fn pack_bucket(index: u64, failures: u64, total: u64) -> u64 {
    ((index & INDEX_MASK) << 36) | (failures << 18) | total
}

fn unpack_bucket(w: u64) -> (u64, u64, u64) {
    (w >> 36, (w >> 18) & COUNT_MAX, w & COUNT_MAX)
}

pub struct Breaker {
    pub spec: BreakerSpec,
    upstream: Arc<str>,
    state: AtomicU64,
    probes: AtomicU64,
    buckets: [AtomicU64; BUCKETS as usize],
    bucket_ms: u64,
    /// Transitions into each [`State`], by `State as usize`.
    pub transitions: [AtomicU64; 3],
    /// Requests answered `circuit_open`.
    pub rejected: AtomicU64,
}

/// A request let through: report its result with [`Ticket::record`].
/// Dropped without a result (the client went away), a probe frees its slot.
pub struct Ticket<'a> {
    breaker: &'a Breaker,
    /// `Some(generation)` for a half-open probe.
    probe: Option<u32>,
}

impl Ticket<'_> {
    pub fn record(mut self, failed: bool, now_ms: u64) {
        match self.probe.take() {
            Some(g) => self.breaker.probe_result(u64::from(g), failed, now_ms),
            None => self.breaker.count(failed, now_ms),
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.probe {
            self.breaker.unprobe(u64::from(g));
        }
    }
}

impl Breaker {
    pub fn new(spec: BreakerSpec, upstream: Arc<str>) -> Breaker {
        Breaker {
            bucket_ms: (spec.window_ms / BUCKETS).max(1),
            spec,
            upstream,
            state: AtomicU64::new(pack(State::Closed, 0, 0)),
            probes: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            transitions: std::array::from_fn(|_| AtomicU64::new(0)),
            rejected: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> State {
        unpack(self.state.load(Relaxed)).0
    }

    /// While open: milliseconds until probes are let through.
    pub fn open_remaining_ms(&self, now_ms: u64) -> Option<u64> {
        let (st, _, since) = unpack(self.state.load(Relaxed));
        (st == State::Open).then(|| (since + self.spec.open_for_ms).saturating_sub(now_ms))
    }

    pub fn is_failure_status(&self, status: u16) -> bool {
        self.spec
            .failure_statuses
            .iter()
            .any(|&(a, b)| (a..=b).contains(&status))
    }

    /// Lets a request through, or `Err(ms)`: refused, probes start in `ms`
    /// (0 while the probes of a half-open circuit are in flight).
    pub fn admit(&self, now_ms: u64) -> Result<Ticket<'_>, u64> {
        loop {
            let w = self.state.load(SeqCst);
            let (st, generation, since) = unpack(w);
            match st {
                State::Closed => {
                    return Ok(Ticket {
                        breaker: self,
                        probe: None,
                    })
                }
                State::Open => {
                    let until = since + self.spec.open_for_ms;
                    if now_ms < until {
                        self.rejected.fetch_add(1, Relaxed);
                        return Err(until - now_ms);
                    }
                    let next = pack(State::HalfOpen, generation + 1, now_ms);
                    if self.state.compare_exchange(w, next, SeqCst, SeqCst).is_ok() {
                        self.transitions[State::HalfOpen as usize].fetch_add(1, Relaxed);
                        tracing::info!(upstream = %self.upstream, "circuit half-open: probing");
                    }
                }
                State::HalfOpen => {
                    let p = self.probes.load(SeqCst);
                    let (pg, admitted, ok) = unpack_probes(p);
                    let (admitted, ok) = if pg == generation {
                        (admitted, ok)
                    } else {
                        (0, 0)
                    };
                    if admitted >= u64::from(self.spec.half_open_probes) {
                        self.rejected.fetch_add(1, Relaxed);
                        return Err(0);
                    }
                    let next = pack_probes(generation, admitted + 1, ok);
                    if self
                        .probes
                        .compare_exchange(p, next, SeqCst, SeqCst)
                        .is_ok()
                    {
                        return Ok(Ticket {
                            breaker: self,
                            probe: Some(generation as u32),
                        });
                    }
                }
            }
        }
    }

    fn transition(&self, from: u64, to: State, now_ms: u64, why: &str) -> bool {
        let (_, generation, _) = unpack(from);
        let next = pack(to, generation + 1, now_ms);
        if self
            .state
            .compare_exchange(from, next, SeqCst, SeqCst)
            .is_err()
        {
            return false;
        }
        self.transitions[to as usize].fetch_add(1, Relaxed);
        match to {
            State::Open => tracing::warn!(upstream = %self.upstream, "circuit opened: {why}"),
            _ => tracing::info!(upstream = %self.upstream, "circuit {}: {why}", to.as_str()),
        }
        true
    }

    /// A result while closed: into the window; a failure may open.
    fn count(&self, failed: bool, now_ms: u64) {
        let index = now_ms / self.bucket_ms;
        let slot = &self.buckets[(index % BUCKETS) as usize];
        let mut w = slot.load(Relaxed);
        loop {
            let (i, f, t) = unpack_bucket(w);
            let (f, t) = if i == index & INDEX_MASK {
                (f, t)
            } else {
                (0, 0)
            };
            if t >= COUNT_MAX {
                break;
            }
            let next = pack_bucket(index, f + u64::from(failed), t + 1);
            match slot.compare_exchange_weak(w, next, Relaxed, Relaxed) {
                Ok(_) => break,
                Err(x) => w = x,
            }
        }
        if !failed {
            return;
        }
        let s = self.state.load(SeqCst);
        if unpack(s).0 != State::Closed {
            return;
        }
        let (failures, total) = self.window(index);
        if total >= u64::from(self.spec.min_requests)
            && failures as f64 >= self.spec.failure_ratio * total as f64
        {
            self.transition(
                s,
                State::Open,
                now_ms,
                &format!("{failures} of the last {total} requests failed"),
            );
        }
    }

    /// Failures and results in the buckets of the last `window`.
    fn window(&self, index: u64) -> (u64, u64) {
        let (mut failures, mut total) = (0, 0);
        for b in &self.buckets {
            let (i, f, t) = unpack_bucket(b.load(Relaxed));
            if (index.wrapping_sub(i) & INDEX_MASK) < BUCKETS {
                failures += f;
                total += t;
            }
        }
        (failures, total)
    }

    fn probe_result(&self, generation: u64, failed: bool, now_ms: u64) {
        let s = self.state.load(SeqCst);
        let (st, g, _) = unpack(s);
        if st != State::HalfOpen || g != generation & 0xffff {
            return;
        }
        if failed {
            self.transition(s, State::Open, now_ms, "a probe request failed");
            return;
        }
        let mut p = self.probes.load(SeqCst);
        loop {
            let (pg, admitted, ok) = unpack_probes(p);
            if pg != g {
                return;
            }
            let next = pack_probes(pg, admitted, ok + 1);
            match self.probes.compare_exchange(p, next, SeqCst, SeqCst) {
                Ok(_) if ok + 1 >= u64::from(self.spec.half_open_probes) => {
                    for b in &self.buckets {
                        b.store(0, Relaxed);
                    }
                    self.transition(s, State::Closed, now_ms, "the probe requests succeeded");
                    return;
                }
                Ok(_) => return,
                Err(x) => p = x,
            }
        }
    }

    /// A probe that ended without a result gives its slot back.
    fn unprobe(&self, generation: u64) {
        let mut p = self.probes.load(SeqCst);
        loop {
            let (pg, admitted, ok) = unpack_probes(p);
            if pg != generation & 0xffff || admitted == 0 {
                return;
            }
            match self
                .probes
                .compare_exchange(p, pack_probes(pg, admitted - 1, ok), SeqCst, SeqCst)
            {
                Ok(_) => return,
                Err(x) => p = x,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(min_requests: u32, probes: u32) -> Breaker {
        Breaker::new(
            BreakerSpec {
                failure_ratio: 0.5,
                min_requests,
                window_ms: 1000,
                open_for_ms: 300,
                half_open_probes: probes,
                failure_statuses: vec![(500, 599)],
            },
            "up".into(),
        )
    }

    fn run(b: &Breaker, failed: bool, now: u64) {
        b.admit(now).expect("admitted").record(failed, now);
    }

    #[test]
    fn opens_on_the_failure_ratio_once_the_window_has_enough() {
        let b = breaker(4, 1);
        run(&b, true, 10);
        run(&b, true, 20);
        run(&b, true, 30);
        assert_eq!(b.state(), State::Closed, "3 results < min_requests");
        run(&b, false, 40);
        assert_eq!(b.state(), State::Closed, "successes never open");
        run(&b, true, 50);
        assert_eq!(b.state(), State::Open, "4 of 5 failed");
        assert_eq!(b.admit(60).err(), Some(290));
        assert_eq!(b.rejected.load(Relaxed), 1);
        assert_eq!(b.transitions[State::Open as usize].load(Relaxed), 1);
    }

    #[test]
    fn old_results_leave_the_window() {
        let b = breaker(4, 1);
        for t in [10, 20, 30] {
            run(&b, true, t);
        }
        // A second later those three are gone: 1 of 1 is not enough.
        run(&b, true, 1100);
        assert_eq!(b.state(), State::Closed);
        for t in [1110, 1120, 1130] {
            run(&b, false, t);
        }
        run(&b, true, 1140);
        assert_eq!(b.state(), State::Closed, "2 of 5 failed");
    }

    #[test]
    fn half_open_probes_close_or_reopen() {
        let b = breaker(2, 2);
        run(&b, true, 0);
        run(&b, true, 1);
        assert_eq!(b.state(), State::Open);
        assert!(b.admit(200).is_err());
        // After open_for: two probes, a third request is refused.
        let p1 = b.admit(301).expect("probe");
        assert_eq!(b.state(), State::HalfOpen);
        let p2 = b.admit(302).expect("probe");
        assert_eq!(b.admit(303).err(), Some(0));
        // A failed probe reopens for another open_for.
        p1.record(true, 310);
        assert_eq!(b.state(), State::Open);
        p2.record(false, 311);
        assert_eq!(b.state(), State::Open, "a stale probe changes nothing");
        assert_eq!(b.admit(500).err(), Some(110));
        // Next half-open: both probes succeed, the circuit closes empty.
        let p1 = b.admit(610).expect("probe");
        let p2 = b.admit(611).expect("probe");
        p1.record(false, 620);
        assert_eq!(b.state(), State::HalfOpen);
        p2.record(false, 621);
        assert_eq!(b.state(), State::Closed);
        run(&b, true, 622);
        assert_eq!(b.state(), State::Closed, "the window starts empty");
        assert_eq!(b.transitions[State::Open as usize].load(Relaxed), 2);
        assert_eq!(b.transitions[State::HalfOpen as usize].load(Relaxed), 2);
        assert_eq!(b.transitions[State::Closed as usize].load(Relaxed), 1);
    }

    #[test]
    fn an_abandoned_probe_frees_its_slot() {
        let b = breaker(1, 1);
        run(&b, true, 0);
        let p = b.admit(400).expect("probe");
        assert!(b.admit(401).is_err());
        drop(p);
        b.admit(402)
            .expect("the slot is free again")
            .record(false, 403);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn statuses_and_config_errors() {
        let b = breaker(1, 1);
        assert!(b.is_failure_status(503));
        assert!(!b.is_failure_status(404));
        let m: model::CircuitBreaker = serde_yaml::from_str(
            "{failure_ratio: 1.5, min_requests: 0, window: 1ms, open_for: 0s, half_open_probes: 0, failure_statuses: [700, '5xx']}",
        )
        .unwrap();
        let mut errs = Vec::new();
        assert!(compile("cb", &m, &mut |k, _| errs.push(k)).is_none());
        assert_eq!(
            errs,
            [
                "cb.failure_ratio",
                "cb.min_requests",
                "cb.window",
                "cb.open_for",
                "cb.half_open_probes",
                "cb.failure_statuses[0]",
                "cb.failure_statuses[1]"
            ]
        );
    }
}
