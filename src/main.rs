//! The `sluice` command line: parse arguments, hand over to the library, exit with its status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::command;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Egress proxy and network-policy engine for sandboxed sessions")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decide one destination and print the decision and the rule that made it.
    Check {
        /// Policy directory (default: ./policies when it exists, else the built-in policies).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Policy name, or a policy file (default: trusted).
        #[arg(long)]
        policy: Option<String>,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
        /// HOST[:PORT] (default port 443).
        destination: String,
    },
    /// Lint policy files: errors as file:line:col with a snippet and a hint, then warnings.
    Validate {
        /// Files or directories (default: policies/).
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { command::EXIT_USAGE } else { command::EXIT_OK });
        }
    };
    let mut out = std::io::stdout().lock();
    let status = match cli.command {
        Command::Check { policies, policy, json, destination } => {
            let args = command::CheckArgs { policies, policy, json, destination };
            command::check(&args, &mut out, &mut std::io::stderr().lock())
        }
        Command::Validate { paths } => command::validate(&paths, &mut out),
    };
    ExitCode::from(status)
}
