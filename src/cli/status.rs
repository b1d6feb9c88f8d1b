//! `nixpush status [--json]`: the daemon's queue depth, work in flight, counters, last errors.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nixpush::config::Config;
use nixpush::daemon::protocol::{Request, Response};

use super::ConfigArg;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON, for scripts.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (path, _) = args.config.path();
    let cfg = Config::load_unchecked(&path)?;
    let mut stream = UnixStream::connect(&cfg.socket)
        .with_context(|| format!("cannot reach the daemon at {}", cfg.socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut msg = serde_json::to_vec(&Request::Status {})?;
    msg.push(b'\n');
    stream.write_all(&msg)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let report = match serde_json::from_str::<Response>(&line)
        .with_context(|| format!("unreadable answer from the daemon: {line:?}"))?
    {
        Response::Status(s) => s,
        Response::Error { message } => bail!("the daemon refused: {message}"),
        Response::Queued { .. } => bail!("unexpected answer from the daemon"),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("cache:       {}", report.cache);
    println!("uptime:      {}s", report.uptime_secs);
    println!("queue depth: {} entries", report.queue_depth);
    println!("in flight:   {} paths", report.in_flight);
    println!(
        "published:   {}   failed: {}   rejected entries: {}{}",
        report.published,
        report.failed,
        report.rejected,
        if report.retrying {
            "   (retrying after a failure)"
        } else {
            ""
        }
    );
    if !report.last_errors.is_empty() {
        println!("last errors:");
        for e in &report.last_errors {
            println!("  [{}] {}", e.at, e.message);
        }
    }
    Ok(ExitCode::SUCCESS)
}
