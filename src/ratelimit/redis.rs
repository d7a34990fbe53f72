//! The Redis backend: one connection manager (multiplexed, reconnecting)
//! per configuration, one Lua script that decides atomically on the
//! server (`EVALSHA`, loaded again with `SCRIPT LOAD` when Redis forgot
//! it), a timeout on every call and a circuit breaker, so a dead Redis
//! costs one timeout per cooldown rather than one per request.
//!
//! Keys are `{<prefix>:limit:<key text>}:<limit id>[:<window>]`: the hash
//! tag is the key text, so every limit of one request with the same key
//! lands in one Redis Cluster slot and is decided by one script call.
//! Every key carries a TTL (the end of its window, or of its GCRA
//! horizon), so idle keys expire on their own.

use super::algo::{Algo, State};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The decision script. Numbers are µs (since the epoch for times); Lua
/// numbers are doubles, exact for integers below 2^53.
///
/// KEYS: per limit one state key (GCRA, window) or two (sliding: the
/// previous and the current fixed window).
/// ARGV: now, mode (0: decide all or nothing; 1: reserve), then six
/// values per limit: kind (1 GCRA, 2 window, 3 sliding), p1, p2, cost,
/// debt, ttl (ms). GCRA: p1 interval, p2 burst. Window: p1 quota.
/// Sliding: p1 length, p2 quota.
/// Returns three integers per limit: the verdict (mode 0: 1 allowed, 0
/// refused, the same for all; mode 1: units granted) and the state after
/// (GCRA: tat, 0; window: count, 0; sliding: previous, current).
pub const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local mode = tonumber(ARGV[2])
local n = (#ARGV - 2) / 6
local ls = {}
local k = 1
for i = 1, n do
  local b = 2 + (i - 1) * 6
  local l = {kind = tonumber(ARGV[b + 1]), p1 = tonumber(ARGV[b + 2]), p2 = tonumber(ARGV[b + 3]),
             cost = tonumber(ARGV[b + 4]), debt = tonumber(ARGV[b + 5]), ttl = tonumber(ARGV[b + 6])}
  if l.kind == 1 then
    l.key = KEYS[k]; k = k + 1
    l.s1 = tonumber(redis.call('GET', l.key) or now)
    if l.s1 < now then l.s1 = now end
    l.s2 = 0
  elseif l.kind == 2 then
    l.key = KEYS[k]; k = k + 1
    l.s1 = tonumber(redis.call('GET', l.key) or 0)
    l.s2 = 0
  else
    l.key = KEYS[k + 1]
    l.s1 = tonumber(redis.call('GET', KEYS[k]) or 0)
    l.s2 = tonumber(redis.call('GET', l.key) or 0)
    k = k + 2
  end
  ls[i] = l
end
local function avail(l)
  local a
  if l.kind == 1 then
    a = math.floor((l.p1 * l.p2 - (l.s1 - now)) / l.p1)
  elseif l.kind == 2 then
    a = l.p1 - l.s1
  else
    local e = now % l.p1
    a = l.p2 - (math.ceil(l.s1 * (l.p1 - e) / l.p1) + l.s2)
  end
  if a < 0 then a = 0 end
  return a
end
local function add(l, c)
  if c <= 0 then return end
  if l.kind == 1 then
    l.s1 = l.s1 + c * l.p1
    redis.call('SET', l.key, string.format('%.0f', l.s1), 'PX', math.ceil((l.s1 - now) / 1000) + 1000)
  elseif l.kind == 2 then
    l.s1 = redis.call('INCRBY', l.key, c)
    redis.call('PEXPIRE', l.key, l.ttl)
  else
    l.s2 = redis.call('INCRBY', l.key, c)
    redis.call('PEXPIRE', l.key, l.ttl)
  end
end
local out = {}
if mode == 0 then
  local ok = 1
  for i = 1, n do
    if avail(ls[i]) < ls[i].cost then ok = 0 end
  end
  for i = 1, n do
    if ok == 1 then add(ls[i], ls[i].cost) end
    out[#out + 1] = ok
    out[#out + 1] = ls[i].s1
    out[#out + 1] = ls[i].s2
  end
else
  for i = 1, n do
    local l = ls[i]
    add(l, l.debt)
    local g = math.min(l.cost, avail(l))
    add(l, g)
    out[#out + 1] = g
    out[#out + 1] = l.s1
    out[#out + 1] = l.s2
  end
end
return out
"#;

/// One limit's part of a script call.
pub struct Call<'a> {
    pub algo: &'a Algo,
    /// `{prefix:limit:key}:id` (without the window suffix).
    pub base: &'a str,
    pub cost: u64,
    pub debt: u64,
}

impl Call<'_> {
    fn push(&self, now: u64, keys: &mut Vec<String>, args: &mut Vec<u64>) {
        match *self.algo {
            Algo::Gcra { interval, burst } => {
                keys.push(self.base.to_owned());
                args.extend([1, interval, burst, self.cost, self.debt, 0]);
            }
            Algo::Window { cal, quota } => {
                let (start, end) = cal.bounds(now);
                keys.push(format!("{}:{}", self.base, start / super::algo::SEC));
                let ttl = (end - now) / 1000 + 60_000;
                args.extend([2, quota, 0, self.cost, self.debt, ttl]);
            }
            Algo::Sliding { len, quota } => {
                let idx = now / len;
                keys.push(format!("{}:{}", self.base, idx.wrapping_sub(1)));
                keys.push(format!("{}:{}", self.base, idx));
                let ttl = 2 * len / 1000 + 60_000;
                args.extend([3, len, quota, self.cost, self.debt, ttl]);
            }
        }
    }

    /// The state the script reported, as the local algorithms see it.
    pub fn state(&self, now: u64, s1: u64, s2: u64) -> State {
        match *self.algo {
            Algo::Gcra { .. } => State::Gcra { tat: s1 },
            Algo::Window { cal, .. } => State::Window {
                start: cal.bounds(now).0,
                count: s1,
            },
            Algo::Sliding { len, .. } => State::Sliding {
                idx: now / len,
                prev: s1,
                cur: s2,
            },
        }
    }
}

/// Consecutive failures open the breaker for a cooldown; then one call
/// probes, and its success closes it.
pub struct Breaker {
    threshold: u32,
    cooldown: u64,
    failures: AtomicU32,
    /// µs; 0 = closed.
    open_until: AtomicU64,
    probing: AtomicBool,
    /// Times the breaker opened (for tests and logs).
    pub opened: AtomicU64,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown: cooldown.as_micros() as u64,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            opened: AtomicU64::new(0),
        }
    }

    /// Open and still cooling down: do not call Redis.
    pub fn is_open(&self, now: u64) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until != 0 && now < until
    }

    /// May a call be made now? After the cooldown only one (the probe).
    /// The call reports its result through the [`Pass`]; a probe whose
    /// call is abandoned before it has one (its request was cancelled)
    /// frees its place, or Redis would never be probed again.
    pub fn admit(&self, now: u64) -> Option<Pass<'_>> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Some(Pass {
                breaker: self,
                probe: false,
            });
        }
        if now < until || self.probing.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Pass {
            breaker: self,
            probe: true,
        })
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("rate limiting: Redis is reachable again");
        }
        self.probing.store(false, Ordering::Release);
    }

    fn failure(&self, now: u64) {
        let f = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        if f >= self.threshold || was_probe {
            let prev = self.open_until.swap(now + self.cooldown, Ordering::AcqRel);
            if prev == 0 {
                self.opened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    failures = f,
                    "rate limiting: Redis unavailable; skipping it for the cooldown"
                );
            }
        }
    }
}

/// One call the breaker let through; it reports the call's result.
#[must_use]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    /// The half-open probe (the only call after the cooldown).
    probe: bool,
}

// === impl Pass ===

impl Pass<'_> {
    pub fn success(mut self) {
        self.probe = false;
        self.breaker.success();
    }

    pub fn failure(mut self, now: u64) {
        self.probe = false;
        self.breaker.failure(now);
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.probe {
            // Abandoned without a result: another call may probe.
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

pub struct Redis {
    client: redis::Client,
    timeout: Duration,
    conn: OnceLock<Result<ConnectionManager, String>>,
    script: redis::Script,
    pub breaker: Breaker,
    pub prefix: String,
}

#[derive(Debug)]
pub struct Unavailable;

impl Redis {
    pub fn new(
        url: &str,
        timeout: Duration,
        prefix: &str,
        threshold: u32,
        cooldown: Duration,
    ) -> Result<Redis, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(Redis {
            client,
            timeout,
            conn: OnceLock::new(),
            script: redis::Script::new(SCRIPT),
            breaker: Breaker::new(threshold, cooldown),
            prefix: prefix.to_owned(),
        })
    }

    /// The connection manager, made on first use (inside the runtime; it
    /// connects lazily and reconnects by itself).
    fn conn(&self) -> Result<ConnectionManager, Unavailable> {
        let r = self.conn.get_or_init(|| {
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(100));
            ConnectionManager::new_lazy_with_config(self.client.clone(), cfg)
                .map_err(|e| e.to_string())
        });
        match r {
            Ok(c) => Ok(c.clone()),
            Err(e) => {
                tracing::warn!(error = %e, "rate limiting: cannot create the Redis client");
                Err(Unavailable)
            }
        }
    }

    /// Runs the script for `calls` (one round trip, under the timeout and
    /// the breaker). Returns three numbers per call.
    pub async fn run(
        &self,
        now: u64,
        mode: u64,
        calls: &[Call<'_>],
    ) -> Result<Vec<u64>, Unavailable> {
        let Some(pass) = self.breaker.admit(now) else {
            return Err(Unavailable);
        };
        let mut keys = Vec::with_capacity(calls.len() * 2);
        let mut args = Vec::with_capacity(2 + calls.len() * 6);
        args.extend([now, mode]);
        for c in calls {
            c.push(now, &mut keys, &mut args);
        }
        let mut conn = match self.conn() {
            Ok(c) => c,
            Err(e) => {
                pass.failure(now);
                return Err(e);
            }
        };
        let mut inv = self.script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for a in &args {
            inv.arg(*a);
        }
        let r = tokio::time::timeout(self.timeout, inv.invoke_async::<Vec<i64>>(&mut conn)).await;
        match r {
            Ok(Ok(v)) if v.len() == calls.len() * 3 => {
                pass.success();
                Ok(v.into_iter().map(|x| x.max(0) as u64).collect())
            }
            Ok(Ok(_)) => {
                pass.failure(now);
                Err(Unavailable)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "rate limiting: Redis call failed");
                pass.failure(now);
                Err(Unavailable)
            }
            Err(_) => {
                tracing::debug!("rate limiting: Redis call timed out");
                pass.failure(now);
                Err(Unavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_k_failures_and_probes_once() {
        let b = Breaker::new(3, Duration::from_secs(5));
        let t = 1_000_000;
        b.admit(t).unwrap().failure(t);
        b.admit(t).unwrap().failure(t);
        assert!(!b.is_open(t));
        b.admit(t).unwrap().failure(t);
        assert!(b.is_open(t));
        assert!(b.admit(t + 1).is_none());
        // After the cooldown: one probe, not two.
        let later = t + 5_000_001;
        assert!(!b.is_open(later));
        let probe = b.admit(later).expect("the probe");
        assert!(b.admit(later).is_none());
        // A failed probe opens it again at once.
        probe.failure(later);
        assert!(b.is_open(later + 1));
        assert!(b.admit(later + 1).is_none());
        let again = later + 5_000_001;
        b.admit(again).expect("the next probe").success();
        assert!(b.admit(again).is_some() && b.admit(again).is_some());
        assert_eq!(b.opened.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_abandoned_probe_frees_its_place() {
        let b = Breaker::new(1, Duration::from_secs(5));
        let t = 1_000_000;
        b.admit(t).unwrap().failure(t);
        let later = t + 5_000_001;
        let probe = b.admit(later).expect("the probe");
        assert!(b.admit(later).is_none(), "one probe at a time");
        // Its request was cancelled before Redis answered.
        drop(probe);
        let next = b.admit(later).expect("another probe may go");
        assert!(b.admit(later).is_none());
        next.success();
        assert!(!b.is_open(later));
        assert!(b.admit(later).is_some());
        // A call abandoned while the breaker is closed changes nothing.
        drop(b.admit(later));
        assert!(!b.is_open(later) && b.admit(later).is_some());
    }
}
