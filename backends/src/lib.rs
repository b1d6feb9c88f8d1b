//! Where a binary cache's objects live. One small trait, [`Backend`], and one module per store,
//! each behind a cargo feature (`fs` is always there).
//!
//! # The contract
//! Keys are relative, `/`-separated object names such as `nix-cache-info`, `<hash>.narinfo` or
//! `nar/<filehash>.nar.zst`. Every implementation guarantees:
//! - **Atomic puts.** An object is either absent or complete under its final key; a reader never
//!   sees a partial object, even if the writer crashes mid-way.
//! - **Create-if-absent.** [`PutMode::Create`] succeeds only if no object has the key, otherwise
//!   fails with [`ErrorKind::AlreadyExists`] and leaves the existing object untouched. When two
//!   writers race, exactly one wins. Narinfos are written this way, so the first builder to
//!   publish a path wins and later ones do not rewrite it. Every backend creates bodies of up
//!   to [`CREATE_LIMIT`] bytes; a store that cannot create a larger staged file without holding
//!   it whole in memory (S3: a multipart upload cannot be completed conditionally through
//!   object_store) refuses one with [`ErrorKind::Other`] before writing anything. Where a
//!   backend depends on its server for this (HTTP), its module says so.
//! - **Idempotent overwrite.** [`PutMode::Overwrite`] replaces atomically.
//! - **Durable when acknowledged.** A put that returned `Ok` survives a crash or power loss
//!   ([`Backend::put_batch`] makes many durable together, where that is cheaper).
//! - **Bounded memory.** Bodies are staged files ([`Body::File`]) or small in-memory objects;
//!   a backend streams files and never holds one whole in memory. [`Backend::get`] returns a
//!   stream.
//! - **Classified errors.** Every failure carries an [`ErrorKind`] so callers can retry only what
//!   may succeed later ([`ErrorKind::Transient`]).
//!
//! Dispatch is dynamic (`Arc<dyn Backend>`): the backend is chosen at run time from a cache
//! address, and the cost of a virtual call is nothing next to an upload.
//!
//! # Backends
//! | address | module | cargo feature |
//! |---|---|---|
//! | `file:///path`, `/path` | [`fs`] | `fs` |
//! | `s3://bucket[/prefix]?region=&endpoint=&profile=&scheme=` | `s3` | `s3` (+ `s3-aws-config` for the AWS credential chain) |
//! | `http://host/path`, `https://...` (a server that accepts PUT) | `http` | `http` |
//! | `sftp://[user@]host[:port]/path?identity=&known-hosts=&insecure-accept-any-host-key=` | `sftp` | `sftp` |
//! | `gs://bucket[/prefix]?credentials=&anonymous=&metadata-server=&endpoint=` | `gcs` | `gcs` |
//!
//! All are on by default. Each refuses parameters it does not know, naming them.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

#[cfg(feature = "fs")]
pub mod fs;
#[cfg(feature = "gcs")]
pub mod gcs;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "sftp")]
pub mod sftp;
pub mod throttle;

/// Overrides how long one request to an S3 or HTTP cache may take, in whole seconds (S3: the
/// whole request, body included, default 300; HTTP: silence between two reads, default 120).
/// For slow links, and for tests whose server stalls on purpose.
pub const REQUEST_TIMEOUT_ENV: &str = "NIXPUSH_REQUEST_TIMEOUT_SECS";

/// [`REQUEST_TIMEOUT_ENV`] if set to a positive number, else `default`.
#[cfg(any(feature = "s3", feature = "http"))]
pub(crate) fn request_timeout(default: std::time::Duration) -> std::time::Duration {
    std::env::var(REQUEST_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(default, std::time::Duration::from_secs)
}

/// Attempts of one whole operation, at most, where a backend retries operations itself (S3
/// puts, which object_store does not retry after a timeout or a broken answer; every HTTP
/// request). Only [`ErrorKind::Transient`] failures are tried again, after 0.1, 0.2, 0.4 s.
#[cfg(any(feature = "s3", feature = "http"))]
pub(crate) const ATTEMPTS: u32 = 4;

/// Run `f` until it succeeds, fails other than transiently, or [`ATTEMPTS`] are used up.
/// Safe for puts too: a retried put that had in fact landed overwrites it with the same bytes,
/// or (create-if-absent) reports [`ErrorKind::AlreadyExists`], as if another writer had won.
#[cfg(any(feature = "s3", feature = "http"))]
pub(crate) async fn retry_transient<T, F, Fut>(
    op: &'static str,
    key: &str,
    mut f: F,
) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let mut delay = std::time::Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                tracing::debug!(op, key, attempt, error = %e, "retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// The size up to which every backend supports [`PutMode::Create`] (see the contract).
pub const CREATE_LIMIT: u64 = 8 << 20;

/// A stream of an object's bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, BackendError>> + Send>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace any existing object.
    Overwrite,
    /// Fail with [`ErrorKind::AlreadyExists`] if the key exists.
    Create,
}

/// What to upload.
pub enum Body {
    /// A small object held in memory (narinfo, nix-cache-info).
    Bytes(Bytes),
    /// A staged file, typically a compressed NAR. The backend consumes it: it may rename it into
    /// place (when [`Backend::staging_dir`] put it on the same filesystem) or stream it and drop
    /// it, which deletes it.
    File(tempfile::TempPath),
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Bytes(b) => write!(f, "Body::Bytes({} bytes)", b.len()),
            Body::File(p) => write!(f, "Body::File({})", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PutOptions {
    pub mode: PutMode,
    /// The `Content-Type` a web server should serve it with, where the store keeps one.
    pub content_type: &'static str,
}

/// The most entries [`Backend::list_page`] returns in one page (S3's and GCS's own maximum).
pub const LIST_PAGE_MAX: usize = 1000;

/// One page of an ordered listing; see [`Backend::list_page`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Keys (or folders `dir/`), strictly ascending by bytes.
    pub keys: Vec<String>,
    /// No key sorts after the last of `keys` (after `start_after` if `keys` is empty).
    pub complete: bool,
}

/// Error kinds, by what a caller can do about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    /// Wrong credentials or not allowed: retrying will not help until someone changes something.
    Permission,
    /// Network trouble, throttling, a server error: retrying may succeed.
    Transient,
    /// A bad address or setting, detected before any request.
    Config,
    Other,
}

#[derive(Debug, thiserror::Error)]
#[error("{op} {key:?}: {message}")]
pub struct BackendError {
    pub kind: ErrorKind,
    pub op: &'static str,
    pub key: String,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    pub fn new(kind: ErrorKind, op: &'static str, key: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            op,
            key: key.to_owned(),
            message: message.into(),
            source: None,
        }
    }

    /// Classify an I/O error from a local or remote file system. A read-only file system
    /// says where that usually comes from: a service's sandbox.
    pub fn io(op: &'static str, key: &str, e: io::Error) -> Self {
        use io::ErrorKind as K;
        let kind = match e.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::PermissionDenied => ErrorKind::Permission,
            K::Interrupted
            | K::TimedOut
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::ConnectionRefused
            | K::BrokenPipe
            | K::WouldBlock => ErrorKind::Transient,
            _ => ErrorKind::Other,
        };
        Self {
            kind,
            op,
            key: key.to_owned(),
            message: format!("{e}{}", read_only_hint(&e)),
            source: None,
        }
    }

    /// A bad address or setting found when opening a cache: [`ErrorKind::Config`].
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, "open", "", message)
    }

    /// A key the backend cannot store: [`ErrorKind::Config`], "invalid object key".
    pub(crate) fn invalid_key(op: &'static str, key: &str) -> Self {
        Self::new(ErrorKind::Config, op, key, "invalid object key")
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

/// What to add to an I/O error's text when it is a read-only file system: most often a
/// service's sandbox, which names the directories it may write.
pub(crate) fn read_only_hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::ReadOnlyFilesystem {
        "; the directory is on a read-only mount: under systemd's ProtectSystem=strict, add it \
         to the unit's ReadWritePaths= in a drop-in, as nixpush's \
         systemd/nixpush.service.d/local-cache.conf does"
    } else {
        ""
    }
}

/// A bad address or setting, found before any request: what a backend's address parser and
/// credential loader return, the message naming what is wrong. It becomes a [`BackendError`]
/// of [`ErrorKind::Config`] (`?` converts it), or [`OpenError::Invalid`] from [`open`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl From<String> for ConfigError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for ConfigError {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

impl From<ConfigError> for BackendError {
    fn from(e: ConfigError) -> Self {
        BackendError::config(e.0)
    }
}

/// One object of a [`Backend::put_batch`].
#[derive(Debug)]
pub struct Put {
    pub key: String,
    pub body: Body,
    pub opts: PutOptions,
}

#[async_trait::async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// Store `body` under `key`, atomically, as `opts.mode` says. When it returns `Ok`, the
    /// object is durable: it survives a crash or a power loss of the machine that stores it.
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError>;

    async fn exists(&self, key: &str) -> Result<bool, BackendError>;

    /// The object's bytes; [`ErrorKind::NotFound`] if absent.
    async fn get(&self, key: &str) -> Result<ByteStream, BackendError>;

    /// The objects whose keys start with `prefix`, in no particular order, each with its size
    /// and when it was last written (by the store's clock: S3's and GCS's listings carry both,
    /// a local directory and SFTP give the file's mtime). Temporary files of a writer at work
    /// are not listed. [`BackendExt::list`] gives the keys alone.
    async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError>;

    /// Remove `key`; removing an absent key succeeds. Like a put, durable when it returns, so
    /// that removals made one after another survive a crash in that order.
    async fn delete(&self, key: &str) -> Result<(), BackendError>;

    /// Remove every key of `keys` as [`Backend::delete`] would; the results are in the order
    /// of `keys`, and each that succeeded is durable when this returns. The removals of one
    /// batch happen in no particular order, so a caller batches only keys whose removal order
    /// does not matter (narinfos none of which refers to another; NARs no narinfo names).
    ///
    /// The default removes them one by one, [`DELETE_CONCURRENCY`] at once; S3 sends
    /// DeleteObjects requests of up to 1000 keys.
    async fn delete_batch(&self, keys: Vec<String>) -> Vec<Result<(), BackendError>> {
        use futures::StreamExt as _;
        futures::stream::iter(
            keys.into_iter()
                .map(|k| async move { self.delete(&k).await }),
        )
        .buffered(DELETE_CONCURRENCY)
        .collect()
        .await
    }

    /// One page of the cache's keys in order, in **one request**: up to [`LIST_PAGE_MAX`]
    /// entries that sort strictly after `start_after` (byte order), ascending, and whether the
    /// listing ends with them. Keys are relative to the cache, as everywhere in this trait.
    ///
    /// Keys without a `/` always appear themselves. Keys below a "folder" may be grouped: all
    /// of `nar/…` then appears as the one entry `nar/` (ending in `/`), in its place in the
    /// order, at most once, and not always (SeaweedFS leaves it out of a page that starts at
    /// its bare name, `nar`); callers must not rely on keys with a `/`. So a page says, for
    /// every key without a `/` from `start_after` (exclusive) up to its last entry (inclusive),
    /// whether it exists; and with [`ListPage::complete`], for every such key after
    /// `start_after`.
    ///
    /// `Ok(None)`, without any request: this store cannot list in key order with one request a
    /// page (the default; a local directory answers `exists` with a `stat`, SFTP and HTTP cannot
    /// list in order). Callers then use [`Backend::exists`].
    async fn list_page(&self, start_after: &str) -> Result<Option<ListPage>, BackendError> {
        let _ = start_after;
        Ok(None)
    }

    /// Whether each of `keys` exists, in order, answered at once: `Ok(None)`, without any
    /// work, where the store has no cheaper way than one [`Backend::exists`] per key (the
    /// default; callers then check them concurrently). A local directory answers with one
    /// blocking pass of `stat`s instead of a task, a thread hand-over and an allocation per
    /// key, which for a closure of thousands of paths is most of a no-op push.
    async fn exists_all(&self, keys: &[String]) -> Result<Option<Vec<bool>>, BackendError> {
        let _ = keys;
        Ok(None)
    }

    /// Store every object of `puts` as [`Backend::put`] would, and return when each one that
    /// succeeded is durable; the results are in the order of `puts`. The objects of one batch
    /// become visible in no particular order, so a caller batches only objects that do not
    /// depend on each other (the NARs of several paths; narinfos whose NARs and references are
    /// already durable).
    ///
    /// The default puts them all at once, each on its own, which is right for a store where
    /// every `put` is durable when it returns at no extra cost (every remote one). A store that
    /// pays per object for durability overrides it and says so in
    /// [`Backend::durable_in_batches`].
    async fn put_batch(&self, puts: Vec<Put>) -> Vec<Result<(), BackendError>> {
        futures::future::join_all(
            puts.into_iter()
                .map(|p| async move { self.put(&p.key, p.body, p.opts).await }),
        )
        .await
    }

    /// Whether [`Backend::put_batch`] makes many small objects durable for much less than
    /// their puts one by one would (a local directory: one flush of the file system's journal
    /// for a batch instead of two per path). Publishers then gather small objects into
    /// batches; elsewhere they put each object as soon as it is ready.
    fn durable_in_batches(&self) -> bool {
        false
    }

    /// Whether [`PutMode::Create`] costs what [`PutMode::Overwrite`] costs, for bodies of up
    /// to [`CREATE_LIMIT`] bytes: one conditional request (S3's `If-None-Match: *`), not a
    /// check before the put (HTTP) or a slower way to write (a local directory links where it
    /// would rename). Publishers then create NARs if absent too, so that builders racing on
    /// one path store its NAR once; elsewhere they overwrite (the same bytes under the same
    /// key). The default: no.
    fn creates_in_one_request(&self) -> bool {
        false
    }

    /// Where to stage files for [`Body::File`] so that `put` can move rather than copy them:
    /// the fs backend names a directory on the cache's filesystem. `None`: anywhere.
    fn staging_dir(&self) -> Option<&Path> {
        None
    }

    /// A human-readable address of the cache, for messages.
    fn describe(&self) -> String;
}

/// Deletes in flight at once in the default [`Backend::delete_batch`].
pub const DELETE_CONCURRENCY: usize = 32;

/// One object of a listing ([`Backend::list_objects`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Relative to the cache, as every key of this trait.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// When it was last written, by the store's clock (seconds or finer, as the store keeps
    /// it).
    pub modified: std::time::SystemTime,
}

/// Conveniences on top of [`Backend`].
#[async_trait::async_trait]
pub trait BackendExt: Backend {
    /// Keys that start with `prefix`, in no particular order ([`Backend::list_objects`]
    /// without sizes and times).
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        Ok(self
            .list_objects(prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    /// Read a small object whole; refuse one larger than `limit` bytes.
    async fn get_bytes(&self, key: &str, limit: usize) -> Result<Bytes, BackendError> {
        use futures::TryStreamExt as _;
        let mut stream = self.get(key).await?;
        let mut buf = Vec::new();
        while let Some(chunk) = stream.try_next().await? {
            if buf.len() + chunk.len() > limit {
                return Err(BackendError::new(
                    ErrorKind::Other,
                    "get",
                    key,
                    format!("object is larger than {limit} bytes"),
                ));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.into())
    }

    /// Like `get_bytes`, with `None` for an absent object.
    async fn get_optional(&self, key: &str, limit: usize) -> Result<Option<Bytes>, BackendError> {
        match self.get_bytes(key, limit).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl<T: Backend + ?Sized> BackendExt for T {}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid cache address {0:?}: {1}")]
    Invalid(String, String),
    #[error("cache address {0:?}: the {1} backend is not compiled in (cargo feature {1:?})")]
    NotCompiled(String, &'static str),
    #[error(
        "cache address {0:?}: unsupported scheme {1:?} \
         (expected file://, s3://, http://, https://, sftp://, gs://, or a plain path)"
    )]
    UnsupportedScheme(String, String),
    /// Opening failed other than on the address; `error` keeps its kind. Its text is part of
    /// this message and it is not also the `source()`, so a report that prints the chain of
    /// causes (`{:#}` of anyhow) shows it once; like a [`BackendError`], this error's text is
    /// whole by itself.
    #[error("cache address {addr:?}: {error}")]
    Backend { addr: String, error: BackendError },
}

/// Open a cache from an address in Nix's syntax (see the table in the crate doc). No request is
/// made: an unreachable server or wrong credentials show on the first operation.
pub async fn open(addr: &str) -> Result<Arc<dyn Backend>, OpenError> {
    let (scheme, rest) = match addr.split_once("://") {
        Some((s, r)) => (s, r),
        None => ("file", addr),
    };
    match scheme {
        "file" => {
            #[cfg(feature = "fs")]
            {
                let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
                let params = parse_params(addr, query)?;
                let fs = fs::FsBackend::from_params(PathBuf::from(path), &params)
                    .await
                    .map_err(|e| OpenError::Invalid(addr.to_owned(), e.to_string()))?;
                Ok(Arc::new(fs))
            }
            #[cfg(not(feature = "fs"))]
            Err(OpenError::NotCompiled(addr.to_owned(), "fs"))
        }
        "s3" => {
            #[cfg(feature = "s3")]
            {
                let s3 = s3::S3Backend::open(addr)
                    .await
                    .map_err(|e| open_error(addr, e))?;
                Ok(Arc::new(s3))
            }
            #[cfg(not(feature = "s3"))]
            Err(OpenError::NotCompiled(addr.to_owned(), "s3"))
        }
        "http" | "https" => {
            #[cfg(feature = "http")]
            {
                let http = http::HttpBackend::open(addr).map_err(|e| open_error(addr, e))?;
                Ok(Arc::new(http))
            }
            #[cfg(not(feature = "http"))]
            Err(OpenError::NotCompiled(addr.to_owned(), "http"))
        }
        "sftp" => {
            #[cfg(feature = "sftp")]
            {
                let sftp = sftp::SftpBackend::open(addr).map_err(|e| open_error(addr, e))?;
                Ok(Arc::new(sftp))
            }
            #[cfg(not(feature = "sftp"))]
            Err(OpenError::NotCompiled(addr.to_owned(), "sftp"))
        }
        "gs" => {
            #[cfg(feature = "gcs")]
            {
                let gcs = gcs::GcsBackend::open(addr).map_err(|e| open_error(addr, e))?;
                Ok(Arc::new(gcs))
            }
            #[cfg(not(feature = "gcs"))]
            Err(OpenError::NotCompiled(addr.to_owned(), "gcs"))
        }
        other => Err(OpenError::UnsupportedScheme(
            addr.to_owned(),
            other.to_owned(),
        )),
    }
}

/// A bad address is [`OpenError::Invalid`]; anything else keeps its kind.
#[cfg(any(feature = "s3", feature = "http", feature = "sftp", feature = "gcs"))]
fn open_error(addr: &str, e: BackendError) -> OpenError {
    if e.kind == ErrorKind::Config {
        OpenError::Invalid(addr.to_owned(), e.message)
    } else {
        OpenError::Backend {
            addr: addr.to_owned(),
            error: e,
        }
    }
}

/// `a=b&c=d`, percent-decoded. Parameters are checked by each backend, which refuses unknown ones.
fn parse_params(addr: &str, query: &str) -> Result<Vec<(String, String)>, OpenError> {
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| {
            if k.is_empty() {
                Err(OpenError::Invalid(
                    addr.to_owned(),
                    "empty parameter name".into(),
                ))
            } else {
                Ok((k.into_owned(), v.into_owned()))
            }
        })
        .collect()
}

/// The parameters of a remote cache's address query (`a=b&c=d`, percent-decoded): the value of
/// each name in `known`, in that order, `None` where absent. Refuses an empty name, a name not
/// in `known` (naming `what`, e.g. "an S3 cache", and the known ones) and a name given twice;
/// with `refuse_empty`, also an empty value.
#[cfg(any(feature = "s3", feature = "http", feature = "sftp", feature = "gcs"))]
pub(crate) fn query_params<const N: usize>(
    query: &str,
    what: &str,
    known: [&str; N],
    refuse_empty: bool,
) -> Result<[Option<String>; N], ConfigError> {
    let mut values: [Option<String>; N] = std::array::from_fn(|_| None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k.is_empty() {
            return Err("empty parameter name".into());
        }
        let Some(i) = known.iter().position(|n| *n == k) else {
            return Err(format!(
                "unknown parameter {k:?} for {what} (known: {})",
                known.join(", ")
            )
            .into());
        };
        if values[i].is_some() {
            return Err(format!("parameter {k:?} given twice").into());
        }
        if refuse_empty && v.is_empty() {
            return Err(format!("parameter {k:?} is empty").into());
        }
        values[i] = Some(v.into_owned());
    }
    Ok(values)
}

/// `key` as an object name below the cache's `prefix` (`prefix/key`), or as it is at a bucket's
/// root; with an empty `key`, the folder the cache's keys start with (`prefix/` or nothing).
#[cfg(any(feature = "s3", feature = "gcs"))]
pub(crate) fn under_prefix(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}/{key}")
    }
}

/// A [`ListPage`] from one listing response: `objects` (keys), `folders` (`dir/`) and whether
/// the store said more follows, all relative to the cache. Keeps what sorts after
/// `start_after`, in order, at most `size` entries. A page that is not the end is cut after its
/// last object: some servers send every folder after the offset on every page, however few
/// objects the page holds (fake-gcs-server does), and a folder past the last object would
/// claim the objects in between absent. What is cut comes again on the next page.
#[cfg(any(feature = "s3", feature = "gcs"))]
pub(crate) fn assemble_page(
    start_after: &str,
    objects: Vec<String>,
    folders: Vec<String>,
    more: bool,
    size: usize,
) -> ListPage {
    let last_object = objects.iter().max().cloned();
    let mut keys: Vec<String> = objects
        .into_iter()
        .chain(folders)
        .filter(|k| k.as_str() > start_after)
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut complete = !more;
    if let (false, Some(last)) = (complete, last_object) {
        keys.retain(|k| *k <= last);
    }
    if keys.len() > size {
        keys.truncate(size);
        complete = false;
    }
    ListPage { keys, complete }
}

/// A transport failure of an HTTP request (HTTP and GCS backends): anything that did not get as
/// far as a status code. The message names the server and the deepest cause, once
/// (`cannot connect to http://127.0.0.1:9: Connection refused (os error 111)`): reqwest's and
/// hyper's own layers (`error sending request for url (...)`, `client error (Connect)`, `tcp
/// connect error`) say nothing more.
#[cfg(any(feature = "http", feature = "gcs"))]
pub(crate) fn transport_error(op: &'static str, key: &str, e: &reqwest::Error) -> BackendError {
    let kind = if e.is_builder() {
        ErrorKind::Config
    } else if e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() || e.is_decode() {
        ErrorKind::Transient
    } else {
        ErrorKind::Other
    };
    let mut root = None;
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !t.trim().is_empty() {
            root = Some(t);
        }
        cur = c.source();
    }
    let server = e
        .url()
        .map(|u| u.origin().ascii_serialization())
        .filter(|o| o != "null");
    let message = match (server, root) {
        (Some(s), Some(r)) if e.is_connect() => format!("cannot connect to {s}: {r}"),
        (Some(s), Some(r)) if e.is_timeout() => format!("no answer from {s} in time: {r}"),
        (Some(s), None) if e.is_timeout() => format!("no answer from {s} in time"),
        (Some(s), Some(r)) => format!("the connection to {s} failed: {r}"),
        (_, Some(r)) => r,
        (_, None) => e.without_url_text(),
    };
    BackendError::new(kind, op, key, message)
}

/// reqwest's message without the URL it appends (`for url (...)`).
#[cfg(any(feature = "http", feature = "gcs"))]
trait WithoutUrl {
    fn without_url_text(&self) -> String;
}

#[cfg(any(feature = "http", feature = "gcs"))]
impl WithoutUrl for reqwest::Error {
    fn without_url_text(&self) -> String {
        let t = self.to_string();
        match t.split_once(" for url (") {
            Some((head, _)) => head.to_owned(),
            None => t,
        }
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    /// What `{:#}` (anyhow) prints: the error, then each cause.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(&format!(": {c}"));
            cur = c.source();
        }
        s
    }

    #[test]
    fn an_open_error_shows_its_cause_once() {
        let e = OpenError::Backend {
            addr: "s3://b".into(),
            error: BackendError::new(ErrorKind::Transient, "open", "", "no answer"),
        };
        assert_eq!(
            e.to_string(),
            "cache address \"s3://b\": open \"\": no answer"
        );
        assert_eq!(chain(&e), e.to_string());
    }
}

#[cfg(all(test, any(feature = "s3", feature = "gcs")))]
mod tests {
    use super::*;

    fn v(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn pages_are_ordered_exclusive_and_cut_after_their_last_object() {
        // As fake-gcs-server answers `startOffset=c&maxResults=3`: its offset is inclusive,
        // and every folder after it comes on every page.
        let p = assemble_page(
            "c",
            v(&["c", "m", "p"]),
            v(&["list/", "nar/", "z/"]),
            true,
            1000,
        );
        assert_eq!(p.keys, v(&["list/", "m", "nar/", "p"]));
        assert!(!p.complete);
        // The last page keeps its folders.
        let p = assemble_page("r", v(&["s"]), v(&["z/"]), false, 1000);
        assert_eq!((p.keys, p.complete), (v(&["s", "z/"]), true));
        // A page of folders only is taken as it is.
        let p = assemble_page("", vec![], v(&["b/", "a/"]), true, 1000);
        assert_eq!((p.keys, p.complete), (v(&["a/", "b/"]), false));
        // Never more than asked for: what is cut comes on the next page.
        let p = assemble_page("", v(&["a", "b", "c"]), v(&["a/"]), false, 2);
        assert_eq!((p.keys, p.complete), (v(&["a", "a/"]), false));
    }
}
