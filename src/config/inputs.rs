//! The files a configuration names besides itself — TLS certificates, keys
//! and CA bundles, JWT `pem_file`s and `jwks_file`s, JSON Schema files,
//! OpenAPI documents — as the compiler read them: [`Inputs`].
//!
//! A snapshot is compiled from its configuration text *and* these files, so
//! its identity ([`Inputs::identity`], the `hash` that `/status` and
//! `portico_config_info` show) covers both. A reload compares the text and
//! re-reads every file ([`Inputs::unchanged`]): it recompiles when any of
//! them changed, not only the text. The file watcher stats them along with
//! the configuration file ([`Inputs::stamps`]).
//!
//! The compiler reads every such file through [`read`] (or
//! [`read_to_string`]); [`record`] runs a compile and collects what it read.
//! Compiling is synchronous and runs on one thread, so the collector is a
//! thread-local set for the duration of [`record`], rather than an argument
//! threaded through every compile function down to the TLS, JWT and schema
//! readers (which are also used outside a compile: a TLS terminator
//! re-reading its rotated files records nothing).
//! *Never* records a read made outside [`record`], or on another thread.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// One file as a compile read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Input {
    /// Hash of its contents; `None` when it could not be read.
    digest: Option<u64>,
    /// Its stamp taken just before the read, so that a write between the
    /// two is a change the next time the file is stat'ed.
    stamp: Option<Stamp>,
}

/// The files one compile read (or tried to), by path as resolved from the
/// configuration (relative paths joined to the configuration's directory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    files: BTreeMap<PathBuf, Input>,
}

impl Inputs {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The files, in path order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.keys().map(PathBuf::as_path)
    }

    /// Each file with its stamp when it was read: what a watcher compares
    /// with before it has stat'ed the file itself.
    pub fn stamps(&self) -> impl Iterator<Item = (&Path, Option<Stamp>)> {
        self.files.iter().map(|(p, i)| (p.as_path(), i.stamp))
    }

    /// The identity of a snapshot compiled from a configuration text whose
    /// hash is `text` and from these files: a hash of `text` and of every
    /// file's path and contents.
    pub fn identity(&self, text: u64) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        for (path, input) in &self.files {
            path.hash(&mut h);
            input.digest.hash(&mut h);
        }
        h.finish()
    }

    /// True when every file still has the contents it had when it was read
    /// (and one that could not be read still cannot). Reads them all:
    /// blocking.
    pub fn unchanged(&self) -> bool {
        self.files
            .iter()
            .all(|(path, input)| digest_of(std::fs::read(path).ok().as_deref()) == input.digest)
    }

    fn note(&mut self, path: &Path, input: Input) {
        // The first read of a file counts: if it changed before a second
        // read in the same compile, the next check sees a difference.
        self.files.entry(path.to_path_buf()).or_insert(input);
    }
}

fn digest_of(bytes: Option<&[u8]>) -> Option<u64> {
    bytes.map(|b| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        b.hash(&mut h);
        h.finish()
    })
}

thread_local! {
    /// The collector of the [`record`] running on this thread, if any.
    static RECORDING: RefCell<Option<Inputs>> = const { RefCell::new(None) };
}

/// Runs `f` (a compile) and returns what it returned with the files it read
/// through [`read`] on this thread. Nested calls each get their own reads.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Inputs) {
    /// Puts the outer collector back, even if `f` panics.
    struct Restore(Option<Option<Inputs>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                RECORDING.with(|r| *r.borrow_mut() = outer);
            }
        }
    }
    let outer = RECORDING.with(|r| r.borrow_mut().replace(Inputs::default()));
    let mut restore = Restore(Some(outer));
    let out = f();
    let outer = restore.0.take().unwrap_or_default();
    let inputs = RECORDING.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer));
    (out, inputs.unwrap_or_default())
}

/// Reads a file the configuration names; recorded when a [`record`] runs
/// on this thread (a failed read too: the watcher then sees the file
/// appear).
pub fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    let recording = RECORDING.with(|r| r.borrow().is_some());
    if !recording {
        return std::fs::read(path);
    }
    let before = stamp(path);
    let bytes = std::fs::read(path);
    let input = Input {
        digest: digest_of(bytes.as_deref().ok()),
        stamp: before,
    };
    RECORDING.with(|r| {
        if let Some(inputs) = r.borrow_mut().as_mut() {
            inputs.note(path, input);
        }
    });
    bytes
}

/// [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read(path)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// Identity of one file's current version: inode, size, modification time.
/// Followed through symlinks, so a Kubernetes volume's symlink swap and an
/// editor's rename-on-save both change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    dev: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// The current stamp of `p`; `None` when it cannot be stat'ed. Blocking.
pub fn stamp(p: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some(Stamp {
        ino: m.ino(),
        dev: m.dev(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("portico-inputs-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_are_recorded_only_inside_record() {
        let d = dir("record");
        let a = d.join("a.pem");
        std::fs::write(&a, "one").unwrap();
        assert_eq!(read(&a).unwrap(), b"one");
        let (text, inputs) = record(|| read_to_string(&a).unwrap());
        assert_eq!(text, "one");
        assert_eq!(inputs.paths().collect::<Vec<_>>(), [a.as_path()]);
        assert!(inputs.unchanged());
        let (_, none) = record(|| ());
        assert!(none.is_empty());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn identity_follows_contents_not_stamps() {
        let d = dir("identity");
        let a = d.join("a.json");
        std::fs::write(&a, "{}").unwrap();
        let (_, first) = record(|| read(&a).unwrap());
        // Rewritten with the same bytes: unchanged, same identity.
        std::fs::write(&a, "{}").unwrap();
        let (_, same) = record(|| read(&a).unwrap());
        assert!(first.unchanged());
        assert_eq!(first.identity(7), same.identity(7));
        assert_ne!(first.identity(7), first.identity(8), "the text counts");
        std::fs::write(&a, "{\"type\": \"object\"}").unwrap();
        assert!(!first.unchanged());
        let (_, changed) = record(|| read(&a).unwrap());
        assert_ne!(first.identity(7), changed.identity(7));
        // A file that disappears is a change; one that was missing and
        // still is, is not.
        std::fs::remove_file(&a).unwrap();
        assert!(!changed.unchanged());
        let (_, missing) = record(|| read(&a).is_err());
        assert_eq!(missing.stamps().collect::<Vec<_>>(), [(a.as_path(), None)]);
        assert!(missing.unchanged());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn nested_records_keep_their_own_reads() {
        let d = dir("nested");
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let ((_, inner), outer) = record(|| {
            read(&a).unwrap();
            let inner = record(|| read(&b).unwrap());
            read(&a).unwrap();
            inner
        });
        assert_eq!(inner.paths().collect::<Vec<_>>(), [b.as_path()]);
        assert_eq!(outer.paths().collect::<Vec<_>>(), [a.as_path()]);
        let _ = std::fs::remove_dir_all(d);
    }
}
