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
//! With several caches there is a worker per cache over the one queue (see [`worker`]).
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
mod metrics;
pub mod protocol;
pub mod queue;
mod server;
pub mod systemd;
pub mod watch_store;
mod worker;

use server::accept_loop;
use worker::{Backoff, WorkerRuntime};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, watch};
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::formats::{StoreDir, StorePath};
use crate::publish::plan::Root;
use crate::publish::{Event, EventSink, Failed, PathError, PushError, Pusher, Summary, filter};
use crate::store::Store;
use protocol::{
    CacheStatus, ErrorRecord, HeldEntry, NEWEST_REJECTED, RejectedRecord, Request, Response,
    StatusReport,
};
use queue::{Entry, Item, Queue, Read};

const LAST_ERRORS: usize = 20;
pub struct Settings {
    pub queue_dir: std::path::PathBuf,
    pub rescan_interval: Duration,
    pub batch_entries: usize,
    pub shutdown_grace: Duration,
    pub retry_max_delay: Duration,
    /// Also queue every path that appears in the store (see [`watch_store`]).
    pub watch_store: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`), bound already; none: not served.
    pub metrics: Option<std::net::TcpListener>,
}

/// What the daemon's parts share: the queue, and the caches it publishes to.
struct Shared {
    /// At least one; each has a worker of its own (see [`worker`]'s module doc).
    caches: Vec<Cache>,
    queue: Queue,
    settings: Settings,
    metrics: metrics::Metrics,
    started: Instant,
    /// With several caches: for each entry some cache has published but another has not yet,
    /// which caches have (by index). The entry stays queued for the others, and the passes of
    /// those that have it leave it out. Lost on a restart, which costs one more pass per cache
    /// that finds everything present.
    done: Mutex<HashMap<OsString, BTreeSet<usize>>>,
}

/// One cache the daemon publishes to, and what its worker keeps.
pub struct Cache {
    /// For logs and `status`: the config's name for it, else its address.
    name: String,
    pusher: Pusher,
    nudge: Notify,
    status: Mutex<StatusState>,
}

impl Cache {
    pub fn new(name: String, pusher: Pusher) -> Self {
        Self {
            name,
            pusher,
            nudge: Notify::new(),
            status: Mutex::new(StatusState::default()),
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, StatusState> {
        // A panic while holding the lock leaves counters that are still good enough to report.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct StatusState {
    in_flight: usize,
    published: u64,
    excluded: u64,
    failed: u64,
    rejected: u64,
    retrying: bool,
    /// Entries retried on their own backoff (see `worker`'s module doc), by name.
    held: BTreeMap<OsString, Held>,
    last_errors: VecDeque<ErrorRecord>,
}

/// An entry some of whose paths failed transiently while the rest of its batch went on.
struct Held {
    backoff: Backoff,
    /// Not tried again before this.
    due: Instant,
    /// The paths that failed, each with why.
    failed: Vec<String>,
    attempts: u32,
}

impl Shared {
    /// The store every cache publishes from (they share one connection).
    fn store(&self) -> &dyn Store {
        self.caches[0].pusher.store()
    }

    /// New work for every cache's worker.
    fn nudge(&self) {
        for c in &self.caches {
            c.nudge.notify_one();
        }
    }

    fn done(&self) -> std::sync::MutexGuard<'_, HashMap<OsString, BTreeSet<usize>>> {
        self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A worker's view: the shared parts and its own cache.
    fn worker(self: &Arc<Self>, index: usize) -> worker::Lane {
        worker::Lane {
            shared: self.clone(),
            index,
        }
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
    #[error(
        "watch-store: cannot watch the store directory {store}: {error}; \
         raise fs.inotify.max_user_watches or max_user_instances, or turn watch-store off"
    )]
    WatchStore { store: String, error: notify::Error },
}

/// Run the daemon until `shutdown` completes, then wind down.
pub async fn run(
    caches: Vec<Cache>,
    mut settings: Settings,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let metrics_listener = settings.metrics.take();
    let queue = Queue::open(&settings.queue_dir).map_err(|error| StartError::Queue {
        dir: settings.queue_dir.clone(),
        error,
    })?;
    queue.clean_stale_temps(Duration::from_secs(3600));
    assert!(!caches.is_empty(), "the config names at least one cache");
    let shared = Arc::new(Shared {
        caches,
        queue,
        settings,
        metrics: metrics::Metrics::new(),
        started: Instant::now(),
        done: Mutex::new(HashMap::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // The watcher only nudges; the worker's periodic rescan catches whatever it misses.
    let _watcher = start_watcher(&shared);
    let _store_watch = if shared.settings.watch_store {
        let watch = watch_store::start(&shared, stop_rx.clone()).map_err(|error| {
            StartError::WatchStore {
                store: shared.store().store_dir().as_str().to_owned(),
                error,
            }
        })?;
        Some(watch)
    } else {
        None
    };
    let worker_rt = WorkerRuntime::new().map_err(StartError::Worker)?;
    // A worker per cache, over the same queue: a cache that is down delays only itself.
    let several = shared.caches.len() > 1;
    let workers: Vec<_> = (0..shared.caches.len())
        .map(|i| {
            // With several caches each worker's log lines name its cache.
            let span = if several {
                info_span!("cache", name = %shared.caches[i].name)
            } else {
                tracing::Span::none()
            };
            worker_rt.spawn(worker::worker(shared.worker(i), stop_rx.clone()).instrument(span))
        })
        .collect();

    if let Some(interval) = crate::daemon::systemd::watchdog_interval() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                crate::daemon::systemd::notify("WATCHDOG=1");
            }
        });
    }

    let caches: Vec<String> = shared
        .caches
        .iter()
        .map(|c| c.pusher.backend_description())
        .collect();
    info!(
        queue = %shared.queue.dir().display(),
        cache = %caches.join(", "),
        "nixpush daemon started"
    );
    // On the worker's runtime: a scrape runs below the socket's priority.
    let metrics_server = metrics_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            info!("serving metrics at http://{addr}/metrics");
        }
        worker_rt.spawn(metrics::serve(l, shared.clone(), stop_rx.clone()))
    });
    // After the lines above, so the log reads in the order things happen.
    let ready: Vec<_> = (0..shared.caches.len())
        .map(|i| tokio::spawn(announce_ready(shared.worker(i), stop_rx.clone())))
        .collect();
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
    for r in ready {
        r.abort();
    }
    for w in workers {
        let _ = w.await;
    }
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    info!("stopped");
    Ok(())
}

/// Tell systemd the daemon is ready once a cache answers (the first of several: the others
/// are waited for by their own workers, and delay nothing else).
async fn announce_ready(lane: worker::Lane, mut stop: watch::Receiver<bool>) {
    // Each attempt is one small read, so they come every PROBE_INTERVAL: READY=1 follows within
    // moments of the cache answering, however long it was away. The log and `status` hear of
    // it on a growing backoff's schedule instead, so a long outage does not flood them.
    let mut warnings = Backoff::new(lane.settings.retry_max_delay);
    let mut next_warning = Instant::now();
    loop {
        match lane.pusher().ensure_cache_info().await {
            Ok(()) => {
                crate::daemon::systemd::notify("READY=1");
                info!(cache = %lane.name(), "cache answered; ready");
                return;
            }
            Err(e) => {
                lane.metrics.push_error(&e);
                if Instant::now() >= next_warning {
                    next_warning = Instant::now() + warnings.next();
                    warn!(cache = %lane.name(), error = %e, retry_in = ?worker::PROBE_INTERVAL, "cache not reachable yet");
                    lane.record_error(format!("cache check: {e}"));
                } else {
                    debug!(cache = %lane.name(), error = %e, "cache not reachable yet");
                }
                tokio::select! {
                    _ = tokio::time::sleep(worker::PROBE_INTERVAL) => {}
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
                s.nudge();
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
