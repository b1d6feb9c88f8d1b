//! Build logs, kept in the cache as Nix keeps them in a binary cache (`BinaryCacheStore::
//! addBuildLog`): the object `log/<drv base name>` holds the log's text, which
//! `nix log --store CACHE DRV` prints.
//!
//! A log is read from where the local Nix writes it, `$NIX_LOG_DIR` (default
//! `/nix/var/log/nix`) `/drvs/<first two characters of the base name>/<the rest>`, with `.bz2`
//! when Nix compressed it (`compress-build-log`, the default), and decompressed as it is staged
//! to a file: memory stays flat however long the log. The worker protocol has no operation to
//! read a log, so a store whose state is elsewhere (a chroot store) needs `NIX_LOG_DIR`.
//!
//! Which logs: those of the derivations that produced the paths a push just published. A path
//! that was substituted rather than built has no local log, and is passed over with a debug
//! line. A log is written over an existing one (as Nix does): logs of one derivation built on
//! two builders differ, and either is as good.
//!
//! Cost: one `stat` per derivation, and for each log found one staged file and one put.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use nixpush_backends::{Backend, BackendError, Body, PutMode, PutOptions};
use tracing::{debug, warn};

use crate::formats::StorePath;

/// Where Nix keeps build logs: `$NIX_LOG_DIR`, else `/nix/var/log/nix`.
fn log_dir() -> PathBuf {
    std::env::var_os("NIX_LOG_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/nix/var/log/nix"), PathBuf::from)
}

/// The local log of `drv`, and whether it is bzip2-compressed; `None` if Nix kept none.
fn find_log(dir: &Path, drv: &StorePath) -> Option<(PathBuf, bool)> {
    let base = drv.base_name();
    let (head, rest) = base.split_at(2.min(base.len()));
    let plain = dir.join("drvs").join(head).join(rest);
    let compressed = plain.with_file_name(format!("{rest}.bz2"));
    [(compressed, true), (plain, false)]
        .into_iter()
        .find(|(p, _)| p.is_file())
}

/// The object key of `drv`'s log.
pub fn log_key(drv: &StorePath) -> String {
    format!("log/{}", drv.base_name())
}

/// Why a log could not be published.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the build log {path}: {error}")]
    Read { path: String, error: io::Error },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Stage `path` (decompressed if `bz2`) in `staging`, or the system's temporary directory.
fn stage(path: &Path, bz2: bool, staging: Option<&Path>) -> io::Result<tempfile::TempPath> {
    let dir = staging.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let mut tmp = tempfile::Builder::new()
        .prefix(".nixpush-")
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)?;
    let file = fs::File::open(path)?;
    if bz2 {
        io::copy(
            &mut bzip2::read::MultiBzDecoder::new(BufReader::new(file)),
            tmp.as_file_mut(),
        )?;
    } else {
        io::copy(&mut BufReader::new(file), tmp.as_file_mut())?;
    }
    Ok(tmp.into_temp_path())
}

/// Publish the local logs of `drvs`; how many were published, and the failures (the paths'
/// publication does not depend on them).
pub async fn publish(
    backend: &dyn Backend,
    drvs: BTreeSet<StorePath>,
    display: impl Fn(&StorePath) -> String,
) -> (usize, Vec<LogError>) {
    let dir = log_dir();
    let mut published = 0;
    let mut failed = Vec::new();
    for drv in drvs {
        let name = display(&drv);
        let Some((path, bz2)) = find_log(&dir, &drv) else {
            debug!(drv = %name, "no local build log (substituted, or kept elsewhere)");
            continue;
        };
        let staging = backend.staging_dir().map(Path::to_path_buf);
        let from = path.clone();
        let staged = tokio::task::spawn_blocking(move || stage(&from, bz2, staging.as_deref()))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        let staged = match staged {
            Ok(s) => s,
            Err(error) => {
                let e = LogError::Read {
                    path: path.display().to_string(),
                    error,
                };
                warn!("{e}");
                failed.push(e);
                continue;
            }
        };
        let opts = PutOptions {
            mode: PutMode::Overwrite,
            content_type: "text/plain; charset=utf-8",
        };
        match backend.put(&log_key(&drv), Body::File(staged), opts).await {
            Ok(()) => {
                debug!(drv = %name, "build log published");
                published += 1;
            }
            Err(e) => {
                warn!(drv = %name, "cannot publish the build log: {e}");
                failed.push(e.into());
            }
        }
    }
    (published, failed)
}
