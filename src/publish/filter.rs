//! Which paths a cache should not get: `exclude` (globs on the store path's name, such as
//! `*-source` or `*.drv`) and `max-nar-size`, applied alike by `nixpush push` and the daemon
//! (whichever way a request arrived: hook, socket or queue directory).
//!
//! **What an excluded reference means for its referrers**: they are left out too. A narinfo
//! names its references, and a cache must never show a narinfo whose references it lacks
//! (Nix would fail to substitute its closure, after fetching part of it), so a path can only be
//! published where everything it refers to is published or already present. Excluding
//! `*-source` therefore also leaves out the rare output that keeps its own source, and each
//! such path is reported with the excluded path it refers to, so a user who wants it can
//! narrow the pattern. A reference the cache already has (published before the filter was
//! set) does not hold anything back.
//!
//! Cost: one glob-set match per path to push and one pass over their references, in
//! topological order; nothing per path already present.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::formats::StorePath;
use crate::store::PathInfo;

/// The paths to leave out, as configured. [`Filter::default`] leaves out nothing.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The patterns as given, in order, for messages; `set` matches them.
    patterns: Vec<String>,
    set: GlobSet,
    max_nar_size: Option<u64>,
}

/// A pattern that is not a glob.
#[derive(Debug, thiserror::Error)]
#[error("exclude pattern {pattern:?} is not a valid glob: {message}")]
pub struct PatternError {
    pub pattern: String,
    pub message: String,
}

/// Why a path was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    /// Its name matches an `exclude` pattern.
    Name { pattern: String },
    /// Its NAR is larger than `max-nar-size`.
    Size { nar_size: u64, max: u64 },
    /// It refers to a path that was left out (directly or further down).
    Reference { path: StorePath },
}

impl Filter {
    /// Globs match the name after the hash (`hello-2.12`, `foo.drv`): `*` and `?` within it,
    /// `[...]` classes and `{a,b}` alternatives, as globset reads them.
    pub fn new(patterns: &[String], max_nar_size: Option<u64>) -> Result<Self, PatternError> {
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            let glob = Glob::new(p).map_err(|e| PatternError {
                pattern: p.clone(),
                message: e.kind().to_string(),
            })?;
            b.add(glob);
        }
        let set = b.build().map_err(|e| PatternError {
            pattern: patterns.join(", "),
            message: e.to_string(),
        })?;
        Ok(Self {
            patterns: patterns.to_vec(),
            set,
            max_nar_size,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty() && self.max_nar_size.is_none()
    }

    fn excludes(&self, info: &PathInfo) -> Option<Exclusion> {
        if let Some(i) = self.set.matches(info.path.name()).first() {
            return Some(Exclusion::Name {
                pattern: self.patterns[*i].clone(),
            });
        }
        match self.max_nar_size {
            Some(max) if info.nar_size > max => Some(Exclusion::Size {
                nar_size: info.nar_size,
                max,
            }),
            _ => None,
        }
    }

    /// Take the excluded paths out of `to_push`, with their referrers among the rest; returns
    /// them, each with why, in topological order (references first).
    pub fn apply(
        &self,
        to_push: &mut BTreeMap<StorePath, Arc<PathInfo>>,
    ) -> Vec<(StorePath, Exclusion)> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut left_out: HashSet<StorePath> = HashSet::new();
        for path in super::schedule::topological(to_push) {
            let info = &to_push[&path];
            let why = self.excludes(info).or_else(|| {
                info.references
                    .iter()
                    .find(|r| **r != path && left_out.contains(*r))
                    .map(|r| Exclusion::Reference { path: r.clone() })
            });
            if let Some(why) = why {
                left_out.insert(path.clone());
                out.push((path, why));
            }
        }
        for (p, _) in &out {
            to_push.remove(p);
        }
        out
    }
}

/// Parse a size as a config file or command line gives it: bytes (`1048576`), or a number
/// with a binary unit (`512KiB`, `64MiB`, `4GiB`, `1TiB`; `K`, `M`, `G`, `T` and `KB`... mean
/// the same, as Nix's own settings do).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (write e.g. 4GiB, 512MiB or a byte count)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use KiB, MiB, GiB or TiB)"
            ));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Says why a path was left out, naming a referenced path in the store's own spelling.
pub struct Explained<'a> {
    pub why: &'a Exclusion,
    pub display: &'a dyn Fn(&StorePath) -> String,
}

impl fmt::Display for Explained<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.why {
            Exclusion::Name { pattern } => {
                write!(f, "its name matches exclude pattern {pattern:?}")
            }
            Exclusion::Size { nar_size, max } => write!(
                f,
                "its NAR ({}) is larger than max-nar-size ({})",
                indicatif::HumanBytes(*nar_size),
                indicatif::HumanBytes(*max)
            ),
            Exclusion::Reference { path } => write!(
                f,
                "it refers to {}, which is left out (a cache never gets a path without its references)",
                (self.display)(path)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::hash::Sha256;
    use std::collections::HashMap;

    fn sp(name: &str) -> StorePath {
        // A distinct, valid hash part per name (nixbase32 has no 'e').
        let hash: String = name
            .bytes()
            .chain(std::iter::repeat(b'a'))
            .take(32)
            .map(|b| b"0123456789abcdfghijklmnpqrsvwxyz"[usize::from(b) % 32] as char)
            .collect();
        StorePath::from_base_name(&format!("{hash}-{name}")).expect("store path")
    }

    fn info(name: &str, size: u64, refs: &[&StorePath]) -> (StorePath, Arc<PathInfo>) {
        let path = sp(name);
        let info = PathInfo {
            path: path.clone(),
            nar_hash: Sha256::digest(name.as_bytes()),
            nar_size: size,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        };
        (path, Arc::new(info))
    }

    #[test]
    fn exclusions_carry_to_referrers_and_nothing_else() {
        let src = sp("foo-source");
        let lib = sp("libfoo-1.0");
        let mut to_push: BTreeMap<_, _> = [
            info("foo-source", 10, &[]),
            info("libfoo-1.0", 10, &[]),
            info("foo-1.0", 10, &[&src, &lib]),
            info("foo-wrapped", 10, &[&sp("foo-1.0")]),
            info("bar-1.0", 10, &[&lib]),
            info("big-data", 5000, &[]),
            info("hello.drv", 10, &[]),
        ]
        .into_iter()
        .collect();
        let f = Filter::new(&["*-source".into(), "*.drv".into()], Some(4096)).expect("valid");
        let out = f.apply(&mut to_push);
        let by: HashMap<String, Exclusion> = out
            .into_iter()
            .map(|(p, w)| (p.name().to_owned(), w))
            .collect();
        assert_eq!(
            by["foo-source"],
            Exclusion::Name {
                pattern: "*-source".into()
            }
        );
        assert_eq!(
            by["hello.drv"],
            Exclusion::Name {
                pattern: "*.drv".into()
            }
        );
        assert_eq!(
            by["big-data"],
            Exclusion::Size {
                nar_size: 5000,
                max: 4096
            }
        );
        assert_eq!(by["foo-1.0"], Exclusion::Reference { path: src });
        assert_eq!(
            by["foo-wrapped"],
            Exclusion::Reference {
                path: sp("foo-1.0")
            }
        );
        assert_eq!(by.len(), 5);
        let mut left: Vec<&str> = to_push.keys().map(|p| p.name()).collect();
        left.sort();
        assert_eq!(left, ["bar-1.0", "libfoo-1.0"]);
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let e = Filter::new(&["*-source".into(), "foo[".into()], None).expect_err("invalid");
        assert_eq!(e.pattern, "foo[");
        assert!(
            e.to_string()
                .starts_with("exclude pattern \"foo[\" is not a valid glob: ")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4 GiB"), Ok(4 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(
            parse_size("4 parsecs"),
            Err("\"4 parsecs\": unknown unit \"parsecs\" (use KiB, MiB, GiB or TiB)".into())
        );
        assert_eq!(
            parse_size("big"),
            Err("\"big\" is not a size (write e.g. 4GiB, 512MiB or a byte count)".into())
        );
    }
}
