//! `nixpush hook`: the post-build-hook client as a subcommand (see [`nixpush::daemon::hook`]).

use std::process::ExitCode;

use super::ConfigArg;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Nix runs its post-build-hook without arguments: name `nixpush-hook` in nix.conf, which is this
command as a program of its own.

Examples:
  In /etc/nix/nix.conf:
    post-build-hook = /usr/local/bin/nixpush-hook

  Hand a path to the daemon by hand, as Nix would:
    OUT_PATHS=/nix/store/...-hello-2.12 nixpush hook")]
pub struct HookArgs {
    #[command(flatten)]
    config: ConfigArg,
}

pub fn run(args: HookArgs) -> ExitCode {
    let (path, _) = args.config.path();
    nixpush::daemon::hook::run(&path)
}
