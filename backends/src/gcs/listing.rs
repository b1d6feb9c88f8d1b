//! Listing keys: all of a prefix ([`Backend::list`](crate::Backend::list)), following
//! `nextPageToken` pages, or one ordered page in one request
//! ([`Backend::list_page`](crate::Backend::list_page)).
//!
//! **Ordered listing**: one `objects.list` request with `startOffset` (inclusive, so a key
//! equal to it is dropped) and `delimiter=/`, so a page holds up to [`LIST_PAGE`] names of the
//! cache's top level (narinfos) and each folder (`nar/`, from `prefixes`) once, however many
//! objects it holds.

use serde_json::Value;

use super::error::missing_bucket_error;
use super::{GcsBackend, segment};
use crate::{BackendError, ErrorKind, ListPage, ObjectInfo, under_prefix};

/// Objects per page when listing (GCS's maximum).
pub const LIST_PAGE: u32 = crate::LIST_PAGE_MAX as u32;

impl GcsBackend {
    /// One `objects.list` request: the JSON answer, or the error (a 404 means the bucket).
    async fn list_request(
        &self,
        op_key: &str,
        query: &[(&str, &str)],
    ) -> Result<Value, BackendError> {
        let url = self.url(
            &format!("/storage/v1/b/{}/o", segment(&self.config.bucket)),
            query,
        );
        let resp = self.send("list", op_key, self.client.get(url)).await?;
        if !resp.status().is_success() {
            let e = self.storage_error("list", op_key, resp).await;
            return Err(if e.kind == ErrorKind::NotFound {
                missing_bucket_error(&self.config.bucket, e)
            } else {
                e
            });
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| crate::transport_error("list", op_key, &e))?;
        serde_json::from_slice(&body).map_err(|e| {
            BackendError::new(
                ErrorKind::Other,
                "list",
                op_key,
                format!("bad listing: {e}"),
            )
        })
    }

    /// Every key that starts with `prefix`.
    pub(super) async fn list_keys(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let full = under_prefix(&self.config.prefix, prefix);
        let strip = under_prefix(&self.config.prefix, "").len();
        let page = self.list_page_size.to_string();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![
                ("prefix", full.as_str()),
                ("maxResults", page.as_str()),
                ("fields", "items(name,size,updated),nextPageToken"),
            ];
            if let Some(t) = &token {
                query.push(("pageToken", t.as_str()));
            }
            let v = self.list_request(prefix, &query).await?;
            for item in v
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(n) = item.get("name").and_then(Value::as_str) {
                    if n.len() >= strip && n.starts_with(&full) {
                        let key = &n[strip..];
                        let size = item
                            .get("size")
                            .and_then(Value::as_str)
                            .and_then(|s| s.parse().ok());
                        let modified = item
                            .get("updated")
                            .and_then(Value::as_str)
                            .and_then(parse_rfc3339);
                        let (Some(size), Some(modified)) = (size, modified) else {
                            return Err(BackendError::new(
                                ErrorKind::Other,
                                "list",
                                key,
                                "the listing gives no size or update time for this object",
                            ));
                        };
                        out.push(ObjectInfo {
                            key: key.to_owned(),
                            size,
                            modified,
                        });
                    }
                }
            }
            match v.get("nextPageToken").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && token.as_deref() != Some(t) => {
                    token = Some(t.to_owned())
                }
                _ => return Ok(out),
            }
        }
    }

    /// One page of keys after `start_after`, in order, in one request.
    pub(super) async fn list_ordered(
        &self,
        start_after: &str,
    ) -> Result<Option<ListPage>, BackendError> {
        let base = under_prefix(&self.config.prefix, "");
        let offset = format!("{base}{start_after}");
        let page = self.list_page_size.to_string();
        let mut query = vec![
            ("delimiter", "/"),
            ("maxResults", page.as_str()),
            ("fields", "items(name),prefixes,nextPageToken"),
        ];
        if !base.is_empty() {
            query.push(("prefix", base.as_str()));
        }
        if !start_after.is_empty() {
            query.push(("startOffset", offset.as_str()));
        }
        let v = self.list_request(start_after, &query).await?;
        let strings = |field: &str| -> Vec<String> {
            v.get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|x| match x {
                    // Folders are plain strings (with their trailing `/`), objects `{"name"}`.
                    Value::String(s) => Some(s.as_str()),
                    x => x.get("name").and_then(Value::as_str),
                })
                .filter_map(|n| n.strip_prefix(base.as_str()))
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let more = v
            .get("nextPageToken")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty());
        // `startOffset` is inclusive: `assemble_page` drops a key equal to it.
        Ok(Some(crate::assemble_page(
            start_after,
            strings("items"),
            strings("prefixes"),
            more,
            self.list_page_size as usize,
        )))
    }
}

/// An RFC 3339 time in UTC as GCS writes it (`2024-05-01T10:00:00.123Z`).
fn parse_rfc3339(s: &str) -> Option<std::time::SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<u64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec > 60 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        let n: u32 = digits.parse().ok()?;
        n * 10u32.pow(9 - digits.len() as u32)
    };
    Some(
        std::time::UNIX_EPOCH
            + std::time::Duration::new(days * 86_400 + h * 3600 + min * 60 + sec, nanos),
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn update_times() {
        let t = |s| super::parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap());
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(
            t("2024-02-29T12:34:56.5Z"),
            Some(Duration::new(1_709_210_096, 500_000_000))
        );
        assert_eq!(t("2024-13-01T00:00:00Z"), None);
        assert_eq!(t("2024-01-01 00:00:00"), None);
    }
}
