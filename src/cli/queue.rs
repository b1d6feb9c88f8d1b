//! `nixpush queue list|retry|drop`: the entries the daemon rejected, read and changed in the
//! queue directory itself (no daemon needed). A rejected entry stays in `rejected/` with a
//! `.reason` file until someone retries it (once what was wrong is put right) or drops it.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context as _;
use nixpush::config::Config;
use nixpush::daemon::queue::Queue;

use super::ConfigArg;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  What the daemon rejected, and why:
    nixpush queue list

  Try an entry again, once the path it names is built:
    nixpush queue retry 01796172802613837890-4242-0

  Forget every rejected entry:
    nixpush queue drop --all")]
pub struct QueueArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// List the rejected entries with their reasons.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Put rejected entries back in the queue, for the daemon to try again.
    Retry(Names),
    /// Remove rejected entries for good.
    Drop(Names),
}

#[derive(Debug, clap::Args)]
struct Names {
    #[command(flatten)]
    config: ConfigArg,
    /// Entry names, as `nixpush queue list` shows them.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    names: Vec<OsString>,
    /// Every rejected entry.
    #[arg(long)]
    all: bool,
}

pub fn run(args: QueueArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.action {
        Action::List { config, .. } => config,
        Action::Retry(n) | Action::Drop(n) => &n.config,
    };
    let (path, _) = config.path();
    let cfg = Config::load_unchecked(&path)?;
    let queue = Queue::at(&cfg.queue_dir);
    let rejected = || {
        queue
            .rejected()
            .with_context(|| format!("cannot read {}/rejected", cfg.queue_dir.display()))
    };
    match args.action {
        Action::List { json, .. } => {
            let list = rejected()?;
            if json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|r| serde_json::json!({"entry": r.entry.to_string(), "reason": r.reason}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if list.is_empty() {
                println!("no rejected entries in {}", cfg.queue_dir.display());
            } else {
                for r in &list {
                    println!("{}\n  {}", r.entry, r.reason.replace('\n', "\n  "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        action => {
            let (retry, names) = match action {
                Action::Retry(n) => (true, n),
                Action::Drop(n) => (false, n),
                Action::List { .. } => unreachable!("handled above"),
            };
            let names: Vec<OsString> = if names.all {
                rejected()?.into_iter().map(|r| r.entry.name).collect()
            } else {
                names.names
            };
            if names.is_empty() {
                println!("no rejected entries in {}", cfg.queue_dir.display());
            }
            let mut failed = false;
            for name in &names {
                let done = if retry {
                    queue.retry(name)
                } else {
                    queue.drop_rejected(name)
                };
                let shown = nixpush::daemon::queue::Entry::new(name.clone());
                match done {
                    Ok(()) if retry => println!("{shown}: back in the queue"),
                    Ok(()) => println!("{shown}: dropped"),
                    Err(e) => {
                        eprintln!("nixpush: error: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
