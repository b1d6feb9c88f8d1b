//! The daemon's and hook's configuration: one TOML file, `/etc/nixpush/config.toml` by default.
//!
//! Loading is one function, [`Config::load`]: read, deserialize with unknown keys refused, then
//! validate. A typo in a key or a wrong type is an error naming the key and its line, never
//! silently ignored. `config.example.toml` documents every key and is parsed by a test.
//! Secrets are never in this file: signing keys are named by path (a relative path is looked up
//! in systemd's `$CREDENTIALS_DIRECTORY`, so `LoadCredential=` works without absolute paths).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::formats::Compression;
use crate::publish::{filter, pipeline};

pub const DEFAULT_PATH: &str = "/etc/nixpush/config.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Where to publish: a cache address as for `nix copy --to`. Unset: the default, unless
    /// `[[caches]]` names several (see [`Config::caches`]).
    #[serde(default)]
    cache: Option<String>,
    /// Several caches, each with its own address and, where given, its own compression and
    /// keys; a key not given is the top level's.
    #[serde(default, rename = "caches")]
    cache_list: Vec<CacheConfig>,
    /// Secret key files to sign with.
    #[serde(default)]
    pub key_files: Vec<PathBuf>,
    /// Publish unsigned narinfos when no key is given. Must be said explicitly.
    #[serde(default)]
    pub allow_unsigned: bool,
    #[serde(default = "defaults::compression", deserialize_with = "de_compression")]
    pub compression: Compression,
    pub compression_level: Option<i32>,
    /// Paths compressed and uploaded at once; default: the number of CPUs.
    pub jobs: Option<usize>,
    /// Skip paths signed by these key names: they are available upstream.
    #[serde(default)]
    pub skip_signed_by: Vec<String>,
    /// Also publish the build logs of the derivations the daemon publishes the outputs of.
    #[serde(default)]
    pub upload_logs: bool,
    /// Also write each NAR's listing (`<hash>.ls`), as Nix's `?write-nar-listing=true` does, so
    /// that `nix store ls --store CACHE` needs no NAR; the address's own parameter wins.
    #[serde(default)]
    pub write_nar_listing: bool,
    /// Store path names to leave out, as globs (`*-source`, `*.drv`); their referrers are left
    /// out too (see [`crate::publish::filter`]).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Leave out paths whose NAR is larger than this (`4GiB`, `512MiB`, or bytes), and their
    /// referrers.
    #[serde(default, deserialize_with = "de_size")]
    pub max_nar_size: Option<u64>,
    #[serde(default = "defaults::socket")]
    pub socket: PathBuf,
    #[serde(default = "defaults::queue_dir")]
    pub queue_dir: PathBuf,
    /// A tracing EnvFilter directive, e.g. `info` or `nixpush=debug`.
    #[serde(default = "defaults::log_level")]
    pub log_level: String,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub hook: HookConfig,
}

/// One entry of `[[caches]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CacheConfig {
    /// A short name for logs, `status` and metrics; default: the address.
    pub name: Option<String>,
    pub cache: String,
    #[serde(default, deserialize_with = "de_some_compression")]
    pub compression: Option<Compression>,
    pub compression_level: Option<i32>,
    pub key_files: Option<Vec<PathBuf>>,
    pub allow_unsigned: Option<bool>,
    pub write_nar_listing: Option<bool>,
    pub upload_logs: Option<bool>,
}

/// One cache to publish to, with the top level's keys filled in where its entry has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheTarget {
    /// For logs, `status` and metrics: the entry's name, else its address.
    pub name: String,
    pub cache: String,
    pub compression: Compression,
    pub compression_level: Option<i32>,
    pub key_files: Vec<PathBuf>,
    pub allow_unsigned: bool,
    pub write_nar_listing: bool,
    pub upload_logs: bool,
}

/// A command that works on one cache was given a config that names several.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the config names {} caches ({}); say which one on the command line",
    .0.len(),
    .0.join(", ")
)]
pub struct SeveralCaches(pub Vec<String>);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DaemonConfig {
    /// Seconds between full rescans of the queue directory (the watcher only nudges).
    #[serde(default = "defaults::rescan_secs")]
    pub rescan_interval_secs: u64,
    /// Queue entries published together in one batch.
    #[serde(default = "defaults::batch_entries")]
    pub batch_entries: usize,
    /// On SIGTERM, how long in-flight uploads may take to finish.
    #[serde(default = "defaults::grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Longest wait between retries of a failing upload.
    #[serde(default = "defaults::retry_max_secs")]
    pub retry_max_delay_secs: u64,
    /// Unix permissions of the socket: who may enqueue.
    #[serde(default = "defaults::socket_mode")]
    pub socket_mode: String,
    /// Also publish every path that appears in the store (substituted, added, copied), not
    /// only what the post-build-hook hands over.
    #[serde(default)]
    pub watch_store: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`), e.g. `127.0.0.1:9464`; unset: none.
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HookConfig {
    /// How long the hook waits for the daemon, in all (connect, send, acknowledgement), before
    /// writing the queue entry itself, in milliseconds.
    #[serde(default = "defaults::hook_timeout_ms")]
    pub timeout_ms: u64,
    /// Exit non-zero (and so fail the build) when a request cannot be handed over at all.
    #[serde(default)]
    pub fail_build_on_error: bool,
}

mod defaults {
    use std::path::PathBuf;

    use crate::formats::Compression;

    pub fn cache() -> String {
        "file:///var/cache/nixpush".into()
    }
    pub fn compression() -> Compression {
        Compression::Zstd
    }
    pub fn socket() -> PathBuf {
        "/run/nixpush/nixpush.sock".into()
    }
    pub fn queue_dir() -> PathBuf {
        "/var/lib/nixpush/queue".into()
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn rescan_secs() -> u64 {
        30
    }
    pub fn batch_entries() -> usize {
        256
    }
    pub fn grace_secs() -> u64 {
        30
    }
    pub fn retry_max_secs() -> u64 {
        300
    }
    pub fn socket_mode() -> String {
        "0660".into()
    }
    pub fn hook_timeout_ms() -> u64 {
        1000
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl Default for HookConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn de_compression<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Compression, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_some_compression<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Compression>, D::Error> {
    de_compression(d).map(Some)
}

/// A size as a number of bytes or a string with a unit (`"4GiB"`).
fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a size: a byte count, or a string such as \"4GiB\"")
    })? {
        Size::Bytes(n) => Ok(Some(n)),
        Size::Text(t) => filter::parse_size(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// A signing key named by `key-files`, where it is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    /// The full path to read.
    pub path: PathBuf,
    /// For a relative entry, how it was resolved (for messages), e.g.
    /// `"signing-key" next to the config file`.
    pub relative_to: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is part of the message and not also the `source()`, so that a report that
    /// prints the chain of causes (`{:#}` of anyhow) shows it once.
    #[error("cannot read config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// `daemon.metrics-listen` is not an address and port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an IP address and port like \"127.0.0.1:9464\" or \"[::1]:9464\" \
     (a host name is not looked up; port 0 picks a free one)"
)]
pub struct BadListenAddress(pub String);

/// `daemon.socket-mode` is not a permission mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an octal mode like \"0660\"")]
pub struct BadSocketMode(pub String);

/// For serde's ``unknown field `compresion`, expected one of `cache`, ...``: the expected key
/// closest to the unknown one, if it is close enough to be the one meant (at most two edits,
/// and fewer than half its letters).
fn did_you_mean(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected")?.1;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (edit_distance(unknown, k), k))
        .filter(|&(d, _)| d <= 2 && d * 2 < unknown.len().max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

impl Config {
    /// Read and validate `path`. With `must_exist` false, a missing file means the defaults.
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => String::new(),
            Err(error) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    error,
                });
            }
        };
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg = Self::parse_unchecked(path, text)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Read without the daemon's checks: for the hook and `status`, which need only the socket
    /// and queue paths and must work whatever else the file says.
    pub fn load_unchecked(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse_unchecked(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(ConfigError::Read {
                path: path.to_owned(),
                error,
            }),
        }
    }

    fn parse_unchecked(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let mut message = e.to_string().trim_end().to_owned();
            if let Some(hint) = did_you_mean(e.message()) {
                message.push_str(&format!("\ndid you mean `{hint}`?"));
            }
            ConfigError::Parse {
                path: path.to_owned(),
                message,
            }
        })
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        if self.cache.is_some() && !self.cache_list.is_empty() {
            return Err(invalid(
                "caches",
                "give either `cache` or `[[caches]]`, not both (move the top-level address \
                 into a `[[caches]]` entry)"
                    .into(),
            ));
        }
        let targets = self.caches();
        let mut names = std::collections::BTreeSet::new();
        for t in &targets {
            let several = targets.len() > 1;
            let key =
                |k: &'static str, several_k: &'static str| if several { several_k } else { k };
            pipeline::validate_level(t.compression, t.compression_level).map_err(|e| {
                invalid(
                    key("compression-level", "caches.compression-level"),
                    format!("{}{e}", prefix(several, &t.name)),
                )
            })?;
            if t.key_files.is_empty() && !t.allow_unsigned {
                return Err(invalid(
                    key("key-files", "caches.key-files"),
                    format!(
                        "{}no signing key: name one, or set allow-unsigned = true to publish \
                         unsigned paths on purpose",
                        prefix(several, &t.name)
                    ),
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(invalid(
                    "caches.name",
                    format!(
                        "{:?} names two caches; give each entry a name of its own",
                        t.name
                    ),
                ));
            }
        }
        if self.jobs == Some(0) {
            return Err(invalid("jobs", "must be at least 1".into()));
        }
        if self.daemon.batch_entries == 0 {
            return Err(invalid("daemon.batch-entries", "must be at least 1".into()));
        }
        if self.daemon.rescan_interval_secs == 0 {
            return Err(invalid(
                "daemon.rescan-interval-secs",
                "must be at least 1".into(),
            ));
        }
        self.socket_mode()
            .map_err(|e| invalid("daemon.socket-mode", e.to_string()))?;
        self.metrics_listen()
            .map_err(|e| invalid("daemon.metrics-listen", e.to_string()))?;
        self.filter()
            .map_err(|e| invalid("exclude", e.to_string()))?;
        if !self.queue_dir.is_absolute() {
            return Err(invalid("queue-dir", "must be an absolute path".into()));
        }
        if !self.socket.is_absolute() {
            return Err(invalid("socket", "must be an absolute path".into()));
        }
        Ok(())
    }

    /// The caches to publish to: the `[[caches]]` entries, or the one the top level names.
    pub fn caches(&self) -> Vec<CacheTarget> {
        if self.cache_list.is_empty() {
            let cache = self.cache.clone().unwrap_or_else(defaults::cache);
            return vec![CacheTarget {
                name: cache.clone(),
                cache,
                compression: self.compression,
                compression_level: self.compression_level,
                key_files: self.key_files.clone(),
                allow_unsigned: self.allow_unsigned,
                write_nar_listing: self.write_nar_listing,
                upload_logs: self.upload_logs,
            }];
        }
        self.cache_list
            .iter()
            .map(|c| CacheTarget {
                name: c.name.clone().unwrap_or_else(|| c.cache.clone()),
                cache: c.cache.clone(),
                compression: c.compression.unwrap_or(self.compression),
                // A level belongs to its compression: inherited only with it.
                compression_level: match (c.compression, c.compression_level) {
                    (_, Some(l)) => Some(l),
                    (None, None) => self.compression_level,
                    (Some(_), None) => None,
                },
                key_files: c
                    .key_files
                    .clone()
                    .unwrap_or_else(|| self.key_files.clone()),
                allow_unsigned: c.allow_unsigned.unwrap_or(self.allow_unsigned),
                write_nar_listing: c.write_nar_listing.unwrap_or(self.write_nar_listing),
                upload_logs: c.upload_logs.unwrap_or(self.upload_logs),
            })
            .collect()
    }

    /// The one cache the config names, for commands that work on one (`verify`, `gc`,
    /// `doctor` without an address).
    pub fn cache(&self) -> Result<String, SeveralCaches> {
        match self.caches().as_slice() {
            [one] => Ok(one.cache.clone()),
            several => Err(SeveralCaches(
                several.iter().map(|t| t.name.clone()).collect(),
            )),
        }
    }

    /// The paths to leave out, from `exclude` and `max-nar-size`.
    pub fn filter(&self) -> Result<filter::Filter, filter::PatternError> {
        filter::Filter::new(&self.exclude, self.max_nar_size)
    }

    pub fn socket_mode(&self) -> Result<u32, BadSocketMode> {
        u32::from_str_radix(&self.daemon.socket_mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| BadSocketMode(self.daemon.socket_mode.clone()))
    }

    /// Key file paths, with relative ones resolved in `$CREDENTIALS_DIRECTORY` (systemd's
    /// `LoadCredential=`), or else against the config file's directory (made absolute, so that
    /// `--config config.toml` looks next to that file, and an error can name the full path).
    pub fn resolved_key_files(&self, config_path: &Path) -> Vec<KeyFile> {
        resolve_key_files(&self.key_files, config_path)
    }

    /// Where to serve metrics, if anywhere.
    pub fn metrics_listen(&self) -> Result<Option<std::net::SocketAddr>, BadListenAddress> {
        self.daemon
            .metrics_listen
            .as_deref()
            .map(|a| a.parse().map_err(|_| BadListenAddress(a.to_owned())))
            .transpose()
    }

    pub fn rescan_interval(&self) -> Duration {
        Duration::from_secs(self.daemon.rescan_interval_secs)
    }
}

/// `name: ` before a message about one of several caches.
fn prefix(several: bool, name: &str) -> String {
    if several {
        format!("cache {name:?}: ")
    } else {
        String::new()
    }
}

impl CacheTarget {
    /// This cache's key files, resolved as [`Config::resolved_key_files`] resolves the top
    /// level's.
    pub fn resolved_key_files(&self, config_path: &Path) -> Vec<KeyFile> {
        resolve_key_files(&self.key_files, config_path)
    }
}

fn resolve_key_files(key_files: &[PathBuf], config_path: &Path) -> Vec<KeyFile> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let config_dir = std::path::absolute(config_path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    key_files
        .iter()
        .map(|k| {
            if k.is_absolute() {
                KeyFile {
                    path: k.clone(),
                    relative_to: None,
                }
            } else if let Some(dir) = &credentials {
                KeyFile {
                    path: dir.join(k),
                    relative_to: Some(format!(
                        "{:?} in $CREDENTIALS_DIRECTORY ({})",
                        k.display().to_string(),
                        dir.display()
                    )),
                }
            } else {
                KeyFile {
                    path: config_dir.join(k),
                    relative_to: Some(format!(
                        "{:?} next to the config file",
                        k.display().to_string()
                    )),
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"));
        let cfg = Config::load(p, true).unwrap();
        assert_eq!(cfg.compression, Compression::Zstd);
        assert!(!cfg.key_files.is_empty());
    }

    #[test]
    fn several_caches_inherit_what_they_leave_out() {
        let cfg = Config::parse(
            Path::new("c.toml"),
            "key-files = [\"a.key\"]\ncompression = \"xz\"\ncompression-level = 9\n\
             [[caches]]\nname = \"local\"\ncache = \"file:///srv/a\"\n\
             [[caches]]\ncache = \"s3://b\"\ncompression = \"zstd\"\n\
             key-files = [\"b.key\"]\nwrite-nar-listing = true\n",
        )
        .unwrap();
        let t = cfg.caches();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].name.as_str(), t[0].cache.as_str()),
            ("local", "file:///srv/a")
        );
        assert_eq!(
            (t[0].compression, t[0].compression_level),
            (Compression::Xz, Some(9))
        );
        assert_eq!(t[0].key_files, [PathBuf::from("a.key")]);
        assert!(!t[0].write_nar_listing);
        // Its own compression, without the top level's level (a level belongs to its codec).
        assert_eq!(t[1].name, "s3://b");
        assert_eq!(
            (t[1].compression, t[1].compression_level),
            (Compression::Zstd, None)
        );
        assert_eq!(t[1].key_files, [PathBuf::from("b.key")]);
        assert!(t[1].write_nar_listing);
        assert_eq!(
            cfg.cache().unwrap_err().to_string(),
            "the config names 2 caches (local, s3://b); say which one on the command line"
        );
        // One cache, as ever.
        let one = Config::parse(Path::new("c.toml"), "allow-unsigned = true\n").unwrap();
        assert_eq!(one.cache().unwrap(), "file:///var/cache/nixpush");
        assert_eq!(one.caches()[0].name, "file:///var/cache/nixpush");
    }

    #[test]
    fn several_caches_are_checked_each() {
        let parse = |text: &str| {
            Config::parse(Path::new("c.toml"), text)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            parse(
                "allow-unsigned = true\ncache = \"file:///a\"\n[[caches]]\ncache = \"file:///b\"\n"
            ),
            "config c.toml: caches: give either `cache` or `[[caches]]`, not both (move the \
             top-level address into a `[[caches]]` entry)"
        );
        assert_eq!(
            parse(
                "key-files = [\"a.key\"]\n[[caches]]\ncache = \"file:///a\"\n\
                 [[caches]]\nname = \"org\"\ncache = \"s3://b\"\nkey-files = []\n"
            ),
            "config c.toml: caches.key-files: cache \"org\": no signing key: name one, or set \
             allow-unsigned = true to publish unsigned paths on purpose"
        );
        assert_eq!(
            parse(
                "allow-unsigned = true\n[[caches]]\nname = \"x\"\ncache = \"file:///a\"\n\
                 [[caches]]\nname = \"x\"\ncache = \"file:///b\"\n"
            ),
            "config c.toml: caches.name: \"x\" names two caches; give each entry a name of its own"
        );
        let e = parse("allow-unsigned = true\n[[caches]]\ncache = \"file:///a\"\nkeys = []\n");
        assert!(
            e.contains("unknown field `keys`") && e.contains("line 4"),
            "{e}"
        );
        let e = parse("allow-unsigned = true\n[[caches]]\nname = \"a\"\n");
        assert!(e.contains("missing field `cache`"), "{e}");
    }

    #[test]
    fn read_error_has_its_cause_in_the_message_only() {
        let dir = tempfile::tempdir().unwrap();
        let e = Config::load(&dir.path().join("missing.toml"), true).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(
            e.to_string()
                .ends_with(": No such file or directory (os error 2)"),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::parse(
            Path::new("c.toml"),
            "allow-unsigned = true\n\ncompresion = \"xz\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("compresion"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.ends_with("\ndid you mean `compression`?"), "{e}");
        // In a table too; and nothing is suggested for a key unlike any.
        let e = Config::parse(
            Path::new("c.toml"),
            "allow-unsigned = true\n[hook]\ntimeout-msec = 5\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.ends_with("did you mean `timeout-ms`?"), "{e}");
        let e = Config::parse(Path::new("c.toml"), "allow-unsigned = true\nzzz = 1\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("did you mean"), "{e}");
    }

    #[test]
    fn wrong_type_and_values() {
        let e = Config::parse(
            Path::new("c.toml"),
            "allow-unsigned = true\njobs = \"two\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("jobs") && e.contains("line 2"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "allow-unsigned = true\ncompression = \"lz4\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lz4"), "{e}");
        let e = Config::parse(Path::new("c.toml"), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key-files"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "allow-unsigned = true\n[daemon]\nsocket-mode = \"999\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("socket-mode"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "allow-unsigned = true\n[daemon]\nmetrics-listen = \"localhost:9464\"\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "config c.toml: daemon.metrics-listen: \"localhost:9464\" is not an IP address and \
             port like \"127.0.0.1:9464\" or \"[::1]:9464\" (a host name is not looked up; port \
             0 picks a free one)"
        );
        let cfg = Config::parse(
            Path::new("c.toml"),
            "allow-unsigned = true\n[daemon]\nmetrics-listen = \"[::1]:9464\"\n",
        )
        .unwrap();
        assert_eq!(
            cfg.metrics_listen().unwrap(),
            Some("[::1]:9464".parse().unwrap())
        );
        assert_eq!(Config::default().metrics_listen().unwrap(), None);
    }
}
