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
    ErrorRecord, HeldEntry, NEWEST_REJECTED, RejectedRecord, Request, Response, StatusReport,
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

struct Shared {
    pusher: Pusher,
    queue: Queue,
    settings: Settings,
    nudge: Notify,
    status: Mutex<StatusState>,
    metrics: metrics::Metrics,
    started: Instant,
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
    #[error(
        "watch-store: cannot watch the store directory {store}: {error}; \
         raise fs.inotify.max_user_watches or max_user_instances, or turn watch-store off"
    )]
    WatchStore { store: String, error: notify::Error },
}

/// Run the daemon until `shutdown` completes, then wind down.
pub async fn run(
    pusher: Pusher,
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
    let shared = Arc::new(Shared {
        pusher,
        queue,
        settings,
        nudge: Notify::new(),
        status: Mutex::new(StatusState::default()),
        metrics: metrics::Metrics::new(),
        started: Instant::now(),
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
    let worker = worker_rt.spawn(worker::worker(shared.clone(), stop_rx.clone()));

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
    // On the worker's runtime: a scrape runs below the socket's priority.
    let metrics_server = metrics_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            info!("serving metrics at http://{addr}/metrics");
        }
        worker_rt.spawn(metrics::serve(l, shared.clone(), stop_rx.clone()))
    });
    // After the lines above, so the log reads in the order things happen.
    let ready = tokio::spawn(announce_ready(shared.clone(), stop_rx.clone()));
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
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    info!("stopped");
    Ok(())
}

async fn announce_ready(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    // Each attempt is one small read, so they come every PROBE_INTERVAL: READY=1 follows within
    // moments of the cache answering, however long it was away. The log and `status` hear of
    // it on a growing backoff's schedule instead, so a long outage does not flood them.
    let mut warnings = Backoff::new(shared.settings.retry_max_delay);
    let mut next_warning = Instant::now();
    loop {
        match shared.pusher.ensure_cache_info().await {
            Ok(()) => {
                crate::daemon::systemd::notify("READY=1");
                info!("cache answered; ready");
                return;
            }
            Err(e) => {
                shared.metrics.push_error(&e);
                if Instant::now() >= next_warning {
                    next_warning = Instant::now() + warnings.next();
                    warn!(error = %e, retry_in = ?worker::PROBE_INTERVAL, "cache not reachable yet");
                    shared.record_error(format!("cache check: {e}"));
                } else {
                    debug!(error = %e, "cache not reachable yet");
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
