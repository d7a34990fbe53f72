//! Shaping a call's JSON before it is merged: `target` (take a sub-value),
//! `allow` / `deny` (dot paths; an array on the way applies the rest of the
//! path to each element), `mapping` (rename), and the client's sparse
//! fieldset (an `allow` on the merged document).

use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A dot path split into its keys.
pub type Path = Box<[Box<str>]>;

/// Splits `a.b.c`; `None` for an empty path or an empty segment.
pub fn path(s: &str) -> Option<Path> {
    if s.is_empty() || s.split('.').any(str::is_empty) {
        return None;
    }
    Some(s.split('.').map(Box::from).collect())
}

/// A set of dot paths as a tree: a leaf keeps everything below it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields {
    pub(super) leaf: bool,
    pub(super) children: BTreeMap<Box<str>, Fields>,
}

impl Fields {
    pub fn from_paths<'a>(paths: impl IntoIterator<Item = &'a [Box<str>]>) -> Fields {
        let mut root = Fields::default();
        for p in paths {
            let mut node = &mut root;
            for k in p {
                node = node.children.entry(k.clone()).or_default();
            }
            node.leaf = true;
        }
        root
    }

    pub fn is_empty(&self) -> bool {
        !self.leaf && self.children.is_empty()
    }

    /// Keeps only the listed fields of `v`; arrays apply to each element.
    pub fn keep(&self, v: &mut Value) {
        if self.leaf {
            return;
        }
        match v {
            Value::Object(m) => {
                m.retain(|k, child| match self.children.get(k.as_str()) {
                    None => false,
                    Some(f) if f.leaf => true,
                    Some(f) => match child {
                        Value::Object(_) | Value::Array(_) => {
                            f.keep(child);
                            true
                        }
                        _ => false,
                    },
                });
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.keep(x)),
            _ => {}
        }
    }
}

/// Removes the field at `path` (in each element of arrays on the way).
pub fn remove(v: &mut Value, path: &[Box<str>]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match v {
        Value::Object(m) if rest.is_empty() => {
            m.remove(&**first);
        }
        Value::Object(m) => {
            if let Some(child) = m.get_mut(&**first) {
                remove(child, rest);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| remove(x, path)),
        _ => {}
    }
}

/// Takes the value at `path` out of `v` (objects, and arrays by index).
pub fn take(v: &mut Value, path: &[Box<str>]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut cur = v;
    for p in parents {
        cur = match cur {
            Value::Object(m) => m.get_mut(&**p)?,
            Value::Array(a) => a.get_mut(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match cur {
        Value::Object(m) => m.remove(&**last),
        Value::Array(a) => {
            let i = last.parse::<usize>().ok()?;
            a.get_mut(i).map(Value::take)
        }
        _ => None,
    }
}

/// Sets `path` in `v` to `val`, creating objects on the way (a non-object
/// on the way is replaced).
pub fn put(v: &mut Map<String, Value>, path: &[Box<str>], val: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for p in parents {
        let slot = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(m) = slot else {
            return;
        };
        cur = m;
    }
    cur.insert(last.to_string(), val);
}

/// One call's shaping, compiled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    pub target: Option<Path>,
    pub allow: Option<Fields>,
    pub deny: Vec<Path>,
    pub mapping: Vec<(Path, Path)>,
    pub collection: bool,
}

impl Shape {
    /// Applies target, allow, deny and mapping, in this order; `Err` is
    /// the reason the call counts as failed.
    pub fn apply(&self, mut v: Value) -> Result<Value, String> {
        if let Some(t) = &self.target {
            v = take(&mut v, t)
                .ok_or_else(|| format!("the response has no `{}` (target)", t.join(".")))?;
        }
        if self.collection && !v.is_array() {
            return Err(format!(
                "expected an array (collection), got {}",
                type_name(&v)
            ));
        }
        if let Some(a) = &self.allow {
            a.keep(&mut v);
        }
        for d in &self.deny {
            remove(&mut v, d);
        }
        if !self.mapping.is_empty() {
            match &mut v {
                Value::Array(a) => a.iter_mut().for_each(|x| self.rename(x)),
                x => self.rename(x),
            }
        }
        Ok(v)
    }

    /// Whether shaping needs the value as a tree: `allow`, `deny` or
    /// `mapping` (`target` and `collection` work on the text:
    /// [`doc::place`]).
    pub fn needs_tree(&self) -> bool {
        self.allow.is_some() || !self.deny.is_empty() || !self.mapping.is_empty()
    }

    fn rename(&self, v: &mut Value) {
        let mut moved = Vec::with_capacity(self.mapping.len());
        for (from, to) in &self.mapping {
            if let Some(x) = take(v, from) {
                moved.push((to, x));
            }
        }
        if let Value::Object(m) = v {
            for (to, x) in moved {
                put(m, to, x);
            }
        }
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::doc;
    use bytes::Bytes;
    use serde_json::json;

    fn p(s: &str) -> Path {
        path(s).unwrap()
    }

    fn fields(list: &[&str]) -> Fields {
        let ps: Vec<Path> = list.iter().map(|s| p(s)).collect();
        Fields::from_paths(ps.iter().map(|x| &**x))
    }

    #[test]
    fn allow_keeps_listed_paths_through_arrays() {
        let mut v = json!({
            "id": 1, "secret": "x",
            "profile": {"name": "Ann", "email": "a@x"},
            "items": [{"title": "a", "body": "b"}, {"title": "c", "body": "d"}],
            "scalar": 3
        });
        fields(&["id", "profile.name", "items.title", "scalar.nope"]).keep(&mut v);
        assert_eq!(
            v,
            json!({"id": 1, "profile": {"name": "Ann"}, "items": [{"title": "a"}, {"title": "c"}]})
        );
    }

    #[test]
    fn deny_removes_paths_through_arrays() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}, "items": [{"x": 1, "y": 2}]});
        for d in ["a", "b.c", "items.y", "missing.path"] {
            remove(&mut v, &p(d));
        }
        assert_eq!(v, json!({"b": {"d": 3}, "items": [{"x": 1}]}));
    }

    #[test]
    fn shape_applies_target_allow_deny_mapping_in_order() {
        let s = Shape {
            target: Some(p("data.user")),
            allow: Some(fields(&["id", "name", "meta"])),
            deny: vec![p("meta.internal")],
            mapping: vec![(p("name"), p("display.name")), (p("id"), p("user_id"))],
            collection: false,
        };
        let v = json!({"data": {"user": {"id": 7, "name": "Ann", "pw": "x", "meta": {"internal": 1, "tz": "UTC"}}}});
        assert_eq!(
            s.apply(v).unwrap(),
            json!({"user_id": 7, "display": {"name": "Ann"}, "meta": {"tz": "UTC"}})
        );
        assert!(s
            .apply(json!({"data": {}}))
            .unwrap_err()
            .contains("no `data.user`"));
    }

    #[test]
    fn collections_shape_each_element_and_must_be_arrays() {
        let s = Shape {
            allow: Some(fields(&["title", "id"])),
            mapping: vec![(p("title"), p("headline"))],
            collection: true,
            ..Shape::default()
        };
        let v = json!([{"id": 1, "title": "a", "body": "x"}, {"id": 2, "title": "b"}]);
        assert_eq!(
            s.apply(v).unwrap(),
            json!([{"id": 1, "headline": "a"}, {"id": 2, "headline": "b"}])
        );
        assert!(s
            .apply(json!({"id": 1}))
            .unwrap_err()
            .contains("expected an array"));
    }

    #[test]
    fn placing_text_agrees_with_shaping_a_tree() {
        let body = r#"{"data": {"items": [{"id": 1}], "user": {"id": 7}, "n": 3}}"#;
        let text = Bytes::from_static(body.as_bytes());
        let tree: Value = serde_json::from_str(body).unwrap();
        for (target, collection) in [
            (Some("data.items"), true),
            (Some("data.user"), false),
            (Some("data.user"), true),
            (Some("data.items.0"), false),
            (Some("data.missing"), false),
            (None, false),
            (None, true),
        ] {
            let s = Shape {
                target: target.map(p),
                collection,
                ..Shape::default()
            };
            let by_tree = s.apply(tree.clone());
            let by_text = doc::place(&text, s.target.as_ref(), collection, false).map(|n| {
                let doc::Node::Raw(b) = n else {
                    panic!("placed under a group: text")
                };
                serde_json::from_slice::<Value>(&b).unwrap()
            });
            assert_eq!(by_text, by_tree, "{target:?} {collection}");
        }
    }

    #[test]
    fn take_and_put() {
        let mut v = json!({"a": [{"b": 1}, {"b": 2}]});
        assert_eq!(take(&mut v, &p("a.1.b")), Some(json!(2)));
        assert_eq!(take(&mut v, &p("a.9.b")), None);
        let mut m = Map::new();
        m.insert("x".into(), json!(1));
        put(&mut m, &p("x.y"), json!(2));
        assert_eq!(Value::Object(m), json!({"x": {"y": 2}}));
        assert!(path("a..b").is_none() && path("").is_none());
    }
}
