//! Queue entries, as the daemon reads a file that anyone may drop into the queue directory:
//! whatever parses renders back to the same items.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixpush::daemon::queue::parse_entry;
use nixpush::formats::StoreDir;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sd = StoreDir::new("/nix/store").expect("a store dir");
    if let Ok(items) = parse_entry(&sd, text) {
        let rendered: Vec<String> = items.iter().map(|i| i.render(&sd)).collect();
        let again = parse_entry(&sd, &rendered.join("\n")).expect("what we render parses");
        assert_eq!(again, items);
    }
});
