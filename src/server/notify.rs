//! systemd's readiness protocol (`sd_notify`), without libsystemd: one
//! datagram of `KEY=VALUE` lines to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name when it starts with `@`).
//! Without that variable (not under systemd, or a unit that is not
//! `Type=notify`) every call does nothing.
//!
//! Sent: `READY=1` once serving; `RELOADING=1` with `MONOTONIC_USEC=` before a
//! SIGHUP reload and `READY=1` after it; `STOPPING=1` when draining for exit;
//! `MAINPID=` + `READY=1` from the new process of a binary upgrade (the unit
//! needs `NotifyAccess=all` to accept them); `STATUS=` after a rejected
//! reload or a failed upgrade. The variable is left in the environment so
//! that an upgraded process notifies the same manager.

use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (one or more `KEY=VALUE` lines) to the service manager.
/// Failures are logged at debug level: notifications are best effort.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(e) = send(&target, state) {
        tracing::debug!(error = %e, socket = ?target, "sd_notify failed");
    }
}

fn send(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => send_abstract(&sock, name, state),
        None => sock.send_to(state.as_bytes(), target).map(drop),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &[u8], state: &str) -> std::io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(state.as_bytes(), &addr).map(drop)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd requires next to it.
pub fn reloading() -> String {
    format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        super::sys::monotonic_usec()
    )
}

/// A `STATUS=` line: one line of free text (newlines would start new keys).
pub fn status(text: &str) -> String {
    format!("STATUS={}", text.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("portico-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("portico-notify-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let rx = UnixDatagram::bind_addr(&addr).unwrap();
            send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"STOPPING=1");
        }
        assert!(reloading().starts_with("RELOADING=1\nMONOTONIC_USEC="));
        assert_eq!(status("a\nb"), "STATUS=a b");
    }
}
