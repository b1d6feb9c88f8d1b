//! Store paths: `<store dir>/<hash>-<name>` (`src/libstore/path.cc`).
//!
//! `<hash>` is 32 characters of nixbase32 (160 bits); `<name>` is 1 to 211 characters of
//! `[A-Za-z0-9+\-._?=]` and does not start with `.`. The store directory is a property of the
//! store (usually `/nix/store`), asked of Nix rather than assumed, so a [`StorePath`] holds only
//! the base name and a [`StoreDir`] turns it into a full path and back.

use std::fmt;
use std::path::{Component, Path};

use super::nixbase32;

pub const HASH_LEN: usize = 32;
pub const MAX_NAME_LEN: usize = 211;

/// The base name of a store path, validated: `<hash>-<name>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("{path:?} is not in the Nix store {store_dir:?}")]
    NotInStore { path: String, store_dir: String },
    #[error("{0:?} is not a store path base name: it is shorter than a hash and a name")]
    TooShort(String),
    #[error("{0:?} has an invalid hash part (32 nixbase32 characters expected)")]
    BadHash(String),
    #[error("{0:?} has an invalid name: {1}")]
    BadName(String, &'static str),
    #[error("store directory {0:?} must be an absolute path without trailing slash, '.' or '..'")]
    BadStoreDir(String),
}

impl StorePath {
    /// Parse a base name such as `6wc80gnrw32m27zzl4k7r5j3jph6aasy-top`.
    pub fn from_base_name(s: &str) -> Result<Self, StorePathError> {
        if s.len() < HASH_LEN + 2 {
            return Err(StorePathError::TooShort(s.to_owned()));
        }
        // `split_at` would panic inside a multi-byte character: hostile input must not crash
        // the daemon (found by tests/parsers_robust.rs).
        let (Some(hash), Some(rest)) = (s.get(..HASH_LEN), s.get(HASH_LEN..)) else {
            return Err(StorePathError::BadHash(s.to_owned()));
        };
        if nixbase32::decode_fixed::<20>(hash).is_err() {
            return Err(StorePathError::BadHash(s.to_owned()));
        }
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::BadHash(s.to_owned()))?;
        validate_name(name).map_err(|why| StorePathError::BadName(s.to_owned(), why))?;
        Ok(Self(s.to_owned()))
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.0
    }

    /// The 32-character hash part: the narinfo's file name stem.
    pub fn hash_part(&self) -> &str {
        &self.0[..HASH_LEN]
    }

    pub fn name(&self) -> &str {
        &self.0[HASH_LEN + 1..]
    }

    pub fn is_derivation(&self) -> bool {
        self.0.ends_with(".drv")
    }
}

fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 211 characters");
    }
    if name.starts_with('.') {
        return Err("starts with '.'");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
    {
        return Err("only A-Z a-z 0-9 + - . _ ? = are allowed");
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.0)
    }
}

/// The store directory, e.g. `/nix/store`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl StoreDir {
    pub fn new(dir: &str) -> Result<Self, StorePathError> {
        let p = Path::new(dir);
        let clean = p.is_absolute()
            && dir.len() > 1
            && !dir.ends_with('/')
            && p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !clean {
            return Err(StorePathError::BadStoreDir(dir.to_owned()));
        }
        Ok(Self(dir.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<store dir>/<base name>`.
    pub fn display(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path.0)
    }

    /// Parse a full store path. Exactly `<store dir>/<base name>`: no subpath, no `.` or `..`
    /// components, no trailing slash.
    pub fn parse(&self, full: &str) -> Result<StorePath, StorePathError> {
        let not_in_store = || StorePathError::NotInStore {
            path: full.to_owned(),
            store_dir: self.0.clone(),
        };
        let base = full
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(not_in_store)?;
        if base.contains('/') {
            return Err(not_in_store());
        }
        StorePath::from_base_name(base)
    }

    /// The store path that contains `path` (a store path or anything below one), for inputs like
    /// `/nix/store/…-hello/bin/hello`. `path` must already be absolute and free of `..`.
    pub fn containing(&self, path: &Path) -> Result<StorePath, StorePathError> {
        let not_in_store = || StorePathError::NotInStore {
            path: path.display().to_string(),
            store_dir: self.0.clone(),
        };
        let rest = path.strip_prefix(&self.0).map_err(|_| not_in_store())?;
        let mut comps = rest.components();
        match comps.next() {
            Some(Component::Normal(base)) => {
                if comps.any(|c| !matches!(c, Component::Normal(_))) {
                    return Err(not_in_store());
                }
                StorePath::from_base_name(base.to_str().ok_or_else(not_in_store)?)
            }
            _ => Err(not_in_store()),
        }
    }
}

impl fmt::Debug for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreDir({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "6wc80gnrw32m27zzl4k7r5j3jph6aasy-top";

    #[test]
    fn parses() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = sd.parse(&format!("/nix/store/{GOOD}")).unwrap();
        assert_eq!(p.hash_part(), "6wc80gnrw32m27zzl4k7r5j3jph6aasy");
        assert_eq!(p.name(), "top");
        assert_eq!(sd.display(&p), format!("/nix/store/{GOOD}"));
        let sub = Path::new("/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aasy-top/bin/x");
        assert_eq!(sd.containing(sub).unwrap(), p);
    }

    #[test]
    fn rejects() {
        let sd = StoreDir::new("/nix/store").unwrap();
        for bad in [
            "/nix/storeX/6wc80gnrw32m27zzl4k7r5j3jph6aasy-top",
            "/tmp/6wc80gnrw32m27zzl4k7r5j3jph6aasy-top",
            "/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aasy-top/sub",
            "/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aase-top",
            "/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aasy-.hidden",
            "/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aasy-a b",
            "/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aasy-",
            "/nix/store/..",
            "/nix/store/",
            // A multi-byte character across the end of the hash part.
            "/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aas\u{1d4ac}-top",
        ] {
            assert!(sd.parse(bad).is_err(), "{bad}");
        }
        let long = format!(
            "/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aasy-{}",
            "a".repeat(212)
        );
        assert!(sd.parse(&long).is_err());
        assert!(
            sd.containing(Path::new("/nix/store/../etc/passwd"))
                .is_err()
        );
        for bad in ["nix/store", "/nix/store/", "/nix/../store", "/"] {
            assert!(StoreDir::new(bad).is_err(), "{bad}");
        }
    }
}
