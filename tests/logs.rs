//! Build logs in the cache: `push --logs` and the daemon's `upload-logs = true` publish the log
//! of each derivation whose outputs they publish, as Nix lays it out (`log/<drv base name>`),
//! and real Nix prints it with `nix log --store CACHE PATH`, from a directory and over HTTP
//! from an S3 bucket (SeaweedFS).

mod common;
mod daemon_support;
#[cfg(feature = "s3")]
#[path = "../backends/tests/support/testbeds.rs"]
mod testbeds;

use std::fs;

use common::*;
use daemon_support::{Setup, deriver_of};

/// A derivation that writes a line of its own to its log, on stdout and stderr.
fn logged_nix() -> String {
    sh_derivation_nix(
        "np-logged",
        "echo 'build log of np-logged ${salt}'; echo 'and its stderr' >&2; echo ${salt} > $out",
    )
}

/// Build [`logged_nix`] with a salt of its own; its output and the line its log must hold.
fn build_logged() -> (String, String) {
    let salt = unique("logs");
    let (paths, _) = nix_build_expr(&logged_nix(), &salt, &[], &[]);
    (paths[0].clone(), format!("build log of np-logged {salt}"))
}

/// `nix log --store file://CACHE PATH`, which must succeed; what it printed.
fn nix_log(cache: &std::path::Path, path: &str) -> String {
    nix_log_from(&format!("file://{}", cache.display()), path)
}

/// `nix log --store STORE PATH`, which must succeed; what it printed.
fn nix_log_from(store: &str, path: &str) -> String {
    run_ok(nix().args(["log", "--store", store, path])).stdout
}

#[test]
fn push_logs_publishes_the_build_log_nix_reads_back() {
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "logs-1");
    let (out, line) = build_logged();
    let drv = deriver_of(&out);
    let cache = dir.path().join("cache");
    let mut cmd = push_cmd(nixpush(), cache.to_str().unwrap(), &keys, &out);
    cmd.arg("--logs");
    let pushed = run_ok(&mut cmd);
    assert!(
        pushed.stderr.contains("; 1 build log"),
        "the summary should count the log: {}",
        pushed.report()
    );
    let object = cache.join("log").join(base_name(&drv));
    let text = fs::read_to_string(&object)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", object.display(), pushed.report()));
    assert!(
        text.contains(&line) && text.contains("and its stderr"),
        "{text:?}"
    );
    let printed = nix_log(&cache, &out);
    assert!(printed.contains(&line), "nix log printed {printed:?}");
}

#[cfg(feature = "s3")]
#[test]
fn logs_pushed_to_s3_are_read_by_nix_over_http() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "logs-1");
    let (out, line) = build_logged();
    let drv = deriver_of(&out);
    let bucket = testbeds::PUBLIC_BUCKETS[0];
    let prefix = unique("logs");
    let s3 = nixpush_with_s3_keys(testbeds::S3_ACCESS_KEY, testbeds::S3_SECRET_KEY);
    let mut cmd = push_cmd(s3, &sw.address(bucket, &prefix), &keys, &out);
    cmd.arg("--logs");
    let pushed = run_ok(&mut cmd);
    assert!(
        pushed.stderr.contains("; 1 build log"),
        "{}",
        pushed.report()
    );
    // Anonymous readers of the bucket, as a substituter reads it.
    let http = format!("{}/{bucket}/{prefix}", sw.endpoint());
    let printed = nix_log_from(&http, &out);
    assert!(
        printed.contains(&line) && printed.contains("and its stderr"),
        "nix log printed {printed:?}"
    );
    // (Nix 2.8 looks a `.drv` up as a path of that store, which this cache does not have.)
    let object = format!("{http}/log/{}", base_name(&drv));
    let fetched = run_ok(std::process::Command::new("curl").args(["-sSf", &object])).stdout;
    assert!(fetched.contains(&line), "{object}: {fetched:?}");
}

#[test]
fn without_logs_no_log_is_published_and_a_path_without_one_is_passed_over() {
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "logs-2");
    let (out, _) = build_logged();
    let cache = dir.path().join("cache");
    let pushed = push(cache.to_str().unwrap(), &keys, &out);
    assert!(!pushed.stderr.contains("build log"), "{}", pushed.report());
    assert!(!cache.join("log").exists(), "a log was published unasked");

    // A path that no build made (evaluation adds it) has no log to publish.
    let c = small_closure();
    let other = dir.path().join("other");
    let mut cmd = push_cmd(nixpush(), other.to_str().unwrap(), &keys, &c.text);
    cmd.arg("--logs");
    let pushed = run_ok(&mut cmd);
    assert!(
        pushed.stderr.contains("; 0 build logs"),
        "{}",
        pushed.report()
    );
}

#[test]
fn the_daemon_with_upload_logs_publishes_the_logs_of_what_it_publishes() {
    let setup = Setup::new("");
    let text = fs::read_to_string(&setup.config).expect("config");
    fs::write(&setup.config, format!("upload-logs = true\n{text}")).expect("config");
    let daemon = setup.start();
    let (out, line) = build_logged();
    let drv = deriver_of(&out);
    setup.enqueue(std::slice::from_ref(&out));
    setup.wait_published(std::slice::from_ref(&out), &daemon);
    // The log follows the path's narinfo in the same pass.
    let object = setup.cache.join("log").join(base_name(&drv));
    daemon_support::wait_until(
        std::time::Duration::from_secs(30),
        || {
            format!(
                "{} to appear\n--- log:\n{}",
                object.display(),
                daemon.log_tail()
            )
        },
        || object.is_file(),
    );
    let printed = nix_log(&setup.cache, &out);
    assert!(printed.contains(&line), "nix log printed {printed:?}");
}
