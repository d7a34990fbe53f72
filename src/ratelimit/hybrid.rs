//! Hybrid mode: each instance decides locally from a token allowance it
//! reserves from Redis in batches, so the request path never waits for
//! Redis.
//!
//! Per (limit, key) an instance keeps `granted` (units Redis reserved for
//! it, not used yet) and `credit` (units it admitted without a grant,
//! at most `batch`, not yet reported). A request takes from `granted`,
//! else from the credit (unless Redis said the limit is exhausted), else
//! it is refused. When the grant is used up, a background task reports
//! the credit to Redis as a debt (counted there whatever the limit) and
//! asks for another batch, which Redis grants only from what is left.
//!
//! Accuracy: grants never exceed the limit; only credit can. An instance
//! stops using credit once Redis reports the limit exhausted, and its
//! unreported credit never exceeds `batch`, so with N instances at most
//! N × batch units are admitted beyond the limit per window. Grants an
//! instance holds unused are lost for the window (at most batch each):
//! the combined count can also fall short of the limit by N × batch.

use super::algo::{Algo, Check, State};
use super::local::SHARDS;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Mutex;

#[derive(Default)]
struct Entry {
    /// The window (calendar start, sliding index; 0 for GCRA) the grant
    /// and credit belong to.
    generation: u64,
    granted: u64,
    /// When the grant lapses (µs).
    grant_until: u64,
    /// Admitted without a grant, not yet acknowledged by Redis.
    credit: u64,
    /// Redis said nothing is left until then (µs).
    exhausted_until: u64,
    /// A sync is in flight.
    syncing: bool,
    /// What Redis said was left at the last sync (for the headers).
    remaining: u64,
    /// When the limit is back to full, as of the last sync (µs).
    reset_at: u64,
}

type Map = HashMap<u64, Entry, BuildHasherDefault<super::local::Passthrough>>;

pub struct HybridStore {
    shards: Box<[Mutex<Map>]>,
    per_shard: usize,
}

/// How a request used the allowance (to give it back if another limit
/// refuses the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Took {
    Grant,
    Credit,
}

/// What the request path decided, and whether a sync should start.
pub struct Local {
    pub check: Check,
    pub took: Option<Took>,
    /// Start a sync reporting this much credit (`Some` only when no sync
    /// is in flight; the entry is marked syncing).
    pub sync: Option<Sync>,
}

#[derive(Debug, Clone, Copy)]
pub struct Sync {
    pub generation: u64,
    pub debt: u64,
}

pub fn generation(algo: &Algo, now: u64) -> u64 {
    match *algo {
        Algo::Gcra { .. } => 0,
        Algo::Window { cal, .. } => cal.bounds(now).0,
        Algo::Sliding { len, .. } => now / len,
    }
}

impl HybridStore {
    pub fn new(max_keys: usize) -> HybridStore {
        HybridStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Map::default())).collect(),
            per_shard: (max_keys / SHARDS).max(16),
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Map> {
        self.shards[(key >> 58) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Decides one request from the local allowance.
    pub fn decide(&self, key: u64, algo: &Algo, now: u64, cost: u64, batch: u64) -> Local {
        let generation = generation(algo, now);
        let mut map = self.shard(key);
        if !map.contains_key(&key) && map.len() >= self.per_shard {
            // Forget entries with nothing outstanding first.
            map.retain(|_, e| e.syncing || e.credit > 0 || e.granted > 0);
            if map.len() >= self.per_shard {
                if let Some(k) = map.keys().next().copied() {
                    map.remove(&k);
                }
            }
        }
        let e = map.entry(key).or_insert_with(|| Entry {
            generation,
            remaining: algo.quota(),
            ..Entry::default()
        });
        if e.generation != generation {
            *e = Entry {
                generation,
                remaining: algo.quota(),
                syncing: e.syncing,
                ..Entry::default()
            };
        }
        if e.grant_until <= now {
            e.granted = 0;
        }
        let exhausted = now < e.exhausted_until;
        let took = if e.granted >= cost {
            e.granted -= cost;
            Some(Took::Grant)
        } else if !exhausted && e.credit + cost <= batch {
            e.credit += cost;
            Some(Took::Credit)
        } else {
            None
        };
        let mut sync = None;
        if !e.syncing && (e.credit > 0 || (e.granted == 0 && !exhausted)) {
            e.syncing = true;
            sync = Some(Sync {
                generation,
                debt: e.credit,
            });
        }
        let remaining = e
            .remaining
            .saturating_sub(e.credit)
            .saturating_add(e.granted);
        let check = Check {
            allowed: took.is_some(),
            remaining,
            reset: e.reset_at.saturating_sub(now),
            retry: if took.is_some() {
                0
            } else if exhausted {
                e.exhausted_until - now
            } else {
                // Waiting for the next batch.
                super::algo::SEC
            },
        };
        Local { check, took, sync }
    }

    /// Gives back what a request took (another limit refused it).
    pub fn refund(&self, key: u64, took: Took, cost: u64) {
        if let Some(e) = self.shard(key).get_mut(&key) {
            match took {
                Took::Grant => e.granted += cost,
                Took::Credit => e.credit = e.credit.saturating_sub(cost),
            }
        }
    }

    /// Applies Redis's answer to a sync: `granted` units and the state
    /// after. Returns another sync to start when credit was admitted
    /// meanwhile.
    pub fn synced(
        &self,
        key: u64,
        algo: &Algo,
        now: u64,
        s: Sync,
        granted: u64,
        mut state: State,
    ) -> Option<Sync> {
        let mut map = self.shard(key);
        let e = map.get_mut(&key)?;
        e.syncing = false;
        if e.generation != s.generation {
            return None;
        }
        e.credit = e.credit.saturating_sub(s.debt);
        e.granted += granted;
        let tau = match *algo {
            Algo::Gcra { interval, burst } => now + interval.saturating_mul(burst),
            Algo::Window { cal, .. } => cal.bounds(now).1,
            Algo::Sliding { len, .. } => (now / len + 1) * len,
        };
        e.grant_until = tau;
        let report = algo.report(&mut state, now);
        e.remaining = report.remaining;
        e.reset_at = now + report.reset;
        if granted == 0 && report.remaining == 0 {
            e.exhausted_until = now + algo.retry_after(&mut state, now, 1);
        }
        if e.credit > 0 {
            e.syncing = true;
            return Some(Sync {
                generation: s.generation,
                debt: e.credit,
            });
        }
        None
    }

    /// A sync failed: the credit stays outstanding.
    pub fn failed(&self, key: u64) {
        if let Some(e) = self.shard(key).get_mut(&key) {
            e.syncing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::algo::{Calendar, SEC};
    use super::*;

    #[test]
    fn credit_then_grants_then_exhaustion() {
        let h = HybridStore::new(1024);
        let a = Algo::Window {
            cal: Calendar::Day,
            quota: 10,
        };
        let now = 100 * 86_400 * SEC;
        // No grant yet: credit up to the batch, one sync started.
        let d = h.decide(1, &a, now, 1, 3);
        assert!(d.check.allowed);
        let s = d.sync.expect("sync");
        assert_eq!(s.debt, 1);
        assert!(h.decide(1, &a, now, 1, 3).sync.is_none());
        assert!(h.decide(1, &a, now, 1, 3).check.allowed);
        // Credit used up while the sync is in flight.
        assert!(!h.decide(1, &a, now, 1, 3).check.allowed);
        // Redis counted the debt (1) and granted 3: count 4.
        let st = State::Window {
            start: now,
            count: 4,
        };
        let again = h.synced(1, &a, now, s, 3, st).expect("credit left");
        assert_eq!(again.debt, 2);
        for _ in 0..3 {
            assert!(h.decide(1, &a, now, 1, 3).check.allowed);
        }
        // Redis counted the other 2 and had nothing left to grant.
        let st = State::Window {
            start: now,
            count: 10,
        };
        assert!(h.synced(1, &a, now, again, 0, st).is_none());
        let d = h.decide(1, &a, now, 1, 3);
        assert!(!d.check.allowed);
        assert!(d.sync.is_none());
        assert!(d.check.retry > 0);
        // The next day starts over.
        assert!(h.decide(1, &a, now + 86_400 * SEC, 1, 3).check.allowed);
    }
}
