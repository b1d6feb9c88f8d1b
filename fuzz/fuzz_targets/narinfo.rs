//! Narinfos, as read from a cache that anyone may have written: whatever parses renders back
//! to the same narinfo.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixpush::formats::NarInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ni) = NarInfo::parse(text) {
        let rendered = ni.render();
        assert_eq!(
            NarInfo::parse(&rendered).expect("what we render parses"),
            ni
        );
    }
});
