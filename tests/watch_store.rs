//! Watching the store with real Nix: with `watch-store = true` (and no post-build-hook at all),
//! a path added with `nix-store --add`, a path substituted from another cache and a built path
//! all reach the cache, and real Nix substitutes them with signatures required; a path deleted
//! right after it appears is passed over with a log line, leaving the daemon running and the
//! queue empty.

mod common;
mod daemon_support;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;
use daemon_support::*;

fn nix_store(args: &[&str]) -> String {
    run_ok(Command::new("nix-store").args(args))
        .stdout
        .trim()
        .to_owned()
}

/// A file of its own content, added to the store; its store path.
fn add_file(dir: &std::path::Path, name: &str) -> String {
    let file = dir.join(name);
    fs::write(&file, format!("{}\n", unique(name))).expect("write file");
    nix_store(&["--add", file.to_str().expect("utf-8")])
}

#[test]
fn every_path_that_enters_the_store_reaches_the_cache() {
    let s = Setup::new("watch-store = true");
    let mut daemon = s.start();
    wait_until(
        Duration::from_secs(20),
        || format!("the daemon to watch the store\n{}", daemon.log_tail()),
        || fs::read_to_string(&s.log).is_ok_and(|l| l.contains("watching the store for new paths")),
    );

    // Added.
    let added = add_file(s.dir.path(), "np-watch-added");

    // Built, with no hook: only the store's watcher can see it.
    let expr = sh_derivation_nix("np-watch-built", "echo built ${salt} > $out");
    let (built, _) = nix_build_expr(&expr, &unique("watch-built"), &[], &[]);
    let built = built[0].clone();

    // Substituted: published to another cache, deleted here, then fetched from there.
    let other = s.dir.path().join("other-cache");
    let (fetched, _) = nix_build_expr(
        &sh_derivation_nix("np-watch-fetched", "echo fetched ${salt} > $out"),
        &unique("watch-fetched"),
        &[],
        &[],
    );
    let fetched = fetched[0].clone();
    s.wait_published(std::slice::from_ref(&built), &daemon);
    let other_keys = nixpush_keygen(s.dir.path(), "watch-other-1");
    push(other.to_str().expect("utf-8"), &other_keys, &fetched);
    // Wait for the daemon's own copy of it first, then take it out of both the store and the
    // cache, so what comes back later is the substitution's doing.
    s.wait_published(std::slice::from_ref(&fetched), &daemon);
    nix_store(&["--delete", &fetched]);
    fs::remove_file(s.cache.join(format!("{}.narinfo", hash_part(&fetched))))
        .expect("remove narinfo");
    run_fail(Command::new("nix-store").args(["--check-validity", &fetched]));
    run_ok(
        Command::new("nix-store")
            .args(["--realise", &fetched, "--option", "substituters"])
            .arg(format!("file://{}", other.display()))
            .args(["--option", "trusted-public-keys", &other_keys.public_key()]),
    );
    s.wait_published(&[added.clone(), built.clone(), fetched.clone()], &daemon);
    daemon.assert_running();
    s.nix_substitutes(&[added.clone(), built.clone(), fetched.clone()]);

    // Gone at once: passed over (or, if the daemon was quicker, published), never rejected.
    let gone = add_file(s.dir.path(), "np-watch-gone");
    nix_store(&["--delete", &gone]);
    wait_until(
        Duration::from_secs(40),
        || format!("{gone} to be passed over\n{}", daemon.log_tail()),
        || {
            let log = fs::read_to_string(&s.log).unwrap_or_default();
            log.lines()
                .any(|l| l.contains("passed over") && l.contains(&gone))
                || s.published(std::slice::from_ref(&gone))
        },
    );
    daemon.assert_running();
    wait_until(
        Duration::from_secs(20),
        || {
            format!(
                "the queue to empty: {:?}\n{}",
                s.queued(),
                daemon.log_tail()
            )
        },
        || s.queued().is_empty(),
    );
    assert!(s.rejected().is_empty(), "rejected: {:?}", s.rejected());
    check_cache_invariant(&s.cache).expect("no narinfo lacks its references");
}

#[test]
fn watch_store_is_the_daemon_in_the_foreground_with_the_watch_on() {
    let s = Setup::new("");
    let mut cmd = nixpush();
    cmd.arg("watch-store").arg("--config").arg(&s.config);
    for v in ["NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "WATCHDOG_USEC"] {
        cmd.env_remove(v);
    }
    let mut daemon = s.start_with(cmd);
    let added = add_file(s.dir.path(), "np-watch-foreground");
    s.wait_published(std::slice::from_ref(&added), &daemon);
    daemon.assert_running();
    let status = daemon.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", log_tail(&s.log));
}
