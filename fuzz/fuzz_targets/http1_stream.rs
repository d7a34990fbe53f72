//! The raw request-stream scanner of strict HTTP/1.1 (`strict::io`) on
//! arbitrary bytes cut at arbitrary places: never panics, gives the same
//! result however the stream is cut, passes bytes through unchanged and in
//! order, and when it refuses a head, hyper gets a prefix of the stream
//! followed by the refusal bytes and nothing else.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::strict::io::Scanner;

/// Runs the scanner over `input` cut into the given piece lengths, the way
/// `StrictIo` does; returns (what hyper reads, refused).
fn run(input: &[u8], cuts: &[u8]) -> (Vec<u8>, bool) {
    let mut s = Scanner::new(4096);
    let mut out = Vec::new();
    let mut rest = input;
    let mut cuts = cuts.iter().cycle();
    while !rest.is_empty() && !s.is_refused() {
        let n = (usize::from(*cuts.next().unwrap_or(&255)) + 1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        let k = s.advance(piece);
        assert!(k <= piece.len());
        out.extend_from_slice(&piece[..k]);
        if k < piece.len() {
            s.feed(&piece[k..], &mut out);
        }
    }
    if !s.is_refused() {
        s.finish(&mut out);
    }
    (out, s.is_refused())
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many cut lengths follow.
    let Some((&n, data)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(data.len());
    let (cuts, input) = data.split_at(n);

    let whole = run(input, &[u8::MAX]);
    let cut = run(input, if cuts.is_empty() { &[0] } else { cuts });
    let (out, refused) = &whole;
    if *refused {
        let body = out
            .strip_suffix(b"\0\r\n\r\n")
            .expect("refusal bytes at the end");
        assert!(
            input.starts_with(body),
            "hyper reads a prefix of the stream"
        );
    } else {
        assert_eq!(out, input, "bytes pass unchanged and in order");
    }
    // Cutting the stream differently changes nothing, except that a head
    // beyond the size limit may be judged whole in one read and handed on
    // unjudged when split.
    if input.len() <= 4096 {
        assert_eq!(cut, whole, "cuts {cuts:?}");
    }
});
