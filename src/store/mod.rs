//! What we ask the local Nix store: its directory, which paths are valid, their metadata
//! (NarHash, NarSize, references, deriver, signatures, content address), the outputs of
//! derivations, and where to read a path's files.
//!
//! [`Store`] is the question; [`NixStore`] answers it over Nix's worker protocol
//! ([`client`]), talking to the nix-daemon's socket or to one `nix-daemon --stdio` child of
//! our own, so no pass of `push` or of the daemon starts a Nix command-line process. The
//! protocol is the interface Nix keeps stable across versions (every Nix from 2.4 to 2.34
//! here), unlike the JSON of `nix path-info`, whose shape has changed twice and is about to
//! need `--json-format`.
//!
//! # Cost model
//! - Validity of any number of paths: one round trip.
//! - The closure of `n` paths whose reference graph is `d` levels deep: `d + 1` pipelined
//!   batches, each one write of all its requests while the replies stream back. A closure of
//!   4000 paths in 4 layers is five batches.
//! - Path infos of valid paths are immutable, so [`NixStore`] keeps them (up to
//!   [`MEMO_MAX`] entries, then starts again): a daemon that sees the same dependencies in
//!   every build asks for each once. Validity is never remembered (a path can be collected).
//! - A NAR is read from the store's directory on this machine's filesystem where its files
//!   are there; otherwise (a chroot store, a store behind `NIX_REMOTE` elsewhere) the daemon
//!   serialises it (`NarFromPath`, one connection per NAR while it streams).

pub mod client;
pub mod nar_stream;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::formats::{Sha256, StoreDir, StorePath};
pub use client::{DaemonStore, Endpoint};

/// What a narinfo needs to know about a valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted, may include the path itself.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<String>,
    /// The content address, as a narinfo's `CA:` line has it (`text:sha256:…`,
    /// `fixed:r:sha256:…`).
    pub ca: Option<String>,
}

/// Why the store could not answer. The cause is in the message, once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach the Nix store through {what}: {error}; {hint}")]
    Connect {
        what: String,
        hint: String,
        // Not named `source`: the cause is printed in the message, once.
        error: std::io::Error,
    },
    #[error("{what} did not complete the worker-protocol handshake: {message}")]
    Handshake { what: String, message: String },
    #[error(
        "the nix-daemon speaks worker protocol {version}, older than Nix 2.4's 1.32; \
         upgrade Nix"
    )]
    Unsupported { version: String },
    #[error("the connection to the Nix store broke during {op}: {error}")]
    Io {
        op: &'static str,
        error: std::io::Error,
    },
    #[error("the Nix store answered {op} with something nixpush cannot read: {message}")]
    Protocol { op: &'static str, message: String },
    #[error("the Nix store refused {op}: {message}")]
    Daemon { op: &'static str, message: String },
    #[error("not valid in the Nix store (not built, or garbage-collected): {}", .0.join(", "))]
    Invalid(Vec<String>),
    #[error("store directory {0:?} (from NIX_STORE_DIR) is not an absolute path")]
    StoreDir(String),
    /// A derivation whose outputs were asked for, some not built: final, as building is not
    /// ours to do. `outputs` names each missing output (`out`, or `out (/nix/store/...)`).
    #[error(
        "derivation {drv} is not built (output {}); build it first, e.g. `nix-store --realise {drv}`",
        outputs.join(", ")
    )]
    NotBuilt { drv: String, outputs: Vec<String> },
}

impl StoreError {
    /// Whether asking again later may succeed: the store was unreachable, not the question
    /// wrong.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Connect { .. } | StoreError::Handshake { .. } | StoreError::Io { .. }
        )
    }
}

/// The outputs of one derivation: name and path, `None` for a content-addressed output whose
/// path is not known until it is built.
pub type OutputMap = Vec<(String, Option<StorePath>)>;

/// The local Nix store, as the publishing layers see it.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The logical store directory (`/nix/store`), as store paths are printed.
    fn store_dir(&self) -> &StoreDir;

    /// Which of `paths` are valid (built or substituted, not collected). One query.
    async fn valid_paths(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, StoreError>;

    /// Metadata of each of `paths`, in order; `None` where a path is not valid.
    async fn path_infos(
        &self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<Arc<PathInfo>>>, StoreError>;

    /// The outputs of each derivation in `drvs`, in order.
    async fn derivation_outputs(&self, drvs: &[StorePath]) -> Result<Vec<OutputMap>, StoreError>;

    /// Where to read the NAR of `path` from.
    async fn nar_source(&self, path: &StorePath) -> Result<NarSource, StoreError>;
}

/// Where a NAR comes from.
pub enum NarSource {
    /// The path's files on this machine: nixpush serialises them itself.
    Files(PathBuf),
    /// NAR bytes from the daemon.
    Stream(Box<dyn std::io::Read + Send>),
}

impl std::fmt::Debug for NarSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NarSource::Files(p) => f.debug_tuple("Files").field(p).finish(),
            NarSource::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// Metadata of each of `paths`, in order, all of which must be valid: else
/// [`StoreError::Invalid`] naming every one that is not.
pub async fn valid_path_infos(
    store: &dyn Store,
    paths: &[StorePath],
) -> Result<Vec<Arc<PathInfo>>, StoreError> {
    let infos = store.path_infos(paths).await?;
    let invalid: Vec<String> = paths
        .iter()
        .zip(&infos)
        .filter(|(_, i)| i.is_none())
        .map(|(p, _)| store.store_dir().display(p))
        .collect();
    if !invalid.is_empty() {
        return Err(StoreError::Invalid(invalid));
    }
    Ok(infos.into_iter().flatten().collect())
}

/// The closure of `roots` (all valid) with full metadata, keyed by path: one pipelined batch
/// per level of the reference graph.
pub async fn closure(
    store: &dyn Store,
    roots: &[StorePath],
) -> Result<BTreeMap<StorePath, Arc<PathInfo>>, StoreError> {
    let started = std::time::Instant::now();
    let mut all: BTreeMap<StorePath, Arc<PathInfo>> = BTreeMap::new();
    let mut wanted: BTreeSet<StorePath> = roots.iter().cloned().collect();
    let mut batches = 0;
    while !wanted.is_empty() {
        batches += 1;
        let batch: Vec<StorePath> = wanted.into_iter().collect();
        let infos = valid_path_infos(store, &batch).await?;
        wanted = BTreeSet::new();
        for info in infos {
            for r in &info.references {
                if !all.contains_key(r) && *r != info.path {
                    wanted.insert(r.clone());
                }
            }
            all.insert(info.path.clone(), info);
        }
        wanted.retain(|p| !all.contains_key(p));
    }
    tracing::debug!(
        paths = all.len(),
        batches,
        ms = started.elapsed().as_millis() as u64,
        "closure"
    );
    Ok(all)
}

/// Path infos remembered at most; past this the memo starts again (a closure larger than
/// this is re-asked, which costs round trips, never correctness).
pub const MEMO_MAX: usize = 100_000;

/// The local Nix store through its worker protocol, with a memo of path infos.
#[derive(Debug)]
pub struct NixStore {
    client: DaemonStore,
    memo: Mutex<HashMap<StorePath, Arc<PathInfo>>>,
}

impl NixStore {
    /// The store as Nix would open it here (see [`client`] for how the endpoint is chosen).
    /// The store directory is `$NIX_STORE_DIR`, else `/nix/store`, as Nix's own default; the
    /// connection is made and checked before this returns.
    pub async fn open() -> Result<Self, StoreError> {
        let dir = std::env::var("NIX_STORE_DIR")
            .ok()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/nix/store".to_owned());
        let store_dir = StoreDir::new(dir.trim_end_matches('/'))
            .map_err(|_| StoreError::StoreDir(dir.clone()))?;
        let store = Self::new(DaemonStore::new(Endpoint::from_env(), store_dir));
        store.client.check().await?;
        Ok(store)
    }

    pub fn new(client: DaemonStore) -> Self {
        Self {
            client,
            memo: Mutex::new(HashMap::new()),
        }
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, HashMap<StorePath, Arc<PathInfo>>> {
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for NixStore {
    fn store_dir(&self) -> &StoreDir {
        self.client.store_dir()
    }

    async fn valid_paths(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, StoreError> {
        Ok(self
            .client
            .query_valid_paths(paths)
            .await?
            .into_iter()
            .collect())
    }

    async fn path_infos(
        &self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<Arc<PathInfo>>>, StoreError> {
        let mut out: Vec<Option<Arc<PathInfo>>> = {
            let memo = self.memo();
            paths.iter().map(|p| memo.get(p).cloned()).collect()
        };
        let missing: Vec<StorePath> = paths
            .iter()
            .zip(&out)
            .filter(|(_, i)| i.is_none())
            .map(|(p, _)| p.clone())
            .collect();
        if missing.is_empty() {
            return Ok(out);
        }
        let answers = self.client.query_path_infos(&missing).await?;
        let mut fetched = HashMap::with_capacity(answers.len());
        for (p, a) in missing.into_iter().zip(answers) {
            if let Some(info) = a? {
                fetched.insert(p, Arc::new(info));
            }
        }
        {
            let mut memo = self.memo();
            if memo.len() + fetched.len() > MEMO_MAX {
                memo.clear();
            }
            memo.extend(fetched.iter().map(|(p, i)| (p.clone(), i.clone())));
        }
        for (p, slot) in paths.iter().zip(out.iter_mut()) {
            if slot.is_none() {
                *slot = fetched.get(p).cloned();
            }
        }
        Ok(out)
    }

    async fn derivation_outputs(&self, drvs: &[StorePath]) -> Result<Vec<OutputMap>, StoreError> {
        self.client
            .query_derivation_output_maps(drvs)
            .await?
            .into_iter()
            .collect()
    }

    async fn nar_source(&self, path: &StorePath) -> Result<NarSource, StoreError> {
        // The logical location is where a local store keeps its files; where nothing is
        // there (a chroot store, a remote one), the daemon has to serialise it.
        let local = PathBuf::from(self.store_dir().display(path));
        if std::fs::symlink_metadata(&local).is_ok() {
            return Ok(NarSource::Files(local));
        }
        let reader = self.client.nar_from_path(path).await?;
        Ok(NarSource::Stream(Box::new(reader)))
    }
}
