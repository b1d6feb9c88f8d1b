//! Nix's base-32 encoding (`src/libutil/base-nix-32.cc`).
//!
//! Not RFC 4648: the alphabet is `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `u`, `t`), there
//! is no padding, and `n` bytes become `ceil(8n / 5)` characters. Character `i` from the left is
//! the 5-bit group that starts at bit `(len - 1 - i) * 5` of the input read as a little-endian
//! number, so the *last* input byte drives the *first* characters. A sha256 is 52 characters, a
//! store path hash (160 bits) 32.
//!
//! ```
//! use nixpush::formats::nixbase32;
//! assert_eq!(nixbase32::encode(&[0xff; 4]), "3zzzzzz");
//! assert_eq!(nixbase32::decode("3zzzzzz").unwrap(), vec![0xff; 4]);
//! ```

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not nixbase32 of the expected size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid nixbase32 character {0:?}")]
    InvalidChar(char),
    #[error("nixbase32 string has bits beyond the decoded length")]
    TrailingBits,
    #[error("nixbase32 string has length {actual}, expected {expected}")]
    Length { expected: usize, actual: usize },
}

/// Length of the encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 { 0 } else { (n * 8 - 1) / 5 + 1 }
}

/// Length in bytes of a valid encoding of `len` characters.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = u16::from(input[i]) >> j;
        let hi = input.get(i + 1).map_or(0, |&c| u16::from(c) << (8 - j));
        out.push(ALPHABET[usize::from((lo | hi) & 0x1f)] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    // A 128-entry table would be faster; hashes are short and this is not on a hot path.
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

pub fn decode(input: &str) -> Result<Vec<u8>, DecodeError> {
    let bytes = input.as_bytes();
    let mut out = vec![0u8; decoded_len(bytes.len())];
    for (pos, &c) in bytes.iter().enumerate() {
        let d = digit(c).ok_or_else(|| {
            DecodeError::InvalidChar(input[pos..].chars().next().unwrap_or('\u{fffd}'))
        })?;
        let n = bytes.len() - 1 - pos;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let wide = u16::from(d) << j;
        match out.get_mut(i) {
            Some(slot) => *slot |= wide as u8,
            None if d != 0 => return Err(DecodeError::TrailingBits),
            None => {}
        }
        let carry = (wide >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(slot) => *slot |= carry,
            None if carry != 0 => return Err(DecodeError::TrailingBits),
            None => {}
        }
    }
    Ok(out)
}

/// Decode into exactly `N` bytes.
pub fn decode_fixed<const N: usize>(input: &str) -> Result<[u8; N], DecodeError> {
    if input.len() != encoded_len(N) {
        return Err(DecodeError::Length {
            expected: encoded_len(N),
            actual: input.len(),
        });
    }
    let v = decode(input)?;
    let mut out = [0u8; N];
    out.copy_from_slice(&v);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden() {
        // From Nix: `nix hash to-base32 --type sha256` of the sha256 of the empty string.
        let empty_sha256 = hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(
            encode(&empty_sha256),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(decode("0z").unwrap(), vec![0x1f]);
    }

    #[test]
    fn rejects() {
        assert_eq!(decode("e"), Err(DecodeError::InvalidChar('e')));
        // 2 chars carry 10 bits but decode into 1 byte: the top 2 bits must be zero.
        assert_eq!(decode("zz"), Err(DecodeError::TrailingBits));
        assert!(matches!(
            decode_fixed::<32>("abc"),
            Err(DecodeError::Length { .. })
        ));
    }

    pub(crate) fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&s).unwrap(), bytes);
        }
    }
}
