//! The daemon's socket protocol: one JSON request per connection, one line, answered by one
//! JSON line; then the connection closes.
//! ```text
//! → {"op":"enqueue","items":["/nix/store/…-hello", "/nix/store/…-hello.drv^*"]}
//! ← {"result":"queued","entry":"00001795444108000000000-1234-0"}
//! → {"op":"status"}
//! ← {"result":"status","queue_depth":0,…}
//! ← {"result":"error","message":"…"}          (for any bad request; nothing was queued)
//! ← {"result":"not-queued","message":"…"}     (a good request the daemon could not store, e.g.
//!                                              its queue directory is full; the client may
//!                                              write the entry itself)
//! ```
//! `queued` is sent only once the request is durable in the queue directory (written, flushed
//! and renamed into place), so a client that got it can forget the request. Messages are at
//! most [`MAX_MESSAGE`] bytes.

use serde::{Deserialize, Serialize};

pub const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Queue items in the queue entry format (see [`crate::daemon::queue`]).
    Enqueue {
        items: Vec<String>,
    },
    Status {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Queued {
        entry: String,
    },
    Status(StatusReport),
    /// The request is wrong; it was not queued, and queueing it elsewhere would not help.
    Error {
        message: String,
    },
    /// The request is good, but the daemon could not make it durable (its queue directory is
    /// full or cannot be written); nothing was queued.
    NotQueued {
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub cache: String,
    pub uptime_secs: u64,
    /// Entries waiting in the queue directory (including the ones being worked on).
    pub queue_depth: usize,
    /// Store paths being compressed or uploaded now.
    pub in_flight: usize,
    pub published: u64,
    /// Paths left out by `exclude` or `max-nar-size`, or for referring to such a path.
    #[serde(default)]
    pub excluded: u64,
    pub failed: u64,
    /// Entries this daemon rejected since it started.
    pub rejected: u64,
    /// Whether the daemon is waiting out a backoff after failures.
    pub retrying: bool,
    /// Entries some of whose paths failed (transiently) while the rest of their batch was
    /// published: each is retried on its own backoff, holding back no other entry. Oldest
    /// name first.
    #[serde(default)]
    pub held: Vec<HeldEntry>,
    /// Most recent first.
    pub last_errors: Vec<ErrorRecord>,
    /// Entries waiting in the queue directory's `rejected/` for `nixpush queue retry` or
    /// `drop`: all of them, whenever they were rejected. (Defaults: a daemon older than this
    /// field sends none.)
    #[serde(default)]
    pub rejected_entries: usize,
    /// The newest of them ([`NEWEST_REJECTED`] at most), most recent first.
    #[serde(default)]
    pub newest_rejected: Vec<RejectedRecord>,
    /// With several caches, each one's own figures (the fields above are their sums, and
    /// `cache` lists them all); empty with one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<CacheStatus>,
}

/// One of several caches, in [`StatusReport::caches`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStatus {
    /// The config's name for it, else its address.
    pub name: String,
    pub cache: String,
    /// Queued entries this cache has still to publish.
    pub waiting: usize,
    pub in_flight: usize,
    pub published: u64,
    pub excluded: u64,
    pub failed: u64,
    pub rejected: u64,
    pub retrying: bool,
    /// Entries held on their own backoff for this cache.
    pub held: usize,
}

/// How many rejected entries `status` shows with their reasons.
pub const NEWEST_REJECTED: usize = 3;

/// A rejected entry, as `nixpush queue list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedRecord {
    /// Its name in `rejected/`, for `nixpush queue retry` and `drop`.
    pub entry: String,
    /// Seconds since the Unix epoch, when known.
    pub at: Option<u64>,
    pub reason: String,
}

/// An entry waiting to be retried on its own (see [`StatusReport::held`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldEntry {
    /// The queue entry's name.
    pub entry: String,
    /// The store paths that failed, each with why (`/nix/store/…: cannot …`).
    pub failed: Vec<String>,
    /// Passes in which it failed so far.
    pub attempts: u32,
    /// Seconds until its next try (0: at the next pass).
    pub retry_in_secs: u64,
    /// With several caches, the one it is held for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub message: String,
}

/// Why a request line was refused; its text is what the client gets back.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    // The cause is in the message, so it is not also the `source()` (printed once).
    #[error("malformed request: {0}")]
    Malformed(serde_json::Error),
}

/// Parse one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_MESSAGE {
        return Err(RequestError::TooLarge);
    }
    serde_json::from_slice(line).map_err(RequestError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r = parse_request(br#"{"op":"enqueue","items":["/nix/store/x"]}"#).unwrap();
        assert_eq!(
            r,
            Request::Enqueue {
                items: vec!["/nix/store/x".into()]
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"status"}"#).unwrap(),
            Request::Status {}
        );
        assert!(parse_request(b"garbage").is_err());
        assert!(parse_request(br#"{"op":"enqueue"}"#).is_err());
        assert!(parse_request(br#"{"op":"status","x":1}"#).is_err());
        let s = serde_json::to_string(&Response::Queued { entry: "e".into() }).unwrap();
        assert_eq!(s, r#"{"result":"queued","entry":"e"}"#);
    }
}
