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
