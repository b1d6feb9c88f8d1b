//! Puts: one streamed multipart request, or a resumable upload in chunks.
//!
//! - **Atomic puts**: GCS makes an object visible only once its upload completes.
//! - **Create-if-absent**: `ifGenerationMatch=0` on a single-request (multipart) upload, for
//!   every size: GCS checks it atomically and answers `412`, which is
//!   [`ErrorKind::AlreadyExists`]. A single request can carry any size, and the staged file is
//!   streamed into it, so memory stays bounded.
//! - **Overwrite**: bodies in memory and staged files of at most [`RESUMABLE_ABOVE`] bytes go
//!   up in one streamed multipart request. Larger files use a resumable upload in chunks of
//!   [`RESUMABLE_CHUNK`] bytes, each read from the file only when it is sent, so memory is one
//!   chunk whatever the size. After each chunk the server says how much it kept (`308` with
//!   `Range`), and the next chunk starts there. A failed upload is cancelled; the caller
//!   retries what is [`ErrorKind::Transient`].

use std::hash::{BuildHasher as _, Hasher as _};
use std::io::SeekFrom;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt as _;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, Response};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::GcsBackend;
use super::error::missing_bucket_error;
use crate::{BackendError, Body, ErrorKind, PutMode, PutOptions};

/// Staged files larger than this go up in a resumable upload (in overwrite mode).
pub const RESUMABLE_ABOVE: u64 = 16 << 20;
/// Bytes per request of a resumable upload: a multiple of 256 KiB, as GCS requires.
pub const RESUMABLE_CHUNK: usize = 8 << 20;

/// A `u64` different on every call.
fn unique() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = SystemTime::now().duration_since(UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

impl GcsBackend {
    /// Store `body` as the object `name` (of `key`), as `opts.mode` says.
    pub(super) async fn upload(
        &self,
        key: &str,
        name: &str,
        body: Body,
        opts: PutOptions,
    ) -> Result<(), BackendError> {
        let big = match &body {
            Body::File(p) if opts.mode == PutMode::Overwrite => {
                tokio::fs::metadata(p)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?
                    .len()
                    > RESUMABLE_ABOVE
            }
            _ => false,
        };
        match body {
            Body::File(p) if big => {
                let r = self.put_resumable(key, name, &p, &opts).await;
                drop(p);
                r
            }
            body => self.put_multipart(key, name, body, &opts).await,
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        name: &str,
        body: Body,
        opts: &PutOptions,
    ) -> Result<(), BackendError> {
        let boundary = format!("nixpush-{:016x}{:016x}", unique(), unique());
        let meta = json!({"name": name, "contentType": opts.content_type}).to_string();
        let head = Bytes::from(format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n\
             --{boundary}\r\nContent-Type: {}\r\n\r\n",
            opts.content_type
        ));
        let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
        let (len, data): (
            u64,
            futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
        ) = match &body {
            Body::Bytes(b) => (
                b.len() as u64,
                futures::stream::once(futures::future::ready(Ok(b.clone()))).boxed(),
            ),
            Body::File(p) => {
                let f = tokio::fs::File::open(p)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?;
                let len = f
                    .metadata()
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?
                    .len();
                (
                    len,
                    tokio_util::io::ReaderStream::with_capacity(f, 256 << 10).boxed(),
                )
            }
        };
        let total = head.len() as u64 + len + tail.len() as u64;
        let stream = futures::stream::iter([Ok(head)])
            .chain(data)
            .chain(futures::stream::iter([Ok(tail)]));
        let mut query = vec![("uploadType", "multipart")];
        if opts.mode == PutMode::Create {
            query.push(("ifGenerationMatch", "0"));
        }
        let req = self
            .client
            .post(self.upload_url(&query))
            .header(
                CONTENT_TYPE,
                format!("multipart/related; boundary={boundary}"),
            )
            .header(CONTENT_LENGTH, total)
            .body(reqwest::Body::wrap_stream(stream));
        let resp = self.send("put", key, req).await?;
        drop(body);
        if resp.status().is_success() {
            return Ok(());
        }
        let e = self.storage_error("put", key, resp).await;
        Err(match e.kind {
            ErrorKind::AlreadyExists => BackendError::new(
                ErrorKind::AlreadyExists,
                "put",
                key,
                "an object with this key exists",
            ),
            ErrorKind::NotFound => missing_bucket_error(&self.config.bucket, e),
            _ => e,
        })
    }

    async fn put_resumable(
        &self,
        key: &str,
        name: &str,
        file: &Path,
        opts: &PutOptions,
    ) -> Result<(), BackendError> {
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| BackendError::io("put", key, e))?;
        let total = f
            .metadata()
            .await
            .map_err(|e| BackendError::io("put", key, e))?
            .len();
        let meta = json!({"name": name, "contentType": opts.content_type}).to_string();
        let req = self
            .client
            .post(self.upload_url(&[("uploadType", "resumable"), ("name", name)]))
            .header(CONTENT_TYPE, "application/json; charset=UTF-8")
            .header("X-Upload-Content-Type", opts.content_type)
            .header("X-Upload-Content-Length", total)
            .body(meta);
        let resp = self.send("put", key, req).await?;
        if !resp.status().is_success() {
            let e = self.storage_error("put", key, resp).await;
            return Err(if e.kind == ErrorKind::NotFound {
                missing_bucket_error(&self.config.bucket, e)
            } else {
                e
            });
        }
        let session = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| url::Url::parse(s).ok())
            .ok_or_else(|| {
                BackendError::new(
                    ErrorKind::Other,
                    "put",
                    key,
                    "the resumable upload was started without a session URL (Location)",
                )
            })?;
        let r = self
            .send_chunks(key, &session, &mut f, total, opts.content_type)
            .await;
        if r.is_err() {
            // Cancel, so the server can drop what it kept (GCS answers 499).
            let _ = self
                .session_request(Method::DELETE, &session, "put", key)
                .await;
        }
        r
    }

    /// A request to a resumable upload's session URL.
    async fn session_request(
        &self,
        method: Method,
        session: &url::Url,
        op: &'static str,
        key: &str,
    ) -> Result<Response, BackendError> {
        let req = self.client.request(method, session.clone());
        if self.same_origin(session) {
            self.send(op, key, req).await
        } else {
            self.send_limited(op, key, req).await
        }
    }

    async fn send_chunks(
        &self,
        key: &str,
        session: &url::Url,
        f: &mut tokio::fs::File,
        total: u64,
        content_type: &'static str,
    ) -> Result<(), BackendError> {
        let mut offset = 0u64;
        let mut stalls = 0;
        loop {
            let n = (total - offset).min(RESUMABLE_CHUNK as u64) as usize;
            f.seek(SeekFrom::Start(offset))
                .await
                .map_err(|e| BackendError::io("put", key, e))?;
            let mut buf = vec![0u8; n];
            f.read_exact(&mut buf)
                .await
                .map_err(|e| BackendError::io("put", key, e))?;
            let last = offset + n as u64 - 1;
            let req = self
                .client
                .put(session.clone())
                .header(CONTENT_TYPE, content_type)
                .header(CONTENT_LENGTH, n)
                .header("Content-Range", format!("bytes {offset}-{last}/{total}"))
                .body(buf);
            let req = if self.same_origin(session) {
                match self.access_token("put", key).await? {
                    Some(t) => req.bearer_auth(t),
                    None => req,
                }
            } else {
                req
            };
            let resp = self.send_limited("put", key, req).await?;
            let status = resp.status();
            if status.is_success() {
                if last + 1 == total {
                    return Ok(());
                }
                return Err(BackendError::new(
                    ErrorKind::Other,
                    "put",
                    key,
                    format!(
                        "the upload was completed after {} of {total} bytes",
                        last + 1
                    ),
                ));
            }
            if status.as_u16() != 308 {
                return Err(self.storage_error("put", key, resp).await);
            }
            // `Range: bytes=0-N`: what the server kept; none without the header.
            let kept = resp
                .headers()
                .get(RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|r| r.rsplit_once('-'))
                .and_then(|(_, end)| end.trim().parse::<u64>().ok())
                .map_or(0, |end| end + 1);
            if kept > last + 1 || kept >= total {
                return Err(BackendError::new(
                    ErrorKind::Other,
                    "put",
                    key,
                    format!(
                        "the server claims {kept} bytes after {} were sent",
                        last + 1
                    ),
                ));
            }
            if kept <= offset {
                stalls += 1;
                if stalls >= 3 {
                    return Err(BackendError::new(
                        ErrorKind::Transient,
                        "put",
                        key,
                        format!("the server keeps no more than {kept} of {total} bytes"),
                    ));
                }
            } else {
                stalls = 0;
            }
            offset = kept;
        }
    }
}
