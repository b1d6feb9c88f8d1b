//! `nixpush doctor` against real set-ups: a good one passes every line; each broken one fails
//! on its own line, with its own words and fix, and makes the exit status non-zero.

mod common;
mod daemon_support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use common::*;
use daemon_support::*;

/// A daemon set-up (key, config, cache, queue, socket) with a nix.conf whose post-build-hook
/// is a script running nixpush-hook with this config.
struct Doctored {
    setup: Setup,
    nix_conf: PathBuf,
}

impl Doctored {
    fn new() -> Self {
        let setup = Setup::new("");
        let hook = setup.dir.path().join("post-build-hook");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\nNIXPUSH_CONFIG='{}' exec '{}'\n",
                setup.config.display(),
                &*NIXPUSH_HOOK
            ),
        )
        .expect("write hook");
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).expect("chmod hook");
        let nix_conf = setup.dir.path().join("nix.conf");
        fs::write(
            &nix_conf,
            "# a test's nix.conf\nsandbox = false\ninclude hook.conf\n!include absent.conf\n",
        )
        .expect("write nix.conf");
        fs::write(
            setup.dir.path().join("hook.conf"),
            format!("post-build-hook = {}\n", hook.display()),
        )
        .expect("write hook.conf");
        Self { setup, nix_conf }
    }

    /// Replace `from` with `to` in the config file.
    fn edit_config(&self, from: &str, to: &str) {
        let text = fs::read_to_string(&self.setup.config).expect("config");
        assert!(text.contains(from), "{from:?} not in\n{text}");
        fs::write(&self.setup.config, text.replace(from, to)).expect("write config");
    }

    fn doctor(&self) -> Out {
        run(nixpush()
            .arg("doctor")
            .arg("--config")
            .arg(&self.setup.config)
            .arg("--nix-conf")
            .arg(&self.nix_conf))
    }
}

/// The `FAIL` lines of a report (with their continuation lines), each with its `fix:` line.
fn failures(out: &Out) -> Vec<(String, String)> {
    let lines: Vec<&str> = out.stdout.lines().collect();
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(first) = l.strip_prefix("FAIL  ") else {
            continue;
        };
        let mut what = first.to_owned();
        let mut fix = None;
        for next in &lines[i + 1..] {
            if let Some(f) = next.strip_prefix("      fix: ") {
                fix = Some(f.to_owned());
                break;
            }
            match next.strip_prefix("      ") {
                Some(more) => {
                    what.push('\n');
                    what.push_str(more);
                }
                None => break,
            }
        }
        let fix = fix.unwrap_or_else(|| panic!("FAIL line without a fix: {}", out.report()));
        found.push((what, fix));
    }
    found
}

/// The report failed (exit 1) on exactly one line besides the daemon's (not started here),
/// saying `words` with a fix saying `fix_words`.
fn fails_with(out: &Out, words: &[&str], fix_words: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{}", out.report());
    let (daemon, failed): (Vec<_>, Vec<_>) = failures(out)
        .into_iter()
        .partition(|(what, _)| what.starts_with("the daemon is not running at "));
    assert!(
        matches!(&daemon[..], [(_, fix)] if fix.contains("systemctl start nixpush.service")
            && fix.contains("nixpush daemon --config")),
        "the daemon's line: {}",
        out.report()
    );
    assert_eq!(failed.len(), 1, "one failure expected: {}", out.report());
    let (what, fix) = &failed[0];
    for w in words {
        assert!(what.contains(w), "{w:?} not in {what:?}: {}", out.report());
    }
    for w in fix_words {
        assert!(
            fix.contains(w),
            "{w:?} not in the fix {fix:?}: {}",
            out.report()
        );
    }
    assert!(
        out.stdout.ends_with(&format!(
            "{} of {} checks failed\n",
            failures(out).len(),
            out.stdout
                .lines()
                .filter(|l| l.starts_with("ok    ") || l.starts_with("FAIL  "))
                .count()
        )),
        "{}",
        out.report()
    );
}

/// A port nothing listens on: bound, then closed.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn no_probe_left(cache: &Path) {
    let left = dir_names(cache, |n| n.contains("doctor"));
    assert!(left.is_empty(), "probe objects left in the cache: {left:?}");
}

#[test]
fn a_good_set_up_passes_every_line() {
    let d = Doctored::new();
    let daemon = d.setup.start();
    let out = d.doctor();
    assert!(out.status.success(), "{}", out.report());
    assert_eq!(failures(&out), Vec::new(), "{}", out.report());
    let public = fs::read_to_string(&d.setup.keys.public).expect("public key");
    for line in [
        format!("ok    config {} parses", d.setup.config.display()),
        format!(
            "ok    clients' nix.conf needs: trusted-public-keys = {}",
            public.trim()
        ),
        format!("ok    the Nix store {} answers", store_dir()),
        format!(
            "ok    the cache file://{} answers and accepts a write (a probe object, deleted again)",
            d.setup.cache.display()
        ),
        format!(
            "ok    the queue directory {} is writable",
            d.setup.queue.display()
        ),
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "no line {line:?}: {}",
            out.report()
        );
    }
    for words in [
        vec![
            "ok    key file",
            "secret key \"daemon-test-1\"",
            "(mode 0600)",
        ],
        vec![
            "ok    ",
            "hook.conf: post-build-hook = ",
            "with",
            "config.toml",
        ],
        vec!["ok    the daemon answers on", "0 queued"],
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| words.iter().all(|w| l.contains(w))),
            "no line with {words:?}: {}",
            out.report()
        );
    }
    assert!(
        out.stdout.ends_with("all 9 checks passed\n"),
        "{}",
        out.report()
    );
    no_probe_left(&d.setup.cache);
    drop(daemon);
}

#[test]
fn a_missing_key_fails() {
    let d = Doctored::new();
    let key = d.setup.keys.secret.display().to_string();
    d.edit_config(&format!("\"{key}\""), "\"missing-key\"");
    fails_with(
        &d.doctor(),
        &[
            "missing-key (key-files: \"missing-key\" next to the config file): cannot read it",
            "No such file or directory",
        ],
        &["nixpush keygen", "or correct key-files"],
    );
}

#[test]
fn a_public_key_given_as_the_secret_one_fails() {
    let d = Doctored::new();
    let secret = d.setup.keys.secret.display().to_string();
    let public = d.setup.keys.public.display().to_string();
    d.edit_config(&secret, &public);
    fails_with(
        &d.doctor(),
        &[&public, "is a public key"],
        &["name the secret file of the pair", "trusted-public-keys"],
    );
}

#[test]
fn a_key_others_can_read_fails() {
    let d = Doctored::new();
    let secret = &d.setup.keys.secret;
    fs::set_permissions(secret, fs::Permissions::from_mode(0o644)).expect("chmod");
    fails_with(
        &d.doctor(),
        &[
            &secret.display().to_string(),
            "other users can read or change this secret key (mode 0644)",
        ],
        &[&format!("chmod 600 {}", secret.display())],
    );
}

#[test]
fn an_unreachable_cache_fails() {
    let d = Doctored::new();
    let port = closed_port();
    let cache = format!("file://{}", d.setup.cache.display());
    d.edit_config(&cache, &format!("http://127.0.0.1:{port}/cache"));
    fails_with(
        &d.doctor(),
        &[&format!(
            "cache http://127.0.0.1:{port}/cache does not accept a write"
        )],
        &["check that the server is up", "address"],
    );
}

#[test]
fn several_caches_are_checked_each() {
    let d = Doctored::new();
    let port = closed_port();
    let cache = format!("cache = \"file://{}\"\n", d.setup.cache.display());
    let second = d.setup.dir.path().join("second.sec");
    fs::copy(&d.setup.keys.secret, &second).expect("copy key");
    d.edit_config(&cache, "");
    let text = fs::read_to_string(&d.setup.config).expect("config");
    fs::write(
        &d.setup.config,
        format!(
            "{text}\n[[caches]]\nname = \"local\"\ncache = \"file://{local}\"\n\n\
             [[caches]]\nname = \"away\"\ncache = \"http://127.0.0.1:{port}/cache\"\n\
             key-files = [\"{second}\"]\n",
            local = d.setup.cache.display(),
            second = second.display()
        ),
    )
    .expect("write config");
    let out = d.doctor();
    // Each cache's key, and each cache probed: the directory answers, the other does not.
    assert!(
        out.stdout
            .contains(&format!("ok    key file {}", d.setup.keys.secret.display()))
            && out
                .stdout
                .contains(&format!("ok    key file {}", second.display()))
            && out.stdout.contains(&format!(
                "ok    the cache file://{} answers and accepts a write",
                d.setup.cache.display()
            )),
        "{}",
        out.report()
    );
    fails_with(
        &out,
        &[&format!(
            "cache http://127.0.0.1:{port}/cache does not accept a write"
        )],
        &["check that the server is up"],
    );
    no_probe_left(&d.setup.cache);
}

#[test]
fn a_cache_for_another_store_dir_fails() {
    let d = Doctored::new();
    fs::create_dir_all(&d.setup.cache).expect("cache dir");
    fs::write(
        d.setup.cache.join("nix-cache-info"),
        "StoreDir: /not/the/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .expect("nix-cache-info");
    fails_with(
        &d.doctor(),
        &[&format!(
            "its nix-cache-info has StoreDir /not/the/store, but this machine's store is {}",
            store_dir()
        )],
        &[&format!("publish to a cache made for {}", store_dir())],
    );
    no_probe_left(&d.setup.cache);
}

#[test]
fn a_nix_conf_without_the_hook_fails() {
    let d = Doctored::new();
    fs::write(d.setup.dir.path().join("hook.conf"), "# nothing here\n").expect("hook.conf");
    fails_with(
        &d.doctor(),
        &[&format!("{} sets no post-build-hook", d.nix_conf.display())],
        &[
            "add `post-build-hook = ",
            "nixpush-hook` to",
            "restart nix-daemon",
        ],
    );
}

#[test]
fn a_hook_reading_another_config_fails() {
    let d = Doctored::new();
    // nixpush-hook named directly reads /etc/nixpush/config.toml, not this test's config.
    fs::write(
        d.setup.dir.path().join("hook.conf"),
        format!("post-build-hook = {}\n", &*NIXPUSH_HOOK),
    )
    .expect("hook.conf");
    fails_with(
        &d.doctor(),
        &[
            "nixpush-hook reads /etc/nixpush/config.toml",
            &format!("not {}", d.setup.config.display()),
        ],
        &[&format!("NIXPUSH_CONFIG={} exec", d.setup.config.display())],
    );
}

#[test]
fn a_config_that_does_not_parse_stops_the_checks() {
    let d = Doctored::new();
    fs::write(
        &d.setup.config,
        "allow-unsigned = true\ncompresion = \"xz\"\n",
    )
    .expect("config");
    let out = d.doctor();
    assert_eq!(out.status.code(), Some(1), "{}", out.report());
    let failed = failures(&out);
    assert_eq!(failed.len(), 1, "{}", out.report());
    let (what, fix) = &failed[0];
    assert!(what.contains("compresion"), "{}", out.report());
    assert!(
        what.ends_with("\ndid you mean `compression`?"),
        "{}",
        out.report()
    );
    assert!(
        fix.contains("correct the key named above"),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.ends_with("1 of 1 checks failed\n"),
        "{}",
        out.report()
    );
}

#[test]
fn nix_conf_is_found_through_nix_conf_dir() {
    let d = Doctored::new();
    // Nix itself (the store's nix-daemon --stdio, where one is started) reads this file too:
    // the system's settings first.
    let text = fs::read_to_string(&d.nix_conf).expect("nix.conf");
    fs::write(&d.nix_conf, format!("!include /etc/nix/nix.conf\n{text}")).expect("nix.conf");
    let out = run(nixpush()
        .arg("doctor")
        .arg("--config")
        .arg(&d.setup.config)
        .env("NIX_CONF_DIR", d.setup.dir.path()));
    let hook_line = format!(
        "ok    {}: post-build-hook = ",
        d.setup.dir.path().join("hook.conf").display()
    );
    assert!(
        out.stdout.lines().any(|l| l.starts_with(&hook_line)),
        "no {hook_line:?}: {}",
        out.report()
    );
    // And without it, the hook line is gone: the file named there is the one read.
    fs::write(d.setup.dir.path().join("hook.conf"), "\n").expect("hook.conf");
    let out = run(nixpush()
        .arg("doctor")
        .arg("--config")
        .arg(&d.setup.config)
        .env("NIX_CONF_DIR", d.setup.dir.path()));
    fails_with(
        &out,
        &[&format!("{} sets no post-build-hook", d.nix_conf.display())],
        &["add `post-build-hook = "],
    );
}
