//! `/metrics`: walks the live snapshot (routes, upstreams, targets,
//! endpoints) and the gateway's own series, and writes every family.
//! Docs: docs/observability.md lists each family; keep them in step.

use super::encode::{Encoder, Kind};
use super::{GatewayMetrics, RouteMetrics, CONN_CLASSES, METHODS, STATUS_CLASSES};
use crate::error::{ErrorKind, ErrorSource};
use crate::snapshot::Snapshot;
use std::sync::atomic::Ordering;

/// Everything `render` reads.
pub struct Scrape<'a> {
    pub snapshot: &'a Snapshot,
    pub gateway: &'a GatewayMetrics,
    /// OpenMetrics instead of the Prometheus text format.
    pub openmetrics: bool,
}

pub fn render(s: &Scrape) -> (String, &'static str) {
    let mut e = Encoder::new(s.openmetrics);
    let snap = s.snapshot;

    e.family("portico_build", Kind::Info, "Portico's version.");
    e.sample(
        "portico_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1u64,
    );

    // ---- requests, by route
    let mut routes: Vec<&RouteMetrics> = snap.routes.iter().map(|r| &*r.metrics).collect();
    routes.push(&s.gateway.unmatched);

    e.family(
        "portico_requests",
        Kind::Counter,
        "Requests answered, by route, method, status class and consumer (counted when the response ends).",
    );
    let consumer_names = snap.consumers.slots.names();
    for r in &routes {
        for ci in r.consumer_slots() {
            let consumer = consumer_names.get(ci).map_or("other", |n| &**n);
            for (mi, method) in METHODS.iter().enumerate() {
                for (si, class) in STATUS_CLASSES.iter().enumerate() {
                    let n = r.requests(ci, mi, si);
                    if n > 0 {
                        e.counter(
                            "portico_requests",
                            &[
                                ("route", &r.name),
                                ("method", method),
                                ("status_class", class),
                                ("consumer", consumer),
                            ],
                            n,
                        );
                    }
                }
            }
        }
    }
    e.family(
        "portico_auth_failures",
        Kind::Counter,
        "Requests refused by an auth or access policy, by route, authentication method and reason.",
    );
    for r in &routes {
        for m in crate::auth::Method::ALL {
            for reason in crate::auth::Reason::ALL {
                let n = r.auth_failures(m.index(), reason.index());
                if n > 0 {
                    e.counter(
                        "portico_auth_failures",
                        &[
                            ("route", &r.name),
                            ("method", m.as_str()),
                            ("reason", reason.as_str()),
                        ],
                        n,
                    );
                }
            }
        }
    }
    e.family(
        "portico_rate_limit_decisions",
        Kind::Counter,
        "Decisions of rate_limit policies, by route and result (allowed, limited, fail_open, fail_closed).",
    );
    for r in &routes {
        for res in crate::metrics::LimitResult::ALL {
            let n = r.rate_limits(res);
            if n > 0 {
                e.counter(
                    "portico_rate_limit_decisions",
                    &[("route", &r.name), ("result", res.as_str())],
                    n,
                );
            }
        }
    }
    e.family(
        "portico_requests_cancelled",
        Kind::Counter,
        "Requests whose client went away before the response headers, by route.",
    );
    for r in &routes {
        e.counter(
            "portico_requests_cancelled",
            &[("route", &r.name)],
            r.cancelled(),
        );
    }
    e.family(
        "portico_request_duration_seconds",
        Kind::Histogram,
        "Time from the request's arrival to the end of its response body, by route.",
    );
    for r in &routes {
        e.histogram(
            "portico_request_duration_seconds",
            &[("route", &r.name)],
            &r.duration.snapshot(),
        );
    }
    e.family(
        "portico_request_body_bytes",
        Kind::Counter,
        "Request body bytes read from clients, by route.",
    );
    for r in &routes {
        e.counter(
            "portico_request_body_bytes",
            &[("route", &r.name)],
            r.bytes_in(),
        );
    }
    e.family(
        "portico_response_body_bytes",
        Kind::Counter,
        "Response body bytes sent to clients, by route.",
    );
    for r in &routes {
        e.counter(
            "portico_response_body_bytes",
            &[("route", &r.name)],
            r.bytes_out(),
        );
    }

    // ---- load shedding
    e.family(
        "portico_requests_shed",
        Kind::Counter,
        "Requests refused with 503 overloaded, by route, priority class, limit scope (global, route, upstream) and reason (rejected, evicted, queue_timeout).",
    );
    let pr = &snap.priorities;
    for r in &routes {
        for (ci, class) in pr.names.iter().enumerate() {
            for scope in crate::shed::Scope::ALL {
                for why in crate::shed::limiter::Shed::ALL {
                    let n = r.shed_count(ci, scope.index(), why.index());
                    if n > 0 {
                        e.counter(
                            "portico_requests_shed",
                            &[
                                ("route", &r.name),
                                ("priority", class),
                                ("scope", scope.as_str()),
                                ("reason", why.as_str()),
                            ],
                            n,
                        );
                    }
                }
            }
        }
    }
    e.family(
        "portico_queue_wait_seconds",
        Kind::Histogram,
        "Time requests waited in a concurrency limit's queue (whether they got a slot or not), by route.",
    );
    for r in &routes {
        let h = r.queue_wait.snapshot();
        if h.count() > 0 {
            e.histogram("portico_queue_wait_seconds", &[("route", &r.name)], &h);
        }
    }
    let mut limits: Vec<(&str, &str, &crate::shed::limiter::Limiter)> = Vec::new();
    if let Some(l) = &snap.overload {
        limits.push(("global", "", l));
    }
    for r in &snap.routes {
        if let Some(l) = &r.concurrency {
            limits.push(("route", &r.name, l));
        }
    }
    e.family(
        "portico_concurrency_in_flight",
        Kind::Gauge,
        "Requests holding a slot of a concurrency limit (scope global, or route with its name).",
    );
    for (scope, route, l) in &limits {
        e.sample(
            "portico_concurrency_in_flight",
            &[("scope", scope), ("route", route)],
            u64::from(l.in_flight()),
        );
    }
    e.family(
        "portico_concurrency_queued",
        Kind::Gauge,
        "Requests waiting in a concurrency limit's queue.",
    );
    for (scope, route, l) in &limits {
        e.sample(
            "portico_concurrency_queued",
            &[("scope", scope), ("route", route)],
            u64::from(l.queued()),
        );
    }

    // ---- gateway-made errors
    e.family(
        "portico_gateway_errors",
        Kind::Counter,
        "Error responses made by the gateway itself, by error code (the `code` of the JSON error body).",
    );
    for k in ErrorKind::ALL {
        e.counter(
            "portico_gateway_errors",
            &[("code", k.code()), ("source", k.source().as_str())],
            s.gateway.errors(k),
        );
    }

    // ---- upstreams
    let mut names: Vec<&String> = snap.upstreams.keys().collect();
    names.sort();
    e.family(
        "portico_upstream_request_duration_seconds",
        Kind::Histogram,
        "Time from sending a request to a target to its response headers, per attempt.",
    );
    for name in &names {
        let up = &snap.upstreams[*name];
        for (t, m) in up.targets.iter().zip(up.target_metrics.iter()) {
            e.histogram(
                "portico_upstream_request_duration_seconds",
                &[("upstream", name), ("target", &t.authority)],
                &m.duration.snapshot(),
            );
        }
    }
    e.family(
        "portico_upstream_errors",
        Kind::Counter,
        "Failed attempts to a target (connect failure, timeout, broken exchange), by error code.",
    );
    for name in &names {
        let up = &snap.upstreams[*name];
        for (t, m) in up.targets.iter().zip(up.target_metrics.iter()) {
            for k in ErrorKind::ALL
                .into_iter()
                .filter(|k| k.source() == ErrorSource::Upstream)
            {
                e.counter(
                    "portico_upstream_errors",
                    &[
                        ("upstream", name),
                        ("target", &t.authority),
                        ("code", k.code()),
                    ],
                    m.errors(k),
                );
            }
        }
    }
    let endpoints: Vec<_> = names
        .iter()
        .map(|n| (n, snap.upstreams[*n].set.load_full()))
        .collect();
    e.family(
        "portico_upstream_target_healthy",
        Kind::Gauge,
        "1 when the endpoint may be picked (active checks pass and not ejected), else 0.",
    );
    for (name, set) in &endpoints {
        for ep in &set.endpoints {
            let addr = ep.addr.to_string();
            let ok = ep.health.is_available() as u64;
            e.sample(
                "portico_upstream_target_healthy",
                &[
                    ("upstream", name),
                    ("target", &ep.target),
                    ("address", &addr),
                ],
                ok,
            );
        }
    }
    e.family(
        "portico_upstream_target_ejected",
        Kind::Gauge,
        "1 while outlier detection has ejected the endpoint, else 0.",
    );
    for (name, set) in &endpoints {
        for ep in &set.endpoints {
            let addr = ep.addr.to_string();
            e.sample(
                "portico_upstream_target_ejected",
                &[
                    ("upstream", name),
                    ("target", &ep.target),
                    ("address", &addr),
                ],
                ep.health.is_ejected() as u64,
            );
        }
    }
    e.family(
        "portico_upstream_target_in_flight",
        Kind::Gauge,
        "Requests in flight to the endpoint (connection leased).",
    );
    for (name, set) in &endpoints {
        for ep in &set.endpoints {
            let addr = ep.addr.to_string();
            e.sample(
                "portico_upstream_target_in_flight",
                &[
                    ("upstream", name),
                    ("target", &ep.target),
                    ("address", &addr),
                ],
                ep.load.in_flight() as u64,
            );
        }
    }

    // ---- upstream protection
    e.family(
        "portico_upstream_circuit_state",
        Kind::Gauge,
        "1 for the circuit breaker's current state (closed, open, half_open), 0 for the others; upstreams with a circuit_breaker.",
    );
    for name in &names {
        if let Some(b) = &snap.upstreams[*name].breaker {
            let now = b.state();
            for st in crate::upstream::breaker::State::ALL {
                e.sample(
                    "portico_upstream_circuit_state",
                    &[("upstream", name), ("state", st.as_str())],
                    u64::from(st == now),
                );
            }
        }
    }
    e.family(
        "portico_upstream_circuit_transitions",
        Kind::Counter,
        "Circuit breaker state changes, by the state entered.",
    );
    for name in &names {
        if let Some(b) = &snap.upstreams[*name].breaker {
            for st in crate::upstream::breaker::State::ALL {
                e.counter(
                    "portico_upstream_circuit_transitions",
                    &[("upstream", name), ("to", st.as_str())],
                    b.transitions[st as usize].load(Ordering::Relaxed),
                );
            }
        }
    }
    e.family(
        "portico_upstream_circuit_rejected",
        Kind::Counter,
        "Requests answered 503 circuit_open without being sent.",
    );
    for name in &names {
        if let Some(b) = &snap.upstreams[*name].breaker {
            e.counter(
                "portico_upstream_circuit_rejected",
                &[("upstream", name)],
                b.rejected.load(Ordering::Relaxed),
            );
        }
    }
    e.family(
        "portico_upstream_concurrency_limit",
        Kind::Gauge,
        "The adaptive concurrency limit in force; upstreams with adaptive_concurrency.",
    );
    for name in &names {
        if let Some(a) = &snap.upstreams[*name].adaptive {
            e.sample(
                "portico_upstream_concurrency_limit",
                &[("upstream", name)],
                u64::from(a.limit()),
            );
        }
    }
    e.family(
        "portico_upstream_concurrency_in_flight",
        Kind::Gauge,
        "Requests holding a slot of the adaptive concurrency limit.",
    );
    for name in &names {
        if let Some(a) = &snap.upstreams[*name].adaptive {
            e.sample(
                "portico_upstream_concurrency_in_flight",
                &[("upstream", name)],
                u64::from(a.in_flight()),
            );
        }
    }
    e.family(
        "portico_upstream_concurrency_rejected",
        Kind::Counter,
        "Requests refused with 503 overloaded by the adaptive concurrency limit.",
    );
    for name in &names {
        if let Some(a) = &snap.upstreams[*name].adaptive {
            e.counter(
                "portico_upstream_concurrency_rejected",
                &[("upstream", name)],
                a.rejected.load(Ordering::Relaxed),
            );
        }
    }

    // ---- connections
    let listeners = s.gateway.listeners();
    let shown: Vec<_> = listeners
        .iter()
        .filter(|(n, m)| snap.listener(n).is_some() || m.open_total() > 0)
        .collect();
    e.family(
        "portico_connections_open",
        Kind::Gauge,
        "Open client connections, by listener, protocol and TLS.",
    );
    for (n, m) in &shown {
        for (i, (proto, tls)) in CONN_CLASSES.iter().enumerate() {
            e.sample(
                "portico_connections_open",
                &[("listener", n), ("protocol", proto), ("tls", tls)],
                m.open(i),
            );
        }
    }
    e.family(
        "portico_connections",
        Kind::Counter,
        "Client connections served (after the TLS handshake), by listener, protocol and TLS.",
    );
    for (n, m) in &shown {
        for (i, (proto, tls)) in CONN_CLASSES.iter().enumerate() {
            e.counter(
                "portico_connections",
                &[("listener", n), ("protocol", proto), ("tls", tls)],
                m.accepted(i),
            );
        }
    }
    e.family(
        "portico_connections_parked",
        Kind::Gauge,
        "Idle plain-text HTTP/1 keep-alive connections parked (their buffers freed until the next request), by listener.",
    );
    for (n, m) in &shown {
        e.sample("portico_connections_parked", &[("listener", n)], m.parked());
    }
    e.family(
        "portico_tls_handshake_failures",
        Kind::Counter,
        "TLS handshakes that failed or timed out, by listener.",
    );
    for (n, m) in &shown {
        e.counter(
            "portico_tls_handshake_failures",
            &[("listener", n)],
            m.tls_handshake_failures(),
        );
    }

    // ---- tracing
    use crate::trace::{
        EXPORT_FAILURES, SPANS_DROPPED_EXPORT, SPANS_DROPPED_QUEUE, SPANS_EXPORTED,
    };
    e.family(
        "portico_tracing_spans_exported",
        Kind::Counter,
        "Spans the OTLP collector accepted.",
    );
    e.counter(
        "portico_tracing_spans_exported",
        &[],
        SPANS_EXPORTED.load(Ordering::Relaxed),
    );
    e.family(
        "portico_tracing_spans_dropped",
        Kind::Counter,
        "Spans not exported, by reason: queue_full (the export queue was full), export_failed (lost with a failed export request).",
    );
    e.counter(
        "portico_tracing_spans_dropped",
        &[("reason", "queue_full")],
        SPANS_DROPPED_QUEUE.load(Ordering::Relaxed),
    );
    e.counter(
        "portico_tracing_spans_dropped",
        &[("reason", "export_failed")],
        SPANS_DROPPED_EXPORT.load(Ordering::Relaxed),
    );
    e.family(
        "portico_tracing_export_failures",
        Kind::Counter,
        "OTLP export requests that failed (connection, timeout, non-2xx answer).",
    );
    e.counter(
        "portico_tracing_export_failures",
        &[],
        EXPORT_FAILURES.load(Ordering::Relaxed),
    );

    // ---- JWT issuers
    let issuers = &snap.jwt_issuers.list;
    e.family(
        "portico_jwks_fetches",
        Kind::Counter,
        "JWKS fetches of a jwt issuer with a jwks_url, by result (ok: a usable key set was installed; failed: the last good set stays in use).",
    );
    for i in issuers.iter().filter(|i| i.remote.is_some()) {
        e.counter(
            "portico_jwks_fetches",
            &[("issuer", &i.name), ("result", "ok")],
            i.stats.ok.load(Ordering::Relaxed),
        );
        e.counter(
            "portico_jwks_fetches",
            &[("issuer", &i.name), ("result", "failed")],
            i.stats.failed.load(Ordering::Relaxed),
        );
    }
    e.family(
        "portico_jwt_keys",
        Kind::Gauge,
        "Verification keys in force for a jwt issuer (inline, jwks_file and fetched).",
    );
    for i in issuers {
        e.sample(
            "portico_jwt_keys",
            &[("issuer", &i.name)],
            i.key_count() as u64,
        );
    }
    e.family(
        "portico_jwt_cache_entries",
        Kind::Gauge,
        "Verified tokens held in a jwt issuer's cache.",
    );
    for i in issuers {
        e.sample(
            "portico_jwt_cache_entries",
            &[("issuer", &i.name)],
            i.cache.len() as u64,
        );
    }

    // ---- configuration
    let (ok, failed) = s.gateway.reloads();
    e.family(
        "portico_config_reloads",
        Kind::Counter,
        "Configuration reloads (SIGHUP, file change, admin POST /reload), by result.",
    );
    e.counter("portico_config_reloads", &[("result", "success")], ok);
    e.counter("portico_config_reloads", &[("result", "failure")], failed);
    e.family(
        "portico_config_last_reload_successful",
        Kind::Gauge,
        "0 when the last reload was rejected (the previous configuration keeps serving), else 1.",
    );
    e.sample(
        "portico_config_last_reload_successful",
        &[],
        s.gateway.last_reload_ok() as u64,
    );
    e.family(
        "portico_config",
        Kind::Info,
        "The configuration in force: its hash (of the configuration text and of the files it names, as /status shows it).",
    );
    let hash = format!("{:016x}", snap.hash);
    e.sample("portico_config_info", &[("hash", &hash)], 1u64);
    e.family(
        "portico_config_loaded_timestamp_seconds",
        Kind::Gauge,
        "When the configuration in force was loaded (Unix time).",
    );
    let loaded = snap
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    e.sample("portico_config_loaded_timestamp_seconds", &[], loaded);

    // ---- access log
    let al = &s.gateway.access_log;
    e.family(
        "portico_access_log_lines",
        Kind::Counter,
        "Access-log lines written.",
    );
    e.counter(
        "portico_access_log_lines",
        &[],
        al.lines.load(Ordering::Relaxed),
    );
    e.family(
        "portico_access_log_dropped",
        Kind::Counter,
        "Access-log lines dropped because the buffer was full (or the write failed).",
    );
    e.counter(
        "portico_access_log_dropped",
        &[],
        al.dropped.load(Ordering::Relaxed),
    );

    // ---- process
    e.family(
        "portico_tunnels_open",
        Kind::Gauge,
        "Upgraded connections (WebSocket) being relayed, in this process.",
    );
    e.sample(
        "portico_tunnels_open",
        &[],
        crate::proxy::TUNNELS.load(Ordering::Relaxed) as u64,
    );
    if let Some(p) = super::process::read() {
        e.family(
            "process_cpu_seconds",
            Kind::Counter,
            "User and system CPU time spent, in seconds.",
        );
        e.sample("process_cpu_seconds_total", &[], p.cpu_seconds);
        e.family(
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes.",
        );
        e.sample("process_resident_memory_bytes", &[], p.resident_bytes);
        e.family(
            "process_virtual_memory_bytes",
            Kind::Gauge,
            "Virtual memory size in bytes.",
        );
        e.sample("process_virtual_memory_bytes", &[], p.virtual_bytes);
        e.family("process_open_fds", Kind::Gauge, "Open file descriptors.");
        e.sample("process_open_fds", &[], p.open_fds);
        if let Some(max) = p.max_fds {
            e.family(
                "process_max_fds",
                Kind::Gauge,
                "Maximum number of open file descriptors (soft limit).",
            );
            e.sample("process_max_fds", &[], max);
        }
        e.family("process_threads", Kind::Gauge, "OS threads.");
        e.sample("process_threads", &[], p.threads);
        e.family(
            "process_start_time_seconds",
            Kind::Gauge,
            "Start time of the process since the Unix epoch, in seconds.",
        );
        e.sample("process_start_time_seconds", &[], p.start_time_seconds);
    }

    let ct = e.content_type();
    (e.finish(), ct)
}
