//! The worker: passes over the queue directory, each a batch of entries resolved through the
//! one plan and pushed in one go; settling entries (remove, reject with a reason, or retry
//! with capped, jittered exponential backoff); its own runtime at a lower priority.
//!
//! # Coming back after an outage
//! The backoff grows to `retry-max-delay-secs` (5 minutes by default), which is right while
//! the cache is down but would leave the queue waiting for minutes once it is back. So a
//! failed pass is followed at once by a probe of the cache (its `nix-cache-info`: one small
//! read, [`PROBE_TIMEOUT`] at most). If it answers, the failure was not the cache's (the store,
//! one path), and the whole backoff is waited out, as before. If not, the backoff is waited
//! out in steps of [`PROBE_INTERVAL`], each followed by another probe, and ends as soon as one
//! answers: the pass runs again within [`PROBE_INTERVAL`] and a probe of the cache coming
//! back.
//!
//! # One bad path holds back nobody
//! A batch's push publishes every path whose closure could be published; after it, each
//! entry is settled by what became of its own roots (a path fails if any path of its closure
//! fails, so a root published means its closure is). An entry none of whose roots failed is
//! done; one with a root that can never succeed is rejected; one whose roots failed
//! transiently is held: it gets a [`Backoff`] of its own and is left out of passes until that
//! runs out, so it neither keeps the rest of its batch in the queue nor makes later entries
//! wait (Mic92/niks3#465). Its next try comes as the rest of the queue's do, in a pass of
//! its own or beside new entries. `status` lists held entries with the paths that failed and
//! why. When a pass achieved nothing but holding, the cache is probed: if it does not answer
//! either, that is an outage, waited out as above, after which every held entry is tried
//! at once.
//!
//! # Several caches
//! Each cache of `[[caches]]` has a worker of its own ([`Lane`]), all over the same queue
//! directory, each with its own backoff, held entries and counters: a cache that is down
//! waits out its own outage while the others go on. An entry a cache has published is
//! marked done for it in memory and left out of its passes; the last cache to publish it
//! removes it. Nothing on disk records who has what: after a crash or restart every cache
//! goes over the whole queue again, and the caches that had an entry find all its paths
//! present (one presence check per path, no upload). Rejection is for entries that can never
//! succeed anywhere (a path that is not valid), so the first cache to reject an entry rejects
//! it for all; `nixpush queue retry` gives it back to every cache.

use super::*;

/// One cache's worker's view of the daemon: the shared parts (through `Deref`) and its own
/// cache.
#[derive(Clone)]
pub(super) struct Lane {
    pub(super) shared: Arc<Shared>,
    pub(super) index: usize,
}

impl std::ops::Deref for Lane {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Lane {
    pub(super) fn cache(&self) -> &Cache {
        &self.shared.caches[self.index]
    }

    pub(super) fn pusher(&self) -> &Pusher {
        &self.cache().pusher
    }

    pub(super) fn name(&self) -> &str {
        &self.cache().name
    }

    pub(super) fn status(&self) -> std::sync::MutexGuard<'_, StatusState> {
        self.cache().status()
    }

    pub(super) fn record_error(&self, message: String) {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut st = self.status();
        st.last_errors.push_front(ErrorRecord { at, message });
        st.last_errors.truncate(LAST_ERRORS);
    }

    /// The entries this cache has published while another cache has not yet.
    fn done_here(&self) -> HashSet<OsString> {
        self.done()
            .iter()
            .filter(|(_, caches)| caches.contains(&self.index))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// This cache has published `entries`: those that every cache has now may leave the
    /// queue (returned); the others wait for the caches that have not.
    fn completed(&self, entries: &[Entry]) -> Vec<Entry> {
        let n = self.caches.len();
        if n == 1 {
            return entries.to_vec();
        }
        let mut done = self.done();
        entries
            .iter()
            .filter(|e| {
                let caches = done.entry(e.name.clone()).or_default();
                caches.insert(self.index);
                let all = caches.len() == n;
                if all {
                    done.remove(&e.name);
                } else {
                    debug!(entry = %e, "published here; waiting for the other caches");
                }
                all
            })
            .cloned()
            .collect()
    }
}

pub(super) const RETRY_MIN_DELAY: Duration = Duration::from_secs(1);

/// While waiting out a backoff, how often the cache is asked whether it answers again.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// How long a probe may take before it counts as no answer.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a nudged worker waits for more requests before it starts a pass.
pub(super) const GATHER_DELAY: Duration = Duration::from_millis(500);

/// How much lower than the rest of the daemon the worker's threads run (a nice increment).
pub(super) const WORKER_NICE: i32 = 10;

/// The worker's own runtime, whose threads (and so the compressor threads they start and the
/// Nix processes they spawn, which inherit it) run at a lower CPU priority than the request
/// handlers. A post-build-hook waits for its handler and Nix's build loop waits for the hook,
/// so an acknowledgement must not queue behind compression on a busy machine. This only orders
/// the daemon's own threads: under systemd the service is a cgroup of its own and competes
/// with the builds at the weight the unit gives it, whatever its threads' nice values are.
pub(super) struct WorkerRuntime(Option<tokio::runtime::Runtime>);

impl WorkerRuntime {
    pub(super) fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("nixpush-worker")
            .on_thread_start(lower_this_threads_priority)
            .enable_all()
            .build()?;
        Ok(Self(Some(rt)))
    }

    pub(super) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("runtime present until drop")
            .spawn(future)
    }
}

impl Drop for WorkerRuntime {
    fn drop(&mut self) {
        // Dropped from async code, where a blocking shutdown would panic; by now the worker
        // has returned, and anything left (an idle connection pool) may simply go.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub(super) fn lower_this_threads_priority() {
    #[allow(unsafe_code)]
    // SAFETY: nice() only changes the scheduling priority of the calling thread (on Linux a
    // nice value belongs to a thread); it touches no memory of ours. Failure leaves the
    // priority as it was, which is safe.
    let r = unsafe { libc::nice(WORKER_NICE) };
    if r == -1 {
        // -1 is also a legitimate new value, so this may be a false alarm: only a debug line.
        debug!(error = %std::io::Error::last_os_error(), "cannot lower a worker thread's priority");
    }
}

/// Hand memory freed by the last passes back to the system while the daemon waits: the
/// allocator keeps up to 16 MiB free per arena so that a push does not fault its buffers in
/// again for every path (see `tune_malloc` in main.rs), which an idle daemon need not hold.
pub(super) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it is thread-safe and
    // leaves every allocation in place.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What one pass over the queue achieved.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pass {
    /// Nothing to do.
    Idle,
    /// Entries were finished or rejected. With a backlog (the batch was full), look again at
    /// once; without one, wait for new requests as when idle, so that a stream of hooks is
    /// gathered into batches rather than met by back-to-back passes and their Nix queries.
    Progressed { backlog: bool },
    /// Something failed transiently; wait before trying again.
    RetryLater,
    /// Nothing was finished, but the cache took part: the entries tried were held, each on
    /// its own backoff.
    Held,
}

impl Lane {
    /// The held entries whose time has not come.
    fn held_not_due(&self) -> HashSet<OsString> {
        let now = Instant::now();
        self.status()
            .held
            .iter()
            .filter(|(_, h)| h.due > now)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// When the first held entry is due again.
    fn next_held_due(&self) -> Option<Instant> {
        self.status().held.values().map(|h| h.due).min()
    }

    /// Make every held entry due now (their backoffs keep growing where they left off).
    fn release_held(&self) {
        let now = Instant::now();
        for h in self.status().held.values_mut() {
            h.due = now;
        }
    }
}

pub(super) async fn worker(shared: Lane, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(shared.settings.retry_max_delay);
    let mut worked_since_idle = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let pass = process_pass(shared.clone());
        tokio::pin!(pass);
        let outcome = tokio::select! {
            r = &mut pass => r,
            _ = stop.changed() => {
                match tokio::time::timeout(shared.settings.shutdown_grace, &mut pass).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!("shutdown grace period over; unfinished requests stay queued");
                        return;
                    }
                }
            }
        };
        worked_since_idle |= outcome != Pass::Idle;
        // Held entries alone tell nothing of the cache: if it does not answer either, this
        // is an outage, waited out as one (probing, so that it ends as soon as the cache is
        // back); else the cache is well and only those entries wait.
        let outcome = match outcome {
            Pass::Held => match probe(&shared, &mut stop).await {
                None => return,
                Some(false) => Pass::RetryLater,
                Some(true) => Pass::Held,
            },
            other => other,
        };
        let wait = match outcome {
            Pass::Progressed { backlog: true } => {
                backoff.reset();
                shared.status().retrying = false;
                continue;
            }
            Pass::Progressed { backlog: false } => {
                backoff.reset();
                shared.status().retrying = false;
                shared.settings.rescan_interval
            }
            Pass::Idle | Pass::Held => {
                backoff.reset();
                shared.status().retrying = false;
                if std::mem::take(&mut worked_since_idle) {
                    release_free_memory();
                }
                shared.settings.rescan_interval
            }
            Pass::RetryLater => {
                shared.status().retrying = true;
                shared.metrics.retry();
                let d = backoff.next();
                info!(retry_in = ?d, "will retry");
                // A failing cache is given its backoff (new work does not cut it short), unless
                // it answers again meanwhile.
                if !wait_out_backoff(&shared, d, &mut stop).await {
                    return;
                }
                // Whatever was held failed perhaps for the same reason: all go again now.
                shared.release_held();
                continue;
            }
        };
        // The first held entry's time comes before the rescan's: a pass then.
        let wait = match shared.next_held_due() {
            Some(due) => wait.min(due.saturating_duration_since(Instant::now())),
            None => wait,
        };
        let nudged = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            // New work while idle starts soon.
            _ = shared.cache().nudge.notified() => true,
            _ = stop.changed() => return,
        };
        if nudged {
            // Builds finish in bursts: gather what arrives in the next moment into the same
            // batch, instead of starting a pass (and Nix queries) per request while the hooks
            // of the burst still wait for their acknowledgements.
            tokio::select! {
                _ = tokio::time::sleep(GATHER_DELAY) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Wait out `delay` after a failed pass, probing the cache at once and then every
/// [`PROBE_INTERVAL`]; end early once it answers after it did not (see the module doc). False
/// if told to stop.
async fn wait_out_backoff(
    shared: &Lane,
    delay: Duration,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let until = tokio::time::Instant::now() + delay;
    let Some(answered) = probe(shared, stop).await else {
        return false;
    };
    if answered {
        // The cache was not what failed: the whole backoff, no more probes.
        return tokio::select! {
            _ = tokio::time::sleep_until(until) => true,
            _ = stop.changed() => false,
        };
    }
    loop {
        let step = until
            .saturating_duration_since(tokio::time::Instant::now())
            .min(PROBE_INTERVAL);
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = stop.changed() => return false,
        }
        if tokio::time::Instant::now() >= until {
            return true;
        }
        match probe(shared, stop).await {
            None => return false,
            Some(true) => {
                info!("the cache answers again; retrying now");
                return true;
            }
            Some(false) => {}
        }
    }
}

/// Whether the cache answers (its `nix-cache-info` within [`PROBE_TIMEOUT`]); `None` if told
/// to stop meanwhile.
async fn probe(shared: &Lane, stop: &mut watch::Receiver<bool>) -> Option<bool> {
    tokio::select! {
        r = tokio::time::timeout(PROBE_TIMEOUT, shared.pusher().ensure_cache_info()) => Some(match r {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                shared.metrics.push_error(&e);
                debug!(error = %e, "the cache does not answer yet");
                false
            }
            Err(_) => {
                debug!(timeout = ?PROBE_TIMEOUT, "the cache does not answer yet");
                false
            }
        }),
        _ = stop.changed() => None,
    }
}

/// A ready entry and what it asks for.
pub(super) struct Ready {
    pub(super) entry: Entry,
    pub(super) items: Vec<Item>,
}

pub(super) async fn process_pass(shared: Lane) -> Pass {
    let sd = shared.store().store_dir().clone();
    let queue = shared.queue.clone();
    let batch_max = shared.settings.batch_entries;
    let counting = shared.clone();
    // Held entries wait for their own time; until then they take no place in a batch.
    let mut not_due = shared.held_not_due();
    // Entries this cache has published wait for the other caches, not for it.
    not_due.extend(shared.done_here());
    // Read entries off the async threads; reject what can never succeed right away.
    let scanned = tokio::task::spawn_blocking(move || {
        let mut ready = Vec::new();
        let mut rejected = Vec::new();
        let mut backlog = false;
        let entries = queue.scan()?;
        counting.metrics.scanned(&entries);
        let names: HashSet<OsString> = entries.iter().map(|e| e.name.clone()).collect();
        for entry in entries {
            if not_due.contains(&entry.name) {
                continue;
            }
            if ready.len() >= batch_max {
                backlog = true;
                break;
            }
            match queue.read(&sd, &entry) {
                Read::Items(items) => ready.push(Ready { entry, items }),
                Read::NotReady | Read::Gone => {}
                Read::Invalid(reason) => rejected.push((entry, reason)),
            }
        }
        Ok::<_, std::io::Error>((ready, rejected, backlog, names))
    })
    .await;
    let (ready, invalid, backlog, names) = match scanned {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            error!(error = %e, "cannot scan the queue directory");
            shared.record_error(format!("queue scan: {e}"));
            return Pass::RetryLater;
        }
        Err(e) => {
            error!(error = %e, "queue scan task failed");
            return Pass::RetryLater;
        }
    };
    // Held entries removed by hand (or by `nixpush queue`) are forgotten.
    shared.status().held.retain(|name, _| names.contains(name));
    if shared.caches.len() > 1 {
        // So are entries rejected by another cache, or removed by hand, that this one had.
        shared.done().retain(|name, _| names.contains(name));
    }
    let mut progressed = false;
    for (entry, reason) in invalid {
        reject(&shared, &entry, &reason.to_string());
        progressed = true;
    }
    if ready.is_empty() {
        return if progressed {
            Pass::Progressed { backlog }
        } else {
            Pass::Idle
        };
    }

    // One push for the whole batch. If some paths fail, every entry whose roots were all
    // published is done, and the others are settled by what their own paths did: rejected if
    // that can never succeed, else held for a retry on their own backoff. If the push failed
    // as a whole, for a reason that is not an outage, go entry by entry to find the entries
    // that can never succeed.
    let span = info_span!("batch", entries = ready.len());
    let batch = async {
        // One validity query for the union (not one per entry): a burst of hook requests then
        // costs a few processes per batch, not per build.
        let items: BTreeSet<Item> = ready.iter().flat_map(|r| r.items.iter().cloned()).collect();
        let items: Vec<Item> = items.into_iter().collect();
        let roots = resolve(&shared, &items).await.map_err(|f| (f, None))?;
        match push(&shared, &roots).await {
            Ok(()) => Ok(()),
            Err(f) => Err((f, Some(roots))),
        }
    }
    .instrument(span)
    .await;
    let mut tally = Tally::default();
    match batch {
        Ok(_) => {
            let entries: Vec<Entry> = ready.iter().map(|r| r.entry.clone()).collect();
            {
                let mut st = shared.status();
                for e in &entries {
                    st.held.remove(&e.name);
                }
            }
            let entries = shared.completed(&entries);
            if let Err(e) = shared.queue.remove_all(&entries) {
                // They stay and are pushed again later: harmless, everything is present then.
                warn!(error = %e, "cannot remove finished queue entries");
            }
            return Pass::Progressed { backlog };
        }
        Err((Failure::Paths(failed), Some(roots))) => {
            let failed = FailedPaths::new(&failed);
            for r in &ready {
                // A batch of one entry has its roots already; others ask the store for theirs
                // (only after a failure, so the common case keeps its one query).
                let mine = if ready.len() == 1 {
                    Ok(roots.clone())
                } else {
                    resolve_entry(&shared, r).await
                };
                match mine {
                    Ok(mine) => tally.add(settle_paths(&shared, &r.entry, &mine, &failed)),
                    Err(f) => tally.add(settle(&shared, &r.entry, Err(f))),
                }
            }
        }
        Err((f, _)) if f.is_transient() => {
            // The cache or Nix is unreachable: every entry would fail the same way, so retry
            // the batch rather than going through it entry by entry.
            let message = f.message(shared.store().store_dir());
            warn!(error = %message, "publishing failed; will retry");
            shared.record_error(message);
            return Pass::RetryLater;
        }
        Err((f, _)) if ready.len() == 1 && !ready[0].entry.is_seen() => {
            tally.add(settle(&shared, &ready[0].entry, Err(f)))
        }
        Err(_) => {
            for r in &ready {
                let span = info_span!("entry", name = %r.entry);
                let settled = async {
                    match resolve_entry(&shared, r).await {
                        Err(f) => settle(&shared, &r.entry, Err(f)),
                        Ok(roots) => match push(&shared, &roots).await {
                            Ok(()) => settle(&shared, &r.entry, Ok(())),
                            Err(Failure::Paths(failed)) => {
                                settle_paths(&shared, &r.entry, &roots, &FailedPaths::new(&failed))
                            }
                            Err(f) => settle(&shared, &r.entry, Err(f)),
                        },
                    }
                }
                .instrument(span)
                .await;
                tally.add(settled);
            }
        }
    }
    if tally.outage {
        Pass::RetryLater
    } else if tally.progressed {
        Pass::Progressed { backlog }
    } else {
        Pass::Held
    }
}

/// How the entries of a pass were settled.
#[derive(Default)]
struct Tally {
    /// Some entry was finished or rejected.
    progressed: bool,
    /// Some entry failed for a reason that is nobody's own (the cache or Nix unreachable).
    outage: bool,
}

impl Tally {
    fn add(&mut self, s: Settled) {
        match s {
            Settled::Finished | Settled::Rejected => self.progressed = true,
            Settled::Held => {}
            Settled::Outage => self.outage = true,
        }
    }
}

/// What became of one entry.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Settled {
    Finished,
    Rejected,
    /// Some of its paths failed transiently: retried on its own backoff.
    Held,
    /// It could not be tried (the cache or Nix unreachable): the whole pass is retried.
    Outage,
}

/// The paths that failed in a push, to settle entries by what their own roots did.
struct FailedPaths<'a> {
    by_path: HashMap<&'a StorePath, &'a Failed>,
}

impl<'a> FailedPaths<'a> {
    fn new(failed: &'a [Failed]) -> Self {
        Self {
            by_path: failed.iter().map(|f| (&f.path, f)).collect(),
        }
    }

    /// Where the failure of `f` began: a path held back because a reference failed points
    /// to that reference, and so on down to a path that failed by itself.
    fn origin(&self, mut f: &'a Failed) -> &'a Failed {
        // A closure is acyclic; the bound is for a store that is not.
        for _ in 0..self.by_path.len() {
            match &*f.error {
                PathError::Reference { path, .. } => match self.by_path.get(path) {
                    Some(next) => f = next,
                    None => break,
                },
                _ => break,
            }
        }
        f
    }
}

/// Settle an entry whose roots are `roots` after a push in which `failed` failed: finished if
/// none of its roots failed (a path fails if any path of its closure does, so its closure is
/// published), rejected if one failed for good, else held.
fn settle_paths(
    shared: &Lane,
    entry: &Entry,
    roots: &[StorePath],
    failed: &FailedPaths<'_>,
) -> Settled {
    let mine: Vec<&Failed> = roots
        .iter()
        .filter_map(|p| failed.by_path.get(p).copied())
        .collect();
    if mine.is_empty() {
        finish(shared, entry);
        return Settled::Finished;
    }
    let sd = shared.store().store_dir();
    // The paths that failed by themselves, each once, rather than every root held back.
    let mut origins: Vec<&Failed> = mine.iter().map(|f| failed.origin(f)).collect();
    origins.sort_by(|a, b| a.path.cmp(&b.path));
    origins.dedup_by(|a, b| a.path == b.path);
    let described: Vec<String> = origins
        .iter()
        .map(|f| format!("{}: {}", sd.display(&f.path), f.error))
        .collect();
    if mine.iter().all(|f| f.is_transient()) {
        hold(shared, entry, described);
        Settled::Held
    } else {
        reject(shared, entry, &described.join("; "));
        Settled::Rejected
    }
}

/// Put `entry` on its own backoff: it is left out of passes until its time comes, so that
/// it delays no other entry.
fn hold(shared: &Lane, entry: &Entry, failed: Vec<String>) {
    let message = failed.join("; ");
    let (attempts, delay) = {
        let mut st = shared.status();
        let max = shared.settings.retry_max_delay;
        let h = st.held.entry(entry.name.clone()).or_insert_with(|| Held {
            backoff: Backoff::new(max),
            due: Instant::now(),
            failed: Vec::new(),
            attempts: 0,
        });
        let delay = h.backoff.next();
        h.due = Instant::now() + delay;
        h.failed = failed;
        h.attempts += 1;
        (h.attempts, delay)
    };
    warn!(
        entry = %entry,
        attempts,
        retry_in = ?delay,
        error = %message,
        "some paths of this entry failed; it is retried on its own while other entries go on"
    );
    shared.record_error(format!(
        "{entry}: {message} (attempt {attempts}; retrying in {} s, other entries go on)",
        delay.as_secs().max(1)
    ));
}

/// Why an entry (or a batch) was not published.
#[derive(Debug)]
pub(super) enum Failure {
    /// The push did not start or did not finish: the cache or Nix was unreachable, or a path
    /// is not valid.
    Push(PushError),
    /// These paths failed; the others were published.
    Paths(Vec<Failed>),
}

impl From<PushError> for Failure {
    fn from(e: PushError) -> Self {
        Failure::Push(e)
    }
}

impl Failure {
    /// Whether retrying later may succeed: only if it may for every path that failed.
    fn is_transient(&self) -> bool {
        match self {
            Failure::Push(e) => e.is_transient(),
            Failure::Paths(failed) => failed.iter().all(Failed::is_transient),
        }
    }

    /// For the log, `status` and the `.reason` file of a rejected entry.
    fn message(&self, sd: &StoreDir) -> String {
        match self {
            Failure::Push(e) => e.to_string(),
            Failure::Paths(failed) => failed
                .iter()
                .map(|f| format!("{}: {}", sd.display(&f.path), f.error))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// Settle an entry by the result of its own push (or of a batch of it alone).
pub(super) fn settle(shared: &Lane, entry: &Entry, result: Result<(), Failure>) -> Settled {
    let Err(f) = result else {
        finish(shared, entry);
        return Settled::Finished;
    };
    let message = f.message(shared.store().store_dir());
    match f {
        Failure::Paths(failed) => {
            // Every path that failed is of this entry: held if each may yet succeed.
            if failed.iter().all(Failed::is_transient) {
                let failed = FailedPaths::new(&failed);
                let mut origins: Vec<String> = failed
                    .by_path
                    .values()
                    .map(|f| failed.origin(f))
                    .map(|f| {
                        format!(
                            "{}: {}",
                            shared.store().store_dir().display(&f.path),
                            f.error
                        )
                    })
                    .collect();
                origins.sort();
                origins.dedup();
                hold(shared, entry, origins);
                Settled::Held
            } else {
                reject(shared, entry, &message);
                Settled::Rejected
            }
        }
        Failure::Push(e) if e.is_transient() => {
            warn!(entry = %entry, error = %message, "publishing failed; will retry");
            shared.record_error(message);
            Settled::Outage
        }
        Failure::Push(_) => {
            reject(shared, entry, &message);
            Settled::Rejected
        }
    }
}

pub(super) fn finish(shared: &Lane, entry: &Entry) {
    shared.status().held.remove(&entry.name);
    if shared.completed(std::slice::from_ref(entry)).is_empty() {
        return;
    }
    if let Err(e) = shared.queue.remove(entry) {
        // The entry stays and is pushed again later: harmless, everything is present then.
        warn!(entry = %entry, error = %e, "cannot remove a finished queue entry");
    } else {
        debug!(entry = %entry, "entry done");
    }
}

pub(super) fn reject(shared: &Lane, entry: &Entry, reason: &str) {
    error!(entry = %entry, %reason, "rejecting queue entry");
    if let Err(e) = shared.queue.reject(entry, reason) {
        // A full queue directory, say: the entry stays where it is and is rejected again at
        // a later pass.
        error!(entry = %entry, error = %e, "cannot move the entry to rejected/; it stays queued");
        shared.record_error(format!(
            "cannot move {entry} to rejected/ ({e}); it stays queued; why it is rejected: {reason}"
        ));
        return;
    }
    {
        let mut st = shared.status();
        st.rejected += 1;
        st.held.remove(&entry.name);
    }
    shared.record_error(format!("rejected {entry}: {reason}"));
}

/// The store paths an entry stands for. Paths of a `-seen` entry (see [`super::watch_store`])
/// that are no longer valid were collected since they appeared: they are passed over.
async fn resolve_entry(shared: &Lane, r: &Ready) -> Result<Vec<StorePath>, Failure> {
    if !r.entry.is_seen() {
        return resolve(shared, &r.items).await;
    }
    let paths: Vec<StorePath> = r
        .items
        .iter()
        .filter_map(|i| match i {
            Item::Path(p) => Some(p.clone()),
            Item::Outputs(_) => None,
        })
        .collect();
    let valid = shared
        .store()
        .valid_paths(&paths)
        .await
        .map_err(|e| Failure::Push(e.into()))?;
    let sd = shared.store().store_dir();
    let items: Vec<Item> = r
        .items
        .iter()
        .filter(|i| match i {
            Item::Path(p) if !valid.contains(p) => {
                info!(path = %sd.display(p), "passed over: collected since it appeared in the store");
                false
            }
            _ => true,
        })
        .cloned()
        .collect();
    resolve(shared, &items).await
}

/// The store paths a request stands for ([`plan`]); paths that are not valid make it fail
/// for good.
pub(super) async fn resolve(shared: &Lane, items: &[Item]) -> Result<Vec<StorePath>, Failure> {
    let roots: Vec<Root> = items
        .iter()
        .map(|it| match it {
            Item::Path(p) => Root::Path(p.clone()),
            Item::Outputs(d) => Root::Outputs(d.clone()),
        })
        .collect();
    Ok(shared.pusher().resolve(&roots).await?)
}

pub(super) async fn push(shared: &Lane, roots: &[StorePath]) -> Result<(), Failure> {
    if roots.is_empty() {
        return Ok(());
    }
    let events: EventSink = {
        let (weak, index) = (Arc::downgrade(&shared.shared), shared.index);
        Arc::new(move |e: &Event| {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            shared.metrics.event(e);
            let mut st = shared.caches[index].status();
            match e {
                Event::Planned { to_push, .. } => st.in_flight = *to_push,
                Event::Started { .. } => {}
                Event::Published { .. } | Event::AlreadyPublished { .. } => {
                    st.in_flight = st.in_flight.saturating_sub(1);
                    st.published += 1;
                }
                Event::Failed { .. } => {
                    st.in_flight = st.in_flight.saturating_sub(1);
                    st.failed += 1;
                }
            }
        })
    };
    let result = shared.pusher().push(roots, events).await;
    shared.status().in_flight = 0;
    if let Err(e) = &result {
        shared.metrics.push_error(e);
    }
    let summary: Summary = result?;
    if !summary.excluded.is_empty() {
        let sd = shared.pusher().store().store_dir().clone();
        let display = |p: &StorePath| sd.display(p);
        for (path, why) in &summary.excluded {
            let why = filter::Explained {
                why,
                display: &display,
            };
            info!(path = %sd.display(path), "left out: {why}");
        }
        shared.status().excluded += summary.excluded.len() as u64;
    }
    if summary.published > 0 {
        info!(
            published = summary.published,
            present = summary.present,
            nar_bytes = summary.nar_bytes,
            "published"
        );
    }
    if summary.failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Paths(summary.failed))
    }
}

/// Exponential backoff with full jitter, capped; never gives up.
pub(super) struct Backoff {
    pub(super) attempt: u32,
    pub(super) max: Duration,
}

impl Backoff {
    pub(super) fn new(max: Duration) -> Self {
        Self {
            attempt: 0,
            max: max.max(RETRY_MIN_DELAY),
        }
    }

    pub(super) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(super) fn next(&mut self) -> Duration {
        let exp = RETRY_MIN_DELAY.saturating_mul(1u32 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let cap = exp.min(self.max);
        // Half fixed, half random: spreads builders that failed together without ever waiting
        // close to nothing.
        let mut r = [0u8; 4];
        let frac = if getrandom::getrandom(&mut r).is_ok() {
            f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX)
        } else {
            0.5
        };
        cap.mul_f64(0.5 + 0.5 * frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(10));
        let first = b.next();
        assert!(first >= Duration::from_millis(500) && first <= RETRY_MIN_DELAY);
        for _ in 0..30 {
            assert!(b.next() <= Duration::from_secs(10));
        }
        assert!(b.next() >= Duration::from_secs(5));
        b.reset();
        assert!(b.next() <= RETRY_MIN_DELAY);
    }
}
