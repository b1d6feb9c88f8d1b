//! The `gs://` address: which bucket, below which prefix, at which endpoint, with which
//! credentials. Parsed once, before any request (the credential file is read then too).
//!
//! ```text
//! gs://BUCKET[/PREFIX][?credentials=FILE | ?anonymous=true | ?metadata-server=true][&endpoint=URL]
//! ```
//! - `PREFIX`: every key lives below it, so one bucket can hold several caches.
//! - `credentials=FILE`: a service-account key file (JSON, as the Cloud console makes it), or
//!   an `authorized_user` file as `gcloud auth application-default login` writes.
//! - neither: application-default credentials: `$GOOGLE_APPLICATION_CREDENTIALS`, else
//!   `~/.config/gcloud/application_default_credentials.json`, else, **only with
//!   `metadata-server=true`**, the metadata server (`metadata.google.internal`, or
//!   `$GCE_METADATA_HOST`): the service account of a Compute Engine VM or of a GKE workload
//!   (Workload Identity). Without it the metadata server (169.254.169.254) is never asked, and
//!   without a file the address is refused, saying what to give.
//! - `anonymous=true`: no credentials at all, no token sent (public buckets, emulators).
//! - `endpoint=URL`: another server speaking the JSON API, such as fake-gcs-server
//!   (`endpoint=http://127.0.0.1:4443&anonymous=true`). Default `https://storage.googleapis.com`.
//!
//! Any other parameter is refused with its name.

use std::path::Path;

use super::GcsCredentials;
use crate::ConfigError;

pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// A parsed `gs://` address.
#[derive(Debug, Clone)]
pub struct GcsConfig {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
    /// The API's root, without a trailing `/`.
    pub endpoint: url::Url,
    pub credentials: GcsCredentials,
}

impl GcsConfig {
    /// Parse an address, reading the credential file it names (or the application-default one).
    pub fn parse(addr: &str) -> Result<Self, ConfigError> {
        let (location, query) = addr.split_once('?').unwrap_or((addr, ""));
        let rest = location
            .strip_prefix("gs://")
            .ok_or("expected gs://BUCKET[/PREFIX]")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=222).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c));
        if !bucket_ok {
            return Err(format!(
                "{bucket:?} is not a bucket name (3 to 222 of a-z, 0-9, -, _ and .)"
            )
            .into());
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() && !valid_key(prefix) {
            return Err(format!("{prefix:?} is not a valid prefix").into());
        }
        let [endpoint, credentials, anonymous, metadata_server] = crate::query_params(
            query,
            "a GCS cache",
            ["endpoint", "credentials", "anonymous", "metadata-server"],
            false,
        )?;
        let endpoint = endpoint.unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let mut endpoint_url = url::Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| format!("endpoint {endpoint:?} is not an http(s) URL"))?;
        if endpoint_url.query().is_some() || !endpoint_url.username().is_empty() {
            return Err(format!("endpoint {endpoint:?}: no query or credentials allowed").into());
        }
        let trimmed = endpoint_url.path().trim_end_matches('/').to_owned();
        endpoint_url.set_path(&trimmed);
        let flag = |name: &str, v: Option<String>| match v.as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(format!("{name} must be true or false, not {v:?}")),
        };
        let anonymous = flag("anonymous", anonymous)?;
        let metadata = flag("metadata-server", metadata_server)?;
        let credentials = match (anonymous, credentials) {
            _ if anonymous && metadata => {
                return Err("give anonymous=true or metadata-server=true, not both".into());
            }
            (true, Some(_)) => return Err("give credentials or anonymous=true, not both".into()),
            (true, None) => GcsCredentials::Anonymous,
            (false, Some(_)) if metadata => {
                return Err("give credentials=FILE or metadata-server=true, not both".into());
            }
            (false, Some(f)) => GcsCredentials::from_file(Path::new(&f))?,
            (false, None) => GcsCredentials::application_default(metadata)?,
        };
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: endpoint_url,
            credentials,
        })
    }
}

/// A key is `/`-separated names, none empty, `.` or `..`.
pub(super) fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.chars().any(|ch| ch.is_control()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let c = GcsConfig::parse("gs://my-bucket/some/prefix/?anonymous=true").unwrap();
        assert_eq!(c.bucket, "my-bucket");
        assert_eq!(c.prefix, "some/prefix");
        assert_eq!(c.endpoint.as_str(), "https://storage.googleapis.com/");
        assert!(matches!(c.credentials, GcsCredentials::Anonymous));
        let c =
            GcsConfig::parse("gs://b12?anonymous=true&endpoint=http://127.0.0.1:4443/").unwrap();
        assert_eq!(c.prefix, "");
    }

    #[test]
    fn refuses_bad_addresses_naming_the_problem() {
        for (addr, needle) in [
            ("gs://bucket?anonymous=true&bogus=1", "\"bogus\""),
            ("gs://Bucket?anonymous=true", "bucket name"),
            ("gs://b?anonymous=true", "bucket name"),
            ("gs://bucket/a/../b?anonymous=true", "prefix"),
            ("gs://bucket?anonymous=yes", "true or false"),
            (
                "gs://bucket?metadata-server=yes",
                "metadata-server must be true or false",
            ),
            (
                "gs://bucket?anonymous=true&metadata-server=true",
                "anonymous=true or metadata-server=true, not both",
            ),
            (
                "gs://bucket?credentials=/nonexistent/sa.json&metadata-server=true",
                "credentials=FILE or metadata-server=true, not both",
            ),
            (
                "gs://bucket?credentials=/nonexistent/sa.json",
                "/nonexistent/sa.json",
            ),
            ("gs://bucket?anonymous=true&endpoint=ftp://x", "endpoint"),
            ("s3://bucket", "gs://"),
        ] {
            let e = GcsConfig::parse(addr).unwrap_err().to_string();
            assert!(e.contains(needle), "{addr}: {e:?} does not name {needle:?}");
        }
    }
}
