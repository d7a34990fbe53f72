//! The verified client certificate of a connection ([`ClientIdentity`]) and
//! the header that passes it upstream.
//!
//! The header is set by the gateway only: [`apply_identity_header`] always
//! removes every client-supplied header of that name first, so a client
//! cannot claim an identity by sending the header itself.
//!
//! Header format (the de-facto `x-forwarded-client-cert` shape):
//! `Hash=<sha256 hex>;Subject="CN=client,O=Example";DNS=a.example;URI=spiffe://x/y`
//! — one `DNS=`, `URI=`, `IP=` or `Email=` element per subject alternative
//! name, values double-quoted when they contain `,;="\` or spaces.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::fmt::Write;
use std::sync::Arc;
use x509_parser::extensions::GeneralName;

/// Who the client is, from the leaf certificate it presented and that the
/// listener's CA verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Subject distinguished name, RFC 4514 style (`CN=client,O=Example`).
    pub subject: String,
    /// Subject alternative names: `DNS:name`, `URI:uri`, `IP:addr`, `Email:addr`.
    pub sans: Vec<String>,
    /// SHA-256 of the leaf certificate (DER), lower-case hex.
    pub fingerprint_sha256: String,
    /// The identity header's value, built once per connection.
    pub header_value: HeaderValue,
}

impl ClientIdentity {
    /// Reads the identity from a DER certificate (already verified).
    pub fn from_der(der: &[u8]) -> ClientIdentity {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut fingerprint_sha256 = String::with_capacity(64);
        for b in digest.as_ref() {
            let _ = write!(fingerprint_sha256, "{b:02x}");
        }
        let (subject, sans) = match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => (subject_string(cert.subject()), sans_of(&cert)),
            Err(_) => (String::new(), Vec::new()),
        };
        let header_value = header_value(&fingerprint_sha256, &subject, &sans);
        ClientIdentity {
            subject,
            sans,
            fingerprint_sha256,
            header_value,
        }
    }

    /// The DNS names among the SANs.
    pub fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.sans.iter().filter_map(|s| s.strip_prefix("DNS:"))
    }
}

/// RFC 4514 order (most specific first) with `,` between RDNs.
fn subject_string(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut parts: Vec<String> = Vec::new();
    for rdn in name.iter() {
        let mut atvs = Vec::new();
        for atv in rdn.iter() {
            let key = match atv.attr_type().to_id_string().as_str() {
                "2.5.4.3" => "CN".to_string(),
                "2.5.4.10" => "O".to_string(),
                "2.5.4.11" => "OU".to_string(),
                "2.5.4.6" => "C".to_string(),
                "2.5.4.7" => "L".to_string(),
                "2.5.4.8" => "ST".to_string(),
                "0.9.2342.19200300.100.1.25" => "DC".to_string(),
                "0.9.2342.19200300.100.1.1" => "UID".to_string(),
                other => registry
                    .get(atv.attr_type())
                    .map(|e| e.sn().to_string())
                    .unwrap_or_else(|| other.to_string()),
            };
            let value = atv
                .as_str()
                .map(escape_dn_value)
                .unwrap_or_else(|_| "#".to_string() + &hex(atv.attr_value().data));
            atvs.push(format!("{key}={value}"));
        }
        parts.push(atvs.join("+"));
    }
    parts.reverse();
    parts.join(",")
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == ' ' || c == '#'))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn sans_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => out.push(format!("DNS:{d}")),
                GeneralName::URI(u) => out.push(format!("URI:{u}")),
                GeneralName::RFC822Name(e) => out.push(format!("Email:{e}")),
                GeneralName::IPAddress(ip) => {
                    let addr = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(a) = addr {
                        out.push(format!("IP:{a}"));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// The DNS names of a certificate's SAN extension (for SNI selection).
pub(crate) fn dns_sans(der: &[u8]) -> Vec<String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => sans_of(&cert)
            .into_iter()
            .filter_map(|s| s.strip_prefix("DNS:").map(str::to_ascii_lowercase))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// `v` as is, or double-quoted with `"` and `\` escaped when it contains
/// a delimiter; control characters become `?` so the value is a valid header.
fn element(out: &mut String, v: &str) {
    let needs_quotes = v
        .chars()
        .any(|c| matches!(c, ',' | ';' | '=' | '"' | '\\' | ' ') || c.is_control());
    if needs_quotes {
        out.push('"');
    }
    for c in v.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    if needs_quotes {
        out.push('"');
    }
}

fn header_value(fingerprint: &str, subject: &str, sans: &[String]) -> HeaderValue {
    let mut s = format!("Hash={fingerprint};Subject=");
    // The subject always carries `=` and usually `,`: always quoted.
    s.push('"');
    for c in subject.chars() {
        match c {
            '"' | '\\' => {
                s.push('\\');
                s.push(c);
            }
            c if c.is_control() => s.push('?'),
            c => s.push(c),
        }
    }
    s.push('"');
    for san in sans {
        if let Some((kind, v)) = san.split_once(':') {
            s.push(';');
            s.push_str(kind);
            s.push('=');
            element(&mut s, v);
        }
    }
    HeaderValue::from_str(&s)
        .or_else(|_| HeaderValue::from_bytes(s.as_bytes()))
        .unwrap_or_else(|_| {
            HeaderValue::from_str(&format!("Hash={fingerprint}"))
                .unwrap_or(HeaderValue::from_static(""))
        })
}

/// Sets the identity header on a request going upstream: every value the
/// client sent under `name` is removed, then the verified identity (if any)
/// is added. `name` is `None` when the listener has no identity header.
pub fn apply_identity_header(
    headers: &mut HeaderMap,
    name: Option<&HeaderName>,
    identity: Option<&Arc<ClientIdentity>>,
) {
    let Some(name) = name else { return };
    headers.remove(name);
    if let Some(id) = identity {
        headers.insert(name.clone(), id.header_value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_headers_are_always_stripped() {
        let name = HeaderName::from_static("x-client-cert");
        let mut h = HeaderMap::new();
        h.append(&name, HeaderValue::from_static("Hash=forged"));
        h.append(&name, HeaderValue::from_static("Hash=forged2"));
        apply_identity_header(&mut h, Some(&name), None);
        assert!(h.get(&name).is_none());

        let id = Arc::new(ClientIdentity {
            subject: "CN=x".into(),
            sans: vec![],
            fingerprint_sha256: "ab".into(),
            header_value: HeaderValue::from_static("Hash=ab;Subject=\"CN=x\""),
        });
        h.append(&name, HeaderValue::from_static("Hash=forged"));
        apply_identity_header(&mut h, Some(&name), Some(&id));
        let all: Vec<_> = h.get_all(&name).iter().collect();
        assert_eq!(all, vec![&id.header_value]);
    }

    #[test]
    fn header_value_quotes_what_needs_it() {
        let v = header_value(
            "00ff",
            "CN=a \"b\",O=Ex",
            &["DNS:a.example".into(), "URI:spiffe://t/x;y".into()],
        );
        assert_eq!(
            v.to_str().unwrap(),
            r#"Hash=00ff;Subject="CN=a \"b\",O=Ex";DNS=a.example;URI="spiffe://t/x;y""#
        );
    }

    #[test]
    fn identity_from_a_real_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![
            "client.example".to_string(),
            "10.1.2.3".to_string(),
        ])
        .unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example/ns/web".try_into().unwrap(),
        ));
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example, Inc");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "web-1");
        let cert = p.self_signed(&key).unwrap();
        let id = ClientIdentity::from_der(cert.der());
        assert_eq!(id.subject, "CN=web-1,O=Example\\, Inc");
        assert_eq!(
            id.sans,
            vec![
                "DNS:client.example",
                "IP:10.1.2.3",
                "URI:spiffe://example/ns/web"
            ]
        );
        assert_eq!(id.dns_names().collect::<Vec<_>>(), vec!["client.example"]);
        assert_eq!(id.fingerprint_sha256.len(), 64);
        let expected = ring::digest::digest(&ring::digest::SHA256, cert.der());
        assert_eq!(id.fingerprint_sha256, hex(expected.as_ref()));
        let v = id.header_value.to_str().unwrap();
        assert!(
            v.starts_with(&format!(
                "Hash={};Subject=\"CN=web-1,O=Example\\\\, Inc\"",
                id.fingerprint_sha256
            )),
            "{v}"
        );
        assert!(
            v.ends_with(";DNS=client.example;IP=10.1.2.3;URI=spiffe://example/ns/web"),
            "{v}"
        );
    }

    #[test]
    fn dn_values_are_escaped() {
        assert_eq!(escape_dn_value("a,b"), "a\\,b");
        assert_eq!(escape_dn_value(" x "), "\\ x\\ ");
    }
}
