//! Reading certificates, keys and CA bundles from PEM files, with errors
//! that name the file and say what is wrong (read through
//! `config::inputs::read`, so a compile records them); and [`Stamps`], the
//! cheap change detection used to reload them.

use super::TlsError;
use crate::config::inputs::{stamp, Stamp};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// Resolves a configured path: relative paths are taken from the directory
/// of the configuration file.
pub fn resolve(base: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Accumulates a hash of every file read for one TLS setting, so two
/// compiled settings with the same paths can be told apart by content.
#[derive(Default)]
pub struct Reader {
    hasher: std::collections::hash_map::DefaultHasher,
}

impl Reader {
    pub fn read(&mut self, key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
        let bytes = crate::config::inputs::read(path).map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => "file not found".to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                _ => e.to_string(),
            };
            TlsError::new(key, format!("cannot read `{}`: {why}", path.display()))
        })?;
        path.hash(&mut self.hasher);
        bytes.hash(&mut self.hasher);
        Ok(bytes)
    }

    pub fn hash(&self) -> u64 {
        self.hasher.finish()
    }

    /// Every `CERTIFICATE` block of a PEM file, in order (leaf first).
    pub fn certs(
        &mut self,
        key: &str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let bytes = self.read(key, path)?;
        let mut out = Vec::new();
        for item in CertificateDer::pem_slice_iter(&bytes) {
            match item {
                Ok(c) => out.push(c),
                Err(e) => {
                    return Err(TlsError::new(
                        key,
                        format!("`{}`: invalid PEM: {}", path.display(), pem_error(&e)),
                    ))
                }
            }
        }
        if out.is_empty() {
            return Err(TlsError::new(
                key,
                format!(
                    "`{}` contains no certificate (expected a PEM `-----BEGIN CERTIFICATE-----` block)",
                    path.display()
                ),
            ));
        }
        for (i, c) in out.iter().enumerate() {
            if let Err(e) = x509_parser::parse_x509_certificate(c) {
                return Err(TlsError::new(
                    key,
                    format!(
                        "`{}`: certificate {} is not a valid X.509 certificate: {e}",
                        path.display(),
                        i + 1
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub fn key(&mut self, key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
        let bytes = self.read(key, path)?;
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
            let why = match e {
                pem::Error::NoItemsFound => "contains no private key (expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)".to_string(),
                other => format!("invalid PEM: {}", pem_error(&other)),
            };
            TlsError::new(key, format!("`{}` {why}", path.display()))
        })
    }

    /// A CA bundle as a root store.
    pub fn roots(&mut self, key: &str, path: &Path) -> Result<RootCertStore, TlsError> {
        let certs = self.certs(key, path)?;
        let mut roots = RootCertStore::empty();
        for (i, c) in certs.into_iter().enumerate() {
            roots.add(c).map_err(|e| {
                TlsError::new(
                    key,
                    format!(
                        "`{}`: certificate {} cannot be used as a trust anchor: {e}",
                        path.display(),
                        i + 1
                    ),
                )
            })?;
        }
        Ok(roots)
    }
}

fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no `-----END` line".into(),
        pem::Error::IllegalSectionStart { .. } => "malformed `-----BEGIN` line".into(),
        pem::Error::Base64Decode(_) => "bad base64 content".into(),
        other => format!("{other:?}"),
    }
}

/// The last seen stamps of a set of files.
#[derive(Debug)]
pub struct Stamps {
    files: Vec<PathBuf>,
    last: Vec<Option<Stamp>>,
}

impl Stamps {
    /// Takes the current stamps of `files` (call before reading them, so a
    /// write between the two is seen as a change next time).
    pub fn new(files: Vec<PathBuf>) -> Stamps {
        let last = files.iter().map(|f| stamp(f)).collect();
        Stamps { files, last }
    }

    /// True when any file changed since the last call (or since `new`).
    /// Blocking (a `stat` per file): call it off the async threads.
    pub fn changed(&mut self) -> bool {
        let now: Vec<_> = self.files.iter().map(|f| stamp(f)).collect();
        if now == self.last {
            return false;
        }
        self.last = now;
        true
    }
}
