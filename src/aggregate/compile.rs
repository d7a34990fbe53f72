//! `aggregate` configuration → [`AggregateAction`]: templates parsed, the
//! dependency graph derived from `{calls.NAME...}` references and checked
//! (unknown names, cycles), shaping paths split, limits set. Every error
//! carries its key path.

use super::shape::{self, Fields, Shape};
use super::share::{Cache, Flights};
use super::template::{self, JsonT, Names, Template};
use super::{AggregateAction, Call};
use crate::config::model;
use crate::proxy::ProxyAction;
use http::{HeaderName, Method, Uri};
use std::sync::Arc;

/// Errors as (key path, message).
pub type Errors = Vec<(String, String)>;

/// Compiles the action at key path `p`; `params` are the route's path
/// params; `proxy` gives the proxy machinery of an upstream by name (or the
/// message saying it does not exist).
pub fn compile(
    a: &model::AggregateAction,
    p: &str,
    params: &[String],
    proxy: &dyn Fn(&str) -> Result<ProxyAction, String>,
) -> Result<AggregateAction, Errors> {
    let mut errs: Errors = Vec::new();
    if a.calls.is_empty() {
        errs.push((format!("{p}.calls"), "list at least one call".into()));
    }
    let names: Vec<&str> = a.calls.iter().map(|c| c.name.as_str()).collect();
    for (i, n) in names.iter().enumerate() {
        if n.is_empty()
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            errs.push((
                format!("{p}.calls[{i}].name"),
                format!("`{n}`: use letters, digits, `_` and `-`"),
            ));
        }
        if names[..i].contains(n) {
            errs.push((
                format!("{p}.calls[{i}].name"),
                format!("another call is already named `{n}`"),
            ));
        }
    }
    if a.fields_param.as_deref() == Some("") {
        errs.push((format!("{p}.fields_param"), "must not be empty".into()));
    }
    if a.max_total_body.0 == 0 {
        errs.push((format!("{p}.max_total_body"), "must be above 0".into()));
    }
    let env = Names {
        params,
        calls: &names,
    };
    let mut calls = Vec::with_capacity(a.calls.len());
    for (i, c) in a.calls.iter().enumerate() {
        if let Some(call) = compile_call(c, &format!("{p}.calls[{i}]"), &env, proxy, &mut errs) {
            calls.push(call);
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    if let Some((at, cycle)) = find_cycle(&calls) {
        return Err(vec![(
            format!("{p}.calls[{at}]"),
            format!("the calls depend on each other in a cycle: {cycle}"),
        )]);
    }
    for i in 0..calls.len() {
        let deps = calls[i].deps.clone();
        for d in deps.iter() {
            calls[*d].referenced = true;
        }
    }
    Ok(AggregateAction {
        calls: calls.into(),
        fields_param: a.fields_param.as_deref().map(Box::from),
        max_total_body: a.max_total_body.0,
    })
}

fn compile_call(
    c: &model::AggregateCall,
    p: &str,
    env: &Names<'_>,
    proxy: &dyn Fn(&str) -> Result<ProxyAction, String>,
    errs: &mut Errors,
) -> Option<Call> {
    let before = errs.len();
    let mut err = |k: &str, m: String| errs.push((format!("{p}{k}"), m));
    let px = proxy(&c.upstream).map_err(|m| err(".upstream", m)).ok();
    let method = Method::from_bytes(c.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| err(".method", format!("`{}` is not a valid method", c.method)))
        .ok();
    let mut deps: Vec<usize> = Vec::new();
    let mut note = |t: &Template| deps.extend(t.vars().filter_map(|v| v.call()));

    let path = match template::parse(&c.path, env) {
        Ok(t) => {
            let s = t.sample();
            if !s.starts_with('/') {
                err(".path", "must start with `/`".into());
            } else if s.contains(['?', '#'])
                || http::uri::PathAndQuery::try_from(s.as_str()).is_err()
            {
                err(
                    ".path",
                    "not a valid path (put query parameters under `query`)".into(),
                );
            }
            note(&t);
            Some(t)
        }
        Err(e) => {
            err(".path", e);
            None
        }
    };
    let mut query = Vec::with_capacity(c.query.len());
    for (k, v) in &c.query {
        match template::parse(v, env) {
            Ok(t) => {
                note(&t);
                let mut name = String::new();
                template::encode_into(k, &mut name);
                query.push((name, t));
            }
            Err(e) => err(&format!(".query.{k}"), e),
        }
    }
    let mut headers = Vec::with_capacity(c.headers.len());
    for (k, v) in &c.headers {
        let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
            err(
                &format!(".headers.{k}"),
                format!("`{k}` is not a valid header name"),
            );
            continue;
        };
        if crate::proxy::forward::is_hop_by_hop(&name)
            || name == http::header::HOST
            || name == http::header::CONTENT_LENGTH
        {
            err(
                &format!(".headers.{k}"),
                "hop-by-hop headers, `host` and `content-length` are set by the gateway".into(),
            );
            continue;
        }
        match template::parse(v, env) {
            Ok(t) if http::HeaderValue::from_str(&t.sample()).is_err() => err(
                &format!(".headers.{k}"),
                "not a valid header value (control characters?)".into(),
            ),
            Ok(t) => {
                note(&t);
                headers.push((name, t));
            }
            Err(e) => err(&format!(".headers.{k}"), e),
        }
    }
    let body = match c.body.as_ref().map(|b| JsonT::parse(b, env)) {
        Some(Ok(t)) => {
            let mut vars = Vec::new();
            t.vars(&mut vars);
            deps.extend(vars.iter().filter_map(|v| v.call()));
            Some(t)
        }
        Some(Err(e)) => {
            err(".body", e);
            None
        }
        None => None,
    };
    if c.timeout.0.is_zero() {
        err(".timeout", "must be above 0".into());
    }
    if c.max_body.0 == 0 {
        err(".max_body", "must be above 0".into());
    }
    if c.fallback.is_some() && c.required {
        err(
            ".fallback",
            "only an optional call (`required: false`) can have a fallback".into(),
        );
    }
    let mut one_path = |k: &str, s: &str| -> Option<shape::Path> {
        let r = shape::path(s);
        if r.is_none() {
            err(k, format!("`{s}` is not a dot path (`a.b.c`)"));
        }
        r
    };
    let target = c.target.as_deref().and_then(|s| one_path(".target", s));
    let mut group = c.group.as_deref().and_then(|s| one_path(".group", s));
    let allow: Vec<_> = c
        .allow
        .iter()
        .filter_map(|s| one_path(".allow", s))
        .collect();
    let deny: Vec<_> = c.deny.iter().filter_map(|s| one_path(".deny", s)).collect();
    let mapping: Vec<_> = c
        .mapping
        .iter()
        .filter_map(|(f, t)| Some((one_path(".mapping", f)?, one_path(".mapping", t)?)))
        .collect();
    if c.collection && group.is_none() {
        group = shape::path(&c.name);
    }
    if group.is_none() && c.fallback.as_ref().is_some_and(|f| !f.is_object()) {
        err(
            ".fallback",
            "without `group` the fallback is merged at the top level, so it must be an object"
                .into(),
        );
    }
    if c.cache.is_some() && method.as_ref().is_some_and(|m| *m != Method::GET) {
        err(".cache", "only GET calls can be cached".into());
    }
    if let Some(cache) = &c.cache {
        if cache.ttl.0.is_zero() {
            err(".cache.ttl", "must be above 0".into());
        }
        if cache.max_entries == 0 {
            err(".cache.max_entries", "must be above 0".into());
        }
    }
    if errs.len() > before {
        return None;
    }
    deps.sort_unstable();
    deps.dedup();
    Some(Call {
        name: Arc::from(c.name.as_str()),
        proxy: px?,
        method: method?,
        static_uri: match (&path, query.is_empty()) {
            (Some(p), true) if p.vars().next().is_none() => Uri::try_from(p.sample()).ok(),
            _ => None,
        },
        path: path?,
        query,
        headers,
        body,
        timeout: c.timeout.0,
        required: c.required,
        fallback: c.fallback.clone(),
        max_body: c.max_body.0,
        deps: deps.into(),
        referenced: false,
        flights: c.single_flight.then(Flights::default),
        cache: c.cache.as_ref().map(|k| Cache::new(k.ttl.0, k.max_entries)),
        public: c.public,
        shape: Shape {
            target,
            allow: (!allow.is_empty()).then(|| Fields::from_paths(allow.iter().map(|p| &**p))),
            deny,
            mapping,
            collection: c.collection,
        },
        group,
    })
}

/// A cycle in the dependency graph: the index of a call on it and the
/// cycle written out (`a → b → a`).
fn find_cycle(calls: &[Call]) -> Option<(usize, String)> {
    // 0: unvisited, 1: on the current path, 2: done.
    fn visit(i: usize, calls: &[Call], mark: &mut [u8], stack: &mut Vec<usize>) -> Option<usize> {
        mark[i] = 1;
        stack.push(i);
        for &d in calls[i].deps.iter() {
            if mark[d] == 1 {
                return Some(d);
            }
            if mark[d] == 0 {
                if let Some(c) = visit(d, calls, mark, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        mark[i] = 2;
        None
    }
    let mut mark = vec![0u8; calls.len()];
    for i in 0..calls.len() {
        if mark[i] != 0 {
            continue;
        }
        let mut stack = Vec::new();
        if let Some(start) = visit(i, calls, &mut mark, &mut stack) {
            let from = stack.iter().position(|x| *x == start).unwrap_or(0);
            let mut names: Vec<&str> = stack[from..].iter().map(|x| &*calls[*x].name).collect();
            names.push(&calls[start].name);
            return Some((start, names.join(" → ")));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::config::parse_str;
    use crate::config::ConfigError;

    const BASE: &str = "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{address: '127.0.0.1:1'}]\nroutes:\n  - name: r\n    match: {path: '/u/{id}'}\n    action:\n      aggregate:\n        calls:\n";

    fn errors(calls: &str) -> Vec<ConfigError> {
        let loaded = parse_str("t.yaml", &format!("{BASE}{calls}"), |_| None).unwrap();
        match crate::snapshot::compile(&loaded, None) {
            Ok(_) => vec![],
            Err(e) => e.0,
        }
    }

    fn one(calls: &str, path: &str, msg: &str) {
        let e = errors(calls);
        assert_eq!(e.len(), 1, "{calls}: {e:?}");
        assert_eq!(e[0].path, path, "{calls}");
        assert!(e[0].message.contains(msg), "{calls}: {}", e[0].message);
    }

    #[test]
    fn a_valid_graph_compiles() {
        let e = errors(
            "          - {name: a, upstream: up, path: '/a/{path.id}'}\n          - {name: b, upstream: up, path: '/b/{calls.a.id}', query: {x: '{calls.a.x}'}}\n          - {name: c, upstream: up, path: /c, method: post, body: {ids: '{calls.b.ids}'}, required: false, fallback: {c: []}}\n",
        );
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn cycles_are_config_errors() {
        one(
            "          - {name: a, upstream: up, path: '/a/{calls.b.id}'}\n          - {name: b, upstream: up, path: /b, headers: {x-a: '{calls.a.id}'}}\n",
            "routes[0].action.aggregate.calls[0]",
            "a → b → a",
        );
        one(
            "          - {name: a, upstream: up, path: '/a/{calls.a.id}'}\n",
            "routes[0].action.aggregate.calls[0]",
            "cycle: a → a",
        );
    }

    #[test]
    fn unknown_references_are_config_errors() {
        one(
            "          - {name: a, upstream: up, path: '/a/{calls.nope.id}'}\n",
            "routes[0].action.aggregate.calls[0].path",
            "no call is named `nope`",
        );
        one(
            "          - {name: a, upstream: up, path: /a, query: {q: '{path.nope}'}}\n",
            "routes[0].action.aggregate.calls[0].query.q",
            "not a param",
        );
        one(
            "          - {name: a, upstream: nowhere, path: /a}\n",
            "routes[0].action.aggregate.calls[0].upstream",
            "no upstream is named `nowhere`",
        );
    }

    #[test]
    fn other_checks_name_their_key() {
        let p = "routes[0].action.aggregate.calls[1]";
        let two = |second: &str| {
            format!("          - {{name: a, upstream: up, path: /a}}\n          - {second}\n")
        };
        one(
            &two("{name: a, upstream: up, path: /b}"),
            &format!("{p}.name"),
            "already named",
        );
        one(
            &two("{name: b, upstream: up, path: b}"),
            &format!("{p}.path"),
            "start with `/`",
        );
        one(
            &two("{name: b, upstream: up, path: '/b?x=1'}"),
            &format!("{p}.path"),
            "under `query`",
        );
        one(
            &two("{name: b, upstream: up, path: /b, fallback: {}}"),
            &format!("{p}.fallback"),
            "optional",
        );
        one(
            &two("{name: b, upstream: up, path: /b, required: false, fallback: [1]}"),
            &format!("{p}.fallback"),
            "must be an object",
        );
        one(
            &two("{name: b, upstream: up, path: /b, method: POST, cache: {ttl: 1s}}"),
            &format!("{p}.cache"),
            "only GET",
        );
        one(
            &two("{name: b, upstream: up, path: /b, cache: {ttl: 0}}"),
            &format!("{p}.cache.ttl"),
            "above 0",
        );
        one(
            &two("{name: b, upstream: up, path: /b, allow: ['a..b']}"),
            &format!("{p}.allow"),
            "dot path",
        );
        one(
            &two("{name: b, upstream: up, path: /b, headers: {connection: close}}"),
            &format!("{p}.headers.connection"),
            "set by the gateway",
        );
        one(
            &two("{name: b, upstream: up, path: /b, method: 'BAD METHOD'}"),
            &format!("{p}.method"),
            "not a valid method",
        );
        one(
            &two("{name: b, upstream: up, path: /b, timeout: 0}"),
            &format!("{p}.timeout"),
            "above 0",
        );
        let e = errors("          []\n");
        assert!(
            e.iter()
                .any(|e| e.path == "routes[0].action.aggregate.calls"),
            "{e:?}"
        );
    }
}
