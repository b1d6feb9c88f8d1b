//! `nixpush verify` and `--repair`, with the real binary and real Nix: caches with one planted
//! fault each, every fault found and named in the words of its line; a clean cache exits 0;
//! `--repair` mends what the local store can give, removes what it cannot (referrers first),
//! and afterwards `verify` exits 0 and Nix substitutes the paths with `require-sigs = true`.
//! Most caches are directories; one test runs over SeaweedFS (S3), a store that lists.

mod common;

#[cfg(feature = "s3")]
#[path = "../backends/tests/support/testbeds.rs"]
mod testbeds;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;

/// A directory cache holding the small closure, signed with a key of its own.
struct Cache {
    tmp: TestDir,
    dir: PathBuf,
    keys: KeyPair,
}

impl Cache {
    /// `nixpush push --compression COMPRESSION` of the small closure into a fresh directory.
    fn new(compression: &str) -> Self {
        let c = small_closure();
        let tmp = tempdir();
        let keys = nixpush_keygen(tmp.path(), "verify.example.org-1");
        let dir = tmp.path().join("cache");
        let mut cmd = push_cmd(nixpush(), dir.to_str().expect("utf-8"), &keys, &c.small);
        run_ok(cmd.args(["--compression", compression]));
        Self { tmp, dir, keys }
    }

    /// `nixpush verify CACHE --trusted-key PUB ARGS`, whatever its exit status.
    fn verify(&self, args: &[&str]) -> Out {
        run(nixpush()
            .arg("verify")
            .arg(&self.dir)
            .arg("--trusted-key")
            .arg(self.keys.public_key())
            .args(args))
    }

    /// `verify` that must find the cache whole.
    fn verify_whole(&self, args: &[&str]) -> Out {
        let out = self.verify(args);
        assert!(
            out.status.success(),
            "verify should find the cache whole: {}",
            out.report()
        );
        assert!(out.stdout.contains("is whole"), "{}", out.report());
        assert!(!out.stdout.contains("error:"), "{}", out.report());
        out
    }

    /// `verify` that must fail, naming the problem in `line` (a substring of one output line).
    fn verify_finds(&self, args: &[&str], line: &str) -> Out {
        let out = self.verify(args);
        assert_eq!(out.status.code(), Some(1), "{}", out.report());
        assert!(
            out.stdout.lines().any(|l| l.contains(line)),
            "no line with {line:?} in {}",
            out.report()
        );
        assert!(out.stdout.contains("is NOT whole"), "{}", out.report());
        out
    }

    /// `verify --repair --key-file SECRET ARGS`, which must succeed.
    fn repair(&self, args: &[&str]) -> Out {
        run_ok(
            nixpush()
                .arg("verify")
                .arg(&self.dir)
                .arg("--repair")
                .arg("--key-file")
                .arg(&self.keys.secret)
                .args(args),
        )
    }

    fn narinfo_file(&self, path: &str) -> PathBuf {
        self.dir.join(format!("{}.narinfo", hash_part(path)))
    }

    /// The NAR file of `path`, and its key (`nar/…`).
    fn nar(&self, path: &str) -> (PathBuf, String) {
        let url = RawNarInfo::read(&self.dir, path).one("URL").to_owned();
        (self.dir.join(&url), url)
    }

    /// Real Nix substitutes `paths` (and their closures) from the cache into a fresh store,
    /// signatures required.
    fn assert_nix_substitutes(&self, paths: &[String]) {
        let root = self.tmp.path().join(unique("root"));
        let out = run_ok(&mut nix_copy_cmd(
            &self.dir,
            &root,
            &self.keys.public_key(),
            paths,
        ));
        for p in paths {
            assert!(valid_in_root(&root, p), "{p}: {}", out.report());
        }
    }
}

/// `<hash>.narinfo (<path>)`, as verify names a narinfo.
fn named(path: &str) -> String {
    format!("{}.narinfo ({path})", hash_part(path))
}

fn set_age(file: &Path, age: Duration) {
    fs::File::options()
        .write(true)
        .open(file)
        .expect("open")
        .set_modified(SystemTime::now() - age)
        .expect("set mtime");
}

fn nar_files(cache: &Path) -> Vec<String> {
    dir_names(&cache.join("nar"), |n| !n.starts_with('.'))
}

#[test]
fn a_clean_cache_is_whole() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    let out = cache.verify_whole(&[]);
    assert!(
        out.stdout.contains("checked 4 narinfos"),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.contains("signatures by verify.example.org-1"),
        "{}",
        out.report()
    );
    let deep = cache.verify_whole(&["--deep"]);
    assert!(
        deep.stdout.contains("and 4 NARs"),
        "every NAR was read: {}",
        deep.report()
    );
    let json = cache.verify(&["--deep", "--json"]);
    assert!(json.status.success(), "{}", json.report());
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(v["whole"], true, "{}", json.stdout);
    assert_eq!(v["narinfos"], 4);
    assert_eq!(v["nars_read"], 4);
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0));
    cache.assert_nix_substitutes(std::slice::from_ref(&c.small));
}

#[test]
fn a_deleted_nar_is_found() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    let (file, url) = cache.nar(&c.leaf);
    fs::remove_file(&file).expect("remove NAR");
    let line = format!("error: {}: its NAR {url} is missing", named(&c.leaf));
    cache.verify_finds(&[], &line);
    cache.verify_finds(&["--deep"], &line);
    let json = cache.verify(&["--json"]);
    assert_eq!(json.status.code(), Some(1), "{}", json.report());
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(v["whole"], false);
    let problems = v["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 1, "{}", json.stdout);
    assert_eq!(problems[0]["kind"], "nar_missing");
    assert_eq!(problems[0]["nar"], url.as_str());
    assert_eq!(problems[0]["path"], c.leaf.as_str());
    assert_eq!(
        problems[0]["object"],
        format!("{}.narinfo", hash_part(&c.leaf))
    );
    // What --repair --json says it did, and what the verify after it found.
    let out = cache.repair(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(v["whole"], true, "{}", out.stdout);
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["repair"]["republished"], serde_json::json!([c.leaf]));
    assert_eq!(v["repair"]["removed"], serde_json::json!([]));
    assert_eq!(v["after_repair"]["whole"], true);
    cache.verify_whole(&["--deep"]);
}

#[test]
fn a_truncated_nar_is_found() {
    let c = small_closure();
    let cache = Cache::new("xz");
    let (file, url) = cache.nar(&c.small);
    let bytes = fs::read(&file).expect("NAR");
    let expected = bytes.len();
    fs::write(&file, &bytes[..expected / 2]).expect("truncate");
    // Without --deep: a directory tells the size without reading the NAR.
    let line = format!(
        "error: {}: its NAR {url} is {} bytes, but FileSize says {expected} (truncated or replaced)",
        named(&c.small),
        expected / 2
    );
    cache.verify_finds(&[], &line);
    let deep = cache.verify_finds(&["--deep"], &line);
    assert!(
        deep.stdout
            .contains(&format!("its NAR {url} cannot be decompressed as xz")),
        "{}",
        deep.report()
    );
}

#[test]
fn a_flipped_byte_is_found_by_deep() {
    let c = small_closure();
    let cache = Cache::new("none");
    let (file, url) = cache.nar(&c.leaf);
    corrupt_at(&file, b"leaf ", b'L');
    // Same size: only reading it can tell.
    cache.verify_whole(&[]);
    let ni = RawNarInfo::read(&cache.dir, &c.leaf);
    let out = cache.verify_finds(
        &["--deep"],
        &format!("error: {}: its NAR {url} hashes to sha256:", named(&c.leaf)),
    );
    assert!(
        out.stdout.contains(&format!(
            "but FileHash says {}: the file is damaged",
            ni.one("FileHash")
        )),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.contains(&format!(
            "but NarHash and NarSize say {} and {} bytes",
            ni.one("NarHash"),
            ni.one("NarSize")
        )),
        "{}",
        out.report()
    );
}

#[test]
fn a_wrong_or_missing_signature_is_found() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    // The leaf's signature is replaced by the link's (well-formed, right key, wrong path);
    // the link's is removed.
    let link_sig = RawNarInfo::read(&cache.dir, &c.link).all("Sig")[0].clone();
    let leaf_file = cache.narinfo_file(&c.leaf);
    let text = fs::read_to_string(&leaf_file).expect("narinfo");
    let replaced: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Sig: ") {
                format!("Sig: {link_sig}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_ne!(replaced, text);
    fs::write(&leaf_file, replaced).expect("write");
    let link_file = cache.narinfo_file(&c.link);
    let text = fs::read_to_string(&link_file).expect("narinfo");
    let unsigned: String = text
        .lines()
        .filter(|l| !l.starts_with("Sig: "))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&link_file, unsigned).expect("write");

    let out = cache.verify_finds(
        &[],
        &format!(
            "error: {}: its signature by verify.example.org-1 does not verify",
            named(&c.leaf)
        ),
    );
    assert!(
        out.stdout.contains(&format!(
            "error: {}: has no signature by a trusted key (trusted: verify.example.org-1; \
             signed by: none)",
            named(&c.link)
        )),
        "{}",
        out.report()
    );
    // Trusting another key: every narinfo is unsigned as far as that key goes.
    let other = nixpush_keygen(cache.tmp.path(), "other.example.org-1");
    let out = run(nixpush()
        .arg("verify")
        .arg(&cache.dir)
        .arg("--trusted-key")
        .arg(&other.public));
    assert_eq!(out.status.code(), Some(1), "{}", out.report());
    assert!(
        out.stdout.contains(&format!(
            "error: {}: has no signature by a trusted key (trusted: other.example.org-1; \
             signed by: verify.example.org-1)",
            named(&c.small)
        )),
        "{}",
        out.report()
    );
}

#[test]
fn an_unsigned_content_addressed_path_is_whole_as_nix_takes_it() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    let file = cache.narinfo_file(&c.text);
    let text = fs::read_to_string(&file).expect("narinfo");
    assert!(text.contains("\nCA: text:sha256:"), "{text}");
    let unsigned: String = text
        .lines()
        .filter(|l| !l.starts_with("Sig: "))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&file, &unsigned).expect("write");
    // Its content address implies its path: Nix needs no signature, and neither does verify.
    cache.verify_whole(&[]);
    cache.assert_nix_substitutes(std::slice::from_ref(&c.text));
    // With another address it proves nothing, and is unsigned.
    let other = RawNarInfo::read(&cache.dir, &c.leaf);
    let forged: String = unsigned
        .lines()
        .map(|l| match l.strip_prefix("CA: ") {
            Some(_) => format!("CA: text:{}\n", other.one("NarHash")),
            None => format!("{l}\n"),
        })
        .collect();
    fs::write(&file, forged).expect("write");
    cache.verify_finds(
        &[],
        &format!(
            "error: {}: has no signature by a trusted key (trusted: verify.example.org-1; \
             signed by: none)",
            named(&c.text)
        ),
    );
    let root = cache.tmp.path().join("forged-root");
    let out = run(&mut nix_copy_cmd(
        &cache.dir,
        &root,
        &cache.keys.public_key(),
        std::slice::from_ref(&c.text),
    ));
    // Nix 2.8 refuses with an error; Nix 2.34 aborts on an assertion that the address it
    // computed is the path it copies (a crash, but a refusal all the same). Anything else
    // is not what either does.
    let refused = out.status.code().is_some_and(|c| c != 0)
        || out
            .stderr
            .contains("Assertion 'storePathForDst == storePathForSrc' failed");
    assert!(
        refused,
        "Nix should have refused the forged path: {}",
        out.report()
    );
    assert!(!valid_in_root(&root, &c.text), "{}", out.report());
}

#[test]
fn a_missing_reference_is_found() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    let (_, leaf_nar) = cache.nar(&c.leaf);
    fs::remove_file(cache.narinfo_file(&c.leaf)).expect("remove narinfo");
    for referrer in [&c.link, &c.small] {
        cache.verify_finds(
            &[],
            &format!(
                "error: {}: refers to {}, which has no narinfo",
                named(referrer),
                c.leaf
            ),
        );
    }
    // The leaf's NAR is named by nothing now: an orphan, reported as a note.
    let out = cache.verify(&[]);
    assert!(
        out.stdout.contains(&format!(
            "note: {leaf_nar}: no narinfo names this NAR (an orphan"
        )),
        "{}",
        out.report()
    );
}

#[test]
fn an_unparsable_narinfo_is_found() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    let file = cache.narinfo_file(&c.link);
    let text = fs::read_to_string(&file).expect("narinfo");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(2, "this is no narinfo line");
    fs::write(&file, lines.join("\n") + "\n").expect("write");
    cache.verify_finds(
        &[],
        &format!(
            "error: {}: cannot be parsed: narinfo line 3: expected 'Key: value'",
            named(&c.link)
        ),
    );
}

#[test]
fn a_misfiled_narinfo_is_found_and_repair_removes_it() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    // The leaf's narinfo copied under a name no path of the closure has.
    let wrong = format!("{}.narinfo", "0".repeat(32));
    fs::copy(cache.narinfo_file(&c.leaf), cache.dir.join(&wrong)).expect("copy");
    cache.verify_finds(
        &[],
        &format!(
            "error: {wrong} ({}): is filed under the wrong name: its narinfo would be {}.narinfo",
            c.leaf,
            hash_part(&c.leaf)
        ),
    );
    let out = cache.repair(&[]);
    assert!(
        out.stdout.contains(&format!(
            "removed: {wrong} ({}): it is filed under the wrong name",
            c.leaf
        )),
        "{}",
        out.report()
    );
    assert!(!cache.dir.join(&wrong).exists());
    cache.verify_whole(&[]);
    cache.assert_nix_substitutes(std::slice::from_ref(&c.small));
}

#[test]
fn a_stale_temporary_file_is_reported() {
    let cache = Cache::new("zstd");
    let stale = cache.dir.join("nar/.nixpush-stale1.tmp");
    fs::write(&stale, vec![0u8; 1000]).expect("write");
    set_age(&stale, Duration::from_secs(3 * 3600));
    let stale_top = cache.dir.join(".nixpush-stale2.tmp");
    fs::write(&stale_top, "x").expect("write");
    set_age(&stale_top, Duration::from_secs(2 * 86400));
    // One being written right now is no news.
    fs::write(cache.dir.join("nar/.nixpush-live.tmp"), "x").expect("write");
    // Not a failure: the cache is whole, and the files are named.
    let out = cache.verify_whole(&[]);
    for key in ["nar/.nixpush-stale1.tmp", ".nixpush-stale2.tmp"] {
        assert!(
            out.stdout
                .contains(&format!("note: {key}: stale temporary file")),
            "{key}: {}",
            out.report()
        );
    }
    assert!(
        out.stdout
            .contains("unchanged for 3 hours), left by a writer that was killed"),
        "{}",
        out.report()
    );
    assert!(!out.stdout.contains("nixpush-live"), "{}", out.report());
}

#[test]
fn a_missing_nix_cache_info_is_found() {
    let cache = Cache::new("zstd");
    fs::remove_file(cache.dir.join("nix-cache-info")).expect("remove");
    cache.verify_finds(
        &[],
        "error: nix-cache-info: missing: a client over HTTP refuses the cache",
    );
    // A cache for another store directory is broken too.
    fs::write(cache.dir.join("nix-cache-info"), "StoreDir: /other/store\n").expect("write");
    cache.verify_finds(
        &[],
        &format!(
            "error: nix-cache-info: is for the store /other/store, but this store is {}",
            store_dir()
        ),
    );
}

#[test]
fn repair_republishes_what_the_store_has() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    // One fault on every path, and one on the cache itself.
    let (leaf_nar, _) = cache.nar(&c.leaf);
    fs::remove_file(leaf_nar).expect("remove NAR");
    let (link_nar, _) = cache.nar(&c.link);
    let bytes = fs::read(&link_nar).expect("NAR");
    fs::write(&link_nar, &bytes[..bytes.len() - 1]).expect("truncate");
    // Unsigned, and without the content address that would vouch for it instead.
    let text_file = cache.narinfo_file(&c.text);
    let unsigned: String = fs::read_to_string(&text_file)
        .expect("narinfo")
        .lines()
        .filter(|l| !l.starts_with("Sig: ") && !l.starts_with("CA: "))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&text_file, unsigned).expect("write");
    let small_file = cache.narinfo_file(&c.small);
    let garbled = fs::read_to_string(&small_file).expect("narinfo") + "garbage\n";
    fs::write(&small_file, garbled).expect("write");
    fs::remove_file(cache.dir.join("nix-cache-info")).expect("remove");
    let before = cache.verify(&[]);
    assert_eq!(before.status.code(), Some(1), "{}", before.report());
    assert!(
        before.stdout.contains(&format!(
            "error: {}: has no signature by a trusted key",
            named(&c.text)
        )),
        "{}",
        before.report()
    );

    let out = cache.repair(&[]);
    for p in c.all() {
        assert!(
            out.stdout.contains(&format!(
                "repaired: {p} (published again from the local store)"
            )),
            "{p}: {}",
            out.report()
        );
    }
    assert!(
        out.stdout.contains("repaired: nix-cache-info written"),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.contains("verified again: ") && out.stdout.contains("is whole"),
        "{}",
        out.report()
    );
    assert!(!out.stdout.contains("removed:"), "{}", out.report());
    cache.verify_whole(&["--deep"]);
    cache.assert_nix_substitutes(std::slice::from_ref(&c.small));
}

#[test]
fn deep_repair_mends_a_flipped_byte_and_a_missing_reference() {
    let c = small_closure();
    let cache = Cache::new("none");
    let (file, _) = cache.nar(&c.small);
    let mut bytes = fs::read(&file).expect("NAR");
    let at = bytes
        .windows(6)
        .position(|w| w == b"hello\n")
        .expect("a file's contents in the NAR");
    bytes[at] = b'j';
    fs::write(&file, &bytes).expect("write NAR");
    fs::remove_file(cache.narinfo_file(&c.leaf)).expect("remove narinfo");
    cache.verify_finds(&["--deep"], "the file is damaged");

    let out = cache.repair(&["--deep"]);
    for p in [&c.small, &c.leaf] {
        assert!(
            out.stdout.contains(&format!(
                "repaired: {p} (published again from the local store)"
            )),
            "{p}: {}",
            out.report()
        );
    }
    // The rest of the small path's closure is rewritten with it, and only counted.
    for p in [&c.link, &c.text] {
        assert!(
            !out.stdout.contains(&format!("repaired: {p}")),
            "{}",
            out.report()
        );
    }
    assert!(
        out.stdout
            .contains("repair: re-published 2 paths, removed 0 narinfos, rewrote 2 sound paths"),
        "{}",
        out.report()
    );
    cache.verify_whole(&["--deep"]);
    cache.assert_nix_substitutes(std::slice::from_ref(&c.small));
}

/// A chain `top → mid → bottom` and a path `apart` on its own, built fresh for one test.
const CHAIN_NIX: &str = concat!(
    "{ salt }:\nlet\n",
    nix_mk!(),
    r#"  bottom = mk "np-bottom" "printf 'bottom %s\\n' \"$salt\" > $out";
  mid = mk "np-mid" "printf '%s\\n' ${bottom} > $out";
  top = mk "np-top" "printf '%s\\n' ${mid} > $out";
  apart = mk "np-apart" "printf 'apart %s\\n' \"$salt\" > $out";
in { inherit bottom mid top apart; }
"#
);

#[test]
fn repair_removes_what_cannot_be_republished_referrers_first() {
    let salt = unique("chain");
    let (paths, _) = nix_build_expr(CHAIN_NIX, &salt, &["bottom", "mid", "top", "apart"], &[]);
    let [bottom, mid, top, apart] = [&paths[0], &paths[1], &paths[2], &paths[3]];
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "verify.example.org-1");
    let dir = tmp.path().join("cache");
    for root in [top, apart] {
        push(dir.to_str().expect("utf-8"), &keys, root);
    }
    let cache = Cache { tmp, dir, keys };
    // The chain leaves the local store, and the bottom's NAR leaves the cache.
    run_ok(Command::new("nix-store").args(["--delete", top, mid, bottom]));
    let (bottom_nar, _) = cache.nar(bottom);
    fs::remove_file(bottom_nar).expect("remove NAR");
    let nars_before = nar_files(&cache.dir);

    let out = cache.repair(&[]);
    let removed: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("removed: "))
        .collect();
    assert_eq!(
        removed,
        [
            format!(
                "removed: {}: it refers to {mid}, which cannot be repaired",
                named(top)
            ),
            format!(
                "removed: {}: it refers to {bottom}, which cannot be repaired",
                named(mid)
            ),
            format!(
                "removed: {}: it cannot be re-published: its path is not valid in the local store",
                named(bottom)
            ),
        ],
        "referrers first: {}",
        out.report()
    );
    for p in [top, mid, bottom] {
        assert!(!cache.narinfo_file(p).exists(), "{p}: {}", out.report());
    }
    // No NAR is ever deleted; those of the removed narinfos are orphans now.
    assert_eq!(nar_files(&cache.dir), nars_before);
    let after = cache.verify_whole(&[]);
    assert!(
        after.stdout.contains("no narinfo names this NAR"),
        "{}",
        after.report()
    );
    cache.assert_nix_substitutes(std::slice::from_ref(apart));
}

#[cfg(feature = "s3")]
#[test]
fn verify_and_repair_over_s3() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let bucket = testbeds::PUBLIC_BUCKETS[0];
    let c = small_closure();
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "verify-s3.example.org-1");
    let prefix = unique("verify-cache");
    let to = sw.address(bucket, &prefix);
    let s3 = || nixpush_with_s3_keys(testbeds::S3_ACCESS_KEY, testbeds::S3_SECRET_KEY);
    run_ok(&mut push_cmd(s3(), &to, &keys, &c.small));
    let verify = |args: &[&str]| {
        run(s3()
            .arg("verify")
            .arg(&to)
            .arg("--trusted-key")
            .arg(keys.public_key())
            .args(args))
    };
    let clean = verify(&["--deep"]);
    assert!(clean.status.success(), "{}", clean.report());
    assert!(clean.stdout.contains("and 4 NARs"), "{}", clean.report());

    // The leaf's NAR goes: found from the listing.
    let http = format!("{}/{bucket}/{prefix}", sw.endpoint());
    let narinfo = run_ok(
        Command::new("curl").args(["-sS", &format!("{http}/{}.narinfo", hash_part(&c.leaf))]),
    );
    let url = narinfo
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL line")
        .to_owned();
    let (code, body) = sw.curl_signed("DELETE", &format!("/{bucket}/{prefix}/{url}"));
    assert!(code == 204 || code == 200, "DELETE answered {code}: {body}");
    let broken = verify(&[]);
    assert_eq!(broken.status.code(), Some(1), "{}", broken.report());
    assert!(
        broken.stdout.contains(&format!(
            "error: {}: its NAR {url} is missing",
            named(&c.leaf)
        )),
        "{}",
        broken.report()
    );

    let repaired = run_ok(
        s3().arg("verify")
            .arg(&to)
            .arg("--repair")
            .arg("--key-file")
            .arg(&keys.secret),
    );
    assert!(
        repaired.stdout.contains(&format!("repaired: {}", c.leaf)),
        "{}",
        repaired.report()
    );
    let again = verify(&["--deep"]);
    assert!(again.status.success(), "{}", again.report());

    let root = tmp.path().join("root");
    let copy = run_ok(
        nix()
            .arg("copy")
            .arg("--from")
            .arg(&http)
            .arg("--to")
            .arg(&root)
            .args(["--option", "trusted-public-keys", &keys.public_key()])
            .args(["--option", "require-sigs", "true"])
            .args(["--option", "substituters", ""])
            .arg(&c.small),
    );
    for p in c.all() {
        assert!(valid_in_root(&root, &p), "{p}: {}", copy.report());
    }
}

#[test]
fn verify_refuses_what_it_cannot_check() {
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "verify.example.org-1");
    let missing = tmp.path().join("no-such-cache");
    let out = run_fail(
        nixpush()
            .arg("verify")
            .arg(&missing)
            .arg("--trusted-key")
            .arg(keys.public_key()),
    );
    assert!(
        out.stderr.contains(&format!(
            "no cache at {}: the directory does not exist",
            missing.display()
        )),
        "{}",
        out.report()
    );
    assert!(!missing.exists(), "verify created {}", missing.display());
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).expect("mkdir");
    let out = run_fail(nixpush().arg("verify").arg(&empty));
    assert!(
        out.stderr.contains(&format!(
            "{} is not a binary cache: it has no nix-cache-info, no narinfos and no nar/",
            empty.display()
        )),
        "{}",
        out.report()
    );
    assert_eq!(
        dir_names(&empty, |_| true),
        Vec::<String>::new(),
        "verify wrote into it"
    );
    let out = run_fail(nixpush().args(["verify", "https://cache.example.org/x"]));
    assert!(
        out.stderr
            .contains("a web server cannot list; verify the directory or bucket it serves instead"),
        "{}",
        out.report()
    );
    let out = run_fail(
        nixpush()
            .arg("verify")
            .arg(tmp.path())
            .arg("--repair")
            .env("NIXPUSH_CONFIG", tmp.path().join("none.toml")),
    );
    assert!(
        out.stderr.contains("configuration file") && out.stderr.contains("does not exist"),
        "{}",
        out.report()
    );
    // A configuration without keys, so that none on this machine is found either.
    let config = tmp.path().join("empty.toml");
    fs::write(&config, "").expect("write config");
    let out = run_fail(
        nixpush()
            .arg("verify")
            .arg(tmp.path())
            .arg("--repair")
            .env("NIXPUSH_CONFIG", &config),
    );
    assert!(
        out.stderr
            .contains("--repair signs what it re-publishes: give --key-file FILE"),
        "{}",
        out.report()
    );
}

#[test]
fn the_configured_cache_and_keys_are_the_default() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    let config = cache.tmp.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "cache = \"file://{}\"\nkey-files = [\"{}\"]\n",
            cache.dir.display(),
            cache.keys.secret.display()
        ),
    )
    .expect("write config");
    let verify = || run(nixpush().arg("verify").env("NIXPUSH_CONFIG", &config));
    let out = verify();
    assert!(out.status.success(), "{}", out.report());
    assert!(
        out.stdout.contains("signatures by verify.example.org-1"),
        "the configured key's public half is trusted: {}",
        out.report()
    );
    fs::remove_file(cache.narinfo_file(&c.leaf)).expect("remove narinfo");
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{}", out.report());
    assert!(
        out.stdout
            .contains(&format!("refers to {}, which has no narinfo", c.leaf)),
        "{}",
        out.report()
    );
    // --repair signs with the configured key.
    let out = run_ok(
        nixpush()
            .args(["verify", "--repair"])
            .env("NIXPUSH_CONFIG", &config),
    );
    assert!(
        out.stdout.contains(&format!("repaired: {}", c.leaf)),
        "{}",
        out.report()
    );
    cache.assert_nix_substitutes(std::slice::from_ref(&c.small));
}

#[test]
fn references_left_to_an_upstream_cache_are_notes() {
    let c = small_closure();
    let cache = Cache::new("zstd");
    // As a push with --skip-signed-by leaves a path out that upstream has.
    fs::remove_file(cache.narinfo_file(&c.leaf)).expect("remove narinfo");
    let line = |referrer: &str| {
        format!(
            "note: {}: refers to {}, which has no narinfo here; expected upstream (paths signed \
             by cache.nixos.org-1 are left out)",
            named(referrer),
            c.leaf
        )
    };
    let out = cache.verify_whole(&["--skip-signed-by", "cache.nixos.org-1"]);
    for referrer in [&c.link, &c.small] {
        assert!(out.stdout.contains(&line(referrer)), "{}", out.report());
    }
    // Repair leaves it to upstream: nothing re-published, nothing removed.
    let out = cache.repair(&["--skip-signed-by", "cache.nixos.org-1"]);
    assert!(!out.stdout.contains("repaired:"), "{}", out.report());
    assert!(!out.stdout.contains("removed:"), "{}", out.report());
    assert!(!cache.narinfo_file(&c.leaf).exists());
    assert!(cache.narinfo_file(&c.link).exists());
    // The configured skip-signed-by applies to the configured cache.
    let config = cache.tmp.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "cache = \"{}\"\nskip-signed-by = [\"cache.nixos.org-1\"]\n",
            cache.dir.display()
        ),
    )
    .expect("write config");
    let out = run(nixpush()
        .arg("verify")
        .arg("--trusted-key")
        .arg(cache.keys.public_key())
        .env("NIXPUSH_CONFIG", &config));
    assert!(out.status.success(), "{}", out.report());
    assert!(out.stdout.contains(&line(&c.small)), "{}", out.report());
}
