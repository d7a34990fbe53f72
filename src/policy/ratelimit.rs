//! The `rate_limit` policy: builds each limit's key from the request,
//! decides every limit that applies (the policy's own, then the
//! consumer's own limits or its plan's), answers `429 rate_limited` with
//! `Retry-After` when one refuses, and stamps the `RateLimit-Policy` /
//! `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers-10, the
//! structured-field form) on every response in `on_response`.
//!
//! Local and hybrid limits decide without waiting ([`Step::Ready`]); only
//! limits in strict Redis mode make the step wait (one script call per
//! distinct key). A request is counted only when every limit admits it:
//! local units taken before a refusal are given back. Concurrency slots
//! are taken last and travel with the response body (`Body::Held`) — and,
//! for an upgrade, into the tunnel (`body::Keep` in the request's
//! extensions, taken by the proxy) — so they are released when the body
//! ends or the tunnel closes.

use super::{Ctx, Flow, Policy, Step};
use crate::body::{Body, Held, Keep};
use crate::error::{ErrorKind, GatewayError};
use crate::metrics::{LimitResult, RouteMetrics};
use crate::ratelimit::algo::{Algo, Check, SEC};
use crate::ratelimit::hybrid::Took;
use crate::ratelimit::redis::Call;
use crate::ratelimit::{Backend, KeyPart, Kind, LimitDef, Limiting, Runtime};
use http::{header, HeaderName, HeaderValue, Request, Response};
use std::fmt::Write as _;
use std::hash::Hasher;
use std::sync::Arc;

pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Salt of the keys of the local fallback (kept apart from local limits).
const FALLBACK: u64 = 0x9e37_79b9_7f4a_7c15;

pub struct RateLimitPolicy {
    /// Whether a limit whose key misses a part is skipped (else the part
    /// is the client IP). Each limit carries its key (`LimitDef::key`).
    pub missing_skip: bool,
    pub cost: u64,
    pub limits: Arc<[Arc<LimitDef>]>,
    pub plans: bool,
    pub headers: bool,
    pub legacy_headers: bool,
    pub limiting: Arc<Limiting>,
    pub metrics: Arc<RouteMetrics>,
}

/// One limit as reported in the headers.
#[derive(Debug, Clone)]
pub struct Item {
    pub name: Arc<str>,
    pub quota: u64,
    /// Seconds; none for concurrency limits.
    pub window: Option<u64>,
    pub remaining: u64,
    /// Seconds until back to full.
    pub reset: u64,
}

/// What one policy decided for a request (in `Ctx::rate_limits`).
pub struct Verdict {
    policy: usize,
    pub items: Vec<Item>,
    hold: Option<Keep>,
}

/// A limit that applies to this request, with its key.
struct Applied<'a> {
    def: &'a LimitDef,
    hash: u64,
    /// The key text (Redis and hybrid limits only).
    text: Option<String>,
}

/// Units taken so far (given back if the request is refused).
enum Taken {
    Local(u64, Algo),
    Hybrid(u64, Took),
}

struct Pending<'a> {
    strict: Vec<Applied<'a>>,
    concurrent: Vec<Applied<'a>>,
    taken: Vec<Taken>,
    items: Vec<Item>,
    fell_back: bool,
}

enum Refusal {
    Limited { retry: u64 },
    Unavailable,
}

impl RateLimitPolicy {
    fn id(&self) -> usize {
        self as *const Self as usize
    }

    fn rt(&self) -> &Arc<Runtime> {
        &self.limiting.runtime
    }

    /// Writes the key of `parts` into `out`; `false` when the limit does
    /// not apply (a missing part with `missing_key: skip`).
    fn write_key(
        &self,
        parts: &[KeyPart],
        req: &Request<Body>,
        ctx: &Ctx,
        out: &mut dyn FnMut(&[u8]),
    ) -> bool {
        let consumer = ctx.identity.as_ref().and_then(|i| i.consumer.as_deref());
        for p in parts {
            let (tag, value): (&[u8], Option<&[u8]>) = match p {
                KeyPart::ClientIp => (b"ip", None),
                KeyPart::Consumer => (b"consumer", consumer.map(|c| c.id.as_bytes())),
                KeyPart::Group => (
                    b"group",
                    consumer
                        .and_then(|c| c.groups.first())
                        .map(|g| g.as_bytes()),
                ),
                KeyPart::Plan => (
                    b"plan",
                    consumer.and_then(|c| c.plan.as_deref()).map(str::as_bytes),
                ),
                KeyPart::Route => (b"route", Some(ctx.route.as_bytes())),
                KeyPart::Header(h) => (
                    h.as_str().as_bytes(),
                    req.headers().get(h).map(|v| v.as_bytes()),
                ),
                KeyPart::Claim(c) => {
                    let v = ctx
                        .identity
                        .as_ref()
                        .and_then(|i| i.principal.as_ref())
                        .and_then(|p| p.claims.get(&**c));
                    match v {
                        Some(serde_json::Value::String(s)) => {
                            out(b"claim:");
                            out(c.as_bytes());
                            out(b"=");
                            out(s.as_bytes());
                            out(b"\x1f");
                            continue;
                        }
                        Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                            out(b"claim:");
                            out(c.as_bytes());
                            out(b"=");
                            out(v.to_string().as_bytes());
                            out(b"\x1f");
                            continue;
                        }
                        _ => (b"claim", None),
                    }
                }
            };
            match (p, value) {
                (KeyPart::ClientIp, _) => write_ip(ctx.client_ip, out),
                (_, Some(v)) => {
                    out(tag);
                    out(b"=");
                    out(v);
                    out(b"\x1f");
                }
                (_, None) if self.missing_skip => return false,
                (_, None) => write_ip(ctx.client_ip, out),
            }
        }
        true
    }

    fn apply<'a>(&self, def: &'a LimitDef, req: &Request<Body>, ctx: &Ctx) -> Option<Applied<'a>> {
        if let Kind::Concurrent {
            websockets: true, ..
        } = def.kind
        {
            if !wants_websocket(req) {
                return None;
            }
        }
        let parts = &*def.key;
        let mut h = crate::ratelimit::local::key_hasher();
        h.write_u64(def.id);
        let need_text = def.backend != Backend::Local;
        let mut text = need_text.then(String::new);
        let applies = self.write_key(parts, req, ctx, &mut |b| {
            h.write(b);
            if let Some(t) = text.as_mut() {
                escape_into(t, b);
            }
        });
        if !applies {
            return None;
        }
        let text = text.map(|t| {
            let prefix = self
                .rt()
                .redis
                .as_ref()
                .map_or("portico", |r| r.prefix.as_str());
            format!("{{{prefix}:limit:{t}}}:{:016x}", def.id)
        });
        Some(Applied {
            def,
            hash: h.finish(),
            text,
        })
    }

    /// Everything that can be decided without waiting.
    fn decide_now<'a>(
        &'a self,
        req: &Request<Body>,
        ctx: &Ctx,
        now: u64,
    ) -> Result<Pending<'a>, (Refusal, Pending<'a>)> {
        let rt = self.rt();
        let consumer = if self.plans {
            ctx.identity
                .as_ref()
                .and_then(|i| i.consumer.as_deref())
                .and_then(|c| self.limiting.for_consumer(c))
        } else {
            None
        };
        let mut p = Pending {
            strict: Vec::new(),
            concurrent: Vec::new(),
            taken: Vec::new(),
            items: Vec::with_capacity(self.limits.len()),
            fell_back: false,
        };
        let cost = self.cost;
        let mut refusal = None;
        for def in self
            .limits
            .iter()
            .chain(consumer.into_iter().flat_map(|l| l.iter()))
        {
            let Some(a) = self.apply(def, req, ctx) else {
                continue;
            };
            let algo = match def.kind {
                Kind::Rate(algo) => algo,
                Kind::Concurrent { .. } => {
                    p.concurrent.push(a);
                    continue;
                }
            };
            let check = match def.backend {
                Backend::Local => {
                    let c = rt.local.check(a.hash, &algo, now, cost);
                    if c.allowed {
                        p.taken.push(Taken::Local(a.hash, algo));
                    }
                    c
                }
                Backend::Redis => {
                    let down = rt.redis.as_ref().is_none_or(|r| r.breaker.is_open(now));
                    if !down {
                        p.strict.push(a);
                        continue;
                    }
                    match self.fallback(def, a.hash, now, cost, &mut p) {
                        Some(c) => c,
                        None => {
                            refusal = Some(Refusal::Unavailable);
                            break;
                        }
                    }
                }
                Backend::Hybrid => {
                    let down = rt.redis.as_ref().is_none_or(|r| r.breaker.is_open(now));
                    if down {
                        match self.fallback(def, a.hash, now, cost, &mut p) {
                            Some(c) => c,
                            None => {
                                refusal = Some(Refusal::Unavailable);
                                break;
                            }
                        }
                    } else {
                        let d = rt.hybrid.decide(a.hash, &algo, now, cost, def.batch);
                        if let Some(t) = d.took {
                            p.taken.push(Taken::Hybrid(a.hash, t));
                        }
                        if let (Some(s), Some(text)) = (d.sync, a.text) {
                            tokio::spawn(sync(rt.clone(), algo, def.batch, a.hash, text, s));
                        }
                        d.check
                    }
                }
            };
            p.items.push(item(def, &algo, check, now));
            if !check.allowed {
                refusal = Some(Refusal::Limited { retry: check.retry });
                break;
            }
        }
        match refusal {
            Some(r) => Err((r, p)),
            None => Ok(p),
        }
    }

    /// The local fallback of a Redis limit (`None`: fail closed).
    fn fallback(
        &self,
        def: &LimitDef,
        hash: u64,
        now: u64,
        cost: u64,
        p: &mut Pending,
    ) -> Option<Check> {
        if !def.fail_open {
            return None;
        }
        p.fell_back = true;
        let algo = def.fallback?;
        let key = hash ^ FALLBACK;
        let c = self.rt().local.check(key, &algo, now, cost);
        if c.allowed {
            p.taken.push(Taken::Local(key, algo));
        }
        Some(c)
    }

    /// Strict Redis limits: one script call per distinct key.
    async fn decide_redis(&self, p: &mut Pending<'_>, now: u64) -> Result<(), Refusal> {
        let strict = std::mem::take(&mut p.strict);
        let Some(redis) = self.rt().redis.as_ref() else {
            return Err(Refusal::Unavailable);
        };
        let mut i = 0;
        while i < strict.len() {
            // Limits sharing a key (and so a hash tag) go in one call.
            let text = strict[i].text.as_deref().unwrap_or("");
            let tag = tag_of(text);
            let mut j = i + 1;
            while j < strict.len() && tag_of(strict[j].text.as_deref().unwrap_or("")) == tag {
                j += 1;
            }
            let group = &strict[i..j];
            let calls: Vec<Call> = group
                .iter()
                .filter_map(|a| match &a.def.kind {
                    Kind::Rate(algo) => Some(Call {
                        algo,
                        base: a.text.as_deref().unwrap_or(""),
                        cost: self.cost,
                        debt: 0,
                    }),
                    Kind::Concurrent { .. } => None,
                })
                .collect();
            match redis.run(now, 0, &calls).await {
                Ok(v) => {
                    let mut refused = None;
                    for (k, c) in calls.iter().enumerate() {
                        let mut st = c.state(now, v[k * 3 + 1], v[k * 3 + 2]);
                        let mut check = c.algo.report(&mut st, now);
                        check.allowed = v[k * 3] == 1;
                        if !check.allowed {
                            check.retry = c.algo.retry_after(&mut st, now, self.cost);
                            if c.algo.available(&mut st, now) >= self.cost {
                                // Another limit of the call refused it.
                                check.retry = 0;
                            }
                            refused = Some(refused.unwrap_or(0).max(check.retry));
                        }
                        p.items.push(item(group[k].def, c.algo, check, now));
                    }
                    if let Some(retry) = refused {
                        return Err(Refusal::Limited { retry });
                    }
                }
                Err(_) => {
                    for a in group {
                        let Kind::Rate(algo) = a.def.kind else {
                            continue;
                        };
                        let Some(c) = self.fallback(a.def, a.hash, now, self.cost, p) else {
                            return Err(Refusal::Unavailable);
                        };
                        p.items.push(item(a.def, &algo, c, now));
                        if !c.allowed {
                            return Err(Refusal::Limited { retry: c.retry });
                        }
                    }
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Takes concurrency slots (after every rate limit admitted).
    fn acquire(&self, p: &mut Pending, req: &mut Request<Body>) -> Result<Option<Keep>, Refusal> {
        if p.concurrent.is_empty() {
            return Ok(None);
        }
        let rt = self.rt();
        let mut slots = Vec::with_capacity(p.concurrent.len());
        let mut upgrade = false;
        for a in &p.concurrent {
            let Kind::Concurrent { max, websockets } = a.def.kind else {
                continue;
            };
            upgrade |= websockets;
            match rt.gauges.acquire(a.hash, max) {
                Ok((slot, n)) => {
                    slots.push(slot);
                    p.items.push(Item {
                        name: a.def.name.clone(),
                        quota: max,
                        window: None,
                        remaining: max - n,
                        reset: 0,
                    });
                }
                Err(n) => {
                    p.items.push(Item {
                        name: a.def.name.clone(),
                        quota: max,
                        window: None,
                        remaining: max.saturating_sub(n),
                        reset: 1,
                    });
                    return Err(Refusal::Limited { retry: SEC });
                }
            }
        }
        let keep = Keep(Arc::new(slots));
        if upgrade || wants_websocket(req) {
            req.extensions_mut().insert(keep.clone());
        }
        Ok(Some(keep))
    }

    fn give_back(&self, p: &Pending, now: u64) {
        let rt = self.rt();
        for t in &p.taken {
            match t {
                Taken::Local(k, algo) => rt.local.refund(*k, algo, now, self.cost),
                Taken::Hybrid(k, took) => rt.hybrid.refund(*k, *took, self.cost),
            }
        }
    }

    fn finish(
        &self,
        ctx: &mut Ctx,
        mut p: Pending,
        outcome: Result<Option<Keep>, Refusal>,
        now: u64,
    ) -> Result<Flow, GatewayError> {
        let fell_back = p.fell_back;
        let (result, hold) = match outcome {
            Ok(hold) => (Ok(Flow::Continue), hold),
            Err(r) => {
                self.give_back(&p, now);
                (Err(r), None)
            }
        };
        let items = std::mem::take(&mut p.items);
        let retry = match &result {
            Err(Refusal::Limited { retry }) => Some(*retry),
            _ => None,
        };
        ctx.rate_limits.push(Verdict {
            policy: self.id(),
            items,
            hold,
        });
        let label = match (&result, fell_back) {
            (Err(Refusal::Unavailable), _) => LimitResult::FailClosed,
            (_, true) => LimitResult::FailOpen,
            (Err(_), false) => LimitResult::Limited,
            (Ok(_), false) => LimitResult::Allowed,
        };
        self.metrics.rate_limit(label);
        match result {
            Ok(f) => Ok(f),
            Err(Refusal::Unavailable) => Err(GatewayError::new(
                ErrorKind::LimiterUnavailable,
                "a rate limit cannot be checked right now",
            )),
            Err(Refusal::Limited { .. }) => {
                let secs = retry.unwrap_or(SEC).div_ceil(SEC).max(1);
                Err(
                    GatewayError::new(ErrorKind::RateLimited, "rate limit exceeded")
                        .with_header(header::RETRY_AFTER, HeaderValue::from(secs)),
                )
            }
        }
    }
}

impl Policy for RateLimitPolicy {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    fn on_request<'a>(&'a self, req: &'a mut Request<Body>, ctx: &'a mut Ctx) -> Step<'a> {
        let rt = self.rt();
        rt.ensure_sweeper();
        let now = rt.clock.now_us();
        let mut p = match self.decide_now(req, ctx, now) {
            Ok(p) => p,
            Err((r, p)) => return Step::Ready(self.finish(ctx, p, Err(r), now)),
        };
        if p.strict.is_empty() {
            let held = self.acquire(&mut p, req);
            return Step::Ready(self.finish(ctx, p, held, now));
        }
        Step::Wait(Box::pin(async move {
            let r = self.decide_redis(&mut p, now).await;
            let outcome = match r {
                Ok(()) => self.acquire(&mut p, req),
                Err(r) => Err(r),
            };
            self.finish(ctx, p, outcome, now)
        }))
    }

    fn on_response(&self, resp: &mut Response<Body>, ctx: &Ctx) {
        let Some(v) = ctx.rate_limits.iter().find(|v| v.policy == self.id()) else {
            return;
        };
        if let Some(keep) = &v.hold {
            let body = std::mem::replace(resp.body_mut(), Body::Empty);
            *resp.body_mut() = Body::Held(Box::new(Held {
                body,
                keep: Some(keep.clone()),
            }));
        }
        if v.items.is_empty() {
            return;
        }
        let h = resp.headers_mut();
        if self.headers {
            let (policy, state) = render(&v.items);
            if let Ok(x) = HeaderValue::try_from(policy) {
                h.append(RATELIMIT_POLICY.clone(), x);
            }
            if let Ok(x) = HeaderValue::try_from(state) {
                h.append(RATELIMIT.clone(), x);
            }
        }
        if self.legacy_headers {
            if let Some(i) = v.items.iter().min_by_key(|i| i.remaining) {
                h.insert(X_LIMIT.clone(), HeaderValue::from(i.quota));
                h.insert(X_REMAINING.clone(), HeaderValue::from(i.remaining));
                h.insert(X_RESET.clone(), HeaderValue::from(i.reset));
            }
        }
    }
}

/// The two header values: `"name";q=..;w=..` and `"name";r=..;t=..`.
pub fn render(items: &[Item]) -> (String, String) {
    let mut policy = String::new();
    let mut state = String::new();
    for (n, i) in items.iter().enumerate() {
        if n > 0 {
            policy.push_str(", ");
            state.push_str(", ");
        }
        let _ = write!(policy, "\"{}\";q={}", i.name, i.quota);
        if let Some(w) = i.window {
            let _ = write!(policy, ";w={w}");
        }
        let _ = write!(state, "\"{}\";r={};t={}", i.name, i.remaining, i.reset);
    }
    (policy, state)
}

fn item(def: &LimitDef, algo: &Algo, c: Check, now: u64) -> Item {
    Item {
        name: def.name.clone(),
        quota: algo.quota(),
        window: Some(algo.window_secs(now)),
        remaining: if c.allowed { c.remaining } else { 0 },
        reset: c.reset.div_ceil(SEC),
    }
}

/// A hybrid limit's background sync: reports the credit, takes a batch.
async fn sync(
    rt: Arc<Runtime>,
    algo: Algo,
    batch: u64,
    hash: u64,
    base: String,
    mut s: crate::ratelimit::hybrid::Sync,
) {
    let Some(redis) = rt.redis.as_ref() else {
        rt.hybrid.failed(hash);
        return;
    };
    loop {
        let now = rt.clock.now_us();
        let call = Call {
            algo: &algo,
            base: &base,
            cost: batch,
            debt: s.debt,
        };
        match redis.run(now, 1, std::slice::from_ref(&call)).await {
            Ok(v) => {
                let st = call.state(now, v[1], v[2]);
                match rt.hybrid.synced(hash, &algo, now, s, v[0], st) {
                    Some(next) => s = next,
                    None => return,
                }
            }
            Err(_) => {
                rt.hybrid.failed(hash);
                return;
            }
        }
    }
}

fn tag_of(key: &str) -> &str {
    key.split_once('}').map_or(key, |(a, _)| a)
}

fn wants_websocket(req: &Request<Body>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

fn write_ip(ip: std::net::IpAddr, out: &mut dyn FnMut(&[u8])) {
    let mut buf = [0u8; 48];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let _ = std::io::Write::write_fmt(&mut cur, format_args!("ip={ip}\x1f"));
    let n = cur.position() as usize;
    out(&buf[..n]);
}

/// Printable ASCII as is (but `%`, `{`, `}`), anything else as `%XX`:
/// distinct keys stay distinct, and the Redis hash tag stays ours.
fn escape_into(t: &mut String, b: &[u8]) {
    for &c in b {
        if c.is_ascii_graphic() && c != b'%' && c != b'{' && c != b'}' {
            t.push(c as char);
        } else if c == 0x1f {
            t.push('|');
        } else {
            let _ = write!(t, "%{c:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_syntax() {
        let items = [
            Item {
                name: "burst".into(),
                quota: 40,
                window: Some(2),
                remaining: 12,
                reset: 1,
            },
            Item {
                name: "inflight".into(),
                quota: 5,
                window: None,
                remaining: 4,
                reset: 0,
            },
        ];
        let (p, s) = render(&items);
        assert_eq!(p, "\"burst\";q=40;w=2, \"inflight\";q=5");
        assert_eq!(s, "\"burst\";r=12;t=1, \"inflight\";r=4;t=0");
    }

    #[test]
    fn keys_escape_and_keep_the_hash_tag() {
        let mut t = String::new();
        escape_into(&mut t, b"ip=1.2.3.4\x1fheader=a}b{ %\xff");
        assert_eq!(t, "ip=1.2.3.4|header=a%7Db%7B%20%25%FF");
        assert_eq!(tag_of("{p:limit:x}:0001:5"), "{p:limit:x");
    }
}
