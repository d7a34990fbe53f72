//! Rate limits and quotas (docs/traffic-control.md is the guide).
//!
//! - [`algo`]: GCRA throttles, calendar windows, sliding windows — pure
//!   functions of a small state and the time.
//! - [`local`]: the in-memory backend (sharded maps, bounded, idle keys
//!   forgotten) and the in-flight gauges of concurrency limits.
//! - [`redis`]: the Redis backend: one Lua script decides atomically,
//!   under a timeout and a circuit breaker.
//! - [`hybrid`]: local decisions from allowances reserved from Redis in
//!   batches by background tasks.
//!
//! [`Limiting`] is what a snapshot compiles from `rate_limiting` (plans,
//! per-consumer limits, defaults); its [`Runtime`] (counters, the Redis
//! connection, the clock) is kept across reloads while the backend
//! settings stay the same. Each limit has a stable id (a hash of where it
//! is defined and its settings), part of every counter key, so an
//! unchanged limit keeps its counters across reloads and instances agree
//! on Redis keys. The `rate_limit` policy itself is `policy::ratelimit`.

pub mod algo;
pub mod hybrid;
pub mod local;
pub mod redis;

use crate::config::model;
use algo::{Algo, Calendar, SEC};
use http::HeaderName;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// Where time comes from: the wall clock in production, a hand-driven one
/// in tests (window rollover without sleeping).
pub trait Clock: Send + Sync {
    /// Microseconds since the Unix epoch (UTC).
    fn now_us(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    }
}

/// A clock that moves only when told.
#[derive(Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(us: u64) -> ManualClock {
        ManualClock(AtomicU64::new(us))
    }
    pub fn set(&self, us: u64) {
        self.0.store(us, Ordering::Relaxed)
    }
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a limit keeps its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    /// Every decision is one Redis round trip.
    Redis,
    /// Local decisions from allowances reserved from Redis.
    Hybrid,
}

/// One part of a limit key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    ClientIp,
    Consumer,
    /// The consumer's first group.
    Group,
    Plan,
    Route,
    Header(HeaderName),
    Claim(Box<str>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rate(Algo),
    /// At most `max` requests in flight per key (`websockets`: only
    /// upgrade requests, held for the tunnel's life).
    Concurrent {
        max: u64,
        websockets: bool,
    },
}

/// A compiled limit.
#[derive(Debug)]
pub struct LimitDef {
    pub name: Arc<str>,
    /// Stable id: part of every counter key.
    pub id: u64,
    pub kind: Kind,
    pub backend: Backend,
    /// When Redis is unavailable: decide locally (`true`) or answer 503.
    pub fail_open: bool,
    /// The local limit used when failing open.
    pub fallback: Option<Algo>,
    /// Hybrid: units reserved per sync (and the most credit).
    pub batch: u64,
    /// The key it counts by: its own `key`, else its list's default (the
    /// policy's key for a route's limits, `consumer` for a plan's or a
    /// consumer's own).
    pub key: Box<[KeyPart]>,
}

/// Runtime state kept across reloads while the backend settings stay.
pub struct Runtime {
    pub clock: Arc<dyn Clock>,
    pub local: local::LocalStore,
    pub gauges: Arc<local::Gauges>,
    pub hybrid: hybrid::HybridStore,
    pub redis: Option<redis::Redis>,
    sweeper: OnceLock<()>,
}

impl Runtime {
    pub fn new(
        clock: Arc<dyn Clock>,
        max_keys: usize,
        redis: Option<redis::Redis>,
    ) -> Arc<Runtime> {
        Arc::new(Runtime {
            clock,
            local: local::LocalStore::new(max_keys),
            gauges: Arc::new(local::Gauges::default()),
            hybrid: hybrid::HybridStore::new(max_keys),
            redis,
            sweeper: OnceLock::new(),
        })
    }

    /// Starts the idle-key sweeper on first use (inside the runtime; it
    /// holds a `Weak` and ends with the runtime).
    pub fn ensure_sweeper(self: &Arc<Self>) {
        if self.sweeper.get().is_some() {
            return;
        }
        self.sweeper.get_or_init(|| {
            let weak: Weak<Runtime> = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(rt) = weak.upgrade() else { return };
                    rt.local.sweep(rt.clock.now_us());
                }
            });
        });
    }
}

/// What a snapshot compiled from `rate_limiting` and `consumers[].limits`.
pub struct Limiting {
    pub runtime: Arc<Runtime>,
    /// Plan name → its limits.
    pub plans: HashMap<Arc<str>, Arc<[Arc<LimitDef>]>>,
    /// Consumer id → its own limits (replacing its plan's).
    pub consumers: HashMap<Arc<str>, Arc<[Arc<LimitDef>]>>,
    pub defaults: Defaults,
    /// The settings the runtime was made from.
    settings: (model::LocalLimits, Option<model::RedisLimits>),
}

#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub backend: Backend,
    pub fail_open: bool,
    pub batch: u64,
    pub instances: u64,
    pub has_redis: bool,
}

impl Limiting {
    /// The limits of a consumer: its own, else its plan's.
    pub fn for_consumer(&self, c: &crate::auth::Consumer) -> Option<&Arc<[Arc<LimitDef>]>> {
        if self.consumers.is_empty() && self.plans.is_empty() {
            return None;
        }
        self.consumers
            .get(&*c.id)
            .or_else(|| c.plan.as_ref().and_then(|p| self.plans.get(&**p)))
    }
}

/// Reports a problem at a key path.
pub type Err<'e> = &'e mut dyn FnMut(String, String);

/// Compiles `rate_limiting` and every consumer's `limits`; the runtime of
/// `previous` is kept when `local` and `redis` are unchanged.
pub fn compile(
    cfg: &model::Config,
    previous: Option<&Limiting>,
    clock: Option<Arc<dyn Clock>>,
    err: Err,
) -> Limiting {
    let rl = &cfg.rate_limiting;
    let settings = (rl.local.clone(), rl.redis.clone());
    let runtime = match previous {
        Some(p) if p.settings == settings && clock.is_none() => p.runtime.clone(),
        _ => {
            let mut redis_backend = None;
            if let Some(r) = &rl.redis {
                if r.expected_instances == 0 {
                    err(
                        "rate_limiting.redis.expected_instances".into(),
                        "must be at least 1".into(),
                    );
                }
                if r.batch == 0 {
                    err(
                        "rate_limiting.redis.batch".into(),
                        "must be at least 1".into(),
                    );
                }
                if r.timeout.0.is_zero() {
                    err(
                        "rate_limiting.redis.timeout".into(),
                        "must be above 0".into(),
                    );
                }
                match redis::Redis::new(
                    &r.url,
                    r.timeout.0,
                    &r.prefix,
                    r.failure_threshold,
                    r.cooldown.0,
                ) {
                    Ok(x) => redis_backend = Some(x),
                    Err(e) => err(
                        "rate_limiting.redis.url".into(),
                        format!("`{}` is not a Redis URL: {e}", r.url),
                    ),
                }
                if !(r.url.starts_with("redis://") || r.url.starts_with("redis+unix://")) {
                    err(
                        "rate_limiting.redis.url".into(),
                        "only `redis://` (and `redis+unix://`) URLs are supported".into(),
                    );
                }
            }
            if rl.local.max_keys == 0 {
                err(
                    "rate_limiting.local.max_keys".into(),
                    "must be at least 1".into(),
                );
            }
            Runtime::new(
                clock.unwrap_or_else(|| Arc::new(SystemClock)),
                rl.local.max_keys,
                redis_backend,
            )
        }
    };
    let defaults = Defaults {
        backend: backend(rl.backend),
        fail_open: rl
            .redis
            .as_ref()
            .is_none_or(|r| r.on_error == model::FailMode::FailOpen),
        batch: rl.redis.as_ref().map_or(100, |r| r.batch.max(1)),
        instances: rl
            .redis
            .as_ref()
            .map_or(1, |r| r.expected_instances.max(1) as u64),
        has_redis: rl.redis.is_some(),
    };
    if defaults.backend != Backend::Local && !defaults.has_redis {
        err(
            "rate_limiting.backend".into(),
            "the redis and hybrid backends need `rate_limiting.redis`".into(),
        );
    }
    let consumer_key = [KeyPart::Consumer];
    let mut plans = HashMap::new();
    for (name, list) in &rl.plans {
        let p = format!("rate_limiting.plans.{name}");
        let defs = compile_list(
            &p,
            &format!("plan:{name}"),
            list,
            &consumer_key,
            &defaults,
            err,
        );
        plans.insert(Arc::from(name.as_str()), defs);
    }
    let mut consumers = HashMap::new();
    for (i, c) in cfg.consumers.iter().enumerate() {
        if let Some(list) = &c.limits {
            let p = format!("consumers[{i}].limits");
            let defs = compile_list(
                &p,
                &format!("consumer:{}", c.id),
                list,
                &consumer_key,
                &defaults,
                err,
            );
            consumers.insert(Arc::from(c.id.as_str()), defs);
        }
    }
    Limiting {
        runtime,
        plans,
        consumers,
        defaults,
        settings,
    }
}

fn backend(b: model::LimitBackend) -> Backend {
    match b {
        model::LimitBackend::Local => Backend::Local,
        model::LimitBackend::Redis => Backend::Redis,
        model::LimitBackend::Hybrid => Backend::Hybrid,
    }
}

/// Compiles a list of limits defined at `p` (`scope` names where, for the
/// ids); `key` is the key of limits that give none.
pub fn compile_list(
    p: &str,
    scope: &str,
    list: &[model::Limit],
    key: &[KeyPart],
    d: &Defaults,
    err: Err,
) -> Arc<[Arc<LimitDef>]> {
    let mut out: Vec<Arc<LimitDef>> = Vec::new();
    for (i, l) in list.iter().enumerate() {
        let lp = format!("{p}[{i}]");
        if out.iter().any(|x| *x.name == *l.name) {
            err(
                format!("{lp}.name"),
                format!("duplicate limit name `{}`", l.name),
            );
            continue;
        }
        if let Some(def) = compile_limit(&lp, scope, l, key, d, err) {
            out.push(Arc::new(def));
        }
    }
    out.into()
}

fn compile_limit(
    p: &str,
    scope: &str,
    l: &model::Limit,
    policy_key: &[KeyPart],
    d: &Defaults,
    err: Err,
) -> Option<LimitDef> {
    let mut failed = false;
    let mut e = |k: String, m: String| {
        failed = true;
        err(k, m)
    };
    if l.name.is_empty()
        || !l
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        e(
            format!("{p}.name"),
            "letters, digits, `_`, `-` and `.` only (it is sent in the RateLimit headers)".into(),
        );
    }
    let kinds = [
        l.rate.is_some(),
        l.quota.is_some(),
        l.concurrent.is_some(),
        l.websockets.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if kinds != 1 {
        e(
            p.into(),
            "a limit has exactly one of `rate`, `quota`, `concurrent`, `websockets`".into(),
        );
        return None;
    }
    let positive = |v: u64, k: &str, e: &mut dyn FnMut(String, String)| {
        if v == 0 {
            e(format!("{p}.{k}"), "must be at least 1".into());
        }
    };
    let kind = if let Some(rate) = l.rate {
        positive(rate, "rate", &mut e);
        let per = l.per.map_or(SEC, |d| d.0.as_micros() as u64);
        if per == 0 {
            e(format!("{p}.per"), "must be above 0".into());
        }
        let burst = l.burst.unwrap_or(rate);
        positive(burst, "burst", &mut e);
        if l.window.is_some() || l.sliding.is_some() {
            e(
                p.into(),
                "`window` and `sliding` go with `quota`, not `rate`".into(),
            );
        }
        let interval = per / rate.max(1);
        if interval == 0 {
            e(
                format!("{p}.rate"),
                "more than one per microsecond is not supported".into(),
            );
        }
        Kind::Rate(Algo::Gcra {
            interval: interval.max(1),
            burst: burst.max(1),
        })
    } else if let Some(quota) = l.quota {
        positive(quota, "quota", &mut e);
        if l.per.is_some() || l.burst.is_some() {
            e(
                p.into(),
                "`per` and `burst` go with `rate`, not `quota`".into(),
            );
        }
        match (l.window, l.sliding) {
            (Some(w), None) => Kind::Rate(Algo::Window {
                cal: match w {
                    model::CalendarWindow::Minute => Calendar::Minute,
                    model::CalendarWindow::Hour => Calendar::Hour,
                    model::CalendarWindow::Day => Calendar::Day,
                    model::CalendarWindow::Month => Calendar::Month,
                },
                quota: quota.max(1),
            }),
            (None, Some(s)) => {
                if s.0 < Duration::from_secs(1) {
                    e(format!("{p}.sliding"), "must be at least 1s".into());
                }
                Kind::Rate(Algo::Sliding {
                    len: (s.0.as_micros() as u64).max(SEC),
                    quota: quota.max(1),
                })
            }
            _ => {
                e(
                    p.into(),
                    "a quota needs exactly one of `window` (minute, hour, day, month) or `sliding` (a duration)".into(),
                );
                return None;
            }
        }
    } else {
        let (max, websockets) = match l.concurrent {
            Some(n) => (n, false),
            None => (l.websockets.unwrap_or(1), true),
        };
        positive(
            max,
            if websockets {
                "websockets"
            } else {
                "concurrent"
            },
            &mut e,
        );
        Kind::Concurrent { max, websockets }
    };
    let backend_v = l.backend.map(backend).unwrap_or(d.backend);
    if matches!(kind, Kind::Concurrent { .. }) {
        if l.backend.is_some_and(|b| b != model::LimitBackend::Local) {
            e(
                format!("{p}.backend"),
                "concurrency limits count what this instance has in flight: local only".into(),
            );
        }
    } else if backend_v != Backend::Local && !d.has_redis {
        e(
            format!("{p}.backend"),
            "the redis and hybrid backends need `rate_limiting.redis`".into(),
        );
    }
    if l.batch == Some(0) {
        e(format!("{p}.batch"), "must be at least 1".into());
    }
    let key = match &l.key {
        Some(k) => parse_key(&format!("{p}.key"), k, &mut e)?,
        None => policy_key.into(),
    };
    if failed {
        return None;
    }
    let backend_v = if matches!(kind, Kind::Concurrent { .. }) {
        Backend::Local
    } else {
        backend_v
    };
    let fail_open = l
        .on_error
        .map_or(d.fail_open, |m| m == model::FailMode::FailOpen);
    let fallback = match kind {
        Kind::Rate(a) if backend_v != Backend::Local => Some(a.divided(d.instances)),
        _ => None,
    };
    let id = {
        let mut h = Fnv::default();
        h.write(scope.as_bytes());
        h.write(format!("{l:?}|{policy_key:?}|{backend_v:?}").as_bytes());
        h.0
    };
    Some(LimitDef {
        name: l.name.as_str().into(),
        id,
        kind,
        backend: backend_v,
        fail_open,
        fallback,
        batch: l.batch.unwrap_or(d.batch).max(1),
        key,
    })
}

/// Parses a key: one part or a list (`client_ip`, `consumer`, `group`,
/// `plan`, `route`, `header:NAME`, `claim:NAME`).
pub fn parse_key(
    p: &str,
    k: &model::KeySpec,
    e: &mut dyn FnMut(String, String),
) -> Option<Box<[KeyPart]>> {
    let list: Vec<&str> = match k {
        model::KeySpec::One(s) => vec![s.as_str()],
        model::KeySpec::Many(v) => v.iter().map(String::as_str).collect(),
    };
    if list.is_empty() {
        e(p.into(), "name at least one key part".into());
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, s) in list.iter().enumerate() {
        let part = match *s {
            "client_ip" => Some(KeyPart::ClientIp),
            "consumer" => Some(KeyPart::Consumer),
            "group" => Some(KeyPart::Group),
            "plan" => Some(KeyPart::Plan),
            "route" => Some(KeyPart::Route),
            s if s.starts_with("header:") => {
                HeaderName::try_from(&s[7..]).ok().map(KeyPart::Header)
            }
            s if s.starts_with("claim:") && s.len() > 6 => Some(KeyPart::Claim(s[6..].into())),
            _ => None,
        };
        match part {
            Some(x) if out.contains(&x) => {
                ok = false;
                e(format!("{p}[{i}]"), format!("`{s}` is listed twice"));
            }
            Some(x) => out.push(x),
            None => {
                ok = false;
                let at = if matches!(k, model::KeySpec::One(_)) {
                    p.to_string()
                } else {
                    format!("{p}[{i}]")
                };
                e(
                    at,
                    format!("`{s}` is not a key part (client_ip, consumer, group, plan, route, header:NAME, claim:NAME)"),
                );
            }
        }
    }
    ok.then(|| out.into())
}

/// FNV-1a, 64 bits: stable across builds and processes, so instances
/// sharing a Redis agree on limit ids.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> model::Config {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn plans_consumer_overrides_and_the_injected_clock() {
        let c = cfg(r#"
rate_limiting:
  plans:
    free: [{name: daily, quota: 2, window: day}]
consumers:
  - {id: a, plan: free}
  - {id: b, plan: free, limits: [{name: own, rate: 1, per: 1m}]}
"#);
        let clock = Arc::new(ManualClock::new(10 * 86_400 * SEC - SEC));
        let mut errs = Vec::new();
        let l = compile(&c, None, Some(clock.clone()), &mut |p, m| errs.push((p, m)));
        assert!(errs.is_empty(), "{errs:?}");
        let daily = &l.plans["free"][0];
        assert_eq!(&*l.consumers["b"][0].name, "own");
        // Keyed by consumer, not by the key of the policy applying it.
        assert_eq!(*daily.key, [KeyPart::Consumer]);
        let Kind::Rate(algo) = daily.kind else {
            panic!()
        };
        let rt = &l.runtime;
        let now = || rt.clock.now_us();
        assert!(rt.local.check(1, &algo, now(), 1).allowed);
        assert!(rt.local.check(1, &algo, now(), 1).allowed);
        assert!(!rt.local.check(1, &algo, now(), 1).allowed);
        // One second later it is a new UTC day.
        clock.advance(Duration::from_secs(1));
        assert!(rt.local.check(1, &algo, now(), 1).allowed);
        // A reload with the same backend settings keeps the counters; the
        // ids of unchanged limits stay the same.
        let again = compile(&c, Some(&l), None, &mut |p, m| errs.push((p, m)));
        assert!(Arc::ptr_eq(&again.runtime, &l.runtime));
        assert_eq!(again.plans["free"][0].id, daily.id);
    }

    #[test]
    fn bad_limits_name_their_key() {
        let c = cfg(r#"
rate_limiting:
  plans:
    free:
      - {name: both, rate: 1, quota: 2}
      - {name: "bad name", quota: 1, window: day}
      - {name: nowindow, quota: 1}
      - {name: remote, quota: 1, window: day, backend: redis}
      - {name: k, quota: 1, window: day, key: [consumer, header:x, bogus]}
"#);
        let mut errs = Vec::new();
        compile(&c, None, None, &mut |p, m| errs.push((p, m)));
        let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "rate_limiting.plans.free[0]",
                "rate_limiting.plans.free[1].name",
                "rate_limiting.plans.free[2]",
                "rate_limiting.plans.free[3].backend",
                "rate_limiting.plans.free[4].key[2]",
            ],
            "{errs:?}"
        );
    }
}
