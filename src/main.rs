//! The `nixpush` command: parse arguments, set up logging, hand over to a command.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    tune_malloc();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nixpush: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's malloc raises its mmap threshold each time a large block is freed, after which the
/// codecs' multi-MiB buffers come from per-thread arenas and stay there: pushing a 240-path
/// closure grew to 158 MiB of RSS, where one 4 GiB path needs 25. A fixed threshold keeps large
/// buffers mmapped, so freeing them returns the memory, and two arenas bound what the rest can
/// hold. Measured in docs/performance.md. (mimalloc was tried and held far more.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets allocator parameters; it runs first thing in main, before any
    // other thread exists, and its failure (return 0) leaves the defaults, which are safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
