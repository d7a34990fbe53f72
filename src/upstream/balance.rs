//! Load-balancing algorithms over one endpoint set.
//!
//! Each balancer is built once per endpoint set (when the set changes) and
//! then picks without locks: round-robin walks a precomputed smooth schedule
//! with an atomic cursor; random and least-request draw from a thread-local
//! generator; consistent hashing searches a sorted ring.

use super::endpoint::Endpoint;
use crate::rand::fast_u64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Longest smooth round-robin schedule kept; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 4096;
/// Ring points per unit of weight for consistent hashing.
const POINTS_PER_WEIGHT: u32 = 160;
const MAX_RING: u64 = 100_000;

pub enum Balancer {
    RoundRobin {
        schedule: Box<[u32]>,
        cursor: AtomicUsize,
    },
    Random {
        cumulative: Box<[u64]>,
    },
    LeastRequest,
    ConsistentHash {
        ring: Box<[(u64, u32)]>,
    },
}

/// Indices of endpoints that a retry must avoid.
pub type Exclude<'a> = &'a [usize];

impl Balancer {
    pub fn round_robin(eps: &[Arc<Endpoint>]) -> Balancer {
        Balancer::RoundRobin {
            schedule: smooth_schedule(eps).into(),
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn random(eps: &[Arc<Endpoint>]) -> Balancer {
        let mut acc = 0u64;
        let cumulative = eps
            .iter()
            .map(|e| {
                acc += e.weight.max(1) as u64;
                acc
            })
            .collect();
        Balancer::Random { cumulative }
    }

    pub fn consistent_hash(eps: &[Arc<Endpoint>]) -> Balancer {
        let total: u64 = eps
            .iter()
            .map(|e| (e.weight.max(1) * POINTS_PER_WEIGHT) as u64)
            .sum();
        let scale = if total > MAX_RING {
            MAX_RING as f64 / total as f64
        } else {
            1.0
        };
        let mut ring = Vec::with_capacity(total.min(MAX_RING) as usize);
        for (i, e) in eps.iter().enumerate() {
            let points = (((e.weight.max(1) * POINTS_PER_WEIGHT) as f64) * scale).max(1.0) as u32;
            // Points depend only on the endpoint's identity, so adding or
            // removing another endpoint moves only that endpoint's arcs.
            let id = format!("{}#{}", e.target, e.addr);
            for p in 0..points {
                ring.push((hash_bytes(format!("{id}-{p}").as_bytes()), i as u32));
            }
        }
        ring.sort_unstable();
        Balancer::ConsistentHash { ring: ring.into() }
    }

    /// Picks an available endpoint index, avoiding `exclude` when possible.
    pub fn pick(&self, eps: &[Arc<Endpoint>], key: Option<u64>, exclude: Exclude) -> Option<usize> {
        if eps.is_empty() {
            return None;
        }
        let ok = |i: usize| eps[i].health.is_available() && !exclude.contains(&i);
        let picked = match self {
            Balancer::RoundRobin { schedule, cursor } => {
                let n = schedule.len();
                let start = cursor.fetch_add(1, Ordering::Relaxed);
                let first = schedule[start % n] as usize;
                if ok(first) {
                    Some(first)
                } else {
                    // Spread an unavailable slot's share over the others by
                    // weight (random slots), instead of handing all of it to
                    // the next slot's endpoint, which would double its load.
                    (0..8)
                        .map(|_| schedule[fast_u64() as usize % n] as usize)
                        .find(|&i| ok(i))
                        .or_else(|| {
                            let r = fast_u64() as usize;
                            (0..n)
                                .map(|k| schedule[(r + k) % n] as usize)
                                .find(|&i| ok(i))
                        })
                }
            }
            Balancer::Random { cumulative } => {
                let total = *cumulative.last().unwrap_or(&1);
                let mut found = None;
                for _ in 0..4 {
                    let r = fast_u64() % total;
                    let i = cumulative.partition_point(|&c| c <= r);
                    if ok(i) {
                        found = Some(i);
                        break;
                    }
                }
                found.or_else(|| scan_from(eps.len(), fast_u64() as usize, ok))
            }
            Balancer::LeastRequest => p2c(eps, ok),
            Balancer::ConsistentHash { ring } => {
                let key = key.unwrap_or_else(fast_u64);
                let start = ring.partition_point(|&(h, _)| h < key);
                let n = ring.len();
                (0..n)
                    .map(|k| ring[(start + k) % n].1 as usize)
                    .find(|&i| ok(i))
            }
        };
        // Retries prefer another endpoint, but one is better than none.
        picked.or_else(|| {
            if exclude.is_empty() {
                None
            } else {
                self.pick(eps, key, &[])
            }
        })
    }
}

fn scan_from(n: usize, start: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
    (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
}

/// Power of two choices: two random available endpoints, the cheaper wins.
fn p2c(eps: &[Arc<Endpoint>], ok: impl Fn(usize) -> bool) -> Option<usize> {
    let n = eps.len();
    if n == 1 {
        return ok(0).then_some(0);
    }
    let a = scan_from(n, fast_u64() as usize, &ok)?;
    let offset = 1 + (fast_u64() as usize % (n - 1));
    let b = match scan_from(n, a + offset, &ok) {
        Some(b) if b != a => b,
        _ => return Some(a),
    };
    let (ca, cb) = (
        eps[a].load.cost(eps[a].weight),
        eps[b].load.cost(eps[b].weight),
    );
    Some(if cb < ca { b } else { a })
}

/// nginx's smooth weighted round-robin, unrolled into one full cycle.
fn smooth_schedule(eps: &[Arc<Endpoint>]) -> Vec<u32> {
    let mut weights: Vec<u64> = eps.iter().map(|e| e.weight.max(1) as u64).collect();
    let g = weights.iter().copied().fold(0, gcd);
    if g > 1 {
        weights.iter_mut().for_each(|w| *w /= g);
    }
    let total: u64 = weights.iter().sum();
    if total > MAX_SCHEDULE {
        let f = MAX_SCHEDULE as f64 / total as f64;
        weights
            .iter_mut()
            .for_each(|w| *w = ((*w as f64 * f).round() as u64).max(1));
    }
    let total: i64 = weights.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// FNV-1a with a murmur3 finaliser: fast on short keys, well spread.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::pool::Pool;
    use std::time::Duration;

    fn eps(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let addr = format!("127.0.0.1:{}", 10000 + i).parse().unwrap();
                Arc::new(Endpoint::new(
                    addr,
                    format!("t{i}:80").into(),
                    *w,
                    Pool::new(
                        crate::config::model::Protocol::Http1,
                        1,
                        Duration::from_secs(1),
                    ),
                ))
            })
            .collect()
    }

    #[test]
    fn smooth_round_robin_interleaves() {
        let e = eps(&[5, 1, 1]);
        let s = smooth_schedule(&e);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_skips_unavailable_and_excluded() {
        let e = eps(&[1, 1, 1]);
        let b = Balancer::round_robin(&e);
        let picks: Vec<_> = (0..6).map(|_| b.pick(&e, None, &[1]).unwrap()).collect();
        assert!(!picks.contains(&1));
        // Only the excluded one left: still better than nothing.
        let one = &e[1..2];
        assert_eq!(Balancer::round_robin(one).pick(one, None, &[0]), Some(0));
    }

    #[test]
    fn round_robin_spreads_a_skipped_share_by_weight() {
        let e = eps(&[1, 1, 1, 1]);
        let b = Balancer::round_robin(&e);
        let mut counts = [0usize; 4];
        for _ in 0..12_000 {
            counts[b.pick(&e, None, &[0]).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0);
        // 3000 in turn each, plus a third of endpoint 0's 3000 (not all of it
        // to endpoint 1).
        for c in &counts[1..] {
            assert!((3700..=4300).contains(c), "{counts:?}");
        }
    }

    #[test]
    fn consistent_hash_remaps_about_one_nth() {
        let all = eps(&[1; 10]);
        let full = Balancer::consistent_hash(&all);
        let fewer: Vec<_> = all[..9].to_vec();
        let less = Balancer::consistent_hash(&fewer);
        let keys = 20_000u64;
        let mut moved = 0;
        for k in 0..keys {
            let h = hash_bytes(format!("user-{k}").as_bytes());
            let a = full.pick(&all, Some(h), &[]).unwrap();
            let b = less.pick(&fewer, Some(h), &[]).unwrap();
            if a != b {
                moved += 1;
                assert_eq!(a, 9, "only keys of the removed endpoint move");
            }
        }
        let ratio = moved as f64 / keys as f64;
        assert!((0.05..0.15).contains(&ratio), "moved {ratio}");
    }

    #[test]
    fn p2c_prefers_less_loaded() {
        let e = eps(&[1, 1]);
        for _ in 0..10 {
            e[0].load.start();
        }
        let b = Balancer::LeastRequest;
        for _ in 0..50 {
            assert_eq!(b.pick(&e, None, &[]), Some(1));
        }
    }

    #[test]
    fn random_respects_weights() {
        let e = eps(&[3, 1]);
        let b = Balancer::random(&e);
        let n = 20_000;
        let zero = (0..n).filter(|_| b.pick(&e, None, &[]) == Some(0)).count();
        let share = zero as f64 / n as f64;
        assert!((0.72..0.78).contains(&share), "{share}");
    }
}
