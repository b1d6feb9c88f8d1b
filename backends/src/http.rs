//! A cache on a web server that accepts uploads by `PUT` (`http://`, `https://`), as Nix's
//! `HttpBinaryCacheStore` writes one (`src/libstore/http-binary-cache-store.cc`, `upsertFile`):
//! every object is `BASE/KEY`. nginx with its WebDAV module, Apache `mod_dav`, or any server
//! that stores a `PUT` body under its URL will do; Nix then reads the same URL as a
//! substituter.
//!
//! # Address
//! ```text
//! http(s)://HOST[:PORT][/PATH][?token-file=FILE | ?basic-auth-file=FILE]
//! ```
//! - `token-file`: a file holding a bearer token (`Authorization: Bearer TOKEN`);
//! - `basic-auth-file`: a file holding `USER:PASSWORD` (`Authorization: Basic ...`);
//! - neither: the bearer token in the environment variable `NIXPUSH_TOKEN`, if set; else no
//!   authentication.
//!
//! Any other parameter, or credentials in the URL itself, is refused. Secrets are read once
//! when the backend is opened, sent on every request (marked sensitive, so reqwest drops them on
//! a redirect to another host) and never printed: `Debug` says only which kind there is.
//!
//! # How the contract is kept, and where it depends on the server
//! - `exists` is `HEAD` (2xx: present, 404 or 410: absent), `get` a streamed `GET`, `delete`
//!   a `DELETE` (404 and 410 count as done).
//! - `put` streams a staged file from disk with its `Content-Length` (never chunked, never
//!   buffered whole): memory stays at one read buffer whatever the size.
//! - **Retries and throttling**: every request goes through the backend's
//!   [`Limiter`](crate::throttle::Limiter) (429 and 503 halve the requests in flight, and
//!   `Retry-After` holds them all back), and a request that failed transiently is sent again,
//!   [`crate::ATTEMPTS`] times at most (a staged file is read again from the start; a `get`
//!   is retried until its answer starts, not once its body streams).
//! - **Atomic puts** are the server's: nginx's WebDAV module writes the body to a temporary
//!   file and renames it into place, so a reader never sees half an object. A server that
//!   writes in place would not give this.
//! - **Create-if-absent** is a `HEAD` (present: [`ErrorKind::AlreadyExists`] without
//!   uploading), then a `PUT` with `If-None-Match: *`, and `412 Precondition Failed` is
//!   [`ErrorKind::AlreadyExists`]. A server that honours `If-None-Match` on `PUT` makes this
//!   exact. One that ignores it (nginx's WebDAV module does) leaves a race: two writers that
//!   both pass the `HEAD` within one round trip both upload and the later one overwrites.
//!   Nixpush then may rewrite a narinfo another builder published a moment before (with the
//!   same path, hashes and a valid signature: a reader is never harmed, but "never rewritten"
//!   does not hold). Use one writer per such cache, or a store with real conditional writes
//!   (S3, a local directory).
//! - **Listing** is not part of HTTP: [`Backend::list`] fails with [`ErrorKind::Other`].
//!   Nothing in publishing needs it.
//! - **Errors**: 401 and 403 are [`ErrorKind::Permission`]; 404 and 410 [`ErrorKind::NotFound`];
//!   408, 425, 429 and 5xx, refused connections, timeouts and broken transfers
//!   [`ErrorKind::Transient`]; other statuses [`ErrorKind::Other`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt as _;
use std::sync::Arc;

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, IF_NONE_MATCH, RETRY_AFTER};
use reqwest::{Method, StatusCode};

use crate::throttle::{Answer, DEFAULT_MAX_IN_FLIGHT, Limiter};
use crate::{
    Backend, BackendError, Body, ByteStream, ConfigError, ErrorKind, ObjectInfo, PutMode,
    PutOptions,
};

/// The environment variable holding a bearer token when the address names no credential file.
pub const TOKEN_ENV: &str = "NIXPUSH_TOKEN";

/// How requests authenticate.
#[derive(Clone)]
pub enum HttpAuth {
    None,
    Bearer(String),
    Basic { user: String, password: String },
}

impl fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpAuth::None => f.write_str("None"),
            HttpAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            HttpAuth::Basic { user, .. } => write!(f, "Basic({user:?}, <redacted>)"),
        }
    }
}

impl HttpAuth {
    /// Add the credentials to a request (reqwest marks the header sensitive).
    fn apply(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            HttpAuth::None => r,
            HttpAuth::Bearer(t) => r.bearer_auth(t),
            HttpAuth::Basic { user, password } => r.basic_auth(user, Some(password)),
        }
    }
}

/// Where the cache is and how to authenticate.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The cache's root URL, without a trailing `/`.
    pub base: url::Url,
    pub auth: HttpAuth,
}

impl HttpConfig {
    /// Parse an address, reading a credential file it names (or [`TOKEN_ENV`]).
    pub fn parse(addr: &str) -> Result<Self, ConfigError> {
        let (location, query) = addr.split_once('?').unwrap_or((addr, ""));
        let mut base = url::Url::parse(location).map_err(|e| e.to_string())?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err("expected http://HOST/PATH or https://HOST/PATH".into());
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(
                "credentials in the URL are refused (they would show in messages): \
                 use basic-auth-file=FILE"
                    .into(),
            );
        }
        if base.fragment().is_some() {
            return Err("a cache URL has no #fragment".into());
        }
        let trimmed = base.path().trim_end_matches('/').to_owned();
        base.set_path(&trimmed);
        let [token_file, basic_file] = crate::query_params(
            query,
            "an HTTP cache",
            ["token-file", "basic-auth-file"],
            false,
        )?;
        let read = |param: &str, path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| format!("{param}={path}: {e}"))
                .and_then(|s| {
                    if s.is_empty() {
                        Err(format!("{param}={path}: the file is empty"))
                    } else {
                        Ok(s)
                    }
                })
        };
        let auth = match (token_file, basic_file) {
            (Some(_), Some(_)) => {
                return Err("give token-file or basic-auth-file, not both".into());
            }
            (Some(f), None) => HttpAuth::Bearer(read("token-file", &f)?),
            (None, Some(f)) => {
                let s = read("basic-auth-file", &f)?;
                let (user, password) = s.split_once(':').ok_or_else(|| {
                    format!("basic-auth-file={f}: expected USER:PASSWORD on one line")
                })?;
                HttpAuth::Basic {
                    user: user.to_owned(),
                    password: password.to_owned(),
                }
            }
            (None, None) => match std::env::var(TOKEN_ENV) {
                Ok(t) if !t.trim().is_empty() => HttpAuth::Bearer(t.trim().to_owned()),
                _ => HttpAuth::None,
            },
        };
        if let Some(h) = auth_check(&auth) {
            return Err(h.into());
        }
        Ok(Self { base, auth })
    }
}

/// Credentials that cannot go in a header are a configuration error (a basic-auth header is
/// base64, always valid).
fn auth_check(auth: &HttpAuth) -> Option<String> {
    match auth {
        HttpAuth::Bearer(t) if HeaderValue::from_str(&format!("Bearer {t}")).is_err() => {
            Some("the token contains characters not allowed in an HTTP header".to_owned())
        }
        _ => None,
    }
}

pub struct HttpBackend {
    client: reqwest::Client,
    config: HttpConfig,
    limiter: Arc<Limiter>,
}

impl fmt::Debug for HttpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBackend")
            .field("base", &self.config.base.as_str())
            .field("auth", &self.config.auth)
            .finish_non_exhaustive()
    }
}

impl HttpBackend {
    /// Open the cache at `addr`; no request is made.
    pub fn open(addr: &str) -> Result<Self, BackendError> {
        let config = HttpConfig::parse(addr).map_err(BackendError::from)?;
        Self::new(config)
    }

    pub fn new(config: HttpConfig) -> Result<Self, BackendError> {
        if let Some(m) = auth_check(&config.auth) {
            return Err(BackendError::config(m));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Between two reads, not for the whole transfer: large NARs take their time.
            .read_timeout(crate::request_timeout(Duration::from_secs(120)))
            .user_agent(concat!("nixpush/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BackendError::config(e.to_string()))?;
        Ok(Self {
            client,
            config,
            limiter: Limiter::new(DEFAULT_MAX_IN_FLIGHT),
        })
    }

    /// The backend's adaptive limit of requests in flight (see [`crate::throttle`]).
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    fn url(&self, op: &'static str, key: &str) -> Result<url::Url, BackendError> {
        let ok = !key.is_empty()
            && key
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != "..");
        if !ok {
            return Err(BackendError::invalid_key(op, key));
        }
        let mut u = self.config.base.clone();
        u.path_segments_mut()
            .map_err(|()| BackendError::new(ErrorKind::Config, op, key, "URL cannot be a base"))?
            .pop_if_empty()
            .extend(key.split('/'));
        Ok(u)
    }

    fn request(&self, method: Method, url: url::Url) -> reqwest::RequestBuilder {
        self.config.auth.apply(self.client.request(method, url))
    }

    /// Send, under a permit of the limiter; a transport failure becomes a classified error.
    async fn send(
        &self,
        op: &'static str,
        key: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, BackendError> {
        let permit = self.limiter.acquire().await;
        let resp = req
            .send()
            .await
            .map_err(|e| crate::transport_error(op, key, &e))?;
        let retry_after = resp.headers().get(RETRY_AFTER).map(HeaderValue::as_bytes);
        permit.answered(Answer::from_status(resp.status().as_u16(), retry_after));
        Ok(resp)
    }

    /// One attempt at a put.
    async fn put_once(
        &self,
        url: &url::Url,
        key: &str,
        body: &Body,
        opts: &PutOptions,
    ) -> Result<(), BackendError> {
        if opts.mode == PutMode::Create && self.exists_once(key).await? {
            return Err(BackendError::new(
                ErrorKind::AlreadyExists,
                "put",
                key,
                "object exists",
            ));
        }
        let mut req = self
            .request(Method::PUT, url.clone())
            .header(CONTENT_TYPE, opts.content_type);
        if opts.mode == PutMode::Create {
            req = req.header(IF_NONE_MATCH, "*");
        }
        let req = match body {
            Body::Bytes(b) => req.body(b.clone()),
            Body::File(staged) => {
                let file = tokio::fs::File::open(staged)
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?;
                let len = file
                    .metadata()
                    .await
                    .map_err(|e| BackendError::io("put", key, e))?
                    .len();
                let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
                req.header(CONTENT_LENGTH, len)
                    .body(reqwest::Body::wrap_stream(stream))
            }
        };
        let resp = self.send("put", key, req).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(status_err("put", key, resp).await)
        }
    }

    /// One attempt at `exists`.
    async fn exists_once(&self, key: &str) -> Result<bool, BackendError> {
        let url = self.url("exists", key)?;
        let resp = self
            .send("exists", key, self.request(Method::HEAD, url))
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(false),
            _ => Err(status_err("exists", key, resp).await),
        }
    }
}

fn status_kind(s: StatusCode) -> ErrorKind {
    match s.as_u16() {
        401 | 403 => ErrorKind::Permission,
        404 | 410 => ErrorKind::NotFound,
        412 => ErrorKind::AlreadyExists,
        408 | 425 | 429 => ErrorKind::Transient,
        500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Other,
    }
}

/// An error for a response that is not a success, with the start of its body.
async fn status_err(op: &'static str, key: &str, resp: reqwest::Response) -> BackendError {
    let status = resp.status();
    let mut message = format!("server answered {status}");
    if let Ok(text) = resp.text().await {
        let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if !text.is_empty() {
            let cut: String = text.chars().take(200).collect();
            message.push_str(&format!(": {cut}"));
        }
    }
    BackendError::new(status_kind(status), op, key, message)
}

#[async_trait]
impl Backend for HttpBackend {
    #[tracing::instrument(level = "debug", skip(self, body, opts), fields(backend = "http", mode = ?opts.mode))]
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
        let url = self.url("put", key)?;
        // A staged file stays until the last attempt is over (it is unlinked when dropped).
        crate::retry_transient("put", key, || self.put_once(&url, key, &body, &opts)).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "http"))]
    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        crate::retry_transient("exists", key, || self.exists_once(key)).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "http"))]
    async fn get(&self, key: &str) -> Result<ByteStream, BackendError> {
        let url = self.url("get", key)?;
        let resp = crate::retry_transient("get", key, || async {
            let resp = self
                .send("get", key, self.request(Method::GET, url.clone()))
                .await?;
            if resp.status().is_success() {
                Ok(resp)
            } else {
                Err(status_err("get", key, resp).await)
            }
        })
        .await?;
        let key = key.to_owned();
        Ok(Box::pin(
            resp.bytes_stream()
                .map_err(move |e| crate::transport_error("get", &key, &e)),
        ))
    }

    /// Not supported: plain HTTP has no listing ([`ErrorKind::Other`]).
    async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        Err(BackendError::new(
            ErrorKind::Other,
            "list",
            prefix,
            "listing is not supported by HTTP caches",
        ))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "http"))]
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let url = self.url("delete", key)?;
        crate::retry_transient("delete", key, || async {
            let resp = self
                .send("delete", key, self.request(Method::DELETE, url.clone()))
                .await?;
            match resp.status() {
                s if s.is_success() => Ok(()),
                StatusCode::NOT_FOUND | StatusCode::GONE => Ok(()),
                _ => Err(status_err("delete", key, resp).await),
            }
        })
        .await
    }

    fn describe(&self) -> String {
        self.config.base.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_reads_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tok");
        std::fs::write(&tok, "s3cr3t-token\n").unwrap();
        let basic = dir.path().join("basic");
        std::fs::write(&basic, "alice:pa:ss\n").unwrap();

        let c = HttpConfig::parse(&format!(
            "https://cache.example/some/path/?token-file={}",
            tok.display()
        ))
        .unwrap();
        assert_eq!(c.base.as_str(), "https://cache.example/some/path");
        assert!(matches!(&c.auth, HttpAuth::Bearer(t) if t == "s3cr3t-token"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");

        let b = HttpConfig::parse(&format!(
            "http://127.0.0.1:8080?basic-auth-file={}",
            basic.display()
        ))
        .unwrap();
        assert!(
            matches!(&b.auth, HttpAuth::Basic { user, password } if user == "alice" && password == "pa:ss")
        );
        assert!(!format!("{b:?}").contains("pa:ss"));
        let backend = HttpBackend::new(b).unwrap();
        assert!(!format!("{backend:?}").contains("pa:ss"));
        assert_eq!(
            backend.url("put", "nar/x.nar.zst").unwrap().as_str(),
            "http://127.0.0.1:8080/nar/x.nar.zst"
        );
        assert!(backend.url("put", "../x").is_err());
        assert!(backend.url("put", "a//b").is_err());
    }

    #[test]
    fn refuses_bad_addresses_naming_the_problem() {
        let err = |a: &str| HttpConfig::parse(a).unwrap_err().to_string();
        assert!(err("http://h/c?bogus=1").contains("\"bogus\""));
        assert!(err("http://u:p@h/c").contains("credentials"));
        assert!(err("http://h/c?token-file=/nonexistent/x").contains("/nonexistent/x"));
        assert!(err("ftp://h/c").contains("http"));
        assert!(err("http://h?token-file=a&basic-auth-file=b").contains("not both"));
    }
}
