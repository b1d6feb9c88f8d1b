//! sha256 digests as Nix prints and reads them.
//!
//! Nix writes `sha256:<nixbase32>` in narinfos and fingerprints, and newer `nix path-info --json`
//! prints SRI (`sha256-<base64>`). Reading accepts every form Nix's `Hash::parseAny` accepts for
//! sha256: `sha256:` followed by nixbase32 (52), hex (64) or base64 (44), or SRI.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::fmt;

use super::nixbase32;

/// A sha256 digest: what NarHash and FileHash are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sha256 hash {input:?}: {reason}")]
pub struct ParseHashError {
    input: String,
    reason: &'static str,
}

impl Sha256 {
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(data).into())
    }

    /// `<nixbase32>`, as in NAR file names.
    pub fn to_nixbase32(&self) -> String {
        nixbase32::encode(&self.0)
    }

    /// `sha256:<nixbase32>`, as in narinfo fields and fingerprints.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", self.to_nixbase32())
    }

    /// `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(self.0))
    }

    pub fn parse(input: &str) -> Result<Self, ParseHashError> {
        let err = |reason| ParseHashError {
            input: input.to_owned(),
            reason,
        };
        let bytes = if let Some(rest) = input.strip_prefix("sha256-") {
            BASE64.decode(rest).map_err(|_| err("bad base64"))?
        } else if let Some(rest) = input.strip_prefix("sha256:") {
            match rest.len() {
                52 => nixbase32::decode(rest).map_err(|_| err("bad nixbase32"))?,
                64 => decode_hex(rest).ok_or_else(|| err("bad hex"))?,
                44 => BASE64.decode(rest).map_err(|_| err("bad base64"))?,
                _ => return Err(err("wrong length for sha256")),
            }
        } else {
            return Err(err("expected a sha256: or sha256- prefix"));
        };
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| err("wrong length for sha256"))?;
        Ok(Self(arr))
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_nixbase32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_forms_agree() {
        // `nix hash to-sri` / `to-base32` / `to-base16` of one NarHash, printed by Nix 2.8.
        let forms = [
            "sha256-k42M07Gh3iZSADkXb2QebFfKXD4XW1U4s5O2cTy+0Rk=",
            "sha256:06fipqy73dlkncw5anqp7rfclmvc3rj6y5rr0192dpm1n79qr3ck",
        ];
        let a = Sha256::parse(forms[0]).unwrap();
        let b = Sha256::parse(forms[1]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_sri(), forms[0]);
        assert_eq!(a.to_nix_string(), forms[1]);
        let hex: String = a.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(Sha256::parse(&format!("sha256:{hex}")).unwrap(), a);
    }

    #[test]
    fn rejects() {
        assert!(Sha256::parse("md5:abc").is_err());
        assert!(Sha256::parse("sha256:abc").is_err());
        assert!(Sha256::parse("sha256-AAAA").is_err());
    }
}
