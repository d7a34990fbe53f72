//! The one error type of the request path.
//!
//! Every failure that ends a request as a gateway-made response is a
//! [`GatewayError`]. Its [`ErrorKind`] knows the HTTP status, the stable
//! machine-readable `code` in the JSON body (also the metric label), which
//! side caused it ([`ErrorSource`]) and whether a retry may help.

use crate::body::Body;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use std::borrow::Cow;
use std::fmt;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The request was malformed, unauthorised, or matched nothing.
    Client,
    /// A target failed to connect, answer or answer in time.
    Upstream,
    /// The gateway itself decided (no healthy target, overload, internal fault).
    Gateway,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Client => "client",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Gateway => "gateway",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route matches the request.
    RouteNotFound,
    /// The request is malformed.
    BadRequest,
    /// The request body is larger than allowed.
    PayloadTooLarge,
    /// The request target is longer than allowed.
    UriTooLong,
    /// The client was too slow sending its request.
    RequestTimeout,
    /// Connecting to the target failed (refused, unreachable, connect timeout).
    UpstreamUnreachable,
    /// The target closed or broke the exchange, or answered with invalid HTTP.
    UpstreamProtocol,
    /// The target did not answer in time.
    UpstreamTimeout,
    /// Every target of the upstream is unhealthy or ejected, or none resolved.
    NoHealthyTarget,
    /// A fault inside the gateway.
    Internal,
    /// The request lacks valid credentials (admin API: bearer token).
    Unauthorized,
    /// The path exists but not for this method.
    MethodNotAllowed,
    /// A configuration submitted for reload does not validate.
    InvalidConfig,
    /// The caller is known but not allowed (consumer, group, scope, role,
    /// claim, client address, CORS origin).
    Forbidden,
    /// A credential could not be checked because the service that checks it
    /// (token introspection, the JWKS URL) is unavailable. Never "allow".
    AuthUnavailable,
    /// The request does not satisfy the route's validation (JSON Schema,
    /// OpenAPI parameters); the details list each failing location.
    ValidationFailed,
    /// The request body's media type is not accepted by the route.
    UnsupportedMediaType,
    /// A concurrency limit (gateway, route or adaptive upstream limit) is
    /// full and its wait queue too, or the wait timed out; the request was
    /// shed. Answered with `Retry-After`.
    Overloaded,
    /// The upstream's circuit breaker is open: the gateway does not try it
    /// until it has had time to recover. Answered with `Retry-After`.
    CircuitOpen,
    /// A rate limit, quota or concurrency limit refused the request.
    RateLimited,
    /// A limit kept in Redis could not be checked and is configured to
    /// fail closed.
    LimiterUnavailable,
}

impl ErrorKind {
    /// Every kind, in declaration order (`ALL[k.index()] == k`): metric
    /// counters are arrays indexed by kind.
    pub const ALL: [ErrorKind; 21] = [
        ErrorKind::RouteNotFound,
        ErrorKind::BadRequest,
        ErrorKind::PayloadTooLarge,
        ErrorKind::UriTooLong,
        ErrorKind::RequestTimeout,
        ErrorKind::UpstreamUnreachable,
        ErrorKind::UpstreamProtocol,
        ErrorKind::UpstreamTimeout,
        ErrorKind::NoHealthyTarget,
        ErrorKind::Internal,
        ErrorKind::Unauthorized,
        ErrorKind::MethodNotAllowed,
        ErrorKind::InvalidConfig,
        ErrorKind::Forbidden,
        ErrorKind::AuthUnavailable,
        ErrorKind::ValidationFailed,
        ErrorKind::UnsupportedMediaType,
        ErrorKind::Overloaded,
        ErrorKind::CircuitOpen,
        ErrorKind::RateLimited,
        ErrorKind::LimiterUnavailable,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// Position in [`ErrorKind::ALL`].
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::RouteNotFound => StatusCode::NOT_FOUND,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::UpstreamUnreachable | ErrorKind::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::NoHealthyTarget => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::InvalidConfig => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ValidationFailed => StatusCode::BAD_REQUEST,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::Overloaded | ErrorKind::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::LimiterUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable code for the JSON body, logs and metric labels.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::RouteNotFound => "route_not_found",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UriTooLong => "uri_too_long",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::UpstreamUnreachable => "upstream_unreachable",
            ErrorKind::UpstreamProtocol => "upstream_protocol_error",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::NoHealthyTarget => "no_healthy_target",
            ErrorKind::Internal => "internal_error",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::AuthUnavailable => "auth_unavailable",
            ErrorKind::ValidationFailed => "validation_failed",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::LimiterUnavailable => "limiter_unavailable",
        }
    }

    pub fn source(self) -> ErrorSource {
        match self {
            ErrorKind::RouteNotFound
            | ErrorKind::BadRequest
            | ErrorKind::PayloadTooLarge
            | ErrorKind::UriTooLong
            | ErrorKind::RequestTimeout
            | ErrorKind::Unauthorized
            | ErrorKind::MethodNotAllowed
            | ErrorKind::InvalidConfig
            | ErrorKind::Forbidden
            | ErrorKind::ValidationFailed
            | ErrorKind::UnsupportedMediaType
            | ErrorKind::RateLimited => ErrorSource::Client,
            ErrorKind::UpstreamUnreachable
            | ErrorKind::UpstreamProtocol
            | ErrorKind::UpstreamTimeout => ErrorSource::Upstream,
            ErrorKind::NoHealthyTarget
            | ErrorKind::Internal
            | ErrorKind::AuthUnavailable
            | ErrorKind::Overloaded
            | ErrorKind::CircuitOpen
            | ErrorKind::LimiterUnavailable => ErrorSource::Gateway,
        }
    }

    /// The gRPC status code used when the request was a gRPC call.
    pub fn grpc_status(self) -> u8 {
        match self {
            ErrorKind::RouteNotFound => 12,                     // UNIMPLEMENTED
            ErrorKind::BadRequest | ErrorKind::UriTooLong => 3, // INVALID_ARGUMENT
            ErrorKind::PayloadTooLarge => 8,                    // RESOURCE_EXHAUSTED
            ErrorKind::RequestTimeout | ErrorKind::UpstreamTimeout => 4, // DEADLINE_EXCEEDED
            ErrorKind::UpstreamUnreachable
            | ErrorKind::UpstreamProtocol
            | ErrorKind::NoHealthyTarget => 14, // UNAVAILABLE
            ErrorKind::Internal => 13,                          // INTERNAL
            ErrorKind::Unauthorized => 16,                      // UNAUTHENTICATED
            ErrorKind::MethodNotAllowed => 12,                  // UNIMPLEMENTED
            ErrorKind::InvalidConfig => 3,                      // INVALID_ARGUMENT
            ErrorKind::Forbidden => 7,                          // PERMISSION_DENIED
            ErrorKind::AuthUnavailable => 14,                   // UNAVAILABLE
            ErrorKind::ValidationFailed | ErrorKind::UnsupportedMediaType => 3, // INVALID_ARGUMENT
            ErrorKind::Overloaded | ErrorKind::CircuitOpen => 14, // UNAVAILABLE
            ErrorKind::RateLimited => 8,                        // RESOURCE_EXHAUSTED
            ErrorKind::LimiterUnavailable => 14,                // UNAVAILABLE
        }
    }

    /// Whether another attempt (on another target) may succeed. Whether it is
    /// *safe* to retry also depends on the request; see `proxy::retry`.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::UpstreamUnreachable | ErrorKind::UpstreamTimeout
        )
    }
}

/// `content-type: application/grpc` (and `+proto` etc.): a gRPC call, or
/// a gRPC response.
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A request-path failure that becomes a gateway-made response.
#[derive(Debug)]
pub struct GatewayError {
    kind: ErrorKind,
    message: Cow<'static, str>,
    cause: Option<BoxError>,
    /// Extra response headers (e.g. `Retry-After`, `WWW-Authenticate`).
    headers: Option<Box<HeaderMap>>,
    /// Structured detail added to the JSON body as `error.details` (e.g.
    /// the list of configuration errors of a rejected reload).
    details: Option<Box<serde_json::Value>>,
    /// A configured status instead of the kind's (e.g. introspection's
    /// `unavailable_status`).
    status: Option<StatusCode>,
}

impl GatewayError {
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        GatewayError {
            kind,
            message: message.into(),
            cause: None,
            headers: None,
            details: None,
            status: None,
        }
    }

    /// Answers with `status` instead of the kind's own.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or(self.kind.status())
    }

    /// Adds `error.details` to the JSON body.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    pub fn with_cause(mut self, cause: impl Into<BoxError>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers
            .get_or_insert_with(Default::default)
            .append(name, value);
        self
    }

    /// The answer for a client body cut short by the gateway's limits; the
    /// connection is closed, since the rest of the body was not read.
    pub fn from_body(e: crate::body::BodyError) -> Self {
        let kind = match e {
            crate::body::BodyError::TooLarge(_) => ErrorKind::PayloadTooLarge,
            crate::body::BodyError::Timeout(_) => ErrorKind::RequestTimeout,
            crate::body::BodyError::Malformed => ErrorKind::BadRequest,
        };
        GatewayError::new(kind, e.to_string())
            .with_header(header::CONNECTION, HeaderValue::from_static("close"))
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_retryable(&self) -> bool {
        self.kind.retryable()
    }

    /// `grpc-status` and a percent-encoded `grpc-message`: the status a gRPC
    /// client reads, in a trailers-only response or in trailers.
    pub fn grpc_status_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(2);
        h.insert(
            "grpc-status",
            HeaderValue::from(self.kind.grpc_status() as u16),
        );
        let mut msg = String::with_capacity(self.message.len());
        for b in format!("{}: {}", self.kind.code(), self.message).bytes() {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                msg.push(b as char);
            } else {
                msg.push_str(&format!("%{b:02X}"));
            }
        }
        if let Ok(v) = HeaderValue::from_str(&msg) {
            h.insert("grpc-message", v);
        }
        h
    }

    /// The error as a gRPC client expects it: HTTP 200, a trailers-only
    /// response with `grpc-status` and a percent-encoded `grpc-message`.
    pub fn to_grpc_response(&self, request_id: Option<&HeaderValue>) -> Response<Body> {
        let mut resp = Response::new(Body::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.extend(self.grpc_status_headers());
        if let Some(rid) = request_id {
            h.insert("x-request-id", rid.clone());
        }
        if let Some(extra) = &self.headers {
            for (k, v) in extra.iter() {
                if k != header::CONNECTION {
                    h.append(k, v.clone());
                }
            }
        }
        resp
    }

    /// The response for a request: a gRPC error for gRPC calls, else the
    /// standard JSON body.
    pub fn respond(&self, request_id: Option<&HeaderValue>, grpc: bool) -> Response<Body> {
        if grpc {
            self.to_grpc_response(request_id)
        } else {
            self.to_response(request_id)
        }
    }

    /// The standard error response as raw HTTP/1.1 bytes, with
    /// `Connection: close`: for the connection layer, when there is no
    /// request for hyper to answer (a request head that never arrived).
    pub fn to_raw_http1(&self, request_id: &HeaderValue) -> Vec<u8> {
        let resp = self.to_response(Some(request_id));
        let body = match resp.body() {
            Body::Full(Some(b)) => b.clone(),
            _ => Bytes::new(),
        };
        let status = resp.status();
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in resp.headers() {
            if name == http::header::CONTENT_LENGTH || name == http::header::CONNECTION {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(request_id.as_bytes());
        out.extend_from_slice(b"\r\nconnection: close\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&body);
        out
    }

    /// The standard JSON error response.
    pub fn to_response(&self, request_id: Option<&HeaderValue>) -> Response<Body> {
        let status = self.status();
        let rid = request_id.and_then(|v| v.to_str().ok()).unwrap_or("");
        #[derive(serde::Serialize)]
        struct Inner<'a> {
            status: u16,
            code: &'a str,
            message: &'a str,
            request_id: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            details: Option<&'a serde_json::Value>,
        }
        #[derive(serde::Serialize)]
        struct Envelope<'a> {
            error: Inner<'a>,
        }
        let body = Envelope {
            error: Inner {
                status: status.as_u16(),
                code: self.kind.code(),
                message: &self.message,
                request_id: rid,
                details: self.details.as_deref(),
            },
        };
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let mut resp = Response::new(Body::full(bytes));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(extra) = &self.headers {
            for (k, v) in extra.iter() {
                h.append(k, v.clone());
            }
        }
        resp
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.message)?;
        if let Some(c) = &self.cause {
            write!(f, " ({c})")?;
        }
        Ok(())
    }
}

impl std::error::Error for GatewayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn json_body_shape() {
        let err = GatewayError::new(ErrorKind::UpstreamUnreachable, "connection refused");
        let resp = err.to_response(Some(&HeaderValue::from_static("abc")));
        assert_eq!(resp.status(), 502);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["status"], 502);
        assert_eq!(v["error"]["code"], "upstream_unreachable");
        assert_eq!(v["error"]["message"], "connection refused");
        assert_eq!(v["error"]["request_id"], "abc");
    }

    #[test]
    fn grpc_error_shape() {
        let err = GatewayError::new(ErrorKind::UpstreamTimeout, "slow 100%");
        let resp = err.to_grpc_response(Some(&HeaderValue::from_static("rid")));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "4");
        assert_eq!(
            resp.headers()["grpc-message"],
            "upstream_timeout: slow 100%25"
        );
        assert_eq!(ErrorKind::NoHealthyTarget.grpc_status(), 14);
        assert_eq!(ErrorKind::RouteNotFound.grpc_status(), 12);
    }

    #[test]
    fn taxonomy() {
        assert_eq!(ErrorKind::UpstreamTimeout.status(), 504);
        assert_eq!(ErrorKind::NoHealthyTarget.status(), 503);
        assert_eq!(ErrorKind::RouteNotFound.source(), ErrorSource::Client);
        assert!(ErrorKind::UpstreamUnreachable.retryable());
        assert!(!ErrorKind::BadRequest.retryable());
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
        for k in [ErrorKind::Overloaded, ErrorKind::CircuitOpen] {
            assert_eq!(k.status(), 503);
            assert_eq!(k.grpc_status(), 14);
            assert_eq!(k.source(), ErrorSource::Gateway);
            assert!(!k.retryable());
        }
        assert_eq!(ErrorKind::Overloaded.code(), "overloaded");
        assert_eq!(ErrorKind::CircuitOpen.code(), "circuit_open");
        assert_eq!(ErrorKind::LimiterUnavailable.index(), ErrorKind::COUNT - 1);
        assert_eq!(ErrorKind::RateLimited.status(), 429);
        assert_eq!(ErrorKind::RateLimited.code(), "rate_limited");
        assert_eq!(ErrorKind::RateLimited.grpc_status(), 8);
        assert_eq!(ErrorKind::RateLimited.source(), ErrorSource::Client);
        assert_eq!(ErrorKind::LimiterUnavailable.status(), 503);
        assert_eq!(ErrorKind::LimiterUnavailable.source(), ErrorSource::Gateway);
        assert_eq!(ErrorKind::Forbidden.status(), 403);
        assert_eq!(ErrorKind::Forbidden.grpc_status(), 7);
        assert_eq!(ErrorKind::AuthUnavailable.source(), ErrorSource::Gateway);
    }
}
