//! `nixpush verify [CACHE] [--deep] [--repair]`: check a cache, and mend it.
//!
//! Output: a line per problem on standard output (`error: OBJECT (PATH): what is wrong`), a
//! line per note (`note: …`: orphan NARs, stale temporary files), with `--repair` a line per
//! action, then a summary; `--json` prints one JSON document instead. A progress bar on a
//! terminal (standard error). Exit status 0 only when the cache is whole (after the repair,
//! with `--repair`: it verifies again).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use nixpush::address::Address;
use nixpush::config::Config;
use nixpush::formats::signing::{PublicKey, SecretKey};
use nixpush::formats::{Compression, StoreDir};
use nixpush::maintain::inventory;
use nixpush::maintain::repair::{self, RepairReport};
use nixpush::maintain::verify::{self, Report, VerifyOptions};
use nixpush::publish::PushOptions;
use nixpush::publish::pipeline::CompressOptions;
use nixpush::store::{NixStore, Store as _};

use super::ConfigArg;

const EXAMPLES: &str = "\
Examples:
  nixpush verify file:///srv/cache --trusted-key cache.example.org-1:BASE64
  nixpush verify --deep 's3://my-cache?region=eu-west-1'
  nixpush verify --repair --key-file /etc/nixpush/signing-key /srv/cache
  nixpush verify --json /srv/cache";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct VerifyArgs {
    /// The cache, in any form `push --to` takes [default: the configured `cache`].
    #[arg(value_name = "CACHE")]
    cache: Option<String>,
    /// Also read every NAR: check FileHash, decompress it, check NarHash and NarSize.
    #[arg(long)]
    deep: bool,
    /// Re-publish broken paths from the local store where they are valid there; remove the
    /// narinfos of those that are not, and of every path that refers to them.
    #[arg(long)]
    repair: bool,
    /// A public key narinfos must be signed by (repeatable): `NAME:BASE64`, or a file that
    /// holds one (as `nixpush keygen` writes). Default: the public halves of the signing keys.
    #[arg(long = "trusted-key", value_name = "KEY")]
    trusted_keys: Vec<String>,
    /// Secret key file (repeatable): signs what `--repair` re-publishes, and its public half is
    /// trusted. Default: the configured `key-files`.
    #[arg(long = "key-file", env = "NIXPUSH_KEY_FILE", value_name = "FILE")]
    key_files: Vec<PathBuf>,
    /// Compression for what `--repair` re-publishes [default: the configured one, else zstd].
    #[arg(long, value_name = "C")]
    compression: Option<Compression>,
    /// NARs read at once with `--deep`, paths re-published at once [default: number of CPUs].
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// The cache leaves out paths signed by this key name, e.g. cache.nixos.org-1, as `push
    /// --skip-signed-by` does (repeatable): a reference without a narinfo is then expected
    /// upstream, a note rather than a problem, and `--repair` leaves it alone [default: the
    /// configured `skip-signed-by`, when verifying the configured cache].
    #[arg(long, value_name = "KEYNAME")]
    skip_signed_by: Vec<String>,
    /// Print one JSON document, for scripts.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigArg,
}

/// A `--trusted-key` value: the key itself, or a file holding it.
fn trusted_key(arg: &str) -> anyhow::Result<PublicKey> {
    if let Ok(k) = PublicKey::parse(arg) {
        return Ok(k);
    }
    let text = std::fs::read_to_string(arg).with_context(|| {
        format!("--trusted-key {arg:?} is neither a public key (NAME:BASE64) nor a readable file")
    })?;
    PublicKey::parse(&text)
        .with_context(|| format!("--trusted-key: file {arg} holds no public key"))
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let (config_path, named) = args.config.path();
    // The configuration fills in what the command line leaves out: the cache, the keys
    // (only where needed: this user may not be able to read them), skip-signed-by.
    let keys_from_config =
        args.key_files.is_empty() && (args.trusted_keys.is_empty() || args.repair);
    if named && !config_path.exists() {
        bail!(
            "configuration file {} does not exist",
            config_path.display()
        );
    }
    let config = if config_path.exists() {
        Some(Config::load_unchecked(&config_path)?)
    } else {
        None
    };
    let cache = match (&args.cache, &config) {
        (Some(c), _) => c.clone(),
        (None, Some(cfg)) => cfg.cache()?,
        (None, None) => bail!(
            "no cache to verify: give its address (as for `push --to`), or a configuration \
             file with `cache` ({} does not exist)",
            config_path.display()
        ),
    };
    let addr = Address::parse(&cache)?;

    let mut key_files = args.key_files.clone();
    key_files.extend(addr.secret_key.clone());
    let mut signing: Vec<SecretKey> = key_files
        .iter()
        .map(|f| super::read_key(f))
        .collect::<anyhow::Result<_>>()?;
    let mut trusted: Vec<PublicKey> = args
        .trusted_keys
        .iter()
        .map(|k| trusted_key(k))
        .collect::<anyhow::Result<_>>()?;
    if signing.is_empty() && keys_from_config {
        // The keys of the configured cache being verified, or of the only one configured.
        let target = config.as_ref().and_then(|cfg| {
            let targets = cfg.caches();
            let only = (targets.len() == 1).then(|| targets[0].clone());
            targets.into_iter().find(|t| t.cache == cache).or(only)
        });
        if let Some(t) = target {
            for f in t.resolved_key_files(&config_path) {
                let key = super::read_key(&f.path).with_context(|| {
                    let how = f.relative_to.map(|h| format!(" ({h})")).unwrap_or_default();
                    format!(
                        "key-files in {}{how} (give --trusted-key NAME:KEY, and --key-file for \
                         --repair, where this user cannot read it)",
                        config_path.display()
                    )
                })?;
                signing.push(key);
            }
        }
    }
    if args.trusted_keys.is_empty() {
        trusted.extend(signing.iter().map(SecretKey::public));
    }
    if args.repair && signing.is_empty() {
        bail!(
            "--repair signs what it re-publishes: give --key-file FILE (or NIXPUSH_KEY_FILE), \
             or configure key-files"
        );
    }

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = args.jobs.unwrap_or(cpus).max(1);
    // With --repair the store is the one repair re-publishes from; without, only its
    // directory is needed, taken as Nix takes it.
    let store = if args.repair {
        Some(Arc::new(NixStore::open().await?))
    } else {
        None
    };
    let store_dir = match &store {
        Some(s) => s.store_dir().clone(),
        None => {
            let dir = std::env::var("NIX_STORE_DIR")
                .ok()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/nix/store".to_owned());
            StoreDir::new(dir.trim_end_matches('/'))
                .with_context(|| format!("NIX_STORE_DIR {dir:?}"))?
        }
    };
    let upstream = match &config {
        _ if !args.skip_signed_by.is_empty() => args.skip_signed_by.clone(),
        Some(cfg)
            if cfg
                .caches()
                .iter()
                .any(|t| args.cache.as_deref().is_none_or(|c| c == t.cache)) =>
        {
            cfg.skip_signed_by.clone()
        }
        _ => Vec::new(),
    };
    let opts = VerifyOptions {
        store_dir,
        trusted,
        deep: args.deep,
        jobs,
        upstream,
    };

    let dir = inventory::local_dir(&addr.backend);
    if let Some(d) = &dir {
        // Opening a directory cache creates it; verifying a mistyped one must not.
        if !d.is_dir() {
            bail!("no cache at {}: the directory does not exist", d.display());
        }
        // Nor one that holds no cache at all (opening it would add `nar/`).
        let has = |name: &str| d.join(name).exists();
        let has_narinfo = || {
            std::fs::read_dir(d).is_ok_and(|mut rd| {
                rd.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".narinfo")))
            })
        };
        if !has("nix-cache-info") && !has("nar") && !has_narinfo() {
            bail!(
                "{} is not a binary cache: it has no nix-cache-info, no narinfos and no nar/ \
                 (push to it first, or name the cache's own directory)",
                d.display()
            );
        }
    }
    if addr.backend.starts_with("http://") || addr.backend.starts_with("https://") {
        bail!(
            "cannot verify {}: verify lists the whole cache, and a web server cannot list; \
             verify the directory or bucket it serves instead",
            addr.backend
        );
    }
    let backend = nixpush_backends::open(&addr.backend).await?;
    let out = Output::new(args.json);
    let report = verify::verify(&*backend, dir.as_deref(), &opts, out.verify_sink())
        .await
        .with_context(|| format!("cannot list the cache {}", backend.describe()))?;
    out.clear();
    if !args.json {
        out.say(&summary(&report, &opts));
    }
    if report.whole() || !args.repair {
        if args.json {
            print_json(&report, None, None)?;
        } else if !report.whole() {
            out.say(&format!(
                "run `nixpush verify --repair {cache}` (with --key-file) to re-publish or remove \
                 what is broken"
            ));
        }
        return Ok(exit(report.whole()));
    }

    let store = store.expect("opened for --repair");
    let compression = args
        .compression
        .or(addr.compression)
        .or(config.as_ref().map(|c| c.compression))
        .unwrap_or(Compression::Zstd);
    let push = PushOptions {
        compress: CompressOptions {
            compression,
            level: None,
            threads: if addr.parallel_compression == Some(false) {
                1
            } else {
                cpus as u32
            },
        },
        jobs,
        force: false,
        keys: signing,
        skip_signed_by: Vec::new(),
        logs: false,
        nar_listing: false,
        filter: Default::default(),
        no_closure: false,
    };
    let mended = repair::repair(store, backend.clone(), &report, push, out.repair_sink()).await?;
    let after = verify::verify(&*backend, dir.as_deref(), &opts, out.quiet_sink())
        .await
        .with_context(|| format!("cannot list the cache {}", backend.describe()))?;
    out.clear();
    if args.json {
        print_json(&report, Some(&mended), Some(&after))?;
    } else {
        out.say(&repair_summary(&mended, &after));
        for p in &after.problems {
            out.say(&format!("still: {p}"));
        }
    }
    Ok(exit(after.whole()))
}

fn exit(whole: bool) -> ExitCode {
    if whole {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn summary(r: &Report, opts: &VerifyOptions) -> String {
    let mut what = plural(r.narinfos, "narinfo");
    if r.deep {
        what.push_str(&format!(
            " and {} ({} read)",
            plural(r.nars_read, "NAR"),
            HumanBytes(r.bytes_read)
        ));
    }
    if r.signatures_checked {
        let names: Vec<&str> = opts.trusted.iter().map(PublicKey::name).collect();
        what.push_str(&format!(", signatures by {}", names.join(" or ")));
    }
    let notes = if r.notes.is_empty() {
        String::new()
    } else {
        format!("; {}", plural(r.notes.len(), "note"))
    };
    if r.whole() {
        format!(
            "{} is whole: checked {what} in {:.1}s{notes}",
            r.cache, r.secs
        )
    } else {
        let objects: std::collections::BTreeSet<&str> =
            r.problems.iter().map(|p| p.object.as_str()).collect();
        format!(
            "{} is NOT whole: {} in {}; checked {what} in {:.1}s{notes}",
            r.cache,
            plural(r.problems.len(), "problem"),
            plural(objects.len(), "object"),
            r.secs
        )
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn repair_summary(m: &RepairReport, after: &Report) -> String {
    let mut s = format!(
        "repair: re-published {}, removed {}",
        plural(m.republished.len(), "path"),
        plural(m.removed.len(), "narinfo")
    );
    if m.rewritten > 0 {
        s.push_str(&format!(
            ", rewrote {} of their closures",
            plural(m.rewritten, "sound path")
        ));
    }
    if m.cache_info_written {
        s.push_str(", wrote nix-cache-info");
    }
    if !m.failed.is_empty() {
        s.push_str(&format!(
            "; {} could not be re-published now (try again)",
            plural(m.failed.len(), "path")
        ));
    }
    if after.whole() {
        s.push_str(&format!("; verified again: {} is whole", after.cache));
    } else {
        s.push_str(&format!(
            "; verified again: {} still has {}",
            after.cache,
            plural(after.problems.len(), "problem")
        ));
    }
    s
}

fn print_json(
    r: &Report,
    repair: Option<&RepairReport>,
    after: Option<&Report>,
) -> anyhow::Result<()> {
    let problems = |r: &Report| -> Vec<serde_json::Value> {
        r.problems
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).expect("serializable");
                v["message"] = p.to_string().into();
                v
            })
            .collect()
    };
    let notes: Vec<serde_json::Value> = r
        .notes
        .iter()
        .map(|n| {
            let mut v = serde_json::to_value(n).expect("serializable");
            v["message"] = n.to_string().into();
            v
        })
        .collect();
    let mut doc = serde_json::json!({
        "cache": r.cache,
        "whole": after.unwrap_or(r).whole(),
        "deep": r.deep,
        "narinfos": r.narinfos,
        "nars_read": r.nars_read,
        "bytes_read": r.bytes_read,
        "signatures_checked": r.signatures_checked,
        "secs": r.secs,
        "problems": problems(r),
        "notes": notes,
    });
    if let (Some(m), Some(after)) = (repair, after) {
        doc["repair"] = serde_json::to_value(m)?;
        doc["after_repair"] = serde_json::json!({
            "whole": after.whole(),
            "problems": problems(after),
        });
    }
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// Lines on standard output, a bar on standard error when it is a terminal.
struct Output {
    bar: Option<ProgressBar>,
    json: bool,
}

impl Output {
    fn new(json: bool) -> Arc<Self> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message("narinfos");
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Arc::new(Self { bar, json })
    }

    /// A line for people (not with `--json`).
    fn say(&self, line: &str) {
        if self.json {
            return;
        }
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn verify_sink(self: &Arc<Self>) -> verify::EventSink {
        let me = self.clone();
        Arc::new(move |e: &verify::Event| me.on_verify(e, true))
    }

    /// Nothing: the second verify of `--repair`, whose problems its summary lists.
    fn quiet_sink(self: &Arc<Self>) -> verify::EventSink {
        Arc::new(|_: &verify::Event| {})
    }

    fn on_verify(&self, e: &verify::Event, lines: bool) {
        use verify::Event as E;
        match e {
            E::Listed { narinfos } => {
                if let Some(bar) = &self.bar {
                    bar.set_length(*narinfos as u64);
                    bar.set_message("narinfos");
                }
            }
            E::NarinfoChecked => {
                if let Some(bar) = &self.bar {
                    bar.inc(1);
                }
            }
            E::Reading { bytes, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_position(0);
                    bar.set_length(*bytes);
                    bar.set_message("NARs");
                }
            }
            E::NarRead { bytes } => {
                if let Some(bar) = &self.bar {
                    bar.inc(*bytes);
                }
            }
            E::Problem(p) if lines => self.say(&format!("error: {p}")),
            E::Note(n) if lines => self.say(&format!("note: {n}")),
            E::Problem(_) | E::Note(_) => {}
        }
    }

    fn repair_sink(self: &Arc<Self>) -> repair::EventSink {
        let me = self.clone();
        Arc::new(move |e: &repair::Event| {
            use repair::Event as E;
            let line = match e {
                E::CacheInfoWritten => "repaired: nix-cache-info written".to_owned(),
                E::Republished { path } => {
                    format!("repaired: {path} (published again from the local store)")
                }
                E::Removed { key, path, why } => match path {
                    Some(p) => format!("removed: {key} ({p}): {why}"),
                    None => format!("removed: {key}: {why}"),
                },
                E::Failed {
                    path,
                    error,
                    transient,
                } => format!(
                    "failed: {path}: {error}{}",
                    if *transient {
                        " (left as it was; try again)"
                    } else {
                        ""
                    }
                ),
            };
            me.say(&line);
        })
    }
}
