//! TLS to upstreams: [`UpstreamTls`] (one per upstream: roots, optional
//! client certificate, ALPN) and [`TargetTls`] (one per target: the name to
//! send as SNI and verify the certificate against).
//!
//! The server certificate is verified against the configured CA bundle or,
//! by default, the webpki (Mozilla) roots compiled into the binary. The files
//! are re-read when they change: a connect checks their stamps at most once
//! a second, in the background, and a good new set is swapped in for later
//! connections (pooled connections keep theirs).

use super::files::{Reader, Stamps};
use super::{provider, TlsError, VERSIONS};
use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An upstream's TLS settings, as compiled (paths resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// CA bundle; `None`: the webpki roots.
    pub ca: Option<PathBuf>,
    /// Name for SNI and verification; `None`: each target's host.
    pub server_name: Option<String>,
    /// Client certificate chain and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// ALPN protocols offered (from the upstream's protocol).
    pub alpn: Vec<Vec<u8>>,
}

impl ClientSettings {
    fn files(&self) -> Vec<PathBuf> {
        let mut f: Vec<PathBuf> = self.ca.iter().cloned().collect();
        if let Some((c, k)) = &self.client_cert {
            f.push(c.clone());
            f.push(k.clone());
        }
        f
    }
}

fn build(s: &ClientSettings) -> Result<(Arc<ClientConfig>, u64), Vec<TlsError>> {
    let mut reader = Reader::default();
    let mut errors = Vec::new();
    let roots = match &s.ca {
        Some(ca) => reader.roots("ca", ca).map_err(|e| errors.push(e)).ok(),
        None => Some(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
    };
    let client = s.client_cert.as_ref().map(|(c, k)| {
        let chain = reader.certs("client_cert", c);
        let key = reader.key("client_key", k);
        (c, k, chain, key)
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| vec![TlsError::new("", format!("TLS setup failed: {e}"))])?;
    let Some(roots) = roots else {
        return Err(errors);
    };
    let builder = builder.with_root_certificates(roots);
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        Some((c, k, chain, key)) => match (chain, key) {
            (Ok(chain), Ok(key)) => match builder.with_client_auth_cert(chain, key) {
                Ok(cfg) => cfg,
                Err(rustls::Error::InconsistentKeys(_)) => {
                    errors.push(TlsError::new(
                        "client_key",
                        format!(
                            "the key in `{}` does not match the certificate in `{}`",
                            k.display(),
                            c.display()
                        ),
                    ));
                    return Err(errors);
                }
                Err(e) => {
                    errors.push(TlsError::new(
                        "client_key",
                        format!("`{}`: unusable client key: {e}", k.display()),
                    ));
                    return Err(errors);
                }
            },
            (a, b) => {
                errors.extend(a.err());
                errors.extend(b.err());
                return Err(errors);
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    cfg.alpn_protocols = s.alpn.clone();
    Ok((Arc::new(cfg), reader.hash()))
}

/// TLS for the connections of one upstream.
pub struct UpstreamTls {
    settings: ClientSettings,
    compiled_hash: u64,
    config: ArcSwap<ClientConfig>,
    stamps: Mutex<Stamps>,
    /// Process-clock millisecond of the last file check.
    last_check_ms: AtomicU64,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.compiled_hash == other.compiled_hash
    }
}

impl UpstreamTls {
    /// Reads and checks the files. Error keys are relative to the
    /// upstream's `tls` mapping.
    pub fn new(settings: ClientSettings) -> Result<UpstreamTls, Vec<TlsError>> {
        let stamps = Stamps::new(settings.files());
        let (config, compiled_hash) = build(&settings)?;
        Ok(UpstreamTls {
            settings,
            compiled_hash,
            config: ArcSwap::new(config),
            stamps: Mutex::new(stamps),
            last_check_ms: AtomicU64::new(crate::clock::now_ms()),
        })
    }

    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// The TLS of one target whose host is `host`: SNI and verification use
    /// `server_name` if set, else `host` (a DNS name or an IP address).
    pub fn for_target(self: &Arc<Self>, host: &str) -> Result<TargetTls, String> {
        let name = self.settings.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| format!("`{name}` is not a valid TLS server name"))?;
        Ok(TargetTls {
            upstream: self.clone(),
            server_name,
        })
    }

    /// At most once a second, checks the files in the background and swaps
    /// in a rebuilt config when they changed and load cleanly.
    fn maybe_check(self: &Arc<Self>) {
        if self.settings.files().is_empty() {
            return;
        }
        let now = crate::clock::now_ms();
        let last = self.last_check_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .last_check_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.check_files());
    }

    /// Rebuilds the config if a file changed; returns whether it swapped.
    /// Blocking.
    pub fn check_files(&self) -> bool {
        let changed = self.stamps.lock().map(|mut s| s.changed()).unwrap_or(false);
        if !changed {
            return false;
        }
        match build(&self.settings) {
            Ok((cfg, _)) => {
                self.config.store(cfg);
                tracing::info!("upstream TLS files reloaded");
                true
            }
            Err(errors) => {
                let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                tracing::warn!(
                    "upstream TLS files changed but cannot be loaded; the previous ones stay in use: {}",
                    list.join("; ")
                );
                false
            }
        }
    }
}

/// TLS to one target: its upstream's config and the server name.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetTls {
    pub upstream: Arc<UpstreamTls>,
    pub server_name: ServerName<'static>,
}

impl TargetTls {
    /// Runs the client handshake on a connected socket. The server's
    /// certificate is verified; a failure is an `io::Error` wrapping the
    /// rustls error.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<ClientStream> {
        self.upstream.maybe_check();
        let connector = tokio_rustls::TlsConnector::from(self.upstream.config.load_full());
        let tls = connector.connect(self.server_name.clone(), tcp).await?;
        Ok(ClientStream::Tls(Box::new(tls)))
    }
}

/// A connection to an upstream: plain TCP or TLS over it.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// Wraps `tcp` in TLS when `tls` is given.
    pub async fn connect(tls: Option<&TargetTls>, tcp: TcpStream) -> io::Result<ClientStream> {
        match tls {
            Some(t) => t.connect(tcp).await,
            None => Ok(ClientStream::Plain(tcp)),
        }
    }

    /// The protocol the server chose by ALPN (`None` for plain TCP or when
    /// the server did not choose).
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            ClientStream::Plain(_) => None,
            ClientStream::Tls(t) => t.get_ref().1.alpn_protocol(),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
