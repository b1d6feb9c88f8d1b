//! Puts: a temporary file, flushed, then moved into place.
//!
//! Every put writes a temporary file (`.nixpush-*.tmp`, opened with `O_EXCL`) in the directory
//! of its final key, creating directories as needed, flushes it to disk (`fsync@openssh.com`,
//! where the server has it), then moves it into place:
//! - **Overwrite**: `posix-rename@openssh.com`, which replaces an existing file atomically
//!   (plain SFTP `rename` refuses an existing target). A server without it can still create
//!   new keys, and fails to replace an existing one with [`ErrorKind::Other`].
//! - **Create-if-absent**: `hardlink@openssh.com` from the temporary file to the final name,
//!   which `link(2)` refuses atomically if the name exists, then the temporary file is removed.
//!   Without that extension, plain SFTP `rename`, which SFTP v3 defines as failing on an
//!   existing target (OpenSSH implements it with `link(2)` too). SFTP v3 reports an existing
//!   target only as a generic failure, so the target is then looked up: present means
//!   [`ErrorKind::AlreadyExists`].
//!
//! Once `put` returns, the file's bytes are on the server's disk (`fsync@openssh.com`); the
//! rename that published it is as durable as the server's file system makes renames (SFTP has
//! no way to flush a directory). A writer killed mid-way leaves its temporary file behind (remove `.nixpush-*.tmp`
//! files older than a day).
//!
//! The data goes up in writes of [`CHUNK`](super::CHUNK) bytes (or the server's limit), at
//! most [`IN_FLIGHT`] of them sent and not yet acknowledged.

use std::hash::{BuildHasher as _, Hasher as _};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt as _};
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use tokio::io::AsyncReadExt as _;

use super::connection::Session;
use super::error::{is_status, sftp_error};
use super::{IN_FLIGHT, S_IFDIR, TMP_PREFIX, file_exists, file_mode};
use crate::{BackendError, Body, ErrorKind, PutMode};

/// A `u64` different on every call, in every process: names temporary files.
fn unique() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// Four-byte length, then the bytes: an SSH string.
fn ssh_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// What a put sends: bytes in memory or a staged file, read a chunk at a time.
enum Source {
    Bytes(Bytes),
    File(tokio::fs::File),
}

impl Source {
    async fn next_chunk(&mut self, len: usize) -> io::Result<Vec<u8>> {
        match self {
            Source::Bytes(b) => {
                let n = len.min(b.len());
                Ok(b.split_to(n).to_vec())
            }
            Source::File(f) => {
                let mut buf = vec![0; len];
                let mut filled = 0;
                while filled < len {
                    let n = f.read(&mut buf[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok(buf)
            }
        }
    }
}

/// Create `dir` and its parents as needed.
fn ensure_dir<'a>(
    s: &'a Session,
    dir: &'a str,
    key: &'a str,
) -> BoxFuture<'a, Result<(), BackendError>> {
    Box::pin(async move {
        if dir.is_empty() || dir == "/" || dir == "." {
            return Ok(());
        }
        match s.sftp.mkdir(dir, FileAttributes::empty()).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, StatusCode::NoSuchFile) => {
                let parent = dir.rsplit_once('/').map_or("", |(p, _)| p);
                ensure_dir(s, parent, key).await?;
                match s.sftp.mkdir(dir, FileAttributes::empty()).await {
                    Ok(_) => Ok(()),
                    Err(e) => exists_as_dir(s, dir, key, e).await,
                }
            }
            Err(e) => exists_as_dir(s, dir, key, e).await,
        }
    })
}

/// After a failed mkdir: fine if the directory is there (another writer made it).
async fn exists_as_dir(
    s: &Session,
    dir: &str,
    key: &str,
    e: SftpError,
) -> Result<(), BackendError> {
    match s.sftp.stat(dir).await {
        Ok(a) if file_mode(&a.attrs) == S_IFDIR => Ok(()),
        _ => {
            let mut err = sftp_error("put", key, e);
            err.message = format!("cannot create directory {dir}: {}", err.message);
            // "No such file" from mkdir means a parent could not be made: not the key's absence.
            if err.kind == ErrorKind::NotFound {
                err.kind = ErrorKind::Other;
            }
            Err(err)
        }
    }
}

/// Send `src` to the open `handle`, [`IN_FLIGHT`] writes at a time.
async fn write_all(
    s: &Session,
    handle: &str,
    mut src: Source,
    key: &str,
) -> Result<(), BackendError> {
    let mut offset = 0u64;
    let mut eof = false;
    let mut in_flight = FuturesUnordered::new();
    loop {
        while !eof && in_flight.len() < IN_FLIGHT {
            let chunk = src
                .next_chunk(s.write_len)
                .await
                .map_err(|e| BackendError::io("put", key, e))?;
            if chunk.len() < s.write_len {
                eof = true;
            }
            if chunk.is_empty() {
                break;
            }
            let at = offset;
            offset += chunk.len() as u64;
            in_flight.push(s.sftp.write(handle.to_owned(), at, chunk));
        }
        match in_flight.next().await {
            None => return Ok(()),
            Some(r) => {
                r.map_err(|e| sftp_error("put", key, e))?;
            }
        }
    }
}

pub(super) async fn put_on(
    s: &Session,
    path: &str,
    key: &str,
    body: Body,
    mode: PutMode,
) -> Result<(), BackendError> {
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    let dir = if dir.is_empty() && path.starts_with('/') {
        "/"
    } else {
        dir
    };
    let src = match body {
        Body::Bytes(ref b) => Source::Bytes(b.clone()),
        // Opened now: the staged file is deleted when `body` drops, once this returns.
        Body::File(ref p) => Source::File(
            tokio::fs::File::open(p)
                .await
                .map_err(|e| BackendError::io("put", key, e))?,
        ),
    };
    let tmp_name = format!("{TMP_PREFIX}{:016x}.tmp", unique());
    let tmp = match dir {
        "" => tmp_name,
        "/" => format!("/{tmp_name}"),
        d => format!("{d}/{tmp_name}"),
    };
    let flags = OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE;
    // As Nix's `file://` store: 0666 less the server's umask, so a web server can read it.
    let attrs = FileAttributes {
        permissions: Some(0o666),
        ..FileAttributes::empty()
    };
    let handle = match s.sftp.open(tmp.as_str(), flags, attrs.clone()).await {
        Ok(h) => h.handle,
        Err(e) if is_status(&e, StatusCode::NoSuchFile) => {
            ensure_dir(s, dir, key).await?;
            s.sftp
                .open(tmp.as_str(), flags, attrs)
                .await
                .map_err(|e| sftp_error("put", key, e))?
                .handle
        }
        Err(e) => return Err(sftp_error("put", key, e)),
    };
    let mut written = write_all(s, &handle, src, key).await;
    if written.is_ok() && s.fsync {
        written = s
            .sftp
            .fsync(handle.as_str())
            .await
            .map(|_| ())
            .map_err(|e| sftp_error("put", key, e));
    }
    let closed = s
        .sftp
        .close(handle)
        .await
        .map(|_| ())
        .map_err(|e| sftp_error("put", key, e));
    drop(body);
    let committed = match written.and(closed) {
        Ok(()) => commit(s, &tmp, path, key, mode).await,
        Err(e) => Err(e),
    };
    if committed.is_err() || mode == PutMode::Create {
        // After a create, the temporary name is the second link; after a failure, the only one.
        let _ = s.sftp.remove(tmp.as_str()).await;
    }
    committed
}

async fn commit(
    s: &Session,
    tmp: &str,
    path: &str,
    key: &str,
    mode: PutMode,
) -> Result<(), BackendError> {
    match mode {
        PutMode::Overwrite if s.posix_rename => {
            let mut data = Vec::with_capacity(tmp.len() + path.len() + 8);
            ssh_string(&mut data, tmp);
            ssh_string(&mut data, path);
            match s.sftp.extended("posix-rename@openssh.com", data).await {
                Ok(Packet::Status(st)) if st.status_code == StatusCode::Ok => Ok(()),
                Ok(Packet::Status(st)) => Err(sftp_error("put", key, SftpError::Status(st))),
                Ok(_) => Err(sftp_error("put", key, SftpError::UnexpectedPacket)),
                Err(e) => Err(sftp_error("put", key, e)),
            }
        }
        PutMode::Overwrite => match s.sftp.rename(tmp, path).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let mut err = sftp_error("put", key, e);
                if err.kind == ErrorKind::Other && file_exists(s, path, key).await.unwrap_or(false)
                {
                    err.message = format!(
                        "the server cannot replace a file atomically (it lacks \
                         posix-rename@openssh.com): {}",
                        err.message
                    );
                }
                Err(err)
            }
        },
        PutMode::Create => {
            let r = if s.hardlink {
                s.sftp.hardlink(tmp, path).await
            } else {
                s.sftp.rename(tmp, path).await
            };
            match r {
                Ok(_) => Ok(()),
                // SFTP v3 has no "file exists" status: look.
                Err(e) if is_status(&e, StatusCode::Failure) => {
                    if file_exists(s, path, key).await? {
                        Err(BackendError::new(
                            ErrorKind::AlreadyExists,
                            "put",
                            key,
                            "an object with this key exists",
                        ))
                    } else {
                        Err(sftp_error("put", key, e))
                    }
                }
                Err(e) => Err(sftp_error("put", key, e)),
            }
        }
    }
}
