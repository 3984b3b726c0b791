//! `flotilla`: the one binary. Parses the command line and calls into the
//! crates; nothing here decides anything. The flags are in `cli`, each
//! command's body in `cmd`.

mod bench_exec;
mod cli;
mod cmd;
mod demo;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // a flag's value refused by our own checks is bad usage, as clap's are
        Err(e) if e.downcast_ref::<cmd::Usage>().is_some() => {
            eprintln!("error: {e:#}\n\nFor more information, try '--help'.");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
