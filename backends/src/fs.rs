//! A cache in a local directory (`file:///path`, or a plain path), laid out as Nix's own
//! `file://` store lays it out, so the directory can be served by any web server or copied
//! around as it is.
//!
//! Every object is written to a temporary file in the directory of its final key, its data
//! flushed to disk, then renamed into place (or hard-linked, for create-if-absent, which fails
//! atomically on an existing name). A reader never sees a partial object, even after a power
//! loss: an object's data is on disk before its name is. The renames themselves reach the disk
//! in the order they were made (journaling file systems commit metadata in order), so a narinfo
//! never survives a crash that its NAR did not; [`Backend::sync`] flushes the directories,
//! once per push rather than once per object, which is what made many small paths slow.
//! Temporary names start with [`TMP_PREFIX`] and are never listed.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt as _;

use crate::{Backend, BackendError, Body, ByteStream, ConfigError, ErrorKind, PutMode, PutOptions};

/// Temporary files start with this and end in `.tmp`.
pub const TMP_PREFIX: &str = ".nixpush-";

#[derive(Debug, Clone)]
pub struct FsBackend {
    root: PathBuf,
    staging: PathBuf,
    /// Directories with renames not yet flushed by [`Backend::sync`].
    dirty: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>,
}

impl FsBackend {
    /// Open (creating if needed) a cache directory.
    pub async fn new(root: PathBuf) -> Result<Self, BackendError> {
        Self::from_params(root, &[])
            .await
            .map_err(BackendError::from)
    }

    pub(crate) async fn from_params(
        root: PathBuf,
        params: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        if let Some((k, _)) = params.first() {
            return Err(format!("unknown parameter {k:?} for a local directory cache").into());
        }
        if root.as_os_str().is_empty() {
            return Err("empty directory path".into());
        }
        let root = std::path::absolute(&root)
            .map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
        let staging = root.join("nar");
        let r = root.clone();
        let s = staging.clone();
        tokio::task::spawn_blocking(move || {
            fs::create_dir_all(&s).map_err(|e| format!("cannot create {}: {e}", s.display()))?;
            let meta = fs::metadata(&r).map_err(|e| format!("{}: {e}", r.display()))?;
            if !meta.is_dir() {
                return Err(format!("{} is not a directory", r.display()));
            }
            remove_stale_temps(&s);
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok(Self {
            root,
            staging,
            dirty: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, op: &'static str, key: &str) -> Result<PathBuf, BackendError> {
        let p = Path::new(key);
        let ok = !key.is_empty()
            && !key.ends_with('/')
            && p.components().all(|c| matches!(c, Component::Normal(_)))
            && !p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(TMP_PREFIX));
        if !ok {
            return Err(BackendError::invalid_key(op, key));
        }
        Ok(self.root.join(p))
    }
}

/// Temporary files left by a writer that was killed. Old enough that no live writer (another
/// push into the same cache, say) can still be filling them.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let is_temp = name
            .to_str()
            .is_some_and(|n| n.starts_with(TMP_PREFIX) && n.ends_with(".tmp"));
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if is_temp && stale {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Mode for new files, as Nix's `file://` store creates them (the umask applies): readable by
/// a web server running as another user. tempfile's default, 0600, is not.
const FILE_MODE: u32 = 0o666;

fn temp_in(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(FILE_MODE))
        .tempfile_in(dir)
}

/// Move `tmp` (already flushed) to `dest` as `mode` says.
fn commit(tmp: tempfile::TempPath, dest: &Path, mode: PutMode) -> io::Result<()> {
    match mode {
        PutMode::Overwrite => tmp.persist(dest).map_err(|e| e.error)?,
        // link() refuses an existing name atomically, even against another process.
        PutMode::Create => tmp.persist_noclobber(dest).map_err(|e| e.error)?,
    }
    Ok(())
}

fn put_blocking(dest: &Path, body: Body, mode: PutMode) -> io::Result<()> {
    let dir = dest.parent().expect("keys have a parent");
    fs::create_dir_all(dir)?;
    match body {
        Body::Bytes(b) => {
            let mut f = temp_in(dir)?;
            f.write_all(&b)?;
            f.as_file().sync_data()?;
            commit(f.into_temp_path(), dest, mode)
        }
        Body::File(staged) => {
            if staged.parent() == Some(dir) {
                fs::File::open(&staged)?.sync_data()?;
                return commit(staged, dest, mode);
            }
            // Staged elsewhere: copy next to the destination first, so the rename stays atomic.
            let f = temp_in(dir)?;
            let mut src = fs::File::open(&staged)?;
            io::copy(&mut src, &mut f.as_file())?;
            f.as_file().sync_data()?;
            drop(staged);
            commit(f.into_temp_path(), dest, mode)
        }
    }
}

#[async_trait]
impl Backend for FsBackend {
    async fn put(&self, key: &str, body: Body, opts: PutOptions) -> Result<(), BackendError> {
        let dest = self.path_of("put", key)?;
        let mode = opts.mode;
        let dir = dest.parent().expect("keys have a parent").to_owned();
        let result = tokio::task::spawn_blocking(move || put_blocking(&dest, body, mode))
            .await
            .map_err(|e| BackendError::new(ErrorKind::Other, "put", key, e.to_string()))?
            .map_err(|e| BackendError::io("put", key, e));
        if result.is_ok() {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(dir);
        }
        result
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let path = self.path_of("exists", key)?;
        match tokio::fs::symlink_metadata(&path).await {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BackendError::io("exists", key, e)),
        }
    }

    async fn exists_all(&self, keys: &[String]) -> Result<Option<Vec<bool>>, BackendError> {
        let paths = keys
            .iter()
            .map(|k| self.path_of("exists", k))
            .collect::<Result<Vec<_>, _>>()?;
        let keys = keys.to_vec();
        tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .zip(&keys)
                .map(|(path, key)| match fs::symlink_metadata(path) {
                    Ok(m) => Ok(m.is_file()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(BackendError::io("exists", key, e)),
                })
                .collect::<Result<Vec<bool>, _>>()
                .map(Some)
        })
        .await
        .map_err(|e| BackendError::new(ErrorKind::Other, "exists", "", e.to_string()))?
    }

    async fn get(&self, key: &str) -> Result<ByteStream, BackendError> {
        let path = self.path_of("get", key)?;
        let f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| BackendError::io("get", key, e))?;
        let key = key.to_owned();
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024)
            .map(move |r| r.map_err(|e| BackendError::io("get", &key, e)));
        Ok(Box::pin(stream))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        // Walk only below the deepest directory the prefix names.
        let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path_of("list", dir_part)?
        };
        let root = self.root.clone();
        let prefix_owned = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, &start, &prefix_owned, &mut out)?;
            Ok(out)
        })
        .await
        .map_err(|e| BackendError::new(ErrorKind::Other, "list", prefix, e.to_string()))?
        .map_err(|e| BackendError::io("list", prefix, e))
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path_of("delete", key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("delete", key, e)),
        }
    }

    async fn sync(&self) -> Result<(), BackendError> {
        let dirs: Vec<PathBuf> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        if dirs.is_empty() {
            return Ok(());
        }
        let flushed = tokio::task::spawn_blocking(move || {
            for d in &dirs {
                sync_dir(d).map_err(|e| (d.clone(), e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| BackendError::new(ErrorKind::Other, "sync", "", e.to_string()))?;
        flushed.map_err(|(d, e)| BackendError::io("sync", &d.display().to_string(), e))
    }

    fn staging_dir(&self) -> Option<&Path> {
        Some(&self.staging)
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let ft = entry.file_type()?;
        let Some(key) = path
            .strip_prefix(root)
            .ok()
            .and_then(|k| k.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        if ft.is_dir() {
            // Descend only where keys could still match the prefix.
            let as_dir = format!("{key}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                walk(root, &path, prefix, out)?;
            }
        } else if ft.is_file() && key.starts_with(prefix) {
            out.push(key);
        }
    }
    Ok(())
}
