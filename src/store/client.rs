//! A client of Nix's worker protocol, the one `nix` itself speaks to `nix-daemon`
//! (`src/libstore/remote-store.cc`, `worker-protocol.hh`, `daemon.cc` in Nix's sources).
//!
//! # Where the store is
//! - `NIX_REMOTE=daemon` (or `unix`, `unix://PATH`): the daemon's socket,
//!   `$NIX_DAEMON_SOCKET_PATH`, else `$NIX_STATE_DIR/daemon-socket/socket`
//!   (`/nix/var/nix/daemon-socket/socket`).
//! - `NIX_REMOTE` unset, empty or `auto`, as Nix decides: if we cannot write Nix's state
//!   directory but a daemon socket is there, the socket.
//! - Otherwise (a single-user store, or any other `NIX_REMOTE`): one long-lived
//!   `nix-daemon --stdio` child, which opens the store as `nix` would in our place and speaks
//!   the same protocol over its pipes. One child per [`DaemonStore`], whatever the number of
//!   queries.
//!
//! # Conversation
//! ```text
//! client: MAGIC_1                    daemon: MAGIC_2, version
//! client: version, 0 (no CPU affinity), 0 (no reserved space)
//!                                    daemon: Nix version (≥ 1.33), trust (≥ 1.35), log…, LAST
//! client: SetOptions …               daemon: log…, LAST
//! client: op, arguments              daemon: log…, LAST or ERROR, reply
//! ```
//! "log…" is the daemon's stderr channel: messages, activities and results until `LAST`, or an
//! `ERROR` that ends the operation (the connection stays usable). We offer protocol 1.37 and
//! use the lower of the two versions; Nix 2.4 (1.32) is the oldest daemon we accept, since the
//! operations below need at least 1.22 and older Nix is long out of support. Nix 2.8 speaks
//! 1.34; Nix 2.34 speaks 1.38 and agrees on 1.37 (1.38 adds a feature exchange we do not
//! need).
//!
//! # Operations and cost
//! - `QueryValidPaths` (31): one round trip for any number of paths.
//! - `QueryPathInfo` (26): one path each, **pipelined**: every request of a batch is written
//!   while the replies are read, so a closure of thousands of paths costs one round trip per
//!   level of its reference graph, not one per path.
//! - `QueryDerivationOutputMap` (41): pipelined likewise.
//! - `SetOptions` (19): once per connection, to keep the daemon's log traffic to errors.
//!
//! Errors stay typed: a path the daemon does not know is `Ok(None)`; an error the daemon
//! reports for one operation is [`StoreError::Daemon`] (final: the request is wrong); a
//! broken connection is [`StoreError::Io`] (transient: the next call reconnects).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex as SyncMutex};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::{debug, trace};

use super::nar_stream::{self, NarCopier, NarReader};
use super::wire::{self, Request};
use super::{PathInfo, StoreError};
use crate::formats::{Sha256, StoreDir, StorePath};

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// The version we offer: 1.37. (1.38 adds a feature exchange we have no use for.)
const CLIENT_VERSION: u64 = (1 << 8) | 37;
/// The oldest daemon we talk to: Nix 2.4.
const MIN_VERSION: u64 = (1 << 8) | 32;

const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;

const OP_SET_OPTIONS: u64 = 19;
const OP_QUERY_PATH_INFO: u64 = 26;
const OP_QUERY_VALID_PATHS: u64 = 31;
const OP_NAR_FROM_PATH: u64 = 38;
const OP_QUERY_DERIVATION_OUTPUT_MAP: u64 = 41;

/// Requests encoded per write while pipelining: large enough that a batch is a few system
/// calls, small enough that the daemon starts answering at once.
const PIPELINE_CHUNK: usize = 256;
/// Lines of the child's stderr kept to explain a failed start.
const STDERR_LINES: usize = 20;

/// How to reach the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A nix-daemon's Unix socket.
    Socket(PathBuf),
    /// A `nix-daemon --stdio` child of ours (the program, normally `nix-daemon` on `PATH`).
    Stdio(OsString),
}

impl Endpoint {
    /// Decide as Nix does from `NIX_REMOTE` and friends (see the module doc).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let state_dir = var("NIX_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/nix/var/nix"));
        let default_socket = var("NIX_DAEMON_SOCKET_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| state_dir.join("daemon-socket/socket"));
        let remote = var("NIX_REMOTE").map(|v| v.to_string_lossy().into_owned());
        let writable = || rustix::fs::access(&state_dir, rustix::fs::Access::WRITE_OK).is_ok();
        Self::decide(remote.as_deref(), writable, default_socket)
    }

    /// The rule of [`Endpoint::from_env`], apart from the environment: `state_dir_writable`
    /// is asked only when Nix would ask it (for `auto`).
    fn decide(
        remote: Option<&str>,
        state_dir_writable: impl FnOnce() -> bool,
        default_socket: PathBuf,
    ) -> Self {
        let stdio = Endpoint::Stdio("nix-daemon".into());
        match remote {
            Some("daemon" | "unix" | "unix://") => Endpoint::Socket(default_socket),
            Some(r) if r.starts_with("unix://") => {
                let path = &r["unix://".len()..];
                Endpoint::Socket(PathBuf::from(path.split('?').next().unwrap_or(path)))
            }
            None | Some("auto") => {
                if !state_dir_writable() && default_socket.exists() {
                    Endpoint::Socket(default_socket)
                } else {
                    stdio
                }
            }
            Some(_) => stdio,
        }
    }

    fn describe(&self) -> String {
        match self {
            Endpoint::Socket(p) => format!("the nix-daemon at {}", p.display()),
            Endpoint::Stdio(p) => format!("`{} --stdio`", p.to_string_lossy()),
        }
    }
}

type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

struct Connection {
    r: Reader,
    w: Writer,
    /// The agreed protocol version.
    version: u64,
    /// Our `nix-daemon --stdio` child; killed with the connection.
    _child: Option<Child>,
}

impl Connection {
    fn minor(&self) -> u64 {
        self.version & 0xff
    }
}

/// The local Nix store, asked over the worker protocol (see the module doc).
pub struct DaemonStore {
    endpoint: Endpoint,
    store_dir: StoreDir,
    /// One connection, opened on first use and again after it broke.
    conn: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for DaemonStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonStore")
            .field("endpoint", &self.endpoint)
            .field("store_dir", &self.store_dir)
            .finish()
    }
}

/// What the daemon answered for one request of a pipelined batch.
type Answer<T> = Result<T, StoreError>;

impl DaemonStore {
    /// A store reached through `endpoint`, connected on first use.
    pub fn new(endpoint: Endpoint, store_dir: StoreDir) -> Self {
        Self {
            endpoint,
            store_dir,
            conn: Mutex::new(None),
        }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Connect now, so that a set-up problem shows before any work starts.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.with_conn(|_| Box::pin(async { Ok(()) })).await
    }

    /// Run `f` on the connection, opening it first if needed. A failure of the connection
    /// itself drops it. Every operation here is a query, so one that fails on a connection
    /// opened earlier (the nix-daemon restarted since, our child died) is asked once more on
    /// a new one, rather than failing a whole pass for a daemon that is back already.
    async fn with_conn<T>(
        &self,
        f: impl for<'c> Fn(&'c mut Connection) -> futures::future::BoxFuture<'c, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock().await;
        let mut reused = guard.is_some();
        loop {
            if guard.is_none() {
                *guard = Some(connect(&self.endpoint).await?);
            }
            let conn = guard.as_mut().expect("just connected");
            let result = f(conn).await;
            match result {
                Err(StoreError::Io { .. } | StoreError::Protocol { .. }) => {
                    *guard = None;
                    if reused {
                        debug!(endpoint = %self.endpoint.describe(), "store connection broke; reconnecting");
                        reused = false;
                        continue;
                    }
                    return result;
                }
                _ => return result,
            }
        }
    }

    /// The paths among `paths` that are valid.
    pub async fn query_valid_paths(
        &self,
        paths: &[StorePath],
    ) -> Result<Vec<StorePath>, StoreError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let full: Vec<String> = paths.iter().map(|p| self.store_dir.display(p)).collect();
        let sd = self.store_dir.clone();
        self.with_conn(move |c| {
            let (full, sd) = (full.clone(), sd.clone());
            Box::pin(async move {
                let mut req = Request::new();
                req.u64(OP_QUERY_VALID_PATHS).strs(&full);
                if c.minor() >= 27 {
                    req.bool(false); // do not substitute
                }
                send(c, &req, "QueryValidPaths").await?;
                read_log(c, "QueryValidPaths").await??;
                let valid = wire::read_strings(&mut c.r)
                    .await
                    .map_err(io_err("QueryValidPaths"))?;
                valid.iter().map(|p| parse_path(&sd, p)).collect()
            })
        })
        .await
    }

    /// Path infos for `paths`, in order; `None` where a path is not valid.
    pub async fn query_path_infos(
        &self,
        paths: &[StorePath],
    ) -> Result<Vec<Answer<Option<PathInfo>>>, StoreError> {
        let sd = self.store_dir.clone();
        let paths = paths.to_vec();
        self.with_conn(move |c| {
            let (paths, sd) = (paths.clone(), sd.clone());
            Box::pin(async move {
                pipelined(
                    c,
                    &paths,
                    "QueryPathInfo",
                    |req, p| {
                        req.u64(OP_QUERY_PATH_INFO).str(&sd.display(p));
                    },
                    |r, minor, p| {
                        let sd = sd.clone();
                        Box::pin(async move { read_path_info(r, minor, &sd, p).await })
                    },
                )
                .await
            })
        })
        .await
    }

    /// For each derivation, its outputs by name: the path, or `None` for a floating
    /// content-addressed output that is not built yet.
    pub async fn query_derivation_output_maps(
        &self,
        drvs: &[StorePath],
    ) -> Result<Vec<Answer<Vec<(String, Option<StorePath>)>>>, StoreError> {
        let sd = self.store_dir.clone();
        let drvs = drvs.to_vec();
        self.with_conn(move |c| {
            let (drvs, sd) = (drvs.clone(), sd.clone());
            Box::pin(async move {
                pipelined(
                    c,
                    &drvs,
                    "QueryDerivationOutputMap",
                    |req, p| {
                        req.u64(OP_QUERY_DERIVATION_OUTPUT_MAP).str(&sd.display(p));
                    },
                    |r, _minor, _p| {
                        Box::pin(async {
                            let n = wire::read_count(r).await?;
                            let mut outs = Vec::with_capacity(n);
                            for _ in 0..n {
                                let name = wire::read_string(r).await?;
                                let path = wire::read_string(r).await?;
                                outs.push((name, path));
                            }
                            Ok(outs)
                        })
                    },
                )
                .await
                .map(|answers| {
                    answers
                        .into_iter()
                        .map(|a| {
                            a.and_then(|outs| {
                                outs.into_iter()
                                    .map(|(name, p)| {
                                        let path = if p.is_empty() {
                                            None
                                        } else {
                                            Some(parse_path(&sd, &p)?)
                                        };
                                        Ok((name, path))
                                    })
                                    .collect()
                            })
                        })
                        .collect()
                })
            })
        })
        .await
    }
}

impl DaemonStore {
    /// The NAR of `path`, serialised by the daemon, on a connection of its own (a long
    /// transfer must not hold up the queries of other paths). The bytes arrive through a
    /// bounded channel as the reader takes them; see [`super::nar_stream`].
    pub async fn nar_from_path(&self, path: &StorePath) -> Result<NarReader, StoreError> {
        let op = "NarFromPath";
        let mut c = connect(&self.endpoint).await?;
        let mut req = Request::new();
        req.u64(OP_NAR_FROM_PATH).str(&self.store_dir.display(path));
        send(&mut c, &req, op).await?;
        read_log(&mut c, op).await??;
        let (tx, rx) = tokio::sync::mpsc::channel(nar_stream::CHANNEL_CHUNKS);
        tokio::spawn(async move {
            // The whole connection moves here (not just its reader, as a capture of `c.r`
            // would): dropping it ends our `nix-daemon --stdio` child mid-NAR.
            let mut c = c;
            let result = NarCopier::new(&mut c.r, &tx).copy().await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(NarReader::new(rx))
    }
}

type ReadReply<'a, T> = futures::future::BoxFuture<'a, io::Result<T>>;

/// Send one request per item while reading the replies, in order. The two run at once: the
/// daemon answers while we are still writing, and writing everything first could fill both
/// pipes and stall both sides.
async fn pipelined<T: Send>(
    c: &mut Connection,
    items: &[StorePath],
    op: &'static str,
    encode: impl Fn(&mut Request, &StorePath),
    read: impl for<'r> Fn(&'r mut Reader, u64, &'r StorePath) -> ReadReply<'r, T>,
) -> Result<Vec<Answer<T>>, StoreError> {
    let minor = c.minor();
    let Connection { r, w, .. } = c;
    let write = async {
        let mut req = Request::new();
        for chunk in items.chunks(PIPELINE_CHUNK) {
            req.clear();
            for p in chunk {
                encode(&mut req, p);
            }
            w.write_all(req.as_bytes()).await?;
            w.flush().await?;
        }
        Ok::<_, io::Error>(())
    };
    let replies = async {
        let mut out = Vec::with_capacity(items.len());
        for p in items {
            match read_log_from(r, minor, op).await? {
                Ok(()) => out.push(Ok(read(r, minor, p).await.map_err(io_err(op))?)),
                Err(e) => out.push(Err(e)),
            }
        }
        Ok::<_, StoreError>(out)
    };
    let (written, replies) = tokio::join!(write, replies);
    written.map_err(io_err(op))?;
    replies
}

async fn read_path_info(
    r: &mut Reader,
    minor: u64,
    sd: &StoreDir,
    path: &StorePath,
) -> io::Result<Option<PathInfo>> {
    if minor >= 17 && !wire::read_bool(r).await? {
        return Ok(None);
    }
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let parse = |p: &str| sd.parse(p).map_err(|e| bad(e.to_string()));
    let deriver = wire::read_string(r).await?;
    let nar_hash = wire::read_string(r).await?;
    let references = wire::read_strings(r).await?;
    let _registration_time = wire::read_u64(r).await?;
    let nar_size = wire::read_u64(r).await?;
    if minor >= 16 {
        let _ultimate = wire::read_bool(r).await?;
    }
    let sigs = wire::read_strings(r).await?;
    let ca = wire::read_string(r).await?;
    // Base16 without a prefix, as every Nix so far sends it; a prefixed form is taken too.
    let nar_hash = if nar_hash.contains([':', '-']) {
        Sha256::parse(&nar_hash)
    } else {
        Sha256::parse(&format!("sha256:{nar_hash}"))
    }
    .map_err(|e| bad(format!("{}: {e}", sd.display(path))))?;
    let mut references = references
        .iter()
        .map(|p| parse(p))
        .collect::<io::Result<Vec<_>>>()?;
    references.sort();
    Ok(Some(PathInfo {
        path: path.clone(),
        nar_hash,
        nar_size,
        references,
        deriver: (!deriver.is_empty()).then(|| parse(&deriver)).transpose()?,
        sigs,
        ca: (!ca.is_empty()).then_some(ca),
    }))
}

fn parse_path(sd: &StoreDir, p: &str) -> Result<StorePath, StoreError> {
    sd.parse(p).map_err(|e| StoreError::Protocol {
        op: "reply",
        message: e.to_string(),
    })
}

fn io_err(op: &'static str) -> impl Fn(io::Error) -> StoreError {
    move |error| {
        if error.kind() == io::ErrorKind::InvalidData {
            StoreError::Protocol {
                op,
                message: error.to_string(),
            }
        } else {
            StoreError::Io { op, error }
        }
    }
}

async fn send(c: &mut Connection, req: &Request, op: &'static str) -> Result<(), StoreError> {
    c.w.write_all(req.as_bytes()).await.map_err(io_err(op))?;
    c.w.flush().await.map_err(io_err(op))
}

/// Read the daemon's log channel up to `LAST` (`Ok(Ok(()))`) or `ERROR` (`Ok(Err(..))`, the
/// operation failed but the connection is fine).
async fn read_log(
    c: &mut Connection,
    op: &'static str,
) -> Result<Result<(), StoreError>, StoreError> {
    let minor = c.minor();
    read_log_from(&mut c.r, minor, op).await
}

async fn read_log_from(
    r: &mut Reader,
    minor: u64,
    op: &'static str,
) -> Result<Result<(), StoreError>, StoreError> {
    let e = io_err(op);
    loop {
        let msg = wire::read_u64(r).await.map_err(&e)?;
        match msg {
            STDERR_LAST => return Ok(Ok(())),
            STDERR_NEXT => {
                let line = wire::read_bytes(r).await.map_err(&e)?;
                trace!(
                    op,
                    "nix-daemon: {}",
                    String::from_utf8_lossy(&line).trim_end()
                );
            }
            STDERR_WRITE => {
                wire::read_bytes(r).await.map_err(&e)?;
            }
            STDERR_START_ACTIVITY => {
                let _id = wire::read_u64(r).await.map_err(&e)?;
                let _level = wire::read_u64(r).await.map_err(&e)?;
                let _kind = wire::read_u64(r).await.map_err(&e)?;
                let _text = wire::read_bytes(r).await.map_err(&e)?;
                skip_fields(r).await.map_err(&e)?;
                let _parent = wire::read_u64(r).await.map_err(&e)?;
            }
            STDERR_STOP_ACTIVITY => {
                wire::read_u64(r).await.map_err(&e)?;
            }
            STDERR_RESULT => {
                let _id = wire::read_u64(r).await.map_err(&e)?;
                let _kind = wire::read_u64(r).await.map_err(&e)?;
                skip_fields(r).await.map_err(&e)?;
            }
            STDERR_ERROR => {
                let message = if minor >= 26 {
                    let _type = wire::read_bytes(r).await.map_err(&e)?;
                    let _level = wire::read_u64(r).await.map_err(&e)?;
                    let _name = wire::read_bytes(r).await.map_err(&e)?;
                    let msg = wire::read_bytes(r).await.map_err(&e)?;
                    let _have_pos = wire::read_u64(r).await.map_err(&e)?;
                    let traces = wire::read_count(r).await.map_err(&e)?;
                    for _ in 0..traces {
                        let _have_pos = wire::read_u64(r).await.map_err(&e)?;
                        let _hint = wire::read_bytes(r).await.map_err(&e)?;
                    }
                    msg
                } else {
                    let msg = wire::read_bytes(r).await.map_err(&e)?;
                    let _status = wire::read_u64(r).await.map_err(&e)?;
                    msg
                };
                return Ok(Err(StoreError::Daemon {
                    op,
                    message: plain_text(&message),
                }));
            }
            STDERR_READ => {
                return Err(StoreError::Protocol {
                    op,
                    message: "the daemon asked for data that this operation does not send".into(),
                });
            }
            other => {
                return Err(StoreError::Protocol {
                    op,
                    message: format!("unknown log message {other:#x}"),
                });
            }
        }
    }
}

async fn skip_fields(r: &mut Reader) -> io::Result<()> {
    let n = wire::read_count(r).await?;
    for _ in 0..n {
        match wire::read_u64(r).await? {
            0 => {
                wire::read_u64(r).await?;
            }
            1 => {
                wire::read_bytes(r).await?;
            }
            t => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown field type {t}"),
                ));
            }
        }
    }
    Ok(())
}

/// A daemon's error message as one plain line: without terminal colours, without the
/// `error: ` that Nix puts before it (our own message says what failed).
fn plain_text(msg: &[u8]) -> String {
    let s = String::from_utf8_lossy(msg);
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    let out = out.trim();
    out.strip_prefix("error: ").unwrap_or(out).trim().to_owned()
}

async fn connect(endpoint: &Endpoint) -> Result<Connection, StoreError> {
    let (r, w, child, stderr): (Box<dyn AsyncRead + Send + Unpin>, Writer, _, _) = match endpoint {
        Endpoint::Socket(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|error| StoreError::Connect {
                    what: endpoint.describe(),
                    hint: socket_hint(path, &error),
                    error,
                })?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w), None, None)
        }
        Endpoint::Stdio(program) => {
            let mut child = Command::new(program)
                .arg("--stdio")
                // Socket activation and sd_notify are the daemon's, not for Nix.
                .env_remove("LISTEN_PID")
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_FDNAMES")
                .env_remove("NOTIFY_SOCKET")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|error| StoreError::Connect {
                    what: endpoint.describe(),
                    hint: "is Nix installed, and `nix-daemon` on PATH?".into(),
                    error,
                })?;
            let stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let lines = Arc::new(SyncMutex::new(VecDeque::new()));
            if let Some(err) = child.stderr.take() {
                tokio::spawn(keep_stderr(err, lines.clone()));
            }
            (Box::new(stdout), Box::new(stdin), Some(child), Some(lines))
        }
    };
    let mut conn = Connection {
        r: BufReader::with_capacity(64 << 10, r),
        w,
        version: CLIENT_VERSION,
        _child: child,
    };
    match handshake(&mut conn).await {
        Ok(()) => {
            debug!(endpoint = %endpoint.describe(), version = conn.version, "connected to the Nix store");
            Ok(conn)
        }
        Err(e) => {
            let said = stderr
                .map(|l| {
                    l.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .cloned()
                        .collect::<Vec<String>>()
                        .join("; ")
                })
                .unwrap_or_default();
            Err(StoreError::Handshake {
                what: endpoint.describe(),
                message: if said.is_empty() {
                    e.to_string()
                } else {
                    format!("{e}; it said: {said}")
                },
            })
        }
    }
}

fn socket_hint(path: &Path, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => format!(
            "is nix-daemon running? (`systemctl status nix-daemon`; {} is its socket)",
            path.display()
        ),
        io::ErrorKind::PermissionDenied => {
            "this user may not connect; check `allowed-users` in nix.conf and the socket's permissions".into()
        }
        _ => "is nix-daemon running?".into(),
    }
}

async fn keep_stderr(err: tokio::process::ChildStderr, lines: Arc<SyncMutex<VecDeque<String>>>) {
    let mut reader = BufReader::new(err).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        debug!("nix-daemon --stdio: {line}");
        let mut l = lines.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == STDERR_LINES {
            l.pop_front();
        }
        l.push_back(line);
    }
}

async fn handshake(c: &mut Connection) -> Result<(), StoreError> {
    let op = "handshake";
    let e = io_err(op);
    send(c, Request::new().u64(WORKER_MAGIC_1), op).await?;
    let magic = wire::read_u64(&mut c.r).await.map_err(&e)?;
    if magic != WORKER_MAGIC_2 {
        return Err(StoreError::Protocol {
            op,
            message: format!("this is not a nix-daemon (it answered {magic:#x})"),
        });
    }
    let theirs = wire::read_u64(&mut c.r).await.map_err(&e)?;
    if theirs >> 8 != 1 || theirs < MIN_VERSION {
        return Err(StoreError::Unsupported {
            version: format!("{}.{}", theirs >> 8, theirs & 0xff),
        });
    }
    c.version = theirs.min(CLIENT_VERSION);
    let mut req = Request::new();
    req.u64(CLIENT_VERSION);
    req.u64(0); // no CPU affinity (≥ 1.14)
    req.u64(0); // reserve no space (≥ 1.11)
    send(c, &req, op).await?;
    if c.minor() >= 33 {
        let nix_version = wire::read_string(&mut c.r).await.map_err(&e)?;
        debug!(nix_version, "nix-daemon version");
    }
    if c.minor() >= 35 {
        let _trusted = wire::read_u64(&mut c.r).await.map_err(&e)?;
    }
    read_log(c, op).await??;

    let op = "SetOptions";
    let mut req = Request::new();
    req.u64(OP_SET_OPTIONS)
        .u64(0) // keepFailed
        .u64(0) // keepGoing
        .u64(0) // tryFallback
        .u64(0) // verbosity: errors only
        .u64(1) // maxBuildJobs
        .u64(0) // maxSilentTime
        .u64(1) // useBuildHook (obsolete)
        .u64(0) // verboseBuild: errors only
        .u64(0) // logType (obsolete)
        .u64(0) // printBuildTrace (obsolete)
        .u64(0) // buildCores
        .u64(0) // useSubstitutes: never fetch what we are asked about
        .u64(0); // no overrides (≥ 1.12)
    send(c, &req, op).await?;
    read_log(c, op).await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_is_one_plain_line() {
        let msg = b"\x1b[31;1merror:\x1b[0m path '\x1b[35;1m/nix/store/x\x1b[0m' is not valid\n";
        assert_eq!(plain_text(msg), "path '/nix/store/x' is not valid");
    }

    #[test]
    fn endpoint_follows_nix_remote() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("socket");
        std::fs::write(&live, "").unwrap();
        let gone = dir.path().join("none");
        let socket = |p: &Path| Endpoint::Socket(p.to_owned());
        let stdio = Endpoint::Stdio("nix-daemon".into());
        let decide = |remote, writable, default: &Path| {
            Endpoint::decide(remote, || writable, default.to_owned())
        };
        assert_eq!(decide(Some("daemon"), true, &gone), socket(&gone));
        assert_eq!(
            decide(Some("unix:///run/x.sock?max-connections=1"), true, &live),
            socket(Path::new("/run/x.sock"))
        );
        assert_eq!(decide(Some("local"), false, &live), stdio);
        assert_eq!(decide(Some("local?root=/r"), false, &live), stdio);
        // `auto`: a single-user store we can write is opened by our own child; a store we
        // cannot write goes through its daemon, when one is there.
        assert_eq!(decide(None, true, &live), stdio);
        assert_eq!(decide(Some("auto"), false, &live), socket(&live));
        assert_eq!(decide(None, false, &gone), stdio);
    }
}
