//! End to end, with real Nix: `nixpush push` publishes a closure with every node type and a
//! file over 64 MiB, and Nix substitutes it from the cache into a fresh store, checking the
//! signatures and hashes; what Nix must refuse (tampered narinfo or NAR, untrusted key) it
//! refuses; narinfos and NARs match what Nix itself says about each path; a second push does
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::*;

/// Push `roots` to a fresh cache in `dir` with `compression`, signed with `keys`.
fn push(cache: &Path, keys: &KeyPair, compression: &str, roots: &[String]) -> Out {
    run_ok(
        nixpush()
            .arg("push")
            .arg("--to")
            .arg(format!("file://{}", cache.display()))
            .arg("--key-file")
            .arg(&keys.secret)
            .args(["--compression", compression])
            .args(roots),
    )
}

fn expected_narinfos(paths: &[String]) -> Vec<String> {
    let mut v: Vec<String> = paths
        .iter()
        .map(|p| format!("{}.narinfo", hash_part(p)))
        .collect();
    v.sort();
    v
}

fn extension(compression: &str) -> &'static str {
    match compression {
        "none" => ".nar",
        "xz" => ".nar.xz",
        "bzip2" => ".nar.bz2",
        "zstd" => ".nar.zst",
        other => panic!("unexpected compression {other}"),
    }
}

/// Every narinfo of the closure of `root` in `cache` says what Nix says about the path, and
/// its NAR file is what the narinfo says and decompresses to exactly `nix-store --dump`.
fn check_cache_against_nix(cache: &Path, compression: &str, root: &str, key_name: &str) {
    let local = nix_path_info(None, &[root.to_owned()]);
    assert_eq!(
        local.keys().cloned().collect::<Vec<_>>(),
        closure_of(root),
        "nix path-info -r and nix-store -qR disagree"
    );
    let nix_hashes: Vec<String> = local.values().map(|i| i.nar_hash.clone()).collect();
    let nix_b32 = nix_to_base32(&nix_hashes);
    let store = store_dir();

    let mut nar_files: Vec<PathBuf> = Vec::new();
    let mut file_hashes: Vec<String> = Vec::new();
    for (info, nar_hash_b32) in local.values().zip(&nix_b32) {
        let path = &info.path;
        let ni = RawNarInfo::read(cache, path);
        let ctx = format!("narinfo of {path}:\n{}", ni.text);
        assert_eq!(ni.one("StorePath"), path, "{ctx}");
        assert_eq!(
            ni.one("NarHash"),
            nar_hash_b32,
            "NarHash differs from Nix's; {ctx}"
        );
        assert_eq!(
            ni.one("NarSize"),
            info.nar_size.to_string(),
            "NarSize differs from Nix's; {ctx}"
        );
        let refs: Vec<String> = info
            .references
            .iter()
            .map(|r| base_name(r).to_owned())
            .collect();
        assert_eq!(ni.one("References"), refs.join(" "), "{ctx}");
        assert_eq!(
            ni.opt("Deriver"),
            info.deriver.as_deref().map(base_name),
            "{ctx}"
        );
        assert_eq!(ni.opt("CA"), info.ca.as_deref(), "{ctx}");
        assert_eq!(ni.one("Compression"), compression, "{ctx}");
        let sigs = ni.all("Sig");
        assert!(
            sigs.iter().any(|s| s.starts_with(&format!("{key_name}:"))),
            "no signature by {key_name}; {ctx}"
        );

        // The NAR file: named after its own hash, of the size the narinfo says.
        let url = ni.one("URL");
        let file_hash = ni.one("FileHash");
        let b32 = file_hash
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("FileHash not sha256; {ctx}"));
        assert_eq!(url, format!("nar/{b32}{}", extension(compression)), "{ctx}");
        let nar_file = cache.join(url);
        let file_size = fs::metadata(&nar_file)
            .unwrap_or_else(|e| panic!("{}: {e}; {ctx}", nar_file.display()))
            .len();
        assert_eq!(ni.one("FileSize"), file_size.to_string(), "{ctx}");
        nar_files.push(nar_file.clone());
        file_hashes.push(file_hash.to_owned());

        // Decompressed, it is byte for byte what Nix dumps (compared by sha256 and length,
        // streamed, so the big NAR is never held in memory).
        let ours = digest_stream(decompressor(
            fs::File::open(&nar_file).expect("open NAR"),
            compression,
        ))
        .unwrap_or_else(|e| panic!("cannot decompress {}: {e}", nar_file.display()));
        let nix_dump = dump_digests()
            .get(path)
            .copied()
            .unwrap_or_else(|| nix_dump_digest(path));
        assert_eq!(
            ours,
            nix_dump,
            "decompressed {} (sha256, length) differs from `nix-store --dump {path}`",
            nar_file.display()
        );
        assert_eq!(ours.1, info.nar_size, "{ctx}");
        assert!(path.starts_with(store), "{path} not in {store}");
    }
    assert_eq!(
        nix_hash_files(&nar_files),
        file_hashes,
        "FileHash differs from `nix hash file` of the NAR files"
    );
}

/// Items 1, 3 and 5: push the full closure with `compression`, check every narinfo and NAR
/// against Nix, push again (nothing happens), and have Nix substitute it into a fresh store.
fn push_and_substitute(compression: &str) {
    let c = full_closure();
    let all = c.all();
    let tmp = tempdir();
    let key_name = format!("e2e-{compression}.example.org-1");
    let keys = nixpush_keygen(tmp.path(), &key_name);
    let cache = tmp.path().join("cache");

    let first = push(&cache, &keys, compression, std::slice::from_ref(&c.top));
    assert_eq!(
        narinfo_files(&cache),
        expected_narinfos(&all),
        "{}",
        first.report()
    );
    assert_modes_like_nix(&cache);
    let info = fs::read_to_string(cache.join("nix-cache-info")).expect("nix-cache-info");
    assert!(
        info.lines()
            .any(|l| l == format!("StoreDir: {}", store_dir())),
        "nix-cache-info:\n{info}"
    );

    // A second push of the same closure uploads nothing, says so, and touches nothing.
    let before = snapshot(&cache);
    let second = push(&cache, &keys, compression, std::slice::from_ref(&c.top));
    assert!(
        second
            .stderr
            .lines()
            .chain(second.stdout.lines())
            .any(|l| l.starts_with("nothing to push")),
        "second push did not say \"nothing to push\": {}",
        second.report()
    );
    // ...but for one announcement of its root under nixpush/announce/ (read by `nixpush gc
    // --keep-since`), which changes that directory and nothing else.
    let announcements = |c: &Path| dir_names(&c.join("nixpush/announce"), |_| true).len();
    let outside_announcements = |m: BTreeMap<PathBuf, (u64, SystemTime, u64)>| {
        m.into_iter()
            .filter(|(p, _)| !p.starts_with("nixpush"))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        outside_announcements(snapshot(&cache)),
        outside_announcements(before.clone()),
        "the second push changed the cache: {}",
        second.report()
    );
    assert_eq!(
        announcements(&cache),
        before
            .keys()
            .filter(|p| p.parent() == Some(Path::new("nixpush/announce")))
            .count()
            + 1,
        "the second push did not announce its root: {}",
        second.report()
    );

    check_cache_against_nix(&cache, compression, &c.top, &key_name);

    // Real Nix substitutes the whole closure into a fresh store, checking our signatures.
    let root = tmp.path().join("root");
    let copy = run_ok(&mut nix_copy_cmd(
        &cache,
        &root,
        &keys.public_key(),
        std::slice::from_ref(&c.top),
    ));
    for p in &all {
        assert!(
            present_in_root(&root, p) && valid_in_root(&root, p),
            "{p} missing under {} after {}",
            root.display(),
            copy.report()
        );
    }
    // The fresh store's database agrees with ours, and holds our signature.
    let local = nix_path_info(None, std::slice::from_ref(&c.top));
    let theirs = nix_path_info(
        Some(root.to_str().expect("utf-8")),
        std::slice::from_ref(&c.top),
    );
    assert_eq!(
        theirs.keys().collect::<Vec<_>>(),
        local.keys().collect::<Vec<_>>()
    );
    for (p, l) in &local {
        let t = &theirs[p];
        assert_eq!((&t.nar_hash, t.nar_size), (&l.nar_hash, l.nar_size), "{p}");
        assert_eq!(t.references, l.references, "{p}");
        assert!(
            t.signatures
                .iter()
                .any(|s| s.starts_with(&format!("{key_name}:"))),
            "{p}: {:?}",
            t.signatures
        );
    }
    // A few node types, as they landed.
    let link = in_root(&root, &c.small.link);
    assert_eq!(
        fs::read_link(&link).expect("link is a symlink"),
        Path::new(&c.small.leaf)
    );
    let small = in_root(&root, &c.small.small);
    let mode = fs::metadata(small.join("bin/exe"))
        .expect("exe")
        .permissions()
        .mode();
    assert!(mode & 0o100 != 0, "exe lost its executable bit: {mode:o}");
    assert_eq!(
        fs::read_link(small.join("dir/rel-link")).expect("rel-link"),
        Path::new("../bin/exe")
    );
    assert!(
        fs::read_dir(small.join("empty-dir"))
            .expect("empty-dir")
            .next()
            .is_none()
    );
    assert_eq!(
        fs::metadata(small.join("empty-file"))
            .expect("empty-file")
            .len(),
        0
    );
    assert_eq!(
        fs::metadata(in_root(&root, &c.big).join("data/big"))
            .expect("big")
            .len(),
        fs::metadata(Path::new(&c.big).join("data/big"))
            .expect("big")
            .len()
    );
}

#[test]
fn push_and_substitute_none() {
    push_and_substitute("none");
}

#[test]
fn push_and_substitute_xz() {
    push_and_substitute("xz");
}

#[test]
fn push_and_substitute_bzip2() {
    push_and_substitute("bzip2");
}

#[test]
fn push_and_substitute_zstd() {
    push_and_substitute("zstd");
}

/// A cache holding the small closure, pushed with a `nixpush keygen` key, that Nix accepts as
/// it is (so a failure after tampering is the tampering's doing).
struct Published {
    tmp: TestDir,
    cache: PathBuf,
    keys: KeyPair,
}

fn publish_small(compression: &str) -> Published {
    let c = small_closure();
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "tamper.example.org-1");
    let cache = tmp.path().join("cache");
    push(&cache, &keys, compression, std::slice::from_ref(&c.small));
    assert_eq!(narinfo_files(&cache), expected_narinfos(&c.all()));
    let control = tmp.path().join("control-root");
    run_ok(&mut nix_copy_cmd(
        &cache,
        &control,
        &keys.public_key(),
        std::slice::from_ref(&c.small),
    ));
    assert!(valid_in_root(&control, &c.small));
    Published { tmp, cache, keys }
}

/// Nix refuses to substitute `c.small` from `cache` trusting `public_key`: non-zero exit, the
/// reason in its stderr, `missing` not in the fresh store.
fn assert_nix_refuses(cache: &Path, public_key: &str, reason: &str, missing: &str) {
    let c = small_closure();
    let root = cache.with_file_name(format!(
        "{}-root",
        cache.file_name().unwrap().to_string_lossy()
    ));
    let out = run_fail(&mut nix_copy_cmd(
        cache,
        &root,
        public_key,
        std::slice::from_ref(&c.small),
    ));
    assert!(
        out.stderr.to_lowercase().contains(reason),
        "Nix failed, but not for the expected reason ({reason:?}): {}",
        out.report()
    );
    assert!(
        !valid_in_root(&root, missing),
        "{missing} was substituted despite: {}",
        out.report()
    );
    assert!(
        !valid_in_root(&root, &c.small),
        "{} was substituted despite: {}",
        c.small,
        out.report()
    );
}

/// Rewrite one field of the leaf's narinfo in a copy of the cache, without re-signing.
fn tamper_narinfo(p: &Published, name: &str, field: &str, value: &str) -> PathBuf {
    let c = small_closure();
    let cache = p.tmp.path().join(name);
    copy_dir(&p.cache, &cache);
    let file = cache.join(format!("{}.narinfo", hash_part(&c.leaf)));
    let text = fs::read_to_string(&file).expect("narinfo");
    let mut found = false;
    let new: String = text
        .lines()
        .map(|l| match l.split_once(": ") {
            Some((k, v)) if k == field => {
                assert_ne!(v, value, "tampering must change {field}");
                found = true;
                format!("{k}: {value}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(found, "no {field} in\n{text}");
    fs::write(&file, new).expect("write narinfo");
    cache
}

#[test]
fn tampered_narinfo_nar_size_is_refused() {
    let p = publish_small("none");
    let c = small_closure();
    let ni = RawNarInfo::read(&p.cache, &c.leaf);
    let size: u64 = ni.one("NarSize").parse().expect("NarSize");
    let cache = tamper_narinfo(&p, "cache-size", "NarSize", &(size + 8).to_string());
    assert_nix_refuses(&cache, &p.keys.public_key(), "signature", &c.leaf);
}

#[test]
fn tampered_narinfo_nar_hash_is_refused() {
    let p = publish_small("none");
    let c = small_closure();
    // A well-formed hash of another path, so only the signature can tell.
    let other = RawNarInfo::read(&p.cache, &c.text);
    let cache = tamper_narinfo(&p, "cache-hash", "NarHash", other.one("NarHash"));
    assert_nix_refuses(&cache, &p.keys.public_key(), "signature", &c.leaf);
}

#[test]
fn tampered_nar_is_refused() {
    let p = publish_small("none");
    let c = small_closure();
    let cache = p.tmp.path().join("cache-nar");
    copy_dir(&p.cache, &cache);
    let ni = RawNarInfo::read(&cache, &c.leaf);
    let file = cache.join(ni.one("URL"));
    // Change one byte of the file contents ("leaf ..." → "Leaf ..."), same length.
    corrupt_at(&file, b"leaf ", b'L');
    assert_nix_refuses(&cache, &p.keys.public_key(), "hash mismatch", &c.leaf);
}

#[test]
fn tampered_compressed_nar_is_refused() {
    let p = publish_small("zstd");
    let c = small_closure();
    let cache = p.tmp.path().join("cache-zst");
    copy_dir(&p.cache, &cache);
    let ni = RawNarInfo::read(&cache, &c.small);
    let file = cache.join(ni.one("URL"));
    let mut bytes = fs::read(&file).expect("NAR");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&file, &bytes).expect("write NAR");
    // Either the decompressor or the hash check catches it; both are errors.
    let root = tempdir();
    let out = run_fail(&mut nix_copy_cmd(
        &cache,
        &root.path().join("root"),
        &p.keys.public_key(),
        std::slice::from_ref(&c.small),
    ));
    assert!(
        !valid_in_root(&root.path().join("root"), &c.small),
        "{}",
        out.report()
    );
}

#[test]
fn untrusted_key_is_refused() {
    let p = publish_small("zstd");
    let c = small_closure();
    // Same key name, different key: only the signature itself can tell them apart.
    let other = nix_keygen(p.tmp.path(), "tamper.example.org-1", "other");
    assert_nix_refuses(&p.cache, &other.public_key(), "signature", &c.leaf);
}

/// Item 4: a secret key made by Nix signs paths Nix verifies against the Nix-made public key.
#[test]
fn nix_made_secret_key_is_accepted() {
    let c = small_closure();
    let tmp = tempdir();
    let keys = nix_keygen(tmp.path(), "nix-made.example.org-1", "nix-made");
    let cache = tmp.path().join("cache");
    push(&cache, &keys, "xz", std::slice::from_ref(&c.small));
    assert_eq!(narinfo_files(&cache), expected_narinfos(&c.all()));
    for p in c.all() {
        let ni = RawNarInfo::read(&cache, &p);
        assert!(
            ni.all("Sig")
                .iter()
                .any(|s| s.starts_with("nix-made.example.org-1:")),
            "{}",
            ni.text
        );
    }
    let root = tmp.path().join("root");
    let out = run_ok(&mut nix_copy_cmd(
        &cache,
        &root,
        &keys.public_key(),
        std::slice::from_ref(&c.small),
    ));
    for p in c.all() {
        assert!(valid_in_root(&root, &p), "{p}: {}", out.report());
    }
}
