//! A cache in a directory on an SSH server (`sftp://`), through `russh` and `russh-sftp`. Laid
//! out as a `file://` cache, so the same directory can be served over HTTP to Nix.
//!
//! ```text
//! sftp://[USER@]HOST[:PORT][/PATH][?identity=FILE&known-hosts=FILE&insecure-accept-any-host-key=true]
//! ```
//!
//! # Where what is
//! - `address`: [`SftpConfig`], the address and its parameters.
//! - `auth`: [`HostKeyCheck`] and [`SftpAuth`]: the host-key check and the keys offered.
//! - `connection`: the SSH connection and the pool of SFTP sessions operations borrow.
//! - `upload`: puts (temporary file, flush, rename or hard link), atomic and create-if-absent.
//! - `download`: the stream of a `get`.
//! - `listing`: `list`, a walk of the directories.
//! - `error`: SSH and SFTP errors, classified into [`ErrorKind`]s.
//! - here: the backend, keys and their paths on the server, `exists` and `delete`.
//!
//! Temporary names (`.nixpush-*.tmp`) are never listed and cannot be used as keys.
//!
//! **Bounded memory**: files go up in writes of [`CHUNK`] bytes, at most [`IN_FLIGHT`] of them
//! sent and not yet acknowledged, and come down the same way: memory per transfer stays under
//! a megabyte whatever the size, while the pipeline keeps a high-latency link busy.

mod address;
mod auth;
mod connection;
mod download;
mod error;
mod listing;
mod upload;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use russh_sftp::protocol::{FileAttributes, StatusCode};

pub use address::SftpConfig;
pub use auth::{HostKeyCheck, SftpAuth};
pub use connection::SESSIONS;

use crate::{Backend, BackendError, Body, ByteStream, ErrorKind, ObjectInfo, Put, PutOptions};
use connection::{Lease, PoolInner, Session};
use error::{is_status, sftp_error};
use listing::walk;

/// Temporary files start with this and end in `.tmp` (as in the fs backend).
pub const TMP_PREFIX: &str = ".nixpush-";

/// Bytes per SFTP read or write request (OpenSSH's own client uses 32 KiB; its server accepts
/// up to 255 KiB).
pub const CHUNK: usize = 64 << 10;

/// Read or write requests in flight per transfer.
pub const IN_FLIGHT: usize = 16;

/// Puts of one batch in flight together on its session: with [`IN_FLIGHT`] writes of
/// [`CHUNK`] bytes each, at most 16 MiB of requests.
const PUTS_AT_ONCE: usize = 16;

pub struct SftpBackend {
    pool: Arc<PoolInner>,
}

impl fmt::Debug for SftpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SftpBackend")
            .field("config", &self.pool.config)
            .finish_non_exhaustive()
    }
}

/// The path on the server of `rel` (a key or a directory of keys; empty: the root) below the
/// cache directory `root`.
fn remote(root: &str, rel: &str) -> String {
    match (root, rel) {
        ("", "") => ".".to_owned(),
        ("", r) => r.to_owned(),
        (r, "") => r.to_owned(),
        ("/", r) => format!("/{r}"),
        (root, r) => format!("{root}/{r}"),
    }
}

/// A key is `/`-separated names, none empty, `.` or `..`, the last not a temporary name.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
        && !key
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with(TMP_PREFIX))
}

fn file_mode(attrs: &FileAttributes) -> u32 {
    attrs.permissions.unwrap_or(0) & 0o170000
}
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// Whether a regular file is at `path`.
async fn file_exists(s: &Session, path: &str, key: &str) -> Result<bool, BackendError> {
    match s.sftp.lstat(path).await {
        Ok(a) => Ok(file_mode(&a.attrs) == S_IFREG),
        Err(e) if is_status(&e, StatusCode::NoSuchFile) => Ok(false),
        Err(e) => Err(sftp_error("exists", key, e)),
    }
}

impl SftpBackend {
    /// Open the cache at `addr`; no request is made.
    pub fn open(addr: &str) -> Result<Self, BackendError> {
        let config = SftpConfig::parse(addr).map_err(BackendError::from)?;
        Ok(Self::new(config))
    }

    pub fn new(config: SftpConfig) -> Self {
        Self {
            pool: Arc::new(PoolInner::new(config)),
        }
    }

    pub fn config(&self) -> &SftpConfig {
        &self.pool.config
    }

    fn remote(&self, rel: &str) -> String {
        remote(&self.pool.config.root, rel)
    }

    fn path_of(&self, op: &'static str, key: &str) -> Result<String, BackendError> {
        if !valid_key(key) {
            return Err(BackendError::invalid_key(op, key));
        }
        Ok(self.remote(key))
    }

    /// A session for `op` on `key`; a failure to connect is reported as theirs.
    async fn checkout(&self, op: &'static str, key: &str) -> Result<Lease, BackendError> {
        self.pool.checkout().await.map_err(|mut e| {
            e.op = op;
            e.key = key.to_owned();
            e
        })
    }

    /// Run an idempotent operation on a session; once more on a new connection if it failed
    /// because the connection died under it.
    async fn idempotent<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T, BackendError>
    where
        F: for<'s> Fn(&'s Session) -> BoxFuture<'s, Result<T, BackendError>>,
    {
        let lease = self.checkout(op, key).await?;
        match lease.get().note(f(lease.get()).await) {
            // The connection died under it: once more, on a new one.
            Err(e) if e.kind == ErrorKind::Transient && lease.get().conn.handle.is_closed() => {
                drop(lease);
                let lease = self.checkout(op, key).await?;
                lease.get().note(f(lease.get()).await)
            }
            r => r,
        }
    }
}

#[async_trait]
impl Backend for SftpBackend {
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
        let path = self.path_of("put", key)?;
        let lease = self.checkout("put", key).await?;
        let s = lease.get();
        s.note(upload::put_on(s, &path, key, body, opts.mode).await)
    }

    /// The puts of a batch share one session, [`PUTS_AT_ONCE`] of them in flight together:
    /// their requests (open, writes, `fsync@openssh.com`, close, rename) are pipelined, so a
    /// batch costs a few round trips instead of several per object, which over a real network
    /// is most of the time of a small path. Each object is flushed as a single put flushes it.
    async fn put_batch(&self, puts: Vec<Put>) -> Vec<Result<(), BackendError>> {
        let first = puts.first().map_or("", |p| p.key.as_str()).to_owned();
        let lease = match self.checkout("put", &first).await {
            Ok(l) => l,
            Err(e) => {
                return puts
                    .iter()
                    .map(|p| Err(BackendError::new(e.kind, e.op, &p.key, e.message.clone())))
                    .collect();
            }
        };
        let s = lease.get();
        futures::stream::iter(puts)
            .map(|p| async move {
                let path = self.path_of("put", &p.key)?;
                s.note(upload::put_on(s, &path, &p.key, p.body, p.opts.mode).await)
            })
            .buffered(PUTS_AT_ONCE)
            .collect()
            .await
    }

    fn durable_in_batches(&self) -> bool {
        true
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let path = self.path_of("exists", key)?;
        self.idempotent("exists", key, |s| {
            let (path, key) = (path.clone(), key.to_owned());
            Box::pin(async move { file_exists(s, &path, &key).await })
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<ByteStream, BackendError> {
        self.download(key).await
    }

    async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        // Walk only below the deepest directory the prefix names.
        let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        if !dir_part.is_empty() && !valid_key(dir_part) {
            return Err(BackendError::new(
                ErrorKind::Config,
                "list",
                prefix,
                "invalid key prefix",
            ));
        }
        let root = self.pool.config.root.clone();
        self.idempotent("list", prefix, |s| {
            let (root, prefix, dir_part) = (root.clone(), prefix.to_owned(), dir_part.to_owned());
            Box::pin(async move { walk(&root, s, &dir_part, &prefix).await })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path_of("delete", key)?;
        self.idempotent("delete", key, |s| {
            let (path, key) = (path.clone(), key.to_owned());
            Box::pin(async move {
                match s.sftp.remove(path).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_status(&e, StatusCode::NoSuchFile) => Ok(()),
                    Err(e) => Err(sftp_error("delete", &key, e)),
                }
            })
        })
        .await
    }

    fn describe(&self) -> String {
        self.pool.config.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for good in ["a", "nar/x.nar.zst", "x.narinfo", "a.b/c"] {
            assert!(valid_key(good), "{good}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/./b",
            ".nixpush-x.tmp",
            "nar/.nixpush-1",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn remote_paths() {
        let b = |root: &str| {
            let mut c =
                SftpConfig::parse("sftp://u@h/x?insecure-accept-any-host-key=true").unwrap();
            c.root = root.to_owned();
            SftpBackend::new(c)
        };
        assert_eq!(b("/srv/c").remote("nar/a"), "/srv/c/nar/a");
        assert_eq!(b("/srv/c").remote(""), "/srv/c");
        assert_eq!(b("/").remote("a"), "/a");
        assert_eq!(b("").remote("a"), "a");
        assert_eq!(b("").remote(""), ".");
        assert_eq!(b("rel").remote("a"), "rel/a");
    }
}
