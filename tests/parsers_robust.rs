//! Every parser that reads outside input (narinfos from a cache, queue entries and socket
//! messages from other processes, the config file, hashes, store paths, keys) answers arbitrary
//! input with `Ok` or a clean `Err`, never a panic; and what it accepts it renders back
//! consistently.

use std::path::Path;

use nixpush::config::Config;
use nixpush::daemon::protocol::parse_request;
use nixpush::daemon::queue::parse_entry;
use nixpush::formats::cache_info::CacheInfo;
use nixpush::formats::signing::{PublicKey, SecretKey};
use nixpush::formats::{NarInfo, Sha256, StoreDir, nixbase32};
use proptest::prelude::*;

const NARINFO: &str = include_str!("fixtures/top.narinfo");

/// Text built from the pieces these formats are made of, so mutations reach deep branches.
fn formatish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("StorePath: ".to_owned()),
        Just("/nix/store/".to_owned()),
        Just("17ifnvpprbb5dv14hkvyddslzx15i6sz-x".to_owned()),
        Just("NarHash: sha256:".to_owned()),
        Just("NarSize: ".to_owned()),
        Just("References: ".to_owned()),
        Just("Sig: ".to_owned()),
        Just("URL: nar/x.nar".to_owned()),
        Just(": ".to_owned()),
        Just("\n".to_owned()),
        Just("^*".to_owned()),
        Just("{\"op\":\"enqueue\",\"items\":[".to_owned()),
        Just("\"".to_owned()),
        Just("[daemon]\n".to_owned()),
        Just(" = ".to_owned()),
        "[ -~]{0,12}",
        "\\PC{0,4}",
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn narinfo_parse_never_panics(s in formatish()) {
        if let Ok(ni) = NarInfo::parse(&s) {
            // What we accept, we can write, and reading that back gives the same thing.
            prop_assert_eq!(NarInfo::parse(&ni.render()).unwrap(), ni);
        }
    }

    #[test]
    fn narinfo_mutations(pos in 0usize..NARINFO.len(), byte in any::<u8>(), cut in any::<bool>()) {
        let mut bytes = NARINFO.as_bytes().to_vec();
        if cut { bytes.truncate(pos) } else { bytes[pos] = byte }
        if let Ok(text) = String::from_utf8(bytes) {
            let _ = NarInfo::parse(&text);
        }
    }

    #[test]
    fn queue_entries(s in formatish()) {
        let sd = StoreDir::new("/nix/store").unwrap();
        if let Ok(items) = parse_entry(&sd, &s) {
            prop_assert!(!items.is_empty());
            let again: Vec<String> = items.iter().map(|i| i.render(&sd)).collect();
            prop_assert_eq!(parse_entry(&sd, &again.join("\n")).unwrap(), items);
        }
    }

    #[test]
    fn socket_messages(bytes in proptest::collection::vec(any::<u8>(), 0..256), s in formatish()) {
        let _ = parse_request(&bytes);
        let _ = parse_request(s.as_bytes());
    }

    #[test]
    fn config_files(s in formatish()) {
        let _ = Config::parse(Path::new("fuzz.toml"), &s);
    }

    #[test]
    fn small_formats(s in formatish(), raw in "\\PC{0,80}") {
        for input in [&s, &raw] {
            let _ = Sha256::parse(input);
            let _ = nixbase32::decode(input);
            let _ = StoreDir::new("/nix/store").unwrap().parse(input);
            let _ = CacheInfo::parse(input);
            let _ = SecretKey::parse(input);
            if let Ok(pk) = PublicKey::parse(input) {
                prop_assert!(!pk.verify("1;/nix/store/x;sha256:0;1;", input));
            }
        }
    }
}

// Inputs that `cargo fuzz` (fuzz/run) found, kept as regression tests.

/// fuzz target narinfo: a last line ending in `\r` without `\n` lost its `\r` when written
/// back and read again (lines were split as Rust's `lines()` splits them, `\r\n` included);
/// lines now end at `\n` only, as Nix reads them, so the value keeps it both times.
#[test]
fn fuzz_narinfo_value_ending_in_a_carriage_return_round_trips() {
    let input: &[u8] = b"StorePath: /nifnvpprbHash: sha256:1cm1b2k9acj1gss6j42pxh74rc88lf9dsix58dp8gw8r9xcilmsy\n\
                  FileSiz`e: 21qa1w9gdfrb\x00\x00\x00\x00\x00:\x00\x00\x00\x00\x00\x00\x00\x00\x00\x006\n\
                  NarHash: sha256:1jbpwr0jydfjmw53sgqzs5p4fsf0yn3vfnfrvq4gslxjik7d5qd5\n\
                  NarSize: 344\n\
                  Referencel: 942\n\
                  gp8n88k870kndrpvwgz94ifz/store/qa1w9gdfrb\x00\x009ihibth: /nix/store/qa1w9gdfrb\x00\x00\x00\x00\x00:\x00\x00\x00\x00\x00\x003gqywp-hello.txt\n\
                  URL: nar/17gd6f7xiqw9ycz7zq4a.nar.xz\n\
                  Compbession: xz\n\
                  Fig: fixture-1:C0E/CMALpzRGvWCF7ge5f4hjXjUGWsLCBw=\x1d\r";
    let input = std::str::from_utf8(input).expect("UTF-8");
    let ni = NarInfo::parse(input).expect("parses");
    assert_eq!(NarInfo::parse(&ni.render()).expect("parses again"), ni);
    let fig = ni
        .unknown
        .iter()
        .find(|(k, _)| k == "Fig")
        .expect("Fig kept");
    assert!(fig.1.ends_with("=\x1d\r"), "{fig:?}");

    // The same with a line break after it, and on a known key.
    let crlf = NARINFO.replacen("\nURL: ", "\r\nURL: ", 1);
    let ni = NarInfo::parse(&crlf).expect("parses");
    assert_eq!(NarInfo::parse(&ni.render()).expect("parses again"), ni);
}
