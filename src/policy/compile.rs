//! Compiles one policy step of a route (or of its route group) from the
//! configuration: what `snapshot::compile` calls for every key of
//! `config::model::Policy` except `headers`. Each policy's own checks and
//! construction live next to it; this file only dispatches and hands every
//! policy the shared compiled state it may need ([`Env`]).

use super::auth::{AuthPolicy, ConsumerHeaderNames};
use super::Policy;
use crate::auth::apikey::{ApiKeyAuth, MtlsAuth};
use crate::auth::credential::Source;
use crate::auth::{Authenticator, Consumers};
use crate::config::model;
use crate::metrics::RouteMetrics;
use http::HeaderName;
use std::path::Path;
use std::sync::Arc;

/// What a policy may be compiled against.
pub struct Env<'a> {
    pub consumers: &'a Arc<Consumers>,
    pub consumer_headers: &'a Arc<ConsumerHeaderNames>,
    /// The route's series (auth failures are counted there).
    pub metrics: &'a Arc<RouteMetrics>,
    /// Directory of the configuration file: relative paths start here.
    pub base: &'a Path,
    /// Rate limiting's shared state (plans, counters, Redis).
    pub limiting: &'a Arc<crate::ratelimit::Limiting>,
    /// The route's name, and its group's (limit ids are scoped by them).
    pub route: &'a str,
    pub group: Option<&'a str>,
}

/// Reports a problem at a key path.
pub type Err<'e> = &'e mut dyn FnMut(String, String);

/// Compiles the one policy `pol` names (the caller checked there is
/// exactly one and handled `headers`). `p` is the step's key path.
pub fn compile(p: &str, pol: &model::Policy, env: &Env, err: Err) -> Option<Box<dyn Policy>> {
    if let Some(a) = &pol.auth {
        return auth(&format!("{p}.auth"), a, env, err).map(|x| Box::new(x) as Box<dyn Policy>);
    }
    if let Some(r) = &pol.rate_limit {
        return rate_limit(&format!("{p}.rate_limit"), p, r, env, err)
            .map(|x| Box::new(x) as Box<dyn Policy>);
    }
    if pol.access.is_some() {
        err(format!("{p}.access"), "not available in this build".into());
    }
    if pol.cors.is_some() {
        err(format!("{p}.cors"), "not available in this build".into());
    }
    if pol.validate.is_some() {
        err(
            format!("{p}.validate"),
            "not available in this build".into(),
        );
    }
    if pol.openapi.is_some() {
        err(format!("{p}.openapi"), "not available in this build".into());
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
        } else if m.jwt.is_some() {
            e(format!("{mp}.jwt"), "not available in this build".into());
        } else if m.introspection.is_some() {
            e(
                format!("{mp}.introspection"),
                "not available in this build".into(),
            );
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
            Ok(n) => claims_to_headers.push((Box::from(claim.as_str()), n)),
            Err(_) => e(
                format!("{p}.claims_to_headers.{claim}"),
                format!("`{header}` is not a valid header name"),
            ),
        }
    }
    if failed {
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
        key,
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

/// `auth.consumer_headers`.
pub fn consumer_headers(h: &model::ConsumerHeaders, err: Err) -> ConsumerHeaderNames {
    let mut name = |key: &str, v: &str, dflt: &'static str| {
        HeaderName::try_from(v).unwrap_or_else(|_| {
            err(
                format!("auth.consumer_headers.{key}"),
                format!("`{v}` is not a valid header name"),
            );
            HeaderName::from_static(dflt)
        })
    };
    ConsumerHeaderNames {
        id: name("id", &h.id, "x-consumer-id"),
        groups: name("groups", &h.groups, "x-consumer-groups"),
        plan: name("plan", &h.plan, "x-consumer-plan"),
        method: name("method", &h.method, "x-auth-method"),
    }
}
