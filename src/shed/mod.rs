//! Load shedding (docs/overload.md): the gateway-wide `overload` limit and
//! each route's `concurrency` limit ([`limiter::Limiter`]), and the
//! priority classes ([`Priorities`]) that decide who is shed first.
//!
//! `service::handle` takes the slots after the route's policies ran (so an
//! `auth` policy has identified the consumer whose group may set the class)
//! and before the action: the route's slot first, then the gateway's, so a
//! request queued behind a full route does not hold a gateway-wide slot. The
//! permits ride in the request's `Outcome` ([`Held`]) and are released when
//! the response body ends or the client goes away. The upstream limits
//! (adaptive concurrency, circuit breaker) live in `crate::upstream`.
//!
//! Nothing here runs for a route when neither limit is configured, and
//! classification runs only when `priorities` is.

pub mod limiter;

use crate::config::model;
use crate::error::{ErrorKind, GatewayError};
use crate::net::{Cidr, CidrSet};
use crate::policy::Ctx;
use http::{HeaderMap, HeaderName, HeaderValue};
use limiter::{Admit, LimitSpec, Limiter, Permit, Shed};
use std::sync::Arc;

/// Priority classes at most (a metrics array dimension).
pub const MAX_CLASSES: usize = 8;

/// What decides a request's class, as compiled. Without `priorities` there
/// is one class, `default`.
pub struct Priorities {
    /// Highest first; the `priority` metrics label.
    pub names: Box<[Arc<str>]>,
    pub shares: Box<[f64]>,
    pub default: u8,
    /// Consumer group → class.
    pub groups: Box<[(Arc<str>, u8)]>,
    pub header: Option<HeaderName>,
    /// Peers whose `header` is honoured; `None`: the listener's trusted
    /// proxies.
    pub trusted: Option<CidrSet>,
    /// Whether `priorities` is configured (else nothing is classified).
    pub configured: bool,
}

impl Default for Priorities {
    fn default() -> Self {
        Priorities {
            names: Box::new(["default".into()]),
            shares: Box::new([1.0]),
            default: 0,
            groups: Box::new([]),
            header: None,
            trusted: None,
            configured: false,
        }
    }
}

impl Priorities {
    /// The class of a request: a trusted peer's header naming a class, else
    /// the highest class of the consumer's groups, else the route's class,
    /// else the default.
    pub fn classify(&self, headers: &HeaderMap, ctx: &Ctx, route: Option<u8>) -> u8 {
        if let Some(h) = &self.header {
            let trusted = match &self.trusted {
                Some(set) => set.contains(crate::net::canonical(ctx.peer.ip())),
                None => ctx.peer_trusted,
            };
            if trusted {
                if let Some(i) = headers
                    .get(h)
                    .and_then(|v| self.names.iter().position(|n| n.as_bytes() == v.as_bytes()))
                {
                    return i as u8;
                }
            }
        }
        if let Some(c) = ctx.identity.as_ref().and_then(|i| i.consumer.as_ref()) {
            let best = self
                .groups
                .iter()
                .filter(|(g, _)| c.in_group(g))
                .map(|(_, class)| *class)
                .min();
            if let Some(b) = best {
                return b;
            }
        }
        route.unwrap_or(self.default)
    }

    pub fn name(&self, class: usize) -> &str {
        self.names.get(class).map_or("default", |n| n)
    }

    /// Per class, the in-flight count below which it is admitted, for a
    /// limit of `max`: `ceil(share × max)`, at least 1.
    pub fn thresholds(&self, max: u32) -> Box<[u32]> {
        self.shares
            .iter()
            .map(|s| ((s * f64::from(max)).ceil() as u32).clamp(1, max.max(1)))
            .collect()
    }
}

/// Reports a problem at a key path.
pub type Err<'e> = &'e mut dyn FnMut(String, String);

/// Compiles `priorities`.
pub fn compile_priorities(p: &model::Priorities, err: Err) -> Priorities {
    let mut names: Vec<Arc<str>> = Vec::new();
    let mut shares = Vec::new();
    let mut groups: Vec<(Arc<str>, u8)> = Vec::new();
    if p.classes.is_empty() {
        err(
            "priorities.classes".into(),
            "list at least one class".into(),
        );
    }
    if p.classes.len() > MAX_CLASSES {
        err(
            "priorities.classes".into(),
            format!("at most {MAX_CLASSES} classes"),
        );
    }
    for (i, c) in p.classes.iter().enumerate().take(MAX_CLASSES) {
        let cp = format!("priorities.classes[{i}]");
        let ok_name = !c.name.is_empty()
            && c.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok_name {
            err(
                format!("{cp}.name"),
                "letters, digits, `_` and `-` only".into(),
            );
        }
        if names.iter().any(|n| **n == *c.name) {
            err(
                format!("{cp}.name"),
                format!("duplicate class name `{}`", c.name),
            );
        }
        if !(c.share > 0.0 && c.share <= 1.0) {
            err(
                format!("{cp}.share"),
                "must be more than 0 and at most 1".into(),
            );
        } else if shares.last().is_some_and(|prev: &f64| c.share > *prev) {
            err(
                format!("{cp}.share"),
                "must not be more than the share of the class above (classes are listed highest first)"
                    .into(),
            );
        }
        for (j, g) in c.groups.iter().enumerate() {
            if groups.iter().any(|(x, _)| **x == **g) {
                err(
                    format!("{cp}.groups[{j}]"),
                    format!("group `{g}` already has a class"),
                );
            }
            groups.push((g.as_str().into(), i as u8));
        }
        names.push(c.name.as_str().into());
        shares.push(c.share);
    }
    let default = match &p.default {
        None => names.len().saturating_sub(1) as u8,
        Some(d) => match names.iter().position(|n| **n == **d) {
            Some(i) => i as u8,
            None => {
                err(
                    "priorities.default".into(),
                    format!("no class is named `{d}`"),
                );
                0
            }
        },
    };
    let header = p.header.as_ref().and_then(|h| {
        HeaderName::try_from(h.as_str())
            .map_err(|_| {
                err(
                    "priorities.header".into(),
                    format!("`{h}` is not a valid header name"),
                )
            })
            .ok()
    });
    let mut trusted = Vec::new();
    for (i, t) in p.trusted_peers.iter().enumerate() {
        match Cidr::parse(t) {
            Ok(c) => trusted.push(c),
            Err(e) => err(format!("priorities.trusted_peers[{i}]"), e),
        }
    }
    if !p.trusted_peers.is_empty() && p.header.is_none() {
        err(
            "priorities.trusted_peers".into(),
            "only used with `header`".into(),
        );
    }
    Priorities {
        names: names.into(),
        shares: shares.into(),
        default,
        groups: groups.into(),
        header,
        trusted: (!trusted.is_empty()).then_some(CidrSet(trusted)),
        configured: true,
    }
}

/// Compiles a concurrency limit at `p` (`overload` or
/// `routes[i].concurrency`); reuses `previous` when nothing changed, so
/// requests in flight across a reload keep counting.
pub fn compile_limit(
    p: &str,
    l: &model::ConcurrencyLimit,
    priorities: &Priorities,
    previous: Option<&Arc<Limiter>>,
    err: Err,
) -> Option<Arc<Limiter>> {
    let mut ok = true;
    if l.max_concurrent == 0 {
        err(format!("{p}.max_concurrent"), "must be at least 1".into());
        ok = false;
    }
    if l.queue > 0 && l.queue_timeout.0.is_zero() {
        err(
            format!("{p}.queue_timeout"),
            "must be more than 0 when there is a queue".into(),
        );
        ok = false;
    }
    let ra = l.retry_after.0;
    if ra.as_secs() == 0 || ra.subsec_nanos() != 0 {
        err(
            format!("{p}.retry_after"),
            "must be whole seconds, at least 1s".into(),
        );
        ok = false;
    }
    if !ok {
        return None;
    }
    let spec = LimitSpec {
        max: l.max_concurrent,
        thresholds: priorities.thresholds(l.max_concurrent),
        queue: l.queue,
        queue_timeout: l.queue_timeout.0,
        retry_after: ra.as_secs(),
    };
    match previous {
        Some(prev) if prev.spec == spec => Some(prev.clone()),
        _ => Some(Arc::new(Limiter::new(spec))),
    }
}

/// Where a refused request was refused (the `scope` metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Global,
    Route,
    /// An upstream's adaptive concurrency limit.
    Upstream,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Global, Scope::Route, Scope::Upstream];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Route => "route",
            Scope::Upstream => "upstream",
        }
    }
}

/// The slots a request holds until its response body ends.
#[derive(Default)]
pub struct Held {
    pub route: Option<Permit>,
    pub global: Option<Permit>,
    pub upstream: Option<crate::upstream::adaptive::Permit>,
}

/// The `503 overloaded` answer.
pub fn overloaded(scope: Scope, why: Shed, retry_after: u64) -> GatewayError {
    let what = match scope {
        Scope::Global => "the gateway is at its concurrency limit",
        Scope::Route => "this route is at its concurrency limit",
        Scope::Upstream => "the upstream is at its adaptive concurrency limit",
    };
    let message = match why {
        Shed::Rejected => format!("{what}; retry later"),
        Shed::Evicted => format!("{what}; a higher-priority request took this one's place"),
        Shed::Timeout => format!("{what}; no slot freed in time"),
    };
    GatewayError::new(ErrorKind::Overloaded, message).with_header(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after.max(1)),
    )
}

/// Takes a slot of `limiter` for `class`: at once, or after queueing (the
/// rare path, boxed so the request future stays small). Refusals and waits
/// are recorded in the route's metrics.
pub async fn take(
    limiter: &Arc<Limiter>,
    scope: Scope,
    class: u8,
    metrics: &crate::metrics::RouteMetrics,
) -> Result<Permit, GatewayError> {
    let r = match limiter.acquire(class) {
        Admit::Now(p) => return Ok(p),
        Admit::Shed(s) => Err(s),
        Admit::Queued(w) => {
            let (r, waited) = Box::pin(w.wait()).await;
            metrics.queue_wait.observe(waited);
            r
        }
    };
    r.map_err(|s| {
        metrics.shed(class, scope, s);
        overloaded(scope, s, limiter.spec.retry_after)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(yaml: &str) -> (Priorities, Vec<String>) {
        let p: model::Priorities = serde_yaml::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        let c = compile_priorities(&p, &mut |k, m| errs.push(format!("{k}: {m}")));
        (c, errs)
    }

    #[test]
    fn thresholds_are_shares_rounded_up() {
        let (p, errs) =
            compile("classes: [{name: high}, {name: mid, share: 0.75}, {name: low, share: 0.1}]");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(&*p.thresholds(10), &[10, 8, 1]);
        assert_eq!(&*p.thresholds(1), &[1, 1, 1]);
        assert_eq!(p.default, 2, "the lowest class by default");
    }

    #[test]
    fn errors_name_their_key() {
        let (_, errs) = compile(
            "classes: [{name: a, share: 0.5}, {name: a, share: 0.9, groups: [g]}, {name: 'b c', groups: [g]}]\ndefault: z\nheader: 'bad header'\ntrusted_peers: [nope]",
        );
        let want = [
            "priorities.classes[1].name: duplicate class name `a`",
            "priorities.classes[1].share: must not be more than the share",
            "priorities.classes[2].name: letters",
            "priorities.classes[2].groups[0]: group `g` already has a class",
            "priorities.default: no class is named `z`",
            "priorities.header: `bad header` is not a valid header name",
            "priorities.trusted_peers[0]:",
        ];
        for w in want {
            assert!(errs.iter().any(|e| e.starts_with(w)), "{w} not in {errs:?}");
        }
    }
}
