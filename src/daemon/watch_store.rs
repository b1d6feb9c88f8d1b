//! Watching the store (`[daemon] watch-store = true`, or `nixpush watch-store`): every path
//! that becomes valid is queued, whether it was built, substituted, added (`nix-store --add`,
//! fetchers) or copied in, not only what the post-build-hook hands over.
//!
//! How a new path is noticed. Nix makes a path while holding `<path>.lock`: it writes the path
//! (or renames it into place), registers it as valid, then removes the lock. One inotify watch
//! on the store directory, top level only (whatever the store's size), hears both the new
//! entry and the removal of its lock, and each names a *candidate*. A candidate is never
//! trusted:
//! 1. Bursts are gathered: candidates are looked at once no new one came for [`QUIET`] (or
//!    [`GATHER_MAX`] after the first, so a steady stream still moves).
//! 2. A candidate whose lock is still there is being made; it is set aside, and the lock's
//!    removal names it again.
//! 3. The others are checked in one validity query through the store. The valid ones go into
//!    one queue entry (named `…-seen`), durable like the hook's, so from then on they are as safe
//!    as anything handed over.
//! 4. One not valid yet is looked at again (registration follows the files by moments) until
//!    [`SETTLE`] has passed since it was named, then passed over with a line in the log: it was
//!    a failed build, a temporary file, or collected already.
//! 5. A path collected after it was queued is passed over by the worker with a log line (a
//!    `-seen` entry is a report of what was there, not a request), never a rejected entry.
//!
//! What it does not see: paths that appeared while no daemon watched (push those with
//! `nixpush push`), and events the kernel drops when its queue overflows (logged, with that
//! advice). Cost: one watch; per event a name parse; per burst one validity query and one queue
//! entry; the candidates waiting are bounded by [`PENDING_MAX`].

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::Shared;
use super::queue::Item;
use crate::formats::StorePath;

/// How long no new candidate must come before a burst is looked at.
pub const QUIET: Duration = Duration::from_millis(300);
/// The longest a candidate waits to be looked at while a stream of others keeps coming.
pub const GATHER_MAX: Duration = Duration::from_secs(2);
/// How long a candidate that is not valid (and not locked) is looked at again before it is
/// passed over.
pub const SETTLE: Duration = Duration::from_secs(10);
/// How often candidates that are not valid yet are looked at again.
pub const RECHECK: Duration = Duration::from_secs(1);
/// Candidates waiting at once; beyond this, new ones are dropped with a warning.
pub const PENDING_MAX: usize = 100_000;
/// Names carried from the watcher's thread to the task, at most, before events are dropped.
const CHANNEL: usize = 65_536;

/// The watcher and the task that sorts its candidates; dropping it stops the watch.
pub struct StoreWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Start watching the store directory; the task runs until `stop` changes.
pub(super) fn start(
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> notify::Result<StoreWatch> {
    use notify::Watcher as _;
    let (tx, rx) = mpsc::channel::<OsString>(CHANNEL);
    let dropped = Arc::new(AtomicU64::new(0));
    let dropped_in_handler = dropped.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        // Runs on notify's thread: never block or panic here.
        let Ok(event) = res else { return };
        if event.need_rescan() {
            dropped_in_handler.fetch_add(1, Ordering::Relaxed);
            return;
        }
        use notify::EventKind as K;
        if !matches!(event.kind, K::Create(_) | K::Remove(_) | K::Modify(_)) {
            return;
        }
        for p in event.paths {
            if let Some(name) = p.file_name() {
                if tx.try_send(name.to_owned()).is_err() {
                    dropped_in_handler.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    let store_dir = std::path::PathBuf::from(shared.store().store_dir().as_str());
    let mut watcher = notify::recommended_watcher(handler)?;
    watcher.watch(&store_dir, notify::RecursiveMode::NonRecursive)?;
    info!(store = %store_dir.display(), "watching the store for new paths");
    tokio::spawn(sort_candidates(shared.clone(), rx, dropped, stop));
    Ok(StoreWatch { _watcher: watcher })
}

/// The store path a directory entry of the store names: the path itself, or the path whose
/// lock it is. Nix's own scratch entries (`.links`, `*.chroot`, `*.check`, temporaries) are not.
pub fn candidate(name: &[u8]) -> Option<StorePath> {
    let name = std::str::from_utf8(name).ok()?;
    if name.starts_with('.') {
        return None;
    }
    let name = name.strip_suffix(".lock").unwrap_or(name);
    if name.ends_with(".chroot") || name.ends_with(".check") || name.ends_with(".tmp") {
        return None;
    }
    StorePath::from_base_name(name).ok()
}

async fn sort_candidates(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<OsString>,
    dropped: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let store_dir = std::path::PathBuf::from(shared.store().store_dir().as_str());
    // Each candidate with when it was last named.
    let mut pending: HashMap<StorePath, Instant> = HashMap::new();
    // When to look at the candidates next, and when the burst being gathered began.
    let mut due = None::<Instant>;
    let mut burst = Instant::now();
    loop {
        tokio::select! {
            name = rx.recv() => {
                let Some(name) = name else { return };
                let Some(path) = candidate(name.as_bytes()) else { continue };
                if pending.len() >= PENDING_MAX && !pending.contains_key(&path) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let now = Instant::now();
                pending.insert(path, now);
                if due.is_none() {
                    burst = now;
                }
                due = Some((now + QUIET).min(burst + GATHER_MAX));
            }
            _ = sleep_until(due) => {
                look_at(&shared, &store_dir, &mut pending).await;
                // Those not valid yet are looked at again in a while.
                burst = Instant::now();
                due = (!pending.is_empty()).then(|| burst + RECHECK);
                let n = dropped.swap(0, Ordering::Relaxed);
                if n > 0 {
                    warn!(
                        events = n,
                        "store events were missed (too many at once); push the paths made \
                         meanwhile with `nixpush push`"
                    );
                }
            }
            _ = stop.changed() => return,
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Sort the pending candidates: set aside the locked ones, queue the valid ones, keep the rest
/// until [`SETTLE`] has passed.
async fn look_at(
    shared: &Arc<Shared>,
    store_dir: &std::path::Path,
    pending: &mut HashMap<StorePath, Instant>,
) {
    pending.retain(|p, _| {
        let lock = store_dir.join(format!("{}.lock", p.base_name()));
        !lock.exists()
    });
    if pending.is_empty() {
        return;
    }
    let paths: Vec<StorePath> = pending.keys().cloned().collect();
    let valid = match shared.store().valid_paths(&paths).await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "cannot ask the store which new paths are valid; will ask again");
            return;
        }
    };
    let mut found: Vec<StorePath> = paths.into_iter().filter(|p| valid.contains(p)).collect();
    if !found.is_empty() {
        found.sort();
        let items: Vec<Item> = found.iter().cloned().map(Item::Path).collect();
        let sd = shared.store().store_dir().clone();
        let queue = shared.queue.clone();
        let written = tokio::task::spawn_blocking(move || queue.enqueue_seen(&sd, &items)).await;
        match written {
            Ok(Ok(entry)) => {
                debug!(%entry, paths = found.len(), "queued new store paths");
                for p in &found {
                    pending.remove(p);
                }
                shared.nudge();
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot queue new store paths; will try again");
            }
            Err(e) => warn!(error = %e, "queueing task failed; will try again"),
        }
    }
    let sd = shared.store().store_dir().clone();
    pending.retain(|p, named| {
        let keep = named.elapsed() < SETTLE;
        if !keep {
            info!(
                path = %sd.display(p),
                "passed over: it appeared in the store but never became valid (a failed build, \
                 a temporary, or already collected)"
            );
        }
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_store_paths_and_the_paths_of_locks() {
        let p = "ffffffffffffffffffffffffffffffff-hello-2.12";
        assert_eq!(
            candidate(p.as_bytes()).map(|s| s.to_string()).as_deref(),
            Some(p)
        );
        let lock = format!("{p}.lock");
        assert_eq!(
            candidate(lock.as_bytes()).map(|s| s.to_string()).as_deref(),
            Some(p)
        );
        for not in [
            ".links".to_owned(),
            format!("{p}.drv.chroot"),
            format!("{p}.check"),
            "not-a-store-path".to_owned(),
        ] {
            assert_eq!(candidate(not.as_bytes()), None, "{not}");
        }
        assert_eq!(candidate(b"ffffffffffffffffffffffffffffffff-\xff"), None);
    }
}
