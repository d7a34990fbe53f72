//! A coarse process-relative clock in milliseconds, cheap to store in atomics.

use std::sync::OnceLock;
use std::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the first call in this process (never 0 after start-up
/// matters: callers use 0 as "unset", so the value is offset by one).
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}
