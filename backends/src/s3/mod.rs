//! A cache in an S3 bucket or an S3-compatible store (`s3://`), through the `object_store` crate.
//!
//! # Address
//! ```text
//! s3://BUCKET[/PREFIX][?region=R&endpoint=URL&profile=NAME&scheme=http|https]
//! ```
//! The parameters are Nix's own (`S3BinaryCacheStore`, `src/libstore/s3-binary-cache-store.cc`);
//! any other is refused with its name.
//! - `region`: default `us-east-1`, as in Nix.
//! - `endpoint`: an S3-compatible service (`http://127.0.0.1:8333`, `minio.example:9000`).
//!   Requests then use path-style addressing (`ENDPOINT/BUCKET/KEY`), as Nix does. Without it,
//!   AWS S3 itself (`https://s3.REGION.amazonaws.com/BUCKET`).
//! - `scheme`: `https` (default) or `http`, for an `endpoint` given without one; an endpoint
//!   that names its scheme keeps it (the AWS SDK, which Nix uses, behaves the same).
//! - `profile`: a named profile of `~/.aws/config` and `~/.aws/credentials` (SSO, assume-role,
//!   `credential_process` and static keys all work), as Nix's `profile=`.
//!
//! `PREFIX` is an extension over Nix: every key lives below it, so one bucket can hold several
//! caches. Nix reads such a cache through the bucket's HTTP endpoint
//! (`https://ENDPOINT/BUCKET/PREFIX`).
//!
//! # Credentials
//! Decided once, when the backend is opened, and never printed:
//! 1. [`S3Credentials::Static`]: keys given by the caller (tests, a config file).
//! 2. [`S3Credentials::Environment`] (what `open` uses):
//!    - with `profile=NAME`: that profile only, through aws-config, as Nix does;
//!    - else, if `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and optionally
//!      `AWS_SESSION_TOKEN`) are set, those keys, used directly: no credential chain is built,
//!      so nothing ever asks the instance metadata service;
//!    - else the full AWS default chain through aws-config (environment, profile files, SSO,
//!      web identity, ECS, EC2 instance metadata), which honours `AWS_EC2_METADATA_DISABLED`.
//!
//! aws-config credentials are plugged into object_store through its `CredentialProvider`
//! trait and cached until five minutes before they expire; one refresh at a time.
//! aws-config is behind the `s3-aws-config` cargo feature (on by default): without it, only
//! explicit keys work and the others are a [`ErrorKind::Config`] error.
//!
//! # How the contract is kept
//! - **Atomic puts**: S3 makes an object visible only when its PUT or its multipart upload
//!   completes. A multipart upload abandoned by a crash stays invisible (and billed: give the
//!   bucket an `AbortIncompleteMultipartUpload` lifecycle rule); one that fails is aborted.
//! - **Create-if-absent**: a single PUT with `If-None-Match: *` (AWS S3 since 2024, SeaweedFS,
//!   MinIO, R2); `412 Precondition Failed` becomes [`ErrorKind::AlreadyExists`]. object_store
//!   cannot make a multipart completion conditional, so create-if-absent is offered for bodies
//!   of at most [`crate::CREATE_LIMIT`] bytes, which always go in one PUT; a larger staged file
//!   in [`PutMode::Create`] is refused with [`ErrorKind::Other`] before any request. Nixpush
//!   only creates narinfos and `nix-cache-info`, a few KiB each. A store that ignores
//!   `If-None-Match` (Garage, old MinIO) silently overwrites: do not use one with several
//!   writers.
//! - **Bounded memory**: a staged file of at most [`SINGLE_PUT_MAX`] bytes is read whole and
//!   sent in one PUT; a larger one goes up in parts of [`part_size`] bytes (8 MiB, more for files
//!   over 78 GiB so that any file fits in S3's 10,000 parts), with at most [`PARTS_IN_FLIGHT`]
//!   parts read and not yet acknowledged at once: memory is at most
//!   `PARTS_IN_FLIGHT × part_size`, whatever the file size. Each part is uploaded by its own
//!   task, so parts go up while the next one is read. Across all the uploads one backend runs
//!   at once (the pipeline runs `--jobs` of them), the bytes read and not yet acknowledged stay
//!   under [`MEMORY_BUDGET`]: a part or a single-PUT file takes its share of a semaphore before
//!   it is read and gives it back when the store has it (a part larger than the whole budget,
//!   for files over 640 GiB, takes all of it).
//! - **Ordered listing** ([`Backend::list_page`]): one ListObjectsV2 request with `start-after`
//!   and `delimiter=/`, so a page holds up to 1000 keys of the cache's top level (narinfos) and
//!   each folder (`nar/`) once, however many keys it holds.
//! - **Retries**: object_store retries connection failures, 5xx and throttling with exponential
//!   backoff, for at most [`RETRY_TIMEOUT`] and [`MAX_RETRIES`] times per request (shorter than
//!   its defaults: the caller retries too, and a down cache should be reported within seconds).
//! - **Errors**: object_store's own kinds (not found, precondition, 401, 403) map directly.
//!   Everything else arrives as `Error::Generic` wrapping crate-private types; the status code
//!   and S3 error code are then read from the error's text (`non-2xx status code: 503`,
//!   `<Code>SlowDown</Code>`), and transport failures from the public `HttpError` in its
//!   source chain. A missing bucket (`NoSuchBucket`) is [`ErrorKind::Config`]: the address is
//!   wrong, retrying will not help. `exists` cannot tell (a `HEAD` response has no body) and
//!   answers `false`; the first `get`, `put`, `list` or `delete` reports it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsCredential, AwsCredentialProvider};
use object_store::list::{PaginatedListOptions, PaginatedListStore as _};
use object_store::path::Path as ObjPath;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt as _,
    PutMultipartOptions, PutPayload, RetryConfig, StaticCredentialProvider,
};
use tokio::io::AsyncReadExt as _;
use tracing::debug;

use crate::{Backend, BackendError, Body, ByteStream, ErrorKind, ListPage, PutMode, PutOptions};

/// Staged files up to this size go up in one PUT (read whole into memory), so they can be
/// created if absent.
pub const SINGLE_PUT_MAX: u64 = crate::CREATE_LIMIT;
/// The smallest part of a multipart upload (S3 requires 5 MiB for all but the last).
pub const MIN_PART_SIZE: u64 = 8 << 20;
/// S3's limit on the number of parts of one upload.
pub const MAX_PARTS: u64 = 10_000;
/// Parts read into memory and not yet acknowledged by the store, at most.
pub const PARTS_IN_FLIGHT: usize = 3;
/// Object bytes one backend holds in memory at once, at most, for all its uploads together.
pub const MEMORY_BUDGET: u64 = 64 << 20;
/// Attempts of one request after the first, at most.
pub const MAX_RETRIES: usize = 4;
/// Time spent retrying one request, at most.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// Part size for a multipart upload of `len` bytes: [`MIN_PART_SIZE`], or more (in whole MiB)
/// when the file would not fit in [`MAX_PARTS`] parts.
pub fn part_size(len: u64) -> u64 {
    let needed = len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    needed.max(MIN_PART_SIZE)
}

/// Where the cache is, from its address; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    pub region: String,
    /// The endpoint URL, scheme included; `None` for AWS S3.
    pub endpoint: Option<String>,
    /// A named AWS profile.
    pub profile: Option<String>,
}

impl S3Config {
    /// Parse `s3://bucket[/prefix][?params]`.
    pub fn parse(addr: &str) -> Result<Self, String> {
        let rest = addr
            .strip_prefix("s3://")
            .ok_or_else(|| "an S3 address starts with s3://".to_owned())?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err("no bucket name (expected s3://BUCKET[/PREFIX])".into());
        }
        if !bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("invalid bucket name {bucket:?}"));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            ObjPath::parse(prefix).map_err(|e| format!("invalid prefix {prefix:?}: {e}"))?;
        }
        let [region, endpoint, profile, scheme] = crate::query_params(
            query,
            "an S3 cache",
            ["region", "endpoint", "profile", "scheme"],
            true,
        )?;
        if let Some(s) = &scheme {
            if s != "http" && s != "https" {
                return Err(format!("scheme must be http or https, not {s:?}"));
            }
        }
        let endpoint = match endpoint {
            None => {
                if scheme.as_deref() == Some("http") {
                    return Err("scheme=http needs an endpoint (AWS S3 is https only)".into());
                }
                None
            }
            Some(e) => {
                let full = if e.contains("://") {
                    e
                } else {
                    format!("{}://{e}", scheme.as_deref().unwrap_or("https"))
                };
                let u =
                    url::Url::parse(&full).map_err(|err| format!("endpoint {full:?}: {err}"))?;
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return Err(format!("endpoint {full:?} is not an http(s) URL"));
                }
                if u.query().is_some() || !matches!(u.path(), "" | "/") {
                    return Err(format!("endpoint {full:?} must not have a path or query"));
                }
                Some(full.trim_end_matches('/').to_owned())
            }
        };
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            region: region.unwrap_or_else(|| "us-east-1".to_owned()),
            endpoint,
            profile,
        })
    }

    fn describe(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            s.push_str(&format!(" (at {e})"));
        }
        s
    }
}

/// Where the keys come from; see the module doc.
#[derive(Clone)]
pub enum S3Credentials {
    /// These keys, always.
    Static {
        key_id: String,
        secret_key: String,
        token: Option<String>,
    },
    /// `profile=`, else keys from the environment, else the AWS default chain.
    Environment,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::Static { key_id, token, .. } => f
                .debug_struct("Static")
                .field("key_id", key_id)
                .field("secret_key", &"<redacted>")
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .finish(),
            S3Credentials::Environment => f.write_str("Environment"),
        }
    }
}

impl S3Credentials {
    /// Keys from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, if the
    /// first two are set; an error if only one is.
    fn from_env_vars() -> Result<Option<Self>, String> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(key_id), Some(secret_key)) => Ok(Some(S3Credentials::Static {
                key_id,
                secret_key,
                token: var("AWS_SESSION_TOKEN"),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => {
                Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into())
            }
            (None, Some(_)) => {
                Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into())
            }
        }
    }

    async fn provider(&self, config: &S3Config) -> Result<AwsCredentialProvider, String> {
        match self {
            S3Credentials::Static {
                key_id,
                secret_key,
                token,
            } => Ok(Arc::new(StaticCredentialProvider::new(AwsCredential {
                key_id: key_id.clone(),
                secret_key: secret_key.clone(),
                token: token.clone(),
            }))),
            S3Credentials::Environment => {
                if config.profile.is_none() {
                    if let Some(keys) = Self::from_env_vars()? {
                        debug!("S3 credentials: keys from the environment");
                        return Box::pin(keys.provider(config)).await;
                    }
                }
                chain_provider(config).await
            }
        }
    }
}

#[cfg(feature = "s3-aws-config")]
async fn chain_provider(config: &S3Config) -> Result<AwsCredentialProvider, String> {
    Ok(Arc::new(chain::AwsConfigProvider::new(config).await))
}

#[cfg(not(feature = "s3-aws-config"))]
async fn chain_provider(config: &S3Config) -> Result<AwsCredentialProvider, String> {
    Err(match &config.profile {
        Some(p) => format!(
            "profile={p} needs the AWS credential chain, which this build lacks \
             (cargo feature \"s3-aws-config\")"
        ),
        None => "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 (this build lacks the AWS credential chain, cargo feature \"s3-aws-config\")"
            .into(),
    })
}

/// Credentials from aws-config, cached until shortly before they expire.
#[cfg(feature = "s3-aws-config")]
mod chain {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use aws_credential_types::provider::error::CredentialsError;
    use aws_credential_types::provider::{ProvideCredentials as _, SharedCredentialsProvider};
    use object_store::aws::AwsCredential;
    use tracing::debug;

    use super::{CredentialsUnavailable, S3Config};
    use crate::ErrorKind;

    /// Refresh credentials this long before they expire.
    const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

    pub(super) struct AwsConfigProvider {
        inner: SharedCredentialsProvider,
        what: String,
        /// Held while fetching, so that concurrent requests wait for one refresh.
        cache: tokio::sync::Mutex<Option<(Arc<AwsCredential>, Option<SystemTime>)>>,
    }

    impl std::fmt::Debug for AwsConfigProvider {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AwsConfigProvider")
                .field("source", &self.what)
                .finish_non_exhaustive()
        }
    }

    impl AwsConfigProvider {
        pub(super) async fn new(config: &S3Config) -> Self {
            let (inner, what) = match &config.profile {
                Some(p) => {
                    debug!(profile = %p, "S3 credentials: AWS profile");
                    let provider = aws_config::profile::ProfileFileCredentialsProvider::builder()
                        .profile_name(p)
                        .build();
                    (
                        SharedCredentialsProvider::new(provider),
                        format!("profile {p}"),
                    )
                }
                None => {
                    debug!("S3 credentials: AWS default chain");
                    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                        .region(aws_config::Region::new(config.region.clone()))
                        .build()
                        .await;
                    (
                        SharedCredentialsProvider::new(chain),
                        "default chain".to_owned(),
                    )
                }
            };
            Self {
                inner,
                what,
                cache: tokio::sync::Mutex::new(None),
            }
        }
    }

    #[async_trait::async_trait]
    impl object_store::CredentialProvider for AwsConfigProvider {
        type Credential = AwsCredential;

        async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
            let mut cache = self.cache.lock().await;
            if let Some((cred, expiry)) = cache.as_ref() {
                let fresh = expiry.is_none_or(|e| e > SystemTime::now() + REFRESH_MARGIN);
                if fresh {
                    return Ok(cred.clone());
                }
            }
            let creds = self.inner.provide_credentials().await.map_err(|e| {
                let kind = match &e {
                    CredentialsError::ProviderTimedOut(_) => ErrorKind::Transient,
                    CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_) => ErrorKind::Config,
                    CredentialsError::ProviderError(_) => ErrorKind::Permission,
                    _ => ErrorKind::Other,
                };
                object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(CredentialsUnavailable {
                        kind,
                        message: format!(
                            "no AWS credentials from the {}: {}",
                            self.what,
                            aws_error_text(&e)
                        ),
                    }),
                }
            })?;
            let cred = Arc::new(AwsCredential {
                key_id: creds.access_key_id().to_owned(),
                secret_key: creds.secret_access_key().to_owned(),
                token: creds.session_token().map(str::to_owned),
            });
            *cache = Some((cred.clone(), creds.expiry()));
            Ok(cred)
        }
    }

    /// The error and its causes on one line (aws-config's Display shows only the outermost).
    fn aws_error_text(e: &(dyn std::error::Error + 'static)) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}

/// A credential provider failed; carries its own classification.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct CredentialsUnavailable {
    kind: ErrorKind,
    message: String,
}

pub struct S3Backend {
    store: Arc<AmazonS3>,
    config: S3Config,
    /// [`MEMORY_BUDGET`] in MiB permits.
    memory: Arc<tokio::sync::Semaphore>,
    /// `max-keys` of a [`Backend::list_page`] request; `None`: the store's default (1000 on S3).
    list_page_size: Option<usize>,
}

impl fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Backend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl S3Backend {
    /// Open the cache at `addr` (`s3://...`), with credentials from the environment.
    pub async fn open(addr: &str) -> Result<Self, BackendError> {
        let config = S3Config::parse(addr).map_err(BackendError::config)?;
        Self::new(config, S3Credentials::Environment).await
    }

    /// No request is made: a wrong bucket or key shows on the first operation.
    pub async fn new(config: S3Config, credentials: S3Credentials) -> Result<Self, BackendError> {
        let provider = credentials
            .provider(&config)
            .await
            .map_err(BackendError::config)?;
        let mut client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            // A whole request, one part included: 8 MiB at 256 kbit/s.
            .with_timeout(Duration::from_secs(300));
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_credentials(provider)
            .with_virtual_hosted_style_request(false)
            .with_disable_bulk_delete(true)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.,
                },
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            });
        if let Some(e) = &config.endpoint {
            builder = builder.with_endpoint(e);
            if e.starts_with("http://") {
                client = client.with_allow_http(true);
            }
        }
        let store = builder
            .with_client_options(client)
            .build()
            .map_err(|e| BackendError::config(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            config,
            memory: Arc::new(tokio::sync::Semaphore::new((MEMORY_BUDGET >> 20) as usize)),
            list_page_size: None,
        })
    }

    /// Ask for pages of at most `n` entries in [`Backend::list_page`] (tests use small pages).
    pub fn with_list_page_size(mut self, n: usize) -> Self {
        self.list_page_size = Some(n.clamp(1, crate::LIST_PAGE_MAX));
        self
    }

    /// Room in [`MEMORY_BUDGET`] for `len` bytes (whole MiB, capped at the budget).
    async fn reserve(&self, len: u64) -> tokio::sync::OwnedSemaphorePermit {
        let mib = len.div_ceil(1 << 20).clamp(1, MEMORY_BUDGET >> 20) as u32;
        self.memory
            .clone()
            .acquire_many_owned(mib)
            .await
            .expect("the semaphore is never closed")
    }

    pub fn config(&self) -> &S3Config {
        &self.config
    }

    fn path(&self, op: &'static str, key: &str) -> Result<ObjPath, BackendError> {
        let full = if self.config.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.config.prefix)
        };
        ObjPath::parse(&full)
            .ok()
            .filter(|_| !key.is_empty() && !key.ends_with('/'))
            .ok_or_else(|| BackendError::invalid_key(op, key))
    }

    async fn put_single(
        &self,
        path: &ObjPath,
        key: &str,
        payload: PutPayload,
        mode: PutMode,
        attributes: Attributes,
    ) -> Result<(), BackendError> {
        let opts = object_store::PutOptions {
            mode: match mode {
                PutMode::Overwrite => object_store::PutMode::Overwrite,
                PutMode::Create => object_store::PutMode::Create,
            },
            attributes,
            ..Default::default()
        };
        self.store
            .put_opts(path, payload, opts)
            .await
            .map(|_| ())
            .map_err(|e| map_err("put", key, e))
    }

    async fn put_multipart(
        &self,
        path: &ObjPath,
        key: &str,
        file: &std::path::Path,
        len: u64,
        attributes: Attributes,
    ) -> Result<(), BackendError> {
        let part = part_size(len);
        debug!(key, len, part, "multipart upload");
        let mut upload = self
            .store
            .put_multipart_opts(
                path,
                PutMultipartOptions {
                    attributes,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| map_err("put", key, e))?;
        let mut parts = tokio::task::JoinSet::new();
        let result: Result<(), BackendError> = async {
            let mut f = tokio::fs::File::open(file)
                .await
                .map_err(|e| BackendError::io("put", key, e))?;
            let mut remaining = len;
            while remaining > 0 {
                // Room first, then read: at most PARTS_IN_FLIGHT parts in memory.
                while parts.len() >= PARTS_IN_FLIGHT {
                    join_part(&mut parts, key).await?;
                }
                let n = remaining.min(part);
                let permit = self.reserve(n).await;
                let mut buf = vec![0u8; n as usize];
                f.read_exact(&mut buf)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?;
                remaining -= n;
                let sent = upload.put_part(PutPayload::from(Bytes::from(buf)));
                parts.spawn(async move {
                    let r = sent.await;
                    drop(permit);
                    r
                });
            }
            while !parts.is_empty() {
                join_part(&mut parts, key).await?;
            }
            upload
                .complete()
                .await
                .map(|_| ())
                .map_err(|e| map_err("put", key, e))
        }
        .await;
        if result.is_err() {
            parts.abort_all();
            if let Err(e) = upload.abort().await {
                debug!(key, error = %e, "could not abort the multipart upload");
            }
        }
        result
    }

    /// `key` relative to our prefix, if it is below it.
    fn strip<'a>(&self, location: &'a str) -> Option<&'a str> {
        if self.config.prefix.is_empty() {
            Some(location)
        } else {
            location
                .strip_prefix(self.config.prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
        }
    }
}

async fn join_part(
    parts: &mut tokio::task::JoinSet<object_store::Result<()>>,
    key: &str,
) -> Result<(), BackendError> {
    match parts.join_next().await {
        None => Ok(()),
        Some(Ok(r)) => r.map_err(|e| map_err("put", key, e)),
        Some(Err(join)) => Err(BackendError::new(
            ErrorKind::Other,
            "put",
            key,
            format!("part upload task failed: {join}"),
        )),
    }
}

fn content_type(ct: &'static str) -> Attributes {
    let mut a = Attributes::new();
    a.insert(Attribute::ContentType, ct.into());
    a
}

#[async_trait]
impl Backend for S3Backend {
    #[tracing::instrument(level = "debug", skip(self, body, opts), fields(backend = "s3", mode = ?opts.mode))]
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
        let path = self.path("put", key)?;
        let attributes = content_type(opts.content_type);
        match body {
            // Already in memory: one PUT, whatever the mode.
            Body::Bytes(b) => {
                self.put_single(&path, key, b.into(), opts.mode, attributes)
                    .await
            }
            Body::File(staged) => {
                let len = tokio::fs::metadata(&staged)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?
                    .len();
                if len <= SINGLE_PUT_MAX {
                    let _permit = self.reserve(len).await;
                    let data = tokio::fs::read(&staged)
                        .await
                        .map_err(|e| BackendError::io("put", key, e))?;
                    self.put_single(&path, key, Bytes::from(data).into(), opts.mode, attributes)
                        .await
                } else if opts.mode == PutMode::Create {
                    Err(too_big_to_create(key))
                } else {
                    self.put_multipart(&path, key, &staged, len, attributes)
                        .await
                }
            }
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let path = self.path("exists", key)?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err("exists", key, e)),
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn get(&self, key: &str) -> Result<ByteStream, BackendError> {
        let path = self.path("get", key)?;
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| map_err("get", key, e))?;
        let key = key.to_owned();
        Ok(Box::pin(
            result
                .into_stream()
                .map_err(move |e| map_err("get", &key, e)),
        ))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        // object_store lists "directories"; list the deepest one the prefix names and filter.
        let dir = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        let full_dir = match (self.config.prefix.as_str(), dir) {
            ("", d) => d.to_owned(),
            (p, "") => p.to_owned(),
            (p, d) => format!("{p}/{d}"),
        };
        let dir_path = if full_dir.is_empty() {
            None
        } else {
            Some(ObjPath::parse(&full_dir).map_err(|_| {
                BackendError::new(ErrorKind::Config, "list", prefix, "invalid prefix")
            })?)
        };
        let mut stream = self.store.list(dir_path.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream
            .try_next()
            .await
            .map_err(|e| map_err("list", prefix, e))?
        {
            if let Some(k) = self.strip(meta.location.as_ref()) {
                if k.starts_with(prefix) {
                    out.push(k.to_owned());
                }
            }
        }
        Ok(out)
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn list_page(&self, start_after: &str) -> Result<Option<ListPage>, BackendError> {
        // The listing's prefix ends with `/` (S3 prefixes are plain string prefixes), and so
        // does every folder (CommonPrefix) it returns.
        let base = if self.config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.config.prefix)
        };
        let opts = PaginatedListOptions {
            offset: (!start_after.is_empty()).then(|| format!("{base}{start_after}")),
            delimiter: Some("/".into()),
            max_keys: self.list_page_size,
            ..Default::default()
        };
        let page = self
            .store
            .list_paginated((!base.is_empty()).then_some(base.as_str()), opts)
            .await
            .map_err(|e| match e {
                // A key in the bucket that object_store will not represent (`a//b`): the
                // listing is unusable, the address is not wrong.
                object_store::Error::InvalidPath { .. } => BackendError::new(
                    ErrorKind::Other,
                    "list",
                    start_after,
                    format!("unusable listing: {}", error_text(&e)),
                ),
                e => map_err("list", start_after, e),
            })?;
        let objects = page
            .result
            .objects
            .iter()
            .filter_map(|m| self.strip(m.location.as_ref()).map(str::to_owned))
            .collect();
        // object_store drops a folder's trailing `/`; put it back.
        let folders = page
            .result
            .common_prefixes
            .iter()
            .filter_map(|p| self.strip(p.as_ref()).map(|f| format!("{f}/")))
            .collect();
        Ok(Some(crate::assemble_page(
            start_after,
            objects,
            folders,
            page.page_token.is_some(),
            self.list_page_size.unwrap_or(crate::LIST_PAGE_MAX),
        )))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path("delete", key)?;
        match self.store.delete(&path).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = map_err("delete", key, e);
                if e.kind == ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn describe(&self) -> String {
        self.config.describe()
    }
}

fn too_big_to_create(key: &str) -> BackendError {
    BackendError::new(
        ErrorKind::Other,
        "put",
        key,
        format!(
            "create-if-absent is supported for objects of at most {SINGLE_PUT_MAX} bytes on S3 \
             (a multipart upload cannot be completed conditionally here)"
        ),
    )
}

fn map_err(op: &'static str, key: &str, e: object_store::Error) -> BackendError {
    let kind = classify(&e);
    let message = error_text(&e);
    BackendError {
        kind,
        op,
        key: key.to_owned(),
        message,
        source: None,
    }
}

/// The error and its causes on one line; object_store's messages repeat their source's text
/// only sometimes.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// S3 error codes (`<Code>...</Code>` in an error body) that say what to do.
fn s3_code_kind(text: &str) -> Option<ErrorKind> {
    let code = text
        .split("<Code>")
        .nth(1)
        .and_then(|r| r.split("</Code>").next())?;
    Some(match code {
        "NoSuchBucket"
        | "InvalidBucketName"
        | "AuthorizationHeaderMalformed"
        | "PermanentRedirect"
        | "IllegalLocationConstraintException" => ErrorKind::Config,
        "AccessDenied"
        | "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "ExpiredToken"
        | "InvalidToken"
        | "TokenRefreshRequired"
        | "AllAccessDisabled"
        | "RequestTimeTooSkewed"
        | "AccountProblem" => ErrorKind::Permission,
        "SlowDown"
        | "InternalError"
        | "ServiceUnavailable"
        | "RequestTimeout"
        | "OperationAborted"
        | "ConditionalRequestConflict"
        | "Throttling" => ErrorKind::Transient,
        "NoSuchKey" => ErrorKind::NotFound,
        "PreconditionFailed" => ErrorKind::AlreadyExists,
        _ => return None,
    })
}

/// The HTTP status in object_store's retry error text (`non-2xx status code: 503 ...`).
fn status_in(text: &str) -> Option<u16> {
    let rest = text.split("status code: ").nth(1)?;
    rest.get(..3)?.parse().ok()
}

fn classify(e: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    let text = error_text(e);
    let code = s3_code_kind(&text);
    match e {
        // A missing bucket is a wrong address, whatever the operation.
        _ if code == Some(ErrorKind::Config) => ErrorKind::Config,
        E::NotFound { .. } => ErrorKind::NotFound,
        // object_store maps 409 to AlreadyExists, but S3's 409s on a PUT are "a conflicting
        // operation is in progress": try again.
        E::AlreadyExists { .. } if code == Some(ErrorKind::Transient) => ErrorKind::Transient,
        E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => {
            ErrorKind::AlreadyExists
        }
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Permission,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => ErrorKind::Config,
        E::NotSupported { .. } | E::NotImplemented { .. } => ErrorKind::Other,
        _ => classify_generic(e, &text, code),
    }
}

fn classify_generic(e: &object_store::Error, text: &str, code: Option<ErrorKind>) -> ErrorKind {
    use object_store::client::HttpErrorKind as H;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(cu) = c.downcast_ref::<CredentialsUnavailable>() {
            return cu.kind;
        }
        if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
            return match h.kind() {
                H::Connect | H::Request | H::Timeout | H::Interrupted | H::Decode => {
                    ErrorKind::Transient
                }
                _ => ErrorKind::Other,
            };
        }
        cur = c.source();
    }
    if let Some(k) = code {
        return k;
    }
    match status_in(text) {
        Some(404) => ErrorKind::NotFound,
        Some(401 | 403) => ErrorKind::Permission,
        Some(412) => ErrorKind::AlreadyExists,
        Some(408 | 429) => ErrorKind::Transient,
        Some(s) if s >= 500 => ErrorKind::Transient,
        Some(_) => ErrorKind::Other,
        // A 200 whose body holds an error, after the retries ran out.
        None if text.contains("Server returned error response") => ErrorKind::Transient,
        // Bare redirects mean a wrong region.
        None if text.contains("redirect without LOCATION") => ErrorKind::Config,
        None => ErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nix_addresses() {
        let c = S3Config::parse(
            "s3://my-cache/some/prefix/?region=eu-west-1&endpoint=127.0.0.1:8333&scheme=http&profile=p",
        )
        .unwrap();
        assert_eq!(
            c,
            S3Config {
                bucket: "my-cache".into(),
                prefix: "some/prefix".into(),
                region: "eu-west-1".into(),
                endpoint: Some("http://127.0.0.1:8333".into()),
                profile: Some("p".into()),
            }
        );
        let d = S3Config::parse("s3://b").unwrap();
        assert_eq!((d.prefix.as_str(), d.region.as_str()), ("", "us-east-1"));
        assert_eq!(d.endpoint, None);
        // An endpoint's own scheme wins; no scheme means https.
        let e = S3Config::parse("s3://b?endpoint=http://h:1/&scheme=https").unwrap();
        assert_eq!(e.endpoint.as_deref(), Some("http://h:1"));
        let f = S3Config::parse("s3://b?endpoint=minio.example").unwrap();
        assert_eq!(f.endpoint.as_deref(), Some("https://minio.example"));
    }

    #[test]
    fn refuses_bad_addresses_naming_the_problem() {
        let err = |a: &str| S3Config::parse(a).unwrap_err();
        assert!(
            err("s3://b?bogus=1").contains("\"bogus\""),
            "{}",
            err("s3://b?bogus=1")
        );
        assert!(err("s3://b?multipart-upload=true").contains("multipart-upload"));
        assert!(err("s3://?region=x").contains("bucket"));
        assert!(err("s3://b?scheme=ftp").contains("scheme"));
        assert!(err("s3://b?scheme=http").contains("endpoint"));
        assert!(err("s3://b?region=a&region=b").contains("twice"));
        assert!(err("s3://b?endpoint=http://h/path").contains("path"));
        assert!(err("s3://b/a//c").contains("prefix"));
        assert!(err("s3://b/../c").contains("prefix"));
    }

    #[test]
    fn any_file_fits_in_ten_thousand_parts() {
        assert_eq!(part_size(0), MIN_PART_SIZE);
        assert_eq!(part_size(100 << 20), MIN_PART_SIZE);
        for len in [
            MIN_PART_SIZE * MAX_PARTS,
            MIN_PART_SIZE * MAX_PARTS + 1,
            80 << 30,
            1 << 40,
            5 << 40,
        ] {
            let p = part_size(len);
            assert!(len.div_ceil(p) <= MAX_PARTS, "{len}: part {p}");
            assert!(p >= MIN_PART_SIZE && p % (1 << 20) == 0);
            // S3's largest part is 5 GiB.
            assert!(p <= 5 << 30);
        }
    }

    fn generic(msg: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: msg.to_owned().into(),
        }
    }

    #[test]
    fn classifies_errors_hidden_in_generic_ones() {
        let c = |m: &str| classify(&generic(m));
        assert_eq!(
            c("Error performing list request: Server returned non-2xx status code: 503 Service Unavailable: "),
            ErrorKind::Transient
        );
        assert_eq!(
            c("Server returned non-2xx status code: 403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code></Error>"),
            ErrorKind::Permission
        );
        assert_eq!(
            c("Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>"),
            ErrorKind::Config
        );
        assert_eq!(
            c("Server returned non-2xx status code: 429 Too Many Requests"),
            ErrorKind::Transient
        );
        assert_eq!(
            c("Server returned error response: <Error><Code>SlowDown</Code></Error>"),
            ErrorKind::Transient
        );
        assert_eq!(c("something else entirely"), ErrorKind::Other);
        let not_found = object_store::Error::NotFound {
            path: "x".into(),
            source: "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>".into(),
        };
        assert_eq!(classify(&not_found), ErrorKind::Config);
        let conflict = object_store::Error::AlreadyExists {
            path: "x".into(),
            source: "409 Conflict: <Error><Code>ConditionalRequestConflict</Code></Error>".into(),
        };
        assert_eq!(classify(&conflict), ErrorKind::Transient);
        let cred = object_store::Error::Generic {
            store: "S3",
            source: Box::new(CredentialsUnavailable {
                kind: ErrorKind::Config,
                message: "none".into(),
            }),
        };
        assert_eq!(classify(&cred), ErrorKind::Config);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = S3Credentials::Static {
            key_id: "AKIDEXAMPLE".into(),
            secret_key: "very-secret".into(),
            token: Some("session-secret".into()),
        };
        let d = format!("{c:?}");
        assert!(
            d.contains("AKIDEXAMPLE")
                && !d.contains("very-secret")
                && !d.contains("session-secret"),
            "{d}"
        );
    }
}
