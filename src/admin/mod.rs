//! The admin API: a separate HTTP/1.1 listener (`admin:` in the
//! configuration; loopback by default) serving metrics, status, the routes
//! and upstreams as compiled, the effective configuration (secrets
//! redacted), reloads, and the orchestrator probes. docs/observability.md
//! is its reference; `openapi.json` beside this file describes it and is
//! served at `/openapi.json`.
//!
//! Every endpoint but `/healthz` and `/readyz` requires the configured
//! bearer token (when there is one; it is mandatory off loopback). Tokens
//! are compared as SHA-256 digests, in constant time. The admin listener is
//! not a data listener: it has no routes, no policies, and its requests are
//! not counted in the request metrics. Errors use the gateway's standard
//! JSON error body.
//!
//! *Never* serves a secret: `/config` redacts them (see [`redact`]) and
//! the token itself is not kept after compiling.

pub mod redact;

use crate::body::Body;
use crate::error::{ErrorKind, GatewayError};
use crate::metrics::render::{render, Scrape};
use crate::server::{ReloadError, Shared};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One endpoint of the admin router.
#[derive(Debug, Clone, Copy)]
pub struct AdminEndpoint {
    /// `GET` endpoints also answer `HEAD`.
    pub method: &'static str,
    pub path: &'static str,
    /// Requires the bearer token (when one is configured).
    pub auth: bool,
    which: Which,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Healthz,
    Readyz,
    Metrics,
    Status,
    Routes,
    Upstreams,
    Config,
    Reload,
    OpenApi,
    ConsumerUsage,
}

const fn ep(method: &'static str, path: &'static str, auth: bool, which: Which) -> AdminEndpoint {
    AdminEndpoint {
        method,
        path,
        auth,
        which,
    }
}

/// Every endpoint the admin listener serves (the OpenAPI document must list
/// exactly these; a test checks it).
pub const ENDPOINTS: &[AdminEndpoint] = &[
    ep("GET", "/healthz", false, Which::Healthz),
    ep("GET", "/readyz", false, Which::Readyz),
    ep("GET", "/metrics", true, Which::Metrics),
    ep("GET", "/status", true, Which::Status),
    ep("GET", "/routes", true, Which::Routes),
    ep("GET", "/upstreams", true, Which::Upstreams),
    ep("GET", "/config", true, Which::Config),
    ep("POST", "/reload", true, Which::Reload),
    ep("GET", "/openapi.json", true, Which::OpenApi),
    ep("GET", "/consumers/{id}/usage", true, Which::ConsumerUsage),
];

/// Whether `path` matches an endpoint path, where a `{name}` segment
/// matches one non-empty segment.
fn path_matches(template: &str, path: &str) -> bool {
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) if ts.starts_with('{') && ts.ends_with('}') => {
                if ps.is_empty() {
                    return false;
                }
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return false,
        }
    }
}

/// The OpenAPI 3.1 document of this API (`PORTICO_VERSION` is replaced by
/// the running version).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Open admin connections above this are closed at once.
const MAX_CONNECTIONS: usize = 64;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// SHA-256 of a token: what the snapshot keeps and what requests are
/// compared against.
pub fn token_digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equal digests, in time independent of where they differ.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Whether `headers` carry `Authorization: Bearer <token>` matching
/// `expected` (always true when no token is configured).
fn authorized(expected: Option<&[u8; 32]>, headers: &HeaderMap) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let v = v.as_bytes();
    if v.len() < 7 || !v[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let Ok(token) = std::str::from_utf8(&v[7..]) else {
        return false;
    };
    digests_equal(&token_digest(token.trim()), expected)
}

/// Accepts admin connections on `listener` (configured as `configured`)
/// until `stopped` fires. Each connection is HTTP/1.1.
pub(crate) async fn serve(
    listener: Arc<TcpListener>,
    configured: SocketAddr,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped.changed() => break,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let (shared, open) = (shared.clone(), open.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, configured, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Answers one admin request. `listener` is the configured address of the
/// admin listener it arrived on: once a reload moved or removed the admin
/// listener, connections still open on the old one are refused (their
/// token rules may no longer hold).
pub async fn handle(
    shared: &Arc<Shared>,
    listener: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let request_id = crate::server::service::new_request_id();
    let mut resp = match answer(shared, listener, &req) {
        Ok(r) => r,
        Err(e) => e.to_response(Some(&request_id)),
    };
    resp.headers_mut()
        .insert(crate::proxy::X_REQUEST_ID.clone(), request_id);
    resp
}

fn answer(
    shared: &Arc<Shared>,
    listener: SocketAddr,
    req: &Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    let snapshot = shared.snapshot.load_full();
    let Some(spec) = snapshot.admin.as_ref().filter(|a| a.addr == listener) else {
        return Err(GatewayError::new(
            ErrorKind::RouteNotFound,
            "this admin listener was removed or moved by a reload",
        )
        .with_header(header::CONNECTION, HeaderValue::from_static("close")));
    };
    let path = req.uri().path();
    let Some(ep) = ENDPOINTS.iter().find(|e| path_matches(e.path, path)) else {
        return Err(GatewayError::new(
            ErrorKind::RouteNotFound,
            format!("no admin endpoint `{path}` (see /openapi.json)"),
        ));
    };
    let method_ok =
        req.method().as_str() == ep.method || (ep.method == "GET" && req.method() == Method::HEAD);
    if !method_ok {
        let allow = if ep.method == "GET" {
            "GET, HEAD"
        } else {
            ep.method
        };
        return Err(GatewayError::new(
            ErrorKind::MethodNotAllowed,
            format!("`{path}` answers {allow}"),
        )
        .with_header(header::ALLOW, HeaderValue::from_static(allow)));
    }
    if ep.auth && !authorized(spec.token_sha256.as_ref(), req.headers()) {
        return Err(GatewayError::new(
            ErrorKind::Unauthorized,
            "a valid admin token is required: `Authorization: Bearer <admin.token>`",
        )
        .with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"portico-admin\""),
        ));
    }
    Ok(match ep.which {
        Which::Healthz => json_response(StatusCode::OK, &json!({"status": "ok"})),
        Which::Readyz => readyz(shared),
        Which::Metrics => {
            let openmetrics =
                crate::metrics::encode::wants_openmetrics(req.headers().get(header::ACCEPT));
            let (text, content_type) = render(&Scrape {
                snapshot: &snapshot,
                gateway: &shared.metrics,
                openmetrics,
            });
            let mut r = Response::new(Body::full(text));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            no_store(r)
        }
        Which::Status => json_response(StatusCode::OK, &status(shared, &snapshot)),
        Which::Routes => json_response(StatusCode::OK, &routes(&snapshot)),
        Which::Upstreams => json_response(StatusCode::OK, &upstreams(&snapshot)),
        Which::Config => {
            let mut v = serde_json::to_value(&snapshot.config).unwrap_or(Value::Null);
            redact::redact(&mut v);
            json_response(StatusCode::OK, &v)
        }
        Which::Reload => return reload(shared),
        Which::ConsumerUsage => return consumer_usage(shared, &snapshot, path),
        Which::OpenApi => {
            let doc = OPENAPI.replace("PORTICO_VERSION", env!("CARGO_PKG_VERSION"));
            let mut r = Response::new(Body::full(doc));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
    })
}

/// `/consumers/{id}/usage`: the consumer and its requests by route over
/// recent windows (`metrics::usage`).
fn consumer_usage(
    shared: &Shared,
    snap: &crate::snapshot::Snapshot,
    path: &str,
) -> Result<Response<Body>, GatewayError> {
    let raw = path
        .strip_prefix("/consumers/")
        .and_then(|r| r.strip_suffix("/usage"))
        .unwrap_or("");
    let id = crate::router::percent_decode(raw);
    let (slot, info) = match &*id {
        "anonymous" => (
            crate::auth::consumer::SLOT_ANONYMOUS,
            json!({"id": "anonymous"}),
        ),
        "other" => (crate::auth::consumer::SLOT_OTHER, json!({"id": "other"})),
        _ => match snap.consumers.get(&id) {
            Some(c) => (
                c.slot,
                json!({
                    "id": &*c.id,
                    "groups": c.groups.iter().map(|g| &**g).collect::<Vec<_>>(),
                    "plan": c.plan.as_deref(),
                }),
            ),
            None => {
                return Err(GatewayError::new(
                    ErrorKind::RouteNotFound,
                    format!("no consumer `{id}` in the loaded configuration"),
                ))
            }
        },
    };
    let mut v = shared
        .usage
        .usage(snap, slot as usize, std::time::Instant::now());
    if let Value::Object(m) = &mut v {
        m.insert("consumer".into(), info);
    }
    Ok(json_response(StatusCode::OK, &v))
}

fn no_store(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Body::full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    no_store(r)
}

fn readyz(shared: &Shared) -> Response<Body> {
    if shared.is_ready() {
        return json_response(StatusCode::OK, &json!({"status": "ready"}));
    }
    let why = if shared.is_draining() {
        "draining"
    } else {
        "starting"
    };
    json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": why}))
}

fn reload(shared: &Arc<Shared>) -> Result<Response<Body>, GatewayError> {
    match shared.reload_checked() {
        Ok(r) => {
            let snap = shared.snapshot.load();
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "reloaded": r.changed,
                    "changed": r.changed,
                    "config": config_info(&snap),
                }),
            ))
        }
        Err(ReloadError::Invalid(errors)) => {
            tracing::error!(
                "reload (admin API) rejected, previous configuration keeps serving:\n{errors}"
            );
            let list: Vec<Value> = errors
                .0
                .iter()
                .map(|e| {
                    json!({
                        "file": e.file,
                        "line": e.line,
                        "column": e.column,
                        "path": e.path,
                        "message": e.message,
                    })
                })
                .collect();
            Err(
                GatewayError::new(ErrorKind::InvalidConfig, errors.to_string())
                    .with_details(json!({ "errors": list })),
            )
        }
        Err(ReloadError::Failed(msg)) => {
            tracing::error!(
                "reload (admin API) failed, previous configuration keeps serving: {msg}"
            );
            Err(GatewayError::new(ErrorKind::Internal, msg))
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `2024-05-01T12:00:00Z` (UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn config_info(snap: &crate::snapshot::Snapshot) -> Value {
    json!({
        "file": snap.file,
        "hash": format!("{:016x}", snap.hash),
        "files": snap.inputs.paths().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "loaded_at": rfc3339(snap.loaded_at),
        "loaded_at_unix": unix_seconds(snap.loaded_at),
    })
}

fn status(shared: &Shared, snap: &crate::snapshot::Snapshot) -> Value {
    let (ok, failed) = shared.metrics.reloads();
    let listeners: Vec<Value> = shared
        .bound_listeners()
        .into_iter()
        .map(|(name, addr)| json!({"name": &*name, "address": addr.to_string()}))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": rfc3339(shared.started_at),
        "uptime_seconds": shared.uptime().as_secs_f64(),
        "ready": shared.is_ready(),
        "draining": shared.is_draining(),
        "config": config_info(snap),
        "reloads": {
            "success": ok,
            "failure": failed,
            "last_successful": shared.metrics.last_reload_ok(),
        },
        "open_connections": shared.open_connections(),
        "listeners": listeners,
    })
}

fn routes(snap: &crate::snapshot::Snapshot) -> Value {
    let mut out = Vec::new();
    for (route, cfg) in snap
        .routes
        .iter()
        .filter_map(|r| Some((r, snap.config.routes.iter().find(|c| *c.name == *r.name)?)))
    {
        let listeners: Vec<&str> = snap
            .listeners
            .iter()
            .filter(|l| l.routes.iter().any(|x| Arc::ptr_eq(x, route)))
            .map(|l| &*l.spec.name)
            .collect();
        let mut matcher = serde_json::to_value(&cfg.matcher).unwrap_or(Value::Null);
        redact::redact(&mut matcher);
        let upstream = match &route.action {
            crate::action::Action::Proxy(p) => Value::from(&*p.upstream.name),
            crate::action::Action::Aggregate(a) => Value::from(a.upstreams()),
            _ => Value::Null,
        };
        let policies: Vec<&str> = route.policies.iter().map(|p| p.name()).collect();
        let m = &route.metrics;
        out.push(json!({
            "name": &*route.name,
            "listeners": listeners,
            "priority": cfg.priority,
            "match": matcher,
            "policies": policies,
            "action": route.action.kind(),
            "upstream": upstream,
            "requests": m.total_requests(),
            "cancelled": m.cancelled(),
        }));
    }
    json!({ "routes": out })
}

fn upstreams(snap: &crate::snapshot::Snapshot) -> Value {
    let mut names: Vec<&String> = snap.upstreams.keys().collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let up = &snap.upstreams[name];
        let set = up.set.load_full();
        let mut targets = Vec::new();
        for (t, m) in up.targets.iter().zip(up.target_metrics.iter()) {
            let endpoints: Vec<Value> = set
                .endpoints
                .iter()
                .filter(|e| *e.target == *t.authority)
                .map(|e| {
                    let h = &e.health;
                    let state = if !h.is_active_ok() {
                        "unhealthy"
                    } else if h.is_ejected() {
                        "ejected"
                    } else {
                        "healthy"
                    };
                    json!({
                        "address": e.addr.to_string(),
                        "state": state,
                        "available": h.is_available(),
                        "active_check": if up.active.is_none() {
                            "disabled"
                        } else if h.is_active_ok() {
                            "passing"
                        } else {
                            "failing"
                        },
                        "ejected": h.is_ejected(),
                        "ejected_for_ms": h.ejected_for().map(|d| d.as_millis() as u64),
                        "ejections": h.ejections(),
                        "in_flight": e.load.in_flight(),
                        "latency_ewma_ms": e.load.latency_us() / 1000.0,
                        "idle_connections": e.pool.idle_count(),
                    })
                })
                .collect();
            let mut errors = serde_json::Map::new();
            for k in ErrorKind::ALL {
                let n = m.errors(k);
                if n > 0 {
                    errors.insert(k.code().into(), n.into());
                }
            }
            targets.push(json!({
                "address": &*t.authority,
                "weight": t.weight,
                "endpoints": endpoints,
                "attempts": m.duration.snapshot().count(),
                "errors": errors,
            }));
        }
        let now = crate::clock::now_ms();
        let breaker = up.breaker.as_ref().map(|b| {
            use crate::upstream::breaker::State;
            json!({
                "state": b.state().as_str(),
                "open_remaining_ms": b.open_remaining_ms(now),
                "opened": b.transitions[State::Open as usize].load(Ordering::Relaxed),
                "rejected": b.rejected.load(Ordering::Relaxed),
            })
        });
        let adaptive = up.adaptive.as_ref().map(|a| {
            let (long, last) = a.latencies();
            json!({
                "algorithm": a.spec.algorithm,
                "limit": a.limit(),
                "in_flight": a.in_flight(),
                "min_limit": a.spec.min as u32,
                "max_limit": a.spec.max as u32,
                "latency_ms": last.as_secs_f64() * 1000.0,
                "long_latency_ms": long.as_secs_f64() * 1000.0,
                "rejected": a.rejected.load(Ordering::Relaxed),
            })
        });
        out.push(json!({
            "name": name,
            "protocol": up.spec.protocol,
            "balance": up.spec.balance,
            "health_check": up.active.as_ref().map(|a| a.path.clone()),
            "targets": targets,
            "circuit_breaker": breaker,
            "adaptive_concurrency": adaptive,
        }));
    }
    json!({ "upstreams": out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn tokens_compare_by_digest() {
        let d = token_digest("s3cret");
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
            m
        };
        assert!(authorized(Some(&d), &h("Bearer s3cret")));
        assert!(authorized(Some(&d), &h("bearer s3cret")));
        assert!(!authorized(Some(&d), &h("Bearer s3cre")));
        assert!(!authorized(Some(&d), &h("Bearer s3cret2")));
        assert!(!authorized(Some(&d), &h("Basic s3cret")));
        assert!(!authorized(Some(&d), &h("s3cret")));
        assert!(!authorized(Some(&d), &HeaderMap::new()));
        assert!(authorized(None, &HeaderMap::new()));
    }

    #[test]
    fn endpoint_paths_with_params() {
        assert!(path_matches(
            "/consumers/{id}/usage",
            "/consumers/app/usage"
        ));
        assert!(!path_matches("/consumers/{id}/usage", "/consumers//usage"));
        assert!(!path_matches(
            "/consumers/{id}/usage",
            "/consumers/a/b/usage"
        ));
        assert!(!path_matches("/consumers/{id}/usage", "/consumers/a"));
        assert!(path_matches("/status", "/status"));
        assert!(!path_matches("/status", "/status/"));
    }

    #[test]
    fn dates() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    /// The OpenAPI document lists exactly the endpoints the router serves,
    /// with the right methods and security.
    #[test]
    fn openapi_lists_every_endpoint() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                documented.insert((method.to_uppercase(), path.clone()));
                let open = op["security"].as_array().is_some_and(|s| s.is_empty());
                let ep = ENDPOINTS.iter().find(|e| e.path == path);
                if let Some(ep) = ep {
                    assert_eq!(open, !ep.auth, "{method} {path}: security");
                }
                assert!(op["responses"].is_object(), "{method} {path}: responses");
            }
        }
        let served: BTreeSet<(String, String)> = ENDPOINTS
            .iter()
            .map(|e| (e.method.to_string(), e.path.to_string()))
            .collect();
        assert_eq!(documented, served);
    }
}
