//! The post-build-hook client: `nixpush-hook` (what nix.conf names as `post-build-hook`; Nix
//! runs it with no arguments) and `nixpush hook` run this.
//!
//! Nix blocks its build loop while the hook runs and stops building if it fails, so this is
//! small, synchronous and quick: read `OUT_PATHS` (or, when Nix leaves it empty as 2.8.0 does,
//! `DRV_PATH` as `<drv>^*`), hand the request to the daemon and wait for its acknowledgement
//! that the request is durable. If the daemon is down or slow, write the queue entry directly
//! (temporary file, then rename) and return. By default the hook never fails the build: if even
//! that fails it says so on stderr and exits 0 (`hook.fail-build-on-error` changes this).

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::daemon::protocol::{Request, Response};
use crate::daemon::queue::Queue;

/// Run the hook with the configuration at `config_path` (a missing file means the defaults).
pub fn run(config_path: &Path) -> ExitCode {
    let cfg = match Config::load_unchecked(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nixpush hook: {e}; using the default socket and queue directory");
            Config::default()
        }
    };
    let items = items_from_env();
    if items.is_empty() {
        eprintln!("nixpush hook: neither OUT_PATHS nor DRV_PATH is set; nothing to publish");
        return ExitCode::SUCCESS;
    }
    let timeout = Duration::from_millis(cfg.hook.timeout_ms.max(1));
    let why = match send(&cfg.socket, &items, timeout) {
        Ok(()) => return ExitCode::SUCCESS,
        Err(why) => why,
    };
    match Queue::at(&cfg.queue_dir).enqueue_raw(&items) {
        Ok(name) => {
            eprintln!(
                "nixpush hook: daemon not reachable ({why}); queued as {}",
                cfg.queue_dir.join(name).display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "nixpush hook: daemon not reachable ({why}) and cannot write to {}: {e}; \
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
    #[error("{0}")]
    Setup(std::io::Error),
    #[error("{0}")]
    Encode(serde_json::Error),
    #[error("sending: {0}")]
    Send(std::io::Error),
    #[error("waiting for the daemon: {0}")]
    Receive(std::io::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("unexpected answer")]
    Unexpected,
    #[error("unreadable answer: {0}")]
    Unreadable(serde_json::Error),
}

/// Hand `items` to the daemon; `Err` says why not.
fn send(socket: &Path, items: &[String], timeout: Duration) -> Result<(), SendError> {
    let mut stream = UnixStream::connect(socket).map_err(|error| SendError::Connect {
        socket: socket.to_owned(),
        error,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(SendError::Setup)?;
    let mut msg = serde_json::to_vec(&Request::Enqueue {
        items: items.to_vec(),
    })
    .map_err(SendError::Encode)?;
    msg.push(b'\n');
    stream.write_all(&msg).map_err(SendError::Send)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(SendError::Receive)?;
    match serde_json::from_str::<Response>(&line) {
        Ok(Response::Queued { .. }) => Ok(()),
        Ok(Response::Error { message }) => Err(SendError::Refused(message)),
        Ok(_) => Err(SendError::Unexpected),
        Err(e) => Err(SendError::Unreadable(e)),
    }
}
