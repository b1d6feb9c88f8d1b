//! Small objects gathered into batches that the backend makes durable together (group
//! commit), where it says that pays ([`Backend::durable_in_batches`]: a local directory,
//! where each object flushed on its own costs a journal commit).
//!
//! One task takes objects as paths hand them over and calls [`Backend::put_batch`] with all
//! that have arrived, up to [`BATCH_OBJECTS`] objects and [`BATCH_BYTES`] bytes; what arrives
//! meanwhile makes the next batch. No timer: a lone object goes at once, and under load the
//! batches grow by themselves to what arrives during one flush. Each object's caller waits for
//! its own result, so a path goes on (to its narinfo, or to report success) only once its
//! object is durable.
//!
//! The objects of one batch become durable in no particular order, so the caller hands over
//! only objects that do not depend on each other: a NAR (nothing depends on it until its
//! narinfo is handed over, after its batch returned), and a narinfo once its NAR's batch and
//! every reference's narinfo batch have returned. The dependency order across batches is the
//! publishing order of [`super`]'s rule 3.
//!
//! Cost: for a closure of thousands of small paths, a batch flush per round instead of two
//! flushes per path; each path waits for at most two rounds more than it would alone. A NAR
//! larger than [`BATCH_OBJECT_MAX`] is put on its own: its flush costs little next to its
//! size, and it must not hold small paths' batches back.

use std::sync::Arc;

use nixpush_backends::{Backend, BackendError, ErrorKind, Put};
use tokio::sync::{mpsc, oneshot};

/// The most objects in one batch.
pub(super) const BATCH_OBJECTS: usize = 256;
/// A batch is closed once it holds this many bytes.
pub(super) const BATCH_BYTES: u64 = 64 << 20;
/// NARs larger than this are put on their own.
pub(super) const BATCH_OBJECT_MAX: u64 = 16 << 20;
/// Staged NARs waiting for a batch, in MiB (each counted rounded up): as many small NARs as a
/// batch takes, and a bound on the staging area's size however slow the flushes.
pub(super) const STAGED_MIB_MAX: usize = BATCH_OBJECTS;

struct Job {
    put: Put,
    bytes: u64,
    done: oneshot::Sender<Result<(), BackendError>>,
}

/// Hands objects to the batching task; it stops when the last `Batcher` is dropped.
pub(super) struct Batcher {
    jobs: mpsc::Sender<Job>,
}

impl Batcher {
    pub(super) fn start(backend: Arc<dyn Backend>) -> Self {
        // Bounded: a caller waits here when batches are slower to flush than paths to stage.
        let (jobs, rx) = mpsc::channel(BATCH_OBJECTS);
        tokio::spawn(run(backend, rx));
        Self { jobs }
    }

    /// Put `put` (of `bytes` bytes) in the next batch; its result once the batch is durable.
    pub(super) async fn put(&self, put: Put, bytes: u64) -> Result<(), BackendError> {
        let key = put.key.clone();
        let stopped =
            || BackendError::new(ErrorKind::Other, "put", &key, "the batching task stopped");
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Job { put, bytes, done })
            .await
            .map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

async fn run(backend: Arc<dyn Backend>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.bytes;
        let mut jobs = vec![first];
        while jobs.len() < BATCH_OBJECTS && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(job) => {
                    bytes += job.bytes;
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let (puts, dones): (Vec<Put>, Vec<_>) = jobs.into_iter().map(|j| (j.put, j.done)).unzip();
        tracing::trace!(objects = puts.len(), bytes, "flushing a batch");
        let results = backend.put_batch(puts).await;
        for (done, result) in dones.into_iter().zip(results) {
            // A caller that went away (its push was cancelled) needs no answer.
            let _ = done.send(result);
        }
    }
}
