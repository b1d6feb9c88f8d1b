//! Full disks, on small tmpfs file systems mounted for the test (so these tests need root; CI
//! and every Nix set-up of `scripts/test` run them as root, and CI refuses to skip them):
//! - the queue directory's file system full: no build fails, the hook and the daemon say what
//!   happened, what was acknowledged is kept and published, and requests are taken again as
//!   soon as there is space;
//! - the cache's file system full (where the directory backend stages its NARs): the pass
//!   fails transiently, its temporary files go, other paths go on, and the path lands once
//!   there is space.

mod common;
mod daemon_support;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use daemon_support::*;

/// A small tmpfs mounted on a directory, unmounted (by its mount point) when dropped.
struct SmallFs {
    at: PathBuf,
    filler: PathBuf,
}

impl SmallFs {
    /// Mount a tmpfs of `size` (`mount -o size=`) on `at`, created if missing. `None`, saying
    /// so, where this is not root and not CI (which must run these tests, and runs as root).
    fn mount(at: &Path, size: &str) -> Option<Self> {
        let uid = run_ok(Command::new("id").arg("-u")).stdout;
        if uid.trim() != "0" {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the full-disk tests mount file systems and must run as root in CI"
            );
            eprintln!("skipped: mounting a small file system needs root (uid {uid})");
            return None;
        }
        fs::create_dir_all(at).expect("mount point");
        run_ok(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0755"),
                    "tmpfs",
                ])
                .arg(at),
        );
        Some(Self {
            at: at.to_owned(),
            // A dot-file: never taken for a queue entry.
            filler: at.join(".filler"),
        })
    }

    /// Fill the file system, leaving `leave` bytes free.
    fn fill(&self, leave: u64) {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .expect("filler");
        let chunk = vec![0x5a_u8; 64 << 10];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", self.at.display()),
            }
        }
        let len = f.metadata().expect("filler size").len();
        f.set_len(len.saturating_sub(leave)).expect("make room");
    }

    /// Give the space back.
    fn free(&self) {
        fs::remove_file(&self.filler).expect("remove the filler");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if !run(Command::new("umount").arg(&self.at)).status.success() {
            // Still busy (a child of a failed test): detach it, so it goes once idle.
            let _ = run(Command::new("umount").arg("-l").arg(&self.at));
        }
    }
}

/// Independent paths: `n1`…`n4` print a line; `big` is 2 MiB that do not compress.
const PATHS_NIX: &str = r#"
{ salt }:
let
  mk = name: script: builtins.derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
  n = i: mk "np-full-${toString i}" "printf 'full %s %s\\n' ${toString i} \"$salt\" > $out";
in {
  n1 = n 1; n2 = n 2; n3 = n 3; n4 = n 4;
  big = mk "np-full-big" "head -c 2097152 /dev/urandom > $out";
}
"#;

fn paths(tag: &str, attrs: &[&str]) -> Vec<String> {
    let (p, _) = nix_build_expr(PATHS_NIX, &unique(tag), attrs, &[]);
    assert_eq!(p.len(), attrs.len());
    p
}

/// `nixpush hook` with `OUT_PATHS`.
fn hook(setup: &Setup, out_paths: &str) -> Out {
    let mut c = nixpush();
    c.args(["hook", "--config"])
        .arg(&setup.config)
        .env("OUT_PATHS", out_paths)
        .env_remove("DRV_PATH");
    run_with_timeout(&mut c, Duration::from_secs(60))
}

fn assert_says(out: &Out, needles: &[&str]) {
    for n in needles {
        assert!(out.stderr.contains(n), "should say {n:?}: {}", out.report());
    }
}

/// What is in the queue directory besides the entries and `rejected/`: temporary files.
fn queue_leftovers(setup: &Setup) -> Vec<String> {
    dir_names(&setup.queue, |n| n.starts_with('.') && n != ".filler")
}

#[test]
fn a_full_queue_directory_fails_no_build_and_loses_nothing_acknowledged() {
    let setup = Setup::new("");
    let Some(small) = SmallFs::mount(&setup.queue, "1m") else {
        return;
    };
    let p = paths("full-queue", &["n1", "n2", "n3", "n4"]);
    let daemon = setup.start();
    wait_until(
        PATIENCE,
        || format!("not ready\n--- log:\n{}", daemon.log_tail()),
        || fs::read_to_string(&setup.log).is_ok_and(|t| t.contains("ready")),
    );

    // The cache away, so that what is acknowledged stays queued for a while.
    let away = setup.dir.path().join("cache-away");
    fs::rename(&setup.cache, &away).expect("move the cache away");
    fs::write(&setup.cache, "not a directory\n").expect("block the cache");
    let kept = setup.enqueue(&p[0..1]);
    small.fill(0);

    // Over the socket: not queued, and why.
    let msg = serde_json::json!({"op": "enqueue", "items": [&p[1]]}).to_string();
    let r = setup.request(msg.as_bytes());
    assert_eq!(r["result"], "not-queued", "{r}");
    let m = r["message"].as_str().expect("message");
    let dir = format!(
        "cannot write to the queue directory {}",
        setup.queue.display()
    );
    for n in [
        dir.as_str(),
        "No space left on device",
        "its file system is full: free space there",
    ] {
        assert!(m.contains(n), "{n:?}: {r}");
    }

    // The hook: the daemon could not queue it, nor can the hook; the build goes on, told so.
    let out = hook(&setup, &p[1]);
    assert!(out.status.success(), "{}", out.report());
    assert_says(
        &out,
        &[
            "nixpush hook: the daemon could not queue the request (cannot write to the queue \
             directory",
            &format!(
                "and cannot write to {}: No space left on device",
                setup.queue.display()
            ),
            "its file system is full: free space there, then push them with `nixpush push`",
            &format!("these paths will not be published: {}", p[1]),
        ],
    );

    // A real build with the hook succeeds.
    let wrapper = setup.dir.path().join("post-build-hook");
    let hook_log = setup.dir.path().join("hook.log");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' hook --config '{}' 2>>'{}'\n",
            &*NIXPUSH,
            setup.config.display(),
            hook_log.display()
        ),
    )
    .expect("wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    let built = nix_build_expr(
        PATHS_NIX,
        &unique("full-queue-build"),
        &["n1"],
        &[
            "--option",
            "post-build-hook",
            &wrapper.display().to_string(),
        ],
    )
    .0;
    let said = fs::read_to_string(&hook_log).expect("the hook ran");
    assert!(
        said.contains("No space left on device")
            && said.contains("these paths will not be published"),
        "{said}"
    );
    assert_eq!(built.len(), 1);

    // Nothing half-written was left, and what was acknowledged is still there.
    assert_eq!(setup.queued(), std::slice::from_ref(&kept));
    assert!(
        queue_leftovers(&setup).is_empty(),
        "{:?}",
        queue_leftovers(&setup)
    );

    // The cache back, the disk still full: the acknowledged entry is published and removed.
    fs::remove_file(&setup.cache).expect("unblock");
    fs::rename(&away, &setup.cache).expect("bring the cache back");
    setup.wait_published(&p[0..1], &daemon);
    drop(daemon);

    // The daemon down and the disk full: the hook still exits 0, saying so.
    small.fill(0);
    let out = hook(&setup, &p[2]);
    assert!(out.status.success(), "{}", out.report());
    assert_says(
        &out,
        &[
            "nixpush hook: daemon not reachable (",
            "No space left on device",
            &format!("these paths will not be published: {}", p[2]),
        ],
    );
    assert!(
        queue_leftovers(&setup).is_empty(),
        "{:?}",
        queue_leftovers(&setup)
    );
    assert!(setup.queued().is_empty(), "{:?}", setup.queued());

    // Space again: the hook queues by itself, and the daemon publishes it when it starts.
    small.free();
    let out = hook(&setup, &p[3]);
    assert!(out.status.success(), "{}", out.report());
    assert_says(&out, &["daemon not reachable (", "queued as"]);
    let daemon = setup.start();
    setup.wait_published(&p[3..4], &daemon);
    // And over the socket too.
    setup.enqueue(&p[1..2]);
    setup.wait_published(&p[1..2], &daemon);
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (p[0].clone(), p[3].clone());
    setup.nix_substitutes(&[a, b]);
    drop(daemon);
}

#[test]
fn a_full_cache_file_system_fails_the_pass_cleans_up_and_resumes() {
    let setup = Setup::new("");
    let Some(small) = SmallFs::mount(&setup.cache, "8m") else {
        return;
    };
    let p = paths("full-cache", &["big", "n1"]);
    let (big, small_path) = (&p[0], &p[1]);
    let daemon = setup.start();
    wait_until(
        PATIENCE,
        || format!("not ready\n--- log:\n{}", daemon.log_tail()),
        || fs::read_to_string(&setup.log).is_ok_and(|t| t.contains("ready")),
    );
    // Room for small files, not for the big NAR: it fails half-way through its staging file.
    small.fill(256 << 10);
    let entry = setup.enqueue(std::slice::from_ref(big));
    let nar_dir = setup.cache.join("nar");
    wait_until(
        PATIENCE,
        || {
            format!(
                "not retried: {}\n--- log:\n{}",
                setup.status(),
                daemon.log_tail()
            )
        },
        || {
            setup.status()["held"]
                .as_array()
                .and_then(|h| h.first())
                .and_then(|h| h["attempts"].as_u64())
                .is_some_and(|a| a >= 2)
        },
    );
    let st = setup.status();
    let held = &st["held"][0];
    assert_eq!(held["entry"], entry.as_str(), "{st}");
    let failed = held["failed"][0].as_str().expect("a failure");
    for n in [
        format!("{big}: "),
        format!(
            "cannot write the compressed NAR into its staging file in {}",
            nar_dir.display()
        ),
        "No space left on device".to_owned(),
        "the file system is full: free space there (the path is tried again)".to_owned(),
    ] {
        assert!(failed.contains(&n), "{n:?}: {st}");
    }
    assert_eq!(st["retrying"], false, "the cache answers: {st}");

    // The failed attempts take their temporary files with them: none seen now is there a
    // moment later (each attempt takes milliseconds; they come every second or two).
    let temps = || dir_names(&nar_dir, |n| n.ends_with(".tmp"));
    let seen = temps();
    std::thread::sleep(Duration::from_secs(3));
    let still: Vec<String> = temps().into_iter().filter(|t| seen.contains(t)).collect();
    assert!(still.is_empty(), "temporary files left behind: {still:?}");

    // A small path still fits, and is not held back by the big one.
    setup.enqueue(std::slice::from_ref(small_path));
    wait_until(
        PATIENCE,
        || {
            format!(
                "the small path is not published\n--- log:\n{}",
                daemon.log_tail()
            )
        },
        || setup.published(std::slice::from_ref(small_path)),
    );
    assert!(!setup.published(std::slice::from_ref(big)));
    assert_eq!(setup.queued(), [entry]);

    // Space again: the big path lands, and nothing temporary is left.
    small.free();
    setup.wait_published(&p, &daemon);
    assert!(temps().is_empty(), "{:?}", temps());
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
    setup.nix_substitutes(&p);
    drop(daemon);
}
