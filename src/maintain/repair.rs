//! `nixpush verify --repair`: make the cache whole again from what [`super::verify`] found.
//!
//! # What it does
//! 1. `nix-cache-info`: written where missing, rewritten where it does not parse. A cache for
//!    another store directory is not repaired at all (its narinfos name paths of that store).
//! 2. **Re-publish** what the local store can give: every broken narinfo whose path is valid
//!    here, and every missing reference that is valid here. Broken paths go through the
//!    publish layer's [`Pusher`] with `force` (their closure is rewritten, NAR first, then
//!    the signed narinfo, references first, each narinfo replaced atomically: at no moment is
//!    there less in the cache than before); missing references through a [`Pusher`] without
//!    `force`, which publishes exactly what is missing below them.
//! 3. **Remove** what cannot be re-published (not valid here, or its store path unknown; or its
//!    re-publication failed for good, e.g. the local copy is corrupt): its narinfo and the
//!    narinfo of every path that refers to it, directly or not, referrers first. A narinfo
//!    that refers to a missing one is thus never left behind, and the rule the publish layer
//!    relies on (a narinfo exists only once its references' do) holds at every step. A
//!    narinfo filed under another name than its path's is removed too, once its path's own
//!    narinfo is re-published where it can be.
//!
//! It never deletes a NAR: what a removed narinfo named becomes an orphan, reported by the next
//! verify, for garbage collection to remove. Temporary files are left to that too. A path whose
//! re-publication failed for a reason that may pass (the cache was unreachable) is neither
//! re-published nor removed, and is reported: run the repair again.
//!
//! # Cost
//! Everything verify costs, then: one `QueryPathInfo` batch for the candidates; the closure of
//! the broken paths re-published (NARs compressed and uploaded again, since `Pusher` has no
//! mode for "these paths only": a broken leaf costs itself, a broken top path its whole
//! closure); what is missing below the missing references; one `DELETE` per removed narinfo.
//! Re-published narinfos carry the local store's signatures and those of the signing keys,
//! not the ones the cache had.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use nixpush_backends::{Backend, BackendError, Body, PutMode, PutOptions};

use super::verify::{ProblemKind, Report, State};
use crate::formats::StorePath;
use crate::formats::cache_info::{self, CacheInfo};
use crate::publish::{self, PushError, PushOptions, Pusher, narinfo_key};
use crate::store::{Store, StoreError};

/// Why the repair could not run (what it did until then is done and consistent).
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(
        "cache {cache} is for the store {theirs}, but this store is {ours}: \
         it cannot be repaired from here"
    )]
    OtherStore {
        cache: String,
        theirs: String,
        ours: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Push(#[from] PushError),
    #[error("cache {cache}: {error}")]
    Backend { cache: String, error: BackendError },
}

/// What the repair did, as it happens.
#[derive(Debug, Clone)]
pub enum Event {
    CacheInfoWritten,
    /// A broken or missing path published again from the local store. (The rest of the
    /// closures rewritten with them are only counted.)
    Republished {
        path: String,
    },
    /// A narinfo removed.
    Removed {
        key: String,
        path: Option<String>,
        why: String,
    },
    /// A path that could not be re-published; `transient`: it may work later, and it was left
    /// as it was.
    Failed {
        path: String,
        error: String,
        transient: bool,
    },
}

pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// What the repair did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RepairReport {
    pub cache_info_written: bool,
    /// Broken or missing store paths published again (full paths), sorted.
    pub republished: Vec<String>,
    /// Sound paths rewritten with them (the closures of broken paths).
    pub rewritten: usize,
    /// Narinfo keys removed, in the order they were removed.
    pub removed: Vec<String>,
    /// Paths whose re-publication failed in a way that may pass: left as they were.
    pub failed: Vec<String>,
    /// Problems repair does not act on (the cache could not be read).
    pub unhandled: usize,
}

impl RepairReport {
    /// Whether everything verify found was re-published or removed.
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && self.unhandled == 0
    }
}

/// Mend the cache that `report` describes (see the module doc). `opts.force` is ignored:
/// repair decides per path.
pub async fn repair(
    store: Arc<dyn Store>,
    backend: Arc<dyn Backend>,
    report: &Report,
    opts: PushOptions,
    events: EventSink,
) -> Result<RepairReport, RepairError> {
    let sd = store.store_dir().clone();
    let mut out = RepairReport::default();
    let backend_err = |error| RepairError::Backend {
        cache: backend.describe(),
        error,
    };

    let mut write_cache_info = false;
    for p in &report.problems {
        match &p.kind {
            ProblemKind::StoreDirMismatch { theirs, ours } => {
                return Err(RepairError::OtherStore {
                    cache: backend.describe(),
                    theirs: theirs.clone(),
                    ours: ours.clone(),
                });
            }
            ProblemKind::CacheInfoMissing | ProblemKind::CacheInfoUnparsable { .. } => {
                write_cache_info = true
            }
            ProblemKind::Unreadable { .. } => out.unhandled += 1,
            _ => {}
        }
    }
    if write_cache_info {
        // Overwrite: a nix-cache-info that does not parse is worth nothing, and one written
        // meanwhile by a pusher says the same.
        let body = Body::Bytes(Bytes::from(CacheInfo::new(sd.as_str()).render()));
        let put = PutOptions {
            mode: PutMode::Overwrite,
            content_type: "text/x-nix-cache-info",
        };
        backend
            .put(cache_info::FILE_NAME, body, put)
            .await
            .map_err(backend_err)?;
        out.cache_info_written = true;
        events(&Event::CacheInfoWritten);
    }

    // What is broken, and what the local store can give again.
    let broken: BTreeMap<&str, Option<&StorePath>> = report
        .entries
        .values()
        .filter(|e| e.state == State::Broken)
        .map(|e| (e.key.as_str(), e.path.as_ref()))
        .collect();
    let candidates: Vec<StorePath> = broken
        .values()
        .flatten()
        .map(|p| (*p).clone())
        .chain(report.missing.values().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let valid: HashSet<StorePath> = if candidates.is_empty() {
        HashSet::new()
    } else {
        store
            .path_infos(&candidates)
            .await?
            .into_iter()
            .flatten()
            .map(|i| i.path.clone())
            .collect()
    };

    // Re-publish.
    let published: Arc<Mutex<BTreeSet<StorePath>>> = Default::default();
    let mut failed_for_good: BTreeMap<String, String> = BTreeMap::new();
    let rewrite: Vec<StorePath> = broken
        .values()
        .flatten()
        .filter(|p| valid.contains(*p))
        .map(|p| (*p).clone())
        .collect();
    let fill: Vec<StorePath> = report
        .missing
        .values()
        .filter(|p| valid.contains(*p))
        .cloned()
        .collect();
    let targets: Arc<HashSet<StorePath>> = Arc::new(rewrite.iter().chain(&fill).cloned().collect());
    for (roots, force) in [(rewrite, true), (fill, false)] {
        if roots.is_empty() {
            continue;
        }
        let pusher = Pusher::new(
            store.clone(),
            backend.clone(),
            PushOptions {
                force,
                ..opts.clone()
            },
        );
        let sink = {
            let published = published.clone();
            let events = events.clone();
            let sd = sd.clone();
            let targets = targets.clone();
            Arc::new(move |e: &publish::Event| match e {
                publish::Event::Published { path, .. }
                | publish::Event::AlreadyPublished { path, .. } => {
                    let fresh = published
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(path.clone());
                    if fresh && targets.contains(path) {
                        events(&Event::Republished {
                            path: sd.display(path),
                        });
                    }
                }
                publish::Event::Planned { .. }
                | publish::Event::Started { .. }
                | publish::Event::Failed { .. } => {}
            })
        };
        let summary = pusher.push(&roots, sink).await?;
        for f in summary.failed {
            let transient = f.is_transient();
            events(&Event::Failed {
                path: sd.display(&f.path),
                error: f.error.to_string(),
                transient,
            });
            if transient {
                out.failed.push(sd.display(&f.path));
            } else {
                failed_for_good.insert(narinfo_key(&f.path), f.error.to_string());
            }
        }
    }
    let published = std::mem::take(&mut *published.lock().unwrap_or_else(|p| p.into_inner()));
    let published_keys: HashSet<String> = published.iter().map(narinfo_key).collect();
    out.republished = published
        .iter()
        .filter(|p| targets.contains(*p))
        .map(|p| sd.display(p))
        .collect();
    out.rewritten = published.len() - out.republished.len();

    // What cannot be repaired, and why.
    let mut seeds: BTreeMap<String, String> = BTreeMap::new();
    for (key, path) in &broken {
        if published_keys.contains(*key) {
            continue;
        }
        // `path` is what the narinfo says; a misfiled one is removed whatever became of it.
        let why = match path {
            None => "it cannot be re-published: it names no path of this store".into(),
            // Re-publishing writes the path's own narinfo; this copy under another name goes.
            Some(p) if narinfo_key(p) != *key => format!(
                "it is filed under the wrong name (the narinfo of {} is {})",
                sd.display(p),
                narinfo_key(p)
            ),
            Some(p) if !valid.contains(*p) => {
                "it cannot be re-published: its path is not valid in the local store".into()
            }
            Some(_) => match failed_for_good.get(*key) {
                Some(e) => format!("it could not be re-published: {e}"),
                // Failed transiently, or held back by a reference that did: left as it is.
                None => continue,
            },
        };
        seeds.insert((*key).to_owned(), why);
    }
    for (key, path) in &report.missing {
        if !published_keys.contains(key) && !valid.contains(path) {
            seeds.insert(key.clone(), String::new());
        }
    }
    let order = removal_order(report, &seeds, &published_keys);
    let doomed: HashSet<&str> = order.iter().map(String::as_str).collect();
    for key in &order {
        let Some(entry) = report.entries.get(key) else {
            continue; // A missing reference: there is no narinfo to remove.
        };
        let why = match seeds.get(key) {
            Some(why) => why.clone(),
            None => {
                let culprit = entry
                    .references
                    .iter()
                    .find(|r| doomed.contains(narinfo_key(r).as_str()))
                    .map(|r| sd.display(r))
                    .unwrap_or_else(|| "a path".to_owned());
                format!("it refers to {culprit}, which cannot be repaired")
            }
        };
        backend.delete(key).await.map_err(backend_err)?;
        events(&Event::Removed {
            key: key.clone(),
            path: entry.path.as_ref().map(|p| sd.display(p)),
            why,
        });
        out.removed.push(key.clone());
    }
    // Each delete is durable when it returns (the backend contract), so the order above is
    // the order a crash can leave.
    Ok(out)
}

/// The narinfos to remove for `seeds` (keys that cannot be repaired): the seeds and everything
/// that refers to one of them, directly or not, except what was just re-published; each
/// before anything it refers to (referrers first).
fn removal_order(
    report: &Report,
    seeds: &BTreeMap<String, String>,
    published: &HashSet<String>,
) -> Vec<String> {
    let mut referrers: HashMap<String, Vec<&str>> = HashMap::new();
    for e in report.entries.values() {
        for r in &e.references {
            referrers.entry(narinfo_key(r)).or_default().push(&e.key);
        }
    }
    // Everything that goes: the seeds and their referrers, transitively.
    let mut doomed: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = seeds.keys().cloned().collect();
    while let Some(k) = todo.pop() {
        if published.contains(&k) || !doomed.insert(k.clone()) {
            continue;
        }
        for r in referrers.get(&k).into_iter().flatten() {
            todo.push((*r).to_owned());
        }
    }
    // Referrers first: a key goes once every doomed key referring to it has gone.
    let mut waiting: BTreeMap<&str, usize> = doomed
        .iter()
        .map(|k| {
            let n = referrers
                .get(k)
                .into_iter()
                .flatten()
                .filter(|r| **r != k.as_str() && doomed.contains(**r))
                .count();
            (k.as_str(), n)
        })
        .collect();
    let mut order = Vec::with_capacity(doomed.len());
    let mut ready: Vec<&str> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    while let Some(k) = ready.pop() {
        if waiting.remove(k).is_none() {
            continue;
        }
        order.push(k.to_owned());
        if let Some(e) = report.entries.get(k) {
            for r in &e.references {
                let rk = narinfo_key(r);
                if let Some((key, n)) = waiting.get_key_value(rk.as_str()).map(|(a, b)| (*a, *b)) {
                    let n = n.saturating_sub(1);
                    waiting.insert(key, n);
                    if n == 0 {
                        ready.push(key);
                    }
                }
            }
        }
    }
    // A cycle (only a forged cache has one): the rest, in key order.
    order.extend(waiting.into_keys().map(str::to_owned));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintain::verify::Entry;

    fn sp(c: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).unwrap()
    }

    #[test]
    fn referrers_go_first_and_only_what_refers_to_the_unrepairable() {
        // top → mid → leaf; other → leaf2 (sound); top2 → mid.
        let (leaf, mid, top, top2, other, leaf2) = (
            sp('a', "leaf"),
            sp('b', "mid"),
            sp('c', "top"),
            sp('d', "top2"),
            sp('f', "other"),
            sp('g', "leaf2"),
        );
        let mut report = Report::default();
        for (p, refs) in [
            (&leaf, vec![]),
            (&mid, vec![leaf.clone()]),
            (&top, vec![mid.clone()]),
            (&top2, vec![mid.clone(), leaf2.clone()]),
            (&other, vec![leaf2.clone()]),
            (&leaf2, vec![]),
        ] {
            report.entries.insert(
                narinfo_key(p),
                Entry {
                    key: narinfo_key(p),
                    path: Some(p.clone()),
                    references: refs,
                    state: State::Sound,
                },
            );
        }
        let seeds = BTreeMap::from([(narinfo_key(&leaf), String::new())]);
        let order = removal_order(&report, &seeds, &HashSet::new());
        let pos = |p: &StorePath| order.iter().position(|k| *k == narinfo_key(p));
        assert_eq!(order.len(), 4, "{order:?}");
        assert!(pos(&top) < pos(&mid) && pos(&top2) < pos(&mid));
        assert!(pos(&mid) < pos(&leaf));
        assert_eq!(pos(&other), None);
        assert_eq!(pos(&leaf2), None);
        // What was re-published stays, and so does what refers only to it.
        let order = removal_order(&report, &seeds, &HashSet::from([narinfo_key(&leaf)]));
        assert!(order.is_empty(), "{order:?}");
    }
}
