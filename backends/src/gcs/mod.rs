//! A cache in a Google Cloud Storage bucket (`gs://`), through a small client of the GCS JSON
//! API (`https://storage.googleapis.com/storage/v1`) over reqwest.
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
//! # Address
//! ```text
//! gs://BUCKET[/PREFIX][?credentials=FILE | ?anonymous=true][&endpoint=URL]
//! ```
//! - `PREFIX`: every key lives below it, so one bucket can hold several caches.
//! - `credentials=FILE`: a service-account key file (JSON, as the Cloud console makes it), or
//!   an `authorized_user` file as `gcloud auth application-default login` writes.
//! - neither: application-default credentials from a file only: `$GOOGLE_APPLICATION_CREDENTIALS`,
//!   else `~/.config/gcloud/application_default_credentials.json`. Nothing else: **the
//!   metadata server (169.254.169.254) is never asked**; without a file the address is refused.
//! - `anonymous=true`: no credentials at all, no token sent (public buckets, emulators).
//! - `endpoint=URL`: another server speaking the JSON API, such as fake-gcs-server
//!   (`endpoint=http://127.0.0.1:4443&anonymous=true`). Default `https://storage.googleapis.com`.
//!
//! Any other parameter is refused with its name. Secrets are read when the backend is opened
//! and never printed.
//!
//! # Tokens
//! A service account signs a JWT (RS256, with aws-lc-rs) and trades it at the file's
//! `token_uri` for an access token (scope `devstorage.read_write`); an authorized user trades
//! its refresh token. Tokens are cached until five minutes before they expire, one refresh at
//! a time. A refused credential (`invalid_grant`, 401, 403) is [`ErrorKind::Permission`].
//!
//! # How the contract is kept
//! - **Atomic puts**: GCS makes an object visible only once its upload completes.
//! - **Create-if-absent**: `ifGenerationMatch=0` on a single-request (multipart) upload, for
//!   every size: GCS checks it atomically and answers `412`, which is
//!   [`ErrorKind::AlreadyExists`]. A single request can carry any size, and the staged file is
//!   streamed into it, so memory stays bounded.
//! - **Overwrite**: bodies in memory and staged files of at most [`RESUMABLE_ABOVE`] bytes go
//!   up in one streamed multipart request. Larger files use a resumable upload in chunks of
//!   [`RESUMABLE_CHUNK`] bytes, each read from the file only when it is sent, so memory is one
//!   chunk whatever the size. After each chunk the server says how much it kept (`308` with
//!   `Range`), and the next chunk starts there. A failed upload is cancelled; the caller
//!   retries what is [`ErrorKind::Transient`].
//! - **Get** streams the response body; **list** follows `nextPageToken` pages.
//! - **Ordered listing** ([`Backend::list_page`]): one `objects.list` request with
//!   `startOffset` (inclusive, so a key equal to it is dropped) and `delimiter=/`, so a page
//!   holds up to [`LIST_PAGE`] names of the cache's top level (narinfos) and each folder (`nar/`,
//!   from `prefixes`) once, however many objects it holds.
//! - **Errors**: 401 and 403 are [`ErrorKind::Permission`]; 404 [`ErrorKind::NotFound`]; 412
//!   [`ErrorKind::AlreadyExists`]; 408, 429 and 5xx, refused connections and timeouts
//!   [`ErrorKind::Transient`].
//! - **A missing bucket** is [`ErrorKind::Config`] (the address is wrong) where a 404 can only
//!   mean the bucket: uploads and listing, and any 404 whose message names the bucket (GCS
//!   itself says "The specified bucket does not exist."). Where GCS answers a bare 404 that
//!   could mean either (fake-gcs-server does for every object request), `get` is
//!   [`ErrorKind::NotFound`], `exists` is `false` and `delete` succeeds; the first upload
//!   reports the bucket.

use std::fmt;
use std::hash::{BuildHasher as _, Hasher as _};
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use base64::Engine as _;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::{Backend, BackendError, Body, ByteStream, ErrorKind, ListPage, PutMode, PutOptions};

pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";
/// Default token endpoint, for credential files that do not name one.
pub const TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The OAuth scope asked for: read and write objects, nothing else.
pub const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";
/// Staged files larger than this go up in a resumable upload (in overwrite mode).
pub const RESUMABLE_ABOVE: u64 = 16 << 20;
/// Bytes per request of a resumable upload: a multiple of 256 KiB, as GCS requires.
pub const RESUMABLE_CHUNK: usize = 8 << 20;
/// Objects per page when listing (GCS's maximum).
pub const LIST_PAGE: u32 = crate::LIST_PAGE_MAX as u32;

/// How requests authenticate.
#[derive(Clone)]
pub enum GcsCredentials {
    /// No token (`anonymous=true`).
    Anonymous,
    /// A service account's key: JWTs signed with it are traded for tokens.
    ServiceAccount {
        file: PathBuf,
        client_email: String,
        private_key_id: Option<String>,
        key: Arc<RsaKeyPair>,
        token_uri: url::Url,
    },
    /// A user's refresh token (application-default credentials from `gcloud`).
    AuthorizedUser {
        file: PathBuf,
        client_id: String,
        client_secret: String,
        refresh_token: String,
        token_uri: url::Url,
    },
}

impl fmt::Debug for GcsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GcsCredentials::Anonymous => f.write_str("Anonymous"),
            GcsCredentials::ServiceAccount {
                file, client_email, ..
            } => write!(
                f,
                "ServiceAccount({client_email:?} from {}, <key redacted>)",
                file.display()
            ),
            GcsCredentials::AuthorizedUser { file, .. } => {
                write!(f, "AuthorizedUser(from {}, <redacted>)", file.display())
            }
        }
    }
}

impl GcsCredentials {
    /// Read a service-account or authorized-user JSON file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let at = |m: String| format!("credentials file {}: {m}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| at(format!("not JSON: {e}")))?;
        let field = |name: &str| {
            v.get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| at(format!("no {name:?}")))
        };
        let token_uri = match v.get("token_uri").and_then(Value::as_str) {
            None | Some("") => TOKEN_URI.to_owned(),
            Some(u) => u.to_owned(),
        };
        let token_uri = url::Url::parse(&token_uri)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| at(format!("token_uri {token_uri:?} is not an http(s) URL")))?;
        match v.get("type").and_then(Value::as_str) {
            Some("service_account") => {
                let pem = field("private_key")?;
                let der = pem_pkcs8(&pem).ok_or_else(|| {
                    at("private_key is not a PEM \"PRIVATE KEY\" (PKCS#8)".to_owned())
                })?;
                let key = RsaKeyPair::from_pkcs8(&der)
                    .map_err(|e| at(format!("private_key is not an RSA key: {e}")))?;
                Ok(GcsCredentials::ServiceAccount {
                    file: path.to_owned(),
                    client_email: field("client_email")?,
                    private_key_id: field("private_key_id").ok(),
                    key: Arc::new(key),
                    token_uri,
                })
            }
            Some("authorized_user") => Ok(GcsCredentials::AuthorizedUser {
                file: path.to_owned(),
                client_id: field("client_id")?,
                client_secret: field("client_secret")?,
                refresh_token: field("refresh_token")?,
                token_uri,
            }),
            Some(other) => Err(at(format!(
                "credentials of type {other:?} are not supported \
                 (service_account and authorized_user are)"
            ))),
            None => Err(at("no \"type\"".to_owned())),
        }
    }

    /// Application-default credentials, from a file only (never the metadata server).
    fn application_default() -> Result<Self, String> {
        if let Some(p) =
            std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").filter(|p| !p.is_empty())
        {
            return Self::from_file(Path::new(&p))
                .map_err(|e| format!("$GOOGLE_APPLICATION_CREDENTIALS: {e}"));
        }
        let well_known = std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|h| h.is_absolute())
            .map(|h| h.join(".config/gcloud/application_default_credentials.json"));
        match well_known {
            Some(p) if p.is_file() => Self::from_file(&p),
            _ => Err(
                "no credentials: give credentials=FILE (a service-account key), set \
                      GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth application-default \
                      login`, or give anonymous=true (public buckets, emulators); the metadata \
                      server is never asked"
                    .to_owned(),
            ),
        }
    }
}

/// The DER inside a PEM `PRIVATE KEY` block.
fn pem_pkcs8(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN PRIVATE KEY-----")? + "-----BEGIN PRIVATE KEY-----".len();
    let end = start + pem[start..].find("-----END PRIVATE KEY-----")?;
    let b64: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// A parsed `gs://` address.
#[derive(Debug, Clone)]
pub struct GcsConfig {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
    /// The API's root, without a trailing `/`.
    pub endpoint: url::Url,
    pub credentials: GcsCredentials,
}

impl GcsConfig {
    /// Parse an address, reading the credential file it names (or the application-default one).
    pub fn parse(addr: &str) -> Result<Self, String> {
        let (location, query) = addr.split_once('?').unwrap_or((addr, ""));
        let rest = location
            .strip_prefix("gs://")
            .ok_or("expected gs://BUCKET[/PREFIX]")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=222).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c));
        if !bucket_ok {
            return Err(format!(
                "{bucket:?} is not a bucket name (3 to 222 of a-z, 0-9, -, _ and .)"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() && !valid_key(prefix) {
            return Err(format!("{prefix:?} is not a valid prefix"));
        }
        let [endpoint, credentials, anonymous] = crate::query_params(
            query,
            "a GCS cache",
            ["endpoint", "credentials", "anonymous"],
            false,
        )?;
        let endpoint = endpoint.unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let mut endpoint_url = url::Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| format!("endpoint {endpoint:?} is not an http(s) URL"))?;
        if endpoint_url.query().is_some() || !endpoint_url.username().is_empty() {
            return Err(format!(
                "endpoint {endpoint:?}: no query or credentials allowed"
            ));
        }
        let trimmed = endpoint_url.path().trim_end_matches('/').to_owned();
        endpoint_url.set_path(&trimmed);
        let anonymous = match anonymous.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => return Err(format!("anonymous must be true or false, not {v:?}")),
        };
        let credentials = match (anonymous, credentials) {
            (true, Some(_)) => return Err("give credentials or anonymous=true, not both".into()),
            (true, None) => GcsCredentials::Anonymous,
            (false, Some(f)) => GcsCredentials::from_file(Path::new(&f))?,
            (false, None) => GcsCredentials::application_default()?,
        };
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: endpoint_url,
            credentials,
        })
    }
}

/// A key is `/`-separated names, none empty, `.` or `..`.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.chars().any(|ch| ch.is_control()))
}

/// Path segments are percent-encoded whole: `/` too (`nar/x` → `nar%2Fx`).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn segment(s: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(s, SEGMENT)
}

/// A `u64` different on every call.
fn unique() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = SystemTime::now().duration_since(UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

// ---------------------------------------------------------------------------------------------
// Errors.

fn status_kind(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        401 | 403 => ErrorKind::Permission,
        404 => ErrorKind::NotFound,
        412 => ErrorKind::AlreadyExists,
        408 | 425 | 429 | 500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Other,
    }
}

/// What an error response says: its status and the message in its JSON body.
async fn response_error(op: &'static str, key: &str, resp: Response) -> BackendError {
    let status = resp.status();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() > 16 << 10 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let message = json
        .as_ref()
        .and_then(|v| {
            let e = v.get("error")?;
            // GCS: {"error": {"message": ...}}; OAuth: {"error": "invalid_grant", ...}.
            e.get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| {
                    let code = e.as_str()?;
                    Some(match v.get("error_description").and_then(Value::as_str) {
                        Some(d) => format!("{code}: {d}"),
                        None => code.to_owned(),
                    })
                })
        })
        .unwrap_or_else(|| text.trim().chars().take(300).collect());
    let text = if message.is_empty() || Some(message.as_str()) == status.canonical_reason() {
        status.to_string()
    } else {
        format!("{status}: {message}")
    };
    BackendError::new(status_kind(status), op, key, text)
}

/// A 404 whose message names the bucket means the bucket is missing: the address is wrong.
fn bucket_missing(e: &BackendError) -> bool {
    let m = e.message.to_ascii_lowercase();
    e.kind == ErrorKind::NotFound && m.contains("bucket") && m.contains("not exist")
}

fn missing_bucket_error(bucket: &str, mut e: BackendError) -> BackendError {
    e.kind = ErrorKind::Config;
    e.message = format!("bucket {bucket:?} does not exist ({})", e.message);
    e
}

// ---------------------------------------------------------------------------------------------
// The backend.

pub struct GcsBackend {
    client: reqwest::Client,
    config: GcsConfig,
    /// The access token and when it expires; locked while a new one is fetched.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    list_page_size: u32,
}

impl fmt::Debug for GcsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcsBackend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Refresh a token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

impl GcsBackend {
    /// Open the cache at `addr`; no request is made.
    pub fn open(addr: &str) -> Result<Self, BackendError> {
        let config = GcsConfig::parse(addr).map_err(BackendError::config)?;
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
        })
    }

    /// List in pages of `n` objects (default [`LIST_PAGE`], also the most allowed).
    pub fn with_list_page_size(mut self, n: u32) -> Self {
        self.list_page_size = n.clamp(1, LIST_PAGE);
        self
    }

    /// One `objects.list` request: the JSON answer, or the error (a 404 means the bucket).
    async fn list_request(
        &self,
        op_key: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, BackendError> {
        let url = self.url(
            &format!("/storage/v1/b/{}/o", segment(&self.config.bucket)),
            query,
        );
        let resp = self.send("list", op_key, self.client.get(url)).await?;
        if !resp.status().is_success() {
            let e = response_error("list", op_key, resp).await;
            return Err(if e.kind == ErrorKind::NotFound {
                missing_bucket_error(&self.config.bucket, e)
            } else {
                e
            });
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| crate::transport_error("list", op_key, &e))?;
        serde_json::from_slice(&body).map_err(|e| {
            BackendError::new(
                ErrorKind::Other,
                "list",
                op_key,
                format!("bad listing: {e}"),
            )
        })
    }

    pub fn config(&self) -> &GcsConfig {
        &self.config
    }

    fn object_name(&self, op: &'static str, key: &str) -> Result<String, BackendError> {
        if !valid_key(key) {
            return Err(BackendError::invalid_key(op, key));
        }
        Ok(if self.config.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.config.prefix)
        })
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

    /// A valid access token, fetched when needed; `None` when anonymous.
    async fn access_token(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<Option<String>, BackendError> {
        if matches!(self.config.credentials, GcsCredentials::Anonymous) {
            return Ok(None);
        }
        let mut slot = self.token.lock().await;
        if let Some((t, expires)) = &*slot {
            if Instant::now() + TOKEN_MARGIN < *expires {
                return Ok(Some(t.clone()));
            }
        }
        let (token, ttl) = self.fetch_token(op, key).await?;
        *slot = Some((token.clone(), Instant::now() + ttl));
        Ok(Some(token))
    }

    /// Where to ask for a token, and the form to send there. (Not async: the serializer is
    /// not `Send`.)
    fn token_request(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<(url::Url, String), BackendError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        let token_uri = match &self.config.credentials {
            GcsCredentials::Anonymous => unreachable!("anonymous requests need no token"),
            GcsCredentials::ServiceAccount {
                client_email,
                private_key_id,
                key: rsa,
                token_uri,
                file,
            } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let mut header = json!({"alg": "RS256", "typ": "JWT"});
                if let Some(kid) = private_key_id {
                    header["kid"] = json!(kid);
                }
                let claims = json!({
                    "iss": client_email,
                    "scope": SCOPE,
                    "aud": token_uri.as_str(),
                    "iat": now,
                    "exp": now + 3600,
                });
                let signed = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let mut sig = vec![0; rsa.public_modulus_len()];
                rsa.sign(
                    &RSA_PKCS1_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    signed.as_bytes(),
                    &mut sig,
                )
                .map_err(|_| {
                    BackendError::new(
                        ErrorKind::Config,
                        op,
                        key,
                        format!("cannot sign with the key in {}", file.display()),
                    )
                })?;
                form.append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer");
                form.append_pair("assertion", &format!("{signed}.{}", b64url(&sig)));
                token_uri
            }
            GcsCredentials::AuthorizedUser {
                client_id,
                client_secret,
                refresh_token,
                token_uri,
                ..
            } => {
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("client_id", client_id);
                form.append_pair("client_secret", client_secret);
                form.append_pair("refresh_token", refresh_token);
                token_uri
            }
        };
        Ok((token_uri.clone(), form.finish()))
    }

    async fn fetch_token(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<(String, Duration), BackendError> {
        let (token_uri, body) = self.token_request(op, key)?;
        let resp = self
            .client
            .post(token_uri.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| crate::transport_error(op, key, &e))?;
        let status = resp.status();
        if !status.is_success() {
            let mut e = response_error(op, key, resp).await;
            // The token endpoint says 400 for a refused grant (`invalid_grant`).
            if matches!(status.as_u16(), 400 | 401 | 403) {
                e.kind = ErrorKind::Permission;
            }
            e.message = format!("getting an access token from {token_uri}: {}", e.message);
            return Err(e);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| crate::transport_error(op, key, &e))?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                BackendError::new(
                    ErrorKind::Other,
                    op,
                    key,
                    format!("{token_uri} answered without an access_token"),
                )
            })?;
        let ttl = v.get("expires_in").and_then(Value::as_u64).unwrap_or(3600);
        Ok((token.to_owned(), Duration::from_secs(ttl)))
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
        req.send()
            .await
            .map_err(|e| crate::transport_error(op, key, &e))
    }

    /// The token goes only to the configured endpoint's origin.
    fn same_origin(&self, u: &url::Url) -> bool {
        u.origin() == self.config.endpoint.origin()
    }

    async fn put_multipart(
        &self,
        key: &str,
        name: &str,
        body: Body,
        opts: &PutOptions,
    ) -> Result<(), BackendError> {
        let boundary = format!("nixpush-{:016x}{:016x}", unique(), unique());
        let meta = json!({"name": name, "contentType": opts.content_type}).to_string();
        let head = Bytes::from(format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n\
             --{boundary}\r\nContent-Type: {}\r\n\r\n",
            opts.content_type
        ));
        let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
        let (len, data): (
            u64,
            futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
        ) = match &body {
            Body::Bytes(b) => (
                b.len() as u64,
                futures::stream::once(futures::future::ready(Ok(b.clone()))).boxed(),
            ),
            Body::File(p) => {
                let f = tokio::fs::File::open(p)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?;
                let len = f
                    .metadata()
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?
                    .len();
                (
                    len,
                    tokio_util::io::ReaderStream::with_capacity(f, 256 << 10).boxed(),
                )
            }
        };
        let total = head.len() as u64 + len + tail.len() as u64;
        let stream = futures::stream::iter([Ok(head)])
            .chain(data)
            .chain(futures::stream::iter([Ok(tail)]));
        let mut query = vec![("uploadType", "multipart")];
        if opts.mode == PutMode::Create {
            query.push(("ifGenerationMatch", "0"));
        }
        let req = self
            .client
            .post(self.upload_url(&query))
            .header(
                CONTENT_TYPE,
                format!("multipart/related; boundary={boundary}"),
            )
            .header(CONTENT_LENGTH, total)
            .body(reqwest::Body::wrap_stream(stream));
        let resp = self.send("put", key, req).await?;
        drop(body);
        if resp.status().is_success() {
            return Ok(());
        }
        let e = response_error("put", key, resp).await;
        Err(match e.kind {
            ErrorKind::AlreadyExists => BackendError::new(
                ErrorKind::AlreadyExists,
                "put",
                key,
                "an object with this key exists",
            ),
            ErrorKind::NotFound => missing_bucket_error(&self.config.bucket, e),
            _ => e,
        })
    }

    async fn put_resumable(
        &self,
        key: &str,
        name: &str,
        file: &Path,
        opts: &PutOptions,
    ) -> Result<(), BackendError> {
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| BackendError::io("put", key, e))?;
        let total = f
            .metadata()
            .await
            .map_err(|e| BackendError::io("put", key, e))?
            .len();
        let meta = json!({"name": name, "contentType": opts.content_type}).to_string();
        let req = self
            .client
            .post(self.upload_url(&[("uploadType", "resumable"), ("name", name)]))
            .header(CONTENT_TYPE, "application/json; charset=UTF-8")
            .header("X-Upload-Content-Type", opts.content_type)
            .header("X-Upload-Content-Length", total)
            .body(meta);
        let resp = self.send("put", key, req).await?;
        if !resp.status().is_success() {
            let e = response_error("put", key, resp).await;
            return Err(if e.kind == ErrorKind::NotFound {
                missing_bucket_error(&self.config.bucket, e)
            } else {
                e
            });
        }
        let session = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| url::Url::parse(s).ok())
            .ok_or_else(|| {
                BackendError::new(
                    ErrorKind::Other,
                    "put",
                    key,
                    "the resumable upload was started without a session URL (Location)",
                )
            })?;
        let r = self
            .send_chunks(key, &session, &mut f, total, opts.content_type)
            .await;
        if r.is_err() {
            // Cancel, so the server can drop what it kept (GCS answers 499).
            let _ = self
                .session_request(Method::DELETE, &session, "put", key)
                .await;
        }
        r
    }

    /// A request to a resumable upload's session URL.
    async fn session_request(
        &self,
        method: Method,
        session: &url::Url,
        op: &'static str,
        key: &str,
    ) -> Result<Response, BackendError> {
        let req = self.client.request(method, session.clone());
        if self.same_origin(session) {
            self.send(op, key, req).await
        } else {
            req.send()
                .await
                .map_err(|e| crate::transport_error(op, key, &e))
        }
    }

    async fn send_chunks(
        &self,
        key: &str,
        session: &url::Url,
        f: &mut tokio::fs::File,
        total: u64,
        content_type: &'static str,
    ) -> Result<(), BackendError> {
        let mut offset = 0u64;
        let mut stalls = 0;
        loop {
            let n = (total - offset).min(RESUMABLE_CHUNK as u64) as usize;
            f.seek(SeekFrom::Start(offset))
                .await
                .map_err(|e| BackendError::io("put", key, e))?;
            let mut buf = vec![0u8; n];
            f.read_exact(&mut buf)
                .await
                .map_err(|e| BackendError::io("put", key, e))?;
            let last = offset + n as u64 - 1;
            let req = self
                .client
                .put(session.clone())
                .header(CONTENT_TYPE, content_type)
                .header(CONTENT_LENGTH, n)
                .header("Content-Range", format!("bytes {offset}-{last}/{total}"))
                .body(buf);
            let req = if self.same_origin(session) {
                match self.access_token("put", key).await? {
                    Some(t) => req.bearer_auth(t),
                    None => req,
                }
            } else {
                req
            };
            let resp = req
                .send()
                .await
                .map_err(|e| crate::transport_error("put", key, &e))?;
            let status = resp.status();
            if status.is_success() {
                if last + 1 == total {
                    return Ok(());
                }
                return Err(BackendError::new(
                    ErrorKind::Other,
                    "put",
                    key,
                    format!(
                        "the upload was completed after {} of {total} bytes",
                        last + 1
                    ),
                ));
            }
            if status.as_u16() != 308 {
                return Err(response_error("put", key, resp).await);
            }
            // `Range: bytes=0-N`: what the server kept; none without the header.
            let kept = resp
                .headers()
                .get(RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|r| r.rsplit_once('-'))
                .and_then(|(_, end)| end.trim().parse::<u64>().ok())
                .map_or(0, |end| end + 1);
            if kept > last + 1 || kept >= total {
                return Err(BackendError::new(
                    ErrorKind::Other,
                    "put",
                    key,
                    format!(
                        "the server claims {kept} bytes after {} were sent",
                        last + 1
                    ),
                ));
            }
            if kept <= offset {
                stalls += 1;
                if stalls >= 3 {
                    return Err(BackendError::new(
                        ErrorKind::Transient,
                        "put",
                        key,
                        format!("the server keeps no more than {kept} of {total} bytes"),
                    ));
                }
            } else {
                stalls = 0;
            }
            offset = kept;
        }
    }
}

#[async_trait]
impl Backend for GcsBackend {
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
        let name = self.object_name("put", key)?;
        let big = match &body {
            Body::File(p) if opts.mode == PutMode::Overwrite => {
                tokio::fs::metadata(p)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?
                    .len()
                    > RESUMABLE_ABOVE
            }
            _ => false,
        };
        match body {
            Body::File(p) if big => {
                let r = self.put_resumable(key, &name, &p, &opts).await;
                drop(p);
                r
            }
            body => self.put_multipart(key, &name, body, &opts).await,
        }
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
        let e = response_error("exists", key, resp).await;
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
            let e = response_error("get", key, resp).await;
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

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let full = if self.config.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{prefix}", self.config.prefix)
        };
        let strip = if self.config.prefix.is_empty() {
            0
        } else {
            self.config.prefix.len() + 1
        };
        let page = self.list_page_size.to_string();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![
                ("prefix", full.as_str()),
                ("maxResults", page.as_str()),
                ("fields", "items(name),nextPageToken"),
            ];
            if let Some(t) = &token {
                query.push(("pageToken", t.as_str()));
            }
            let v = self.list_request(prefix, &query).await?;
            for item in v
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(n) = item.get("name").and_then(Value::as_str) {
                    if n.len() >= strip && n.starts_with(&full) {
                        out.push(n[strip..].to_owned());
                    }
                }
            }
            match v.get("nextPageToken").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && token.as_deref() != Some(t) => {
                    token = Some(t.to_owned())
                }
                _ => return Ok(out),
            }
        }
    }

    async fn list_page(&self, start_after: &str) -> Result<Option<ListPage>, BackendError> {
        let base = if self.config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.config.prefix)
        };
        let offset = format!("{base}{start_after}");
        let page = self.list_page_size.to_string();
        let mut query = vec![
            ("delimiter", "/"),
            ("maxResults", page.as_str()),
            ("fields", "items(name),prefixes,nextPageToken"),
        ];
        if !base.is_empty() {
            query.push(("prefix", base.as_str()));
        }
        if !start_after.is_empty() {
            query.push(("startOffset", offset.as_str()));
        }
        let v = self.list_request(start_after, &query).await?;
        let strings = |field: &str| -> Vec<String> {
            v.get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|x| match x {
                    // Folders are plain strings (with their trailing `/`), objects `{"name"}`.
                    Value::String(s) => Some(s.as_str()),
                    x => x.get("name").and_then(Value::as_str),
                })
                .filter_map(|n| n.strip_prefix(base.as_str()))
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let more = v
            .get("nextPageToken")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty());
        // `startOffset` is inclusive: `assemble_page` drops a key equal to it.
        Ok(Some(crate::assemble_page(
            start_after,
            strings("items"),
            strings("prefixes"),
            more,
            self.list_page_size as usize,
        )))
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let name = self.object_name("delete", key)?;
        let req = self.client.delete(self.object_url(&name, &[]));
        let resp = self.send("delete", key, req).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        let e = response_error("delete", key, resp).await;
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
    fn parses_addresses() {
        let c = GcsConfig::parse("gs://my-bucket/some/prefix/?anonymous=true").unwrap();
        assert_eq!(c.bucket, "my-bucket");
        assert_eq!(c.prefix, "some/prefix");
        assert_eq!(c.endpoint.as_str(), "https://storage.googleapis.com/");
        assert!(matches!(c.credentials, GcsCredentials::Anonymous));
        let c =
            GcsConfig::parse("gs://b12?anonymous=true&endpoint=http://127.0.0.1:4443/").unwrap();
        assert_eq!(c.prefix, "");
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

    #[test]
    fn refuses_bad_addresses_naming_the_problem() {
        for (addr, needle) in [
            ("gs://bucket?anonymous=true&bogus=1", "\"bogus\""),
            ("gs://Bucket?anonymous=true", "bucket name"),
            ("gs://b?anonymous=true", "bucket name"),
            ("gs://bucket/a/../b?anonymous=true", "prefix"),
            ("gs://bucket?anonymous=yes", "true or false"),
            (
                "gs://bucket?credentials=/nonexistent/sa.json",
                "/nonexistent/sa.json",
            ),
            ("gs://bucket?anonymous=true&endpoint=ftp://x", "endpoint"),
            ("s3://bucket", "gs://"),
        ] {
            let e = GcsConfig::parse(addr).unwrap_err();
            assert!(e.contains(needle), "{addr}: {e:?} does not name {needle:?}");
        }
    }

    #[test]
    fn reads_credential_files() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("adc.json");
        std::fs::write(
            &user,
            r#"{"type":"authorized_user","client_id":"id","client_secret":"s3cr3t","refresh_token":"r3fr3sh"}"#,
        )
        .unwrap();
        let c = GcsCredentials::from_file(&user).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("r3fr3sh"),
            "{shown}"
        );
        let ext = dir.path().join("ext.json");
        std::fs::write(&ext, r#"{"type":"external_account"}"#).unwrap();
        assert!(GcsCredentials::from_file(&ext)
            .unwrap_err()
            .contains("external_account"));
        let bad = dir.path().join("sa.json");
        std::fs::write(
            &bad,
            r#"{"type":"service_account","client_email":"a@b","private_key":"nope"}"#,
        )
        .unwrap();
        assert!(GcsCredentials::from_file(&bad)
            .unwrap_err()
            .contains("PRIVATE KEY"));
    }
}
