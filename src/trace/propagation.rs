//! W3C Trace Context (`traceparent`): parsing the client's and writing the
//! one sent upstream. <https://www.w3.org/TR/trace-context/>

use http::HeaderValue;

/// A valid incoming `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        // The specification allows lower case only.
        _ => None,
    }
}

fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (hex_nibble(s[2 * i])? << 4) | hex_nibble(s[2 * i + 1])?;
    }
    Some(out)
}

/// `version-traceid-parentid-flags`. Version `00` must be exactly 55
/// characters; a higher version (not `ff`) may carry more after a `-`, of
/// which the first four fields are read. All-zero ids are invalid.
pub fn parse(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 {
        return None;
    }
    let version: [u8; 1] = hex(&v[0..2])?;
    match version[0] {
        0xff => return None,
        0 if v.len() != 55 => return None,
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id: [u8; 16] = hex(&v[3..35])?;
    let span_id: [u8; 8] = hex(&v[36..52])?;
    let flags: [u8; 1] = hex(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags[0] & 1 == 1,
    })
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut [u8], bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

/// `00-<trace id>-<span id>-<01|00>`.
pub fn format(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> HeaderValue {
    let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
    put_hex(&mut b[3..35], trace_id);
    put_hex(&mut b[36..52], span_id);
    if sampled {
        b[54] = b'1';
    }
    HeaderValue::from_bytes(&b).expect("hex digits and dashes")
}

/// Lower-case hex of `bytes` (logs, tests).
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    put_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specification_example() {
        let p = parse(OK.as_bytes()).unwrap();
        assert_eq!(to_hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled);
        assert_eq!(format(&p.trace_id, &p.span_id, true), OK);
        let unsampled = OK.replace("-01", "-00");
        assert!(!parse(unsampled.as_bytes()).unwrap().sampled);
        assert_eq!(format(&p.trace_id, &p.span_id, false), unsampled.as_str());
    }

    #[test]
    fn refuses_invalid_values() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for b in bad {
            assert_eq!(parse(b.as_bytes()), None, "{b}");
        }
        // A later version may carry more fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(parse(later.as_bytes()).is_some());
    }
}
