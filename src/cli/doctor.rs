//! `nixpush doctor`: one line per thing a working set-up needs, each failure with its fix.
//!
//! In order: the config parses; each key file is readable, a secret key (not the public
//! half) and not open to other users; the `trusted-public-keys` entry clients need; the Nix
//! store answers; the cache answers and accepts a write (a probe object, deleted again); its
//! `nix-cache-info` has the local store directory; nix.conf's `post-build-hook` runs an
//! existing `nixpush-hook` that reads the same config; the daemon answers on its socket; the
//! queue directory is writable. The exit status is non-zero if any line failed. A config that
//! does not parse stops the checks there, since every other line depends on it.
//!
//! nix.conf is `--nix-conf FILE`, else `$NIX_CONF_DIR/nix.conf`, else `/etc/nix/nix.conf`,
//! with its `include` and `!include` lines followed, as Nix reads it (the last assignment
//! wins).

use std::fmt::Display;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use nixpush::address::Address;
use nixpush::config::{Config, ConfigError, DEFAULT_PATH, KeyFile};
use nixpush::formats::cache_info::{self, CacheInfo};
use nixpush::formats::signing::{KeyError, SecretKey};
use nixpush::store::{NixStore, Store as _};
use nixpush_backends::{
    Backend, BackendError, BackendExt as _, Body, ErrorKind, PutMode, PutOptions,
};

use super::ConfigArg;
use super::status::StatusError;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Each line is `ok` or `FAIL`, and a failure says how to fix it. The exit status is 1 if any
check failed.

Examples:
  Check the system's set-up (the config, keys and nix.conf are root's to read):
    sudo nixpush doctor

  Check another config and the nix.conf it is meant for:
    nixpush doctor --config ./config.toml --nix-conf ./nix.conf")]
pub struct DoctorArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The nix.conf whose post-build-hook to check [default: $NIX_CONF_DIR/nix.conf, else
    /// /etc/nix/nix.conf].
    #[arg(long, value_name = "FILE")]
    nix_conf: Option<PathBuf>,
}

/// How long one request to the cache may take.
const CACHE_TIMEOUT: Duration = Duration::from_secs(30);

/// The lines printed so far, and how many failed.
#[derive(Default)]
struct Report {
    checks: usize,
    failed: usize,
}

impl Report {
    fn ok(&mut self, what: impl Display) -> anyhow::Result<()> {
        self.checks += 1;
        super::print_stdout(&format!("ok    {what}\n"))
    }

    fn fail(&mut self, what: impl Display, fix: impl Display) -> anyhow::Result<()> {
        self.checks += 1;
        self.failed += 1;
        // A message of several lines (a config error with its hint) stays indented under it.
        let what = what.to_string().replace('\n', "\n      ");
        super::print_stdout(&format!("FAIL  {what}\n      fix: {fix}\n"))
    }

    fn finish(self) -> anyhow::Result<ExitCode> {
        if self.failed == 0 {
            super::print_stdout(&format!("all {} checks passed\n", self.checks))?;
            Ok(ExitCode::SUCCESS)
        } else {
            super::print_stdout(&format!(
                "{} of {} checks failed\n",
                self.failed, self.checks
            ))?;
            Ok(ExitCode::FAILURE)
        }
    }
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut r = Report::default();
    let (path, _) = args.config.path();
    let path = std::path::absolute(&path).unwrap_or(path);

    // 1. The config: everything else depends on it.
    let cfg = match Config::load(&path, true) {
        Ok(cfg) => {
            r.ok(format!("config {} parses", path.display()))?;
            cfg
        }
        Err(e) => {
            let fix = match &e {
                ConfigError::Read { error, .. } if error.kind() == std::io::ErrorKind::NotFound => {
                    "write it (config.example.toml documents every key), or name another with \
                     --config or NIXPUSH_CONFIG"
                }
                ConfigError::Read { .. } => "make it readable by the user who runs nixpush",
                ConfigError::Parse { .. } | ConfigError::Invalid { .. } => {
                    "correct the key named above (config.example.toml documents every key)"
                }
            };
            r.fail(e, fix)?;
            return r.finish();
        }
    };
    let targets = cfg.caches();
    let addrs: Vec<_> = targets.iter().map(|t| Address::parse(&t.cache)).collect();

    // 2. The keys, and what clients need to trust them: each cache's.
    for (t, addr) in targets.iter().zip(&addrs) {
        let mut keys: Vec<KeyFile> = t.resolved_key_files(&path);
        if let Ok(Some(k)) = addr.as_ref().map(|a| a.secret_key.clone()) {
            keys.push(KeyFile {
                path: k,
                relative_to: Some("secret-key= in the cache address".into()),
            });
        }
        if keys.is_empty() {
            r.ok(format!(
                "{}no signing key: narinfos are published unsigned (allow-unsigned = true); \
                 clients need another signature or require-sigs = false",
                of_cache(&targets, t)
            ))?;
        }
        for k in &keys {
            check_key(&mut r, k)?;
        }
    }

    // 3. The local store, whose directory the cache must be for.
    let store_dir = match NixStore::open().await {
        Ok(store) => {
            let dir = store.store_dir().as_str().to_owned();
            r.ok(format!("the Nix store {dir} answers"))?;
            Some(dir)
        }
        Err(e) => {
            r.fail(
                format!("cannot ask the Nix store: {e}"),
                "check that Nix works for this user (`nix-store --version`, `nix store ping`); \
                 where a nix-daemon serves the store, that it runs (systemctl status \
                 nix-daemon)",
            )?;
            None
        }
    };

    // 4. Each cache: answers, accepts a write, is for this store.
    let fix = if targets.len() > 1 {
        "correct this `cache` in the config's [[caches]]"
    } else {
        "correct `cache` in the config"
    };
    for addr in &addrs {
        match addr {
            Err(e) => r.fail(e, fix)?,
            Ok(addr) => match nixpush_backends::open(&addr.backend).await {
                Err(e) => r.fail(e, fix)?,
                Ok(backend) => {
                    if probe_cache(&mut r, &*backend).await? {
                        check_cache_info(&mut r, &*backend, store_dir.as_deref()).await?;
                    }
                }
            },
        }
    }

    // 5. Nix runs the hook, and the hook reads this config.
    check_hook(&mut r, &path, args.nix_conf)?;

    // 6. The daemon.
    match super::status::ask(&cfg.socket) {
        Ok(st) => r.ok(format!(
            "the daemon answers on {} ({} queued, cache {})",
            cfg.socket.display(),
            st.queue_depth,
            st.cache
        ))?,
        Err(e) => {
            let start = format!(
                "start it: `systemctl start nixpush.service`, or `nixpush daemon --config {}`",
                path.display()
            );
            match e {
                // Its own message says how to start it; here the fix line does.
                StatusError::NotRunning { socket, error } => r.fail(
                    format!(
                        "the daemon is not running at {} ({error})",
                        socket.display()
                    ),
                    start,
                )?,
                e => r.fail(e, start)?,
            }
        }
    }

    // 7. The queue directory, where the hook writes when the daemon is away.
    check_queue_dir(&mut r, &cfg.queue_dir)?;

    r.finish()
}

/// `cache NAME: ` where the config names several caches, else nothing.
fn of_cache(targets: &[nixpush::config::CacheTarget], t: &nixpush::config::CacheTarget) -> String {
    if targets.len() > 1 {
        format!("cache {}: ", t.name)
    } else {
        String::new()
    }
}

fn check_key(r: &mut Report, k: &KeyFile) -> anyhow::Result<()> {
    let p = k.path.display();
    let named = match &k.relative_to {
        Some(how) => format!("key file {p} (key-files: {how})"),
        None => format!("key file {p}"),
    };
    let text = match std::fs::read_to_string(&k.path) {
        Ok(t) => t,
        Err(e) => {
            let fix = match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "make a key pair with `nixpush keygen NAME {p} {p}.pub`, or correct \
                     key-files"
                ),
                std::io::ErrorKind::PermissionDenied => format!(
                    "run this check as root, or as the user who owns it; under systemd, \
                     LoadCredential= hands the service a copy of a root-owned `chmod 600 {p}`"
                ),
                _ => "see the error above".to_owned(),
            };
            return r.fail(format!("{named}: cannot read it: {e}"), fix);
        }
    };
    let key = match SecretKey::parse(&text) {
        Ok(key) => key,
        Err(e) => {
            let fix = match e {
                KeyError::PublicNotSecret { .. } => {
                    "name the secret file of the pair in key-files; the public one goes into \
                     clients' trusted-public-keys"
                }
                _ => {
                    "name a secret key made by `nixpush keygen` or `nix-store \
                     --generate-binary-cache-key`"
                }
            };
            return r.fail(format!("{named}: {e}"), fix);
        }
    };
    let mode = std::fs::metadata(&k.path).map_or(0, |m| m.permissions().mode() & 0o777);
    if mode & 0o077 != 0 {
        return r.fail(
            format!(
                "{named}: other users can read or change this secret key (mode {mode:04o}); \
                 anyone who reads it can sign as this cache"
            ),
            format!("chmod 600 {p}"),
        );
    }
    r.ok(format!(
        "{named}: secret key {:?}, for its owner only (mode {mode:04o})",
        key.name()
    ))?;
    r.ok(format!(
        "clients' nix.conf needs: trusted-public-keys = {}",
        key.public().to_file_string().trim()
    ))
}

/// Write, read back and delete a probe object; whether the cache answered all three.
async fn probe_cache(r: &mut Report, backend: &dyn Backend) -> anyhow::Result<bool> {
    let cache = backend.describe();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let key = format!("nixpush-doctor-probe-{}-{nanos}", std::process::id());
    let body = Bytes::from_static(b"written by nixpush doctor, and deleted again\n");
    let opts = PutOptions {
        mode: PutMode::Create,
        content_type: "text/plain",
    };
    let written = timed(
        "put",
        &key,
        backend.put(&key, Body::Bytes(body.clone()), opts),
    )
    .await;
    if let Err(e) = written {
        r.fail(
            format!("cache {cache} does not accept a write: {e}"),
            cache_fix(&e),
        )?;
        return Ok(false);
    }
    let read = timed("get", &key, backend.get_bytes(&key, 1 << 10)).await;
    let deleted = timed("delete", &key, backend.delete(&key)).await;
    match (read, deleted) {
        (Ok(b), Ok(())) if b == body => {
            r.ok(format!(
                "the cache {cache} answers and accepts a write (a probe object, deleted again)"
            ))?;
            Ok(true)
        }
        (Ok(_), Ok(())) => {
            r.fail(
                format!("cache {cache}: the probe object read back is not what was written"),
                "check what serves the cache (a proxy or a web server rewriting objects?)",
            )?;
            Ok(false)
        }
        (Err(e), _) => {
            r.fail(
                format!("cache {cache} accepted a write but cannot read it back: {e}"),
                cache_fix(&e),
            )?;
            Ok(false)
        }
        (_, Err(e)) => {
            r.fail(
                format!("cache {cache}: cannot delete the probe object {key:?}: {e}"),
                format!("delete {key:?} from the cache by hand; {}", cache_fix(&e)),
            )?;
            Ok(false)
        }
    }
}

async fn check_cache_info(
    r: &mut Report,
    backend: &dyn Backend,
    ours: Option<&str>,
) -> anyhow::Result<()> {
    let cache = backend.describe();
    let info = match timed(
        "get",
        cache_info::FILE_NAME,
        backend.get_optional(cache_info::FILE_NAME, 64 << 10),
    )
    .await
    {
        Ok(Some(bytes)) => CacheInfo::parse(&String::from_utf8_lossy(&bytes)),
        Ok(None) => {
            return r.ok(format!(
                "the cache has no nix-cache-info yet: the first push writes it{}",
                ours.map(|d| format!(" (StoreDir: {d})"))
                    .unwrap_or_default()
            ));
        }
        Err(e) => {
            return r.fail(
                format!("cache {cache}: cannot read nix-cache-info: {e}"),
                cache_fix(&e),
            );
        }
    };
    let info = match info {
        Ok(i) => i,
        Err(e) => {
            return r.fail(
                format!("cache {cache}: its nix-cache-info is unreadable: {e}"),
                "rewrite it as Nix does (`StoreDir: /nix/store`), or publish to a new cache",
            );
        }
    };
    match ours {
        Some(ours) if info.store_dir != ours => r.fail(
            format!(
                "cache {cache}: its nix-cache-info has StoreDir {}, but this machine's store is \
                 {ours}: Nix here could not use what it holds",
                info.store_dir
            ),
            format!("publish to a cache made for {ours} (another address or prefix)"),
        ),
        Some(ours) => r.ok(format!("the cache's nix-cache-info has StoreDir {ours}")),
        // The store did not answer (a line said so); what the cache says is still worth saying.
        None => r.ok(format!(
            "the cache's nix-cache-info has StoreDir {}",
            info.store_dir
        )),
    }
}

/// A cache operation, with [`CACHE_TIMEOUT`] as a transient error.
async fn timed<T>(
    op: &'static str,
    key: &str,
    f: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(CACHE_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::new(
                ErrorKind::Transient,
                op,
                key,
                format!("no answer within {} s", CACHE_TIMEOUT.as_secs()),
            ))
        })
}

/// What to do about a cache that failed this way.
fn cache_fix(e: &BackendError) -> &'static str {
    match e.kind {
        ErrorKind::Transient => {
            "check that the server is up and that the address (host, port, endpoint=) is right"
        }
        ErrorKind::Permission => {
            "the credentials were refused or may not write here: check them (AWS_* or \
             profile=, credentials=, token-file=, identity=) and the bucket's or directory's \
             permissions"
        }
        ErrorKind::NotFound => {
            "the bucket or directory does not exist: create it, or correct `cache`"
        }
        ErrorKind::Config => "correct `cache` in the config",
        ErrorKind::AlreadyExists | ErrorKind::Other => "see the error above",
    }
}

/// The nix.conf to read: `--nix-conf`, else `$NIX_CONF_DIR/nix.conf`, else the system's.
fn nix_conf_path(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        std::env::var_os("NIX_CONF_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from)
            .join("nix.conf")
    })
}

/// The last value of `key` in nix.conf `file` and the files it includes, and the file that
/// set it, as Nix reads them: `key = value`, `#` comments, `include FILE` (an error if it is
/// missing) and `!include FILE` (not), relative to the including file.
fn nix_conf_setting(
    file: &Path,
    key: &str,
    depth: usize,
) -> Result<Option<(String, PathBuf)>, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mut found = None;
    for line in text.lines() {
        let line = line.split_once('#').map_or(line, |(l, _)| l).trim();
        let mut words = line.split_whitespace();
        let (first, rest) = (words.next(), words.next());
        if let (Some(inc @ ("include" | "!include")), Some(target)) = (first, rest) {
            let target = file.parent().unwrap_or(Path::new("/")).join(target);
            if depth >= 8 {
                return Err(format!("{}: includes nested too deeply", file.display()));
            }
            if inc == "!include" && !target.exists() {
                continue;
            }
            if let Some(v) = nix_conf_setting(&target, key, depth + 1)? {
                found = Some(v);
            }
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            if k.trim() == key {
                found = Some((v.trim().to_owned(), file.to_owned()));
            }
        }
    }
    Ok(found)
}

/// The nixpush-hook beside this program, or where the README installs it.
fn suggested_hook() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("nixpush-hook")))
        .filter(|h| h.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/nixpush-hook"))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

fn check_hook(r: &mut Report, config: &Path, given: Option<PathBuf>) -> anyhow::Result<()> {
    let conf = nix_conf_path(given);
    let conf = std::path::absolute(&conf).unwrap_or(conf);
    let suggested = suggested_hook();
    let (hook, file) = match nix_conf_setting(&conf, "post-build-hook", 0) {
        Err(e) => {
            return r.fail(
                format!("nix.conf: {e}"),
                format!(
                    "add `post-build-hook = {}` to the nix.conf Nix reads (or name it with \
                     --nix-conf)",
                    suggested.display()
                ),
            );
        }
        Ok(Some((v, f))) if !v.is_empty() => (PathBuf::from(v), f),
        Ok(_) => {
            return r.fail(
                format!(
                    "{} sets no post-build-hook: Nix will not hand builds to nixpush",
                    conf.display()
                ),
                format!(
                    "add `post-build-hook = {}` to {} and restart nix-daemon",
                    suggested.display(),
                    conf.display()
                ),
            );
        }
    };
    let line = format!("{}: post-build-hook = {}", file.display(), hook.display());
    if !is_executable(&hook) {
        let why = if hook.exists() {
            "is not an executable file"
        } else {
            "does not exist"
        };
        return r.fail(
            format!("{line}: {} {why}", hook.display()),
            format!(
                "install nixpush-hook there, or set post-build-hook = {}",
                suggested.display()
            ),
        );
    }
    let default_config = config == Path::new(DEFAULT_PATH);
    let real = std::fs::canonicalize(&hook).unwrap_or_else(|_| hook.clone());
    if real.file_name().is_some_and(|n| n == "nixpush-hook") {
        // nixpush-hook reads $NIXPUSH_CONFIG from Nix's environment, else the default.
        return if default_config {
            r.ok(format!("{line}: nixpush-hook, reading {DEFAULT_PATH}"))
        } else {
            r.fail(
                format!(
                    "{line}: nixpush-hook reads {DEFAULT_PATH} (unless nix-daemon's environment \
                     sets NIXPUSH_CONFIG), not {}",
                    config.display()
                ),
                format!(
                    "point post-build-hook at a script that runs `NIXPUSH_CONFIG={} exec {}`",
                    config.display(),
                    hook.display()
                ),
            )
        };
    }
    // A wrapper script: it must run nixpush-hook (or `nixpush hook`) with this config.
    let text = std::fs::read(&hook)
        .ok()
        .filter(|t| t.starts_with(b"#!") && t.len() <= 64 << 10)
        .map(|t| String::from_utf8_lossy(&t).into_owned());
    let Some(text) = text else {
        return r.fail(
            format!("{line}: {} is not nixpush-hook", hook.display()),
            format!("set post-build-hook = {}", suggested.display()),
        );
    };
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ';')
        .map(|w| w.rsplit_once('=').map_or(w, |(_, v)| v))
        .map(|w| w.trim_matches(|c| c == '\'' || c == '"'))
        .collect();
    let program = words.iter().enumerate().find_map(|(i, w)| {
        let name = Path::new(w).file_name()?.to_str()?;
        (name == "nixpush-hook" || (name == "nixpush" && words.get(i + 1) == Some(&"hook")))
            .then_some(*w)
    });
    let Some(program) = program else {
        return r.fail(
            format!(
                "{line}: the script {} runs neither nixpush-hook nor `nixpush hook`",
                hook.display()
            ),
            format!(
                "make it run `NIXPUSH_CONFIG={} exec {}`",
                config.display(),
                suggested.display()
            ),
        );
    };
    if program.starts_with('/') && !is_executable(Path::new(program)) {
        return r.fail(
            format!("{line}: the script runs {program}, which is not an executable file"),
            format!(
                "correct the script: nixpush-hook is {}",
                suggested.display()
            ),
        );
    }
    let names_config = text.contains(&*config.to_string_lossy());
    let names_another = text.contains("NIXPUSH_CONFIG") || text.contains("--config");
    if names_config || (default_config && !names_another) {
        r.ok(format!("{line}: runs {program} with {}", config.display()))
    } else {
        r.fail(
            format!(
                "{line}: the script runs {program} with another config than {}",
                config.display()
            ),
            format!(
                "make it run `NIXPUSH_CONFIG={} exec {program}`",
                config.display()
            ),
        )
    }
}

fn check_queue_dir(r: &mut Report, dir: &Path) -> anyhow::Result<()> {
    let d = dir.display();
    if !dir.exists() {
        // The daemon (or the hook) makes it; what matters is that it can.
        let parent = dir.ancestors().skip(1).find(|a| a.exists());
        return match parent {
            Some(p) if tempfile::tempfile_in(p).is_ok() => r.ok(format!(
                "the queue directory {d} does not exist yet; the daemon will make it"
            )),
            _ => r.fail(
                format!("the queue directory {d} does not exist and cannot be made"),
                format!("mkdir -p {d}, writable by the daemon's user and by root"),
            ),
        };
    }
    // A dot-file, which the queue ignores; removed when dropped.
    match tempfile::Builder::new()
        .prefix(".nixpush-doctor-")
        .suffix(".tmp")
        .tempfile_in(dir)
    {
        Ok(_) => r.ok(format!("the queue directory {d} is writable")),
        Err(e) => r.fail(
            format!("the queue directory {d} is not writable: {e}"),
            format!(
                "let the daemon's user and the hook's (root, under nix-daemon) write {d}; \
                 under systemd, StateDirectory= makes it so"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_conf_is_read_as_nix_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nix.conf");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            &conf,
            "# post-build-hook = /commented\n\
             post-build-hook = /first # a comment\n\
             include sub/more.conf\n\
             !include absent.conf\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sub/more.conf"),
            "sandbox = false\npost-build-hook=/second\n",
        )
        .unwrap();
        // The last assignment wins, in whichever file it is.
        assert_eq!(
            nix_conf_setting(&conf, "post-build-hook", 0).unwrap(),
            Some(("/second".to_owned(), dir.path().join("sub/more.conf")))
        );
        assert_eq!(nix_conf_setting(&conf, "substituters", 0).unwrap(), None);
        // `include` of a missing file is an error, as in Nix; `!include` is not.
        std::fs::write(&conf, "include absent.conf\n").unwrap();
        let e = nix_conf_setting(&conf, "post-build-hook", 0).unwrap_err();
        assert!(
            e.contains("absent.conf") && e.contains("No such file"),
            "{e}"
        );
        // An include loop ends with a message, not a stack overflow.
        std::fs::write(&conf, "include nix.conf\n").unwrap();
        let e = nix_conf_setting(&conf, "post-build-hook", 0).unwrap_err();
        assert!(e.contains("nested too deeply"), "{e}");
    }
}
