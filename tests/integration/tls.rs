//! TLS: termination with SNI, versions and ALPN, client certificates and the
//! identity header, certificate rotation, HSTS and the HTTPS redirect, and
//! TLS to upstreams. Certificates are issued by a test CA (rcgen) into a
//! temporary directory.

use super::support::tls::{self as t, ClientOpts, Pki, H1};
use super::support::{client, eventually, gateway, start_file, temp_config, upstream};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Listener `main` with TLS (`tls_yaml` is the mapping's body, indented 6),
/// `extra` listener keys (indented 4), one upstream `up` and a catch-all
/// proxy route.
fn tls_config(tls_yaml: &str, extra: &str, up: std::net::SocketAddr) -> String {
    format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n{extra}    tls:\n{tls_yaml}upstreams:\n  - name: up\n    targets: [{{address: '{up}'}}]\nroutes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n"
    )
}

fn cert_item(l: &t::Leaf, more: &str) -> String {
    format!(
        "        - {{cert: '{}', key: '{}'{more}}}\n",
        l.cert_path, l.key_path
    )
}

#[tokio::test]
async fn sni_picks_exact_and_wildcard_certificates_and_the_default_otherwise() {
    let pki = Pki::new("SNI CA");
    let api = pki.issue("api", "api", &["api.example.test"]);
    let wild = pki.issue("wild", "wild", &["*.apps.example.test"]);
    let fallback = pki.issue("fallback", "fallback", &["fallback.example.test"]);
    // Names from `hosts` override the certificate's SANs.
    let listed = pki.issue("listed", "listed", &["unrelated.example.test"]);
    let up = upstream::fixed(200, "ok").await;
    let tls = format!(
        "      certificates:\n{}{}{}{}",
        cert_item(&api, ""),
        cert_item(&wild, ""),
        cert_item(&fallback, ", default: true"),
        cert_item(&listed, ", hosts: [listed.example.test]"),
    );
    let gw = gateway(&tls_config(&tls, "", up.addr)).await;
    let served = |sni: Option<&'static str>| {
        let addr = gw.addr();
        async move {
            let s = t::connect(addr, sni, &ClientOpts::default())
                .await
                .expect("handshake");
            t::peer_cert(&s)
        }
    };
    assert_eq!(served(Some("api.example.test")).await, api.der);
    assert_eq!(served(Some("API.Example.Test")).await, api.der);
    assert_eq!(served(Some("x.apps.example.test")).await, wild.der);
    assert_eq!(served(Some("listed.example.test")).await, listed.der);
    // One label only for a wildcard; unknown names and no SNI: the default.
    assert_eq!(served(Some("a.b.apps.example.test")).await, fallback.der);
    assert_eq!(served(Some("unrelated.example.test")).await, fallback.der);
    assert_eq!(served(Some("nothing.test")).await, fallback.der);
    assert_eq!(served(None).await, fallback.der);

    // A real, verifying client gets through and is proxied.
    let opts = ClientOpts {
        verify: Some(&pki),
        ..Default::default()
    };
    let s = t::connect(gw.addr(), Some("api.example.test"), &opts)
        .await
        .expect("verified handshake");
    let r = H1::over(s).await.get("api.example.test", "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
}

#[tokio::test]
async fn tls_1_2_and_1_3_both_work() {
    let pki = Pki::new("Versions CA");
    let leaf = pki.issue("site", "site", &["site.test"]);
    let up = upstream::fixed(200, "ok").await;
    let tls = format!("      certificates:\n{}", cert_item(&leaf, ""));
    let gw = gateway(&tls_config(&tls, "", up.addr)).await;
    for (v, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let opts = ClientOpts {
            verify: Some(&pki),
            version: Some(v),
            ..Default::default()
        };
        let s = t::connect(gw.addr(), Some("site.test"), &opts)
            .await
            .expect("handshake");
        assert_eq!(s.get_ref().1.protocol_version(), Some(expected));
        let r = H1::over(s).await.get("site.test", "/v", &[]).await;
        assert_eq!(r.status, 200, "{expected:?}");
    }
}

#[tokio::test]
async fn alpn_offers_h2_and_http_1_1() {
    let pki = Pki::new("ALPN CA");
    let leaf = pki.issue("site", "site", &["site.test"]);
    let up = upstream::fixed(200, "ok").await;
    let tls = format!("      certificates:\n{}", cert_item(&leaf, ""));
    let gw = gateway(&tls_config(&tls, "", up.addr)).await;
    let negotiated = |alpn: &'static [&'static str]| {
        let addr = gw.addr();
        async move {
            let opts = ClientOpts {
                alpn,
                ..Default::default()
            };
            let s = t::connect(addr, Some("site.test"), &opts).await.unwrap();
            (t::alpn(&s), s)
        }
    };
    assert_eq!(
        negotiated(&["h2", "http/1.1"]).await.0.as_deref(),
        Some("h2")
    );
    assert_eq!(negotiated(&["h2"]).await.0.as_deref(), Some("h2"));
    let (alpn, s) = negotiated(&["http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some("http/1.1"));
    assert_eq!(
        H1::over(s).await.get("site.test", "/", &[]).await.status,
        200
    );
    let (alpn, s) = negotiated(&[]).await;
    assert_eq!(alpn, None);
    assert_eq!(
        H1::over(s).await.get("site.test", "/", &[]).await.status,
        200
    );

    // HTTP/2 over the negotiated `h2`.
    let (_, s) = negotiated(&["h2", "http/1.1"]).await;
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("https://site.test/h2")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);

    // A listener without HTTP/2 offers only http/1.1.
    let tls = format!("      certificates:\n{}", cert_item(&leaf, ""));
    let gw1 = gateway(&tls_config(&tls, "    http2: false\n", up.addr)).await;
    let opts = ClientOpts {
        alpn: &["h2", "http/1.1"],
        ..Default::default()
    };
    let s = t::connect(gw1.addr(), Some("site.test"), &opts)
        .await
        .unwrap();
    assert_eq!(t::alpn(&s).as_deref(), Some("http/1.1"));
}

/// A TLS gateway in front of an echo upstream, with client certificates
/// in `mode` and the identity header `x-client-cert`.
async fn mtls_gateway(
    pki: &Pki,
    mode: &str,
) -> (super::support::TestGateway, upstream::TestUpstream) {
    let leaf = pki.issue("server", "server", &["mtls.test"]);
    let up = upstream::echo().await;
    let tls = format!(
        "      certificates:\n{}      client_auth: {{mode: {mode}, ca: '{}'}}\n",
        cert_item(&leaf, ""),
        pki.ca_path()
    );
    let gw = gateway(&tls_config(
        &tls,
        "    client_identity_header: x-client-cert\n",
        up.addr,
    ))
    .await;
    (gw, up)
}

fn identity_header(r: &client::Reply) -> Option<Vec<String>> {
    let doc = r.json();
    doc["headers"]["x-client-cert"].as_array().map(|a| {
        a.iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect()
    })
}

const FORGED: (&str, &str) = ("x-client-cert", "Hash=00;Subject=\"CN=admin\"");

#[tokio::test]
async fn mtls_required_rejects_clients_without_a_valid_certificate() {
    let pki = Pki::new("Client CA");
    let (gw, up) = mtls_gateway(&pki, "required").await;

    // No certificate: the handshake (TLS 1.2) or the first exchange (TLS 1.3,
    // where the server's verdict arrives after the client finished) fails.
    let no_cert = async {
        let s = t::connect(gw.addr(), Some("mtls.test"), &ClientOpts::default()).await?;
        let mut h = H1::over(s).await;
        let req = http::Request::get("/")
            .header("host", "mtls.test")
            .body(Default::default())
            .unwrap();
        h.try_send(req)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    assert!(
        no_cert.await.is_err(),
        "a client without a certificate was served"
    );

    // A certificate from another CA is refused too.
    let other = Pki::new("Other CA");
    let stranger = other.issue("stranger", "stranger", &["stranger.test"]);
    let opts = ClientOpts {
        client_cert: Some(&stranger),
        ..Default::default()
    };
    let refused = async {
        let s = t::connect(gw.addr(), Some("mtls.test"), &opts).await?;
        let mut h = H1::over(s).await;
        let req = http::Request::get("/")
            .header("host", "mtls.test")
            .body(Default::default())
            .unwrap();
        h.try_send(req)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    assert!(
        refused.await.is_err(),
        "a certificate from another CA was accepted"
    );
    assert_eq!(up.hits(), 0);

    // Signed by the CA: served, and the upstream gets the identity — never
    // the client's own version of the header.
    let client_leaf = pki.issue("client", "client-1", &["client-1.test"]);
    let opts = ClientOpts {
        client_cert: Some(&client_leaf),
        ..Default::default()
    };
    let s = t::connect(gw.addr(), Some("mtls.test"), &opts)
        .await
        .unwrap();
    let r = H1::over(s).await.get("mtls.test", "/who", &[FORGED]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let values = identity_header(&r).expect("identity header upstream");
    assert_eq!(values.len(), 1, "{values:?}");
    let v = &values[0];
    let id = portico::tls::ClientIdentity::from_der(&client_leaf.der);
    assert!(
        v.starts_with(&format!("Hash={};", id.fingerprint_sha256)),
        "{v}"
    );
    assert!(v.contains("Subject=\"CN=client-1,O=Portico Tests\""), "{v}");
    assert!(v.ends_with(";DNS=client-1.test"), "{v}");
}

#[tokio::test]
async fn mtls_optional_accepts_clients_with_and_without_certificates() {
    let pki = Pki::new("Client CA");
    let (gw, _up) = mtls_gateway(&pki, "optional").await;

    // Without a certificate: served, and a forged identity header is removed.
    let s = t::connect(gw.addr(), Some("mtls.test"), &ClientOpts::default())
        .await
        .unwrap();
    let r = H1::over(s).await.get("mtls.test", "/", &[FORGED]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(identity_header(&r), None);

    // With one: its identity is passed on.
    let client_leaf = pki.issue("client", "client-2", &["client-2.test"]);
    let opts = ClientOpts {
        client_cert: Some(&client_leaf),
        ..Default::default()
    };
    let s = t::connect(gw.addr(), Some("mtls.test"), &opts)
        .await
        .unwrap();
    let r = H1::over(s).await.get("mtls.test", "/", &[FORGED]).await;
    assert_eq!(r.status, 200);
    let values = identity_header(&r).expect("identity header");
    assert_eq!(values.len(), 1);
    assert!(values[0].contains("CN=client-2"), "{values:?}");
}

#[tokio::test]
async fn identity_header_is_stripped_on_plain_listeners() {
    let up = upstream::echo().await;
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    client_identity_header: x-client-cert\nupstreams:\n  - name: up\n    targets: [{{address: '{}'}}]\nroutes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n",
        up.addr
    ))
    .await;
    let req = http::Request::get(gw.url("/"))
        .header(FORGED.0, FORGED.1)
        .body(Default::default())
        .unwrap();
    let r = client::send(req).await;
    assert_eq!(r.status, 200);
    assert_eq!(identity_header(&r), None);
}

#[tokio::test]
async fn rotated_certificates_serve_new_connections_and_spare_established_ones() {
    let pki = Pki::new("Rotation CA");
    let first = pki.issue("site", "site-v1", &["rotate.test"]);
    let up = upstream::fixed(200, "ok").await;
    let tls = format!("      certificates:\n{}", cert_item(&first, ""));
    // Long enough that the idle established connection outlives the rotation.
    let gw = gateway(&tls_config(&tls, "    header_read_timeout: 60s\n", up.addr)).await;

    let s = t::connect(gw.addr(), Some("rotate.test"), &ClientOpts::default())
        .await
        .unwrap();
    assert_eq!(t::peer_cert(&s), first.der);
    let mut established = H1::over(s).await;
    assert_eq!(established.get("rotate.test", "/1", &[]).await.status, 200);

    // New files under the same names (key first, then certificate).
    let second = pki.issue("site", "site-v2", &["rotate.test"]);
    let addr = gw.addr();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = t::connect(addr, Some("rotate.test"), &ClientOpts::default())
            .await
            .expect("handshakes keep working during the rotation");
        let got = t::peer_cert(&s);
        if got == second.der {
            let r = H1::over(s).await.get("rotate.test", "/new", &[]).await;
            assert_eq!(r.status, 200);
            break;
        }
        assert_eq!(
            got, first.der,
            "served neither the old nor the new certificate"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection opened before the rotation still works.
    assert_eq!(established.get("rotate.test", "/2", &[]).await.status, 200);

    // A broken replacement (key of another certificate) is refused; the
    // current certificate keeps serving.
    let terminator = gw
        .running
        .shared
        .snapshot
        .load()
        .listener("main")
        .unwrap()
        .spec
        .tls
        .terminator
        .clone()
        .unwrap();
    let generation = terminator.generation();
    let other = pki.issue("other", "other", &["other.test"]);
    let other_key = std::fs::read_to_string(&other.key_path).unwrap();
    t::write_atomically(&second.key_path, &other_key);
    let t2 = terminator.clone();
    let swapped = tokio::task::spawn_blocking(move || t2.check_files())
        .await
        .unwrap();
    assert!(!swapped, "a key that does not match was swapped in");
    assert_eq!(terminator.generation(), generation);
    let s = t::connect(addr, Some("rotate.test"), &ClientOpts::default())
        .await
        .unwrap();
    assert_eq!(t::peer_cert(&s), second.der);
}

#[tokio::test]
async fn a_reload_reads_rotated_certificates_and_keeps_an_unchanged_terminator() {
    let pki = Pki::new("Reload CA");
    let first = pki.issue("site", "site-v1", &["reload.test"]);
    let up = upstream::fixed(200, "ok").await;
    let tls = format!("      certificates:\n{}", cert_item(&first, ""));
    let path = temp_config("tls", "reload", &tls_config(&tls, "", up.addr));
    let gw = start_file(&path).await;
    let shared = &gw.running.shared;
    let terminator = || {
        let snap = shared.snapshot.load();
        let spec = &snap.listener("main").unwrap().spec;
        spec.tls.terminator.clone().unwrap()
    };
    let before = terminator();
    let snap = shared.snapshot.load_full();
    let files: Vec<_> = snap
        .inputs
        .paths()
        .map(|p| p.display().to_string())
        .collect();
    let mut named = vec![first.cert_path.clone(), first.key_path.clone()];
    named.sort();
    assert_eq!(files, named, "the files the hash covers, in path order");
    let hash = snap.hash;
    drop(snap);

    // Nothing changed: the terminator (its sessions, its file watcher) is
    // kept.
    let r = shared.reload_checked().unwrap();
    assert!(!r.changed);
    assert!(std::sync::Arc::ptr_eq(&before, &terminator()));

    // New files under the same names: a reload reads them (whether or not
    // the terminator's own watcher saw them first) and counts as a change.
    let second = pki.issue("site", "site-v2", &["reload.test"]);
    let r = shared.reload_checked().unwrap();
    assert!(r.changed);
    assert_ne!(r.hash, hash);
    assert!(!std::sync::Arc::ptr_eq(&before, &terminator()));
    let s = t::connect(gw.addr(), Some("reload.test"), &ClientOpts::default())
        .await
        .unwrap();
    assert_eq!(t::peer_cert(&s), second.der);
    let r = H1::over(s).await.get("reload.test", "/", &[]).await;
    assert_eq!(r.status, 200);
}

/// Waits (bounded) until new connections are served `leaf`.
async fn wait_until_served(addr: std::net::SocketAddr, sni: &str, leaf: &t::Leaf) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = t::connect(addr, Some(sni), &ClientOpts::default())
            .await
            .expect("handshake");
        if t::peer_cert(&s) == leaf.der {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_succeeding_across_certificate_rotations() {
    let pki = Pki::new("Load CA");
    let first = pki.issue("site", "v1", &["load.test"]);
    let up = upstream::fixed(200, "ok").await;
    let tls = format!("      certificates:\n{}", cert_item(&first, ""));
    let gw = gateway(&tls_config(&tls, "    header_read_timeout: 60s\n", up.addr)).await;
    let addr = gw.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let roots = std::sync::Arc::new(Pki::roots(&pki));
    // Bounded load: a new verified connection per request, plus one
    // keep-alive connection, until told to stop (or 5000 requests).
    let load = {
        let stop = stop.clone();
        let roots = roots.clone();
        tokio::spawn(async move {
            let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates((*roots).clone())
            .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
            let name = rustls::pki_types::ServerName::try_from("load.test").unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut kept = H1::over(connector.connect(name.clone(), tcp).await.unwrap()).await;
            let (mut ok, mut failed) = (0usize, Vec::new());
            for i in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let fresh = async {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let s = connector.connect(name.clone(), tcp).await?;
                    let r = H1::over(s).await.get("load.test", "/fresh", &[]).await;
                    Ok::<_, std::io::Error>(r.status.as_u16())
                };
                match fresh.await {
                    Ok(200) => ok += 1,
                    other => failed.push(format!("fresh #{i}: {other:?}")),
                }
                let r = kept.get("load.test", "/kept", &[]).await;
                if r.status == 200 {
                    ok += 1;
                } else {
                    failed.push(format!("kept #{i}: {}", r.status));
                }
            }
            (ok, failed)
        })
    };
    let second = pki.issue("site", "v2", &["load.test"]);
    wait_until_served(addr, "load.test", &second).await;
    let third = pki.issue("site", "v3", &["load.test"]);
    wait_until_served(addr, "load.test", &third).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok > 0);
}

#[tokio::test]
async fn hsts_is_added_to_every_response_of_a_tls_listener() {
    let pki = Pki::new("HSTS CA");
    let leaf = pki.issue("site", "site", &["hsts.test"]);
    let up = upstream::fixed(200, "ok").await;
    let tls = format!("      certificates:\n{}", cert_item(&leaf, ""));
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    hsts: {{max_age: 1y, include_subdomains: true}}\n    tls:\n{tls}upstreams:\n  - name: up\n    targets: [{{address: '{}'}}]\nroutes:\n  - name: only\n    match: {{path: /ok}}\n    action: {{proxy: {{upstream: up}}}}\n",
        up.addr
    ))
    .await;
    let s = t::connect(gw.addr(), Some("hsts.test"), &ClientOpts::default())
        .await
        .unwrap();
    let mut h = H1::over(s).await;
    let expected = "max-age=31536000; includeSubDomains";
    let ok = h.get("hsts.test", "/ok", &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("strict-transport-security"), Some(expected));
    // Gateway-made errors too.
    let missing = h.get("hsts.test", "/missing", &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("strict-transport-security"), Some(expected));
}

#[tokio::test]
async fn plain_listener_redirects_to_https() {
    let gw = gateway(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    redirect_to_https: {port: 8443}\n  - name: default_port\n    address: 127.0.0.1:0\n    redirect_to_https: {}\nroutes:\n  - name: r\n    action: {respond: {status: 200}}\n",
    )
    .await;
    let req = http::Request::post(gw.url("/a/b?x=1&y=%20"))
        .header("host", "shop.example.test:8080")
        .body(Default::default())
        .unwrap();
    let r = client::send(req).await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://shop.example.test:8443/a/b?x=1&y=%20")
    );
    assert!(r.header("strict-transport-security").is_none());

    let other = gw.running.addr("default_port");
    let req = http::Request::get(format!("http://{other}/login"))
        .header("host", "shop.example.test")
        .body(Default::default())
        .unwrap();
    let r = client::send(req).await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://shop.example.test/login")
    );
}

#[tokio::test]
async fn upstream_tls_with_a_custom_ca_sni_and_client_certificate() {
    let pki = Pki::new("Backend CA");
    let backend = pki.issue("backend", "backend", &["backend.internal"]);
    let gateway_client = pki.issue("gw-client", "portico", &["portico.internal"]);
    // The backend demands a client certificate signed by the same CA.
    let up = t::tls_upstream(&backend, Some(&pki), &["http/1.1"]).await;
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{{address: '{}'}}]\n    tls:\n      ca: '{}'\n      server_name: backend.internal\n      client_cert: '{}'\n      client_key: '{}'\nroutes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n",
        up.addr,
        pki.ca_path(),
        gateway_client.cert_path,
        gateway_client.key_path
    ))
    .await;
    let r = client::get(&gw.url("/secure")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "tls-ok");
    let r = client::get(&gw.url("/again")).await;
    assert_eq!(r.status, 200);
    let seen = up.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for c in &seen {
        assert_eq!(c.sni.as_deref(), Some("backend.internal"));
        assert_eq!(c.alpn.as_deref(), Some("http/1.1"));
        assert!(c.client_cert);
    }
}

#[tokio::test]
async fn h2_upstream_over_tls_negotiates_h2() {
    let pki = Pki::new("Backend CA");
    let backend = pki.issue("backend", "backend", &["127.0.0.1"]);
    let up = t::tls_upstream(&backend, None, &["h2", "http/1.1"]).await;
    // No server_name: the target's host, an IP address, is verified.
    let gw = gateway(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    protocol: h2\n    targets: [{{address: '{}'}}]\n    tls: {{ca: '{}'}}\nroutes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n",
        up.addr,
        pki.ca_path()
    ))
    .await;
    for _ in 0..3 {
        let r = client::get(&gw.url("/h2")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "tls-ok");
    }
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one shared HTTP/2 connection: {seen:?}");
    assert_eq!(seen[0].alpn.as_deref(), Some("h2"));
    assert_eq!(seen[0].sni, None, "no SNI for an IP address");
}

#[tokio::test]
async fn upstream_tls_verification_failure_is_a_502() {
    let pki = Pki::new("Backend CA");
    let backend = pki.issue("backend", "backend", &["backend.internal"]);
    let up = t::tls_upstream(&backend, None, &["http/1.1"]).await;
    let wrong = Pki::new("Wrong CA");
    let config = |ca: &str, name: &str| {
        format!(
            "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{{address: '{}'}}]\n    retries: {{attempts: 0}}\n    tls: {{ca: '{ca}', server_name: {name}}}\nroutes:\n  - name: all\n    action: {{proxy: {{upstream: up}}}}\n",
            up.addr
        )
    };
    // Unknown issuer.
    let gw = gateway(&config(&wrong.ca_path(), "backend.internal")).await;
    let r = client::get(&gw.url("/")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.json()["error"]["code"],
        "upstream_unreachable",
        "{}",
        r.text()
    );
    // Right CA, wrong name.
    let gw = gateway(&config(&pki.ca_path(), "elsewhere.internal")).await;
    let r = client::get(&gw.url("/")).await;
    assert_eq!(r.status, 502, "{}", r.text());
}

#[tokio::test]
async fn failed_handshakes_are_counted_and_do_not_disturb_the_listener() {
    let pki = Pki::new("Failures CA");
    let leaf = pki.issue("site", "site", &["fail.test"]);
    let up = upstream::fixed(200, "ok").await;
    let tls = format!("      certificates:\n{}", cert_item(&leaf, ""));
    let gw = gateway(&tls_config(&tls, "", up.addr)).await;
    let before = portico::tls::HANDSHAKE_FAILURES.load(Ordering::Relaxed);
    // Plain HTTP to a TLS port.
    let mut raw = super::support::conn::RawConn::connect(gw.addr()).await;
    raw.write(b"GET / HTTP/1.1\r\nHost: fail.test\r\n\r\n")
        .await;
    assert!(
        eventually(Duration::from_secs(10), || {
            portico::tls::HANDSHAKE_FAILURES.load(Ordering::Relaxed) > before
        })
        .await
    );
    // This gateway's own series (portico_tls_handshake_failures_total) counts it once.
    let failures = || {
        gw.running
            .shared
            .metrics
            .listeners()
            .iter()
            .find(|(n, _)| &**n == "main")
            .map_or(0, |(_, m)| m.tls_handshake_failures())
    };
    assert!(eventually(Duration::from_secs(10), || failures() == 1).await);
    let r = t::get(gw.addr(), "fail.test", "/", &[]).await;
    assert_eq!(r.status, 200);
}

/// Every YAML example of docs/tls.md, and examples/tls.yaml, compile with
/// the certificates of scripts/gen-example-certs.sh (needs openssl).
#[test]
fn tls_guide_examples_validate() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("skipped: openssl is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("portico-tls-docs-{}", std::process::id()));
    let certs = dir.join("certs");
    let status = std::process::Command::new(root.join("scripts/gen-example-certs.sh"))
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("runs gen-example-certs.sh");
    assert!(status.success());
    let guide = std::fs::read_to_string(root.join("docs/tls.md")).unwrap();
    let mut blocks: Vec<String> = guide
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("\n```").next().unwrap().to_string())
        .collect();
    assert!(blocks.len() >= 5, "found {} examples", blocks.len());
    blocks.push(std::fs::read_to_string(root.join("examples/tls.yaml")).unwrap());
    for (i, yaml) in blocks.iter().enumerate() {
        let file = dir.join(format!("example-{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        if let Err(e) = portico::load(&file) {
            panic!("example {i} of docs/tls.md does not validate:\n{e}\n{yaml}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
