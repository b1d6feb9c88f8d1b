//! What we ask the local Nix store: its directory, which paths are valid, the outputs of
//! derivations, and the closure of a set of paths with everything a narinfo needs (NarHash,
//! NarSize, references, deriver, signatures, content address).
//!
//! # Mechanism
//! We run Nix's own command-line tools, a fixed handful of processes per push whatever the
//! closure size: `nix path-info --json --recursive` answers for a whole closure at once. The
//! alternatives were reading Nix's SQLite database directly, which works only for a local
//! single-user store and breaks whenever Nix changes its schema, and speaking the nix-daemon
//! wire protocol, which is a large surface to track across Nix versions. The tools go wherever
//! Nix itself goes: a single-user store, a nix-daemon (`NIX_REMOTE=daemon`), `--store` settings
//! in `NIX_CONFIG`, and every Nix from 2.8 on. The JSON differs between versions (an array or an
//! object keyed by path, NarHash in nixbase32 or SRI), and the parser takes all of them.
//!
//! Nix 2.8 treats a `.drv` argument to `nix path-info` as "the outputs of this derivation" and
//! would try to build them, so derivations are queried with `--derivation` in a call of their
//! own, and their outputs are listed with `nix-store --query --outputs` (a pure query).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::process::Stdio;

use serde::Deserialize;
use tokio::process::Command;

use crate::formats::{Sha256, StoreDir, StorePath};

/// Paths per process: keeps every command line far below the kernel's argument limit.
const ARGS_PER_CALL: usize = 2000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted, may include the path itself.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot run {program}: {source} (is Nix installed and on PATH?)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("unexpected output from `{command}`: {message}")]
    Parse { command: String, message: String },
    #[error("not valid in the Nix store (not built, or garbage-collected): {}", .0.join(", "))]
    Invalid(Vec<String>),
}

/// A handle on the local Nix store.
#[derive(Debug, Clone)]
pub struct Store {
    store_dir: StoreDir,
}

impl Store {
    /// Ask Nix for its store directory.
    pub async fn open() -> Result<Self, StoreError> {
        let args = ["eval", "--raw", "--expr", "builtins.storeDir"];
        let out = run("nix", &with_features(&args)).await?;
        let dir = String::from_utf8_lossy(&out);
        let store_dir = StoreDir::new(dir.trim()).map_err(|e| StoreError::Parse {
            command: "nix eval builtins.storeDir".into(),
            message: e.to_string(),
        })?;
        Ok(Self { store_dir })
    }

    pub fn with_store_dir(store_dir: StoreDir) -> Self {
        Self { store_dir }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn full(&self, paths: &[StorePath]) -> Vec<String> {
        paths.iter().map(|p| self.store_dir.display(p)).collect()
    }

    /// The paths among `paths` that are not valid in the store.
    pub async fn invalid_paths(&self, paths: &[StorePath]) -> Result<Vec<StorePath>, StoreError> {
        let mut invalid = Vec::new();
        for chunk in paths.chunks(ARGS_PER_CALL) {
            let mut args = vec!["--check-validity".to_owned(), "--print-invalid".to_owned()];
            args.extend(self.full(chunk));
            let out = run("nix-store", &args).await?;
            invalid.extend(self.parse_lines("nix-store --check-validity", &out)?);
        }
        Ok(invalid)
    }

    /// Every output path of the given derivations, built or not.
    pub async fn derivation_outputs(
        &self,
        drvs: &[StorePath],
    ) -> Result<Vec<StorePath>, StoreError> {
        let mut outs = Vec::new();
        for chunk in drvs.chunks(ARGS_PER_CALL) {
            let mut args = vec!["--query".to_owned(), "--outputs".to_owned()];
            args.extend(self.full(chunk));
            let out = run("nix-store", &args).await?;
            outs.extend(self.parse_lines("nix-store --query --outputs", &out)?);
        }
        Ok(outs)
    }

    /// The closure of `roots` (all valid), with full metadata, keyed by path.
    pub async fn closure(
        &self,
        roots: &[StorePath],
    ) -> Result<BTreeMap<StorePath, PathInfo>, StoreError> {
        let (drvs, others): (Vec<_>, Vec<_>) =
            roots.iter().cloned().partition(StorePath::is_derivation);
        let mut all = BTreeMap::new();
        for (set, derivation) in [(drvs, true), (others, false)] {
            for chunk in set.chunks(ARGS_PER_CALL) {
                let mut args: Vec<String> = with_features(&["path-info", "--json", "--recursive"]);
                if derivation {
                    args.push("--derivation".into());
                }
                args.extend(self.full(chunk));
                let out = run("nix", &args).await?;
                for info in self.parse_path_info(&out)? {
                    all.insert(info.path.clone(), info);
                }
            }
        }
        Ok(all)
    }

    fn parse_lines(&self, command: &str, out: &[u8]) -> Result<Vec<StorePath>, StoreError> {
        String::from_utf8_lossy(out)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                self.store_dir.parse(l).map_err(|e| StoreError::Parse {
                    command: command.into(),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Parse `nix path-info --json` from any Nix version: a list of objects with a `path`, or an
    /// object keyed by path (Nix ≥ 2.19, `null` for invalid paths).
    pub fn parse_path_info(&self, json: &[u8]) -> Result<Vec<PathInfo>, StoreError> {
        let perr = |message: String| StoreError::Parse {
            command: "nix path-info --json".into(),
            message,
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Raw {
            path: Option<String>,
            valid: Option<bool>,
            nar_hash: Option<String>,
            nar_size: Option<u64>,
            #[serde(default)]
            references: Vec<String>,
            deriver: Option<String>,
            #[serde(default)]
            signatures: Vec<String>,
            ca: Option<serde_json::Value>,
        }
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| perr(e.to_string()))?;
        let raws: Vec<(Option<String>, Option<Raw>)> = match value {
            serde_json::Value::Array(items) => items
                .into_iter()
                .map(|v| Ok((None, Some(serde_json::from_value(v)?))))
                .collect::<Result<_, serde_json::Error>>()
                .map_err(|e| perr(e.to_string()))?,
            serde_json::Value::Object(map) => map
                .into_iter()
                .map(|(k, v)| Ok((Some(k), serde_json::from_value(v)?)))
                .collect::<Result<_, serde_json::Error>>()
                .map_err(|e| perr(e.to_string()))?,
            _ => return Err(perr("expected a JSON array or object".into())),
        };
        let mut invalid = Vec::new();
        let mut infos = Vec::with_capacity(raws.len());
        for (key, raw) in raws {
            let path_str = key
                .or_else(|| raw.as_ref().and_then(|r| r.path.clone()))
                .ok_or_else(|| perr("an entry has no path".into()))?;
            let raw = match raw {
                Some(r) if r.valid != Some(false) => r,
                _ => {
                    invalid.push(path_str);
                    continue;
                }
            };
            let parse = |p: &str| self.store_dir.parse(p).map_err(|e| perr(e.to_string()));
            let path = parse(&path_str)?;
            let nar_hash = raw
                .nar_hash
                .as_deref()
                .ok_or_else(|| perr(format!("{path_str}: no narHash")))
                .and_then(|h| Sha256::parse(h).map_err(|e| perr(e.to_string())))?;
            let nar_size = raw
                .nar_size
                .ok_or_else(|| perr(format!("{path_str}: no narSize")))?;
            let mut references = raw
                .references
                .iter()
                .map(|r| parse(r))
                .collect::<Result<Vec<_>, _>>()?;
            references.sort();
            let deriver = raw.deriver.as_deref().map(parse).transpose()?;
            // Newer Nix prints `ca` as a structured object; only the string form maps onto a
            // narinfo's CA line, so keep that and refuse to guess at the rest.
            let ca = match raw.ca {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s),
                Some(other) => {
                    return Err(perr(format!("{path_str}: unsupported ca format {other}")))
                }
            };
            infos.push(PathInfo {
                path,
                nar_hash,
                nar_size,
                references,
                deriver,
                sigs: raw.signatures,
                ca,
            });
        }
        if !invalid.is_empty() {
            return Err(StoreError::Invalid(invalid));
        }
        Ok(infos)
    }
}

fn with_features(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    // `nix` subcommands are experimental in older Nix; this is harmless where they are not.
    v.splice(
        1..1,
        [
            "--extra-experimental-features".to_owned(),
            "nix-command".to_owned(),
        ],
    );
    v
}

async fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Vec<u8>, StoreError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| StoreError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if !out.status.success() {
        let mut command = program.to_owned();
        for a in args.iter().take(4) {
            command.push(' ');
            command.push_str(&a.as_ref().to_string_lossy());
        }
        if args.len() > 4 {
            command.push_str(" …");
        }
        return Err(StoreError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::with_store_dir(StoreDir::new("/nix/store").unwrap())
    }

    #[test]
    fn parses_nix_2_8_array() {
        let json = include_bytes!("../tests/fixtures/top.path-info.json");
        let infos = store().parse_path_info(json).unwrap();
        assert_eq!(infos.len(), 1);
        let i = &infos[0];
        assert_eq!(i.path.name(), "fixture-top");
        assert_eq!(i.nar_size, 344);
        assert_eq!(
            i.nar_hash.to_nix_string(),
            "sha256:1jbpwr0jydfjmw53sgqzs5p4fsf0yn3vfnfrvq4gslxjik7d5qd5"
        );
        assert_eq!(i.references.len(), 1);
        assert!(i.deriver.as_ref().unwrap().is_derivation());
    }

    #[test]
    fn parses_keyed_object_and_reports_invalid() {
        let json = br#"{"/nix/store/17ifnvpprbb5dv14hkvyddslzx15i6sz-fixture-top":{"narHash":"sha256-peHSzoyyU/0I3tlZt4f1wGlHbtEfPz0Kr9I1L0Hmd8k=","narSize":344,"references":[],"signatures":["k:x"],"ca":null}}"#;
        let infos = store().parse_path_info(json).unwrap();
        assert_eq!(infos[0].sigs, vec!["k:x".to_owned()]);
        let bad = br#"{"/nix/store/17ifnvpprbb5dv14hkvyddslzx15i6sz-fixture-top":null}"#;
        assert!(matches!(
            store().parse_path_info(bad),
            Err(StoreError::Invalid(_))
        ));
        assert!(store().parse_path_info(b"[1]").is_err());
    }
}
