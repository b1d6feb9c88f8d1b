//! Listing keys: a walk of the cache's directories below the deepest one a prefix names.
//!
//! SFTP cannot list in key order with one request a page, so this backend has no
//! [`Backend::list_page`](crate::Backend::list_page): callers use `exists`. Temporary files
//! (`.nixpush-*.tmp`) and anything that is neither a regular file nor a directory are never
//! listed.

use russh_sftp::protocol::StatusCode;

use super::connection::Session;
use super::error::{is_status, sftp_error};
use super::{S_IFDIR, S_IFREG, TMP_PREFIX, file_mode, remote};
use crate::{BackendError, ObjectInfo};

/// Keys below the directory `start` (a key prefix ending before a `/`) that begin with
/// `prefix`, breadth first.
pub(super) async fn walk(
    root: &str,
    s: &Session,
    start: &str,
    prefix: &str,
) -> Result<Vec<ObjectInfo>, BackendError> {
    let mut out = Vec::new();
    let mut dirs = vec![start.to_owned()];
    while let Some(rel) = dirs.pop() {
        let handle = match s.sftp.opendir(remote(root, &rel)).await {
            Ok(h) => h.handle,
            Err(e) if is_status(&e, StatusCode::NoSuchFile) => continue,
            Err(e) => return Err(sftp_error("list", prefix, e)),
        };
        let entries = read_dir(s, &handle, prefix).await;
        let _ = s.sftp.close(handle).await;
        for f in entries? {
            let name = f.filename;
            if name == "." || name == ".." || name.starts_with(TMP_PREFIX) || name.contains('/') {
                continue;
            }
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            match file_mode(&f.attrs) {
                S_IFDIR => {
                    let as_dir = format!("{key}/");
                    if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                        dirs.push(key);
                    }
                }
                S_IFREG if key.starts_with(prefix) => out.push(ObjectInfo {
                    key,
                    size: f.attrs.size.unwrap_or(0),
                    modified: std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(f.attrs.mtime.map_or(0, u64::from)),
                }),
                _ => {}
            }
        }
    }
    Ok(out)
}

async fn read_dir(
    s: &Session,
    handle: &str,
    prefix: &str,
) -> Result<Vec<russh_sftp::protocol::File>, BackendError> {
    let mut all = Vec::new();
    loop {
        match s.sftp.readdir(handle).await {
            Ok(name) => all.extend(name.files),
            Err(e) if is_status(&e, StatusCode::Eof) => return Ok(all),
            Err(e) => return Err(sftp_error("list", prefix, e)),
        }
    }
}
