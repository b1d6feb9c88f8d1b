//! `nixpush push --to CACHE [PATHS...]`.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use indicatif::HumanBytes;
use nixpush::address::Address;
use nixpush::formats::store_path::StorePathError;
use nixpush::formats::{Compression, StoreDir, StorePath};
use nixpush::publish::filter::{self, Filter};
use nixpush::publish::pipeline::{self, CompressOptions};
use nixpush::publish::plan::Root;
use nixpush::publish::{PushOptions, Pusher};
use nixpush::store::{NixStore, Store as _};

use super::progress::Progress;

const EXAMPLES: &str = "\
Examples:
  Push ./result and its closure into a local directory cache, signed:
    nixpush push --to file:///srv/cache --key-file /etc/nixpush/signing-key ./result

  Push a whole closure, the paths read from standard input:
    nix-store -qR ./result | nixpush push --to /srv/cache --key-file key.sec --stdin

  Push the outputs of a built derivation to S3, compressed with xz:
    nixpush push --to 's3://my-cache?region=eu-west-1&compression=xz' \\
      --key-file key.sec /nix/store/...-hello-2.12.drv^*

  Push to a directory on an SSH server, and to Google Cloud Storage:
    nixpush push --to 'sftp://nix@cache.example/srv/cache?identity=/etc/nixpush/ssh-key' \\
      --key-file key.sec ./result
    nixpush push --to 'gs://my-bucket/nix?credentials=sa.json' --key-file key.sec ./result";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct PushArgs {
    /// The cache, in Nix's syntax: `file:///dir`, or a plain directory path (absolute, or
    /// starting with `.`); `s3://bucket[/prefix]` (`?region=&endpoint=&profile=&scheme=`);
    /// `http(s)://host/path`, a server that accepts PUT (`?token-file=` or
    /// `?basic-auth-file=`); `sftp://[user@]host[:port]/path`, a directory over SSH
    /// (`?identity=&known-hosts=`; host keys checked); `gs://bucket[/prefix]`, Google Cloud
    /// Storage (`?credentials=`, or `?metadata-server=true` on GCE and GKE). Nix's store parameters `compression`, `secret-key` and
    /// `parallel-compression` are understood in any address.
    #[arg(long, env = "NIXPUSH_TO", value_name = "CACHE")]
    to: String,
    /// Secret key file to sign with (repeatable), as made by `nixpush keygen` or
    /// `nix-store --generate-binary-cache-key`.
    #[arg(long = "key-file", env = "NIXPUSH_KEY_FILE", value_name = "FILE")]
    key_files: Vec<PathBuf>,
    /// Publish unsigned narinfos. Without a key, this must be said explicitly.
    #[arg(long, conflicts_with = "key_files")]
    no_sign: bool,
    /// none, xz, bzip2 or zstd [default: zstd].
    #[arg(long, value_name = "C")]
    compression: Option<Compression>,
    /// Codec level (xz 0-9, bzip2 1-9, zstd -7-22); default: the codec's own.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    compression_level: Option<i32>,
    /// Paths compressed and uploaded at once [default: number of CPUs].
    #[arg(long, short = 'j', value_name = "N", value_parser = at_least_one)]
    jobs: Option<usize>,
    /// Re-upload paths already in the cache and rewrite their narinfos.
    #[arg(long)]
    force: bool,
    /// Skip paths signed by this key name, e.g. cache.nixos.org-1 (repeatable): they are
    /// available upstream.
    #[arg(long, value_name = "KEYNAME")]
    skip_signed_by: Vec<String>,
    /// Also read paths from standard input, one per line (or whitespace-separated).
    #[arg(long)]
    stdin: bool,
    /// Also publish the build logs of the derivations that produced the pushed paths, where
    /// this machine's Nix kept them, so that `nix log --store CACHE DRV` prints them.
    #[arg(long)]
    logs: bool,
    /// Leave out paths whose name matches this glob (repeatable), e.g. '*-source' or '*.drv',
    /// and the paths that refer to them (a cache never gets a path without its references).
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Leave out paths whose NAR is larger than SIZE (e.g. 4GiB, 512MiB, or bytes), and the
    /// paths that refer to them.
    #[arg(long, value_name = "SIZE", value_parser = nixpush::publish::filter::parse_size)]
    max_nar_size: Option<u64>,
    /// Push only the named paths, not their closures: their references must be in the
    /// cache already (or named too).
    #[arg(long)]
    no_closure: bool,
    /// Store paths, paths inside them, or symlinks to them such as `./result`.
    /// A `.drv` also pushes its outputs, `DRV^*` only its outputs; they must be built.
    /// `-` reads standard input.
    paths: Vec<String>,
}

/// A count of at least 1 (`-j 0` would push nothing, forever).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Lexically clean an absolute path: drop `.`, apply `..`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// A command-line path to the store path it names: a store path, a path inside one, or a
/// chain of symlinks (like `./result`) that ends in the store.
fn resolve(store_dir: &StoreDir, arg: &str) -> anyhow::Result<StorePath> {
    let mut p =
        normalize(&std::path::absolute(arg).with_context(|| format!("invalid path {arg:?}"))?);
    for _ in 0..40 {
        if p.starts_with(store_dir.as_str()) {
            return match store_dir.containing(&p) {
                Ok(path) => Ok(path),
                // Normalised and under the store directory, yet not in it: the directory itself,
                // which the error's own message would call "not in the Nix store".
                Err(StorePathError::NotInStore { .. }) => {
                    bail!("{arg:?} does not name a store path: it is the store directory itself")
                }
                // These name the base name that is wrong; the argument may have been longer.
                Err(e) => Err(e).with_context(|| format!("{arg:?} does not name a store path")),
            };
        }
        // Not in the store, and not there at all: say the first, which is the problem
        // (`/nix/store/../etc` names `/nix/etc`), with the second as its cause.
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(meta) => meta,
            // `./result` from a build that has not run: that it is missing is the news.
            // (A path written in the store, `/nix/store/../etc`, still hears of the store.)
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !arg.starts_with(store_dir.as_str()) =>
            {
                bail!("{arg:?} ({}) does not exist", p.display())
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{arg:?} ({}) is not in the Nix store {}",
                        p.display(),
                        store_dir.as_str()
                    )
                });
            }
        };
        if !meta.file_type().is_symlink() {
            bail!(
                "{arg:?} ({}) is not in the Nix store {}",
                p.display(),
                store_dir.as_str()
            );
        }
        let target = std::fs::read_link(&p).with_context(|| format!("{arg:?}"))?;
        p = normalize(&p.parent().unwrap_or(Path::new("/")).join(target));
    }
    bail!("{arg:?}: too many levels of symbolic links")
}

/// Completes on the first SIGINT or SIGTERM with the exit code a shell gives a program killed
/// by it (130, 143). A second signal, while the temporaries are being removed, kills the
/// program as usual.
fn interrupted() -> anyhow::Result<impl std::future::Future<Output = u8>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        // Tokio's handlers stay installed for the life of the process, so without this a
        // second Ctrl-C would do nothing while a large NAR finishes compressing.
        #[allow(unsafe_code)]
        // SAFETY: signal(2) with SIG_DFL only sets the disposition back to the default; no
        // handler of ours runs. Tokio's handler is then no longer called, which it tolerates
        // (it just hears of no more signals; nothing waits for one after this).
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
        }
        code
    })
}

pub async fn run(args: PushArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let addr = Address::parse(&args.to)?;
    let compression = match (args.compression, addr.compression) {
        (Some(a), Some(b)) if a != b => {
            bail!("--compression {a} contradicts compression={b} in the cache address")
        }
        (a, b) => a.or(b).unwrap_or(Compression::Zstd),
    };
    pipeline::validate_level(compression, args.compression_level)?;
    let filter = Filter::new(&args.exclude, args.max_nar_size).map_err(|e| {
        anyhow::anyhow!(
            "--exclude {:?} is not a valid glob: {}",
            e.pattern,
            e.message
        )
    })?;

    let mut key_files = args.key_files.clone();
    key_files.extend(addr.secret_key.clone());
    let keys = key_files
        .iter()
        .map(|f| super::read_key(f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if keys.is_empty() && !args.no_sign {
        bail!(
            "no signing key: give --key-file FILE (or NIXPUSH_KEY_FILE), or --no-sign to publish unsigned paths on purpose"
        );
    }

    let mut raw: Vec<String> = args.paths.iter().filter(|p| *p != "-").cloned().collect();
    if args.stdin || args.paths.iter().any(|p| p == "-") {
        let text = tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin()))
            .await?
            .context("cannot read paths from standard input")?;
        raw.extend(text.split_whitespace().map(str::to_owned));
    }
    if raw.is_empty() {
        bail!("no paths to push (give store paths as arguments, or --stdin)");
    }

    let store = NixStore::open().await?;
    let sd = store.store_dir().clone();
    // A `.drv` stands for itself and its built outputs, as with nix-push's --include-outputs.
    let mut roots = BTreeSet::new();
    for r in &raw {
        // `drv^*`: the derivation's outputs (not the `.drv`), as Nix's installables say it.
        if let Some(drv) = r.strip_suffix("^*") {
            let path = resolve(&sd, drv)?;
            if !path.is_derivation() {
                bail!("{r:?}: `^*` (all outputs) follows a path that is not a .drv");
            }
            roots.insert(Root::Outputs(path));
            continue;
        }
        let path = resolve(&sd, r)?;
        if path.is_derivation() {
            roots.insert(Root::Outputs(path.clone()));
        }
        roots.insert(Root::Path(path));
    }
    let roots: Vec<Root> = roots.into_iter().collect();

    let backend = nixpush_backends::open(&addr.backend).await?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match addr.parallel_compression {
        Some(false) => 1,
        _ => cpus as u32,
    };
    let opts = PushOptions {
        compress: CompressOptions {
            compression,
            level: args.compression_level,
            threads,
        },
        jobs: args.jobs.unwrap_or(cpus).max(1),
        force: args.force,
        keys,
        skip_signed_by: args.skip_signed_by.clone(),
        logs: args.logs,
        nar_listing: addr.write_nar_listing.unwrap_or(false),
        filter,
        no_closure: args.no_closure,
    };
    let progress = Progress::new(sd.clone());
    let pusher = Pusher::new(Arc::new(store), backend.clone(), opts);
    let roots = pusher.resolve(&roots).await?;
    // On SIGINT or SIGTERM, stop: the push is dropped here, and the runtime's shutdown (when
    // `run` returns) drops its tasks and waits for the compressions under way, so every staged
    // temporary file (a `TempPath`) is removed. What was published is complete, as always.
    let interrupted = interrupted()?;
    let summary = tokio::select! {
        s = pusher.push(&roots, progress.sink()) => s,
        code = interrupted => {
            progress.finish();
            eprintln!(
                "nixpush: interrupted; stopping and removing temporary files (what was \
                 published is complete; push again to go on)"
            );
            return Ok(ExitCode::from(code));
        }
    };
    progress.finish();
    let s = summary?;

    let secs = started.elapsed().as_secs_f64();
    let mut line = if s.published == 0
        && s.failed.is_empty()
        && s.raced == 0
        && s.excluded.is_empty()
    {
        let what = match roots.len() {
            1 => "that path and its closure".to_owned(),
            n => format!("all {n} paths and their closures"),
        };
        format!("nothing to push: {} already has {what}", backend.describe())
    } else {
        format!(
            "pushed {} {} to {} ({} NAR, {} {compression}) in {secs:.1}s, {}/s; {} already there",
            s.published,
            if s.published == 1 { "path" } else { "paths" },
            backend.describe(),
            HumanBytes(s.nar_bytes),
            HumanBytes(s.file_bytes),
            HumanBytes((s.nar_bytes as f64 / secs.max(1e-3)) as u64),
            s.present + s.raced,
        )
    };
    if s.upstream > 0 {
        line.push_str(&format!("; {} skipped as signed upstream", s.upstream));
    }
    if args.logs {
        line.push_str(&format!(
            "; {} build log{}",
            s.logs,
            if s.logs == 1 { "" } else { "s" }
        ));
    }
    if s.realisations > 0 {
        line.push_str(&format!("; {} realisations", s.realisations));
    }
    if !s.excluded.is_empty() {
        line.push_str(&format!("; {} left out by the filters", s.excluded.len()));
    }
    if !s.failed.is_empty() {
        line.push_str(&format!("; {} FAILED", s.failed.len()));
    }
    let display = |p: &StorePath| sd.display(p);
    for (path, why) in &s.excluded {
        let why = filter::Explained {
            why,
            display: &display,
        };
        eprintln!("left out {}: {why}", sd.display(path));
    }
    eprintln!("{line}");
    // A log that could not be published leaves the paths published: a warning, not a failure.
    for why in &s.warnings {
        eprintln!("nixpush: warning: {why}");
    }
    if s.failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &s.failed {
            eprintln!("nixpush: error: {}: {}", sd.display(&f.path), f.error);
        }
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(
            normalize(Path::new("/nix/store/../etc/./x")),
            Path::new("/nix/etc/x")
        );
    }
}
