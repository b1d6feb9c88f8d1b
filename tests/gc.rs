//! `nixpush gc`, with the real binary, real Nix and real servers: on a directory cache and on
//! SeaweedFS (S3), `--keep`, `--keep-since` (a path published, or re-announced by a push,
//! within the window) and their closures stay and real Nix substitutes them with
//! `require-sigs = true`, the rest goes and the bytes freed are reported; and three pushers
//! publishing overlapping closures in a loop while gc runs again and again, with a reader
//! polling the bucket that never finds a narinfo whose NAR or references are missing.

mod common;

#[cfg(feature = "s3")]
#[path = "../backends/tests/support/testbeds.rs"]
mod testbeds;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;

/// The shortest grace period gc accepts with `--max-skew 1s` (2 × 1 s polling + 3 × 1 s).
const GRACE: &str = "5s";

fn set_age(file: &Path, age: Duration) {
    fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
}

/// Every file below `dir` made `age` old.
fn age_all(dir: &Path, age: Duration) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let p = entry.path();
        if entry.file_type().unwrap().is_dir() {
            age_all(&p, age);
        } else {
            set_age(&p, age);
        }
    }
}

/// `{ salt }: { lib, mid, top }`: `top` refers to `mid`, which refers to `lib`.
fn chain_nix() -> String {
    concat!(
        "{ salt }:\nlet\n",
        nix_mk!(),
        "  lib = mk \"np-gc-lib\" \"printf 'lib %s\\\\n' $salt > $out\";\n",
        "  mid = mk \"np-gc-mid\" \"printf '%s\\\\n' ${lib} > $out\";\n",
        "  top = mk \"np-gc-top\" \"printf '%s\\\\n' ${mid} > $out\";\n",
        "in { inherit lib mid top; }\n"
    )
    .to_owned()
}

/// A fresh chain (lib, mid, top) of three store paths.
fn chain(name: &str) -> Vec<String> {
    let (paths, out) = nix_build_expr(&chain_nix(), &unique(name), &["lib", "mid", "top"], &[]);
    assert_eq!(paths.len(), 3, "{}", out.report());
    paths
}

fn gc_cmd(mut cmd: Command, cache: &str, args: &[&str]) -> Command {
    cmd.arg("gc")
        .arg(cache)
        .args(["--grace", GRACE, "--max-skew", "1s"])
        .args(args);
    cmd
}

fn json(out: &Out) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.report()))
}

fn keys_of(v: &serde_json::Value, field: &str) -> BTreeSet<String> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

fn narinfo_key(path: &str) -> String {
    format!("{}.narinfo", hash_part(path))
}

#[test]
fn gc_of_a_directory_keeps_roots_and_recent_paths_and_frees_the_rest() {
    let small = small_closure();
    let kept_chain = chain("gc-dir-kept");
    let old_chain = chain("gc-dir-old");
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "gc.example.org-1");
    let cache = tmp.path().join("cache");
    let c = cache.to_str().unwrap();
    push(c, &keys, &small.small);
    push(c, &keys, &kept_chain[2]);
    push(c, &keys, &old_chain[2]);
    // Everything was published two days ago...
    age_all(&cache, Duration::from_secs(2 * 86_400));
    // (with the announcements of those pushes, older than the window: they go too)
    let announce_dir = cache.join("nixpush/announce");
    let old_announcements: Vec<(String, u64)> = fs::read_dir(&announce_dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                format!("nixpush/announce/{}", e.file_name().to_str().unwrap()),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(old_announcements.len(), 3, "one announcement a push");
    // ...and a builder pushed the small closure again just now: a no-op that re-announces it.
    let again = push(c, &keys, &small.small);
    assert_eq!(pushed_count(&again), 0, "{}", again.report());

    let old_nars: BTreeSet<String> = old_chain
        .iter()
        .map(|p| RawNarInfo::read(&cache, p).one("URL").to_owned())
        .collect();
    let old_bytes: u64 = old_chain
        .iter()
        .map(|p| {
            let url = RawNarInfo::read(&cache, p).one("URL").to_owned();
            fs::metadata(cache.join(narinfo_key(p))).unwrap().len()
                + fs::metadata(cache.join(url)).unwrap().len()
        })
        .sum::<u64>()
        + old_announcements.iter().map(|(_, n)| n).sum::<u64>();
    let args = ["--keep-since", "1d", "--keep", &kept_chain[2]];

    // A dry run names what would go and deletes nothing.
    let before = snapshot(&cache);
    let dry = run_ok(&mut gc_cmd(
        nixpush(),
        c,
        &[&args[..], &["--dry-run"]].concat(),
    ));
    for p in &old_chain {
        assert!(
            dry.stdout
                .contains(&format!("would delete: {}\n", narinfo_key(p))),
            "{}",
            dry.report()
        );
    }
    for n in &old_nars {
        assert!(
            dry.stdout.contains(&format!("would delete: {n}\n")),
            "{}",
            dry.report()
        );
    }
    for (a, _) in &old_announcements {
        assert!(
            dry.stdout.contains(&format!("would delete: {a}\n")),
            "{}",
            dry.report()
        );
    }
    assert_eq!(
        dry.stdout.matches("would delete: ").count(),
        9,
        "{}",
        dry.report()
    );
    assert!(
        dry.stdout.contains("nothing was deleted (--dry-run)"),
        "{}",
        dry.report()
    );
    assert_eq!(
        snapshot(&cache).len(),
        before.len(),
        "a dry run changed the cache"
    );

    // The real run: the old chain goes, narinfos top first, then its NARs.
    let out = run_ok(&mut gc_cmd(
        nixpush(),
        c,
        &[&args[..], &["--json"]].concat(),
    ));
    let r = json(&out);
    let deleted: Vec<String> = r["deleted_narinfos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = old_chain.iter().rev().map(|p| narinfo_key(p)).collect();
    assert_eq!(deleted, expected, "{}", out.report());
    assert_eq!(keys_of(&r, "deleted_nars"), old_nars, "{}", out.report());
    assert_eq!(
        keys_of(&r, "deleted_other"),
        old_announcements.iter().map(|(k, _)| k.clone()).collect(),
        "{}",
        out.report()
    );
    assert_eq!(
        r["bytes_freed"].as_u64(),
        Some(old_bytes),
        "{}",
        out.report()
    );
    assert_eq!(r["failed"].as_array().unwrap().len(), 0, "{}", out.report());
    for p in &old_chain {
        assert!(!cache.join(narinfo_key(p)).exists(), "{p} is still there");
    }
    for n in &old_nars {
        assert!(!cache.join(n).exists(), "{n} is still there");
    }
    assert!(
        !cache.join("nixpush/gc-pending").exists(),
        "gc left its pending object"
    );

    // What was kept substitutes with real Nix, signatures required.
    let root = tmp.path().join("root");
    let wanted = vec![small.small.clone(), kept_chain[2].clone()];
    let copy = run_ok(&mut nix_copy_cmd(
        &cache,
        &root,
        &keys.public_key(),
        &wanted,
    ));
    for p in small.all().iter().chain(&kept_chain) {
        assert!(valid_in_root(&root, p), "{p}: {}", copy.report());
    }

    // Once the announcement is old too, only --keep is left: the small closure goes, and the
    // summary says how much that freed.
    age_all(&cache.join("nixpush"), Duration::from_secs(2 * 86_400));
    let out = run_ok(&mut gc_cmd(nixpush(), c, &["--keep", &kept_chain[2]]));
    assert!(
        out.stdout
            .contains(": deleted 4 narinfos, 4 NARs and 0 other objects, "),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.contains("kept 3 of 7 narinfos (1 roots)"),
        "{}",
        out.report()
    );
    let mut left = narinfo_files(&cache);
    left.sort();
    let mut expected: Vec<String> = kept_chain.iter().map(|p| narinfo_key(p)).collect();
    expected.sort();
    assert_eq!(left, expected);
    let verify = run(nixpush()
        .arg("verify")
        .arg(c)
        .arg("--trusted-key")
        .arg(keys.public_key()));
    assert!(verify.status.success(), "{}", verify.report());
    assert!(
        !verify.stdout.contains("note:"),
        "orphans left: {}",
        verify.report()
    );
}

#[cfg(feature = "s3")]
#[test]
fn gc_over_s3_keeps_roots_and_recent_paths_and_frees_the_rest() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let bucket = testbeds::PUBLIC_BUCKETS[0];
    let kept_chain = chain("gc-s3-kept");
    let old_chain = chain("gc-s3-old");
    let new_chain = chain("gc-s3-new");
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "gc-s3.example.org-1");
    let prefix = unique("gc-cache");
    let to = sw.address(bucket, &prefix);
    let s3 = || nixpush_with_s3_keys(testbeds::S3_ACCESS_KEY, testbeds::S3_SECRET_KEY);
    run_ok(&mut push_cmd(s3(), &to, &keys, &kept_chain[2]));
    run_ok(&mut push_cmd(s3(), &to, &keys, &old_chain[2]));
    // Older than the grace period and the window; then a new chain, within both.
    std::thread::sleep(Duration::from_secs(8));
    run_ok(&mut push_cmd(s3(), &to, &keys, &new_chain[2]));

    let out = run_ok(&mut gc_cmd(
        s3(),
        &to,
        &["--keep-since", "6s", "--keep", &kept_chain[2], "--json"],
    ));
    let r = json(&out);
    let expected: Vec<String> = old_chain.iter().rev().map(|p| narinfo_key(p)).collect();
    let deleted: Vec<String> = r["deleted_narinfos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deleted, expected, "{}", out.report());
    assert_eq!(
        r["deleted_nars"].as_array().unwrap().len(),
        3,
        "{}",
        out.report()
    );
    assert!(r["bytes_freed"].as_u64().unwrap() > 0, "{}", out.report());
    assert_eq!(r["kept"].as_u64(), Some(6), "{}", out.report());

    let http = format!("{}/{bucket}/{prefix}", sw.endpoint());
    for p in &old_chain {
        let (code, _) = sw.curl_signed("GET", &format!("/{bucket}/{prefix}/{}", narinfo_key(p)));
        assert_eq!(code, 404, "{p} is still in the bucket");
    }
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
            .arg(&kept_chain[2])
            .arg(&new_chain[2]),
    );
    for p in kept_chain.iter().chain(&new_chain) {
        assert!(valid_in_root(&root, p), "{p}: {}", copy.report());
    }
    let verify = run(s3()
        .arg("verify")
        .arg(&to)
        .arg("--trusted-key")
        .arg(keys.public_key()));
    assert!(verify.status.success(), "{}", verify.report());
    assert!(
        !verify.stdout.contains("note:"),
        "orphans left: {}",
        verify.report()
    );
}

/// A reader of the bucket, as Nix reads it: for every narinfo it finds, its NAR and the
/// narinfos of its references must be there, unless the narinfo itself went meanwhile
/// (gc deletes referrers first). Returns the violations seen and the rounds read.
#[cfg(feature = "s3")]
async fn read_until(
    b: std::sync::Arc<dyn nixpush_backends::Backend>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<String>, usize, usize) {
    use nixpush_backends::BackendExt as _;
    use std::sync::atomic::Ordering;
    let mut violations = Vec::new();
    let mut rounds = 0;
    let mut checked = 0;
    while !stop.load(Ordering::SeqCst) {
        rounds += 1;
        let listed = b.list_objects("").await.expect("reader: list");
        for o in listed.iter().filter(|o| o.key.ends_with(".narinfo")) {
            let Ok(Some(text)) = b.get_optional(&o.key, 1 << 20).await else {
                continue;
            };
            let text = String::from_utf8_lossy(&text).into_owned();
            let mut wanted = Vec::new();
            for line in text.lines() {
                if let Some(url) = line.strip_prefix("URL: ") {
                    wanted.push(url.to_owned());
                }
                if let Some(refs) = line.strip_prefix("References: ") {
                    for r in refs.split_whitespace() {
                        let h = r.split_once('-').map_or(r, |(h, _)| h);
                        if format!("{h}.narinfo") != o.key {
                            wanted.push(format!("{h}.narinfo"));
                        }
                    }
                }
            }
            checked += 1;
            for w in wanted {
                if b.exists(&w).await.expect("reader: exists") {
                    continue;
                }
                // Missing: a violation only if the narinfo is still the one we read.
                let now = b.list_objects(&o.key).await.expect("reader: list one");
                let same = now
                    .iter()
                    .any(|n| n.key == o.key && n.modified == o.modified);
                let body = b.get_optional(&o.key, 1 << 20).await.ok().flatten();
                if same && body.is_some_and(|t| String::from_utf8_lossy(&t) == text) {
                    violations.push(format!("{} names {w}, which is missing", o.key));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (violations, rounds, checked)
}

#[cfg(feature = "s3")]
#[test]
fn gc_beside_three_pushers_never_leaves_a_broken_narinfo() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let bucket = testbeds::PUBLIC_BUCKETS[0];
    // Six tops over three mids over one lib: top j refers to mid j/2, every mid to lib.
    let expr = concat!(
        "{ salt }:\nlet\n",
        nix_mk!(),
        "  lib = mk \"np-race-lib\" \"printf 'lib %s\\\\n' $salt > $out\";\n",
        "  mid = i: mk \"np-race-mid-${i}\" \"printf '%s %s\\\\n' ${lib} ${i} > $out\";\n",
        "  top = i: m: mk \"np-race-top-${i}\" \"printf '%s %s\\\\n' ${m} ${i} > $out\";\n",
        "  m0 = mid \"0\"; m1 = mid \"1\"; m2 = mid \"2\";\n",
        "in {\n",
        "  t0 = top \"0\" m0; t1 = top \"1\" m0; t2 = top \"2\" m1;\n",
        "  t3 = top \"3\" m1; t4 = top \"4\" m2; t5 = top \"5\" m2;\n",
        "}\n"
    );
    let (tops, out) = nix_build_expr(
        expr,
        &unique("gc-race"),
        &["t0", "t1", "t2", "t3", "t4", "t5"],
        &[],
    );
    assert_eq!(tops.len(), 6, "{}", out.report());
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "gc-race.example.org-1");
    let prefix = unique("gc-race");
    let to = sw.address(bucket, &prefix);
    let s3 = || nixpush_with_s3_keys(testbeds::S3_ACCESS_KEY, testbeds::S3_SECRET_KEY);
    run_ok(&mut push_cmd(s3(), &to, &keys, &tops[0]));

    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let backend: Arc<dyn nixpush_backends::Backend> = rt.block_on(async {
        Arc::new(
            nixpush_backends::s3::S3Backend::new(
                nixpush_backends::s3::S3Config::parse(&to).expect("S3 address"),
                nixpush_backends::s3::S3Credentials::Static {
                    key_id: testbeds::S3_ACCESS_KEY.into(),
                    secret_key: testbeds::S3_SECRET_KEY.into(),
                    token: None,
                },
            )
            .await
            .expect("open S3 backend"),
        )
    });
    let reader = rt.spawn(read_until(backend, stop.clone()));

    // Pushers: in slot s (4 s each), pusher i pushes top (s + i) mod 6, so each top is pushed
    // for three slots in six and left alone for the other three (12 s): long enough for a gc
    // to mark it (unpushed for the grace period) and not see it pushed again while it waits.
    let started = Instant::now();
    let run_for = Duration::from_secs(40);
    let slot = Duration::from_secs(4);
    let pushers: Vec<_> = (0..3)
        .map(|i| {
            let (to, tops, keys_secret) = (to.clone(), tops.clone(), keys.secret.clone());
            std::thread::spawn(move || {
                let mut outcomes = (0usize, 0usize, Vec::new());
                while started.elapsed() < run_for {
                    let s = (started.elapsed().as_secs() / slot.as_secs()) as usize;
                    let top = &tops[(s + i) % 6];
                    let out = run(nixpush_with_s3_keys(
                        testbeds::S3_ACCESS_KEY,
                        testbeds::S3_SECRET_KEY,
                    )
                    .arg("push")
                    .arg("--to")
                    .arg(&to)
                    .arg("--key-file")
                    .arg(&keys_secret)
                    .arg(top));
                    if out.status.success() {
                        outcomes.0 += 1;
                    } else if out
                        .stderr
                        .contains("was removed by a garbage collection of the cache")
                    {
                        outcomes.1 += 1;
                    } else {
                        outcomes.2.push(out.report());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                outcomes
            })
        })
        .collect();

    // gc again and again, keeping only what was pushed or announced within the window.
    let mut deleted = 0;
    let mut runs = 0;
    while started.elapsed() < run_for {
        let out = run(&mut gc_cmd(
            s3(),
            &to,
            &["--keep-since", "1s", "--sweep-bound", "5s", "--json"],
        ));
        assert!(out.status.success(), "gc failed: {}", out.report());
        let r = json(&out);
        deleted += r["deleted_narinfos"].as_array().unwrap().len();
        runs += 1;
    }
    let mut pushes = (0, 0);
    for p in pushers {
        let (ok, collected, failures) = p.join().expect("pusher thread");
        assert!(
            failures.is_empty(),
            "a push failed: {}",
            failures.join("\n")
        );
        pushes.0 += ok;
        pushes.1 += collected;
    }
    stop.store(true, Ordering::SeqCst);
    let (violations, rounds, checked) = rt.block_on(reader).expect("reader");
    eprintln!(
        "gc race: {runs} gc runs deleted {deleted} narinfos; {} pushes ok, {} retried after a \
         gc; the reader checked {checked} narinfos in {rounds} rounds",
        pushes.0, pushes.1
    );
    assert!(violations.is_empty(), "the reader saw: {violations:#?}");
    assert!(runs >= 3, "only {runs} gc runs");
    assert!(deleted > 0, "gc deleted nothing: the test shows nothing");
    assert!(rounds > 10 && checked > 0, "the reader hardly read");
    assert!(pushes.0 > 10, "pushes: {pushes:?}");

    let verify = run(s3()
        .arg("verify")
        .arg(&to)
        .arg("--trusted-key")
        .arg(keys.public_key()));
    assert!(verify.status.success(), "{}", verify.report());
}

/// Set or clear the file's immutable attribute (`chattr +i`: not even root can remove it
/// then); `false` where this file system or user cannot.
fn set_immutable(file: &Path, on: bool) -> bool {
    use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
    let f = fs::File::open(file).unwrap();
    let Ok(flags) = ioctl_getflags(&f) else {
        return false;
    };
    let flags = if on {
        flags | IFlags::IMMUTABLE
    } else {
        flags - IFlags::IMMUTABLE
    };
    ioctl_setflags(&f, flags).is_ok()
}

/// Clears the immutable attribute when dropped, however the test ends.
struct Immutable<'a>(&'a Path);

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        assert!(
            set_immutable(self.0, false),
            "cannot clear {}",
            self.0.display()
        );
    }
}

/// A narinfo that cannot be deleted is retried, reported by name, and stays with everything it
/// refers to and its NAR: the cache stays whole, and the next gc finishes the job.
#[test]
fn a_failed_delete_leaves_the_cache_whole() {
    let old_chain = chain("gc-fail");
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "gc-fail.example.org-1");
    let cache = tmp.path().join("cache");
    let c = cache.to_str().unwrap();
    push(c, &keys, &old_chain[2]);
    age_all(&cache, Duration::from_secs(2 * 86_400));
    let top = cache.join(narinfo_key(&old_chain[2]));
    if !set_immutable(&top, true) {
        eprintln!(
            "a_failed_delete_leaves_the_cache_whole: SKIPPED: cannot make a file immutable here \
             (needs root and ext4, xfs or btrfs)"
        );
        return;
    }
    let guard = Immutable(&top);
    let before: BTreeSet<String> = dir_names(&cache.join("nar"), |_| true)
        .into_iter()
        .collect();

    let out = run_fail(&mut gc_cmd(nixpush(), c, &["--keep-since", "1d"]));
    assert_eq!(out.status.code(), Some(1), "{}", out.report());
    assert!(
        out.stdout.contains(&format!(
            "error: cannot delete {}: Operation not permitted (os error 1); it stays, and so \
             does everything it needs; run gc again\n",
            narinfo_key(&old_chain[2]),
        )),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.contains(": deleted 0 narinfos, 0 NARs and "),
        "{}",
        out.report()
    );
    for p in &old_chain {
        assert!(cache.join(narinfo_key(p)).exists(), "{p} went");
    }
    let after: BTreeSet<String> = dir_names(&cache.join("nar"), |_| true)
        .into_iter()
        .collect();
    assert_eq!(after, before, "NARs went although their narinfos stayed");
    let verify = run(nixpush()
        .arg("verify")
        .arg(c)
        .arg("--trusted-key")
        .arg(keys.public_key()));
    assert!(verify.status.success(), "{}", verify.report());

    drop(guard);
    let out = run_ok(&mut gc_cmd(nixpush(), c, &["--keep-since", "1d"]));
    assert!(
        out.stdout.contains(": deleted 3 narinfos, 3 NARs and "),
        "{}",
        out.report()
    );
    assert_eq!(narinfo_files(&cache), Vec::<String>::new());
}
