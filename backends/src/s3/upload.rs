//! Puts: one PUT, or a multipart upload of bounded memory.
//!
//! - **Atomic puts**: S3 makes an object visible only when its PUT or its multipart upload
//!   completes. A multipart upload abandoned by a crash stays invisible (and billed: give the
//!   bucket an `AbortIncompleteMultipartUpload` lifecycle rule); one that fails is aborted.
//! - **Create-if-absent**: a single PUT with `If-None-Match: *` (AWS S3 since 2024, SeaweedFS,
//!   MinIO, R2); `412 Precondition Failed` becomes [`ErrorKind::AlreadyExists`]. object_store
//!   cannot make a multipart completion conditional, so create-if-absent is offered for bodies
//!   of at most [`crate::CREATE_LIMIT`] bytes, which always go in one PUT; a larger staged file
//!   in [`PutMode::Create`] is refused with [`ErrorKind::Other`] before any request. Nixpush
//!   only creates narinfos and `nix-cache-info`, a few KiB each. A store that ignores
//!   `If-None-Match` (Garage, old MinIO) silently overwrites: do not use one with several
//!   writers.
//! - **Bounded memory**: a staged file of at most [`SINGLE_PUT_MAX`] bytes is read whole and
//!   sent in one PUT; a larger one goes up in parts (see below), with at most
//!   [`PARTS_IN_FLIGHT`] parts read and not yet acknowledged at once: memory is at most
//!   `PARTS_IN_FLIGHT × part size`, whatever the file size. Each part is uploaded by its own
//!   task, so parts go up while the next one is read. Across all the uploads one backend runs
//!   at once (the pipeline runs `--jobs` of them), the bytes read and not yet acknowledged stay
//!   under [`MEMORY_BUDGET`]: a part or a single-PUT file takes its share of a semaphore before
//!   it is read and gives it back when the store has it (a part larger than the whole budget,
//!   for files over 640 GiB, takes all of it).
//! - **Retries**: a put that failed transiently is tried again whole, a multipart upload
//!   after aborting the failed one (see the module doc of `s3`).
//!
//! # The part size grows with the file
//! S3 allows [`MAX_PARTS`] (10,000) parts per upload, each at least [`S3_MIN_PART_SIZE`]
//! (5 MiB) but the last. A fixed 8 MiB part would cap an object at 80 GiB (cachix/cachix#639),
//! so the rule is
//! ```text
//! part size = max(MIN_PART_SIZE, ceil(len / MAX_PARTS) rounded up to a whole MiB)
//! ```
//! 8 MiB parts up to 78 GiB, then as large as needed: a 1 TiB file goes in 105 MiB parts,
//! S3's largest object (5 TiB) in 525 MiB parts, below S3's 5 GiB per part.
//!
//! `len` is the compressed NAR's exact size: the pipeline stages the compressed NAR before
//! the upload starts (its key is its FileHash, known only at the end), so the size is known
//! when the first part is cut. Were the upload to stream while compressing, only the NarSize
//! would be known up front (from the store's path info); the rule would then take a bound of
//! the compressed size from it (zstd's `ZSTD_compressBound`, xz's and bzip2's documented
//! worst cases, all a little over NarSize) in place of `len`, which can only make parts
//! larger, never too many. [`S3Backend::with_multipart_limits`] lowers the 10,000 (tests cut
//! a 40 MiB file in 3 parts this way and see the part size grow against a real store).

use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{Attribute, Attributes, ObjectStore as _, PutMultipartOptions, PutPayload};
use tokio::io::AsyncReadExt as _;
use tracing::debug;

use super::S3Backend;
use super::error::{ErrorContext, map_err};
use crate::{BackendError, Body, ErrorKind, PutMode, PutOptions};

/// Staged files up to this size go up in one PUT (read whole into memory), so they can be
/// created if absent.
pub const SINGLE_PUT_MAX: u64 = crate::CREATE_LIMIT;
/// The smallest part nixpush cuts: fewer requests than S3's minimum would take.
pub const MIN_PART_SIZE: u64 = 8 << 20;
/// S3's smallest part (all but the last part of an upload).
pub const S3_MIN_PART_SIZE: u64 = 5 << 20;
/// S3's limit on the number of parts of one upload.
pub const MAX_PARTS: u64 = 10_000;
/// Parts read into memory and not yet acknowledged by the store, at most.
pub const PARTS_IN_FLIGHT: usize = 3;
/// Object bytes one backend holds in memory at once, at most, for all its uploads together.
pub const MEMORY_BUDGET: u64 = 64 << 20;

/// Part size for a multipart upload of `len` bytes: [`MIN_PART_SIZE`], or more (in whole MiB)
/// when the file would not fit in [`MAX_PARTS`] parts (see the module doc).
pub fn part_size(len: u64) -> u64 {
    Multipart::default().part_size(len)
}

/// How multipart uploads are cut: the rule of the module doc with its two numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Multipart {
    min_part_size: u64,
    max_parts: u64,
}

impl Default for Multipart {
    fn default() -> Self {
        Self {
            min_part_size: MIN_PART_SIZE,
            max_parts: MAX_PARTS,
        }
    }
}

impl Multipart {
    /// Within S3's limits: parts of at least [`S3_MIN_PART_SIZE`], at most [`MAX_PARTS`].
    pub(super) fn new(min_part_size: u64, max_parts: u64) -> Self {
        Self {
            min_part_size: min_part_size.max(S3_MIN_PART_SIZE),
            max_parts: max_parts.clamp(1, MAX_PARTS),
        }
    }

    pub(super) fn part_size(self, len: u64) -> u64 {
        let needed = len.div_ceil(self.max_parts).next_multiple_of(1 << 20);
        needed.max(self.min_part_size)
    }
}

impl S3Backend {
    /// Store `body` at `path` (the object of `key`), as `opts.mode` says.
    pub(super) async fn upload(
        &self,
        path: &ObjPath,
        key: &str,
        body: Body,
        opts: PutOptions,
    ) -> Result<(), BackendError> {
        let attributes = content_type(opts.content_type);
        match body {
            // Already in memory: one PUT, whatever the mode.
            Body::Bytes(b) => {
                crate::retry_transient("put", key, || {
                    self.put_single(path, key, b.clone().into(), opts.mode, attributes.clone())
                })
                .await
            }
            Body::File(staged) => {
                let len = tokio::fs::metadata(&staged)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?
                    .len();
                if len <= SINGLE_PUT_MAX {
                    let _permit = self.reserve(len).await;
                    let data = Bytes::from(
                        tokio::fs::read(&staged)
                            .await
                            .map_err(|e| BackendError::io("put", key, e))?,
                    );
                    crate::retry_transient("put", key, || {
                        self.put_single(
                            path,
                            key,
                            data.clone().into(),
                            opts.mode,
                            attributes.clone(),
                        )
                    })
                    .await
                } else if opts.mode == PutMode::Create {
                    Err(too_big_to_create(key))
                } else {
                    crate::retry_transient("put", key, || {
                        self.put_multipart(path, key, &staged, len, attributes.clone())
                    })
                    .await
                }
            }
        }
    }

    /// Room in [`MEMORY_BUDGET`] for `len` bytes (whole MiB, capped at the budget).
    async fn reserve(&self, len: u64) -> tokio::sync::OwnedSemaphorePermit {
        let mib = len.div_ceil(1 << 20).clamp(1, MEMORY_BUDGET >> 20) as u32;
        self.memory
            .clone()
            .acquire_many_owned(mib)
            .await
            .expect("the semaphore is never closed")
    }

    async fn put_single(
        &self,
        path: &ObjPath,
        key: &str,
        payload: PutPayload,
        mode: PutMode,
        attributes: Attributes,
    ) -> Result<(), BackendError> {
        let opts = object_store::PutOptions {
            mode: match mode {
                PutMode::Overwrite => object_store::PutMode::Overwrite,
                PutMode::Create => object_store::PutMode::Create,
            },
            attributes,
            ..Default::default()
        };
        self.store
            .put_opts(path, payload, opts)
            .await
            .map(|_| ())
            .map_err(|e| map_err(&self.errors, "put", key, e))
    }

    async fn put_multipart(
        &self,
        path: &ObjPath,
        key: &str,
        file: &std::path::Path,
        len: u64,
        attributes: Attributes,
    ) -> Result<(), BackendError> {
        let part = self.multipart.part_size(len);
        debug!(key, len, part, "multipart upload");
        let mut upload = self
            .store
            .put_multipart_opts(
                path,
                PutMultipartOptions {
                    attributes,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| map_err(&self.errors, "put", key, e))?;
        let mut parts = tokio::task::JoinSet::new();
        let result: Result<(), BackendError> = async {
            let mut f = tokio::fs::File::open(file)
                .await
                .map_err(|e| BackendError::io("put", key, e))?;
            let mut remaining = len;
            while remaining > 0 {
                // Room first, then read: at most PARTS_IN_FLIGHT parts in memory.
                while parts.len() >= PARTS_IN_FLIGHT {
                    join_part(&self.errors, &mut parts, key).await?;
                }
                let n = remaining.min(part);
                let permit = self.reserve(n).await;
                let mut buf = vec![0u8; n as usize];
                f.read_exact(&mut buf)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?;
                remaining -= n;
                let sent = upload.put_part(PutPayload::from(Bytes::from(buf)));
                parts.spawn(async move {
                    let r = sent.await;
                    drop(permit);
                    r
                });
            }
            while !parts.is_empty() {
                join_part(&self.errors, &mut parts, key).await?;
            }
            upload
                .complete()
                .await
                .map(|_| ())
                .map_err(|e| map_err(&self.errors, "put", key, e))
        }
        .await;
        if result.is_err() {
            parts.abort_all();
            if let Err(e) = upload.abort().await {
                debug!(key, error = %e, "could not abort the multipart upload");
            }
        }
        result
    }
}

async fn join_part(
    errors: &ErrorContext,
    parts: &mut tokio::task::JoinSet<object_store::Result<()>>,
    key: &str,
) -> Result<(), BackendError> {
    match parts.join_next().await {
        None => Ok(()),
        Some(Ok(r)) => r.map_err(|e| map_err(errors, "put", key, e)),
        Some(Err(join)) => Err(BackendError::new(
            ErrorKind::Other,
            "put",
            key,
            format!("part upload task failed: {join}"),
        )),
    }
}

fn content_type(ct: &'static str) -> Attributes {
    let mut a = Attributes::new();
    a.insert(Attribute::ContentType, ct.into());
    a
}

fn too_big_to_create(key: &str) -> BackendError {
    BackendError::new(
        ErrorKind::Other,
        "put",
        key,
        format!(
            "create-if-absent is supported for objects of at most {SINGLE_PUT_MAX} bytes on S3 \
             (a multipart upload cannot be completed conditionally here)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_file_fits_in_ten_thousand_parts() {
        assert_eq!(part_size(0), MIN_PART_SIZE);
        assert_eq!(part_size(100 << 20), MIN_PART_SIZE);
        for len in [
            MIN_PART_SIZE * MAX_PARTS,
            MIN_PART_SIZE * MAX_PARTS + 1,
            80 << 30,
            1 << 40,
            5 << 40,
        ] {
            let p = part_size(len);
            assert!(len.div_ceil(p) <= MAX_PARTS, "{len}: part {p}");
            assert!(p >= MIN_PART_SIZE && p % (1 << 20) == 0);
            // S3's largest part is 5 GiB.
            assert!(p <= 5 << 30);
        }
    }

    #[test]
    fn fewer_parts_allowed_means_larger_parts() {
        let m = Multipart::new(0, 3);
        assert_eq!(m, Multipart::new(S3_MIN_PART_SIZE, 3));
        // 40 MiB and a bit: 14 MiB parts, three of them.
        let len = (40 << 20) + 12345;
        assert_eq!(m.part_size(len), 14 << 20);
        assert_eq!(len.div_ceil(m.part_size(len)), 3);
        // Small files keep S3's smallest part.
        assert_eq!(m.part_size(9 << 20), S3_MIN_PART_SIZE);
        assert_eq!(Multipart::new(1 << 40, 0).max_parts, 1);
    }
}
