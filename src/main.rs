//! The `nixpush` command: parse arguments, set up logging, hand over to a command.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    tune_malloc();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        // The reader has what it wanted; as a program killed by SIGPIPE would, end quietly.
        Err(e) if e.is::<cli::StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixpush: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's malloc raises its mmap threshold each time a large block is freed, after which the
/// codecs' multi-MiB buffers come from per-thread arenas and stay there: pushing a 240-path
/// closure grew to 158 MiB of RSS, where one 4 GiB path needs 25. A fixed threshold stops that
/// drift, and two arenas bound what the rest can hold. (mimalloc was tried and held far more.)
///
/// The threshold is 8 MiB, not lower: every path gets new codec contexts and buffers of a few
/// MiB, and below the threshold they come back from the arena already faulted in, where an
/// mmap'd block is zeroed page by page each time. With 256 KiB the 240-path push took 184,000
/// page faults; with 8 MiB, and free memory kept up to 16 MiB before it is trimmed, 23,000, for
/// about 20 MiB more peak RSS on that push (38 → 60 MiB). Measured in docs/performance.md.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets allocator parameters; it runs first thing in main, before any
    // other thread exists, and its failure (return 0) leaves the defaults, which are safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
