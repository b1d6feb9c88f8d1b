//! The `nixpush` command: parse arguments, set up logging, hand over to a command.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nixpush: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
