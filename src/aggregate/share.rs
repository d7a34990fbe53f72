//! Answers shared between client requests, per aggregate call: single-flight
//! (identical concurrent calls wait for one upstream request) and a bounded
//! in-memory cache of GET answers.
//!
//! The key is everything the call sends (method, path and query, the headers
//! the call sets, the body) plus, unless the call is `public`, who is asking
//! (the consumer id, else the token's issuer and subject; requests without
//! an identity share one key space). So a consumer never receives an answer
//! fetched for another one.
//!
//! Both tables are sharded `std::sync::Mutex`es held for one lookup or
//! insert, never across an `.await`; they exist only for calls that enable
//! them. They belong to the compiled action: a reload starts them empty.

use super::Failure;
use bytes::Bytes;
use http::HeaderValue;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A call's outcome as shared with other requests: the answer's JSON
/// text, checked ([`super::doc::check`]).
pub type Shared = Result<Bytes, Failure>;

const SHARDS: usize = 8;

type Table<V> = Mutex<HashMap<Box<[u8]>, V>>;

fn shard_of(key: &[u8], n: usize) -> usize {
    // Fixed keys (SipHash 1-3): only used to spread keys over shards.
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % n
}

// === impl Flights ===

/// Calls in flight, by key.
#[derive(Default)]
pub struct Flights {
    shards: [Table<Arc<Flight>>; SHARDS],
}

pub struct Flight {
    tx: watch::Sender<Option<Shared>>,
}

/// What joining a flight gives.
pub enum Join<'a> {
    /// No identical call was running: make it, then `Leader::finish`.
    Lead(Leader<'a>),
    /// One is running: wait for its outcome.
    Follow(watch::Receiver<Option<Shared>>),
}

/// The request that makes the upstream call for everyone. Dropped without
/// `finish` (cancelled), it leaves; followers then make their own call.
pub struct Leader<'a> {
    flights: &'a Flights,
    key: &'a [u8],
    flight: Arc<Flight>,
}

impl Flights {
    pub fn join<'a>(&'a self, key: &'a [u8]) -> Join<'a> {
        let mut map = lock(&self.shards[shard_of(key, SHARDS)]);
        if let Some(f) = map.get(key) {
            return Join::Follow(f.tx.subscribe());
        }
        let (tx, _) = watch::channel(None);
        let flight = Arc::new(Flight { tx });
        map.insert(key.into(), flight.clone());
        Join::Lead(Leader {
            flights: self,
            key,
            flight,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

impl Leader<'_> {
    pub fn finish(self, outcome: &Shared) {
        self.flight.tx.send_replace(Some(outcome.clone()));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.flights.shards[shard_of(self.key, SHARDS)]);
        if map
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            map.remove(self.key);
        }
    }
}

/// Waits for the leader's outcome; `None` when it left without one.
pub async fn follow(mut rx: watch::Receiver<Option<Shared>>) -> Option<Shared> {
    let r = rx.wait_for(Option::is_some).await.ok()?;
    r.clone()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a consistent map (each critical
    // section is one map operation): keep using it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl Cache ===

struct Entry {
    value: Bytes,
    expires: Instant,
}

/// A bounded TTL cache of successful answers.
pub struct Cache {
    ttl: Duration,
    per_shard: usize,
    shards: Box<[Table<Entry>]>,
}

impl Cache {
    /// Holds at most `max_entries` rounded up to a multiple of the shard
    /// count (at most 8 shards, one per entry below that).
    pub fn new(ttl: Duration, max_entries: usize) -> Cache {
        let n = max_entries.clamp(1, SHARDS);
        Cache {
            ttl,
            per_shard: max_entries.max(1).div_ceil(n),
            shards: (0..n).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &[u8]) -> &Table<Entry> {
        &self.shards[shard_of(key, self.shards.len())]
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.get_at(key, Instant::now())
    }

    fn get_at(&self, key: &[u8], now: Instant) -> Option<Bytes> {
        let mut map = lock(self.shard(key));
        let e = map.get(key)?;
        if e.expires > now {
            return Some(e.value.clone());
        }
        map.remove(key);
        None
    }

    /// Stores `value` for the TTL the upstream's `Cache-Control` allows
    /// (`shared`: the entry is not specific to one identity). The entry
    /// keeps a copy: `value` may be a slice of a connection's read buffer,
    /// which it would otherwise keep alive.
    pub fn put(&self, key: &[u8], value: &Bytes, cc: Option<&HeaderValue>, shared: bool) {
        let Some(ttl) = ttl_for(self.ttl, cc, shared) else {
            return;
        };
        self.put_at(key, Bytes::copy_from_slice(value), ttl, Instant::now());
    }

    fn put_at(&self, key: &[u8], value: Bytes, ttl: Duration, now: Instant) {
        let mut map = lock(self.shard(key));
        if map.len() >= self.per_shard && !map.contains_key(key) {
            map.retain(|_, e| e.expires > now);
            if map.len() >= self.per_shard {
                // Full of live entries: evict the one expiring first.
                if let Some(k) = map
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            key.into(),
            Entry {
                value,
                expires: now + ttl,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

/// How long an answer may be kept: the configured TTL, shortened by
/// `max-age` (or, for a shared entry, `s-maxage`); never with `no-store`,
/// `no-cache`, a zero age, or `private` on a shared entry.
pub fn ttl_for(ttl: Duration, cc: Option<&HeaderValue>, shared: bool) -> Option<Duration> {
    let Some(cc) = cc.and_then(|v| v.to_str().ok()) else {
        return Some(ttl);
    };
    let (mut max_age, mut s_maxage) = (None, None);
    for d in cc.split(',') {
        let d = d.trim();
        let (name, val) = match d.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (d, None),
        };
        let secs = || val.and_then(|v| v.parse::<u64>().ok());
        if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
            return None;
        } else if name.eq_ignore_ascii_case("private") {
            if shared {
                return None;
            }
        } else if name.eq_ignore_ascii_case("max-age") {
            max_age = Some(secs()?);
        } else if name.eq_ignore_ascii_case("s-maxage") {
            s_maxage = Some(secs()?);
        }
    }
    let age = if shared {
        s_maxage.or(max_age)
    } else {
        max_age
    };
    let t = match age {
        Some(s) => ttl.min(Duration::from_secs(s)),
        None => ttl,
    };
    (!t.is_zero()).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn cache_control_bounds_the_ttl() {
        let t = Duration::from_secs(60);
        assert_eq!(ttl_for(t, None, true), Some(t));
        assert_eq!(
            ttl_for(t, Some(&hv("public, max-age=5")), true),
            Some(Duration::from_secs(5))
        );
        assert_eq!(ttl_for(t, Some(&hv("max-age=600")), true), Some(t));
        assert_eq!(
            ttl_for(t, Some(&hv("max-age=30, s-maxage=2")), true),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            ttl_for(t, Some(&hv("max-age=30, s-maxage=2")), false),
            Some(Duration::from_secs(30))
        );
        assert_eq!(ttl_for(t, Some(&hv("no-store")), false), None);
        assert_eq!(ttl_for(t, Some(&hv("No-Cache")), false), None);
        assert_eq!(ttl_for(t, Some(&hv("max-age=0")), false), None);
        assert_eq!(ttl_for(t, Some(&hv("max-age=bad")), false), None);
        assert_eq!(ttl_for(t, Some(&hv("private, max-age=9")), true), None);
        assert_eq!(
            ttl_for(t, Some(&hv("private, max-age=9")), false),
            Some(Duration::from_secs(9))
        );
    }

    #[test]
    fn cache_is_bounded_and_expires() {
        let ttl = Duration::from_secs(10);
        let c = Cache::new(ttl, 3);
        let t0 = Instant::now();
        for i in 0..10u8 {
            // Later entries expire later: the earliest are evicted.
            c.put_at(
                &[i],
                Bytes::from(i.to_string()),
                ttl,
                t0 + Duration::from_secs(i.into()),
            );
        }
        assert!(c.len() <= 3, "{}", c.len());
        let now = t0 + Duration::from_secs(9);
        assert_eq!(c.get_at(&[9], now).as_deref(), Some(&b"9"[..]));
        assert_eq!(c.get_at(&[0], now), None);
        assert_eq!(c.get_at(&[9], now + ttl), None, "expired");
        assert_eq!(
            c.get_at(&[9], now),
            None,
            "an expired entry is removed when seen"
        );
        c.put(b"k", &Bytes::from_static(b"1"), Some(&hv("no-store")), true);
        assert_eq!(c.get(b"k"), None);
    }

    #[tokio::test]
    async fn one_leader_many_followers() {
        let f = Flights::default();
        let key = b"GET /x".to_vec();
        let Join::Lead(leader) = f.join(&key) else {
            panic!("first joiner leads");
        };
        let Join::Follow(rx1) = f.join(&key) else {
            panic!("second joiner follows");
        };
        let Join::Follow(rx2) = f.join(&key) else {
            panic!("third joiner follows");
        };
        leader.finish(&Ok(Bytes::from_static(br#"{"a":1}"#)));
        assert_eq!(f.len(), 0, "a finished flight leaves the table");
        let got = follow(rx1).await.unwrap().unwrap();
        assert_eq!(&got[..], br#"{"a":1}"#);
        assert!(follow(rx2).await.unwrap().is_ok());

        // A leader that leaves without an outcome releases its followers.
        let Join::Lead(leader) = f.join(&key) else {
            panic!("the key is free again");
        };
        let Join::Follow(rx) = f.join(&key) else {
            panic!("follows");
        };
        drop(leader);
        assert!(follow(rx).await.is_none());
        assert!(matches!(f.join(&key), Join::Lead(_)));
    }
}
