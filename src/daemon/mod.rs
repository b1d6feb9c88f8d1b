//! `nixpush daemon`: takes requests over a Unix socket, keeps them in the queue directory, and
//! publishes them.
//!
//! ```text
//! hook / status ─► socket ─► handler ─► queue dir (durable) ─► ack
//!                                          ▲      │ nudge
//!            files dropped in by hand ─────┘      ▼
//!                      watcher (nudges) ─► worker: scan, batch, push, remove or reject
//!                      timer (rescans)  ─┘        ▲ backoff on failure, forever
//! ```
//! [`run`] gets a bound listener and a shutdown future, as in mini-redis: `main` parses
//! arguments, loads the configuration, binds or inherits the socket, and hands over.
//!
//! Guarantees: a request is acknowledged only once it is durable; an entry leaves the queue
//! only after every path of its closure is published (or it can never be, then it goes to
//! `rejected/` with the reason); transient failures are retried with capped exponential backoff
//! and jitter, without limit; one batch is pushed at a time, so a path is never uploaded twice
//! at once however many requests name it. SIGTERM stops accepting, gives in-flight uploads a
//! grace period, and leaves anything unfinished queued. A `kill -9` at any moment loses
//! nothing, because the queue directory is the truth and the cache is written NAR first,
//! narinfo last.

pub mod hook;
pub mod protocol;
pub mod queue;
pub mod systemd;

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{debug, error, info, info_span, warn, Instrument as _};

use crate::formats::{StoreDir, StorePath};
use crate::publish::plan::Root;
use crate::publish::{Event, EventSink, Failed, PushError, Pusher, Summary};
use crate::store::Store;
use protocol::{ErrorRecord, Request, Response, StatusReport};
use queue::{Entry, Item, Queue, Read};

const MAX_CONNECTIONS: usize = 128;
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
const LAST_ERRORS: usize = 20;
const RETRY_MIN_DELAY: Duration = Duration::from_secs(1);
/// How long a nudged worker waits for more requests before it starts a pass.
const GATHER_DELAY: Duration = Duration::from_millis(500);

pub struct Settings {
    pub queue_dir: std::path::PathBuf,
    pub rescan_interval: Duration,
    pub batch_entries: usize,
    pub shutdown_grace: Duration,
    pub retry_max_delay: Duration,
}

struct Shared {
    pusher: Pusher,
    queue: Queue,
    settings: Settings,
    nudge: Notify,
    status: Mutex<StatusState>,
    started: Instant,
}

#[derive(Default)]
struct StatusState {
    in_flight: usize,
    published: u64,
    failed: u64,
    rejected: u64,
    retrying: bool,
    last_errors: VecDeque<ErrorRecord>,
}

impl Shared {
    fn store(&self) -> &dyn Store {
        self.pusher.store()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, StatusState> {
        // A panic while holding the lock leaves counters that are still good enough to report.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_error(&self, message: String) {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut st = self.status();
        st.last_errors.push_front(ErrorRecord { at, message });
        st.last_errors.truncate(LAST_ERRORS);
    }
}

/// Why the daemon could not start. Each message is whole by itself (the cause is part of it,
/// not also the `source()`).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open queue directory {}: {error}", dir.display())]
    Queue {
        dir: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("cannot start the worker's threads: {0}")]
    Worker(std::io::Error),
}

/// Run the daemon until `shutdown` completes, then wind down.
pub async fn run(
    pusher: Pusher,
    settings: Settings,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let queue = Queue::open(&settings.queue_dir).map_err(|error| StartError::Queue {
        dir: settings.queue_dir.clone(),
        error,
    })?;
    queue.clean_stale_temps(Duration::from_secs(3600));
    let shared = Arc::new(Shared {
        pusher,
        queue,
        settings,
        nudge: Notify::new(),
        status: Mutex::new(StatusState::default()),
        started: Instant::now(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // The watcher only nudges; the worker's periodic rescan catches whatever it misses.
    let _watcher = start_watcher(&shared);
    let worker_rt = WorkerRuntime::new().map_err(StartError::Worker)?;
    let worker = worker_rt.spawn(worker(shared.clone(), stop_rx.clone()));
    let ready = tokio::spawn(announce_ready(shared.clone(), stop_rx.clone()));
    if let Some(interval) = crate::daemon::systemd::watchdog_interval() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                crate::daemon::systemd::notify("WATCHDOG=1");
            }
        });
    }

    info!(
        queue = %shared.queue.dir().display(),
        cache = %shared.pusher.backend_description(),
        "nixpush daemon started"
    );
    // The accept loop runs as a task on a runtime thread, not in the caller's `block_on`: a
    // connection it spawns then starts on the same thread (tokio runs the task spawned last
    // next), with no hand-over to another thread on the way to the acknowledgement.
    let server = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx.clone()));
    shutdown.await;
    info!("shutting down: no new requests; letting in-flight uploads finish");
    crate::daemon::systemd::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    // Returns once the listener is closed.
    let _ = server.await;
    ready.abort();
    let _ = worker.await;
    info!("stopped");
    Ok(())
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut next_request: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = conns.clone().acquire_owned().await else { return };
                    let shared = shared.clone();
                    // One span per request, numbered, so its log lines can be told apart.
                    let span = info_span!("request", id = next_request);
                    next_request += 1;
                    tokio::spawn(async move {
                        let _permit = permit;
                        if tokio::time::timeout(CONNECTION_TIMEOUT, handle(shared, stream)).await.is_err() {
                            debug!("client connection timed out");
                        }
                    }.instrument(span));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn announce_ready(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut delay = Backoff::new(shared.settings.retry_max_delay);
    loop {
        match shared.pusher.ensure_cache_info().await {
            Ok(()) => {
                crate::daemon::systemd::notify("READY=1");
                info!("cache answered; ready");
                return;
            }
            Err(e) => {
                let d = delay.next();
                warn!(error = %e, retry_in = ?d, "cache not reachable yet");
                shared.record_error(format!("cache check: {e}"));
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

fn start_watcher(shared: &Arc<Shared>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let weak = Arc::downgrade(shared);
    let handler = move |res: notify::Result<notify::Event>| {
        // Runs on notify's thread: never panic here, just nudge.
        if res.is_ok() {
            if let Some(s) = weak.upgrade() {
                s.nudge.notify_one();
            }
        }
    };
    match notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(shared.queue.dir(), notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch the queue directory; relying on periodic rescans");
            None
        }
    }
}

async fn handle(shared: Arc<Shared>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(protocol::MAX_MESSAGE as u64 + 1);
    let mut line = Vec::new();
    let response = match reader.read_until(b'\n', &mut line).await {
        Err(e) => Response::Error {
            message: format!("cannot read request: {e}"),
        },
        Ok(_) if line.len() > protocol::MAX_MESSAGE => Response::Error {
            message: format!("request larger than {} bytes", protocol::MAX_MESSAGE),
        },
        Ok(_) => {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            match protocol::parse_request(&line) {
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
                Ok(Request::Status {}) => Response::Status(status_report(&shared).await),
                Ok(Request::Enqueue { items }) => enqueue(&shared, &items).await,
            }
        }
    };
    if let Response::Error { message } = &response {
        warn!(%message, "bad request on the socket");
    }
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

async fn enqueue(shared: &Arc<Shared>, raw: &[String]) -> Response {
    let sd = shared.store().store_dir().clone();
    let mut items = Vec::with_capacity(raw.len());
    for r in raw {
        match Item::parse(&sd, r) {
            Ok(i) => items.push(i),
            Err(e) => {
                return Response::Error {
                    message: e.to_string(),
                }
            }
        }
    }
    if items.is_empty() {
        return Response::Error {
            message: "the request names no store path".into(),
        };
    }
    let queue = shared.queue.clone();
    let write = move || {
        // A path that is not even on disk can never be published: say so now rather than
        // acknowledge it and reject it later. (Validity proper is the worker's to check.)
        let missing: Vec<String> = items
            .iter()
            .map(|(Item::Path(p) | Item::Outputs(p))| sd.display(p))
            .filter(|p| {
                matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            })
            .collect();
        if !missing.is_empty() {
            return Ok(Err(format!(
                "not in the Nix store (no such path): {}",
                missing.join(", ")
            )));
        }
        queue.enqueue(&sd, &items).map(Ok)
    };
    // The write blocks for a few milliseconds (two fsyncs). On this thread, with its other
    // tasks handed to another, the acknowledgement follows it at once; the blocking pool would
    // add two thread wake-ups to every request, the tail of a hook's latency on a busy machine.
    let done = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => Ok(tokio::task::block_in_place(write)),
        _ => tokio::task::spawn_blocking(write).await,
    };
    match done {
        Ok(Ok(Err(message))) => Response::Error { message },
        Ok(Ok(Ok(entry))) => {
            debug!(entry, "queued");
            shared.nudge.notify_one();
            Response::Queued { entry }
        }
        Ok(Err(e)) => Response::Error {
            message: format!("cannot write to the queue: {e}"),
        },
        Err(e) => Response::Error {
            message: format!("internal error: {e}"),
        },
    }
}

async fn status_report(shared: &Arc<Shared>) -> StatusReport {
    let queue = shared.queue.clone();
    let depth = tokio::task::spawn_blocking(move || queue.scan().map(|e| e.len()).unwrap_or(0))
        .await
        .unwrap_or(0);
    let st = shared.status();
    StatusReport {
        cache: shared.pusher.backend_description(),
        uptime_secs: shared.started.elapsed().as_secs(),
        queue_depth: depth,
        in_flight: st.in_flight,
        published: st.published,
        failed: st.failed,
        rejected: st.rejected,
        retrying: st.retrying,
        last_errors: st.last_errors.iter().cloned().collect(),
    }
}

/// How much lower than the rest of the daemon the worker's threads run (a nice increment).
const WORKER_NICE: i32 = 10;

/// The worker's own runtime, whose threads (and so the compressor threads they start and the
/// Nix processes they spawn, which inherit it) run at a lower CPU priority than the request
/// handlers. A post-build-hook waits for its handler and Nix's build loop waits for the hook,
/// so an acknowledgement must not queue behind compression on a busy machine. This only orders
/// the daemon's own threads: under systemd the service is a cgroup of its own and competes
/// with the builds at the weight the unit gives it, whatever its threads' nice values are.
struct WorkerRuntime(Option<tokio::runtime::Runtime>);

impl WorkerRuntime {
    fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("nixpush-worker")
            .on_thread_start(lower_this_threads_priority)
            .enable_all()
            .build()?;
        Ok(Self(Some(rt)))
    }

    fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
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

fn lower_this_threads_priority() {
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
fn release_free_memory() {
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
enum Pass {
    /// Nothing to do.
    Idle,
    /// Entries were finished or rejected. With a backlog (the batch was full), look again at
    /// once; without one, wait for new requests as when idle, so that a stream of hooks is
    /// gathered into batches rather than met by back-to-back passes and their Nix queries.
    Progressed { backlog: bool },
    /// Something failed transiently; wait before trying again.
    RetryLater,
}

async fn worker(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
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
                let d = backoff.next();
                info!(retry_in = ?d, "will retry");
                d
            }
        };
        let nudged = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            // New work while idle starts soon; a failing cache is still given its backoff.
            _ = shared.nudge.notified(), if outcome != Pass::RetryLater => true,
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

/// A ready entry and what it asks for.
struct Ready {
    entry: Entry,
    items: Vec<Item>,
}

async fn process_pass(shared: Arc<Shared>) -> Pass {
    let sd = shared.store().store_dir().clone();
    let queue = shared.queue.clone();
    let batch_max = shared.settings.batch_entries;
    // Read entries off the async threads; reject what can never succeed right away.
    let scanned = tokio::task::spawn_blocking(move || {
        let mut ready = Vec::new();
        let mut rejected = Vec::new();
        let mut backlog = false;
        let entries = queue.scan()?;
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
    if ready.len() == 1 {
        return match settle(&shared, &ready[0].entry, batch_result) {
            Pass::Progressed { .. } => Pass::Progressed { backlog },
            other => other,
        };
    }
    let mut any_retry = false;
    for r in &ready {
        let span = info_span!("entry", name = %r.entry.name);
        let result = async {
            let roots = resolve(&shared, &r.items).await?;
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
enum Failure {
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

fn settle(shared: &Arc<Shared>, entry: &Entry, result: Result<(), Failure>) -> Pass {
    let Err(f) = result else {
        finish(shared, entry);
        return Pass::Progressed { backlog: false };
    };
    let message = f.message(shared.store().store_dir());
    if f.is_transient() {
        warn!(entry = %entry.name, error = %message, "publishing failed; will retry");
        shared.record_error(message);
        Pass::RetryLater
    } else {
        reject(shared, entry, &message);
        Pass::Progressed { backlog: false }
    }
}

fn finish(shared: &Arc<Shared>, entry: &Entry) {
    if let Err(e) = shared.queue.remove(entry) {
        // The entry stays and is pushed again later: harmless, everything is present then.
        warn!(entry = %entry.name, error = %e, "cannot remove a finished queue entry");
    } else {
        debug!(entry = %entry.name, "entry done");
    }
}

fn reject(shared: &Arc<Shared>, entry: &Entry, reason: &str) {
    error!(entry = %entry.name, %reason, "rejecting queue entry");
    shared.status().rejected += 1;
    shared.record_error(format!("rejected {}: {reason}", entry.name));
    if let Err(e) = shared.queue.reject(entry, reason) {
        error!(entry = %entry.name, error = %e, "cannot move the entry to rejected/");
    }
}

/// The store paths a request stands for ([`plan`]); paths that are not valid make it fail
/// for good.
async fn resolve(shared: &Arc<Shared>, items: &[Item]) -> Result<Vec<StorePath>, Failure> {
    let roots: Vec<Root> = items
        .iter()
        .map(|it| match it {
            Item::Path(p) => Root::Path(p.clone()),
            Item::Outputs(d) => Root::Outputs(d.clone()),
        })
        .collect();
    Ok(shared.pusher.resolve(&roots).await?)
}

async fn push(shared: &Arc<Shared>, roots: &[StorePath]) -> Result<(), Failure> {
    if roots.is_empty() {
        return Ok(());
    }
    let events: EventSink = {
        let shared = Arc::downgrade(shared);
        Arc::new(move |e: &Event| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut st = shared.status();
            match e {
                Event::Planned { to_push, .. } => st.in_flight = *to_push,
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
    let summary: Summary = result?;
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
struct Backoff {
    attempt: u32,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self {
            attempt: 0,
            max: max.max(RETRY_MIN_DELAY),
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next(&mut self) -> Duration {
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
