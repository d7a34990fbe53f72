//! The configuration file's schema, exactly as written by users.
//!
//! Every struct denies unknown keys, so a typo is an error with its location,
//! never a silently ignored setting. Defaults live here, next to the keys, and
//! are mirrored in docs/configuration.md.

use super::units::{Dur, Size};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Worker threads; default: the number of CPUs. `--workers` overrides it.
    #[serde(default)]
    pub workers: Option<usize>,
    /// On SIGTERM/SIGINT: how long in-flight requests may take to finish.
    #[serde(default = "defaults::drain_timeout")]
    pub drain_timeout: Dur,
    /// On SIGUSR2: how long the new process may take to start serving before
    /// the upgrade is abandoned (and the new process killed).
    #[serde(default = "defaults::upgrade_timeout")]
    pub upgrade_timeout: Dur,
    /// Reload when the config file, or a file it names, changes (in
    /// addition to SIGHUP).
    #[serde(default = "defaults::yes")]
    pub watch_config: bool,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The admin listener (metrics, status, reload); none when absent.
    #[serde(default)]
    pub admin: Option<Admin>,
    /// JSON access log, one line per request; none when absent.
    #[serde(default)]
    pub access_log: Option<AccessLog>,
    /// OpenTelemetry tracing (W3C propagation, OTLP export); off when absent.
    #[serde(default)]
    pub tracing: Option<Tracing>,
    /// Known clients and their credentials.
    #[serde(default)]
    pub consumers: Vec<Consumer>,
    /// Token issuers, introspection servers and identity settings shared by
    /// every route's `auth` policy.
    #[serde(default)]
    pub auth: Auth,
    /// Named groups of routes: policies run before each member route's own,
    /// and an optional OpenAPI document for their validation.
    #[serde(default)]
    pub route_groups: Vec<RouteGroup>,
    /// The gateway-wide concurrency limit (docs/overload.md); none when absent.
    #[serde(default)]
    pub overload: Option<ConcurrencyLimit>,
    /// Priority classes for load shedding (docs/overload.md); one class
    /// (`default`) when absent.
    #[serde(default)]
    pub priorities: Option<Priorities>,
    /// Rate limits and quotas: backends, Redis, plans
    /// (docs/traffic-control.md).
    #[serde(default)]
    pub rate_limiting: RateLimiting,
}

// ---------------------------------------------------------------- load shedding

/// A concurrency limit with a bounded wait queue: `overload` (every route)
/// and `routes[].concurrency` (one route).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimit {
    /// Requests in flight at most (until their response body ends).
    pub max_concurrent: u32,
    /// Requests that may wait for a slot; beyond it: 503 `overloaded`.
    /// `0`: no queue, refused at once.
    #[serde(default)]
    pub queue: u32,
    /// Longest wait in the queue before 503 `overloaded`.
    #[serde(default = "defaults::queue_timeout")]
    pub queue_timeout: Dur,
    /// The `Retry-After` of a refused request (whole seconds, at least 1s).
    #[serde(default = "defaults::retry_after")]
    pub retry_after: Dur,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Priorities {
    /// The classes, highest priority first.
    pub classes: Vec<PriorityClass>,
    /// The class of requests nothing else classifies; default: the last
    /// (lowest) class.
    #[serde(default)]
    pub default: Option<String>,
    /// A request header naming the class, honoured only from trusted peers.
    #[serde(default)]
    pub header: Option<String>,
    /// Peers (CIDRs or addresses) whose `header` is honoured; empty: the
    /// listener's `trusted_proxies`.
    #[serde(default)]
    pub trusted_peers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriorityClass {
    /// The class name (the `priority` metrics label).
    pub name: String,
    /// The share of every limit's slots this class may hold in flight
    /// (0 < share <= 1, not more than the class above).
    #[serde(default = "defaults::one")]
    pub share: f64,
    /// Consumers in any of these groups get this class.
    #[serde(default)]
    pub groups: Vec<String>,
}

// ---------------------------------------------------------------- consumers

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// Unique; the metrics label, the `X-Consumer-Id` value, what limits key on.
    pub id: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// The consumer's plan (e.g. `free`, `pro`), for limits and headers.
    #[serde(default)]
    pub plan: Option<String>,
    /// Free-form values, available to later policies and the admin API.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub credentials: Credentials,
    /// This consumer's own limits, replacing its plan's
    /// (`rate_limiting.plans`); keyed by consumer unless they say otherwise.
    #[serde(default)]
    pub limits: Option<Vec<Limit>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[serde(default)]
    pub api_keys: Vec<ApiKeyCredential>,
    /// Client certificates (TLS listeners with `client_auth`) that identify
    /// this consumer.
    #[serde(default)]
    pub mtls: Vec<MtlsCredential>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCredential {
    /// SHA-256 of the key, hex (`portico hash-key` prints it).
    #[serde(default)]
    pub sha256: Option<String>,
    /// The key itself, only as `${ENV_VAR}` (never written in the file).
    #[serde(default)]
    pub key: Option<String>,
    /// A revoked key is refused (as an unknown key is).
    #[serde(default)]
    pub revoked: bool,
}

/// One way to recognise a client certificate; exactly one key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct MtlsCredential {
    /// SHA-256 of the certificate (DER), hex.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// The subject DN as the gateway writes it (`CN=app,O=Example`).
    #[serde(default)]
    pub subject: Option<String>,
    /// A subject alternative name: `DNS:app.example`, `URI:spiffe://...`.
    #[serde(default)]
    pub san: Option<String>,
}

// ---------------------------------------------------------------- auth

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// Upstream headers naming the authenticated consumer; the gateway
    /// removes them from every client request first.
    #[serde(default)]
    pub consumer_headers: ConsumerHeaders,
    #[serde(default)]
    pub jwt_issuers: Vec<JwtIssuer>,
    #[serde(default)]
    pub introspection: Vec<Introspection>,
    /// Verified tokens (JWT and introspection results) kept in memory.
    #[serde(default = "defaults::token_cache_size")]
    pub token_cache_size: usize,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            consumer_headers: ConsumerHeaders::default(),
            jwt_issuers: Vec::new(),
            introspection: Vec::new(),
            token_cache_size: defaults::token_cache_size(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsumerHeaders {
    #[serde(default = "defaults::consumer_id_header")]
    pub id: String,
    /// Comma-separated groups.
    #[serde(default = "defaults::consumer_groups_header")]
    pub groups: String,
    #[serde(default = "defaults::consumer_plan_header")]
    pub plan: String,
    /// The authentication method that identified the request.
    #[serde(default = "defaults::auth_method_header")]
    pub method: String,
}

impl Default for ConsumerHeaders {
    fn default() -> Self {
        ConsumerHeaders {
            id: defaults::consumer_id_header(),
            groups: defaults::consumer_groups_header(),
            plan: defaults::consumer_plan_header(),
            method: defaults::auth_method_header(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    /// How routes refer to this issuer.
    pub name: String,
    /// The expected `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values (any one must be present); none = not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted `alg` values (never `none`).
    pub algorithms: Vec<String>,
    /// Keys written in the file (JWK, PEM or HMAC secret).
    #[serde(default)]
    pub keys: Vec<JwtKey>,
    /// A JWKS document on disk.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// A JWKS URL, fetched at start and refreshed.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// How often the JWKS URL is fetched again.
    #[serde(default = "defaults::jwks_refresh")]
    pub jwks_refresh: Dur,
    /// At most one refetch this often when a token names an unknown `kid`.
    #[serde(default = "defaults::jwks_min_refresh")]
    pub jwks_min_refresh: Dur,
    /// Timeout of a JWKS fetch.
    #[serde(default = "defaults::fetch_timeout")]
    pub jwks_timeout: Dur,
    /// CA bundle (PEM) that verifies an `https://` JWKS URL; default: the
    /// public web roots.
    #[serde(default)]
    pub jwks_ca: Option<String>,
    /// Tolerance for `exp`, `nbf` and `iat`.
    #[serde(default = "defaults::jwt_leeway")]
    pub leeway: Dur,
    /// Claims that must be present (`exp` always is).
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Tokens longer than this are refused before parsing.
    #[serde(default = "defaults::max_token_size")]
    pub max_token_size: Size,
    /// A claim whose value names the consumer (e.g. `azp`, `client_id`);
    /// a token whose claim names no consumer is refused.
    #[serde(default)]
    pub consumer_claim: Option<String>,
}

/// One key of an issuer; exactly one of `jwk`, `pem`, `pem_file`, `secret`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    /// Key id matched against the token's `kid` (a JWK's own `kid` otherwise).
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub jwk: Option<serde_json::Value>,
    /// A PEM public key (RSA, EC or Ed25519).
    #[serde(default)]
    pub pem: Option<String>,
    #[serde(default)]
    pub pem_file: Option<String>,
    /// An HMAC secret (HS256/384/512), only as `${ENV_VAR}`.
    #[serde(default)]
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Introspection {
    pub name: String,
    /// The RFC 7662 endpoint (`http://` or `https://`).
    pub url: String,
    pub client_id: String,
    /// Only as `${ENV_VAR}`.
    pub client_secret: String,
    #[serde(default = "defaults::fetch_timeout")]
    pub timeout: Dur,
    /// CA bundle (PEM) that verifies an `https://` endpoint; default: the
    /// public web roots.
    #[serde(default)]
    pub ca: Option<String>,
    /// Active tokens are cached until their `exp`, at most this long.
    #[serde(default = "defaults::introspection_max_ttl")]
    pub cache_ttl: Dur,
    /// Inactive tokens are remembered this long.
    #[serde(default = "defaults::introspection_inactive_ttl")]
    pub inactive_ttl: Dur,
    /// The status answered (400–599) when the endpoint cannot be reached,
    /// times out, or answers an error or invalid JSON: the request is
    /// never let through.
    #[serde(default = "defaults::introspection_unavailable")]
    pub unavailable_status: u16,
    /// A field of the introspection response naming the consumer (e.g.
    /// `client_id`); an active token whose field names no consumer is
    /// refused.
    #[serde(default)]
    pub consumer_claim: Option<String>,
    /// Tokens longer than this are refused without asking the server.
    #[serde(default = "defaults::max_token_size")]
    pub max_token_size: Size,
}

// ---------------------------------------------------------------- rate limiting

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RateLimiting {
    /// Where limits keep their counters unless a limit says otherwise.
    #[serde(default)]
    pub backend: LimitBackend,
    #[serde(default)]
    pub local: LocalLimits,
    /// The Redis server of the `redis` and `hybrid` backends.
    #[serde(default)]
    pub redis: Option<RedisLimits>,
    /// Plan name → limits applied (by `rate_limit` policies with `plans`)
    /// to consumers of that plan, keyed by consumer by default.
    #[serde(default)]
    pub plans: BTreeMap<String, Vec<Limit>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitBackend {
    /// In memory, per instance.
    #[default]
    Local,
    /// One Redis round trip per decision (exact across instances).
    Redis,
    /// Local decisions from allowances reserved from Redis in batches.
    Hybrid,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalLimits {
    /// Keys kept in memory at most (per backend store); idle keys are
    /// forgotten first.
    #[serde(default = "defaults::max_limit_keys")]
    pub max_keys: usize,
}

impl Default for LocalLimits {
    fn default() -> Self {
        LocalLimits {
            max_keys: defaults::max_limit_keys(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisLimits {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Longest wait for one Redis call (connect included).
    #[serde(default = "defaults::redis_timeout")]
    pub timeout: Dur,
    /// Prefix of every key (`{<prefix>:limit:...}`).
    #[serde(default = "defaults::redis_prefix")]
    pub prefix: String,
    /// When Redis is unavailable: `fail_open` (limit locally, each
    /// instance with the limit divided by `expected_instances`) or
    /// `fail_closed` (503). Limits may override.
    #[serde(default)]
    pub on_error: FailMode,
    /// How many gateway instances share the limits (for `fail_open`).
    #[serde(default = "defaults::one_u32")]
    pub expected_instances: u32,
    /// Consecutive failed calls that open the circuit breaker.
    #[serde(default = "defaults::three")]
    pub failure_threshold: u32,
    /// How long Redis is skipped once the breaker opened (then one call
    /// probes it).
    #[serde(default = "defaults::redis_cooldown")]
    pub cooldown: Dur,
    /// Hybrid mode: units an instance reserves per sync (the accuracy
    /// bound is instances × batch per window). Limits may override.
    #[serde(default = "defaults::limit_batch")]
    pub batch: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    FailOpen,
    FailClosed,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CalendarWindow {
    Minute,
    Hour,
    Day,
    Month,
}

/// A limit key: one part or a list of parts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum KeySpec {
    One(String),
    Many(Vec<String>),
}

/// One limit; exactly one of `rate`, `quota`, `concurrent`, `websockets`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Unique within its list; the name in the RateLimit headers.
    pub name: String,
    /// Throttle (GCRA): this many requests per `per`...
    #[serde(default)]
    pub rate: Option<u64>,
    /// ... (default 1s) ...
    #[serde(default)]
    pub per: Option<Dur>,
    /// ... and at most this many at once (default: `rate`).
    #[serde(default)]
    pub burst: Option<u64>,
    /// Quota: this many requests per `window` or `sliding` window.
    #[serde(default)]
    pub quota: Option<u64>,
    /// A calendar window in UTC: `minute`, `hour`, `day`, `month`.
    #[serde(default)]
    pub window: Option<CalendarWindow>,
    /// A sliding window of this length (at least 1s).
    #[serde(default)]
    pub sliding: Option<Dur>,
    /// At most this many requests in flight per key.
    #[serde(default)]
    pub concurrent: Option<u64>,
    /// At most this many WebSocket (upgrade) connections open per key.
    #[serde(default)]
    pub websockets: Option<u64>,
    /// This limit's own key (default: the policy's; plan and consumer
    /// limits: `consumer`).
    #[serde(default)]
    pub key: Option<KeySpec>,
    /// Default: `rate_limiting.backend`.
    #[serde(default)]
    pub backend: Option<LimitBackend>,
    /// Default: `rate_limiting.redis.on_error`.
    #[serde(default)]
    pub on_error: Option<FailMode>,
    /// Default: `rate_limiting.redis.batch`.
    #[serde(default)]
    pub batch: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// A missing part (no consumer, header absent) becomes the client IP.
    #[default]
    ClientIp,
    /// The limit does not apply to the request.
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    /// The key of the limits (default `client_ip`).
    #[serde(default)]
    pub key: Option<KeySpec>,
    /// What a missing key part means.
    #[serde(default)]
    pub missing_key: MissingKey,
    /// Units each request counts for.
    #[serde(default = "defaults::one_u64")]
    pub cost: u64,
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Also apply the consumer's own limits, or else its plan's.
    #[serde(default = "defaults::yes")]
    pub plans: bool,
    /// `RateLimit-Policy` and `RateLimit` on every response.
    #[serde(default = "defaults::yes")]
    pub headers: bool,
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset` too.
    #[serde(default)]
    pub legacy_headers: bool,
}

// ---------------------------------------------------------------- route groups

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteGroup {
    pub name: String,
    /// Run before each member route's own policies.
    #[serde(default)]
    pub policies: Vec<Policy>,
}

// ---------------------------------------------------------------- access log

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// A file (appended to; reopened on SIGUSR1) or `stdout`.
    #[serde(default = "defaults::access_log_path")]
    pub path: String,
    /// Fields of each line, in a fixed order; all when absent.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// Share of successful requests logged (0 to 1); errors always are.
    #[serde(default = "defaults::one")]
    pub sample: f64,
    /// Lines queued for the writer before new ones are dropped (counted).
    #[serde(default = "defaults::access_log_buffer")]
    pub buffer: usize,
}

// ---------------------------------------------------------------- tracing

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// Where spans are exported (OTLP over HTTP, protobuf).
    pub otlp: Otlp,
    /// The share of new traces (no sampled/unsampled parent to follow) that
    /// are recorded, 0.0–1.0.
    #[serde(default = "defaults::sample_ratio")]
    pub sample_ratio: f64,
    /// Follow the incoming `traceparent`'s sampled flag when there is one.
    #[serde(default = "defaults::yes")]
    pub parent_based: bool,
    /// The `service.name` resource attribute.
    #[serde(default = "defaults::service_name")]
    pub service_name: String,
    #[serde(default)]
    pub batch: TracingBatch,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Otlp {
    /// `http://host:port/path`; `/v1/traces` when the path is empty.
    pub endpoint: String,
    /// Extra request headers (e.g. an API key for a hosted collector).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Connect + export request timeout.
    #[serde(default = "defaults::otlp_timeout")]
    pub timeout: Dur,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingBatch {
    /// Spans per export request (an export is sent as soon as this many wait).
    pub max_spans: usize,
    /// Export what is waiting at least this often.
    pub interval: Dur,
    /// Spans waiting for export at most; more are dropped (and counted).
    pub queue: usize,
}

impl Default for TracingBatch {
    fn default() -> Self {
        TracingBatch {
            max_spans: 512,
            interval: Dur(Duration::from_secs(1)),
            queue: 8192,
        }
    }
}

// ---------------------------------------------------------------- admin

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `host:port` of the admin listener; loopback by default.
    #[serde(default = "defaults::admin_address")]
    pub address: String,
    /// Bearer token required on every admin endpoint but `/healthz` and
    /// `/readyz`; mandatory when `address` is not a loopback address.
    #[serde(default)]
    pub token: Option<String>,
}

// ---------------------------------------------------------------- listeners

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    /// `host:port` to bind, e.g. `0.0.0.0:8080` or `[::1]:8080`.
    pub address: String,
    /// Peers (CIDRs or addresses) whose `X-Forwarded-*`/`Forwarded` headers are trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// How long a client may take to send a request's headers.
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Dur,
    /// Maximum size of the request line plus headers (431 beyond).
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: Size,
    /// Maximum number of request headers (431 beyond).
    #[serde(default = "defaults::max_headers")]
    pub max_headers: usize,
    /// Maximum length of the request target, path and query (414 beyond).
    #[serde(default = "defaults::max_uri_bytes")]
    pub max_uri_bytes: Size,
    /// Maximum request body size (413 beyond); `0` = unlimited. Routes may override.
    #[serde(default)]
    pub max_body_bytes: Size,
    /// How long a kept-alive connection may sit with no request in flight
    /// before it is closed (HTTP/2: GOAWAY); `0` disables.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Dur,
    /// Longest wait for the next piece of a request body (408); `0` disables.
    #[serde(default = "defaults::body_read_timeout")]
    pub body_read_timeout: Dur,
    /// Open connections on this listener; `0` = unlimited. Beyond it new
    /// connections are closed at once.
    #[serde(default)]
    pub max_connections: usize,
    /// Open connections per client IP (TCP peer); `0` = unlimited.
    #[serde(default)]
    pub max_connections_per_ip: usize,
    /// A connection is closed (after its in-flight request) once this old; `0` = never.
    #[serde(default)]
    pub max_connection_lifetime: Dur,
    /// Accept HTTP/2: with prior knowledge (h2c) on plain listeners, by ALPN on TLS ones.
    #[serde(default = "defaults::yes")]
    pub http2: bool,
    /// HTTP/2: concurrent streams per connection.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Terminate TLS on this listener (docs/tls.md).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Plain listeners: answer every request with `308` to the same URL over HTTPS.
    #[serde(default)]
    pub redirect_to_https: Option<RedirectToHttps>,
    /// TLS listeners: add `Strict-Transport-Security` to every response.
    #[serde(default)]
    pub hsts: Option<Hsts>,
    /// Header carrying the verified client certificate upstream; any value
    /// the client sent under this name is always removed.
    #[serde(default)]
    pub client_identity_header: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificate chains and keys; chosen by SNI.
    pub certificates: Vec<Certificate>,
    /// Ask clients for certificates (mTLS).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM file: the certificate, then its intermediates. Relative paths are
    /// taken from the config file's directory.
    pub cert: String,
    /// PEM file: the private key (PKCS#8, RSA or EC).
    pub key: String,
    /// Names served (exact or `*.suffix`); default: the certificate's DNS SANs.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Served when the client sends no SNI or an unknown name; default: the first.
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    pub mode: ClientAuthMode,
    /// PEM bundle of the CAs that sign client certificates.
    pub ca: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// A client may present a certificate; if it does, it must verify.
    Optional,
    /// A client must present a certificate that verifies.
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectToHttps {
    /// HTTPS port in the `Location`; omitted when 443.
    #[serde(default = "defaults::https_port")]
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hsts {
    #[serde(default = "defaults::hsts_max_age")]
    pub max_age: Dur,
    #[serde(default)]
    pub include_subdomains: bool,
    #[serde(default)]
    pub preload: bool,
}

// ---------------------------------------------------------------- upstreams

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    /// How Portico speaks to the targets: `http1` (default), `h2c` (HTTP/2
    /// with prior knowledge, e.g. gRPC services), or `h2` (HTTP/2 over TLS).
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub balance: Balance,
    /// Key for `balance: consistent_hash`: `header:NAME`, `cookie:NAME`,
    /// `client_ip` or `path`.
    #[serde(default)]
    pub hash_on: Option<String>,
    /// How often hostnames in targets are re-resolved.
    #[serde(default = "defaults::resolve_interval")]
    pub resolve_interval: Dur,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Speak TLS to the targets (docs/tls.md).
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// A concurrency limit that follows the upstream's latency (docs/overload.md).
    #[serde(default)]
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
    /// Stop sending requests while the upstream fails (docs/overload.md).
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreaker>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdaptiveAlgorithm {
    /// Gradient (Netflix gradient2 style): the limit follows the ratio of
    /// the long-term to the recent latency.
    #[default]
    Gradient,
    /// Additive increase, multiplicative decrease on a latency threshold
    /// and on overload answers.
    Aimd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConcurrency {
    #[serde(default)]
    pub algorithm: AdaptiveAlgorithm,
    #[serde(default = "defaults::adaptive_min")]
    pub min_limit: u32,
    #[serde(default = "defaults::adaptive_max")]
    pub max_limit: u32,
    /// The limit before any latency was measured.
    #[serde(default = "defaults::adaptive_initial")]
    pub initial_limit: u32,
    /// Latency samples are averaged over windows at least this long ...
    #[serde(default = "defaults::adaptive_window")]
    pub window: Dur,
    /// ... holding at least this many samples.
    #[serde(default = "defaults::adaptive_min_samples")]
    pub min_samples: u32,
    /// gradient: how much the recent latency may exceed the long-term one
    /// before the limit shrinks (1.5 = 50% more).
    #[serde(default = "defaults::adaptive_tolerance")]
    pub tolerance: f64,
    /// gradient: weight of each new estimate (0 < smoothing <= 1).
    #[serde(default = "defaults::adaptive_smoothing")]
    pub smoothing: f64,
    /// gradient: the long-term latency is an average over about this many
    /// windows.
    #[serde(default = "defaults::adaptive_long_window")]
    pub long_window: u32,
    /// aimd: a window whose average latency exceeds this is congestion
    /// (required for `aimd`).
    #[serde(default)]
    pub latency_threshold: Option<Dur>,
    /// aimd: the limit is multiplied by this on congestion (0.5 <= x < 1).
    #[serde(default = "defaults::adaptive_backoff")]
    pub backoff_ratio: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Share of failed requests in the window that opens the circuit.
    #[serde(default = "defaults::cb_failure_ratio")]
    pub failure_ratio: f64,
    /// Requests the window must hold before the ratio is considered.
    #[serde(default = "defaults::cb_min_requests")]
    pub min_requests: u32,
    /// The sliding window the ratio is computed over.
    #[serde(default = "defaults::cb_window")]
    pub window: Dur,
    /// How long an open circuit refuses requests before probing.
    #[serde(default = "defaults::cb_open_for")]
    pub open_for: Dur,
    /// Probe requests let through when half-open; that many successes
    /// close the circuit, one failure reopens it.
    #[serde(default = "defaults::three")]
    pub half_open_probes: u32,
    /// Response statuses counted as failures (codes or `NNN-NNN` ranges),
    /// besides connect failures, timeouts and broken exchanges.
    #[serde(default = "defaults::cb_statuses")]
    pub failure_statuses: Vec<StatusRange>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM bundle of the CAs trusted for the targets; default: the webpki (Mozilla) roots.
    #[serde(default)]
    pub ca: Option<String>,
    /// Name sent as SNI and checked in the certificate; default: the target's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate (PEM chain) presented to the targets.
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `host:port`; the host may be an IP address or a name resolved by DNS.
    pub address: String,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http1,
    H2c,
    H2,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round-robin.
    #[default]
    RoundRobin,
    /// Power of two choices over in-flight requests and peak-EWMA latency.
    LeastRequest,
    /// Ring hash on `hash_on`.
    ConsistentHash,
    /// Weighted random.
    Random,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Idle keep-alive connections kept per target.
    pub max_idle: usize,
    /// An idle connection older than this is closed.
    pub idle_timeout: Dur,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            max_idle: 256,
            idle_timeout: Dur(Duration::from_secs(60)),
        }
    }
}

/// Upstream timeouts. `0` disables one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect to a target. Default 5s.
    pub connect: Option<Dur>,
    /// From sending the request until the response headers arrive. Default 30s.
    pub response_header: Option<Dur>,
    /// The whole exchange, retries and response body included. Default: none.
    pub request: Option<Dur>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Retries {
    /// Additional attempts after the first.
    pub attempts: u32,
    /// When to retry: `connect_failure`, `timeout`, or HTTP status codes.
    pub on: Vec<RetryOn>,
    pub backoff: Backoff,
    pub budget: RetryBudget,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 1,
            on: vec![RetryOn::Condition(RetryCondition::ConnectFailure)],
            backoff: Backoff::default(),
            budget: RetryBudget::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RetryOn {
    Status(u16),
    Condition(RetryCondition),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RetryCondition {
    /// The connection could not be made (the request was never sent).
    ConnectFailure,
    /// No response headers within `timeouts.response_header`.
    Timeout,
    /// The connection broke after the request was sent.
    Reset,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    pub base: Dur,
    pub max: Dur,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Dur(Duration::from_millis(25)),
            max: Dur(Duration::from_millis(250)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudget {
    /// Retries may add at most this fraction of requests.
    pub ratio: f64,
    /// Retries always allowed on top of the ratio (per budget window).
    pub min_retries: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ratio: 0.2,
            min_retries: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: String,
    #[serde(default = "defaults::hc_interval")]
    pub interval: Dur,
    #[serde(default = "defaults::hc_timeout")]
    pub timeout: Dur,
    #[serde(default = "defaults::two")]
    pub healthy_threshold: u32,
    #[serde(default = "defaults::three")]
    pub unhealthy_threshold: u32,
    /// Statuses counted as healthy: a list of codes or `NNN-NNN` ranges. Default `200-399`.
    #[serde(default = "defaults::hc_statuses")]
    pub expected_status: Vec<StatusRange>,
    /// Host header for the probe; default: the target's address.
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StatusRange {
    Code(u16),
    Range(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// Consecutive failures (connect errors, timeouts, 5xx) that eject a target; 0 disables.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further one doubles it, up to `max_ejection`.
    pub base_ejection: Dur,
    pub max_ejection: Dur,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection: Dur(Duration::from_secs(10)),
            max_ejection: Dur(Duration::from_secs(300)),
        }
    }
}

// ---------------------------------------------------------------- routes

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    /// Listeners this route is served on; default: all.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Higher wins over any path specificity; default 0.
    #[serde(default)]
    pub priority: i32,
    #[serde(rename = "match", default)]
    pub matcher: Match,
    #[serde(default)]
    pub policies: Vec<Policy>,
    pub action: Action,
    /// Overrides the listener's `max_body_bytes` for this route (`0` = unlimited).
    #[serde(default)]
    pub max_body_bytes: Option<Size>,
    /// A `route_groups` entry whose policies run before this route's.
    #[serde(default)]
    pub group: Option<String>,
    /// This route's own concurrency limit (docs/overload.md).
    #[serde(default)]
    pub concurrency: Option<ConcurrencyLimit>,
    /// The priority class of this route's requests (a `priorities` class),
    /// unless the consumer's group or a trusted header says otherwise.
    #[serde(default)]
    pub priority_class: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Exact names or `*.suffix` wildcards; empty = any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Exact path, or a template with `{param}` segments and a final `{*rest}`.
    #[serde(default)]
    pub path: Option<String>,
    /// Segment-wise prefix: `/api` matches `/api` and `/api/...`, not `/apis`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query: Vec<ValueMatch>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: must be present; `false`: must be absent.
    #[serde(default)]
    pub present: Option<bool>,
}

/// One policy step; exactly one key is set (checked by the compiler).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Request and response header changes.
    #[serde(default)]
    pub headers: Option<HeadersPolicy>,
    /// Who is calling: API key, JWT, introspection, mTLS, or anonymous.
    #[serde(default)]
    pub auth: Option<AuthPolicy>,
    /// Whether the caller may: consumers, groups, scopes, roles, claims, IPs.
    #[serde(default)]
    pub access: Option<AccessPolicy>,
    /// Cross-origin requests: preflights answered, CORS response headers.
    #[serde(default)]
    pub cors: Option<CorsPolicy>,
    /// Body size, content type and JSON Schema of the request.
    #[serde(default)]
    pub validate: Option<ValidatePolicy>,
    /// Validate requests against the operations of an OpenAPI 3 document.
    #[serde(default)]
    pub openapi: Option<OpenApiPolicy>,
    /// Rate limits, quotas and concurrency limits.
    #[serde(default)]
    pub rate_limit: Option<RateLimitPolicy>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthPolicy {
    /// Accepted methods, tried in order; the first whose credential is
    /// present decides.
    pub methods: Vec<AuthMethod>,
    /// Requests without any credential pass as the `anonymous` consumer.
    #[serde(default)]
    pub anonymous: bool,
    /// Remove the credential (API key header/parameter, bearer token) before
    /// forwarding.
    #[serde(default = "defaults::yes")]
    pub strip_credentials: bool,
    /// Token claims copied to upstream headers (`sub: X-User-Id`); the
    /// gateway removes these headers from the client's request first.
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
}

/// One accepted method; exactly one key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthMethod {
    #[serde(default)]
    pub api_key: Option<ApiKeyMethod>,
    #[serde(default)]
    pub jwt: Option<JwtMethod>,
    #[serde(default)]
    pub introspection: Option<IntrospectionMethod>,
    /// The verified client certificate of a TLS listener with `client_auth`.
    #[serde(default)]
    pub mtls: Option<MtlsMethod>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyMethod {
    /// Header carrying the key.
    #[serde(default = "defaults::api_key_header")]
    pub header: Option<String>,
    /// Query parameter carrying the key (none by default).
    #[serde(default)]
    pub query: Option<String>,
}

impl Default for ApiKeyMethod {
    fn default() -> Self {
        ApiKeyMethod {
            header: defaults::api_key_header(),
            query: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtMethod {
    /// Names of `auth.jwt_issuers` whose tokens are accepted.
    pub issuers: Vec<String>,
    /// Read the token from this header (raw, or after `Bearer `) instead
    /// of `Authorization: Bearer`.
    #[serde(default)]
    pub header: Option<String>,
    /// Read the token from this cookie.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Read the token from this query parameter.
    #[serde(default)]
    pub query: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionMethod {
    /// A name of `auth.introspection`.
    pub server: String,
    /// Read the token from this header (raw, or after `Bearer `) instead
    /// of `Authorization: Bearer`.
    #[serde(default)]
    pub header: Option<String>,
    /// Read the token from this cookie.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Read the token from this query parameter.
    #[serde(default)]
    pub query: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct MtlsMethod {}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// Allowed consumer ids (any); empty = any.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Allowed consumer groups (any); empty = any.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Every one of these scopes is required (`scope` claim, space-separated,
    /// or `scp` / `scope` as an array).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// At least one of these roles is required.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Where roles are read from: a claim name or dot path.
    #[serde(default = "defaults::roles_claim")]
    pub roles_claim: String,
    /// Claim equality (`tenant: acme`); an array claim must contain the value.
    #[serde(default)]
    pub claims: BTreeMap<String, serde_json::Value>,
    /// Client addresses allowed (CIDR); empty = any.
    #[serde(default)]
    pub ip_allow: Vec<String>,
    /// Client addresses refused (CIDR); checked first.
    #[serde(default)]
    pub ip_deny: Vec<String>,
}

/// Cross-origin resource sharing (docs/access-control.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorsPolicy {
    /// Exact origins (`https://app.example.com`), `*` (alone), or patterns
    /// whose first host label is `*` (`https://*.example.com`: one or more
    /// labels before `.example.com`, never `example.com` itself).
    pub allow_origins: Vec<String>,
    /// Methods a preflight may ask for.
    #[serde(default = "defaults::cors_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a preflight may ask for; `*` = any.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers the browser lets the page read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Allow cookies and HTTP authentication (`Access-Control-Allow-Credentials`).
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight answer (`Access-Control-Max-Age`).
    #[serde(default)]
    pub max_age: Option<Dur>,
}

/// Request checks before the action (docs/access-control.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ValidatePolicy {
    /// Largest request body. Without it: 1 MiB when a JSON Schema is set
    /// (the body is read to be validated), else only the route's limit.
    #[serde(default)]
    pub max_body: Option<Size>,
    /// Allowed media types (`application/json`, `text/*`) of requests with a body.
    #[serde(default)]
    pub content_types: Vec<String>,
    /// JSON Schema the request body must satisfy (inline).
    #[serde(default)]
    pub json_schema: Option<serde_json::Value>,
    /// JSON Schema in a file (JSON or YAML), relative to the config file.
    #[serde(default)]
    pub json_schema_file: Option<String>,
    /// Refuse requests without a body (400 `validation_failed`).
    #[serde(default)]
    pub require_body: bool,
}

/// Validate requests against an OpenAPI 3 document (docs/access-control.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OpenApiPolicy {
    /// An OpenAPI 3.0/3.1 document (JSON or YAML), relative to the config file.
    pub spec: String,
    /// Prefix of the request path before the document's paths (`/api`).
    #[serde(default)]
    pub base_path: Option<String>,
    /// Requests that match no operation of the document: refused (404, or
    /// 405 when only the method is unknown) or passed unchecked.
    #[serde(default = "defaults::yes")]
    pub reject_unknown: bool,
    /// Largest JSON body read for validation.
    #[serde(default = "defaults::validate_max_body")]
    pub max_body: Size,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeadersPolicy {
    #[serde(default)]
    pub request: HeaderOps,
    #[serde(default)]
    pub response: HeaderOps,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Replace (or create) these headers.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append these values, keeping existing ones.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// The route's action; exactly one key is set (checked by the compiler).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Action {
    #[serde(default)]
    pub proxy: Option<ProxyAction>,
    #[serde(default)]
    pub respond: Option<RespondAction>,
    #[serde(default)]
    pub echo: Option<EchoAction>,
    /// Fan out to several upstream calls and answer one merged JSON
    /// document (docs/aggregation.md).
    #[serde(default)]
    pub aggregate: Option<AggregateAction>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyAction {
    pub upstream: String,
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    /// Host header sent upstream: `target` (default), `preserve` (the client's), or a literal value.
    #[serde(default)]
    pub host_header: Option<String>,
    /// Per-route override of the upstream's timeouts.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// Per-route override of the upstream's retries.
    #[serde(default)]
    pub retries: Option<Retries>,
    /// Allow WebSocket (and other) upgrades; default true.
    #[serde(default = "defaults::yes")]
    pub upgrades: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Remove this leading path prefix.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Replace a leading prefix: `{from: /api, to: /internal}`.
    #[serde(default)]
    pub replace_prefix: Option<ReplacePrefix>,
    /// Build the path from captured params, e.g. `/internal/users/{id}`.
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplacePrefix {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RespondAction {
    #[serde(default = "defaults::status_ok")]
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A text body.
    #[serde(default)]
    pub body: Option<String>,
    /// A JSON body (sets `content-type: application/json`).
    #[serde(default)]
    pub json: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EchoAction {
    /// Status to answer with; default 200.
    #[serde(default = "defaults::status_ok")]
    pub status: u16,
}

/// The `aggregate` action: named calls, run in dependency order (parallel
/// where independent), merged into one JSON object. docs/aggregation.md is
/// the reference.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AggregateAction {
    /// The calls, in merge order (later top-level fields win).
    pub calls: Vec<AggregateCall>,
    /// The query parameter carrying a client-chosen sparse fieldset
    /// (`?fields=user.name,posts.title`); off when unset.
    #[serde(default)]
    pub fields_param: Option<String>,
    /// Bytes of upstream bodies one aggregated request may read, all calls
    /// together. Default 4 MiB.
    #[serde(default = "defaults::aggregate_max_total_body")]
    pub max_total_body: Size,
}

/// One call of an `aggregate` action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AggregateCall {
    /// Unique within the action; templates refer to it as `{calls.NAME...}`.
    pub name: String,
    pub upstream: String,
    /// Default `GET`.
    #[serde(default = "defaults::get")]
    pub method: String,
    /// Path template, e.g. `/users/{path.id}/posts`.
    pub path: String,
    /// Query parameters: name → value template.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Request headers: name → value template.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body template (strings are templates); sets
    /// `content-type: application/json`.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// The whole call (waiting for a shared flight included), response body
    /// read. Default 10s.
    #[serde(default = "defaults::aggregate_call_timeout")]
    pub timeout: Dur,
    /// A failed required call fails the request (502, 504 on timeout).
    /// Default true.
    #[serde(default = "defaults::yes")]
    pub required: bool,
    /// Used as the call's result when an optional call fails.
    #[serde(default)]
    pub fallback: Option<serde_json::Value>,
    /// Largest response body read from this call. Default 1 MiB.
    #[serde(default = "defaults::aggregate_call_max_body")]
    pub max_body: Size,
    /// Collapse identical concurrent calls into one upstream request.
    #[serde(default)]
    pub single_flight: bool,
    /// Keep successful GET answers in memory.
    #[serde(default)]
    pub cache: Option<AggregateCache>,
    /// Share single-flight and cached answers across consumers (otherwise
    /// the consumer is part of the key). Default false.
    #[serde(default)]
    pub public: bool,
    /// Put the result under this key (dot path) instead of merging its
    /// fields at the top level.
    #[serde(default)]
    pub group: Option<String>,
    /// Take this sub-value (dot path) of the response as the result.
    #[serde(default)]
    pub target: Option<String>,
    /// Keep only these fields (dot paths; arrays apply to each element).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Drop these fields (dot paths; arrays apply to each element).
    #[serde(default)]
    pub deny: Vec<String>,
    /// Rename fields: from (dot path) → to (dot path).
    #[serde(default)]
    pub mapping: BTreeMap<String, String>,
    /// The result is an array (shaping applies to each element); it goes
    /// under `group`, or under the call's name.
    #[serde(default)]
    pub collection: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AggregateCache {
    /// Upper bound on how long an answer is kept; the upstream's
    /// `Cache-Control` may shorten it or forbid storing.
    pub ttl: Dur,
    /// Entries kept at most (per call). Default 1024.
    #[serde(default = "defaults::aggregate_cache_entries")]
    pub max_entries: usize,
}

pub(crate) mod defaults {
    use super::{Dur, Size, StatusRange};
    use std::time::Duration;

    pub fn header_read_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn max_header_bytes() -> Size {
        Size(64 * 1024)
    }
    pub fn max_headers() -> usize {
        100
    }
    pub fn max_uri_bytes() -> Size {
        Size(8 * 1024)
    }
    pub fn idle_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn body_read_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn max_concurrent_streams() -> u32 {
        100
    }
    pub fn sample_ratio() -> f64 {
        1.0
    }
    pub fn service_name() -> String {
        "portico".into()
    }
    pub fn otlp_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn drain_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn upgrade_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn resolve_interval() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn hc_interval() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn hc_timeout() -> Dur {
        Dur(Duration::from_secs(2))
    }
    pub fn two() -> u32 {
        2
    }
    pub fn three() -> u32 {
        3
    }
    pub fn hc_statuses() -> Vec<StatusRange> {
        vec![StatusRange::Range("200-399".into())]
    }
    pub fn yes() -> bool {
        true
    }
    pub fn https_port() -> u16 {
        443
    }
    pub fn hsts_max_age() -> Dur {
        Dur(Duration::from_secs(365 * 86400))
    }
    pub fn get() -> String {
        "GET".into()
    }
    pub fn aggregate_max_total_body() -> Size {
        Size(4 * 1024 * 1024)
    }
    pub fn aggregate_call_max_body() -> Size {
        Size(1024 * 1024)
    }
    pub fn aggregate_call_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn aggregate_cache_entries() -> usize {
        1024
    }
    pub fn status_ok() -> u16 {
        200
    }
    pub fn admin_address() -> String {
        "127.0.0.1:9901".into()
    }

    pub fn access_log_path() -> String {
        "stdout".into()
    }

    pub fn one() -> f64 {
        1.0
    }

    pub fn access_log_buffer() -> usize {
        10_000
    }

    pub fn token_cache_size() -> usize {
        10_000
    }
    pub fn consumer_id_header() -> String {
        "x-consumer-id".into()
    }
    pub fn consumer_groups_header() -> String {
        "x-consumer-groups".into()
    }
    pub fn consumer_plan_header() -> String {
        "x-consumer-plan".into()
    }
    pub fn auth_method_header() -> String {
        "x-auth-method".into()
    }
    pub fn jwks_refresh() -> Dur {
        Dur(Duration::from_secs(600))
    }
    pub fn jwks_min_refresh() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn fetch_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn jwt_leeway() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn max_token_size() -> Size {
        Size(8 * 1024)
    }
    pub fn introspection_max_ttl() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn introspection_inactive_ttl() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn introspection_unavailable() -> u16 {
        503
    }
    pub fn api_key_header() -> Option<String> {
        Some("x-api-key".into())
    }
    pub fn roles_claim() -> String {
        "roles".into()
    }
    pub fn cors_methods() -> Vec<String> {
        ["GET", "HEAD", "POST"].map(String::from).to_vec()
    }
    pub fn validate_max_body() -> Size {
        Size(1024 * 1024)
    }
    pub fn queue_timeout() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn retry_after() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn adaptive_min() -> u32 {
        5
    }
    pub fn adaptive_max() -> u32 {
        1000
    }
    pub fn adaptive_initial() -> u32 {
        20
    }
    pub fn adaptive_window() -> Dur {
        Dur(Duration::from_millis(100))
    }
    pub fn adaptive_min_samples() -> u32 {
        10
    }
    pub fn adaptive_tolerance() -> f64 {
        1.5
    }
    pub fn adaptive_smoothing() -> f64 {
        0.2
    }
    pub fn adaptive_long_window() -> u32 {
        50
    }
    pub fn adaptive_backoff() -> f64 {
        0.9
    }
    pub fn cb_failure_ratio() -> f64 {
        0.5
    }
    pub fn cb_min_requests() -> u32 {
        20
    }
    pub fn cb_window() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn cb_open_for() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn cb_statuses() -> Vec<StatusRange> {
        vec![StatusRange::Range("500-599".into())]
    }
    pub fn max_limit_keys() -> usize {
        1_000_000
    }
    pub fn redis_timeout() -> Dur {
        Dur(Duration::from_millis(100))
    }
    pub fn redis_prefix() -> String {
        "portico".into()
    }
    pub fn one_u32() -> u32 {
        1
    }
    pub fn one_u64() -> u64 {
        1
    }
    pub fn redis_cooldown() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn limit_batch() -> u64 {
        100
    }
}
