//! `nixpush daemon`: load the configuration, bind or inherit the socket, hand over to
//! [`nixpush::daemon::run`].

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nixpush::address::Address;
use nixpush::config::{CacheTarget, Config};
use nixpush::daemon::{self, Settings};
use nixpush::publish::pipeline::CompressOptions;
use nixpush::publish::{PushOptions, Pusher};
use nixpush::store::NixStore;

use super::ConfigArg;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  As systemd runs it (see systemd/nixpush.service):
    nixpush daemon --config /etc/nixpush/config.toml

  In the foreground with debug logs, to try a configuration:
    nixpush -v daemon --config ./config.toml")]
pub struct DaemonArgs {
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  Publish everything that enters the store, with the daemon's configuration:
    nixpush watch-store --config /etc/nixpush/config.toml

  The same with debug logs, to see each new path found:
    nixpush -v watch-store --config ./config.toml

It is `nixpush daemon` with `[daemon] watch-store = true`: the socket and the queue directory
work as ever, so hooked builds still arrive through them.")]
pub struct WatchStoreArgs {
    #[command(flatten)]
    config: ConfigArg,
}

pub fn run(args: DaemonArgs, verbose: u8) -> anyhow::Result<ExitCode> {
    start(&args.config, false, verbose)
}

pub fn watch_store(args: WatchStoreArgs, verbose: u8) -> anyhow::Result<ExitCode> {
    start(&args.config, true, verbose)
}

fn start(config: &ConfigArg, watch_store: bool, verbose: u8) -> anyhow::Result<ExitCode> {
    // Once, before anything else may open a descriptor that could be taken for fd 3.
    let inherited = nixpush::daemon::systemd::listen_fd()?;
    let (path, explicit) = config.path();
    let mut cfg = Config::load(&path, explicit)?;
    cfg.daemon.watch_store |= watch_store;
    // The daemon's default is its log-level (info), so -v starts one step further.
    let directive = match verbose {
        0 => cfg.log_level.as_str(),
        1 => "debug",
        _ => "trace",
    };
    super::init_tracing(0, directive);
    super::runtime()?.block_on(serve(cfg, &path, inherited))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    cfg: Config,
    config_path: &Path,
    inherited: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<()> {
    // Before the socket exists, so no request can see a daemon that SIGTERM would kill.
    let shutdown = shutdown_signal()?;
    let store = std::sync::Arc::new(NixStore::open().await?);
    let targets = cfg.caches();
    let several = targets.len() > 1;
    let mut caches = Vec::new();
    for target in &targets {
        caches.push(open_cache(&cfg, target, several, config_path, store.clone()).await?);
    }
    let metrics = match cfg.metrics_listen()? {
        Some(addr) => Some(std::net::TcpListener::bind(addr).with_context(|| {
            format!("cannot listen on {addr} for metrics (daemon.metrics-listen)")
        })?),
        None => None,
    };
    // The socket file we bind, to remove on a clean exit; systemd's is systemd's to keep.
    let mut ours = None;
    let listener = match inherited {
        Some(fd) => {
            let std_listener = std::os::unix::net::UnixListener::from(fd);
            std_listener.set_nonblocking(true)?;
            // Checked to be a listening Unix stream socket already; this only registers it.
            tokio::net::UnixListener::from_std(std_listener)
                .context("cannot use the socket passed by systemd")?
        }
        None => {
            let listener = bind(&cfg.socket, cfg.socket_mode()?)?;
            ours = OurSocket::note(&cfg.socket);
            listener
        }
    };
    let settings = Settings {
        queue_dir: cfg.queue_dir.clone(),
        rescan_interval: cfg.rescan_interval(),
        batch_entries: cfg.daemon.batch_entries,
        shutdown_grace: Duration::from_secs(cfg.daemon.shutdown_grace_secs),
        retry_max_delay: Duration::from_secs(cfg.daemon.retry_max_delay_secs),
        watch_store: cfg.daemon.watch_store,
        metrics,
    };
    let result = daemon::run(caches, settings, listener, shutdown).await;
    if let Some(socket) = ours {
        socket.remove();
    }
    result?;
    Ok(())
}

/// One cache of the config, opened: its backend and how to publish to it.
async fn open_cache(
    cfg: &Config,
    t: &CacheTarget,
    several: bool,
    config_path: &Path,
    store: std::sync::Arc<NixStore>,
) -> anyhow::Result<daemon::Cache> {
    // With several caches, every message about one names it.
    let named = |e: anyhow::Error| {
        if several {
            e.context(format!("cache {}", t.name))
        } else {
            e
        }
    };
    let addr = Address::parse(&t.cache).map_err(|e| named(e.into()))?;
    let mut keys = Vec::new();
    for k in t.resolved_key_files(config_path) {
        let key = super::read_key(&k.path);
        keys.push(match k.relative_to {
            // Say where a relative name was looked for, so the fix is plain.
            Some(how) => key
                .with_context(|| format!("key-files: {how}"))
                .map_err(named)?,
            None => key.map_err(named)?,
        });
    }
    if let Some(k) = &addr.secret_key {
        keys.push(super::read_key(k).map_err(named)?);
    }
    if let Some(c) = addr.compression {
        if c != t.compression {
            return Err(named(anyhow::anyhow!(
                "config: compression = {:?} contradicts compression={c} in the cache address",
                t.compression.name()
            )));
        }
    }
    let backend = nixpush_backends::open(&addr.backend)
        .await
        .map_err(|e| named(e.into()))?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opts = PushOptions {
        compress: CompressOptions {
            compression: t.compression,
            level: t.compression_level,
            threads: if addr.parallel_compression == Some(false) {
                1
            } else {
                cpus as u32
            },
        },
        jobs: cfg.jobs.unwrap_or(cpus),
        force: false,
        keys,
        skip_signed_by: cfg.skip_signed_by.clone(),
        logs: t.upload_logs,
        nar_listing: addr.write_nar_listing.unwrap_or(t.write_nar_listing),
        filter: cfg.filter()?,
        no_closure: false,
    };
    Ok(daemon::Cache::new(
        t.name.clone(),
        Pusher::new(store, backend, opts),
    ))
}

/// The socket file this daemon made, known by its inode, so that a clean exit removes it only
/// if it is still ours (not one a newer daemon has bound at the same path since).
struct OurSocket {
    path: std::path::PathBuf,
    dev: u64,
    ino: u64,
}

impl OurSocket {
    fn note(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(Self {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    fn remove(self) {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the socket");
                }
            }
            _ => {}
        }
    }
}

fn bind(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another daemon is already listening on {}", path.display());
        }
        // A socket left by a daemon that died.
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(listener)
}

/// A future that completes on SIGTERM or SIGINT. The handlers are installed here, at once,
/// not when the future is first polled: a SIGTERM that arrives between binding the socket and
/// the first poll must stop the daemon cleanly, not kill it by the default action.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}
