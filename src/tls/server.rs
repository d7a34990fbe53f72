//! TLS termination on a listener: [`TlsTerminator`].
//!
//! Built from [`ServerSettings`] (file paths and options, as compiled from
//! the configuration): every certificate chain and key is loaded, checked
//! (key matches certificate) and indexed by the names it serves, from its
//! `hosts` list or else its DNS subject alternative names. A handshake picks
//! the certificate for the client's SNI — an exact name first, then a
//! `*.suffix` wildcard covering exactly one more label — or the default one
//! (the one marked `default`, else the first) when the SNI is absent or
//! unknown.
//!
//! The built rustls `ServerConfig` (resolver, client verifier, ALPN) sits in
//! an `ArcSwap`. Once [`TlsTerminator::start`]ed, a background task holding a
//! `Weak` checks the files' stamps every second; when they change it rebuilds
//! the whole config and swaps it in. Handshakes in progress and established
//! connections keep the config they started with. A rebuild that fails
//! (half-written file, key not matching) is logged and the previous config
//! keeps serving; it is tried again on the next change.

use super::files::{Reader, Stamps};
use super::identity::{dns_sans, ClientIdentity};
use super::{provider, TlsError, HANDSHAKE_FAILURES, VERSIONS};
use crate::config::model::ClientAuthMode;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// How often watched certificate files are checked.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// One certificate of a listener, as configured (paths resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Names served (exact or `*.suffix`); empty: the certificate's DNS SANs.
    pub hosts: Vec<String>,
    pub default: bool,
}

/// A listener's TLS settings, as compiled (before any file is read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub certificates: Vec<CertSource>,
    /// Client certificates: mode and CA bundle.
    pub client_auth: Option<(ClientAuthMode, PathBuf)>,
    /// Offer `h2` in ALPN (the listener serves HTTP/2).
    pub offer_h2: bool,
}

impl ServerSettings {
    fn files(&self) -> Vec<PathBuf> {
        let mut f = Vec::new();
        for c in &self.certificates {
            f.push(c.cert.clone());
            f.push(c.key.clone());
        }
        if let Some((_, ca)) = &self.client_auth {
            f.push(ca.clone());
        }
        f
    }
}

/// The protocol a TLS client chose by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `h2`: serve HTTP/2.
    H2,
    /// `http/1.1`.
    Http1,
    /// The client did not use ALPN: HTTP/1.x.
    None,
}

/// A completed server handshake.
pub struct Accepted<IO> {
    pub stream: tokio_rustls::server::TlsStream<IO>,
    pub alpn: Alpn,
    /// The verified client certificate, when the client sent one.
    pub identity: Option<Arc<ClientIdentity>>,
}

/// Names to certificates (or anything else: tests use indices).
#[derive(Debug)]
pub(crate) struct SniTable<T> {
    exact: HashMap<String, T>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, T>,
    default: T,
}

impl<T> SniTable<T> {
    /// The entry for `sni`: exact name, then a one-label wildcard, then the
    /// default. Case and a trailing dot are ignored.
    pub(crate) fn pick(&self, sni: Option<&str>) -> &T {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.trim_end_matches('.');
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(t) = self.exact.get(name) {
            return t;
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(t) = self.wildcard.get(parent) {
                return t;
            }
        }
        &self.default
    }
}

/// Builds the name table from each certificate's names (index, names,
/// explicit?). Explicit `hosts` take precedence over names read from SANs;
/// among SAN names the first certificate wins. Duplicate explicit names are
/// errors.
fn sni_table<T: Clone>(
    entries: &[(T, Vec<String>, bool)],
    default: T,
) -> Result<SniTable<T>, TlsError> {
    let mut table = SniTable {
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        default,
    };
    let mut explicit_owner: HashMap<String, usize> = HashMap::new();
    for pass_explicit in [true, false] {
        for (i, (value, names, explicit)) in entries.iter().enumerate() {
            if *explicit != pass_explicit {
                continue;
            }
            for n in names {
                if pass_explicit {
                    if let Some(prev) = explicit_owner.insert(n.clone(), i) {
                        return Err(TlsError::new(
                            format!("certificates[{i}].hosts"),
                            format!("`{n}` is already served by certificates[{prev}]"),
                        ));
                    }
                }
                let (map, key) = match n.strip_prefix("*.") {
                    Some(suffix) => (&mut table.wildcard, suffix.to_string()),
                    None => (&mut table.exact, n.clone()),
                };
                map.entry(key).or_insert_with(|| value.clone());
            }
        }
    }
    Ok(table)
}

#[derive(Debug)]
struct Resolver(SniTable<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.pick(hello.server_name()).clone())
    }
}

/// Reads every file and builds the rustls config. All problems found are
/// returned, each at its key.
fn build(s: &ServerSettings) -> Result<(Arc<ServerConfig>, u64), Vec<TlsError>> {
    let provider = provider();
    let mut reader = Reader::default();
    let mut errors = Vec::new();
    if s.certificates.is_empty() {
        errors.push(TlsError::new(
            "certificates",
            "at least one certificate is required",
        ));
    }
    let mut entries = Vec::new();
    let mut default = None;
    let default_index = s.certificates.iter().position(|c| c.default).unwrap_or(0);
    for (i, c) in s.certificates.iter().enumerate() {
        let ck = format!("certificates[{i}]");
        if c.default {
            if let Some(prev) = default {
                errors.push(TlsError::new(
                    format!("{ck}.default"),
                    format!("only one certificate can be the default (certificates[{prev}] is)"),
                ));
            }
            default = Some(i);
        }
        let mut hosts = Vec::new();
        for (j, h) in c.hosts.iter().enumerate() {
            match super::check_host_name(h) {
                Ok(h) => hosts.push(h),
                Err(e) => errors.push(TlsError::new(format!("{ck}.hosts[{j}]"), e)),
            }
        }
        let chain = reader.certs(&format!("{ck}.cert"), &c.cert);
        let key = reader.key(&format!("{ck}.key"), &c.key);
        let (chain, key) = match (chain, key) {
            (Ok(chain), Ok(key)) => (chain, key),
            (a, b) => {
                errors.extend(a.err());
                errors.extend(b.err());
                continue;
            }
        };
        let signing = match provider.key_provider.load_private_key(key) {
            Ok(k) => k,
            Err(e) => {
                errors.push(TlsError::new(
                    format!("{ck}.key"),
                    format!("`{}`: unsupported private key: {e}", c.key.display()),
                ));
                continue;
            }
        };
        let explicit = !c.hosts.is_empty();
        let names = if explicit { hosts } else { dns_sans(&chain[0]) };
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                errors.push(TlsError::new(
                    format!("{ck}.key"),
                    format!(
                        "the key in `{}` does not match the certificate in `{}`",
                        c.key.display(),
                        c.cert.display()
                    ),
                ));
                continue;
            }
            Err(e) => {
                errors.push(TlsError::new(
                    format!("{ck}.cert"),
                    format!("`{}`: {e}", c.cert.display()),
                ));
                continue;
            }
        }
        if names.is_empty() && i != default_index {
            errors.push(TlsError::new(
                format!("{ck}.hosts"),
                format!(
                    "`{}` has no DNS names in its subject alternative names: list the names it serves in `hosts` (or make it the `default`)",
                    c.cert.display()
                ),
            ));
        }
        entries.push((Arc::new(certified), names, explicit, i));
    }
    let roots = s
        .client_auth
        .as_ref()
        .map(|(mode, ca)| (mode, reader.roots("client_auth.ca", ca)));
    let table_entries: Vec<_> = entries
        .iter()
        .map(|(k, names, explicit, _)| (k.clone(), names.clone(), *explicit))
        .collect();
    let default_key = entries
        .iter()
        .find(|e| e.3 == default_index)
        .map(|e| e.0.clone());
    let table = match default_key {
        Some(d) => match sni_table(&table_entries, d) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => None,
    };

    let builder = match ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
    {
        Ok(b) => b,
        Err(e) => {
            errors.push(TlsError::new("", format!("TLS setup failed: {e}")));
            return Err(errors);
        }
    };
    let builder = match roots {
        None => Some(builder.with_no_client_auth()),
        Some((mode, Ok(roots))) => {
            let mut vb = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if *mode == ClientAuthMode::Optional {
                vb = vb.allow_unauthenticated();
            }
            match vb.build() {
                Ok(v) => Some(builder.with_client_cert_verifier(v)),
                Err(e) => {
                    errors.push(TlsError::new(
                        "client_auth.ca",
                        format!("cannot verify client certificates with this CA bundle: {e}"),
                    ));
                    None
                }
            }
        }
        Some((_, Err(e))) => {
            errors.push(e);
            None
        }
    };
    match (builder, table) {
        (Some(b), Some(table)) if errors.is_empty() => {
            let mut cfg = b.with_cert_resolver(Arc::new(Resolver(table)));
            cfg.alpn_protocols = if s.offer_h2 {
                vec![b"h2".to_vec(), b"http/1.1".to_vec()]
            } else {
                vec![b"http/1.1".to_vec()]
            };
            Ok((Arc::new(cfg), reader.hash()))
        }
        _ => Err(errors),
    }
}

/// TLS for one listener: the current rustls config and what it was built
/// from. See the module documentation.
pub struct TlsTerminator {
    settings: ServerSettings,
    /// Hash of the files' contents when compiled (part of equality, so a
    /// config reload with new file contents counts as a change).
    compiled_hash: u64,
    config: ArcSwap<ServerConfig>,
    stamps: Mutex<Stamps>,
    generation: AtomicU64,
    started: AtomicBool,
}

impl std::fmt::Debug for TlsTerminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTerminator")
            .field("settings", &self.settings)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsTerminator {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.compiled_hash == other.compiled_hash
    }
}

impl TlsTerminator {
    /// Reads and checks every file. Errors carry keys relative to the
    /// listener's `tls` mapping.
    pub fn new(settings: ServerSettings) -> Result<TlsTerminator, Vec<TlsError>> {
        let stamps = Stamps::new(settings.files());
        let (config, compiled_hash) = build(&settings)?;
        Ok(TlsTerminator {
            settings,
            compiled_hash,
            config: ArcSwap::new(config),
            stamps: Mutex::new(stamps),
            generation: AtomicU64::new(0),
            started: AtomicBool::new(false),
        })
    }

    pub fn settings(&self) -> &ServerSettings {
        &self.settings
    }

    /// How many times new files were swapped in.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Starts watching the files (once; needs a tokio runtime). The task
    /// ends when the terminator is dropped.
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_CHECK).await;
                let Some(t) = weak.upgrade() else { break };
                // stat + (rarely) read and parse: off the async threads.
                let _ = tokio::task::spawn_blocking(move || t.check_files()).await;
            }
        });
    }

    /// Rebuilds and swaps in the config if any file changed since the last
    /// check. Returns whether a new config was swapped in. Blocking.
    pub fn check_files(&self) -> bool {
        let changed = self.stamps.lock().map(|mut s| s.changed()).unwrap_or(false);
        if !changed {
            return false;
        }
        match build(&self.settings) {
            Ok((cfg, _)) => {
                self.config.store(cfg);
                let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::info!(generation = g, "TLS certificates reloaded");
                true
            }
            Err(errors) => {
                let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                tracing::warn!(
                    "TLS files changed but cannot be loaded; the previous certificates keep serving: {}",
                    list.join("; ")
                );
                false
            }
        }
    }

    /// Runs the server handshake on `io` within `timeout`. A failure or
    /// timeout is counted in [`HANDSHAKE_FAILURES`].
    pub async fn accept<IO>(&self, io: IO, timeout: Duration) -> std::io::Result<Accepted<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load_full());
        let stream = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            Err(_) => {
                HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TLS handshake not completed within {timeout:?}"),
                ));
            }
        };
        let conn = stream.get_ref().1;
        let alpn = match conn.alpn_protocol() {
            Some(b"h2") => Alpn::H2,
            Some(_) => Alpn::Http1,
            None => Alpn::None,
        };
        let identity = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Arc::new(ClientIdentity::from_der(c)));
        Ok(Accepted {
            stream,
            alpn,
            identity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(usize, &[&str], bool)], default: usize) -> SniTable<usize> {
        let e: Vec<_> = entries
            .iter()
            .map(|(i, n, x)| (*i, n.iter().map(|s| s.to_string()).collect(), *x))
            .collect();
        sni_table(&e, default).unwrap()
    }

    #[test]
    fn exact_then_wildcard_then_default() {
        let t = table(
            &[
                (0, &["example.com", "www.example.com"], true),
                (1, &["*.example.com"], true),
                (2, &["api.example.com"], true),
            ],
            0,
        );
        assert_eq!(*t.pick(Some("api.example.com")), 2);
        assert_eq!(*t.pick(Some("www.example.com")), 0);
        assert_eq!(*t.pick(Some("foo.example.com")), 1);
        assert_eq!(*t.pick(Some("FOO.Example.COM.")), 1);
        // A wildcard covers exactly one label.
        assert_eq!(*t.pick(Some("a.b.example.com")), 0);
        assert_eq!(*t.pick(Some("example.com")), 0);
        assert_eq!(*t.pick(Some("other.org")), 0);
        assert_eq!(*t.pick(None), 0);
    }

    #[test]
    fn explicit_names_beat_san_names_and_first_san_wins() {
        let t = table(
            &[
                (0, &["a.example", "b.example"], false),
                (1, &["b.example", "c.example"], false),
                (2, &["a.example"], true),
            ],
            1,
        );
        assert_eq!(*t.pick(Some("a.example")), 2);
        assert_eq!(*t.pick(Some("b.example")), 0);
        assert_eq!(*t.pick(Some("c.example")), 1);
        assert_eq!(*t.pick(Some("d.example")), 1);
    }

    #[test]
    fn duplicate_explicit_names_are_errors() {
        let e = sni_table(
            &[
                (0, vec!["a.example".to_string()], true),
                (1, vec!["a.example".to_string()], true),
            ],
            0,
        )
        .unwrap_err();
        assert_eq!(e.key, "certificates[1].hosts");
        assert!(e.message.contains("certificates[0]"), "{e}");
    }
}
