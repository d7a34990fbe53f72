//! `auth.jwt_issuers`: each issuer compiled once per snapshot into an
//! [`Issuer`] — its checks, its keys (inline, `jwks_file`, and the live set
//! fetched from `jwks_url`), its token cache and its JWKS counters.
//!
//! An issuer whose configuration (and key files) did not change is taken
//! from the previous snapshot as it is, so a reload keeps its fetched keys
//! and cached tokens. The JWKS URL is only fetched by the background task
//! ([`Issuer::start`], after the snapshot is published; it holds a `Weak`
//! and ends when a reload drops the issuer) and on an unknown `kid`
//! ([`Issuer::refresh_for_unknown_kid`], at most once per
//! `jwks_min_refresh`). A failed fetch keeps the last good key set.

use super::cache::TokenCache;
use super::keys::{parse_alg, parse_jwks, Key};
use crate::auth::fetch::Fetcher;
use crate::config::model;
use arc_swap::ArcSwap;
use jsonwebtoken::Algorithm;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// JWKS fetch counters of one issuer name, carried across reloads.
#[derive(Debug, Default)]
pub struct JwksStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// The keys fetched from `jwks_url`.
pub struct Remote {
    fetcher: Fetcher,
    refresh: Duration,
    min_refresh: Duration,
    keys: ArcSwap<Vec<Arc<Key>>>,
    /// A fetch succeeded at least once.
    loaded: AtomicBool,
    /// `clock::now_ms()` of the last fetch's start (`u64::MAX`: never).
    last_attempt: AtomicU64,
    /// One fetch at a time (held across the fetch, never on a cache hit).
    fetching: tokio::sync::Mutex<()>,
}

pub struct Issuer {
    pub name: Arc<str>,
    /// The expected `iss`.
    pub iss: Box<str>,
    pub audiences: Box<[Box<str>]>,
    pub algorithms: Box<[Algorithm]>,
    /// Seconds.
    pub leeway: u64,
    pub required_claims: Box<[Box<str>]>,
    pub max_token_size: usize,
    pub consumer_claim: Option<Box<str>>,
    /// Inline keys and `jwks_file`.
    pub local: Box<[Arc<Key>]>,
    pub remote: Option<Remote>,
    pub cache: TokenCache,
    pub stats: Arc<JwksStats>,
    config: model::JwtIssuer,
    started: AtomicBool,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("name", &self.name).finish()
    }
}

/// Every compiled issuer of a snapshot, by name.
#[derive(Debug, Default)]
pub struct Issuers {
    pub list: Vec<Arc<Issuer>>,
    by_name: HashMap<String, usize>,
}

impl Issuers {
    pub fn get(&self, name: &str) -> Option<&Arc<Issuer>> {
        self.by_name.get(name).map(|&i| &self.list[i])
    }

    /// Starts the JWKS task of every issuer that has a URL (once each).
    pub fn start(&self) {
        for i in &self.list {
            i.start();
        }
    }

    /// Compiles `auth.jwt_issuers`. `raw_line(path)` gives the line of a
    /// key before `${VAR}` interpolation (secrets must come from the
    /// environment); relative files are resolved against `base`.
    pub fn compile(
        auth: &model::Auth,
        previous: Option<&Issuers>,
        consumers: &crate::auth::Consumers,
        base: &Path,
        err: &mut dyn FnMut(String, String),
        raw_line: &dyn Fn(&str) -> Option<String>,
    ) -> Issuers {
        let mut out = Issuers::default();
        for (i, cfg) in auth.jwt_issuers.iter().enumerate() {
            let p = format!("auth.jwt_issuers[{i}]");
            if cfg.name.is_empty() || cfg.name.chars().any(|c| c.is_control() || c == '"') {
                err(
                    format!("{p}.name"),
                    "must be non-empty, without control characters or quotes".into(),
                );
                continue;
            }
            if out.by_name.contains_key(&cfg.name) {
                err(
                    format!("{p}.name"),
                    format!("duplicate issuer name `{}`", cfg.name),
                );
                continue;
            }
            let prev = previous.and_then(|x| x.get(&cfg.name));
            let Some(issuer) = compile_one(
                &p,
                cfg,
                auth.token_cache_size,
                prev,
                consumers,
                base,
                err,
                raw_line,
            ) else {
                continue;
            };
            out.by_name.insert(cfg.name.clone(), out.list.len());
            out.list.push(issuer);
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_one(
    p: &str,
    cfg: &model::JwtIssuer,
    cache_size: usize,
    prev: Option<&Arc<Issuer>>,
    consumers: &crate::auth::Consumers,
    base: &Path,
    err: &mut dyn FnMut(String, String),
    raw_line: &dyn Fn(&str) -> Option<String>,
) -> Option<Arc<Issuer>> {
    let mut failed = false;
    let mut e = |k: String, m: String| {
        failed = true;
        err(k, m)
    };
    if cfg.issuer.is_empty() {
        e(format!("{p}.issuer"), "must not be empty".into());
    }
    let mut algorithms = Vec::new();
    if cfg.algorithms.is_empty() {
        e(
            format!("{p}.algorithms"),
            "list at least one algorithm (e.g. RS256)".into(),
        );
    }
    for (j, a) in cfg.algorithms.iter().enumerate() {
        match parse_alg(a) {
            Ok(a) if !algorithms.contains(&a) => algorithms.push(a),
            Ok(_) => {}
            Err(m) => e(format!("{p}.algorithms[{j}]"), m),
        }
    }
    // Keys: inline, then the file.
    let mut local: Vec<Arc<Key>> = Vec::new();
    let usable = |k: &Key| algorithms.iter().any(|a| k.allows(*a));
    let unusable = |k: &Key| {
        format!(
            "{} cannot verify any of the issuer's algorithms ({}){}",
            k.family.describe(),
            cfg.algorithms.join(", "),
            k.alg
                .map(|a| format!(" (its `alg` is {a:?})"))
                .unwrap_or_default()
        )
    };
    for (j, k) in cfg.keys.iter().enumerate() {
        let kp = format!("{p}.keys[{j}]");
        let kid = k.kid.as_deref();
        let set = [
            k.jwk.is_some(),
            k.pem.is_some(),
            k.pem_file.is_some(),
            k.secret.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            e(
                kp,
                "a key names exactly one of `jwk`, `pem`, `pem_file`, `secret`".into(),
            );
            continue;
        }
        let (at, parsed) = if let Some(jwk) = &k.jwk {
            (format!("{kp}.jwk"), Key::from_jwk(kid, jwk))
        } else if let Some(pem) = &k.pem {
            (format!("{kp}.pem"), Key::from_pem(kid, pem.as_bytes()))
        } else if let Some(f) = &k.pem_file {
            let path = base.join(f);
            (
                format!("{kp}.pem_file"),
                crate::config::inputs::read(&path)
                    .map_err(|x| format!("cannot read {}: {x}", path.display()))
                    .and_then(|b| Key::from_pem(kid, &b)),
            )
        } else {
            let at = format!("{kp}.secret");
            let line = raw_line(&at).unwrap_or_default();
            if !line.contains("${") {
                e(
                    at,
                    "an HMAC secret must come from the environment (`secret: ${JWT_SECRET}`), never written in the file".into(),
                );
                continue;
            }
            let s = k.secret.as_deref().unwrap_or_default();
            (at, Key::from_secret(kid, s.as_bytes()))
        };
        match parsed {
            Ok(key) if usable(&key) => local.push(Arc::new(key)),
            Ok(key) => e(at, unusable(&key)),
            Err(m) => e(at, m),
        }
    }
    if let Some(f) = &cfg.jwks_file {
        let path = base.join(f);
        match crate::config::inputs::read(&path)
            .map_err(|x| format!("cannot read {}: {x}", path.display()))
            .and_then(|b| parse_jwks(&b))
        {
            Ok((keys, skipped)) => {
                for s in skipped {
                    e(format!("{p}.jwks_file"), format!("{}: {s}", path.display()));
                }
                for k in keys {
                    if usable(&k) {
                        local.push(Arc::new(k));
                    } else {
                        let m = unusable(&k);
                        e(format!("{p}.jwks_file"), format!("{}: {m}", path.display()));
                    }
                }
            }
            Err(m) => e(format!("{p}.jwks_file"), m),
        }
    }
    let mut fetcher = None;
    if let Some(url) = &cfg.jwks_url {
        let ca = cfg.jwks_ca.as_ref().map(|c| base.join(c));
        match Fetcher::new(url, ca, cfg.jwks_timeout.0, MAX_JWKS_BYTES) {
            Ok(f) => fetcher = Some(f),
            Err(m) => e(format!("{p}.jwks_url"), m),
        }
        if cfg.jwks_refresh.0 < Duration::from_secs(1) {
            e(format!("{p}.jwks_refresh"), "must be at least 1s".into());
        }
        if cfg.jwks_timeout.0.is_zero() {
            e(format!("{p}.jwks_timeout"), "must be more than 0".into());
        }
    } else if cfg.jwks_ca.is_some() {
        e(format!("{p}.jwks_ca"), "only used with `jwks_url`".into());
    }
    if cfg.keys.is_empty() && cfg.jwks_file.is_none() && cfg.jwks_url.is_none() {
        e(
            p.to_string(),
            "give the issuer's keys: `keys`, `jwks_file` or `jwks_url`".into(),
        );
    }
    if cfg.max_token_size.0 == 0 {
        e(format!("{p}.max_token_size"), "must be more than 0".into());
    }
    if let Some(c) = &cfg.consumer_claim {
        if c.is_empty() {
            e(format!("{p}.consumer_claim"), "must not be empty".into());
        } else if consumers.is_empty() {
            e(
                format!("{p}.consumer_claim"),
                "no consumers are configured, so no token can name one".into(),
            );
        }
    }
    for (j, c) in cfg.required_claims.iter().enumerate() {
        if c.is_empty() {
            e(
                format!("{p}.required_claims[{j}]"),
                "must not be empty".into(),
            );
        }
    }
    if failed {
        return None;
    }

    // Unchanged configuration, same key material: keep the running issuer
    // (fetched keys, cache, task).
    if let Some(prev) = prev {
        let same_keys = prev.local.len() == local.len()
            && prev.local.iter().zip(&local).all(|(a, b)| a.id == b.id);
        if prev.config == *cfg && same_keys && prev.cache.capacity() == cache_size {
            return Some(prev.clone());
        }
    }
    let remote = fetcher.map(|fetcher| Remote {
        fetcher,
        refresh: cfg.jwks_refresh.0,
        min_refresh: cfg.jwks_min_refresh.0,
        keys: ArcSwap::from_pointee(Vec::new()),
        loaded: AtomicBool::new(false),
        last_attempt: AtomicU64::new(u64::MAX),
        fetching: tokio::sync::Mutex::new(()),
    });
    Some(Arc::new(Issuer {
        name: cfg.name.as_str().into(),
        iss: cfg.issuer.as_str().into(),
        audiences: cfg
            .audiences
            .iter()
            .map(|a| Box::from(a.as_str()))
            .collect(),
        algorithms: algorithms.into(),
        leeway: cfg.leeway.0.as_secs(),
        required_claims: cfg
            .required_claims
            .iter()
            .map(|c| Box::from(c.as_str()))
            .collect(),
        max_token_size: cfg.max_token_size.0 as usize,
        consumer_claim: cfg.consumer_claim.as_deref().map(Box::from),
        local: local.into(),
        remote,
        cache: TokenCache::new(cache_size),
        stats: prev.map(|p| p.stats.clone()).unwrap_or_default(),
        config: cfg.clone(),
        started: AtomicBool::new(false),
    }))
}

impl Issuer {
    /// The keys fetched from the URL (empty without one).
    pub fn remote_keys(&self) -> Option<arc_swap::Guard<Arc<Vec<Arc<Key>>>>> {
        self.remote.as_ref().map(|r| r.keys.load())
    }

    /// Whether the JWKS URL has been fetched successfully at least once
    /// (true without a URL).
    pub fn keys_loaded(&self) -> bool {
        self.remote
            .as_ref()
            .is_none_or(|r| r.loaded.load(Ordering::Acquire))
    }

    /// Keys in force: local plus fetched.
    pub fn key_count(&self) -> usize {
        self.local.len() + self.remote_keys().map_or(0, |k| k.len())
    }

    /// Spawns the JWKS task: a fetch now, then every `jwks_refresh` (after
    /// a failure, again after `jwks_min_refresh`, at least 1 s). It holds a
    /// `Weak` and ends when the issuer is dropped.
    pub fn start(self: &Arc<Self>) {
        let Some(r) = &self.remote else { return };
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let (refresh, retry) = (
            r.refresh,
            r.min_refresh.clamp(Duration::from_secs(1), r.refresh),
        );
        tokio::spawn(async move {
            loop {
                let ok = {
                    let Some(me) = weak.upgrade() else { break };
                    me.fetch_now().await
                };
                tokio::time::sleep(if ok { refresh } else { retry }).await;
            }
        });
    }

    async fn fetch_now(&self) -> bool {
        let Some(r) = &self.remote else { return false };
        let _one = r.fetching.lock().await;
        self.fetch_locked(r).await
    }

    /// A token named a `kid` no key has: fetch the JWKS again, unless a
    /// fetch started less than `jwks_min_refresh` ago (then wait for that
    /// one if it is still running).
    pub async fn refresh_for_unknown_kid(&self) {
        let Some(r) = &self.remote else { return };
        let _one = r.fetching.lock().await;
        let last = r.last_attempt.load(Ordering::Acquire);
        let recent = last != u64::MAX
            && crate::clock::now_ms().saturating_sub(last) < r.min_refresh.as_millis() as u64;
        if !recent {
            self.fetch_locked(r).await;
        }
    }

    /// Whether a refresh for an unknown `kid` would fetch now.
    pub fn may_refresh(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| {
            let last = r.last_attempt.load(Ordering::Acquire);
            last == u64::MAX
                || crate::clock::now_ms().saturating_sub(last) >= r.min_refresh.as_millis() as u64
                || r.fetching.try_lock().is_err()
        })
    }

    async fn fetch_locked(&self, r: &Remote) -> bool {
        r.last_attempt
            .store(crate::clock::now_ms(), Ordering::Release);
        let result = match r.fetcher.get(&[]).await {
            Ok(f) if f.status == http::StatusCode::OK => parse_jwks(&f.body),
            Ok(f) => Err(format!("answered {}", f.status)),
            Err(m) => Err(m),
        };
        let (keys, skipped) = match result {
            Ok(x) => x,
            Err(m) => return self.fetch_failed(r, &m),
        };
        for s in &skipped {
            tracing::warn!(issuer = %self.name, url = r.fetcher.url(), "JWKS key skipped: {s}");
        }
        let usable: Vec<Key> = keys
            .into_iter()
            .filter(|k| {
                let ok = self.algorithms.iter().any(|a| k.allows(*a));
                if !ok {
                    tracing::warn!(issuer = %self.name, kid = ?k.kid, "JWKS key skipped: {} cannot verify the issuer's algorithms", k.family.describe());
                }
                ok
            })
            .collect();
        if usable.is_empty() {
            return self.fetch_failed(r, "the JWKS has no usable key");
        }
        let old = r.keys.load_full();
        let next: Vec<Arc<Key>> = usable
            .into_iter()
            .map(|k| {
                old.iter()
                    .find(|o| o.id == k.id)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(k))
            })
            .collect();
        let mut changed = next.len() != old.len();
        for o in old.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, o)) {
                o.retire();
                changed = true;
            }
        }
        r.keys.store(Arc::new(next));
        r.loaded.store(true, Ordering::Release);
        self.stats.ok.fetch_add(1, Ordering::Relaxed);
        if changed {
            tracing::info!(issuer = %self.name, url = r.fetcher.url(), keys = r.keys.load().len(), "JWKS loaded");
        }
        true
    }

    fn fetch_failed(&self, r: &Remote, m: &str) -> bool {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            issuer = %self.name,
            url = r.fetcher.url(),
            kept = r.keys.load().len(),
            "JWKS fetch failed (the last good keys stay in use): {m}"
        );
        false
    }
}
