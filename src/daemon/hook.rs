//! The post-build-hook client: `nixpush-hook` (what nix.conf names as `post-build-hook`; Nix
//! runs it with no arguments) and `nixpush hook` run this.
//!
//! Nix blocks its build loop while the hook runs and stops building if it fails, so this is
//! small, synchronous and quick: read `OUT_PATHS` (or, when Nix leaves it empty as 2.8.0 does,
//! `DRV_PATH` as `<drv>^*`), hand the request to the daemon and wait for its acknowledgement
//! that the request is durable. If the daemon is down or slow, write the queue entry directly
//! (temporary file, then rename) and return; if it refuses the request, say what it said and
//! do not queue it (a refusal is final); if it could not store the request (its queue
//! directory is full), try the queue directory here, and say what happened either way.
//! "Slow" is `hook.timeout-ms` for the whole exchange: the `connect` (which waits when the
//! daemon's listen queue is full), sending the request and reading the answer. By default the hook never fails the build: if even
//! that fails it says so on stderr and exits 0 (`hook.fail-build-on-error` changes this).

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::daemon::protocol::{Request, Response};
use crate::daemon::queue::Queue;

/// Run the hook with the configuration at `config_path` (a missing file means the defaults).
pub fn run(config_path: &Path) -> ExitCode {
    // A missing file is a set-up mistake (a wrong NIXPUSH_CONFIG, a config not yet installed):
    // say so, and do not create the default queue directory on its strength alone.
    let missing = matches!(
        std::fs::metadata(config_path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    );
    let cfg = match Config::load_unchecked(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nixpush hook: {e}; using the default socket and queue directory");
            Config::default()
        }
    };
    if missing {
        eprintln!(
            "nixpush hook: config {} does not exist (set NIXPUSH_CONFIG to the daemon's config, \
             or install one at {}); using the default socket {} and queue directory {}",
            config_path.display(),
            crate::config::DEFAULT_PATH,
            cfg.socket.display(),
            cfg.queue_dir.display()
        );
    }
    let items = items_from_env();
    if items.is_empty() {
        eprintln!("nixpush hook: neither OUT_PATHS nor DRV_PATH is set; nothing to publish");
        return ExitCode::SUCCESS;
    }
    let timeout = Duration::from_millis(cfg.hook.timeout_ms.max(1));
    let why = match send(&cfg.socket, &items, timeout) {
        Ok(()) => return ExitCode::SUCCESS,
        // A refusal is the daemon's answer, final for this request: queueing it would only
        // have the daemon reject it again, later and out of sight.
        Err(SendError::Refused(message)) => {
            eprintln!(
                "nixpush hook: the daemon at {} refused the request: {message}; not queued",
                cfg.socket.display()
            );
            return if cfg.hook.fail_build_on_error {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
        // Why the entry is written here instead: the daemon is away, or could not store it.
        Err(SendError::NotQueued(message)) => {
            format!("the daemon could not queue the request ({message})")
        }
        Err(why) => format!("daemon not reachable ({why})"),
    };
    let queued = if missing && !cfg.queue_dir.is_dir() {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "it does not exist, and without a config it is not created",
        ))
    } else {
        Queue::at(&cfg.queue_dir).enqueue_raw(&items)
    };
    match queued {
        Ok(name) => {
            eprintln!(
                "nixpush hook: {why}; queued as {}",
                cfg.queue_dir.join(name).display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let hint = if matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) {
                " (its file system is full: free space there, then push them with \
                 `nixpush push`)"
            } else {
                ""
            };
            eprintln!(
                "nixpush hook: {why} and cannot write to {}: {e}{hint}; \
                 these paths will not be published: {}",
                cfg.queue_dir.display(),
                items.join(" ")
            );
            if cfg.hook.fail_build_on_error {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

fn items_from_env() -> Vec<String> {
    let outs: Vec<String> = std::env::var("OUT_PATHS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !outs.is_empty() {
        return outs;
    }
    match std::env::var("DRV_PATH") {
        Ok(drv) if !drv.trim().is_empty() => vec![format!("{}^*", drv.trim())],
        _ => Vec::new(),
    }
}

/// Why the daemon did not take a request. Each message is whole by itself (a cause is part of
/// it, not also the `source()`).
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("{}: {error}", socket.display())]
    Connect {
        socket: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{}: the daemon did not take the connection within {} ms (its listen queue is full)",
        socket.display(), timeout.as_millis()
    )]
    ConnectTimeout {
        socket: std::path::PathBuf,
        timeout: Duration,
    },
    #[error("{0}")]
    Setup(std::io::Error),
    #[error("{0}")]
    Encode(serde_json::Error),
    #[error("sending: {0}")]
    Send(std::io::Error),
    #[error("waiting for the daemon: {0}")]
    Receive(std::io::Error),
    #[error("no answer from the daemon within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("the daemon could not queue it: {0}")]
    NotQueued(String),
    #[error("unexpected answer")]
    Unexpected,
    #[error("unreadable answer: {0}")]
    Unreadable(serde_json::Error),
}

/// Hand `items` to the daemon within `timeout` in all (connect, send, answer); `Err` says
/// why not.
fn send(socket: &Path, items: &[String], timeout: Duration) -> Result<(), SendError> {
    let deadline = Instant::now() + timeout;
    // Before the timeout runs out; none left is a timeout of the step at hand.
    let left = |timed_out: SendError| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(timed_out)
    };
    let mut stream = connect(socket, timeout)?;
    let mut msg = serde_json::to_vec(&Request::Enqueue {
        items: items.to_vec(),
    })
    .map_err(SendError::Encode)?;
    msg.push(b'\n');
    stream
        .set_write_timeout(Some(left(SendError::Timeout(timeout))?))
        .map_err(SendError::Setup)?;
    stream.write_all(&msg).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            SendError::Timeout(timeout)
        }
        _ => SendError::Send(e),
    })?;
    // The answer is one short line; read it with what is left of the timeout.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.contains(&b'\n') {
        stream
            .set_read_timeout(Some(left(SendError::Timeout(timeout))?))
            .map_err(SendError::Setup)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(SendError::Timeout(timeout));
            }
            Err(e) => return Err(SendError::Receive(e)),
        }
    }
    match serde_json::from_slice::<Response>(&answer) {
        Ok(Response::Queued { .. }) => Ok(()),
        Ok(Response::Error { message }) => Err(SendError::Refused(message)),
        Ok(Response::NotQueued { message }) => Err(SendError::NotQueued(message)),
        Ok(_) => Err(SendError::Unexpected),
        Err(e) => Err(SendError::Unreadable(e)),
    }
}

/// Connect to `socket`, waiting at most `timeout` for the daemon to take the connection.
///
/// A Unix socket's `connect` does not wait for an `accept`, only for room in the listener's
/// queue; when that is full it blocks until room is made. On Linux that wait is bounded by the
/// socket's send timeout (`SO_SNDTIMEO`), and ends in `EAGAIN`, so a blocking socket with that
/// timeout set is a connect with a deadline, without a thread or a poll loop.
fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, SendError> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};
    let io = |error: std::io::Error| SendError::Connect {
        socket: socket.to_owned(),
        error,
    };
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| io(e.into()))?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(timeout))
        .map_err(|e| SendError::Setup(e.into()))?;
    let addr = SocketAddrUnix::new(socket).map_err(|e| io(e.into()))?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => Ok(UnixStream::from(fd)),
        Err(rustix::io::Errno::AGAIN) => Err(SendError::ConnectTimeout {
            socket: socket.to_owned(),
            timeout,
        }),
        Err(e) => Err(io(e.into())),
    }
}
