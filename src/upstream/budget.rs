//! Retry budget: retries may add at most `ratio` of the requests, plus a small
//! reserve, so that retries can never multiply load on a struggling upstream.
//!
//! Each request deposits `ratio` of a token and each retry withdraws one; the
//! balance is capped at the reserve. Lock-free; in steady state without
//! retries a request only reads the balance.

use std::sync::atomic::{AtomicI64, Ordering};

const UNIT: i64 = 1000;

pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
    cap: i64,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_retries: u32) -> RetryBudget {
        let cap = (min_retries.max(1) as i64) * UNIT;
        RetryBudget {
            balance: AtomicI64::new(cap),
            deposit: (ratio.clamp(0.0, 1.0) * UNIT as f64) as i64,
            cap,
        }
    }

    #[inline]
    pub fn on_request(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < self.cap {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget; false when exhausted.
    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= UNIT).then_some(b - UNIT)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_bounds_retries() {
        let b = RetryBudget::new(0.2, 10);
        let mut retries = 0;
        for _ in 0..1000 {
            b.on_request();
            if b.try_withdraw() {
                retries += 1;
            }
        }
        // 10 reserve + 20% of 1000.
        assert!((200..=210).contains(&retries), "{retries}");
    }

    #[test]
    fn exhausted_without_requests() {
        let b = RetryBudget::new(0.2, 3);
        assert!(b.try_withdraw());
        assert!(b.try_withdraw());
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }
}
