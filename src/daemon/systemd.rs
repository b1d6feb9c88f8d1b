//! The three things nixpush needs from systemd, without libsystemd:
//! - `sd_notify`: datagrams like `READY=1` to the socket in `$NOTIFY_SOCKET`
//!   (a path, or an abstract name starting with `@`);
//! - the watchdog: `WATCHDOG=1` at half of `$WATCHDOG_USEC`;
//! - socket activation: with `$LISTEN_PID` equal to our pid and `$LISTEN_FDS` = 1, the
//!   listening socket is file descriptor 3 (`SD_LISTEN_FDS_START`).
//!
//! See sd_notify(3) and sd_listen_fds(3).

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

const LISTEN_FDS_START: i32 = 3;

/// Send a notification; a no-op outside systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(&path)
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// How often to send `WATCHDOG=1`, if systemd asked for it.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("LISTEN_FDS={0}: nixpush takes exactly one socket")]
    Count(u32),
}

/// The socket systemd passed us, if any. Takes it only once: the variables are cleared so
/// children do not inherit them.
pub fn take_listen_fd() -> Result<Option<OwnedFd>, ListenError> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: u32 = match std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        Some(n) if pid_ok => n,
        _ => return Ok(None),
    };
    // SAFETY-relevant state is process-wide; we are single-threaded at start-up when this runs.
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if count != 1 {
        return Err(ListenError::Count(count));
    }
    #[allow(unsafe_code)]
    // SAFETY: systemd's contract (sd_listen_fds(3)): with LISTEN_PID naming this process, fd 3
    // is an open socket handed to us, owned by nobody else in this process.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    Ok(Some(fd))
}
