//! Command-line interface: thin glue from arguments to the library.

mod daemon;
mod docs;
mod doctor;
mod gc;
mod hook;
mod keygen;
mod progress;
mod push;
mod queue;
mod status;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nixpush::formats::signing::SecretKey;

#[derive(Debug, Parser)]
#[command(
    name = "nixpush",
    version,
    propagate_version = true,
    about = "Publish Nix store paths to binary caches",
    // Our own `help`, so that `nixpush help --help` is help about `help`.
    disable_help_subcommand = true,
    after_help = "\
Examples:
  nixpush keygen cache.example.org-1 signing-key signing-key.pub
  nixpush push --to file:///srv/cache --key-file signing-key ./result
  nixpush status
  nixpush doctor

See `nixpush help COMMAND` for each command's options and examples."
)]
pub struct Cli {
    /// More log output: -v info, -vv debug; for `daemon`, which logs at its log-level (info)
    /// already, -v debug, -vv trace. NIXPUSH_LOG takes an EnvFilter directive instead.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish store paths and their closures to a binary cache.
    Push(push::PushArgs),
    /// Make a signing key pair, as `nix-store --generate-binary-cache-key` does.
    Keygen(keygen::KeygenArgs),
    /// Run the publishing daemon (the systemd service).
    Daemon(daemon::DaemonArgs),
    /// Run the daemon in the foreground, also publishing every path that appears in the store.
    WatchStore(daemon::WatchStoreArgs),
    /// Nix's post-build-hook: hand the finished build to the daemon. Never fails the build.
    Hook(hook::HookArgs),
    /// Ask the daemon how it is doing.
    Status(status::StatusArgs),
    /// Check that every path in a cache can be substituted; --repair mends what is broken.
    Verify(verify::VerifyArgs),
    /// Delete what no root needs from a cache, safely beside pushers at work.
    Gc(gc::GcArgs),
    /// List, retry or drop the queue entries the daemon rejected.
    Queue(queue::QueueArgs),
    /// Check a set-up: config, keys, Nix, cache, nix.conf's hook, daemon, queue; each failure
    /// with its fix.
    Doctor(doctor::DoctorArgs),
    /// Print help about nixpush or one of its commands.
    Help(docs::HelpArgs),
    /// Print a shell's completion script for nixpush (bash, zsh, fish, ...).
    Completions(docs::CompletionsArgs),
    /// Print the man page of nixpush, or of one of its commands, in roff.
    Man(docs::ManArgs),
}

/// The configuration file named on the command line or in the environment, else the default.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Configuration file [default: /etc/nixpush/config.toml].
    #[arg(long, env = "NIXPUSH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// The path, and whether the user named it (then it must exist).
    pub fn path(&self) -> (PathBuf, bool) {
        match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(nixpush::config::DEFAULT_PATH), false),
        }
    }
}

pub fn init_tracing(verbose: u8, default: &str) {
    use tracing_subscriber::EnvFilter;
    let directive = match verbose {
        0 => default,
        1 => "info",
        _ => "debug",
    };
    // object_store logs every retry of a request at info: during an outage, most of the log.
    // Our own lines say what failed and when the next try is.
    let directive = format!("{directive},object_store::client::retry=warn");
    let filter =
        EnvFilter::try_from_env("NIXPUSH_LOG").unwrap_or_else(|_| EnvFilter::new(directive));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if stderr_is_the_journal() {
        // journald stamps every line itself, and reads its priority from a `<N>` prefix.
        builder
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            ))
            .try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` holds its
/// `device:inode` (systemd.exec(5)); a child whose stderr was redirected elsewhere inherits
/// the variable but not the stream.
fn stderr_is_the_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

/// Prefixes each line with its syslog priority (`<3>` error, `<4>` warning, `<6>` info,
/// `<7>` debug and trace), as sd-daemon(3) describes, so that `journalctl -p warning` shows
/// warnings and errors only.
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

pub fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    use std::os::unix::fs::PermissionsExt as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    let key = SecretKey::parse(&text)
        .with_context(|| format!("key file {} is not a secret key", path.display()))?;
    // Used all the same (it may be on purpose, and refusing would stop a service at a bad
    // moment), but said: anyone who can read it can sign as this cache.
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "nixpush: warning: other users have access to secret key file {p} (mode {mode:04o}); \
                 run `chmod 600 {p}`",
                p = path.display()
            );
        }
    }
    Ok(key)
}

/// Standard output was closed by its reader (`nixpush status --json | head -c1`): not an
/// error to report, the command just ends (see `main`).
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
pub struct StdoutClosed;

/// Write `text` to standard output, all of it, flushed. A closed pipe is [`StdoutClosed`].
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => r.context("cannot write to standard output"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Hook(args) => Ok(hook::run(args)),
        Command::Status(args) => status::run(args),
        Command::Queue(args) => queue::run(args),
        Command::Doctor(args) => {
            init_tracing(cli.verbose, "warn");
            runtime()?.block_on(doctor::run(args))
        }
        Command::Keygen(args) => {
            init_tracing(cli.verbose, "warn");
            keygen::run(args)
        }
        Command::Push(args) => {
            init_tracing(cli.verbose, "warn");
            runtime()?.block_on(push::run(args))
        }
        Command::Daemon(args) => daemon::run(args, cli.verbose),
        Command::WatchStore(args) => daemon::watch_store(args, cli.verbose),
        Command::Verify(args) => {
            init_tracing(cli.verbose, "warn");
            runtime()?.block_on(verify::run(args))
        }
        Command::Gc(args) => {
            init_tracing(cli.verbose, "warn");
            runtime()?.block_on(gc::run(args))
        }
        Command::Help(args) => docs::help(args),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    }
}
