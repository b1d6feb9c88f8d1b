//! Cache addresses in Nix's syntax, as for `nix copy --to`: a backend address plus the store
//! parameters a Nix user already knows, which apply to any backend. The backend's own
//! parameters stay in the address handed to `nixpush_backends::open`, which refuses unknown ones.
//!
//! | parameter              | meaning                                          |
//! |------------------------|--------------------------------------------------|
//! | `compression`          | none, xz, bzip2 or zstd                          |
//! | `secret-key`           | a secret key file to sign with                   |
//! | `parallel-compression` | `true`/`false`: several threads for one large NAR |
//! | `write-nar-listing`    | `true`/`false`: also write each NAR's listing (`<hash>.ls`) |

use std::path::PathBuf;

use crate::formats::Compression;
use crate::formats::compression::UnknownCompression;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// What the backend sees: scheme, location and its own parameters.
    pub backend: String,
    pub compression: Option<Compression>,
    pub secret_key: Option<PathBuf>,
    pub parallel_compression: Option<bool>,
    pub write_nar_listing: Option<bool>,
}

/// Each message is whole by itself: a cause is part of it and not also the `source()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("cache address {addr:?}: {error}")]
    Compression {
        addr: String,
        error: UnknownCompression,
    },
    #[error("cache address {addr:?}: {param} must be true or false")]
    Bool { addr: String, param: &'static str },
    #[error(
        "cache address {addr:?} looks like a mistyped URL: did you mean {suggestion:?}? \
         (a plain directory path must be absolute or start with \".\")"
    )]
    MistypedUrl { addr: String, suggestion: String },
    #[error(
        "cache address {addr:?}: a plain directory path must be absolute or start with \".\" \
         (did you mean {suggestion:?}?)"
    )]
    RelativePath { addr: String, suggestion: String },
}

/// The schemes `nixpush_backends::open` knows.
const SCHEMES: [&str; 6] = ["file", "s3", "https", "http", "sftp", "gs"];

/// An address without `://` is a directory path. It must say so plainly (`/srv/cache`,
/// `./cache`): `http//host` or `s3:bucket` would otherwise make a directory of that name.
fn check_plain_path(addr: &str, base: &str) -> Result<(), AddressError> {
    if base.contains("://") || base.starts_with('/') || base.starts_with('.') {
        return Ok(());
    }
    for scheme in SCHEMES {
        let Some(rest) = base.strip_prefix(scheme) else {
            continue;
        };
        if !(rest.starts_with(':') || rest.starts_with("//")) {
            continue;
        }
        let rest = rest.trim_start_matches(':').trim_start_matches('/');
        let suggestion = if scheme == "file" {
            format!("file:///{rest}")
        } else {
            format!("{scheme}://{rest}")
        };
        return Err(AddressError::MistypedUrl {
            addr: addr.to_owned(),
            suggestion,
        });
    }
    Err(AddressError::RelativePath {
        addr: addr.to_owned(),
        suggestion: format!("./{base}"),
    })
}

impl Address {
    pub fn parse(addr: &str) -> Result<Self, AddressError> {
        let (base, query) = addr.split_once('?').unwrap_or((addr, ""));
        check_plain_path(addr, base)?;
        let mut out = Address {
            backend: base.to_owned(),
            compression: None,
            secret_key: None,
            parallel_compression: None,
            write_nar_listing: None,
        };
        let boolean = |param: &'static str, v: &str| match v {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(AddressError::Bool {
                addr: addr.to_owned(),
                param,
            }),
        };
        // The backend's own parameters stay as they were written (not re-encoded), so that
        // its messages show the address as the user gave it.
        let mut rest: Vec<&str> = Vec::new();
        for piece in query.split('&').filter(|p| !p.is_empty()) {
            let Some((k, v)) = url::form_urlencoded::parse(piece.as_bytes()).next() else {
                continue;
            };
            match &*k {
                "compression" => {
                    out.compression =
                        Some(v.parse().map_err(|error| AddressError::Compression {
                            addr: addr.to_owned(),
                            error,
                        })?)
                }
                "secret-key" => out.secret_key = Some(PathBuf::from(&*v)),
                "parallel-compression" => {
                    out.parallel_compression = Some(boolean("parallel-compression", &v)?)
                }
                "write-nar-listing" => {
                    out.write_nar_listing = Some(boolean("write-nar-listing", &v)?)
                }
                _ => rest.push(piece),
            }
        }
        if !rest.is_empty() {
            out.backend = format!("{base}?{}", rest.join("&"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_store_and_backend_parameters() {
        let a =
            Address::parse("file:///tmp/c?compression=xz&secret-key=/k&parallel-compression=true")
                .unwrap();
        assert_eq!(a.backend, "file:///tmp/c");
        assert_eq!(a.compression, Some(Compression::Xz));
        assert_eq!(a.secret_key, Some(PathBuf::from("/k")));
        assert_eq!(a.parallel_compression, Some(true));
        let b = Address::parse("file:///tmp/c?bogus=1").unwrap();
        assert_eq!(b.backend, "file:///tmp/c?bogus=1");
        assert!(Address::parse("file:///c?compression=lz9").is_err());
        assert_eq!(
            Address::parse("file:///c?parallel-compression=maybe")
                .unwrap_err()
                .to_string(),
            "cache address \"file:///c?parallel-compression=maybe\": parallel-compression \
             must be true or false"
        );
        let l = Address::parse("s3://b?write-nar-listing=true&region=x").unwrap();
        assert_eq!(
            (l.write_nar_listing, l.backend.as_str()),
            (Some(true), "s3://b?region=x")
        );
    }

    #[test]
    fn plain_paths_are_absolute_or_start_with_a_dot() {
        for ok in [
            "/srv/cache",
            "./cache",
            "../cache",
            ".",
            "file:///srv",
            "s3://b",
        ] {
            assert!(Address::parse(ok).is_ok(), "{ok}");
        }
        for (bad, suggestion) in [
            ("http//x", "http://x"),
            ("https:/x/y", "https://x/y"),
            ("s3:bucket", "s3://bucket"),
            ("file:/srv/cache", "file:///srv/cache"),
            ("sftp//u@h/p", "sftp://u@h/p"),
        ] {
            assert_eq!(
                Address::parse(bad),
                Err(AddressError::MistypedUrl {
                    addr: bad.into(),
                    suggestion: suggestion.into()
                })
            );
        }
        assert_eq!(
            Address::parse("cache").unwrap_err().to_string(),
            "cache address \"cache\": a plain directory path must be absolute or start with \
             \".\" (did you mean \"./cache\"?)"
        );
    }

    #[test]
    fn the_cause_is_in_the_message_only() {
        let e = Address::parse("file:///c?compression=lz9").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cache address \"file:///c?compression=lz9\": unknown compression \"lz9\" \
             (expected one of: none, xz, bzip2, zstd)"
        );
        assert!(std::error::Error::source(&e).is_none());
    }
}
