//! `nixpush verify`: check a cache against the rules of [`super`] ("what whole means"), one
//! problem per finding, each naming the object and what is wrong with it.
//!
//! The order of work: the inventory (one listing), `nix-cache-info`, every narinfo (read
//! [`NARINFO_CONCURRENCY`] at once, checked on `jobs` threads: parse, name, store directory,
//! signatures, its NAR in the inventory and its size where known), then the references of all of them against the
//! inventory (what the inventory lacks, NARs and references, is asked about once more with an
//! existence check: a listing taken during a push can miss an object written before one it
//! shows), then with `deep` every NAR that exists (`jobs` at once, see [`super::deep`]),
//! then orphans and temporary files. What the narinfos said is kept in [`Report::entries`] for
//! [`super::repair`]; the types and words of what verify finds are in [`super::report`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt as _;
use nixpush_backends::{Backend, BackendExt as _, ErrorKind};

use super::NARINFO_CONCURRENCY;
use super::deep;
use super::inventory::{self, Inventory};
use crate::formats::cache_info::{self, CacheInfo};
use crate::formats::signing::{self, PublicKey};
use crate::formats::{Compression, NarInfo, StoreDir, StorePath};

/// The largest narinfo or nix-cache-info read (Nix's own are a few hundred bytes).
const SMALL_OBJECT_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The store directory clients of the cache use (`/nix/store`).
    pub store_dir: StoreDir,
    /// Keys a narinfo must be signed by (one of them). Empty: signatures are not checked.
    pub trusted: Vec<PublicKey>,
    /// Also read every NAR: FileHash, decompression, NarHash and NarSize.
    pub deep: bool,
    /// NARs read at once with `deep`.
    pub jobs: usize,
    /// Key names of an upstream cache whose paths this one leaves out (`push
    /// --skip-signed-by`): a reference without a narinfo is then expected there, and is a note,
    /// not a problem.
    pub upstream: Vec<String>,
}

pub use super::report::{Entry, Event, EventSink, Note, Problem, ProblemKind, Report, State};

/// Check the cache in `backend` (`dir`: its directory, where it is local; see
/// [`inventory::local_dir`]). Only a failure to list the cache is an error; everything else is
/// in the report.
pub async fn verify(
    backend: &dyn Backend,
    dir: Option<&std::path::Path>,
    opts: &VerifyOptions,
    events: EventSink,
) -> Result<Report, nixpush_backends::BackendError> {
    let started = Instant::now();
    let inv = inventory::take(backend, dir).await?;
    let mut r = Report {
        cache: backend.describe(),
        deep: opts.deep,
        narinfos: inv.narinfos.len(),
        signatures_checked: !opts.trusted.is_empty(),
        ..Report::default()
    };
    let problem = |r: &mut Report, p: Problem| {
        events(&Event::Problem(p.clone()));
        r.problems.push(p);
    };
    let note = |r: &mut Report, n: Note| {
        events(&Event::Note(n.clone()));
        r.notes.push(n);
    };
    events(&Event::Listed {
        narinfos: inv.narinfos.len(),
    });
    if opts.trusted.is_empty() {
        note(&mut r, Note::NoTrustedKey);
    }

    if let Some(p) = check_cache_info(backend, &inv, &opts.store_dir).await {
        problem(&mut r, p);
    }

    // Every narinfo on its own, a batch at a time (see `check_batch`).
    let inv = Arc::new(inv);
    let shared = Arc::new(opts.clone());
    let keys: Vec<String> = inv.narinfos.iter().cloned().collect();
    // Every NAR that exists and what its narinfo says it is, for `deep`.
    let mut to_read: Vec<ToRead> = Vec::new();
    let mut named_nars: HashSet<String> = HashSet::new();
    // (narinfo key, store path, NAR key) of NARs the inventory lacks.
    let mut unlisted_nars: Vec<(String, String, String)> = Vec::new();
    for batch in keys.chunks(CHECK_BATCH) {
        for (key, checked) in check_batch(backend, dir, batch, &inv, &shared).await? {
            let key = &key;
            events(&Event::NarinfoChecked);
            if checked.unlisted_nar {
                if let (Some(url), Some(path)) = (&checked.url, &checked.entry.path) {
                    unlisted_nars.push((key.clone(), opts.store_dir.display(path), url.clone()));
                }
            }
            named_nars.extend(checked.url);
            for p in checked.problems {
                problem(&mut r, p);
            }
            if let Some((info, comp)) = checked.deep {
                // Every NAR that exists is read, even where its narinfo has other problems, so
                // that all of the damage is named. A size the inventory gave is checked already.
                if let (true, Some(listed)) = (opts.deep, inv.nars.get(&info.url)) {
                    let size_checked = listed.is_some();
                    match comp {
                        Ok(comp) => to_read.push(ToRead {
                            key: key.clone(),
                            nar: info.url.clone(),
                            info,
                            comp,
                            size_checked,
                        }),
                        Err(name) => note(
                            &mut r,
                            Note::Unchecked {
                                object: info.url.clone(),
                                why: format!(
                                    "its compression {name:?} is not one nixpush reads \
                                 (none, xz, bzip2, zstd)"
                                ),
                            },
                        ),
                    }
                }
            }
            r.entries.insert(key.clone(), checked.entry);
        }
    }
    let inv = &*inv;

    // References, against the inventory. What it lacks is asked about once more: a listing
    // taken while a push publishes can miss an object written before one it shows (a NAR
    // before its narinfo, a reference before its referrer). One request per object so found,
    // which in a sound cache is none.
    let unlisted_refs: BTreeMap<String, StorePath> = r
        .entries
        .values()
        .flat_map(|e| &e.references)
        .map(|p| (crate::publish::narinfo_key(p), p.clone()))
        .filter(|(k, _)| !inv.narinfos.contains(k))
        .collect();
    let asked: Vec<String> = unlisted_nars
        .iter()
        .map(|(_, _, nar)| nar.clone())
        .chain(unlisted_refs.keys().cloned())
        .collect();
    let there = match existing(backend, &asked).await {
        Ok(there) => there,
        Err(e) => {
            let p = Problem {
                object: r.cache.clone(),
                path: None,
                kind: ProblemKind::Unreadable {
                    message: format!("cannot check what the listing lacks: {e}"),
                },
            };
            problem(&mut r, p);
            asked.iter().cloned().collect()
        }
    };
    for (key, path, nar) in unlisted_nars {
        if there.contains(&nar) {
            continue;
        }
        if let Some(e) = r.entries.get_mut(&key) {
            e.state = State::Broken;
        }
        let p = Problem {
            object: key,
            path: Some(path),
            kind: ProblemKind::NarMissing { nar },
        };
        problem(&mut r, p);
    }
    let mut missing_problems = Vec::new();
    let mut elsewhere = Vec::new();
    for e in r.entries.values() {
        for reference in &e.references {
            let rkey = crate::publish::narinfo_key(reference);
            if unlisted_refs.contains_key(&rkey) && !there.contains(&rkey) {
                if !opts.upstream.is_empty() {
                    elsewhere.push(Note::ReferenceElsewhere {
                        object: e.key.clone(),
                        path: e.path.as_ref().map(|p| opts.store_dir.display(p)),
                        reference: opts.store_dir.display(reference),
                        upstream: opts.upstream.join(" or "),
                    });
                    continue;
                }
                missing_problems.push(Problem {
                    object: e.key.clone(),
                    path: e.path.as_ref().map(|p| opts.store_dir.display(p)),
                    kind: ProblemKind::ReferenceMissing {
                        reference: opts.store_dir.display(reference),
                    },
                });
                r.missing.insert(rkey, reference.clone());
            }
        }
    }
    for p in missing_problems {
        problem(&mut r, p);
    }
    for n in elsewhere {
        note(&mut r, n);
    }

    if opts.deep {
        deep_pass(backend, dir, opts, to_read, &mut r, &events).await;
    }

    for (nar, size) in &inv.nars {
        if !named_nars.contains(nar) {
            note(
                &mut r,
                Note::Orphan {
                    object: nar.clone(),
                    size: *size,
                },
            );
        }
    }
    for t in &inv.stale_temps {
        note(
            &mut r,
            Note::StaleTemp {
                object: t.key.clone(),
                age_secs: t.age.as_secs(),
                size: t.size,
            },
        );
    }
    r.secs = started.elapsed().as_secs_f64();
    Ok(r)
}

/// Narinfos read and checked together: a batch bounds what is held at once.
const CHECK_BATCH: usize = 1024;

/// The narinfos of `keys`, read and checked. Checking is CPU work (mostly the ed25519
/// signature, some 50 µs each), so a batch is split over `jobs` blocking threads; the reads
/// are [`NARINFO_CONCURRENCY`] requests at once, or for a local directory plain reads by those
/// same threads (a `tokio::fs` read costs a thread hand-over per call, which for thousands of
/// small files was most of the time).
async fn check_batch(
    backend: &dyn Backend,
    dir: Option<&std::path::Path>,
    keys: &[String],
    inv: &Arc<Inventory>,
    opts: &Arc<VerifyOptions>,
) -> Result<Vec<(String, Checked)>, nixpush_backends::BackendError> {
    type Read = (
        String,
        Option<Result<bytes::Bytes, nixpush_backends::BackendError>>,
    );
    let read: Vec<Read> = match dir {
        Some(_) => keys.iter().map(|k| (k.clone(), None)).collect(),
        None => {
            let reads: Vec<_> = keys
                .iter()
                .map(|key| async move {
                    let got = backend.get_bytes(key, SMALL_OBJECT_LIMIT).await;
                    (key.clone(), Some(got))
                })
                .collect();
            futures::stream::iter(reads)
                .buffer_unordered(NARINFO_CONCURRENCY)
                .collect()
                .await
        }
    };
    let per = read.len().div_ceil(opts.jobs.max(1)).max(1);
    let mut read = read.into_iter();
    let mut tasks = Vec::new();
    loop {
        let piece: Vec<Read> = read.by_ref().take(per).collect();
        if piece.is_empty() {
            break;
        }
        let (inv, opts, dir) = (inv.clone(), opts.clone(), dir.map(ToOwned::to_owned));
        tasks.push(tokio::task::spawn_blocking(move || {
            piece
                .into_iter()
                .map(|(key, got)| {
                    let got = got.unwrap_or_else(|| read_local(dir.as_deref(), &key));
                    let checked = match got {
                        Ok(bytes) => check_narinfo(&key, &bytes, &inv, &opts),
                        Err(e) => unreadable(&key, e),
                    };
                    (key, checked)
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut out = Vec::with_capacity(keys.len());
    for t in tasks {
        match t.await {
            Ok(part) => out.extend(part),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                return Err(nixpush_backends::BackendError::new(
                    ErrorKind::Other,
                    "verify",
                    "",
                    e.to_string(),
                ));
            }
        }
    }
    Ok(out)
}

/// A small object of a local cache directory, read whole.
fn read_local(
    dir: Option<&std::path::Path>,
    key: &str,
) -> Result<bytes::Bytes, nixpush_backends::BackendError> {
    let dir = dir.expect("local reads only for a local directory");
    let path = dir.join(key);
    let len = std::fs::metadata(&path)
        .map_err(|e| nixpush_backends::BackendError::io("get", key, e))?
        .len();
    if len > SMALL_OBJECT_LIMIT as u64 {
        return Err(nixpush_backends::BackendError::new(
            ErrorKind::Other,
            "get",
            key,
            format!("object is larger than {SMALL_OBJECT_LIMIT} bytes"),
        ));
    }
    std::fs::read(&path)
        .map(bytes::Bytes::from)
        .map_err(|e| nixpush_backends::BackendError::io("get", key, e))
}

/// What a narinfo that could not be read amounts to.
fn unreadable(key: &str, e: nixpush_backends::BackendError) -> Checked {
    let gone = e.kind == ErrorKind::NotFound;
    Checked {
        entry: Entry {
            key: key.to_owned(),
            path: None,
            references: Vec::new(),
            // Removed since the listing: not there, so not broken.
            state: if gone { State::Sound } else { State::Unchecked },
        },
        problems: if gone {
            Vec::new()
        } else {
            vec![Problem {
                object: key.to_owned(),
                path: None,
                kind: ProblemKind::Unreadable {
                    message: e.to_string(),
                },
            }]
        },
        url: None,
        deep: None,
        unlisted_nar: false,
    }
}

/// Which of `keys` exist, asked one by one ([`NARINFO_CONCURRENCY`] at once), or in one pass
/// where the store offers it.
async fn existing(
    backend: &dyn Backend,
    keys: &[String],
) -> Result<HashSet<String>, nixpush_backends::BackendError> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    if let Some(answers) = backend.exists_all(keys).await? {
        return Ok(keys
            .iter()
            .zip(answers)
            .filter(|(_, there)| *there)
            .map(|(k, _)| k.clone())
            .collect());
    }
    let checks: Vec<_> = keys
        .iter()
        .map(|k| async move { (k, backend.exists(k).await) })
        .collect();
    let mut checks = futures::stream::iter(checks).buffer_unordered(NARINFO_CONCURRENCY);
    let mut there = HashSet::new();
    while let Some((k, r)) = checks.next().await {
        if r? {
            there.insert(k.clone());
        }
    }
    Ok(there)
}

async fn check_cache_info(
    backend: &dyn Backend,
    inv: &Inventory,
    store_dir: &StoreDir,
) -> Option<Problem> {
    let object = cache_info::FILE_NAME.to_owned();
    let problem = |kind| {
        Some(Problem {
            object: object.clone(),
            path: None,
            kind,
        })
    };
    if !inv.has_cache_info {
        return problem(ProblemKind::CacheInfoMissing);
    }
    let bytes = match backend
        .get_optional(cache_info::FILE_NAME, SMALL_OBJECT_LIMIT)
        .await
    {
        Ok(Some(b)) => b,
        Ok(None) => return problem(ProblemKind::CacheInfoMissing),
        Err(e) => {
            return problem(ProblemKind::Unreadable {
                message: e.to_string(),
            });
        }
    };
    match CacheInfo::parse(&String::from_utf8_lossy(&bytes)) {
        Ok(info) if info.store_dir == store_dir.as_str() => None,
        Ok(info) => problem(ProblemKind::StoreDirMismatch {
            theirs: info.store_dir,
            ours: store_dir.as_str().to_owned(),
        }),
        Err(e) => problem(ProblemKind::CacheInfoUnparsable {
            message: e.to_string(),
        }),
    }
}

/// One narinfo's findings.
struct Checked {
    entry: Entry,
    problems: Vec<Problem>,
    /// The NAR it names, even if it is otherwise broken (so that NAR is not an orphan).
    url: Option<String>,
    /// What `deep` should find in its NAR, and its compression (or its name, where it is not
    /// one nixpush reads).
    deep: Option<(NarInfo, Result<Compression, String>)>,
    /// Its NAR is not in the inventory.
    unlisted_nar: bool,
}

fn check_narinfo(key: &str, bytes: &[u8], inv: &Inventory, opts: &VerifyOptions) -> Checked {
    let sd = &opts.store_dir;
    let text = String::from_utf8_lossy(bytes);
    let mut c = Checked {
        entry: Entry {
            key: key.to_owned(),
            path: None,
            references: Vec::new(),
            state: State::Sound,
        },
        problems: Vec::new(),
        url: None,
        deep: None,
        unlisted_nar: false,
    };
    let info = match NarInfo::parse(&text) {
        Ok(info) => info,
        Err(e) => {
            // What can still be read: which path it was for (to re-publish it) and which NAR
            // it named (which is then no orphan).
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                    .map(str::to_owned)
            };
            c.entry.path = field("StorePath").and_then(|p| sd.parse(&p).ok());
            c.url = field("URL");
            c.entry.state = State::Broken;
            c.problems.push(Problem {
                object: key.to_owned(),
                path: c.entry.path.as_ref().map(|p| sd.display(p)),
                kind: ProblemKind::Unparsable {
                    message: e.to_string(),
                },
            });
            return c;
        }
    };
    c.url = Some(info.url.clone());
    let broken = |c: &mut Checked, kind| {
        c.entry.state = State::Broken;
        c.problems.push(Problem {
            object: key.to_owned(),
            path: Some(info.store_path.clone()),
            kind,
        });
    };
    let path = match sd.parse(&info.store_path) {
        Ok(p) => p,
        Err(e) => {
            broken(
                &mut c,
                ProblemKind::NotInStore {
                    store_dir: sd.as_str().to_owned(),
                    message: e.to_string(),
                },
            );
            return c;
        }
    };
    let expected_key = crate::publish::narinfo_key(&path);
    if expected_key != key {
        broken(
            &mut c,
            ProblemKind::WrongName {
                expected: expected_key,
            },
        );
    }
    c.entry.path = Some(path.clone());

    let mut references = Vec::new();
    for r in &info.references {
        match StorePath::from_base_name(r) {
            Ok(p) if p == path => {}
            Ok(p) => references.push(p),
            Err(_) => broken(
                &mut c,
                ProblemKind::BadReference {
                    reference: r.clone(),
                },
            ),
        }
    }

    if !opts.trusted.is_empty() {
        let full_refs: Vec<String> = info
            .references
            .iter()
            .map(|r| format!("{}/{r}", sd.as_str()))
            .collect();
        let fp = signing::fingerprint(&info.store_path, &info.nar_hash, info.nar_size, &full_refs);
        let valid = info
            .sigs
            .iter()
            .any(|s| opts.trusted.iter().any(|k| k.verify(&fp, s)))
            || proves_itself(sd, &path, &info);
        if !valid {
            let names: Vec<&str> = info
                .sigs
                .iter()
                .filter_map(|s| signing::signature_key_name(s))
                .collect();
            let bad_trusted = names
                .iter()
                .find(|n| opts.trusted.iter().any(|k| k.name() == **n));
            let kind = match bad_trusted {
                Some(n) => ProblemKind::BadSignature {
                    key: (*n).to_owned(),
                },
                None => ProblemKind::Unsigned {
                    trusted: opts
                        .trusted
                        .iter()
                        .map(PublicKey::name)
                        .collect::<Vec<_>>()
                        .join(", "),
                    signed_by: if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    },
                },
            };
            broken(&mut c, kind);
        }
    }

    match inv.nars.get(&info.url) {
        // Confirmed by the caller: it may have been written after the listing passed it.
        None => c.unlisted_nar = true,
        Some(size) => {
            if let (Some(actual), Some(expected)) = (*size, info.file_size) {
                if actual != expected {
                    broken(
                        &mut c,
                        ProblemKind::FileSize {
                            nar: info.url.clone(),
                            expected,
                            actual,
                        },
                    );
                }
            }
        }
    }
    c.entry.references = references;
    let comp = info
        .compression
        .parse::<Compression>()
        .map_err(|_| info.compression.clone());
    c.deep = Some((info, comp));
    c
}

/// A NAR for the deep pass.
struct ToRead {
    /// The narinfo that names it.
    key: String,
    nar: String,
    info: NarInfo,
    comp: Compression,
    /// Its size was compared with FileSize already (the inventory had it).
    size_checked: bool,
}

/// Whether the narinfo's content address implies its store path, so that Nix takes it
/// without a signature (`ValidPathInfo::isContentAddressed`; see
/// [`content_address`](crate::formats::content_address)). A recursive sha256 address is the
/// NarHash itself, so it must also equal the narinfo's.
fn proves_itself(sd: &StoreDir, path: &StorePath, info: &NarInfo) -> bool {
    let Some(ca) = &info.ca else { return false };
    let Ok(refs) = info
        .references
        .iter()
        .map(|r| StorePath::from_base_name(r))
        .collect::<Result<Vec<_>, _>>()
    else {
        return false;
    };
    if let Some(h) = ca.strip_prefix("fixed:r:") {
        if h.starts_with("sha256:") && crate::formats::Sha256::parse(h).ok() != Some(info.nar_hash)
        {
            return false;
        }
    }
    crate::formats::content_address::implied_path(sd, path, ca, &refs).as_ref() == Some(path)
}

async fn deep_pass(
    backend: &dyn Backend,
    dir: Option<&std::path::Path>,
    opts: &VerifyOptions,
    to_read: Vec<ToRead>,
    r: &mut Report,
    events: &EventSink,
) {
    events(&Event::Reading {
        nars: to_read.len(),
        bytes: to_read.iter().filter_map(|t| t.info.file_size).sum(),
    });
    let reads: Vec<_> = to_read
        .into_iter()
        .map(|t| {
            let file = dir.map(|d| d.join(&t.nar));
            async move {
                match file {
                    // A local file is read on a blocking thread, without the channel.
                    Some(file) => {
                        let done = tokio::task::spawn_blocking(move || {
                            let facts = deep::measure_file(&file, &t.nar, t.comp, t.info.nar_size);
                            (t, facts)
                        });
                        match done.await {
                            Ok(done) => done,
                            Err(e) => std::panic::resume_unwind(e.into_panic()),
                        }
                    }
                    None => {
                        let facts = deep::measure(backend, &t.nar, t.comp, t.info.nar_size).await;
                        (t, facts)
                    }
                }
            }
        })
        .collect();
    let mut reads = futures::stream::iter(reads).buffer_unordered(opts.jobs.max(1));
    while let Some((t, facts)) = reads.next().await {
        let ToRead {
            key,
            nar,
            info,
            comp,
            size_checked,
        } = t;
        let path = Some(info.store_path.clone());
        let mut found = Vec::new();
        match facts {
            Err(e) if e.kind == ErrorKind::NotFound => {
                found.push(ProblemKind::NarMissing { nar: nar.clone() })
            }
            Err(e) => found.push(ProblemKind::Unreadable {
                message: e.to_string(),
            }),
            Ok(f) => {
                r.nars_read += 1;
                r.bytes_read += f.file_size;
                events(&Event::NarRead { bytes: f.file_size });
                if let Some(expected) = info
                    .file_size
                    .filter(|s| !size_checked && *s != f.file_size)
                {
                    found.push(ProblemKind::FileSize {
                        nar: nar.clone(),
                        expected,
                        actual: f.file_size,
                    });
                }
                if let Some(expected) = info.file_hash.filter(|h| *h != f.file_hash) {
                    found.push(ProblemKind::FileHash {
                        nar: nar.clone(),
                        expected: expected.to_nix_string(),
                        actual: f.file_hash.to_nix_string(),
                    });
                }
                match f.nar {
                    Err(message) => found.push(ProblemKind::Decompress {
                        nar: nar.clone(),
                        compression: comp.name().to_owned(),
                        message,
                    }),
                    Ok((h, n)) if h != info.nar_hash || n != info.nar_size => {
                        found.push(ProblemKind::NarHash {
                            nar: nar.clone(),
                            expected: info.nar_hash.to_nix_string(),
                            expected_size: info.nar_size,
                            actual: h.to_nix_string(),
                            actual_size: n,
                        })
                    }
                    Ok(_) => {}
                }
            }
        }
        if found
            .iter()
            .any(|k| !matches!(k, ProblemKind::Unreadable { .. }))
        {
            if let Some(e) = r.entries.get_mut(&key) {
                e.state = State::Broken;
            }
        } else if !found.is_empty() {
            if let Some(e) = r.entries.get_mut(&key).filter(|e| e.state == State::Sound) {
                e.state = State::Unchecked;
            }
        }
        for kind in found {
            let p = Problem {
                object: key.clone(),
                path: path.clone(),
                kind,
            };
            events(&Event::Problem(p.clone()));
            r.problems.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nixpush_backends::fs::FsBackend;
    use nixpush_backends::{BackendError, Body, ByteStream, PutOptions};

    use super::*;
    use crate::formats::Sha256;

    /// A directory cache whose listing misses some keys, as one taken during a push may, and
    /// that counts existence checks.
    #[derive(Debug)]
    struct Unlisted {
        inner: FsBackend,
        hidden: std::sync::Mutex<Vec<String>>,
        exists: AtomicUsize,
        gets: AtomicUsize,
        lists: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Backend for Unlisted {
        async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
            self.inner.put(key, body, opts).await
        }
        async fn exists(&self, key: &str) -> Result<bool, BackendError> {
            self.exists.fetch_add(1, Ordering::Relaxed);
            self.inner.exists(key).await
        }
        async fn get(&self, key: &str) -> Result<ByteStream, BackendError> {
            self.gets.fetch_add(1, Ordering::Relaxed);
            self.inner.get(key).await
        }
        async fn list_objects(
            &self,
            prefix: &str,
        ) -> Result<Vec<nixpush_backends::ObjectInfo>, BackendError> {
            self.lists.fetch_add(1, Ordering::Relaxed);
            let mut objects = self.inner.list_objects(prefix).await?;
            let hidden = self.hidden.lock().unwrap().clone();
            objects.retain(|o| !hidden.contains(&o.key));
            Ok(objects)
        }
        async fn delete(&self, key: &str) -> Result<(), BackendError> {
            self.inner.delete(key).await
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    fn narinfo(sd: &StoreDir, path: &StorePath, refs: &[&StorePath]) -> (String, String) {
        let nar = format!("nar/{}.nar", path.hash_part());
        let info = NarInfo {
            store_path: sd.display(path),
            url: nar.clone(),
            compression: "none".into(),
            file_hash: None,
            file_size: None,
            nar_hash: Sha256::digest(b"x"),
            nar_size: 1,
            references: refs.iter().map(|r| r.base_name().to_owned()).collect(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
            unknown: Vec::new(),
        };
        (info.render(), nar)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_listing_a_read_per_narinfo_and_a_check_only_for_what_it_lacks() {
        let d = tempfile::tempdir().unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let a = StorePath::from_base_name(&format!("{}-a", "a".repeat(32))).unwrap();
        let b = StorePath::from_base_name(&format!("{}-b", "b".repeat(32))).unwrap();
        std::fs::create_dir(d.path().join("nar")).unwrap();
        std::fs::write(d.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        let mut nars = Vec::new();
        for (p, refs) in [(&a, vec![]), (&b, vec![&a])] {
            let (text, nar) = narinfo(&sd, p, &refs);
            std::fs::write(d.path().join(crate::publish::narinfo_key(p)), text).unwrap();
            std::fs::write(d.path().join(&nar), "x").unwrap();
            nars.push(nar);
        }
        let backend = Unlisted {
            inner: FsBackend::new(d.path().to_owned()).await.unwrap(),
            hidden: Default::default(),
            exists: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
            lists: AtomicUsize::new(0),
        };
        let opts = VerifyOptions {
            store_dir: sd,
            trusted: Vec::new(),
            deep: false,
            jobs: 1,
            upstream: Vec::new(),
        };
        let quiet: EventSink = Arc::new(|_: &Event| {});
        // All listed: one listing, one read per narinfo and of nix-cache-info, nothing else.
        let r = verify(&backend, None, &opts, quiet.clone()).await.unwrap();
        assert!(r.whole(), "{:?}", r.problems);
        let count = |c: &AtomicUsize| c.swap(0, Ordering::Relaxed);
        assert_eq!(
            [&backend.lists, &backend.gets, &backend.exists].map(count),
            [1, 3, 0]
        );

        *backend.hidden.lock().unwrap() = vec![crate::publish::narinfo_key(&a), nars[1].clone()];
        let r = verify(&backend, None, &opts, quiet.clone()).await.unwrap();
        assert!(r.whole(), "{:?}", r.problems);
        // b's NAR and b's reference a: one check each, and no other.
        assert_eq!(count(&backend.exists), 2);

        // Really gone: then they are problems.
        std::fs::remove_file(d.path().join(&nars[1])).unwrap();
        std::fs::remove_file(d.path().join(crate::publish::narinfo_key(&a))).unwrap();
        let r = verify(&backend, None, &opts, quiet).await.unwrap();
        let kinds: Vec<&ProblemKind> = r.problems.iter().map(|p| &p.kind).collect();
        assert_eq!(
            kinds,
            [
                &ProblemKind::NarMissing {
                    nar: nars[1].clone()
                },
                &ProblemKind::ReferenceMissing {
                    reference: "/nix/store/".to_owned() + a.base_name()
                },
            ]
        );
        assert_eq!(
            r.entries[&crate::publish::narinfo_key(&b)].state,
            State::Broken
        );
        assert_eq!(r.missing.len(), 1);
    }
}
