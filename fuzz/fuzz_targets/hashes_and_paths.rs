//! Hashes in every form Nix writes them, nixbase32, and store paths: parse or fail cleanly,
//! and what parses renders back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixpush::formats::{Sha256, StoreDir, nixbase32};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(h) = Sha256::parse(text) {
        assert_eq!(Sha256::parse(&h.to_nix_string()).expect("renders"), h);
        assert_eq!(Sha256::parse(&h.to_sri()).expect("renders"), h);
    }
    if let Ok(bytes) = nixbase32::decode(text) {
        assert_eq!(
            nixbase32::decode(&nixbase32::encode(&bytes)).expect("renders"),
            bytes
        );
    }
    if let Ok(sd) = StoreDir::new(text) {
        let _ = sd.parse(&format!("{text}/00000000000000000000000000000000-x"));
    }
    let sd = StoreDir::new("/nix/store").expect("a store dir");
    if let Ok(p) = sd.parse(text) {
        assert_eq!(sd.parse(&sd.display(&p)).expect("renders"), p);
    }
});
