//! The merged answer, built without re-encoding what needs no change.
//!
//! A call's JSON is kept as text. A call that is only *placed* — merged at
//! the top, put under a `group`, or narrowed to a `target` sub-value,
//! collections included — is copied into the answer as the backend wrote
//! it ([`place`]): only the levels on the way are read, as members pointing
//! into the text, and the reading checks the whole text on the way (each
//! byte is read once; an answer shared with other requests through the
//! cache or single-flight is also checked before it is shared). Trees
//! (`serde_json::Value`) are built only where a tree is needed: a call
//! shaped with `allow`, `deny` or `mapping`, a call another call's
//! templates read, a fallback, and the parts of the answer a sparse
//! fieldset reaches into. The answer's own keys are sorted (as a `Value`
//! object's are); the members inside a spliced value keep the backend's
//! order.

use super::shape::{Fields, Path};
use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// A piece of the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// One JSON value's text, checked by [`check`] (no surrounding
    /// whitespace).
    Raw(Bytes),
    Tree(Value),
    /// An object the answer assembles (the top level, a group's parents).
    Obj(BTreeMap<String, Node>),
}

/// `body` as one checked JSON value (surrounding whitespace trimmed), or
/// why it is not JSON.
pub fn check(body: &Bytes) -> Result<Bytes, serde_json::Error> {
    let raw: &RawValue = serde_json::from_slice(body)?;
    Ok(body.slice_ref(raw.get().as_bytes()))
}

/// `body` without the JSON whitespace around it.
fn trim(body: &Bytes) -> Bytes {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = body.iter().position(|b| !ws(b)).unwrap_or(body.len());
    let end = body.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    body.slice(start..end)
}

/// A call's answer text shaped without a tree (see the module docs):
/// `target` taken, `collection` checked, and for a call merged at the top
/// (`merge`) its members. `Err` is why the call counts as failed; the
/// text is checked on the way.
pub fn place(
    body: &Bytes,
    target: Option<&Path>,
    collection: bool,
    merge: bool,
) -> Result<Node, String> {
    let invalid = |e: serde_json::Error| format!("invalid JSON: {e}");
    let text = trim(body);
    let v = match target {
        Some(t) => take(&text, t)
            .map_err(invalid)?
            .ok_or_else(|| format!("the response has no `{}` (target)", t.join(".")))?,
        // Read (so checked) by `object` below, before any other verdict.
        None if merge && !collection && text.first() == Some(&b'{') => text,
        None => check(&text).map_err(invalid)?,
    };
    if collection && v.first() != Some(&b'[') {
        return Err(format!("expected an array (collection), got {}", kind(&v)));
    }
    if !merge {
        return Ok(Node::Raw(v));
    }
    match v.first() {
        Some(b'{') => Ok(Node::Obj(object(&v).map_err(invalid)?)),
        Some(b'n') => Ok(Node::Raw(v)),
        _ => Err(format!(
            "answered {}, not an object: set `group` or `collection` to place it",
            kind(&v)
        )),
    }
}

/// The JSON type of a checked value, by its first byte.
pub fn kind(raw: &[u8]) -> &'static str {
    match raw.first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// An object's members, each pointing into the text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Members<'de>, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(8).min(64));
                while let Some(e) = a.next_entry::<String, &'de RawValue>()? {
                    v.push(e);
                }
                Ok(Members(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// An object's members as nodes, each a slice of `raw` (checked on the
/// way). A repeated key keeps its last value, as a tree would.
fn object(raw: &Bytes) -> Result<BTreeMap<String, Node>, serde_json::Error> {
    let Members(m) = serde_json::from_slice(raw)?;
    Ok(m.into_iter()
        .map(|(k, v)| (k, Node::Raw(raw.slice_ref(v.get().as_bytes()))))
        .collect())
}

/// The value at `path` in a JSON text without surrounding whitespace
/// (objects, and arrays by index), as a slice of it; `Ok(None)` when it
/// has none. The first level read checks the whole text.
pub fn take(raw: &Bytes, path: &[Box<str>]) -> Result<Option<Bytes>, serde_json::Error> {
    let mut cur = raw.clone();
    for (depth, seg) in path.iter().enumerate() {
        let next = match cur.first() {
            Some(b'{') => {
                let Members(m) = serde_json::from_slice(&cur)?;
                m.into_iter().rev().find(|(k, _)| **k == **seg).map(|m| m.1)
            }
            Some(b'[') => {
                let items: Vec<&RawValue> = serde_json::from_slice(&cur)?;
                seg.parse::<usize>()
                    .ok()
                    .and_then(|i| items.get(i).copied())
            }
            _ => {
                if depth == 0 {
                    check(&cur)?;
                }
                None
            }
        };
        let Some(next) = next else {
            return Ok(None);
        };
        cur = cur.slice_ref(next.get().as_bytes());
    }
    Ok(Some(cur))
}

impl Node {
    /// This node as an object, converted if needed (a non-object is
    /// replaced by an empty one).
    fn obj(&mut self) -> &mut BTreeMap<String, Node> {
        let m = match std::mem::replace(self, Node::Obj(BTreeMap::new())) {
            Node::Obj(m) => m,
            // Checked already: only an object has members.
            Node::Raw(b) if b.first() == Some(&b'{') => object(&b).unwrap_or_default(),
            Node::Raw(_) => BTreeMap::new(),
            Node::Tree(Value::Object(m)) => {
                m.into_iter().map(|(k, v)| (k, Node::Tree(v))).collect()
            }
            Node::Tree(_) => BTreeMap::new(),
        };
        *self = Node::Obj(m);
        let Node::Obj(m) = self else {
            unreachable!("set just above")
        };
        m
    }

    fn is_container(&self) -> bool {
        match self {
            Node::Raw(b) => matches!(b.first(), Some(b'{' | b'[')),
            Node::Tree(v) => v.is_object() || v.is_array(),
            Node::Obj(_) => true,
        }
    }

    /// Keeps only `fields` of this node; arrays apply to each element.
    pub fn keep(&mut self, fields: &Fields) {
        if fields.leaf {
            return;
        }
        match self {
            Node::Obj(m) => m.retain(|k, child| match fields.children.get(k.as_str()) {
                None => false,
                Some(f) if f.leaf => true,
                Some(f) if child.is_container() => {
                    child.keep(f);
                    true
                }
                Some(_) => false,
            }),
            Node::Tree(v) => fields.keep(v),
            // Beyond what a tree can hold (nested deeper than serde_json's
            // limit): kept whole, as the route exposes it.
            Node::Raw(b) => {
                if let Ok(mut v) = serde_json::from_slice::<Value>(b) {
                    fields.keep(&mut v);
                    *self = Node::Tree(v);
                }
            }
        }
    }

    /// Appends this node's JSON text.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Node::Raw(b) => out.extend_from_slice(b),
            // Writing a `Value` into a `Vec` cannot fail.
            Node::Tree(v) => serde_json::to_writer(&mut *out, v).unwrap_or_default(),
            Node::Obj(m) => {
                out.push(b'{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, k).unwrap_or_default();
                    out.push(b':');
                    v.write(out);
                }
                out.push(b'}');
            }
        }
    }

    /// An upper estimate of the text's length, to size the buffer.
    pub fn size_hint(&self) -> usize {
        match self {
            Node::Raw(b) => b.len(),
            Node::Tree(_) => 128,
            Node::Obj(m) => {
                m.iter()
                    .map(|(k, v)| k.len() + 4 + v.size_hint())
                    .sum::<usize>()
                    + 2
            }
        }
    }
}

/// Merges an object's members into `root` (a later key wins); any other
/// value adds nothing.
pub fn merge(root: &mut BTreeMap<String, Node>, node: Node) {
    match node {
        Node::Raw(b) if b.first() == Some(&b'{') => root.extend(object(&b).unwrap_or_default()),
        Node::Raw(_) => {}
        Node::Tree(Value::Object(m)) => root.extend(m.into_iter().map(|(k, v)| (k, Node::Tree(v)))),
        Node::Tree(_) => {}
        Node::Obj(m) => root.extend(m),
    }
}

/// Sets `path` in `root` to `node`, creating objects on the way (a
/// non-object on the way is replaced).
pub fn put(root: &mut BTreeMap<String, Node>, path: &Path, node: Node) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = root;
    for p in parents {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| Node::Obj(BTreeMap::new()))
            .obj();
    }
    cur.insert(last.to_string(), node);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::shape;
    use serde_json::json;

    fn raw(s: &'static str) -> Bytes {
        check(&Bytes::from_static(s.as_bytes())).unwrap()
    }

    fn p(s: &str) -> Path {
        shape::path(s).unwrap()
    }

    fn text(n: &Node) -> String {
        let mut out = Vec::new();
        n.write(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn check_trims_and_refuses_what_is_not_one_json_value() {
        assert_eq!(&raw(" \n{\"a\": 1}\t")[..], b"{\"a\": 1}");
        for bad in ["", "{", "{\"a\":1} x", "[1,]", "\"\\q\"", "nul"] {
            assert!(
                check(&Bytes::from_static(bad.as_bytes())).is_err(),
                "{bad:?}"
            );
        }
        // Not UTF-8 inside a string.
        assert!(check(&Bytes::from_static(b"\"\xff\"")).is_err());
        assert_eq!(kind(&raw("[1]")), "an array");
        assert_eq!(kind(&raw("-1.5")), "a number");
        assert_eq!(kind(&raw("null")), "null");
    }

    #[test]
    fn take_walks_objects_and_arrays_without_reencoding() {
        let doc =
            raw(r#"{"data": {"items": [ {"id": 1,  "t": "a"}, {"id":2} ], "n": 2}, "data2": 0}"#);
        let take = |d: &Bytes, s: &str| take(d, &p(s)).unwrap();
        assert_eq!(
            &take(&doc, "data.items").unwrap()[..],
            br#"[ {"id": 1,  "t": "a"}, {"id":2} ]"#
        );
        assert_eq!(&take(&doc, "data.items.1.id").unwrap()[..], b"2");
        assert_eq!(take(&doc, "data.items.7"), None);
        assert_eq!(take(&doc, "data.items.x"), None);
        assert_eq!(take(&doc, "data.n.x"), None);
        assert_eq!(take(&doc, "nope"), None);
        // A repeated key: the last one counts, as in a tree.
        assert_eq!(&take(&raw(r#"{"a":1,"a":2}"#), "a").unwrap()[..], b"2");
        // Escaped keys are compared unescaped.
        assert_eq!(&take(&raw(r#"{"a\u0062":3}"#), "ab").unwrap()[..], b"3");
    }

    #[test]
    fn place_checks_the_whole_text_while_reading_it() {
        let body = |s: &'static str| Bytes::from_static(s.as_bytes());
        let t = p("items");
        let place = |s, target, collection, merge| place(&body(s), target, collection, merge);
        // Broken anywhere, even outside the part that is used.
        for (s, target, merge) in [
            (r#"{"items": [1], "other": [}"#, Some(&t), false),
            (r#"{"a": 1, "b": tru}"#, None, true),
            (r#"[1, 2"#, None, false),
            (r#""open"#, Some(&t), false),
            (r#"{"a": 1} trailing"#, None, true),
        ] {
            let e = place(s, target, false, merge).unwrap_err();
            assert!(e.starts_with("invalid JSON: "), "{s}: {e}");
        }
        assert_eq!(
            place(" {\"items\": [1, 2]}\n", Some(&t), true, false),
            Ok(Node::Raw(body("[1, 2]")))
        );
        assert_eq!(
            place(r#"{"items": {}}"#, Some(&t), true, false).unwrap_err(),
            "expected an array (collection), got an object"
        );
        assert_eq!(
            place(r#"{"x": 1}"#, Some(&t), false, false).unwrap_err(),
            "the response has no `items` (target)"
        );
        assert!(place("[1]", None, false, true)
            .unwrap_err()
            .starts_with("answered an array, not an object"));
        assert_eq!(
            place(" null ", None, false, true),
            Ok(Node::Raw(body("null")))
        );
        let Ok(Node::Obj(m)) = place(r#"{"b": [1], "a": {"x": "y"}}"#, None, false, true) else {
            panic!("an object merged at the top gives its members");
        };
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m["a"], Node::Raw(body(r#"{"x": "y"}"#)));
        // Checked before any other verdict (a collection merged at the top).
        let e = place(r#"{"a": tru}"#, None, true, true).unwrap_err();
        assert!(e.starts_with("invalid JSON: "), "{e}");
    }

    #[test]
    fn placing_has_none_of_the_limits_of_a_tree() {
        // Valid JSON that `serde_json::Value` refuses: nesting beyond 128
        // levels, a number beyond f64, an unpaired surrogate escape. Placed,
        // each is copied as it is (docs/aggregation.md).
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for s in [deep.as_str(), "1e400", r#""\ud800""#] {
            let b = Bytes::from(s.to_string());
            assert!(serde_json::from_slice::<Value>(&b).is_err(), "{s}");
            assert_eq!(place(&b, None, false, false), Ok(Node::Raw(b.clone())));
        }
    }

    #[test]
    fn merge_put_and_write_give_the_same_document_as_trees() {
        let mut root = BTreeMap::new();
        merge(
            &mut root,
            Node::Raw(raw(r#"{"z": {"k": [1, 2]}, "b": "x\"y"}"#)),
        );
        merge(&mut root, Node::Tree(json!({"b": "later wins", "c": null})));
        put(&mut root, &p("z.extra"), Node::Raw(raw("[true]")));
        put(&mut root, &p("g.h"), Node::Tree(json!(1)));
        put(&mut root, &p("b.replaced"), Node::Raw(raw("2")));
        merge(&mut root, Node::Raw(raw("null")));
        let doc = Node::Obj(root);
        let got: Value = serde_json::from_str(&text(&doc)).unwrap();
        assert_eq!(
            got,
            json!({
                "z": {"k": [1, 2], "extra": [true]},
                "b": {"replaced": 2},
                "c": null,
                "g": {"h": 1}
            })
        );
        // The top-level keys are sorted, a spliced value is kept as written.
        assert!(
            text(&doc).starts_with(
                r#"{"b":{"replaced":2},"c":null,"g":{"h":1},"z":{"extra":[true],"k":[1, 2]}"#
            ),
            "{}",
            text(&doc)
        );
        // Keys are escaped.
        let mut root = BTreeMap::new();
        put(&mut root, &p("q\"uote"), Node::Raw(raw("1")));
        assert_eq!(text(&Node::Obj(root)), r#"{"q\"uote":1}"#);
    }

    #[test]
    fn keep_applies_a_sparse_fieldset_across_node_kinds() {
        let mut root = BTreeMap::new();
        merge(
            &mut root,
            Node::Raw(raw(r#"{"user": {"name": "Ann", "email": "a@x"}, "n": 1}"#)),
        );
        put(
            &mut root,
            &p("posts"),
            Node::Raw(raw(r#"[{"title": "t", "body": "b"}]"#)),
        );
        put(
            &mut root,
            &p("meta.counts"),
            Node::Tree(json!({"a": 1, "b": 2})),
        );
        put(&mut root, &p("scalar"), Node::Raw(raw("3")));
        let mut doc = Node::Obj(root);
        let f = ["user.name", "posts.title", "meta.counts.b", "n", "scalar.x"].map(p);
        doc.keep(&Fields::from_paths(f.iter().map(|x| &**x)));
        let got: Value = serde_json::from_str(&text(&doc)).unwrap();
        assert_eq!(
            got,
            json!({"user": {"name": "Ann"}, "posts": [{"title": "t"}], "meta": {"counts": {"b": 2}}, "n": 1})
        );
    }
}
