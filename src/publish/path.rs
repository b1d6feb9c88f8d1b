//! Publishing one path: its NAR (from the store, through the pipeline, under a compression
//! slot and an upload permit), then, once its references' narinfos are there, its signed
//! narinfo, created only if absent. Each is durable before the next step starts (put on its
//! own, or in a [`batch`]).

use super::*;

pub(super) struct Ctx {
    pub(super) store: Arc<dyn Store>,
    pub(super) backend: Arc<dyn Backend>,
    /// Where the backend makes small objects durable in batches (see [`batch`]).
    pub(super) batcher: Option<batch::Batcher>,
    pub(super) opts: PushOptions,
    /// Codec contexts reused from path to path.
    pub(super) contexts: Arc<pipeline::Contexts>,
    /// Uploads in flight at once ([`UPLOADS_PER_JOB`] per compression slot).
    pub(super) uploads: Semaphore,
    /// Staged NARs waiting for a batch, in MiB (rounded up): up to
    /// [`batch::STAGED_MIB_MAX`], so that as many small NARs wait as batches take.
    pub(super) batched: Semaphore,
    pub(super) events: EventSink,
    /// The pass's side of the garbage collection protocol.
    pub(super) guard: Arc<guard::Guard>,
}

/// Uploads in flight per compression slot: enough that a slot never waits for a slow upload
/// to finish before it compresses the next NAR.
pub(super) const UPLOADS_PER_JOB: usize = 2;

#[derive(Debug, Clone, Copy)]
pub(super) enum Outcome {
    Published { file_size: u64 },
    Raced,
}

pub(super) async fn publish_one(
    ctx: &Ctx,
    info: &PathInfo,
    slot: oneshot::Receiver<OwnedSemaphorePermit>,
    deps: Vec<(StorePath, PathFuture)>,
) -> Result<Outcome, PathError> {
    let sd = ctx.store.store_dir();
    let full = sd.display(&info.path);

    // 1. The NAR, under a bounded number of slots.
    let (nar_key, staged_meta, upload, nar_at) = {
        let slot = slot
            .await
            .map_err(|_| PathError::Internal("the slot dispatcher stopped".into()))?;
        (ctx.events)(&Event::Started {
            path: info.path.clone(),
            nar_size: info.nar_size,
        });
        let source = ctx.store.nar_source(&info.path).await?;
        let staging = ctx.backend.staging_dir().map(ToOwned::to_owned);
        let compress = ctx.opts.compress;
        let size = info.nar_size;
        let contexts = ctx.contexts.clone();
        let listing = ctx.opts.nar_listing;
        let staged = tokio::task::spawn_blocking(move || {
            pipeline::stage(
                source,
                staging.as_deref(),
                compress,
                size,
                &contexts,
                listing,
            )
        })
        .await
        .map_err(|e| PathError::Internal(e.to_string()))??;
        if staged.nar_hash != info.nar_hash || staged.nar_size != info.nar_size {
            return Err(PathError::HashMismatch {
                path: full,
                ours: staged.nar_hash.to_nix_string(),
                our_size: staged.nar_size,
                theirs: info.nar_hash.to_nix_string(),
                their_size: info.nar_size,
            });
        }
        let key = format!(
            "nar/{}{}",
            staged.file_hash.to_nixbase32(),
            compress.compression.nar_extension()
        );
        let meta = (staged.file_hash, staged.file_size);
        // The slot is for compressing; the upload (a network transfer, or an fdatasync and a
        // rename) waits on I/O, and holding the slot through it left a core idle for every
        // path. Taking an upload permit before letting the slot go bounds the staged files
        // waiting for one when the cache is slower than compression.
        let batcher = ctx
            .batcher
            .as_ref()
            .filter(|_| staged.file_size <= batch::BATCH_OBJECT_MAX);
        let _upload = match batcher {
            Some(_) => {
                let mib = u32::try_from(staged.file_size.div_ceil(1 << 20).max(1)).unwrap_or(1);
                ctx.batched.acquire_many(mib).await
            }
            None => ctx.uploads.acquire().await,
        }
        .map_err(|e| PathError::Internal(e.to_string()))?;
        drop(slot);
        ctx.guard.before_nar(&key).await?;
        let nar_started = std::time::SystemTime::now();
        debug!(key, file_size = staged.file_size, "uploading NAR");
        // The key is the NAR's FileHash: an object there holds these very bytes. Where
        // creating costs nothing more, create it if absent, so that builders racing on a
        // path store its NAR once; `force` (and so repair) always rewrites it.
        let mode = if !ctx.opts.force
            && staged.file_size <= nixpush_backends::CREATE_LIMIT
            && ctx.backend.creates_in_one_request()
        {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        let put = Put {
            key: key.clone(),
            body: Body::File(staged.file),
            opts: PutOptions {
                mode,
                content_type: "application/x-nix-nar",
            },
        };
        let started = std::time::Instant::now();
        let stored = match batcher {
            Some(b) => b.put(put, staged.file_size).await,
            None => ctx.backend.put(&put.key, put.body, put.opts).await,
        };
        match stored {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::AlreadyExists && mode == PutMode::Create => {
                debug!(key, "NAR already stored by another writer");
            }
            Err(e) => return Err(e.into()),
        }
        let upload = started.elapsed();
        let nar_at = (nar_started, std::time::SystemTime::now());
        // The listing goes before the narinfo, so that a reader who finds one finds both.
        if let Some(listing) = staged.listing {
            let put = Put {
                key: format!("{}.ls", info.path.hash_part()),
                body: Body::Bytes(listing.into()),
                opts: PutOptions {
                    mode: PutMode::Overwrite,
                    content_type: "application/json",
                },
            };
            match &ctx.batcher {
                Some(b) => {
                    let len = put_len(&put);
                    b.put(put, len).await?;
                }
                None => ctx.backend.put(&put.key, put.body, put.opts).await?,
            }
        }
        (key, meta, upload, nar_at)
    };

    // 2. Wait for the references' narinfos.
    for (r, dep) in deps {
        dep.await.map_err(|e| PathError::Reference {
            path: r,
            transient: e.is_transient(),
        })?;
    }

    // 3. The signed narinfo.
    let references_full: Vec<String> = info.references.iter().map(|r| sd.display(r)).collect();
    let fingerprint = signing::fingerprint(&full, &info.nar_hash, info.nar_size, &references_full);
    let mut sigs = info.sigs.clone();
    for key in &ctx.opts.keys {
        let sig = key.sign(&fingerprint);
        if !sigs.contains(&sig) {
            sigs.push(sig);
        }
    }
    let narinfo = NarInfo {
        store_path: full,
        url: nar_key,
        compression: ctx.opts.compress.compression.name().to_owned(),
        file_hash: Some(staged_meta.0),
        file_size: Some(staged_meta.1),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info
            .references
            .iter()
            .map(|r| r.base_name().to_owned())
            .collect(),
        deriver: info.deriver.as_ref().map(|d| d.base_name().to_owned()),
        sigs,
        ca: info.ca.clone(),
        unknown: Vec::new(),
    };
    let refs: Vec<String> = info
        .references
        .iter()
        .filter(|r| **r != info.path)
        .map(|r| r.hash_part().to_owned())
        .collect();
    ctx.guard
        .before_narinfo(
            info.path.hash_part(),
            &refs,
            &narinfo.url,
            nar_at,
            &narinfo.store_path,
        )
        .await?;
    let mode = if ctx.opts.force {
        PutMode::Overwrite
    } else {
        PutMode::Create
    };
    let text = narinfo.render();
    let bytes = text.len() as u64;
    let put = Put {
        key: narinfo_key(&info.path),
        body: Body::Bytes(text.into()),
        opts: PutOptions {
            mode,
            content_type: "text/x-nix-narinfo",
        },
    };
    let put = match &ctx.batcher {
        Some(b) => b.put(put, bytes).await,
        None => ctx.backend.put(&put.key, put.body, put.opts).await,
    };
    match put {
        Ok(()) => {
            (ctx.events)(&Event::Published {
                path: info.path.clone(),
                nar_size: info.nar_size,
                file_size: staged_meta.1,
                upload,
            });
            Ok(Outcome::Published {
                file_size: staged_meta.1,
            })
        }
        Err(e) if e.kind == ErrorKind::AlreadyExists => {
            debug!("narinfo already published by another writer");
            (ctx.events)(&Event::AlreadyPublished {
                path: info.path.clone(),
                nar_size: info.nar_size,
            });
            Ok(Outcome::Raced)
        }
        Err(e) => Err(e.into()),
    }
}

/// The size of an in-memory object.
fn put_len(put: &Put) -> u64 {
    match &put.body {
        Body::Bytes(b) => b.len() as u64,
        Body::File(_) => 0,
    }
}
