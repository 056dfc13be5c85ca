//! `meshid policy`: the policy file, offline, as a platform team reviews it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use meshid_proto::TrustDomain;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file as the CA would (the same errors, with their lines), plus warnings
    /// for a reviewer. Exit 0: clean; 1: the CA would refuse it; 2: accepted, with warnings.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// The policy file.
    file: PathBuf,
    /// The CA's trust domain: the file must name it [default: the one the file names].
    #[arg(long, env = "MESHID_TRUST_DOMAIN")]
    trust_domain: Option<String>,
}

pub fn run(command: PolicyCommand) -> ExitCode {
    match command {
        PolicyCommand::Check(a) => check(a),
    }
}

fn check(a: CheckArgs) -> ExitCode {
    let name = a.file.display().to_string();
    let td = match a
        .trust_domain
        .as_deref()
        .map(TrustDomain::parse)
        .transpose()
    {
        Ok(td) => td,
        Err(e) => {
            eprintln!("meshid: --trust-domain: {e}");
            return ExitCode::FAILURE;
        }
    };
    let text = match std::fs::read_to_string(&a.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: error: reading it: {e}");
            return ExitCode::FAILURE;
        }
    };
    match meshid_ca::policy::check(&text, td.as_ref()) {
        Err(e) => {
            match e.line {
                Some(line) => eprintln!("{name}:{line}: error: {}", e.message),
                None => eprintln!("{name}: error: {}", e.message),
            }
            eprintln!("{name}: refused: the CA would keep its last good policy");
            ExitCode::FAILURE
        }
        Ok((dir, warnings)) => {
            for w in &warnings {
                println!("{name}:{}: warning: {}", w.line, w.message);
            }
            let services = dir.services().len();
            let routes: usize = dir.services().values().map(|s| s.routes.len()).sum();
            let grants: usize = dir.services().values().map(|s| s.callers.len()).sum();
            if warnings.is_empty() {
                println!(
                    "{name}: ok: {services} services, {routes} routes, {grants} caller grants"
                );
                ExitCode::SUCCESS
            } else {
                println!(
                    "{name}: accepted with {} warning(s): {services} services, {routes} routes, {grants} caller grants",
                    warnings.len()
                );
                ExitCode::from(2)
            }
        }
    }
}
