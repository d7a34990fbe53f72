//! Path normalisation: never panics, and every accepted path comes out
//! canonical (a fixed point, no empty or dot segments, upper-case escapes,
//! no escaped unreserved character) and a valid URI path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::normalize::{normalize_path, normalize_uri};
use std::borrow::Cow;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let out = match normalize_path(raw) {
        Ok(o) => o,
        Err(_) => return,
    };
    if let Cow::Borrowed(b) = &out {
        assert_eq!(*b, raw);
    }
    if !raw.starts_with('/') {
        assert_eq!(&*out, raw, "paths not starting with `/` are left alone");
        return;
    }
    assert!(out.starts_with('/'));
    assert!(!out.contains("//"), "{raw:?} -> {out:?}");
    assert!(!out.contains('\\'));
    for seg in out.split('/') {
        assert!(seg != "." && seg != "..", "{raw:?} -> {out:?}");
    }
    let b = out.as_bytes();
    for (i, _) in out.match_indices('%') {
        let (h, l) = (b[i + 1], b[i + 2]);
        assert!(h.is_ascii_hexdigit() && l.is_ascii_hexdigit());
        assert!(
            !h.is_ascii_lowercase() && !l.is_ascii_lowercase(),
            "{out:?}"
        );
        let v = u8::from_str_radix(&out[i + 1..i + 3], 16).unwrap();
        assert!(v != 0 && !unreserved(v), "{out:?}");
    }
    // A fixed point: normalising again changes nothing.
    match normalize_path(&out) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, &*out),
        other => panic!("{raw:?} -> {out:?} -> {other:?}"),
    }
    // Whenever the raw path is a valid URI path, so is the result, and the
    // URI form agrees.
    if let Ok(uri) = raw.parse::<http::Uri>() {
        if uri.path() == raw {
            let n = normalize_uri(&uri).expect("same path, same verdict");
            let path = n.as_ref().map_or(uri.path(), |u| u.path());
            assert_eq!(path, &*out);
        }
    }
});
