//! `nixpush gc`: keep the roots and their closures, delete the rest, beside live pushers and
//! without a lock server.
//!
//! # What is kept
//! The **roots**: the paths named with `--keep` or in a `--keep-file`; with `--keep-since W`,
//! every path whose narinfo was written within `W`, or that a pusher announced within `W`
//! (a push announces the paths it was asked for and the present ones it relied on, see
//! [`crate::publish::guard`]); and always everything **younger than the grace period** G:
//! narinfos, NARs and announcements written less than G ago (a push may be relying on them
//! right now). Narinfos that do not parse are kept (what they refer to is unknown; `verify
//! --repair` removes them). The closure of the roots over the narinfos' `References` is kept.
//!
//! Everything else goes: narinfos (referrers before their references), then NARs that no
//! remaining narinfo names, then the `<hash>.ls` listings of deleted paths, the build logs
//! `log/<drv>` of deleted paths' derivers that no remaining path shares, realisations
//! (`realisations/*.doi`) whose `outPath` was deleted, and announcements older than the
//! `--keep-since` window (30 days without one; never younger than 2 G).
//!
//! # Safe beside pushers
//! **The claim:** at every moment, every narinfo in the cache has its NAR and the narinfos of
//! all its references, as long as the pushers follow [`crate::publish::guard`] and these
//! assumptions hold:
//! - **A1 (clocks):** any two clocks involved (gc, pushers, the store's, which stamps
//!   objects) differ by less than ε (`--max-skew`, default 60 s), and a single put or delete
//!   request completes within ε of when it was decided on.
//! - **A2 (listings):** a listing shows every object whose put returned before the listing
//!   began and none whose delete returned before it began (S3, GCS and SeaweedFS are strongly
//!   consistent for this; a local directory and SFTP trivially).
//! - **A3 (one gc):** one gc runs at a time per cache (it refuses to start while
//!   `nixpush/gc-pending` is active; two gcs started in the same second may both start).
//! - **A4 (grace):** G ≥ 2 × [`POLL_EVERY`] + 3ε (checked).
//!
//! **The run** (times by the gc's clock):
//! 1. *Mark.* m0 = now; list the cache (one listing), read every narinfo and every
//!    announcement younger than the window or G. Candidates C = narinfos outside the kept
//!    closure; candidate NARs Cn = NARs written before m0 − G that no kept narinfo names.
//! 2. *Pending.* Write `nixpush/gc-pending` with C, Cn, m0, T = now + G (the sweep time), E =
//!    T + S (`--sweep-bound`, when deleting stops) and ε; refuse to go on if the put took so
//!    long that less than 2 × [`POLL_EVERY`] + 2ε is left before T.
//! 3. *Wait* until T.
//! 4. *Decide.* Check `gc-pending` is still ours. List again; read every narinfo and
//!    announcement written since m0 − ε. The new roots: every narinfo that is not in C (new
//!    ones included), every narinfo of C written since m0 − ε (rewritten), every path
//!    announced since m0 − ε. D = C minus the closure of those (over the current
//!    references); Dn = Cn minus NARs a narinfo outside D names, minus NARs written since
//!    m0 − ε.
//! 5. *Sweep* until E − ε: narinfos of D level by level, a narinfo only after every narinfo
//!    of D that refers to it is gone (batched, each batch retried; a failed one stays, and
//!    with it everything it refers to); then the NARs of Dn no remaining narinfo names; then
//!    the rest. Past E − ε nothing more is deleted, and the report says what was left.
//!
//! **Why a reader never sees a broken narinfo.** Deleting D's narinfos referrers-first keeps
//! the cache whole at each step as long as no narinfo outside D refers into D or names a NAR
//! of Dn while the sweep runs. Such a narinfo Z would be one existing at T (step 4's listing)
//! or one written after it:
//! - *Z existed at T (A2: its put returned before the listing).* Then Z is either outside C,
//!   so a root of step 4, and everything it refers to and its NAR are kept; or in C and
//!   unchanged since before m0 − ε, so in D if what it refers to is, deleted before it.
//! - *Z written after T.* Its pusher checks before writing (guard step 4), having read
//!   `gc-pending` less than 2 × [`POLL_EVERY`] ago. If that read was before the pending
//!   object existed, the read was before m1 ≤ T − 2 × POLL − 2ε (step 2), so the write
//!   was decided before T − 2ε and (A1) landed before T: the first case. If the pusher knew
//!   of this gc: it writes before T − 2ε only (the first case again), or later only if every
//!   candidate it refers to was announced (put returned) before T − 2ε, so after m0 and
//!   before T, so step 4 saw it (A2) and kept it; and its NAR, if a candidate, was uploaded
//!   after m0 + ε and before T − 2ε, so step 4 saw it written since m0 − ε and kept it; and
//!   Z itself is no candidate. Otherwise the pusher waits until E + ε, when this gc has
//!   stopped deleting, and checks that the candidates it refers to and its NAR are still
//!   there. A NAR that is a candidate is not uploaded between T − 2ε and E + ε (guard step
//!   5): uploading it then might be undone by the sweep.
//! - *The NAR uploaded just before its narinfo:* a NAR put after m0 − G is not in Cn; one in
//!   Cn that a pusher uploads again is covered above.
//!
//! A gc that died leaves `gc-pending`; it stops mattering at E + ε, and the next gc replaces
//! it then. Pushers pay one `GET` of it and one announcement `PUT` a pass, and one `GET` a
//! second while a pass runs (see the guard).
//!
//! # Cost
//! Two listings (1000 objects a request on S3 and GCS), one `GET` per narinfo at the mark and
//! per narinfo written during the wait, one `GET` per announcement read; deletions in batches
//! of up to 1000 (S3 DeleteObjects; a local directory flushes each directory once a batch),
//! one batch per level of the deleted part of the reference graph.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use nixpush_backends::{
    Backend, BackendError, BackendExt as _, Body, ErrorKind, ObjectInfo, PutMode, PutOptions,
};

use super::NARINFO_CONCURRENCY;
use crate::formats::{NarInfo, StorePath};
use crate::publish::guard::{
    self, ANNOUNCE_PREFIX, Announcement, PENDING_KEY, POLL_EVERY, Pending,
};

/// The largest narinfo, announcement or realisation read.
const SMALL_OBJECT_LIMIT: usize = 64 << 20;
/// Keys per delete batch (S3's DeleteObjects maximum).
const DELETE_BATCH: usize = 1000;
/// Attempts per delete.
const DELETE_ATTEMPTS: u32 = 3;
/// How long announcements are kept without `--keep-since`.
pub const DEFAULT_ANNOUNCE_RETENTION: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Roots named (`--keep`, `--keep-file`).
    pub keep: Vec<StorePath>,
    /// Keep what was published or announced this recently.
    pub keep_since: Option<Duration>,
    /// G: what is younger is kept; also the wait between mark and sweep.
    pub grace: Duration,
    /// ε.
    pub skew: Duration,
    /// S: how long the sweep may take.
    pub sweep_bound: Duration,
    /// Report what would go, delete nothing, write nothing.
    pub dry_run: bool,
}

impl GcOptions {
    /// The least grace period for `skew` (assumption A4).
    pub fn min_grace(skew: Duration) -> Duration {
        2 * POLL_EVERY + 3 * skew
    }
}

/// Why gc could not run (or stopped before the sweep: then it deleted nothing).
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("cache {cache}: {error}")]
    Backend { cache: String, error: BackendError },
    #[error(
        "cache {cache} cannot be listed ({why}); gc needs a listing: run it against the store \
         behind the cache (file://, s3://, gs:// or sftp://)"
    )]
    Unlistable { cache: String, why: String },
    #[error(
        "another `nixpush gc` is working on cache {cache}: {PENDING_KEY} says it sweeps until \
         {until}; run gc after that, or, if no gc is running, remove {PENDING_KEY}"
    )]
    Busy { cache: String, until: String },
    #[error(
        "--grace {grace} is too short for --max-skew {skew}: it must be at least {least} \
         (twice the pushers' {poll}s polling and three times the skew)"
    )]
    GraceTooShort {
        grace: String,
        skew: String,
        least: String,
        poll: u64,
    },
    #[error(
        "--sweep-bound {bound} is too short for --max-skew {skew}: deleting stops a skew before \
         the bound, so it must be at least {least}"
    )]
    SweepTooShort {
        bound: String,
        skew: String,
        least: String,
    },
    #[error(
        "cache {cache}: writing {PENDING_KEY} took {took} and left too little of the grace \
         period before the sweep; nothing was deleted: try again with a longer --grace"
    )]
    SlowMark { cache: String, took: String },
    #[error(
        "cache {cache}: {PENDING_KEY} was replaced by another gc while this one waited; this \
         gc deleted nothing (run one gc at a time)"
    )]
    Replaced { cache: String },
}

/// What gc does, as it happens (for a progress display).
#[derive(Debug, Clone)]
pub enum Event {
    Listed { objects: usize, narinfos: usize },
    Marked { narinfos: usize, nars: usize },
    Waiting { until: SystemTime },
    Deleted { key: String, size: u64 },
    Failed { key: String, error: String },
}

pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// A delete that failed for good.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedDelete {
    pub key: String,
    pub error: String,
}

/// What gc did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub cache: String,
    pub dry_run: bool,
    /// Narinfos in the cache when it was marked.
    pub narinfos: usize,
    /// Of which kept as roots, and kept in all (roots and their closures).
    pub roots: usize,
    pub kept: usize,
    /// Roots named with `--keep`/`--keep-file` that the cache does not have.
    pub roots_missing: Vec<String>,
    /// Narinfos that do not parse (kept).
    pub unparsable: Vec<String>,
    /// Candidates that became reachable (or were rewritten) while gc waited.
    pub rescued: usize,
    /// Keys deleted (or that would be), narinfos in deletion order.
    pub deleted_narinfos: Vec<String>,
    pub deleted_nars: Vec<String>,
    /// `.ls`, logs, realisations, old announcements.
    pub deleted_other: Vec<String>,
    pub bytes_freed: u64,
    pub failed: Vec<FailedDelete>,
    /// Deleting stopped at the sweep bound; `left` objects were not deleted.
    pub stopped_at_bound: bool,
    pub left: usize,
    pub secs: f64,
}

impl GcReport {
    /// Whether everything that was to go went.
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && !self.stopped_at_bound
    }
}

/// One narinfo as gc needs it.
#[derive(Debug, Clone)]
struct Node {
    /// Hash parts of its references (itself left out).
    refs: Vec<String>,
    nar: String,
    deriver: Option<String>,
}

/// The cache as one listing and the narinfos read from it.
#[derive(Default)]
struct View {
    objects: HashMap<String, ObjectInfo>,
    /// By hash part; `None`: it does not parse.
    narinfos: HashMap<String, Option<Node>>,
}

fn hash_of_key(key: &str) -> Option<&str> {
    key.strip_suffix(".narinfo").filter(|h| !h.contains('/'))
}

/// The hash part of a reference or path basename (`<hash>-<name>`).
fn hash_of_base(base: &str) -> &str {
    base.split_once('-').map_or(base, |(h, _)| h)
}

/// Run gc on `backend` (see the module doc).
pub async fn gc(
    backend: Arc<dyn Backend>,
    opts: &GcOptions,
    events: EventSink,
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let cache = backend.describe();
    let berr = |error: BackendError| GcError::Backend {
        cache: cache.clone(),
        error,
    };
    let least = GcOptions::min_grace(opts.skew);
    if opts.grace < least {
        return Err(GcError::GraceTooShort {
            grace: humantime::format_duration(opts.grace).to_string(),
            skew: humantime::format_duration(opts.skew).to_string(),
            least: humantime::format_duration(least).to_string(),
            poll: POLL_EVERY.as_secs(),
        });
    }
    if opts.sweep_bound < 2 * opts.skew {
        return Err(GcError::SweepTooShort {
            bound: humantime::format_duration(opts.sweep_bound).to_string(),
            skew: humantime::format_duration(opts.skew).to_string(),
            least: humantime::format_duration(2 * opts.skew).to_string(),
        });
    }
    if !opts.dry_run {
        if let Some(p) = guard::read_pending(&*backend).await.map_err(berr)? {
            if p.active(SystemTime::now()) {
                return Err(GcError::Busy {
                    cache,
                    until: humantime::format_rfc3339_seconds(p.sweep_end() + p.skew()).to_string(),
                });
            }
        }
    }

    // 1. Mark.
    let m0 = SystemTime::now();
    let mut view = View::default();
    refresh(&*backend, &mut view, None)
        .await
        .map_err(|e| listing_error(&cache, e))?;
    events(&Event::Listed {
        objects: view.objects.len(),
        narinfos: view.narinfos.len(),
    });
    let mut r = GcReport {
        cache: cache.clone(),
        dry_run: opts.dry_run,
        narinfos: view.narinfos.len(),
        ..GcReport::default()
    };
    r.unparsable = view
        .narinfos
        .iter()
        .filter(|(_, n)| n.is_none())
        .map(|(h, _)| format!("{h}.narinfo"))
        .collect();
    r.unparsable.sort();

    let young = m0.checked_sub(opts.grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let window_start = opts
        .keep_since
        .map(|w| m0.checked_sub(w).unwrap_or(SystemTime::UNIX_EPOCH));
    let mut roots: HashSet<String> = HashSet::new();
    for p in &opts.keep {
        if view.narinfos.contains_key(p.hash_part()) {
            roots.insert(p.hash_part().to_owned());
        } else {
            r.roots_missing.push(p.base_name().to_owned());
        }
    }
    let recent = window_start.map_or(young, |w| w.min(young));
    for (h, node) in &view.narinfos {
        let modified = view.objects[&format!("{h}.narinfo")].modified;
        if node.is_none() || modified > recent {
            roots.insert(h.clone());
        }
    }
    for h in announced(&*backend, &view, recent).await.map_err(berr)? {
        if view.narinfos.contains_key(&h) {
            roots.insert(h);
        }
    }
    r.roots = roots.len();
    let kept = closure(&view, roots);
    r.kept = kept.len();
    let candidates: BTreeSet<String> = view
        .narinfos
        .keys()
        .filter(|h| !kept.contains(*h))
        .cloned()
        .collect();
    let named_by_kept: HashSet<&str> = kept
        .iter()
        .filter_map(|h| view.narinfos.get(h)?.as_ref())
        .map(|n| n.nar.as_str())
        .collect();
    let candidate_nars: BTreeSet<String> = view
        .objects
        .values()
        .filter(|o| o.key.starts_with("nar/") && o.modified < young)
        .filter(|o| !named_by_kept.contains(o.key.as_str()))
        .map(|o| o.key.clone())
        .collect();
    events(&Event::Marked {
        narinfos: candidates.len(),
        nars: candidate_nars.len(),
    });

    if opts.dry_run {
        let plan = plan(&view, &candidates, &candidate_nars, m0, opts);
        r.bytes_freed = plan.all().map(|k| size_of(&view, k)).sum();
        r.deleted_narinfos = plan.narinfo_levels.into_iter().flatten().collect();
        r.deleted_nars = plan.nars;
        r.deleted_other = plan.other;
        r.secs = started.elapsed().as_secs_f64();
        return Ok(r);
    }

    // 2. Pending.
    let id = guard::announcement_key(m0)[ANNOUNCE_PREFIX.len()..].replace(".json", "");
    let put_started = SystemTime::now();
    let sweep_at = put_started + opts.grace;
    let pending = Pending {
        id: id.clone(),
        marked_at_ms: guard::ms(m0),
        sweep_at_ms: guard::ms(sweep_at),
        sweep_end_ms: guard::ms(sweep_at + opts.sweep_bound),
        skew_ms: u64::try_from(opts.skew.as_millis()).unwrap_or(u64::MAX),
        paths: candidates.iter().cloned().collect(),
        nars: candidate_nars.iter().cloned().collect(),
    };
    let body = serde_json::to_vec(&pending).expect("the pending object serialises");
    backend
        .put(
            PENDING_KEY,
            Body::Bytes(body.into()),
            PutOptions {
                mode: PutMode::Overwrite,
                content_type: "application/json",
            },
        )
        .await
        .map_err(berr)?;
    let now = SystemTime::now();
    if now + 2 * POLL_EVERY + 2 * opts.skew > sweep_at {
        let _ = backend.delete(PENDING_KEY).await;
        return Err(GcError::SlowMark {
            cache,
            took: humantime::format_duration(now.duration_since(put_started).unwrap_or_default())
                .to_string(),
        });
    }

    // 3. Wait.
    events(&Event::Waiting { until: sweep_at });
    if let Ok(d) = sweep_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }

    // 4. Decide.
    match guard::read_pending(&*backend).await.map_err(berr)? {
        Some(p) if p.id == id => {}
        _ => return Err(GcError::Replaced { cache }),
    }
    let since = m0.checked_sub(opts.skew).unwrap_or(SystemTime::UNIX_EPOCH);
    let marked: HashMap<String, SystemTime> = view
        .narinfos
        .keys()
        .map(|h| {
            let k = format!("{h}.narinfo");
            (h.clone(), view.objects[&k].modified)
        })
        .collect();
    refresh(&*backend, &mut view, Some(since))
        .await
        .map_err(berr)?;
    let mut roots2: HashSet<String> = HashSet::new();
    for (h, node) in &view.narinfos {
        let modified = view.objects[&format!("{h}.narinfo")].modified;
        let rewritten = modified > since || marked.get(h) != Some(&modified);
        if !candidates.contains(h) || rewritten || node.is_none() {
            roots2.insert(h.clone());
        }
    }
    for h in announced(&*backend, &view, since).await.map_err(berr)? {
        if view.narinfos.contains_key(&h) {
            roots2.insert(h);
        }
    }
    let kept2 = closure(&view, roots2);
    let doomed: BTreeSet<String> = candidates
        .iter()
        .filter(|h| view.narinfos.contains_key(*h) && !kept2.contains(*h))
        .cloned()
        .collect();
    r.rescued = candidates
        .iter()
        .filter(|h| view.narinfos.contains_key(*h) && kept2.contains(*h))
        .count();
    let named_outside: HashSet<&str> = view
        .narinfos
        .iter()
        .filter(|(h, _)| !doomed.contains(*h))
        .filter_map(|(_, n)| n.as_ref())
        .map(|n| n.nar.as_str())
        .collect();
    let doomed_nars: BTreeSet<String> = candidate_nars
        .iter()
        .filter(|k| {
            view.objects
                .get(*k)
                .is_some_and(|o| o.modified <= since && !named_outside.contains(k.as_str()))
        })
        .cloned()
        .collect();
    let plan = plan(&view, &doomed, &doomed_nars, m0, opts);

    // 5. Sweep.
    let stop_at = sweep_at + opts.sweep_bound - opts.skew;
    let mut sweep = Sweep {
        backend: &*backend,
        view: &view,
        stop_at,
        report: &mut r,
        events: &events,
    };
    let deleted = sweep.narinfos(&plan.narinfo_levels).await;
    // NARs and listings of narinfos that stayed (a failed delete) stay too.
    let stayed: HashSet<String> = doomed
        .iter()
        .filter(|h| !deleted.contains(*h))
        .cloned()
        .collect();
    let named_by_stayed: HashSet<&str> = stayed
        .iter()
        .filter_map(|h| view.narinfos.get(h)?.as_ref())
        .map(|n| n.nar.as_str())
        .collect();
    let nars: Vec<String> = plan
        .nars
        .iter()
        .filter(|k| !named_by_stayed.contains(k.as_str()))
        .cloned()
        .collect();
    sweep.batch(&nars, Kind::Nar).await;
    let other: Vec<String> = plan
        .other
        .iter()
        .filter(|k| k.strip_suffix(".ls").is_none_or(|h| !stayed.contains(h)))
        .cloned()
        .collect();
    sweep.batch(&other, Kind::Other).await;
    if r.stopped_at_bound {
        r.left = plan.all().count().saturating_sub(
            r.deleted_narinfos.len() + r.deleted_nars.len() + r.deleted_other.len(),
        );
    }
    if let Err(e) = backend.delete(PENDING_KEY).await {
        r.failed.push(FailedDelete {
            key: PENDING_KEY.to_owned(),
            error: e.to_string(),
        });
    }
    r.secs = started.elapsed().as_secs_f64();
    Ok(r)
}

fn listing_error(cache: &str, e: BackendError) -> GcError {
    if e.op == "list" && e.kind == ErrorKind::Other && e.message.contains("not supported") {
        GcError::Unlistable {
            cache: cache.to_owned(),
            why: e.message,
        }
    } else {
        GcError::Backend {
            cache: cache.to_owned(),
            error: e,
        }
    }
}

fn size_of(view: &View, key: &str) -> u64 {
    view.objects.get(key).map_or(0, |o| o.size)
}

/// List the cache into `view`, and read the narinfos that are new or, with `since`, written
/// after it (all of them the first time).
async fn refresh(
    backend: &dyn Backend,
    view: &mut View,
    since: Option<SystemTime>,
) -> Result<(), BackendError> {
    let listed = backend.list_objects("").await?;
    let old = std::mem::take(&mut view.objects);
    view.objects = listed.into_iter().map(|o| (o.key.clone(), o)).collect();
    let mut narinfos = HashMap::new();
    let mut to_read = Vec::new();
    for (key, o) in &view.objects {
        let Some(h) = hash_of_key(key) else { continue };
        let unchanged = old.get(key).is_some_and(|p| p.modified == o.modified)
            && since.is_none_or(|s| o.modified <= s);
        match view.narinfos.remove(h) {
            Some(n) if unchanged => {
                narinfos.insert(h.to_owned(), n);
            }
            _ => to_read.push(key.clone()),
        }
    }
    let reads = futures::stream::iter(to_read.into_iter().map(|key| async move {
        let got = backend.get_optional(&key, SMALL_OBJECT_LIMIT).await;
        (key, got)
    }))
    .buffer_unordered(NARINFO_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    for (key, got) in reads {
        let h = hash_of_key(&key).expect("narinfo key").to_owned();
        match got? {
            Some(bytes) => {
                let node = NarInfo::parse(&String::from_utf8_lossy(&bytes))
                    .ok()
                    .map(|n| Node {
                        refs: n
                            .references
                            .iter()
                            .map(|r| hash_of_base(r).to_owned())
                            .filter(|r| *r != h)
                            .collect(),
                        nar: n.url,
                        deriver: n.deriver,
                    });
                narinfos.insert(h, node);
            }
            // Removed since the listing.
            None => {
                view.objects.remove(&key);
            }
        }
    }
    view.narinfos = narinfos;
    Ok(())
}

/// Hash parts announced in announcements written after `after`.
async fn announced(
    backend: &dyn Backend,
    view: &View,
    after: SystemTime,
) -> Result<HashSet<String>, BackendError> {
    let keys: Vec<&String> = view
        .objects
        .values()
        .filter(|o| o.key.starts_with(ANNOUNCE_PREFIX) && o.modified > after)
        .map(|o| &o.key)
        .collect();
    let reads = futures::stream::iter(
        keys.into_iter()
            .map(|key| async move { (key, backend.get_optional(key, SMALL_OBJECT_LIMIT).await) }),
    )
    .buffer_unordered(NARINFO_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    let mut out = HashSet::new();
    for (key, got) in reads {
        let Some(bytes) = got? else { continue };
        match serde_json::from_slice::<Announcement>(&bytes) {
            Ok(a) => out.extend(a.paths),
            // Not ours to judge: an unreadable announcement protects nothing and is kept.
            Err(e) => tracing::warn!(key, error = %e, "announcement does not parse"),
        }
    }
    Ok(out)
}

/// `roots` and everything they refer to, directly or not, that the cache has.
fn closure(view: &View, roots: HashSet<String>) -> HashSet<String> {
    let mut todo: Vec<String> = roots.iter().cloned().collect();
    let mut seen = roots;
    while let Some(h) = todo.pop() {
        if let Some(Some(n)) = view.narinfos.get(&h) {
            for r in &n.refs {
                if view.narinfos.contains_key(r) && seen.insert(r.clone()) {
                    todo.push(r.clone());
                }
            }
        }
    }
    seen
}

/// What to delete, in order.
struct Plan {
    /// Narinfo keys, level by level: a level only after the previous ones are gone.
    narinfo_levels: Vec<Vec<String>>,
    nars: Vec<String>,
    other: Vec<String>,
}

impl Plan {
    fn all(&self) -> impl Iterator<Item = &String> {
        self.narinfo_levels
            .iter()
            .flatten()
            .chain(&self.nars)
            .chain(&self.other)
    }
}

fn plan(
    view: &View,
    doomed: &BTreeSet<String>,
    doomed_nars: &BTreeSet<String>,
    now: SystemTime,
    opts: &GcOptions,
) -> Plan {
    // Referrers first: a narinfo's level comes after those of all its referrers in `doomed`
    // (nothing outside `doomed` refers into it: what a kept path refers to is kept).
    let mut referrers: HashMap<&str, usize> = doomed.iter().map(|h| (h.as_str(), 0)).collect();
    for h in doomed {
        if let Some(Some(n)) = view.narinfos.get(h) {
            for r in &n.refs {
                if let Some(c) = referrers.get_mut(r.as_str()) {
                    *c += 1;
                }
            }
        }
    }
    let mut level: Vec<&str> = referrers
        .iter()
        .filter(|(_, c)| **c == 0)
        .map(|(h, _)| *h)
        .collect();
    let mut levels = Vec::new();
    while !level.is_empty() {
        level.sort_unstable();
        let mut next = Vec::new();
        for h in &level {
            if let Some(Some(n)) = view.narinfos.get(*h) {
                for r in &n.refs {
                    if let Some(c) = referrers.get_mut(r.as_str()) {
                        *c -= 1;
                        if *c == 0 {
                            next.push(r.as_str());
                        }
                    }
                }
            }
        }
        levels.push(level.iter().map(|h| format!("{h}.narinfo")).collect());
        level = next;
    }
    // A cycle of references (only a cache broken by hand has one) is left alone.

    let mut other = Vec::new();
    let kept_derivers: HashSet<&str> = view
        .narinfos
        .iter()
        .filter(|(h, _)| !doomed.contains(*h))
        .filter_map(|(_, n)| n.as_ref()?.deriver.as_deref())
        .collect();
    let mut logs = BTreeSet::new();
    for h in doomed {
        let ls = format!("{h}.ls");
        if view.objects.contains_key(&ls) {
            other.push(ls);
        }
        if let Some(Some(Node {
            deriver: Some(d), ..
        })) = view.narinfos.get(h)
        {
            let log = format!("log/{d}");
            if !kept_derivers.contains(d.as_str()) && view.objects.contains_key(&log) {
                logs.insert(log);
            }
        }
    }
    other.extend(logs);
    // Realisations name their output path by basename in the key's object; where the key's
    // output is one we delete, it goes. (Reading each realisation would cost a GET; its
    // `outPath` is only known from its body, so they are matched by the listing of
    // `realisations/` and read in `sweep`.)
    other.extend(
        view.objects
            .keys()
            .filter(|k| k.starts_with("realisations/") && k.ends_with(".doi"))
            .cloned(),
    );
    let retention = opts
        .keep_since
        .unwrap_or(DEFAULT_ANNOUNCE_RETENTION)
        .max(2 * opts.grace);
    let old = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
    other.extend(
        view.objects
            .values()
            .filter(|o| o.key.starts_with(ANNOUNCE_PREFIX) && o.modified < old)
            .map(|o| o.key.clone()),
    );
    Plan {
        narinfo_levels: levels,
        nars: doomed_nars.iter().cloned().collect(),
        other,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Narinfo,
    Nar,
    Other,
}

struct Sweep<'a> {
    backend: &'a dyn Backend,
    view: &'a View,
    stop_at: SystemTime,
    report: &'a mut GcReport,
    events: &'a EventSink,
}

impl Sweep<'_> {
    /// Delete the narinfo levels in order; a narinfo only once every narinfo of the plan that
    /// refers to it is gone. Returns the hash parts deleted.
    async fn narinfos(&mut self, levels: &[Vec<String>]) -> HashSet<String> {
        let mut deleted: HashSet<String> = HashSet::new();
        // Which doomed narinfos refer to each (so a failed one holds back its references).
        let doomed: HashSet<&str> = levels
            .iter()
            .flatten()
            .filter_map(|k| hash_of_key(k))
            .collect();
        let mut referrers: HashMap<&str, Vec<&str>> = HashMap::new();
        for h in &doomed {
            if let Some(Some(n)) = self.view.narinfos.get(*h) {
                for r in &n.refs {
                    if doomed.contains(r.as_str()) {
                        referrers.entry(r.as_str()).or_default().push(h);
                    }
                }
            }
        }
        for level in levels {
            let ready: Vec<String> = level
                .iter()
                .filter(|k| {
                    let h = hash_of_key(k).expect("narinfo key");
                    referrers
                        .get(h)
                        .is_none_or(|rs| rs.iter().all(|r| deleted.contains(*r)))
                })
                .cloned()
                .collect();
            for k in self.batch(&ready, Kind::Narinfo).await {
                deleted.insert(hash_of_key(&k).expect("narinfo key").to_owned());
            }
        }
        deleted
    }

    /// Delete `keys` in batches, retrying failures; returns those deleted. Realisations are
    /// read first and deleted only where their output path was deleted.
    async fn batch(&mut self, keys: &[String], kind: Kind) -> Vec<String> {
        let mut keys: Vec<String> = keys.to_vec();
        if kind == Kind::Other {
            keys = self.realisations_filter(keys).await;
        }
        let mut done = Vec::new();
        for chunk in keys.chunks(DELETE_BATCH) {
            let mut todo: Vec<String> = chunk.to_vec();
            for attempt in 0..DELETE_ATTEMPTS {
                if SystemTime::now() >= self.stop_at {
                    self.report.stopped_at_bound = true;
                    return done;
                }
                let results = self.backend.delete_batch(todo.clone()).await;
                let mut again = Vec::new();
                for (key, result) in todo.into_iter().zip(results) {
                    match result {
                        Ok(()) => {
                            let size = size_of(self.view, &key);
                            self.report.bytes_freed += size;
                            (self.events)(&Event::Deleted {
                                key: key.clone(),
                                size,
                            });
                            match kind {
                                Kind::Narinfo => self.report.deleted_narinfos.push(key.clone()),
                                Kind::Nar => self.report.deleted_nars.push(key.clone()),
                                Kind::Other => self.report.deleted_other.push(key.clone()),
                            }
                            done.push(key);
                        }
                        Err(e) if attempt + 1 == DELETE_ATTEMPTS => {
                            // The key is named beside it: the store's words only.
                            (self.events)(&Event::Failed {
                                key: key.clone(),
                                error: e.message.clone(),
                            });
                            self.report.failed.push(FailedDelete {
                                key,
                                error: e.message,
                            });
                        }
                        Err(_) => again.push(key),
                    }
                }
                todo = again;
                if todo.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
        }
        done
    }

    /// Keep of `keys` the realisations whose `outPath` was deleted, and everything else.
    async fn realisations_filter(&self, keys: Vec<String>) -> Vec<String> {
        let deleted: HashSet<&str> = self
            .report
            .deleted_narinfos
            .iter()
            .filter_map(|k| hash_of_key(k))
            .collect();
        let mut out = Vec::new();
        for key in keys {
            if !key.starts_with("realisations/") {
                out.push(key);
                continue;
            }
            let Ok(Some(bytes)) = self.backend.get_optional(&key, SMALL_OBJECT_LIMIT).await else {
                continue;
            };
            let out_path = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("outPath")?.as_str().map(str::to_owned));
            if let Some(p) = out_path {
                let base = p.rsplit('/').next().unwrap_or(&p);
                if deleted.contains(hash_of_base(base)) {
                    out.push(key);
                }
            }
        }
        out
    }
}

/// Read a `--keep-file`: one store path a line; blank lines and `#` comments are skipped.
pub fn parse_keep_file(
    text: &str,
    store_dir: &crate::formats::StoreDir,
) -> Result<Vec<StorePath>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let p = store_dir
            .parse(line)
            .or_else(|_| StorePath::from_base_name(line))
            .map_err(|e| (i + 1, format!("{line:?} is not a store path: {e}")))?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(refs: &[&str]) -> Option<Node> {
        Some(Node {
            refs: refs.iter().map(|s| s.to_string()).collect(),
            nar: String::new(),
            deriver: None,
        })
    }

    #[test]
    fn referrers_are_deleted_in_earlier_levels_than_their_references() {
        // a -> b -> c, a -> c, d -> c; e kept refers to nothing doomed.
        let mut view = View::default();
        for (h, refs) in [
            ("a", &["b", "c"][..]),
            ("b", &["c"]),
            ("c", &[]),
            ("d", &["c"]),
        ] {
            view.narinfos.insert(h.to_owned(), node(refs));
        }
        let doomed: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let opts = GcOptions {
            keep: vec![],
            keep_since: None,
            grace: Duration::from_secs(10),
            skew: Duration::from_secs(1),
            sweep_bound: Duration::from_secs(10),
            dry_run: true,
        };
        let p = plan(&view, &doomed, &BTreeSet::new(), SystemTime::now(), &opts);
        assert_eq!(
            p.narinfo_levels,
            vec![
                vec!["a.narinfo".to_owned(), "d.narinfo".to_owned()],
                vec!["b.narinfo".to_owned()],
                vec!["c.narinfo".to_owned()],
            ]
        );
    }

    #[test]
    fn the_closure_follows_references_the_cache_has() {
        let mut view = View::default();
        view.narinfos.insert("a".into(), node(&["b", "gone"]));
        view.narinfos.insert("b".into(), node(&["c"]));
        view.narinfos.insert("c".into(), node(&[]));
        view.narinfos.insert("x".into(), node(&["c"]));
        let k = closure(&view, HashSet::from(["a".to_owned()]));
        assert_eq!(
            k,
            HashSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()])
        );
    }
}
