//! Flags every workload-side command shares: where the CA is and how to trust it, and how to
//! prove who we are. Flattened into `svid fetch` and `sidecar`, so they read the same everywhere.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use meshid::sidecar::identity::AttestSource;
use meshid_proto::{Secret, TrustBundle, TrustDomain};

#[derive(Args)]
pub struct CaArgs {
    /// The CA's gRPC address, HOST:PORT; several separated by commas (the CA's replicas):
    /// the sidecar moves to the next when one does not answer.
    #[arg(long, env = "MESHID_CA")]
    pub ca: String,
    /// Trust bundle (PEM) to verify the CA with, e.g. from `meshid ca bundle`.
    #[arg(long, env = "MESHID_CA_BUNDLE")]
    pub ca_bundle: PathBuf,
    /// The CA's trust domain.
    #[arg(long, env = "MESHID_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
}

impl CaArgs {
    /// The bootstrap trust bundle, checked.
    pub fn bundle(&self) -> anyhow::Result<TrustBundle> {
        let td = TrustDomain::parse(&self.trust_domain).context("--trust-domain")?;
        let pem = std::fs::read(&self.ca_bundle)
            .with_context(|| format!("reading --ca-bundle {}", self.ca_bundle.display()))?;
        TrustBundle::from_pem(td, &pem)
            .with_context(|| format!("--ca-bundle {}", self.ca_bundle.display()))
    }
}

#[derive(Args)]
pub struct AttestArgs {
    /// A join token from `meshid ca join-token` (make it --reusable for a sidecar, so it can
    /// attest again after a long CA outage).
    // The token is the secret itself: `--help` names the variable but never shows its value.
    #[arg(
        long,
        env = "MESHID_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "k8s_token_file",
        required_unless_present = "k8s_token_file"
    )]
    pub join_token: Option<String>,
    /// A projected ServiceAccount token file (audience meshid-ca), read at every attestation.
    #[arg(long, env = "MESHID_K8S_TOKEN_FILE")]
    pub k8s_token_file: Option<PathBuf>,
}

impl AttestArgs {
    pub fn source(self) -> anyhow::Result<AttestSource> {
        Ok(match (self.join_token, self.k8s_token_file) {
            (Some(t), None) => AttestSource::JoinToken(Secret::new(t)),
            (None, Some(f)) => AttestSource::K8sTokenFile(f),
            _ => bail!("give exactly one of --join-token and --k8s-token-file"),
        })
    }
}
