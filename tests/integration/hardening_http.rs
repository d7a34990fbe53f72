//! probe

use super::support::upstream;
use super::support::{gateway, simple_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(std::time::Duration::from_secs(3), s.read_to_end(&mut out)).await;
    (out, r.is_ok())
}

#[tokio::test]
async fn probe() {
    let up = upstream::echo().await;
    let gw = gateway(&simple_config(
        &[up.addr],
        "",
        "  - name: all\n    action: {proxy: {upstream: up}}\n",
    ))
    .await;
    let cases: &[(&str, &[u8])] = &[
        ("cl_te", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("te_cl", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("cl_cl_equal", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("cl_cl_diff", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("cl_list", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5, 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("cl_plus", b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: +5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("te_gzip_chunked", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ("te_chunked_chunked", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("te_two_lines", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("te_identity", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: identity\r\n\r\n"),
        ("te_chunked_identity", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        ("te_xchunked", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ("te_space", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding : chunked\r\n\r\n0\r\n\r\n"),
        ("te_http10", b"POST /a HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("bad_chunk_size", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("chunk_size_overflow", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\nhello\r\n0\r\n\r\n"),
        ("chunk_neg", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
        ("chunk_0x", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
        ("chunk_bad_crlf", b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
        ("obs_fold", b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n  folded\r\n\r\n"),
        ("bare_cr", b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: 1\rx-b: 2\r\n\r\n"),
        ("bare_cr_line", b"GET /a HTTP/1.1\rhost: x\r\n\r\n"),
        ("bare_lf", b"GET /a HTTP/1.1\nhost: x\n\n"),
        ("nul_value", b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: 1\x002\r\n\r\n"),
        ("nul_name", b"GET /a HTTP/1.1\r\nhost: x\r\nx\x00a: 1\r\n\r\n"),
        ("two_hosts", b"GET /a HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\n"),
        ("no_host", b"GET /a HTTP/1.1\r\n\r\n"),
        ("abs_host_mismatch", b"GET http://a.example/a HTTP/1.1\r\nhost: b.example\r\n\r\n"),
        ("space_before_colon", b"GET /a HTTP/1.1\r\nhost: x\r\ncontent-length : 5\r\n\r\nhello"),
        ("leading_space_header", b"GET /a HTTP/1.1\r\n host: x\r\n\r\n"),
        ("ctl_in_value", b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: a\x01b\r\n\r\n"),
        ("del_in_value", b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: a\x7fb\r\n\r\n"),
        ("space_in_uri", b"GET /a b HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("backslash_uri", b"GET /a\\b HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("pct_uri", b"GET /%zz HTTP/1.1\r\nhost: x\r\n\r\n"),
    ];
    for (name, bytes) in cases {
        let before = (up.hits(), up.connections());
        let (out, closed) = exchange(gw.addr(), bytes).await;
        let text = String::from_utf8_lossy(&out);
        let first = text.lines().next().unwrap_or("").to_string();
        let n = text.matches("HTTP/1.1 ").count();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        eprintln!("{name:22} closed={closed} responses={n} first={first:?} upstream_hits+={} conns+={} smuggled={}", up.hits()-before.0, up.connections()-before.1, text.contains("smuggled"));
    }
}
