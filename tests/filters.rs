//! Filters with real Nix: `exclude` and `max-nar-size` leave paths out, and their referrers with
//! them, so a cache never shows a narinfo whose references it lacks; `push --no-closure`
//! publishes only the named paths, and only where their references are in the cache already.
//! The daemon applies the same filters as `push`, and `status` counts what they left out.

mod common;
mod daemon_support;

use std::fs;

use common::*;
use daemon_support::*;

/// `app` keeps its source (`*-source`), `top` refers to `app`; `other` shares only `lib`;
/// `blob` is large (200 KiB).
const FILTERED_NIX: &str = concat!(
    "{ salt }:\nlet\n",
    nix_mk!(),
    r#"  src = mk "np-filter-source" "echo src $salt > $out";
  lib = mk "np-filter-lib" "echo lib $salt > $out";
  app = mk "np-filter-app" "echo ${src} ${lib} > $out";
  top = mk "np-filter-top" "echo ${app} > $out";
  other = mk "np-filter-other" "echo ${lib} > $out";
  blob = mk "np-filter-blob" "head -c 204800 /dev/zero > $out; echo $salt >> $out";
in { inherit src lib app top other blob; }
"#
);

struct Built {
    src: String,
    lib: String,
    app: String,
    top: String,
    other: String,
    blob: String,
}

fn build(salt: &str) -> Built {
    let (p, out) = nix_build_expr(
        FILTERED_NIX,
        salt,
        &["src", "lib", "app", "top", "other", "blob"],
        &[],
    );
    assert_eq!(p.len(), 6, "{}", out.report());
    Built {
        src: p[0].clone(),
        lib: p[1].clone(),
        app: p[2].clone(),
        top: p[3].clone(),
        other: p[4].clone(),
        blob: p[5].clone(),
    }
}

fn has_narinfo(cache: &std::path::Path, path: &str) -> bool {
    cache.join(format!("{}.narinfo", hash_part(path))).is_file()
}

/// No narinfo in `cache` lacks its references, and real Nix substitutes `path` from it into a
/// fresh store, signatures required.
fn whole_and_substituted(cache: &std::path::Path, keys: &KeyPair, path: &str) {
    check_cache_invariant(cache).expect("no narinfo lacks its references");
    let root = tempdir();
    let out = run(&mut nix_copy_cmd(
        cache,
        root.path(),
        &keys.public_key(),
        &[path.to_owned()],
    ));
    assert!(out.status.success(), "{}", out.report());
    assert!(valid_in_root(root.path(), path), "{path} not substituted");
}

#[test]
fn excluded_paths_take_their_referrers_with_them_and_the_cache_stays_whole() {
    let b = build(&unique("filter-exclude"));
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "filters-1");
    let cache = dir.path().join("cache");
    let to = format!("file://{}", cache.display());
    let mut cmd = push_cmd(nixpush(), &to, &keys, &b.top);
    cmd.args(["--exclude", "*-source", "--max-nar-size", "100KiB"])
        .args([&b.other, &b.blob]);
    let out = run_ok(&mut cmd);

    assert!(
        out.stderr.contains(&format!(
            "left out {}: its name matches exclude pattern \"*-source\"\n",
            b.src
        )),
        "{}",
        out.report()
    );
    assert!(
        out.stderr.contains(&format!(
            "left out {}: it refers to {}, which is left out (a cache never gets a path \
             without its references)\n",
            b.app, b.src
        )),
        "{}",
        out.report()
    );
    assert!(
        out.stderr.contains(&format!(
            "left out {}: it refers to {}, which is left out",
            b.top, b.app
        )),
        "{}",
        out.report()
    );
    assert!(
        out.stderr
            .contains(&format!("left out {}: its NAR (200.", b.blob))
            && out
                .stderr
                .contains(" KiB) is larger than max-nar-size (100.00 KiB)\n"),
        "{}",
        out.report()
    );
    assert!(
        out.stderr.contains("pushed 2 paths") && out.stderr.contains("; 4 left out by the filters"),
        "{}",
        out.report()
    );
    for p in [&b.lib, &b.other] {
        assert!(has_narinfo(&cache, p), "{p} was not published");
    }
    for p in [&b.src, &b.app, &b.top, &b.blob] {
        assert!(!has_narinfo(&cache, p), "{p} was published");
    }
    whole_and_substituted(&cache, &keys, &b.other);

    // A pattern that is not a glob is named, and nothing is written.
    let fresh = dir.path().join("fresh");
    let out = run_fail(
        push_cmd(
            nixpush(),
            &format!("file://{}", fresh.display()),
            &keys,
            &b.top,
        )
        .args(["--exclude", "np-[filter"]),
    );
    assert!(
        out.stderr
            .starts_with("nixpush: error: --exclude \"np-[filter\" is not a valid glob: "),
        "{}",
        out.report()
    );
    assert!(!fresh.exists(), "a refused push wrote {}", fresh.display());
}

#[test]
fn no_closure_publishes_only_what_the_cache_can_hold_whole() {
    let b = build(&unique("filter-no-closure"));
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "filters-1");
    let cache = dir.path().join("cache");
    let to = format!("file://{}", cache.display());

    // Into an empty cache, `top` alone cannot be whole.
    let out = run_fail(push_cmd(nixpush(), &to, &keys, &b.top).arg("--no-closure"));
    assert!(
        out.stderr.contains(&format!(
            "nixpush: error: {}: not published: it refers to {}, which the cache lacks, and \
             --no-closure leaves it out; push without --no-closure, or push {} first\n",
            b.top, b.app, b.app
        )),
        "{}",
        out.report()
    );
    assert!(
        narinfo_files(&cache).is_empty(),
        "{:?}",
        narinfo_files(&cache)
    );

    // Named together with what it needs, or once that is in the cache, it goes alone.
    let out = run_ok(
        push_cmd(nixpush(), &to, &keys, &b.lib)
            .arg("--no-closure")
            .args([&b.src, &b.app]),
    );
    assert_eq!(pushed_count(&out), 3, "{}", out.report());
    let out = run_ok(push_cmd(nixpush(), &to, &keys, &b.top).arg("--no-closure"));
    assert_eq!(pushed_count(&out), 1, "{}", out.report());
    whole_and_substituted(&cache, &keys, &b.top);
}

#[test]
fn the_daemon_applies_the_configured_filters_and_counts_what_they_left_out() {
    let b = build(&unique("filter-daemon"));
    let s = Setup::new("");
    fs::write(
        &s.config,
        format!(
            "exclude = [\"*-source\"]\nmax-nar-size = \"100KiB\"\n{}",
            s.config_text("")
        ),
    )
    .expect("write config");
    let mut daemon = s.start();
    s.enqueue(&[b.top.clone(), b.other.clone(), b.blob.clone()]);
    s.wait_published(&[b.lib.clone(), b.other.clone()], &daemon);
    daemon.assert_running();
    let st = s.status();
    assert_eq!(st["excluded"], 4, "{st}");
    assert_eq!(st["failed"], 0, "{st}");
    assert!(s.rejected().is_empty(), "{:?}", s.rejected());
    for p in [&b.src, &b.app, &b.top, &b.blob] {
        assert!(!has_narinfo(&s.cache, p), "{p} was published");
    }
    check_cache_invariant(&s.cache).expect("no narinfo lacks its references");
    let log = daemon.log_tail();
    assert!(
        log.contains(&format!(
            "left out: its name matches exclude pattern \"*-source\" path={}",
            b.src
        )),
        "{log}"
    );
    let text = run_ok(nixpush().args(["status", "--config"]).arg(&s.config));
    assert!(text.stdout.contains("left out: 4"), "{}", text.report());

    // A bad pattern in the config stops the daemon at start, naming the key.
    daemon.terminate(std::time::Duration::from_secs(10));
    fs::write(
        &s.config,
        format!("exclude = [\"np-[x\"]\n{}", s.config_text("")),
    )
    .expect("write config");
    let out = run_fail(&mut s.daemon_command());
    assert!(
        out.stderr.contains(&format!(
            "config {}: exclude: exclude pattern \"np-[x\" is not a valid glob: ",
            s.config.display()
        )),
        "{}",
        out.report()
    );
}
