//! A cache in a directory on an SSH server (`sftp://`), through `russh` and `russh-sftp`. Laid
//! out as a `file://` cache, so the same directory can be served over HTTP to Nix.
//!
//! # Address
//! ```text
//! sftp://[USER@]HOST[:PORT][/PATH][?identity=FILE&known-hosts=FILE&insecure-accept-any-host-key=true]
//! ```
//! - `PATH` is absolute on the server (`sftp://cache@host/srv/nix-cache`); `/~/DIR` or no path
//!   at all names a directory relative to the login directory, as `sftp` and `scp` do.
//! - `USER` defaults to `$USER`, `PORT` to 22.
//! - `identity=FILE`: an OpenSSH private key file, the only key then tried. Without it: every
//!   key of the ssh-agent at `$SSH_AUTH_SOCK`, then `~/.ssh/id_ed25519`, `~/.ssh/id_ecdsa` and
//!   `~/.ssh/id_rsa` where they exist. Keys protected by a passphrase must go through the agent.
//! - `known-hosts=FILE`: where the server's host key must be listed (default
//!   `~/.ssh/known_hosts`); entries as OpenSSH writes them (`HOST` or `[HOST]:PORT`, hashed or
//!   not; `ssh-keyscan -p PORT HOST` makes one).
//! - `insecure-accept-any-host-key=true`: no host key check at all. An explicit opt-out for
//!   throw-away test servers; never the default.
//!
//! Any other parameter is refused with its name. Passwords (in the URL or interactively) are
//! not supported: SSH keys only.
//!
//! # Host keys and errors
//! A host key that is not in the known-hosts file, or that differs from the one there, fails
//! the connection with [`ErrorKind::Permission`]: like wrong credentials, it will not succeed
//! until someone changes something (adds the key, or finds out why it changed), and the
//! message says which of the two happened. A key refused by the server is
//! [`ErrorKind::Permission`]; a refused or reset connection, a timeout or a connection lost
//! mid-way [`ErrorKind::Transient`]; SFTP's "no such file" [`ErrorKind::NotFound`]; "permission
//! denied" [`ErrorKind::Permission`]; a bad address or an unreadable key file
//! [`ErrorKind::Config`] when the backend is opened.
//!
//! # How the contract is kept
//! Every put writes a temporary file (`.nixpush-*.tmp`, opened with `O_EXCL`) in the directory
//! of its final key, creating directories as needed, flushes it to disk (`fsync@openssh.com`,
//! where the server has it), then moves it into place:
//! - **Overwrite**: `posix-rename@openssh.com`, which replaces an existing file atomically
//!   (plain SFTP `rename` refuses an existing target). A server without it can still create
//!   new keys, and fails to replace an existing one with [`ErrorKind::Other`].
//! - **Create-if-absent**: `hardlink@openssh.com` from the temporary file to the final name,
//!   which `link(2)` refuses atomically if the name exists, then the temporary file is removed.
//!   Without that extension, plain SFTP `rename`, which SFTP v3 defines as failing on an
//!   existing target (OpenSSH implements it with `link(2)` too). SFTP v3 reports an existing
//!   target only as a generic failure, so the target is then looked up: present means
//!   [`ErrorKind::AlreadyExists`].
//!
//! Once `put` returns, the file's bytes are on the server's disk (`fsync@openssh.com`); the
//! rename that published it is as durable as the server's file system makes renames (SFTP has
//! no way to flush a directory), so [`Backend::sync`] has nothing more to do.
//!
//! Temporary names are never listed and cannot be used as keys. A writer killed mid-way
//! leaves its temporary file behind (remove `.nixpush-*.tmp` files older than a day).
//!
//! **Bounded memory**: files go up in writes of [`CHUNK`] bytes, at most [`IN_FLIGHT`] of them
//! sent and not yet acknowledged, and come down the same way: memory per transfer stays under
//! a megabyte whatever the size, while the pipeline keeps a high-latency link busy.
//!
//! **Connections**: one SSH connection per backend, opened on first use, carrying up to
//! [`SESSIONS`] SFTP sessions (SSH channels) that operations borrow in turn. A stream from
//! [`Backend::get`] holds its session until dropped. When the connection dies, the next
//! operation opens a new one; an idempotent operation (exists, get, list, delete) that failed
//! because the connection died under it is retried once on the new connection. A put is not:
//! the caller retries what is [`ErrorKind::Transient`].

use std::fmt;
use std::hash::{BuildHasher as _, Hasher as _};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt as _};
use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{Backend, BackendError, Body, ByteStream, ErrorKind, PutMode, PutOptions};

/// Temporary files start with this and end in `.tmp` (as in the fs backend).
pub const TMP_PREFIX: &str = ".nixpush-";

/// Bytes per SFTP read or write request (OpenSSH's own client uses 32 KiB; its server accepts
/// up to 255 KiB).
pub const CHUNK: usize = 64 << 10;

/// Read or write requests in flight per transfer.
pub const IN_FLIGHT: usize = 16;

/// SFTP sessions (channels) per connection, hence transfers at once.
pub const SESSIONS: usize = 4;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one SFTP request may wait for its answer.
const REQUEST_TIMEOUT_SECS: u64 = 60;

/// How the server's host key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// It must be listed, for this host and port, in this OpenSSH known-hosts file.
    KnownHosts(PathBuf),
    /// No check (`insecure-accept-any-host-key=true`).
    AcceptAny,
}

/// Where the SSH keys come from.
#[derive(Clone, Default)]
pub struct SftpAuth {
    /// `identity=FILE`, loaded when the address is parsed; the only key tried when set.
    pub identity: Option<(PathBuf, Arc<PrivateKey>)>,
    /// The ssh-agent socket (`$SSH_AUTH_SOCK`), tried when there is no `identity`.
    pub agent: Option<PathBuf>,
    /// Key files tried after the agent when there is no `identity` (those that exist).
    pub default_keys: Vec<PathBuf>,
}

impl fmt::Debug for SftpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SftpAuth")
            .field("identity", &self.identity.as_ref().map(|(p, _)| p))
            .field("agent", &self.agent)
            .field("default_keys", &self.default_keys)
            .finish()
    }
}

/// A parsed `sftp://` address.
#[derive(Debug, Clone)]
pub struct SftpConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The cache directory: absolute (`/srv/cache`), relative to the login directory
    /// (`cache`), or empty for the login directory itself. No trailing `/`.
    pub root: String,
    pub host_keys: HostKeyCheck,
    pub auth: SftpAuth,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

impl SftpConfig {
    /// Parse an address, loading the key file it names; the agent socket comes from
    /// `$SSH_AUTH_SOCK`. No network.
    pub fn parse(addr: &str) -> Result<Self, String> {
        let (location, query) = addr.split_once('?').unwrap_or((addr, ""));
        let url = url::Url::parse(location).map_err(|e| e.to_string())?;
        if url.scheme() != "sftp" {
            return Err("expected sftp://[USER@]HOST[:PORT]/PATH".into());
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            _ => return Err("no host: expected sftp://[USER@]HOST[:PORT]/PATH".into()),
        };
        if url.password().is_some() {
            return Err(
                "passwords are not supported: use an SSH key (identity=FILE or ssh-agent)".into(),
            );
        }
        if url.fragment().is_some() {
            return Err("a cache address has no #fragment".into());
        }
        let user = if url.username().is_empty() {
            std::env::var("USER")
                .ok()
                .filter(|u| !u.is_empty())
                .ok_or("no user: write sftp://USER@HOST/PATH ($USER is not set)")?
        } else {
            decode(url.username())?
        };
        let port = url.port().unwrap_or(22);
        let path = decode(url.path())?;
        let root = if path == "/~" || path.is_empty() {
            String::new()
        } else if let Some(rel) = path.strip_prefix("/~/") {
            rel.trim_end_matches('/').to_owned()
        } else if path.trim_end_matches('/').is_empty() {
            "/".to_owned()
        } else {
            path.trim_end_matches('/').to_owned()
        };
        if root.split('/').any(|c| c == "..") {
            return Err("the path must not contain `..`".into());
        }

        let [identity, known_hosts, accept_any] = crate::query_params(
            query,
            "an SFTP cache",
            ["identity", "known-hosts", "insecure-accept-any-host-key"],
            false,
        )?;
        let accept_any = match accept_any.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => {
                return Err(format!(
                    "insecure-accept-any-host-key must be true or false, not {v:?}"
                ))
            }
        };
        let host_keys = match (accept_any, known_hosts) {
            (true, Some(_)) => {
                return Err(
                    "give known-hosts or insecure-accept-any-host-key=true, not both".into(),
                )
            }
            (true, None) => HostKeyCheck::AcceptAny,
            (false, Some(f)) => {
                let p = PathBuf::from(&f);
                std::fs::metadata(&p).map_err(|e| format!("known-hosts={f}: {e}"))?;
                HostKeyCheck::KnownHosts(p)
            }
            (false, None) => HostKeyCheck::KnownHosts(
                home()
                    .ok_or("no known-hosts file: $HOME is not set (give known-hosts=FILE)")?
                    .join(".ssh/known_hosts"),
            ),
        };
        let auth = match identity {
            Some(f) => SftpAuth {
                identity: Some((PathBuf::from(&f), Arc::new(load_key(&f)?))),
                ..SftpAuth::default()
            },
            None => SftpAuth {
                identity: None,
                agent: std::env::var_os("SSH_AUTH_SOCK")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from),
                default_keys: home()
                    .map(|h| {
                        ["id_ed25519", "id_ecdsa", "id_rsa"]
                            .iter()
                            .map(|n| h.join(".ssh").join(n))
                            .filter(|p| p.is_file())
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        };
        Ok(Self {
            host,
            port,
            user,
            root,
            host_keys,
            auth,
        })
    }

    /// How OpenSSH names this server in known-hosts files.
    fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    fn describe(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let path = if self.root.is_empty() {
            String::new()
        } else if self.root.starts_with('/') {
            self.root.clone()
        } else {
            format!("/~/{}", self.root)
        };
        format!("sftp://{}@{host}:{}{path}", self.user, self.port)
    }
}

fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{s:?} is not UTF-8 once percent-decoded"))
}

fn load_key(path: &str) -> Result<PrivateKey, String> {
    russh::keys::load_secret_key(path, None).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => format!(
            "identity={path}: the key is protected by a passphrase; load it into ssh-agent \
             and leave out identity="
        ),
        e => format!("identity={path}: {e}"),
    })
}

// ---------------------------------------------------------------------------------------------
// Connections and sessions.

/// The client side of one connection: checks the host key and remembers why it refused one.
struct Client {
    check: HostKeyCheck,
    host: String,
    port: u16,
    name: String,
    refusal: Arc<std::sync::Mutex<Option<String>>>,
}

impl Client {
    fn refuse(&self, why: String) -> bool {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        false
    }
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let path = match &self.check {
            HostKeyCheck::AcceptAny => return Ok(true),
            HostKeyCheck::KnownHosts(p) => p.clone(),
        };
        // A host certificate is checked as its plain key (no `@cert-authority` support).
        let key = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(c) => PublicKey::new(c.public_key().clone(), ""),
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256);
        Ok(
            match russh::keys::check_known_hosts_path(&self.host, self.port, &key, &path) {
                Ok(true) => true,
                Ok(false) => self.refuse(format!(
                    "the host key of {} ({} {fingerprint}) is not in {}: add it (for example \
                     with `ssh-keyscan -p {} {}`) after checking it",
                    self.name,
                    key.algorithm(),
                    path.display(),
                    self.port,
                    self.host,
                )),
                Err(russh::keys::Error::KeyChanged { line }) => self.refuse(format!(
                    "the host key of {} ({} {fingerprint}) DIFFERS from the one in {} line \
                     {line}: someone may be impersonating the server, or its key was changed",
                    self.name,
                    key.algorithm(),
                    path.display(),
                )),
                Err(e) => self.refuse(format!(
                    "cannot check the host key of {} against {}: {e}",
                    self.name,
                    path.display()
                )),
            },
        )
    }
}

struct Conn {
    handle: client::Handle<Client>,
}

struct Session {
    sftp: RawSftpSession,
    conn: Arc<Conn>,
    posix_rename: bool,
    hardlink: bool,
    fsync: bool,
    /// Bytes per write: [`CHUNK`], or less if the server says so.
    write_len: usize,
    read_len: usize,
    /// Set after a transport error on this session: it is not given back.
    broken: AtomicBool,
}

impl Session {
    fn alive(&self) -> bool {
        !self.broken.load(Ordering::Relaxed) && !self.conn.handle.is_closed()
    }

    /// Pass `r` on, marking the session broken if it failed in transport.
    fn note<T>(&self, r: Result<T, BackendError>) -> Result<T, BackendError> {
        if r.as_ref().is_err_and(|e| e.kind == ErrorKind::Transient) {
            self.broken.store(true, Ordering::Relaxed);
        }
        r
    }
}

struct PoolInner {
    config: SftpConfig,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    idle: std::sync::Mutex<Vec<Session>>,
    permits: Arc<Semaphore>,
}

/// A borrowed session, given back when dropped unless it broke.
struct Lease {
    session: Option<Session>,
    pool: Arc<PoolInner>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    fn get(&self) -> &Session {
        self.session
            .as_ref()
            .expect("a lease holds its session until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if s.alive() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(s);
            }
        }
    }
}

impl PoolInner {
    async fn connection(&self) -> Result<Arc<Conn>, BackendError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            if !c.handle.is_closed() {
                return Ok(c.clone());
            }
            tracing::debug!(server = %self.config.describe(), "SSH connection lost; reconnecting");
        }
        let c = Arc::new(connect(&self.config).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn checkout(self: &Arc<Self>) -> Result<Lease, BackendError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            let s = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match s {
                Some(s) if s.alive() => {
                    return Ok(Lease {
                        session: Some(s),
                        pool: self.clone(),
                        _permit: permit,
                    })
                }
                Some(_) => continue,
                None => break,
            }
        }
        let conn = self.connection().await?;
        let session = match open_session(&conn).await {
            Ok(s) => s,
            // The connection died since it was last used: once more, on a new one.
            Err(_) if conn.handle.is_closed() => open_session(&self.connection().await?).await?,
            Err(e) => return Err(e),
        };
        Ok(Lease {
            session: Some(session),
            pool: self.clone(),
            _permit: permit,
        })
    }
}

fn ssh_error(op: &'static str, key: &str, e: russh::Error) -> BackendError {
    use russh::Error as E;
    let kind = match &e {
        E::IO(io) => BackendError::io(op, key, io::Error::from(io.kind())).kind,
        E::Disconnect
        | E::HUP
        | E::ConnectionTimeout
        | E::KeepaliveTimeout
        | E::InactivityTimeout
        | E::SendError
        | E::RecvError
        | E::Elapsed(_) => ErrorKind::Transient,
        E::UnknownKey | E::WrongServerSig => ErrorKind::Permission,
        _ => ErrorKind::Other,
    };
    BackendError::new(kind, op, key, format!("SSH: {e}"))
}

async fn connect(config: &SftpConfig) -> Result<Conn, BackendError> {
    let name = config.known_hosts_name();
    let refusal = Arc::new(std::sync::Mutex::new(None));
    let client = Client {
        check: config.host_keys.clone(),
        host: config.host.clone(),
        port: config.port,
        name: name.clone(),
        refusal: refusal.clone(),
    };
    let ssh_config = Arc::new(client::Config {
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 3,
        nodelay: true,
        ..client::Config::default()
    });
    let at = format!("{name} as {}", config.user);
    let connecting = client::connect(ssh_config, (config.host.as_str(), config.port), client);
    let mut handle = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => {
            return Err(BackendError::new(
                ErrorKind::Transient,
                "connect",
                "",
                format!("{at}: no answer within {CONNECT_TIMEOUT:?}"),
            ))
        }
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            if let Some(why) = refusal.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(BackendError::new(ErrorKind::Permission, "connect", "", why));
            }
            let mut err = ssh_error("connect", "", e);
            err.message = format!("{at}: {}", err.message);
            return Err(err);
        }
    };
    authenticate(&mut handle, config).await?;
    tracing::debug!(server = %config.describe(), "SSH connection established");
    Ok(Conn { handle })
}

async fn authenticate(
    handle: &mut client::Handle<Client>,
    config: &SftpConfig,
) -> Result<(), BackendError> {
    let user = config.user.as_str();
    let at = format!("{}@{}", user, config.known_hosts_name());
    let fail = |e| ssh_error("authenticate", "", e);
    let rsa_hash = handle
        .best_supported_rsa_hash()
        .await
        .map_err(fail)?
        .flatten();
    let mut tried: Vec<String> = Vec::new();

    if let Some((path, key)) = &config.auth.identity {
        let r = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), rsa_hash))
            .await
            .map_err(fail)?;
        if r.success() {
            return Ok(());
        }
        return Err(BackendError::new(
            ErrorKind::Permission,
            "authenticate",
            "",
            format!("{at}: the server refused the key {}", path.display()),
        ));
    }

    if let Some(sock) = &config.auth.agent {
        match russh::keys::agent::client::AgentClient::connect_uds(sock).await {
            Err(e) => tracing::debug!("ssh-agent at {}: {e}", sock.display()),
            Ok(mut agent) => match agent.request_identities().await {
                Err(e) => tracing::debug!("ssh-agent at {}: {e}", sock.display()),
                Ok(ids) => {
                    for id in ids {
                        let key = id.public_key().into_owned();
                        let what = format!("ssh-agent key {}", key.fingerprint(HashAlg::Sha256));
                        match handle
                            .authenticate_publickey_with(user, key, rsa_hash, &mut agent)
                            .await
                        {
                            Ok(r) if r.success() => return Ok(()),
                            Ok(_) => tried.push(what),
                            Err(e) => tried.push(format!("{what} ({e})")),
                        }
                        if handle.is_closed() {
                            break;
                        }
                    }
                }
            },
        }
    }

    for path in &config.auth.default_keys {
        let Ok(key) = russh::keys::load_secret_key(path, None) else {
            continue;
        };
        let r = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), rsa_hash))
            .await
            .map_err(fail)?;
        if r.success() {
            return Ok(());
        }
        tried.push(path.display().to_string());
    }

    if tried.is_empty() {
        return Err(BackendError::new(
            ErrorKind::Config,
            "authenticate",
            "",
            format!(
                "{at}: no SSH key to offer: give identity=FILE, or start ssh-agent \
                 (SSH_AUTH_SOCK) with a key"
            ),
        ));
    }
    Err(BackendError::new(
        ErrorKind::Permission,
        "authenticate",
        "",
        format!("{at}: the server refused every key: {}", tried.join(", ")),
    ))
}

async fn open_session(conn: &Arc<Conn>) -> Result<Session, BackendError> {
    let fail = |e| ssh_error("open SFTP session", "", e);
    let channel = conn.handle.channel_open_session().await.map_err(fail)?;
    channel
        .request_subsystem(true, "sftp")
        .await
        .map_err(fail)?;
    let mut sftp = RawSftpSession::new(channel.into_stream());
    sftp.set_timeout(REQUEST_TIMEOUT_SECS);
    let version = sftp
        .init()
        .await
        .map_err(|e| sftp_error("open SFTP session", "", e))?;
    let has = |name: &str, v: &str| version.extensions.get(name).is_some_and(|x| x == v);
    let (mut write_len, mut read_len) = (CHUNK, CHUNK);
    if has("limits@openssh.com", "1") {
        let limits = sftp
            .limits()
            .await
            .map_err(|e| sftp_error("open SFTP session", "", e))?;
        let cap = |n: u64, cur: usize| {
            if n == 0 {
                cur
            } else {
                cur.min(usize::try_from(n).unwrap_or(usize::MAX))
            }
        };
        write_len = cap(limits.max_write_len, write_len);
        read_len = cap(limits.max_read_len, read_len);
        sftp.set_limits(limits.into());
    }
    Ok(Session {
        posix_rename: has("posix-rename@openssh.com", "1"),
        hardlink: has("hardlink@openssh.com", "1"),
        fsync: has("fsync@openssh.com", "1"),
        write_len: write_len.max(1),
        read_len: read_len.max(1),
        broken: AtomicBool::new(false),
        sftp,
        conn: conn.clone(),
    })
}

fn sftp_error(op: &'static str, key: &str, e: SftpError) -> BackendError {
    let kind = match &e {
        SftpError::Status(s) => match s.status_code {
            StatusCode::NoSuchFile => ErrorKind::NotFound,
            StatusCode::PermissionDenied => ErrorKind::Permission,
            StatusCode::NoConnection | StatusCode::ConnectionLost => ErrorKind::Transient,
            _ => ErrorKind::Other,
        },
        SftpError::IO(_) | SftpError::Timeout => ErrorKind::Transient,
        // A closed channel shows as "session closed" or a dropped request.
        SftpError::UnexpectedBehavior(_) => ErrorKind::Transient,
        SftpError::Limited(_) | SftpError::UnexpectedPacket => ErrorKind::Other,
    };
    let message = match &e {
        SftpError::Status(st) => {
            let code = st.status_code.to_string();
            if st.error_message.is_empty() || st.error_message.eq_ignore_ascii_case(&code) {
                format!("SFTP: {code}")
            } else {
                format!("SFTP: {code} ({})", st.error_message)
            }
        }
        e => format!("SFTP: {e}"),
    };
    BackendError::new(kind, op, key, message)
}

fn is_status(e: &SftpError, code: StatusCode) -> bool {
    matches!(e, SftpError::Status(s) if s.status_code == code)
}

// ---------------------------------------------------------------------------------------------
// The backend.

pub struct SftpBackend {
    pool: Arc<PoolInner>,
}

impl fmt::Debug for SftpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SftpBackend")
            .field("config", &self.pool.config)
            .finish_non_exhaustive()
    }
}

/// A `u64` different on every call, in every process: names temporary files.
fn unique() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// The path on the server of `rel` (a key or a directory of keys; empty: the root) below the
/// cache directory `root`.
fn remote(root: &str, rel: &str) -> String {
    match (root, rel) {
        ("", "") => ".".to_owned(),
        ("", r) => r.to_owned(),
        (r, "") => r.to_owned(),
        ("/", r) => format!("/{r}"),
        (root, r) => format!("{root}/{r}"),
    }
}

/// A key is `/`-separated names, none empty, `.` or `..`, the last not a temporary name.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
        && !key
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with(TMP_PREFIX))
}

/// Four-byte length, then the bytes: an SSH string.
fn ssh_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn file_mode(attrs: &FileAttributes) -> u32 {
    attrs.permissions.unwrap_or(0) & 0o170000
}
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// What a put sends: bytes in memory or a staged file, read a chunk at a time.
enum Source {
    Bytes(Bytes),
    File(tokio::fs::File),
}

impl Source {
    async fn next_chunk(&mut self, len: usize) -> io::Result<Vec<u8>> {
        match self {
            Source::Bytes(b) => {
                let n = len.min(b.len());
                Ok(b.split_to(n).to_vec())
            }
            Source::File(f) => {
                let mut buf = vec![0; len];
                let mut filled = 0;
                while filled < len {
                    let n = f.read(&mut buf[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok(buf)
            }
        }
    }
}

impl SftpBackend {
    /// Open the cache at `addr`; no request is made.
    pub fn open(addr: &str) -> Result<Self, BackendError> {
        let config = SftpConfig::parse(addr).map_err(BackendError::config)?;
        Ok(Self::new(config))
    }

    pub fn new(config: SftpConfig) -> Self {
        Self {
            pool: Arc::new(PoolInner {
                config,
                conn: tokio::sync::Mutex::new(None),
                idle: std::sync::Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(SESSIONS)),
            }),
        }
    }

    pub fn config(&self) -> &SftpConfig {
        &self.pool.config
    }

    fn remote(&self, rel: &str) -> String {
        remote(&self.pool.config.root, rel)
    }

    fn path_of(&self, op: &'static str, key: &str) -> Result<String, BackendError> {
        if !valid_key(key) {
            return Err(BackendError::invalid_key(op, key));
        }
        Ok(self.remote(key))
    }

    /// A session for `op` on `key`; a failure to connect is reported as theirs.
    async fn checkout(&self, op: &'static str, key: &str) -> Result<Lease, BackendError> {
        self.pool.checkout().await.map_err(|mut e| {
            e.op = op;
            e.key = key.to_owned();
            e
        })
    }

    /// Run an idempotent operation on a session; once more on a new connection if it failed
    /// because the connection died under it.
    async fn idempotent<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T, BackendError>
    where
        F: for<'s> Fn(&'s Session) -> BoxFuture<'s, Result<T, BackendError>>,
    {
        let lease = self.checkout(op, key).await?;
        match lease.get().note(f(lease.get()).await) {
            // The connection died under it: once more, on a new one.
            Err(e) if e.kind == ErrorKind::Transient && lease.get().conn.handle.is_closed() => {
                drop(lease);
                let lease = self.checkout(op, key).await?;
                lease.get().note(f(lease.get()).await)
            }
            r => r,
        }
    }
}

/// Create `dir` and its parents as needed.
fn ensure_dir<'a>(
    s: &'a Session,
    dir: &'a str,
    key: &'a str,
) -> BoxFuture<'a, Result<(), BackendError>> {
    Box::pin(async move {
        if dir.is_empty() || dir == "/" || dir == "." {
            return Ok(());
        }
        match s.sftp.mkdir(dir, FileAttributes::empty()).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, StatusCode::NoSuchFile) => {
                let parent = dir.rsplit_once('/').map_or("", |(p, _)| p);
                ensure_dir(s, parent, key).await?;
                match s.sftp.mkdir(dir, FileAttributes::empty()).await {
                    Ok(_) => Ok(()),
                    Err(e) => exists_as_dir(s, dir, key, e).await,
                }
            }
            Err(e) => exists_as_dir(s, dir, key, e).await,
        }
    })
}

/// After a failed mkdir: fine if the directory is there (another writer made it).
async fn exists_as_dir(
    s: &Session,
    dir: &str,
    key: &str,
    e: SftpError,
) -> Result<(), BackendError> {
    match s.sftp.stat(dir).await {
        Ok(a) if file_mode(&a.attrs) == S_IFDIR => Ok(()),
        _ => {
            let mut err = sftp_error("put", key, e);
            err.message = format!("cannot create directory {dir}: {}", err.message);
            // "No such file" from mkdir means a parent could not be made: not the key's absence.
            if err.kind == ErrorKind::NotFound {
                err.kind = ErrorKind::Other;
            }
            Err(err)
        }
    }
}

/// Whether a regular file is at `path`.
async fn file_exists(s: &Session, path: &str, key: &str) -> Result<bool, BackendError> {
    match s.sftp.lstat(path).await {
        Ok(a) => Ok(file_mode(&a.attrs) == S_IFREG),
        Err(e) if is_status(&e, StatusCode::NoSuchFile) => Ok(false),
        Err(e) => Err(sftp_error("exists", key, e)),
    }
}

/// Send `src` to the open `handle`, [`IN_FLIGHT`] writes at a time.
async fn write_all(
    s: &Session,
    handle: &str,
    mut src: Source,
    key: &str,
) -> Result<(), BackendError> {
    let mut offset = 0u64;
    let mut eof = false;
    let mut in_flight = FuturesUnordered::new();
    loop {
        while !eof && in_flight.len() < IN_FLIGHT {
            let chunk = src
                .next_chunk(s.write_len)
                .await
                .map_err(|e| BackendError::io("put", key, e))?;
            if chunk.len() < s.write_len {
                eof = true;
            }
            if chunk.is_empty() {
                break;
            }
            let at = offset;
            offset += chunk.len() as u64;
            in_flight.push(s.sftp.write(handle.to_owned(), at, chunk));
        }
        match in_flight.next().await {
            None => return Ok(()),
            Some(r) => {
                r.map_err(|e| sftp_error("put", key, e))?;
            }
        }
    }
}

async fn put_on(
    s: &Session,
    path: &str,
    key: &str,
    body: Body,
    mode: PutMode,
) -> Result<(), BackendError> {
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    let dir = if dir.is_empty() && path.starts_with('/') {
        "/"
    } else {
        dir
    };
    let src = match body {
        Body::Bytes(ref b) => Source::Bytes(b.clone()),
        // Opened now: the staged file is deleted when `body` drops, once this returns.
        Body::File(ref p) => Source::File(
            tokio::fs::File::open(p)
                .await
                .map_err(|e| BackendError::io("put", key, e))?,
        ),
    };
    let tmp_name = format!("{TMP_PREFIX}{:016x}.tmp", unique());
    let tmp = match dir {
        "" => tmp_name,
        "/" => format!("/{tmp_name}"),
        d => format!("{d}/{tmp_name}"),
    };
    let flags = OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE;
    // As Nix's `file://` store: 0666 less the server's umask, so a web server can read it.
    let attrs = FileAttributes {
        permissions: Some(0o666),
        ..FileAttributes::empty()
    };
    let handle = match s.sftp.open(tmp.as_str(), flags, attrs.clone()).await {
        Ok(h) => h.handle,
        Err(e) if is_status(&e, StatusCode::NoSuchFile) => {
            ensure_dir(s, dir, key).await?;
            s.sftp
                .open(tmp.as_str(), flags, attrs)
                .await
                .map_err(|e| sftp_error("put", key, e))?
                .handle
        }
        Err(e) => return Err(sftp_error("put", key, e)),
    };
    let mut written = write_all(s, &handle, src, key).await;
    if written.is_ok() && s.fsync {
        written = s
            .sftp
            .fsync(handle.as_str())
            .await
            .map(|_| ())
            .map_err(|e| sftp_error("put", key, e));
    }
    let closed = s
        .sftp
        .close(handle)
        .await
        .map(|_| ())
        .map_err(|e| sftp_error("put", key, e));
    drop(body);
    let committed = match written.and(closed) {
        Ok(()) => commit(s, &tmp, path, key, mode).await,
        Err(e) => Err(e),
    };
    if committed.is_err() || mode == PutMode::Create {
        // After a create, the temporary name is the second link; after a failure, the only one.
        let _ = s.sftp.remove(tmp.as_str()).await;
    }
    committed
}

async fn commit(
    s: &Session,
    tmp: &str,
    path: &str,
    key: &str,
    mode: PutMode,
) -> Result<(), BackendError> {
    match mode {
        PutMode::Overwrite if s.posix_rename => {
            let mut data = Vec::with_capacity(tmp.len() + path.len() + 8);
            ssh_string(&mut data, tmp);
            ssh_string(&mut data, path);
            match s.sftp.extended("posix-rename@openssh.com", data).await {
                Ok(Packet::Status(st)) if st.status_code == StatusCode::Ok => Ok(()),
                Ok(Packet::Status(st)) => Err(sftp_error("put", key, SftpError::Status(st))),
                Ok(_) => Err(sftp_error("put", key, SftpError::UnexpectedPacket)),
                Err(e) => Err(sftp_error("put", key, e)),
            }
        }
        PutMode::Overwrite => match s.sftp.rename(tmp, path).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let mut err = sftp_error("put", key, e);
                if err.kind == ErrorKind::Other && file_exists(s, path, key).await.unwrap_or(false)
                {
                    err.message = format!(
                        "the server cannot replace a file atomically (it lacks \
                         posix-rename@openssh.com): {}",
                        err.message
                    );
                }
                Err(err)
            }
        },
        PutMode::Create => {
            let r = if s.hardlink {
                s.sftp.hardlink(tmp, path).await
            } else {
                s.sftp.rename(tmp, path).await
            };
            match r {
                Ok(_) => Ok(()),
                // SFTP v3 has no "file exists" status: look.
                Err(e) if is_status(&e, StatusCode::Failure) => {
                    if file_exists(s, path, key).await? {
                        Err(BackendError::new(
                            ErrorKind::AlreadyExists,
                            "put",
                            key,
                            "an object with this key exists",
                        ))
                    } else {
                        Err(sftp_error("put", key, e))
                    }
                }
                Err(e) => Err(sftp_error("put", key, e)),
            }
        }
    }
}

async fn open_read(s: &Session, path: &str, key: &str) -> Result<String, BackendError> {
    s.sftp
        .open(path, OpenFlags::READ, FileAttributes::empty())
        .await
        .map(|h| h.handle)
        .map_err(|e| sftp_error("get", key, e))
}

/// Read `len` bytes at `offset`, fewer only at the end of the file.
async fn read_chunk(
    sftp: &RawSftpSession,
    handle: &str,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, SftpError> {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < len {
        let want = u32::try_from(len - buf.len()).unwrap_or(u32::MAX);
        match sftp.read(handle, offset + buf.len() as u64, want).await {
            Ok(d) if d.data.is_empty() => break,
            Ok(d) if buf.is_empty() && d.data.len() == len => return Ok(d.data),
            Ok(d) => buf.extend_from_slice(&d.data),
            Err(e) if is_status(&e, StatusCode::Eof) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Closes the remote file when a `get` stream is dropped, then gives the session back.
struct OpenFile {
    lease: Option<Lease>,
    handle: String,
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let handle = std::mem::take(&mut self.handle);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = lease.get().sftp.close(handle).await;
                drop(lease);
            });
        }
    }
}

#[async_trait]
impl Backend for SftpBackend {
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
        let path = self.path_of("put", key)?;
        let lease = self.checkout("put", key).await?;
        let s = lease.get();
        s.note(put_on(s, &path, key, body, opts.mode).await)
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let path = self.path_of("exists", key)?;
        self.idempotent("exists", key, |s| {
            let (path, key) = (path.clone(), key.to_owned());
            Box::pin(async move { file_exists(s, &path, &key).await })
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<ByteStream, BackendError> {
        let path = self.path_of("get", key)?;
        let mut lease = self.checkout("get", key).await?;
        let handle = match lease.get().note(open_read(lease.get(), &path, key).await) {
            Err(e) if e.kind == ErrorKind::Transient && lease.get().conn.handle.is_closed() => {
                drop(lease);
                lease = self.checkout("get", key).await?;
                lease.get().note(open_read(lease.get(), &path, key).await)?
            }
            r => r?,
        };
        let read_len = lease.get().read_len;
        let file = Arc::new(OpenFile {
            lease: Some(lease),
            handle,
        });
        let key = key.to_owned();
        let reads = futures::stream::iter(0u64..)
            .map(move |i| {
                let file = file.clone();
                async move {
                    let s = file.lease.as_ref().expect("set until dropped").get();
                    let r = read_chunk(&s.sftp, &file.handle, i * read_len as u64, read_len).await;
                    if r.is_err() {
                        s.broken.store(true, Ordering::Relaxed);
                    }
                    r
                }
            })
            .buffered(IN_FLIGHT);
        let stream = reads.scan(false, move |done, r| {
            let item = if *done {
                None
            } else {
                match r {
                    Ok(data) if data.len() < read_len => {
                        *done = true;
                        (!data.is_empty()).then(|| Ok(Bytes::from(data)))
                    }
                    Ok(data) => Some(Ok(Bytes::from(data))),
                    Err(e) => {
                        *done = true;
                        Some(Err(sftp_error("get", &key, e)))
                    }
                }
            };
            futures::future::ready(item)
        });
        Ok(Box::pin(stream))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        // Walk only below the deepest directory the prefix names.
        let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        if !dir_part.is_empty() && !valid_key(dir_part) {
            return Err(BackendError::new(
                ErrorKind::Config,
                "list",
                prefix,
                "invalid key prefix",
            ));
        }
        let root = self.pool.config.root.clone();
        self.idempotent("list", prefix, |s| {
            let (root, prefix, dir_part) = (root.clone(), prefix.to_owned(), dir_part.to_owned());
            Box::pin(async move { walk(&root, s, &dir_part, &prefix).await })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path_of("delete", key)?;
        self.idempotent("delete", key, |s| {
            let (path, key) = (path.clone(), key.to_owned());
            Box::pin(async move {
                match s.sftp.remove(path).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_status(&e, StatusCode::NoSuchFile) => Ok(()),
                    Err(e) => Err(sftp_error("delete", &key, e)),
                }
            })
        })
        .await
    }

    fn describe(&self) -> String {
        self.pool.config.describe()
    }
}

/// Keys below the directory `start` (a key prefix ending before a `/`) that begin with
/// `prefix`, breadth first.
async fn walk(
    root: &str,
    s: &Session,
    start: &str,
    prefix: &str,
) -> Result<Vec<String>, BackendError> {
    let mut out = Vec::new();
    let mut dirs = vec![start.to_owned()];
    while let Some(rel) = dirs.pop() {
        let handle = match s.sftp.opendir(remote(root, &rel)).await {
            Ok(h) => h.handle,
            Err(e) if is_status(&e, StatusCode::NoSuchFile) => continue,
            Err(e) => return Err(sftp_error("list", prefix, e)),
        };
        let entries = read_dir(s, &handle, prefix).await;
        let _ = s.sftp.close(handle).await;
        for f in entries? {
            let name = f.filename;
            if name == "." || name == ".." || name.starts_with(TMP_PREFIX) || name.contains('/') {
                continue;
            }
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            match file_mode(&f.attrs) {
                S_IFDIR => {
                    let as_dir = format!("{key}/");
                    if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                        dirs.push(key);
                    }
                }
                S_IFREG if key.starts_with(prefix) => out.push(key),
                _ => {}
            }
        }
    }
    Ok(out)
}

async fn read_dir(
    s: &Session,
    handle: &str,
    prefix: &str,
) -> Result<Vec<russh_sftp::protocol::File>, BackendError> {
    let mut all = Vec::new();
    loop {
        match s.sftp.readdir(handle).await {
            Ok(name) => all.extend(name.files),
            Err(e) if is_status(&e, StatusCode::Eof) => return Ok(all),
            Err(e) => return Err(sftp_error("list", prefix, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let c = SftpConfig::parse(
            "sftp://cache@example.org:2222/srv/nix-cache/?insecure-accept-any-host-key=true",
        )
        .unwrap();
        assert_eq!(
            (c.user.as_str(), c.host.as_str(), c.port, c.root.as_str()),
            ("cache", "example.org", 2222, "/srv/nix-cache")
        );
        assert_eq!(c.host_keys, HostKeyCheck::AcceptAny);
        assert_eq!(c.known_hosts_name(), "[example.org]:2222");
        assert_eq!(c.describe(), "sftp://cache@example.org:2222/srv/nix-cache");

        let c = SftpConfig::parse("sftp://u@h/~/cache?insecure-accept-any-host-key=true").unwrap();
        assert_eq!((c.port, c.root.as_str()), (22, "cache"));
        assert_eq!(c.known_hosts_name(), "h");
        let c = SftpConfig::parse("sftp://u@h?insecure-accept-any-host-key=true").unwrap();
        assert_eq!(c.root, "");
        // Dot segments are resolved as in any URL: no `..` reaches the server.
        let c = SftpConfig::parse("sftp://u@h/a/../b?insecure-accept-any-host-key=true").unwrap();
        assert_eq!(c.root, "/b");
        let c = SftpConfig::parse("sftp://u@[::1]:22/c?insecure-accept-any-host-key=true").unwrap();
        assert_eq!((c.host.as_str(), c.root.as_str()), ("::1", "/c"));
    }

    #[test]
    fn refuses_bad_addresses_naming_the_problem() {
        for (addr, needle) in [
            ("sftp://u@h/c?bogus=1", "\"bogus\""),
            ("sftp://u:pw@h/c", "passwords"),
            ("sftp:///c", "no host"),
            ("sftp://u@h/c?identity=/nonexistent/key", "/nonexistent/key"),
            (
                "sftp://u@h/c?known-hosts=/nonexistent/kh",
                "/nonexistent/kh",
            ),
            (
                "sftp://u@h/c?insecure-accept-any-host-key=yes",
                "true or false",
            ),
        ] {
            let e = SftpConfig::parse(addr).unwrap_err();
            assert!(e.contains(needle), "{addr}: {e:?} does not name {needle:?}");
        }
    }

    #[test]
    fn keys() {
        for good in ["a", "nar/x.nar.zst", "x.narinfo", "a.b/c"] {
            assert!(valid_key(good), "{good}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/./b",
            ".nixpush-x.tmp",
            "nar/.nixpush-1",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn remote_paths() {
        let b = |root: &str| {
            let mut c =
                SftpConfig::parse("sftp://u@h/x?insecure-accept-any-host-key=true").unwrap();
            c.root = root.to_owned();
            SftpBackend::new(c)
        };
        assert_eq!(b("/srv/c").remote("nar/a"), "/srv/c/nar/a");
        assert_eq!(b("/srv/c").remote(""), "/srv/c");
        assert_eq!(b("/").remote("a"), "/a");
        assert_eq!(b("").remote("a"), "a");
        assert_eq!(b("").remote(""), ".");
        assert_eq!(b("rel").remote("a"), "rel/a");
    }

    #[test]
    fn debug_never_shows_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("ssh-keygen not available; skipped");
            return;
        }
        let secret = std::fs::read_to_string(&key).unwrap();
        let body: String = secret.lines().nth(1).unwrap().to_owned();
        let c = SftpConfig::parse(&format!(
            "sftp://u@h/c?identity={}&insecure-accept-any-host-key=true",
            key.display()
        ))
        .unwrap();
        let shown = format!("{:?}", SftpBackend::new(c));
        assert!(!shown.contains(&body), "{shown}");
        assert!(shown.contains(&key.display().to_string()), "{shown}");
    }
}
