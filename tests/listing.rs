//! NAR listings (`<hash>.ls`), opt-in as Nix's own store parameter is
//! (`?write-nar-listing=true`): what nixpush writes is what Nix writes for the same path, and
//! `nix store ls` reads the pushed path back from the cache.

mod common;

use std::fs;

use common::*;

/// The listing a cache holds for `path`, parsed.
fn listing(cache: &std::path::Path, path: &str) -> serde_json::Value {
    let file = cache.join(format!("{}.ls", hash_part(path)));
    let text = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

#[test]
fn listings_are_what_nix_writes_and_nix_reads_the_path_back() {
    let c = small_closure();
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "listing-1");
    let ours = dir.path().join("ours");
    let addr = format!("file://{}?write-nar-listing=true", ours.display());
    let pushed = push(&addr, &keys, &c.small);
    assert_eq!(pushed_count(&pushed), 4, "{}", pushed.report());

    let theirs = dir.path().join("theirs");
    run_ok(
        nix()
            .args(["copy", "--to"])
            .arg(format!(
                "file://{}?write-nar-listing=true&compression=none",
                theirs.display()
            ))
            .arg(&c.small),
    );
    for p in c.all() {
        assert_eq!(
            listing(&ours, &p),
            listing(&theirs, &p),
            "the listings of {p} differ"
        );
    }
    // Every node kind is there: the small path holds files, an executable, a symlink and
    // directories.
    let root = &listing(&ours, &c.small)["root"];
    assert_eq!(root["type"], "directory", "{root}");

    let out = run_ok(
        nix()
            .args(["store", "ls", "-lR", "--store"])
            .arg(format!("file://{}", ours.display()))
            .arg(&c.small),
    );
    assert!(!out.stdout.trim().is_empty(), "{}", out.report());
    for name in root["entries"].as_object().expect("entries").keys() {
        assert!(
            out.stdout.contains(name.as_str()),
            "{name} not listed: {}",
            out.report()
        );
    }
}

#[test]
fn without_the_parameter_no_listing_is_written_and_a_bad_value_is_refused() {
    let c = small_closure();
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "listing-2");
    let cache = dir.path().join("cache");
    push(cache.to_str().unwrap(), &keys, &c.leaf);
    assert!(
        dir_names(&cache, |n| n.ends_with(".ls")).is_empty(),
        "a listing was written unasked"
    );
    let addr = format!("file://{}?write-nar-listing=maybe", cache.display());
    let out = run_fail(&mut push_cmd(nixpush(), &addr, &keys, &c.leaf));
    assert!(
        out.stderr
            .contains("write-nar-listing must be true or false"),
        "{}",
        out.report()
    );
}
