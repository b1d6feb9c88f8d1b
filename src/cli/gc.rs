//! `nixpush gc [CACHE] --keep … | --keep-file … | --keep-since …`: delete what no root needs,
//! beside live pushers (the protocol and its argument are in `nixpush::maintain::gc`).
//!
//! Output: with `--dry-run` a line per object that would go (`would delete: KEY (SIZE)`);
//! always a line per delete that failed, then a summary; `--json` prints one JSON document
//! instead. What gc is waiting for goes to standard error. Exit status 0 only when everything
//! that was to go went.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::HumanBytes;
use nixpush::address::Address;
use nixpush::config::Config;
use nixpush::formats::{StoreDir, StorePath};
use nixpush::maintain::gc::{self, Event, GcOptions, GcReport};

use super::ConfigArg;

const EXAMPLES: &str = "\
Examples:
  nixpush gc file:///srv/cache --keep-since 30d
  nixpush gc 's3://my-cache?region=eu-west-1' --keep-file roots.txt --dry-run
  nixpush gc /srv/cache --keep /nix/store/abc…-hello-2.12 --keep-since 7d --json";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct GcArgs {
    /// The cache, in any form `push --to` takes [default: the configured `cache`].
    #[arg(value_name = "CACHE")]
    cache: Option<String>,
    /// A store path to keep, with its closure (repeatable); a `result` symlink works too.
    #[arg(long, value_name = "PATH")]
    keep: Vec<PathBuf>,
    /// A file of store paths to keep, one a line (`#` comments and blank lines skipped).
    #[arg(long = "keep-file", value_name = "FILE")]
    keep_files: Vec<PathBuf>,
    /// Also keep what was published, or announced by a pusher, this recently (e.g. 30d).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    keep_since: Option<Duration>,
    /// What is younger is kept, and gc waits this long between marking and deleting, so that
    /// pushers at work can announce what they rely on. At least 2s + 3 × --max-skew.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// The largest difference allowed for between the clocks of this machine, the pushers'
    /// and the store's.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    max_skew: Duration,
    /// Deleting stops this long after it started; what is left goes in the next run. Pushers
    /// that touch what gc deletes wait at most this long.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    sweep_bound: Duration,
    /// Print what would be deleted and the bytes that would be freed; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON document, for scripts.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigArg,
}

fn store_dir() -> anyhow::Result<StoreDir> {
    let dir = std::env::var("NIX_STORE_DIR")
        .ok()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/nix/store".to_owned());
    StoreDir::new(dir.trim_end_matches('/')).with_context(|| format!("NIX_STORE_DIR {dir:?}"))
}

/// A `--keep` value: a store path, or a symlink (`./result`) into the store.
fn keep_path(arg: &Path, sd: &StoreDir) -> anyhow::Result<StorePath> {
    let text = arg.to_string_lossy();
    if let Ok(p) = sd.parse(&text) {
        return Ok(p);
    }
    let target = std::fs::read_link(arg)
        .or_else(|_| std::fs::canonicalize(arg))
        .with_context(|| {
            format!(
                "--keep {text:?} is not a store path below {} (nor a link to one)",
                sd.as_str()
            )
        })?;
    sd.parse(&target.to_string_lossy()).with_context(|| {
        format!(
            "--keep {text:?} leads to {}, which is not a store path below {}",
            target.display(),
            sd.as_str()
        )
    })
}

pub async fn run(args: GcArgs) -> anyhow::Result<ExitCode> {
    let (config_path, named) = args.config.path();
    if named && !config_path.exists() {
        bail!(
            "configuration file {} does not exist",
            config_path.display()
        );
    }
    let cache = match &args.cache {
        Some(c) => c.clone(),
        None if config_path.exists() => Config::load_unchecked(&config_path)?.cache()?,
        None => bail!(
            "no cache to collect: give its address (as for `push --to`), or a configuration \
             file with `cache` ({} does not exist)",
            config_path.display()
        ),
    };
    if args.keep.is_empty() && args.keep_files.is_empty() && args.keep_since.is_none() {
        bail!(
            "gc needs to know what to keep: give --keep PATH, --keep-file FILE or --keep-since \
             DURATION (e.g. --keep-since 30d); without any, everything older than the grace \
             period would go"
        );
    }
    let sd = store_dir()?;
    let mut keep = Vec::new();
    for k in &args.keep {
        keep.push(keep_path(k, &sd)?);
    }
    for f in &args.keep_files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --keep-file {}", f.display()))?;
        let paths = gc::parse_keep_file(&text, &sd).map_err(|(line, why)| {
            anyhow::anyhow!("--keep-file {} line {line}: {why}", f.display())
        })?;
        keep.extend(paths);
    }
    let addr = Address::parse(&cache)?;
    if let Some(d) = nixpush::maintain::inventory::local_dir(&addr.backend) {
        // Opening a directory cache creates it; collecting a mistyped one must not.
        if !d.is_dir() {
            bail!("no cache at {}: the directory does not exist", d.display());
        }
        if !d.join("nix-cache-info").exists() {
            bail!(
                "{} is not a binary cache: it has no nix-cache-info (name the cache's own \
                 directory)",
                d.display()
            );
        }
    }
    if addr.backend.starts_with("http://") || addr.backend.starts_with("https://") {
        bail!(
            "cannot collect {}: gc lists the whole cache, and a web server cannot list; run gc \
             on the directory or bucket it serves instead",
            addr.backend
        );
    }
    let backend = nixpush_backends::open(&addr.backend).await?;
    let opts = GcOptions {
        keep,
        keep_since: args.keep_since,
        grace: args.grace,
        skew: args.max_skew,
        sweep_bound: args.sweep_bound,
        dry_run: args.dry_run,
    };
    let json = args.json;
    let sweep_bound = args.sweep_bound;
    let events: gc::EventSink = Arc::new(move |e: &Event| match e {
        Event::Marked { narinfos, nars } if !json => {
            eprintln!("marked {narinfos} narinfos and {nars} NARs that no root needs");
        }
        Event::Waiting { until } if !json => {
            eprintln!(
                "waiting until {} (--grace) before deleting, so that pushers at work can \
                 announce what they rely on",
                humantime::format_rfc3339_seconds(*until)
            );
        }
        _ => {}
    });
    let report = gc::gc(backend, &opts, events).await?;
    if json {
        super::print_stdout(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        let mut out = String::new();
        if report.dry_run {
            for k in report
                .deleted_narinfos
                .iter()
                .chain(&report.deleted_nars)
                .chain(&report.deleted_other)
            {
                out.push_str(&format!("would delete: {k}\n"));
            }
        }
        for m in &report.roots_missing {
            out.push_str(&format!(
                "note: --keep {m}: the cache has no narinfo for it\n"
            ));
        }
        for u in &report.unparsable {
            out.push_str(&format!(
                "note: {u} does not parse, so it was kept (`nixpush verify --repair` removes it)\n"
            ));
        }
        for f in &report.failed {
            out.push_str(&format!(
                "error: cannot delete {}: {}; it stays, and so does everything it needs; run \
                 gc again\n",
                f.key, f.error
            ));
        }
        if report.stopped_at_bound {
            out.push_str(&format!(
                "stopped at the sweep bound (--sweep-bound {}): {} objects left; run gc again \
                 to delete them\n",
                humantime::format_duration(sweep_bound),
                report.left
            ));
        }
        out.push_str(&summary(&report));
        out.push('\n');
        super::print_stdout(&out)?;
    }
    Ok(if report.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn summary(r: &GcReport) -> String {
    let what = format!(
        "{} narinfos, {} NARs and {} other objects",
        r.deleted_narinfos.len(),
        r.deleted_nars.len(),
        r.deleted_other.len()
    );
    let kept = format!(
        "kept {} of {} narinfos ({} roots{})",
        r.kept,
        r.narinfos,
        r.roots,
        if r.rescued > 0 {
            format!(", {} needed again while gc waited", r.rescued)
        } else {
            String::new()
        }
    );
    if r.dry_run {
        format!(
            "{}: would delete {what}, freeing {}; {kept}; nothing was deleted (--dry-run)",
            r.cache,
            HumanBytes(r.bytes_freed)
        )
    } else {
        format!(
            "{}: deleted {what}, {} freed, in {:.1}s; {kept}",
            r.cache,
            HumanBytes(r.bytes_freed),
            r.secs
        )
    }
}
