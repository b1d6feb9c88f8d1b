//! `nix-cache-info`, the file at the root of every binary cache (`BinaryCacheStore::init`).
//! ```text
//! StoreDir: /nix/store
//! WantMassQuery: 1
//! Priority: 40
//! ```
//! Clients refuse a cache whose StoreDir differs from their own. Nix writes it only when absent.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    pub want_mass_query: bool,
    pub priority: Option<u32>,
}

pub const FILE_NAME: &str = "nix-cache-info";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("nix-cache-info has no StoreDir")]
    NoStoreDir,
    #[error("nix-cache-info line {0}: invalid Priority")]
    Priority(usize),
}

impl CacheInfo {
    pub fn new(store_dir: &str) -> Self {
        Self {
            store_dir: store_dir.to_owned(),
            want_mass_query: true,
            priority: Some(40),
        }
    }

    pub fn render(&self) -> String {
        let mut s = format!("StoreDir: {}\n", self.store_dir);
        if self.want_mass_query {
            s.push_str("WantMassQuery: 1\n");
        }
        if let Some(p) = self.priority {
            s.push_str(&format!("Priority: {p}\n"));
        }
        s
    }

    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut store_dir = None;
        let mut want_mass_query = false;
        let mut priority = None;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            // Nix skips lines without a colon (`BinaryCacheStore::init`); so do we.
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "StoreDir" => store_dir = Some(v.to_owned()),
                "WantMassQuery" => want_mass_query = v == "1",
                "Priority" => priority = Some(v.parse().map_err(|_| ParseError::Priority(i + 1))?),
                _ => {}
            }
        }
        Ok(Self {
            store_dir: store_dir.ok_or(ParseError::NoStoreDir)?,
            want_mass_query,
            priority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden() {
        // What cache.nixos.org serves and nixpush writes; `nix copy --to file://…` (Nix 2.8.0)
        // writes only the StoreDir line (see tests/formats_golden.rs).
        let nix = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
        assert_eq!(CacheInfo::new("/nix/store").render(), nix);
        assert_eq!(CacheInfo::parse(nix).unwrap(), CacheInfo::new("/nix/store"));
        assert_eq!(
            CacheInfo::parse("Priority: 1\n"),
            Err(ParseError::NoStoreDir)
        );
    }
}
