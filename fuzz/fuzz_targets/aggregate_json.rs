//! An aggregate call's answer shaped as text (`doc::place`, what the
//! gateway does for calls that need no tree) against the same shaping on a
//! `serde_json::Value` (the tree path): the same verdict on every input —
//! invalid JSON, a missing target, a collection that is not an array, a
//! non-object merged at the top — and, when both succeed, the same JSON.
//!
//! Input: one selector byte (target, `collection`, merge at the top or
//! under a group), then the answer body.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use portico::aggregate::doc::{self, Node};
use portico::aggregate::shape::{self, Shape};
use serde_json::Value;

const TARGETS: [Option<&str>; 6] = [
    None,
    Some("a"),
    Some("a.0"),
    Some("a.b"),
    Some("0"),
    Some("a.b.1.c"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let target = TARGETS[usize::from(sel & 7) % TARGETS.len()].and_then(shape::path);
    let collection = sel & 8 != 0;
    let merge = sel & 16 != 0;
    let body = Bytes::copy_from_slice(body);
    let by_text = doc::place(&body, target.as_ref(), collection, merge);

    let tree = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v,
        Err(e) => {
            let e = e.to_string();
            // Limits of building a tree, not of JSON grammar: the text path
            // has none of them (documented in docs/aggregation.md): nesting,
            // numbers beyond f64, escapes of unpaired UTF-16 surrogates.
            if ["recursion limit", "number out of range", "hex escape"]
                .iter()
                .any(|m| e.contains(m))
            {
                return;
            }
            let got = by_text.expect_err("the tree path refused this input");
            assert!(got.starts_with("invalid JSON: "), "{got}");
            return;
        }
    };
    let s = Shape {
        target,
        collection,
        ..Shape::default()
    };
    let by_tree = s.apply(tree).and_then(|v| {
        if merge && !matches!(v, Value::Object(_) | Value::Null) {
            return Err(format!(
                "answered {}, not an object: set `group` or `collection` to place it",
                shape::type_name(&v)
            ));
        }
        Ok(v)
    });
    match (by_text, by_tree) {
        (Ok(node), Ok(v)) => {
            let mut out = Vec::new();
            node.write(&mut out);
            let written: Value = serde_json::from_slice(&out).expect("the text path writes JSON");
            assert_eq!(written, v);
            if let Node::Raw(b) = &node {
                // A placed value is a slice of the body, never re-encoded.
                assert!(body.as_ptr_range().contains(&b.as_ptr()) || b.is_empty());
            }
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("text: {a:?}\ntree: {b:?}"),
    }
});
