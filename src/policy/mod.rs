//! Policies: the steps of a route before its action (auth, limits, CORS,
//! validation, transforms). Each is a small unit behind one trait.
//!
//! A route runs its policies' `on_request` in order; any may answer the
//! request itself ([`Flow::Respond`]) or fail it ([`GatewayError`]). After the
//! action (or the policy that answered), `on_response` runs in reverse order
//! on the response, gateway-made errors included.
//!
//! Synchronous policies return [`Step::Ready`] and cost no allocation;
//! policies that must wait (a key fetch, a Redis call) return a boxed future.

pub mod access;
pub mod auth;
pub mod compile;
pub mod cors;
pub mod headers;
pub mod openapi;
pub mod ratelimit;
pub mod validate;

use crate::body::Body;
use crate::error::GatewayError;
use crate::router::path::Captures;
use http::{HeaderValue, Request, Response};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

/// What the gateway knows about the request beyond the HTTP message.
pub struct Ctx {
    /// `x-request-id`, from the client or generated.
    pub request_id: HeaderValue,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The real client address (the peer, or from forwarded headers when the
    /// peer is a trusted proxy).
    pub client_ip: IpAddr,
    /// Whether the peer is a trusted proxy (its forwarded headers are kept).
    pub peer_trusted: bool,
    /// Whether the client connection uses TLS.
    pub tls: bool,
    /// The connection's prebuilt forwarded-header values.
    pub forwarded: Arc<crate::proxy::forward::ConnForwarded>,
    pub listener: Arc<str>,
    pub route: Arc<str>,
    /// Captured path params (spans of `original_uri`'s path).
    pub captures: Captures,
    /// The URI as the client sent it, with its path normalised
    /// (`normalize`); captures index into that path.
    pub original_uri: http::Uri,
    /// The client's Host header, for forwarded headers.
    pub host_header: Option<HeaderValue>,
    /// The last upstream attempt (the `proxy` action), for the access log.
    pub upstream: Option<crate::outcome::Attempt>,
    /// The request's trace, when `tracing` is configured.
    pub trace: Option<crate::trace::TraceCtx>,
    /// Who is calling, once an `auth` policy ran.
    pub identity: Option<crate::auth::Identity>,
    /// The connection's verified client certificate (TLS `client_auth`).
    pub client_cert: Option<Arc<crate::tls::ClientIdentity>>,
    /// What a `cors` policy decided, for its `on_response`.
    pub cors: Option<cors::Seen>,
    /// The request's priority class (`crate::shed`), set after the
    /// policies ran; 0 without `priorities`.
    pub priority: u8,
    /// That class's share of a concurrency limit (1.0 without `priorities`).
    pub priority_share: f32,
    /// A slot of the upstream's adaptive concurrency limit, taken by the
    /// `proxy` action; moved into the `Outcome` to last as long as the
    /// response body.
    pub upstream_slot: Option<crate::upstream::adaptive::Permit>,
    /// What each `rate_limit` policy decided, for its `on_response`
    /// (empty, unallocated, on routes without one).
    pub rate_limits: Vec<crate::policy::ratelimit::Verdict>,
}

impl Ctx {
    /// A context for unit tests: a plain-HTTP request from 127.0.0.1 to
    /// `uri` on route `r`, with `identity`.
    #[cfg(test)]
    pub fn for_test(uri: &str, client_ip: &str, identity: Option<crate::auth::Identity>) -> Ctx {
        let ip: IpAddr = client_ip.parse().expect("an IP address");
        Ctx {
            request_id: HeaderValue::from_static("req-1"),
            peer: SocketAddr::new(ip, 1000),
            client_ip: ip,
            peer_trusted: false,
            tls: false,
            forwarded: Arc::new(crate::proxy::forward::ConnForwarded::new(ip, false)),
            listener: "main".into(),
            route: "r".into(),
            captures: Default::default(),
            original_uri: uri.parse().expect("a URI"),
            host_header: None,
            upstream: None,
            trace: None,
            identity,
            client_cert: None,
            cors: None,
            priority: 0,
            priority_share: 1.0,
            upstream_slot: None,
            rate_limits: Vec::new(),
        }
    }

    /// The value of the `i`-th captured path param.
    pub fn param(&self, i: usize) -> Option<&str> {
        self.captures.get(self.original_uri.path(), i)
    }
}

pub enum Flow {
    Continue,
    /// Boxed: a policy answering is the rare path.
    Respond(Box<Response<Body>>),
}

pub type PolicyFuture<'a> = Pin<Box<dyn Future<Output = Result<Flow, GatewayError>> + Send + 'a>>;

pub enum Step<'a> {
    Ready(Result<Flow, GatewayError>),
    Wait(PolicyFuture<'a>),
}

impl Step<'_> {
    pub async fn resolve(self) -> Result<Flow, GatewayError> {
        match self {
            Step::Ready(r) => r,
            Step::Wait(f) => f.await,
        }
    }
}

pub trait Policy: Send + Sync + 'static {
    /// Short name for logs and metrics (`headers`, `jwt`, ...).
    fn name(&self) -> &'static str;

    fn on_request<'a>(&'a self, req: &'a mut Request<Body>, ctx: &'a mut Ctx) -> Step<'a>;

    fn on_response(&self, _resp: &mut Response<Body>, _ctx: &Ctx) {}
}
