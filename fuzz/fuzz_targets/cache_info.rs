//! `nix-cache-info`, as read from a cache: whatever parses renders back to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixpush::formats::cache_info::CacheInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = CacheInfo::parse(text) {
        // A StoreDir with a line break in it cannot be written back as one line.
        if info.store_dir.contains(['\n', '\r']) {
            return;
        }
        let again = CacheInfo::parse(&info.render()).expect("what we render parses");
        assert_eq!(again, info);
    }
});
