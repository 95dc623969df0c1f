//! `capsync`: the server, the admin client and the sync client in one binary.
//!
//! Errors print as one line on stderr and exit non-zero; tokens are printed only where the
//! user asked for a sturdy URI (`admin create-session`, `share`).

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(&args);
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` joins the context chain on one line.
            eprintln!("capsync: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
