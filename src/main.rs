//! The `tokenwarden` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the proxy allocates a few dozen small blocks per call, and glibc's allocator was
/// a tenth of its time (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = tokenwarden::cli::Cli::parse();
    tokenwarden::cli::run(cli)
}
