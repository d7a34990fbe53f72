//! One resolved address of an upstream target, with its pool, health and load.

use super::health::Health;
use super::pool::Pool;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Endpoint {
    pub addr: SocketAddr,
    /// The target as configured (`host:port`), used as the default Host header.
    pub target: Arc<str>,
    /// `target` as a Host header value.
    pub host_value: http::HeaderValue,
    pub weight: u32,
    pub pool: Pool,
    pub health: Health,
    pub load: Load,
    /// TLS to this endpoint's target, if the upstream uses TLS.
    pub tls: Option<crate::tls::TargetTls>,
    /// The target's series (shared with the target's other endpoints).
    pub metrics: Arc<crate::metrics::TargetMetrics>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, target: Arc<str>, weight: u32, pool: Pool) -> Endpoint {
        let host_value = http::HeaderValue::from_str(&target)
            .unwrap_or_else(|_| http::HeaderValue::from_static("invalid"));
        Endpoint {
            addr,
            target,
            host_value,
            weight,
            pool,
            health: Health::default(),
            load: Load::default(),
            tls: None,
            metrics: Arc::default(),
        }
    }

    /// Records into `metrics` (the target's series).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::TargetMetrics>) -> Endpoint {
        self.metrics = metrics;
        self
    }

    /// Connections to this endpoint use `tls`.
    pub fn with_tls(mut self, tls: Option<crate::tls::TargetTls>) -> Endpoint {
        self.tls = tls;
        self
    }
}

/// In-flight requests and a peak-EWMA of response latency, read by the
/// least-request balancer. Lock-free; races only blur the estimate slightly.
#[derive(Default)]
pub struct Load {
    in_flight: AtomicU32,
    /// f64 bits: latency estimate in microseconds.
    ewma_us: AtomicU64,
    /// Milliseconds (process clock) of the last update.
    stamp_ms: AtomicU64,
}

/// Decay constant of the peak-EWMA.
const EWMA_TAU_MS: f64 = 10_000.0;
/// Latency assumed for an endpoint with no observation yet (1 ms).
const DEFAULT_LATENCY_US: f64 = 1_000.0;

impl Load {
    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records one latency sample: a sample above the estimate replaces it
    /// (peak), a lower one decays it towards the sample.
    pub fn observe(&self, rtt: Duration) {
        let now = crate::clock::now_ms();
        let sample = rtt.as_secs_f64() * 1e6;
        let prev = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        let next = if prev == 0.0 || sample > prev {
            sample
        } else {
            let dt = now.saturating_sub(self.stamp_ms.load(Ordering::Relaxed)) as f64;
            let w = (-dt / EWMA_TAU_MS).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma_us.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ms.store(now, Ordering::Relaxed);
    }

    /// The estimate, decayed by the time since the last sample (as in
    /// Finagle's peak-EWMA): a target that was slow once is not shunned
    /// forever, it becomes worth trying again and then measured afresh.
    pub fn latency_us(&self) -> f64 {
        self.latency_us_at(crate::clock::now_ms())
    }

    fn latency_us_at(&self, now_ms: u64) -> f64 {
        let v = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        if v == 0.0 {
            return DEFAULT_LATENCY_US;
        }
        let dt = now_ms.saturating_sub(self.stamp_ms.load(Ordering::Relaxed));
        v * (-(dt as f64) / EWMA_TAU_MS).exp()
    }

    /// Cost used by P2C: expected latency times the queue it would join.
    pub fn cost(&self, weight: u32) -> f64 {
        self.latency_us() * (self.in_flight() as f64 + 1.0) / weight.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_takes_peaks_and_decays_while_idle() {
        let l = Load::default();
        assert_eq!(l.latency_us(), DEFAULT_LATENCY_US);
        l.observe(Duration::from_millis(200));
        let peak = l.latency_us();
        assert!(peak > 190_000.0 && peak <= 200_000.0, "{peak}");
        // A faster sample right away barely moves a peak.
        l.observe(Duration::from_millis(1));
        assert!(l.latency_us() > 150_000.0, "{}", l.latency_us());
        // Idle for a minute: the estimate has decayed below a fast target's.
        let later = crate::clock::now_ms() + 60_000;
        assert!(
            l.latency_us_at(later) < 1_000.0,
            "{}",
            l.latency_us_at(later)
        );
    }
}
