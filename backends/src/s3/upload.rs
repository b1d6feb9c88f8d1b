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
//!   sent in one PUT; a larger one goes up in parts of [`part_size`] bytes (8 MiB, more for files
//!   over 78 GiB so that any file fits in S3's 10,000 parts), with at most [`PARTS_IN_FLIGHT`]
//!   parts read and not yet acknowledged at once: memory is at most
//!   `PARTS_IN_FLIGHT × part_size`, whatever the file size. Each part is uploaded by its own
//!   task, so parts go up while the next one is read. Across all the uploads one backend runs
//!   at once (the pipeline runs `--jobs` of them), the bytes read and not yet acknowledged stay
//!   under [`MEMORY_BUDGET`]: a part or a single-PUT file takes its share of a semaphore before
//!   it is read and gives it back when the store has it (a part larger than the whole budget,
//!   for files over 640 GiB, takes all of it).

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
/// The smallest part of a multipart upload (S3 requires 5 MiB for all but the last).
pub const MIN_PART_SIZE: u64 = 8 << 20;
/// S3's limit on the number of parts of one upload.
pub const MAX_PARTS: u64 = 10_000;
/// Parts read into memory and not yet acknowledged by the store, at most.
pub const PARTS_IN_FLIGHT: usize = 3;
/// Object bytes one backend holds in memory at once, at most, for all its uploads together.
pub const MEMORY_BUDGET: u64 = 64 << 20;

/// Part size for a multipart upload of `len` bytes: [`MIN_PART_SIZE`], or more (in whole MiB)
/// when the file would not fit in [`MAX_PARTS`] parts.
pub fn part_size(len: u64) -> u64 {
    let needed = len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    needed.max(MIN_PART_SIZE)
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
                self.put_single(path, key, b.into(), opts.mode, attributes)
                    .await
            }
            Body::File(staged) => {
                let len = tokio::fs::metadata(&staged)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?
                    .len();
                if len <= SINGLE_PUT_MAX {
                    let _permit = self.reserve(len).await;
                    let data = tokio::fs::read(&staged)
                        .await
                        .map_err(|e| BackendError::io("put", key, e))?;
                    self.put_single(path, key, Bytes::from(data).into(), opts.mode, attributes)
                        .await
                } else if opts.mode == PutMode::Create {
                    Err(too_big_to_create(key))
                } else {
                    self.put_multipart(path, key, &staged, len, attributes)
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
        let part = part_size(len);
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
}
