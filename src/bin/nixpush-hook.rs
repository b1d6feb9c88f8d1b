//! `nixpush-hook`: the program to name in nix.conf, `post-build-hook = /usr/local/bin/nixpush-hook`.
//!
//! Nix runs its post-build-hook with no arguments and blocks its build loop until it exits, so
//! this is a binary of its own: the same code as `nixpush hook`, without the rest of nixpush
//! linked in, so it starts in about a millisecond. The configuration comes from
//! `$NIXPUSH_CONFIG`, else `/etc/nixpush/config.toml`.

use std::path::PathBuf;
use std::process::ExitCode;

const HELP: &str = "\
Nix's post-build-hook: hand the finished build to the nixpush daemon. Never fails the build.

Usage: nixpush-hook

Nix runs it after each build, without arguments, with OUT_PATHS (or DRV_PATH) set. It hands
the paths to the daemon's socket and returns once the daemon has them on disk; if the daemon is
down or slow, it writes them into the queue directory itself. It exits 0 whatever happens
unless the config sets hook.fail-build-on-error.

Environment:
  OUT_PATHS       the store paths the build produced (space-separated)
  DRV_PATH        the derivation, used as DRV^* where OUT_PATHS is empty (Nix 2.8.0)
  NIXPUSH_CONFIG  the configuration file [default: /etc/nixpush/config.toml]

Options:
  -h, --help     Print help
  -V, --version  Print version

Examples:
  In /etc/nix/nix.conf:
    post-build-hook = /usr/local/bin/nixpush-hook

  Hand a path to the daemon by hand, as Nix would:
    OUT_PATHS=/nix/store/...-hello-2.12 nixpush-hook
";

fn main() -> ExitCode {
    // Nix passes no arguments; these are for a person at a terminal (no argument parser is
    // linked in, to keep the start-up that every build waits for short).
    if let Some(arg) = std::env::args_os().nth(1) {
        let (text, code) = match arg.to_str() {
            Some("-h" | "--help") => (HELP.to_owned(), ExitCode::SUCCESS),
            Some("-V" | "--version") => (
                format!("nixpush-hook {}\n", env!("CARGO_PKG_VERSION")),
                ExitCode::SUCCESS,
            ),
            _ => {
                eprintln!(
                    "nixpush-hook: unexpected argument {arg:?}: Nix runs this hook without \
                     arguments (see nixpush-hook --help)"
                );
                return ExitCode::from(2);
            }
        };
        use std::io::Write as _;
        // A closed pipe (`nixpush-hook --help | head -1`) is no error.
        let _ = std::io::stdout().write_all(text.as_bytes());
        return code;
    }
    let config = std::env::var_os("NIXPUSH_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(nixpush::config::DEFAULT_PATH));
    nixpush::daemon::hook::run(&config)
}
