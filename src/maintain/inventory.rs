//! What a cache holds, in one listing: its narinfos, its NARs (with sizes where the store tells
//! them for free), `nix-cache-info`, and temporary files left behind.
//!
//! A local directory is read here directly (one `read_dir` of the top and of `nar/`, with each
//! entry's metadata), because `Backend::list` gives neither sizes nor the temporary files it
//! hides. Its layout is the fs backend's, which is Nix's `file://` layout: keys are paths
//! relative to the directory, temporary names start with [`TMP_PREFIX`]. Every other store is
//! asked through `Backend::list("")` (see the module doc of [`super`] for the cost). The
//! sizes `Backend::list_objects` gives (S3 and GCS listings carry them) would let those check
//! `FileSize` without `--deep`; verify does not use them yet.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nixpush_backends::fs::TMP_PREFIX;
use nixpush_backends::{Backend, BackendError, BackendExt as _, ErrorKind};

use crate::formats::cache_info;

/// A temporary file not modified for this long is stale: a live writer changes its temporary
/// file while it compresses into it and renames it right after, so one left unchanged for an
/// hour belongs to a writer that was killed. (The fs backend itself removes those older than a
/// day from `nar/` when it opens the cache.)
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// One temporary file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TempFile {
    /// Its key (relative path), e.g. `nar/.nixpush-ab12.tmp`.
    pub key: String,
    /// How long since it was last modified.
    pub age: Duration,
    pub size: u64,
}

/// A cache's objects, from one listing.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// `<hash>.narinfo` keys, sorted.
    pub narinfos: BTreeSet<String>,
    /// NAR keys (`nar/…`) and their sizes where the listing says (`None`: not known).
    pub nars: BTreeMap<String, Option<u64>>,
    pub has_cache_info: bool,
    /// Temporary files older than [`STALE_TEMP_AGE`].
    pub stale_temps: Vec<TempFile>,
    /// Temporary files younger than that: probably being written right now.
    pub live_temps: usize,
}

impl Inventory {
    fn add(&mut self, key: String, size: Option<u64>) {
        if key == cache_info::FILE_NAME {
            self.has_cache_info = true;
        } else if key.ends_with(".narinfo") && !key.contains('/') {
            self.narinfos.insert(key);
        } else if key.starts_with("nar/") {
            self.nars.insert(key, size);
        }
        // Anything else (`log/…`, `realisations/…`, `*.ls`, `debuginfo/…`) is not checked.
    }

    fn add_temp(&mut self, key: String, age: Duration, size: u64) {
        if age >= STALE_TEMP_AGE {
            self.stale_temps.push(TempFile { key, age, size });
        } else {
            self.live_temps += 1;
        }
    }
}

/// The directory of a local cache address (`file:///dir`, or a plain path), as the fs backend
/// resolves it; `None` for any other store.
pub fn local_dir(backend_addr: &str) -> Option<PathBuf> {
    let rest = match backend_addr.split_once("://") {
        Some(("file", rest)) => rest,
        Some(_) => return None,
        None => backend_addr,
    };
    let path = rest.split_once('?').map_or(rest, |(p, _)| p);
    std::path::absolute(path).ok()
}

/// List the cache: from the directory `dir` where it is local, else through the backend.
pub async fn take(backend: &dyn Backend, dir: Option<&Path>) -> Result<Inventory, BackendError> {
    match dir {
        Some(dir) => {
            let dir = dir.to_owned();
            tokio::task::spawn_blocking(move || scan_dir(&dir))
                .await
                .map_err(|e| BackendError::new(ErrorKind::Other, "list", "", e.to_string()))?
        }
        None => {
            let mut inv = Inventory::default();
            for key in backend.list("").await? {
                let name = key.rsplit('/').next().unwrap_or(&key);
                if name.starts_with(TMP_PREFIX) {
                    // Stores that show temporary names give no age through `list`.
                    inv.add_temp(key, Duration::ZERO, 0);
                } else {
                    inv.add(key, None);
                }
            }
            Ok(inv)
        }
    }
}

fn scan_dir(root: &Path) -> Result<Inventory, BackendError> {
    let mut inv = Inventory::default();
    let now = SystemTime::now();
    for (sub, prefix) in [(root.to_owned(), ""), (root.join("nar"), "nar/")] {
        let entries = match std::fs::read_dir(&sub) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !prefix.is_empty() => continue,
            Err(e) => return Err(BackendError::io("list", prefix, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| BackendError::io("list", prefix, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let key = format!("{prefix}{name}");
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Renamed or removed since the directory was read: a writer at work.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(BackendError::io("list", &key, e)),
            };
            if !meta.is_file() {
                continue;
            }
            if name.starts_with(TMP_PREFIX) {
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                inv.add_temp(key, age, meta.len());
            } else {
                inv.add(key, Some(meta.len()));
            }
        }
    }
    Ok(inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses() {
        assert_eq!(local_dir("file:///srv/c"), Some(PathBuf::from("/srv/c")));
        assert_eq!(local_dir("/srv/c"), Some(PathBuf::from("/srv/c")));
        assert_eq!(local_dir("s3://b/p"), None);
        assert_eq!(local_dir("https://h/p"), None);
        assert!(local_dir("rel").is_some_and(|p| p.is_absolute()));
    }

    #[test]
    fn a_directory_listing_sorts_objects_and_temporary_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("nar")).unwrap();
        std::fs::create_dir(d.path().join("log")).unwrap();
        std::fs::write(d.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        std::fs::write(d.path().join("a.narinfo"), "x").unwrap();
        std::fs::write(d.path().join("nar/a.nar.zst"), "12345").unwrap();
        std::fs::write(d.path().join("log/x.drv"), "").unwrap();
        let old = d.path().join("nar/.nixpush-old.tmp");
        std::fs::write(&old, "abc").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * STALE_TEMP_AGE)
            .unwrap();
        std::fs::write(d.path().join(".nixpush-new.tmp"), "").unwrap();
        let inv = scan_dir(d.path()).unwrap();
        assert!(inv.has_cache_info);
        assert_eq!(inv.narinfos, BTreeSet::from(["a.narinfo".to_owned()]));
        assert_eq!(
            inv.nars,
            BTreeMap::from([("nar/a.nar.zst".to_owned(), Some(5))])
        );
        assert_eq!(inv.stale_temps.len(), 1);
        assert_eq!(inv.stale_temps[0].key, "nar/.nixpush-old.tmp");
        assert_eq!(inv.stale_temps[0].size, 3);
        assert_eq!(inv.live_temps, 1);
    }
}
