//! The few system calls that std does not wrap safely, needed by the binary
//! upgrade and the systemd notifications: adopting a file descriptor
//! inherited from the parent process, setting or clearing `FD_CLOEXEC`, and
//! reading `CLOCK_MONOTONIC`.
//!
//! This is the crate's only `unsafe` code (everywhere else it is denied);
//! each block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of descriptor `fd`, inherited from the parent process, and
/// marks it close-on-exec (so it is not passed on again by accident). `None`
/// for standard I/O (0–2) and for numbers that are not open.
///
/// Only call this for numbers the parent handed over (the upgrade
/// environment), once each, before this process opens files of its own:
/// `upgrade::Launch::from_process` does, first thing in `main`.
pub fn adopt_inherited(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // SAFETY: F_GETFD only reads the descriptor flags; any integer is a
    // valid argument (a closed one fails with EBADF).
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: `fd` is open (checked above) and was created by the parent for
    // this process alone (a `dup` without close-on-exec, see
    // `upgrade::hand_over`). Nothing else in this process refers to it:
    // adoption runs before the process opens any file of its own, and the
    // caller adopts each number once. So the `OwnedFd` is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(borrow(&owned), true).ok()?;
    Some(owned)
}

fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    std::os::fd::AsFd::as_fd(fd)
}

/// Sets (`on`) or clears `FD_CLOEXEC` on `fd`. Cleared, the descriptor is
/// inherited, at the same number, by processes spawned afterwards.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: `raw` is open for the whole call (borrowed); F_GETFD and
    // F_SETFD read and write only its descriptor flags.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let want = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if want != flags && libc::fcntl(raw, libc::F_SETFD, want) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in microseconds (what systemd's `MONOTONIC_USEC=`
/// expects; `std::time::Instant` reads the same clock but hides its value).
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn cloexec(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: `fd` is open (borrowed); F_GETFD only reads its flags.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn cloexec_round_trip_and_adoption_refusals() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(cloexec(a.as_fd()), "std opens close-on-exec");
        set_cloexec(a.as_fd(), false).unwrap();
        assert!(!cloexec(a.as_fd()));
        set_cloexec(a.as_fd(), true).unwrap();
        assert!(cloexec(a.as_fd()));
        assert!(adopt_inherited(1).is_none(), "stdio is never adopted");
        assert!(
            adopt_inherited(1 << 20).is_none(),
            "closed numbers are refused"
        );
        assert!(monotonic_usec() > 0);
    }
}
