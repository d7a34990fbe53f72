//! Matches a request to a route. Never does I/O, never allocates on a match.
//!
//! Layout: one path table per exact host, one per wildcard suffix (longest
//! first), one for routes without hosts. Each table is a segment trie
//! ([`path::PathTable`]), so matching costs the depth of the path, not the
//! number of routes.
//!
//! Precedence (documented in docs/configuration.md, "Route precedence"):
//! 1. higher `priority`;
//! 2. more specific host: exact, then longer wildcard, then none;
//! 3. more specific path, compared segment by segment: literal > `{param}` >
//!    `{*rest}` > prefix end; a longer literal match wins;
//! 4. more conditions (methods, headers, query).
//!
//! Routes left equal by all four that could match the same request are
//! rejected when the config is compiled, so file order never decides.

pub mod path;

use http::{HeaderMap, Method};
use path::{Captures, PathTable};
use regex::Regex;
use std::collections::HashMap;

/// What a route requires beyond host and path.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    /// Empty: any method.
    pub methods: Vec<Method>,
    pub headers: Vec<(http::HeaderName, ValueCond)>,
    pub query: Vec<(String, ValueCond)>,
    /// The route answers CORS preflights (it has a `cors` policy): an
    /// `OPTIONS` request with `Origin` and `Access-Control-Request-Method`
    /// passes the method condition when the method it asks for does, so the
    /// preflight reaches the route its actual request will.
    pub preflight: bool,
}

#[derive(Debug, Clone)]
pub enum ValueCond {
    Exact(String),
    Regex(Regex),
    Present,
    Absent,
}

impl ValueCond {
    fn test(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueCond::Absent, v) => v.is_none(),
            (ValueCond::Present, v) => v.is_some(),
            (ValueCond::Exact(e), Some(v)) => e == v,
            (ValueCond::Regex(r), Some(v)) => r.is_match(v),
            (_, None) => false,
        }
    }

    /// True when no value can satisfy both (used to prove two routes disjoint).
    pub fn disjoint(&self, other: &ValueCond) -> bool {
        match (self, other) {
            (ValueCond::Exact(a), ValueCond::Exact(b)) => a != b,
            (ValueCond::Present | ValueCond::Exact(_) | ValueCond::Regex(_), ValueCond::Absent)
            | (ValueCond::Absent, ValueCond::Present | ValueCond::Exact(_) | ValueCond::Regex(_)) => {
                true
            }
            _ => false,
        }
    }
}

impl Conditions {
    pub fn count(&self) -> usize {
        usize::from(!self.methods.is_empty()) + self.headers.len() + self.query.len()
    }

    /// Whether the request satisfies every condition.
    pub fn test(&self, method: &Method, headers: &HeaderMap, query: Option<&str>) -> bool {
        let method_ok = self.methods.is_empty()
            || self.methods.contains(method)
            || (self.preflight && self.preflight_for(method, headers));
        if !method_ok {
            return false;
        }
        // `exact` holds only when every value of a repeated header or
        // parameter equals it (other tests: when one value passes), so routes
        // on different exact values stay exclusive even for `x-v: 1` plus
        // `x-v: 2`, as the ambiguity check assumes.
        for (name, cond) in &self.headers {
            let all = matches!(cond, ValueCond::Exact(_));
            let mut values = headers.get_all(name).iter().peekable();
            let test = |v: &http::HeaderValue| cond.test(Some(v.to_str().unwrap_or("")));
            let ok = if values.peek().is_none() {
                cond.test(None)
            } else if all {
                values.all(test)
            } else {
                values.any(test)
            };
            if !ok {
                return false;
            }
        }
        for (name, cond) in &self.query {
            let all = matches!(cond, ValueCond::Exact(_));
            let mut seen = false;
            let mut ok = all;
            for (k, v) in query_pairs(query.unwrap_or("")) {
                if k == name.as_str() {
                    seen = true;
                    let pass = cond.test(Some(&v));
                    if all && !pass {
                        ok = false;
                        break;
                    }
                    if !all && pass {
                        ok = true;
                        break;
                    }
                }
            }
            let ok = if seen { ok } else { cond.test(None) };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Whether `method` and `headers` are a CORS preflight for one of the
    /// route's methods (only asked when the method itself did not match).
    #[cold]
    fn preflight_for(&self, method: &Method, headers: &HeaderMap) -> bool {
        if method != Method::OPTIONS || !headers.contains_key(http::header::ORIGIN) {
            return false;
        }
        headers
            .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .is_some_and(|v| {
                self.methods
                    .iter()
                    .any(|m| m.as_str().as_bytes() == v.as_bytes())
            })
    }

    /// True when no request can satisfy both condition sets.
    pub fn disjoint(&self, other: &Conditions) -> bool {
        // A preflight route also takes `OPTIONS` (for its own methods): it
        // overlaps a route that lists `OPTIONS`; two preflight routes
        // overlap only where their methods do.
        let options = |c: &Conditions| c.methods.contains(&Method::OPTIONS);
        let overlap = self.methods.is_empty()
            || other.methods.is_empty()
            || self.methods.iter().any(|m| other.methods.contains(m))
            || (self.preflight && options(other))
            || (other.preflight && options(self));
        if !overlap {
            return true;
        }
        let hdr = self.headers.iter().any(|(n, c)| {
            other
                .headers
                .iter()
                .any(|(n2, c2)| n == n2 && c.disjoint(c2))
        });
        let q = self
            .query
            .iter()
            .any(|(n, c)| other.query.iter().any(|(n2, c2)| n == n2 && c.disjoint(c2)));
        hdr || q
    }
}

/// Iterates `k=v` pairs of a query string, percent-decoding both.
pub fn query_pairs(
    q: &str,
) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
    q.split('&').filter(|s| !s.is_empty()).map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k), percent_decode(v))
    })
}

/// Decodes `%XX` and `+` (as space). Invalid escapes are kept literally.
pub fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return std::borrow::Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// A route's place in the precedence order, compared field by field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    pub priority: i32,
    /// Host specificity: [`HOST_EXACT`] for an exact name, `1 + suffix
    /// length` for a `*.suffix` wildcard (of two wildcards that match the same
    /// name, the longer suffix is the more specific), 0 for any host.
    pub host: u16,
    /// Path specificity: one code per segment (see [`path`]).
    pub path: Box<[u8]>,
    pub conditions: u16,
}

/// The per-route data the router needs.
pub struct RouteEntry {
    pub rank: Rank,
    pub conditions: Conditions,
}

/// The result of a match: the route index and the captured path params.
#[derive(Debug, Clone)]
pub struct Matched {
    pub route: usize,
    pub captures: Captures,
}

pub struct Router {
    entries: Vec<RouteEntry>,
    exact: HashMap<Box<str>, PathTable>,
    /// (suffix including the leading dot, table), longest suffix first.
    wildcard: Vec<(Box<str>, PathTable)>,
    any: PathTable,
}

/// A request as the router sees it.
pub struct RequestView<'a> {
    /// Lower-case host without port (may be empty).
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

/// Where a route's path is anchored in the trie.
#[derive(Debug, Clone)]
pub struct RoutePath {
    pub pattern: path::Pattern,
}

/// [`Rank::host`] of an exact host name.
pub const HOST_EXACT: u16 = u16::MAX;

/// [`Rank::host`] of one configured host (`name` or `*.suffix`).
fn host_rank(host: &str) -> u16 {
    match host.strip_prefix('*') {
        // Host names are at most 253 bytes; clamp anything longer below HOST_EXACT.
        Some(suffix) => 1 + suffix.len().min(usize::from(HOST_EXACT) - 2) as u16,
        None => HOST_EXACT,
    }
}

#[derive(Default)]
pub struct RouterBuilder {
    entries: Vec<RouteEntry>,
    exact: HashMap<Box<str>, PathTable>,
    wildcard: HashMap<Box<str>, PathTable>,
    any: PathTable,
}

impl RouterBuilder {
    /// Adds route number `index` (must be added in index order) under `hosts`.
    pub fn add(
        &mut self,
        hosts: &[String],
        pattern: &path::Pattern,
        priority: i32,
        conditions: Conditions,
    ) {
        let index = self.entries.len();
        let rank = Rank {
            priority,
            // Replaced per host below; this is the route's best host rank.
            host: hosts.iter().map(|h| host_rank(h)).max().unwrap_or(0),
            path: pattern.rank(),
            conditions: conditions.count() as u16,
        };
        self.entries.push(RouteEntry { rank, conditions });
        let entry_rank = |host: u16| -> Rank {
            let mut r = self.entries[index].rank.clone();
            r.host = host;
            r
        };
        if hosts.is_empty() {
            let r = entry_rank(0);
            self.any.insert(pattern, index, r);
        }
        for h in hosts {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            if let Some(suffix) = h.strip_prefix('*') {
                let r = entry_rank(host_rank(&h));
                self.wildcard
                    .entry(suffix.into())
                    .or_default()
                    .insert(pattern, index, r);
            } else {
                let r = entry_rank(HOST_EXACT);
                self.exact
                    .entry(h.into())
                    .or_default()
                    .insert(pattern, index, r);
            }
        }
    }

    pub fn build(self) -> Router {
        let mut wildcard: Vec<_> = self.wildcard.into_iter().collect();
        wildcard.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Router {
            entries: self.entries,
            exact: self.exact,
            wildcard,
            any: self.any,
        }
    }
}

impl Router {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finds the best route for `req` under the precedence rules.
    pub fn find(&self, req: &RequestView<'_>) -> Option<Matched> {
        let mut best: Option<(&Rank, Matched)> = None;
        let accept = |route: usize| {
            self.entries[route]
                .conditions
                .test(req.method, req.headers, req.query)
        };
        if let Some(t) = self.exact.get(req.host) {
            t.find(req.path, &accept, &mut best);
        }
        for (suffix, t) in &self.wildcard {
            // `*.example.com` matches any name that ends in `.example.com`.
            if req.host.len() > suffix.len() && req.host.ends_with(&**suffix) && t.could_beat(&best)
            {
                t.find(req.path, &accept, &mut best);
            }
        }
        if self.any.could_beat(&best) {
            self.any.find(req.path, &accept, &mut best);
        }
        best.map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests;
