//! The daemon's socket protocol: a request line as the daemon reads it, and an answer as the
//! hook and `nixpush status` read it. Whatever parses renders back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixpush::daemon::protocol::{Response, parse_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        let again = serde_json::to_vec(&req).expect("a request renders");
        assert_eq!(parse_request(&again).expect("what we render parses"), req);
    }
    if let Ok(resp) = serde_json::from_slice::<Response>(data) {
        let again = serde_json::to_vec(&resp).expect("an answer renders");
        let back: Response = serde_json::from_slice(&again).expect("what we render parses");
        assert_eq!(back, resp);
    }
});
