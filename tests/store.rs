//! The store layer with real Nix: `nixpush push` and the daemon's passes ask the store over
//! the worker protocol and start no Nix command-line process (one `nix-daemon --stdio` per
//! nixpush process at most, none through a daemon socket), and content-addressed paths are
//! published with their `CA:` field so that Nix substitutes them with signatures required.

mod common;
mod daemon_support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use daemon_support::*;

/// Nix's programs, as a wrapper on `PATH` sees them.
const NIX_PROGRAMS: &[&str] = &[
    "nix",
    "nix-build",
    "nix-channel",
    "nix-collect-garbage",
    "nix-copy-closure",
    "nix-daemon",
    "nix-env",
    "nix-hash",
    "nix-instantiate",
    "nix-prefetch-url",
    "nix-shell",
    "nix-store",
];

/// A directory of wrappers that log each Nix program started (its name and arguments, one
/// line each) to `log`, then run the real one; and the `PATH` that puts them first.
struct ExecLog {
    _dir: TestDir,
    log: PathBuf,
    path: String,
}

impl ExecLog {
    fn new() -> Self {
        let dir = tempdir();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).expect("mkdir");
        let log = dir.path().join("exec.log");
        fs::write(&log, "").expect("log");
        let old_path = std::env::var("PATH").unwrap_or_default();
        for prog in NIX_PROGRAMS {
            let Some(real) = which(prog, &old_path) else {
                continue;
            };
            let script = bin.join(prog);
            fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho \"{prog} $*\" >> '{log}'\nexec '{real}' \"$@\"\n",
                    log = log.display(),
                    real = real.display()
                ),
            )
            .expect("wrapper");
            fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        Self {
            path: format!("{}:{old_path}", bin.display()),
            log,
            _dir: dir,
        }
    }

    fn started(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .expect("log")
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn which(prog: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// What nixpush may start to reach the store: one `nix-daemon --stdio` of its own where it
/// opens the store itself, nothing where a daemon socket serves it.
fn expected_starts() -> Vec<String> {
    let through_socket = matches!(
        std::env::var("NIX_REMOTE").as_deref(),
        Ok("daemon") | Ok("unix")
    ) || std::env::var("NIX_REMOTE").is_ok_and(|r| r.starts_with("unix://"));
    if through_socket {
        vec![]
    } else {
        vec!["nix-daemon --stdio".to_owned()]
    }
}

const STORE_NIX: &str = concat!(
    r#"
{ salt }:
let
"#,
    nix_mk!(),
    r#"  note = builtins.toFile "np-store-note-${salt}" "a text file, content-addressed\n";
  fixed = builtins.derivation {
    name = "np-store-fixed";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "printf 'fixed output %s\\n' ${salt} > $out" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "fixed output ${salt}\n";
  };
  a = mk "np-store-a" "printf 'a %s\\n' \"$salt\" > $out";
  top = mk "np-store-top" "printf '%s %s %s\\n' ${a} ${note} ${fixed} > $out";
in { inherit a top note fixed; }
"#
);

/// A fresh closure: `top` refers to a plain output, a `builtins.toFile` text path and a
/// fixed-output path; returns (top, note, fixed).
fn build_closure(tag: &str) -> (String, String, String) {
    let (paths, _) = nix_build_expr(STORE_NIX, &unique(tag), &["top", "fixed"], &[]);
    // `note` is a path, not a derivation: find it among top's references.
    let note = closure_of(&paths[0])
        .into_iter()
        .find(|p| base_name(p).contains("-np-store-note-"))
        .expect("top refers to the note");
    (paths[0].clone(), note, paths[1].clone())
}

#[test]
fn push_starts_no_nix_command_line_process() {
    let (top, _, _) = build_closure("np-procs");
    let drv = deriver_of(&top);
    let exec = ExecLog::new();
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "procs-1");
    let cache = dir.path().join("cache");
    // A root, a derivation (its outputs too), a path given twice, and a second push that
    // finds everything present: each is one nixpush process.
    for roots in [
        vec![top.clone()],
        vec![drv.clone(), top.clone(), top.clone()],
    ] {
        let mut cmd = nixpush();
        cmd.env("PATH", &exec.path)
            .arg("push")
            .arg("--to")
            .arg(format!("file://{}", cache.display()))
            .arg("--key-file")
            .arg(&keys.secret)
            .args(&roots);
        run_ok(&mut cmd);
        assert_eq!(
            exec.started(),
            expected_starts(),
            "nixpush push {roots:?} started Nix programs other than one nix-daemon --stdio"
        );
        fs::write(&exec.log, "").expect("log");
    }
    assert!(
        cache.join(format!("{}.narinfo", hash_part(&drv))).is_file(),
        "the .drv was published"
    );
}

#[test]
fn daemon_passes_start_no_nix_command_line_process() {
    let setup = Setup::new("");
    let exec = ExecLog::new();
    let mut cmd = setup.daemon_command();
    cmd.env("PATH", &exec.path);
    let daemon = setup.start_with(cmd);
    // Several passes: a path, then a derivation's outputs, then a path already published.
    let (top, _, fixed) = build_closure("np-daemon-procs");
    let drv = deriver_of(&top);
    setup.enqueue(std::slice::from_ref(&fixed));
    setup.wait_published(std::slice::from_ref(&fixed), &daemon);
    setup.enqueue(&[format!("{drv}^*")]);
    setup.wait_published(std::slice::from_ref(&top), &daemon);
    setup.enqueue(std::slice::from_ref(&top));
    wait_until(
        PATIENCE,
        || format!("queue never drained: {:?}", setup.queued()),
        || setup.queued().is_empty(),
    );
    drop(daemon);
    assert_eq!(
        exec.started(),
        expected_starts(),
        "the daemon's passes started Nix programs other than one nix-daemon --stdio"
    );
}

#[test]
fn content_addressed_paths_publish_with_their_ca_and_substitute() {
    let (top, note, fixed) = build_closure("np-ca");
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "ca-1");
    let cache = dir.path().join("cache");
    run_ok(&mut push_cmd(
        nixpush(),
        &format!("file://{}", cache.display()),
        &keys,
        &top,
    ));
    // The content addresses, computed from the files (both are flat files): `text:` for
    // `builtins.toFile`, `fixed:` for a flat fixed-output derivation.
    for (path, method) in [(&note, "text"), (&fixed, "fixed")] {
        let contents = fs::read(path).expect("read the store file");
        let want = format!(
            "{method}:sha256:{}",
            nixpush::formats::Sha256::digest(&contents).to_nixbase32()
        );
        let ni = RawNarInfo::read(&cache, path);
        assert_eq!(ni.opt("CA"), Some(want.as_str()), "{path}: the CA line");
    }
    assert!(
        RawNarInfo::read(&cache, &top).opt("CA").is_none(),
        "an input-addressed path has no CA"
    );
    let root = dir.path().join("fresh");
    run_ok(&mut nix_copy_cmd(
        &cache,
        &root,
        &keys.public_key(),
        std::slice::from_ref(&top),
    ));
    for p in [&top, &note, &fixed] {
        assert!(valid_in_root(&root, p), "{p} was not substituted");
    }
}

#[test]
fn a_store_whose_files_are_elsewhere_is_read_through_the_daemon() {
    // A chroot store: its paths are `/nix/store/…` to Nix, but their files are under `src`,
    // where nixpush cannot find them by name; the daemon must serialise the NARs.
    let dir = tempdir();
    let src = dir.path().join("src-store");
    let tree = dir.path().join(unique("np-elsewhere"));
    fs::create_dir_all(tree.join("sub")).expect("mkdir");
    fs::write(tree.join("sub/file"), vec![b'x'; 300_000]).expect("file");
    fs::write(tree.join("exe"), "#!/bin/sh\n").expect("file");
    fs::set_permissions(tree.join("exe"), fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink("sub/file", tree.join("link")).expect("symlink");
    let added = run_ok(
        Command::new("nix-store")
            .arg("--store")
            .arg(&src)
            .arg("--add")
            .arg(&tree),
    );
    let path = added.stdout.trim().to_owned();
    assert!(
        !Path::new(&path).exists() && in_root(&src, &path).exists(),
        "{path} is in the chroot store only"
    );
    let keys = nixpush_keygen(dir.path(), "elsewhere-1");
    let cache = dir.path().join("cache");
    let mut cmd = push_cmd(
        nixpush(),
        &format!("file://{}", cache.display()),
        &keys,
        &path,
    );
    cmd.env("NIX_REMOTE", format!("local?root={}", src.display()));
    run_ok(&mut cmd);
    let ni = RawNarInfo::read(&cache, &path);
    let theirs = run_ok(
        Command::new("nix-store")
            .arg("--store")
            .arg(&src)
            .args(["--query", "--hash", &path]),
    );
    assert_eq!(
        nixpush::formats::Sha256::parse(ni.one("NarHash")).unwrap(),
        nixpush::formats::Sha256::parse(theirs.stdout.trim()).unwrap(),
        "the NarHash Nix has for it"
    );
    let fresh = dir.path().join("fresh");
    run_ok(&mut nix_copy_cmd(
        &cache,
        &fresh,
        &keys.public_key(),
        std::slice::from_ref(&path),
    ));
    assert!(valid_in_root(&fresh, &path), "Nix substituted it");
    assert_eq!(
        fs::read(in_root(&fresh, &path).join("sub/file")).expect("substituted file"),
        vec![b'x'; 300_000]
    );
}

/// The `nix-daemon --stdio` children of process `pid`.
fn stdio_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace() {
            let cmdline = fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
            if cmdline.split(|b| *b == 0).any(|a| a == b"--stdio") {
                out.push(c.parse().expect("pid"));
            }
        }
    }
    out
}

#[test]
fn the_daemon_reconnects_when_its_store_connection_dies() {
    let setup = Setup::new("");
    let mut daemon = setup.start();
    let (top, _, fixed) = build_closure("np-reconnect");
    setup.enqueue(std::slice::from_ref(&fixed));
    setup.wait_published(std::slice::from_ref(&fixed), &daemon);
    let children = stdio_children(daemon.pid());
    if children.is_empty() {
        // Through a daemon socket there is no child of ours to kill.
        assert!(expected_starts().is_empty(), "no nix-daemon --stdio child");
        return;
    }
    for c in &children {
        run_ok(Command::new("kill").args(["-KILL", &c.to_string()]));
    }
    // The next pass finds the connection broken, asks again on a new one and publishes: no
    // failed pass, no error to report, nothing rejected.
    setup.enqueue(std::slice::from_ref(&top));
    setup.wait_published(std::slice::from_ref(&top), &daemon);
    daemon.assert_running();
    assert!(
        setup.rejected().is_empty(),
        "rejected: {:?}",
        setup.rejected()
    );
    let status = setup.status();
    assert_eq!(
        status["last_errors"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    let again = stdio_children(daemon.pid());
    assert_eq!(again.len(), 1, "one new child: {again:?}");
    assert!(
        !children.contains(&again[0]),
        "a new child, not the killed one"
    );
}
