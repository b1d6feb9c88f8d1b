//! Cache addresses (`file:///p?compression=xz`, `s3://b?region=…`): split into the backend's
//! part and Nix's store parameters without panicking; the backend's part parses again to
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixpush::address::Address;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(a) = Address::parse(text) {
        let again = Address::parse(&a.backend).expect("the backend's part parses");
        assert_eq!(again.backend, a.backend);
        assert_eq!(again.compression, None);
        assert_eq!(again.secret_key, None);
    }
});
