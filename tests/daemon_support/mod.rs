//! Helpers for the daemon tests: a temporary set-up (keys, config, cache, queue, socket), a
//! running `nixpush daemon` killed by its own PID when dropped, socket requests, queue entries
//! written by hand, and a check of the cache invariant that a reader never sees a narinfo whose
//! NAR or references are missing.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::common::*;

/// How long anything in these tests may take before it counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// A fresh temporary directory, removed when dropped.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nixpush-daemon-test-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// Poll `cond` every 50 ms until it holds; panic with `what()` after `timeout`.
pub fn wait_until(timeout: Duration, what: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?}: {}",
            what()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temporary directory with a signing key, a config file, and room for the cache, the queue
/// and the socket.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub keys: KeyPair,
    pub cache: PathBuf,
    pub queue: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Setup {
    /// `daemon_extra` goes into the `[daemon]` table (e.g. `batch-entries = 4`).
    pub fn new(daemon_extra: &str) -> Self {
        let dir = tmp();
        let keys = nixpush_keygen(dir.path(), "daemon-test-1");
        let s = Self {
            cache: dir.path().join("cache"),
            queue: dir.path().join("queue"),
            socket: dir.path().join("run/nixpush.sock"),
            config: dir.path().join("config.toml"),
            log: dir.path().join("daemon.log"),
            keys,
            dir,
        };
        fs::write(&s.config, s.config_text(daemon_extra)).expect("write config");
        s
    }

    pub fn config_text(&self, daemon_extra: &str) -> String {
        format!(
            r#"# written by the daemon tests
cache = "file://{cache}"
key-files = ["{key}"]
socket = "{socket}"
queue-dir = "{queue}"
log-level = "nixpush=debug"

[daemon]
rescan-interval-secs = 1
retry-max-delay-secs = 2
shutdown-grace-secs = 3
{daemon_extra}

[hook]
timeout-ms = 2000
"#,
            cache = self.cache.display(),
            key = self.keys.secret.display(),
            socket = self.socket.display(),
            queue = self.queue.display(),
        )
    }

    /// `nixpush daemon --config CONFIG`, its stderr appended to the log.
    pub fn daemon_command(&self) -> Command {
        let mut c = nixpush();
        c.arg("daemon").arg("--config").arg(&self.config);
        for v in ["NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "WATCHDOG_USEC"] {
            c.env_remove(v);
        }
        c
    }

    /// Start the daemon and wait until it answers on its socket.
    pub fn start(&self) -> Daemon {
        self.start_with(self.daemon_command())
    }

    pub fn start_with(&self, cmd: Command) -> Daemon {
        let mut d = Daemon::spawn(cmd, &self.log);
        d.wait_answering(&self.socket);
        d
    }

    /// The daemon's answer to `msg` on its socket.
    pub fn request(&self, msg: &[u8]) -> serde_json::Value {
        request(&self.socket, msg)
    }

    /// Enqueue `items` over the socket; the entry name.
    pub fn enqueue(&self, items: &[String]) -> String {
        let msg = serde_json::json!({"op": "enqueue", "items": items}).to_string();
        let r = self.request(msg.as_bytes());
        assert_eq!(r["result"], "queued", "enqueue {items:?}: {r}");
        r["entry"].as_str().expect("entry name").to_owned()
    }

    /// `nixpush status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = run_ok(
            nixpush()
                .args(["status", "--json", "--config"])
                .arg(&self.config),
        );
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.report()))
    }

    /// Entries waiting in the queue directory (not dot-files, not `rejected/`).
    pub fn queued(&self) -> Vec<String> {
        dir_names(&self.queue, |n| !n.starts_with('.') && n != "rejected")
    }

    /// Names in `queue/rejected/`.
    pub fn rejected(&self) -> Vec<String> {
        dir_names(&self.queue.join("rejected"), |_| true)
    }

    /// Write a queue entry as a careful writer does (dot-file, then rename).
    pub fn write_entry(&self, name: &str, text: &str) {
        fs::create_dir_all(&self.queue).expect("queue dir");
        let tmp = self.queue.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).expect("write entry");
        fs::rename(&tmp, self.queue.join(name)).expect("rename entry");
    }

    /// Whether every one of `paths` has a narinfo in the cache.
    pub fn published(&self, paths: &[String]) -> bool {
        paths.iter().all(|p| {
            self.cache
                .join(format!("{}.narinfo", hash_part(p)))
                .is_file()
        })
    }

    /// Wait until every one of `paths` is published and the queue is empty.
    pub fn wait_published(&self, paths: &[String], daemon: &Daemon) {
        wait_until(
            PATIENCE,
            || {
                format!(
                    "waiting for {} paths to be published and the queue to empty; queue: {:?}; \
                     missing: {:?}\n--- daemon log:\n{}",
                    paths.len(),
                    self.queued(),
                    paths
                        .iter()
                        .filter(|p| !self.published(std::slice::from_ref(p)))
                        .collect::<Vec<_>>(),
                    daemon.log_tail()
                )
            },
            || self.published(paths) && self.queued().is_empty(),
        );
    }

    /// Real Nix substitutes `paths` from the cache into a fresh store, signatures required; the
    /// NARs it unpacked are the ones in the local store.
    pub fn nix_substitutes(&self, paths: &[String]) {
        let root = tmp();
        let out = run(&mut nix_copy_cmd(
            &self.cache,
            root.path(),
            &self.keys.public_key(),
            paths,
        ));
        assert!(
            out.status.success(),
            "Nix cannot substitute: {}",
            out.report()
        );
        for p in paths {
            assert!(
                present_in_root(root.path(), p),
                "{p} not in the fresh store after nix copy: {}",
                out.report()
            );
        }
        // Nix checked every NarHash against the signed narinfos while unpacking; compare the
        // result with the local store once more, through Nix.
        let fresh = nix_path_info(Some(&root.path().display().to_string()), paths);
        let local = nix_path_info(None, paths);
        for (p, info) in &local {
            let f = fresh
                .get(p)
                .unwrap_or_else(|| panic!("{p} missing in the fresh store"));
            assert_eq!(f.nar_hash, info.nar_hash, "{p}");
            assert_eq!(f.references, info.references, "{p}");
        }
    }
}

/// One request on the daemon's socket; the answer, parsed.
pub fn request(socket: &Path, msg: &[u8]) -> serde_json::Value {
    let stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // Written from another thread: the daemon may answer (and stop reading) before a big
    // message is all written.
    let mut w = stream.try_clone().expect("clone");
    let msg = msg.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&msg);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("no answer from the daemon: {e}"));
    writer.join().expect("writer thread");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("unreadable answer {line:?}: {e}"))
}

/// A running `nixpush daemon`, killed (SIGKILL, by its PID) when dropped.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(mut cmd: Command, log: &Path) -> Self {
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(&cmd)));
        Self {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Panic (with the log) if the daemon has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "the daemon exited ({status})\n--- log:\n{}",
                self.log_tail()
            );
        }
    }

    /// Wait until a connection to `socket` succeeds.
    pub fn wait_answering(&mut self, socket: &Path) {
        let start = Instant::now();
        loop {
            if UnixStream::connect(socket).is_ok() {
                return;
            }
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "the daemon exited ({status}) before listening on {}\n--- log:\n{}",
                    socket.display(),
                    self.log_tail()
                );
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the daemon is not listening on {} after {PATIENCE:?}\n--- log:\n{}",
                socket.display(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, and reap it.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9 the daemon");
        child.wait().expect("wait");
    }

    /// SIGTERM; wait for the exit (at most `timeout`).
    pub fn terminate(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = i32::try_from(child.id()).expect("pid");
        // Plain signal delivery to our own child, by its PID.
        assert_eq!(
            run(Command::new("kill").args(["-TERM", &pid.to_string()]))
                .status
                .code(),
            Some(0)
        );
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within {timeout:?} of SIGTERM\n--- log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

pub fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run `cmd`, killing it (by its PID) if it has not exited after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Out {
    let command = describe(cmd);
    let dir = tmp();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&o).expect("out"))
        .stderr(fs::File::create(&e).expect("err"))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run `{command}`: {err}"));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{command}` still running after {timeout:?}; stderr:\n{}",
                fs::read_to_string(&e).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        status,
        stdout: fs::read_to_string(&o).unwrap_or_default(),
        stderr: fs::read_to_string(&e).unwrap_or_default(),
        command,
    }
}

/// Set a file's modification time `age` into the past (without following symlinks is not
/// needed: only regular files get this).
pub fn age_file(path: &Path, age: Duration) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.set_modified(SystemTime::now() - age).expect("set mtime");
}

// ---------------------------------------------------------------------------------------------
// The cache invariant.

/// A narinfo, parsed here on its own terms.
#[derive(Debug)]
pub struct Narinfo {
    pub store_path: String,
    pub url: String,
    pub file_size: Option<u64>,
    /// Base names.
    pub references: Vec<String>,
    pub sigs: Vec<String>,
}

pub fn parse_narinfo(text: &str) -> Result<Narinfo, String> {
    let mut fields: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in text.lines() {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("line without a colon: {line:?}"))?;
        fields.entry(k).or_default().push(v.trim_start());
    }
    let one = |k: &str| -> Result<String, String> {
        match fields.get(k).map(Vec::as_slice) {
            Some([v]) => Ok((*v).to_owned()),
            other => Err(format!("{k}: expected one value, got {other:?}")),
        }
    };
    let references = match fields.get("References").map(Vec::as_slice) {
        None => Vec::new(),
        Some([v]) => v.split_whitespace().map(str::to_owned).collect(),
        Some(v) => return Err(format!("References repeated: {v:?}")),
    };
    Ok(Narinfo {
        store_path: one("StorePath")?,
        url: one("URL")?,
        file_size: fields
            .get("FileSize")
            .map(|v| v[0].parse().map_err(|e| format!("FileSize: {e}")))
            .transpose()?,
        references,
        sigs: fields
            .get("Sig")
            .map(|v| v.iter().map(|s| (*s).to_owned()).collect())
            .unwrap_or_default(),
    })
}

/// Check that every narinfo in `cache` is signed, matches its file name, has its NAR file (of
/// the size it says) and the narinfos of all its references. The store paths published.
pub fn check_cache_invariant(cache: &Path) -> Result<BTreeSet<String>, String> {
    let mut published = BTreeSet::new();
    let names = narinfo_files(cache);
    let present: BTreeSet<&str> = names
        .iter()
        .map(|n| n.trim_end_matches(".narinfo"))
        .collect();
    for name in &names {
        let file = cache.join(name);
        let text = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let ni = parse_narinfo(&text).map_err(|e| format!("{name}: {e}\n{text}"))?;
        let hash = name.trim_end_matches(".narinfo");
        if hash_part(&ni.store_path) != hash {
            return Err(format!("{name} is for {}", ni.store_path));
        }
        if ni.sigs.is_empty() {
            return Err(format!("{name} is not signed:\n{text}"));
        }
        let nar = cache.join(&ni.url);
        let meta = fs::metadata(&nar)
            .map_err(|e| format!("{name}: its NAR {} is missing: {e}", ni.url))?;
        if !meta.is_file() {
            return Err(format!("{name}: its NAR {} is not a file", ni.url));
        }
        if let Some(size) = ni.file_size {
            if meta.len() != size {
                return Err(format!(
                    "{name}: its NAR {} is {} bytes, the narinfo says {size}",
                    ni.url,
                    meta.len()
                ));
            }
        }
        for r in &ni.references {
            if r.len() < 32 || !present.contains(&r[..32]) {
                return Err(format!(
                    "{name} ({}) refers to {r}, whose narinfo is missing",
                    ni.store_path
                ));
            }
        }
        published.insert(ni.store_path);
    }
    Ok(published)
}

/// The `nix-store -qR` closure of several paths, sorted and deduplicated.
pub fn closure_of_all(paths: &[String]) -> Vec<String> {
    let mut all = BTreeSet::new();
    for p in paths {
        all.extend(closure_of(p));
    }
    all.into_iter().collect()
}

/// `nix-store -q --deriver`.
pub fn deriver_of(path: &str) -> String {
    let out = run_ok(Command::new("nix-store").args(["-q", "--deriver", path]));
    let d = out.stdout.trim().to_owned();
    assert!(d.ends_with(".drv"), "{}", out.report());
    d
}

/// Store paths of `builtins.toFile` attributes of `expr` (evaluating adds them to the store).
pub fn nix_eval_paths(expr: &str, salt: &str, attr: &str) -> Vec<String> {
    let out = run_ok(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "--read-write-mode"])
            .args(["--expr", expr, "--argstr", "salt", salt, "-A", attr]),
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.report()))
}
