//! The socket side of the daemon: accept (at most `MAX_CONNECTIONS` at once, each with a
//! deadline), read one request line, answer it. An `enqueue` is acknowledged only once its
//! queue entry is durable; the request is handled on the thread that accepted it.

use super::*;

pub(super) const MAX_CONNECTIONS: usize = 128;

pub(super) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
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

pub(super) async fn handle(shared: Arc<Shared>, stream: UnixStream) {
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

pub(super) async fn status_report(shared: &Arc<Shared>) -> StatusReport {
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
