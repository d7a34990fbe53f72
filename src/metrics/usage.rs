//! Per-consumer usage over recent windows, for the admin API's
//! `/consumers/{id}/usage`.
//!
//! Nothing is added to the request path: routes already count requests per
//! consumer (`RouteMetrics`). A background task ([`run`]) samples those
//! cumulative counters every [`INTERVAL`] and keeps an hour of samples; a
//! window's count is "now minus the newest sample at least that old", so
//! each window is exact to within one interval. Only non-zero
//! (route, consumer) pairs are stored.

use crate::snapshot::Snapshot;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the counters are sampled.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// The windows reported, by name.
pub const WINDOWS: [(&str, Duration); 4] = [
    ("1m", Duration::from_secs(60)),
    ("5m", Duration::from_secs(300)),
    ("15m", Duration::from_secs(900)),
    ("1h", Duration::from_secs(3600)),
];

/// Cumulative requests per (route name, consumer slot) at one instant.
struct Sample {
    at: Instant,
    counts: HashMap<(Arc<str>, usize), u64>,
}

#[derive(Default)]
pub struct UsageHistory {
    samples: Mutex<VecDeque<Sample>>,
}

fn totals(snap: &Snapshot) -> HashMap<(Arc<str>, usize), u64> {
    let mut m = HashMap::new();
    for r in &snap.routes {
        for slot in r.metrics.consumer_slots() {
            let n = r.metrics.consumer_requests(slot);
            if n > 0 {
                m.insert((r.name.clone(), slot), n);
            }
        }
    }
    m
}

impl UsageHistory {
    /// Takes one sample of the snapshot's counters and forgets samples older
    /// than the longest window (plus one interval).
    pub fn sample(&self, snap: &Snapshot, now: Instant) {
        let counts = totals(snap);
        let keep = WINDOWS[WINDOWS.len() - 1].1 + INTERVAL;
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while s
            .front()
            .is_some_and(|x| now.saturating_duration_since(x.at) > keep)
        {
            s.pop_front();
        }
        s.push_back(Sample { at: now, counts });
    }

    /// The usage of consumer slot `slot`: per route, the total since the
    /// process started and the count in each window.
    pub fn usage(&self, snap: &Snapshot, slot: usize, now: Instant) -> Value {
        let current = totals(snap);
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut routes = Vec::new();
        let mut sum_total = 0u64;
        let mut sums = [0u64; WINDOWS.len()];
        for r in &snap.routes {
            let key = (r.name.clone(), slot);
            let total = current.get(&key).copied().unwrap_or(0);
            if total == 0 {
                continue;
            }
            let mut windows = serde_json::Map::new();
            for (i, (name, w)) in WINDOWS.iter().enumerate() {
                // The newest sample taken at least `w` ago; none: the
                // process (and so every count) is younger than the window.
                let base = s
                    .iter()
                    .rev()
                    .find(|x| now.saturating_duration_since(x.at) >= *w)
                    .map_or(0, |x| x.counts.get(&key).copied().unwrap_or(0));
                let n = total.saturating_sub(base);
                sums[i] += n;
                windows.insert((*name).to_string(), n.into());
            }
            sum_total += total;
            routes.push(json!({"route": &*r.name, "total": total, "windows": windows}));
        }
        let mut all = serde_json::Map::new();
        for (i, (name, _)) in WINDOWS.iter().enumerate() {
            all.insert((*name).to_string(), sums[i].into());
        }
        json!({
            "total": sum_total,
            "windows": all,
            "routes": routes,
            "resolution_seconds": INTERVAL.as_secs(),
        })
    }
}

/// Samples every [`INTERVAL`] while the server lives.
pub async fn run(shared: std::sync::Weak<crate::server::Shared>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(sh) = shared.upgrade() else { return };
        let snap = sh.snapshot.load_full();
        sh.usage.sample(&snap, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    fn snapshot() -> Snapshot {
        let yaml = "listeners: [{name: l, address: '127.0.0.1:0'}]\nconsumers: [{id: app}]\nroutes:\n  - name: a\n    match: {path_prefix: /a}\n    action: {respond: {}}\n  - name: b\n    match: {path_prefix: /b}\n    action: {respond: {}}\n";
        crate::snapshot::compile(&parse_str("t.yaml", yaml, |_| None).unwrap(), None).unwrap()
    }

    #[test]
    fn windows_subtract_the_sample_at_their_start() {
        let snap = snapshot();
        let slot = snap.consumers.get("app").unwrap().slot;
        let h = UsageHistory::default();
        let t0 = Instant::now();
        let add = |route: usize, n: usize| {
            for _ in 0..n {
                snap.routes[route]
                    .metrics
                    .record(slot, 0, 200, Duration::ZERO, 0);
            }
        };
        add(0, 5);
        h.sample(&snap, t0);
        add(0, 3);
        add(1, 2);
        h.sample(&snap, t0 + Duration::from_secs(240));
        add(0, 1);
        let now = t0 + Duration::from_secs(300);
        let u = h.usage(&snap, slot as usize, now);
        assert_eq!(u["total"], 11);
        let a = &u["routes"][0];
        assert_eq!(a["route"], "a");
        assert_eq!(a["total"], 9);
        // 1m: newest sample ≥ 60 s old is t0+240 (8 then) → 1.
        assert_eq!(a["windows"]["1m"], 1);
        // 5m: t0 (5 then) → 4.
        assert_eq!(a["windows"]["5m"], 4);
        // 1h: no sample that old → everything.
        assert_eq!(a["windows"]["1h"], 9);
        assert_eq!(u["routes"][1]["windows"]["1m"], 0);
        assert_eq!(u["windows"]["1h"], 11);
        // Another consumer has nothing.
        let other = h.usage(&snap, crate::auth::consumer::SLOT_OTHER as usize, now);
        assert_eq!(other["total"], 0);
        assert_eq!(other["routes"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn old_samples_are_forgotten() {
        let snap = snapshot();
        let h = UsageHistory::default();
        let t0 = Instant::now();
        for i in 0..500u64 {
            h.sample(&snap, t0 + INTERVAL * i as u32);
        }
        let n = h.samples.lock().unwrap().len();
        assert!(n <= 3600 / 10 + 2, "{n}");
    }
}
