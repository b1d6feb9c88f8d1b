//! Compression names and NAR file extensions as they appear in narinfos
//! (`src/libutil/compression.cc`, `BinaryCacheStore::addToStoreCommon`).
//!
//! | name    | extension   |
//! |---------|-------------|
//! | `none`  | `.nar`      |
//! | `xz`    | `.nar.xz`   |
//! | `bzip2` | `.nar.bz2`  |
//! | `zstd`  | `.nar.zst`  |

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Bzip2,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression {0:?} (expected one of: none, xz, bzip2, zstd)")]
pub struct UnknownCompression(pub String);

impl Compression {
    pub const ALL: [Compression; 4] = [Self::None, Self::Xz, Self::Bzip2, Self::Zstd];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Bzip2 => "bzip2",
            Self::Zstd => "zstd",
        }
    }

    /// The NAR file extension, including `.nar`.
    pub fn nar_extension(self) -> &'static str {
        match self {
            Self::None => ".nar",
            Self::Xz => ".nar.xz",
            Self::Bzip2 => ".nar.bz2",
            Self::Zstd => ".nar.zst",
        }
    }
}

impl FromStr for Compression {
    type Err = UnknownCompression;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| UnknownCompression(s.to_owned()))
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
