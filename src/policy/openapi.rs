//! The `openapi` policy: requests checked against the operations of an
//! OpenAPI 3.0 or 3.1 document.
//!
//! At load ([`Document::load`], once per file per snapshot through
//! `compile::Cache`): the document's `paths` become a segment trie
//! (`router::path::PathTable`, templates parsed as route paths), and every
//! operation's path, query and header parameters and its request body are
//! compiled. Schemas are JSON Schema validators built against the whole
//! document registered as one resource ([`DOC_URI`]), so local `$ref`s
//! (`#/components/...`) resolve as written; 3.0 documents use draft 4 with
//! `nullable` rewritten into the type, 3.1 documents draft 2020-12.
//!
//! Per request: strip `base_path`, find the path (none: 404
//! `route_not_found`) and the method (none: 405 with `Allow`) — or pass
//! when `reject_unknown` is off —, then check each parameter (strings
//! coerced to the schema's `type`: integer, number, boolean, arrays of
//! those) and, when the operation has a JSON body schema and the request a
//! JSON body, read the body (at most `max_body`), validate it and hand it
//! on as one buffer. Every failing location is one entry of
//! `error.details`: `{"in": "path"|"query"|"header", "name", "reason"}` or
//! `{"in": "body", "pointer", "reason"}`.

use super::compile::{Env, Err};
use super::validate::{
    build_schema, declared_too_large, failed, has_body, json_error, read_body, read_document,
    schema_errors, unsupported, MediaRange, MAX_DETAILS,
};
use super::{Ctx, Flow, Policy, Step};
use crate::body::Body;
use crate::config::model;
use crate::error::{ErrorKind, GatewayError};
use crate::router::path::{PathTable, Pattern};
use crate::router::{percent_decode, query_pairs, Rank};
use http::{header, HeaderName, HeaderValue, Method, Request};
use jsonschema::{Draft, Validator};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The URI the document is registered under while its schemas compile.
const DOC_URI: &str = "http://portico.invalid/openapi";
/// Most `$ref` hops followed to find a parameter, body or type.
const MAX_REF_HOPS: usize = 32;
const METHODS: [(&str, Method); 8] = [
    ("get", Method::GET),
    ("put", Method::PUT),
    ("post", Method::POST),
    ("delete", Method::DELETE),
    ("options", Method::OPTIONS),
    ("head", Method::HEAD),
    ("patch", Method::PATCH),
    ("trace", Method::TRACE),
];

/// A compiled document: its paths and their operations.
pub struct Document {
    table: PathTable,
    paths: Vec<PathItem>,
}

struct PathItem {
    ops: Vec<(Method, Operation)>,
    /// `Allow` for a 405.
    allow: HeaderValue,
}

struct Operation {
    params: Vec<Param>,
    /// How many of `params` are in the query (their values are gathered).
    query: usize,
    body: Option<BodySpec>,
}

struct Param {
    at: At,
    name: Box<str>,
    required: bool,
    shape: Shape,
    schema: Option<Validator>,
}

enum At {
    /// The index of the template's capture.
    Path(usize),
    /// The index among the operation's query parameters.
    Query(usize),
    Header(HeaderName),
}

impl At {
    fn as_str(&self) -> &'static str {
        match self {
            At::Path(_) => "path",
            At::Query(_) => "query",
            At::Header(_) => "header",
        }
    }
}

/// How a parameter's text becomes a JSON value.
enum Shape {
    Scalar(Vec<Kind>),
    /// `sep: None`: one item per repeated query parameter (`form`, `explode`).
    Array {
        items: Vec<Kind>,
        sep: Option<char>,
    },
}

/// A JSON type a string is coerced to, tried in the schema's order.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Integer,
    Number,
    Boolean,
    String,
}

struct BodySpec {
    required: bool,
    /// Media ranges of `content`, most specific first, with the schema of
    /// the JSON ones.
    media: Vec<(MediaRange, Option<Validator>)>,
}

pub struct OpenApiPolicy {
    pub doc: Arc<Document>,
    /// Without a trailing `/`; `None`: the document's paths start at `/`.
    pub base_path: Option<Box<str>>,
    pub reject_unknown: bool,
    pub max_body: u64,
}

impl OpenApiPolicy {
    /// The request path relative to `base_path` (`None`: outside it).
    fn relative<'p>(&self, path: &'p str) -> Option<&'p str> {
        let Some(base) = &self.base_path else {
            return Some(path);
        };
        let rest = path.strip_prefix(&**base)?;
        if rest.is_empty() {
            Some("/")
        } else if rest.starts_with('/') {
            Some(rest)
        } else {
            None
        }
    }
}

impl Policy for OpenApiPolicy {
    fn name(&self) -> &'static str {
        "openapi"
    }

    fn on_request<'a>(&'a self, req: &'a mut Request<Body>, _ctx: &'a mut Ctx) -> Step<'a> {
        let path = req.uri().path();
        let found = self.relative(path).and_then(|rel| {
            let mut best = None;
            self.doc.table.find(rel, &|_| true, &mut best);
            best.map(|(_, m)| (rel, m))
        });
        let Some((rel, matched)) = found else {
            if !self.reject_unknown {
                return Step::Ready(Ok(Flow::Continue));
            }
            return Step::Ready(Err(GatewayError::new(
                ErrorKind::RouteNotFound,
                format!("{path} is not a path of the API"),
            )));
        };
        let item = &self.doc.paths[matched.route];
        let Some((_, op)) = item.ops.iter().find(|(m, _)| m == req.method()) else {
            if !self.reject_unknown {
                return Step::Ready(Ok(Flow::Continue));
            }
            return Step::Ready(Err(GatewayError::new(
                ErrorKind::MethodNotAllowed,
                format!("{} is not an operation of {path}", req.method()),
            )
            .with_header(header::ALLOW, item.allow.clone())));
        };

        let mut details = Vec::new();
        check_params(op, req, rel, &matched.captures, &mut details);

        let mut schema = None;
        if let Some(body) = &op.body {
            if !has_body(req) {
                if body.required && details.len() < MAX_DETAILS {
                    details.push(json!({"in": "body", "pointer": "", "reason": "a request body is required"}));
                }
            } else {
                let ct = req
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                match body.media.iter().find(|(r, _)| r.matches(ct)) {
                    None => {
                        let ranges: Vec<MediaRange> =
                            body.media.iter().map(|(r, _)| r.clone()).collect();
                        return Step::Ready(Err(unsupported(&ranges)));
                    }
                    Some((_, s)) => schema = s.as_ref(),
                }
            }
        }
        let Some(schema) = schema else {
            return Step::Ready(verdict(details));
        };
        if let Some(e) = declared_too_large(req.headers(), self.max_body) {
            return Step::Ready(Err(e));
        }
        Step::Wait(Box::pin(async move {
            let bytes = read_body(req, self.max_body).await?;
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => schema_errors(
                    schema,
                    &v,
                    &mut details,
                    |pointer, reason| json!({"in": "body", "pointer": pointer, "reason": reason}),
                ),
                Err(e) if details.len() < MAX_DETAILS => {
                    details.push(json!({"in": "body", "pointer": "", "reason": json_error(&e)}))
                }
                Err(_) => {}
            }
            *req.body_mut() = Body::full(bytes);
            verdict(details)
        }))
    }
}

fn verdict(details: Vec<Value>) -> Result<Flow, GatewayError> {
    if details.is_empty() {
        Ok(Flow::Continue)
    } else {
        Err(failed(details))
    }
}

/// Checks the operation's path, query and header parameters.
fn check_params(
    op: &Operation,
    req: &Request<Body>,
    rel: &str,
    captures: &crate::router::path::Captures,
    details: &mut Vec<Value>,
) {
    if op.params.is_empty() {
        return;
    }
    // Query values gathered in one pass over the query string.
    let mut query: Vec<Vec<Cow<'_, str>>> = Vec::new();
    if op.query > 0 {
        query.resize_with(op.query, Vec::new);
        for (k, v) in query_pairs(req.uri().query().unwrap_or("")) {
            for p in &op.params {
                if let At::Query(i) = p.at {
                    if *p.name == *k {
                        query[i].push(v.clone());
                    }
                }
            }
        }
    }
    for p in &op.params {
        if details.len() >= MAX_DETAILS {
            return;
        }
        let problem = |details: &mut Vec<Value>, reason: &str| {
            details.push(json!({"in": p.at.as_str(), "name": &*p.name, "reason": reason}));
        };
        let value = match &p.at {
            At::Path(i) => captures
                .get(rel, *i)
                .map(|raw| p.shape.of_texts(&[decode_path(raw)])),
            At::Query(i) => (!query[*i].is_empty()).then(|| p.shape.of_texts(&query[*i])),
            At::Header(name) => {
                let mut texts = Vec::new();
                let mut bad = false;
                for v in req.headers().get_all(name) {
                    match v.to_str() {
                        Ok(s) => texts.push(Cow::Borrowed(s.trim())),
                        Err(_) => bad = true,
                    }
                }
                if bad {
                    problem(details, "is not valid text");
                    continue;
                }
                (!texts.is_empty()).then(|| p.shape.of_header(&texts))
            }
        };
        let Some(value) = value else {
            if p.required {
                problem(details, "is required");
            }
            continue;
        };
        if let Some(schema) = &p.schema {
            let at = p.at.as_str();
            schema_errors(schema, &value, details, |pointer, reason| {
                if pointer.is_empty() {
                    json!({"in": at, "name": &*p.name, "reason": reason})
                } else {
                    json!({"in": at, "name": &*p.name, "pointer": pointer, "reason": reason})
                }
            });
        }
    }
}

impl Shape {
    /// From a path segment or the query values (repeated parameters).
    fn of_texts(&self, texts: &[Cow<'_, str>]) -> Value {
        match self {
            Shape::Scalar(kinds) => coerce(kinds, &texts[0]),
            Shape::Array { items, sep: None } => {
                Value::Array(texts.iter().map(|t| coerce(items, t)).collect())
            }
            Shape::Array {
                items,
                sep: Some(sep),
            } => Value::Array(texts[0].split(*sep).map(|t| coerce(items, t)).collect()),
        }
    }

    /// From a header's values: an array is the values' comma-separated items.
    fn of_header(&self, texts: &[Cow<'_, str>]) -> Value {
        match self {
            Shape::Scalar(kinds) => coerce(kinds, &texts[0]),
            Shape::Array { items, .. } => Value::Array(
                texts
                    .iter()
                    .flat_map(|t| t.split(','))
                    .map(|t| coerce(items, t.trim()))
                    .collect(),
            ),
        }
    }
}

/// The text as the first of `kinds` it reads as; else a string (which the
/// schema then refuses with a type error).
fn coerce(kinds: &[Kind], s: &str) -> Value {
    for k in kinds {
        match k {
            Kind::Integer => {
                if let Ok(i) = s.parse::<i64>() {
                    return Value::from(i);
                }
                if let Ok(u) = s.parse::<u64>() {
                    return Value::from(u);
                }
            }
            Kind::Number => {
                if let Ok(i) = s.parse::<i64>() {
                    return Value::from(i);
                }
                if let Some(n) = s
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .and_then(serde_json::Number::from_f64)
                {
                    return Value::Number(n);
                }
            }
            Kind::Boolean => match s {
                "true" => return Value::Bool(true),
                "false" => return Value::Bool(false),
                _ => {}
            },
            Kind::String => break,
        }
    }
    Value::String(s.to_owned())
}

/// Percent-decodes a path segment (`+` stays a `+`).
fn decode_path(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    // `+` is escaped first so that the query decoder keeps it.
    match percent_decode(&s.replace('+', "%2B")) {
        Cow::Owned(o) => Cow::Owned(o),
        Cow::Borrowed(b) => Cow::Owned(b.to_owned()),
    }
}

// ---------------------------------------------------------------- compile

/// Compiles an `openapi` step; `p` is its key path (`...policies[0].openapi`).
pub fn compile(p: &str, o: &model::OpenApiPolicy, env: &Env, err: Err) -> Option<OpenApiPolicy> {
    let mut ok = true;
    let base_path = match o.base_path.as_deref() {
        None | Some("/") | Some("") => None,
        Some(b) => {
            let trimmed = b.trim_end_matches('/');
            let normal = crate::normalize::normalize_path(trimmed).is_ok_and(|n| n == trimmed);
            if !b.starts_with('/') || trimmed.contains(['{', '}', '?', '#']) || !normal {
                err(
                    format!("{p}.base_path"),
                    format!("`{b}` is not a literal, normalised path like `/api`"),
                );
                ok = false;
            }
            Some(Box::from(trimmed))
        }
    };
    if o.max_body.0 == 0 {
        err(format!("{p}.max_body"), "must be larger than 0".into());
        ok = false;
    }
    let joined = env.base.join(&o.spec);
    let key = std::fs::canonicalize(&joined).unwrap_or_else(|_| joined.clone());
    let cached = env.cache.openapi.borrow().get(&key).cloned();
    let doc = match cached {
        Some(d) => d,
        None => {
            let d = Document::load(&joined).map(Arc::new);
            env.cache.openapi.borrow_mut().insert(key, d.clone());
            d
        }
    };
    let doc = match doc {
        Ok(d) => d,
        Err(m) => {
            err(format!("{p}.spec"), m);
            return None;
        }
    };
    ok.then_some(OpenApiPolicy {
        doc,
        base_path,
        reject_unknown: o.reject_unknown,
        max_body: o.max_body.0,
    })
}

impl Document {
    /// Reads and compiles a document; the error names the file and the key
    /// inside it.
    pub fn load(path: &Path) -> Result<Document, String> {
        let raw = read_document(path)?;
        let shown = path.display();
        Document::compile(raw).map_err(|m| format!("`{shown}`: {m}"))
    }

    fn compile(mut raw: Value) -> Result<Document, String> {
        let version = raw.get("openapi").and_then(Value::as_str).unwrap_or("");
        let draft = if version.starts_with("3.0") {
            nullable_to_type(&mut raw, 0);
            Draft::Draft4
        } else if version.starts_with("3.1") {
            Draft::Draft202012
        } else if raw.get("swagger").is_some() {
            return Err("a Swagger 2 document; convert it to OpenAPI 3".into());
        } else {
            return Err("not an OpenAPI 3.0 or 3.1 document (no `openapi: 3.x` key)".into());
        };
        let Some(paths) = raw.get("paths").and_then(Value::as_object) else {
            return Err("paths: the document has no `paths` object".into());
        };
        let registry = jsonschema::Registry::new()
            .add(DOC_URI, draft.create_resource(raw.clone()))
            .and_then(|b| b.prepare())
            .map_err(|e| format!("cannot index the document: {e}"))?;
        let c = Compiling {
            raw: &raw,
            draft,
            registry: &registry,
        };
        let mut table = PathTable::default();
        let mut items = Vec::new();
        let mut shapes: HashMap<String, &str> = HashMap::new();
        for (template, item) in paths {
            let key = format!("paths.{template}");
            let pattern = Pattern::parse(template).map_err(|m| format!("{key}: {m}"))?;
            if let Some(other) = shapes.insert(pattern.shape(), template) {
                return Err(format!("{key}: matches the same paths as `{other}`"));
            }
            let ptr = format!("/paths/{}", escape(template));
            let (ptr, item) = c.resolve(&ptr, item, &key)?;
            let index = items.len();
            items.push(c.path_item(&key, &ptr, item, &pattern)?);
            table.insert(
                &pattern,
                index,
                Rank {
                    priority: 0,
                    host: 0,
                    path: pattern.rank(),
                    conditions: 0,
                },
            );
        }
        Ok(Document {
            table,
            paths: items,
        })
    }
}

/// The document while it compiles.
struct Compiling<'d> {
    raw: &'d Value,
    draft: Draft,
    registry: &'d jsonschema::Registry<'d>,
}

impl<'d> Compiling<'d> {
    /// Follows `$ref`s (local only) from `v` at `ptr`: the pointer and value
    /// of the object finally referred to.
    fn resolve(&self, ptr: &str, v: &'d Value, key: &str) -> Result<(String, &'d Value), String> {
        let mut ptr = ptr.to_string();
        let mut v = v;
        for _ in 0..MAX_REF_HOPS {
            let Some(r) = v.get("$ref").and_then(Value::as_str) else {
                return Ok((ptr, v));
            };
            let Some(target) = r.strip_prefix('#') else {
                return Err(format!(
                    "{key}: `$ref: {r}` is not local (only `#/...` references are resolved)"
                ));
            };
            let target = percent_decode_fragment(target);
            v = self
                .raw
                .pointer(&target)
                .ok_or_else(|| format!("{key}: `$ref: {r}` points at nothing"))?;
            ptr = target;
        }
        Err(format!("{key}: more than {MAX_REF_HOPS} `$ref` hops"))
    }

    fn schema_at(&self, ptr: &str, key: &str) -> Result<Validator, String> {
        let wrapper = json!({"$ref": format!("{DOC_URI}#{}", fragment(ptr))});
        build_schema(&wrapper, Some(self.draft), Some(self.registry))
            .map_err(|m| format!("{key}: {m}"))
    }

    fn path_item(
        &self,
        key: &str,
        ptr: &str,
        item: &'d Value,
        pattern: &Pattern,
    ) -> Result<PathItem, String> {
        if !item.is_object() {
            return Err(format!("{key}: a path item must be an object"));
        }
        let shared = self.params(key, ptr, item)?;
        let mut ops = Vec::new();
        for (name, method) in METHODS {
            let Some(op) = item.get(name) else { continue };
            let okey = format!("{key}.{name}");
            let optr = format!("{ptr}/{name}");
            if !op.is_object() {
                return Err(format!("{okey}: an operation must be an object"));
            }
            // Operation parameters override path-level ones (same name and `in`).
            let mut all = self.params(&okey, &optr, op)?;
            for s in &shared {
                if !all.iter().any(|a| a.0 == s.0 && a.1 == s.1) {
                    all.push(s.clone());
                }
            }
            let mut params = Vec::new();
            let mut query = 0;
            let names = pattern.params();
            for (_, _, pkey, pptr, pv) in all {
                if let Some(param) = self.param(&pkey, &pptr, pv, &names, &mut query)? {
                    params.push(param);
                }
            }
            let body = match op.get("requestBody") {
                None => None,
                Some(b) => {
                    let bkey = format!("{okey}.requestBody");
                    let (bptr, b) = self.resolve(&format!("{optr}/requestBody"), b, &bkey)?;
                    Some(self.body(&bkey, &bptr, b)?)
                }
            };
            ops.push((
                method,
                Operation {
                    params,
                    query,
                    body,
                },
            ));
        }
        let allow = ops
            .iter()
            .map(|(m, _)| m.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(PathItem {
            ops,
            allow: HeaderValue::from_str(&allow).map_err(|_| format!("{key}: bad methods"))?,
        })
    }

    /// The `parameters` of a path item or operation: (name, in, key,
    /// pointer, object), `$ref`s resolved.
    #[allow(clippy::type_complexity)]
    fn params(
        &self,
        key: &str,
        ptr: &str,
        obj: &'d Value,
    ) -> Result<Vec<(String, String, String, String, &'d Value)>, String> {
        let Some(list) = obj.get("parameters") else {
            return Ok(Vec::new());
        };
        let list = list
            .as_array()
            .ok_or_else(|| format!("{key}.parameters: must be a list"))?;
        let mut out = Vec::new();
        for (i, p) in list.iter().enumerate() {
            let pkey = format!("{key}.parameters[{i}]");
            let (pptr, p) = self.resolve(&format!("{ptr}/parameters/{i}"), p, &pkey)?;
            let name = p.get("name").and_then(Value::as_str);
            let at = p.get("in").and_then(Value::as_str);
            let (Some(name), Some(at)) = (name, at) else {
                return Err(format!("{pkey}: a parameter needs `name` and `in`"));
            };
            out.push((name.to_string(), at.to_string(), pkey, pptr, p));
        }
        Ok(out)
    }

    fn param(
        &self,
        key: &str,
        ptr: &str,
        p: &'d Value,
        names: &[&str],
        query: &mut usize,
    ) -> Result<Option<Param>, String> {
        let name = p["name"].as_str().unwrap_or_default();
        let at_text = p["in"].as_str().unwrap_or_default();
        let at = match at_text {
            "path" => At::Path(
                names
                    .iter()
                    .position(|n| *n == name)
                    .ok_or_else(|| format!("{key}: the path template has no `{{{name}}}`"))?,
            ),
            "query" => {
                *query += 1;
                At::Query(*query - 1)
            }
            "header" => {
                // OpenAPI: these three are described elsewhere and ignored here.
                if ["accept", "content-type", "authorization"]
                    .contains(&name.to_ascii_lowercase().as_str())
                {
                    return Ok(None);
                }
                At::Header(
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("{key}: `{name}` is not a valid header name"))?,
                )
            }
            // Cookies are not checked (documented).
            "cookie" => return Ok(None),
            other => {
                return Err(format!(
                    "{key}.in: `{other}` is not path, query, header or cookie"
                ))
            }
        };
        if p.get("content").is_some() {
            return Err(format!(
                "{key}: parameters described by `content` are not supported; use `schema`"
            ));
        }
        let required = matches!(at, At::Path(_))
            || p.get("required").and_then(Value::as_bool).unwrap_or(false);
        let (shape, schema) = match p.get("schema") {
            None => (Shape::Scalar(Vec::new()), None),
            Some(s) => {
                let skey = format!("{key}.schema");
                let sptr = format!("{ptr}/schema");
                let (tptr, t) = self.resolve(&sptr, s, &skey)?;
                let style = p.get("style").and_then(Value::as_str).unwrap_or(match at {
                    At::Query(_) => "form",
                    _ => "simple",
                });
                let explode = p
                    .get("explode")
                    .and_then(Value::as_bool)
                    .unwrap_or(style == "form");
                let types = types_of(t);
                let shape = if types.iter().any(|t| t == "object") {
                    return Err(format!("{skey}: object parameters are not supported"));
                } else if types.iter().any(|t| t == "array") {
                    let items = match t.get("items") {
                        Some(i) => {
                            let (_, it) = self.resolve(&format!("{tptr}/items"), i, &skey)?;
                            kinds(&types_of(it))
                        }
                        None => Vec::new(),
                    };
                    let sep = match (style, &at) {
                        ("form", At::Query(_)) if explode => None,
                        ("form", _) | ("simple", _) => Some(','),
                        ("spaceDelimited", _) => Some(' '),
                        ("pipeDelimited", _) => Some('|'),
                        (s, _) => {
                            return Err(format!("{key}.style: `{s}` arrays are not supported"))
                        }
                    };
                    Shape::Array { items, sep }
                } else {
                    Shape::Scalar(kinds(&types))
                };
                (shape, Some(self.schema_at(&sptr, &skey)?))
            }
        };
        Ok(Some(Param {
            at,
            name: name.into(),
            required,
            shape,
            schema,
        }))
    }

    fn body(&self, key: &str, ptr: &str, b: &'d Value) -> Result<BodySpec, String> {
        let required = b.get("required").and_then(Value::as_bool).unwrap_or(false);
        let content = b
            .get("content")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("{key}.content: a request body needs a `content` map"))?;
        let mut media = Vec::new();
        for (m, obj) in content {
            let range = MediaRange::parse(m)
                .ok_or_else(|| format!("{key}.content: `{m}` is not a media type"))?;
            let schema = match obj.get("schema") {
                Some(_) if range.is_json() => Some(self.schema_at(
                    &format!("{ptr}/content/{}/schema", escape(m)),
                    &format!("{key}.content.{m}.schema"),
                )?),
                _ => None,
            };
            media.push((range, schema));
        }
        // Most specific first: `type/sub`, then `type/*`, then `*/*`.
        media.sort_by_key(|(r, _)| {
            let s = r.to_string();
            (s.starts_with("*/"), s.ends_with("/*"))
        });
        Ok(BodySpec { required, media })
    }
}

/// The schema's `type`, as a list.
fn types_of(schema: &Value) -> Vec<String> {
    match schema.get("type") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

fn kinds(types: &[String]) -> Vec<Kind> {
    types
        .iter()
        .filter_map(|t| match t.as_str() {
            "integer" => Some(Kind::Integer),
            "number" => Some(Kind::Number),
            "boolean" => Some(Kind::Boolean),
            "string" => Some(Kind::String),
            _ => None,
        })
        .collect()
}

/// OpenAPI 3.0's `nullable: true` as JSON Schema: `null` added to `type`
/// (and to `enum`). Applied to the whole document, depth-bounded.
fn nullable_to_type(v: &mut Value, depth: usize) {
    if depth > 256 {
        return;
    }
    match v {
        Value::Object(o) => {
            if o.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(t)) = o.get("type") {
                    let t = t.clone();
                    o.insert("type".into(), json!([t, "null"]));
                }
                if let Some(Value::Array(e)) = o.get_mut("enum") {
                    if !e.contains(&Value::Null) {
                        e.push(Value::Null);
                    }
                }
            }
            for (_, x) in o.iter_mut() {
                nullable_to_type(x, depth + 1);
            }
        }
        Value::Array(a) => {
            for x in a {
                nullable_to_type(x, depth + 1);
            }
        }
        _ => {}
    }
}

/// One JSON-pointer token (`~` → `~0`, `/` → `~1`).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// A JSON pointer as a URI fragment: bytes outside the fragment's
/// characters percent-encoded (`{id}` → `%7Bid%7D`).
fn fragment(ptr: &str) -> String {
    let mut out = String::with_capacity(ptr.len());
    for b in ptr.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A `$ref` fragment as a JSON pointer (percent-escapes decoded).
fn percent_decode_fragment(s: &str) -> String {
    decode_path(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> Result<Document, String> {
        Document::compile(serde_yaml::from_str(yaml).unwrap())
    }

    const API: &str = r##"
openapi: 3.0.3
info: {title: t, version: "1"}
paths:
  /users/{id}:
    parameters:
      - {name: id, in: path, required: true, schema: {type: integer, minimum: 1}}
    get:
      parameters:
        - {name: fields, in: query, schema: {type: array, items: {type: string}}, explode: false}
        - {name: x-trace, in: header, required: true, schema: {type: boolean}}
    put:
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/User"}
          text/*: {}
components:
  schemas:
    User:
      type: object
      required: [email]
      properties:
        email: {type: string, nullable: true}
"##;

    #[test]
    fn compiles_paths_operations_and_refs() {
        let d = doc(API).unwrap();
        assert_eq!(d.paths.len(), 1);
        let item = &d.paths[0];
        assert_eq!(item.allow, "GET, PUT");
        let get = &item.ops[0].1;
        assert_eq!(get.params.len(), 3);
        assert_eq!(get.query, 1);
        let put = &item.ops[1].1;
        let body = put.body.as_ref().unwrap();
        assert!(body.required);
        let json_schema = body.media[0].1.as_ref().unwrap();
        assert!(json_schema.is_valid(&json!({"email": "a@b"})));
        // 3.0 `nullable` became a type.
        assert!(json_schema.is_valid(&json!({"email": null})));
        assert!(!json_schema.is_valid(&json!({})));
        assert!(body.media[1].1.is_none());
        let id = &get.params.iter().find(|p| &*p.name == "id").unwrap();
        assert!(id.required);
        assert!(id
            .schema
            .as_ref()
            .unwrap()
            .is_valid(&coerce(&[Kind::Integer], "5")));
        assert!(!id
            .schema
            .as_ref()
            .unwrap()
            .is_valid(&coerce(&[Kind::Integer], "0")));
        assert!(!id
            .schema
            .as_ref()
            .unwrap()
            .is_valid(&coerce(&[Kind::Integer], "x")));
    }

    #[test]
    fn coercion() {
        assert_eq!(coerce(&[Kind::Integer], "12"), json!(12));
        assert_eq!(coerce(&[Kind::Integer], "1.5"), json!("1.5"));
        assert_eq!(coerce(&[Kind::Number], "1.5"), json!(1.5));
        assert_eq!(coerce(&[Kind::Number], "NaN"), json!("NaN"));
        assert_eq!(coerce(&[Kind::Boolean], "true"), json!(true));
        assert_eq!(coerce(&[Kind::Boolean], "yes"), json!("yes"));
        assert_eq!(coerce(&[Kind::String, Kind::Integer], "7"), json!("7"));
        let arr = Shape::Array {
            items: vec![Kind::Integer],
            sep: Some(','),
        };
        assert_eq!(arr.of_texts(&["1,2,x".into()]), json!([1, 2, "x"]));
        let rep = Shape::Array {
            items: vec![Kind::Integer],
            sep: None,
        };
        assert_eq!(rep.of_texts(&["1".into(), "2".into()]), json!([1, 2]));
        assert_eq!(
            arr.of_header(&["1, 2".into(), "3".into()]),
            json!([1, 2, 3])
        );
        assert_eq!(decode_path("a%20b+c"), "a b+c");
    }

    #[test]
    fn broken_documents_name_the_key() {
        let e = doc("swagger: '2.0'\npaths: {}").err().unwrap();
        assert!(e.contains("Swagger 2"), "{e}");
        let e = doc("openapi: 3.0.0\n").err().unwrap();
        assert!(e.starts_with("paths:"), "{e}");
        let e = doc("openapi: 3.1.0\npaths:\n  /a/{id}:\n    get:\n      parameters: [{name: other, in: path, schema: {type: string}}]\n").err().unwrap();
        assert!(e.starts_with("paths./a/{id}.get.parameters[0]"), "{e}");
        let e = doc("openapi: 3.1.0\npaths:\n  /a:\n    post:\n      requestBody:\n        content:\n          application/json:\n            schema: {type: strin}\n").err().unwrap();
        assert!(
            e.starts_with("paths./a.post.requestBody.content.application/json.schema"),
            "{e}"
        );
        let e = doc("openapi: 3.1.0\npaths:\n  /a:\n    post:\n      requestBody: {$ref: '#/components/requestBodies/Nope'}\n").err().unwrap();
        assert!(e.contains("points at nothing"), "{e}");
        let e = doc("openapi: 3.1.0\npaths:\n  /a/{x}: {}\n  /a/{y}: {}\n")
            .err()
            .unwrap();
        assert!(e.contains("matches the same paths"), "{e}");
        let e = doc("openapi: 3.1.0\npaths:\n  /a:\n    get:\n      parameters: [{name: f, in: query, schema: {type: object}}]\n").err().unwrap();
        assert!(e.contains("object parameters"), "{e}");
        let e = doc("openapi: 3.1.0\npaths:\n  /a:\n    get:\n      parameters: [{name: f, in: query, schema: {$ref: 'other.yaml#/X'}}]\n").err().unwrap();
        assert!(e.contains("not local"), "{e}");
    }

    #[test]
    fn a_document_is_compiled_once_per_cache() {
        let dir =
            std::env::temp_dir().join(format!("portico-openapi-cache-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("api.yaml"), API).unwrap();
        let consumers = Arc::new(crate::auth::Consumers::default());
        let headers = Arc::new(crate::policy::compile::consumer_headers(
            &Default::default(),
            &mut |_, _| {},
        ));
        let metrics = Arc::new(crate::metrics::RouteMetrics::new("r".into()));
        let cache = crate::policy::compile::Cache::default();
        let limiting = Arc::new(crate::ratelimit::compile(
            &Default::default(),
            None,
            None,
            &mut |_, _| {},
        ));
        let env = Env {
            consumers: &consumers,
            consumer_headers: &headers,
            metrics: &metrics,
            base: &dir,
            cache: &cache,
            introspection: &Default::default(),
            auth_before: None,
            jwt_issuers: &Default::default(),
            limiting: &limiting,
            route: "r",
            group: None,
        };
        let cfg = |spec: &str| model::OpenApiPolicy {
            spec: spec.into(),
            base_path: None,
            reject_unknown: true,
            max_body: crate::config::units::Size(1024),
        };
        let mut errors = Vec::new();
        let a = compile("a", &cfg("api.yaml"), &env, &mut |k, m| errors.push((k, m))).unwrap();
        // Another spelling of the same file: the same compiled document.
        let b = compile("b", &cfg("sub/../api.yaml"), &env, &mut |k, m| {
            errors.push((k, m))
        })
        .unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert!(Arc::ptr_eq(&a.doc, &b.doc));
        assert_eq!(cache.openapi.borrow().len(), 1);
        // A fresh cache (the next snapshot) compiles it again.
        let cache2 = crate::policy::compile::Cache::default();
        let env2 = Env {
            cache: &cache2,
            ..env
        };
        let c = compile("c", &cfg("api.yaml"), &env2, &mut |_, _| {}).unwrap();
        assert!(!Arc::ptr_eq(&a.doc, &c.doc));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fragments_are_uri_safe() {
        assert_eq!(
            fragment("/paths/~1users~1{id}/get"),
            "/paths/~1users~1%7Bid%7D/get"
        );
        assert_eq!(percent_decode_fragment("/a%7Bb%7D"), "/a{b}");
    }
}
