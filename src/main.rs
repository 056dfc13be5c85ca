//! `meshid`: one binary for the CA control plane and the workload side.
//!
//! This file is the command line: clap types, turning flags into each component's checked
//! config, and `anyhow` context for what an operator sees when something is wrong.

mod ca_args;
mod ca_cmd;
mod check_cmd;
mod config_file;
mod demo;
mod init_iptables;
mod inject_cmd;
mod inspect;
mod limit_args;
mod policy_cmd;
mod rotate_cmd;
mod sidecar_cmd;
mod svid_cmd;
mod token_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "meshid",
    version,
    about = "Service-mesh identity: SPIFFE certificates for every workload"
)]
struct Cli {
    /// Log output format.
    #[arg(
        long,
        global = true,
        env = "MESHID_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `meshid_ca=debug`.
    #[arg(long, global = true, env = "MESHID_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The whole mesh on loopback in one command: a CA, two sidecars, two services.
    Demo,
    /// The control plane and its operator commands.
    Ca {
        #[command(subcommand)]
        command: ca_cmd::CaCommand,
    },
    /// The per-pod agent and proxy: identity, mutual TLS, tokens, inbound enforcement.
    Sidecar(Box<sidecar_cmd::SidecarArgs>),
    /// Workload certificates from the command line.
    Svid {
        #[command(subcommand)]
        command: svid_cmd::SvidCommand,
    },
    /// Fetch an OAuth access token from the CA with an SVID (mutual TLS).
    Token(token_cmd::TokenArgs),
    /// Print an SVID (PEM certificates) or an access token (JWT) in human form.
    Inspect {
        /// A PEM file (svid.pem, bundle.pem, any chain) or a file holding one JWT.
        file: std::path::PathBuf,
    },
    /// Transparent interception rules for one pod (run by an init container with NET_ADMIN).
    InitIptables(init_iptables::InitIptablesArgs),
    /// Add the sidecar to Kubernetes workloads: YAML in (files or stdin), YAML out.
    Inject(inject_cmd::InjectArgs),
    /// Wait until the sidecar says it is ready (the pre-1.29 layout's postStart hook).
    WaitReady(inject_cmd::WaitReadyArgs),
    /// Shell completions for meshid, on stdout (e.g. `meshid completions bash >
    /// /etc/bash_completion.d/meshid`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The health of a live mesh: the CA, its chain and expiry, rotation, token keys, clock
    /// skew, the policy in force and the local SVID; one line each, ok, warn or fail.
    Check(Box<check_cmd::CheckArgs>),
    /// The policy file, offline: check it as the CA would, with a reviewer's warnings.
    Policy {
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
}

fn main() -> ExitCode {
    use clap::CommandFactory;
    // `--config FILE` settings become flags first (flag > environment > file > default).
    let argv = match config_file::expand(&Cli::command(), std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("meshid: {e}");
            return ExitCode::from(2);
        }
    };
    let checking = argv
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        .is_some_and(|a| a == "check");
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        // `meshid check` keeps exit 2 for "warnings": a usage error there is a failure.
        Err(e) if checking && e.use_stderr() => {
            let _ = e.print();
            return ExitCode::FAILURE;
        }
        Err(e) => e.exit(),
    };
    // Offline and synchronous, with its own exit codes.
    let cli = match cli.command {
        Command::Policy { command } => return policy_cmd::run(command),
        Command::Check(args) => return check_cmd::run(*args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "meshid", &mut script);
            // A closed pipe (`| head`) is the reader's choice, not an error worth a panic.
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(&script);
            return ExitCode::SUCCESS;
        }
        command => Cli { command, ..cli },
    };
    // The sidecar runs on as many threads as it is given (one: a single event loop, with no
    // hand-offs between threads); everything else uses one worker per core.
    let runtime = match &cli.command {
        Command::Sidecar(args) if args.workers.get() == 1 => {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        Command::Sidecar(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers.get())
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshid: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let service = match &cli.command {
        Command::Ca { .. } => "meshid-ca",
        Command::Sidecar(_) => "meshid-sidecar",
        _ => "meshid",
    };
    let result = runtime.block_on(async {
        let telemetry =
            meshid::telemetry::init(matches!(cli.log_format, LogFormat::Json), &cli.log, service);
        let result = match cli.command {
            Command::Ca { command } => ca_cmd::run(command).await,
            Command::Svid { command } => svid_cmd::run(command).await,
            Command::Token(args) => token_cmd::run(args).await,
            Command::Demo => demo::run().await,
            Command::Sidecar(args) => sidecar_cmd::run(*args).await,
            Command::Inspect { file } => inspect::run(&file),
            Command::InitIptables(args) => init_iptables::run(args).await,
            Command::Inject(args) => inject_cmd::run(args),
            Command::WaitReady(args) => inject_cmd::wait_ready(args).await,
            // Handled above, before the runtime; here for completeness.
            Command::Policy { command } => {
                policy_cmd::run(command);
                Ok(())
            }
            Command::Completions { .. } | Command::Check(_) => Ok(()),
        };
        telemetry.shutdown();
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshid: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause whose text the message already holds (many
/// errors print their source and also return it from `source()`).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// A cancellation token that fires on SIGINT/SIGTERM (logging "stopping"), for the long-running
/// commands.
pub fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stopper = shutdown.clone();
    let stop = stop_signal();
    tokio::spawn(async move {
        stop.await;
        tracing::info!("stopping");
        stopper.cancel();
    });
    shutdown
}

/// Resolves when the process is asked to stop (SIGINT/Ctrl-C or SIGTERM). The handlers are
/// installed when this is called, not when the future is first polled, so a signal that
/// arrives early is not lost to the default action (which would skip all clean-up).
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        match (interrupt, terminate) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
