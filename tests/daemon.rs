//! The daemon with real Nix: builds hooked with `post-build-hook = nixpush hook` are published
//! whether the daemon runs or not (then the queue directory keeps them until it starts), real
//! Nix substitutes what it published with signatures required; bad requests and bad queue
//! entries are refused with a reason while valid ones keep landing; configuration errors stop
//! it at start; the store can be read through a nix-daemon; `nixpush status` counts it all.

mod common;
mod daemon_support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use daemon_support::*;

/// Fresh derivations for the hook: a chain with a text file, and a derivation with two outputs
/// (the hook sends `<drv>^*` with Nix 2.8, so the daemon must find both).
const HOOKED_NIX: &str = concat!(
    r#"
{ salt }:
let
"#,
    nix_mk!(),
    r#"  note = builtins.toFile "np-hook-note" "note ${salt}\n";
  a = mk "np-hook-a" "printf 'a %s\\n' \"$salt\" > $out";
  b = mk "np-hook-b" ''
    mkdir $out
    printf '%s\n' ${a} > $out/a
    cat ${note} > $out/note-copy
    ln -s ${note} $out/note
  '';
  c = mk "np-hook-c" ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho %s\n' ${b} > $out/bin/c
    chmod +x $out/bin/c
  '';
  multi = (builtins.derivation {
    name = "np-hook-multi";
    inherit salt;
    outputs = [ "out" "dev" ];
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "mkdir $out $dev; printf '%s\\n' ${c} > $dev/c; printf 'multi\\n' > $out/m" ];
    PATH = "/usr/bin:/bin";
  });
in { inherit a b c multi; }
"#
);

/// Independent one-file paths.
const LEAVES_NIX: &str = r#"
{ salt }:
let
  leaf = n: builtins.derivation {
    name = "np-leaf-${toString n}";
    inherit salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "printf 'leaf %s %s\\n' ${toString n} \"$salt\" > $out" ];
    PATH = "/usr/bin:/bin";
  };
in { l1 = leaf 1; l2 = leaf 2; l3 = leaf 3; l4 = leaf 4; l5 = leaf 5; }
"#;

const HOOK_DRVS: usize = 4;

fn leaves(tag: &str, attrs: &[&str]) -> Vec<String> {
    let (paths, _) = nix_build_expr(LEAVES_NIX, &unique(tag), attrs, &[]);
    assert_eq!(paths.len(), attrs.len());
    paths
}

/// A post-build-hook program (Nix runs it without arguments): runs `nixpush hook` and notes
/// its exit code and how long it took, one line per call.
fn hook_wrapper(setup: &Setup) -> (PathBuf, PathBuf) {
    let script = setup.dir.path().join("post-build-hook");
    let times = setup.dir.path().join("hook-times");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             start=$(date +%s%N)\n\
             '{nixpush}' hook --config '{config}'\n\
             rc=$?\n\
             end=$(date +%s%N)\n\
             echo \"$rc $(( (end - start) / 1000000 )) $DRV_PATH [$OUT_PATHS]\" >> '{times}'\n\
             exit $rc\n",
            nixpush = &*NIXPUSH,
            config = setup.config.display(),
            times = times.display(),
        ),
    )
    .expect("write hook");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod hook");
    (script, times)
}

/// Build the hooked derivations with the hook; every output path (both of `multi`), and what
/// nix-build said.
fn build_hooked(hook: &Path) -> (Vec<String>, Out) {
    let (paths, out) = nix_build_expr(
        HOOKED_NIX,
        &unique("hook"),
        &["c", "multi"],
        &["--option", "post-build-hook", &hook.display().to_string()],
    );
    // Whatever nix-build prints of `multi`, the daemon must publish both of its outputs.
    let mut outputs = paths.clone();
    let multi = paths
        .iter()
        .find(|p| p.ends_with("-np-hook-multi"))
        .unwrap_or_else(|| panic!("no multi output: {}", out.report()));
    let drv = deriver_of(multi);
    let q = run_ok(Command::new("nix-store").args(["-q", "--outputs", &drv]));
    outputs.extend(q.stdout.lines().map(str::to_owned));
    outputs.sort();
    outputs.dedup();
    assert_eq!(outputs.len(), 3, "c, multi.out, multi.dev: {outputs:?}");
    (outputs, out)
}

/// The hook's calls: (exit code, milliseconds, DRV_PATH), checked to be quick and successful.
fn check_hook_calls(times: &Path, expected: usize, max: Duration) -> Vec<String> {
    let text = fs::read_to_string(times).expect("the hook never ran");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected, "hook calls:\n{text}");
    let mut requests = Vec::new();
    for l in lines {
        let (head, out_paths) = l.split_once(" [").expect("[OUT_PATHS]");
        let mut w = head.split_whitespace();
        let rc = w.next().expect("rc");
        let ms: u64 = w.next().expect("ms").parse().expect("ms");
        let drv = w.next().expect("DRV_PATH");
        assert_eq!(rc, "0", "the hook failed: {l}");
        assert!(
            u128::from(ms) < max.as_millis(),
            "the hook took {ms} ms (limit {max:?}): {l}"
        );
        assert!(drv.ends_with(".drv"), "{l}");
        // Nix 2.8.0 leaves OUT_PATHS empty; then the request is the derivation's outputs.
        let out_paths = out_paths.trim_end_matches(']').trim();
        if out_paths.is_empty() {
            requests.push(format!("{drv}^*"));
        } else {
            requests.push(out_paths.split_whitespace().collect::<Vec<_>>().join("\n"));
        }
    }
    requests
}

fn status_u64(status: &serde_json::Value, key: &str) -> u64 {
    status[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no {key}: {status}"))
}

#[test]
fn hook_publishes_builds_while_the_daemon_runs() {
    let setup = Setup::new("");
    let daemon = setup.start();
    let (hook, times) = hook_wrapper(&setup);
    let (outputs, build) = build_hooked(&hook);
    assert!(
        !build.stderr.contains("not reachable"),
        "the hook should have handed over through the socket: {}",
        build.report()
    );
    // Through the socket the hook waits only for the entry to be on disk.
    check_hook_calls(&times, HOOK_DRVS, Duration::from_millis(1500));

    let expected = closure_of_all(&outputs);
    assert_eq!(expected.len(), 6, "a, note, b, c, multi.out, multi.dev");
    setup.wait_published(&expected, &daemon);
    let published = check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
    for p in &expected {
        assert!(published.contains(p), "{p} not published");
    }

    let st = setup.status();
    assert!(
        status_u64(&st, "published") >= expected.len() as u64,
        "{st}"
    );
    assert_eq!(status_u64(&st, "queue_depth"), 0, "{st}");
    assert_eq!(status_u64(&st, "in_flight"), 0, "{st}");
    assert_eq!(status_u64(&st, "failed"), 0, "{st}");
    assert_eq!(status_u64(&st, "rejected"), 0, "{st}");
    assert_eq!(st["retrying"], false, "{st}");
    assert!(
        st["cache"].as_str().is_some_and(|c| c.contains("cache")),
        "{st}"
    );

    setup.nix_substitutes(&expected);
}

#[test]
fn hook_queues_while_the_daemon_is_down_and_the_daemon_catches_up() {
    let setup = Setup::new("");
    // The daemon ran once (so its queue directory exists, as systemd's StateDirectory would)
    // and was stopped: its socket file is left behind, refusing connections.
    let daemon = setup.start();
    let st = daemon.terminate(Duration::from_secs(30));
    assert!(st.success(), "SIGTERM should be a clean exit: {st}");
    assert!(UnixStream::connect(&setup.socket).is_err());

    let (hook, times) = hook_wrapper(&setup);
    let (outputs, build) = build_hooked(&hook);
    let mut want = check_hook_calls(&times, HOOK_DRVS, Duration::from_millis(1000));
    assert_eq!(
        build.stderr.matches("queued as").count(),
        HOOK_DRVS,
        "the hook should say it queued each build itself: {}",
        build.report()
    );

    // Every build waits in the queue, as `<drv>^*` where Nix left OUT_PATHS empty (2.8.0).
    let entries = setup.queued();
    assert_eq!(entries.len(), HOOK_DRVS, "{entries:?}");
    let mut queued_items: Vec<String> = entries
        .iter()
        .map(|e| {
            fs::read_to_string(setup.queue.join(e))
                .expect("entry")
                .trim()
                .to_owned()
        })
        .collect();
    queued_items.sort();
    want.sort();
    assert_eq!(queued_items, want);
    let expected = closure_of_all(&outputs);
    assert!(narinfo_files(&setup.cache).is_empty());

    let daemon = setup.start();
    setup.wait_published(&expected, &daemon);
    let published = check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        published.into_iter().collect::<Vec<_>>(),
        expected,
        "exactly the closures of the builds"
    );
    let st = setup.status();
    assert_eq!(status_u64(&st, "queue_depth"), 0, "{st}");
    assert_eq!(status_u64(&st, "published"), expected.len() as u64, "{st}");
    assert_eq!(status_u64(&st, "rejected"), 0, "{st}");
    setup.nix_substitutes(&expected);
}

/// Send `msg`; the daemon must answer with an error whose message contains every one of
/// `needles`.
fn expect_refused(setup: &Setup, msg: &[u8], needles: &[&str]) {
    let r = setup.request(msg);
    let shown = String::from_utf8_lossy(&msg[..msg.len().min(200)]).into_owned();
    assert_eq!(r["result"], "error", "request {shown:?} answered {r}");
    let m = r["message"].as_str().expect("message");
    for n in needles {
        assert!(
            m.contains(n),
            "request {shown:?}: {m:?} should mention {n:?}"
        );
    }
}

fn enqueue_msg(items: &[&str]) -> Vec<u8> {
    let mut v = serde_json::json!({"op": "enqueue", "items": items})
        .to_string()
        .into_bytes();
    v.push(b'\n');
    v
}

/// Write a queue entry with its modification time `age` ago (dot-file, then rename: the
/// daemon never sees it half-written).
fn write_entry_aged(setup: &Setup, name: &str, bytes: &[u8], age: Duration) {
    let tmp = setup.queue.join(format!(".{name}.tmp"));
    fs::write(&tmp, bytes).expect("write entry");
    age_file(&tmp, age);
    fs::rename(&tmp, setup.queue.join(name)).expect("rename entry");
}

#[test]
fn bad_requests_and_entries_are_refused_and_good_ones_still_land() {
    let setup = Setup::new("");
    let mut daemon = setup.start();
    let l = leaves("bad-input", &["l1", "l2", "l3", "l4", "l5"]);
    let sd = store_dir();
    let missing = format!("{sd}/00000000000000000000000000000000-nixpush-nonexistent");
    let missing_drv = format!("{sd}/11111111111111111111111111111111-nixpush-nonexistent.drv");
    let base = base_name(&l[0]).to_owned();

    // The socket: malformed, unknown, oversized, outside the store, `..` tricks, missing paths.
    expect_refused(
        &setup,
        b"{\"op\":\"enqueue\",\"items\":[\n",
        &["malformed request"],
    );
    expect_refused(&setup, b"not json at all\n", &["malformed request"]);
    expect_refused(&setup, b"\n", &["malformed request"]);
    expect_refused(&setup, b"\xff\xfe\x00garbage\n", &["malformed request"]);
    expect_refused(&setup, b"{\"op\":\"frobnicate\"}\n", &["frobnicate"]);
    expect_refused(
        &setup,
        b"{\"op\":\"status\",\"sneaky\":1}\n",
        &["malformed request", "sneaky"],
    );
    expect_refused(&setup, b"{\"op\":\"enqueue\"}\n", &["items"]);
    let mut huge = b"{\"op\":\"enqueue\",\"items\":[\"".to_vec();
    huge.resize(huge.len() + (1 << 20) + 100, b'a');
    huge.extend_from_slice(b"\"]}\n");
    expect_refused(&setup, &huge, &["larger than 1048576 bytes"]);
    expect_refused(
        &setup,
        &enqueue_msg(&["/etc/passwd"]),
        &["/etc/passwd", "not in the Nix store"],
    );

    // One good request in between.
    let e1 = setup.enqueue(std::slice::from_ref(&l[0]));
    assert!(!e1.is_empty());

    for tricky in [
        format!("{sd}/../etc/passwd"),
        format!("{sd}/{base}/../../../etc/shadow"),
        format!("{sd}/../../{sd}/{base}"),
        format!("/nix/../{sd}/{base}"),
        format!("{sd}/./{base}"),
        format!("{sd}/{base}/"),
        format!("{sd}/{base}/bin/x"),
    ] {
        expect_refused(&setup, &enqueue_msg(&[&tricky]), &[&tricky]);
    }
    expect_refused(&setup, &enqueue_msg(&[&format!("{sd}/..")]), &["\"..\""]);
    expect_refused(
        &setup,
        &enqueue_msg(&[&missing]),
        &[&missing, "no such path"],
    );
    expect_refused(
        &setup,
        &enqueue_msg(&[&format!("{missing_drv}^*")]),
        &[&missing_drv, "no such path"],
    );
    expect_refused(
        &setup,
        &enqueue_msg(&[&format!("{}^*", l[1])]),
        &["not a .drv"],
    );
    expect_refused(&setup, &enqueue_msg(&[]), &["names no store path"]);
    // One bad item spoils the whole request: nothing of it is queued.
    expect_refused(
        &setup,
        &enqueue_msg(&[&l[4], "/etc/passwd"]),
        &["/etc/passwd"],
    );
    daemon.assert_running();

    // The queue directory: what can never succeed moves to rejected/ with the reason.
    let old = Duration::from_secs(60);
    let young_written = Instant::now();
    write_entry_aged(
        &setup,
        "young-garbage",
        b"still being written",
        Duration::ZERO,
    );
    let mut bad: Vec<(&str, &str)> = Vec::new();
    write_entry_aged(&setup, "garbage", b"this is not a store path\n", old);
    bad.push(("garbage", "\"this\" is not in the Nix store"));
    write_entry_aged(&setup, "empty", b"", old);
    bad.push(("empty", "names no store path"));
    write_entry_aged(&setup, "only-comments", b"# nothing\n  # here\n", old);
    bad.push(("only-comments", "names no store path"));
    write_entry_aged(&setup, "binary", b"\xff\xfe\x00\x01\x80", old);
    bad.push(("binary", "not UTF-8"));
    write_entry_aged(&setup, "outside", b"/etc/passwd\n", old);
    bad.push(("outside", "\"/etc/passwd\" is not in the Nix store"));
    write_entry_aged(
        &setup,
        "dotdot",
        format!("{sd}/{base}/../../../etc/passwd\n").as_bytes(),
        old,
    );
    bad.push(("dotdot", "is not in the Nix store"));
    write_entry_aged(
        &setup,
        "half-good",
        format!("{}\n/etc/passwd\n", l[4]).as_bytes(),
        old,
    );
    bad.push(("half-good", "\"/etc/passwd\" is not in the Nix store"));
    write_entry_aged(
        &setup,
        "nonexistent",
        format!("{missing}\n").as_bytes(),
        old,
    );
    bad.push(("nonexistent", "not valid in the Nix store"));
    write_entry_aged(
        &setup,
        "nonexistent-drv",
        format!("{missing_drv}^*\n").as_bytes(),
        old,
    );
    bad.push(("nonexistent-drv", "not valid in the Nix store"));
    // Too large, though every line of it is a valid path: never read at all.
    let line = format!("{}\n", l[4]);
    let big = line.repeat((1 << 20) / line.len() + 1);
    write_entry_aged(&setup, "too-large", big.as_bytes(), old);
    bad.push(("too-large", "more than the limit of 1048576"));
    // A symlink to a file naming a valid path: not followed.
    let outside = setup.dir.path().join("outside-entry");
    fs::write(&outside, &line).expect("write");
    std::os::unix::fs::symlink(&outside, setup.queue.join("symlink")).expect("symlink");
    bad.push(("symlink", "symlink"));
    fs::create_dir(setup.queue.join("a-directory")).expect("mkdir");
    bad.push(("a-directory", "not a regular file"));
    // And a good entry among them.
    setup.write_entry("good-between", &format!("# by hand\n{}\n", l[1]));

    let rejected_all = || {
        let r = setup.rejected();
        bad.iter()
            .all(|(n, _)| r.contains(&n.to_string()) && r.contains(&format!("{n}.reason")))
    };
    wait_until(PATIENCE, || rejections(&setup, &daemon), rejected_all);
    // A file that does not parse yet is given time: its writer may still be at it.
    if young_written.elapsed() < Duration::from_secs(4) {
        assert!(
            setup.queued().contains(&"young-garbage".to_owned()),
            "a young unparsable entry was rejected early: {:?}",
            setup.rejected()
        );
    }
    for (name, why) in &bad {
        let reason = fs::read_to_string(setup.queue.join(format!("rejected/{name}.reason")))
            .expect("reason file");
        assert!(
            reason.contains(why),
            "rejected/{name}.reason should say {why:?}: {reason:?}"
        );
        assert!(!setup.queue.join(name).exists(), "{name} still queued");
    }
    let moved = setup.queue.join("rejected/symlink");
    assert!(fs::symlink_metadata(&moved).is_ok_and(|m| m.file_type().is_symlink()));
    assert_eq!(fs::read_to_string(&outside).expect("untouched"), line);

    wait_until(
        PATIENCE,
        || format!("young-garbage rejection; queue: {:?}", setup.queued()),
        || {
            setup
                .rejected()
                .contains(&"young-garbage.reason".to_owned())
        },
    );
    let reason =
        fs::read_to_string(setup.queue.join("rejected/young-garbage.reason")).expect("reason");
    assert!(
        reason.contains("\"still\" is not in the Nix store"),
        "{reason}"
    );
    daemon.assert_running();

    // Still serving: a request after all that lands too.
    setup.enqueue(std::slice::from_ref(&l[2]));
    let good = vec![l[0].clone(), l[1].clone(), l[2].clone()];
    setup.wait_published(&good, &daemon);
    // Nothing of the refused requests and entries was published.
    assert!(
        !setup.published(&l[3..4]) && !setup.published(&l[4..5]),
        "a path named only by refused requests or entries was published"
    );
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));

    let st = setup.status();
    assert_eq!(
        status_u64(&st, "rejected"),
        bad.len() as u64 + 1,
        "one per rejected entry: {st}"
    );
    assert_eq!(status_u64(&st, "queue_depth"), 0, "{st}");
    assert_eq!(status_u64(&st, "published"), 3, "{st}");
    assert_eq!(st["retrying"], false, "{st}");
    let errors = st["last_errors"].as_array().expect("last_errors");
    assert!(
        errors.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("rejected"))),
        "{st}"
    );
    daemon.assert_running();
    setup.nix_substitutes(&good);
}

/// Whatever an entry's name or kind, if it can never succeed it is moved to rejected/ with a
/// reason that says why, the log says so, and the daemon goes on: a name that is not UTF-8, a
/// name too long for a `.reason` beside it, a name already taken in rejected/, a directory, a
/// FIFO (never opened: that would block), a socket, a device node (as root).
#[test]
fn entries_of_any_name_or_kind_that_can_never_succeed_are_rejected_with_a_reason() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt as _;

    let setup = Setup::new("");
    fs::create_dir_all(setup.queue.join("rejected")).expect("queue dir");
    let l = leaves("odd-entries", &["l1", "l2", "l3"]);
    let old = Duration::from_secs(60);
    let raw = |name: &OsString| setup.queue.join(name);
    // (name in the queue, name expected in rejected/, words of the reason)
    let mut bad: Vec<(OsString, OsString, Vec<String>)> = Vec::new();

    let not_utf8 = OsString::from_vec(b"bad-\xff".to_vec());
    fs::write(raw(&not_utf8), "/etc/passwd\n").expect("write");
    bad.push((
        not_utf8.clone(),
        not_utf8.clone(),
        vec!["name is not UTF-8".into(), "name entries in UTF-8".into()],
    ));

    // 255 bytes: as long as a name can be, so `<name>.reason` cannot exist.
    let long = "x".repeat(255);
    // Written in place (a dot-file of that name would be too long), before the daemon runs.
    fs::write(setup.queue.join(&long), "/etc/passwd\n").expect("write");
    age_file(&setup.queue.join(&long), old);
    let mut short = "x".repeat(255 - ".reason".len() - 2);
    short.push_str("~1");
    bad.push((
        long.clone().into(),
        short.into(),
        vec![
            "\"/etc/passwd\" is not in the Nix store".into(),
            format!("the entry was queued as {long}"),
            "too long for a .reason file".into(),
        ],
    ));
    // A long name that is a good request is published like any other.
    let long_good = format!("{}-good", "y".repeat(250));
    fs::write(setup.queue.join(&long_good), format!("{}\n", l[0])).expect("write");

    // A name already taken in rejected/ (by an earlier entry of that name).
    fs::write(setup.queue.join("rejected/dup"), "earlier\n").expect("write");
    fs::write(setup.queue.join("rejected/dup.reason"), "earlier\n").expect("write");
    write_entry_aged(&setup, "dup", b"not a path\n", old);
    bad.push((
        "dup".into(),
        "dup~1".into(),
        vec![
            "\"not\" is not in the Nix store".into(),
            "the entry was queued as dup".into(),
            "name was taken in rejected/".into(),
        ],
    ));

    let dir = OsString::from("a-directory");
    fs::create_dir(raw(&dir)).expect("mkdir");
    fs::write(raw(&dir).join("inside"), format!("{}\n", l[1])).expect("write");
    bad.push((
        dir.clone(),
        dir,
        vec!["the entry is a directory, not a regular file".into()],
    ));

    let fifo = OsString::from("a-fifo");
    run_ok(Command::new("mkfifo").arg(raw(&fifo)));
    bad.push((
        fifo.clone(),
        fifo,
        vec!["the entry is a FIFO (named pipe), not a regular file".into()],
    ));

    let socket = OsString::from("a-socket");
    let _listener = std::os::unix::net::UnixListener::bind(raw(&socket)).expect("bind");
    bad.push((
        socket.clone(),
        socket,
        vec!["the entry is a socket, not a regular file".into()],
    ));

    let root =
        fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if root {
        // The same device as /dev/null: harmless even if it were opened (it is not).
        let dev = OsString::from("a-device");
        run_ok(Command::new("mknod").arg(raw(&dev)).args(["c", "1", "3"]));
        bad.push((
            dev.clone(),
            dev,
            vec!["the entry is a character device, not a regular file".into()],
        ));
    } else {
        eprintln!("not root: no device node in the queue");
    }

    let mut daemon = setup.start();
    let rejected_all = || {
        bad.iter().all(|(_, r, _)| {
            let mut reason = r.clone();
            reason.push(".reason");
            fs::symlink_metadata(setup.queue.join("rejected").join(r)).is_ok()
                && setup.queue.join("rejected").join(&reason).is_file()
        })
    };
    wait_until(PATIENCE, || rejections(&setup, &daemon), rejected_all);
    for (name, moved, words) in &bad {
        let mut reason_name = moved.clone();
        reason_name.push(".reason");
        let reason = fs::read_to_string(setup.queue.join("rejected").join(&reason_name))
            .expect("reason file");
        for w in words {
            assert!(
                reason.contains(w.as_str()),
                "rejected/{}: {reason:?} should say {w:?}",
                reason_name.to_string_lossy()
            );
        }
        assert!(
            fs::symlink_metadata(setup.queue.join(name)).is_err(),
            "{} still queued",
            name.to_string_lossy()
        );
    }
    // The earlier rejection of that name is untouched.
    assert_eq!(
        fs::read_to_string(setup.queue.join("rejected/dup")).expect("dup"),
        "earlier\n"
    );
    let log = fs::read_to_string(&setup.log).expect("log");
    for needle in [
        "rejecting queue entry",
        r"bad-\xff",
        "name is not UTF-8",
        "a FIFO (named pipe)",
    ] {
        assert!(
            log.contains(needle),
            "the log should say {needle:?}:\n{log}"
        );
    }

    // And it goes on: the long good name and a later request are published.
    setup.enqueue(&l[2..3]);
    setup.wait_published(&[l[0].clone(), l[2].clone()], &daemon);
    daemon.assert_running();
    let st = setup.status();
    assert_eq!(status_u64(&st, "rejected"), bad.len() as u64, "{st}");
    assert_eq!(status_u64(&st, "queue_depth"), 0, "{st}");
    assert!(
        !setup.published(&l[1..2]),
        "a path named inside a directory entry was published"
    );
}

/// The longest `retry_in=` the daemon's log shows (`will retry retry_in=8.1234s`).
fn longest_retry_logged(log: &Path) -> Duration {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("will retry"))
        .filter_map(|l| {
            let v = l.split("retry_in=").nth(1)?.split_whitespace().next()?;
            let (num, scale) = if let Some(ms) = v.strip_suffix("ms") {
                (ms, 1e-3)
            } else {
                (v.strip_suffix('s')?, 1.0)
            };
            Some(Duration::from_secs_f64(num.parse::<f64>().ok()? * scale))
        })
        .max()
        .unwrap_or_default()
}

/// After an outage of the cache, the queue drains within moments of the cache answering
/// again, however long the backoff of the failed passes had grown.
#[test]
fn the_queue_drains_soon_after_the_cache_answers_again_whatever_the_backoff() {
    let setup = Setup::new("");
    let text = setup
        .config_text("")
        .replace("retry-max-delay-secs = 2", "retry-max-delay-secs = 120");
    assert!(text.contains("retry-max-delay-secs = 120"));
    fs::write(&setup.config, text).expect("config");
    let l = leaves("outage", &["l1"]);
    let daemon = setup.start();
    wait_until(
        PATIENCE,
        || format!("not ready\n--- log:\n{}", daemon.log_tail()),
        || fs::read_to_string(&setup.log).is_ok_and(|t| t.contains("ready")),
    );

    // The outage: the cache directory is away, a file in its place.
    let away = setup.dir.path().join("cache-away");
    fs::rename(&setup.cache, &away).expect("move the cache away");
    fs::write(&setup.cache, "not a directory\n").expect("block the cache");
    setup.enqueue(&l);
    // Until the backoff has grown well past the time allowed below.
    const LONG_BACKOFF: Duration = Duration::from_secs(8);
    wait_until(
        PATIENCE,
        || {
            format!(
                "no backoff of {LONG_BACKOFF:?} yet\n--- log:\n{}",
                daemon.log_tail()
            )
        },
        || longest_retry_logged(&setup.log) >= LONG_BACKOFF,
    );
    // (After the probe that follows the failure at once, as it does.)
    std::thread::sleep(Duration::from_millis(500));
    assert!(!setup.published(&l));
    assert_eq!(setup.status()["retrying"], true);

    // The cache is back: published within moments, not after the backoff.
    fs::remove_file(&setup.cache).expect("unblock");
    fs::rename(&away, &setup.cache).expect("bring the cache back");
    let back = Instant::now();
    setup.wait_published(&l, &daemon);
    let took = back.elapsed();
    eprintln!(
        "published {took:?} after the cache came back (the backoff then: {:?})",
        longest_retry_logged(&setup.log)
    );
    assert!(
        took < Duration::from_secs(7),
        "published {took:?} after the cache answered again\n--- log:\n{}",
        daemon.log_tail()
    );
    let log = fs::read_to_string(&setup.log).expect("log");
    assert!(
        log.contains("the cache answers again; retrying now"),
        "{}",
        daemon.log_tail()
    );
    assert_eq!(setup.status()["retrying"], false);
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
}

/// `nixpush daemon --config` with `text`: fails at once, saying all of `needles`, and never
/// listens.
fn expect_config_refused(setup: &Setup, text: &str, needles: &[&str]) {
    fs::write(&setup.config, text).expect("config");
    let out = run_with_timeout(&mut setup.daemon_command(), Duration::from_secs(60));
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "the daemon should refuse to start: {}",
        out.report()
    );
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "the error should mention {n:?}: {}",
            out.report()
        );
    }
    assert!(!setup.socket.exists(), "it bound its socket anyway");
}

#[test]
fn configuration_errors_stop_the_daemon_at_start() {
    let setup = Setup::new("");
    let good = setup.config_text("");
    // The line of the `[daemon]` table in the good config, to put mistakes after it.
    let daemon_line = good
        .lines()
        .position(|l| l == "[daemon]")
        .expect("[daemon]")
        + 1;

    let typo = good.replace("log-level", "compresion = \"xz\"\nlog-level");
    let line = typo
        .lines()
        .position(|l| l.starts_with("compresion"))
        .expect("typo")
        + 1;
    expect_config_refused(
        &setup,
        &typo,
        &["compresion", &format!("line {line}"), "unknown field"],
    );

    let typo = good.replace("[daemon]\n", "[daemon]\nrescan-intervall-secs = 5\n");
    expect_config_refused(
        &setup,
        &typo,
        &[
            "rescan-intervall-secs",
            &format!("line {}", daemon_line + 1),
        ],
    );

    let wrong = good.replace("[daemon]\n", "[daemon]\nbatch-entries = \"many\"\n");
    expect_config_refused(
        &setup,
        &wrong,
        &["batch-entries", &format!("line {}", daemon_line + 1)],
    );

    let secret = setup.keys.secret.display().to_string();
    let missing = setup.dir.path().join("no-such-key.sec");
    expect_config_refused(
        &setup,
        &good.replace(&secret, &missing.display().to_string()),
        &["cannot read key file", &missing.display().to_string()],
    );
    let dir_key = setup.dir.path().join("a-directory.sec");
    fs::create_dir(&dir_key).expect("mkdir");
    expect_config_refused(
        &setup,
        &good.replace(&secret, &dir_key.display().to_string()),
        &["cannot read key file", &dir_key.display().to_string()],
    );
    let junk_key = setup.dir.path().join("junk.sec");
    fs::write(&junk_key, "not a key\n").expect("write");
    expect_config_refused(
        &setup,
        &good.replace(&secret, &junk_key.display().to_string()),
        &["not a secret key", &junk_key.display().to_string()],
    );
    // No config file at all, named explicitly.
    let absent = setup.dir.path().join("absent.toml");
    let out = run_with_timeout(
        nixpush().arg("daemon").arg("--config").arg(&absent),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "{}", out.report());
    assert!(
        out.stderr.contains(&absent.display().to_string()),
        "{}",
        out.report()
    );

    // And the good one still starts.
    fs::write(&setup.config, &good).expect("config");
    let mut daemon = setup.start();
    daemon.assert_running();
    assert_eq!(setup.status()["queue_depth"], 0);
}

// ---------------------------------------------------------------------------------------------
// Through a nix-daemon, as the systemd unit runs it (Environment=NIX_REMOTE=daemon).

const NIX_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// A nix-daemon this test started (stopped by its PID when dropped), or None when one was
/// already listening.
struct NixDaemon {
    child: Option<Child>,
    log: PathBuf,
}

impl NixDaemon {
    fn ensure(log: PathBuf) -> Self {
        if UnixStream::connect(NIX_DAEMON_SOCKET).is_ok() {
            return Self { child: None, log };
        }
        let log_file = fs::File::create(&log).expect("log");
        let child = Command::new("nix-daemon")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("cannot start nix-daemon");
        let mut d = Self {
            child: Some(child),
            log,
        };
        let start = Instant::now();
        while UnixStream::connect(NIX_DAEMON_SOCKET).is_err() {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
                panic!(
                    "nix-daemon exited ({st}): {}",
                    fs::read_to_string(&d.log).unwrap_or_default()
                );
            }
            assert!(start.elapsed() < PATIENCE, "nix-daemon does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> Option<String> {
        self.child
            .as_ref()
            .map(|_| fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for NixDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Leave no dead socket behind for whoever looks next (unless someone else listens).
            if UnixStream::connect(NIX_DAEMON_SOCKET).is_err() {
                let _ = fs::remove_file(NIX_DAEMON_SOCKET);
            }
        }
    }
}

#[test]
fn store_queries_through_a_nix_daemon() {
    let setup = Setup::new("");
    let nix_daemon = NixDaemon::ensure(setup.dir.path().join("nix-daemon.log"));
    // Built without the hook, so the daemon is told by hand: a path, and a .drv's outputs.
    let l = leaves("nix-daemon", &["l1", "l2"]);
    let drv = deriver_of(&l[1]);
    let mut cmd = setup.daemon_command();
    // As the unit runs it: an unprivileged user without a home that cannot open Nix's
    // database, owning only its state, cache and socket directories and able to read its key.
    let unprivileged = run_as_nobody(&setup);
    if unprivileged {
        let mut wrapped = Command::new("setpriv");
        wrapped
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .env_remove("HOME");
        for v in ["NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "WATCHDOG_USEC"] {
            wrapped.env_remove(v);
        }
        cmd = wrapped;
    } else {
        eprintln!("not root or no setpriv: running the daemon as the current user");
    }
    cmd.env("NIX_REMOTE", "daemon");
    let daemon = setup.start_with(cmd);
    setup.enqueue(&[l[0].clone(), format!("{drv}^*")]);
    setup.wait_published(&l, &daemon);
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !setup.published(std::slice::from_ref(&drv)),
        "`^*` publishes the outputs, not the .drv"
    );
    if unprivileged {
        use std::os::unix::fs::MetadataExt as _;
        let ni = setup.cache.join(format!("{}.narinfo", hash_part(&l[0])));
        assert_eq!(
            fs::metadata(&ni).expect("narinfo").uid(),
            65534,
            "written as nobody"
        );
    }
    if let Some(log) = nix_daemon.log() {
        assert!(
            log.contains("accepted connection"),
            "nixpush's store queries did not reach the nix-daemon:\n{log}"
        );
        if unprivileged {
            assert!(
                log.lines()
                    .any(|l| l.contains("accepted connection") && !l.contains("user root")),
                "no connection from the unprivileged daemon:\n{log}"
            );
        }
    }
    drop(daemon);
    drop(nix_daemon);
    setup.nix_substitutes(&l);
}

/// Prepare `setup` for a daemon running as uid/gid 65534, if we are root and have setpriv.
fn run_as_nobody(setup: &Setup) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let setpriv = Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root || !setpriv {
        return false;
    }
    fs::set_permissions(setup.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let run_dir = setup.socket.parent().expect("socket dir").to_owned();
    for d in [&setup.cache, &setup.queue, &run_dir] {
        fs::create_dir_all(d).expect("mkdir");
        std::os::unix::fs::chown(d, Some(65534), Some(65534)).expect("chown");
    }
    std::os::unix::fs::chown(&setup.keys.secret, Some(65534), Some(65534)).expect("chown key");
    true
}

#[test]
fn hook_reads_out_paths_or_drv_path_and_never_fails_the_build() {
    let setup = Setup::new("");
    let text = setup
        .config_text("")
        .replace("timeout-ms = 2000", "timeout-ms = 300");
    fs::write(&setup.config, &text).expect("config");
    let l = leaves("hook-env", &["l1", "l2", "l3", "l4"]);
    let missing = format!(
        "{}/22222222222222222222222222222222-nixpush-missing",
        store_dir()
    );
    let hook = |env: &[(&str, &str)]| {
        let mut c = nixpush();
        c.args(["hook", "--config"])
            .arg(&setup.config)
            .env_remove("OUT_PATHS")
            .env_remove("DRV_PATH");
        for (k, v) in env {
            c.env(k, v);
        }
        run_with_timeout(&mut c, Duration::from_secs(60))
    };
    let mut daemon = setup.start();

    // Newer Nix: OUT_PATHS, space-separated, is used rather than DRV_PATH.
    let drv = deriver_of(&l[3]);
    let out = hook(&[
        ("OUT_PATHS", &format!("{} {}", l[0], l[1])),
        ("DRV_PATH", &drv),
    ]);
    assert!(out.status.success(), "{}", out.report());
    assert!(
        out.stderr.is_empty(),
        "handed over quietly: {}",
        out.report()
    );
    // Neither: nothing to do, and still no failure.
    let out = hook(&[("OUT_PATHS", "")]);
    assert!(out.status.success(), "{}", out.report());
    assert!(
        out.stderr.contains("nothing to publish"),
        "{}",
        out.report()
    );
    setup.wait_published(&l[..2], &daemon);
    assert!(
        !setup.published(&l[3..4]),
        "DRV_PATH used despite OUT_PATHS"
    );

    // A path the daemon refuses: the build still succeeds; the hook says what the daemon
    // said, and does not queue the request (a refusal is an answer, not an outage).
    let queued_before = setup.queued();
    for refused in [missing.as_str(), "/tmp/foo"] {
        let out = hook(&[("OUT_PATHS", refused)]);
        assert!(out.status.success(), "{}", out.report());
        let said = if refused.starts_with("/tmp") {
            format!("{refused:?} is not in the Nix store {:?}", store_dir())
        } else {
            format!("not in the Nix store (no such path): {refused}")
        };
        assert_eq!(
            out.stderr.trim_end(),
            format!(
                "nixpush hook: the daemon at {} refused the request: {said}; not queued",
                setup.socket.display()
            ),
            "{}",
            out.report()
        );
        let new: Vec<String> = setup
            .queued()
            .into_iter()
            .filter(|n| !queued_before.contains(n))
            .collect();
        assert!(new.is_empty(), "queued anyway: {new:?}: {}", out.report());
    }
    assert!(setup.rejected().is_empty(), "{:?}", setup.rejected());

    // A daemon that hangs (stopped): the hook gives up after hook.timeout-ms and queues the
    // request itself.
    let pid = daemon.pid().to_string();
    run_ok(Command::new("kill").args(["-STOP", &pid]));
    let start = Instant::now();
    let out = hook(&[("OUT_PATHS", &l[2])]);
    let took = start.elapsed();
    run_ok(Command::new("kill").args(["-CONT", &pid]));
    assert!(out.status.success(), "{}", out.report());
    assert!(
        out.stderr
            .contains("no answer from the daemon within 300 ms")
            && out.stderr.contains("queued as")
            && took < Duration::from_secs(3),
        "took {took:?}: {}",
        out.report()
    );
    // Resumed, it finds the request twice (its own from the socket, the hook's file): both go.
    setup.wait_published(&l[..3], &daemon);
    daemon.assert_running();
    let st = setup.status();
    assert_eq!(st["rejected"], 0, "{st}");
    assert_eq!(st["queue_depth"], 0, "{st}");
    drop(daemon);

    // Nowhere to put the request: said on stderr, naming the paths; exit 0 unless the config
    // asks for the build to fail.
    let blocked = setup.dir.path().join("a-file");
    fs::write(&blocked, "").expect("write");
    let text = text.replace(
        &format!("queue-dir = \"{}\"", setup.queue.display()),
        &format!("queue-dir = \"{}/queue\"", blocked.display()),
    );
    assert!(text.contains("a-file/queue"));
    fs::write(&setup.config, &text).expect("config");
    let out = hook(&[("OUT_PATHS", &l[3])]);
    assert!(out.status.success(), "{}", out.report());
    assert!(
        out.stderr.contains("cannot write") && out.stderr.contains(&l[3]),
        "{}",
        out.report()
    );
    fs::write(
        &setup.config,
        text.replace("[hook]\n", "[hook]\nfail-build-on-error = true\n"),
    )
    .expect("config");
    let out = hook(&[("OUT_PATHS", &l[3])]);
    assert!(
        !out.status.success() && out.stderr.contains(&l[3]),
        "{}",
        out.report()
    );
}

/// The worker's threads (and so its compressors and Nix queries) run at a lower priority than
/// the threads that acknowledge requests, so a hook is never answered late because of a push.
#[test]
fn worker_threads_run_below_the_request_handlers() {
    let setup = Setup::new("");
    let mut daemon = setup.start();
    daemon.wait_answering(&setup.socket);
    let threads = |pid: u32| -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap();
            // "tid (comm) state ..."; the comm may hold spaces, so split after its ')'.
            let (head, rest) = stat.rsplit_once(')').unwrap();
            let comm = head.split_once('(').unwrap().1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // Fields after the comm start at 3 (state); nice is field 19.
            out.push((comm, fields[19 - 3].parse().unwrap()));
        }
        out
    };
    // The worker's runtime starts beside the socket, not before it answers.
    let pid = daemon.pid();
    wait_until(
        PATIENCE,
        || format!("no worker threads in {:?}", threads(pid)),
        || {
            threads(pid)
                .iter()
                .any(|(c, _)| c.starts_with("nixpush-worker"))
        },
    );
    let all = threads(pid);
    let main_nice = all
        .iter()
        .find(|(c, _)| c == "nixpush")
        .map(|(_, n)| *n)
        .unwrap_or_else(|| panic!("no main thread in {all:?}"));
    let workers: Vec<i64> = all
        .iter()
        .filter(|(c, _)| c.starts_with("nixpush-worker"))
        .map(|(_, n)| *n)
        .collect();
    assert!(!workers.is_empty(), "no worker threads in {all:?}");
    for n in workers {
        assert!(
            n > main_nice,
            "worker nice {n} not above main {main_nice}: {all:?}"
        );
    }
    assert!(
        all.iter()
            .filter(|(c, _)| c.starts_with("tokio-runtime"))
            .all(|(_, n)| *n == main_nice),
        "request handler threads must keep the daemon's priority: {all:?}"
    );
    daemon.terminate(Duration::from_secs(20));
}

/// What a wait for rejections reports when it times out.
fn rejections(setup: &Setup, daemon: &Daemon) -> String {
    format!(
        "rejections; rejected/: {:?}; queue: {:?}\n--- log:\n{}",
        setup.rejected(),
        setup.queued(),
        daemon.log_tail()
    )
}

/// `nixpush status` is written for people: counts with their plurals, errors stamped with a UTC
/// time; and the daemon removes its socket when SIGTERM stops it.
#[test]
fn status_reads_as_sentences_and_the_socket_goes_with_the_daemon() {
    let setup = Setup::new("");
    let daemon = setup.start();
    setup.write_entry("outside", "/etc/passwd\n");
    wait_until(
        PATIENCE,
        || format!("rejection; rejected/: {:?}", setup.rejected()),
        || setup.rejected().len() == 2,
    );
    let out = run_ok(nixpush().arg("status").arg("--config").arg(&setup.config));
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines.contains(&"queue depth: 0 entries"),
        "{}",
        out.report()
    );
    assert!(lines.contains(&"in flight:   0 paths"), "{}", out.report());
    let errors = lines
        .iter()
        .position(|l| *l == "last errors:")
        .unwrap_or_else(|| panic!("no errors listed: {}", out.report()));
    let first = lines[errors + 1];
    // `  2026-12-02 00:45:55 UTC  rejected ...`
    let stamp = &first[2..25];
    let shape: String = stamp
        .chars()
        .map(|c| if c.is_ascii_digit() { '0' } else { c })
        .collect();
    assert_eq!(shape, "0000-00-00 00:00:00 UTC", "{}", out.report());
    assert!(first[25..].starts_with("  "), "{}", out.report());
    assert!(first.contains("/etc/passwd"), "{}", out.report());

    // `nixpush status --json | head -c1`: the reader goes away; the command ends quietly.
    let mut child = nixpush()
        .args(["status", "--json", "--config"])
        .arg(&setup.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn status");
    drop(child.stdout.take());
    let closed = child.wait_with_output().expect("status");
    assert_eq!(
        (
            closed.status.code(),
            String::from_utf8_lossy(&closed.stderr).as_ref()
        ),
        (Some(0), ""),
        "status into a closed pipe"
    );

    assert!(setup.socket.exists());
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert!(
        !setup.socket.exists(),
        "the socket {} is left after SIGTERM",
        setup.socket.display()
    );
}

/// `nixpush status` shows what waits in `rejected/` (every entry there, whichever run of the
/// daemon rejected it): how many, and the newest few with their reasons, newest first, as
/// `nixpush queue list` has them; `queue drop` and `queue retry` show in it at once.
#[test]
fn status_shows_the_rejected_entries_newest_first_with_their_reasons() {
    let setup = Setup::new("");
    let daemon = setup.start();
    let old = Duration::from_secs(60);
    // One at a time, each rejected before the next is written, so their order is known.
    let entries: [(&str, &[u8], &str); 4] = [
        (
            "e1-outside",
            b"/etc/passwd\n",
            "\"/etc/passwd\" is not in the Nix store",
        ),
        (
            "e2-words",
            b"not a path\n",
            "\"not\" is not in the Nix store",
        ),
        ("e3-empty", b"", "names no store path"),
        ("e4-binary", b"\xff\xfe\n", "not UTF-8"),
    ];
    for (name, bytes, _) in &entries {
        write_entry_aged(&setup, name, bytes, old);
        wait_until(
            PATIENCE,
            || rejections(&setup, &daemon),
            || setup.rejected().contains(&format!("{name}.reason")),
        );
    }
    let newest = |st: &serde_json::Value| -> Vec<(String, String)> {
        st["newest_rejected"]
            .as_array()
            .unwrap_or_else(|| panic!("no newest_rejected: {st}"))
            .iter()
            .map(|r| {
                (
                    r["entry"].as_str().expect("entry").to_owned(),
                    r["reason"].as_str().expect("reason").to_owned(),
                )
            })
            .collect()
    };
    let names = |st: &serde_json::Value| -> Vec<String> {
        newest(st).into_iter().map(|(n, _)| n).collect()
    };
    let st = setup.status();
    assert_eq!(status_u64(&st, "rejected_entries"), 4, "{st}");
    assert_eq!(names(&st), ["e4-binary", "e3-empty", "e2-words"], "{st}");
    for (name, reason) in newest(&st) {
        let (_, _, words) = entries.iter().find(|(n, ..)| *n == name).expect("known");
        assert!(
            reason.contains(words),
            "{name}: {reason:?} should say {words:?}"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for r in st["newest_rejected"].as_array().expect("array") {
        let at = r["at"].as_u64().unwrap_or_else(|| panic!("no time: {st}"));
        assert!(
            at <= now && now - at < 600,
            "rejected at {at}, now {now}: {st}"
        );
    }

    let out = run_ok(nixpush().arg("status").arg("--config").arg(&setup.config));
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            *l == "rejected:    4 entries in the queue's rejected/ (`nixpush queue list` shows all, \
                   `nixpush queue retry NAME` puts one back); the newest:"
        })
        .unwrap_or_else(|| panic!("no rejected entries line: {}", out.report()));
    assert!(
        lines[at + 1].starts_with("  e4-binary  rejected 20") && lines[at + 1].ends_with(" UTC"),
        "{}",
        out.report()
    );
    assert!(
        lines[at + 2].starts_with("    ") && lines[at + 2].contains("not UTF-8"),
        "{}",
        out.report()
    );

    // A new daemon has rejected nothing yet, but the entries are still there to deal with.
    daemon.terminate(Duration::from_secs(30));
    let daemon = setup.start();
    let st = setup.status();
    assert_eq!(status_u64(&st, "rejected"), 0, "{st}");
    assert_eq!(status_u64(&st, "rejected_entries"), 4, "{st}");

    // Dropped: gone from status. Retried and rejected again: the newest.
    run_ok(
        nixpush()
            .args(["queue", "drop", "e4-binary", "--config"])
            .arg(&setup.config),
    );
    run_ok(
        nixpush()
            .args(["queue", "retry", "e1-outside", "--config"])
            .arg(&setup.config),
    );
    wait_until(
        PATIENCE,
        || rejections(&setup, &daemon),
        || setup.rejected().contains(&"e1-outside.reason".to_owned()),
    );
    let st = setup.status();
    assert_eq!(status_u64(&st, "rejected_entries"), 3, "{st}");
    assert_eq!(names(&st), ["e1-outside", "e3-empty", "e2-words"], "{st}");
    let out = run_ok(nixpush().arg("status").arg("--config").arg(&setup.config));
    assert!(
        out.stdout.contains(
            "rejected:    3 entries in the queue's rejected/ (`nixpush queue list` shows all, \
             `nixpush queue retry NAME` puts one back):\n  e1-outside  rejected "
        ),
        "{}",
        out.report()
    );
    daemon.terminate(Duration::from_secs(30));
}

/// The log tells the start-up in the order it happens (started, then ready), and `-v` gives
/// the daemon more than its log-level's info: debug.
#[test]
fn the_start_up_log_is_in_order_and_v_means_debug() {
    let setup = Setup::new("");
    let text = setup
        .config_text("")
        .replace("log-level = \"nixpush=debug\"", "log-level = \"info\"");
    fs::write(&setup.config, text).expect("config");
    let mut cmd = setup.daemon_command();
    cmd.arg("-v").env_remove("NIXPUSH_LOG");
    let daemon = setup.start_with(cmd);
    wait_until(
        PATIENCE,
        || format!("ready in the log: {}", log_tail(&setup.log)),
        || fs::read_to_string(&setup.log).is_ok_and(|l| l.contains("cache answered; ready")),
    );
    setup.status();
    daemon.terminate(Duration::from_secs(30));
    let log = fs::read_to_string(&setup.log).expect("log");
    let started = log.find("nixpush daemon started").expect("started");
    let ready = log.find("cache answered; ready").expect("ready");
    assert!(started < ready, "ready before started:\n{log}");
    assert!(log.contains(" DEBUG "), "-v gave no debug lines:\n{log}");
}

/// A queue entry `DRV^*` for a derivation that is not built is rejected with that reason
/// (naming the derivation, saying to build it first), logged and counted, not dropped.
#[test]
fn an_unbuilt_derivation_is_rejected_with_the_reason() {
    let setup = Setup::new("");
    let drv = unbuilt_drv();
    let daemon = setup.start();
    setup.write_entry("unbuilt", &format!("{drv}^*\n"));
    wait_until(
        PATIENCE,
        || format!("rejection; rejected/: {:?}", setup.rejected()),
        || setup.rejected().len() == 2,
    );
    let reason = fs::read_to_string(setup.queue.join("rejected/unbuilt.reason")).expect("reason");
    assert!(
        reason.contains(&format!("derivation {drv} is not built (output out ("))
            && reason.contains(&format!("build it first, e.g. `nix-store --realise {drv}`")),
        "{reason}"
    );
    let st = setup.status();
    assert_eq!(st["rejected"], 1, "{st}");
    let last = st["last_errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        last.contains("unbuilt") && last.contains("is not built"),
        "{st}"
    );
    drop(daemon);
    let log = fs::read_to_string(&setup.log).expect("log");
    assert!(
        log.lines()
            .any(|l| l.contains("rejecting queue entry") && l.contains("is not built")),
        "{log}"
    );
}

/// Under systemd the daemon's stderr is the journal, which `JOURNAL_STREAM` names (device and
/// inode): every line then carries its syslog priority (`<3>` error … `<7>` debug) and no
/// time of its own, so that `journalctl -p warning` shows warnings and errors only.
#[test]
fn under_journald_every_line_carries_its_priority() {
    use std::os::unix::fs::MetadataExt as _;
    let setup = Setup::new("");
    // The log file plays the journal's stream.
    fs::File::create(&setup.log).expect("log");
    let meta = fs::metadata(&setup.log).expect("log");
    let mut cmd = setup.daemon_command();
    cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    let daemon = setup.start_with(cmd);
    setup.write_entry("outside", "/etc/passwd\n");
    wait_until(
        PATIENCE,
        || format!("rejection; rejected/: {:?}", setup.rejected()),
        || setup.rejected().len() == 2,
    );
    daemon.terminate(Duration::from_secs(20));
    let log = fs::read_to_string(&setup.log).expect("log");
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    for l in &lines {
        let b = l.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'<' && (b'0'..=b'7').contains(&b[1]) && b[2] == b'>',
            "a line without its priority: {l:?}\n{log}"
        );
        assert!(
            !l[3..].starts_with(|c: char| c.is_ascii_digit()),
            "journald stamps lines itself: {l:?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("daemon started")),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<3>") && l.contains("rejecting queue entry")),
        "{log}"
    );
}

/// `nixpush queue`: the rejected entries with their reasons; one retried once the path it
/// names is built gets published; one dropped is gone; a name that is not there is said so.
#[test]
fn rejected_entries_are_listed_retried_and_dropped() {
    let later_nix = sh_derivation_nix("np-queue-later", "echo ${salt} > $out");
    let setup = Setup::new("");
    let daemon = setup.start();
    let salt = unique("queue-later");
    let drv = run_ok(
        Command::new("nix-instantiate").args(["--expr", &later_nix, "--argstr", "salt", &salt]),
    )
    .stdout
    .trim()
    .to_owned();
    let out = run_ok(Command::new("nix-store").args(["--query", "--outputs", &drv]))
        .stdout
        .trim()
        .to_owned();
    setup.write_entry("later", &format!("{out}\n"));
    setup.write_entry("outside", "/etc/passwd\n");
    wait_until(
        PATIENCE,
        || rejections(&setup, &daemon),
        || setup.rejected().len() == 4,
    );
    let queue = |args: &[&str]| {
        let mut c = nixpush();
        c.arg("queue").args(args).arg("--config").arg(&setup.config);
        c
    };
    let list = run_ok(&mut queue(&["list"]));
    assert!(list.stdout.contains("later\n  "), "{}", list.report());
    assert!(
        list.stdout.contains(&out),
        "the reason names the path: {}",
        list.report()
    );
    assert!(list.stdout.contains("outside\n  "), "{}", list.report());
    let json = run_ok(&mut queue(&["list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");

    run_ok(Command::new("nix-store").args(["--realise", &drv]));
    let retried = run_ok(&mut queue(&["retry", "later"]));
    assert_eq!(retried.stdout, "later: back in the queue\n");
    setup.wait_published(std::slice::from_ref(&out), &daemon);

    let dropped = run_ok(&mut queue(&["drop", "--all"]));
    assert_eq!(dropped.stdout, "outside: dropped\n");
    assert!(setup.rejected().is_empty(), "{:?}", setup.rejected());
    let missing = run_fail(&mut queue(&["retry", "nosuch"]));
    assert!(
        missing
            .stderr
            .contains("no rejected entry nosuch (see `nixpush queue list`)"),
        "{}",
        missing.report()
    );
}

/// The held entries of a status report: (entry name, attempts, retry_in_secs, failed).
fn held_entries(st: &serde_json::Value) -> Vec<(String, u64, u64, Vec<String>)> {
    st["held"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no held list: {st}"))
        .iter()
        .map(|h| {
            (
                h["entry"].as_str().expect("entry").to_owned(),
                h["attempts"].as_u64().expect("attempts"),
                h["retry_in_secs"].as_u64().expect("retry_in_secs"),
                h["failed"]
                    .as_array()
                    .expect("failed")
                    .iter()
                    .map(|f| f.as_str().expect("string").to_owned())
                    .collect(),
            )
        })
        .collect()
}

/// One path whose upload keeps failing (its NAR's name in the cache is taken by a directory,
/// so the rename into place fails every time) holds back neither the other paths of its batch
/// nor later entries: they land at once, while its entry is retried on its own growing
/// backoff, listed by `status` with the path and the error, and lands once the fault is gone
/// (Mic92/niks3#465).
#[test]
fn one_path_that_keeps_failing_holds_back_no_other_entry() {
    let setup = Setup::new("");
    let text = setup
        .config_text("")
        .replace("retry-max-delay-secs = 2", "retry-max-delay-secs = 30");
    fs::write(&setup.config, text).expect("config");
    let l = leaves("one-bad", &["l1", "l2", "l3", "l4"]);
    let bad = &l[1];

    // Where the daemon will put the bad path's NAR: the same push into a scratch cache says
    // (the NAR's name is its compressed hash, the same for the same settings).
    let scratch = setup.dir.path().join("scratch-cache");
    push(&format!("file://{}", scratch.display()), &setup.keys, bad);
    let url = RawNarInfo::read(&scratch, bad).one("URL").to_owned();
    assert!(url.starts_with("nar/"), "{url}");
    let blocker = setup.cache.join(&url);
    fs::create_dir_all(blocker.join("in-the-way")).expect("block the NAR's name");

    // The bad path and two good ones in one batch (written before the daemon starts, so its
    // first pass takes them together), in two entries.
    setup.write_entry("a-bad", &format!("{bad}\n"));
    setup.write_entry("b-good", &format!("{}\n{}\n", l[0], l[2]));
    let started = Instant::now();
    let daemon = setup.start();
    let good = [l[0].clone(), l[2].clone()];
    wait_until(
        PATIENCE,
        || {
            format!(
                "the good paths are not published\n--- log:\n{}",
                daemon.log_tail()
            )
        },
        || setup.published(&good) && setup.queued() == ["a-bad"],
    );
    eprintln!(
        "the good entry of the batch landed after {:?}",
        started.elapsed()
    );
    assert!(!setup.published(std::slice::from_ref(bad)));

    // The bad entry is retried on its own, with a growing backoff.
    wait_until(
        PATIENCE,
        || {
            format!(
                "not retried 5 times: {}\n--- log:\n{}",
                setup.status(),
                daemon.log_tail()
            )
        },
        || {
            held_entries(&setup.status())
                .first()
                .is_some_and(|h| h.1 >= 5)
        },
    );
    let st = setup.status();
    let held = held_entries(&st);
    assert_eq!(held.len(), 1, "{st}");
    let (entry, attempts, retry_in, failed) = &held[0];
    assert_eq!(entry, "a-bad", "{st}");
    assert_eq!(failed.len(), 1, "{st}");
    assert!(
        failed[0].starts_with(&format!("{bad}: ")) && failed[0].contains(&url),
        "the failure names the path and its NAR: {st}"
    );
    assert!(failed[0].contains("Is a directory"), "{st}");
    // After 5 failures the backoff is 8-16 s: a later entry must not wait for it.
    assert!(*retry_in >= 2, "backoff after {attempts} attempts: {st}");
    assert_eq!(st["retrying"], false, "the cache is well: {st}");
    let human = run_ok(nixpush().args(["status", "--config"]).arg(&setup.config));
    for needle in [
        "retried on their own (1 entry; other entries go on meanwhile):",
        "a-bad: failed ",
        "next try in ",
        bad.as_str(),
    ] {
        assert!(
            human.stdout.contains(needle),
            "{needle:?}: {}",
            human.report()
        );
    }

    let asked = Instant::now();
    setup.enqueue(&l[3..4]);
    wait_until(
        PATIENCE,
        || {
            format!(
                "the later entry is not published\n--- log:\n{}",
                daemon.log_tail()
            )
        },
        || setup.published(&l[3..4]) && setup.queued() == ["a-bad"],
    );
    let took = asked.elapsed();
    eprintln!(
        "a later entry landed {took:?} after it was queued (the bad one's next try was {retry_in} s away)"
    );
    assert!(
        took < Duration::from_secs(4) && took.as_secs() < *retry_in,
        "the later entry took {took:?}, the held one's backoff was {retry_in} s\n--- log:\n{}",
        daemon.log_tail()
    );
    assert!(!setup.published(std::slice::from_ref(bad)));
    assert_eq!(
        held_entries(&setup.status())[0].0,
        "a-bad",
        "still held after the later entry"
    );

    // The fault is lifted: the bad path lands at its next try, and nothing is held.
    fs::remove_dir_all(&blocker).expect("unblock");
    let lifted = Instant::now();
    let next_try = Duration::from_secs(held_entries(&setup.status())[0].2);
    setup.wait_published(std::slice::from_ref(bad), &daemon);
    let took = lifted.elapsed();
    eprintln!(
        "the bad path landed {took:?} after the fault was lifted (its next try: {next_try:?})"
    );
    assert!(
        took < next_try + Duration::from_secs(5),
        "landed {took:?} after the fault was lifted, its next try was {next_try:?} away"
    );
    assert!(held_entries(&setup.status()).is_empty());
    assert_eq!(RawNarInfo::read(&setup.cache, bad).one("URL"), url);
    assert!(
        dir_names(&setup.cache.join("nar"), |n| n.ends_with(".tmp")).is_empty(),
        "the failed attempts left temporary files behind"
    );
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
    setup.nix_substitutes(&l);
}
