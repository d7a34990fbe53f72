//! A bounded map from a token's SHA-256 to what the introspection server
//! said about it, with an expiry per entry.
//!
//! Keys are digests, never tokens, so a memory dump of the cache does not
//! hold credentials. The map is split in shards, each behind a
//! `std::sync::Mutex` held for one lookup or one insert (never across an
//! `.await`), so concurrent requests rarely meet on a lock. Every operation
//! is O(1) (amortised for eviction): a shard evicts with the CLOCK
//! algorithm — entries are kept in insertion order with a "used" bit, and
//! the oldest entry not used since the hand last passed it goes first — a
//! cheap approximation of least-recently-used. Expired entries are not
//! returned; they are replaced in place or evicted like any other.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// A token's SHA-256.
pub type Key = [u8; 32];

const SHARDS: usize = 16;

pub struct TokenCache<V> {
    shards: Box<[Mutex<Shard<V>>]>,
}

struct Shard<V> {
    map: HashMap<Key, Slot<V>>,
    /// Every key of `map` exactly once, oldest first.
    order: VecDeque<Key>,
    capacity: usize,
}

struct Slot<V> {
    value: V,
    /// `clock::now_ms()` after which the entry is stale.
    expires_ms: u64,
    used: bool,
}

impl<V: Clone> TokenCache<V> {
    /// A cache of about `capacity` entries in total (each shard holds an
    /// equal part, at least one). `0` keeps nothing.
    pub fn new(capacity: usize) -> TokenCache<V> {
        let per_shard = if capacity == 0 {
            0
        } else {
            capacity.div_ceil(SHARDS)
        };
        TokenCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        order: VecDeque::new(),
                        capacity: per_shard,
                    })
                })
                .collect(),
        }
    }

    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, Shard<V>> {
        // The key is a SHA-256: any byte is uniformly distributed.
        self.shards[key[0] as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The value of `key`, unless absent or expired at `now_ms`.
    pub fn get(&self, key: &Key, now_ms: u64) -> Option<V> {
        let mut s = self.shard(key);
        let slot = s.map.get_mut(key)?;
        if slot.expires_ms <= now_ms {
            return None;
        }
        slot.used = true;
        Some(slot.value.clone())
    }

    /// Stores `value` for `ttl_ms` from `now_ms`, evicting one entry when
    /// the shard is full. A zero TTL stores nothing.
    pub fn insert(&self, key: Key, value: V, now_ms: u64, ttl_ms: u64) {
        if ttl_ms == 0 {
            return;
        }
        let mut s = self.shard(&key);
        if s.capacity == 0 {
            return;
        }
        let expires_ms = now_ms.saturating_add(ttl_ms);
        if let Some(slot) = s.map.get_mut(&key) {
            slot.value = value;
            slot.expires_ms = expires_ms;
            return;
        }
        if s.map.len() >= s.capacity {
            s.evict_one(now_ms);
        }
        s.order.push_back(key);
        s.map.insert(
            key,
            Slot {
                value,
                expires_ms,
                used: false,
            },
        );
    }

    /// Entries held (expired ones included), for tests and metrics.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V> Shard<V> {
    /// CLOCK: the oldest entry that is expired or unused since the hand
    /// last passed goes; used ones get a second chance at the back. Each
    /// pass clears a bit, so this ends within two turns of the queue.
    fn evict_one(&mut self, now_ms: u64) {
        while let Some(key) = self.order.pop_front() {
            let Some(slot) = self.map.get_mut(&key) else {
                continue;
            };
            if slot.used && slot.expires_ms > now_ms {
                slot.used = false;
                self.order.push_back(key);
                continue;
            }
            self.map.remove(&key);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(shard: u8, n: u8) -> Key {
        let mut k = [0u8; 32];
        k[0] = shard;
        k[1] = n;
        k
    }

    #[test]
    fn entries_expire() {
        let c = TokenCache::new(100);
        c.insert(key(0, 1), "a", 1_000, 500);
        assert_eq!(c.get(&key(0, 1), 1_499), Some("a"));
        assert_eq!(c.get(&key(0, 1), 1_500), None);
        c.insert(key(0, 1), "b", 2_000, 500);
        assert_eq!(c.get(&key(0, 1), 2_100), Some("b"));
        assert_eq!(c.len(), 1);
        c.insert(key(0, 2), "zero", 2_000, 0);
        assert_eq!(c.get(&key(0, 2), 2_000), None);
    }

    #[test]
    fn bounded_and_used_entries_get_a_second_chance() {
        // 16 shards × 2 = room for 2 in shard 0.
        let c = TokenCache::new(32);
        c.insert(key(0, 1), 1, 0, 1_000);
        c.insert(key(0, 2), 2, 0, 1_000);
        assert_eq!(c.get(&key(0, 1), 10), Some(1));
        c.insert(key(0, 3), 3, 10, 1_000);
        // 2 was the oldest unused entry.
        assert_eq!(c.get(&key(0, 2), 20), None);
        assert_eq!(c.get(&key(0, 1), 20), Some(1));
        assert_eq!(c.get(&key(0, 3), 20), Some(3));
        for n in 4..100 {
            c.insert(key(0, n), n, 30, 1_000);
        }
        assert_eq!(c.len(), 2);
        // Other shards are unaffected by shard 0 being full.
        c.insert(key(1, 1), 7, 30, 1_000);
        assert_eq!(c.get(&key(1, 1), 40), Some(7));
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let c = TokenCache::new(0);
        c.insert(key(0, 1), 1, 0, 1_000);
        assert!(c.is_empty());
    }
}
