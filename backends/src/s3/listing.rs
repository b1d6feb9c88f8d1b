//! Listing keys: all of a prefix ([`Backend::list`](crate::Backend::list)), or one ordered page
//! in one request ([`Backend::list_page`](crate::Backend::list_page)).
//!
//! **Ordered listing**: one ListObjectsV2 request with `start-after` and `delimiter=/`, so a
//! page holds up to 1000 keys of the cache's top level (narinfos) and each folder (`nar/`)
//! once, however many keys it holds. A full `list` walks object_store's paginated listing of
//! the deepest "directory" the prefix names.

use futures::TryStreamExt as _;
use object_store::ObjectStore as _;
use object_store::list::{PaginatedListOptions, PaginatedListStore as _};
use object_store::path::Path as ObjPath;

use super::S3Backend;
use super::error::{error_text, map_err};
use crate::{BackendError, ErrorKind, ListPage, ObjectInfo};

impl S3Backend {
    /// Every key that starts with `prefix`.
    pub(super) async fn list_keys(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        // object_store lists "directories"; list the deepest one the prefix names and filter.
        let dir = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        let full_dir = match (self.config.prefix.as_str(), dir) {
            ("", d) => d.to_owned(),
            (p, "") => p.to_owned(),
            (p, d) => format!("{p}/{d}"),
        };
        let dir_path = if full_dir.is_empty() {
            None
        } else {
            Some(ObjPath::parse(&full_dir).map_err(|_| {
                BackendError::new(ErrorKind::Config, "list", prefix, "invalid prefix")
            })?)
        };
        let mut stream = self.store.list(dir_path.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream
            .try_next()
            .await
            .map_err(|e| map_err(&self.errors, "list", prefix, e))?
        {
            if let Some(k) = self.strip(meta.location.as_ref()) {
                if k.starts_with(prefix) {
                    out.push(ObjectInfo {
                        key: k.to_owned(),
                        size: meta.size,
                        modified: meta.last_modified.into(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// One page of keys after `start_after`, in order, in one request.
    pub(super) async fn list_ordered(
        &self,
        start_after: &str,
    ) -> Result<Option<ListPage>, BackendError> {
        // The listing's prefix ends with `/` (S3 prefixes are plain string prefixes), and so
        // does every folder (CommonPrefix) it returns.
        let base = crate::under_prefix(&self.config.prefix, "");
        let opts = PaginatedListOptions {
            offset: (!start_after.is_empty()).then(|| format!("{base}{start_after}")),
            delimiter: Some("/".into()),
            max_keys: self.list_page_size,
            ..Default::default()
        };
        let page = self
            .store
            .list_paginated((!base.is_empty()).then_some(base.as_str()), opts)
            .await
            .map_err(|e| match e {
                // A key in the bucket that object_store will not represent (`a//b`): the
                // listing is unusable, the address is not wrong.
                object_store::Error::InvalidPath { .. } => BackendError::new(
                    ErrorKind::Other,
                    "list",
                    start_after,
                    format!("unusable listing: {}", error_text(&e)),
                ),
                e => map_err(&self.errors, "list", start_after, e),
            })?;
        let objects = page
            .result
            .objects
            .iter()
            .filter_map(|m| self.strip(m.location.as_ref()).map(str::to_owned))
            .collect();
        // object_store drops a folder's trailing `/`; put it back.
        let folders = page
            .result
            .common_prefixes
            .iter()
            .filter_map(|p| self.strip(p.as_ref()).map(|f| format!("{f}/")))
            .collect();
        Ok(Some(crate::assemble_page(
            start_after,
            objects,
            folders,
            page.page_token.is_some(),
            self.list_page_size.unwrap_or(crate::LIST_PAGE_MAX),
        )))
    }

    /// `key` relative to our prefix, if it is below it.
    pub(super) fn strip<'a>(&self, location: &'a str) -> Option<&'a str> {
        if self.config.prefix.is_empty() {
            Some(location)
        } else {
            location
                .strip_prefix(self.config.prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
        }
    }
}
