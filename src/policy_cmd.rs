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
    /// What a change to the policy grants (+) and revokes (-), per service and caller, for the
    /// review of a policy change. Exit 0: no change in access; 1: a file is refused; 2: changes.
    Diff(DiffArgs),
    /// The decision the callee's sidecar would make for one call, step by step, and the
    /// smallest policy change that would allow it. Exit 0: allowed; 1: bad input; 2: refused.
    Explain(ExplainArgs),
    /// Who may call whom with which scopes, as a picture: SVG (drawn here, no Graphviz
    /// needed) or DOT (for Graphviz), on stdout.
    Graph(GraphArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum GraphFormat {
    Svg,
    Dot,
}

#[derive(Args)]
pub struct GraphArgs {
    /// The policy file.
    file: PathBuf,
    #[arg(long, value_enum, default_value = "svg")]
    format: GraphFormat,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The policy file.
    file: PathBuf,
    /// The calling service, by name or SPIFFE ID.
    #[arg(long)]
    caller: String,
    /// The called service, by name or SPIFFE ID.
    #[arg(long)]
    callee: String,
    /// The request's method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// The request's path, as the caller's app sends it.
    path: String,
}

#[derive(Args)]
pub struct DiffArgs {
    /// The policy in force.
    old: PathBuf,
    /// The proposed policy.
    new: PathBuf,
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
        PolicyCommand::Diff(a) => diff(a),
        PolicyCommand::Explain(a) => explain(a),
        PolicyCommand::Graph(a) => graph(a),
    }
}

fn graph(a: GraphArgs) -> ExitCode {
    match compiled(&a.file) {
        Ok(dir) => {
            print!(
                "{}",
                match a.format {
                    GraphFormat::Svg => meshid_ca::policy_graph::svg(&dir),
                    GraphFormat::Dot => meshid_ca::policy_graph::dot(&dir),
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn explain(a: ExplainArgs) -> ExitCode {
    let dir = match compiled(&a.file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let find = |who: &str, flag: &str| {
        meshid_ca::policy_explain::find(&dir, who).ok_or_else(|| {
            format!(
                "meshid: {flag} {who:?} is neither a service name nor a SPIFFE ID of {}",
                a.file.display()
            )
        })
    };
    let (caller, callee) = match (find(&a.caller, "--caller"), find(&a.callee, "--callee")) {
        (Ok(c), Ok(d)) => (c, d),
        (c, d) => {
            for e in [c.err(), d.err()].into_iter().flatten() {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    if !a.path.starts_with('/') {
        eprintln!("meshid: the path {:?} must start with '/'", a.path);
        return ExitCode::FAILURE;
    }
    let e = meshid_ca::policy_explain::explain(caller, callee, &a.method, &a.path);
    println!(
        "{} {} from {} to {}:",
        a.method.to_ascii_uppercase(),
        a.path,
        caller.name,
        callee.name
    );
    for (i, step) in e.steps.iter().enumerate() {
        println!("  {}. {step}", i + 1);
    }
    println!("decision: {}", e.decision);
    if let Some(fix) = &e.fix {
        println!("to allow it: {fix}");
    }
    println!(
        "(not known from the policy: a revoked caller, and a token refused for its signature, expiry or certificate binding)"
    );
    if e.status == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// A policy file compiled for review, or the message that says why not.
fn compiled(file: &std::path::Path) -> Result<meshid_proto::directory::Directory, String> {
    let name = file.display();
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("{name}: error: reading it: {e}"))?;
    meshid_ca::policy::check(&text, None)
        .map(|(dir, _)| dir)
        .map_err(|e| match e.line {
            Some(line) => format!("{name}:{line}: error: {}", e.message),
            None => format!("{name}: error: {}", e.message),
        })
}

fn diff(a: DiffArgs) -> ExitCode {
    let (old, new) = match (compiled(&a.old), compiled(&a.new)) {
        (Ok(o), Ok(n)) => (o, n),
        (o, n) => {
            for e in [o.err(), n.err()].into_iter().flatten() {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    if old.trust_domain != new.trust_domain {
        println!(
            "trust domain: {} (was {}): every SPIFFE ID changes",
            new.trust_domain, old.trust_domain
        );
    }
    let changes = meshid_ca::policy_diff::diff(&old, &new);
    if changes.is_empty() && old.trust_domain == new.trust_domain {
        println!("no change in who may call whom with which scopes");
        return ExitCode::SUCCESS;
    }
    let (mut grants, mut revokes, mut other) = (0, 0, 0);
    for (service, list) in &changes {
        println!("{service}:");
        for c in list {
            println!("  {} {}", c.sign(), c.text());
            match c.sign() {
                '+' => grants += 1,
                '-' => revokes += 1,
                _ => other += 1,
            }
        }
    }
    println!("{grants} granted, {revokes} revoked, {other} changed");
    ExitCode::from(2)
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
