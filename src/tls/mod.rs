//! TLS with rustls (the `ring` provider), on both sides of the gateway.
//!
//! - [`server`]: a listener's [`TlsTerminator`] — certificates chosen by SNI
//!   (exact and `*.wildcard` names, a default one), TLS 1.2 and 1.3 only,
//!   ALPN `h2`/`http/1.1`, optional or required client certificates; the
//!   files it was built from are watched and a changed set is swapped in
//!   atomically (a bad one is logged and the old one kept).
//! - [`identity`]: the verified client certificate of a connection as a
//!   [`ClientIdentity`], and the header that carries it upstream (always
//!   removed from the client's request first).
//! - [`options`]: the plain-HTTP redirect to HTTPS and the HSTS header.
//! - [`client`]: upstream TLS — a [`TargetTls`] wraps a connected socket
//!   into a verified client TLS stream (custom CA or webpki roots, SNI, an
//!   optional client certificate, ALPN from the upstream's protocol).
//! - [`files`]: PEM reading with precise errors, and change detection.
//! - [`config`]: the configuration keys compiled into the above.
//!
//! Everything here is built by `snapshot::compile`, which reads the files a
//! configuration names so that `portico validate` reports a bad certificate;
//! the server only calls [`TlsTerminator::accept`] and [`TlsTerminator::start`].

pub mod client;
pub mod config;
pub mod files;
pub mod identity;
pub mod options;
pub mod server;
#[cfg(test)]
pub(crate) mod testing;

pub use client::{ClientStream, TargetTls, UpstreamTls};
pub use config::ListenerTls;
pub use identity::{apply_identity_header, ClientIdentity};
pub use options::{hsts_value, RedirectToHttps};
pub use server::{Accepted, Alpn, TlsTerminator};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// TLS handshakes on listeners that failed or timed out (observability
/// reads it later).
pub static HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// A problem with a TLS setting, at `key` relative to the TLS mapping it
/// belongs to (e.g. `certificates[1].key`); the compiler prefixes the rest
/// of the key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub key: String,
    pub message: String,
}

impl TlsError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> TlsError {
        TlsError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The one crypto provider Portico uses (ring: no C toolchain beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 and 1.2; nothing older.
pub(crate) static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// `name` or `*.suffix`, as written in `hosts` lists: lower-cased, checked.
pub(crate) fn check_host_name(h: &str) -> Result<String, String> {
    let lower = h.trim_end_matches('.').to_ascii_lowercase();
    let bare = lower.strip_prefix("*.").unwrap_or(&lower);
    let ok = !bare.is_empty()
        && !bare.contains('*')
        && !bare.starts_with('.')
        && !bare.contains("..")
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(lower)
    } else {
        Err(format!(
            "`{h}` is not a host name or `*.suffix` wildcard (no port)"
        ))
    }
}
