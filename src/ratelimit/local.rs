//! The in-memory store: limit states by key in many small shards, each a
//! `Mutex<HashMap>` held for one lookup and update (never across an
//! `.await`), so requests for different keys rarely meet on a lock and
//! there is no global lock. Keys are 64-bit hashes of (limit, key text)
//! under a per-process random SipHash key, so a client cannot aim its keys
//! at a chosen shard. Each shard holds at most `max_keys / SHARDS`
//! entries: a full shard first forgets idle entries (whose state is back
//! to its initial value), then the entry that has been idle longest.
//! A sweeper task forgets idle entries every few seconds.
//!
//! Also here: in-flight counters for concurrency limits ([`Gauges`]).

use super::algo::{Algo, Check, State};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub const SHARDS: usize = 64;

/// The map's hasher: keys are already uniform 64-bit hashes.
#[derive(Default)]
pub struct Passthrough(u64);

impl Hasher for Passthrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ *b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map<V> = HashMap<u64, V, BuildHasherDefault<Passthrough>>;

/// The process's key hasher (random keys, fixed for the process).
pub fn key_hasher() -> std::collections::hash_map::DefaultHasher {
    static STATE: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    STATE
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher()
}

struct Entry {
    state: State,
    /// When the state is back to its initial value (µs).
    idle_at: u64,
}

pub struct LocalStore {
    shards: Box<[Mutex<Map<Entry>>]>,
    per_shard: usize,
    /// Entries forgotten while still counting (shard full): a sign that
    /// `max_keys` is too small.
    pub evicted: AtomicU64,
}

impl LocalStore {
    pub fn new(max_keys: usize) -> LocalStore {
        LocalStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Map::default())).collect(),
            per_shard: (max_keys / SHARDS).max(16),
            evicted: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: u64) -> &Mutex<Map<Entry>> {
        // The high bits pick the shard; the map uses all of them.
        &self.shards[(key >> 58) as usize % SHARDS]
    }

    /// Runs `f` on the state of `key` for `algo` (created when absent).
    pub fn with<R>(&self, key: u64, algo: &Algo, now: u64, f: impl FnOnce(&mut State) -> R) -> R {
        let mut map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) && map.len() >= self.per_shard {
            self.make_room(&mut map, now);
        }
        let e = map.entry(key).or_insert_with(|| Entry {
            state: algo.initial(now),
            idle_at: now,
        });
        let r = f(&mut e.state);
        e.idle_at = algo.idle_at(&e.state);
        r
    }

    /// Decides one request of `cost` for `key`.
    pub fn check(&self, key: u64, algo: &Algo, now: u64, cost: u64) -> Check {
        self.with(key, algo, now, |st| algo.check(st, now, cost))
    }

    pub fn refund(&self, key: u64, algo: &Algo, now: u64, cost: u64) {
        self.with(key, algo, now, |st| algo.refund(st, now, cost))
    }

    fn make_room(&self, map: &mut Map<Entry>, now: u64) {
        map.retain(|_, e| e.idle_at > now);
        if map.len() >= self.per_shard {
            if let Some(k) = map.iter().min_by_key(|(_, e)| e.idle_at).map(|(k, _)| *k) {
                map.remove(&k);
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Forgets idle entries (the sweeper; one shard locked at a time).
    pub fn sweep(&self, now: u64) {
        for s in self.shards.iter() {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, e| e.idle_at > now);
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// In-flight counts by key (concurrency limits). An entry exists only
/// while its count is above zero, so the map is bounded by what is in
/// flight.
pub struct Gauges {
    shards: Box<[Mutex<Map<u64>>]>,
}

impl Default for Gauges {
    fn default() -> Self {
        Gauges {
            shards: (0..SHARDS).map(|_| Mutex::new(Map::default())).collect(),
        }
    }
}

impl Gauges {
    fn shard(&self, key: u64) -> &Mutex<Map<u64>> {
        &self.shards[(key >> 58) as usize % SHARDS]
    }

    /// Takes one slot of `key` when fewer than `max` are taken; returns
    /// the count after (or the count found when refused).
    pub fn acquire(self: &Arc<Self>, key: u64, max: u64) -> Result<(Slot, u64), u64> {
        let mut map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= max {
            let found = *n;
            if found == 0 {
                map.remove(&key);
            }
            return Err(found);
        }
        *n += 1;
        let after = *n;
        drop(map);
        Ok((
            Slot {
                gauges: self.clone(),
                key,
            },
            after,
        ))
    }

    pub fn current(&self, key: u64) -> u64 {
        self.shard(key)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    fn release(&self, key: u64) {
        let mut map = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&key);
            }
        }
    }
}

/// One taken concurrency slot, given back when dropped.
pub struct Slot {
    gauges: Arc<Gauges>,
    key: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauges.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::super::algo::{Calendar, SEC};
    use super::*;

    #[test]
    fn exact_counts_per_key_and_bounded_size() {
        let s = LocalStore::new(SHARDS * 16);
        let a = Algo::Window {
            cal: Calendar::Minute,
            quota: 5,
        };
        let now = 1000 * SEC;
        for _ in 0..5 {
            assert!(s.check(1, &a, now, 1).allowed);
        }
        assert!(!s.check(1, &a, now, 1).allowed);
        assert!(s.check(2, &a, now, 1).allowed);
        // Flood one shard: it never holds more than its share.
        for k in 0..1000u64 {
            s.check(k << 1, &a, now, 1);
        }
        assert!(s.len() <= SHARDS * 16);
        // Everything is idle after the window: the sweep forgets it.
        s.sweep(now + 120 * SEC);
        assert!(s.is_empty());
    }

    #[test]
    fn gauges_release_on_drop() {
        let g = Arc::new(Gauges::default());
        let a = g.acquire(7, 2).unwrap().0;
        let b = g.acquire(7, 2).unwrap().0;
        assert_eq!(g.acquire(7, 2).err(), Some(2));
        drop(a);
        assert_eq!(g.current(7), 1);
        let c = g.acquire(7, 2).unwrap().0;
        drop((b, c));
        assert_eq!(g.current(7), 0);
        assert!(g.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }
}
