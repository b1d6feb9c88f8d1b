//! One daemon, two caches (`[[caches]]`): a directory, and a SeaweedFS bucket with its own
//! compression and signing key. While SeaweedFS is stopped (`SIGSTOP`: it holds every
//! connection and answers nothing), the directory keeps receiving new builds; once it runs
//! again, both caches hold every path, the queue is empty, and real Nix substitutes from each
//! with that cache's key required.
//!
//! This file has its own test binary, so the SeaweedFS it stops is its own.

#![cfg(feature = "s3")]

mod common;
mod daemon_support;

#[path = "../backends/tests/support/testbeds.rs"]
mod testbeds;

use std::fs;
use std::process::Command;

use common::*;
use daemon_support::{PATIENCE, Setup, closure_of_all, wait_until};

const BUCKET: &str = testbeds::PUBLIC_BUCKETS[0];

/// An application per `n`, referring to a base path of its own.
const APPS_NIX: &str = concat!(
    "{ salt }:\nlet\n",
    nix_mk!(),
    r#"  base = n: mk "np-caches-base-${toString n}" "printf 'base ${toString n} %s\n' \"$salt\" > $out";
  app = n: mk "np-caches-app-${toString n}" "printf 'app ${toString n} %s uses ${base n}\n' \"$salt\" > $out";
in { a1 = app 1; a2 = app 2; a3 = app 3; }
"#
);

/// SeaweedFS stopped until dropped (then continued, even when the test fails).
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal("STOP", pid);
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

/// `app` and the one path it refers to (its base).
fn closure(app: &str) -> Vec<String> {
    let c = closure_of_all(&[app.to_owned()]);
    assert_eq!(c.len(), 2, "{app}: {c:?}");
    c
}

fn in_bucket(sw: &testbeds::SeaweedFs, prefix: &str, path: &str) -> bool {
    // GET, not HEAD: curl -X HEAD waits for the body the length announces.
    let (code, _) = sw.curl_signed(
        "GET",
        &format!("/{BUCKET}/{prefix}/{}.narinfo", hash_part(path)),
    );
    code == 200
}

fn narinfo_in_bucket(sw: &testbeds::SeaweedFs, prefix: &str, path: &str) -> String {
    let (code, body) = sw.curl_signed(
        "GET",
        &format!("/{BUCKET}/{prefix}/{}.narinfo", hash_part(path)),
    );
    assert_eq!(code, 200, "{path}: {body}");
    body
}

/// The `caches` of `nixpush status --json`, by name: (entries to publish, retrying).
fn per_cache(setup: &Setup) -> Vec<(String, u64, bool)> {
    let st = setup.status();
    st["caches"]
        .as_array()
        .unwrap_or_else(|| panic!("no caches in the status: {st}"))
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("name").to_owned(),
                c["waiting"].as_u64().expect("waiting"),
                c["retrying"].as_bool().expect("retrying"),
            )
        })
        .collect()
}

#[test]
fn a_stopped_cache_delays_only_itself_and_catches_up() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let setup = Setup::new("");
    let s3_keys = nixpush_keygen(setup.dir.path(), "caches-s3.example.org-1");
    let prefix = unique("caches");
    // The top level's key and compression are the directory's; the bucket has its own.
    let text = setup.config_text("").replacen(
        &format!("cache = \"file://{}\"\n", setup.cache.display()),
        "",
        1,
    ) + &format!(
        r#"
[[caches]]
name = "dir"
cache = "file://{dir}"

[[caches]]
name = "s3"
cache = "{s3}"
compression = "xz"
key-files = ["{s3_key}"]
"#,
        dir = setup.cache.display(),
        s3 = sw.address(BUCKET, &prefix),
        s3_key = s3_keys.secret.display(),
    );
    fs::write(&setup.config, text).expect("write config");

    let salt = unique("caches");
    let (apps, _) = nix_build_expr(APPS_NIX, &salt, &["a1", "a2", "a3"], &[]);
    let closures: Vec<Vec<String>> = apps.iter().map(|a| closure(a)).collect();
    let all: Vec<String> = closures.iter().flatten().cloned().collect();

    let mut cmd = nixpush_with_s3_keys(testbeds::S3_ACCESS_KEY, testbeds::S3_SECRET_KEY);
    cmd.arg("daemon").arg("--config").arg(&setup.config);
    // A stopped server answers nothing: give up on a request after 3 s, not minutes.
    cmd.env("NIXPUSH_REQUEST_TIMEOUT_SECS", "3");
    let daemon = setup.start_with(cmd);

    // Both caches up: the first build reaches both, and its entry leaves the queue.
    setup.enqueue(&apps[..1]);
    wait_until(
        PATIENCE,
        || format!("first build in both caches\n{}", daemon.log_tail()),
        || {
            setup.published(&closures[0])
                && closures[0].iter().all(|p| in_bucket(sw, &prefix, p))
                && setup.queued().is_empty()
        },
    );

    // SeaweedFS stopped: the directory goes on receiving, build after build; the entries
    // stay queued for the bucket.
    let stopped = Stopped::new(sw.pid());
    for (app, closure) in apps[1..].iter().zip(&closures[1..]) {
        setup.enqueue(std::slice::from_ref(app));
        wait_until(
            PATIENCE,
            || {
                format!(
                    "{app} in the directory while SeaweedFS is stopped; queue {:?}\n{}",
                    setup.queued(),
                    daemon.log_tail()
                )
            },
            || setup.published(closure),
        );
    }
    assert_eq!(setup.queued().len(), 2, "kept for the stopped cache");
    // What failed is said of the cache it failed for, in the log and in `status`.
    wait_until(
        PATIENCE,
        || format!("no warning about the stopped cache\n{}", daemon.log_tail()),
        || {
            let log = fs::read_to_string(&setup.log).unwrap_or_default();
            log.lines()
                .any(|l| l.contains(" WARN cache{name=s3}") && l.contains("will retry"))
        },
    );
    let log = fs::read_to_string(&setup.log).unwrap_or_default();
    assert!(
        !log.lines()
            .any(|l| l.contains(" WARN cache{name=dir}") || l.contains(" ERROR cache{name=dir}")),
        "the directory cache had nothing to complain of:\n{log}"
    );
    let st = setup.status();
    let errors = st["last_errors"].as_array().expect("last_errors");
    assert!(
        !errors.is_empty()
            && errors.iter().all(|e| e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("cache s3: "))),
        "{st}"
    );
    let caches = per_cache(&setup);
    assert_eq!(caches.len(), 2, "{caches:?}");
    assert_eq!(caches[0].0, "dir", "{caches:?}");
    assert_eq!(caches[0].1, 0, "the directory has all: {caches:?}");
    assert_eq!(caches[1].0, "s3", "{caches:?}");
    assert_eq!(
        caches[1].1, 2,
        "the bucket has two entries to go: {caches:?}"
    );
    let human = run_ok(nixpush().args(["status", "--config"]).arg(&setup.config));
    assert!(
        human.stdout.contains("caches:      2\n")
            && human.stdout.contains(&format!(
                "  dir (file://{}): 0 entries to publish",
                setup.cache.display()
            ))
            && human.stdout.contains("  s3 (s3://"),
        "{}",
        human.report()
    );

    // SeaweedFS back: the bucket catches up, and only then do the entries leave the queue.
    drop(stopped);
    wait_until(
        PATIENCE,
        || {
            format!(
                "every path in the bucket and the queue empty after SeaweedFS came back; queue \
                 {:?}\n{}",
                setup.queued(),
                daemon.log_tail()
            )
        },
        || all.iter().all(|p| in_bucket(sw, &prefix, p)) && setup.queued().is_empty(),
    );
    assert!(setup.rejected().is_empty(), "{:?}", setup.rejected());
    let caches = per_cache(&setup);
    assert!(
        caches.iter().all(|(_, waiting, _)| *waiting == 0),
        "{caches:?}"
    );

    // Each cache as configured: its own compression, its own key, and Nix takes it.
    for p in &all {
        let local = fs::read_to_string(setup.cache.join(format!("{}.narinfo", hash_part(p))))
            .expect("narinfo in the directory");
        assert!(local.contains("Compression: zstd\n"), "{local}");
        assert!(local.contains("Sig: daemon-test-1:"), "{local}");
        let remote = narinfo_in_bucket(sw, &prefix, p);
        assert!(remote.contains("Compression: xz\n"), "{remote}");
        assert!(remote.contains("Sig: caches-s3.example.org-1:"), "{remote}");
    }
    let root = tempdir();
    nix_substitutes_from(
        &format!("file://{}", setup.cache.display()),
        &root.path().join("from-dir"),
        &setup.keys.public_key(),
        &apps,
        &all,
    );
    nix_substitutes_from(
        &format!("{}/{BUCKET}/{prefix}", sw.endpoint()),
        &root.path().join("from-s3"),
        &s3_keys.public_key(),
        &apps,
        &all,
    );
    drop(daemon);
}
