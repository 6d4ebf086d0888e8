//! The `tokenwarden` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tokenwarden::cli::Cli::parse();
    tokenwarden::cli::run(cli)
}
