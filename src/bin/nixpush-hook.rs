//! `nixpush-hook`: the program to name in nix.conf, `post-build-hook = /usr/local/bin/nixpush-hook`.
//!
//! Nix runs its post-build-hook with no arguments and blocks its build loop until it exits, so
//! this is a binary of its own: the same code as `nixpush hook`, without the rest of nixpush
//! linked in, so it starts in about a millisecond. The configuration comes from
//! `$NIXPUSH_CONFIG`, else `/etc/nixpush/config.toml`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let config = std::env::var_os("NIXPUSH_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(nixpush::config::DEFAULT_PATH));
    nixpush::daemon::hook::run(&config)
}
