//! Compiles the TLS-related configuration keys of listeners and upstreams
//! into their runtime forms, reading the files they name. Called by
//! `snapshot::compile`; every error carries its key path relative to the
//! listener or upstream (`tls.certificates[0].key`, `hsts.preload`, ...).

use super::client::{ClientSettings, UpstreamTls};
use super::options::{hsts_value, RedirectToHttps};
use super::server::{CertSource, ServerSettings, TlsTerminator};
use super::TlsError;
use crate::config::model::{self, Protocol};
use http::{HeaderName, HeaderValue};
use std::path::Path;
use std::sync::Arc;

/// A listener's TLS and HTTPS options, compiled.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ListenerTls {
    /// Set on TLS listeners.
    pub terminator: Option<Arc<TlsTerminator>>,
    /// Plain listeners only.
    pub redirect_to_https: Option<RedirectToHttps>,
    /// The `Strict-Transport-Security` value (TLS listeners only).
    pub hsts: Option<HeaderValue>,
    /// Where the verified client identity goes upstream; always stripped
    /// from client requests.
    pub client_identity_header: Option<HeaderName>,
}

/// Compiles `l`'s TLS keys; file paths are relative to `base`. When the
/// result equals `previous` (same settings, same file contents) the previous
/// terminator is kept, with its session cache and file watcher.
pub fn listener(
    l: &model::Listener,
    base: &Path,
    previous: Option<&ListenerTls>,
) -> Result<ListenerTls, Vec<TlsError>> {
    let mut errors = Vec::new();
    let mut out = ListenerTls::default();
    if let Some(t) = &l.tls {
        let settings = ServerSettings {
            certificates: t
                .certificates
                .iter()
                .map(|c| CertSource {
                    cert: super::files::resolve(base, &c.cert),
                    key: super::files::resolve(base, &c.key),
                    hosts: c.hosts.clone(),
                    default: c.default,
                })
                .collect(),
            client_auth: t
                .client_auth
                .as_ref()
                .map(|a| (a.mode, super::files::resolve(base, &a.ca))),
            offer_h2: l.http2,
        };
        match TlsTerminator::new(settings) {
            Ok(term) => {
                let prev = previous.and_then(|p| p.terminator.as_ref());
                out.terminator = Some(match prev {
                    Some(p) if **p == term => p.clone(),
                    _ => Arc::new(term),
                });
            }
            Err(es) => errors.extend(es.into_iter().map(|e| prefix("tls", e))),
        }
    }
    if let Some(r) = &l.redirect_to_https {
        if l.tls.is_some() {
            errors.push(TlsError::new(
                "redirect_to_https",
                "only for plain listeners: this listener already serves HTTPS (remove `tls` or the redirect)",
            ));
        }
        if r.port == 0 {
            errors.push(TlsError::new("redirect_to_https.port", "must be 1-65535"));
        }
        out.redirect_to_https = Some(RedirectToHttps { port: r.port });
    }
    if let Some(h) = &l.hsts {
        if l.tls.is_none() {
            errors.push(TlsError::new(
                "hsts",
                "only for TLS listeners (browsers ignore HSTS over plain HTTP); use `redirect_to_https` here",
            ));
        }
        if h.max_age.0.is_zero() && (h.include_subdomains || h.preload) {
            errors.push(TlsError::new(
                "hsts.max_age",
                "`0` tells browsers to forget HSTS; it cannot be combined with `include_subdomains` or `preload`",
            ));
        }
        if h.preload && (!h.include_subdomains || h.max_age.0.as_secs() < 365 * 86400) {
            errors.push(TlsError::new(
                "hsts.preload",
                "preload lists require `include_subdomains: true` and `max_age` of at least `1y`",
            ));
        }
        out.hsts = Some(hsts_value(h.max_age.0, h.include_subdomains, h.preload));
    }
    if let Some(name) = &l.client_identity_header {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) if is_reserved(&n) => errors.push(TlsError::new(
                "client_identity_header",
                format!("`{name}` is a header the gateway manages; choose another name (e.g. `x-client-cert`)"),
            )),
            Ok(n) => out.client_identity_header = Some(n),
            Err(_) => errors.push(TlsError::new(
                "client_identity_header",
                format!("`{name}` is not a valid header name"),
            )),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn is_reserved(n: &HeaderName) -> bool {
    use http::header::*;
    [
        HOST,
        CONNECTION,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        UPGRADE,
        TE,
        HeaderName::from_static("x-request-id"),
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("forwarded"),
    ]
    .contains(n)
}

/// Compiles `u.tls` with ALPN from `u.protocol`; `None` for a plain upstream.
pub fn upstream(
    u: &model::Upstream,
    base: &Path,
) -> Result<Option<Arc<UpstreamTls>>, Vec<TlsError>> {
    let alpn: Vec<Vec<u8>> = match u.protocol {
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::H2 => vec![b"h2".to_vec()],
        Protocol::H2c => {
            if u.tls.is_some() {
                return Err(vec![TlsError::new(
                    "tls",
                    "`protocol: h2c` is HTTP/2 in clear text; for HTTP/2 over TLS use `protocol: h2`",
                )]);
            }
            return Ok(None);
        }
    };
    // (`protocol: h2` without `tls` is reported by the compiler.)
    let Some(t) = &u.tls else {
        return Ok(None);
    };
    let mut errors = Vec::new();
    let client_cert = match (&t.client_cert, &t.client_key) {
        (Some(c), Some(k)) => Some((
            super::files::resolve(base, c),
            super::files::resolve(base, k),
        )),
        (None, None) => None,
        (Some(_), None) => {
            errors.push(TlsError::new(
                "tls.client_key",
                "`client_cert` needs `client_key`",
            ));
            None
        }
        (None, Some(_)) => {
            errors.push(TlsError::new(
                "tls.client_cert",
                "`client_key` needs `client_cert`",
            ));
            None
        }
    };
    if let Some(n) = &t.server_name {
        if rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
            errors.push(TlsError::new(
                "tls.server_name",
                format!("`{n}` is not a DNS name or IP address"),
            ));
        }
    }
    let settings = ClientSettings {
        ca: t.ca.as_deref().map(|c| super::files::resolve(base, c)),
        server_name: t.server_name.clone(),
        client_cert,
        alpn,
    };
    match UpstreamTls::new(settings) {
        Ok(tls) if errors.is_empty() => Ok(Some(Arc::new(tls))),
        Ok(_) => Err(errors),
        Err(es) => {
            errors.extend(es.into_iter().map(|e| prefix("tls", e)));
            Err(errors)
        }
    }
}

fn prefix(p: &str, e: TlsError) -> TlsError {
    TlsError {
        key: if e.key.is_empty() {
            p.to_string()
        } else {
            format!("{p}.{}", e.key)
        },
        message: e.message,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse_str, ConfigError};
    use crate::tls::testing::Pki;
    use std::sync::Arc;

    fn compile(text: &str) -> Result<crate::snapshot::Snapshot, Vec<ConfigError>> {
        let loaded = match parse_str("t.yaml", text, |_| None) {
            Ok(l) => l,
            Err(e) => return Err(e.0),
        };
        crate::snapshot::compile(&loaded, None).map_err(|e| e.0)
    }

    /// The single error of `text`: (key path, message).
    fn error(text: &str) -> (String, String) {
        match compile(text) {
            Ok(_) => panic!("expected an error:\n{text}"),
            Err(e) => {
                assert_eq!(e.len(), 1, "{e:?}");
                (e[0].path.clone(), e[0].message.clone())
            }
        }
    }

    fn listener(tls: &str, extra: &str) -> String {
        format!("listeners:\n  - name: main\n    address: 127.0.0.1:0\n{extra}    tls:\n{tls}")
    }

    fn certs(list: &[(&str, &str)]) -> String {
        let mut s = "      certificates:\n".to_string();
        for (c, k) in list {
            s.push_str(&format!("        - {{cert: '{c}', key: '{k}'}}\n"));
        }
        s
    }

    #[test]
    fn a_full_tls_config_compiles() {
        let pki = Pki::new();
        let (c, k) = pki.leaf("site", &["site.example", "*.site.example"]);
        let (c2, k2) = pki.leaf("other", &["other.example"]);
        let ca = pki.path("ca.pem");
        let text = format!(
            "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    hsts: {{max_age: 1y, include_subdomains: true, preload: true}}\n    client_identity_header: x-client-cert\n    tls:\n      certificates:\n        - {{cert: '{c}', key: '{k}'}}\n        - {{cert: '{c2}', key: '{k2}', hosts: [other.example, '*.other.example'], default: true}}\n      client_auth: {{mode: optional, ca: '{ca}'}}\n  - name: plain\n    address: 127.0.0.1:0\n    redirect_to_https: {{port: 8443}}\nupstreams:\n  - name: up\n    targets: [{{address: 'backend.internal:443'}}]\n    tls: {{ca: '{ca}', client_cert: '{c}', client_key: '{k}'}}\n"
        );
        let snap = compile(&text).unwrap_or_else(|e| panic!("{e:?}"));
        let main = &snap.listener("main").unwrap().spec.tls;
        assert!(main.terminator.is_some());
        assert_eq!(
            main.hsts.as_ref().unwrap(),
            "max-age=31536000; includeSubDomains; preload"
        );
        assert_eq!(
            main.client_identity_header.as_ref().unwrap(),
            "x-client-cert"
        );
        let plain = &snap.listener("plain").unwrap().spec.tls;
        assert_eq!(plain.redirect_to_https.unwrap().port, 8443);
        let up = &snap.upstreams["up"];
        let t = up.targets[0].tls.as_ref().expect("target TLS");
        assert_eq!(
            t.server_name,
            rustls::pki_types::ServerName::try_from("backend.internal").unwrap()
        );
    }

    #[test]
    fn a_reload_keeps_the_terminator_unless_its_files_changed() {
        let pki = Pki::new();
        let (c, k) = pki.leaf("a", &["a.example"]);
        let text = listener(&certs(&[(&c, &k)]), "");
        let loaded = parse_str("t.yaml", &text, |_| None).unwrap();
        let first = crate::snapshot::compile(&loaded, None).unwrap();
        let term = |s: &crate::snapshot::Snapshot| {
            s.listener("main")
                .unwrap()
                .spec
                .tls
                .terminator
                .clone()
                .unwrap()
        };
        let second = crate::snapshot::compile(&loaded, Some(&first)).unwrap();
        assert!(Arc::ptr_eq(&term(&first), &term(&second)));
        pki.leaf("a", &["a.example"]);
        let third = crate::snapshot::compile(&loaded, Some(&second)).unwrap();
        assert!(!Arc::ptr_eq(&term(&second), &term(&third)));
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_directory() {
        let pki = Pki::new();
        pki.leaf("rel", &["rel.example"]);
        let text = listener(&certs(&[("rel.pem", "rel.key")]), "");
        let file = pki.dir.join("portico.yaml").display().to_string();
        let loaded = parse_str(&file, &text, |_| None).unwrap();
        crate::snapshot::compile(&loaded, None).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn certificate_file_errors() {
        let pki = Pki::new();
        let (c, k) = pki.leaf("a", &["a.example"]);
        let (_, k2) = pki.leaf("b", &["b.example"]);
        let missing = pki.path("missing.pem");
        let p = "listeners[0].tls.certificates[0]";

        let (path, msg) = error(&listener(&certs(&[(&missing, &k)]), ""));
        assert_eq!(path, format!("{p}.cert"));
        assert!(
            msg.contains("file not found") && msg.contains("missing.pem"),
            "{msg}"
        );

        let (path, msg) = error(&listener(&certs(&[(&k, &k)]), ""));
        assert_eq!(path, format!("{p}.cert"));
        assert!(msg.contains("contains no certificate"), "{msg}");

        let (path, msg) = error(&listener(&certs(&[(&c, &c)]), ""));
        assert_eq!(path, format!("{p}.key"));
        assert!(msg.contains("contains no private key"), "{msg}");

        let (path, msg) = error(&listener(&certs(&[(&c, &k2)]), ""));
        assert_eq!(path, format!("{p}.key"));
        assert!(msg.contains("does not match"), "{msg}");

        let garbage = pki.write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n");
        let (path, msg) = error(&listener(&certs(&[(&garbage, &k)]), ""));
        assert_eq!(path, format!("{p}.cert"));
        assert!(msg.contains("invalid PEM"), "{msg}");
    }

    #[test]
    fn certificate_choice_errors() {
        let pki = Pki::new();
        let (c, k) = pki.leaf("a", &["a.example"]);
        let (ip, ipk) = pki.leaf("ip", &["127.0.0.1"]);
        let (path, msg) = error(&listener(
            &format!(
                "      certificates:\n        - {{cert: '{c}', key: '{k}', default: true}}\n        - {{cert: '{c}', key: '{k}', hosts: [x.example], default: true}}\n"
            ),
            "",
        ));
        assert_eq!(path, "listeners[0].tls.certificates[1].default");
        assert!(msg.contains("only one"), "{msg}");

        let (path, msg) = error(&listener(&certs(&[(&c, &k), (&ip, &ipk)]), ""));
        assert_eq!(path, "listeners[0].tls.certificates[1].hosts");
        assert!(msg.contains("no DNS names"), "{msg}");

        let (path, _) = error(&listener(
            &format!("      certificates:\n        - {{cert: '{c}', key: '{k}', hosts: ['a.example:443']}}\n"),
            "",
        ));
        assert_eq!(path, "listeners[0].tls.certificates[0].hosts[0]");

        let (path, msg) = error(&listener(
            &format!("      certificates:\n        - {{cert: '{c}', key: '{k}', hosts: [a.example]}}\n        - {{cert: '{c}', key: '{k}', hosts: [A.example]}}\n"),
            "",
        ));
        assert_eq!(path, "listeners[0].tls.certificates[1].hosts");
        assert!(msg.contains("already served by certificates[0]"), "{msg}");

        let (path, _) = error(&listener("      certificates: []\n", ""));
        assert_eq!(path, "listeners[0].tls.certificates");
    }

    #[test]
    fn client_auth_errors() {
        let pki = Pki::new();
        let (c, k) = pki.leaf("a", &["a.example"]);
        let tls = certs(&[(&c, &k)]);
        let (path, msg) = error(&listener(
            &format!("{tls}      client_auth: {{mode: sometimes, ca: '{c}'}}\n"),
            "",
        ));
        assert_eq!(path, "listeners[0].tls.client_auth.mode");
        assert!(
            msg.contains("optional") && msg.contains("required"),
            "{msg}"
        );

        let missing = pki.path("nope.pem");
        let (path, msg) = error(&listener(
            &format!("{tls}      client_auth: {{mode: required, ca: '{missing}'}}\n"),
            "",
        ));
        assert_eq!(path, "listeners[0].tls.client_auth.ca");
        assert!(msg.contains("file not found"), "{msg}");
    }

    #[test]
    fn listener_option_errors() {
        let pki = Pki::new();
        let (c, k) = pki.leaf("a", &["a.example"]);
        let tls = certs(&[(&c, &k)]);
        let (path, msg) = error(&listener(&tls, "    redirect_to_https: {port: 443}\n"));
        assert_eq!(path, "listeners[0].redirect_to_https");
        assert!(msg.contains("plain listeners"), "{msg}");

        let plain = "listeners:\n  - name: main\n    address: 127.0.0.1:0\n";
        let (path, msg) = error(&format!("{plain}    hsts: {{max_age: 1y}}\n"));
        assert_eq!(path, "listeners[0].hsts");
        assert!(msg.contains("TLS listeners"), "{msg}");

        let (path, _) = error(&listener(&tls, "    hsts: {max_age: 1d, preload: true}\n"));
        assert_eq!(path, "listeners[0].hsts.preload");

        let (path, _) = error(&format!(
            "{plain}    client_identity_header: 'bad header'\n"
        ));
        assert_eq!(path, "listeners[0].client_identity_header");
        let (path, _) = error(&format!("{plain}    client_identity_header: Host\n"));
        assert_eq!(path, "listeners[0].client_identity_header");
        // On a plain listener the header is only stripped: allowed.
        assert!(compile(&format!(
            "{plain}    client_identity_header: x-client-cert\n"
        ))
        .is_ok());
    }

    #[test]
    fn upstream_tls_errors() {
        let pki = Pki::new();
        let (c, k) = pki.leaf("a", &["a.example"]);
        let base = "listeners:\n  - name: main\n    address: 127.0.0.1:0\nupstreams:\n  - name: up\n    targets: [{address: '127.0.0.1:1'}]\n";
        let missing = pki.path("nope.pem");
        let (path, msg) = error(&format!("{base}    tls: {{ca: '{missing}'}}\n"));
        assert_eq!(path, "upstreams[0].tls.ca");
        assert!(msg.contains("file not found"), "{msg}");

        let (path, _) = error(&format!("{base}    tls: {{client_cert: '{c}'}}\n"));
        assert_eq!(path, "upstreams[0].tls.client_key");

        let (_, k2) = pki.leaf("b", &["b.example"]);
        let (path, msg) = error(&format!(
            "{base}    tls: {{client_cert: '{c}', client_key: '{k2}'}}\n"
        ));
        assert_eq!(path, "upstreams[0].tls.client_key");
        assert!(msg.contains("does not match"), "{msg}");

        let (path, _) = error(&format!("{base}    tls: {{server_name: 'not a name'}}\n"));
        assert_eq!(path, "upstreams[0].tls.server_name");

        let (path, _) = error(&format!("{base}    protocol: h2c\n    tls: {{}}\n"));
        assert_eq!(path, "upstreams[0].tls");

        // Default roots, client certificate: fine.
        assert!(compile(&format!(
            "{base}    tls: {{client_cert: '{c}', client_key: '{k}'}}\n"
        ))
        .is_ok());
    }
}
