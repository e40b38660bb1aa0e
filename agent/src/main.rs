//! The `lbtrace` binary: the edge where errors become one line and an exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};

/// Exit code for errors the user can fix: bad input or missing privileges (as clap's usage errors).
pub const EXIT_USAGE: u8 = 2;

/// Logs to stderr through tracing; `LBTRACE_LOG` sets the filter (default: warn, info for the
/// agent).
pub fn init_logging(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LBTRACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Agent(_)) {
        init_logging(false, "warn");
    }
    let result = cli::run(cli);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<cli::UsageError>() {
                Some(_) => EXIT_USAGE,
                None => 1,
            };
            eprintln!("lbtrace: error: {}", one_line(&e));
            ExitCode::from(code)
        }
    }
}

/// `lbtrace ... | head` closing early is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn one_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for (i, cause) in e.chain().enumerate() {
        let text = cause.to_string();
        if i > 0 && s.contains(&text) {
            continue;
        }
        if i > 0 {
            s.push_str(": ");
        }
        s.push_str(text.lines().next().unwrap_or_default());
    }
    s
}
