//! The socket side of the daemon: accept, read one request line, answer it. An `enqueue` is
//! acknowledged only once its queue entry is durable; the request is handled on the thread
//! that read it.
//!
//! # Slow and hostile clients
//! A post-build-hook waits for its acknowledgement while Nix's build loop waits for the hook,
//! so no number of idle, half-sent or trickling connections may delay it. The rules:
//! - **Always accept.** The loop never waits for a slot before it accepts the next
//!   connection, so the listen queue does not fill behind it and a hook's `connect` returns at
//!   once. Until its first bytes arrive a connection costs a descriptor and a small task (no
//!   read buffer: that is allocated when the socket becomes readable).
//! - **A deadline for the request.** The request line must be complete within
//!   [`REQUEST_TIMEOUT`] of the accept; a hook's is a few hundred bytes, written right after
//!   its `connect`. A connection that is idle, stops half-way or trickles is then closed, told
//!   why.
//! - **Shed the oldest waiting connection, never the newest.** At most [`MAX_WAITING`]
//!   connections may be waiting for their request line; one more closes the oldest of them
//!   (told why, if it listens). A hook that has just connected is the newest and sends its
//!   line at once, so only more than [`MAX_WAITING`] new connections within that moment push
//!   it out, and then it falls back to the queue directory within its timeout. Out of
//!   descriptors (`EMFILE`, `ENFILE`), the loop sheds the oldest waiting connection and
//!   accepts again. Where the descriptor limit is low, fewer may wait (half of what is left
//!   after [`RESERVED_DESCRIPTORS`]; 480 under the usual limit of 1024), so that a connection
//!   that has sent its request can still open its queue entry and the worker its files.
//! - **Bounded memory.** A request is at most [`protocol::MAX_MESSAGE`]; a line longer than
//!   [`SMALL_REQUEST`] needs one of [`LARGE_REQUESTS`] permits (waited for within the same
//!   deadline) to be read further, so the buffers of waiting connections come to at most
//!   `MAX_WAITING` × 64 KiB + `LARGE_REQUESTS` × 1 MiB (48 MiB), however many connect.
//! - Once its line is read, a connection is no longer waiting and is never shed; it is
//!   answered within [`ANSWER_TIMEOUT`] (an enqueue's write and flush, or a status scan).
//!
//! What a flood of connections can still cost a hook is CPU: accepting and closing a
//! connection is a few microseconds of a runtime thread.

use std::collections::BTreeMap;

use super::*;

/// Connections that may wait for their request line at once; one more closes the oldest.
pub(super) const MAX_WAITING: usize = 512;

/// Descriptors left for everything but waiting connections: the queue's files, the store's
/// connection, the cache's files and sockets, the worker's staging files.
pub(super) const RESERVED_DESCRIPTORS: u64 = 64;

/// From the accept to the end of the request line.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// From the end of the request line to the answer written.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request line up to this long is read without a permit.
pub(super) const SMALL_REQUEST: usize = 64 << 10;

/// How many request lines longer than [`SMALL_REQUEST`] may be read at once.
pub(super) const LARGE_REQUESTS: usize = 16;

/// Read buffers grow by this much as the bytes arrive.
const READ_CHUNK: usize = 4096;

/// How often at most the log says that connections are being shed.
const SHED_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// The connections waiting for their request line, oldest first. Dropping a connection's
/// sender tells it to close.
struct Waiting {
    /// How many may wait: [`MAX_WAITING`], or fewer under a low descriptor limit.
    limit: usize,
    conns: BTreeMap<u64, tokio::sync::oneshot::Sender<()>>,
    shed: u64,
    last_warning: Option<Instant>,
}

impl Waiting {
    /// Close the oldest waiting connection; whether there was one.
    fn shed_oldest(&mut self) -> bool {
        if self.conns.pop_first().is_none() {
            return false;
        }
        self.shed += 1;
        if self
            .last_warning
            .is_none_or(|t| t.elapsed() >= SHED_WARNING_INTERVAL)
        {
            self.last_warning = Some(Instant::now());
            warn!(
                limit = self.limit,
                closed_so_far = self.shed,
                "too many connections are waiting to send their request; closing the oldest"
            );
        }
        true
    }
}

type WaitingList = Arc<Mutex<Waiting>>;

fn lock(w: &WaitingList) -> std::sync::MutexGuard<'_, Waiting> {
    // Nothing panics while holding it; if something did, the map is still usable.
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection's place in the waiting list; leaves it when dropped.
struct WaitingSlot {
    list: WaitingList,
    id: u64,
}

impl WaitingSlot {
    /// Stop waiting, to be answered. False if the connection was shed meanwhile.
    fn leave(self) -> bool {
        let present = lock(&self.list).conns.remove(&self.id).is_some();
        std::mem::forget(self);
        present
    }
}

impl Drop for WaitingSlot {
    fn drop(&mut self) {
        lock(&self.list).conns.remove(&self.id);
    }
}

pub(super) async fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let limit = waiting_limit();
    if limit < MAX_WAITING {
        info!(
            "the descriptor limit lets at most {limit} connections wait for their request; \
             raise it (LimitNOFILE=) for more"
        );
    }
    let waiting: WaitingList = Arc::new(Mutex::new(Waiting {
        limit,
        conns: BTreeMap::new(),
        shed: 0,
        last_warning: None,
    }));
    let large = Arc::new(Semaphore::new(LARGE_REQUESTS));
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let id = next_id;
                    next_id += 1;
                    let (tx, shed) = tokio::sync::oneshot::channel();
                    {
                        let mut w = lock(&waiting);
                        w.conns.insert(id, tx);
                        while w.conns.len() > w.limit && w.shed_oldest() {}
                    }
                    let slot = WaitingSlot { list: waiting.clone(), id };
                    // One span per connection, numbered, so its log lines can be told apart.
                    let span = info_span!("request", id);
                    tokio::spawn(
                        connection(shared.clone(), stream, slot, shed, large.clone(), limit)
                            .instrument(span),
                    );
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors: make room by closing the oldest waiting connection
                    // (its task closes it; give it a moment to run, or this would shed them
                    // all before the first had closed); with none to close, back off.
                    if lock(&waiting).shed_oldest() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// How many connections may wait for their request at once (see the module doc).
fn waiting_limit() -> usize {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit only writes one `rlimit` into the struct passed, which outlives the
    // call.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if r != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
        return MAX_WAITING;
    }
    let room = rl.rlim_cur.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    MAX_WAITING.min(usize::try_from(room).unwrap_or(usize::MAX).max(1))
}

/// Why no request line was read.
enum ReadError {
    Io(std::io::Error),
    TooLarge,
}

async fn connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    slot: WaitingSlot,
    mut shed: tokio::sync::oneshot::Receiver<()>,
    large: Arc<Semaphore>,
    limit: usize,
) {
    let accepted = Instant::now();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&stream, &large));
    let line = tokio::select! {
        r = read => r,
        _ = &mut shed => {
            debug!("closing a connection that sent no request yet, to make room");
            refuse_now(&stream, &format!(
                "closed by nixpush daemon: more than {limit} connections were waiting to \
                 send a request and this was the oldest; send the request as soon as you connect"
            ));
            return;
        }
    };
    if !slot.leave() {
        // Shed just as its line came in.
        return;
    }
    let line = match line {
        // Connected and closed without a byte (a liveness check): nothing to answer or log.
        Ok(Ok(None)) => {
            debug!("connection closed without a request");
            return;
        }
        Ok(Ok(Some(line))) => Ok(line),
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => {
            debug!("no complete request in time; closing");
            refuse_now(
                &stream,
                &format!(
                    "closed by nixpush daemon: no complete request within {} s of connecting; \
                 send one JSON line as soon as you connect",
                    REQUEST_TIMEOUT.as_secs()
                ),
            );
            return;
        }
    };
    let read_us = accepted.elapsed().as_micros();
    if tokio::time::timeout(ANSWER_TIMEOUT, answer(&shared, stream, line, accepted))
        .await
        .is_err()
    {
        debug!("client connection timed out while being answered");
    } else {
        // Where a hook's wait goes, for `log-level = "nixpush::daemon::server=debug"`.
        debug!(
            read_us,
            total_us = accepted.elapsed().as_micros(),
            "answered"
        );
    }
}

/// Tell a client why it is being closed, without waiting for it to read.
fn refuse_now(stream: &UnixStream, message: &str) {
    let response = Response::Error {
        message: message.to_owned(),
    };
    if let Ok(mut out) = serde_json::to_vec(&response) {
        out.push(b'\n');
        let _ = stream.try_write(&out);
    }
}

/// One request line (without its newline; the end of the stream ends it too), or `None` if the
/// stream ends before a byte. Nothing is allocated until the first bytes arrive.
async fn read_request(
    stream: &UnixStream,
    large: &Semaphore,
) -> Result<Option<Vec<u8>>, ReadError> {
    let mut line = Vec::new();
    let mut permit = None;
    loop {
        stream.readable().await.map_err(ReadError::Io)?;
        if line.len() >= SMALL_REQUEST && permit.is_none() {
            permit = Some(
                large
                    .acquire()
                    .await
                    .map_err(|_| ReadError::Io(std::io::ErrorKind::Other.into()))?,
            );
        }
        let room = if permit.is_some() {
            protocol::MAX_MESSAGE + 1
        } else {
            SMALL_REQUEST
        };
        line.reserve(READ_CHUNK.min(room - line.len()).max(1));
        let start = line.len();
        match stream.try_read_buf(&mut line) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Ok(Some(line)),
            Ok(_) => {
                if let Some(i) = line[start..].iter().position(|&b| b == b'\n') {
                    line.truncate(start + i);
                    return Ok(Some(line));
                }
                if line.len() > protocol::MAX_MESSAGE {
                    return Err(ReadError::TooLarge);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Answer a request line; `accepted` is when its connection was, for the acknowledgement
/// latency of an `enqueue`.
async fn answer(
    shared: &Arc<Shared>,
    mut stream: UnixStream,
    line: Result<Vec<u8>, ReadError>,
    accepted: Instant,
) {
    let mut enqueue_request = false;
    let response = match line {
        Err(ReadError::Io(e)) => Response::Error {
            message: format!("cannot read request: {e}"),
        },
        Err(ReadError::TooLarge) => Response::Error {
            message: format!("request larger than {} bytes", protocol::MAX_MESSAGE),
        },
        Ok(line) => match protocol::parse_request(&line) {
            Err(e) => Response::Error {
                message: e.to_string(),
            },
            Ok(Request::Status {}) => Response::Status(status_report(shared).await),
            Ok(Request::Enqueue { items }) => {
                enqueue_request = true;
                enqueue(shared, &items).await
            }
        },
    };
    if let Response::Error { message } = &response {
        warn!(%message, "bad request on the socket");
    }
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
    if enqueue_request {
        let queued = matches!(response, Response::Queued { .. });
        shared.metrics.hook_answered(accepted.elapsed(), queued);
    }
}

pub(super) async fn enqueue(shared: &Arc<Shared>, raw: &[String]) -> Response {
    let sd = shared.store().store_dir().clone();
    let mut items = Vec::with_capacity(raw.len());
    for r in raw {
        match Item::parse(&sd, r) {
            Ok(i) => items.push(i),
            Err(e) => {
                return Response::Error {
                    message: e.to_string(),
                };
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
    let started = Instant::now();
    let done = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => Ok(tokio::task::block_in_place(write)),
        _ => tokio::task::spawn_blocking(write).await,
    };
    match done {
        Ok(Ok(Err(message))) => Response::Error { message },
        Ok(Ok(Ok(entry))) => {
            debug!(entry, write_us = started.elapsed().as_micros(), "queued");
            shared.nudge();
            Response::Queued { entry }
        }
        Ok(Err(e)) => {
            let dir = shared.queue.dir().display();
            let message = if is_full(&e) {
                format!(
                    "cannot write to the queue directory {dir}: {e}; its file system is full: \
                     free space there (entries already queued are kept and published)"
                )
            } else {
                format!("cannot write to the queue directory {dir}: {e}")
            };
            error!(%message, "request not queued");
            Response::NotQueued { message }
        }
        Err(e) => Response::Error {
            message: format!("internal error: {e}"),
        },
    }
}

/// Whether `e` says that a file system is out of space (or of quota).
pub(super) fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

pub(super) async fn status_report(shared: &Arc<Shared>) -> StatusReport {
    let queue = shared.queue.clone();
    let (depth, (rejected_entries, newest)) = tokio::task::spawn_blocking(move || {
        (
            queue.scan().map(|e| e.len()).unwrap_or(0),
            queue.rejected_newest(NEWEST_REJECTED).unwrap_or_else(|e| {
                warn!(error = %e, "cannot read the queue's rejected/");
                (0, Vec::new())
            }),
        )
    })
    .await
    .unwrap_or_default();
    let newest_rejected = newest
        .into_iter()
        .map(|r| RejectedRecord {
            entry: r.entry.to_string(),
            at: r
                .at
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            reason: r.reason,
        })
        .collect();
    let now = Instant::now();
    let several = shared.caches.len() > 1;
    let done = shared.done().clone();
    let mut report = StatusReport {
        cache: shared
            .caches
            .iter()
            .map(|c| c.pusher.backend_description())
            .collect::<Vec<_>>()
            .join(", "),
        uptime_secs: shared.started.elapsed().as_secs(),
        queue_depth: depth,
        rejected_entries,
        newest_rejected,
        ..StatusReport::default()
    };
    for (index, c) in shared.caches.iter().enumerate() {
        let st = c.status();
        let named = |text: &str| {
            if several {
                format!("cache {}: {text}", c.name)
            } else {
                text.to_owned()
            }
        };
        report.in_flight += st.in_flight;
        report.published += st.published;
        report.excluded += st.excluded;
        report.failed += st.failed;
        report.rejected += st.rejected;
        report.retrying |= st.retrying;
        report
            .held
            .extend(st.held.iter().map(|(name, h)| HeldEntry {
                entry: Entry::new(name.clone()).to_string(),
                failed: h.failed.clone(),
                attempts: h.attempts,
                retry_in_secs: h.due.saturating_duration_since(now).as_secs(),
                cache: several.then(|| c.name.clone()),
            }));
        report
            .last_errors
            .extend(st.last_errors.iter().map(|e| ErrorRecord {
                at: e.at,
                message: named(&e.message),
            }));
        if several {
            let done_here = done.values().filter(|s| s.contains(&index)).count();
            report.caches.push(CacheStatus {
                name: c.name.clone(),
                cache: c.pusher.backend_description(),
                waiting: depth.saturating_sub(done_here),
                in_flight: st.in_flight,
                published: st.published,
                excluded: st.excluded,
                failed: st.failed,
                rejected: st.rejected,
                retrying: st.retrying,
                held: st.held.len(),
            });
        }
    }
    // Most recent first, whichever cache's; as many as one cache keeps.
    report.last_errors.sort_by_key(|e| std::cmp::Reverse(e.at));
    report.last_errors.truncate(LAST_ERRORS);
    report
}
