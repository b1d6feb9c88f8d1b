//! A cache in a Google Cloud Storage bucket (`gs://`), through a small client of the GCS JSON
//! API (`https://storage.googleapis.com/storage/v1`) over reqwest.
//!
//! ```text
//! gs://BUCKET[/PREFIX][?credentials=FILE | ?anonymous=true | ?metadata-server=true][&endpoint=URL]
//! ```
//!
//! # Why a hand-written client
//! object_store's GCS backend writes through the XML API, which the GCS emulator used for the
//! tests (fake-gcs-server) rejects, so it could not be tested here. Google's official
//! `google-cloud-storage` crate brings a gRPC and protobuf stack (tonic, prost, its own auth
//! crate) for a handful of calls, minutes more of compilation, and falls back to the metadata
//! server when it finds no credentials. The calls nixpush needs (upload, download, metadata,
//! list, delete) are a few hundred lines over the reqwest and rustls the HTTP backend already
//! uses, with credentials handled explicitly.
//!
//! # Where what is
//! - `address`: [`GcsConfig`], the address and its parameters.
//! - `auth`: [`GcsCredentials`], service-account JWTs, refresh tokens, the token cache.
//! - `upload`: puts (multipart or resumable), atomic and create-if-absent, bounded in memory.
//! - `listing`: `list` and the ordered one-request pages of `list_page`.
//! - `error`: error responses, classified into [`ErrorKind`]s; the missing bucket.
//! - here: the backend, the JSON API's URLs, and the requests on one object (exists, get,
//!   delete). **Get** streams the response body. Every request to the store goes through
//!   the backend's adaptive [`Limiter`](crate::throttle::Limiter) (429 and 503 halve the
//!   requests in flight, `Retry-After` holds them back); no request is retried here.

mod address;
mod auth;
mod error;
mod listing;
mod upload;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt as _;
use reqwest::{RequestBuilder, Response};

pub use address::{DEFAULT_ENDPOINT, GcsConfig};
pub use auth::{GcsCredentials, SCOPE, TOKEN_URI};
pub use listing::LIST_PAGE;
pub use upload::{RESUMABLE_ABOVE, RESUMABLE_CHUNK};

use crate::throttle::{Answer, DEFAULT_MAX_IN_FLIGHT, Limiter};
use crate::{Backend, BackendError, Body, ByteStream, ErrorKind, ListPage, ObjectInfo, PutOptions};
use address::valid_key;
use error::{bucket_missing, missing_bucket_error, response_error};

/// Path segments are percent-encoded whole: `/` too (`nar/x` → `nar%2Fx`).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn segment(s: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(s, SEGMENT)
}

pub struct GcsBackend {
    client: reqwest::Client,
    config: GcsConfig,
    /// The access token and when it expires; locked while a new one is fetched.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    list_page_size: u32,
    /// Requests in flight, adapted to the store's throttling.
    limiter: Arc<Limiter>,
}

impl fmt::Debug for GcsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcsBackend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GcsBackend {
    /// Open the cache at `addr`; no request is made.
    pub fn open(addr: &str) -> Result<Self, BackendError> {
        let config = GcsConfig::parse(addr).map_err(BackendError::from)?;
        Self::new(config)
    }

    pub fn new(config: GcsConfig) -> Result<Self, BackendError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| crate::transport_error("open", "", &e))?;
        Ok(Self {
            client,
            config,
            token: tokio::sync::Mutex::new(None),
            list_page_size: LIST_PAGE,
            limiter: Limiter::new(DEFAULT_MAX_IN_FLIGHT),
        })
    }

    /// List in pages of `n` objects (default [`LIST_PAGE`], also the most allowed).
    pub fn with_list_page_size(mut self, n: u32) -> Self {
        self.list_page_size = n.clamp(1, LIST_PAGE);
        self
    }

    pub fn config(&self) -> &GcsConfig {
        &self.config
    }

    fn object_name(&self, op: &'static str, key: &str) -> Result<String, BackendError> {
        if !valid_key(key) {
            return Err(BackendError::invalid_key(op, key));
        }
        Ok(crate::under_prefix(&self.config.prefix, key))
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> url::Url {
        let mut u = self.config.endpoint.clone();
        let base = u.path().trim_end_matches('/').to_owned();
        u.set_path(&format!("{base}{path}"));
        if !query.is_empty() {
            u.query_pairs_mut().extend_pairs(query);
        }
        u
    }

    /// `…/storage/v1/b/BUCKET/o/NAME`
    fn object_url(&self, name: &str, query: &[(&str, &str)]) -> url::Url {
        self.url(
            &format!(
                "/storage/v1/b/{}/o/{}",
                segment(&self.config.bucket),
                segment(name)
            ),
            query,
        )
    }

    fn upload_url(&self, query: &[(&str, &str)]) -> url::Url {
        self.url(
            &format!("/upload/storage/v1/b/{}/o", segment(&self.config.bucket)),
            query,
        )
    }

    /// Send a request with the token (if any), returning the response whatever its status.
    async fn send(
        &self,
        op: &'static str,
        key: &str,
        req: RequestBuilder,
    ) -> Result<Response, BackendError> {
        let req = match self.access_token(op, key).await? {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        self.send_limited(op, key, req).await
    }

    /// Send under a permit of the limiter, telling it whether the store throttled.
    async fn send_limited(
        &self,
        op: &'static str,
        key: &str,
        req: RequestBuilder,
    ) -> Result<Response, BackendError> {
        let permit = self.limiter.acquire().await;
        let resp = req
            .send()
            .await
            .map_err(|e| self.unreachable(crate::transport_error(op, key, &e)))?;
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .map(|v| v.as_bytes());
        permit.answered(Answer::from_status(resp.status().as_u16(), retry_after));
        Ok(resp)
    }

    /// A request that got no answer, with what to check.
    fn unreachable(&self, mut e: BackendError) -> BackendError {
        let hint = if self.config.endpoint.as_str().trim_end_matches('/') == DEFAULT_ENDPOINT {
            "is the network up?"
        } else {
            "is the server up, and is the address's endpoint= right?"
        };
        e.message = format!("{}; {hint}", e.message);
        e
    }

    /// An error response to a storage request: refusals say whose credentials to check.
    async fn storage_error(&self, op: &'static str, key: &str, resp: Response) -> BackendError {
        let mut e = response_error(op, key, resp).await;
        if e.kind == ErrorKind::Permission {
            let bucket = &self.config.bucket;
            e.message = match self.config.credentials.who() {
                None => format!(
                    "{}; anonymous requests may not use bucket {bucket:?}: give credentials=FILE",
                    e.message
                ),
                Some(who) => format!(
                    "{}; check that {who} may use bucket {bucket:?} (a role such as \
                     roles/storage.objectUser on it)",
                    e.message
                ),
            };
        }
        e
    }
}

#[async_trait]
impl Backend for GcsBackend {
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
        let name = self.object_name("put", key)?;
        self.upload(key, &name, body, opts).await
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let name = self.object_name("exists", key)?;
        let req = self
            .client
            .get(self.object_url(&name, &[("fields", "name")]));
        let resp = self.send("exists", key, req).await?;
        if resp.status().is_success() {
            return Ok(true);
        }
        let e = self.storage_error("exists", key, resp).await;
        if bucket_missing(&e) {
            Err(missing_bucket_error(&self.config.bucket, e))
        } else if e.kind == ErrorKind::NotFound {
            Ok(false)
        } else {
            Err(e)
        }
    }

    async fn get(&self, key: &str) -> Result<ByteStream, BackendError> {
        let name = self.object_name("get", key)?;
        let req = self.client.get(self.object_url(&name, &[("alt", "media")]));
        let resp = self.send("get", key, req).await?;
        if !resp.status().is_success() {
            let e = self.storage_error("get", key, resp).await;
            return Err(if bucket_missing(&e) {
                missing_bucket_error(&self.config.bucket, e)
            } else {
                e
            });
        }
        let key = key.to_owned();
        Ok(Box::pin(
            resp.bytes_stream()
                .map_err(move |e| crate::transport_error("get", &key, &e)),
        ))
    }

    async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.list_keys(prefix).await
    }

    async fn list_page(&self, start_after: &str) -> Result<Option<ListPage>, BackendError> {
        self.list_ordered(start_after).await
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let name = self.object_name("delete", key)?;
        let req = self.client.delete(self.object_url(&name, &[]));
        let resp = self.send("delete", key, req).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        let e = self.storage_error("delete", key, resp).await;
        if bucket_missing(&e) {
            Err(missing_bucket_error(&self.config.bucket, e))
        } else if e.kind == ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    }

    fn describe(&self) -> String {
        let loc = if self.config.prefix.is_empty() {
            format!("gs://{}", self.config.bucket)
        } else {
            format!("gs://{}/{}", self.config.bucket, self.config.prefix)
        };
        if self.config.endpoint.as_str().trim_end_matches('/') == DEFAULT_ENDPOINT {
            loc
        } else {
            format!("{loc} (at {})", self.config.endpoint)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_urls_and_describes() {
        let c =
            GcsConfig::parse("gs://b12?anonymous=true&endpoint=http://127.0.0.1:4443/").unwrap();
        let b = GcsBackend::new(c).unwrap();
        assert_eq!(
            b.object_url("nar/a b+c.nar", &[("alt", "media")]).as_str(),
            "http://127.0.0.1:4443/storage/v1/b/b12/o/nar%2Fa%20b%2Bc.nar?alt=media"
        );
        assert_eq!(
            b.upload_url(&[("uploadType", "multipart")]).as_str(),
            "http://127.0.0.1:4443/upload/storage/v1/b/b12/o?uploadType=multipart"
        );
        assert_eq!(b.describe(), "gs://b12 (at http://127.0.0.1:4443/)");
    }
}
