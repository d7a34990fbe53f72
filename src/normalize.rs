//! Path normalisation before route matching, so that two spellings of one
//! path cannot reach different routes (`/public/../admin` or `/%61dmin` must
//! meet the rules of `/admin`). `server::service` normalises every request's
//! path before the router sees it; routing, captures, policies and the
//! upstream all get the normalised path.
//!
//! Rules, in order (documented in docs/hardening.md):
//! 1. Percent-escapes are checked: `%` must be followed by two hex digits,
//!    else the request is refused; `%00` (NUL) is refused.
//! 2. Escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986
//!    §2.3) are decoded: `%61` → `a`, `%2e` → `.`. Every other escape stays
//!    encoded with upper-case hex: `%2f` → `%2F`, `%c3%a9` → `%C3%A9`.
//! 3. **An encoded slash stays encoded.** `%2F` is data inside a segment,
//!    never a separator: `/a%2Fb` is the one segment `a/b`, and `..%2F` is not
//!    a dot segment. (An upstream that decodes `%2F` before splitting must be
//!    protected by its own rules; see the docs.)
//! 4. Repeated slashes collapse: `//a///b` → `/a/b` (an empty segment means
//!    nothing to routing, and upstreams disagree on what it means).
//! 5. Dot segments are removed (RFC 3986 §5.2.4), after step 2, so `%2e%2e`
//!    counts: `/a/./b/../c` → `/a/c`, `/a/b/..` → `/a/`. A `..` that would
//!    climb above the root is refused (`/../x`, `/a/../../x`); one that only
//!    returns to the root gives `/` (`/a/..`).
//! 6. Refused as well: a raw backslash (Windows servers and some frameworks
//!    treat it as a separator, so `/public\..\admin` could mean `/admin`
//!    to them), and a dot segment with parameters (`..;x`, `.;`), which
//!    Tomcat and Jetty treat as a dot segment.
//!
//! Paths that do not start with `/` (`*` for `OPTIONS *`, the empty path of a
//! `CONNECT`) are left alone.
//!
//! Cost: one scan of the path's bytes decides whether anything may need to
//! change; a path that needs nothing (the common case) is returned borrowed,
//! without allocating.

use http::uri::{PathAndQuery, Uri};
use std::borrow::Cow;
use std::fmt;

/// Why a path was refused (the request gets `400 bad_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    InvalidEscape,
    /// `%00`.
    Nul,
    /// A `..` segment that would climb above the root.
    AboveRoot,
    /// A raw `\` in the path.
    Backslash,
    /// A `.` or `..` segment with `;` parameters (`..;x`).
    DotSegmentParams,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::InvalidEscape => "invalid percent-escape in the path",
            PathError::Nul => "encoded NUL (%00) in the path",
            PathError::AboveRoot => "`..` in the path climbs above the root",
            PathError::Backslash => "backslash in the path",
            PathError::DotSegmentParams => "dot segment with parameters (`..;`) in the path",
        })
    }
}

impl std::error::Error for PathError {}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether the segment starting at `i` (just after a `/`) is `.` or `..`,
/// possibly followed by `;...`: the cheap test of the fast path.
fn dot_segment_at(b: &[u8], i: usize) -> bool {
    let dots = b[i..].iter().take_while(|&&c| c == b'.').count();
    (dots == 1 || dots == 2) && matches!(b.get(i + dots), None | Some(b'/') | Some(b';'))
}

/// Whether `path` may need normalising: a `%`, a `\`, an empty segment
/// (`//`) or a dot segment. One pass, no allocation.
fn may_change(path: &[u8]) -> bool {
    let mut prev_slash = false;
    for (i, &c) in path.iter().enumerate() {
        match c {
            b'%' | b'\\' => return true,
            b'/' if prev_slash => return true,
            b'.' if prev_slash && dot_segment_at(path, i) => return true,
            _ => {}
        }
        prev_slash = c == b'/';
    }
    false
}

/// Normalises a request path (see the module documentation for the rules).
/// Returns the path borrowed when it is already normal.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') || !may_change(bytes) {
        return Ok(Cow::Borrowed(raw));
    }

    // Segments after decoding (a segment can only grow shorter or keep its
    // length: decoding shrinks, upper-casing keeps), then dot removal.
    let mut out = String::with_capacity(raw.len());
    // Start offset in `out` of each kept segment (its leading `/`).
    let mut starts: Vec<usize> = Vec::new();
    let mut trailing_slash = false;
    let mut seg = String::new();
    for raw_seg in raw[1..].split('/') {
        seg.clear();
        decode_segment(raw_seg, &mut seg)?;
        let (name, has_params) = match seg.split_once(';') {
            Some((n, _)) => (n, true),
            None => (seg.as_str(), false),
        };
        let dot = name == "." || name == "..";
        if dot && has_params {
            return Err(PathError::DotSegmentParams);
        }
        trailing_slash = false;
        if seg.is_empty() || seg == "." {
            // `//` collapses; `.` is dropped. Either at the end leaves the
            // path ending in `/`.
            trailing_slash = true;
        } else if seg == ".." {
            let start = starts.pop().ok_or(PathError::AboveRoot)?;
            out.truncate(start);
            trailing_slash = true;
        } else {
            starts.push(out.len());
            out.push('/');
            out.push_str(&seg);
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    if out == raw {
        // Only the fast check's false alarm (e.g. an already canonical `%2F`).
        return Ok(Cow::Borrowed(raw));
    }
    Ok(Cow::Owned(out))
}

/// Appends `seg` to `out`: unreserved escapes decoded, others upper-cased.
fn decode_segment(seg: &str, out: &mut String) -> Result<(), PathError> {
    let b = seg.as_bytes();
    let mut i = 0;
    let mut plain = 0; // start of the run of bytes copied as they are
    while i < b.len() {
        match b[i] {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let (hi, lo) = match (b.get(i + 1), b.get(i + 2)) {
                    (Some(&h), Some(&l)) => (h, l),
                    _ => return Err(PathError::InvalidEscape),
                };
                let (Some(h), Some(l)) = (hex_val(hi), hex_val(lo)) else {
                    return Err(PathError::InvalidEscape);
                };
                let v = h * 16 + l;
                if v == 0 {
                    return Err(PathError::Nul);
                }
                out.push_str(&seg[plain..i]);
                if is_unreserved(v) {
                    out.push(char::from(v));
                } else {
                    out.push('%');
                    out.push(char::from(hi.to_ascii_uppercase()));
                    out.push(char::from(lo.to_ascii_uppercase()));
                }
                i += 3;
                plain = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&seg[plain..]);
    Ok(())
}

/// The URI with its path normalised (scheme, authority and query kept), or
/// `None` when the path is already normal.
pub fn normalize_uri(uri: &Uri) -> Result<Option<Uri>, PathError> {
    let path = match normalize_path(uri.path())? {
        Cow::Borrowed(_) => return Ok(None),
        Cow::Owned(p) => p,
    };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    // The normalised path only holds characters the original path held
    // (plus decoded unreserved ones), so it always parses.
    parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| PathError::InvalidEscape)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| PathError::InvalidEscape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(Cow::into_owned)
    }

    #[track_caller]
    fn same(p: &str) {
        match normalize_path(p) {
            Ok(Cow::Borrowed(b)) => assert_eq!(b, p),
            other => panic!("{p:?} should stay borrowed, got {other:?}"),
        }
    }

    #[track_caller]
    fn becomes(p: &str, want: &str) {
        assert_eq!(norm(p).as_deref(), Ok(want), "{p:?}");
        // Idempotent: a normalised path needs nothing more.
        same(want);
    }

    #[track_caller]
    fn refused(p: &str, e: PathError) {
        assert_eq!(norm(p), Err(e), "{p:?}");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/admin",
            "/users/42/posts",
            "/a/b/",
            "/a.b/c..d/.e/f.",
            "/...",
            "/a/.../b",
            "/.well-known/x",
            "/..a",
            "/a;b=c",
            "/caf\u{e9}",
            "*",
            "",
        ] {
            same(p);
        }
    }

    #[test]
    fn dot_segments() {
        becomes("/public/../admin", "/admin");
        becomes("/a/./b/../c", "/a/c");
        becomes("/a/b/..", "/a/");
        becomes("/a/b/.", "/a/b/");
        becomes("/a/..", "/");
        becomes("/.", "/");
        becomes("/./admin", "/admin");
        becomes("/a/b/c/../../d", "/a/d");
        becomes("/a/./././b", "/a/b");
        becomes("/public/./../admin/x", "/admin/x");
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        refused("/..", PathError::AboveRoot);
        refused("/../admin", PathError::AboveRoot);
        refused("/a/../../admin", PathError::AboveRoot);
        refused("/%2e%2e/admin", PathError::AboveRoot);
        refused("/%2E%2E", PathError::AboveRoot);
        refused("/.%2e/x", PathError::AboveRoot);
    }

    #[test]
    fn encoded_dots_are_dot_segments() {
        becomes("/public/%2e%2e/admin", "/admin");
        becomes("/public/.%2E/admin", "/admin");
        becomes("/public/%2e/admin", "/public/admin");
        becomes("/a/%2e%2e%2F", "/a/..%2F");
    }

    #[test]
    fn repeated_slashes_collapse() {
        becomes("//a///b", "/a/b");
        becomes("//", "/");
        becomes("///", "/");
        becomes("/a//", "/a/");
        becomes("//admin", "/admin");
        becomes("/a//../b", "/b");
    }

    #[test]
    fn unreserved_escapes_are_decoded() {
        becomes("/%61dmin", "/admin");
        becomes("/%41%42%43", "/ABC");
        becomes("/%7e%2D%5f%2E", "/~-_.");
        becomes("/%30", "/0");
        becomes("/%61%64%6D%69%6E/users", "/admin/users");
    }

    #[test]
    fn other_escapes_stay_with_upper_case_hex() {
        same("/a%2Fb");
        same("/a%20b");
        same("/%C3%A9");
        becomes("/a%2fb", "/a%2Fb");
        becomes("/%c3%a9", "/%C3%A9");
        becomes("/a%3fb", "/a%3Fb");
        becomes("/a%25", "/a%25");
        // `%25` is `%` itself: never decoded, so no double decoding.
        same("/%2561dmin");
    }

    #[test]
    fn encoded_slash_is_not_a_separator() {
        same("/a%2Fb");
        becomes("/PUBLIC/..%2fadmin", "/PUBLIC/..%2Fadmin");
        becomes("/public/..%2F..%2Fadmin", "/public/..%2F..%2Fadmin");
        becomes("/a/%2F/../b", "/a/b");
        same("/%2F");
    }

    #[test]
    fn invalid_escapes_are_refused() {
        refused("/%zz", PathError::InvalidEscape);
        refused("/a%", PathError::InvalidEscape);
        refused("/a%2", PathError::InvalidEscape);
        refused("/a%2/b", PathError::InvalidEscape);
        refused("/a%g1", PathError::InvalidEscape);
        refused("/%%61", PathError::InvalidEscape);
    }

    #[test]
    fn nul_is_refused() {
        refused("/a%00b", PathError::Nul);
        refused("/%00", PathError::Nul);
    }

    #[test]
    fn backslash_and_dot_params_are_refused() {
        refused("/a\\b", PathError::Backslash);
        refused("/public\\..\\admin", PathError::Backslash);
        refused("/public/..;/admin", PathError::DotSegmentParams);
        refused("/public/..;x=1/admin", PathError::DotSegmentParams);
        refused("/a/.;/b", PathError::DotSegmentParams);
        refused("/public/%2e%2e;/admin", PathError::DotSegmentParams);
        // Parameters on an ordinary segment are fine.
        same("/a;v=1/b");
    }

    #[test]
    fn uris_keep_their_query_and_authority() {
        let u: Uri = "/a/../b?x=%2e%2e&y=//".parse().unwrap();
        let n = normalize_uri(&u).unwrap().unwrap();
        assert_eq!(n.path(), "/b");
        assert_eq!(n.query(), Some("x=%2e%2e&y=//"));

        let u: Uri = "http://Example.com:8080//%61?q".parse().unwrap();
        let n = normalize_uri(&u).unwrap().unwrap();
        assert_eq!(n.to_string(), "http://Example.com:8080/a?q");

        let u: Uri = "/fine?x".parse().unwrap();
        assert_eq!(normalize_uri(&u), Ok(None));
        let u: Uri = "*".parse().unwrap();
        assert_eq!(normalize_uri(&u), Ok(None));
        let u: Uri = "/%zz".parse().unwrap();
        assert_eq!(normalize_uri(&u), Err(PathError::InvalidEscape));
    }

    /// Every output is a fixed point, starts with `/`, has no empty or dot
    /// segment and parses as a URI path.
    #[test]
    fn outputs_are_canonical() {
        let parts = [
            "", ".", "..", "a", "%2e", "%2E%2e", "%2f", "%41", "b%2Fc", "~", "%7E",
        ];
        let mut n = 0;
        for a in parts {
            for b in parts {
                for c in parts {
                    let p = format!("/{a}/{b}//{c}");
                    if let Ok(out) = norm(&p) {
                        n += 1;
                        assert!(out.starts_with('/'), "{p} -> {out}");
                        assert!(!out.contains("//"), "{p} -> {out}");
                        assert_eq!(norm(&out).as_deref(), Ok(out.as_str()), "{p}");
                        for s in out.split('/') {
                            assert!(s != "." && s != "..", "{p} -> {out}");
                        }
                        assert!(out.parse::<Uri>().is_ok(), "{p} -> {out}");
                    }
                }
            }
        }
        assert!(n > 100);
    }
}
