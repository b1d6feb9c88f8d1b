//! Command-line interface: thin glue from arguments to the library.

mod keygen;
mod progress;
mod push;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nixpush",
    version,
    about = "Publish Nix store paths to binary caches"
)]
pub struct Cli {
    /// More log output (-v: info, -vv: debug). NIXPUSH_LOG takes an EnvFilter directive.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish store paths and their closures to a binary cache.
    Push(push::PushArgs),
    /// Make a signing key pair, as `nix-store --generate-binary-cache-key` does.
    Keygen(keygen::KeygenArgs),
}

pub fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("NIXPUSH_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen(args) => keygen::run(args),
        Command::Push(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(push::run(args))
        }
    }
}
