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
//!    wins and the second does not rewrite it. `force` overwrites. NARs (named by their
//!    FileHash) are created if absent too where the backend does that in one request
//!    ([`Backend::creates_in_one_request`]), and overwritten elsewhere.
//! 6. Beside a garbage collection ([`guard`]): each pass reads `nixpush/gc-pending` before it
//!    looks at what the cache has, announces the present paths it relies on and its roots,
//!    and holds back a write that touches what a gc may be deleting.

mod batch;
pub mod filter;
pub mod guard;
pub mod logs;
mod path;
pub mod pipeline;
pub mod plan;
pub mod presence;
pub mod realisations;
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
    /// Paths to leave out, with their referrers (see [`filter`]).
    pub filter: filter::Filter,
    /// Publish only the named paths, not their closures: each needs its references in the
    /// cache already (or among the named paths), or it is not published.
    pub no_closure: bool,
}

/// What happened, for progress displays.
#[derive(Debug, Clone)]
pub enum Event {
    Planned {
        closure: usize,
        present: usize,
        upstream: usize,
        /// Left out by the filters (see [`filter`]).
        excluded: usize,
        to_push: usize,
        nar_bytes: u64,
    },
    /// A path's NAR began: it got a compression slot (progress shows the paths in flight).
    Started { path: StorePath, nar_size: u64 },
    Published {
        path: StorePath,
        nar_size: u64,
        file_size: u64,
        /// How long its NAR took to upload, from the first byte handed to the backend to
        /// durable (in a batch: until the batch was).
        upload: std::time::Duration,
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
    /// Realisations of content-addressed derivations published (see [`realisations`]).
    pub realisations: usize,
    /// Build logs and realisations that could not be published, each with why (the paths
    /// are published).
    pub warnings: Vec<String>,
    /// Paths left out by the filter, each with why, references first.
    pub excluded: Vec<(StorePath, filter::Exclusion)>,
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
    #[error(transparent)]
    Gc(#[from] guard::GuardError),
    #[error("not published because its reference {path} failed")]
    Reference { path: StorePath, transient: bool },
    #[error(
        "not published: it refers to {reference}, which the cache lacks, and --no-closure \
         leaves it out; push without --no-closure, or push {reference} first"
    )]
    ReferenceAbsent { reference: String },
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
            PathError::Gc(guard::GuardError::Backend(e)) => is_transient_backend(e),
            PathError::Gc(guard::GuardError::Collected { .. }) => true,
            PathError::Reference { transient, .. } => *transient,
            PathError::ReferenceAbsent { .. } => false,
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
        // Beside a garbage collection (see `guard`): what it has marked, read before we look
        // at what the cache has.
        let guard = guard::Guard::start(self.backend.clone())
            .await
            .map_err(|e| self.backend_err(e))?;
        let root_hashes: HashSet<String> = roots.iter().map(|p| p.hash_part().to_owned()).collect();
        let mut unmet = Vec::new();
        let walk = async {
            if self.opts.no_closure {
                self.named_only(roots, &mut unmet).await
            } else if self.opts.force {
                Ok((store::closure(&*self.store, roots).await?, HashSet::new()))
            } else {
                self.missing_closure(roots).await
            }
        };
        let (walked, announced) = tokio::join!(walk, guard.announce(root_hashes.clone()));
        announced.map_err(|e| self.backend_err(e))?;
        let (closure, present) = walked?;
        let relied: HashSet<String> = present.iter().map(|p| p.hash_part().to_owned()).collect();
        let beyond_roots: HashSet<String> = relied.difference(&root_hashes).cloned().collect();
        if !beyond_roots.is_empty() {
            guard
                .announce(beyond_roots)
                .await
                .map_err(|e| self.backend_err(e))?;
        }
        guard.set_relied(relied);
        let poller = AbortOnDrop(guard.poll());
        let present = present.len();
        let mut summary = Summary {
            closure: closure.len() + present + unmet.len(),
            present,
            failed: unmet,
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
        let mut to_push: BTreeMap<StorePath, Arc<PathInfo>> = closure
            .into_iter()
            .filter(|(p, _)| !upstream.contains(p))
            .collect();
        summary.excluded = self.opts.filter.apply(&mut to_push);
        events(&Event::Planned {
            closure: summary.closure,
            present: summary.present,
            upstream: summary.upstream,
            excluded: summary.excluded.len(),
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
        let content_addressed: Vec<Arc<PathInfo>> = to_push
            .values()
            .filter(|i| i.ca.is_some() && i.deriver.is_some())
            .cloned()
            .collect();
        // A path counts as published only once its narinfo is durable (every put and batch
        // returns durable), so the caller may forget the request next (the daemon removes its
        // queue entry).
        let results = self.publish_all(to_push, events, guard).await;
        drop(poller);
        let built: std::collections::BTreeSet<StorePath> = results
            .iter()
            .filter(|(_, _, r)| r.is_ok())
            .filter_map(|(p, _, _)| derivers.get(p).cloned())
            .collect();
        if !built.is_empty() {
            let sd = self.store.store_dir().clone();
            let (n, failed) = logs::publish(&*self.backend, built, |d| sd.display(d)).await;
            summary.logs = n;
            summary.warnings = failed.iter().map(ToString::to_string).collect();
        }
        if !content_addressed.is_empty() {
            let ok: HashSet<&StorePath> = results
                .iter()
                .filter(|(_, _, r)| r.is_ok())
                .map(|(p, _, _)| p)
                .collect();
            let landed: Vec<Arc<PathInfo>> = content_addressed
                .into_iter()
                .filter(|i| ok.contains(&i.path))
                .collect();
            let (n, failed) =
                realisations::publish(&*self.store, &*self.backend, &self.opts.keys, &landed).await;
            summary.realisations = n;
            summary.warnings.extend(failed);
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

    /// The part of the closure of `roots` that the cache lacks, with the paths found present
    /// on the way (what the new narinfos will rely on). The walk goes down from the roots, level by level, and stops at
    /// every path the cache has: a narinfo is only ever written after the narinfos of all its
    /// references (rule 3), so a present path's closure is present too. A no-op push then
    /// costs one presence check of its roots, and a push of new paths over a large closure
    /// costs in proportion to what is new, not to the closure (`force` walks it all).
    async fn missing_closure(
        &self,
        roots: &[StorePath],
    ) -> Result<(BTreeMap<StorePath, Arc<PathInfo>>, HashSet<StorePath>), PushError> {
        let mut seen: HashSet<StorePath> = roots.iter().cloned().collect();
        let mut frontier: Vec<StorePath> = seen.iter().cloned().collect();
        let mut missing: BTreeMap<StorePath, Arc<PathInfo>> = BTreeMap::new();
        let mut present = HashSet::new();
        while !frontier.is_empty() {
            let here = self.present(&frontier).await?;
            let absent: Vec<StorePath> =
                frontier.into_iter().filter(|p| !here.contains(p)).collect();
            present.extend(here);
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

    /// `--no-closure`: the named paths the cache lacks (all of them with `force`), without
    /// their closures, and the paths found present that they rely on. A path whose reference
    /// is neither in the cache nor named cannot be published (rule 3): it goes to `unmet`, and
    /// so does a named path that refers to it.
    async fn named_only(
        &self,
        roots: &[StorePath],
        unmet: &mut Vec<Failed>,
    ) -> Result<(BTreeMap<StorePath, Arc<PathInfo>>, HashSet<StorePath>), PushError> {
        let here = if self.opts.force {
            HashSet::new()
        } else {
            self.present(roots).await?
        };
        let absent: Vec<StorePath> = roots
            .iter()
            .filter(|p| !here.contains(*p))
            .cloned()
            .collect();
        let mut named: BTreeMap<StorePath, Arc<PathInfo>> =
            store::valid_path_infos(&*self.store, &absent)
                .await?
                .into_iter()
                .map(|i| (i.path.clone(), i))
                .collect();
        let outside: Vec<StorePath> = named
            .values()
            .flat_map(|i| i.references.iter())
            .filter(|r| !named.contains_key(*r))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let cached = self.present(&outside).await?;
        let sd = self.store.store_dir();
        let mut failed: HashMap<StorePath, Arc<PathError>> = HashMap::new();
        for path in topological(&named) {
            let info = &named[&path];
            let error = info.references.iter().find_map(|r| {
                if failed.contains_key(r) {
                    Some(PathError::Reference {
                        path: r.clone(),
                        transient: false,
                    })
                } else if !named.contains_key(r) && !cached.contains(r) {
                    Some(PathError::ReferenceAbsent {
                        reference: sd.display(r),
                    })
                } else {
                    None
                }
            });
            if let Some(e) = error {
                failed.insert(path, Arc::new(e));
            }
        }
        for (path, error) in failed {
            named.remove(&path);
            unmet.push(Failed { path, error });
        }
        unmet.sort_by(|a, b| a.path.cmp(&b.path));
        // What the cache has that the named paths rely on (for a garbage collection's sake).
        Ok((named, here.into_iter().chain(cached).collect()))
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
        guard: Arc<guard::Guard>,
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
            guard,
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

/// Aborts its task when dropped (the guard's poller ends with the pass, however it ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn narinfo_key(path: &StorePath) -> String {
    format!("{}.narinfo", path.hash_part())
}
