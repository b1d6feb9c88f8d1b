//! A cache that fails part of the time, and one that throttles: the real `nixpush daemon` and
//! `nixpush push` through the fault-injecting proxy (`backends/tests/support/fault_proxy.rs`)
//! in front of SeaweedFS (S3) and nginx (HTTP PUT).
//! - Through about 20% of injected faults (500, 503, resets, timeouts, truncated and stalled
//!   answers, a seeded mix), a daemon publishes every path; `nixpush verify --deep` (S3) or the
//!   files' hashes (nginx) find nothing partial or corrupt; real Nix substitutes everything
//!   with `require-sigs = true`, straight from the server.
//! - A store that throttles (429, 503 SlowDown with `Retry-After`) is given its pause and
//!   fewer requests at once, as the proxy's records show.
//!
//! Timeouts and stalls hold a connection for 6 s; `NIXPUSH_REQUEST_TIMEOUT_SECS=3` makes
//! nixpush give up on one after 3 s.

#![cfg(all(feature = "s3", feature = "http"))]

mod common;
mod daemon_support;

#[path = "../backends/tests/support/testbeds.rs"]
mod testbeds;

#[path = "../backends/tests/support/fault_proxy.rs"]
mod fault_proxy;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use daemon_support::{Daemon, wait_until};
use fault_proxy::{Fault, FaultProxy, Record};

const BUCKET: &str = testbeds::PUBLIC_BUCKETS[0];

/// Paths the daemon publishes through the faults into S3 (the issue asks for 200; the run
/// takes about a minute here, most of it waiting out injected timeouts).
const S3_PATHS: usize = 200;
/// The same through nginx, a smaller run: no listing, so every presence check is a HEAD.
const HTTP_PATHS: usize = 60;
/// The seed of the fault mix: the same faults for the same request numbers on every run.
const SEED: u64 = 14;
/// Percent of requests that get a fault.
const FAULT_PERCENT: u64 = 20;

/// `n` paths: 10 small libraries, 2 incompressible 12 MB files (multipart uploads on S3), and
/// `n - 12` small applications referring to two libraries each. The roots are the
/// applications and the big files.
const MANY_NIX: &str = concat!(
    "{ salt, n }:\nlet\n",
    nix_mk!(),
    r#"  libs = builtins.genList (i: mk "np-flib-${toString i}" ''
    { printf 'lib ${toString i} %s\n' "$salt"; seq 1 ${toString (300 * (i + 1))}; } > $out
  '') 10;
  lib = i: builtins.elemAt libs (i - (i / 10) * 10);
  bigs = builtins.genList (i: mk "np-fbig-${toString i}" ''
    { printf 'big ${toString i} %s\n' "$salt"; head -c 12000000 /dev/urandom; } > $out
  '') 2;
  apps = builtins.genList (i: mk "np-fapp-${toString i}" ''
    { printf 'app ${toString i} %s\n' "$salt"; echo ${lib i}; echo ${lib (i + 3)}; } > $out
  '') (n - 12);
in { roots = apps ++ bigs; }
"#
);

/// Build [`MANY_NIX`] for `n` paths; the roots, and every path of their closures.
fn build_many(n: usize) -> (Vec<String>, Vec<String>) {
    let (roots, out) = nix_build_expr(
        MANY_NIX,
        &unique("faults"),
        &["roots"],
        &["--arg", "n", &n.to_string(), "--max-jobs", "4"],
    );
    assert_eq!(roots.len(), n - 10, "{}", out.report());
    let mut all = BTreeSet::new();
    let out = run_ok(
        Command::new("nix-store")
            .args(["--query", "--requisites"])
            .args(&roots),
    );
    all.extend(out.stdout.lines().map(str::to_owned));
    assert_eq!(all.len(), n, "{}", out.report());
    (roots, all.into_iter().collect())
}

/// `nixpush` with the S3 test keys, and short request timeouts.
fn nixpush_s3() -> Command {
    let mut c = nixpush_with_s3_keys(testbeds::S3_ACCESS_KEY, testbeds::S3_SECRET_KEY);
    c.env("NIXPUSH_REQUEST_TIMEOUT_SECS", "3");
    c
}

/// A daemon's files: config, queue, socket, log.
struct DaemonDir {
    config: PathBuf,
    queue: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl DaemonDir {
    /// A config publishing to `cache`, signed with `key`, retrying quickly, with `jobs`.
    fn new(dir: &Path, name: &str, cache: &str, key: &Path, jobs: usize) -> Self {
        let d = dir.join(name);
        fs::create_dir_all(&d).expect("mkdir");
        let s = Self {
            config: d.join("config.toml"),
            queue: d.join("queue"),
            socket: d.join("nixpush.sock"),
            log: d.join("daemon.log"),
        };
        fs::write(
            &s.config,
            format!(
                "cache = \"{cache}\"\nkey-files = [\"{}\"]\nsocket = \"{}\"\nqueue-dir = \"{}\"\n\
                 log-level = \"nixpush=debug,nixpush_backends=debug\"\njobs = {jobs}\n\
                 [daemon]\nrescan-interval-secs = 1\nretry-max-delay-secs = 2\n\
                 shutdown-grace-secs = 5\n",
                key.display(),
                s.socket.display(),
                s.queue.display()
            ),
        )
        .expect("write config");
        s
    }

    /// Write one queue entry per chunk of `roots` (dot-file, then rename).
    fn enqueue(&self, roots: &[String], per_entry: usize) {
        fs::create_dir_all(&self.queue).expect("queue dir");
        for (i, chunk) in roots.chunks(per_entry).enumerate() {
            let tmp = self.queue.join(format!(".entry-{i}.tmp"));
            fs::write(&tmp, chunk.join("\n") + "\n").expect("write entry");
            fs::rename(&tmp, self.queue.join(format!("entry-{i}"))).expect("rename entry");
        }
    }

    fn queued(&self) -> Vec<String> {
        dir_names(&self.queue, |n| !n.starts_with('.') && n != "rejected")
    }

    fn rejected(&self) -> Vec<String> {
        dir_names(&self.queue.join("rejected"), |_| true)
    }

    /// Start the daemon with `cmd`, wait until its queue is empty (with nothing rejected), stop
    /// it; how long that took.
    fn run_until_drained(&self, cmd: Command) -> Duration {
        let started = Instant::now();
        let daemon = self.start(cmd);
        wait_until(
            Duration::from_secs(240),
            || {
                format!(
                    "queue {:?}, rejected {:?}\n--- daemon log:\n{}",
                    self.queued(),
                    self.rejected(),
                    daemon.log_tail()
                )
            },
            || self.queued().is_empty(),
        );
        let took = started.elapsed();
        daemon.terminate(Duration::from_secs(30));
        assert!(
            self.rejected().is_empty(),
            "rejected: {:?}",
            self.rejected()
        );
        took
    }

    fn start(&self, mut cmd: Command) -> Daemon {
        cmd.arg("daemon").arg("--config").arg(&self.config);
        for v in ["NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "WATCHDOG_USEC"] {
            cmd.env_remove(v);
        }
        let mut d = Daemon::spawn(cmd, &self.log);
        d.wait_answering(&self.socket);
        d
    }
}

/// The keys below `prefix/` in the public bucket, read straight from SeaweedFS.
fn bucket_keys(sw: &testbeds::SeaweedFs, prefix: &str) -> BTreeSet<String> {
    let (status, body) = testbeds::http_request(
        sw.s3_port,
        "GET",
        &format!("/{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}/"),
        "",
    );
    assert_eq!(status, 200, "listing: {body}");
    assert!(
        !body.contains("<IsTruncated>true</IsTruncated>"),
        "listing truncated"
    );
    body.split("<Key>")
        .skip(1)
        .filter_map(|e| e.split("</Key>").next())
        .map(|k| {
            k.strip_prefix(&format!("{prefix}/"))
                .unwrap_or(k)
                .to_owned()
        })
        .collect()
}

/// What the faults were, by kind, and that the mix is what it claims.
fn check_fault_mix(records: &[Record]) {
    let faulty = records.iter().filter(|r| r.fault != Fault::Pass).count();
    let share = faulty as f64 / records.len() as f64;
    eprintln!(
        "proxy: {} requests, {faulty} with a fault ({:.0}%): {}",
        records.len(),
        share * 100.0,
        fault_proxy::tally(records)
    );
    assert!(
        (0.12..0.28).contains(&share),
        "{faulty} faults in {} requests",
        records.len()
    );
    for kind in ["500", "503", "reset", "timeout", "truncate", "stall"] {
        assert!(
            records.iter().any(|r| r.fault.to_string() == kind),
            "no {kind} fault was injected: {}",
            fault_proxy::tally(records)
        );
    }
}

#[test]
fn a_daemon_publishes_everything_through_a_faulty_s3() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "faults-s3.example.org-1");
    let (roots, all) = build_many(S3_PATHS);
    let proxy = FaultProxy::start(
        sw.s3_port,
        fault_proxy::seeded_mix(SEED, FAULT_PERCENT),
        fault_proxy::Options::default(),
        &tmp.path().join("proxy.log"),
    );
    let prefix = unique("faults");
    let through_proxy = format!(
        "s3://{BUCKET}/{prefix}?endpoint={}&region={}",
        proxy.endpoint(),
        testbeds::S3_REGION
    );
    let d = DaemonDir::new(tmp.path(), "d", &through_proxy, &keys.secret, 4);
    d.enqueue(&roots, 19);
    let took = d.run_until_drained(nixpush_s3());
    let records = proxy.records();
    check_fault_mix(&records);
    let log = fs::read_to_string(&d.log).unwrap_or_default();
    eprintln!(
        "published {} paths through the faults in {:.1}s; {} retried requests in the daemon's log, \
         {} failed passes",
        all.len(),
        took.as_secs_f64(),
        log.matches("retrying").count(),
        log.matches("will retry").count()
    );

    // Every path is there, straight from the server.
    let keys_in_bucket = bucket_keys(sw, &prefix);
    for p in &all {
        let k = format!("{}.narinfo", hash_part(p));
        assert!(keys_in_bucket.contains(&k), "no narinfo for {p}");
    }
    // Nothing partial or corrupt: every NAR read back and checked against its narinfo.
    let direct = sw.address(BUCKET, &prefix);
    let verify = run_ok(
        nixpush_s3()
            .arg("verify")
            .arg(&direct)
            .args(["--deep", "--json", "--trusted-key"])
            .arg(&keys.public),
    );
    let report: serde_json::Value =
        serde_json::from_str(&verify.stdout).unwrap_or_else(|e| panic!("{e}: {}", verify.report()));
    assert_eq!(report["whole"], true, "{}", verify.report());
    assert_eq!(report["narinfos"], all.len(), "{}", verify.report());
    assert_eq!(report["nars_read"], all.len(), "{}", verify.report());
    assert_eq!(
        report["problems"],
        serde_json::json!([]),
        "{}",
        verify.report()
    );

    // Real Nix substitutes it all, checking every signature and hash.
    nix_substitutes_from(
        &format!("{}/{BUCKET}/{prefix}", sw.endpoint()),
        &tmp.path().join("root"),
        &keys.public_key(),
        &roots,
        &all,
    );
}

#[test]
fn a_daemon_publishes_everything_through_a_faulty_http_cache() {
    let Some(ngx) = testbeds::nginx() else { return };
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "faults-http.example.org-1");
    let (roots, all) = build_many(HTTP_PATHS);
    let proxy = FaultProxy::start(
        ngx.port,
        fault_proxy::seeded_mix(SEED + 1, FAULT_PERCENT),
        fault_proxy::Options::default(),
        &tmp.path().join("proxy.log"),
    );
    let path = unique("faults-http");
    let token = tmp.path().join("token");
    fs::write(&token, testbeds::HTTP_TOKEN).expect("token");
    let through_proxy = format!("{}/{path}?token-file={}", proxy.endpoint(), token.display());
    let d = DaemonDir::new(tmp.path(), "d", &through_proxy, &keys.secret, 4);
    d.enqueue(&roots, 10);
    let mut cmd = nixpush();
    cmd.env("NIXPUSH_REQUEST_TIMEOUT_SECS", "3");
    let took = d.run_until_drained(cmd);
    let records = proxy.records();
    check_fault_mix(&records);
    eprintln!(
        "published {} paths through the faults into nginx in {:.1}s",
        all.len(),
        took.as_secs_f64()
    );

    // Every NAR on the server's disk is whole: its sha256 is the FileHash of its narinfo.
    let served = ngx.root.join(&path);
    let mut files = Vec::new();
    let mut want = Vec::new();
    for p in &all {
        let ni = RawNarInfo::read(&served, p);
        files.push(served.join(ni.one("URL")));
        want.push(ni.one("FileHash").to_owned());
    }
    assert_eq!(nix_hash_files(&files), want);
    // No temporary or partial file left in the cache's folders.
    let names: BTreeSet<String> = dir_names(&served.join("nar"), |_| true)
        .into_iter()
        .collect();
    let named: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names, named,
        "the nar/ folder holds more than the NARs named"
    );

    nix_substitutes_from(
        &ngx.url(&path),
        &tmp.path().join("root"),
        &keys.public_key(),
        &roots,
        &all,
    );
}

// ---------------------------------------------------------------------------------------------
// Throttling: the proxy answers three requests in a row, once uploads are in full swing, with
// 429 or 503 SlowDown and `Retry-After: 2`; every other request is forwarded after 400 ms (a
// slow store, so that requests overlap). Nixpush must send nothing during those 2 s, and then
// fewer requests at once than before.

const RETRY_AFTER: u64 = 2;
const THROTTLE_LATENCY: Duration = Duration::from_millis(400);

/// Push 72 paths (`--jobs 8`) to the cache `to(proxy endpoint)` through a proxy in front of
/// 127.0.0.1:`upstream` that throttles requests `first` to `first + 2` (429, then 503
/// SlowDown, each with `Retry-After: 2`) and forwards every other one after 400 ms; check
/// the pause and the lowered concurrency in the proxy's records. The paths pushed.
fn throttled_push(
    upstream: u16,
    first: u64,
    to: impl FnOnce(&str) -> String,
    mut cmd: Command,
) -> Vec<String> {
    const LATENCY: Duration = THROTTLE_LATENCY;
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "throttle.example.org-1");
    let (roots, all) = build_many(72);
    let plan: fault_proxy::Plan = Box::new(move |seq, _| match seq {
        s if s == first => Fault::Status {
            status: 429,
            code: "SlowDown",
            retry_after: Some(RETRY_AFTER),
        },
        s if s > first && s < first + 3 => Fault::Status {
            status: 503,
            code: "SlowDown",
            retry_after: Some(RETRY_AFTER),
        },
        _ => Fault::Pass,
    });
    let proxy = FaultProxy::start(
        upstream,
        plan,
        fault_proxy::Options {
            latency: LATENCY,
            ..Default::default()
        },
        &tmp.path().join("proxy.log"),
    );
    let to = to(&proxy.endpoint());
    cmd.arg("push")
        .arg("--to")
        .arg(&to)
        .arg("--key-file")
        .arg(&keys.secret)
        .args(["--jobs", "8"])
        .args(&roots)
        .env("NIXPUSH_REQUEST_TIMEOUT_SECS", "3")
        .env("NIXPUSH_LOG", "nixpush_backends=info");
    let out = run_ok(&mut cmd);
    assert_eq!(pushed_count(&out), all.len(), "{}", out.report());
    for l in out.stderr.lines().filter(|l| l.contains("throttles")) {
        eprintln!("nixpush: {l}");
    }

    let records = proxy.records();
    let throttled: Vec<&Record> = records
        .iter()
        .filter(|r| matches!(r.fault, Fault::Status { .. }))
        .collect();
    assert_eq!(throttled.len(), 3, "{}", fault_proxy::tally(&records));
    // From the first throttling answer on, nothing for RETRY_AFTER seconds: no retry of the
    // refused requests, and after a moment (requests already on their way when the answer
    // came may still arrive: on a loaded machine some take a few hundred ms to reach the
    // proxy) nothing at all. A client that only backs off per request would retry within
    // 100-200 ms and keep sending new requests all along.
    let t0 = throttled.iter().map(|r| r.end).min().expect("throttled");
    let pause_end = t0 + Duration::from_secs(RETRY_AFTER);
    let since = |r: &Record| r.start.saturating_duration_since(t0).as_millis();
    for t in &throttled {
        let retry = records
            .iter()
            // The same object asked again after the refusal. Every retry waits at least
            // 100 ms first; a request for it within 50 ms of the answer was on its way already
            // (the gc guard reads `gc-pending` again while a pass runs).
            .find(|r| {
                r.seq > t.seq
                    && r.target == t.target
                    && r.start >= t.end + Duration::from_millis(50)
            })
            .unwrap_or_else(|| panic!("{} was not retried", t.target));
        assert!(
            retry.start + Duration::from_millis(50) >= pause_end,
            "{} retried {}ms after the throttling answer",
            t.target,
            since(retry)
        );
    }
    let late: Vec<&Record> = records
        .iter()
        .filter(|r| {
            r.start > t0 + Duration::from_secs(1) && r.start + Duration::from_millis(50) < pause_end
        })
        .collect();
    assert!(
        late.is_empty(),
        "{} requests in the second half of the pause: {:?}",
        late.len(),
        late.iter()
            .map(|r| format!("{} {} at +{}ms", r.method, r.target, since(r)))
            .collect::<Vec<_>>()
    );
    let on_their_way = records
        .iter()
        .filter(|r| r.start > t0 && r.start + Duration::from_millis(50) < pause_end)
        .count();
    // What the client had sent when the answer came: the requests in flight at the proxy
    // then, and those still on their way. The halved limit bounds what is in flight while the
    // first requests after the pause are answered (each takes LATENCY): half of that, plus
    // the one-per-round additions of the answers that came in during the pause.
    let at_throttle = records
        .iter()
        .filter(|r| r.start <= t0 && r.end >= t0)
        .count();
    let sent = at_throttle + on_their_way;
    let first_after = records
        .iter()
        .filter(|r| r.start + Duration::from_millis(50) >= pause_end)
        .map(|r| r.start)
        .min()
        .expect("requests after the pause");
    let after = records
        .iter()
        .filter(|r| r.start >= first_after && r.start < first_after + LATENCY)
        .map(|r| r.in_flight)
        .max()
        .unwrap_or(0);
    let resumed = first_after.saturating_duration_since(t0);
    eprintln!(
        "throttling: {sent} requests sent when the first throttling answer came ({at_throttle} \
         in flight at the proxy, {on_their_way} still on their way, arriving in the first \
         second of the pause), none after; the first new one {:.2}s after that answer; then \
         at most {after} in flight; {} requests in all",
        resumed.as_secs_f64(),
        records.len()
    );
    assert!(
        sent >= 8,
        "too few requests at once to see a change: {sent}"
    );
    assert!(
        resumed + Duration::from_millis(50) >= Duration::from_secs(RETRY_AFTER),
        "resumed after {resumed:?}"
    );
    // What the client had in flight and the limit it lowered itself to, from its own log
    // line: it counts requests that have not reached the proxy yet (on a loaded machine,
    // several), so the lowered limit is checked against its own count, and what the proxy saw
    // after the pause against that limit (a request or two that the client has finished may
    // still be open at the proxy).
    let (had, lowered) = out
        .stderr
        .lines()
        .find(|l| l.contains("fewer requests at once"))
        .and_then(|l| {
            let field = |k: &str| -> Option<f64> {
                l.split(&format!("{k}="))
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            };
            Some((field("in_flight")?, field("limit")?))
        })
        .unwrap_or_else(|| panic!("no line saying the limit was lowered: {}", out.report()));
    assert!(
        lowered <= had / 2.0 + 0.5,
        "the limit went from {had} in flight to {lowered}, not half"
    );
    assert!(
        after as f64 <= lowered + 2.0,
        "{after} in flight after the pause, with the limit lowered to {lowered} ({sent} sent \
         before)"
    );
    all
}

#[test]
fn throttling_s3_honours_retry_after_and_lowers_concurrency() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let prefix = unique("throttle");
    let region = testbeds::S3_REGION;
    let all = throttled_push(
        sw.s3_port,
        60,
        |endpoint| format!("s3://{BUCKET}/{prefix}?endpoint={endpoint}&region={region}"),
        nixpush_s3(),
    );
    // Publishing was slowed, not broken.
    let keys_in_bucket = bucket_keys(sw, &prefix);
    for p in &all {
        assert!(keys_in_bucket.contains(&format!("{}.narinfo", hash_part(p))));
    }
}

#[test]
fn throttling_http_honours_retry_after_and_lowers_concurrency() {
    let Some(ngx) = testbeds::nginx() else { return };
    let tmp = tempdir();
    let token = tmp.path().join("token");
    fs::write(&token, testbeds::HTTP_TOKEN).expect("token");
    let path = unique("throttle-http");
    // Past the presence checks (one HEAD per root), among the uploads.
    let all = throttled_push(
        ngx.port,
        120,
        |endpoint| format!("{endpoint}/{path}?token-file={}", token.display()),
        nixpush(),
    );
    for p in &all {
        assert!(
            ngx.root
                .join(&path)
                .join(format!("{}.narinfo", hash_part(p)))
                .is_file()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Many builders, one bucket

/// Four builders' closures: 16 shared paths (a chain of 8 and 8 leaves), and for each builder
/// a root with 3 paths of its own.
const FOUR_NIX: &str = concat!(
    "{ salt }:\nlet\n",
    nix_mk!(),
    r#"  chain = builtins.foldl' (prev: i: mk "np-4chain-${toString i}" ''
    { printf 'chain ${toString i} %s\n' "$salt"; ${if prev == null then "" else "echo ${prev};"}
      seq 1 ${toString (3000 * (i + 1))}; } > $out
  '') null (builtins.genList (i: i) 8);
  leaves = builtins.genList (i: mk "np-4leaf-${toString i}" ''
    { printf 'leaf ${toString i} %s\n' "$salt"; seq ${toString i} 3 60000; } > $out
  '') 8;
  root = side: mk "np-4root-${side}" ''
    mkdir $out
    printf '%s\n' ${chain} ${builtins.concatStringsSep " " (map toString leaves)} > $out/deps
    ${builtins.concatStringsSep "\n" (builtins.genList (i:
      "echo ${mk "np-4own-${side}-${toString i}" "seq ${toString i} 5 9000 > $out; echo ${side} >> $out"} >> $out/own") 3)}
  '';
in { a = root "a"; b = root "b"; c = root "c"; d = root "d"; }
"#
);

/// What a reader polling the bucket found: narinfos whose NAR or references it could not
/// get, and the ETag each narinfo had when first seen.
#[derive(Default)]
struct Reader {
    polls: usize,
    dangling: Vec<String>,
    first_etag: std::collections::BTreeMap<String, String>,
}

/// One listing of `prefix/`: key → ETag.
fn bucket_etags(
    sw: &testbeds::SeaweedFs,
    prefix: &str,
) -> std::collections::BTreeMap<String, String> {
    let (status, body) = testbeds::http_request(
        sw.s3_port,
        "GET",
        &format!("/{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}/"),
        "",
    );
    assert_eq!(status, 200, "listing: {body}");
    let field = |e: &str, name: &str| {
        e.split(&format!("<{name}>"))
            .nth(1)
            .and_then(|r| r.split(&format!("</{name}>")).next())
            .unwrap_or("")
            .to_owned()
    };
    body.split("<Contents>")
        .skip(1)
        .map(|e| {
            let key = field(e, "Key");
            let key = key
                .strip_prefix(&format!("{prefix}/"))
                .unwrap_or(&key)
                .to_owned();
            (key, field(e, "ETag"))
        })
        .collect()
}

impl Reader {
    /// One poll: every narinfo not seen before is read, and its NAR and its references'
    /// narinfos must be there (they were written first).
    fn poll(&mut self, sw: &testbeds::SeaweedFs, prefix: &str) {
        self.polls += 1;
        for (key, etag) in bucket_etags(sw, prefix) {
            if !key.ends_with(".narinfo") || self.first_etag.contains_key(&key) {
                continue;
            }
            self.first_etag.insert(key.clone(), etag);
            let get = |k: &str| {
                testbeds::http_request(sw.s3_port, "GET", &format!("/{BUCKET}/{prefix}/{k}"), "")
            };
            let (status, text) = get(&key);
            if status != 200 {
                self.dangling
                    .push(format!("{key}: listed, but GET says {status}"));
                continue;
            }
            for line in text.lines() {
                let wanted: Vec<String> = match line.split_once(": ") {
                    Some(("URL", url)) => vec![url.to_owned()],
                    Some(("References", refs)) => refs
                        .split_whitespace()
                        .map(|r| format!("{}.narinfo", &r[..32]))
                        .collect(),
                    _ => continue,
                };
                for w in wanted {
                    let (status, _) = testbeds::http_request(
                        sw.s3_port,
                        "HEAD",
                        &format!("/{BUCKET}/{prefix}/{w}"),
                        "",
                    );
                    if status != 200 {
                        self.dangling
                            .push(format!("{key} was visible before {w} ({status})"));
                    }
                }
            }
        }
    }
}

#[test]
fn four_daemons_share_one_bucket() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let tmp = tempdir();
    let sides = ["a", "b", "c", "d"];
    let (roots, built) = nix_build_expr(FOUR_NIX, &unique("four"), &sides, &["--max-jobs", "4"]);
    assert_eq!(roots.len(), 4, "{}", built.report());
    let closures: Vec<Vec<String>> = roots.iter().map(|r| closure_of(r)).collect();
    let union: BTreeSet<String> = closures.iter().flatten().cloned().collect();
    let shared: BTreeSet<String> = closures[0]
        .iter()
        .filter(|p| closures.iter().all(|c| c.contains(p)))
        .cloned()
        .collect();
    assert_eq!((union.len(), shared.len()), (32, 16), "{closures:?}");

    let proxy = FaultProxy::start(
        sw.s3_port,
        Box::new(|_, _| Fault::Pass),
        fault_proxy::Options::default(),
        &tmp.path().join("proxy.log"),
    );
    let prefix = unique("four");
    let through_proxy = format!(
        "s3://{BUCKET}/{prefix}?endpoint={}&region={}",
        proxy.endpoint(),
        testbeds::S3_REGION
    );
    // Each builder signs with its own key, so a narinfo rewritten by another would differ.
    let keys: Vec<KeyPair> = sides
        .iter()
        .map(|s| nixpush_keygen(tmp.path(), &format!("builder-{s}.example.org-1")))
        .collect();
    let dirs: Vec<DaemonDir> = sides
        .iter()
        .zip(&keys)
        .map(|(s, k)| DaemonDir::new(tmp.path(), s, &through_proxy, &k.secret, 2))
        .collect();
    for (d, root) in dirs.iter().zip(&roots) {
        d.enqueue(std::slice::from_ref(root), 1);
    }

    // A reader polls the bucket straight from SeaweedFS while the builders push.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let prefix = prefix.clone();
        std::thread::spawn(move || {
            let mut r = Reader::default();
            loop {
                let last = stop.load(std::sync::atomic::Ordering::SeqCst);
                r.poll(sw, &prefix);
                if last {
                    return r;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let started = Instant::now();
    let daemons: Vec<Daemon> = dirs.iter().map(|d| d.start(nixpush_s3())).collect();
    wait_until(
        Duration::from_secs(120),
        || {
            dirs.iter()
                .map(|d| format!("queue {:?}", d.queued()))
                .collect::<Vec<_>>()
                .join(", ")
        },
        || dirs.iter().all(|d| d.queued().is_empty()),
    );
    let took = started.elapsed();
    for d in daemons {
        d.terminate(Duration::from_secs(30));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reader = reader.join().expect("reader");
    for d in &dirs {
        assert!(d.rejected().is_empty(), "rejected: {:?}", d.rejected());
    }

    // Never a dangling narinfo, and none rewritten: what the reader first saw is still there.
    assert!(
        reader.dangling.is_empty(),
        "a reader saw dangling narinfos: {:?}",
        reader.dangling
    );
    let now = bucket_etags(sw, &prefix);
    for (k, etag) in &reader.first_etag {
        assert_eq!(now.get(k), Some(etag), "{k} was rewritten");
    }
    assert_eq!(reader.first_etag.len(), union.len(), "narinfos seen");

    // Through the proxy: each narinfo and each NAR created once (200), the others refused
    // (412).
    let records = proxy.records();
    let puts = |key: &str, status: u16| {
        records
            .iter()
            .filter(|r| r.method == "PUT" && r.path().ends_with(key) && r.status == Some(status))
            .count()
    };
    let mut nar_uploads = Vec::new();
    let mut refused = 0;
    for p in &union {
        let k = format!("{}.narinfo", hash_part(p));
        assert_eq!(
            puts(&k, 200),
            1,
            "{p}: narinfo created {} times",
            puts(&k, 200)
        );
        refused += puts(&k, 412);
        let (_, text) =
            testbeds::http_request(sw.s3_port, "GET", &format!("/{BUCKET}/{prefix}/{k}"), "");
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .expect("URL")
            .to_owned();
        // NARs are created if absent on S3 too: stored once, whoever sent them.
        assert_eq!(
            puts(&url, 200),
            1,
            "{p}: NAR stored {} times",
            puts(&url, 200)
        );
        if shared.contains(p) {
            nar_uploads.push(1 + puts(&url, 412));
        }
    }
    let total: usize = nar_uploads.iter().sum();
    eprintln!(
        "four daemons, {} paths ({} shared) in {:.1}s: every narinfo and every NAR stored once; \
         {refused} narinfo creations refused (412); the {} shared NARs were sent {total} times \
         (per path: {nar_uploads:?}), the other sends refused (412); the reader polled {} times",
        union.len(),
        shared.len(),
        took.as_secs_f64(),
        shared.len(),
        reader.polls
    );
    assert!(
        reader.polls >= 10,
        "the reader polled {} times",
        reader.polls
    );

    // Nix substitutes all four closures, whichever builder signed each path.
    let public: Vec<String> = keys.iter().map(KeyPair::public_key).collect();
    nix_substitutes_from(
        &format!("{}/{BUCKET}/{prefix}", sw.endpoint()),
        &tmp.path().join("root"),
        &public.join(" "),
        &roots,
        &union.iter().cloned().collect::<Vec<_>>(),
    );
}
