//! Upstreams: named services, their targets and endpoints, and everything
//! that chooses and maintains connections to them (balancing, pooling,
//! health, DNS, retry budget).
//!
//! An [`Upstream`] outlives config reloads when its definition is unchanged,
//! so its pooled connections and health state survive; its endpoint set is
//! swapped atomically when DNS answers change, reusing unchanged endpoints.

pub mod adaptive;
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod endpoint;
pub mod health;
pub mod pool;

use crate::config::model;
use crate::metrics::TargetMetrics;
use arc_swap::ArcSwap;
use balance::Balancer;
use budget::RetryBudget;
use endpoint::Endpoint;
use health::{ActiveCheck, Outlier};
use pool::Pool;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// A target as configured, split into host and port.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSpec {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    /// Set when `host` is an IP literal: no DNS needed.
    pub fixed: Option<SocketAddr>,
    /// `host:port` as written.
    pub authority: Arc<str>,
    /// TLS to this target (`upstreams[].tls`).
    pub tls: Option<crate::tls::TargetTls>,
}

/// How to derive the consistent-hash key from a request.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    ClientIp,
    Path,
}

/// The endpoints of an upstream at one moment, with their balancer.
pub struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    pub balancer: Balancer,
}

pub struct Upstream {
    pub name: Arc<str>,
    /// The definition this upstream was built from (reuse across reloads).
    pub spec: model::Upstream,
    pub targets: Vec<TargetSpec>,
    /// Each target's series (same order as `targets`), carried across
    /// reloads by target address; every endpoint of a target shares them.
    pub target_metrics: Vec<Arc<TargetMetrics>>,
    pub algorithm: model::Balance,
    pub hash_key: Option<HashKey>,
    pub set: ArcSwap<EndpointSet>,
    pub outlier: Outlier,
    pub active: Option<ActiveCheck>,
    pub budget: RetryBudget,
    /// `circuit_breaker`, when configured.
    pub breaker: Option<breaker::Breaker>,
    /// `adaptive_concurrency`, when configured.
    pub adaptive: Option<Arc<adaptive::Adaptive>>,
    resolve_interval: Duration,
    started: AtomicBool,
}

impl Upstream {
    /// Builds an upstream from its compiled parts. Endpoints of `previous`
    /// with the same address and pool settings are carried over.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: model::Upstream,
        targets: Vec<TargetSpec>,
        hash_key: Option<HashKey>,
        outlier: Outlier,
        active: Option<ActiveCheck>,
        previous: Option<&Upstream>,
    ) -> Upstream {
        let target_metrics = targets
            .iter()
            .map(|t| {
                previous
                    .and_then(|p| {
                        let i = p.targets.iter().position(|x| x.authority == t.authority)?;
                        p.target_metrics.get(i).cloned()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let up = Upstream {
            name: spec.name.as_str().into(),
            target_metrics,
            algorithm: spec.balance,
            resolve_interval: spec.resolve_interval.0,
            budget: RetryBudget::new(spec.retries.budget.ratio, spec.retries.budget.min_retries),
            spec,
            targets,
            hash_key,
            set: ArcSwap::from_pointee(EndpointSet {
                endpoints: vec![],
                balancer: Balancer::LeastRequest,
            }),
            outlier,
            active,
            breaker: None,
            adaptive: None,
            started: AtomicBool::new(false),
        };
        // Fixed addresses are known now; names are filled in by `resolve`.
        // Until then, keep what the previous generation resolved.
        let mut addrs: Vec<(SocketAddr, usize)> = Vec::new();
        for (ti, t) in up.targets.iter().enumerate() {
            if let Some(a) = t.fixed {
                addrs.push((a, ti));
            } else if let Some(prev) = previous {
                for e in prev.set.load().endpoints.iter() {
                    if *e.target == *t.authority {
                        addrs.push((e.addr, ti));
                    }
                }
            }
        }
        let prev_eps = previous.map(|p| p.set.load_full());
        up.install(&addrs, prev_eps.as_deref());
        up
    }

    fn pool_settings(&self) -> (model::Protocol, usize, Duration) {
        (
            self.spec.protocol,
            self.spec.pool.max_idle,
            self.spec.pool.idle_timeout.0,
        )
    }

    /// Replaces the endpoint set with `addrs` (address, target index),
    /// reusing endpoints from `reuse` (or the current set) when unchanged.
    fn install(&self, addrs: &[(SocketAddr, usize)], reuse: Option<&EndpointSet>) {
        let current = self.set.load_full();
        let reuse = reuse.unwrap_or(&current);
        let settings = self.pool_settings();
        let mut old: HashMap<(SocketAddr, &str), &Arc<Endpoint>> = HashMap::new();
        for e in &reuse.endpoints {
            old.insert((e.addr, &*e.target), e);
        }
        let mut endpoints = Vec::with_capacity(addrs.len());
        for (addr, ti) in addrs {
            let t = &self.targets[*ti];
            let ep = match old.get(&(*addr, &*t.authority)) {
                Some(e)
                    if e.weight == t.weight && e.pool.settings() == settings && e.tls == t.tls =>
                {
                    Arc::clone(e)
                }
                _ => Arc::new(
                    Endpoint::new(
                        *addr,
                        t.authority.clone(),
                        t.weight,
                        Pool::new(settings.0, settings.1, settings.2),
                    )
                    .with_tls(t.tls.clone())
                    .with_metrics(self.target_metrics[*ti].clone()),
                ),
            };
            if !endpoints
                .iter()
                .any(|e: &Arc<Endpoint>| Arc::ptr_eq(e, &ep))
            {
                endpoints.push(ep);
            }
        }
        let balancer = match self.algorithm {
            model::Balance::RoundRobin => Balancer::round_robin(&endpoints),
            model::Balance::Random => Balancer::random(&endpoints),
            model::Balance::LeastRequest => Balancer::LeastRequest,
            model::Balance::ConsistentHash => Balancer::consistent_hash(&endpoints),
        };
        self.set.store(Arc::new(EndpointSet {
            endpoints,
            balancer,
        }));
    }

    fn needs_dns(&self) -> bool {
        self.targets.iter().any(|t| t.fixed.is_none())
    }

    /// Resolves every named target once; a failed lookup keeps that target's
    /// previous addresses (serving stale beats serving nothing).
    pub async fn resolve(&self) {
        if !self.needs_dns() {
            return;
        }
        let current = self.set.load_full();
        let mut addrs = Vec::new();
        for (ti, t) in self.targets.iter().enumerate() {
            if let Some(a) = t.fixed {
                addrs.push((a, ti));
                continue;
            }
            match tokio::net::lookup_host((t.host.as_str(), t.port)).await {
                Ok(found) => {
                    let mut found: Vec<SocketAddr> = found.collect();
                    found.sort();
                    found.dedup();
                    addrs.extend(found.into_iter().map(|a| (a, ti)));
                }
                Err(e) => {
                    tracing::warn!(upstream = %self.name, target = %t.authority, error = %e, "DNS lookup failed; keeping previous addresses");
                    for ep in current
                        .endpoints
                        .iter()
                        .filter(|ep| *ep.target == *t.authority)
                    {
                        addrs.push((ep.addr, ti));
                    }
                }
            }
        }
        let unchanged = addrs.len() == current.endpoints.len()
            && addrs
                .iter()
                .zip(current.endpoints.iter())
                .all(|((a, ti), e)| *a == e.addr && *e.target == *self.targets[*ti].authority);
        if !unchanged {
            self.install(&addrs, None);
        }
    }

    /// Starts the background work of this upstream once: DNS refresh, active
    /// health checks and idle-connection eviction. Tasks hold a weak reference
    /// and end when the upstream is dropped (after a reload removed it).
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.needs_dns() {
            let weak = Arc::downgrade(self);
            let every = self.resolve_interval.max(Duration::from_secs(1));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(up) = weak.upgrade() else { break };
                    up.resolve().await;
                }
            });
        }
        if let Some(check) = self.active.clone() {
            let weak = Arc::downgrade(self);
            tokio::spawn(run_active_checks(weak, check));
        }
        let weak = Arc::downgrade(self);
        let every = (self.spec.pool.idle_timeout.0 / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(up) = weak.upgrade() else { break };
                for e in up.set.load().endpoints.iter() {
                    e.pool.evict_expired();
                }
            }
        });
    }

    /// Derives the hash key for consistent hashing, if this upstream uses it.
    pub fn hash_of(
        &self,
        parts: &http::request::Parts,
        client_ip: std::net::IpAddr,
    ) -> Option<u64> {
        use balance::hash_bytes;
        match self.hash_key.as_ref()? {
            HashKey::Header(name) => parts.headers.get(name).map(|v| hash_bytes(v.as_bytes())),
            HashKey::Cookie(name) => parts
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then(|| hash_bytes(v.as_bytes()))
                }),
            HashKey::ClientIp => Some(match client_ip {
                std::net::IpAddr::V4(a) => hash_bytes(&a.octets()),
                std::net::IpAddr::V6(a) => hash_bytes(&a.octets()),
            }),
            HashKey::Path => Some(hash_bytes(parts.uri.path().as_bytes())),
        }
    }
}

async fn run_active_checks(weak: Weak<Upstream>, check: ActiveCheck) {
    loop {
        let Some(up) = weak.upgrade() else { break };
        let set = up.set.load_full();
        let name = up.name.clone();
        drop(up);
        let mut probes = Vec::with_capacity(set.endpoints.len());
        for ep in set.endpoints.iter() {
            let ep = ep.clone();
            let check = check.clone();
            probes.push(tokio::spawn(async move {
                let ok = check.probe(&ep).await;
                if ep.health.record_probe(ok, check.healthy_threshold, check.unhealthy_threshold) {
                    tracing::info!(target = %ep.addr, healthy = ok, "active health check changed target state");
                }
            }));
        }
        for p in probes {
            let _ = p.await;
        }
        drop(set);
        tracing::trace!(upstream = %name, "health checks done");
        tokio::time::sleep(check.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;
    use crate::snapshot::compile;

    fn cfg(targets: &[&str], extra: &str) -> String {
        let t: String = targets
            .iter()
            .map(|a| format!("      - address: {a}\n"))
            .collect();
        format!(
            "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets:\n{t}{extra}routes:\n  - name: r\n    action: {{proxy: {{upstream: up}}}}\n"
        )
    }

    fn snapshot(text: &str, prev: Option<&crate::snapshot::Snapshot>) -> crate::snapshot::Snapshot {
        let loaded = parse_str("t.yaml", text, |_| None).unwrap();
        compile(&loaded, prev).unwrap()
    }

    #[test]
    fn unchanged_upstream_is_reused_across_reloads() {
        let a = snapshot(&cfg(&["127.0.0.1:1001", "127.0.0.1:1002"], ""), None);
        let b = snapshot(&cfg(&["127.0.0.1:1001", "127.0.0.1:1002"], ""), Some(&a));
        assert!(Arc::ptr_eq(&a.upstreams["up"], &b.upstreams["up"]));
    }

    #[test]
    fn target_change_keeps_endpoints_of_unchanged_addresses() {
        let a = snapshot(&cfg(&["127.0.0.1:1001", "127.0.0.1:1002"], ""), None);
        let b = snapshot(&cfg(&["127.0.0.1:1001", "127.0.0.1:1003"], ""), Some(&a));
        let (ua, ub) = (&a.upstreams["up"], &b.upstreams["up"]);
        assert!(!Arc::ptr_eq(ua, ub));
        let (sa, sb) = (ua.set.load(), ub.set.load());
        let kept = sb.endpoints.iter().find(|e| e.addr.port() == 1001).unwrap();
        assert!(
            Arc::ptr_eq(kept, &sa.endpoints[0]),
            "pool and health of 1001 survive"
        );
        let fresh = sb.endpoints.iter().find(|e| e.addr.port() == 1003).unwrap();
        assert!(!sa.endpoints.iter().any(|e| Arc::ptr_eq(e, fresh)));
        assert_eq!(sb.endpoints.len(), 2);
    }

    #[test]
    fn changed_pool_settings_start_fresh_endpoints() {
        let a = snapshot(&cfg(&["127.0.0.1:1001"], ""), None);
        let b = snapshot(
            &cfg(&["127.0.0.1:1001"], "    pool: {max_idle: 3}\n"),
            Some(&a),
        );
        let (sa, sb) = (a.upstreams["up"].set.load(), b.upstreams["up"].set.load());
        assert!(!Arc::ptr_eq(&sa.endpoints[0], &sb.endpoints[0]));
    }

    #[test]
    fn target_metrics_survive_a_changed_upstream() {
        let a = snapshot(&cfg(&["127.0.0.1:1001", "127.0.0.1:1002"], ""), None);
        let b = snapshot(
            &cfg(
                &["127.0.0.1:1001", "127.0.0.1:1003"],
                "    pool: {max_idle: 3}\n",
            ),
            Some(&a),
        );
        let (ua, ub) = (&a.upstreams["up"], &b.upstreams["up"]);
        assert!(Arc::ptr_eq(&ua.target_metrics[0], &ub.target_metrics[0]));
        assert!(!Arc::ptr_eq(&ua.target_metrics[1], &ub.target_metrics[1]));
        // New endpoints (pool settings changed) still share the target's series.
        let sb = ub.set.load();
        assert!(Arc::ptr_eq(&sb.endpoints[0].metrics, &ub.target_metrics[0]));
        assert!(Arc::ptr_eq(&sb.endpoints[1].metrics, &ub.target_metrics[1]));
    }

    #[tokio::test]
    async fn hostname_targets_resolve_and_re_resolve_without_churn() {
        let s = snapshot(&cfg(&["localhost:1004"], ""), None);
        let up = &s.upstreams["up"];
        assert!(up.set.load().endpoints.is_empty(), "names wait for DNS");
        up.resolve().await;
        let first = up.set.load_full();
        assert!(!first.endpoints.is_empty());
        assert!(first
            .endpoints
            .iter()
            .all(|e| e.addr.ip().is_loopback() && e.addr.port() == 1004));
        up.resolve().await;
        let second = up.set.load_full();
        assert!(
            Arc::ptr_eq(&first, &second),
            "unchanged answers keep the same set"
        );
    }
}
