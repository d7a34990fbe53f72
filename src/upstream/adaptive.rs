//! Adaptive concurrency (`upstreams[].adaptive_concurrency`): a limit on
//! the requests in flight to an upstream that moves with its latency, so an
//! overloaded backend is detected without a hand-tuned number.
//!
//! Every request that got response headers (or timed out) is a latency
//! sample. Samples are averaged over windows (at least `window` long and
//! `min_samples` samples); the request whose sample closes a window (one
//! compare-and-swap decides which) computes the new limit:
//!
//! - `gradient` (after Netflix's gradient2): `long` is an exponential
//!   average of the window averages over about `long_window` windows (cut by
//!   5% per window while it is more than twice the recent latency, so it
//!   comes back down after an overload). `gradient = clamp(tolerance × long
//!   / short, 0.5, 1)`; `new = limit × gradient + √limit`; the limit moves
//!   to `limit × (1 − smoothing) + new × smoothing`. Latency above
//!   `tolerance × long` shrinks the limit (at most halving the estimate per
//!   window); latency at or below it grows it by about √limit × smoothing.
//! - `aimd`: a window whose average latency exceeds `latency_threshold`, or
//!   with a timeout or an overload answer (429, 503, 504), multiplies the
//!   limit by `backoff_ratio`; any other window adds 1.
//!
//! In both, the limit does not grow while fewer than half of it were in
//! flight during the window (the upstream was not the bottleneck), and
//! stays within `min_limit..=max_limit`.
//!
//! A request beyond the current limit (for its priority class: its share of
//! the limit) is refused at once with 503 `overloaded` — it is not queued:
//! the limit exists because the upstream is slow, and waiting would only
//! add to its latency.
//!
//! Everything is atomics; time is passed in (milliseconds, `crate::clock`),
//! so tests drive it by hand.

use crate::config::model::{self, AdaptiveAlgorithm};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveSpec {
    pub algorithm: AdaptiveAlgorithm,
    pub min: f64,
    pub max: f64,
    pub initial: f64,
    pub window_ms: u64,
    pub min_samples: u32,
    pub tolerance: f64,
    pub smoothing: f64,
    pub long_window: u32,
    pub threshold_us: u64,
    pub backoff: f64,
}

/// Checks `adaptive_concurrency` at `p`.
pub fn compile(
    p: &str,
    a: &model::AdaptiveConcurrency,
    err: &mut dyn FnMut(String, String),
) -> Option<AdaptiveSpec> {
    let before = {
        let mut n = 0;
        let mut e = |k: &str, m: &str| {
            n += 1;
            err(format!("{p}.{k}"), m.into())
        };
        if a.min_limit == 0 {
            e("min_limit", "must be at least 1");
        }
        if a.max_limit < a.min_limit {
            e("max_limit", "must be at least `min_limit`");
        }
        if a.initial_limit < a.min_limit || a.initial_limit > a.max_limit {
            e("initial_limit", "must be within `min_limit..=max_limit`");
        }
        if a.window.0.is_zero() {
            e("window", "must be more than 0");
        }
        if a.min_samples == 0 {
            e("min_samples", "must be at least 1");
        }
        if !(a.tolerance >= 1.0 && a.tolerance.is_finite()) {
            e("tolerance", "must be at least 1");
        }
        if !(a.smoothing > 0.0 && a.smoothing <= 1.0) {
            e("smoothing", "must be more than 0 and at most 1");
        }
        if a.long_window == 0 {
            e("long_window", "must be at least 1");
        }
        if !(0.5..1.0).contains(&a.backoff_ratio) {
            e("backoff_ratio", "must be at least 0.5 and less than 1");
        }
        match (a.algorithm, &a.latency_threshold) {
            (AdaptiveAlgorithm::Aimd, None) => e(
                "latency_threshold",
                "`algorithm: aimd` needs a `latency_threshold`",
            ),
            (AdaptiveAlgorithm::Aimd, Some(t)) if t.0.is_zero() => {
                e("latency_threshold", "must be more than 0")
            }
            (AdaptiveAlgorithm::Gradient, Some(_)) => {
                e("latency_threshold", "only used with `algorithm: aimd`")
            }
            _ => {}
        }
        n
    };
    (before == 0).then(|| AdaptiveSpec {
        algorithm: a.algorithm,
        min: f64::from(a.min_limit),
        max: f64::from(a.max_limit),
        initial: f64::from(a.initial_limit),
        window_ms: a.window.0.as_millis().max(1) as u64,
        min_samples: a.min_samples,
        tolerance: a.tolerance,
        smoothing: a.smoothing,
        long_window: a.long_window,
        threshold_us: a
            .latency_threshold
            .map_or(0, |t| t.0.as_micros().min(u128::from(u64::MAX)) as u64),
        backoff: a.backoff_ratio,
    })
}

pub struct Adaptive {
    pub spec: AdaptiveSpec,
    /// The limit (`f64` bits); requests use its integer part.
    limit: AtomicU64,
    in_flight: AtomicU32,
    /// The current window: start (ms), latency sum (µs), samples, peak in
    /// flight, congestion signals.
    win_start: AtomicU64,
    win_sum_us: AtomicU64,
    win_count: AtomicU32,
    win_peak: AtomicU32,
    win_drops: AtomicU32,
    /// gradient: the long-term latency (`f64` µs bits; 0 = none yet).
    long_us: AtomicU64,
    /// The last window's average latency, µs (for the admin API).
    last_us: AtomicU64,
    /// Requests refused because the limit was reached.
    pub rejected: AtomicU64,
}

/// One slot under the limit, released when dropped (with the response
/// body).
pub struct Permit(Arc<Adaptive>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

impl Adaptive {
    pub fn new(spec: AdaptiveSpec, now_ms: u64) -> Adaptive {
        Adaptive {
            limit: AtomicU64::new(spec.initial.to_bits()),
            in_flight: AtomicU32::new(0),
            win_start: AtomicU64::new(now_ms),
            win_sum_us: AtomicU64::new(0),
            win_count: AtomicU32::new(0),
            win_peak: AtomicU32::new(0),
            win_drops: AtomicU32::new(0),
            long_us: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            spec,
        }
    }

    /// The current limit (what requests are admitted against).
    pub fn limit(&self) -> u32 {
        f64::from_bits(self.limit.load(Relaxed)) as u32
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// The long-term and the last window's average latency.
    pub fn latencies(&self) -> (Duration, Duration) {
        let long = f64::from_bits(self.long_us.load(Relaxed));
        (
            Duration::from_micros(long as u64),
            Duration::from_micros(self.last_us.load(Relaxed)),
        )
    }

    /// A slot if fewer than `share` of the limit are in flight; `None`: 503.
    pub fn try_acquire(self: &Arc<Self>, share: f32) -> Option<Permit> {
        let limit = self.limit().max(1);
        let cap = ((f64::from(share) * f64::from(limit)).ceil() as u32).clamp(1, limit);
        let mut n = self.in_flight.load(SeqCst);
        loop {
            if n >= cap {
                self.rejected.fetch_add(1, Relaxed);
                return None;
            }
            match self
                .in_flight
                .compare_exchange_weak(n, n + 1, SeqCst, SeqCst)
            {
                Ok(_) => {
                    self.win_peak.fetch_max(n + 1, Relaxed);
                    return Some(Permit(self.clone()));
                }
                Err(x) => n = x,
            }
        }
    }

    /// One latency sample; `congested`: a timeout or an overload answer.
    pub fn record(&self, rtt: Duration, congested: bool, now_ms: u64) {
        let us = rtt.as_micros().min(u128::from(u64::MAX)) as u64;
        self.win_sum_us.fetch_add(us, Relaxed);
        let count = self.win_count.fetch_add(1, Relaxed) + 1;
        if congested {
            self.win_drops.fetch_add(1, Relaxed);
        }
        let start = self.win_start.load(Relaxed);
        if now_ms.saturating_sub(start) < self.spec.window_ms || count < self.spec.min_samples {
            return;
        }
        // One sample closes the window: the one that moves its start.
        if self
            .win_start
            .compare_exchange(start, now_ms, SeqCst, Relaxed)
            .is_err()
        {
            return;
        }
        let sum = self.win_sum_us.swap(0, Relaxed);
        let count = self.win_count.swap(0, Relaxed).max(1);
        let drops = self.win_drops.swap(0, Relaxed);
        let peak = self.win_peak.swap(self.in_flight.load(Relaxed), Relaxed);
        let avg = (sum as f64 / f64::from(count)).max(1.0);
        self.last_us.store(avg as u64, Relaxed);
        let limit = f64::from_bits(self.limit.load(Relaxed));
        let new = match self.spec.algorithm {
            AdaptiveAlgorithm::Gradient => self.gradient(limit, avg),
            AdaptiveAlgorithm::Aimd => {
                if drops > 0 || avg > self.spec.threshold_us as f64 {
                    limit * self.spec.backoff
                } else {
                    limit + 1.0
                }
            }
        };
        // Not the bottleneck: no reason to allow more.
        let new = if f64::from(peak) < limit / 2.0 {
            new.min(limit)
        } else {
            new
        };
        let new = new.clamp(self.spec.min, self.spec.max);
        self.limit.store(new.to_bits(), Relaxed);
    }

    fn gradient(&self, limit: f64, short: f64) -> f64 {
        let s = &self.spec;
        let mut long = f64::from_bits(self.long_us.load(Relaxed));
        if long == 0.0 {
            long = short;
        } else {
            let k = 2.0 / (f64::from(s.long_window) + 1.0);
            long += (short - long) * k;
        }
        if long / short > 2.0 {
            long *= 0.95;
        }
        self.long_us.store(long.to_bits(), Relaxed);
        let gradient = (s.tolerance * long / short).clamp(0.5, 1.0);
        let new = limit * gradient + limit.sqrt();
        limit * (1.0 - s.smoothing) + new * s.smoothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(algorithm: AdaptiveAlgorithm) -> AdaptiveSpec {
        AdaptiveSpec {
            algorithm,
            min: 2.0,
            max: 40.0,
            initial: 20.0,
            window_ms: 100,
            min_samples: 5,
            tolerance: 1.5,
            smoothing: 0.5,
            long_window: 10,
            threshold_us: 50_000,
            backoff: 0.8,
        }
    }

    /// Drives `windows` windows of `per` samples at `rtt`, with the limit
    /// kept busy (as many in flight as allowed), starting at `t`.
    fn drive(a: &Arc<Adaptive>, t: &mut u64, windows: u32, rtt_ms: u64) {
        for _ in 0..windows {
            let held: Vec<Permit> = std::iter::from_fn(|| a.try_acquire(1.0)).collect();
            assert_eq!(held.len() as u32, a.limit());
            *t += 100;
            for _ in 0..5 {
                a.record(Duration::from_millis(rtt_ms), false, *t);
            }
        }
    }

    #[test]
    fn gradient_shrinks_when_latency_rises_and_grows_back_when_it_falls() {
        let s = AdaptiveSpec {
            smoothing: 1.0,
            long_window: 20,
            ..spec(AdaptiveAlgorithm::Gradient)
        };
        let a = Arc::new(Adaptive::new(s, 1));
        let mut t = 1;
        drive(&a, &mut t, 30, 10);
        assert_eq!(a.limit(), 40, "steady fast latency grows to max");
        drive(&a, &mut t, 3, 200);
        let low = a.limit();
        assert!(low < 25, "latency x20 shrinks the limit: {low}");
        drive(&a, &mut t, 40, 10);
        assert_eq!(a.limit(), 40, "fast again: back to max");
    }

    #[test]
    fn aimd_backs_off_on_slow_windows_and_adds_one_otherwise() {
        let a = Arc::new(Adaptive::new(spec(AdaptiveAlgorithm::Aimd), 1));
        let mut t = 1;
        drive(&a, &mut t, 3, 10);
        assert_eq!(a.limit(), 23);
        drive(&a, &mut t, 1, 80);
        assert_eq!(a.limit(), 18, "23 x 0.8");
        drive(&a, &mut t, 30, 80);
        assert_eq!(a.limit(), 2, "down to min_limit");
        // A timeout is congestion whatever its latency.
        a.record(Duration::from_millis(1), true, t + 100);
        drive(&a, &mut t, 5, 10);
        assert_eq!(a.limit(), 6, "one congested window, then four of +1");
    }

    #[test]
    fn no_growth_while_the_limit_is_not_used() {
        let a = Arc::new(Adaptive::new(spec(AdaptiveAlgorithm::Aimd), 1));
        let mut t = 1;
        for _ in 0..10 {
            let _one = a.try_acquire(1.0);
            t += 100;
            for _ in 0..5 {
                a.record(Duration::from_millis(10), false, t);
            }
        }
        assert_eq!(a.limit(), 20);
    }

    #[test]
    fn requests_beyond_the_limit_or_their_share_are_refused() {
        let a = Arc::new(Adaptive::new(spec(AdaptiveAlgorithm::Aimd), 1));
        let low: Vec<Permit> = std::iter::from_fn(|| a.try_acquire(0.5)).collect();
        assert_eq!(low.len(), 10);
        let high: Vec<Permit> = std::iter::from_fn(|| a.try_acquire(1.0)).collect();
        assert_eq!(high.len(), 10);
        assert!(a.rejected.load(Relaxed) >= 2);
        drop(low);
        assert_eq!(a.in_flight(), 10);
    }

    #[test]
    fn a_window_needs_time_and_samples() {
        let a = Arc::new(Adaptive::new(spec(AdaptiveAlgorithm::Aimd), 1));
        let _held: Vec<Permit> = std::iter::from_fn(|| a.try_acquire(1.0)).collect();
        for _ in 0..50 {
            a.record(Duration::from_millis(80), false, 50);
        }
        assert_eq!(a.limit(), 20, "window not over yet");
        for _ in 0..4 {
            a.record(Duration::from_millis(80), false, 500);
        }
        assert_eq!(a.limit(), 16, "closed by time; the earlier samples count");
    }

    #[test]
    fn config_errors_name_their_key() {
        let m: model::AdaptiveConcurrency = serde_yaml::from_str(
            "{algorithm: aimd, min_limit: 0, max_limit: 10, initial_limit: 20, smoothing: 0, backoff_ratio: 1}",
        )
        .unwrap();
        let mut errs = Vec::new();
        assert!(compile("u", &m, &mut |k, e| errs.push(format!("{k}: {e}"))).is_none());
        for k in [
            "u.min_limit:",
            "u.initial_limit:",
            "u.smoothing:",
            "u.backoff_ratio:",
            "u.latency_threshold: `algorithm: aimd` needs",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(k)), "{k}: {errs:?}");
        }
    }
}
