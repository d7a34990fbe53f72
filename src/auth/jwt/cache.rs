//! The verified-token cache of one issuer.
//!
//! Keyed by the first 128 bits of the token's SHA-256 (the token itself is
//! not kept). Sharded: each shard is a `Mutex` held for one lookup or
//! insert, never across an `.await`. Each shard keeps two generations
//! (`hot`, `cold`): inserts go to `hot`; when it is full it becomes `cold`
//! and the old `cold` is dropped; a hit in `cold` moves the entry back to
//! `hot`. So tokens in use stay, the others age out, and every operation
//! is O(1). The whole cache holds at most `auth.token_cache_size` entries
//! (0: disabled).
//!
//! An entry never outlives what verification allowed: a hit is refused
//! once `now >= exp + leeway` (the same rule as verification), and when the
//! key that verified it has been retired (a JWKS refresh no longer lists
//! it).

use super::keys::Key;
use crate::auth::Principal;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

/// A verified token.
pub struct Entry {
    pub principal: Arc<Principal>,
    /// The key that verified the signature.
    pub key: Arc<Key>,
    /// `exp + leeway` (seconds since the epoch): refused from then on.
    pub valid_until: u64,
    /// The `consumer_claim` value, resolved against the live consumers on
    /// each hit.
    pub consumer: Option<Arc<str>>,
}

impl Entry {
    fn valid(&self, now: u64) -> bool {
        now < self.valid_until && self.key.is_live()
    }
}

/// The key is already a uniformly distributed digest: use its low 64 bits.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Map = HashMap<u128, Entry, BuildHasherDefault<DigestHasher>>;

#[derive(Default)]
struct Shard {
    hot: Map,
    cold: Map,
}

pub struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    /// Entries per generation and shard.
    per_gen: usize,
    /// Keep a cold generation (false when a shard holds a single entry).
    two_gens: bool,
    capacity: usize,
}

impl TokenCache {
    pub fn new(capacity: usize) -> TokenCache {
        let shards = if capacity >= 256 { 16 } else { 1 };
        let per_shard = capacity / shards;
        let (per_gen, two_gens) = if per_shard >= 2 {
            (per_shard / 2, true)
        } else {
            (per_shard, false)
        };
        TokenCache {
            shards: (0..if capacity == 0 { 0 } else { shards })
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            per_gen,
            two_gens,
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    /// The cache key of a token: the first 128 bits of its SHA-256.
    pub fn key_of(token: &[u8]) -> u128 {
        let d = ring::digest::digest(&ring::digest::SHA256, token);
        let mut k = [0u8; 16];
        k.copy_from_slice(&d.as_ref()[..16]);
        u128::from_le_bytes(k)
    }

    fn shard(&self, key: u128) -> &Mutex<Shard> {
        // High bits pick the shard, low bits index the map.
        &self.shards[(key >> 120) as usize % self.shards.len()]
    }

    /// Calls `f` with the entry for `key` when it is still valid at `now`
    /// (seconds since the epoch); drops it when it no longer is.
    pub fn with<R>(&self, key: u128, now: u64, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        if self.shards.is_empty() {
            return None;
        }
        let mut s = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = s.hot.get(&key) {
            if e.valid(now) {
                return Some(f(e));
            }
            s.hot.remove(&key);
            return None;
        }
        let e = s.cold.remove(&key)?;
        if !e.valid(now) {
            return None;
        }
        let r = f(&e);
        self.put(&mut s, key, e);
        Some(r)
    }

    pub fn insert(&self, key: u128, entry: Entry) {
        if self.shards.is_empty() {
            return;
        }
        let mut s = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        s.cold.remove(&key);
        let old = self.put(&mut s, key, entry);
        drop(s);
        drop(old);
    }

    /// Inserts into `hot`, turning it into `cold` first when full; returns
    /// the dropped generation so it is freed outside the lock.
    fn put(&self, s: &mut Shard, key: u128, entry: Entry) -> Option<Map> {
        let mut dropped = None;
        if s.hot.len() >= self.per_gen && !s.hot.contains_key(&key) {
            let full = std::mem::take(&mut s.hot);
            dropped = Some(if self.two_gens {
                std::mem::replace(&mut s.cold, full)
            } else {
                full
            });
        }
        s.hot.insert(key, entry);
        dropped
    }

    /// Entries held (both generations), for tests and the admin API.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|m| {
                let s = m.lock().unwrap_or_else(|e| e.into_inner());
                s.hot.len() + s.cold.len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &Arc<Key>, until: u64) -> Entry {
        Entry {
            principal: Arc::new(Principal::default()),
            key: key.clone(),
            valid_until: until,
            consumer: None,
        }
    }

    #[test]
    fn bounded_by_capacity() {
        let k = Arc::new(Key::from_secret(None, &[1u8; 32]).unwrap());
        for cap in [1usize, 2, 3, 10, 255, 256, 1000] {
            let c = TokenCache::new(cap);
            for i in 0..5000u32 {
                c.insert(TokenCache::key_of(&i.to_le_bytes()), entry(&k, 100));
                assert!(c.len() <= cap, "cap {cap}: {}", c.len());
            }
            let last = TokenCache::key_of(&4999u32.to_le_bytes());
            assert!(c.with(last, 1, |_| ()).is_some(), "cap {cap}");
        }
        let off = TokenCache::new(0);
        off.insert(1, entry(&k, 100));
        assert!(!off.enabled() && off.with(1, 1, |_| ()).is_none());
    }

    #[test]
    fn used_entries_survive_a_generation_change() {
        let k = Arc::new(Key::from_secret(None, &[1u8; 32]).unwrap());
        let c = TokenCache::new(4); // 1 shard, 2 per generation
        c.insert(1, entry(&k, 100));
        c.insert(2, entry(&k, 100));
        c.insert(3, entry(&k, 100)); // {1,2} become cold
        assert!(c.with(1, 1, |_| ()).is_some()); // 1 back to hot
        c.insert(4, entry(&k, 100)); // hot {3,1} full: cold := {3,1}
        c.insert(5, entry(&k, 100));
        assert!(c.with(1, 1, |_| ()).is_some());
        assert!(c.with(2, 1, |_| ()).is_none());
    }

    #[test]
    fn expired_and_retired_entries_are_refused() {
        let k = Arc::new(Key::from_secret(None, &[1u8; 32]).unwrap());
        let c = TokenCache::new(100);
        c.insert(1, entry(&k, 10));
        assert!(c.with(1, 9, |_| ()).is_some());
        assert!(c.with(1, 10, |_| ()).is_none());
        assert!(c.with(1, 9, |_| ()).is_none(), "dropped once expired");
        c.insert(2, entry(&k, 100));
        k.retire();
        assert!(c.with(2, 1, |_| ()).is_none());
    }
}
