//! `.narinfo` files (`src/libstore/nar-info.cc`; manual `protocols/binary-cache/narinfo.md`).
//!
//! A cache holds `<hash part>.narinfo` (`Content-Type: text/x-nix-narinfo`) for every path: lines
//! of `Key: value\n`, written in this order:
//! ```text
//! StorePath: /nix/store/<hash>-<name>
//! URL: nar/<FileHash nixbase32>.nar.xz
//! Compression: xz
//! FileHash: sha256:<nixbase32>
//! FileSize: <bytes>
//! NarHash: sha256:<nixbase32>
//! NarSize: <bytes>
//! References: <base name> <base name> ...   (always present, may be empty, sorted)
//! Deriver: <base name>.drv                  (if known)
//! Sig: <key name>:<base64>                  (zero or more)
//! CA: <content address>                     (content-addressed paths only)
//! ```
//! When reading, lines end at `\n` (a `\r` before it is part of the value, as for Nix),
//! StorePath, URL, NarHash and NarSize (> 0) are required, a missing Compression
//! means bzip2, and unknown keys are ignored by Nix; we keep them aside in
//! [`NarInfo::unknown`] and write them after the known ones so that rewriting a narinfo made by a
//! newer tool does not drop what it said.

use super::hash::Sha256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// Full store path.
    pub store_path: String,
    pub url: String,
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Base names, sorted.
    pub references: Vec<String>,
    /// Base name.
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// Keys this module does not know, in the order read.
    pub unknown: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("narinfo line {line}: expected 'Key: value'")]
    Syntax { line: usize },
    #[error("narinfo line {line}: invalid {key}: {value:?}")]
    Value {
        line: usize,
        key: &'static str,
        value: String,
    },
    #[error("narinfo lacks the required field {0}")]
    Missing(&'static str),
    #[error("narinfo field {0} appears twice")]
    Duplicate(&'static str),
}

impl NarInfo {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(512);
        let mut line = |k: &str, v: &str| {
            let _ = writeln!(s, "{k}: {v}");
        };
        line("StorePath", &self.store_path);
        line("URL", &self.url);
        line("Compression", &self.compression);
        if let Some(h) = &self.file_hash {
            line("FileHash", &h.to_nix_string());
        }
        if let Some(n) = self.file_size {
            line("FileSize", &n.to_string());
        }
        line("NarHash", &self.nar_hash.to_nix_string());
        line("NarSize", &self.nar_size.to_string());
        line("References", &self.references.join(" "));
        if let Some(d) = &self.deriver {
            line("Deriver", d);
        }
        for sig in &self.sigs {
            line("Sig", sig);
        }
        if let Some(ca) = &self.ca {
            line("CA", ca);
        }
        for (k, v) in &self.unknown {
            line(k, v);
        }
        s
    }

    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut unknown = Vec::new();

        // Lines end at '\n' only, as Nix reads them (`NarInfo::NarInfo`): a '\r' before it
        // belongs to the value, so that what we read we write back the same.
        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            if raw.is_empty() {
                continue;
            }
            let (key, value) = raw.split_once(": ").ok_or(ParseError::Syntax { line })?;
            let value_err = |key: &'static str| ParseError::Value {
                line,
                key,
                value: value.to_owned(),
            };
            fn set<T>(slot: &mut Option<T>, v: T, key: &'static str) -> Result<(), ParseError> {
                if slot.replace(v).is_some() {
                    return Err(ParseError::Duplicate(key));
                }
                Ok(())
            }
            match key {
                "StorePath" => set(&mut store_path, value.to_owned(), "StorePath")?,
                "URL" => set(&mut url, value.to_owned(), "URL")?,
                "Compression" => set(&mut compression, value.to_owned(), "Compression")?,
                "FileHash" => set(
                    &mut file_hash,
                    Sha256::parse(value).map_err(|_| value_err("FileHash"))?,
                    "FileHash",
                )?,
                "FileSize" => set(
                    &mut file_size,
                    value.parse().map_err(|_| value_err("FileSize"))?,
                    "FileSize",
                )?,
                "NarHash" => set(
                    &mut nar_hash,
                    Sha256::parse(value).map_err(|_| value_err("NarHash"))?,
                    "NarHash",
                )?,
                "NarSize" => set(
                    &mut nar_size,
                    value
                        .parse::<u64>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| value_err("NarSize"))?,
                    "NarSize",
                )?,
                "References" => set(
                    &mut references,
                    value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    "References",
                )?,
                "Deriver" => {
                    // Nix writes no Deriver line for an unknown deriver; old tools wrote "unknown-deriver".
                    if value != "unknown-deriver" {
                        set(&mut deriver, value.to_owned(), "Deriver")?;
                    }
                }
                "Sig" => sigs.push(value.to_owned()),
                "CA" => set(&mut ca, value.to_owned(), "CA")?,
                _ => unknown.push((key.to_owned(), value.to_owned())),
            }
        }
        // "References: " with nothing after it has no ": " split point once trimmed by some
        // writers; Nix treats a missing References line as no references.
        Ok(Self {
            store_path: store_path.ok_or(ParseError::Missing("StorePath"))?,
            url: url.ok_or(ParseError::Missing("URL"))?,
            compression: compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(ParseError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(ParseError::Missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            sigs,
            ca,
            unknown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `nix copy --to file://…` (Nix 2.8.0); see tests/fixtures/README.md.
    const NIX_WRITTEN: &str = include_str!("../../tests/fixtures/hello.narinfo");

    #[test]
    fn golden_round_trip() {
        let ni = NarInfo::parse(NIX_WRITTEN).unwrap();
        assert_eq!(ni.render(), NIX_WRITTEN);
        assert_eq!(ni.compression, "xz");
        assert!(ni.unknown.is_empty());
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let text = "StorePath: /nix/store/x-y\nURL: nar/a.nar\nNarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: 8\nFuture: thing\n";
        let ni = NarInfo::parse(text).unwrap();
        assert_eq!(ni.compression, "bzip2");
        assert_eq!(ni.unknown, vec![("Future".into(), "thing".into())]);
        assert!(ni.render().ends_with("Future: thing\n"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            NarInfo::parse("URL: x\n").unwrap_err(),
            ParseError::Missing("StorePath")
        );
        assert_eq!(
            NarInfo::parse("garbage\n").unwrap_err(),
            ParseError::Syntax { line: 1 }
        );
        assert!(matches!(
            NarInfo::parse("StorePath: a\nURL: b\nNarHash: sha256:00\nNarSize: 1\n"),
            Err(ParseError::Value { key: "NarHash", .. })
        ));
        assert!(matches!(
            NarInfo::parse("StorePath: a\nStorePath: b\n"),
            Err(ParseError::Duplicate("StorePath"))
        ));
    }
}
