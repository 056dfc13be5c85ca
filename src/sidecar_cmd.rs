//! `meshid sidecar`: flags -> a checked `SidecarConfig`, then the sidecar until SIGTERM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use meshid::sidecar::identity::AttestSource;
use meshid::sidecar::{self, CaClientConfig, SidecarConfig};
use meshid_proto::{Secret, TrustBundle, TrustDomain};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct SidecarArgs {
    /// The CA's gRPC address, HOST:PORT.
    #[arg(long, env = "MESHID_CA")]
    ca: String,
    /// Trust bundle (PEM) to bootstrap with; the CA's bundle stream keeps it current.
    #[arg(long, env = "MESHID_CA_BUNDLE")]
    ca_bundle: PathBuf,
    /// The trust domain.
    #[arg(long, env = "MESHID_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// A join token (use --reusable ones, so the sidecar can attest again after a long outage).
    #[arg(
        long,
        env = "MESHID_JOIN_TOKEN",
        conflicts_with = "k8s_token_file",
        required_unless_present = "k8s_token_file"
    )]
    join_token: Option<String>,
    /// A projected ServiceAccount token file (audience meshid-ca), re-read at every attestation.
    #[arg(long, env = "MESHID_K8S_TOKEN_FILE")]
    k8s_token_file: Option<PathBuf>,
    /// Where svid.pem, svid_key.pem (0600) and bundle.pem live; files replaced here are reloaded.
    #[arg(long, env = "MESHID_CERT_DIR")]
    cert_dir: PathBuf,
    /// The app this sidecar fronts, 127.0.0.1:PORT.
    #[arg(long, env = "MESHID_APP")]
    app: SocketAddr,
    /// Inbound mutual-TLS listener.
    #[arg(long, env = "MESHID_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    /// Outbound HTTP proxy for the app (HTTP_PROXY=http://127.0.0.1:15001).
    #[arg(long, env = "MESHID_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    outbound_addr: SocketAddr,
    /// Admin endpoint: /healthz, /ready, /metrics.
    #[arg(long, env = "MESHID_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Where a service's sidecar listens, NAME=HOST:PORT (repeatable); otherwise NAME:15006.
    #[arg(long = "route", env = "MESHID_ROUTE", value_delimiter = ',')]
    routes: Vec<String>,
}

impl TryFrom<SidecarArgs> for SidecarConfig {
    type Error = anyhow::Error;

    fn try_from(a: SidecarArgs) -> anyhow::Result<Self> {
        let trust_domain = TrustDomain::parse(&a.trust_domain).context("--trust-domain")?;
        let pem = std::fs::read(&a.ca_bundle)
            .with_context(|| format!("reading --ca-bundle {}", a.ca_bundle.display()))?;
        let bundle = TrustBundle::from_pem(trust_domain.clone(), &pem).context("--ca-bundle")?;
        let attest = match (a.join_token, a.k8s_token_file) {
            (Some(t), None) => AttestSource::JoinToken(Secret::new(t)),
            (None, Some(f)) => AttestSource::K8sTokenFile(f),
            _ => bail!("give exactly one of --join-token and --k8s-token-file"),
        };
        let mut routes = HashMap::new();
        for r in a.routes {
            let Some((name, addr)) = r.split_once('=') else {
                bail!("--route {r:?} must be NAME=HOST:PORT");
            };
            if !meshid_proto::directory::valid_service_name(name) || !addr.contains(':') {
                bail!("--route {r:?} must be NAME=HOST:PORT with a service name");
            }
            routes.insert(name.to_owned(), addr.to_owned());
        }
        if !a.app.ip().is_loopback() {
            tracing::warn!(
                "--app {} is not on loopback: traffic from the sidecar to the app leaves the pod unencrypted",
                a.app
            );
        }
        Ok(SidecarConfig {
            ca: CaClientConfig {
                addr: a.ca,
                bundle,
                trust_domain,
            },
            attest,
            cert_dir: a.cert_dir,
            app: a.app,
            inbound_addr: a.inbound_addr,
            outbound_addr: a.outbound_addr,
            admin_addr: a.admin_addr,
            routes,
        })
    }
}

pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let config = SidecarConfig::try_from(args)?;
    let shutdown = CancellationToken::new();
    let stopper = shutdown.clone();
    let stop = crate::stop_signal();
    tokio::spawn(async move {
        stop.await;
        tracing::info!("stopping");
        stopper.cancel();
    });
    sidecar::run(config, shutdown).await?;
    Ok(())
}
