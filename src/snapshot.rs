//! Compiles a parsed configuration into an immutable runtime [`Snapshot`]:
//! routers per listener, compiled routes (policy chain + action), upstreams.
//!
//! All semantic validation happens here, and every problem is reported with
//! its file, line, column and key path. Compiling does no network I/O; the
//! only files it reads are the ones the configuration names (TLS
//! certificates, keys and CAs, JWT key files, JSON Schemas, OpenAPI
//! documents), each through `config::inputs::read`, so the snapshot records
//! them ([`Snapshot::inputs`]) and its identity ([`Snapshot::hash`]) covers
//! their contents. The server swaps a new snapshot in atomically and
//! requests in flight keep the one they started with.

use crate::action::{Action, Echo, Respond};
use crate::config::inputs::Inputs;
use crate::config::model::{self, RetryCondition, RetryOn};
use crate::config::{ConfigError, ConfigErrors, Loaded};
use crate::metrics::{RouteMetrics, UNMATCHED_ROUTE};
use crate::net::{Cidr, CidrSet};
use crate::policy::headers::{HeaderOps, HeadersPolicy};
use crate::policy::Policy;
use crate::proxy::rewrite::{parse_template, Rewrite};
use crate::proxy::{HostHeader, ProxyAction, RetryPolicy, Timeouts};
use crate::router::path::Pattern;
use crate::router::{Conditions, Router, RouterBuilder, ValueCond};
use crate::upstream::health::{ActiveCheck, Outlier};
use crate::upstream::{HashKey, TargetSpec, Upstream};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A listener as compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSpec {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub trusted: Vec<Cidr>,
    pub header_read_timeout: Duration,
    /// `None`: kept-alive connections may stay idle for ever.
    pub idle_timeout: Option<Duration>,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    /// `u64::MAX` when unlimited.
    pub max_body_bytes: u64,
    pub body_read_timeout: Option<Duration>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_connection_lifetime: Option<Duration>,
    pub http2: bool,
    pub max_concurrent_streams: u32,
    /// TLS termination, HTTPS redirect, HSTS, client identity header.
    pub tls: crate::tls::ListenerTls,
}

/// `0` (unlimited) as `u64::MAX`, so a limit is one comparison.
fn limit(bytes: u64) -> u64 {
    if bytes == 0 {
        u64::MAX
    } else {
        bytes
    }
}

/// A compiled route: an ordered policy chain and one action.
pub struct Route {
    pub name: Arc<str>,
    /// This route's series, carried across reloads by route name.
    pub metrics: Arc<RouteMetrics>,
    /// Overrides the listener's request body limit (`u64::MAX`: unlimited).
    pub max_body_bytes: Option<u64>,
    pub policies: Vec<Box<dyn Policy>>,
    pub action: Action,
    /// `concurrency`: this route's own limit (kept across reloads that keep
    /// it).
    pub concurrency: Option<Arc<crate::shed::limiter::Limiter>>,
    /// `priority_class`, as a class index.
    pub priority_class: Option<u8>,
}

/// The routes a listener serves.
pub struct ListenerRoutes {
    pub spec: Arc<ListenerSpec>,
    pub trusted: CidrSet,
    pub router: Router,
    /// Indexed by the router's route indices.
    pub routes: Vec<Arc<Route>>,
}

/// The admin listener as compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminSpec {
    pub addr: SocketAddr,
    /// SHA-256 of the bearer token; requests present a token whose digest is
    /// compared in constant time (the token itself is not kept here).
    pub token_sha256: Option<[u8; 32]>,
}

pub struct Snapshot {
    pub drain_timeout: Duration,
    pub upgrade_timeout: Duration,
    pub watch_config: bool,
    /// The snapshot's identity: a hash of the configuration text (after
    /// `${VAR}` interpolation) and of every file it names
    /// ([`crate::config::inputs::Inputs::identity`]); what `/status` and
    /// `portico_config_info` show.
    pub hash: u64,
    /// The hash of the configuration text alone.
    pub text_hash: u64,
    /// The other files compiling read (TLS, JWT keys, schemas, OpenAPI
    /// documents): a reload re-reads them, the file watcher stats them.
    pub inputs: Arc<crate::config::inputs::Inputs>,
    pub file: String,
    pub loaded_at: SystemTime,
    pub workers: Option<usize>,
    pub listeners: Vec<ListenerRoutes>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Every compiled route once, in file order (listeners share them).
    pub routes: Vec<Arc<Route>>,
    pub admin: Option<AdminSpec>,
    /// The compiled `access_log` key.
    pub access_log: Option<crate::access_log::Spec>,
    /// Its logger, attached by the server before the snapshot is published
    /// (`None` straight out of `compile`, which does no I/O).
    pub access_logger: Option<Arc<crate::access_log::Logger>>,
    /// `tracing`, when configured (kept across reloads that keep the key).
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// The consumers and their credential indexes.
    pub consumers: Arc<crate::auth::Consumers>,
    /// `auth.consumer_headers`: removed from every client request.
    pub consumer_headers: Arc<crate::policy::auth::ConsumerHeaderNames>,
    /// `rate_limiting`: plans, consumer limits, and the counters (kept
    /// across reloads while the backend settings stay the same).
    pub limiting: Arc<crate::ratelimit::Limiting>,
    /// `auth.introspection` servers by name (each kept across reloads,
    /// with its token cache and connections, while its entry is unchanged).
    pub introspection: HashMap<String, Arc<crate::auth::introspect::IntrospectionServer>>,
    /// `auth.jwt_issuers` (unchanged ones kept across reloads, with their
    /// fetched keys and token caches); their JWKS tasks are started by the
    /// server once the snapshot is published.
    pub jwt_issuers: Arc<crate::auth::jwt::Issuers>,
    /// `overload`: the gateway-wide concurrency limit (kept across reloads
    /// that keep it).
    pub overload: Option<Arc<crate::shed::limiter::Limiter>>,
    /// `priorities` (one `default` class when absent).
    pub priorities: Arc<crate::shed::Priorities>,
    pub config: model::Config,
}

impl Snapshot {
    pub fn listener(&self, name: &str) -> Option<&ListenerRoutes> {
        self.listeners.iter().find(|l| &*l.spec.name == name)
    }
}

struct Compiler<'a> {
    loaded: &'a Loaded,
    errors: Vec<ConfigError>,
}

impl Compiler<'_> {
    fn err(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.errors.push(self.loaded.error(path, msg));
    }
}

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Compiles `loaded`. Upstreams whose definition did not change are taken
/// from `previous` as they are (pools and health state kept).
pub fn compile(loaded: &Loaded, previous: Option<&Snapshot>) -> Result<Snapshot, ConfigErrors> {
    compile_with_inputs(loaded, previous, None).0
}

/// [`compile`] with the time source of rate limits (windows, throttles,
/// the Redis breaker's cooldown) given, for tests that must not depend on
/// when they run: a [`ManualClock`](crate::ratelimit::ManualClock) pins
/// them far from a window boundary. Reloads keep it while the backend
/// settings stay the same.
pub fn compile_with_clock(
    loaded: &Loaded,
    previous: Option<&Snapshot>,
    clock: Arc<dyn crate::ratelimit::Clock>,
) -> Result<Snapshot, ConfigErrors> {
    compile_with_inputs(loaded, previous, Some(clock)).0
}

/// [`compile`] (with an optional rate-limit clock, see
/// [`compile_with_clock`]), also returning the files it read or tried to
/// read (see [`crate::config::inputs`]) when it fails: a rejected reload's
/// missing file is worth watching.
pub fn compile_with_inputs(
    loaded: &Loaded,
    previous: Option<&Snapshot>,
    clock: Option<Arc<dyn crate::ratelimit::Clock>>,
) -> (Result<Snapshot, ConfigErrors>, Arc<Inputs>) {
    let (compiled, inputs) =
        crate::config::inputs::record(|| compile_config(loaded, previous, clock));
    let inputs = Arc::new(inputs);
    let compiled = compiled.map(|mut s| {
        s.hash = inputs.identity(loaded.hash);
        s.inputs = inputs.clone();
        s
    });
    (compiled, inputs)
}

fn compile_config(
    loaded: &Loaded,
    previous: Option<&Snapshot>,
    clock: Option<Arc<dyn crate::ratelimit::Clock>>,
) -> Result<Snapshot, ConfigErrors> {
    let mut c = Compiler {
        loaded,
        errors: Vec::new(),
    };
    let cfg = &loaded.config;

    if let Some(0) = cfg.workers {
        c.err("workers", "must be at least 1");
    }
    if cfg.upgrade_timeout.0.is_zero() {
        c.err("upgrade_timeout", "must be more than 0");
    }

    // ---- listeners
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    if cfg.listeners.is_empty() {
        c.err("listeners", "at least one listener is required");
    }
    for (i, l) in cfg.listeners.iter().enumerate() {
        let p = format!("listeners[{i}]");
        if !names.insert(l.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate listener name `{}`", l.name),
            );
        }
        if l.name.is_empty() || l.name.chars().any(char::is_control) {
            c.err(
                format!("{p}.name"),
                "must be non-empty, without control characters",
            );
        }
        let addr = match l.address.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                c.err(
                    format!("{p}.address"),
                    format!("`{}` is not an `ip:port` address", l.address),
                );
                continue;
            }
        };
        // Port 0 (any free port, for tests) may repeat.
        if addr.port() != 0 && !addrs.insert(addr) {
            c.err(
                format!("{p}.address"),
                format!("address {addr} is used by another listener"),
            );
        }
        let mut trusted = Vec::new();
        for (j, t) in l.trusted_proxies.iter().enumerate() {
            match Cidr::parse(t) {
                Ok(cidr) => trusted.push(cidr),
                Err(e) => c.err(format!("{p}.trusted_proxies[{j}]"), e),
            }
        }
        if l.header_read_timeout.0.is_zero() {
            c.err(format!("{p}.header_read_timeout"), "must be greater than 0");
        }
        if l.max_concurrent_streams == 0 {
            c.err(format!("{p}.max_concurrent_streams"), "must be at least 1");
        }
        if l.max_headers == 0 {
            c.err(format!("{p}.max_headers"), "must be at least 1");
        }
        if l.max_uri_bytes.0 < 64 {
            c.err(format!("{p}.max_uri_bytes"), "must be at least 64B");
        }
        if l.max_header_bytes.0 < 8192 {
            c.err(format!("{p}.max_header_bytes"), "must be at least 8KiB");
        }
        listeners.push(ListenerSpec {
            name: l.name.as_str().into(),
            addr,
            trusted,
            header_read_timeout: l.header_read_timeout.0,
            idle_timeout: opt_dur(Some(l.idle_timeout), None),
            max_header_bytes: l.max_header_bytes.0 as usize,
            max_headers: l.max_headers,
            max_uri_bytes: l.max_uri_bytes.0 as usize,
            max_body_bytes: limit(l.max_body_bytes.0),
            body_read_timeout: opt_dur(Some(l.body_read_timeout), None),
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip,
            max_connection_lifetime: opt_dur(Some(l.max_connection_lifetime), None),
            http2: l.http2,
            max_concurrent_streams: l.max_concurrent_streams,
            tls: crate::tls::config::listener(
                l,
                &tls_base(loaded),
                previous
                    .and_then(|s| s.listener(&l.name))
                    .map(|x| &x.spec.tls),
            )
            .unwrap_or_else(|es| {
                for e in es {
                    c.err(format!("{p}.{}", e.key), e.message);
                }
                Default::default()
            }),
        });
    }

    // ---- upstreams
    let mut upstreams: HashMap<String, Arc<Upstream>> = HashMap::new();
    for (i, u) in cfg.upstreams.iter().enumerate() {
        let p = format!("upstreams[{i}]");
        if upstreams.contains_key(&u.name) {
            c.err(
                format!("{p}.name"),
                format!("duplicate upstream name `{}`", u.name),
            );
            continue;
        }
        if let Some(up) = compile_upstream(&mut c, &p, u, previous) {
            upstreams.insert(u.name.clone(), up);
        }
    }

    // ---- admin
    let admin = cfg.admin.as_ref().and_then(|a| compile_admin(&mut c, a));
    let access_log = cfg
        .access_log
        .as_ref()
        .and_then(|a| crate::access_log::compile(a, |p, m| c.err(p, m)));
    let tracer = cfg
        .tracing
        .as_ref()
        .and_then(|t| compile_tracing(&mut c, t, previous));

    // ---- consumers and identity settings
    let consumers = Arc::new(crate::auth::Consumers::compile(
        &cfg.consumers,
        previous.map(|s| &*s.consumers),
        |p, m| c.err(p, m),
        |p| loaded.raw_line(p),
    ));
    let consumer_headers = Arc::new(crate::policy::compile::consumer_headers(
        &cfg.auth.consumer_headers,
        &mut |p, m| c.err(p, m),
    ));
    let introspection = compile_introspection(&mut c, cfg, &consumers, previous);
    let jwt_issuers = Arc::new(crate::auth::jwt::Issuers::compile(
        &cfg.auth,
        previous.map(|s| &*s.jwt_issuers),
        &consumers,
        &tls_base(loaded),
        &mut |p, m| c.err(p, m),
        &|p| loaded.raw_line(p),
    ));
    let limiting = Arc::new(crate::ratelimit::compile(
        cfg,
        previous.map(|s| &*s.limiting),
        clock,
        &mut |p, m| c.err(p, m),
    ));
    let mut group_names = HashSet::new();
    for (i, g) in cfg.route_groups.iter().enumerate() {
        if !group_names.insert(g.name.as_str()) {
            c.err(
                format!("route_groups[{i}].name"),
                format!("duplicate route group name `{}`", g.name),
            );
        }
    }
    // ---- load shedding
    let priorities = Arc::new(match &cfg.priorities {
        Some(p) => crate::shed::compile_priorities(p, &mut |k, m| c.err(k, m)),
        None => crate::shed::Priorities::default(),
    });
    let overload = cfg.overload.as_ref().and_then(|l| {
        crate::shed::compile_limit(
            "overload",
            l,
            &priorities,
            previous.and_then(|s| s.overload.as_ref()),
            &mut |k, m| c.err(k, m),
        )
    });
    let shared = Shared {
        consumers: &consumers,
        consumer_headers: &consumer_headers,
        limiting: &limiting,
        jwt_issuers: &jwt_issuers,
        base: tls_base(loaded),
        cache: Default::default(),
        introspection: &introspection,
        priorities: &priorities,
        previous,
    };

    // ---- routes
    let mut routes: Vec<(usize, Arc<Route>, Pattern, Conditions)> = Vec::new();
    let mut route_names = HashSet::new();
    let previous_metrics: HashMap<&str, &Arc<RouteMetrics>> = previous
        .map(|s| s.routes.iter().map(|r| (&*r.name, &r.metrics)).collect())
        .unwrap_or_default();
    for (i, r) in cfg.routes.iter().enumerate() {
        let p = format!("routes[{i}]");
        if !route_names.insert(r.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate route name `{}`", r.name),
            );
        }
        if r.name == UNMATCHED_ROUTE {
            c.err(
                format!("{p}.name"),
                format!("`{UNMATCHED_ROUTE}` is reserved (the metrics label of requests that match no route)"),
            );
        }
        for (j, l) in r.listeners.iter().enumerate() {
            if !cfg.listeners.iter().any(|x| &x.name == l) {
                c.err(
                    format!("{p}.listeners[{j}]"),
                    format!("no listener is named `{l}`"),
                );
            }
        }
        let metrics = previous_metrics
            .get(r.name.as_str())
            .map(|m| Arc::clone(m))
            .unwrap_or_else(|| Arc::new(RouteMetrics::new(r.name.as_str().into())));
        if let Some(compiled) = compile_route(&mut c, &p, r, &upstreams, metrics, &shared) {
            routes.push((i, Arc::new(compiled.0), compiled.1, compiled.2));
        }
    }
    check_ambiguity(&mut c, cfg, &routes);

    if !c.errors.is_empty() {
        return Err(ConfigErrors(c.errors));
    }

    let all_routes: Vec<Arc<Route>> = routes.iter().map(|(_, r, _, _)| r.clone()).collect();
    let listeners = listeners
        .into_iter()
        .map(|spec| {
            let mut b = RouterBuilder::default();
            let mut lr = Vec::new();
            for (i, route, pattern, conds) in &routes {
                let r = &cfg.routes[*i];
                if r.listeners.is_empty() || r.listeners.iter().any(|l| **l == *spec.name) {
                    b.add(&r.matcher.hosts, pattern, r.priority, conds.clone());
                    lr.push(route.clone());
                }
            }
            ListenerRoutes {
                trusted: CidrSet(spec.trusted.clone()),
                spec: Arc::new(spec),
                router: b.build(),
                routes: lr,
            }
        })
        .collect();

    Ok(Snapshot {
        drain_timeout: cfg.drain_timeout.0,
        upgrade_timeout: cfg.upgrade_timeout.0,
        watch_config: cfg.watch_config,
        // Both set by `compile_with_inputs` once every file is read.
        hash: loaded.hash,
        text_hash: loaded.hash,
        inputs: Default::default(),
        file: loaded.file.clone(),
        loaded_at: SystemTime::now(),
        workers: cfg.workers,
        listeners,
        upstreams,
        routes: all_routes,
        admin,
        access_log,
        access_logger: None,
        tracer,
        consumers,
        consumer_headers,
        limiting,
        introspection: introspection
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect(),
        jwt_issuers,
        overload,
        priorities,
        config: cfg.clone(),
    })
}

/// Compiled state every route's policies may use.
struct Shared<'a> {
    consumers: &'a Arc<crate::auth::Consumers>,
    consumer_headers: &'a Arc<crate::policy::auth::ConsumerHeaderNames>,
    limiting: &'a Arc<crate::ratelimit::Limiting>,
    jwt_issuers: &'a Arc<crate::auth::jwt::Issuers>,
    base: std::path::PathBuf,
    /// Files compiled once for all the routes that name them (OpenAPI documents).
    cache: crate::policy::compile::Cache,
    /// `None`: declared, but it did not compile (already reported).
    introspection: &'a HashMap<String, Option<Arc<crate::auth::introspect::IntrospectionServer>>>,
    priorities: &'a Arc<crate::shed::Priorities>,
    /// The snapshot being replaced (route limits are kept by route name).
    previous: Option<&'a Snapshot>,
}

/// `auth.introspection`: each server once per snapshot, before the routes
/// that use it; an unchanged one is taken from `previous` (cache and
/// connections kept). No network I/O.
fn compile_introspection(
    c: &mut Compiler,
    cfg: &model::Config,
    consumers: &crate::auth::Consumers,
    previous: Option<&Snapshot>,
) -> HashMap<String, Option<Arc<crate::auth::introspect::IntrospectionServer>>> {
    let mut out = HashMap::new();
    let base = tls_base(c.loaded);
    for (i, spec) in cfg.auth.introspection.iter().enumerate() {
        let p = format!("auth.introspection[{i}]");
        if out.contains_key(&spec.name) {
            c.err(
                format!("{p}.name"),
                format!("duplicate introspection server name `{}`", spec.name),
            );
            continue;
        }
        if spec.consumer_claim.is_some() && consumers.is_empty() {
            c.err(
                format!("{p}.consumer_claim"),
                "no consumers are configured, so no token can name one",
            );
        }
        let loaded = c.loaded;
        let mut errs = Vec::new();
        let server = crate::auth::introspect::IntrospectionServer::compile(
            &p,
            spec,
            cfg.auth.token_cache_size,
            &base,
            |k| loaded.raw_line(k),
            previous.and_then(|s| s.introspection.get(&spec.name)),
            |k, m| errs.push((k, m)),
        );
        for (k, m) in errs {
            c.err(k, m);
        }
        out.insert(spec.name.clone(), server);
    }
    out
}

/// `admin`: a bearer token is required unless the address is loopback.
fn compile_admin(c: &mut Compiler, a: &model::Admin) -> Option<AdminSpec> {
    let addr = match a.address.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            c.err(
                "admin.address",
                format!("`{}` is not an `ip:port` address", a.address),
            );
            return None;
        }
    };
    let token = match a.token.as_deref() {
        Some(t) if t.trim().is_empty() => {
            c.err("admin.token", "must not be empty");
            return None;
        }
        Some(t) => Some(t),
        None => None,
    };
    if token.is_none() && !addr.ip().is_loopback() {
        c.err(
            "admin.token",
            format!(
                "a bearer token is required when the admin listener is bound to a non-loopback address ({addr}); set `admin.token` (e.g. `token: ${{ADMIN_TOKEN}}`) or bind to 127.0.0.1"
            ),
        );
        return None;
    }
    Some(AdminSpec {
        addr,
        token_sha256: token.map(crate::admin::token_digest),
    })
}

/// `tracing`: the OTLP endpoint (plain `http://`), headers, ratio, batch.
fn compile_tracing(
    c: &mut Compiler,
    t: &model::Tracing,
    previous: Option<&Snapshot>,
) -> Option<Arc<crate::trace::Tracer>> {
    if let Some(p) = previous {
        if p.config.tracing.as_ref() == Some(t) {
            if let Some(tracer) = &p.tracer {
                return Some(tracer.clone());
            }
        }
    }
    let before = c.errors.len();
    let ep = t.otlp.endpoint.trim();
    let mut endpoint = None;
    match ep.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") => c.err(
            "tracing.otlp.endpoint",
            format!("`{ep}`: https is not supported for span export; send to a collector over http (e.g. a local OpenTelemetry Collector)"),
        ),
        Ok(u) if u.scheme_str() != Some("http") || u.host().is_none() => c.err(
            "tracing.otlp.endpoint",
            format!("`{ep}` is not an `http://host:port/path` URL"),
        ),
        Ok(u) if u.query().is_some() || u.authority().is_some_and(|a| a.as_str().contains('@')) => c.err(
            "tracing.otlp.endpoint",
            format!("`{ep}`: no query or user info allowed (headers go in `tracing.otlp.headers`)"),
        ),
        Ok(u) => endpoint = Some(u),
        Err(e) => c.err(
            "tracing.otlp.endpoint",
            format!("`{ep}` is not a URL: {e}"),
        ),
    }
    let mut headers = http::HeaderMap::new();
    for (k, v) in &t.otlp.headers {
        let p = format!("tracing.otlp.headers.{k}");
        match (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            (Ok(n), Ok(mut v)) => {
                v.set_sensitive(true);
                headers.insert(n, v);
            }
            (Err(_), _) => c.err(p, format!("`{k}` is not a valid header name")),
            (_, Err(_)) => c.err(p, "not a valid header value (control characters?)"),
        }
    }
    if t.otlp.timeout.0.is_zero() {
        c.err("tracing.otlp.timeout", "must be more than 0");
    }
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        c.err(
            "tracing.sample_ratio",
            format!("{} is not between 0.0 and 1.0", t.sample_ratio),
        );
    }
    if t.service_name.trim().is_empty() {
        c.err("tracing.service_name", "must not be empty");
    }
    if t.batch.max_spans == 0 {
        c.err("tracing.batch.max_spans", "must be at least 1");
    }
    if t.batch.queue < t.batch.max_spans {
        c.err(
            "tracing.batch.queue",
            format!(
                "must be at least `max_spans` ({}), else no batch could fill",
                t.batch.max_spans
            ),
        );
    }
    if t.batch.interval.0.is_zero() {
        c.err("tracing.batch.interval", "must be more than 0");
    }
    let endpoint = endpoint?;
    if c.errors.len() > before {
        return None;
    }
    let authority = endpoint.authority()?;
    let authority = match authority.port_u16() {
        Some(_) => authority.to_string(),
        None => format!("{}:80", authority.as_str()),
    };
    let endpoint = match endpoint.path() {
        "" | "/" => format!("http://{authority}/v1/traces").parse().ok()?,
        _ => endpoint,
    };
    Some(Arc::new(crate::trace::Tracer::new(
        crate::trace::TracingSpec {
            authority,
            endpoint,
            headers,
            timeout: t.otlp.timeout.0,
            sample_ratio: t.sample_ratio,
            parent_based: t.parent_based,
            service_name: t.service_name.clone(),
            max_spans: t.batch.max_spans,
            interval: t.batch.interval.0,
            queue: t.batch.queue,
        },
    )))
}

fn opt_dur(d: Option<crate::config::units::Dur>, default: Option<Duration>) -> Option<Duration> {
    match d {
        Some(d) if d.0.is_zero() => None,
        Some(d) => Some(d.0),
        None => default,
    }
}

fn compile_upstream(
    c: &mut Compiler,
    p: &str,
    u: &model::Upstream,
    previous: Option<&Snapshot>,
) -> Option<Arc<Upstream>> {
    let before = c.errors.len();
    if u.targets.is_empty() {
        c.err(
            format!("{p}.targets"),
            "an upstream needs at least one target",
        );
    }
    let mut targets = Vec::new();
    for (j, t) in u.targets.iter().enumerate() {
        let tp = format!("{p}.targets[{j}]");
        if t.weight == 0 {
            c.err(
                format!("{tp}.weight"),
                "must be at least 1 (remove the target to disable it)",
            );
        }
        match split_host_port(&t.address) {
            Some((host, port)) => {
                let fixed = host
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, port));
                targets.push(TargetSpec {
                    host: host.to_string(),
                    port,
                    weight: t.weight,
                    fixed,
                    authority: t.address.as_str().into(),
                    tls: None,
                });
            }
            None => c.err(
                format!("{tp}.address"),
                format!("`{}` is not `host:port`", t.address),
            ),
        }
    }
    match crate::tls::config::upstream(u, &tls_base(c.loaded)) {
        Ok(Some(up_tls)) => {
            for (j, t) in targets.iter_mut().enumerate() {
                match up_tls.for_target(&t.host) {
                    Ok(tt) => t.tls = Some(tt),
                    Err(e) => c.err(format!("{p}.targets[{j}].address"), e),
                }
            }
        }
        Ok(None) => {}
        Err(es) => {
            for e in es {
                c.err(format!("{p}.{}", e.key), e.message);
            }
        }
    }
    let hash_key = match (&u.balance, &u.hash_on) {
        (model::Balance::ConsistentHash, None) => {
            c.err(
                format!("{p}.hash_on"),
                "`balance: consistent_hash` needs `hash_on` (header, cookie, client_ip or path)",
            );
            None
        }
        (model::Balance::ConsistentHash, Some(h)) => {
            let key = match h.split_once(':') {
                Some(("header", name)) => HeaderName::from_bytes(name.trim().as_bytes())
                    .ok()
                    .map(HashKey::Header),
                Some(("cookie", name)) if !name.trim().is_empty() => {
                    Some(HashKey::Cookie(name.trim().to_string()))
                }
                None if h == "client_ip" => Some(HashKey::ClientIp),
                None if h == "path" => Some(HashKey::Path),
                _ => None,
            };
            if key.is_none() {
                c.err(
                    format!("{p}.hash_on"),
                    format!("`{h}`: expected `header:NAME`, `cookie:NAME`, `client_ip` or `path`"),
                );
            }
            key
        }
        (_, Some(_)) => {
            c.err(
                format!("{p}.hash_on"),
                "only used with `balance: consistent_hash`",
            );
            None
        }
        (_, None) => None,
    };
    check_retries(c, &format!("{p}.retries"), &u.retries);
    if u.protocol == model::Protocol::H2 && !has_upstream_tls(u) {
        c.err(
            format!("{p}.protocol"),
            "`h2` is HTTP/2 over TLS and needs `tls` on the upstream; use `h2c` for cleartext HTTP/2",
        );
    }
    if u.resolve_interval.0 < Duration::from_secs(1) {
        c.err(format!("{p}.resolve_interval"), "must be at least 1s");
    }
    let od = &u.outlier_detection;
    if od.consecutive_failures > 0
        && (od.base_ejection.0.is_zero() || od.max_ejection.0 < od.base_ejection.0)
    {
        c.err(
            format!("{p}.outlier_detection"),
            "needs base_ejection > 0 and max_ejection >= base_ejection",
        );
    }
    let active = u.health_check.as_ref().map(|h| {
        let hp = format!("{p}.health_check");
        if !h.path.starts_with('/') {
            c.err(format!("{hp}.path"), "must start with `/`");
        }
        if h.interval.0.is_zero() {
            c.err(format!("{hp}.interval"), "must be greater than 0");
        }
        if h.timeout.0.is_zero() {
            c.err(format!("{hp}.timeout"), "must be greater than 0");
        }
        if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
            c.err(hp.clone(), "thresholds must be at least 1");
        }
        let mut expected = Vec::new();
        for (k, s) in h.expected_status.iter().enumerate() {
            let range = match s {
                model::StatusRange::Code(code) => Some((*code, *code)),
                model::StatusRange::Range(r) => r
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?))),
            };
            match range {
                Some((a, b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => {
                    expected.push((a, b))
                }
                _ => c.err(
                    format!("{hp}.expected_status[{k}]"),
                    "expected a status code or a range like `200-399`",
                ),
            }
        }
        ActiveCheck {
            path: h.path.clone(),
            host: h.host.clone(),
            interval: h.interval.0,
            timeout: h.timeout.0,
            healthy_threshold: h.healthy_threshold.max(1),
            unhealthy_threshold: h.unhealthy_threshold.max(1),
            expected,
        }
    });
    let breaker = u.circuit_breaker.as_ref().and_then(|b| {
        crate::upstream::breaker::compile(&format!("{p}.circuit_breaker"), b, &mut |k, m| {
            c.err(k, m)
        })
    });
    let adaptive = u.adaptive_concurrency.as_ref().and_then(|a| {
        crate::upstream::adaptive::compile(&format!("{p}.adaptive_concurrency"), a, &mut |k, m| {
            c.err(k, m)
        })
    });
    if c.errors.len() > before {
        return None;
    }
    let prev = previous.and_then(|s| s.upstreams.get(&u.name));
    if let Some(prev) = prev {
        // Same definition and same TLS file contents (compared in `targets`).
        if prev.spec == *u && prev.targets == targets {
            return Some(prev.clone());
        }
    }
    let outlier = Outlier {
        consecutive_failures: od.consecutive_failures,
        base_ejection: od.base_ejection.0,
        max_ejection: od.max_ejection.0,
    };
    let mut up = Upstream::new(
        u.clone(),
        targets,
        hash_key,
        outlier,
        active,
        prev.map(|a| &**a),
    );
    up.breaker = breaker.map(|b| crate::upstream::breaker::Breaker::new(b, up.name.clone()));
    up.adaptive = adaptive.map(|a| {
        Arc::new(crate::upstream::adaptive::Adaptive::new(
            a,
            crate::clock::now_ms(),
        ))
    });
    Some(Arc::new(up))
}

fn check_retries(c: &mut Compiler, p: &str, r: &model::Retries) {
    for (k, on) in r.on.iter().enumerate() {
        if let RetryOn::Status(s) = on {
            if !(100..=599).contains(s) {
                c.err(
                    format!("{p}.on[{k}]"),
                    format!("`{s}` is not an HTTP status"),
                );
            }
        }
    }
    if !(0.0..=1.0).contains(&r.budget.ratio) {
        c.err(format!("{p}.budget.ratio"), "must be between 0 and 1");
    }
    if r.attempts > 10 {
        c.err(format!("{p}.attempts"), "at most 10 retries");
    }
}

fn split_host_port(s: &str) -> Option<(&str, u16)> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        let host_end = s.rfind(':')?;
        let host = s[..host_end].trim_start_matches('[').trim_end_matches(']');
        return Some((host, a.port()));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    valid.then_some((host, port))
}

fn retry_policy(r: &model::Retries) -> RetryPolicy {
    let mut p = RetryPolicy {
        attempts: r.attempts,
        on_connect_failure: false,
        on_timeout: false,
        on_reset: false,
        statuses: Vec::new(),
        backoff_base: r.backoff.base.0,
        backoff_max: r.backoff.max.0,
    };
    for on in &r.on {
        match on {
            RetryOn::Status(s) => p.statuses.push(*s),
            RetryOn::Condition(RetryCondition::ConnectFailure) => p.on_connect_failure = true,
            RetryOn::Condition(RetryCondition::Timeout) => p.on_timeout = true,
            RetryOn::Condition(RetryCondition::Reset) => p.on_reset = true,
        }
    }
    p
}

fn header_name(c: &mut Compiler, p: String, n: &str) -> Option<HeaderName> {
    match HeaderName::from_bytes(n.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            c.err(p, format!("`{n}` is not a valid header name"));
            None
        }
    }
}

fn header_value(c: &mut Compiler, p: String, v: &str) -> Option<HeaderValue> {
    match HeaderValue::from_str(v) {
        Ok(h) => Some(h),
        Err(_) => {
            c.err(p, "not a valid header value (control characters?)");
            None
        }
    }
}

fn header_ops(c: &mut Compiler, p: &str, ops: &model::HeaderOps) -> HeaderOps {
    let mut out = HeaderOps::default();
    for (k, v) in &ops.set {
        let n = header_name(c, format!("{p}.set.{k}"), k);
        let v = header_value(c, format!("{p}.set.{k}"), v);
        if let (Some(n), Some(v)) = (n, v) {
            out.set.push((n, v));
        }
    }
    for (k, v) in &ops.add {
        let n = header_name(c, format!("{p}.add.{k}"), k);
        let v = header_value(c, format!("{p}.add.{k}"), v);
        if let (Some(n), Some(v)) = (n, v) {
            out.add.push((n, v));
        }
    }
    for (j, k) in ops.remove.iter().enumerate() {
        if let Some(n) = header_name(c, format!("{p}.remove[{j}]"), k) {
            out.remove.push(n);
        }
    }
    out
}

fn value_cond(c: &mut Compiler, p: &str, m: &model::ValueMatch) -> Option<ValueCond> {
    let set = [m.exact.is_some(), m.regex.is_some(), m.present.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if set != 1 {
        c.err(
            p.to_string(),
            "give exactly one of `exact`, `regex` or `present`",
        );
        return None;
    }
    if let Some(e) = &m.exact {
        return Some(ValueCond::Exact(e.clone()));
    }
    if let Some(r) = &m.regex {
        return match regex::Regex::new(r) {
            Ok(re) => Some(ValueCond::Regex(re)),
            Err(e) => {
                c.err(format!("{p}.regex"), format!("invalid regex: {e}"));
                None
            }
        };
    }
    Some(if m.present == Some(true) {
        ValueCond::Present
    } else {
        ValueCond::Absent
    })
}

fn compile_route(
    c: &mut Compiler,
    p: &str,
    r: &model::Route,
    upstreams: &HashMap<String, Arc<Upstream>>,
    metrics: Arc<RouteMetrics>,
    shared: &Shared,
) -> Option<(Route, Pattern, Conditions)> {
    let before = c.errors.len();
    let m = &r.matcher;
    let pattern = match (&m.path, &m.path_prefix) {
        (Some(_), Some(_)) => {
            c.err(
                format!("{p}.match"),
                "give either `path` or `path_prefix`, not both",
            );
            None
        }
        (Some(path), None) => Pattern::parse(path)
            .map_err(|e| c.err(format!("{p}.match.path"), e))
            .ok(),
        (None, Some(prefix)) => Pattern::parse_prefix(prefix)
            .map_err(|e| c.err(format!("{p}.match.path_prefix"), e))
            .ok(),
        (None, None) => Pattern::parse_prefix("/").ok(),
    };
    // Requests are matched after path normalisation, so a pattern that is
    // not itself normal (`/a//b`, `/%7Euser`, `/a/../b`) could never match.
    let written = m
        .path
        .as_ref()
        .map(|v| ("path", v))
        .or(m.path_prefix.as_ref().map(|v| ("path_prefix", v)));
    if let Some((key, raw)) = written {
        let trimmed = if key == "path_prefix" && raw.len() > 1 {
            raw.trim_end_matches('/')
        } else {
            raw.as_str()
        };
        match crate::normalize::normalize_path(trimmed) {
            Ok(n) if n != trimmed => c.err(
                format!("{p}.match.{key}"),
                format!("`{raw}` never matches: requests are normalised first; write `{n}`"),
            ),
            Err(e) => c.err(
                format!("{p}.match.{key}"),
                format!("`{raw}` never matches: {e}"),
            ),
            Ok(_) => {}
        }
    }
    for (j, h) in m.hosts.iter().enumerate() {
        let bare = h.strip_prefix("*.").unwrap_or(h);
        let ok = !bare.is_empty()
            && !bare.contains('*')
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !ok {
            c.err(
                format!("{p}.match.hosts[{j}]"),
                format!("`{h}` is not a host name or `*.suffix` wildcard (no port)"),
            );
        }
    }
    let mut conds = Conditions::default();
    for (j, meth) in m.methods.iter().enumerate() {
        match Method::from_bytes(meth.to_ascii_uppercase().as_bytes()) {
            Ok(mm) => conds.methods.push(mm),
            Err(_) => c.err(
                format!("{p}.match.methods[{j}]"),
                format!("`{meth}` is not an HTTP method"),
            ),
        }
    }
    for (j, h) in m.headers.iter().enumerate() {
        let hp = format!("{p}.match.headers[{j}]");
        let n = header_name(c, format!("{hp}.name"), &h.name);
        if let (Some(n), Some(v)) = (n, value_cond(c, &hp, h)) {
            conds.headers.push((n, v));
        }
    }
    for (j, q) in m.query.iter().enumerate() {
        let qp = format!("{p}.match.query[{j}]");
        if let Some(v) = value_cond(c, &qp, q) {
            conds.query.push((q.name.clone(), v));
        }
    }

    // The route group's policies first, then the route's own.
    let mut steps: Vec<(String, &model::Policy)> = Vec::new();
    if let Some(g) = &r.group {
        let cfg = &c.loaded.config;
        match cfg.route_groups.iter().position(|x| &x.name == g) {
            Some(gi) => steps.extend(
                cfg.route_groups[gi]
                    .policies
                    .iter()
                    .enumerate()
                    .map(|(j, pol)| (format!("route_groups[{gi}].policies[{j}]"), pol)),
            ),
            None => c.err(
                format!("{p}.group"),
                format!("no route group is named `{g}`"),
            ),
        }
    }
    steps.extend(
        r.policies
            .iter()
            .enumerate()
            .map(|(j, pol)| (format!("{p}.policies[{j}]"), pol)),
    );
    // A route with CORS also takes the preflights of its methods.
    conds.preflight = steps.iter().any(|(_, pol)| pol.cors.is_some());
    let mut policies: Vec<Box<dyn Policy>> = Vec::new();
    let mut auth_before: Option<&model::AuthPolicy> = None;
    for (pp, pol) in steps {
        let env = crate::policy::compile::Env {
            consumers: shared.consumers,
            consumer_headers: shared.consumer_headers,
            metrics: &metrics,
            base: &shared.base,
            introspection: shared.introspection,
            auth_before,
            jwt_issuers: shared.jwt_issuers,
            cache: &shared.cache,
            limiting: shared.limiting,
            route: &r.name,
            group: r.group.as_deref(),
        };
        if let Some(a) = &pol.auth {
            auth_before = Some(a);
        }
        if crate::policy::compile::count(pol) != 1 {
            c.err(
                pp.clone(),
                format!(
                    "a policy step names exactly one policy (known: {})",
                    crate::policy::compile::KNOWN
                ),
            );
            continue;
        }
        if let Some(h) = &pol.headers {
            let request = header_ops(c, &format!("{pp}.headers.request"), &h.request);
            let response = header_ops(c, &format!("{pp}.headers.response"), &h.response);
            policies.push(Box::new(HeadersPolicy { request, response }));
        } else if let Some(x) =
            crate::policy::compile::compile(&pp, pol, &env, &mut |k, m| c.err(k, m))
        {
            policies.push(x);
        }
    }

    let params: Vec<String> = pattern
        .as_ref()
        .map(|pt| pt.params().into_iter().map(String::from).collect())
        .unwrap_or_default();
    let action = compile_action(
        c,
        &format!("{p}.action"),
        &r.action,
        upstreams,
        &params,
        &metrics,
    );
    let concurrency = r.concurrency.as_ref().and_then(|l| {
        let prev = shared
            .previous
            .and_then(|s| s.routes.iter().find(|x| *x.name == *r.name))
            .and_then(|x| x.concurrency.as_ref());
        crate::shed::compile_limit(
            &format!("{p}.concurrency"),
            l,
            shared.priorities,
            prev,
            &mut |k, m| c.err(k, m),
        )
    });
    let priority_class = r.priority_class.as_ref().and_then(|name| {
        let pr = shared.priorities;
        let found = pr.names.iter().position(|n| **n == **name);
        if found.is_none() || !pr.configured {
            c.err(
                format!("{p}.priority_class"),
                format!("no class is named `{name}` (see `priorities.classes`)"),
            );
        }
        found.map(|i| i as u8)
    });
    if c.errors.len() > before {
        return None;
    }
    let route = Route {
        name: r.name.as_str().into(),
        metrics,
        max_body_bytes: r.max_body_bytes.map(|s| limit(s.0)),
        policies,
        action: action?,
        concurrency,
        priority_class,
    };
    Some((route, pattern?, conds))
}

fn compile_action(
    c: &mut Compiler,
    p: &str,
    a: &model::Action,
    upstreams: &HashMap<String, Arc<Upstream>>,
    params: &[String],
    metrics: &Arc<RouteMetrics>,
) -> Option<Action> {
    let set = [
        a.proxy.is_some(),
        a.respond.is_some(),
        a.echo.is_some(),
        a.aggregate.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if set != 1 {
        c.err(
            p.to_string(),
            "give exactly one action: `proxy`, `respond`, `echo` or `aggregate`",
        );
        return None;
    }
    if let Some(ag) = &a.aggregate {
        let proxy = |name: &str| match upstreams.get(name) {
            Some(up) => Ok(call_proxy(up, metrics)),
            None => Err(unknown_upstream(name, upstreams)),
        };
        return match crate::aggregate::compile::compile(
            ag,
            &format!("{p}.aggregate"),
            params,
            &proxy,
        ) {
            Ok(a) => Some(Action::Aggregate(a)),
            Err(errs) => {
                for (path, msg) in errs {
                    c.err(path, msg);
                }
                None
            }
        };
    }
    if let Some(e) = &a.echo {
        {
            let status = status(c, format!("{p}.echo.status"), e.status)?;
            return Some(Action::Echo(Echo { status }));
        }
    }
    if let Some(r) = &a.respond {
        {
            let status = status(c, format!("{p}.respond.status"), r.status);
            let mut headers = HeaderMap::new();
            let body = match (&r.body, &r.json) {
                (Some(_), Some(_)) => {
                    c.err(
                        format!("{p}.respond"),
                        "give either `body` or `json`, not both",
                    );
                    Bytes::new()
                }
                (Some(b), None) => Bytes::from(b.clone()),
                (None, Some(j)) => {
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    Bytes::from(serde_json::to_vec(j).unwrap_or_default())
                }
                (None, None) => Bytes::new(),
            };
            for (k, v) in &r.headers {
                let n = header_name(c, format!("{p}.respond.headers.{k}"), k);
                let v = header_value(c, format!("{p}.respond.headers.{k}"), v);
                if let (Some(n), Some(v)) = (n, v) {
                    headers.insert(n, v);
                }
            }
            return Some(Action::Respond(Respond {
                status: status?,
                headers,
                body,
            }));
        }
    }
    {
        let px = a.proxy.as_ref()?;
        {
            let pp = format!("{p}.proxy");
            let Some(up) = upstreams.get(&px.upstream) else {
                let known: Vec<_> = upstreams.keys().map(String::as_str).collect();
                c.err(
                    format!("{pp}.upstream"),
                    format!(
                        "no upstream is named `{}` (defined: {})",
                        px.upstream,
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                return None;
            };
            let rewrite = px.rewrite.as_ref().and_then(|rw| {
                let n = [
                    rw.strip_prefix.is_some(),
                    rw.replace_prefix.is_some(),
                    rw.path.is_some(),
                ]
                .iter()
                .filter(|x| **x)
                .count();
                if n != 1 {
                    c.err(
                        format!("{pp}.rewrite"),
                        "give exactly one of `strip_prefix`, `replace_prefix` or `path`",
                    );
                    return None;
                }
                if let Some(s) = &rw.strip_prefix {
                    if !s.starts_with('/') {
                        c.err(format!("{pp}.rewrite.strip_prefix"), "must start with `/`");
                    }
                    return Some(Rewrite::StripPrefix(s.clone()));
                }
                if let Some(r) = &rw.replace_prefix {
                    if !r.from.starts_with('/') || !r.to.starts_with('/') {
                        c.err(
                            format!("{pp}.rewrite.replace_prefix"),
                            "`from` and `to` must start with `/`",
                        );
                    }
                    return Some(Rewrite::ReplacePrefix {
                        from: r.from.clone(),
                        to: r.to.clone(),
                    });
                }
                let t = rw.path.as_deref().unwrap_or("/");
                let names: Vec<&str> = params.iter().map(String::as_str).collect();
                if t.contains(['?', '#']) {
                    c.err(format!("{pp}.rewrite.path"), "a path template cannot contain `?` or `#` (the client's query is kept as it is)");
                    return None;
                }
                match parse_template(t, &names) {
                    Ok(pieces) => Some(Rewrite::Template(pieces)),
                    Err(e) => {
                        c.err(format!("{pp}.rewrite.path"), e);
                        None
                    }
                }
            });
            let host = match px.host_header.as_deref() {
                None | Some("target") => HostHeader::Target,
                Some("preserve") => HostHeader::Preserve,
                Some(v) => HostHeader::Fixed(header_value(c, format!("{pp}.host_header"), v)?),
            };
            let base = &up.spec.timeouts;
            let over = px.timeouts.clone().unwrap_or_default();
            let timeouts = Timeouts {
                connect: opt_dur(over.connect.or(base.connect), Some(DEFAULT_CONNECT_TIMEOUT)),
                response_header: opt_dur(
                    over.response_header.or(base.response_header),
                    Some(DEFAULT_RESPONSE_HEADER_TIMEOUT),
                ),
                request: opt_dur(over.request.or(base.request), None),
            };
            let retries = px.retries.as_ref().unwrap_or(&up.spec.retries);
            if let Some(r) = &px.retries {
                check_retries(c, &format!("{pp}.retries"), r);
                if r.budget != model::RetryBudget::default() {
                    c.err(
                        format!("{pp}.retries.budget"),
                        format!("the retry budget is shared by every route of an upstream: set it on upstream `{}` (upstreams[].retries.budget)", px.upstream),
                    );
                }
            }
            Some(Action::Proxy(ProxyAction {
                upstream: up.clone(),
                rewrite,
                host,
                timeouts,
                retry: retry_policy(retries),
                upgrades: px.upgrades,
                metrics: metrics.clone(),
            }))
        }
    }
}

/// The proxy machinery an `aggregate` call uses: the upstream's own
/// timeouts (with the proxy defaults) and retries.
fn call_proxy(up: &Arc<Upstream>, metrics: &Arc<RouteMetrics>) -> ProxyAction {
    let base = &up.spec.timeouts;
    ProxyAction {
        upstream: up.clone(),
        rewrite: None,
        host: HostHeader::Target,
        timeouts: Timeouts {
            connect: opt_dur(base.connect, Some(DEFAULT_CONNECT_TIMEOUT)),
            response_header: opt_dur(base.response_header, Some(DEFAULT_RESPONSE_HEADER_TIMEOUT)),
            request: opt_dur(base.request, None),
        },
        retry: retry_policy(&up.spec.retries),
        upgrades: false,
        metrics: metrics.clone(),
    }
}

fn unknown_upstream(name: &str, upstreams: &HashMap<String, Arc<Upstream>>) -> String {
    let mut known: Vec<_> = upstreams.keys().map(String::as_str).collect();
    known.sort_unstable();
    format!(
        "no upstream is named `{name}` (defined: {})",
        if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        }
    )
}

fn status(c: &mut Compiler, p: String, s: u16) -> Option<StatusCode> {
    match StatusCode::from_u16(s) {
        Ok(st) if (200..=599).contains(&s) => Some(st),
        _ => {
            c.err(p, format!("`{s}` is not a valid final status (200-599)"));
            None
        }
    }
}

/// Rejects pairs of routes that the precedence rules cannot order and that
/// some request could match both: same host key, same path shape, same
/// priority and condition count, conditions not provably disjoint.
fn check_ambiguity(
    c: &mut Compiler,
    cfg: &model::Config,
    routes: &[(usize, Arc<Route>, Pattern, Conditions)],
) {
    let mut groups: HashMap<(String, String, i32), Vec<usize>> = HashMap::new();
    for (k, (i, _, pattern, _)) in routes.iter().enumerate() {
        let r = &cfg.routes[*i];
        let hosts: Vec<String> = if r.matcher.hosts.is_empty() {
            vec![String::new()]
        } else {
            r.matcher
                .hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect()
        };
        for h in hosts {
            groups
                .entry((h, pattern.shape(), r.priority))
                .or_default()
                .push(k);
        }
    }
    let mut reported = HashSet::new();
    let mut keys: Vec<_> = groups.keys().cloned().collect();
    keys.sort();
    for key in keys {
        let members = &groups[&key];
        for a in 0..members.len() {
            for b in a + 1..members.len() {
                let (ia, _, _, ca) = &routes[members[a]];
                let (ib, _, _, cb) = &routes[members[b]];
                let (ra, rb) = (&cfg.routes[*ia], &cfg.routes[*ib]);
                if ca.count() != cb.count() || ca.disjoint(cb) {
                    continue;
                }
                let share_listener = ra.listeners.is_empty()
                    || rb.listeners.is_empty()
                    || ra.listeners.iter().any(|l| rb.listeners.contains(l));
                if share_listener && reported.insert((*ia, *ib)) {
                    c.err(
                        format!("routes[{ib}].match"),
                        format!(
                            "route `{}` is ambiguous with route `{}` (routes[{ia}]): same host, path and number of conditions, and a request could match both; set `priority` on one of them or make their conditions exclusive",
                            rb.name, ra.name
                        ),
                    );
                }
            }
        }
    }
}

/// Whether the upstream talks TLS to its targets.
fn has_upstream_tls(u: &model::Upstream) -> bool {
    u.tls.is_some()
}

/// The directory that relative TLS file paths are taken from: the config
/// file's.
fn tls_base(loaded: &Loaded) -> std::path::PathBuf {
    std::path::Path::new(&loaded.file)
        .parent()
        .map(|d| d.to_path_buf())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    fn errors(text: &str) -> Vec<ConfigError> {
        let loaded = parse_str("t.yaml", text, |_| None).unwrap();
        match compile(&loaded, None) {
            Ok(_) => vec![],
            Err(e) => e.0,
        }
    }

    const BASE: &str = "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{address: '127.0.0.1:1'}]\n";

    #[test]
    fn tracing_errors_name_their_key() {
        let e = |t: &str| errors(&format!("{BASE}tracing:\n{t}"));
        let one = |t: &str, path: &str, msg: &str| {
            let got = e(t);
            assert_eq!(got.len(), 1, "{t}: {got:?}");
            assert_eq!(got[0].path, path, "{t}");
            assert!(got[0].message.contains(msg), "{t}: {}", got[0].message);
        };
        let ok = "  otlp: {endpoint: 'http://127.0.0.1:4318'}\n";
        assert!(e(ok).is_empty());
        one(
            "  otlp: {endpoint: 'https://collector:4318/v1/traces'}\n",
            "tracing.otlp.endpoint",
            "https is not supported",
        );
        one(
            "  otlp: {endpoint: 'collector:4318'}\n",
            "tracing.otlp.endpoint",
            "not an `http://host:port/path` URL",
        );
        one(
            "  otlp: {endpoint: 'http://c:4318/v1/traces?k=1'}\n",
            "tracing.otlp.endpoint",
            "no query",
        );
        one(
            "  otlp: {endpoint: 'http://c:4318', headers: {'bad name': x}}\n",
            "tracing.otlp.headers.bad name",
            "not a valid header name",
        );
        one(
            "  otlp: {endpoint: 'http://c:4318', timeout: 0s}\n",
            "tracing.otlp.timeout",
            "more than 0",
        );
        one(
            &format!("{ok}  sample_ratio: 1.5\n"),
            "tracing.sample_ratio",
            "between 0.0 and 1.0",
        );
        one(
            &format!("{ok}  service_name: ' '\n"),
            "tracing.service_name",
            "must not be empty",
        );
        one(
            &format!("{ok}  batch: {{max_spans: 0}}\n"),
            "tracing.batch.max_spans",
            "at least 1",
        );
        one(
            &format!("{ok}  batch: {{max_spans: 100, queue: 10}}\n"),
            "tracing.batch.queue",
            "at least `max_spans` (100)",
        );
        one(
            &format!("{ok}  batch: {{interval: 0s}}\n"),
            "tracing.batch.interval",
            "more than 0",
        );
        // Unknown keys and a missing exporter are parse errors.
        for bad in [
            "  otlp: {endpoint: 'http://c:1'}\n  ratio: 1\n",
            "  sample_ratio: 1\n",
        ] {
            let loaded = parse_str("t.yaml", &format!("{BASE}tracing:\n{bad}"), |_| None);
            assert!(loaded.is_err(), "{bad}");
        }
        // The endpoint's defaults: port 80, path /v1/traces.
        let loaded = parse_str(
            "t.yaml",
            &format!("{BASE}tracing:\n  otlp: {{endpoint: 'http://collector'}}\n"),
            |_| None,
        )
        .unwrap();
        let snap = compile(&loaded, None).unwrap();
        let spec = &snap.tracer.as_ref().unwrap().spec;
        assert_eq!(spec.authority, "collector:80");
        assert_eq!(spec.endpoint, "http://collector:80/v1/traces");
        // A reload with the same key keeps the tracer (its queue).
        let again = compile(&loaded, Some(&snap)).unwrap();
        assert!(Arc::ptr_eq(
            snap.tracer.as_ref().unwrap(),
            again.tracer.as_ref().unwrap()
        ));
    }

    #[test]
    fn route_level_retry_budget_is_rejected() {
        let e = errors(&format!(
            "{BASE}routes:\n  - name: r\n    action:\n      proxy:\n        upstream: up\n        retries: {{attempts: 1, budget: {{ratio: 0.5}}}}\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "routes[0].action.proxy.retries.budget");
        assert!(
            e[0].message.contains("per upstream") || e[0].message.contains("shared"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn listener_names_without_control_characters() {
        for name in ["\"\"", "\"a\\u0001b\"", "\"\\tx\""] {
            let e = errors(&format!(
                "listeners:\n  - name: {name}\n    address: 127.0.0.1:0\n"
            ));
            assert!(
                e.iter().any(|e| e.path == "listeners[0].name"),
                "{name}: {e:?}"
            );
        }
    }

    #[test]
    fn zero_header_read_timeout_is_rejected() {
        let e = errors(
            "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    header_read_timeout: 0\n",
        );
        assert!(
            e.iter()
                .any(|e| e.path == "listeners[0].header_read_timeout"),
            "{e:?}"
        );
    }

    #[test]
    fn rewrite_template_with_query_is_rejected() {
        let e = errors(&format!(
            "{BASE}routes:\n  - name: r\n    match: {{path: \"/u/{{id}}\"}}\n    action:\n      proxy: {{upstream: up, rewrite: {{path: \"/x/{{id}}?a=1\"}}}}\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "routes[0].action.proxy.rewrite.path");
    }

    #[test]
    fn unnormalised_route_paths_are_rejected() {
        for (path, want) in [("/a//b", "/a/b"), ("/%7Euser", "/~user"), ("/a/../b", "/b")] {
            let e = errors(&format!(
                "{BASE}routes:\n  - name: r\n    match: {{path: \"{path}\"}}\n    action: {{proxy: {{upstream: up}}}}\n"
            ));
            assert_eq!(e.len(), 1, "{path}: {e:?}");
            assert_eq!(e[0].path, "routes[0].match.path");
            assert!(e[0].message.contains(want), "{}", e[0]);
        }
        // Templates, prefixes with a trailing slash and the root are fine.
        for m in [
            "path: \"/users/{id}/{*rest}\"",
            "path_prefix: /api/",
            "path_prefix: /",
        ] {
            assert!(errors(&format!("{BASE}routes:\n  - name: r\n    match: {{{m}}}\n    action: {{proxy: {{upstream: up}}}}\n")).is_empty(), "{m}");
        }
    }

    #[test]
    fn admin_needs_a_token_off_loopback() {
        let e = errors("listeners:\n  - name: main\n    address: 127.0.0.1:0\nadmin:\n  address: 0.0.0.0:9901\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "admin.token");
        assert_eq!(e[0].line, 4, "{}", e[0]);
        assert!(e[0].message.contains("non-loopback"), "{}", e[0]);
        let ok = |admin: &str| {
            errors(&format!(
                "listeners:\n  - name: main\n    address: 127.0.0.1:0\nadmin:\n{admin}"
            ))
        };
        assert!(ok("  address: 0.0.0.0:9901\n  token: s3cret\n").is_empty());
        assert!(ok("  address: '[::1]:9901'\n").is_empty());
        assert!(ok("  {}\n").is_empty());
        let e = ok("  address: 127.0.0.1:9901\n  token: ''\n");
        assert_eq!(e[0].path, "admin.token", "{e:?}");
        let e = ok("  address: localhost:9901\n");
        assert_eq!(e[0].path, "admin.address", "{e:?}");
    }

    #[test]
    fn route_metrics_are_carried_over_by_name() {
        let text = |name: &str| {
            format!("{BASE}routes:\n  - name: {name}\n    action: {{proxy: {{upstream: up}}}}\n  - name: other\n    match: {{path: /o}}\n    action: {{echo: {{}}}}\n")
        };
        let load =
            |t: &str, prev| compile(&parse_str("t.yaml", t, |_| None).unwrap(), prev).unwrap();
        let a = load(&text("r"), None);
        let b = load(&text("r"), Some(&a));
        assert!(Arc::ptr_eq(&a.routes[0].metrics, &b.routes[0].metrics));
        assert!(Arc::ptr_eq(&a.routes[1].metrics, &b.routes[1].metrics));
        let c = load(&text("renamed"), Some(&b));
        assert!(!Arc::ptr_eq(&b.routes[0].metrics, &c.routes[0].metrics));
        assert!(Arc::ptr_eq(&b.routes[1].metrics, &c.routes[1].metrics));
        let e = errors(&text("\"(unmatched)\""));
        assert_eq!(e[0].path, "routes[0].name", "{e:?}");
    }

    #[test]
    fn a_valid_config_compiles() {
        assert!(errors(&format!(
            "{BASE}routes:\n  - name: r\n    action: {{proxy: {{upstream: up}}}}\n"
        ))
        .is_empty());
    }
}
