//! The `access` policy: whether the caller may use the route.
//!
//! Rules, checked in this order; the first that fails decides:
//!
//! 1. `ip_deny`, then `ip_allow` (CIDRs) on `Ctx::client_ip` — the real
//!    client address, which honours the listener's `trusted_proxies`.
//!    These need no identity and may guard any route.
//! 2. The identity rules need an `Identity` from an earlier `auth` step
//!    (the compiler refuses an `access` step with identity rules that no
//!    `auth` step precedes). A request without one — an `auth` policy with
//!    `anonymous: true` let it in without credentials — is refused with
//!    `401` and the auth policy's challenge: credentials would help.
//! 3. `consumers` / `groups` (together, any of them): the identity's
//!    consumer has one of the ids or is in one of the groups.
//! 4. `scopes` (all of them) from the token's `Principal::scopes`.
//! 5. `roles` (any of them) from the claim at `roles_claim` (a name or a
//!    dot path; a string is one role, an array a list of roles).
//! 6. `claims` (all of them): the claim equals the value, or is an array
//!    that contains it.
//!
//! Refusals are `403`; only a bearer token lacking a scope gets a
//! challenge (`WWW-Authenticate: Bearer ... error="insufficient_scope"`,
//! RFC 6750 §3.1), every other 403 none. They are counted in the route's
//! auth-failure series by the identity's method.
//! Everything is compiled ahead; a request that passes costs no
//! allocation.

use super::{Ctx, Flow, Policy, Step};
use crate::auth::{AuthFailure, Identity, Method, Reason, Scheme, REALM};
use crate::body::Body;
use crate::metrics::RouteMetrics;
use crate::net::CidrSet;
use http::Request;
use std::sync::Arc;

pub struct AccessPolicy {
    pub ip_deny: CidrSet,
    pub ip_allow: CidrSet,
    /// Allowed consumer ids (any, with `groups`).
    pub consumers: Box<[Box<str>]>,
    /// Allowed consumer groups (any, with `consumers`).
    pub groups: Box<[Box<str>]>,
    /// Required scopes (all).
    pub scopes: Box<[Box<str>]>,
    /// Accepted roles (any).
    pub roles: Box<[Box<str>]>,
    pub roles_claim: Box<str>,
    /// Claim (name or dot path) → required value (all).
    pub claims: Box<[(Box<str>, serde_json::Value)]>,
    /// How a request without an identity is challenged: the scheme of the
    /// first method of the `auth` step before this one.
    pub challenge: Scheme,
    pub metrics: Arc<RouteMetrics>,
}

impl AccessPolicy {
    /// Whether any rule needs an identity (not only IP rules).
    pub fn needs_identity(&self) -> bool {
        !(self.consumers.is_empty()
            && self.groups.is_empty()
            && self.scopes.is_empty()
            && self.roles.is_empty()
            && self.claims.is_empty())
    }

    /// The first rule the request breaks, if any.
    fn check(&self, ctx: &Ctx) -> Option<AuthFailure> {
        let id = ctx.identity.as_ref();
        let method = id.map_or(Method::Anonymous, |i| i.method);
        let scheme = match method {
            Method::ApiKey => Scheme::ApiKey,
            Method::Jwt | Method::Introspection => Scheme::Bearer,
            Method::Mtls => Scheme::Certificate,
            Method::Anonymous => self.challenge,
        };
        let fail = |r| Some(AuthFailure::new(r, method, scheme));
        if self.ip_deny.contains(ctx.client_ip)
            || (!self.ip_allow.is_empty() && !self.ip_allow.contains(ctx.client_ip))
        {
            return fail(Reason::IpDenied);
        }
        if !self.needs_identity() {
            return None;
        }
        let id = match id {
            Some(id) if id.method != Method::Anonymous => id,
            _ => return fail(Reason::Missing),
        };
        let limited = !self.consumers.is_empty() || !self.groups.is_empty();
        if limited && !self.consumer_allowed(id) {
            return fail(Reason::ConsumerDenied);
        }
        let principal = id.principal.as_deref();
        if !self.scopes.is_empty()
            && !principal.is_some_and(|p| self.scopes.iter().all(|s| p.has_scope(s)))
        {
            return fail(Reason::InsufficientScope);
        }
        if !self.roles.is_empty()
            && !principal
                .and_then(|p| p.claim(&self.roles_claim))
                .is_some_and(|v| self.roles.iter().any(|r| holds(v, r)))
        {
            return fail(Reason::MissingRole);
        }
        for (name, want) in self.claims.iter() {
            let ok = principal
                .and_then(|p| p.claim(name))
                .is_some_and(|v| v == want || v.as_array().is_some_and(|a| a.contains(want)));
            if !ok {
                return fail(Reason::ClaimMismatch);
            }
        }
        None
    }

    fn consumer_allowed(&self, id: &Identity) -> bool {
        let Some(c) = &id.consumer else {
            return false;
        };
        self.consumers.iter().any(|x| **x == *c.id) || self.groups.iter().any(|g| c.in_group(g))
    }
}

/// Whether a roles claim holds `role`: a string equal to it, or an array
/// with it.
fn holds(v: &serde_json::Value, role: &str) -> bool {
    match v {
        serde_json::Value::String(s) => s == role,
        serde_json::Value::Array(a) => a.iter().any(|x| x.as_str() == Some(role)),
        _ => false,
    }
}

impl Policy for AccessPolicy {
    fn name(&self) -> &'static str {
        "access"
    }

    fn on_request<'a>(&'a self, _req: &'a mut Request<Body>, ctx: &'a mut Ctx) -> Step<'a> {
        let Some(f) = self.check(ctx) else {
            return Step::Ready(Ok(Flow::Continue));
        };
        self.metrics.auth_failure(f.method, f.reason);
        tracing::debug!(
            request_id = ?ctx.request_id,
            route = %ctx.route,
            method = f.method.as_str(),
            reason = f.reason.as_str(),
            client_ip = %ctx.client_ip,
            "access refused"
        );
        Step::Ready(Err(f.to_error(REALM)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Consumer, Principal};
    use crate::net::Cidr;
    use http::HeaderValue;

    fn policy() -> AccessPolicy {
        AccessPolicy {
            ip_deny: CidrSet::default(),
            ip_allow: CidrSet::default(),
            consumers: Box::new([]),
            groups: Box::new([]),
            scopes: Box::new([]),
            roles: Box::new([]),
            roles_claim: "roles".into(),
            claims: Box::new([]),
            challenge: Scheme::Bearer,
            metrics: Arc::new(RouteMetrics::new("r".into())),
        }
    }

    fn ctx(ip: &str, identity: Option<Identity>) -> Ctx {
        Ctx::for_test("/", ip, identity)
    }

    fn token(claims: serde_json::Value) -> Identity {
        let claims = claims.as_object().unwrap().clone();
        Identity {
            consumer: None,
            method: Method::Jwt,
            principal: Some(Arc::new(Principal {
                scopes: Principal::scopes_from(&claims),
                claims,
                ..Default::default()
            })),
        }
    }

    fn consumer(id: &str, groups: &[&str]) -> Identity {
        Identity {
            consumer: Some(Arc::new(Consumer {
                id: id.into(),
                groups: groups.iter().map(|g| Arc::from(*g)).collect(),
                plan: None,
                metadata: Default::default(),
                slot: 2,
                id_header: HeaderValue::from_static("x"),
                groups_header: None,
                plan_header: None,
            })),
            method: Method::ApiKey,
            principal: None,
        }
    }

    fn reason(p: &AccessPolicy, c: &Ctx) -> Option<Reason> {
        p.check(c).map(|f| f.reason)
    }

    #[test]
    fn ip_deny_wins_over_allow() {
        let mut p = policy();
        p.ip_allow = CidrSet(vec![Cidr::parse("10.0.0.0/8").unwrap()]);
        p.ip_deny = CidrSet(vec![Cidr::parse("10.9.0.0/16").unwrap()]);
        assert_eq!(reason(&p, &ctx("10.1.2.3", None)), None);
        assert_eq!(reason(&p, &ctx("10.9.2.3", None)), Some(Reason::IpDenied));
        assert_eq!(reason(&p, &ctx("192.0.2.1", None)), Some(Reason::IpDenied));
        assert_eq!(reason(&p, &ctx("::ffff:10.1.2.3", None)), None);
        assert!(!p.needs_identity());
    }

    #[test]
    fn consumers_and_groups_are_any_of() {
        let mut p = policy();
        p.consumers = Box::new(["app".into()]);
        p.groups = Box::new(["partners".into()]);
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(consumer("app", &[])))),
            None
        );
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(consumer("x", &["partners"])))),
            None
        );
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(consumer("x", &["other"])))),
            Some(Reason::ConsumerDenied)
        );
        // Authenticated, but naming no consumer.
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(token(serde_json::json!({}))))),
            Some(Reason::ConsumerDenied)
        );
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(Identity::anonymous()))),
            Some(Reason::Missing)
        );
        assert_eq!(reason(&p, &ctx("1.1.1.1", None)), Some(Reason::Missing));
    }

    #[test]
    fn scopes_roles_and_claims() {
        let mut p = policy();
        p.scopes = Box::new(["read".into(), "write".into()]);
        p.roles = Box::new(["admin".into(), "ops".into()]);
        p.roles_claim = "realm_access.roles".into();
        p.claims = Box::new([
            ("tenant".into(), serde_json::json!("acme")),
            ("teams".into(), serde_json::json!("blue")),
        ]);
        let good = serde_json::json!({"scope": "read write x", "realm_access": {"roles": ["ops"]},
            "tenant": "acme", "teams": ["red", "blue"]});
        assert_eq!(reason(&p, &ctx("1.1.1.1", Some(token(good.clone())))), None);
        let mut t = good.clone();
        t["scope"] = "read".into();
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(token(t)))),
            Some(Reason::InsufficientScope)
        );
        let mut t = good.clone();
        t["realm_access"]["roles"] = "admin".into();
        assert_eq!(reason(&p, &ctx("1.1.1.1", Some(token(t)))), None);
        let mut t = good.clone();
        t["realm_access"]["roles"] = serde_json::json!(["user"]);
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(token(t)))),
            Some(Reason::MissingRole)
        );
        let mut t = good.clone();
        t["tenant"] = "evil".into();
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(token(t)))),
            Some(Reason::ClaimMismatch)
        );
        let mut t = good;
        t["teams"] = serde_json::json!(["red"]);
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(token(t)))),
            Some(Reason::ClaimMismatch)
        );
        // An API key has no scopes.
        assert_eq!(
            reason(&p, &ctx("1.1.1.1", Some(consumer("app", &[])))),
            Some(Reason::InsufficientScope)
        );
    }

    #[test]
    fn refusals_are_counted_and_answered() {
        let mut p = policy();
        p.scopes = Box::new(["write".into()]);
        let mut c = ctx("1.1.1.1", Some(token(serde_json::json!({"scope": "read"}))));
        let mut req = Request::new(Body::empty());
        let Step::Ready(Err(e)) = p.on_request(&mut req, &mut c) else {
            panic!("refused at once");
        };
        assert_eq!(e.status(), 403);
        let resp = e.to_response(None);
        let ch = resp.headers()["www-authenticate"].to_str().unwrap();
        assert!(ch.contains("error=\"insufficient_scope\""), "{ch}");
        assert_eq!(
            p.metrics
                .auth_failures(Method::Jwt.index(), Reason::InsufficientScope.index()),
            1
        );
    }

    #[test]
    fn other_refusals_carry_no_challenge() {
        let mut p = policy();
        p.ip_deny = CidrSet(vec![Cidr::parse("10.0.0.0/8").unwrap()]);
        p.claims = Box::new([("tenant".into(), serde_json::json!("acme"))]);
        // `challenge` is Bearer: an anonymous caller refused by an IP rule
        // still gets no challenge, a token with the wrong claim neither.
        for c in [
            ctx("10.1.1.1", None),
            ctx("10.1.1.1", Some(Identity::anonymous())),
            ctx("1.1.1.1", Some(token(serde_json::json!({"tenant": "x"})))),
        ] {
            let mut c = c;
            let mut req = Request::new(Body::empty());
            let Step::Ready(Err(e)) = p.on_request(&mut req, &mut c) else {
                panic!("refused at once");
            };
            assert_eq!(e.status(), 403);
            assert!(e
                .to_response(None)
                .headers()
                .get("www-authenticate")
                .is_none());
        }
        // Without credentials, identity rules answer 401 with the challenge.
        let mut c = ctx("1.1.1.1", Some(Identity::anonymous()));
        let mut req = Request::new(Body::empty());
        let Step::Ready(Err(e)) = p.on_request(&mut req, &mut c) else {
            panic!("refused at once");
        };
        assert_eq!(e.status(), 401);
        assert_eq!(
            e.to_response(None).headers()["www-authenticate"],
            "Bearer realm=\"portico\""
        );
    }
}
