//! The `sluice` command line: parse arguments, hand over to the library, exit with its status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::command;
use sluice::credential::Kind;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Egress proxy and network-policy engine for sandboxed sessions")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: egress on 127.0.0.1:3128 with built-in defaults, or as `--config` says.
    Serve {
        /// Server configuration (sluice.toml); every key is optional.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Signing key file; overrides [auth] key_file (default: SLUICE_SIGNING_KEY).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
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
        /// Decide a request too: DESTINATION is then a URL, decided against the [[requests]] rules.
        #[arg(long)]
        method: Option<String>,
        /// HOST[:PORT] (default port 443), or with --method a URL (https://HOST/PATH).
        destination: String,
    },
    /// Mint or inspect signed session credentials.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print the policy entries that would admit what a decision log shows refused (or would-denied).
    Suggest {
        /// The decision log (JSON lines as sluice writes them; `-` for stdin; gzip'd files too).
        #[arg(long)]
        log: PathBuf,
        /// Only this session's records.
        #[arg(long)]
        session: Option<String>,
        /// Only this policy's records (name or file); its `ports` decide which entries need :PORT.
        #[arg(long)]
        policy: Option<String>,
        /// Policy directory (default: ./policies when it exists, else the built-in policies).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Print the suggestion as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-decide every recorded request against a candidate policy and print what would change;
    /// exit 1 when anything would become denied.
    Replay {
        /// The decision log (JSON lines; `-` for stdin; gzip'd files too).
        #[arg(long)]
        log: PathBuf,
        /// The candidate policy: a file, or a name in the policy directory.
        #[arg(long)]
        policy: String,
        /// Policy directory the candidate is read against (its defaults.toml).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create or show the CA that signs the certificates of inspected tunnels.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print what a sandbox sources to use sluice: proxy variables with a fresh credential, and the CA
    /// variables curl, git, Python, pip, Node, npm, cargo, Go, Java and Ruby read.
    Env {
        /// Session id.
        #[arg(long)]
        session: String,
        /// Policy name (default: trusted).
        #[arg(long)]
        policy: Option<String>,
        /// Server configuration, for [egress] listen (default: sluice.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// HOST:PORT the sandbox reaches the proxy at (default: [egress] listen).
        #[arg(long)]
        proxy: Option<String>,
        /// Credential lifetime: 30s, 15m, 8h, 7d.
        #[arg(long, default_value = "8h")]
        ttl: String,
        /// Where the sandbox keeps the sluice CA certificate.
        #[arg(long, default_value = "/usr/local/share/ca-certificates/sluice.crt")]
        ca_cert: String,
        /// The sandbox's trust bundle once the CA is installed in it.
        #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
        ca_bundle: String,
        /// Signing key file (default: the SLUICE_SIGNING_KEY environment variable).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Lint policy files: errors as file:line:col with a snippet and a hint, then warnings.
    Validate {
        /// Files or directories (default: policies/).
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a signed credential for an orchestrator or a test.
    Mint {
        #[arg(long, value_enum)]
        kind: KindArg,
        /// Session id (the user name in HTTPS_PROXY=http://ID:TOKEN@host:port).
        #[arg(long)]
        session: String,
        /// Policy name, for --kind egress (default: trusted).
        #[arg(long)]
        policy: Option<String>,
        /// OWNER/REPO, for --kind git.
        #[arg(long)]
        repo: Option<String>,
        /// Working branch, for --kind git.
        #[arg(long)]
        branch: Option<String>,
        /// Lifetime: 30s, 15m, 8h, 7d.
        #[arg(long, default_value = "8h")]
        ttl: String,
        /// Signing key file (default: the SLUICE_SIGNING_KEY environment variable).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Print a credential's claims and whether it verifies (never the key).
    Inspect {
        token: String,
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The previous key, accepted during a rotation.
        #[arg(long)]
        previous_key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a fresh CA to DIR/ca.pem and DIR/ca.key (0600); never overwrites either.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print the CA certificate (PEM) and its SHA-256 fingerprint.
    Show {
        /// Server configuration naming [inspect] ca_cert (default: sluice.toml).
        #[arg(long, conflicts_with = "dir")]
        config: Option<PathBuf>,
        /// A directory `sluice ca init` wrote.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Egress,
    Git,
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
        Command::Serve { config, key_file } => serve(config, key_file),
        Command::Check { policies, policy, json, method, destination } => {
            let args = command::CheckArgs { policies, policy, json, destination, method };
            command::check(&args, &mut out, &mut std::io::stderr().lock())
        }
        Command::Validate { paths } => command::validate(&paths, &mut out),
        Command::Suggest { log, session, policy, policies, json } => {
            let args = sluice::suggest::SuggestArgs { log, session, policy, policies, json };
            sluice::suggest::run(&args, &mut out, &mut std::io::stderr().lock())
        }
        Command::Replay { log, policy, policies, json } => {
            let args = sluice::replay::ReplayArgs { log, policy, policies, json };
            sluice::replay::run(&args, &mut out, &mut std::io::stderr().lock())
        }
        Command::Env { session, policy, config, proxy, ttl, ca_cert, ca_bundle, key_file } => {
            let listen = match config.or_else(|| Some(PathBuf::from("sluice.toml")).filter(|p| p.is_file())) {
                Some(path) => match sluice::config::Config::load(&path) {
                    Ok(c) => c.egress.listen.to_string(),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(command::EXIT_USAGE);
                    }
                },
                None => sluice::config::Config::default().egress.listen.to_string(),
            };
            let args = command::EnvArgs { session, policy, proxy: proxy.unwrap_or(listen), ttl, ca_cert, ca_bundle };
            match command::load_keyring(key_file.as_deref(), None).and_then(|keys| command::env(&args, &keys, &mut out))
            {
                Ok(()) => command::EXIT_OK,
                Err(e) => {
                    eprintln!("sluice env: {e}");
                    command::EXIT_USAGE
                }
            }
        }
        Command::Ca { command: CaCommand::Init { dir } } => {
            command::ca_init(&dir, &mut out, &mut std::io::stderr().lock())
        }
        Command::Ca { command: CaCommand::Show { config, dir } } => {
            let source = match dir {
                Some(d) => command::CaSource::Dir(d),
                None => command::CaSource::Config(config.unwrap_or_else(|| PathBuf::from("sluice.toml"))),
            };
            command::ca_show(&source, &mut out, &mut std::io::stderr().lock())
        }
        Command::Token { command: TokenCommand::Mint { kind, session, policy, repo, branch, ttl, key_file } } => {
            let kind = match kind {
                KindArg::Egress => Kind::Egress,
                KindArg::Git => Kind::Git,
            };
            let args = command::MintArgs { kind, session, policy, repo, branch, ttl };
            let result = command::load_keyring(key_file.as_deref(), None)
                .and_then(|keys| command::token_mint(&args, &keys, &mut out));
            match result {
                Ok(()) => command::EXIT_OK,
                Err(e) => {
                    eprintln!("sluice token mint: {e}");
                    command::EXIT_USAGE
                }
            }
        }
        Command::Token { command: TokenCommand::Inspect { token, key_file, previous_key_file } } => {
            let keys = command::load_keyring(key_file.as_deref(), previous_key_file.as_deref()).ok();
            command::token_inspect(&token, keys.as_ref(), &mut out)
        }
    };
    ExitCode::from(status)
}

fn serve(path: Option<PathBuf>, key_file: Option<PathBuf>) -> u8 {
    let mut config = match path {
        Some(p) => match sluice::config::Config::load(&p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return command::EXIT_USAGE;
            }
        },
        None => sluice::config::Config::default(),
    };
    if key_file.is_some() {
        config.auth.key_file = key_file;
    }
    let audit = match sluice::server::init_logging(&config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice: {e}");
            return command::EXIT_USAGE;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.threads > 0 {
        builder.worker_threads(config.server.threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return command::EXIT_USAGE;
        }
    };
    // Lines still queued at exit are written before the process ends.
    let last_lines = audit.clone();
    let status = runtime.block_on(async {
        let server = match sluice::server::Server::bind(config, audit).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sluice: {e}");
                return command::EXIT_USAGE;
            }
        };
        if let (Some(egress), Some(git), Some(admin)) = (server.egress_addr(), server.git_addr(), server.admin_addr()) {
            tracing::info!(egress = %egress, git = %git, admin = %admin, "sluice listening");
        }
        match server.run(sluice::server::shutdown_on_signals()).await {
            Ok(()) => command::EXIT_OK,
            Err(e) => {
                eprintln!("sluice: {e}");
                command::EXIT_USAGE
            }
        }
    });
    last_lines.flush();
    status
}
