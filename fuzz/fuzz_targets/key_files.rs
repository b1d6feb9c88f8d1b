//! Signing key files (`name:base64`), secret and public, as `--key-file`, `secret-key=` and
//! `trusted-public-keys` give them: a key that parses renders back to itself, a secret key's
//! signature verifies with its public key, and an arbitrary signature never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixpush::formats::signing::{PublicKey, SecretKey};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The key, then (after a line break) a fingerprint and a signature to check.
    let (key, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (fingerprint, sig) = rest.split_once('\n').unwrap_or((rest, ""));
    if let Ok(sk) = SecretKey::parse(key) {
        let again = SecretKey::parse(&sk.to_file_string()).expect("what we render parses");
        assert_eq!(again.to_file_string(), sk.to_file_string());
        let signature = sk.sign(fingerprint);
        assert!(sk.public().verify(fingerprint, &signature));
    }
    if let Ok(pk) = PublicKey::parse(key) {
        let again = PublicKey::parse(&pk.to_file_string()).expect("what we render parses");
        assert!(again == pk);
        let _ = pk.verify(fingerprint, sig);
    }
});
