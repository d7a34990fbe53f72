//! Actions: what a route finally does with a request. Exactly one per route.
//!
//! - `proxy`: forward to an upstream ([`crate::proxy`]).
//! - `respond`: a fixed response (health endpoints, maintenance pages, mocks).
//! - `aggregate`: fan out to several upstream calls and answer one merged
//!   JSON document ([`crate::aggregate`]).
//! - `echo`: answer with the request as an upstream of this route would
//!   receive it (hop-by-hop headers removed, forwarded headers and
//!   `x-request-id` set): for debugging gateway config, and as a stand-in
//!   upstream in the quickstart.

use crate::body::Body;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::Ctx;
use crate::proxy::{forward, ProxyAction, X_REQUEST_ID};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;

pub enum Action {
    Proxy(ProxyAction),
    Respond(Respond),
    Echo(Echo),
    Aggregate(crate::aggregate::AggregateAction),
}

impl Action {
    pub async fn run(
        &self,
        req: Request<Body>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, GatewayError> {
        match self {
            Action::Proxy(p) => p.run(req, ctx).await,
            Action::Respond(r) => Ok(r.respond()),
            Action::Echo(e) => e.echo(req, ctx).await,
            // Boxed: it keeps this future (every proxied request's) small.
            Action::Aggregate(a) => Box::pin(a.run(req, ctx)).await,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Action::Proxy(_) => "proxy",
            Action::Respond(_) => "respond",
            Action::Echo(_) => "echo",
            Action::Aggregate(_) => "aggregate",
        }
    }
}

pub struct Respond {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Respond {
    fn respond(&self) -> Response<Body> {
        let mut resp = Response::new(Body::full(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        resp
    }
}

pub struct Echo {
    pub status: StatusCode,
}

/// Bytes of the request body included in an echo; the rest is only counted.
const ECHO_BODY_LIMIT: usize = 64 * 1024;

impl Echo {
    async fn echo(&self, req: Request<Body>, ctx: &Ctx) -> Result<Response<Body>, GatewayError> {
        let (mut parts, mut body) = req.into_parts();
        // Show the request as an upstream of this route would receive it.
        let h = &mut parts.headers;
        forward::strip_hop_by_hop(h, false);
        h.remove(http::header::EXPECT);
        forward::set_forwarded(
            h,
            &ctx.forwarded,
            ctx.peer_trusted,
            ctx.host_header.as_ref(),
        );
        h.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
        let mut kept = Vec::new();
        let mut total: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| match crate::body::BodyError::find(&*e) {
                Some(b) => GatewayError::from_body(*b),
                None => GatewayError::new(ErrorKind::BadRequest, "failed reading the request body")
                    .with_cause(e),
            })?;
            if let Ok(data) = frame.into_data() {
                total += data.len() as u64;
                let room = ECHO_BODY_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        let mut headers = serde_json::Map::new();
        for name in parts.headers.keys() {
            let values: Vec<serde_json::Value> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
                .collect();
            let v = if values.len() == 1 {
                values.into_iter().next().unwrap_or_default()
            } else {
                values.into()
            };
            headers.insert(name.as_str().to_string(), v);
        }
        let doc = serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&kept),
            "body_bytes": total,
            "client": ctx.client_ip.to_string(),
            "route": &*ctx.route,
        });
        let mut resp = Response::new(Body::full(
            serde_json::to_vec_pretty(&doc).unwrap_or_default(),
        ));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok(resp)
    }
}
