//! Call templates: `{source.name}` placeholders in an aggregate call's path,
//! query values, header values and JSON body, parsed once at load into
//! [`Seg`]s and rendered per request.
//!
//! Sources: `path.NAME` (a param of the route's path), `query.NAME` (the
//! client's query parameter), `header.NAME` (the client's header),
//! `consumer.id` / `consumer.plan` / `consumer.groups` /
//! `consumer.metadata.KEY` (the authenticated consumer), `claims.PATH` (a
//! verified token's claim), `calls.NAME.PATH` (a field of another call's
//! response; the call then waits for that one). `{src|text}` gives a
//! default for a missing value; `{{` and `}}` are literal braces.
//!
//! Values are used decoded (path params and query values are
//! percent-decoded) and encoded for where they go: in a path or a query
//! every byte but the unreserved ones is percent-encoded (so a value never
//! adds a path segment or a query parameter), in a header it must be a valid
//! header value, in a JSON body it is a JSON value.

use crate::policy::Ctx;
use http::{HeaderMap, HeaderName};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Index of a param of the route's path.
    Path(usize),
    Query(Box<str>),
    Header(HeaderName),
    ConsumerId,
    ConsumerPlan,
    /// The consumer's groups, comma-separated (a JSON array in a body).
    ConsumerGroups,
    ConsumerMeta(Box<str>),
    /// A claim by name or dot path.
    Claim(Box<str>),
    /// A field of another call's (unshaped) response.
    Call {
        call: usize,
        path: Box<[Box<str>]>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Var {
    pub src: Source,
    pub default: Option<Box<str>>,
    /// As written, for failure reasons.
    pub text: Box<str>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Lit(Box<str>),
    Var(Var),
}

/// A parsed text template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub segs: Box<[Seg]>,
}

/// What templates are parsed against: the route's path params and the
/// action's call names.
pub struct Names<'a> {
    pub params: &'a [String],
    pub calls: &'a [&'a str],
}

/// Where a rendered value goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Enc {
    /// A path: values are percent-encoded, literals kept.
    Path,
    /// A query value: values and literals percent-encoded.
    Query,
    /// A header value: as is.
    Raw,
}

/// What a request offers to its templates.
pub struct Inputs<'a> {
    pub ctx: &'a Ctx,
    /// The client's request headers.
    pub headers: &'a HeaderMap,
    /// Successful results of the calls so far, by call index.
    pub calls: &'a [Option<Arc<Value>>],
}

/// A resolved value.
pub enum Val<'a> {
    Str(Cow<'a, str>),
    Json(&'a Value),
}

impl Val<'_> {
    fn text(&self) -> Cow<'_, str> {
        match self {
            Val::Str(s) => Cow::Borrowed(s),
            Val::Json(Value::String(s)) => Cow::Borrowed(s),
            Val::Json(v) => Cow::Owned(v.to_string()),
        }
    }
}

/// Follows a dot path through objects (and arrays, by index).
pub fn walk<'v, S: AsRef<str>>(mut v: &'v Value, path: &[S]) -> Option<&'v Value> {
    for p in path {
        let p = p.as_ref();
        v = match v {
            Value::Object(m) => m.get(p)?,
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

impl Var {
    /// The value, `Ok(None)` when a request input is missing (the caller
    /// decides what that means); a missing field of a call's response is an
    /// error (the reason), unless the placeholder has a default.
    pub fn resolve<'a>(&'a self, inp: &Inputs<'a>) -> Result<Option<Val<'a>>, String> {
        let found: Option<Val<'a>> = match &self.src {
            Source::Path(i) => inp.ctx.param(*i).map(|s| Val::Str(decode_path(s))),
            Source::Query(n) => crate::auth::credential::query_param(&inp.ctx.original_uri, n)
                .map(|v| Val::Str(Cow::Owned(v.into_owned()))),
            Source::Header(h) => inp
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(|s| Val::Str(Cow::Borrowed(s))),
            Source::ConsumerId => consumer(inp).map(|c| Val::Str(Cow::Borrowed(&*c.id))),
            Source::ConsumerPlan => consumer(inp)
                .and_then(|c| c.plan.as_deref())
                .map(|p| Val::Str(Cow::Borrowed(p))),
            Source::ConsumerGroups => consumer(inp).map(|c| {
                let g: Vec<&str> = c.groups.iter().map(|g| &**g).collect();
                Val::Str(Cow::Owned(g.join(",")))
            }),
            Source::ConsumerMeta(k) => consumer(inp)
                .and_then(|c| c.metadata.get(&**k))
                .map(|v| Val::Str(Cow::Borrowed(v.as_str()))),
            Source::Claim(p) => inp
                .ctx
                .identity
                .as_ref()
                .and_then(|i| i.principal.as_deref())
                .and_then(|pr| pr.claim(p))
                .map(Val::Json),
            Source::Call { call, path } => inp
                .calls
                .get(*call)
                .and_then(|r| r.as_deref())
                .and_then(|v| walk(v, path))
                .map(Val::Json),
        };
        let found = found.filter(|v| !matches!(v, Val::Json(Value::Null)));
        match (found, &self.default) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(d)) => Ok(Some(Val::Str(Cow::Borrowed(d)))),
            (None, None) if matches!(self.src, Source::Call { .. }) => {
                Err(format!("`{{{}}}` is missing", self.text))
            }
            (None, None) => Ok(None),
        }
    }

    /// The call this placeholder waits for.
    pub fn call(&self) -> Option<usize> {
        match self.src {
            Source::Call { call, .. } => Some(call),
            _ => None,
        }
    }

    /// A JSON value for a body: claims and call fields keep their type,
    /// groups are an array, missing values are `null`.
    pub fn json(&self, inp: &Inputs<'_>) -> Result<Value, String> {
        if self.src == Source::ConsumerGroups {
            if let Some(c) = consumer(inp) {
                return Ok(Value::Array(
                    c.groups.iter().map(|g| Value::from(&**g)).collect(),
                ));
            }
        }
        Ok(match self.resolve(inp)? {
            Some(Val::Json(v)) => v.clone(),
            Some(Val::Str(s)) => Value::String(s.into_owned()),
            None => Value::Null,
        })
    }
}

fn consumer<'a>(inp: &Inputs<'a>) -> Option<&'a crate::auth::Consumer> {
    inp.ctx.identity.as_ref()?.consumer.as_deref()
}

impl Template {
    /// The one placeholder, when the template is nothing else.
    pub fn single(&self) -> Option<&Var> {
        match &*self.segs {
            [Seg::Var(v)] => Some(v),
            _ => None,
        }
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.segs.iter().filter_map(|s| match s {
            Seg::Var(v) => Some(v),
            Seg::Lit(_) => None,
        })
    }

    /// Renders into `out`. `Ok(false)` when the template is a single
    /// placeholder whose value is missing (the query parameter or header
    /// is then left out); other missing request inputs render as empty.
    pub fn render(&self, inp: &Inputs<'_>, enc: Enc, out: &mut String) -> Result<bool, String> {
        for s in &*self.segs {
            match s {
                Seg::Lit(l) if enc == Enc::Query => encode_into(l, out),
                Seg::Lit(l) => out.push_str(l),
                Seg::Var(v) => match v.resolve(inp)? {
                    Some(val) => match enc {
                        Enc::Raw => out.push_str(&val.text()),
                        Enc::Path | Enc::Query => encode_into(&val.text(), out),
                    },
                    None if self.segs.len() == 1 => return Ok(false),
                    None => {}
                },
            }
        }
        Ok(true)
    }

    /// The template with every placeholder replaced by `x`, for checking
    /// literals at load.
    pub fn sample(&self) -> String {
        let mut s = String::new();
        for seg in &*self.segs {
            match seg {
                Seg::Lit(l) => s.push_str(l),
                Seg::Var(_) => s.push('x'),
            }
        }
        s
    }
}

/// Decodes `%XX` escapes of a path param (`+` stays a plus); invalid
/// escapes are kept literally, invalid UTF-8 replaced.
pub fn decode_path(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Percent-encodes every byte but the unreserved ones (RFC 3986).
pub fn encode_into(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

/// Parses a text template.
pub fn parse(t: &str, names: &Names<'_>) -> Result<Template, String> {
    let mut segs = Vec::new();
    let mut lit = String::new();
    let mut rest = t;
    while let Some(i) = rest.find(['{', '}']) {
        lit.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            lit.push(tail.as_bytes()[0] as char);
            rest = &tail[2..];
            continue;
        }
        if let Some(after) = tail.strip_prefix('}') {
            lit.push('}');
            rest = after;
            continue;
        }
        let close = tail
            .find('}')
            .ok_or_else(|| format!("`{t}`: unclosed `{{` (write `{{{{` for a literal brace)"))?;
        if !lit.is_empty() {
            segs.push(Seg::Lit(std::mem::take(&mut lit).into()));
        }
        segs.push(Seg::Var(parse_var(&tail[1..close], names)?));
        rest = &tail[close + 1..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        segs.push(Seg::Lit(lit.into()));
    }
    Ok(Template { segs: segs.into() })
}

fn parse_var(inner: &str, names: &Names<'_>) -> Result<Var, String> {
    let (expr, default) = match inner.split_once('|') {
        Some((e, d)) => (e.trim(), Some(Box::from(d))),
        None => (inner.trim(), None),
    };
    let bad = |why: &str| format!("`{{{inner}}}`: {why}");
    let (kind, name) = expr.split_once('.').ok_or_else(|| {
        bad("write `{source.name}`, with source `path`, `query`, `header`, `consumer`, `claims` or `calls`")
    })?;
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Err(bad("empty name"));
    }
    let src = match kind {
        "path" => {
            let i = names.params.iter().position(|p| p == name).ok_or_else(|| {
                bad(&format!(
                    "`{name}` is not a param of this route's path (params: {})",
                    if names.params.is_empty() {
                        "none".to_string()
                    } else {
                        names.params.join(", ")
                    }
                ))
            })?;
            Source::Path(i)
        }
        "query" => Source::Query(name.into()),
        "header" => Source::Header(
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| bad(&format!("`{name}` is not a valid header name")))?,
        ),
        "consumer" => match name.split_once('.') {
            None if name == "id" => Source::ConsumerId,
            None if name == "plan" => Source::ConsumerPlan,
            None if name == "groups" => Source::ConsumerGroups,
            Some(("metadata", k)) => Source::ConsumerMeta(k.into()),
            _ => {
                return Err(bad(
                    "a consumer has `id`, `plan`, `groups` and `metadata.KEY`",
                ))
            }
        },
        "claims" => Source::Claim(name.into()),
        "calls" => {
            let mut parts = name.split('.');
            let call = parts.next().unwrap_or_default();
            let i = names.calls.iter().position(|c| *c == call).ok_or_else(|| {
                bad(&format!(
                    "no call is named `{call}` (calls: {})",
                    names.calls.join(", ")
                ))
            })?;
            Source::Call {
                call: i,
                path: parts.map(Box::from).collect(),
            }
        }
        other => {
            return Err(bad(&format!(
                "unknown source `{other}` (use `path`, `query`, `header`, `consumer`, `claims` or `calls`)"
            )))
        }
    };
    Ok(Var {
        src,
        default,
        text: expr.into(),
    })
}

/// A JSON body template: strings are text templates; a string that is one
/// placeholder becomes that value with its JSON type.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonT {
    Lit(Value),
    Text(Template),
    One(Var),
    Arr(Vec<JsonT>),
    Obj(Vec<(String, JsonT)>),
}

impl JsonT {
    pub fn parse(v: &Value, names: &Names<'_>) -> Result<JsonT, String> {
        Ok(match v {
            Value::String(s) => {
                let t = parse(s, names)?;
                if let Some(v) = t.single() {
                    JsonT::One(v.clone())
                } else if t.vars().next().is_none() {
                    JsonT::Lit(Value::String(t.sample()))
                } else {
                    JsonT::Text(t)
                }
            }
            Value::Array(a) => JsonT::Arr(
                a.iter()
                    .map(|x| JsonT::parse(x, names))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => JsonT::Obj(
                m.iter()
                    .map(|(k, x)| Ok((k.clone(), JsonT::parse(x, names)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => JsonT::Lit(other.clone()),
        })
    }

    pub fn vars(&self, out: &mut Vec<Var>) {
        match self {
            JsonT::Lit(_) => {}
            JsonT::Text(t) => out.extend(t.vars().cloned()),
            JsonT::One(v) => out.push(v.clone()),
            JsonT::Arr(a) => a.iter().for_each(|x| x.vars(out)),
            JsonT::Obj(m) => m.iter().for_each(|(_, x)| x.vars(out)),
        }
    }

    pub fn render(&self, inp: &Inputs<'_>) -> Result<Value, String> {
        Ok(match self {
            JsonT::Lit(v) => v.clone(),
            JsonT::One(v) => v.json(inp)?,
            JsonT::Text(t) => {
                let mut s = String::new();
                t.render(inp, Enc::Raw, &mut s)?;
                Value::String(s)
            }
            JsonT::Arr(a) => {
                Value::Array(a.iter().map(|x| x.render(inp)).collect::<Result<_, _>>()?)
            }
            JsonT::Obj(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| Ok((k.clone(), x.render(inp)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Consumer, Identity, Method, Principal};
    use http::HeaderValue;
    use serde_json::json;

    fn ctx(uri: &str, identity: Option<Identity>) -> Ctx {
        Ctx::for_test(uri, "127.0.0.1", identity)
    }

    fn identity() -> Identity {
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), json!("user-7"));
        claims.insert("org".into(), json!({"id": 42, "name": "Acme"}));
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("tier".into(), "gold".into());
        Identity {
            consumer: Some(Arc::new(Consumer {
                id: "app".into(),
                groups: vec![Arc::from("mobile"), Arc::from("beta")].into(),
                plan: Some("pro".into()),
                metadata,
                slot: 0,
                id_header: HeaderValue::from_static("app"),
                groups_header: None,
                plan_header: None,
            })),
            method: Method::Jwt,
            principal: Some(Arc::new(Principal {
                issuer: "idp".into(),
                subject: Some("user-7".into()),
                claims,
                ..Principal::default()
            })),
        }
    }

    const CALLS: &[&str] = &["user", "posts"];

    fn t(s: &str) -> Template {
        parse(
            s,
            &Names {
                params: &["id".to_string()],
                calls: CALLS,
            },
        )
        .unwrap()
    }

    fn err(s: &str) -> String {
        parse(
            s,
            &Names {
                params: &["id".to_string()],
                calls: CALLS,
            },
        )
        .unwrap_err()
    }

    fn render(tpl: &Template, inp: &Inputs<'_>, enc: Enc) -> Result<Option<String>, String> {
        let mut s = String::new();
        Ok(tpl.render(inp, enc, &mut s)?.then_some(s))
    }

    #[test]
    fn parsing_names_sources_and_rejects_unknown_ones() {
        let tpl = t("/u/{path.id}/x{{y}}{query.page|1}");
        assert_eq!(tpl.segs.len(), 4);
        assert_eq!(tpl.segs[0], Seg::Lit("/u/".into()));
        assert!(matches!(&tpl.segs[1], Seg::Var(v) if v.src == Source::Path(0)));
        assert_eq!(tpl.segs[2], Seg::Lit("/x{y}".into()));
        assert!(matches!(&tpl.segs[3], Seg::Var(v) if v.default.as_deref() == Some("1")));
        let c = t("{calls.posts.items.0.id}");
        assert_eq!(c.single().and_then(Var::call), Some(1));
        assert!(err("{path.nope}").contains("not a param"));
        assert!(err("{calls.nope.id}").contains("no call is named `nope`"));
        assert!(err("{body.x}").contains("unknown source"));
        assert!(err("{consumer.secret}").contains("consumer has"));
        assert!(err("{header.bad name}").contains("header name"));
        assert!(err("{query}").contains("source.name"));
        assert!(err("/a/{query.x").contains("unclosed"));
        assert!(err("{query.a..b}").contains("empty name"));
    }

    #[test]
    fn rendering_decodes_then_encodes_for_the_destination() {
        let c = ctx("/x?q=a%2Fb+c&n=1", None);
        let mut headers = HeaderMap::new();
        headers.insert(
            "accept-language",
            HeaderValue::from_static("fr-CH, fr;q=0.9"),
        );
        let calls = vec![None, None];
        let inp = Inputs {
            ctx: &c,
            headers: &headers,
            calls: &calls,
        };
        // A value never adds a path segment or a query parameter.
        assert_eq!(
            render(&t("/s/{query.q}"), &inp, Enc::Path)
                .unwrap()
                .unwrap(),
            "/s/a%2Fb%20c"
        );
        assert_eq!(
            render(&t("{query.q}&x"), &inp, Enc::Query)
                .unwrap()
                .unwrap(),
            "a%2Fb%20c%26x"
        );
        assert_eq!(
            render(&t("{header.accept-language}"), &inp, Enc::Raw)
                .unwrap()
                .unwrap(),
            "fr-CH, fr;q=0.9"
        );
        // Missing: a lone placeholder is left out, defaults apply, text
        // around a missing value stays.
        assert_eq!(render(&t("{query.none}"), &inp, Enc::Query).unwrap(), None);
        assert_eq!(
            render(&t("{query.none|20}"), &inp, Enc::Query).unwrap(),
            Some("20".into())
        );
        assert_eq!(
            render(&t("p-{query.none}"), &inp, Enc::Raw).unwrap(),
            Some("p-".into())
        );
        assert_eq!(render(&t("{consumer.id}"), &inp, Enc::Raw).unwrap(), None);
        assert_eq!(decode_path("a%2Fb+%E2%82%AC%zz"), "a/b+€%zz");
    }

    #[test]
    fn consumer_and_claims() {
        let c = ctx("/", Some(identity()));
        let headers = HeaderMap::new();
        let calls = vec![None, None];
        let inp = Inputs {
            ctx: &c,
            headers: &headers,
            calls: &calls,
        };
        let r = |s: &str| render(&t(s), &inp, Enc::Raw).unwrap().unwrap();
        assert_eq!(
            r("{consumer.id}/{consumer.plan}/{consumer.groups}"),
            "app/pro/mobile,beta"
        );
        assert_eq!(r("{consumer.metadata.tier}"), "gold");
        assert_eq!(r("{claims.sub}"), "user-7");
        assert_eq!(r("{claims.org.id}"), "42");
        assert_eq!(r("{claims.org}"), r#"{"id":42,"name":"Acme"}"#);
        let body = JsonT::parse(
            &json!({"who": "{claims.sub}", "org": "{claims.org.id}", "groups": "{consumer.groups}", "note": "hi {consumer.id}", "n": 3, "gone": "{claims.none}"}),
            &Names { params: &[], calls: CALLS },
        )
        .unwrap();
        assert_eq!(
            body.render(&inp).unwrap(),
            json!({"who": "user-7", "org": 42, "groups": ["mobile", "beta"], "note": "hi app", "n": 3, "gone": null})
        );
    }

    #[test]
    fn call_fields_keep_types_and_missing_ones_fail() {
        let c = ctx("/", None);
        let headers = HeaderMap::new();
        let calls = vec![
            Some(Arc::new(json!({"id": 7, "tags": ["a", "b"], "none": null}))),
            None,
        ];
        let inp = Inputs {
            ctx: &c,
            headers: &headers,
            calls: &calls,
        };
        assert_eq!(
            render(&t("/users/{calls.user.id}"), &inp, Enc::Path).unwrap(),
            Some("/users/7".into())
        );
        assert_eq!(
            render(&t("{calls.user.tags.1}"), &inp, Enc::Raw).unwrap(),
            Some("b".into())
        );
        let e = render(&t("{calls.user.missing}"), &inp, Enc::Raw).unwrap_err();
        assert!(
            e.contains("calls.user.missing") && e.contains("missing"),
            "{e}"
        );
        assert!(render(&t("{calls.user.none}"), &inp, Enc::Raw).is_err());
        assert_eq!(
            render(&t("{calls.user.none|0}"), &inp, Enc::Raw).unwrap(),
            Some("0".into())
        );
        let body = JsonT::parse(
            &json!({"ids": "{calls.user.tags}"}),
            &Names {
                params: &[],
                calls: CALLS,
            },
        )
        .unwrap();
        assert_eq!(body.render(&inp).unwrap(), json!({"ids": ["a", "b"]}));
    }
}
