//! The NAR lister (`.ls` files), which reads NAR bytes as they stream past: any bytes give a
//! listing or a clean error, and how the bytes are cut into writes does not change the answer.
#![no_main]

use std::io::Write as _;

use libfuzzer_sys::fuzz_target;
use nixpush::formats::nar::Lister;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, nar)) = data.split_first() else {
        return;
    };
    let mut whole = Lister::new();
    let _ = whole.write_all(nar);
    let whole = whole.finish();
    let mut pieces = Lister::new();
    for chunk in nar.chunks(usize::from(cut).max(1)) {
        let _ = pieces.write_all(chunk);
    }
    assert_eq!(pieces.finish(), whole);
});
