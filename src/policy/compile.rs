//! Compiles one policy step of a route (or of its route group) from the
//! configuration: what `snapshot::compile` calls for every key of
//! `config::model::Policy` except `headers`. Each policy's own checks and
//! construction live next to it; this file only dispatches and hands every
//! policy the shared compiled state it may need ([`Env`]).

use super::access::AccessPolicy;
use super::auth::{AuthPolicy, ConsumerHeaderNames};
use super::Policy;
use crate::auth::apikey::{ApiKeyAuth, MtlsAuth};
use crate::auth::credential::Source;
use crate::auth::introspect::{IntrospectionAuth, IntrospectionServer};
use crate::auth::jwt::JwtAuth;
use crate::auth::{Authenticator, Consumers, Scheme};
use crate::config::model;
use crate::metrics::RouteMetrics;
use crate::net::{Cidr, CidrSet};
use http::HeaderName;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a policy may be compiled against.
pub struct Env<'a> {
    pub consumers: &'a Arc<Consumers>,
    pub consumer_headers: &'a Arc<ConsumerHeaderNames>,
    /// The route's series (auth failures are counted there).
    pub metrics: &'a Arc<RouteMetrics>,
    /// Directory of the configuration file: relative paths start here.
    pub base: &'a Path,
    /// `auth.introspection` servers by name (`None`: declared, but it did
    /// not compile — its error is already reported).
    pub introspection: &'a HashMap<String, Option<Arc<IntrospectionServer>>>,
    /// The last `auth` step before this one in the route's chain (group
    /// steps first), if any: what an `access` step can rely on.
    pub auth_before: Option<&'a model::AuthPolicy>,
    /// `auth.jwt_issuers`, compiled once per snapshot.
    pub jwt_issuers: &'a crate::auth::jwt::Issuers,
    /// What one compile shares between routes.
    pub cache: &'a Cache,
    /// Rate limiting's shared state (plans, counters, Redis).
    pub limiting: &'a Arc<crate::ratelimit::Limiting>,
    /// The route's name, and its group's (limit ids are scoped by them).
    pub route: &'a str,
    pub group: Option<&'a str>,
}

/// Files compiled once per snapshot however many routes (or route groups)
/// name them: OpenAPI documents by canonical path, with the error a broken
/// one gave (reported again at each key that names it).
#[derive(Default)]
pub struct Cache {
    pub openapi: RefCell<HashMap<PathBuf, Result<Arc<super::openapi::Document>, String>>>,
}

/// Reports a problem at a key path.
pub type Err<'e> = &'e mut dyn FnMut(String, String);

/// Compiles the one policy `pol` names (the caller checked there is
/// exactly one and handled `headers`). `p` is the step's key path.
pub fn compile(p: &str, pol: &model::Policy, env: &Env, err: Err) -> Option<Box<dyn Policy>> {
    if let Some(a) = &pol.auth {
        return auth(&format!("{p}.auth"), a, env, err).map(|x| Box::new(x) as Box<dyn Policy>);
    }
    if let Some(a) = &pol.access {
        return access(&format!("{p}.access"), a, env, err).map(|x| Box::new(x) as Box<dyn Policy>);
    }
    if let Some(r) = &pol.rate_limit {
        return rate_limit(&format!("{p}.rate_limit"), p, r, env, err)
            .map(|x| Box::new(x) as Box<dyn Policy>);
    }
    if let Some(c) = &pol.cors {
        return super::cors::compile(&format!("{p}.cors"), c, err)
            .map(|x| Box::new(x) as Box<dyn Policy>);
    }
    if let Some(v) = &pol.validate {
        return super::validate::compile(&format!("{p}.validate"), v, env, err)
            .map(|x| Box::new(x) as Box<dyn Policy>);
    }
    if let Some(o) = &pol.openapi {
        return super::openapi::compile(&format!("{p}.openapi"), o, env, err)
            .map(|x| Box::new(x) as Box<dyn Policy>);
    }
    None
}

/// The names of the policies a step may hold, for "exactly one" errors.
pub const KNOWN: &str = "headers, auth, access, cors, validate, openapi, rate_limit";

/// How many policies a step names.
pub fn count(pol: &model::Policy) -> usize {
    [
        pol.headers.is_some(),
        pol.auth.is_some(),
        pol.access.is_some(),
        pol.cors.is_some(),
        pol.validate.is_some(),
        pol.openapi.is_some(),
        pol.rate_limit.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count()
}

fn auth(p: &str, a: &model::AuthPolicy, env: &Env, err: Err) -> Option<AuthPolicy> {
    let mut failed = false;
    let mut e = |k: String, m: String| {
        failed = true;
        err(k, m)
    };
    if a.methods.is_empty() {
        e(
            format!("{p}.methods"),
            "list at least one method (api_key, jwt, introspection, mtls)".into(),
        );
    }
    let mut methods: Vec<Box<dyn Authenticator>> = Vec::new();
    let mut kinds = Vec::new();
    // A method whose shared state failed to compile (reported there).
    let mut failed_method = false;
    for (i, m) in a.methods.iter().enumerate() {
        let mp = format!("{p}.methods[{i}]");
        let set = [
            m.api_key.is_some(),
            m.jwt.is_some(),
            m.introspection.is_some(),
            m.mtls.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            e(
                mp,
                "a method names exactly one of `api_key`, `jwt`, `introspection`, `mtls`".into(),
            );
            continue;
        }
        if let Some(k) = &m.api_key {
            let mut sources = Vec::new();
            if let Some(h) = &k.header {
                match HeaderName::try_from(h.as_str()) {
                    Ok(n) => sources.push(Source::Header(n)),
                    Err(_) => e(
                        format!("{mp}.api_key.header"),
                        format!("`{h}` is not a valid header name"),
                    ),
                }
            }
            if let Some(q) = &k.query {
                if q.is_empty() {
                    e(format!("{mp}.api_key.query"), "must not be empty".into());
                } else {
                    sources.push(Source::Query(q.as_str().into()));
                }
            }
            if sources.is_empty() {
                e(
                    format!("{mp}.api_key"),
                    "give a `header` or a `query` parameter to read the key from".into(),
                );
            }
            if env.consumers.is_empty() {
                e(
                    format!("{mp}.api_key"),
                    "no consumers are configured, so no key can match".into(),
                );
            }
            kinds.push("api_key");
            methods.push(Box::new(ApiKeyAuth {
                sources,
                consumers: env.consumers.clone(),
            }));
        } else if m.mtls.is_some() {
            kinds.push("mtls");
            methods.push(Box::new(MtlsAuth {
                consumers: env.consumers.clone(),
            }));
        } else if let Some(j) = &m.jwt {
            let opaque_absent = a.methods.iter().any(|o| {
                o.introspection.as_ref().is_some_and(|x| {
                    same_source(
                        (&x.header, &x.cookie, &x.query),
                        (&j.header, &j.cookie, &j.query),
                    )
                })
            });
            kinds.push("jwt");
            if let Some(x) = jwt(&format!("{mp}.jwt"), j, opaque_absent, env, &mut e) {
                methods.push(Box::new(x));
            }
        } else if let Some(im) = &m.introspection {
            let source = Source::from_keys(
                im.header.as_deref(),
                im.cookie.as_deref(),
                im.query.as_deref(),
            );
            let source = match source {
                Ok(s) => Some(s),
                Err(m) => {
                    e(format!("{mp}.introspection"), m);
                    None
                }
            };
            let server = match env.introspection.get(&im.server) {
                Some(s) => s.clone(),
                None => {
                    let mut known: Vec<&str> =
                        env.introspection.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    e(
                        format!("{mp}.introspection.server"),
                        format!(
                            "no `auth.introspection` server is named `{}` (known: {})",
                            im.server,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                    None
                }
            };
            kinds.push("introspection");
            if let (Some(server), Some(source)) = (server, source) {
                methods.push(Box::new(IntrospectionAuth {
                    server,
                    source,
                    consumers: env.consumers.clone(),
                }));
            } else {
                failed_method = true;
            }
        }
    }
    for (i, k) in kinds.iter().enumerate() {
        if kinds[..i].contains(k) {
            e(
                format!("{p}.methods[{i}]"),
                format!("`{k}` is listed twice"),
            );
        }
    }
    let mut claims_to_headers = Vec::new();
    for (claim, header) in &a.claims_to_headers {
        match HeaderName::try_from(header.as_str()) {
            Ok(n) if is_reserved(&n) => e(
                format!("{p}.claims_to_headers.{claim}"),
                format!("`{header}` is a header the gateway manages"),
            ),
            Ok(n) if env.consumer_headers.contains(&n) => e(
                format!("{p}.claims_to_headers.{claim}"),
                format!("`{header}` is one of `auth.consumer_headers`, which the gateway sets"),
            ),
            Ok(n) => claims_to_headers.push((Box::from(claim.as_str()), n)),
            Err(_) => e(
                format!("{p}.claims_to_headers.{claim}"),
                format!("`{header}` is not a valid header name"),
            ),
        }
    }
    if failed || failed_method {
        return None;
    }
    Some(AuthPolicy {
        methods,
        anonymous: a.anonymous,
        strip_credentials: a.strip_credentials,
        claims_to_headers,
        headers: env.consumer_headers.clone(),
        metrics: env.metrics.clone(),
    })
}

/// The scheme a method challenges with (for an `access` step's `401`).
fn method_scheme(m: &model::AuthMethod) -> Scheme {
    if m.api_key.is_some() {
        Scheme::ApiKey
    } else if m.mtls.is_some() {
        Scheme::Certificate
    } else {
        Scheme::Bearer
    }
}

fn access(p: &str, a: &model::AccessPolicy, env: &Env, err: Err) -> Option<AccessPolicy> {
    let mut failed = false;
    let mut e = |k: String, m: String| {
        failed = true;
        err(k, m)
    };
    let mut cidrs = |key: &str, list: &[String]| {
        let mut out = Vec::new();
        for (i, c) in list.iter().enumerate() {
            match Cidr::parse(c) {
                Ok(c) => out.push(c),
                Err(m) => e(format!("{p}.{key}[{i}]"), m),
            }
        }
        CidrSet(out)
    };
    let ip_allow = cidrs("ip_allow", &a.ip_allow);
    let ip_deny = cidrs("ip_deny", &a.ip_deny);
    for (i, id) in a.consumers.iter().enumerate() {
        if env.consumers.get(id).is_none() {
            e(
                format!("{p}.consumers[{i}]"),
                format!("no consumer has the id `{id}`"),
            );
        }
    }
    for (i, g) in a.groups.iter().enumerate() {
        if !env.consumers.list.iter().any(|c| c.in_group(g)) {
            e(
                format!("{p}.groups[{i}]"),
                format!("no consumer is in group `{g}`"),
            );
        }
    }
    let mut names = |key: &str, list: &[String]| -> Box<[Box<str>]> {
        for (i, s) in list.iter().enumerate() {
            if s.is_empty() {
                e(format!("{p}.{key}[{i}]"), "must not be empty".into());
            }
        }
        list.iter().map(|s| Box::from(s.as_str())).collect()
    };
    let consumers = names("consumers", &a.consumers);
    let groups = names("groups", &a.groups);
    let scopes = names("scopes", &a.scopes);
    let roles = names("roles", &a.roles);
    if a.roles_claim.is_empty() {
        e(format!("{p}.roles_claim"), "must not be empty".into());
    }
    let mut claims = Vec::new();
    for (name, v) in &a.claims {
        let ok = matches!(
            v,
            serde_json::Value::String(_)
                | serde_json::Value::Number(_)
                | serde_json::Value::Bool(_)
        );
        if name.is_empty() {
            e(
                format!("{p}.claims"),
                "a claim name must not be empty".into(),
            );
        } else if !ok {
            e(
                format!("{p}.claims.{name}"),
                "must be a string, a number or a boolean".into(),
            );
        } else {
            claims.push((Box::from(name.as_str()), v.clone()));
        }
    }
    let policy = AccessPolicy {
        ip_deny,
        ip_allow,
        consumers,
        groups,
        scopes,
        roles,
        roles_claim: a.roles_claim.as_str().into(),
        claims: claims.into_boxed_slice(),
        challenge: env
            .auth_before
            .and_then(|x| x.methods.first())
            .map_or(Scheme::Bearer, method_scheme),
        metrics: env.metrics.clone(),
    };
    if policy.ip_allow.is_empty() && policy.ip_deny.is_empty() && !policy.needs_identity() {
        e(
            p.to_string(),
            "names no rule (give consumers, groups, scopes, roles, claims, ip_allow or ip_deny)"
                .into(),
        );
    }
    if policy.needs_identity() && env.auth_before.is_none() {
        e(
            p.to_string(),
            "its consumers, groups, scopes, roles or claims rules need an identity, but no `auth` step runs before it (put an `auth` step first, in the route or its group; `ip_allow`/`ip_deny` alone need none)".into(),
        );
    }
    if failed {
        return None;
    }
    Some(policy)
}

/// A `jwt` method: its issuers (by name) and where the token is read.
fn jwt(
    p: &str,
    j: &model::JwtMethod,
    opaque_absent: bool,
    env: &Env,
    e: &mut dyn FnMut(String, String),
) -> Option<JwtAuth> {
    let mut failed = false;
    let source =
        match Source::from_keys(j.header.as_deref(), j.cookie.as_deref(), j.query.as_deref()) {
            Ok(s) => Some(s),
            Err(m) => {
                e(p.to_string(), m);
                None
            }
        };
    if j.issuers.is_empty() {
        e(
            format!("{p}.issuers"),
            "list at least one name of `auth.jwt_issuers`".into(),
        );
        failed = true;
    }
    let mut issuers = Vec::new();
    for (k, name) in j.issuers.iter().enumerate() {
        match env.jwt_issuers.get(name) {
            Some(i) if issuers.iter().any(|x| Arc::ptr_eq(x, i)) => {
                e(
                    format!("{p}.issuers[{k}]"),
                    format!("`{name}` is listed twice"),
                );
                failed = true;
            }
            Some(i) => issuers.push(i.clone()),
            None => {
                e(
                    format!("{p}.issuers[{k}]"),
                    format!("no `auth.jwt_issuers` entry is named `{name}`"),
                );
                failed = true;
            }
        }
    }
    for (a, x) in issuers.iter().enumerate() {
        if issuers[..a].iter().any(|y| y.iss == x.iss) {
            e(
                format!("{p}.issuers"),
                format!(
                    "issuers `{}` and another listed here expect the same `iss` ({}); list one",
                    x.name, x.iss
                ),
            );
            failed = true;
        }
    }
    let source = source?;
    if failed {
        return None;
    }
    Some(JwtAuth::new(
        source,
        issuers,
        env.consumers.clone(),
        opaque_absent,
    ))
}

/// Whether two methods read their token from the same place.
fn same_source(
    a: (&Option<String>, &Option<String>, &Option<String>),
    b: (&Option<String>, &Option<String>, &Option<String>),
) -> bool {
    let norm = |(h, c, q): (&Option<String>, &Option<String>, &Option<String>)| {
        (
            h.as_deref()
                .map(str::to_ascii_lowercase)
                .filter(|h| h != "authorization"),
            c.clone(),
            q.clone(),
        )
    };
    norm(a) == norm(b)
}

fn rate_limit(
    p: &str,
    step: &str,
    r: &model::RateLimitPolicy,
    env: &Env,
    err: Err,
) -> Option<super::ratelimit::RateLimitPolicy> {
    let mut failed = false;
    let mut e = |k: String, m: String| {
        failed = true;
        err(k, m)
    };
    let key = match &r.key {
        Some(k) => crate::ratelimit::parse_key(&format!("{p}.key"), k, &mut e),
        None => Some(Box::from([crate::ratelimit::KeyPart::ClientIp])),
    };
    if r.cost == 0 {
        e(format!("{p}.cost"), "must be at least 1".into());
    }
    if r.limits.is_empty() && !r.plans {
        e(
            format!("{p}.limits"),
            "list at least one limit (or keep `plans`)".into(),
        );
    }
    let key = key?;
    // Limits defined in a route group are shared by its routes.
    let scope = match env.group {
        Some(g) if step.starts_with("route_groups") => format!("group:{g}"),
        _ => format!("route:{}", env.route),
    };
    let limits = crate::ratelimit::compile_list(
        &format!("{p}.limits"),
        &scope,
        &r.limits,
        &key,
        &env.limiting.defaults,
        &mut e,
    );
    if failed {
        return None;
    }
    Some(super::ratelimit::RateLimitPolicy {
        missing_skip: r.missing_key == model::MissingKey::Skip,
        cost: r.cost,
        limits,
        plans: r.plans,
        headers: r.headers,
        legacy_headers: r.legacy_headers,
        limiting: env.limiting.clone(),
        metrics: env.metrics.clone(),
    })
}

/// Headers a claim may not be mapped to (hop-by-hop, framing, host).
fn is_reserved(n: &HeaderName) -> bool {
    use http::header::*;
    [
        HOST,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        CONNECTION,
        UPGRADE,
        TE,
        AUTHORIZATION,
        COOKIE,
    ]
    .contains(n)
}

/// `auth.consumer_headers`. The names are removed from every client
/// request before routing, so one that the gateway or a credential needs
/// (`authorization`, `host`, ...) is refused, and so is a name given to two
/// of them (one value would overwrite the other).
pub fn consumer_headers(h: &model::ConsumerHeaders, err: Err) -> ConsumerHeaderNames {
    let mut seen: Vec<(HeaderName, &str)> = Vec::with_capacity(4);
    let mut name = |key: &'static str, v: &str, dflt: &'static str| {
        let n = match HeaderName::try_from(v) {
            Ok(n) => n,
            Err(_) => {
                err(
                    format!("auth.consumer_headers.{key}"),
                    format!("`{v}` is not a valid header name"),
                );
                return HeaderName::from_static(dflt);
            }
        };
        if is_reserved(&n) {
            err(
                format!("auth.consumer_headers.{key}"),
                format!("`{v}` is a header the gateway manages (it would be removed from every request)"),
            );
        } else if let Some((_, other)) = seen.iter().find(|(s, _)| *s == n) {
            err(
                format!("auth.consumer_headers.{key}"),
                format!("`{v}` is already the name of `auth.consumer_headers.{other}`"),
            );
        }
        seen.push((n.clone(), key));
        n
    };
    ConsumerHeaderNames {
        id: name("id", &h.id, "x-consumer-id"),
        groups: name("groups", &h.groups, "x-consumer-groups"),
        plan: name("plan", &h.plan, "x-consumer-plan"),
        method: name("method", &h.method, "x-auth-method"),
    }
}
