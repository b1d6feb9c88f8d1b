//! Slow and hostile clients of the daemon's socket cannot delay a post-build-hook: with
//! hundreds of idle, half-sent and trickling connections open (and more arriving), each hook is
//! acknowledged by the daemon itself; where the daemon cannot take a connection at all (its
//! listen queue full), the hook falls back to the queue directory within its timeout. The
//! daemon tells the connections it closes why.
//!
//! Timings are printed, never asserted tightly: benchmarks are not tests (`bench/run --only
//! hook` has the figure with 500 idle connections).

mod common;
mod daemon_support;

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use daemon_support::*;

/// Connections a crowd keeps open without sending anything: with the others, more than the
/// daemon lets wait (`server::MAX_WAITING`, 512, or fewer under a low descriptor limit).
const IDLE: usize = 500;
const HALF_LINES: usize = 20;
const TRICKLERS: usize = 10;

const FILES_NIX: &str = r#"
{ salt }:
{ files = map (n: builtins.toFile "np-crowd-${toString n}" "crowd ${toString n} ${salt}\n")
    [ 1 2 3 4 5 6 ]; }
"#;

/// `nixpush-hook`, the program nix.conf names, with `OUT_PATHS` and the config of `setup`.
fn hook(setup: &Setup, out_paths: &str) -> (Out, Duration) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nixpush-hook"));
    c.env("NIXPUSH_CONFIG", &setup.config)
        .env("OUT_PATHS", out_paths)
        .env_remove("DRV_PATH");
    let start = Instant::now();
    let out = run_with_timeout(&mut c, Duration::from_secs(60));
    (out, start.elapsed())
}

fn connect(socket: &Path) -> UnixStream {
    UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()))
}

/// Read what the daemon says to a connection before closing it (at most `timeout`).
fn read_to_close(mut s: UnixStream, timeout: Duration) -> String {
    s.set_read_timeout(Some(timeout)).expect("timeout");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// A crowd of hostile connections, kept up by threads until dropped: `IDLE` idle ones
/// (reopened as the daemon closes them), `HALF_LINES` that send half a request and stop, and
/// `TRICKLERS` that send a byte every 50 ms and never finish.
struct Crowd {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Crowd {
    fn start(socket: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            // Idle and half-sent: all opened at once, then renewed in waves, so that the
            // daemon always has more than it lets wait.
            let (socket, stop) = (socket.to_owned(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut held: Vec<UnixStream> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if held.len() >= IDLE + HALF_LINES {
                        held.drain(..(IDLE + HALF_LINES) / 4);
                    }
                    while held.len() < IDLE + HALF_LINES {
                        let Ok(mut s) = UnixStream::connect(&socket) else {
                            break;
                        };
                        if held.len() % (IDLE / HALF_LINES) == 0 {
                            let _ = s.write_all(br#"{"op":"enqueue","items":["/nix/st"#);
                        }
                        held.push(s);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }));
        }
        for _ in 0..TRICKLERS {
            let (socket, stop) = (socket.to_owned(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = UnixStream::connect(&socket) else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    for b in br#"{"op":"status"       "#.iter().cycle() {
                        if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn hooks_are_acknowledged_through_a_crowd_of_idle_half_sent_and_trickling_connections() {
    let setup = Setup::new("");
    let mut daemon = setup.start();
    let files = nix_eval_paths(FILES_NIX, &unique("crowd"), "files");
    assert_eq!(files.len(), 6);

    // The first connection of all, idle: the oldest when the crowd arrives.
    let first = connect(&setup.socket);
    let crowd = Crowd::start(&setup.socket);
    std::thread::sleep(Duration::from_millis(500));
    let mut took = Vec::new();
    for f in &files[..5] {
        let (out, t) = hook(&setup, f);
        took.push(t);
        assert!(out.status.success(), "{}", out.report());
        // The fallback always says so ("daemon not reachable ...; queued as ..."); through the
        // socket the hook is silent.
        assert!(
            out.stderr.is_empty(),
            "the hook should have been acknowledged by the daemon, not fallen back: {}\n\
             --- daemon log:\n{}",
            out.report(),
            daemon.log_tail()
        );
    }
    eprintln!("hook wall times with the crowd connected: {took:?}");
    let closed_first = read_to_close(first, PATIENCE);
    drop(crowd);
    daemon.assert_running();
    assert!(
        closed_first.contains("connections were waiting to send a request and this was the oldest")
            && closed_first.contains("send the request as soon as you connect"),
        "the oldest waiting connection should have been shed, told why: {closed_first:?}"
    );

    // A half-sent request on its own is closed after the request deadline, told why.
    let mut half = connect(&setup.socket);
    half.write_all(br#"{"op":"enqueue","#).expect("write");
    let said = read_to_close(half, PATIENCE);
    assert!(
        said.contains("no complete request within 2 s of connecting")
            && said.contains("send one JSON line as soon as you connect"),
        "{said:?}"
    );

    // Everything acknowledged was queued and is published; the daemon still serves.
    setup.wait_published(&files[..5], &daemon);
    setup.enqueue(&files[5..]);
    setup.wait_published(&files, &daemon);
    assert_eq!(setup.status()["rejected"], 0);
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
}

/// A listening socket that never accepts, with the shortest listen queue, filled; the
/// connections that fill it.
fn never_accepting_listener(path: &Path) -> (rustix::fd::OwnedFd, Vec<rustix::fd::OwnedFd>) {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock = |flags| {
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)
            .expect("socket")
    };
    fs::create_dir_all(path.parent().expect("socket dir")).expect("mkdir");
    let addr = SocketAddrUnix::new(path).expect("address");
    let listener = sock(SocketFlags::CLOEXEC);
    rustix::net::bind(&listener, &addr).expect("bind");
    rustix::net::listen(&listener, 0).expect("listen");
    fill_listen_queue(path)
        .map(|fill| (listener, fill))
        .expect("fill")
}

/// Connect without blocking until the listen queue of `path` is full; the connections.
fn fill_listen_queue(path: &Path) -> std::io::Result<Vec<rustix::fd::OwnedFd>> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path)?;
    let mut held = Vec::new();
    loop {
        let s = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        match rustix::net::connect(&s, &addr) {
            Ok(()) => held.push(s),
            Err(rustix::io::Errno::AGAIN) => return Ok(held),
            Err(e) => return Err(e.into()),
        }
        assert!(held.len() < 100_000, "the listen queue never fills");
    }
}

fn with_hook_timeout(setup: &Setup, ms: u64) {
    let text = setup
        .config_text("")
        .replace("timeout-ms = 2000", &format!("timeout-ms = {ms}"));
    assert!(text.contains(&format!("timeout-ms = {ms}")));
    fs::write(&setup.config, text).expect("config");
}

/// The hook fell back to the queue directory, for `path`, saying why in `why`.
fn assert_fell_back(setup: &Setup, out: &Out, took: Duration, path: &str, why: &str) {
    assert!(out.status.success(), "{}", out.report());
    assert!(
        out.stderr.contains("daemon not reachable")
            && out.stderr.contains(why)
            && out.stderr.contains("queued as"),
        "{}",
        out.report()
    );
    // The timeout is 300 ms; a debug build's start-up and the queue write are the rest.
    assert!(
        took < Duration::from_secs(3),
        "the hook took {took:?}, with a timeout of 300 ms: {}",
        out.report()
    );
    let queued: Vec<String> = setup
        .queued()
        .iter()
        .map(|e| fs::read_to_string(setup.queue.join(e)).expect("entry"))
        .collect();
    assert!(
        queued.iter().any(|t| t.trim() == path),
        "no queue entry for {path}: {queued:?}"
    );
}

#[test]
fn hook_falls_back_within_its_timeout_when_no_one_accepts() {
    let setup = Setup::new("");
    with_hook_timeout(&setup, 300);
    let (_listener, _fill) = never_accepting_listener(&setup.socket);
    let path = format!("{}/33333333333333333333333333333333-np-never", store_dir());
    let (out, took) = hook(&setup, &path);
    eprintln!("the hook took {took:?} against a full listen queue");
    assert_fell_back(
        &setup,
        &out,
        took,
        &path,
        &format!(
            "{}: the daemon did not take the connection within 300 ms (its listen queue is full)",
            setup.socket.display()
        ),
    );
}

#[test]
fn hook_falls_back_when_the_daemons_listen_queue_is_full_and_not_after() {
    let setup = Setup::new("");
    with_hook_timeout(&setup, 300);
    let files = nix_eval_paths(FILES_NIX, &unique("full-queue"), "files");
    let mut daemon = setup.start();
    let pid = daemon.pid().to_string();
    // Stopped, the daemon accepts nothing: its listen queue fills.
    run_ok(Command::new("kill").args(["-STOP", &pid]));
    let fill = fill_listen_queue(&setup.socket);
    let fell_back = match &fill {
        Ok(_) => Ok(hook(&setup, &files[0])),
        Err(e) => Err(e.to_string()),
    };
    run_ok(Command::new("kill").args(["-CONT", &pid]));
    let fill = fill.expect("fill the listen queue");
    let (out, took) = fell_back.expect("hook");
    eprintln!(
        "the hook took {took:?} against the daemon's full listen queue ({} connections)",
        fill.len()
    );
    assert_fell_back(
        &setup,
        &out,
        took,
        &files[0],
        "the daemon did not take the connection within 300 ms (its listen queue is full)",
    );

    // Resumed, with all those connections still open and idle, it takes the next hook itself.
    std::thread::sleep(Duration::from_millis(500));
    let (out, took) = hook(&setup, &files[1]);
    eprintln!("and {took:?} once the daemon runs again");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "acknowledged by the daemon: {}\n--- daemon log:\n{}",
        out.report(),
        daemon.log_tail()
    );
    drop(fill);
    setup.wait_published(&files[..2], &daemon);
    daemon.assert_running();
}

/// With few descriptors (a low `ulimit -n`), the daemon lets fewer connections wait, so that a
/// crowd of idle ones cannot take the descriptors a hook's request needs (its connection, its
/// queue entry): it closes the oldest rather than stop accepting or fail the write.
#[test]
fn with_few_descriptors_fewer_connections_wait_and_a_hook_still_lands() {
    let setup = Setup::new("");
    let files = nix_eval_paths(FILES_NIX, &unique("few-fds"), "files");
    let inner = setup.daemon_command();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -n 96 && exec \"$0\" \"$@\""])
        .arg(inner.get_program())
        .args(inner.get_args());
    for v in ["NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "WATCHDOG_USEC"] {
        cmd.env_remove(v);
    }
    let mut daemon = setup.start_with(cmd);
    // More than the daemon has descriptors for, all idle (within the request deadline).
    let crowd: Vec<UnixStream> = (0..150).map(|_| connect(&setup.socket)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (out, took) = hook(&setup, &files[0]);
    eprintln!("the hook took {took:?} with the daemon out of descriptors");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "acknowledged by the daemon: {}\n--- daemon log:\n{}",
        out.report(),
        daemon.log_tail()
    );
    let log = fs::read_to_string(&setup.log).expect("log");
    assert!(
        log.contains("the descriptor limit lets at most 16 connections wait for their request")
            && log.contains(
                "too many connections are waiting to send their request; closing the oldest"
            ),
        "the daemon should have lowered its limit and shed: {}",
        daemon.log_tail()
    );
    drop(crowd);
    setup.wait_published(&files[..1], &daemon);
    daemon.assert_running();
}
