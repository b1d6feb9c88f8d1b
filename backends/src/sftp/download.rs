//! Gets: a stream of the remote file, read ahead.
//!
//! The stream reads [`IN_FLIGHT`] chunks ahead, each of the server's read size (at most
//! [`CHUNK`](super::CHUNK) bytes), so memory per transfer stays under a megabyte whatever the
//! size. It holds its session until dropped, then closes the remote file and gives the session
//! back. A failed open because the connection died is retried once on a new connection; a
//! failed read ends the stream with the error and retires the session.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::stream::StreamExt as _;
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};

use super::connection::{Lease, Session};
use super::error::{is_status, sftp_error};
use super::{IN_FLIGHT, SftpBackend};
use crate::{BackendError, ByteStream, ErrorKind};

impl SftpBackend {
    /// The object of `key` as a stream; see the module doc.
    pub(super) async fn download(&self, key: &str) -> Result<ByteStream, BackendError> {
        let path = self.path_of("get", key)?;
        let mut lease = self.checkout("get", key).await?;
        let handle = match lease.get().note(open_read(lease.get(), &path, key).await) {
            Err(e) if e.kind == ErrorKind::Transient && lease.get().conn.handle.is_closed() => {
                drop(lease);
                lease = self.checkout("get", key).await?;
                lease.get().note(open_read(lease.get(), &path, key).await)?
            }
            r => r?,
        };
        let read_len = lease.get().read_len;
        let file = Arc::new(OpenFile {
            lease: Some(lease),
            handle,
        });
        let key = key.to_owned();
        let reads = futures::stream::iter(0u64..)
            .map(move |i| {
                let file = file.clone();
                async move {
                    let s = file.lease.as_ref().expect("set until dropped").get();
                    let r = read_chunk(&s.sftp, &file.handle, i * read_len as u64, read_len).await;
                    if r.is_err() {
                        s.broken.store(true, Ordering::Relaxed);
                    }
                    r
                }
            })
            .buffered(IN_FLIGHT);
        let stream = reads.scan(false, move |done, r| {
            let item = if *done {
                None
            } else {
                match r {
                    Ok(data) if data.len() < read_len => {
                        *done = true;
                        (!data.is_empty()).then(|| Ok(Bytes::from(data)))
                    }
                    Ok(data) => Some(Ok(Bytes::from(data))),
                    Err(e) => {
                        *done = true;
                        Some(Err(sftp_error("get", &key, e)))
                    }
                }
            };
            futures::future::ready(item)
        });
        Ok(Box::pin(stream))
    }
}

async fn open_read(s: &Session, path: &str, key: &str) -> Result<String, BackendError> {
    s.sftp
        .open(path, OpenFlags::READ, FileAttributes::empty())
        .await
        .map(|h| h.handle)
        .map_err(|e| sftp_error("get", key, e))
}

/// Read `len` bytes at `offset`, fewer only at the end of the file.
async fn read_chunk(
    sftp: &RawSftpSession,
    handle: &str,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, SftpError> {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < len {
        let want = u32::try_from(len - buf.len()).unwrap_or(u32::MAX);
        match sftp.read(handle, offset + buf.len() as u64, want).await {
            Ok(d) if d.data.is_empty() => break,
            Ok(d) if buf.is_empty() && d.data.len() == len => return Ok(d.data),
            Ok(d) => buf.extend_from_slice(&d.data),
            Err(e) if is_status(&e, StatusCode::Eof) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Closes the remote file when a `get` stream is dropped, then gives the session back.
struct OpenFile {
    lease: Option<Lease>,
    handle: String,
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let handle = std::mem::take(&mut self.handle);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = lease.get().sftp.close(handle).await;
                drop(lease);
            });
        }
    }
}
