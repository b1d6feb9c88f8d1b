//! A cache in an S3 bucket or an S3-compatible store (`s3://`), through the `object_store` crate.
//!
//! ```text
//! s3://BUCKET[/PREFIX][?region=R&endpoint=URL&profile=NAME&scheme=http|https]
//! ```
//! The parameters are Nix's own; any other is refused with its name.
//!
//! # Where what is
//! - `address`: [`S3Config`], the address and its parameters, as Nix's `S3BinaryCacheStore`.
//! - `credentials`: [`S3Credentials`], where the keys come from (given, environment, aws-config).
//! - `upload`: puts, and how they stay atomic, create-if-absent and bounded in memory.
//! - `listing`: `list` and the ordered one-request pages of `list_page`.
//! - `error`: object_store's errors, classified into [`ErrorKind`]s.
//! - `throttled`: every HTTP request through the backend's adaptive limit
//!   ([`crate::throttle`]).
//! - here: the backend, its HTTP client, and the requests on one object (exists, get, delete).
//!
//! # Retries and throttling
//! object_store retries connection failures, 5xx and throttling (429) with exponential
//! backoff, for at most [`RETRY_TIMEOUT`] and [`MAX_RETRIES`] times per request (shorter than
//! its defaults: the caller retries too, and a down cache should be reported within seconds).
//! It does not read `Retry-After`, never lowers its concurrency, and does not retry a PUT
//! that timed out or whose answer broke off (not idempotent to it). So: every request also
//! goes through the backend's [`Limiter`](crate::throttle::Limiter), which honours
//! `Retry-After` and halves the requests in flight on 429 and 503; and a put that failed
//! transiently is tried again whole ([`crate::retry_transient`]), which is safe because our
//! puts are idempotent (a NAR's key is its hash; a narinfo's create-if-absent then answers
//! "already exists").

mod address;
mod credentials;
mod error;
mod listing;
mod throttled;
mod upload;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStoreExt as _, RetryConfig};

pub use address::S3Config;
pub use credentials::S3Credentials;
pub use upload::{
    MAX_PARTS, MEMORY_BUDGET, MIN_PART_SIZE, PARTS_IN_FLIGHT, S3_MIN_PART_SIZE, SINGLE_PUT_MAX,
    part_size,
};

use crate::throttle::{DEFAULT_MAX_IN_FLIGHT, Limiter};
use crate::{Backend, BackendError, Body, ByteStream, ErrorKind, ListPage, ObjectInfo, PutOptions};
use error::{ErrorContext, map_err};

/// Attempts of one request after the first, at most.
pub const MAX_RETRIES: usize = 4;
/// Time spent retrying one request, at most.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct S3Backend {
    store: Arc<AmazonS3>,
    config: S3Config,
    /// What error messages say of where the bucket is and where the keys came from.
    errors: Arc<ErrorContext>,
    /// [`MEMORY_BUDGET`] in MiB permits.
    memory: Arc<tokio::sync::Semaphore>,
    /// `max-keys` of a [`Backend::list_page`] request; `None`: the store's default (1000 on S3).
    list_page_size: Option<usize>,
    /// Requests in flight, adapted to the store's throttling.
    limiter: Arc<Limiter>,
    /// How multipart uploads are cut.
    multipart: upload::Multipart,
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
        let config = S3Config::parse(addr).map_err(BackendError::from)?;
        Self::new(config, S3Credentials::Environment).await
    }

    /// No request is made: a wrong bucket or key shows on the first operation.
    pub async fn new(config: S3Config, credentials: S3Credentials) -> Result<Self, BackendError> {
        let (provider, keys) = credentials
            .provider(&config)
            .await
            .map_err(BackendError::from)?;
        let mut client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            // A whole request, one part included: 8 MiB at 256 kbit/s.
            .with_timeout(crate::request_timeout(Duration::from_secs(300)));
        let limiter = Limiter::new(DEFAULT_MAX_IN_FLIGHT);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_credentials(provider)
            .with_virtual_hosted_style_request(false)
            .with_disable_bulk_delete(true)
            .with_http_connector(throttled::ThrottledConnector {
                limiter: limiter.clone(),
            })
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
        let errors = Arc::new(ErrorContext {
            endpoint: config
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.region)),
            custom_endpoint: config.endpoint.is_some(),
            bucket: config.bucket.clone(),
            region: config.region.clone(),
            keys,
        });
        Ok(Self {
            store: Arc::new(store),
            errors,
            config,
            memory: Arc::new(tokio::sync::Semaphore::new((MEMORY_BUDGET >> 20) as usize)),
            list_page_size: None,
            limiter,
            multipart: upload::Multipart::default(),
        })
    }

    /// The backend's adaptive limit of requests in flight (see [`crate::throttle`]).
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Cut multipart uploads into at most `max_parts` parts (S3 allows [`MAX_PARTS`]) of at
    /// least `min_part_size` bytes (S3 requires [`S3_MIN_PART_SIZE`]): tests use a few parts
    /// to see the part size grow on a small file. Values outside S3's limits are clamped.
    pub fn with_multipart_limits(mut self, min_part_size: u64, max_parts: u64) -> Self {
        self.multipart = upload::Multipart::new(min_part_size, max_parts);
        self
    }

    /// Ask for pages of at most `n` entries in [`Backend::list_page`] (tests use small pages).
    pub fn with_list_page_size(mut self, n: usize) -> Self {
        self.list_page_size = Some(n.clamp(1, crate::LIST_PAGE_MAX));
        self
    }

    pub fn config(&self) -> &S3Config {
        &self.config
    }

    fn path(&self, op: &'static str, key: &str) -> Result<ObjPath, BackendError> {
        let full = crate::under_prefix(&self.config.prefix, key);
        ObjPath::parse(&full)
            .ok()
            .filter(|_| !key.is_empty() && !key.ends_with('/'))
            .ok_or_else(|| BackendError::invalid_key(op, key))
    }
}

#[async_trait]
impl Backend for S3Backend {
    #[tracing::instrument(level = "debug", skip(self, body, opts), fields(backend = "s3", mode = ?opts.mode))]
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
        let path = self.path("put", key)?;
        self.upload(&path, key, body, opts).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let path = self.path("exists", key)?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err(&self.errors, "exists", key, e)),
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn get(&self, key: &str) -> Result<ByteStream, BackendError> {
        let path = self.path("get", key)?;
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| map_err(&self.errors, "get", key, e))?;
        let key = key.to_owned();
        let errors = self.errors.clone();
        Ok(Box::pin(
            result
                .into_stream()
                .map_err(move |e| map_err(&errors, "get", &key, e)),
        ))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.list_keys(prefix).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn list_page(&self, start_after: &str) -> Result<Option<ListPage>, BackendError> {
        self.list_ordered(start_after).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "s3"))]
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path("delete", key)?;
        match self.store.delete(&path).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = map_err(&self.errors, "delete", key, e);
                if e.kind == ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// A put of at most [`crate::CREATE_LIMIT`] bytes is one PUT, with `If-None-Match: *`
    /// in [`crate::PutMode::Create`].
    fn creates_in_one_request(&self) -> bool {
        true
    }

    /// DeleteObjects requests of up to 1000 keys (object_store's `delete_stream`).
    #[tracing::instrument(level = "debug", skip_all, fields(backend = "s3", keys = keys.len()))]
    async fn delete_batch(&self, keys: Vec<String>) -> Vec<Result<(), BackendError>> {
        use futures::StreamExt as _;
        use object_store::ObjectStore as _;
        let mut out: Vec<Option<Result<(), BackendError>>> = Vec::with_capacity(keys.len());
        let mut paths = Vec::new();
        let mut index = std::collections::HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            match self.path("delete", key) {
                Ok(p) => {
                    index.insert(p.to_string(), i);
                    paths.push(Ok(p));
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let mut results = self
            .store
            .delete_stream(futures::stream::iter(paths).boxed());
        let mut first_error: Option<BackendError> = None;
        loop {
            match results.try_next().await {
                Ok(Some(p)) => {
                    if let Some(&i) = index.get(p.as_ref()) {
                        out[i] = Some(Ok(()));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let e = map_err(&self.errors, "delete", "", e);
                    if e.kind == ErrorKind::NotFound {
                        continue;
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        // A key the store did not confirm failed; the store's error names which.
        out.into_iter()
            .zip(&keys)
            .map(|(r, key)| {
                r.unwrap_or_else(|| {
                    Err(match &first_error {
                        Some(e) => BackendError::new(e.kind, "delete", key, e.message.clone()),
                        None => BackendError::new(
                            ErrorKind::Transient,
                            "delete",
                            key,
                            "the store did not confirm the removal",
                        ),
                    })
                })
            })
            .collect()
    }

    fn describe(&self) -> String {
        self.config.describe()
    }
}
