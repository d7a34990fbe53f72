//! TLS fixtures: a test CA that issues certificates (rcgen) into a temporary
//! directory, a rustls client that reports what it negotiated, HTTP over a
//! TLS stream, and a TLS upstream that reports the SNI and client
//! certificate it saw.

use super::client::Reply;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

/// A CA and the directory its files are written to (removed on drop).
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// An issued certificate: its files and DER forms.
pub struct Leaf {
    pub cert_path: String,
    pub key_path: String,
    pub der: CertificateDer<'static>,
    pub key_der: PrivateKeyDer<'static>,
}

impl Leaf {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "portico-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let ca = p.self_signed(&ca_key).unwrap();
        let pki = Pki { dir, ca, ca_key };
        write_atomically(&pki.ca_path(), &pki.ca.pem());
        pki
    }

    pub fn ca_path(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    pub fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.ca.der().clone()).unwrap();
        r
    }

    /// Issues a certificate (CN `cn`, these SANs) into `FILE.pem`/`FILE.key`,
    /// replacing any previous files of that name (atomically, by rename).
    pub fn issue(&self, file: &str, cn: &str, sans: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "Portico Tests");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let cert_path = self.dir.join(format!("{file}.pem")).display().to_string();
        let key_path = self.dir.join(format!("{file}.key")).display().to_string();
        write_atomically(&key_path, &key.serialize_pem());
        write_atomically(&cert_path, &cert.pem());
        Leaf {
            cert_path,
            key_path,
            der: cert.der().clone(),
            key_der: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn write_atomically(path: &str, text: &str) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Accepts any server certificate (tests compare the DER they got).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a test client is set up.
pub struct ClientOpts<'a> {
    /// Verify the server against this CA; `None`: accept any certificate.
    pub verify: Option<&'a Pki>,
    pub alpn: &'a [&'a str],
    /// `None`: TLS 1.2 and 1.3.
    pub version: Option<&'static rustls::SupportedProtocolVersion>,
    pub client_cert: Option<&'a Leaf>,
}

impl Default for ClientOpts<'_> {
    fn default() -> Self {
        ClientOpts {
            verify: None,
            alpn: &["http/1.1"],
            version: None,
            client_cert: None,
        }
    }
}

pub fn client_config(o: &ClientOpts<'_>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match o.version {
        Some(v) => vec![v],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let b = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .unwrap();
    let b = match o.verify {
        Some(pki) => b.with_root_certificates(pki.roots()),
        None => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider))),
    };
    let mut cfg = match o.client_cert {
        Some(l) => b
            .with_client_auth_cert(l.chain(), l.key_der.clone_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = o.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// Connects and completes the handshake, sending `sni` (none when `None`).
pub async fn connect(
    addr: SocketAddr,
    sni: Option<&str>,
    o: &ClientOpts<'_>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut cfg = (*client_config(o)).clone();
    if sni.is_none() {
        cfg.enable_sni = false;
    }
    let name = ServerName::try_from(sni.unwrap_or("no-sni.invalid").to_string()).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    let connecting = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp);
    super::conn::guard("TLS handshake", connecting).await
}

/// The leaf certificate the server presented.
pub fn peer_cert(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

pub fn alpn(s: &TlsStream<TcpStream>) -> Option<String> {
    s.get_ref()
        .1
        .alpn_protocol()
        .map(|a| String::from_utf8_lossy(a).into_owned())
}

/// An HTTP/1.1 connection over a TLS stream.
pub struct H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl H1 {
    pub async fn over(s: TlsStream<TcpStream>) -> H1 {
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        H1(tx)
    }

    /// Sends a request; `Err` when the connection fails.
    pub async fn try_send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        let resp = super::conn::guard("a response", async {
            self.0.ready().await?;
            self.0.send_request(req).await
        })
        .await?;
        read(resp).await
    }

    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = Request::get(path).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.try_send(b.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("response over TLS")
    }
}

async fn read(resp: http::Response<Incoming>) -> Result<Reply, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// One GET over a fresh TLS connection.
pub async fn get(addr: SocketAddr, sni: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let s = connect(addr, Some(sni), &ClientOpts::default())
        .await
        .expect("TLS handshake");
    H1::over(s).await.get(sni, path, headers).await
}

/// What a TLS upstream saw of each connection.
#[derive(Debug, Clone)]
pub struct SeenConn {
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub client_cert: bool,
}

/// An HTTPS upstream answering `200 tls-ok` (HTTP/1.1 or HTTP/2) with
/// `leaf`, offering `alpn`; asks for client certificates signed by
/// `client_ca` when given.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<SeenConn>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn tls_upstream(leaf: &Leaf, client_ca: Option<&Pki>, alpn: &[&str]) -> TlsUpstream {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = match client_ca {
        Some(ca) => b.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                provider,
            )
            .build()
            .unwrap(),
        ),
        None => b.with_no_client_auth(),
    };
    let mut cfg = b
        .with_single_cert(leaf.chain(), leaf.key_der.clone_key())
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let c = tls.get_ref().1;
                seen.lock().unwrap().push(SeenConn {
                    sni: c.server_name().map(String::from),
                    alpn: c
                        .alpn_protocol()
                        .map(|a| String::from_utf8_lossy(a).into_owned()),
                    client_cert: c.peer_certificates().is_some_and(|p| !p.is_empty()),
                });
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(super::upstream::response(200, "tls-ok"))
                });
                // HTTP/1.1 or HTTP/2, whichever the client speaks.
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    TlsUpstream { addr, seen, task }
}
