//! `meshid svid fetch`: one SVID to files, then exit (scripts, VMs, jobs).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::ca_args::{AttestArgs, CaArgs};
use meshid_proto::TrustDomain;

use meshid::identity::client::{CaClient, with_retry};
use meshid::identity::files;

#[derive(Subcommand)]
pub enum SvidCommand {
    /// Obtain one SVID and write svid.pem, svid_key.pem (0600) and bundle.pem to --out.
    Fetch(FetchArgs),
    /// Renew the SVID in --cert-dir over mutual TLS (same SPIFFE ID, new key), in place.
    Renew(RenewArgs),
}

#[derive(Args)]
pub struct RenewArgs {
    /// The CA's gRPC address, HOST:PORT.
    #[arg(long, env = "MESHID_CA")]
    ca: String,
    /// The CA's trust domain.
    #[arg(long, env = "MESHID_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Directory holding svid.pem, svid_key.pem and bundle.pem (as written by `svid fetch`).
    #[arg(long, env = "MESHID_CERT_DIR")]
    cert_dir: PathBuf,
    /// Give up after this long if the CA cannot be reached.
    #[arg(long, env = "MESHID_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
pub struct FetchArgs {
    #[command(flatten)]
    ca: CaArgs,
    #[command(flatten)]
    attest: AttestArgs,
    /// Directory to write the SVID into (created if missing).
    #[arg(long, env = "MESHID_OUT")]
    out: PathBuf,
    /// Give up after this long if the CA cannot be reached.
    #[arg(long, env = "MESHID_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub async fn run(command: SvidCommand) -> anyhow::Result<()> {
    match command {
        SvidCommand::Fetch(a) => fetch(a).await,
        SvidCommand::Renew(a) => renew(a).await,
    }
}

async fn renew(a: RenewArgs) -> anyhow::Result<()> {
    let td = TrustDomain::parse(&a.trust_domain).context("--trust-domain")?;
    let current = files::read(&a.cert_dir, td).context("reading the current SVID")?;
    let client = CaClient::new(&a.ca, current.bundle.clone()).context("--ca")?;
    let deadline = Instant::now() + a.timeout;
    let svid = with_retry(deadline, || client.renew(&current))
        .await
        .context("renewing the SVID")?;
    files::write(&a.cert_dir, &svid).context("writing the SVID")?;
    report(&svid, &a.cert_dir);
    Ok(())
}

fn report(svid: &meshid::identity::Svid, dir: &std::path::Path) {
    println!(
        "{} (expires {}) written to {}",
        svid.spiffe_id,
        humantime::format_rfc3339_seconds(svid.not_after),
        dir.display()
    );
}

async fn fetch(a: FetchArgs) -> anyhow::Result<()> {
    let bundle = a.ca.bundle()?;
    let attestation = a
        .attest
        .source()?
        .attestation()
        .await
        .map_err(anyhow::Error::msg)?;
    let client = CaClient::new(&a.ca.ca, bundle).context("--ca")?;
    let deadline = Instant::now() + a.timeout;
    let svid = with_retry(deadline, || client.issue(&attestation))
        .await
        .context("obtaining an SVID")?;
    files::write(&a.out, &svid).context("writing the SVID")?;
    report(&svid, &a.out);
    Ok(())
}
