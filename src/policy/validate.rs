//! The `validate` policy: body size, media type and JSON Schema of the
//! request, checked before the action.
//!
//! - `max_body`: a smaller limit than the route's, enforced while the body
//!   streams (the client body's own limit is lowered), or while it is read
//!   for the schema; `413 payload_too_large`.
//! - `content_types`: a request with a body must declare one of these media
//!   types (parameters ignored, `type/*` wildcards); `415
//!   unsupported_media_type`.
//! - `json_schema` / `json_schema_file`: the body is read (at most
//!   `max_body`, 1 MiB by default) and parsed as JSON whatever its declared
//!   type, validated, and put back as the request's body (`Body::full`) for
//!   the action. Failures are `400 validation_failed` whose `error.details`
//!   lists `{"pointer", "reason"}` per failing location (at most
//!   [`MAX_DETAILS`]); reasons never quote the schema or echo the value.
//!
//! The helpers here (body reading, media ranges, schema building, error
//! details) are shared with the `openapi` policy.

use super::compile::{Env, Err};
use super::{Ctx, Flow, Policy, Step};
use crate::body::{Body, BodyError};
use crate::config::model;
use crate::error::{BoxError, ErrorKind, GatewayError};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Request};
use jsonschema::Validator;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// Most entries in `error.details` of one response.
pub const MAX_DETAILS: usize = 20;
/// Longest `reason` of one entry, in bytes.
const MAX_REASON: usize = 200;
/// `max_body` when a schema is set and no limit is given.
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

pub struct ValidatePolicy {
    /// Body limit: `u64::MAX` when none is set and the body is not read.
    pub max_body: u64,
    pub content_types: Vec<MediaRange>,
    pub schema: Option<Validator>,
    pub require_body: bool,
}

impl Policy for ValidatePolicy {
    fn name(&self) -> &'static str {
        "validate"
    }

    fn on_request<'a>(&'a self, req: &'a mut Request<Body>, _ctx: &'a mut Ctx) -> Step<'a> {
        if !has_body(req) {
            if self.require_body {
                return Step::Ready(Err(failed(vec![detail("", "a request body is required")])));
            }
            return Step::Ready(Ok(Flow::Continue));
        }
        if !self.content_types.is_empty() && !media_allowed(&self.content_types, req.headers()) {
            return Step::Ready(Err(unsupported(&self.content_types)));
        }
        if let Some(e) = declared_too_large(req.headers(), self.max_body) {
            return Step::Ready(Err(e));
        }
        let Some(schema) = &self.schema else {
            limit_body(req.body_mut(), self.max_body);
            return Step::Ready(Ok(Flow::Continue));
        };
        Step::Wait(Box::pin(async move {
            let bytes = read_body(req, self.max_body).await?;
            let mut details = Vec::new();
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => schema_errors(
                    schema,
                    &v,
                    &mut details,
                    |pointer, reason| serde_json::json!({"pointer": pointer, "reason": reason}),
                ),
                Err(e) => details.push(detail("", &json_error(&e))),
            }
            *req.body_mut() = Body::full(bytes);
            if details.is_empty() {
                Ok(Flow::Continue)
            } else {
                Err(failed(details))
            }
        }))
    }
}

// ---------------------------------------------------------------- compile

/// Compiles a `validate` step; `p` is its key path (`...policies[0].validate`).
pub fn compile(p: &str, v: &model::ValidatePolicy, env: &Env, err: Err) -> Option<ValidatePolicy> {
    let mut failed = false;
    let mut e = |k: String, m: String| {
        failed = true;
        err(k, m)
    };
    let mut content_types = Vec::new();
    for (i, t) in v.content_types.iter().enumerate() {
        match MediaRange::parse(t) {
            Some(m) => content_types.push(m),
            None => e(
                format!("{p}.content_types[{i}]"),
                format!("`{t}` is not a media type (`type/subtype` or `type/*`)"),
            ),
        }
    }
    if v.max_body == Some(crate::config::units::Size(0)) {
        e(
            format!("{p}.max_body"),
            "must be larger than 0 (leave it out for no limit of its own)".into(),
        );
    }
    let schema_value = match (&v.json_schema, &v.json_schema_file) {
        (Some(_), Some(_)) => {
            e(
                format!("{p}.json_schema_file"),
                "give `json_schema` or `json_schema_file`, not both".into(),
            );
            None
        }
        (Some(s), None) => Some((format!("{p}.json_schema"), s.clone(), String::new())),
        (None, Some(f)) => match read_document(&env.base.join(f)) {
            Ok(s) => Some((format!("{p}.json_schema_file"), s, format!("`{f}`: "))),
            Err(m) => {
                e(format!("{p}.json_schema_file"), m);
                None
            }
        },
        (None, None) => None,
    };
    let schema = match schema_value {
        Some((key, s, file)) => match build_schema(&s, None, None) {
            Ok(v) => Some(v),
            Err(m) => {
                e(key, format!("{file}{m}"));
                None
            }
        },
        None => None,
    };
    if failed {
        return None;
    }
    let max_body = match (v.max_body, &schema) {
        (Some(s), _) => s.0,
        (None, Some(_)) => DEFAULT_MAX_BODY,
        (None, None) => u64::MAX,
    };
    Some(ValidatePolicy {
        max_body,
        content_types,
        schema,
        require_body: v.require_body,
    })
}

/// Reads a JSON or YAML file (by extension: `.json` is JSON, anything
/// else YAML, which also reads JSON) into a value; a compile records it as
/// one of its inputs.
pub(crate) fn read_document(path: &Path) -> Result<Value, String> {
    let shown = path.display();
    let text = crate::config::inputs::read_to_string(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_string(),
            _ => e.to_string(),
        };
        format!("cannot read `{shown}`: {why}")
    })?;
    if path.extension().is_some_and(|x| x == "json") {
        serde_json::from_str(&text).map_err(|e| format!("`{shown}` is not valid JSON: {e}"))
    } else {
        serde_yaml::from_str(&text).map_err(|e| format!("`{shown}` is not valid YAML: {e}"))
    }
}

/// Builds a validator that resolves no reference outside `registry`,
/// with linear-time regular expressions (`pattern` runs on client input).
pub(crate) fn build_schema(
    schema: &Value,
    draft: Option<jsonschema::Draft>,
    registry: Option<&jsonschema::Registry<'_>>,
) -> Result<Validator, String> {
    let mut o = jsonschema::options()
        .offline()
        .with_pattern_options(jsonschema::PatternOptions::regex());
    if let Some(d) = draft {
        o = o.with_draft(d);
    }
    if let Some(r) = registry {
        o = o.with_registry(r);
    }
    o.build(schema).map_err(|e| {
        let mut m = Bounded::new(300);
        let _ = write!(m, "{e}");
        let at = e.instance_path().as_str();
        if at.is_empty() {
            format!("invalid JSON Schema: {}", m.0)
        } else {
            format!("invalid JSON Schema at `{at}`: {}", m.0)
        }
    })
}

// ---------------------------------------------------------------- request helpers

/// Whether the request has a body to check (not one known to be empty).
pub(crate) fn has_body(req: &Request<Body>) -> bool {
    !http_body::Body::is_end_stream(req.body())
}

/// 413 at once when `Content-Length` already exceeds `max`.
pub(crate) fn declared_too_large(h: &HeaderMap, max: u64) -> Option<GatewayError> {
    let len: u64 = h
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (len > max).then(|| GatewayError::from_body(BodyError::TooLarge(max)))
}

/// Enforces `max` on a body that streams on.
fn limit_body(body: &mut Body, max: u64) {
    if let Body::Client(c) = body {
        c.lower_limit(max);
    }
}

/// Reads the whole body, at most `max` bytes (more: 413, and the
/// connection is closed since the rest was not read).
pub(crate) async fn read_body(req: &mut Request<Body>, max: u64) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(max);
    let body = req.body_mut();
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(body_error)?;
        let Ok(data) = frame.into_data() else {
            // Trailers: not kept (the body is handed on as one buffer).
            continue;
        };
        total += data.len() as u64;
        if total > max {
            return Err(GatewayError::from_body(BodyError::TooLarge(max)));
        }
        // One frame (the common case) is kept as is, without a copy.
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(f) => {
                buf.reserve(
                    usize::try_from(declared)
                        .unwrap_or(0)
                        .max(f.len() + data.len()),
                );
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

fn body_error(e: BoxError) -> GatewayError {
    match BodyError::find(&*e) {
        Some(b) => GatewayError::from_body(*b),
        None => GatewayError::new(ErrorKind::BadRequest, "cannot read the request body")
            .with_header(header::CONNECTION, HeaderValue::from_static("close")),
    }
}

/// A media range of a `content_types` list: `type/subtype` or `type/*`
/// (`*/*`: anything), lower-case.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaRange {
    ty: Box<str>,
    /// `None`: any subtype.
    sub: Option<Box<str>>,
}

impl MediaRange {
    pub fn parse(s: &str) -> Option<MediaRange> {
        let essence = s.split(';').next()?.trim();
        let (ty, sub) = essence.split_once('/')?;
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        if ty == "*" {
            return (sub == "*").then(|| MediaRange {
                ty: "*".into(),
                sub: None,
            });
        }
        if !token(ty) || !(sub == "*" || token(sub)) {
            return None;
        }
        Some(MediaRange {
            ty: ty.to_ascii_lowercase().into(),
            sub: (sub != "*").then(|| sub.to_ascii_lowercase().into()),
        })
    }

    /// Whether a `Content-Type` value (parameters ignored) is in the range.
    pub fn matches(&self, content_type: &str) -> bool {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let Some((ty, sub)) = essence.split_once('/') else {
            return false;
        };
        if &*self.ty == "*" {
            return !ty.is_empty() && !sub.is_empty();
        }
        ty.eq_ignore_ascii_case(&self.ty)
            && match &self.sub {
                None => !sub.is_empty(),
                Some(s) => sub.eq_ignore_ascii_case(s),
            }
    }

    /// JSON: `application/json` or `application/*+json`.
    pub fn is_json(&self) -> bool {
        &*self.ty == "application"
            && self
                .sub
                .as_deref()
                .is_some_and(|s| s == "json" || s.ends_with("+json"))
    }
}

impl std::fmt::Display for MediaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ty, self.sub.as_deref().unwrap_or("*"))
    }
}

/// Whether the request's `Content-Type` is in one of `ranges` (no header: no).
pub(crate) fn media_allowed(ranges: &[MediaRange], h: &HeaderMap) -> bool {
    let Some(ct) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    ranges.iter().any(|r| r.matches(ct))
}

pub(crate) fn unsupported(ranges: &[MediaRange]) -> GatewayError {
    let list = ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    GatewayError::new(
        ErrorKind::UnsupportedMediaType,
        format!("the request body must be one of: {list}"),
    )
}

// ---------------------------------------------------------------- details

/// `400 validation_failed` with `details`.
pub(crate) fn failed(details: Vec<Value>) -> GatewayError {
    GatewayError::new(ErrorKind::ValidationFailed, "the request does not validate")
        .with_details(Value::Array(details))
}

fn detail(pointer: &str, reason: &str) -> Value {
    serde_json::json!({"pointer": pointer, "reason": reason})
}

/// A short reason for a JSON syntax error (position, not content).
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "the body ends before the JSON value does",
        serde_json::error::Category::Syntax => "the body is not valid JSON",
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            "the body is not a JSON value"
        }
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

/// Appends one entry per schema failure of `instance` (built by `entry`
/// from the JSON pointer and the reason) until `out` holds [`MAX_DETAILS`].
pub(crate) fn schema_errors(
    schema: &Validator,
    instance: &Value,
    out: &mut Vec<Value>,
    entry: impl Fn(String, String) -> Value,
) {
    for e in schema.iter_errors(instance) {
        if out.len() >= MAX_DETAILS {
            return;
        }
        use jsonschema::error::ValidationErrorKind as K;
        let mut pointer = e.instance_path().as_str().to_string();
        let mut reason = Bounded::new(MAX_REASON);
        match e.kind() {
            K::Required { property } => {
                // Point at the missing member itself.
                pointer.push('/');
                let name = property.as_str().unwrap_or("");
                pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
                reason.0.push_str("is required");
            }
            // Not quoted: a pattern or a sub-schema is the schema's business.
            K::Pattern { .. } => reason.0.push_str("does not match the required pattern"),
            K::Not { .. } => reason.0.push_str("matches a schema it must not"),
            // Masked: the message never quotes the client's value.
            _ => {
                let _ = write!(reason, "{}", e.masked());
            }
        }
        out.push(entry(pointer, reason.0));
    }
}

/// A string that stops growing at a limit (formatting then fails, which
/// stops the writer early), marked with `…` when cut.
struct Bounded(String, usize);

impl Bounded {
    fn new(limit: usize) -> Bounded {
        Bounded(String::new(), limit)
    }
}

impl std::fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.1.saturating_sub(self.0.len());
        if s.len() <= room {
            self.0.push_str(s);
            return Ok(());
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.0.push_str(&s[..cut]);
        self.0.push('…');
        self.1 = 0;
        Err(std::fmt::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn media_ranges() {
        let json = MediaRange::parse("application/json").unwrap();
        assert!(json.matches("application/json"));
        assert!(json.matches("Application/JSON; charset=utf-8"));
        assert!(!json.matches("application/jsonx"));
        assert!(!json.matches("text/json"));
        assert!(!json.matches("garbage"));
        let text = MediaRange::parse("text/*").unwrap();
        assert!(text.matches("text/plain"));
        assert!(text.matches("text/csv;header=present"));
        assert!(!text.matches("text/"));
        assert!(!text.matches("application/text"));
        let any = MediaRange::parse("*/*").unwrap();
        assert!(any.matches("image/png"));
        assert!(!any.matches(""));
        for bad in ["json", "*/json", "a b/c", "/x", "x/", "text/**"] {
            assert!(MediaRange::parse(bad).is_none(), "{bad}");
        }
        assert!(json.is_json());
        assert!(MediaRange::parse("application/problem+json")
            .unwrap()
            .is_json());
        assert!(!text.is_json());
        assert_eq!(text.to_string(), "text/*");
    }

    #[test]
    fn schema_details_point_and_stay_short() {
        let v = build_schema(
            &json!({
                "type": "object",
                "required": ["user"],
                "properties": {"user": {
                    "type": "object",
                    "required": ["email"],
                    "properties": {"email": {"type": "string", "maxLength": 5}, "a/b": {"type": "integer"}}
                }}
            }),
            None,
            None,
        )
        .unwrap();
        let long = "x".repeat(10_000);
        let mut out = Vec::new();
        schema_errors(
            &v,
            &json!({"user": {"email": long, "a/b": "no"}}),
            &mut out,
            |p, r| json!({"pointer": p, "reason": r}),
        );
        let pointers: Vec<&str> = out.iter().map(|d| d["pointer"].as_str().unwrap()).collect();
        assert!(pointers.contains(&"/user/email"), "{out:?}");
        assert!(pointers.contains(&"/user/a~1b"), "{out:?}");
        for d in &out {
            let r = d["reason"].as_str().unwrap();
            assert!(r.len() <= MAX_REASON + 4 && !r.contains("xxxx"), "{r}");
        }
        let mut out = Vec::new();
        schema_errors(
            &v,
            &json!({"user": {"email": 5, "a/b": 1}}),
            &mut out,
            |p, r| json!({"pointer": p, "reason": r}),
        );
        // The wording docs/access-control.md shows.
        assert_eq!(
            out,
            vec![json!({"pointer": "/user/email", "reason": "value is not of type \"string\""})]
        );
        let mut out = Vec::new();
        schema_errors(
            &v,
            &json!({"user": {}}),
            &mut out,
            |p, r| json!({"pointer": p, "reason": r}),
        );
        assert_eq!(
            out,
            vec![json!({"pointer": "/user/email", "reason": "is required"})]
        );
    }

    #[test]
    fn details_are_capped() {
        let v = build_schema(
            &json!({"type": "array", "items": {"type": "integer"}}),
            None,
            None,
        )
        .unwrap();
        let many: Vec<Value> = (0..100).map(|i| json!(format!("{i}"))).collect();
        let mut out = Vec::new();
        schema_errors(
            &v,
            &Value::Array(many),
            &mut out,
            |p, r| json!({"pointer": p, "reason": r}),
        );
        assert_eq!(out.len(), MAX_DETAILS);
    }

    #[test]
    fn bad_schemas_and_references_are_refused() {
        let e = build_schema(&json!({"type": "strin"}), None, None).unwrap_err();
        assert!(e.starts_with("invalid JSON Schema"), "{e}");
        // No retrieval: an outside reference cannot be resolved.
        assert!(build_schema(&json!({"$ref": "https://example.com/s.json"}), None, None).is_err());
        // Patterns are linear-time regexes: look-arounds are refused.
        assert!(build_schema(&json!({"type": "string", "pattern": "(?=a)"}), None, None).is_err());
    }

    #[test]
    fn bounded_writer_cuts_on_a_char_boundary() {
        let mut b = Bounded::new(5);
        assert!(write!(b, "ééé").is_err());
        assert_eq!(b.0, "éé…");
    }
}
