//! `nixpush status [--json]`: the daemon's queue depth, work in flight, counters, last errors.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use nixpush::config::Config;
use nixpush::daemon::protocol::{Request, Response, StatusReport};

use super::ConfigArg;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  How the daemon is doing:
    nixpush status

  The queue depth, for a script or a monitoring check:
    nixpush status --json | jq .queue_depth")]
pub struct StatusArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON, for scripts.
    #[arg(long)]
    json: bool,
}

/// Why `status` had no report to show.
#[derive(Debug, thiserror::Error)]
pub(super) enum StatusError {
    #[error(
        "the daemon is not running at {} ({error}); start it with \
         `systemctl start nixpush.service` or `nixpush daemon`",
        socket.display()
    )]
    NotRunning {
        socket: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot reach the daemon at {}: {error}", socket.display())]
    Unreachable {
        socket: PathBuf,
        error: std::io::Error,
    },
    #[error("talking to the daemon at {}: {error}", socket.display())]
    Io {
        socket: PathBuf,
        error: std::io::Error,
    },
    #[error("unreadable answer from the daemon: {0:?}")]
    Unreadable(String),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("unexpected answer from the daemon")]
    Unexpected,
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (path, _) = args.config.path();
    let cfg = Config::load_unchecked(&path)?;
    let report = match ask(&cfg.socket) {
        Ok(r) => r,
        // Scripts reading `--json` get JSON whatever happened, and the exit code says it failed.
        Err(e) if args.json => {
            let _ = super::print_stdout(&format!(
                "{}\n",
                serde_json::json!({ "error": e.to_string() })
            ));
            eprintln!("nixpush: error: {e}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        super::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    super::print_stdout(&human(&report))?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn ask(socket: &Path) -> Result<StatusReport, StatusError> {
    let mut stream = UnixStream::connect(socket).map_err(|error| {
        let socket = socket.to_owned();
        match error.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                StatusError::NotRunning { socket, error }
            }
            _ => StatusError::Unreachable { socket, error },
        }
    })?;
    let io = |error| StatusError::Io {
        socket: socket.to_owned(),
        error,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut msg = serde_json::to_vec(&Request::Status {}).expect("a request encodes");
    msg.push(b'\n');
    stream.write_all(&msg).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    match serde_json::from_str::<Response>(&line) {
        Ok(Response::Status(s)) => Ok(s),
        Ok(Response::Error { message }) => Err(StatusError::Refused(message)),
        Ok(Response::Queued { .. } | Response::NotQueued { .. }) => Err(StatusError::Unexpected),
        Err(_) => Err(StatusError::Unreadable(line)),
    }
}

/// `n thing` or `n things`.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Seconds since the epoch as a UTC time, `2026-12-02 00:45:55 UTC`.
fn utc(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
        .replace('Z', " UTC")
}

fn human(report: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if report.caches.is_empty() {
        let _ = writeln!(out, "cache:       {}", report.cache);
    } else {
        let _ = writeln!(out, "caches:      {}", report.caches.len());
        for c in &report.caches {
            let name = if c.name == c.cache {
                c.cache.clone()
            } else {
                format!("{} ({})", c.name, c.cache)
            };
            let mut state = format!(
                "{} to publish, {} published, {} failed",
                count(c.waiting as u64, "entry", "entries"),
                c.published,
                c.failed
            );
            if c.held > 0 {
                state.push_str(&format!(", {} held", c.held));
            }
            if c.retrying {
                state.push_str(", retrying after a failure");
            }
            let _ = writeln!(out, "  {name}: {state}");
        }
    }
    let _ = writeln!(out, "uptime:      {}s", report.uptime_secs);
    let _ = writeln!(
        out,
        "queue depth: {}",
        count(report.queue_depth as u64, "entry", "entries")
    );
    let _ = writeln!(
        out,
        "in flight:   {}",
        count(report.in_flight as u64, "path", "paths")
    );
    let _ = writeln!(
        out,
        "published:   {}   left out: {}   failed: {}   rejected since start: {}{}",
        report.published,
        report.excluded,
        report.failed,
        report.rejected,
        if report.retrying {
            "   (retrying after a failure)"
        } else {
            ""
        }
    );
    if report.rejected_entries > 0 {
        let _ = writeln!(
            out,
            "rejected:    {} in the queue's rejected/ (`nixpush queue list` shows {}, \
             `nixpush queue retry NAME` puts one back){}",
            count(report.rejected_entries as u64, "entry", "entries"),
            if report.rejected_entries == 1 {
                "it"
            } else {
                "all"
            },
            if report.newest_rejected.is_empty() {
                ""
            } else if report.rejected_entries > report.newest_rejected.len() {
                "; the newest:"
            } else {
                ":"
            }
        );
        for r in &report.newest_rejected {
            let when =
                r.at.map(|t| format!("  rejected {}", utc(t)))
                    .unwrap_or_default();
            let _ = writeln!(out, "  {}{when}", r.entry);
            for line in r.reason.lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    if !report.held.is_empty() {
        let _ = writeln!(
            out,
            "retried on their own ({}; other entries go on meanwhile):",
            count(report.held.len() as u64, "entry", "entries")
        );
        for h in &report.held {
            let for_cache = h
                .cache
                .as_ref()
                .map(|c| format!(" (for {c})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {}{for_cache}: failed {}, next try in {}s",
                h.entry,
                count(u64::from(h.attempts), "time", "times"),
                h.retry_in_secs
            );
            for f in &h.failed {
                let _ = writeln!(out, "    {f}");
            }
        }
    }
    if !report.last_errors.is_empty() {
        let _ = writeln!(out, "last errors:");
        for e in &report.last_errors {
            let _ = writeln!(out, "  {}  {}", utc(e.at), e.message);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_entries_are_listed_newest_first_with_their_reasons() {
        use nixpush::daemon::protocol::RejectedRecord;
        let mut report = StatusReport {
            cache: "file:///srv/cache".into(),
            ..StatusReport::default()
        };
        assert!(!human(&report).contains("rejected:"), "{}", human(&report));
        report.rejected_entries = 5;
        report.newest_rejected = vec![
            RejectedRecord {
                entry: "0179-1-0".into(),
                at: Some(1796156425),
                reason: "/etc/passwd is not in the Nix store\nsecond line".into(),
            },
            RejectedRecord {
                entry: "by-hand".into(),
                at: None,
                reason: "the entry is a symlink".into(),
            },
        ];
        let text = human(&report);
        let tail: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("rejected:"))
            .collect();
        assert_eq!(
            tail,
            [
                "rejected:    5 entries in the queue's rejected/ (`nixpush queue list` shows all, \
                 `nixpush queue retry NAME` puts one back); the newest:",
                "  0179-1-0  rejected 2026-12-01 20:20:25 UTC",
                "    /etc/passwd is not in the Nix store",
                "    second line",
                "  by-hand",
                "    the entry is a symlink",
            ],
            "{text}"
        );
        report.rejected_entries = 1;
        report.newest_rejected.truncate(1);
        let text = human(&report);
        assert!(
            text.contains(
                "rejected:    1 entry in the queue's rejected/ (`nixpush queue list` shows it, \
                 `nixpush queue retry NAME` puts one back):\n  0179-1-0  rejected"
            ),
            "{text}"
        );
    }

    #[test]
    fn times_and_plurals_are_for_people() {
        assert_eq!(utc(1796156425), "2026-12-01 20:20:25 UTC");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(count(1, "entry", "entries"), "1 entry");
        assert_eq!(count(0, "entry", "entries"), "0 entries");
        assert_eq!(count(2, "path", "paths"), "2 paths");
    }
}
