//! The `s3://` address: which bucket, below which prefix, at which endpoint, with which
//! profile. Parsed once, before any request; what is wrong is named.
//!
//! ```text
//! s3://BUCKET[/PREFIX][?region=R&endpoint=URL&profile=NAME&scheme=http|https]
//! ```
//! The parameters are Nix's own (`S3BinaryCacheStore`, `src/libstore/s3-binary-cache-store.cc`);
//! any other is refused with its name.
//! - `region`: default `us-east-1`, as in Nix.
//! - `endpoint`: an S3-compatible service (`http://127.0.0.1:8333`, `minio.example:9000`).
//!   Requests then use path-style addressing (`ENDPOINT/BUCKET/KEY`), as Nix does. Without it,
//!   AWS S3 itself (`https://s3.REGION.amazonaws.com/BUCKET`).
//! - `scheme`: `https` (default) or `http`, for an `endpoint` given without one; an endpoint
//!   that names its scheme keeps it (the AWS SDK, which Nix uses, behaves the same).
//! - `profile`: a named profile of `~/.aws/config` and `~/.aws/credentials` (SSO, assume-role,
//!   `credential_process` and static keys all work), as Nix's `profile=`; see
//!   [`credentials`](super::credentials).
//!
//! `PREFIX` is an extension over Nix: every key lives below it, so one bucket can hold several
//! caches. Nix reads such a cache through the bucket's HTTP endpoint
//! (`https://ENDPOINT/BUCKET/PREFIX`).

use object_store::path::Path as ObjPath;

use crate::ConfigError;

/// Where the cache is, from its address; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    pub region: String,
    /// The endpoint URL, scheme included; `None` for AWS S3.
    pub endpoint: Option<String>,
    /// A named AWS profile.
    pub profile: Option<String>,
}

impl S3Config {
    /// Parse `s3://bucket[/prefix][?params]`.
    pub fn parse(addr: &str) -> Result<Self, ConfigError> {
        let rest = addr
            .strip_prefix("s3://")
            .ok_or_else(|| "an S3 address starts with s3://".to_owned())?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err("no bucket name (expected s3://BUCKET[/PREFIX])".into());
        }
        if !bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("invalid bucket name {bucket:?}").into());
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            ObjPath::parse(prefix).map_err(|e| format!("invalid prefix {prefix:?}: {e}"))?;
        }
        let [region, endpoint, profile, scheme] = crate::query_params(
            query,
            "an S3 cache",
            ["region", "endpoint", "profile", "scheme"],
            true,
        )?;
        if let Some(s) = &scheme {
            if s != "http" && s != "https" {
                return Err(format!("scheme must be http or https, not {s:?}").into());
            }
        }
        let endpoint = match endpoint {
            None => {
                if scheme.as_deref() == Some("http") {
                    return Err("scheme=http needs an endpoint (AWS S3 is https only)".into());
                }
                None
            }
            Some(e) => {
                let full = if e.contains("://") {
                    e
                } else {
                    format!("{}://{e}", scheme.as_deref().unwrap_or("https"))
                };
                let u =
                    url::Url::parse(&full).map_err(|err| format!("endpoint {full:?}: {err}"))?;
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return Err(format!("endpoint {full:?} is not an http(s) URL").into());
                }
                if u.query().is_some() || !matches!(u.path(), "" | "/") {
                    return Err(format!("endpoint {full:?} must not have a path or query").into());
                }
                Some(full.trim_end_matches('/').to_owned())
            }
        };
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            region: region.unwrap_or_else(|| "us-east-1".to_owned()),
            endpoint,
            profile,
        })
    }

    pub(super) fn describe(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            s.push_str(&format!(" (at {e})"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nix_addresses() {
        let c = S3Config::parse(
            "s3://my-cache/some/prefix/?region=eu-west-1&endpoint=127.0.0.1:8333&scheme=http&profile=p",
        )
        .unwrap();
        assert_eq!(
            c,
            S3Config {
                bucket: "my-cache".into(),
                prefix: "some/prefix".into(),
                region: "eu-west-1".into(),
                endpoint: Some("http://127.0.0.1:8333".into()),
                profile: Some("p".into()),
            }
        );
        let d = S3Config::parse("s3://b").unwrap();
        assert_eq!((d.prefix.as_str(), d.region.as_str()), ("", "us-east-1"));
        assert_eq!(d.endpoint, None);
        // An endpoint's own scheme wins; no scheme means https.
        let e = S3Config::parse("s3://b?endpoint=http://h:1/&scheme=https").unwrap();
        assert_eq!(e.endpoint.as_deref(), Some("http://h:1"));
        let f = S3Config::parse("s3://b?endpoint=minio.example").unwrap();
        assert_eq!(f.endpoint.as_deref(), Some("https://minio.example"));
    }

    #[test]
    fn refuses_bad_addresses_naming_the_problem() {
        let err = |a: &str| S3Config::parse(a).unwrap_err().to_string();
        assert!(
            err("s3://b?bogus=1").contains("\"bogus\""),
            "{}",
            err("s3://b?bogus=1")
        );
        assert!(err("s3://b?multipart-upload=true").contains("multipart-upload"));
        assert!(err("s3://?region=x").contains("bucket"));
        assert!(err("s3://b?scheme=ftp").contains("scheme"));
        assert!(err("s3://b?scheme=http").contains("endpoint"));
        assert!(err("s3://b?region=a&region=b").contains("twice"));
        assert!(err("s3://b?endpoint=http://h/path").contains("path"));
        assert!(err("s3://b/a//c").contains("prefix"));
        assert!(err("s3://b/../c").contains("prefix"));
    }
}
