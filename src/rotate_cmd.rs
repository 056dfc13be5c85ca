//! `meshid ca rotate ...`, `meshid ca revoke`, `meshid ca unrevoke`: operator commands that talk
//! to the running CA through its admin endpoint, with the credential it keeps in its data
//! directory (so only whoever may read the CA's keys may rotate them).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use meshid_ca::rotation::Status;
use meshid_ca::serve::admin::{ADDR_FILE, TOKEN_FILE};

#[derive(Args)]
pub struct RotateArgs {
    #[command(subcommand)]
    step: RotateStep,
}

#[derive(Subcommand)]
enum RotateStep {
    /// A new key: its root joins the bundle (its kid the JWKS) before it signs anything.
    Prepare(StepArgs),
    /// The prepared key signs from now on; sidecars holding an SVID of the old one renew
    /// within the renewal window. Waits for every connected sidecar to trust a new root.
    Activate(StepArgs),
    /// The old root leaves the bundle (the old key the JWKS). Refused while an SVID or token
    /// it signed may still be in use.
    Retire(StepArgs),
    /// For an expired intermediate or root: a new one, active at once, the expired one retired.
    Recover(StepArgs),
    /// Every key, its state and expiry, how many live SVIDs chain to it and who holds them.
    Status(Target),
    /// Mark an old authority tainted: every SVID it signed is renewed at once.
    Taint(TaintArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum WhatArg {
    Root,
    Intermediate,
    TokenKey,
}

impl WhatArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Intermediate => "intermediate",
            Self::TokenKey => "token-key",
        }
    }
}

#[derive(Args)]
struct StepArgs {
    #[command(flatten)]
    target: Target,
    /// What to rotate.
    #[arg(long, value_enum, default_value = "root")]
    what: WhatArg,
    /// Take the step even though it is not safe yet (says so loudly, in the log and audit).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct TaintArgs {
    #[command(flatten)]
    target: Target,
    /// The authority ID, as `meshid ca rotate status` prints it.
    #[arg(long)]
    authority: String,
}

/// Which running CA: the one serving this data directory.
#[derive(Args, Clone)]
pub struct Target {
    /// The running CA's data directory (it holds the admin credential and address).
    #[arg(long, env = "MESHID_DATA_DIR")]
    data_dir: PathBuf,
    /// The CA's admin address [default: the one the CA wrote to DATA_DIR/admin.addr].
    /// (Its own variable: the sidecar's MESHID_ADMIN_ADDR must not send the credential there.)
    #[arg(long, env = "MESHID_CA_ADMIN_ADDR")]
    admin_addr: Option<String>,
    /// Print the CA's JSON answer instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    target: Target,
    /// Every SVID of this identity.
    #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
    spiffe_id: Option<String>,
    /// One SVID, by its serial number in hex (as `meshid inspect` prints it).
    #[arg(long)]
    serial: Option<String>,
    /// Why (kept in the audit log and in `status`).
    #[arg(long, default_value = "")]
    reason: String,
}

fn read(dir: &Path, name: &str) -> anyhow::Result<String> {
    let p = dir.join(name);
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_owned())
        .with_context(|| {
            format!(
                "reading {} (written by a running `meshid ca serve --data-dir {}`; is it running, and may you read its data directory?)",
                p.display(),
                dir.display()
            )
        })
}

/// One admin request; the JSON answer, or the CA's refusal as an error.
async fn call(
    target: &Target,
    method: &str,
    path_and_query: &str,
) -> anyhow::Result<serde_json::Value> {
    let token = read(&target.data_dir, TOKEN_FILE)?;
    let addr = match &target.admin_addr {
        Some(a) => a.clone(),
        None => read(&target.data_dir, ADDR_FILE)?,
    };
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .with_context(|| format!("connecting to the CA's admin endpoint at {addr}"))?;
    // The credential goes to this host's CA only (the operator API answers on loopback only).
    let peer = tcp.peer_addr()?.ip().to_canonical();
    if !(peer.is_loopback() || peer.is_unspecified()) {
        anyhow::bail!(
            "the CA's admin endpoint {addr} is not on this host ({peer}): run this command on the CA's host (in Kubernetes: kubectl exec into the CA's pod)"
        );
    }
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(http::header::HOST, &addr)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body).with_context(|| {
        format!(
            "the admin endpoint answered {status} with {:?}",
            String::from_utf8_lossy(&body)
        )
    })?;
    if !status.is_success() {
        let mut msg = value["error"].as_str().unwrap_or("refused").to_owned();
        if let Some(w) = value["waiting_for"].as_array()
            && !w.is_empty()
        {
            msg.push_str("\nwaiting for:");
            for item in w {
                msg.push_str("\n  - ");
                msg.push_str(item.as_str().unwrap_or_default());
            }
        }
        bail!("{msg}");
    }
    Ok(value)
}

fn print_report(target: &Target, value: &serde_json::Value) {
    if target.json {
        println!("{value:#}");
        return;
    }
    let list = |key: &str| -> Vec<String> {
        value[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    for c in list("changed") {
        println!("changed: {c}");
    }
    for w in list("waiting_for") {
        println!("next: {w}");
    }
}

fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    q.finish()
}

pub async fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let (step, a) = match args.step {
        RotateStep::Status(target) => {
            let value = call(&target, "GET", "/rotation").await?;
            if target.json {
                println!("{value:#}");
            } else {
                let status: Status = serde_json::from_value(value)
                    .context("the CA's status answer does not parse")?;
                print!("{}", status.render());
            }
            return Ok(());
        }
        RotateStep::Taint(t) => {
            let value = call(
                &t.target,
                "POST",
                &format!("/rotation/taint?{}", query(&[("authority", &t.authority)])),
            )
            .await?;
            print_report(&t.target, &value);
            return Ok(());
        }
        RotateStep::Prepare(a) => ("prepare", a),
        RotateStep::Activate(a) => ("activate", a),
        RotateStep::Retire(a) => ("retire", a),
        RotateStep::Recover(a) => ("recover", a),
    };
    let mut pairs = vec![("what", a.what.as_str())];
    if a.force {
        pairs.push(("force", "true"));
    }
    let value = call(
        &a.target,
        "POST",
        &format!("/rotation/{step}?{}", query(&pairs)),
    )
    .await?;
    print_report(&a.target, &value);
    Ok(())
}

pub async fn revoke(args: RevokeArgs, revoke: bool) -> anyhow::Result<()> {
    let mut pairs = vec![];
    match (&args.spiffe_id, &args.serial) {
        (Some(id), None) => pairs.push(("spiffe_id", id.as_str())),
        (None, Some(s)) => pairs.push(("serial", s.as_str())),
        _ => bail!("give exactly one of --spiffe-id or --serial"),
    }
    if revoke && !args.reason.is_empty() {
        pairs.push(("reason", args.reason.as_str()));
    }
    let value = call(
        &args.target,
        if revoke { "POST" } else { "DELETE" },
        &format!("/revocations?{}", query(&pairs)),
    )
    .await?;
    print_report(&args.target, &value);
    Ok(())
}
