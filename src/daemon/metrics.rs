//! The daemon's Prometheus metrics, and the small HTTP server that serves them at
//! `GET /metrics` when `daemon.metrics-listen` is set (off by default).
//!
//! # What is measured
//! | metric | type | what |
//! |---|---|---|
//! | `nixpush_queue_entries` | gauge | entries in the queue directory, read at each scrape |
//! | `nixpush_queue_oldest_entry_age_seconds` | gauge | since the oldest entry was written (0 when empty) |
//! | `nixpush_queue_enqueued_total{source}` | counter | `socket`: acknowledged requests; `directory`: entries the worker found that did not come through this daemon's socket (the hook's fallback, a hand-written file, `queue retry`, or left from before a restart) |
//! | `nixpush_paths_published_total` | counter | narinfos written |
//! | `nixpush_paths_skipped_total{reason}` | counter | `present`: the cache had it (found before the push, or written by another writer meanwhile); `upstream`: signed by a `skip-signed-by` key; `excluded`: left out by `exclude` or `max-nar-size`, or for referring to such a path |
//! | `nixpush_paths_failed_total` | counter | failures to publish a path: each attempt counts (a batch that failed is tried again entry by entry), and so do the referrers held back by it |
//! | `nixpush_nar_bytes_total` | counter | NAR bytes of the paths published |
//! | `nixpush_compressed_bytes_total` | counter | compressed NAR bytes uploaded for them |
//! | `nixpush_upload_duration_seconds` | histogram | one NAR's upload, from the first byte handed to the backend to durable |
//! | `nixpush_backend_errors_total{kind}` | counter | failed cache operations the daemon saw, by [`ErrorKind`] (`not_found`, `already_exists`, `permission`, `transient`, `config`, `other`) |
//! | `nixpush_retries_total` | counter | passes that failed transiently and are retried after a backoff |
//! | `nixpush_hook_ack_duration_seconds` | histogram | an `enqueue` request, from accepting the connection to the answer written |
//!
//! The counters are counted where the results are reported, not along the way: the push's
//! [`Event`]s (one per path) and the worker's settling of a pass. Everything is an atomic
//! counter; the queue gauges cost one directory read per scrape, on the blocking pool.
//!
//! The text is Prometheus's exposition format 0.0.4, written by the `prometheus-client` crate
//! (the Prometheus project's own Rust client), not by hand.
//!
//! # The server
//! Tiny and bounded, so that a scraper can never delay the hook socket or the worker: it runs
//! on the worker's runtime (lower priority than the socket's), serves HTTP/1 without
//! keep-alive, at most [`MAX_CONNECTIONS`] connections at once (one more is closed at
//! once), each with [`HEADER_TIMEOUT`] to send its request and [`CONNECTION_TIMEOUT`] in all,
//! request heads of at most 8 KiB (hyper's smallest buffer). Only `GET /metrics` is answered;
//! anything else gets 404.

use std::collections::HashSet;
use std::ffi::OsString;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use nixpush_backends::{BackendError, ErrorKind};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::*;
use crate::publish::PathError;

/// Scrapes served at once.
pub(super) const MAX_CONNECTIONS: usize = 4;
/// From the accept to the end of the request head.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// From the accept to the answer written.
pub(super) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

type Label = [(&'static str, &'static str); 1];

pub(super) struct Metrics {
    registry: Registry,
    queue_entries: Gauge,
    queue_oldest_age: Gauge<f64, AtomicU64>,
    enqueued: Family<Label, Counter>,
    published: Counter,
    skipped: Family<Label, Counter>,
    failed: Counter,
    nar_bytes: Counter,
    compressed_bytes: Counter,
    upload_seconds: Histogram,
    backend_errors: Family<Label, Counter>,
    retries: Counter,
    hook_ack_seconds: Histogram,
    /// Names of entries already counted as enqueued through the directory (see
    /// [`Metrics::scanned`]); only the worker touches it.
    counted: Mutex<HashSet<OsString>>,
}

const KINDS: [(ErrorKind, &str); 6] = [
    (ErrorKind::NotFound, "not_found"),
    (ErrorKind::AlreadyExists, "already_exists"),
    (ErrorKind::Permission, "permission"),
    (ErrorKind::Transient, "transient"),
    (ErrorKind::Config, "config"),
    (ErrorKind::Other, "other"),
];

impl Metrics {
    pub(super) fn new() -> Self {
        let mut registry = Registry::default();
        let queue_entries = Gauge::default();
        registry.register(
            "nixpush_queue_entries",
            "Entries in the queue directory",
            queue_entries.clone(),
        );
        let queue_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "nixpush_queue_oldest_entry_age",
            "Time since the oldest queue entry was written (0 when the queue is empty)",
            Unit::Seconds,
            queue_oldest_age.clone(),
        );
        let enqueued = Family::<Label, Counter>::default();
        registry.register(
            "nixpush_queue_enqueued",
            "Queue entries, by how they came: socket (acknowledged requests) or directory \
             (found in the queue directory without coming through this daemon's socket)",
            enqueued.clone(),
        );
        let published = Counter::default();
        registry.register(
            "nixpush_paths_published",
            "Store paths published (narinfo written)",
            published.clone(),
        );
        let skipped = Family::<Label, Counter>::default();
        registry.register(
            "nixpush_paths_skipped",
            "Store paths not uploaded: present (the cache had them) or upstream (signed by a \
             skip-signed-by key)",
            skipped.clone(),
        );
        let failed = Counter::default();
        registry.register(
            "nixpush_paths_failed",
            "Store paths that could not be published",
            failed.clone(),
        );
        let nar_bytes = Counter::default();
        registry.register_with_unit(
            "nixpush_nar",
            "NAR bytes of the store paths published",
            Unit::Bytes,
            nar_bytes.clone(),
        );
        let compressed_bytes = Counter::default();
        registry.register_with_unit(
            "nixpush_compressed",
            "Compressed NAR bytes uploaded for the store paths published",
            Unit::Bytes,
            compressed_bytes.clone(),
        );
        let upload_seconds = Histogram::new([
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ]);
        registry.register_with_unit(
            "nixpush_upload_duration",
            "Time to upload one compressed NAR until it is durable in the cache",
            Unit::Seconds,
            upload_seconds.clone(),
        );
        let backend_errors = Family::<Label, Counter>::default();
        registry.register(
            "nixpush_backend_errors",
            "Failed cache operations, by kind",
            backend_errors.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "nixpush_retries",
            "Publishing passes that failed transiently and are retried after a backoff",
            retries.clone(),
        );
        let hook_ack_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register_with_unit(
            "nixpush_hook_ack_duration",
            "Time from accepting an enqueue request on the socket to its answer written",
            Unit::Seconds,
            hook_ack_seconds.clone(),
        );
        // Every label value from the start, so that a rate over a series that has not moved
        // yet is 0 rather than absent.
        for source in ["socket", "directory"] {
            let _ = enqueued.get_or_create(&[("source", source)]);
        }
        for reason in ["present", "upstream", "excluded"] {
            let _ = skipped.get_or_create(&[("reason", reason)]);
        }
        for (_, kind) in KINDS {
            let _ = backend_errors.get_or_create(&[("kind", kind)]);
        }
        Self {
            registry,
            queue_entries,
            queue_oldest_age,
            enqueued,
            published,
            skipped,
            failed,
            nar_bytes,
            compressed_bytes,
            upload_seconds,
            backend_errors,
            retries,
            hook_ack_seconds,
            counted: Mutex::new(HashSet::new()),
        }
    }

    /// An enqueue request answered after `elapsed`; `queued` if it was acknowledged.
    pub(super) fn hook_answered(&self, elapsed: Duration, queued: bool) {
        self.hook_ack_seconds.observe(elapsed.as_secs_f64());
        if queued {
            self.enqueued.get_or_create(&[("source", "socket")]).inc();
        }
    }

    /// The entries a scan of the queue found: those first seen now, and not written by this
    /// daemon's socket (whose entries [`Queue::enqueue`] names `<time>-<our pid>-<n>`), came
    /// through the directory.
    pub(super) fn scanned(&self, entries: &[Entry]) {
        let pid = std::process::id().to_string();
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = HashSet::with_capacity(counted.len());
        for e in entries {
            if e.name.to_str().is_some_and(|n| written_by(n, &pid)) {
                continue;
            }
            if !counted.contains(&e.name) {
                self.enqueued
                    .get_or_create(&[("source", "directory")])
                    .inc();
            }
            now.insert(e.name.clone());
        }
        // Only names still there are remembered: the set stays as large as the queue.
        *counted = now;
    }

    /// One event of a push (see [`Event`]).
    pub(super) fn event(&self, e: &Event) {
        match e {
            Event::Planned {
                present,
                upstream,
                excluded,
                ..
            } => {
                self.skipped
                    .get_or_create(&[("reason", "excluded")])
                    .inc_by(*excluded as u64);
                self.skipped
                    .get_or_create(&[("reason", "present")])
                    .inc_by(*present as u64);
                self.skipped
                    .get_or_create(&[("reason", "upstream")])
                    .inc_by(*upstream as u64);
            }
            Event::Published {
                nar_size,
                file_size,
                upload,
                ..
            } => {
                self.published.inc();
                self.nar_bytes.inc_by(*nar_size);
                self.compressed_bytes.inc_by(*file_size);
                self.upload_seconds.observe(upload.as_secs_f64());
            }
            Event::AlreadyPublished { .. } => {
                self.skipped.get_or_create(&[("reason", "present")]).inc();
            }
            // Counted when it ends, one way or the other.
            Event::Started { .. } => {}
            Event::Failed { error, .. } => {
                self.failed.inc();
                if let PathError::Backend(e) = &**error {
                    self.backend_error(e);
                }
            }
        }
    }

    pub(super) fn backend_error(&self, e: &BackendError) {
        let kind = KINDS
            .iter()
            .find(|(k, _)| *k == e.kind)
            .map_or("other", |(_, name)| name);
        self.backend_errors.get_or_create(&[("kind", kind)]).inc();
    }

    /// A push or a probe of the cache that failed as a whole.
    pub(super) fn push_error(&self, e: &PushError) {
        if let PushError::Backend { error, .. } = e {
            self.backend_error(error);
        }
    }

    pub(super) fn retry(&self) {
        self.retries.inc();
    }

    /// The metrics as Prometheus text, with the queue gauges read now.
    async fn render(&self, queue: &Queue) -> String {
        let queue = queue.clone();
        let depth = tokio::task::spawn_blocking(move || queue_depth(&queue)).await;
        if let Ok(Ok((entries, oldest))) = depth {
            self.queue_entries
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
            self.queue_oldest_age
                .set(oldest.map_or(0.0, |t| t.elapsed().unwrap_or_default().as_secs_f64()));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Whether `name` is one [`Queue::enqueue`] gave an entry in process `pid`.
fn written_by(name: &str, pid: &str) -> bool {
    let mut parts = name.split('-');
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(time), Some(p), Some(n), None) if digits(time) && p == pid && digits(n)
    )
}

/// How many entries the queue holds, and when the oldest was written.
fn queue_depth(queue: &Queue) -> std::io::Result<(usize, Option<SystemTime>)> {
    let entries = queue.scan()?;
    let oldest = entries
        .iter()
        .filter_map(|e| std::fs::symlink_metadata(queue.dir().join(&e.name)).ok())
        .filter_map(|m| m.modified().ok())
        .min();
    Ok((entries.len(), oldest))
}

/// Serve `GET /metrics` on `listener` until `stop`.
pub(super) async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot serve metrics");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: too many scrapes at once; closing this one");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&shared, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(8192)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics: connection failed"),
                Err(_) => debug!(%peer, "metrics: connection timed out"),
            }
        });
    }
}

async fn answer<B>(shared: &Shared, req: &Request<B>) -> Response<Full<Bytes>> {
    let response = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let text = shared.metrics.render(&shared.queue).await;
        Response::builder()
            .header(hyper::header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)
            .body(Full::new(Bytes::from(text)))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(
                b"only GET /metrics is served here\n",
            )))
    };
    response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.retry();
        let mut text = String::new();
        prometheus_text::encode(&mut text, &m.registry).unwrap();
        for line in [
            "# TYPE nixpush_queue_entries gauge",
            "# TYPE nixpush_queue_oldest_entry_age_seconds gauge",
            "nixpush_queue_enqueued_total{source=\"socket\"} 0",
            "nixpush_queue_enqueued_total{source=\"directory\"} 0",
            "# TYPE nixpush_paths_published_total counter",
            "nixpush_paths_skipped_total{reason=\"present\"} 0",
            "nixpush_paths_failed_total 0",
            "nixpush_nar_bytes_total 0",
            "nixpush_compressed_bytes_total 0",
            "# TYPE nixpush_upload_duration_seconds histogram",
            "nixpush_backend_errors_total{kind=\"transient\"} 0",
            "nixpush_retries_total 1",
            "# TYPE nixpush_hook_ack_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn entries_from_the_directory_are_counted_once() {
        let m = Metrics::new();
        let ours = Entry::new(format!("{:020}-{}-7", 1, std::process::id()));
        let hooks = Entry::new(format!("{:020}-{}-0", 2, u32::MAX));
        let by_hand = Entry::new("my-request");
        let count = || m.enqueued.get_or_create(&[("source", "directory")]).get();
        m.scanned(&[ours.clone(), hooks.clone()]);
        assert_eq!(count(), 1);
        m.scanned(&[ours.clone(), hooks.clone(), by_hand.clone()]);
        assert_eq!(count(), 2);
        m.scanned(std::slice::from_ref(&by_hand));
        assert_eq!(count(), 2);
        // Gone, then back under the same name: a new entry.
        m.scanned(&[]);
        m.scanned(&[by_hand]);
        assert_eq!(count(), 3);
    }
}
