//! The `auth` policy: establishes who is calling.
//!
//! Its methods (`crate::auth::Authenticator`: API key, JWT, introspection,
//! mTLS) are tried in order; the first whose credential is in the request
//! decides — a bad credential is refused, never passed to the next method.
//! Without any credential the request is refused (`401` with one challenge
//! per scheme) unless the route allows anonymous access.
//!
//! On success it records the `Identity` in `Ctx::identity` (later policies,
//! metrics and the access log read it), sets the consumer headers (the
//! client's were removed by the service before routing; an anonymous caller
//! gets the id `anonymous`), maps claims to
//! headers (removing client-sent ones first), and strips the credentials.
//! Every refusal is counted in the route's auth-failure series.

use super::{Ctx, Flow, Policy, Step};
use crate::auth::{
    Attempt, AttemptStep, AuthFailure, Authenticator, Identity, Method, Reason, Scheme, ANONYMOUS,
    REALM,
};
use crate::body::Body;
use crate::error::GatewayError;
use crate::metrics::RouteMetrics;
use http::{header, HeaderName, HeaderValue, Request};
use std::sync::Arc;

/// Header names the gateway sets from an identity (`auth.consumer_headers`).
#[derive(Debug, Clone)]
pub struct ConsumerHeaderNames {
    pub id: HeaderName,
    pub groups: HeaderName,
    pub plan: HeaderName,
    pub method: HeaderName,
}

impl ConsumerHeaderNames {
    /// Whether `n` is one of them.
    pub fn contains(&self, n: &HeaderName) -> bool {
        [&self.id, &self.groups, &self.plan, &self.method].contains(&n)
    }

    /// Removes every one of them from a client's request.
    #[inline]
    pub fn strip(&self, h: &mut http::HeaderMap) {
        if h.is_empty() {
            return;
        }
        h.remove(&self.id);
        h.remove(&self.groups);
        h.remove(&self.plan);
        h.remove(&self.method);
    }
}

pub struct AuthPolicy {
    pub methods: Vec<Box<dyn Authenticator>>,
    pub anonymous: bool,
    pub strip_credentials: bool,
    /// Claim (name or dot path) → upstream header.
    pub claims_to_headers: Vec<(Box<str>, HeaderName)>,
    pub headers: Arc<ConsumerHeaderNames>,
    pub metrics: Arc<RouteMetrics>,
}

impl AuthPolicy {
    fn refuse(&self, f: AuthFailure, ctx: &Ctx) -> GatewayError {
        self.metrics.auth_failure(f.method, f.reason);
        tracing::debug!(
            request_id = ?ctx.request_id,
            route = %ctx.route,
            method = f.method.as_str(),
            reason = f.reason.as_str(),
            detail = f.detail.as_deref().unwrap_or(""),
            "authentication refused"
        );
        f.to_error(REALM)
    }

    /// No credential at all: anonymous, or 401 with a challenge per scheme.
    fn missing(&self, req: &mut Request<Body>, ctx: &mut Ctx) -> Result<Flow, GatewayError> {
        if self.anonymous {
            self.accept(req, ctx, Identity::anonymous());
            return Ok(Flow::Continue);
        }
        let first = self.methods.first().map_or(Method::ApiKey, |m| m.method());
        let scheme = self.methods.first().map_or(Scheme::Bearer, |m| m.scheme());
        let mut e = self.refuse(AuthFailure::new(Reason::Missing, first, scheme), ctx);
        let mut seen = vec![scheme];
        for m in &self.methods[1..] {
            let s = m.scheme();
            if seen.contains(&s) {
                continue;
            }
            seen.push(s);
            let extra = match s {
                Scheme::Bearer => format!("Bearer realm=\"{REALM}\""),
                Scheme::ApiKey => format!("ApiKey realm=\"{REALM}\""),
                Scheme::Certificate => continue,
            };
            if let Ok(v) = HeaderValue::try_from(extra) {
                e = e.with_header(header::WWW_AUTHENTICATE, v);
            }
        }
        Err(e)
    }

    fn accept(&self, req: &mut Request<Body>, ctx: &mut Ctx, id: Identity) {
        let h = req.headers_mut();
        for (_, name) in &self.claims_to_headers {
            h.remove(name);
        }
        match (&id.consumer, id.method) {
            (Some(c), _) => {
                h.insert(self.headers.id.clone(), c.id_header.clone());
                if let Some(g) = &c.groups_header {
                    h.insert(self.headers.groups.clone(), g.clone());
                }
                if let Some(p) = &c.plan_header {
                    h.insert(self.headers.plan.clone(), p.clone());
                }
            }
            // No configured consumer can be named `anonymous` (a
            // configuration error), so the upstream can tell them apart.
            (None, Method::Anonymous) => {
                h.insert(self.headers.id.clone(), HeaderValue::from_static(ANONYMOUS));
            }
            // A token naming no consumer: no consumer headers.
            (None, _) => {}
        }
        h.insert(
            self.headers.method.clone(),
            HeaderValue::from_static(id.method.as_str()),
        );
        if let Some(p) = &id.principal {
            for (claim, name) in &self.claims_to_headers {
                if let Some(v) = p.claim(claim).and_then(claim_header_value) {
                    h.insert(name.clone(), v);
                }
            }
        }
        if self.strip_credentials {
            for m in &self.methods {
                m.strip(req);
            }
        }
        ctx.identity = Some(id);
    }

    fn decide(
        &self,
        attempt: Attempt,
        req: &mut Request<Body>,
        ctx: &mut Ctx,
    ) -> Option<Result<Flow, GatewayError>> {
        match attempt {
            Attempt::Absent => None,
            Attempt::Verified(id) => {
                self.accept(req, ctx, id);
                Some(Ok(Flow::Continue))
            }
            Attempt::Refused(f) => Some(Err(self.refuse(f, ctx))),
        }
    }
}

/// A claim as a header value: strings as they are, numbers and booleans
/// printed, arrays of those joined by `,`; objects are not mapped.
fn claim_header_value(v: &serde_json::Value) -> Option<HeaderValue> {
    use serde_json::Value;
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(a) => {
            let parts: Vec<String> = a
                .iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                })
                .collect();
            parts.join(",")
        }
        _ => return None,
    };
    HeaderValue::try_from(text).ok()
}

impl Policy for AuthPolicy {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn on_request<'a>(&'a self, req: &'a mut Request<Body>, ctx: &'a mut Ctx) -> Step<'a> {
        for (i, m) in self.methods.iter().enumerate() {
            match m.authenticate(req, ctx) {
                AttemptStep::Ready(a) => {
                    if let Some(done) = self.decide(a, req, ctx) {
                        return Step::Ready(done);
                    }
                }
                AttemptStep::Wait(fut) => {
                    return Step::Wait(Box::pin(async move {
                        if let Some(done) = self.decide(fut.await, req, ctx) {
                            return done;
                        }
                        for m in &self.methods[i + 1..] {
                            let a = match m.authenticate(req, ctx) {
                                AttemptStep::Ready(a) => a,
                                AttemptStep::Wait(f) => f.await,
                            };
                            if let Some(done) = self.decide(a, req, ctx) {
                                return done;
                            }
                        }
                        self.missing(req, ctx)
                    }));
                }
            }
        }
        Step::Ready(self.missing(req, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_become_header_values() {
        let v: serde_json::Value = serde_json::json!(["a", 1, true, {"x": 1}]);
        assert_eq!(claim_header_value(&v).unwrap(), "a,1,true");
        assert_eq!(
            claim_header_value(&serde_json::json!("user-1")).unwrap(),
            "user-1"
        );
        assert!(claim_header_value(&serde_json::json!({"a": 1})).is_none());
        assert!(claim_header_value(&serde_json::json!("bad\nvalue")).is_none());
    }
}
