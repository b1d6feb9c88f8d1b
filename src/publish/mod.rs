//! Publishing a set of store paths and their closure to a cache: which paths, in which order,
//! how many at once. Shared by `nixpush push` and (later) the daemon; it knows nothing of where
//! the request came from.
//!
//! The rules, as Nix's own `BinaryCacheStore` keeps them, so that a reader never sees a narinfo
//! whose NAR or references are missing:
//! 1. `nix-cache-info` exists (written if absent), and its StoreDir is ours.
//! 2. Paths whose narinfo is already in the cache are skipped, decided for the whole closure
//!    before any upload (unless forced).
//! 3. A path's NAR is uploaded before its narinfo, and its narinfo only after the narinfos of all
//!    its references. NARs of many paths are compressed and uploaded at once (bounded by
//!    `jobs`: one for the largest NAR not yet started, the others references-first; a slot
//!    is held while compressing, not while uploading); a narinfo waits only for its own
//!    references. Each object is durable before anything that depends on it is written:
//!    where the backend makes small objects durable in batches (a local directory), NARs and
//!    ready narinfos are gathered into batches ([`batch`]); a push reports a path published
//!    only once its narinfo is durable.
//! 4. The NarHash and NarSize we computed must equal what Nix's database says, or the path is
//!    refused (the store is corrupt) and nothing of it becomes visible.
//! 5. Narinfos are created only if absent: when two builders push the same path, the first one
//!    wins and the second does not rewrite it. `force` overwrites.

mod batch;
pub mod logs;
mod path;
pub mod pipeline;
pub mod plan;
pub mod presence;
mod schedule;

use path::{Ctx, Outcome, UPLOADS_PER_JOB, publish_one};
use schedule::{hand_out_slots, topological};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt as _, Shared};
use nixpush_backends::{
    Backend, BackendError, BackendExt as _, Body, ErrorKind, Put, PutMode, PutOptions,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::{Instrument as _, debug, info_span};

use crate::formats::signing::{self, SecretKey};
use crate::formats::{NarInfo, StorePath, cache_info, cache_info::CacheInfo, nar};
use crate::store::{self, PathInfo, Store, StoreError};
use pipeline::CompressOptions;

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub compress: CompressOptions,
    /// Paths compressed and uploaded at once.
    pub jobs: usize,
    /// Re-upload and rewrite narinfos that already exist.
    pub force: bool,
    /// Keys to sign with; empty publishes unsigned narinfos.
    pub keys: Vec<SecretKey>,
    /// Skip paths that carry a signature by one of these key names (they are available upstream).
    pub skip_signed_by: Vec<String>,
    /// Also publish the build logs of the derivations that produced the published paths
    /// (see [`logs`]).
    pub logs: bool,
    /// Also write each NAR's listing, `<hash>.ls`, as Nix does with `?write-nar-listing=true`
    /// (see [`crate::formats::nar::Lister`]).
    pub nar_listing: bool,
}

/// What happened, for progress displays.
#[derive(Debug, Clone)]
pub enum Event {
    Planned {
        closure: usize,
        present: usize,
        upstream: usize,
        to_push: usize,
        nar_bytes: u64,
    },
    Published {
        path: StorePath,
        nar_size: u64,
        file_size: u64,
    },
    /// Another writer published the narinfo first; ours was not written.
    AlreadyPublished { path: StorePath, nar_size: u64 },
    Failed {
        path: StorePath,
        error: Arc<PathError>,
    },
}

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub closure: usize,
    pub present: usize,
    pub upstream: usize,
    pub published: usize,
    pub raced: usize,
    pub nar_bytes: u64,
    pub file_bytes: u64,
    /// Paths that failed, each with why.
    pub failed: Vec<Failed>,
    /// Build logs published (with [`PushOptions::logs`]).
    pub logs: usize,
    /// Build logs that could not be published, each with why (the paths are published).
    pub log_failures: Vec<String>,
}

/// A path that could not be published, and why. The error is shared with the [`Event::Failed`]
/// that reported it and with the paths that were held back because they refer to it.
#[derive(Debug, Clone)]
pub struct Failed {
    pub path: StorePath,
    pub error: Arc<PathError>,
}

impl Failed {
    /// Whether retrying later may succeed (see [`PathError::is_transient`]).
    pub fn is_transient(&self) -> bool {
        self.error.is_transient()
    }
}

/// Why a push could not start or finish. Each message is whole by itself: a cause is part of
/// it and not also the `source()`, so a report of the chain of causes shows it once.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cache {cache}: {error}")]
    Backend { cache: String, error: BackendError },
    #[error("cache {cache} has an unreadable nix-cache-info: {message}")]
    CacheInfo { cache: String, message: String },
    #[error("cache {cache} is for store {theirs:?}, but this store is {ours:?}")]
    StoreDirMismatch {
        cache: String,
        theirs: String,
        ours: String,
    },
}

/// Why one path could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(
        "store corruption: the NAR of {path} hashes to {ours} ({our_size} bytes), \
         but Nix's database says {theirs} ({their_size} bytes); run `nix-store --verify --check-contents`"
    )]
    HashMismatch {
        path: String,
        ours: String,
        our_size: u64,
        theirs: String,
        their_size: u64,
    },
    #[error("not published because its reference {path} failed")]
    Reference { path: StorePath, transient: bool },
    #[error("internal error: {0}")]
    Internal(String),
}

impl PushError {
    /// Whether retrying later may succeed: the cache or Nix was unreachable, not the request
    /// wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            PushError::Store(e) => e.is_transient(),
            PushError::Backend { error, .. } => is_transient_backend(error),
            PushError::CacheInfo { .. } | PushError::StoreDirMismatch { .. } => false,
        }
    }
}

impl PathError {
    /// Whether retrying later may succeed. A path whose NAR cannot be read or does not match
    /// Nix's database will not get better by waiting.
    pub fn is_transient(&self) -> bool {
        match self {
            PathError::Pipeline(e) => match e {
                // The path vanished (garbage-collected) or changed under us: final.
                pipeline::PipelineError::Dump(nar::DumpError::Io { error, .. }) => !matches!(
                    error.kind(),
                    std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::InvalidData
                        | std::io::ErrorKind::UnexpectedEof
                ),
                pipeline::PipelineError::Dump(nar::DumpError::Sink(_))
                | pipeline::PipelineError::Staging { .. }
                | pipeline::PipelineError::StagingWrite { .. }
                | pipeline::PipelineError::Stream(_) => true,
                pipeline::PipelineError::Dump(nar::DumpError::UnsupportedType(_))
                | pipeline::PipelineError::Listing(_)
                | pipeline::PipelineError::Level { .. } => false,
            },
            PathError::Store(e) => e.is_transient(),
            PathError::HashMismatch { .. } => false,
            PathError::Backend(e) => is_transient_backend(e),
            PathError::Reference { transient, .. } => *transient,
            PathError::Internal(_) => true,
        }
    }
}

/// Only a request the backend refused for what it is (a bad key, a bad setting) is final;
/// everything else (outages, throttling, permissions being fixed, full disks) is retried.
fn is_transient_backend(e: &BackendError) -> bool {
    !matches!(e.kind, ErrorKind::Config)
}

pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

pub struct Pusher {
    store: Arc<dyn Store>,
    backend: Arc<dyn Backend>,
    opts: PushOptions,
}

type PathFuture = Shared<BoxFuture<'static, Result<Outcome, Arc<PathError>>>>;

impl Pusher {
    pub fn new(store: Arc<dyn Store>, backend: Arc<dyn Backend>, opts: PushOptions) -> Self {
        Self {
            store,
            backend,
            opts,
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub fn backend_description(&self) -> String {
        self.backend.describe()
    }

    fn backend_err(&self, error: BackendError) -> PushError {
        PushError::Backend {
            cache: self.backend.describe(),
            error,
        }
    }

    /// Write `nix-cache-info` if absent; refuse a cache for another store directory.
    pub async fn ensure_cache_info(&self) -> Result<(), PushError> {
        let ours = self.store.store_dir().as_str();
        for _ in 0..2 {
            match self
                .backend
                .get_optional(cache_info::FILE_NAME, 64 << 10)
                .await
                .map_err(|e| self.backend_err(e))?
            {
                Some(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    let info = CacheInfo::parse(&text).map_err(|e| PushError::CacheInfo {
                        cache: self.backend.describe(),
                        message: e.to_string(),
                    })?;
                    if info.store_dir != ours {
                        return Err(PushError::StoreDirMismatch {
                            cache: self.backend.describe(),
                            theirs: info.store_dir,
                            ours: ours.to_owned(),
                        });
                    }
                    return Ok(());
                }
                None => {
                    let body = Body::Bytes(Bytes::from(CacheInfo::new(ours).render()));
                    let opts = PutOptions {
                        mode: PutMode::Create,
                        content_type: "text/x-nix-cache-info",
                    };
                    match self.backend.put(cache_info::FILE_NAME, body, opts).await {
                        Ok(()) => return Ok(()),
                        // Someone else wrote it meanwhile: read and check theirs.
                        Err(e) if e.kind == ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(self.backend_err(e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// The paths that `roots` stand for (see [`plan`]).
    pub async fn resolve(&self, roots: &[plan::Root]) -> Result<Vec<StorePath>, PushError> {
        Ok(plan::resolve(&*self.store, roots).await?)
    }

    /// Publish the closure of `roots` (valid store paths; see [`Pusher::resolve`]).
    pub async fn push(&self, roots: &[StorePath], events: EventSink) -> Result<Summary, PushError> {
        self.ensure_cache_info().await?;
        let (closure, present) = if self.opts.force {
            (store::closure(&*self.store, roots).await?, 0)
        } else {
            self.missing_closure(roots).await?
        };
        let mut summary = Summary {
            closure: closure.len() + present,
            present,
            ..Summary::default()
        };

        let upstream: HashSet<StorePath> = closure
            .values()
            .filter(|i| {
                i.sigs.iter().any(|s| {
                    signing::signature_key_name(s)
                        .is_some_and(|n| self.opts.skip_signed_by.iter().any(|k| k == n))
                })
            })
            .map(|i| i.path.clone())
            .collect();
        summary.upstream = upstream.len();
        let to_push: BTreeMap<StorePath, Arc<PathInfo>> = closure
            .into_iter()
            .filter(|(p, _)| !upstream.contains(p))
            .collect();
        events(&Event::Planned {
            closure: summary.closure,
            present: summary.present,
            upstream: summary.upstream,
            to_push: to_push.len(),
            nar_bytes: to_push.values().map(|i| i.nar_size).sum(),
        });

        let derivers: HashMap<StorePath, StorePath> = if self.opts.logs {
            to_push
                .values()
                .filter_map(|i| Some((i.path.clone(), i.deriver.clone()?)))
                .collect()
        } else {
            HashMap::new()
        };
        // A path counts as published only once its narinfo is durable (every put and batch
        // returns durable), so the caller may forget the request next (the daemon removes its
        // queue entry).
        let results = self.publish_all(to_push, events).await;
        let built: std::collections::BTreeSet<StorePath> = results
            .iter()
            .filter(|(_, _, r)| r.is_ok())
            .filter_map(|(p, _, _)| derivers.get(p).cloned())
            .collect();
        if !built.is_empty() {
            let sd = self.store.store_dir().clone();
            let (n, failed) = logs::publish(&*self.backend, built, |d| sd.display(d)).await;
            summary.logs = n;
            summary.log_failures = failed.iter().map(ToString::to_string).collect();
        }
        for (path, nar_size, outcome) in results {
            match outcome {
                Ok(Outcome::Published { file_size }) => {
                    summary.published += 1;
                    summary.nar_bytes += nar_size;
                    summary.file_bytes += file_size;
                }
                Ok(Outcome::Raced) => summary.raced += 1,
                Err(error) => summary.failed.push(Failed { path, error }),
            }
        }
        Ok(summary)
    }

    /// The part of the closure of `roots` that the cache lacks, with the number of paths found
    /// present on the way. The walk goes down from the roots, level by level, and stops at
    /// every path the cache has: a narinfo is only ever written after the narinfos of all its
    /// references (rule 3), so a present path's closure is present too. A no-op push then
    /// costs one presence check of its roots, and a push of new paths over a large closure
    /// costs in proportion to what is new, not to the closure (`force` walks it all).
    async fn missing_closure(
        &self,
        roots: &[StorePath],
    ) -> Result<(BTreeMap<StorePath, Arc<PathInfo>>, usize), PushError> {
        let mut seen: HashSet<StorePath> = roots.iter().cloned().collect();
        let mut frontier: Vec<StorePath> = seen.iter().cloned().collect();
        let mut missing: BTreeMap<StorePath, Arc<PathInfo>> = BTreeMap::new();
        let mut present = 0;
        while !frontier.is_empty() {
            let here = self.present(&frontier).await?;
            present += here.len();
            let absent: Vec<StorePath> =
                frontier.into_iter().filter(|p| !here.contains(p)).collect();
            let infos = store::valid_path_infos(&*self.store, &absent).await?;
            frontier = Vec::new();
            for info in infos {
                for r in &info.references {
                    if seen.insert(r.clone()) {
                        frontier.push(r.clone());
                    }
                }
                missing.insert(info.path.clone(), info);
            }
        }
        Ok((missing, present))
    }

    /// Which of `paths` already have a narinfo in the cache (see [`presence`] for how).
    async fn present(&self, paths: &[StorePath]) -> Result<HashSet<StorePath>, PushError> {
        let by_key: HashMap<String, &StorePath> =
            paths.iter().map(|p| (narinfo_key(p), p)).collect();
        let found = presence::present(&*self.backend, by_key.keys().cloned())
            .await
            .map_err(|e| self.backend_err(e))?;
        Ok(found
            .present
            .iter()
            .filter_map(|k| by_key.get(k).map(|p| (*p).clone()))
            .collect())
    }

    async fn publish_all(
        &self,
        to_push: BTreeMap<StorePath, Arc<PathInfo>>,
        events: EventSink,
    ) -> Vec<(StorePath, u64, Result<Outcome, Arc<PathError>>)> {
        let order = topological(&to_push);
        let spawn_order = order.clone();
        let batcher = self
            .backend
            .durable_in_batches()
            .then(|| batch::Batcher::start(self.backend.clone()));
        let ctx = Arc::new(Ctx {
            store: self.store.clone(),
            backend: self.backend.clone(),
            batcher,
            opts: self.opts.clone(),
            contexts: Default::default(),
            uploads: Semaphore::new(self.opts.jobs.max(1) * UPLOADS_PER_JOB),
            batched: Semaphore::new(batch::STAGED_MIB_MAX),
            events,
        });
        // Futures are built references-first, so every dependency's future exists already.
        let mut futs: HashMap<StorePath, PathFuture> = HashMap::new();
        let mut slot_senders = HashMap::with_capacity(order.len());
        let mut handles = Vec::with_capacity(order.len());
        for path in spawn_order {
            let info = to_push[&path].clone();
            let deps: Vec<(StorePath, PathFuture)> = info
                .references
                .iter()
                .filter(|r| **r != info.path)
                .filter_map(|r| futs.get(r).map(|f| (r.clone(), f.clone())))
                .collect();
            let (slot_tx, slot) = oneshot::channel();
            slot_senders.insert(path.clone(), slot_tx);
            let ctx = ctx.clone();
            let span = info_span!("path", path = %info.path);
            let nar_size = info.nar_size;
            let fut = async move {
                publish_one(&ctx, &info, slot, deps).await.map_err(|e| {
                    let error = Arc::new(e);
                    (ctx.events)(&Event::Failed {
                        path: info.path.clone(),
                        error: error.clone(),
                    });
                    error
                })
            }
            .instrument(span)
            .boxed()
            .shared();
            handles.push((path.clone(), nar_size, tokio::spawn(fut.clone())));
            futs.insert(path, fut);
        }
        tokio::spawn(hand_out_slots(
            &to_push,
            order,
            slot_senders,
            self.opts.jobs.max(1),
        ));
        let mut results = Vec::with_capacity(handles.len());
        for (path, nar_size, handle) in handles {
            let r = handle
                .await
                .unwrap_or_else(|join| Err(Arc::new(PathError::Internal(join.to_string()))));
            results.push((path, nar_size, r));
        }
        results
    }
}

pub fn narinfo_key(path: &StorePath) -> String {
    format!("{}.narinfo", path.hash_part())
}
