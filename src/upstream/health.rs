//! Endpoint health: active checks (periodic HTTP probes with thresholds) and
//! passive outlier detection (consecutive failures eject an endpoint for a
//! cooldown that doubles with each further ejection).

use super::endpoint::Endpoint;
use crate::clock::now_ms;
use crate::config::model::Protocol;
use http_body_util::Empty;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;

pub struct Health {
    /// Verdict of active checks (true until checks say otherwise).
    active_ok: AtomicBool,
    probe_ok_streak: AtomicU32,
    probe_fail_streak: AtomicU32,
    /// Consecutive request failures seen by passive detection.
    failures: AtomicU32,
    /// Ejected until this process-clock millisecond; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Ejections so far (drives the growing cooldown; decays when healthy).
    ejections: AtomicU32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            active_ok: AtomicBool::new(true),
            probe_ok_streak: AtomicU32::new(0),
            probe_fail_streak: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }
}

/// Passive outlier detection settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Health {
    /// Whether the balancer may pick this endpoint now.
    #[inline]
    pub fn is_available(&self) -> bool {
        if !self.active_ok.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || until <= now_ms()
    }

    pub fn is_active_ok(&self) -> bool {
        self.active_ok.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > now_ms()
    }

    /// How much longer the endpoint stays ejected (`None` when it is not).
    pub fn ejected_for(&self) -> Option<std::time::Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until != 0 && until > now).then(|| std::time::Duration::from_millis(until - now))
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// A request to this endpoint succeeded.
    #[inline]
    pub fn record_success(&self, cfg: &Outlier) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until != 0 {
            // Back from an ejection: forget one ejection per quiet base period.
            let now = now_ms();
            if now > until + cfg.base_ejection.as_millis() as u64 {
                self.ejected_until.store(0, Ordering::Relaxed);
                let _ = self
                    .ejections
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| e.checked_sub(1));
            }
        }
    }

    /// A request to this endpoint failed (connect error, timeout or 5xx).
    pub fn record_failure(&self, cfg: &Outlier) {
        if cfg.consecutive_failures == 0 {
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= cfg.consecutive_failures {
            self.failures.store(0, Ordering::Relaxed);
            let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(20);
            let cooldown = cfg
                .base_ejection
                .saturating_mul(1u32 << k.min(16))
                .min(cfg.max_ejection);
            self.ejected_until.store(
                now_ms() + cooldown.as_millis().max(1) as u64,
                Ordering::Relaxed,
            );
            tracing::warn!(cooldown = ?cooldown, failures = n, "target ejected by outlier detection");
        }
    }

    /// Applies one active probe result against the thresholds.
    pub fn record_probe(&self, ok: bool, healthy_threshold: u32, unhealthy_threshold: u32) -> bool {
        if ok {
            self.probe_fail_streak.store(0, Ordering::Relaxed);
            let n = self.probe_ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.active_ok.load(Ordering::Relaxed) && n >= healthy_threshold {
                self.active_ok.store(true, Ordering::Relaxed);
                // A target that proves healthy again is readmitted at once.
                self.ejected_until.store(0, Ordering::Relaxed);
                return true;
            }
        } else {
            self.probe_ok_streak.store(0, Ordering::Relaxed);
            let n = self.probe_fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if self.active_ok.load(Ordering::Relaxed) && n >= unhealthy_threshold {
                self.active_ok.store(false, Ordering::Relaxed);
                return true;
            }
        }
        false
    }
}

/// Active check settings, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveCheck {
    pub path: String,
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Inclusive status ranges counted as healthy.
    pub expected: Vec<(u16, u16)>,
}

impl ActiveCheck {
    /// Probes `ep` once over a fresh connection (so probes never disturb the pool).
    pub async fn probe(&self, ep: &Endpoint) -> bool {
        let attempt = async {
            let stream = TcpStream::connect(ep.addr).await.ok()?;
            let _ = stream.set_nodelay(true);
            // Over TLS when the upstream uses it (same verification as requests).
            let stream = crate::tls::ClientStream::connect(ep.tls.as_ref(), stream)
                .await
                .ok()?;
            let host = self.host.as_deref().unwrap_or(&ep.target);
            let protocol = ep.pool.settings().0;
            let ua = "portico-health-check";
            let resp = if protocol == Protocol::Http1 {
                let (mut tx, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
                tokio::spawn(conn);
                let req = http::Request::get(self.path.as_str())
                    .header(http::header::HOST, host)
                    .header(http::header::USER_AGENT, ua)
                    .header(http::header::CONNECTION, "close")
                    .body(Empty::<bytes::Bytes>::new())
                    .ok()?;
                tx.send_request(req).await.ok()?
            } else {
                // h2c / h2: the probe speaks the upstream's protocol; the
                // authority plays the Host header's part.
                let (mut tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .ok()?;
                tokio::spawn(conn);
                let scheme = if protocol == Protocol::H2 {
                    "https"
                } else {
                    "http"
                };
                let req = http::Request::get(format!("{scheme}://{host}{}", self.path))
                    .header(http::header::USER_AGENT, ua)
                    .body(Empty::<bytes::Bytes>::new())
                    .ok()?;
                tx.send_request(req).await.ok()?
            };
            Some(resp.status().as_u16())
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Some(status)) => self
                .expected
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&status)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Outlier {
        Outlier {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(50),
            max_ejection: Duration::from_millis(120),
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_with_growing_cooldown() {
        let h = Health::default();
        let c = cfg();
        h.record_failure(&c);
        h.record_failure(&c);
        assert!(h.is_available());
        h.record_success(&c);
        h.record_failure(&c);
        h.record_failure(&c);
        assert!(h.is_available(), "success resets the streak");
        h.record_failure(&c);
        assert!(!h.is_available());
        assert_eq!(h.ejections(), 1);
        let first = h.ejected_until.load(Ordering::Relaxed) - now_ms();
        for _ in 0..3 {
            h.record_failure(&c);
        }
        let second = h.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!(second > first, "cooldown grows: {first} then {second}");
        for _ in 0..30 {
            h.record_failure(&c);
        }
        let capped = h.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!(capped <= 120, "cooldown capped at max_ejection: {capped}");
    }

    #[test]
    fn probe_thresholds() {
        let h = Health::default();
        assert!(!h.record_probe(false, 2, 2));
        assert!(h.is_available());
        assert!(h.record_probe(false, 2, 2));
        assert!(!h.is_available());
        assert!(!h.record_probe(true, 2, 2));
        assert!(!h.is_available());
        assert!(h.record_probe(true, 2, 2));
        assert!(h.is_available());
    }

    #[test]
    fn disabled_detection_never_ejects() {
        let h = Health::default();
        let c = Outlier {
            consecutive_failures: 0,
            ..cfg()
        };
        for _ in 0..100 {
            h.record_failure(&c);
        }
        assert!(h.is_available());
    }
}
