//! `nixpush hook`: the post-build-hook client as a subcommand (see [`nixpush::daemon::hook`]).

use std::process::ExitCode;

use super::ConfigArg;

#[derive(Debug, clap::Args)]
pub struct HookArgs {
    #[command(flatten)]
    config: ConfigArg,
}

pub fn run(args: HookArgs) -> ExitCode {
    let (path, _) = args.config.path();
    nixpush::daemon::hook::run(&path)
}
