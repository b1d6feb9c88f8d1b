//! `nixpush push` refuses bad input before publishing anything: the error names the problem,
//! the exit code is non-zero, and the cache holds no narinfo (and no NAR). Symlinks to store
//! paths, as `nix-build` leaves them (`./result`), are followed. And every error is one line in
//! exact words that says its cause once (`error_line_is`), for `push` and the other commands.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use common::*;

/// Files under `cache/nar` (none if it does not exist).
fn nar_files(cache: &Path) -> Vec<String> {
    fs::read_dir(cache.join("nar"))
        .map(|rd| {
            rd.map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Run `nixpush push --to CACHE ARGS` in a fresh cache and check that it fails, saying every
/// one of `expected` (case-insensitive), and publishes nothing.
fn push_fails(args: &[&str], expected: &[&str]) -> Out {
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    let out = run_fail(
        nixpush()
            .arg("push")
            .arg("--to")
            .arg(format!("file://{}", cache.display()))
            .args(args),
    );
    let stderr = out.stderr.to_lowercase();
    for e in expected {
        assert!(
            stderr.contains(&e.to_lowercase()),
            "the error should mention {e:?}: {}",
            out.report()
        );
    }
    assert_eq!(
        narinfo_files(&cache),
        Vec::<String>::new(),
        "narinfos published despite the error: {}",
        out.report()
    );
    assert_eq!(
        nar_files(&cache),
        Vec::<String>::new(),
        "NARs uploaded despite the error: {}",
        out.report()
    );
    out
}

/// A path that is syntactically a store path but not in the store.
fn missing_store_path() -> String {
    let p = format!(
        "{}/00000000000000000000000000000000-nixpush-missing-{}",
        store_dir(),
        salt()
    );
    assert!(!Path::new(&p).exists());
    p
}

#[test]
fn path_outside_the_store() {
    push_fails(
        &["--no-sign", "/etc/passwd"],
        &["/etc/passwd", "not in the Nix store"],
    );
    // Also when it comes after a good one: nothing of the good one is published.
    let c = small_closure();
    push_fails(
        &["--no-sign", &c.leaf, "/etc/passwd"],
        &["/etc/passwd", "not in the Nix store"],
    );
}

#[test]
fn missing_store_path_is_refused() {
    let missing = missing_store_path();
    push_fails(&["--no-sign", &missing], &[&missing, "not valid"]);
    let c = small_closure();
    push_fails(&["--no-sign", &c.small, &missing], &[&missing, "not valid"]);
}

#[test]
fn dot_dot_out_of_the_store() {
    let store = store_dir();
    let c = small_closure();
    for arg in [
        format!("{store}/../etc"),
        format!("{store}/.."),
        format!("{}/../../../etc/passwd", c.small),
        format!("{}/../../etc", c.leaf),
    ] {
        push_fails(&["--no-sign", &arg], &[&arg, "not in the Nix store"]);
    }
    // The store directory itself names no store path.
    push_fails(&["--no-sign", store], &["does not name a store path"]);
}

#[test]
fn missing_key_file() {
    let c = small_closure();
    let tmp = tempdir();
    let key = tmp.path().join("no-such-key.sec");
    let key = key.to_str().expect("utf-8");
    push_fails(
        &["--key-file", key, &c.leaf],
        &[key, "cannot read key file"],
    );
}

#[test]
fn malformed_key_files() {
    let c = small_closure();
    let tmp = tempdir();
    let garbage = tmp.path().join("garbage.sec");
    fs::write(&garbage, "this is not a key\n").expect("write");
    let garbage = garbage.to_str().expect("utf-8");
    push_fails(
        &["--key-file", garbage, &c.leaf],
        &[garbage, "not a secret key"],
    );

    // A public key given where the secret one belongs (both made by Nix and by nixpush).
    let nix = nix_keygen(tmp.path(), "cli-errors.example.org-1", "nix");
    let ours = nixpush_keygen(tmp.path(), "cli-errors-ours.example.org-1");
    for public in [&nix.public, &ours.public] {
        let public = public.to_str().expect("utf-8");
        push_fails(
            &["--key-file", public, &c.leaf],
            &[public, "not a secret key"],
        );
    }
    // A secret key whose public half does not match.
    let sk = fs::read_to_string(&nix.secret).expect("secret key");
    let (name, b64) = sk.trim().split_once(':').expect("name:base64");
    let mut chars: Vec<char> = b64.chars().collect();
    // The 80th base64 character encodes bits of the public half (bytes 32..63).
    chars[80] = if chars[80] == 'A' { 'B' } else { 'A' };
    let mismatched = tmp.path().join("mismatched.sec");
    fs::write(
        &mismatched,
        format!("{name}:{}", chars.into_iter().collect::<String>()),
    )
    .expect("write");
    let mismatched = mismatched.to_str().expect("utf-8");
    push_fails(
        &["--key-file", mismatched, &c.leaf],
        &[mismatched, "not a secret key"],
    );
}

#[test]
fn unknown_compression() {
    let c = small_closure();
    push_fails(
        &["--no-sign", "--compression", "lz9", &c.leaf],
        &["lz9", "compression"],
    );
    // The same in the cache address, as Nix users write it.
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    let out = run_fail(
        nixpush()
            .arg("push")
            .arg("--to")
            .arg(format!("file://{}?compression=lz9", cache.display()))
            .arg("--no-sign")
            .arg(&c.leaf),
    );
    assert!(out.stderr.contains("lz9"), "{}", out.report());
    assert_eq!(narinfo_files(&cache), Vec::<String>::new());
}

#[test]
fn no_key_and_no_no_sign() {
    let c = small_closure();
    push_fails(&[&c.leaf], &["no signing key", "--no-sign"]);
}

#[test]
fn no_paths() {
    push_fails(&["--no-sign"], &["no paths"]);
}

/// `./result`-style symlinks (and chains of them) resolve to the store path they end in; a
/// path inside a store path names that store path; a store path that is itself a symlink is
/// pushed as itself, not as what it points to.
#[test]
fn result_symlinks_are_followed() {
    let c = small_closure();
    let tmp = tempdir();
    let work = tmp.path().join("work");
    fs::create_dir(&work).expect("mkdir");
    symlink(&c.small, work.join("result")).expect("symlink");
    symlink("result", work.join("result-chain")).expect("symlink");
    symlink(&c.link, work.join("result-link")).expect("symlink");

    let push_in_work = |cache: &Path, args: &[&str]| {
        run_ok(
            nixpush()
                .current_dir(&work)
                .arg("push")
                .arg("--to")
                .arg(cache)
                .arg("--no-sign")
                .args(args),
        )
    };
    let narinfos = |paths: &[&String]| {
        let mut v: Vec<String> = paths
            .iter()
            .map(|p| format!("{}.narinfo", hash_part(p)))
            .collect();
        v.sort();
        v
    };

    let whole = narinfos(&[&c.leaf, &c.link, &c.text, &c.small]);
    for (i, arg) in ["./result", "result-chain"].iter().enumerate() {
        let cache = tmp.path().join(format!("cache-{i}"));
        let out = push_in_work(&cache, &[arg]);
        assert_eq!(narinfo_files(&cache), whole, "{arg}: {}", out.report());
    }

    // A path inside a store path names that store path. (Through `./result/dir/sub` it does
    // not: like Nix's `followLinksToStore`, only the last component is followed.)
    let cache = tmp.path().join("cache-inside");
    let inside = format!("{}/dir/sub", c.small);
    let out = push_in_work(&cache, &[&inside]);
    assert_eq!(narinfo_files(&cache), whole, "{}", out.report());

    // The symlink store path itself, with its closure (the leaf), and nothing else.
    let cache = tmp.path().join("cache-link");
    let out = push_in_work(&cache, &["./result-link"]);
    assert_eq!(
        narinfo_files(&cache),
        narinfos(&[&c.leaf, &c.link]),
        "{}",
        out.report()
    );
    let ni = RawNarInfo::read(&cache, &c.link);
    assert_eq!(ni.one("StorePath"), c.link);
    assert!(ni.all("Sig").is_empty(), "--no-sign, yet: {}", ni.text);
}

/// The single line `nixpush` printed for its error, checked word for word, and checked to
/// contain `cause` exactly once: the top-level report prints an error and then each of its
/// sources, so an error that has its cause both in its message and as its source says it twice.
fn error_line_is(out: &Out, expected: &str, cause: &str) {
    assert_eq!(
        out.stderr.trim_end(),
        format!("nixpush: error: {expected}"),
        "{}",
        out.report()
    );
    assert_eq!(
        out.stderr.matches(cause).count(),
        1,
        "the cause {cause:?} should appear exactly once: {}",
        out.report()
    );
}

#[test]
fn unreadable_config_says_its_cause_once() {
    let tmp = tempdir();
    let missing = tmp.path().join("missing.toml");
    let out = run_fail(nixpush().arg("daemon").arg("--config").arg(&missing));
    error_line_is(
        &out,
        &format!(
            "cannot read config {}: No such file or directory (os error 2)",
            missing.display()
        ),
        "No such file or directory",
    );
    // `status` takes a missing file for the defaults, but not one it cannot read.
    let out = run_fail(nixpush().arg("status").arg("--config").arg(tmp.path()));
    error_line_is(
        &out,
        &format!(
            "cannot read config {}: Is a directory (os error 21)",
            tmp.path().display()
        ),
        "Is a directory",
    );
}

#[test]
fn unknown_compression_in_the_address_says_it_once() {
    let c = small_closure();
    let tmp = tempdir();
    let addr = format!(
        "file://{}?compression=lz9",
        tmp.path().join("cache").display()
    );
    let out = run_fail(nixpush().args(["push", "--no-sign", "--to", &addr, &c.leaf]));
    error_line_is(
        &out,
        &format!(
            "cache address {addr:?}: unknown compression \"lz9\" \
             (expected one of: none, xz, bzip2, zstd)"
        ),
        "unknown compression",
    );
}

#[test]
fn cache_error_says_its_cause_once() {
    let c = small_closure();
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    // A directory where the cache's nix-cache-info belongs: reading it fails.
    fs::create_dir_all(cache.join("nix-cache-info")).expect("mkdir");
    let out = run_fail(
        nixpush()
            .args(["push", "--no-sign", "--to"])
            .arg(format!("file://{}", cache.display()))
            .arg(&c.leaf),
    );
    error_line_is(
        &out,
        &format!(
            "cache file://{}: get \"nix-cache-info\": Is a directory (os error 21)",
            cache.display()
        ),
        "Is a directory",
    );
    assert_eq!(narinfo_files(&cache), Vec::<String>::new());
}

/// A cache directory on a read-only mount (what `ProtectSystem=strict` makes of every directory
/// the unit does not name) is reported with where that comes from and what to add.
#[test]
fn a_read_only_cache_says_how_to_make_it_writable() {
    let c = small_closure();
    let tmp = tempdir();
    for made in [false, true] {
        read_only_cache_case(c, tmp.path(), made);
    }
}

/// One push into a read-only cache directory: new (`nar/` still to be made, when the cache is
/// opened), or made before (the first write fails).
fn read_only_cache_case(c: &SmallClosure, dir: &Path, made: bool) {
    let cache = dir.join(if made { "made" } else { "new" });
    fs::create_dir_all(&cache).expect("mkdir");
    if made {
        fs::create_dir_all(cache.join("nar")).expect("mkdir nar");
    }
    // A private mount namespace where the cache is bind-mounted read-only over itself, as
    // systemd's sandbox does: as root a mount namespace is enough (and a chroot, as in the
    // sid set-up, refuses user namespaces); otherwise in a user namespace, which needs no
    // privilege.
    let script =
        "mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro \"$1\" && shift && exec \"$@\"";
    let ways: [&[&str]; 2] = [&["--mount"], &["--user", "--map-root-user", "--mount"]];
    let Some(way) = ways.into_iter().find(|w| {
        Command::new("unshare")
            .args(*w)
            .args(["sh", "-c", script, "sh"])
            .arg(&cache)
            .arg("true")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        let msg = "unshare cannot make a mount namespace here (util-linux; root or user \
                   namespaces)";
        // In a chroot (the sid set-up) the kernel refuses user namespaces, and a mount
        // namespace cannot make `/` private; the host set-ups run this test.
        use std::os::unix::fs::MetadataExt as _;
        let root = |p: &str| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        let chrooted = root("/") != root("/proc/1/root/");
        assert!(
            chrooted || std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true and {msg}"
        );
        let msg = if chrooted {
            format!("{msg}: in a chroot, where the host set-ups run it instead")
        } else {
            msg.to_owned()
        };
        // Straight to stderr: the test harness captures eprintln!, and this must be seen.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n\n").as_bytes(),
        );
        return;
    };
    let mut cmd = Command::new("unshare");
    // The environment `nixpush()` gives the binary.
    for (k, v) in nixpush().get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.args(way)
        .args(["sh", "-c", script, "sh"])
        .arg(&cache)
        .arg(&*NIXPUSH)
        .args(["push", "--no-sign", "--to"])
        .arg(format!("file://{}", cache.display()))
        .arg(&c.leaf);
    let out = run_fail(&mut cmd);
    let hint = "; the directory is on a read-only mount: under systemd's ProtectSystem=strict, \
                add it to the unit's ReadWritePaths= in a drop-in, as nixpush's \
                systemd/nixpush.service.d/local-cache.conf does";
    if made {
        // The temporary file beside the object is what could not be made.
        let line = out.stderr.trim_end();
        let head = format!(
            "nixpush: error: cache file://{c}: put \"nix-cache-info\": Read-only file system \
             (os error 30) at path \"{c}/.nixpush-",
            c = cache.display()
        );
        assert!(
            line.starts_with(&head) && line.ends_with(&format!(".tmp\"{hint}")),
            "{}",
            out.report()
        );
        assert_eq!(line.lines().count(), 1, "{}", out.report());
        assert_eq!(line.matches("Read-only").count(), 1, "{}", out.report());
    } else {
        error_line_is(
            &out,
            &format!(
                "invalid cache address \"file://{c}\": cannot create {c}/nar: Read-only file \
                 system (os error 30){hint}",
                c = cache.display()
            ),
            "Read-only file system",
        );
    }
}

#[test]
fn store_directory_itself_is_named_once() {
    let store = store_dir();
    let tmp = tempdir();
    let out = run_fail(
        nixpush()
            .args(["push", "--no-sign", "--to"])
            .arg(tmp.path().join("cache"))
            .arg(store),
    );
    error_line_is(
        &out,
        &format!("{store:?} does not name a store path: it is the store directory itself"),
        store,
    );
}

#[test]
fn keygen_bad_name_is_said_once() {
    let tmp = tempdir();
    let out = run_fail(
        nixpush()
            .args(["keygen", "a b"])
            .arg(tmp.path().join("s"))
            .arg(tmp.path().join("p")),
    );
    error_line_is(
        &out,
        "key name \"a b\" is empty or contains whitespace",
        "key name",
    );
    assert!(!tmp.path().join("s").exists(), "{}", out.report());
}

#[test]
fn an_unreachable_store_is_named_with_what_to_try() {
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "store-errors-1");
    let cache = format!("file://{}", tmp.path().join("cache").display());
    let path = format!("{}/{}", store_dir(), "0".repeat(32) + "-x");
    let push = || {
        let mut c = nixpush();
        c.args(["push", "--to", &cache, "--key-file"])
            .arg(&keys.secret)
            .arg(&path);
        c
    };
    // A daemon socket that is not there.
    let socket = tmp.path().join("no-daemon.sock");
    let out = run_fail(push().env("NIX_REMOTE", format!("unix://{}", socket.display())));
    error_line_is(
        &out,
        &format!(
            "cannot reach the Nix store through the nix-daemon at {s}: No such file or directory \
             (os error 2); is nix-daemon running? (`systemctl status nix-daemon`; {s} is its \
             socket)",
            s = socket.display()
        ),
        "No such file or directory",
    );
    // No nix-daemon to start (NIX_REMOTE=local: nixpush opens the store itself, even where
    // Nix's `auto` would take a daemon's socket).
    let out = run_fail(push().env("PATH", tmp.path()).env("NIX_REMOTE", "local"));
    error_line_is(
        &out,
        "cannot reach the Nix store through `nix-daemon --stdio`: No such file or directory \
         (os error 2); is Nix installed, and `nix-daemon` on PATH?",
        "No such file or directory",
    );
    assert!(
        !tmp.path().join("cache").exists(),
        "nothing was written to the cache"
    );
}

#[test]
fn a_path_that_is_not_valid_is_named() {
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "store-errors-2");
    let path = format!("{}/{}", store_dir(), "1".repeat(32) + "-never-built");
    let out = run_fail(
        nixpush()
            .args(["push", "--to"])
            .arg(format!("file://{}", tmp.path().join("cache").display()))
            .arg("--key-file")
            .arg(&keys.secret)
            .arg(&path),
    );
    error_line_is(
        &out,
        &format!("not valid in the Nix store (not built, or garbage-collected): {path}"),
        &path,
    );
}

/// A relative `key-files` entry, as `config.example.toml` has it, is looked for next to the
/// config file, and the error names the full path it tried, also for `--config` given as a
/// relative path.
#[test]
fn relative_key_file_is_looked_for_next_to_the_config() {
    let tmp = tempdir();
    let dir = tmp.path().canonicalize().expect("canonical");
    fs::write(
        dir.join("config.toml"),
        format!(
            "key-files = [\"signing-key\"]\nsocket = \"{d}/s.sock\"\nqueue-dir = \"{d}/queue\"\n",
            d = dir.display()
        ),
    )
    .expect("write config");
    let out = run_fail(
        nixpush()
            .current_dir(&dir)
            .env_remove("CREDENTIALS_DIRECTORY")
            .args(["daemon", "--config", "config.toml"]),
    );
    error_line_is(
        &out,
        &format!(
            "key-files: \"signing-key\" next to the config file: cannot read key file \
             {}/signing-key: No such file or directory (os error 2)",
            dir.display()
        ),
        "No such file or directory",
    );
}

/// `nixpush-hook` with `NIXPUSH_CONFIG` naming a file that is not there says so, and what to
/// do, and still never fails the build; it does not create the default queue directory on the
/// strength of a missing config.
#[test]
fn hook_says_its_config_is_missing() {
    let tmp = tempdir();
    let missing = tmp.path().join("nonexistent.toml");
    let default_queue = Path::new("/var/lib/nixpush/queue");
    let queue_was_there = default_queue.exists();
    let out = run(std::process::Command::new(&*NIXPUSH_HOOK)
        .env("NIXPUSH_CONFIG", &missing)
        .env("OUT_PATHS", &small_closure().leaf)
        .env_remove("DRV_PATH"));
    assert_eq!(out.status.code(), Some(0), "{}", out.report());
    let first = out.stderr.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!(
            "nixpush hook: config {} does not exist (set NIXPUSH_CONFIG to the daemon's config, \
             or install one at /etc/nixpush/config.toml); using the default socket \
             /run/nixpush/nixpush.sock and queue directory /var/lib/nixpush/queue",
            missing.display()
        ),
        "{}",
        out.report()
    );
    if !queue_was_there {
        assert!(!default_queue.exists(), "{}", out.report());
        assert!(
            out.stderr.contains(
                "cannot write to /var/lib/nixpush/queue: it does not exist, and without a \
                 config it is not created"
            ),
            "{}",
            out.report()
        );
    }
}

/// `--to http//x` (a URL with its colon lost) is refused with a hint and creates nothing; a
/// plain relative path must start with `.`.
#[test]
fn a_mistyped_cache_address_is_refused_with_a_hint() {
    let c = small_closure();
    let tmp = tempdir();
    let out = run_fail(nixpush().current_dir(tmp.path()).args([
        "push",
        "--no-sign",
        "--to",
        "http//x",
        &c.leaf,
    ]));
    error_line_is(
        &out,
        "cache address \"http//x\" looks like a mistyped URL: did you mean \"http://x\"? \
         (a plain directory path must be absolute or start with \".\")",
        "mistyped",
    );
    let out = run_fail(nixpush().current_dir(tmp.path()).args([
        "push",
        "--no-sign",
        "--to",
        "cache",
        &c.leaf,
    ]));
    error_line_is(
        &out,
        "cache address \"cache\": a plain directory path must be absolute or start with \".\" \
         (did you mean \"./cache\"?)",
        "plain directory path",
    );
    assert_eq!(
        fs::read_dir(tmp.path()).expect("read").count(),
        0,
        "nothing is created"
    );
    run_ok(nixpush().current_dir(tmp.path()).args([
        "push",
        "--no-sign",
        "--to",
        "./cache",
        &c.leaf,
    ]));
    assert!(!narinfo_files(&tmp.path().join("cache")).is_empty());
}

/// A public key given as the secret one is called that; a secret key others can read is used,
/// with a warning that names it and the fix.
#[test]
fn key_file_mistakes_are_named() {
    use std::os::unix::fs::PermissionsExt as _;
    let c = small_closure();
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "key-mistakes.example.org-1");
    let cache = format!("file://{}", tmp.path().join("cache").display());
    let out = run_fail(
        nixpush()
            .args(["push", "--to", &cache, "--key-file"])
            .arg(&keys.public)
            .arg(&c.leaf),
    );
    error_line_is(
        &out,
        &format!(
            "key file {} is not a secret key: key \"key-mistakes.example.org-1\" is a public \
             key (32 bytes); the secret key (64 bytes) is the other file of the pair",
            keys.public.display()
        ),
        "public key",
    );

    fs::set_permissions(&keys.secret, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run_ok(
        nixpush()
            .args(["push", "--to", &cache, "--key-file"])
            .arg(&keys.secret)
            .arg(&c.leaf),
    );
    let warning = format!(
        "nixpush: warning: other users have access to secret key file {k} (mode 0644); run \
         `chmod 600 {k}`",
        k = keys.secret.display()
    );
    assert_eq!(
        out.stderr.lines().filter(|l| *l == warning).count(),
        1,
        "{}",
        out.report()
    );
    assert!(!narinfo_files(&tmp.path().join("cache")).is_empty());
}

/// `status` with no daemon says that it is not running, where, and how to start it; with
/// `--json` it prints a JSON error object too, for scripts.
#[test]
fn status_without_a_daemon_says_how_to_start_it() {
    let tmp = tempdir();
    let socket = tmp.path().join("nixpush.sock");
    let config = tmp.path().join("config.toml");
    fs::write(&config, format!("socket = \"{}\"\n", socket.display())).expect("config");
    let expected = format!(
        "the daemon is not running at {} (No such file or directory (os error 2)); start it \
         with `systemctl start nixpush.service` or `nixpush daemon`",
        socket.display()
    );
    let out = run_fail(nixpush().arg("status").arg("--config").arg(&config));
    error_line_is(&out, &expected, "No such file or directory");
    assert_eq!(out.stdout, "", "{}", out.report());

    let out = run_fail(
        nixpush()
            .args(["status", "--json", "--config"])
            .arg(&config),
    );
    error_line_is(&out, &expected, "No such file or directory");
    let json: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.report()));
    assert_eq!(json, serde_json::json!({ "error": expected }));
}

/// A reader that closes its end early (`nixpush status --json | head -c1`) ends the command
/// quietly: no panic, no error line. Also `--help` into a closed pipe.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::io::Read as _;
    use std::process::Stdio;
    let tmp = tempdir();
    let socket = tmp.path().join("nixpush.sock");
    let config = tmp.path().join("config.toml");
    fs::write(&config, format!("socket = \"{}\"\n", socket.display())).expect("config");
    for args in [
        vec![
            "status".to_owned(),
            "--json".to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
        ],
        vec!["push".to_owned(), "--help".to_owned()],
    ] {
        let mut child = nixpush()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // Close the read end before the command writes.
        drop(child.stdout.take());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        let status = child.wait().expect("wait");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {status}: {stderr}"
        );
        assert!(status.code().is_some(), "{args:?}: killed: {status}");
    }
}

/// A `./result` that is not there is said to be missing (not "not in the Nix store"); `-j 0`
/// is refused; an unknown config key gets the one probably meant.
#[test]
fn small_mistakes_get_plain_answers() {
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    let out = run_fail(
        nixpush()
            .current_dir(tmp.path())
            .args(["push", "--no-sign", "--to"])
            .arg(&cache)
            .arg("./nonexistent-result"),
    );
    error_line_is(
        &out,
        &format!(
            "\"./nonexistent-result\" ({}) does not exist",
            tmp.path().join("nonexistent-result").display()
        ),
        "does not exist",
    );

    let c = small_closure();
    let out = run_fail(
        nixpush()
            .args(["push", "--no-sign", "-j", "0", "--to"])
            .arg(&cache)
            .arg(&c.leaf),
    );
    assert!(
        out.stderr
            .starts_with("error: invalid value '0' for '--jobs <N>': must be at least 1\n"),
        "{}",
        out.report()
    );
    assert!(!cache.exists(), "{}", out.report());

    let config = tmp.path().join("config.toml");
    fs::write(
        &config,
        "allow-unsigned = true\n\n[hook]\ntimeout-msec = 5\n",
    )
    .expect("config");
    let out = run_fail(nixpush().arg("daemon").arg("--config").arg(&config));
    assert!(
        out.stderr.contains("unknown field `timeout-msec`")
            && out
                .stderr
                .trim_end()
                .ends_with("\ndid you mean `timeout-ms`?"),
        "{}",
        out.report()
    );
}

/// `DRV^*` is understood on the command line as Nix understands it (the outputs, not the
/// `.drv`); a derivation that is not built is an error naming it and saying to build it first.
#[test]
fn derivation_outputs_must_be_built() {
    let drv = unbuilt_drv();
    let out_path =
        run_ok(std::process::Command::new("nix-store").args(["--query", "--outputs", &drv]))
            .stdout
            .trim()
            .to_owned();
    let expected = format!(
        "derivation {drv} is not built (output out ({out_path})); build it first, e.g. \
         `nix-store --realise {drv}`"
    );
    for arg in [drv.clone(), format!("{drv}^*")] {
        let tmp = tempdir();
        let cache = tmp.path().join("cache");
        let out = run_fail(
            nixpush()
                .args(["push", "--no-sign", "--to"])
                .arg(&cache)
                .arg(&arg),
        );
        error_line_is(&out, &expected, "is not built");
        assert_eq!(narinfo_files(&cache), Vec::<String>::new());
    }

    // Built: `^*` publishes the outputs and their closures, not the derivation.
    let c = small_closure();
    let deriver =
        run_ok(std::process::Command::new("nix-store").args(["--query", "--deriver", &c.leaf]))
            .stdout
            .trim()
            .to_owned();
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    let out = run_ok(
        nixpush()
            .args(["push", "--no-sign", "--to"])
            .arg(&cache)
            .arg(format!("{deriver}^*")),
    );
    assert_eq!(
        narinfo_files(&cache),
        vec![format!("{}.narinfo", hash_part(&c.leaf))],
        "{}",
        out.report()
    );
    // `^*` after something else is said to be wrong as such.
    let out = run_fail(
        nixpush()
            .args(["push", "--no-sign", "--to"])
            .arg(&cache)
            .arg(format!("{}^*", c.leaf)),
    );
    error_line_is(
        &out,
        &format!(
            "\"{}^*\": `^*` (all outputs) follows a path that is not a .drv",
            c.leaf
        ),
        "not a .drv",
    );
}

/// Ctrl-C during a push stops it and removes the temporary files it staged in the cache's
/// `nar/`; the exit code is the shell's for SIGINT.
#[test]
fn an_interrupted_push_leaves_no_temporary_files() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let c = full_closure();
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    let temps = |cache: &Path| -> Vec<String> {
        nar_files(cache)
            .into_iter()
            .filter(|n| n.starts_with(".nixpush-") && n.ends_with(".tmp"))
            .collect()
    };
    let mut child = nixpush()
        .args([
            "push",
            "--no-sign",
            "--compression",
            "xz",
            "-j",
            "1",
            "--to",
        ])
        .arg(&cache)
        .arg(&c.big)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn push");
    let start = Instant::now();
    while temps(&cache).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no temporary file appeared in {}/nar",
            cache.display()
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "push ended early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Our own child, by its PID.
    run_ok(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]));
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(
            "nixpush: interrupted; stopping and removing temporary files (what was published \
             is complete; push again to go on)"
        ),
        "{stderr}"
    );
    assert_eq!(temps(&cache), Vec::<String>::new(), "{stderr}");
    assert_eq!(narinfo_files(&cache), Vec::<String>::new(), "{stderr}");
}

const COMMANDS: [&str; 13] = [
    "push",
    "keygen",
    "daemon",
    "watch-store",
    "hook",
    "status",
    "verify",
    "gc",
    "queue",
    "doctor",
    "help",
    "completions",
    "man",
];

/// Every command's `--help` ends with examples of it, as `nix copy --help` does; `push --to`
/// lists every kind of address; `nixpush help --help` is help about `help`.
#[test]
fn every_command_has_help_with_examples() {
    for c in COMMANDS {
        let out = run_ok(nixpush().args([c, "--help"]));
        let examples = out
            .stdout
            .split_once("\nExamples:\n")
            .unwrap_or_else(|| panic!("no examples: {}", out.report()))
            .1;
        assert!(
            examples.contains(&format!("nixpush {c}")) || c == "hook",
            "the examples of {c} show no `nixpush {c}`: {}",
            out.report()
        );
    }
    let push = run_ok(nixpush().args(["push", "--help"])).stdout;
    for kind in [
        "file:///dir",
        "plain directory path",
        "s3://bucket",
        "http(s)://host/path",
        "sftp://[user@]host[:port]/path",
        "gs://bucket",
    ] {
        assert!(push.contains(kind), "push --help lacks {kind:?}:\n{push}");
    }
    assert_eq!(run_ok(nixpush().args(["help", "push"])).stdout, push);
    let out = run_ok(nixpush().args(["help", "--help"]));
    assert!(
        out.stdout
            .starts_with("Print help about nixpush or one of its commands\n"),
        "{}",
        out.report()
    );
    let out = run_fail(nixpush().args(["help", "pusj"]));
    error_line_is(
        &out,
        &format!(
            "no command \"pusj\"; the commands are: {}",
            COMMANDS.join(", ")
        ),
        "pusj",
    );
}

/// `nixpush-hook --help` and `--version` answer, and do not run the hook.
#[test]
fn the_hook_program_has_help_and_a_version() {
    let hook = || {
        let mut c = std::process::Command::new(&*NIXPUSH_HOOK);
        c.env("OUT_PATHS", "/nonexistent")
            .env("NIXPUSH_CONFIG", "/nonexistent.toml");
        c
    };
    for arg in ["--help", "-h"] {
        let out = run_ok(hook().arg(arg));
        assert!(
            out.stdout.starts_with(
                "Nix's post-build-hook: hand the finished build to the nixpush daemon. Never \
                 fails the build.\n\nUsage: nixpush-hook\n"
            ) && out
                .stdout
                .contains("post-build-hook = /usr/local/bin/nixpush-hook"),
            "{}",
            out.report()
        );
        assert_eq!(out.stderr, "", "the hook ran: {}", out.report());
    }
    let out = run_ok(hook().arg("--version"));
    assert_eq!(
        out.stdout,
        format!("nixpush-hook {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(out.stderr, "", "the hook ran: {}", out.report());
    let out = run_fail(hook().arg("--frobnicate"));
    assert_eq!(
        out.stderr.trim_end(),
        "nixpush-hook: unexpected argument \"--frobnicate\": Nix runs this hook without \
         arguments (see nixpush-hook --help)",
        "{}",
        out.report()
    );
}

/// Shell completions and man pages, generated from the same definitions as the parser, name
/// every command.
#[test]
fn completions_and_man_pages_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ok(nixpush().args(["completions", shell]));
        assert!(out.stdout.len() > 1000, "{shell}: {}", out.report());
        for c in COMMANDS {
            assert!(out.stdout.contains(c), "{shell} completions lack {c}");
        }
        let to = if shell == "fish" { "-l to" } else { "--to" };
        assert!(out.stdout.contains(to), "{shell} completions lack --to");
    }
    let man = run_ok(nixpush().arg("man")).stdout;
    assert!(
        man.contains(&format!(
            ".TH nixpush 1  \"nixpush {}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{man}"
    );
    for c in COMMANDS {
        assert!(
            // roff writes a hyphen as `\-`.
            man.contains(&format!("nixpush\\-{}(1)", c.replace('-', "\\-"))),
            "nixpush(1) lacks {c}:\n{man}"
        );
    }
    let push = run_ok(nixpush().args(["man", "push"])).stdout;
    assert!(push.contains(".TH nixpush-push 1"), "{push}");
    assert!(push.contains("sftp://"), "{push}");
    assert!(push.contains("Examples:"), "{push}");
}

/// `nixpush gc` refuses, in words, what it cannot do safely: no roots at all, a grace period
/// too short for the clock skew, a web server (no listing), a directory that is no cache.
#[test]
fn gc_refuses_what_it_cannot_do_safely() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    fs::create_dir(&cache).unwrap();
    fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let c = cache.to_str().unwrap();
    let out = run_fail(nixpush().args(["gc", c]));
    error_line_is(
        &out,
        "gc needs to know what to keep: give --keep PATH, --keep-file FILE or --keep-since \
         DURATION (e.g. --keep-since 30d); without any, everything older than the grace period \
         would go",
        "--keep-since DURATION",
    );
    let out = run_fail(nixpush().args(["gc", c, "--keep-since", "1d", "--grace", "3s"]));
    error_line_is(
        &out,
        "--grace 3s is too short for --max-skew 1m: it must be at least 3m 2s (twice the \
         pushers' 1s polling and three times the skew)",
        "3m 2s",
    );
    let out = run_fail(nixpush().args(["gc", c, "--keep-since", "1d", "--sweep-bound", "1m"]));
    error_line_is(
        &out,
        "--sweep-bound 1m is too short for --max-skew 1m: deleting stops a skew before the \
         bound, so it must be at least 2m",
        "at least 2m",
    );
    let out = run_fail(nixpush().args(["gc", "http://127.0.0.1:9/cache", "--keep-since", "1d"]));
    error_line_is(
        &out,
        "cannot collect http://127.0.0.1:9/cache: gc lists the whole cache, and a web server \
         cannot list; run gc on the directory or bucket it serves instead",
        "cannot list",
    );
    let missing = dir.path().join("nope");
    let out = run_fail(nixpush().args(["gc", missing.to_str().unwrap(), "--keep-since", "1d"]));
    error_line_is(
        &out,
        &format!(
            "no cache at {}: the directory does not exist",
            missing.display()
        ),
        "does not exist",
    );
    let out = run_fail(nixpush().args(["gc", c, "--keep", "/tmp/not-a-store-path"]));
    error_line_is(
        &out,
        "--keep \"/tmp/not-a-store-path\" is not a store path below /nix/store (nor a link to \
         one): No such file or directory (os error 2)",
        "No such file",
    );
    let list = dir.path().join("roots.txt");
    fs::write(&list, "# roots\n\nnot a path\n").unwrap();
    let out = run_fail(nixpush().args(["gc", c, "--keep-file", list.to_str().unwrap()]));
    assert!(
        out.stderr.starts_with(&format!(
            "nixpush: error: --keep-file {} line 3: \"not a path\" is not a store path",
            list.display()
        )),
        "{}",
        out.report()
    );
}
