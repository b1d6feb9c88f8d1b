//! The three things nixpush needs from systemd, without libsystemd:
//! - `sd_notify`: datagrams like `READY=1` to the socket in `$NOTIFY_SOCKET`
//!   (a path, or an abstract name starting with `@`);
//! - the watchdog: `WATCHDOG=1` at half of `$WATCHDOG_USEC`;
//! - socket activation: with `$LISTEN_PID` equal to our pid and `$LISTEN_FDS` = 1, the
//!   listening socket is file descriptor 3 (`SD_LISTEN_FDS_START`).
//!
//! The variables are read, never unset: changing the environment is unsound once other threads
//! may read it. They cannot mislead a child either: `LISTEN_PID` names this process, so a child
//! that follows the protocol ignores them, the store layer removes them (and `NOTIFY_SOCKET`)
//! from the environment of the `nix-daemon` it starts, and the inherited socket is made
//! close-on-exec as `sd_listen_fds` does. Before fd 3 is used it is checked to be what the
//! protocol promises, a listening Unix stream socket, so that a wrong unit file (or a stray
//! descriptor) gives a sentence rather than odd failures later.
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

/// What to do about any of these: the socket unit (or whatever started nixpush with
/// `LISTEN_FDS` set) must pass exactly one listening Unix stream socket.
const LISTEN_HINT: &str = "the socket unit must have exactly one ListenStream= with a path \
                           (as systemd/nixpush.socket), and nothing else may set LISTEN_FDS";

/// Why the descriptor systemd was to pass cannot be used. Each message names what was wrong
/// and what to do; a cause is part of the message, not also the `source()`.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("LISTEN_FDS={0}: nixpush takes exactly one socket; {LISTEN_HINT}")]
    Count(u32),
    #[error("LISTEN_FDS=1, but file descriptor 3 is not open; {LISTEN_HINT}")]
    NotOpen,
    #[error("LISTEN_FDS=1, but file descriptor 3 is {0}, not a socket; {LISTEN_HINT}")]
    NotSocket(&'static str),
    #[error(
        "LISTEN_FDS=1, but file descriptor 3 is not a Unix socket (address family {0}); \
         {LISTEN_HINT}"
    )]
    NotUnix(u32),
    #[error(
        "LISTEN_FDS=1, but file descriptor 3 is not a stream socket (socket type {0}); \
         {LISTEN_HINT}"
    )]
    NotStream(u32),
    #[error(
        "LISTEN_FDS=1, but the socket on file descriptor 3 is not listening (Accept=yes \
         passes a connection, not the listening socket); {LISTEN_HINT}"
    )]
    NotListening,
    #[error("LISTEN_FDS=1, but file descriptor 3 cannot be inspected: {0}")]
    Inspect(std::io::Error),
}

/// The socket systemd passed us, if `LISTEN_PID` names this process; checked to be a listening
/// Unix stream socket, and made close-on-exec. The variables stay as they are (see the module
/// doc). Call it once: the descriptor it returns owns fd 3.
pub fn listen_fd() -> Result<Option<OwnedFd>, ListenError> {
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
    if count != 1 {
        return Err(ListenError::Count(count));
    }
    #[allow(unsafe_code)]
    // SAFETY: fcntl(F_GETFD) on a descriptor number only reads its flags (or fails with EBADF);
    // it touches no memory of ours.
    let open = unsafe { libc::fcntl(LISTEN_FDS_START, libc::F_GETFD) } >= 0;
    if !open {
        return Err(ListenError::NotOpen);
    }
    #[allow(unsafe_code)]
    // SAFETY: fd 3 is open (checked just above), and systemd's contract (sd_listen_fds(3)),
    // with LISTEN_PID naming this process, hands it to us: nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    check_listening_unix_stream(&fd)?;
    // Not inherited by the processes we start (sd_listen_fds does the same).
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| ListenError::Inspect(e.into()))?;
    Ok(Some(fd))
}

fn check_listening_unix_stream(fd: &OwnedFd) -> Result<(), ListenError> {
    use rustix::fs::FileType;
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let inspect = |e: rustix::io::Errno| ListenError::Inspect(e.into());
    let stat = rustix::fs::fstat(fd).map_err(inspect)?;
    let what = match FileType::from_raw_mode(stat.st_mode) {
        FileType::Socket => None,
        FileType::RegularFile => Some("a regular file"),
        FileType::Directory => Some("a directory"),
        FileType::Fifo => Some("a pipe"),
        FileType::CharacterDevice => Some("a character device"),
        FileType::BlockDevice => Some("a block device"),
        FileType::Symlink | FileType::Unknown => Some("something other than a socket"),
    };
    if let Some(what) = what {
        return Err(ListenError::NotSocket(what));
    }
    let domain = sockopt::socket_domain(fd).map_err(inspect)?;
    if domain != AddressFamily::UNIX {
        return Err(ListenError::NotUnix(domain.as_raw().into()));
    }
    let kind = sockopt::socket_type(fd).map_err(inspect)?;
    if kind != SocketType::STREAM {
        return Err(ListenError::NotStream(kind.as_raw()));
    }
    if !sockopt::socket_acceptconn(fd).map_err(inspect)? {
        return Err(ListenError::NotListening);
    }
    Ok(())
}
