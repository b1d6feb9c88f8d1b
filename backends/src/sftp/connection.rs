//! The SSH connection and its SFTP sessions.
//!
//! One SSH connection per backend, opened on first use, carrying up to [`SESSIONS`] SFTP
//! sessions (SSH channels) that operations borrow in turn. A stream from
//! [`Backend::get`](crate::Backend::get) holds its session until dropped. When the connection
//! dies, the next operation opens a new one; an idempotent operation (exists, get, list,
//! delete) that failed because the connection died under it is retried once on the new
//! connection (see `SftpBackend::idempotent`). A put is not: the caller retries what is
//! [`ErrorKind::Transient`]. A session learns the server's extensions and limits when it
//! opens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::client;
use russh_sftp::client::RawSftpSession;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::{Client, authenticate};
use super::error::{sftp_error, ssh_error};
use super::{CHUNK, SftpConfig};
use crate::{BackendError, ErrorKind};

/// SFTP sessions (channels) per connection, hence transfers at once.
pub const SESSIONS: usize = 4;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one SFTP request may wait for its answer.
const REQUEST_TIMEOUT_SECS: u64 = 60;

pub(super) struct Conn {
    pub(super) handle: client::Handle<Client>,
}

pub(super) struct Session {
    pub(super) sftp: RawSftpSession,
    pub(super) conn: Arc<Conn>,
    pub(super) posix_rename: bool,
    pub(super) hardlink: bool,
    pub(super) fsync: bool,
    /// Bytes per write: [`CHUNK`], or less if the server says so.
    pub(super) write_len: usize,
    pub(super) read_len: usize,
    /// Set after a transport error on this session: it is not given back.
    pub(super) broken: AtomicBool,
}

impl Session {
    fn alive(&self) -> bool {
        !self.broken.load(Ordering::Relaxed) && !self.conn.handle.is_closed()
    }

    /// Pass `r` on, marking the session broken if it failed in transport.
    pub(super) fn note<T>(&self, r: Result<T, BackendError>) -> Result<T, BackendError> {
        if r.as_ref().is_err_and(|e| e.kind == ErrorKind::Transient) {
            self.broken.store(true, Ordering::Relaxed);
        }
        r
    }
}

pub(super) struct PoolInner {
    pub(super) config: SftpConfig,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    idle: std::sync::Mutex<Vec<Session>>,
    permits: Arc<Semaphore>,
}

/// A borrowed session, given back when dropped unless it broke.
pub(super) struct Lease {
    session: Option<Session>,
    pool: Arc<PoolInner>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    pub(super) fn get(&self) -> &Session {
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
    pub(super) fn new(config: SftpConfig) -> Self {
        PoolInner {
            config,
            conn: tokio::sync::Mutex::new(None),
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(SESSIONS)),
        }
    }

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

    pub(super) async fn checkout(self: &Arc<Self>) -> Result<Lease, BackendError> {
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
                    });
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
            ));
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
