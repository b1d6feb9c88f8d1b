//! End to end over SFTP and GCS, with the real `nixpush` binary and real Nix:
//! - `nixpush push --to sftp://...` into a directory served by OpenSSH's sshd;
//! - `nixpush push --to gs://...` into a bucket of fake-gcs-server.
//!
//! This Nix reads neither `sftp://` nor `gs://`, so what landed is checked directly: every
//! narinfo of the closure parses and says what Nix says about the path (hash, size,
//! references, signature), every NAR is there with the narinfo's size and decompresses to
//! exactly `nix-store --dump`. Then the objects, as files (the SFTP directory itself; the GCS
//! objects downloaded through the emulator's own API), are read by Nix as a `file://` cache:
//! `nix copy` substitutes the closure into a fresh store, signatures required. A second push
//! finds everything present and uploads nothing.
//!
//! The servers are the ones the backend tests use (`backends/tests/support/testbeds.rs`).

#![cfg(all(feature = "sftp", feature = "gcs"))]

mod common;

#[path = "../backends/tests/support/testbeds.rs"]
mod testbeds;

use std::fs;
use std::path::Path;

use common::*;
use testbeds as tb;

/// The cache directory `cache` holds the closure of `root` as Nix would: narinfos that say
/// what Nix says, signed by `key_name`, and NARs that decompress to `nix-store --dump`.
fn check_cache(cache: &Path, root: &str, key_name: &str) {
    let paths = closure_of(root);
    let local = nix_path_info(None, &[root.to_owned()]);
    assert_eq!(local.keys().cloned().collect::<Vec<_>>(), paths);
    let nix_hashes: Vec<String> = local.values().map(|i| i.nar_hash.clone()).collect();
    let expected: Vec<String> = paths
        .iter()
        .map(|p| format!("{}.narinfo", hash_part(p)))
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        narinfo_files(cache),
        expected_sorted,
        "the narinfos in the cache"
    );
    assert!(cache.join("nix-cache-info").is_file(), "no nix-cache-info");
    for ((path, info), nar_hash) in local.iter().zip(nix_to_base32(&nix_hashes)) {
        let ni = RawNarInfo::read(cache, path);
        let ctx = format!("narinfo of {path}:\n{}", ni.text);
        assert_eq!(ni.one("StorePath"), path, "{ctx}");
        assert_eq!(ni.one("NarHash"), nar_hash, "{ctx}");
        assert_eq!(ni.one("NarSize"), info.nar_size.to_string(), "{ctx}");
        let refs: Vec<&str> = info.references.iter().map(|r| base_name(r)).collect();
        assert_eq!(ni.one("References"), refs.join(" "), "{ctx}");
        assert!(
            ni.all("Sig")
                .iter()
                .any(|s| s.starts_with(&format!("{key_name}:"))),
            "no signature by {key_name}; {ctx}"
        );
        let nar = cache.join(ni.one("URL"));
        let size = fs::metadata(&nar)
            .unwrap_or_else(|e| panic!("{}: {e}; {ctx}", nar.display()))
            .len();
        assert_eq!(ni.one("FileSize"), size.to_string(), "{ctx}");
        let ours = digest_stream(decompressor(
            fs::File::open(&nar).expect("open NAR"),
            ni.one("Compression"),
        ))
        .unwrap_or_else(|e| panic!("cannot decompress {}: {e}", nar.display()));
        assert_eq!(
            ours,
            nix_dump_digest(path),
            "{} does not decompress to `nix-store --dump {path}`",
            nar.display()
        );
    }
}

/// Nix itself substitutes the closure of `root` from `cache` (as `file://`) into a fresh
/// store, trusting only `keys`.
fn nix_substitutes(cache: &Path, keys: &KeyPair, root: &str, scratch: &Path) {
    let store = scratch.join("fresh-store");
    let out = run_ok(&mut nix_copy_cmd(
        cache,
        &store,
        &keys.public_key(),
        &[root.to_owned()],
    ));
    for p in closure_of(root) {
        assert!(
            valid_in_root(&store, &p),
            "{p} not substituted into {}: {}",
            store.display(),
            out.report()
        );
    }
}

#[test]
fn sftp_push_lands_a_cache_nix_can_read() {
    let Some(sshd) = tb::sshd() else { return };
    let c = small_closure();
    let tmp = tempdir();
    let name = "e2e-sftp.example.org-1";
    let keys = nixpush_keygen(tmp.path(), name);
    // A directory that does not exist yet, two levels down.
    let cache = sshd.fresh_dir("e2e").join("caches/main");
    let to = sshd.address(&cache);

    let first = push(&to, &keys, &c.small);
    assert_eq!(pushed_count(&first), c.all().len(), "{}", first.report());
    check_cache(&cache, &c.small, name);
    let leftovers: Vec<_> = fs::read_dir(cache.join("nar"))
        .expect("nar directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".nixpush-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let second = push(&to, &keys, &c.small);
    assert_eq!(pushed_count(&second), 0, "{}", second.report());

    nix_substitutes(&cache, &keys, &c.small, tmp.path());

    // A wrong host key stops the push, and says why.
    let bad_kh = tmp.path().join("known_hosts");
    fs::write(&bad_kh, "").unwrap();
    let refused = run_fail(
        nixpush()
            .arg("push")
            .arg("--to")
            .arg(format!(
                "sftp://{}@127.0.0.1:{}{}?identity={}&known-hosts={}",
                sshd.user,
                sshd.port,
                cache.display(),
                sshd.client_key.display(),
                bad_kh.display()
            ))
            .arg("--key-file")
            .arg(&keys.secret)
            .arg(&c.small),
    );
    assert!(refused.stderr.contains("host key"), "{}", refused.report());
}

#[test]
fn gcs_push_lands_a_cache_nix_can_read() {
    let Some(g) = tb::fake_gcs() else { return };
    let c = small_closure();
    let tmp = tempdir();
    let name = "e2e-gcs.example.org-1";
    let keys = nixpush_keygen(tmp.path(), name);
    let bucket = "e2e-cache";
    g.create_bucket(bucket);
    let prefix = tb::unique("cache");
    let to = g.address(bucket, &prefix);

    let first = push(&to, &keys, &c.small);
    assert_eq!(pushed_count(&first), c.all().len(), "{}", first.report());
    let second = push(&to, &keys, &c.small);
    assert_eq!(pushed_count(&second), 0, "{}", second.report());

    // Download every object under the prefix through the emulator's JSON API.
    let (status, listing) = tb::http_request(
        g.port,
        "GET",
        &format!("/storage/v1/b/{bucket}/o?prefix={prefix}/"),
        "",
    );
    assert_eq!(status, 200, "{listing}");
    let listing: serde_json::Value = serde_json::from_str(&listing).expect("listing JSON");
    let names: Vec<String> = listing["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["name"].as_str().expect("name").to_owned())
        .collect();
    assert!(
        listing.get("nextPageToken").is_none(),
        "more objects than one page"
    );
    let cache = tmp.path().join("downloaded");
    for name in &names {
        let rel = name
            .strip_prefix(&format!("{prefix}/"))
            .unwrap_or_else(|| panic!("{name} outside the prefix"));
        let encoded: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
        let (status, body) = tb::http_request_bytes(
            g.port,
            "GET",
            &format!("/storage/v1/b/{bucket}/o/{encoded}?alt=media"),
            b"",
        );
        assert_eq!(status, 200, "downloading {name}");
        let dest = cache.join(rel);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::write(&dest, body).unwrap();
    }
    check_cache(&cache, &c.small, name);
    // Only what belongs in a cache: narinfos, NARs and nix-cache-info, and one announcement
    // a push (read by `nixpush gc --keep-since`).
    let announcements = names
        .iter()
        .filter(|n| n.starts_with(&format!("{prefix}/nixpush/announce/")))
        .count();
    assert_eq!(announcements, 2, "{names:?}");
    assert_eq!(names.len(), 2 * c.all().len() + 1 + 2, "{names:?}");

    nix_substitutes(&cache, &keys, &c.small, tmp.path());
}
