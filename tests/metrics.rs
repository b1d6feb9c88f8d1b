//! The daemon's Prometheus metrics, scraped over HTTP with a plain TCP client while it
//! publishes: the names, the counters moving with requests from the socket and the queue
//! directory, the queue gauges and the retry and error counters while the cache is away, and
//! nothing but `GET /metrics` served.

mod common;
mod daemon_support;

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use daemon_support::*;

/// Independent one-file paths.
const LEAVES_NIX: &str = r#"
{ salt }:
let
  leaf = n: builtins.derivation {
    name = "np-metrics-${toString n}";
    inherit salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "printf 'metrics %s %s\\n' ${toString n} \"$salt\" > $out" ];
    PATH = "/usr/bin:/bin";
  };
in { l1 = leaf 1; l2 = leaf 2; l3 = leaf 3; l4 = leaf 4; }
"#;

/// The address the daemon logged that it serves metrics at (it was given port 0).
fn metrics_address(daemon: &Daemon, setup: &Setup) -> String {
    let mut found = None;
    wait_until(
        PATIENCE,
        || format!("no \"serving metrics\" line:\n{}", daemon.log_tail()),
        || {
            let log = fs::read_to_string(&setup.log).unwrap_or_default();
            found = log.lines().find_map(|l| {
                let rest = l.split_once("serving metrics at http://")?.1;
                Some(rest.split_once("/metrics")?.0.to_owned())
            });
            found.is_some()
        },
    );
    found.expect("found")
}

/// One HTTP/1.1 request; the status code, the headers (lower-cased names) and the body.
fn http(addr: &str, method: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {raw:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// `GET /metrics`, checked to be Prometheus text.
fn scrape(addr: &str) -> String {
    let (status, headers, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    let ct = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        ct,
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "{headers:?}"
    );
    body
}

/// The value of the sample `series` (a name with its labels, as written), e.g.
/// `nixpush_queue_enqueued_total{source="socket"}`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}\n{text}"))
}

/// Assert that the sample of `series` in `text` is `value`.
fn expect_sample(text: &str, series: &str, value: f64) {
    assert_eq!(sample(text, series), value, "{series} in\n{text}");
}

/// The sum of every sample of `name` whatever its labels.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_move_as_the_daemon_publishes() {
    let setup = Setup::new("metrics-listen = \"127.0.0.1:0\"");
    let daemon = setup.start();
    let addr = metrics_address(&daemon, &setup);
    let (paths, _) = nix_build_expr(
        LEAVES_NIX,
        &unique("metrics"),
        &["l1", "l2", "l3", "l4"],
        &[],
    );

    // Before any request: every series is there, at zero.
    let m = scrape(&addr);
    for (kind, name) in [
        ("gauge", "nixpush_queue_entries"),
        ("gauge", "nixpush_queue_oldest_entry_age_seconds"),
        ("counter", "nixpush_queue_enqueued_total"),
        ("counter", "nixpush_paths_published_total"),
        ("counter", "nixpush_paths_skipped_total"),
        ("counter", "nixpush_paths_failed_total"),
        ("counter", "nixpush_nar_bytes_total"),
        ("counter", "nixpush_compressed_bytes_total"),
        ("histogram", "nixpush_upload_duration_seconds"),
        ("counter", "nixpush_backend_errors_total"),
        ("counter", "nixpush_retries_total"),
        ("histogram", "nixpush_hook_ack_duration_seconds"),
    ] {
        let line = format!("# TYPE {name} {kind}");
        assert!(m.lines().any(|l| l == line), "no {line:?} in\n{m}");
        assert!(
            m.lines().any(|l| l.starts_with(&format!("# HELP {name} "))),
            "{name} has no help:\n{m}"
        );
    }
    assert_eq!(sample(&m, "nixpush_paths_published_total"), 0.0);
    assert_eq!(
        sample(&m, "nixpush_queue_enqueued_total{source=\"socket\"}"),
        0.0
    );
    assert_eq!(sample(&m, "nixpush_queue_entries"), 0.0);

    // Only GET /metrics.
    for (method, path) in [("GET", "/"), ("GET", "/metricsx"), ("POST", "/metrics")] {
        let (status, _, body) = http(&addr, method, path);
        assert_eq!(status, 404, "{method} {path}: {body}");
    }

    // Two requests through the socket, one written into the queue directory by hand.
    setup.enqueue(&paths[0..1]);
    setup.enqueue(&paths[1..2]);
    setup.write_entry("by-hand", &format!("{}\n", paths[2]));
    setup.wait_published(&paths[0..3], &daemon);
    let m = scrape(&addr);
    expect_sample(&m, "nixpush_queue_enqueued_total{source=\"socket\"}", 2.0);
    expect_sample(
        &m,
        "nixpush_queue_enqueued_total{source=\"directory\"}",
        1.0,
    );
    expect_sample(&m, "nixpush_paths_published_total", 3.0);
    expect_sample(&m, "nixpush_upload_duration_seconds_count", 3.0);
    expect_sample(&m, "nixpush_hook_ack_duration_seconds_count", 2.0);
    let infos = nix_path_info(None, &paths[0..3]);
    let nar_bytes: f64 = paths[0..3].iter().map(|p| infos[p].nar_size as f64).sum();
    assert_eq!(sample(&m, "nixpush_nar_bytes_total"), nar_bytes, "{m}");
    assert!(sample(&m, "nixpush_compressed_bytes_total") > 0.0, "{m}");
    expect_sample(&m, "nixpush_paths_failed_total", 0.0);
    expect_sample(&m, "nixpush_retries_total", 0.0);
    expect_sample(&m, "nixpush_queue_entries", 0.0);

    // A path already there is skipped as present.
    setup.enqueue(&paths[0..1]);
    wait_until(
        PATIENCE,
        || format!("present path not counted:\n{}", daemon.log_tail()),
        || {
            let m = scrape(&addr);
            sample(&m, "nixpush_paths_skipped_total{reason=\"present\"}") >= 1.0
                && sample(&m, "nixpush_queue_entries") == 0.0
        },
    );

    // The cache goes away (a file where its directory was): the entry waits, the worker
    // retries, the errors are counted by kind, and the oldest entry ages.
    let away = setup.dir.path().join("cache-away");
    fs::rename(&setup.cache, &away).expect("move the cache away");
    fs::write(&setup.cache, "not a directory\n").expect("block the cache");
    setup.enqueue(&paths[3..4]);
    let start = std::time::Instant::now();
    let during = loop {
        let m = scrape(&addr);
        if sample(&m, "nixpush_retries_total") >= 1.0 {
            break m;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "no retry seen:\n{m}\n--- log:\n{}",
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sample(&during, "nixpush_queue_entries"), 1.0, "{during}");
    assert!(
        sample(&during, "nixpush_queue_oldest_entry_age_seconds") > 0.0,
        "{during}"
    );
    assert!(
        sum(&during, "nixpush_backend_errors_total") >= 1.0,
        "{during}"
    );
    assert_eq!(
        sample(&during, "nixpush_paths_published_total"),
        3.0,
        "{during}"
    );

    // Back: published, and the queue empties.
    fs::remove_file(&setup.cache).expect("unblock");
    fs::rename(&away, &setup.cache).expect("move the cache back");
    setup.wait_published(&paths, &daemon);
    let m = scrape(&addr);
    expect_sample(&m, "nixpush_paths_published_total", 4.0);
    expect_sample(&m, "nixpush_queue_entries", 0.0);
    expect_sample(&m, "nixpush_queue_oldest_entry_age_seconds", 0.0);
    expect_sample(&m, "nixpush_queue_enqueued_total{source=\"socket\"}", 4.0);
    check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn metrics_are_off_unless_asked_for() {
    let setup = Setup::new("");
    let daemon = setup.start();
    setup.status();
    let log = fs::read_to_string(&setup.log).unwrap_or_default();
    assert!(!log.contains("serving metrics"), "{}", daemon.log_tail());
}

#[test]
fn a_bad_metrics_address_stops_the_daemon_at_start() {
    let setup = Setup::new("metrics-listen = \"localhost:9464\"");
    let out = run_fail(&mut setup.daemon_command());
    assert!(
        out.stderr.contains(
            "daemon.metrics-listen: \"localhost:9464\" is not an IP address and port like \
             \"127.0.0.1:9464\""
        ),
        "{}",
        out.report()
    );
}

/// Whether the server closed `s` (end of stream, or a reset) within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

#[test]
fn stuck_scrapers_hold_up_nothing() {
    let setup = Setup::new("metrics-listen = \"127.0.0.1:0\"");
    let daemon = setup.start();
    let addr = metrics_address(&daemon, &setup);
    // As many connections as are served at once, none sending a byte.
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // One more is closed at once, unanswered.
    let mut extra = TcpStream::connect(&addr).expect("connect");
    let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(5)),
        "a fifth scrape was served while four were in progress"
    );
    // The hook's socket does not notice.
    let (paths, _) = nix_build_expr(LEAVES_NIX, &unique("stuck"), &["l1"], &[]);
    let start = std::time::Instant::now();
    setup.enqueue(&paths);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "enqueue took {:?} with stuck scrapers",
        start.elapsed()
    );
    setup.wait_published(&paths, &daemon);
    // The idle ones are closed within the request-head timeout (2 s; 10 s at most in all),
    // and scrapes are served again.
    for s in &mut idle {
        assert!(
            closed_by_server(s, Duration::from_secs(12)),
            "an idle scrape connection stayed open"
        );
    }
    let m = scrape(&addr);
    expect_sample(&m, "nixpush_paths_published_total", 1.0);
}

#[test]
fn paths_left_out_by_the_filters_count_as_skipped() {
    let setup = Setup::new("metrics-listen = \"127.0.0.1:0\"");
    let text = fs::read_to_string(&setup.config).expect("config");
    fs::write(
        &setup.config,
        format!("exclude = [\"np-metrics-2\"]\n{text}"),
    )
    .expect("config");
    let daemon = setup.start();
    let addr = metrics_address(&daemon, &setup);
    let (paths, _) = nix_build_expr(LEAVES_NIX, &unique("metrics-filter"), &["l1", "l2"], &[]);
    setup.enqueue(&paths);
    setup.wait_published(&paths[..1], &daemon);
    wait_until(
        PATIENCE,
        || {
            format!(
                "the queue to empty: {:?}\n{}",
                setup.queued(),
                daemon.log_tail()
            )
        },
        || setup.queued().is_empty(),
    );
    let m = scrape(&addr);
    expect_sample(&m, "nixpush_paths_skipped_total{reason=\"excluded\"}", 1.0);
    expect_sample(&m, "nixpush_paths_published_total", 1.0);
}
