//! Zero-downtime binary upgrade on SIGUSR2: the running process starts the
//! binary at its own path with its own arguments and hands it the listening
//! sockets; once the new process serves, the old one drains and exits.
//!
//! Protocol, parent side ([`hand_over`]):
//!
//! 1. Each listening socket is `dup`ed without `FD_CLOEXEC`, so the child
//!    inherits it at the same number; the child learns the numbers from
//!    `PORTICO_INHERITED_LISTENERS=name=fd@address,...` (the listener's name,
//!    percent-encoded, and its address as configured).
//! 2. One end of a socket pair is inherited the same way, its number in
//!    `PORTICO_UPGRADE_READY_FD`; `PORTICO_UPGRADE_PARENT` holds the parent's
//!    pid, so variables that leaked into some unrelated process are ignored.
//! 3. The parent waits, at most `upgrade_timeout`, for one byte on its end.
//!    A byte: the child serves; the parent stops accepting and drains. End of
//!    stream first (the child exited or failed), or the timeout (the child is
//!    killed): the upgrade failed, the parent says why and keeps serving. The
//!    child writes its own error (say, the config validation error) to the
//!    standard error it shares with the parent.
//!
//! Child side ([`Inherited`]): `main` adopts the inherited descriptors first
//! thing ([`Launch::from_process`]); `server::start_with` uses an inherited
//! socket for each listener whose name and configured address match instead
//! of binding, and closes the rest; `serve_file` then notifies systemd
//! (`MAINPID=`, `READY=1`) and writes the readiness byte.
//!
//! The binary path is resolved when the process starts
//! (`std::env::current_exe`): once a new binary has been copied over that
//! path, `/proc/self/exe` names the old, deleted file, and the new one must
//! be run from the original path.

use super::{sys, Shared};
use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

/// `name=fd@address,...`: the listening sockets a child inherits.
pub const ENV_LISTENERS: &str = "PORTICO_INHERITED_LISTENERS";
/// The descriptor the child writes one byte to once it serves.
pub const ENV_READY_FD: &str = "PORTICO_UPGRADE_READY_FD";
/// The pid of the process that started the upgrade.
pub const ENV_PARENT: &str = "PORTICO_UPGRADE_PARENT";

/// How long the parent waits for a child that closed its readiness channel
/// to exit, to report its exit status.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// How this process was started: what SIGUSR2 runs, and what a parent
/// handed over if this process is the new one of an upgrade.
#[derive(Default)]
pub struct Launch {
    pub relaunch: Option<Relaunch>,
    pub inherited: Inherited,
}

impl Launch {
    /// Reads the binary path, the arguments and any inherited descriptors.
    /// Call it first thing in `main`, before the process opens files of its
    /// own (descriptors named in the environment are adopted, see
    /// [`sys::adopt_inherited`]).
    pub fn from_process() -> Launch {
        let inherited = Inherited::from_env();
        let relaunch = std::env::current_exe().ok().map(|exe| Relaunch {
            exe,
            args: std::env::args_os().skip(1).collect(),
        });
        Launch {
            relaunch,
            inherited,
        }
    }
}

/// The binary and arguments a SIGUSR2 upgrade starts.
#[derive(Clone, Debug)]
pub struct Relaunch {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

/// The name the admin listener's socket is handed over under (listener
/// names cannot contain control characters, so it cannot collide).
pub const ADMIN_LISTENER: &str = "\u{1}admin";

/// What a parent process handed over: listening sockets by listener name
/// and configured address, and the readiness channel.
#[derive(Default)]
pub struct Inherited {
    listeners: Vec<(String, SocketAddr, std::net::TcpListener)>,
    ready: Option<UnixStream>,
    upgrade: bool,
    /// Problems found while adopting, logged once logging is set up.
    notes: Vec<String>,
}

impl Inherited {
    /// Adopts what the upgrade variables name, if this process's parent set
    /// them (see the module comment).
    pub fn from_env() -> Inherited {
        let mut this = Inherited::default();
        let Some(parent) = std::env::var_os(ENV_PARENT) else {
            return this;
        };
        if parent.to_str().and_then(|p| p.parse::<u32>().ok())
            != Some(std::os::unix::process::parent_id())
        {
            this.notes.push(format!(
                "ignoring {ENV_PARENT}={parent:?}: not this process's parent (inherited sockets are not used)"
            ));
            return this;
        }
        this.upgrade = true;
        let mut seen = HashSet::new();
        let mut adopt = |fd: RawFd, notes: &mut Vec<String>| -> Option<OwnedFd> {
            if !seen.insert(fd) {
                notes.push(format!("inherited descriptor {fd} is listed twice"));
                return None;
            }
            let owned = sys::adopt_inherited(fd);
            if owned.is_none() {
                notes.push(format!("inherited descriptor {fd} is not open"));
            }
            owned
        };
        if let Some(fd) = std::env::var(ENV_READY_FD)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            this.ready = adopt(fd, &mut this.notes).map(UnixStream::from);
        }
        let spec = std::env::var(ENV_LISTENERS).unwrap_or_default();
        for entry in spec.split(',').filter(|e| !e.is_empty()) {
            let Some((name, fd, addr)) = parse_entry(entry) else {
                this.notes
                    .push(format!("malformed {ENV_LISTENERS} entry `{entry}`"));
                continue;
            };
            let Some(owned) = adopt(fd, &mut this.notes) else {
                continue;
            };
            let listener = std::net::TcpListener::from(owned);
            match listener.local_addr() {
                Ok(local) if local.ip() == addr.ip() && (addr.port() == 0 || local.port() == addr.port()) => {
                    this.listeners.push((name, addr, listener));
                }
                other => this.notes.push(format!(
                    "inherited descriptor {fd} for listener `{name}` is not a socket bound to {addr} ({other:?}); closed"
                )),
            }
        }
        this
    }

    /// Whether this process was started by a SIGUSR2 upgrade.
    pub fn is_upgrade(&self) -> bool {
        self.upgrade
    }

    /// Takes the inherited socket of listener `name` configured at `addr`.
    pub(crate) fn take(&mut self, name: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self
            .listeners
            .iter()
            .position(|(n, a, _)| n == name && *a == addr)?;
        Some(self.listeners.swap_remove(i).2)
    }

    /// Closes the inherited sockets no listener took (the new configuration
    /// dropped or moved them) and logs the notes gathered at adoption.
    pub(crate) fn close_unused(&mut self) {
        for note in self.notes.drain(..) {
            tracing::warn!("upgrade: {note}");
        }
        for (name, addr, _) in self.listeners.drain(..) {
            tracing::info!(listener = %name, address = %addr, "upgrade: inherited socket not in the new configuration; closed");
        }
    }

    /// Tells the parent this process serves (one byte on the readiness
    /// channel, which is then closed).
    pub(crate) fn signal_ready(&mut self) {
        if let Some(mut ready) = self.ready.take() {
            if let Err(e) = ready.write_all(b"R") {
                tracing::warn!(error = %e, "upgrade: cannot tell the old process that this one serves");
            }
        }
    }
}

/// `name=fd@address` with the name percent-encoded (`encode_name`).
fn parse_entry(entry: &str) -> Option<(String, RawFd, SocketAddr)> {
    let (name, rest) = entry.split_once('=')?;
    let (fd, addr) = rest.split_once('@')?;
    Some((decode_name(name)?, fd.parse().ok()?, addr.parse().ok()?))
}

/// Percent-encodes every byte of a listener name outside `[A-Za-z0-9._-]`,
/// so that names with `,`, `=` or `@` survive the variable's format.
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_name(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// A started child that is killed (and reaped) when dropped, unless it was
/// released: an abandoned or failed upgrade leaves no process behind.
struct Started(Option<Child>);

impl Started {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn release(mut self) {
        self.0 = None;
    }

    /// Waits up to `limit` for the child to exit on its own.
    async fn exited(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.0.as_mut()?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.0 = None;
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the new process with this process's listening sockets and waits
/// (at most `timeout`) until it serves. `Ok(pid)`: the new process serves
/// and this one should drain. `Err(why)`: the upgrade failed and no new
/// process is left running; this one keeps serving. Dropping the future
/// abandons the upgrade (the new process is killed).
pub(crate) async fn hand_over(
    shared: Arc<Shared>,
    relaunch: Relaunch,
    timeout: Duration,
) -> Result<u32, String> {
    // Descriptors for the child, dropped (closed here) once it is started.
    let mut passed: Vec<OwnedFd> = Vec::new();
    let mut entries = Vec::new();
    {
        let bound = shared
            .listeners
            .lock()
            .map_err(|_| "listener table poisoned")?;
        let admin = shared.admin.lock().map_err(|_| "admin listener poisoned")?;
        let admin = admin.as_ref().map(|b| (ADMIN_LISTENER, b));
        for (name, b) in bound.iter().map(|(n, b)| (&**n, b)).chain(admin) {
            let Some(listener) = &b.listener else {
                continue;
            };
            let fd = inheritable(listener.as_fd())
                .map_err(|e| format!("cannot pass listener `{name}` on: {e}"))?;
            entries.push(format!(
                "{}={}@{}",
                encode_name(name),
                fd.as_raw_fd(),
                b.configured
            ));
            passed.push(fd);
        }
    }
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("cannot create the readiness channel: {e}"))?;
    sys::set_cloexec(theirs.as_fd(), false)
        .map_err(|e| format!("cannot create the readiness channel: {e}"))?;

    let mut cmd = Command::new(&relaunch.exe);
    cmd.args(&relaunch.args)
        .env(ENV_LISTENERS, entries.join(","))
        .env(ENV_READY_FD, theirs.as_raw_fd().to_string())
        .env(ENV_PARENT, std::process::id().to_string());
    let spawned = cmd.spawn();
    drop(passed);
    drop(theirs);
    let mut child =
        Started(Some(spawned.map_err(|e| {
            format!("cannot start {}: {e}", relaunch.exe.display())
        })?));
    let pid = child.id();
    tracing::info!(pid, binary = %relaunch.exe.display(), "upgrade: new process started; waiting until it serves");

    let ours = ours
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(ours))
        .map_err(|e| format!("readiness channel: {e}"))?;
    let mut byte = [0u8; 1];
    let read = async {
        loop {
            ours.readable().await?;
            match ours.try_read(&mut byte) {
                Ok(n) => return Ok::<_, std::io::Error>(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(1)) => {
            child.release();
            Ok(pid)
        }
        Ok(_) => match child.exited(EXIT_WAIT).await {
            Some(status) => Err(format!(
                "the new process (pid {pid}) ended before it served ({status}); its own error, if any, is logged above"
            )),
            None => Err(format!(
                "the new process (pid {pid}) closed its readiness channel without serving; it was killed"
            )),
        },
        Err(_) => Err(format!(
            "the new process (pid {pid}) did not serve within {timeout:?} (upgrade_timeout); it was killed"
        )),
    }
}

/// A duplicate of `fd` that a spawned process inherits (no `FD_CLOEXEC`).
fn inheritable(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let dup = fd.try_clone_to_owned()?;
    sys::set_cloexec(dup.as_fd(), false)?;
    Ok(dup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_names_survive_the_variable_format() {
        for name in ["main", "a,b=c@d", "x%y", "ünï cödé"] {
            let entry = format!("{}=7@127.0.0.1:80", encode_name(name));
            assert_eq!(entry.matches(',').count(), 0);
            let (n, fd, addr) = parse_entry(&entry).unwrap();
            assert_eq!((n.as_str(), fd), (name, 7));
            assert_eq!(addr, "127.0.0.1:80".parse().unwrap());
        }
        assert!(parse_entry("main=x@127.0.0.1:80").is_none());
        assert!(parse_entry("main=7").is_none());
        assert!(parse_entry("%G1=7@127.0.0.1:80").is_none());
    }
}
