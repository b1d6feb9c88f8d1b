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

use super::*;

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
}

pub(super) async fn worker(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
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
            Pass::Idle => {
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
                continue;
            }
        };
        let nudged = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            // New work while idle starts soon.
            _ = shared.nudge.notified() => true,
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
    shared: &Arc<Shared>,
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
async fn probe(shared: &Arc<Shared>, stop: &mut watch::Receiver<bool>) -> Option<bool> {
    tokio::select! {
        r = tokio::time::timeout(PROBE_TIMEOUT, shared.pusher.ensure_cache_info()) => Some(match r {
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

pub(super) async fn process_pass(shared: Arc<Shared>) -> Pass {
    let sd = shared.store().store_dir().clone();
    let queue = shared.queue.clone();
    let batch_max = shared.settings.batch_entries;
    let counting = shared.clone();
    // Read entries off the async threads; reject what can never succeed right away.
    let scanned = tokio::task::spawn_blocking(move || {
        let mut ready = Vec::new();
        let mut rejected = Vec::new();
        let mut backlog = false;
        let entries = queue.scan()?;
        counting.metrics.scanned(&entries);
        for entry in entries {
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
        Ok::<_, std::io::Error>((ready, rejected, backlog))
    })
    .await;
    let (ready, invalid, backlog) = match scanned {
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

    // One push for the whole batch; if anything fails, go entry by entry to tell apart the
    // entries that can never succeed from those that should wait and retry.
    let span = info_span!("batch", entries = ready.len());
    let batch_result = async {
        // One validity query for the union (not one per entry): a burst of hook requests then
        // costs a few processes per batch, not per build.
        let items: BTreeSet<Item> = ready.iter().flat_map(|r| r.items.iter().cloned()).collect();
        let items: Vec<Item> = items.into_iter().collect();
        let roots = resolve(&shared, &items).await?;
        push(&shared, &roots).await
    }
    .instrument(span)
    .await;
    if batch_result.is_ok() {
        let entries: Vec<Entry> = ready.iter().map(|r| r.entry.clone()).collect();
        if let Err(e) = shared.queue.remove_all(&entries) {
            // They stay and are pushed again later: harmless, everything is present then.
            warn!(error = %e, "cannot remove finished queue entries");
        }
        return Pass::Progressed { backlog };
    }
    if let Err(f) = &batch_result {
        if f.is_transient() {
            // The cache or Nix is unreachable: every entry would fail the same way, so retry
            // the batch rather than going through it entry by entry.
            let message = f.message(shared.store().store_dir());
            warn!(error = %message, "publishing failed; will retry");
            shared.record_error(message);
            return Pass::RetryLater;
        }
    }
    if ready.len() == 1 && !ready[0].entry.is_seen() {
        return match settle(&shared, &ready[0].entry, batch_result) {
            Pass::Progressed { .. } => Pass::Progressed { backlog },
            other => other,
        };
    }
    let mut any_retry = false;
    for r in &ready {
        let span = info_span!("entry", name = %r.entry);
        let result = async {
            let roots = resolve_entry(&shared, r).await?;
            push(&shared, &roots).await
        }
        .instrument(span)
        .await;
        if settle(&shared, &r.entry, result) == Pass::RetryLater {
            any_retry = true;
        }
    }
    if any_retry {
        Pass::RetryLater
    } else {
        Pass::Progressed { backlog }
    }
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

pub(super) fn settle(shared: &Arc<Shared>, entry: &Entry, result: Result<(), Failure>) -> Pass {
    let Err(f) = result else {
        finish(shared, entry);
        return Pass::Progressed { backlog: false };
    };
    let message = f.message(shared.store().store_dir());
    if f.is_transient() {
        warn!(entry = %entry, error = %message, "publishing failed; will retry");
        shared.record_error(message);
        Pass::RetryLater
    } else {
        reject(shared, entry, &message);
        Pass::Progressed { backlog: false }
    }
}

pub(super) fn finish(shared: &Arc<Shared>, entry: &Entry) {
    if let Err(e) = shared.queue.remove(entry) {
        // The entry stays and is pushed again later: harmless, everything is present then.
        warn!(entry = %entry, error = %e, "cannot remove a finished queue entry");
    } else {
        debug!(entry = %entry, "entry done");
    }
}

pub(super) fn reject(shared: &Arc<Shared>, entry: &Entry, reason: &str) {
    error!(entry = %entry, %reason, "rejecting queue entry");
    shared.status().rejected += 1;
    shared.record_error(format!("rejected {entry}: {reason}"));
    if let Err(e) = shared.queue.reject(entry, reason) {
        error!(entry = %entry, error = %e, "cannot move the entry to rejected/");
    }
}

/// The store paths an entry stands for. Paths of a `-seen` entry (see [`super::watch_store`])
/// that are no longer valid were collected since they appeared: they are passed over.
async fn resolve_entry(shared: &Arc<Shared>, r: &Ready) -> Result<Vec<StorePath>, Failure> {
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
pub(super) async fn resolve(
    shared: &Arc<Shared>,
    items: &[Item],
) -> Result<Vec<StorePath>, Failure> {
    let roots: Vec<Root> = items
        .iter()
        .map(|it| match it {
            Item::Path(p) => Root::Path(p.clone()),
            Item::Outputs(d) => Root::Outputs(d.clone()),
        })
        .collect();
    Ok(shared.pusher.resolve(&roots).await?)
}

pub(super) async fn push(shared: &Arc<Shared>, roots: &[StorePath]) -> Result<(), Failure> {
    if roots.is_empty() {
        return Ok(());
    }
    let events: EventSink = {
        let shared = Arc::downgrade(shared);
        Arc::new(move |e: &Event| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.metrics.event(e);
            let mut st = shared.status();
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
    let result = shared.pusher.push(roots, events).await;
    shared.status().in_flight = 0;
    if let Err(e) = &result {
        shared.metrics.push_error(e);
    }
    let summary: Summary = result?;
    if !summary.excluded.is_empty() {
        let sd = shared.pusher.store().store_dir().clone();
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
