//! Signing keys and narinfo signatures (`src/libutil/signature/local-keys.cc`,
//! `src/libstore/path-info.cc`).
//!
//! Key files, as `nix-store --generate-binary-cache-key NAME SECRET PUBLIC` writes them (no
//! trailing newline; we accept surrounding whitespace when reading):
//! - secret: `<name>:<base64 of 64 bytes: the 32-byte ed25519 seed, then the 32-byte public key>`
//! - public: `<name>:<base64 of the 32-byte public key>`
//!
//! A path is signed over its fingerprint ([`fingerprint`]):
//! `1;<store path>;sha256:<NarHash nixbase32>;<NarSize>;<reference store paths, sorted, joined by ",">`
//! and the narinfo carries `Sig: <name>:<base64 of the 64-byte detached ed25519 signature>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use std::fmt;

use super::hash::Sha256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not of the form <name>:<base64>")]
    Format,
    #[error("key name {0:?} is empty or contains whitespace")]
    Name(String),
    #[error("key {name:?}: the base64 part is not valid base64")]
    Base64 { name: String },
    #[error("key {name:?}: expected {expected} bytes, found {actual}")]
    Length {
        name: String,
        expected: usize,
        actual: usize,
    },
    #[error(
        "key {name:?} is a public key (32 bytes); the secret key (64 bytes) is the other file \
         of the pair"
    )]
    PublicNotSecret { name: String },
    #[error("key {name:?}: the public half does not match the secret half")]
    Mismatch { name: String },
    #[error("key {name:?}: not a valid ed25519 public key")]
    InvalidPublic { name: String },
}

fn split_key(s: &str) -> Result<(String, Vec<u8>), KeyError> {
    let (name, b64) = s.trim().split_once(':').ok_or(KeyError::Format)?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(KeyError::Name(name.to_owned()));
    }
    let bytes = BASE64.decode(b64).map_err(|_| KeyError::Base64 {
        name: name.to_owned(),
    })?;
    Ok((name.to_owned(), bytes))
}

/// A secret signing key. Its `Debug` never shows the key material.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_key(s)?;
        // The likeliest mistake: the `.pub` file of the pair where the secret one belongs.
        if bytes.len() == 32 && VerifyingKey::from_bytes(&bytes[..].try_into().expect("32")).is_ok()
        {
            return Err(KeyError::PublicNotSecret { name });
        }
        let bytes: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| KeyError::Length {
            name: name.clone(),
            expected: 64,
            actual: b.len(),
        })?;
        let seed: [u8; 32] = bytes[..32].try_into().expect("32 bytes");
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes() != &bytes[32..] {
            return Err(KeyError::Mismatch { name });
        }
        Ok(Self { name, key })
    }

    /// A new key from 32 bytes of randomness.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, KeyError> {
        if name.is_empty() || name.contains(char::is_whitespace) || name.contains(':') {
            return Err(KeyError::Name(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret key file's content.
    pub fn to_file_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// `<name>:<base64 signature>` over `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(sig.to_bytes()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_key(s)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| KeyError::Length {
            name: name.clone(),
            expected: 32,
            actual: b.len(),
        })?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::InvalidPublic { name: name.clone() })?;
        Ok(Self { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_file_string(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }

    /// Whether `sig` (`<name>:<base64>`) is this key's valid signature of `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = BASE64.decode(b64) else {
            return false;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
            return false;
        };
        self.key.verify_strict(fingerprint.as_bytes(), &sig).is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_file_string())
    }
}

/// The name part of a `Sig:` value.
pub fn signature_key_name(sig: &str) -> Option<&str> {
    sig.split_once(':').map(|(n, _)| n)
}

/// The string a narinfo signature signs. `store_path` and `references` are full paths;
/// references are sorted here, as Nix sorts them.
pub fn fingerprint(
    store_path: &str,
    nar_hash: &Sha256,
    nar_size: u64,
    references: &[String],
) -> String {
    let mut refs: Vec<&str> = references.iter().map(String::as_str).collect();
    refs.sort_unstable();
    format!(
        "1;{store_path};{};{nar_size};{}",
        nar_hash.to_nix_string(),
        refs.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip() {
        let sk = SecretKey::from_seed("test-1", [7; 32]).unwrap();
        let again = SecretKey::parse(&sk.to_file_string()).unwrap();
        let pk = PublicKey::parse(&again.public().to_file_string()).unwrap();
        let fp = "1;/nix/store/x;sha256:abc;1;";
        let sig = again.sign(fp);
        assert!(pk.verify(fp, &sig));
        assert!(!pk.verify("1;/nix/store/y;sha256:abc;1;", &sig));
        let other = SecretKey::from_seed("test-1", [8; 32]).unwrap().public();
        assert!(!other.verify(fp, &sig));
        assert!(!format!("{sk:?}").contains(&sk.to_file_string()[8..]));
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(SecretKey::parse("nocolon").unwrap_err(), KeyError::Format);
        assert!(matches!(
            SecretKey::parse("k:!!!"),
            Err(KeyError::Base64 { .. })
        ));
        assert!(matches!(
            SecretKey::parse("k:AAAA"),
            Err(KeyError::Length { actual: 3, .. })
        ));
        let mut bytes = SecretKey::from_seed("k", [1; 32])
            .unwrap()
            .key
            .to_keypair_bytes();
        bytes[40] ^= 1;
        assert!(matches!(
            SecretKey::parse(&format!("k:{}", BASE64.encode(bytes))),
            Err(KeyError::Mismatch { .. })
        ));
        // A public key given where a secret one is expected.
        let pk = SecretKey::from_seed("k", [1; 32]).unwrap().public();
        assert!(matches!(
            SecretKey::parse(&pk.to_file_string()),
            Err(KeyError::PublicNotSecret { name }) if name == "k"
        ));
        // Any other length is only the wrong length.
        assert!(matches!(
            SecretKey::parse(&format!("k:{}", BASE64.encode([7u8; 33]))),
            Err(KeyError::Length {
                expected: 64,
                actual: 33,
                ..
            })
        ));
    }
}
