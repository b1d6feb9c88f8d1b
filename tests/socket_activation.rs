//! The daemon under systemd, with the test playing systemd's part: the listening socket is
//! handed over as fd 3 (`LISTEN_FDS`, `LISTEN_PID`), readiness, watchdog pings and stopping are
//! announced on `NOTIFY_SOCKET`, the key comes from `$CREDENTIALS_DIRECTORY` as with
//! `LoadCredential=`, and a request sent to the inherited socket is published. The
//! unit files pass `systemd-analyze verify`.

mod common;
mod daemon_support;

use std::fs;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use daemon_support::*;

const LEAF_NIX: &str = r#"
{ salt }:
let
  leaf = n: builtins.derivation {
    name = "np-activation-${n}";
    inherit salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "printf '%s %s\\n' ${n} \"$salt\" > $out" ];
    PATH = "/usr/bin:/bin";
  };
  top = builtins.derivation {
    name = "np-activation-top";
    inherit salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "printf '%s\\n' ${leaf "a"} > $out" ];
    PATH = "/usr/bin:/bin";
  };
in { inherit top; b = leaf "b"; }
"#;

/// `nixpush daemon --config CONFIG` as systemd starts a socket-activated service: `listen_fd`
/// becomes fd 3, `LISTEN_FDS=listen_fds` and `LISTEN_PID` is the daemon's own pid (a shell
/// sets it to `$$` and execs the daemon, which keeps that pid).
fn activated(setup: &Setup, listen_fd: RawFd, listen_fds: &str, notify: &Path) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ exec \"$0\" \"$@\"",
        NIXPUSH.as_str(),
        "daemon",
        "--config",
    ])
    .arg(&setup.config)
    .env("LISTEN_FDS", listen_fds)
    .env("LISTEN_FDNAMES", "nixpush.socket")
    .env("NOTIFY_SOCKET", notify)
    .env("WATCHDOG_USEC", "400000")
    .env_remove("LISTEN_PID")
    .env_remove("WATCHDOG_PID")
    .env_remove("NIXPUSH_LOG");
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child just before exec and calls only dup2 and
    // fcntl, which are async-signal-safe; it allocates nothing and takes no locks. `listen_fd`
    // is open in the parent (the test keeps the listener alive until the child is spawned), so
    // it is open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if listen_fd == 3 {
                // Already in place: just let it survive exec.
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(listen_fd, 3) < 0 {
                // dup2 leaves the new descriptor without FD_CLOEXEC.
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Datagrams received on `sock` until one equals `want` (or `timeout`); all of them.
fn notifications_until(
    sock: &UnixDatagram,
    want: &str,
    timeout: Duration,
    daemon: &mut Daemon,
) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                // One datagram may carry several newline-separated assignments.
                let done = msg.lines().any(|l| l == want);
                got.push(msg);
                if done {
                    return got;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
        daemon.assert_running();
        assert!(
            start.elapsed() < timeout,
            "no {want} within {timeout:?}; got {got:?}\n--- log:\n{}",
            daemon.log_tail()
        );
    }
}

#[test]
fn socket_activation_and_sd_notify() {
    let setup = Setup::new("");
    let salt = unique("activation");
    let (paths, out) = nix_build_expr(LEAF_NIX, &salt, &["top", "b"], &[]);
    assert_eq!(paths.len(), 2, "{}", out.report());
    let closure = closure_of_all(&paths);
    assert_eq!(closure.len(), 3);

    let listen_path = setup.dir.path().join("activation.sock");
    let listener = UnixListener::bind(&listen_path).expect("bind");
    let notify_path = setup.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    // The key as the unit passes it: `LoadCredential=signing-key:…`, named relatively.
    let creds = setup.dir.path().join("credentials");
    fs::create_dir(&creds).expect("mkdir");
    fs::copy(&setup.keys.secret, creds.join("signing-key")).expect("copy key");
    let text = setup.config_text("").replace(
        &format!("key-files = [\"{}\"]", setup.keys.secret.display()),
        "key-files = [\"signing-key\"]",
    );
    assert!(text.contains("[\"signing-key\"]"));
    fs::write(&setup.config, text).expect("config");

    let mut cmd = activated(&setup, listener.as_raw_fd(), "1", &notify_path);
    cmd.env("CREDENTIALS_DIRECTORY", &creds);
    let mut daemon = Daemon::spawn(cmd, &setup.log);
    // The daemon has its own copy now; systemd keeps one too, but the test need not.
    drop(listener);
    let got = notifications_until(&notify, "READY=1", PATIENCE, &mut daemon);
    assert!(
        setup.cache.join("nix-cache-info").is_file(),
        "READY=1 comes once the cache answered; got {got:?}"
    );
    notifications_until(&notify, "WATCHDOG=1", Duration::from_secs(10), &mut daemon);

    // A request on the inherited socket; the configured one was never bound.
    let drv = deriver_of(&paths[1]);
    let items = vec![paths[0].clone(), format!("{drv}^*")];
    let answer = request(
        &listen_path,
        serde_json::json!({"op": "enqueue", "items": items})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(answer["result"], "queued", "{answer}");
    setup.wait_published(&closure, &daemon);
    assert!(
        !setup.socket.exists(),
        "the daemon bound {} although it was handed a socket",
        setup.socket.display()
    );
    let status = request(&listen_path, b"{\"op\":\"status\"}\n");
    assert_eq!(status["result"], "status", "{status}");
    assert_eq!(status["published"], 3, "{status}");
    assert_eq!(status["queue_depth"], 0, "{status}");
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));

    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = daemon.pid();
    let stop = std::thread::spawn(move || {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    });
    notifications_until(&notify, "STOPPING=1", Duration::from_secs(30), &mut daemon);
    stop.join().expect("kill");
    let st = daemon.terminate(Duration::from_secs(30));
    assert!(st.success(), "{st}\n--- log:\n{}", log_tail(&setup.log));

    setup.nix_substitutes(&closure);
}

#[test]
fn socket_activation_variables_for_another_process_or_too_many_sockets() {
    let setup = Setup::new("");
    let listen_path = setup.dir.path().join("activation.sock");
    let listener = UnixListener::bind(&listen_path).expect("bind");

    // LISTEN_PID names another process: the variables are not for us; bind the configured
    // socket as usual.
    let mut cmd = setup.daemon_command();
    cmd.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let mut daemon = setup.start_with(cmd);
    daemon.assert_running();
    assert_eq!(setup.status()["queue_depth"], 0);
    daemon.kill9();

    // Two sockets: nixpush takes exactly one, and says so.
    let notify_path = setup.dir.path().join("notify.sock");
    let _notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    let out = run_with_timeout(
        &mut activated(&setup, listener.as_raw_fd(), "2", &notify_path),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "{}", out.report());
    assert!(
        out.stderr.contains("LISTEN_FDS=2"),
        "the error should name LISTEN_FDS: {}",
        out.report()
    );
}

/// fd 3 is checked before it is used: something other than a listening Unix stream socket
/// there (a wrong unit file, `Accept=yes`, a stray descriptor) is refused with a sentence that
/// says what fd 3 is and what to do, before anything else happens.
#[test]
fn socket_activation_refuses_what_is_not_a_listening_unix_socket() {
    let setup = Setup::new("");
    let notify_path = setup.dir.path().join("notify.sock");
    let _notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    let file = fs::File::create(setup.dir.path().join("not-a-socket")).expect("create");
    let (connected, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let datagram = UnixDatagram::unbound().expect("socket");
    let hint = "the socket unit must have exactly one ListenStream= with a path";
    for (fd, what) in [
        (
            file.as_raw_fd(),
            "file descriptor 3 is a regular file, not a socket",
        ),
        (
            connected.as_raw_fd(),
            "the socket on file descriptor 3 is not listening",
        ),
        (
            datagram.as_raw_fd(),
            "file descriptor 3 is not a stream socket",
        ),
    ] {
        let out = run_with_timeout(
            &mut activated(&setup, fd, "1", &notify_path),
            Duration::from_secs(60),
        );
        assert!(!out.status.success(), "{}", out.report());
        let expected = format!("nixpush: error: LISTEN_FDS=1, but {what}");
        assert!(
            out.stderr.starts_with(&expected) && out.stderr.contains(hint),
            "expected {expected:?} and how to fix it: {}",
            out.report()
        );
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.report());
        assert!(
            !setup.socket.exists(),
            "the daemon went on after refusing fd 3: {}",
            out.report()
        );
    }
}

/// Whether `program` can be run at all.
fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    if !on_path("systemd-analyze") {
        eprintln!("systemd-analyze is not installed; skipping");
        return;
    }
    let dir = tmp();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let mut rewritten = false;
    for unit in ["nixpush.service", "nixpush.socket"] {
        let text = fs::read_to_string(units.join(unit)).expect("unit file");
        let text: String = text
            .lines()
            .map(|l| match l.strip_prefix("ExecStart=") {
                Some(cmd) => {
                    let args = cmd.split_once(' ').map_or("", |(_, a)| a);
                    rewritten = true;
                    format!("ExecStart={} {args}\n", &*NIXPUSH)
                }
                None => format!("{l}\n"),
            })
            .collect();
        fs::write(dir.path().join(unit), text).expect("write unit");
    }
    assert!(rewritten, "no ExecStart= in nixpush.service");
    let mut cmd = Command::new("systemd-analyze");
    cmd.current_dir(dir.path()).arg("verify");
    // Documentation=man:… links are checked with man(1), where there is one.
    if !on_path("man") {
        cmd.arg("--man=no");
    }
    let out = run(cmd.args(["./nixpush.service", "./nixpush.socket"]));
    assert!(out.status.success(), "{}", out.report());
    // Warnings (unknown keys, bad values) do not change the exit code; they name the unit.
    assert!(
        !out.stderr.contains("nixpush"),
        "systemd-analyze warns about the units: {}",
        out.report()
    );
}
