//! The checked configuration of `meshid ca serve`. Built once from flags by the CLI; deep code
//! never re-checks a flag.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use meshid_proto::TrustDomain;

/// Where the CA's signing key comes from on a new data directory.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// Generate a root and an intermediate.
    Generate,
    /// The operator's root: meshid generates the intermediate under it.
    Root { cert: PathBuf, key: PathBuf },
    /// The operator's intermediate and the root it chains to.
    Intermediate {
        root_cert: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

/// How Kubernetes ServiceAccount tokens are checked.
#[derive(Debug, Clone)]
pub enum K8sConfig {
    Disabled,
    TokenReview {
        api_url: String,
        ca_file: PathBuf,
        token_file: PathBuf,
    },
    Oidc {
        issuer: String,
        jwks_file: PathBuf,
    },
}

/// Where the CA keeps its state ([`crate::store`]).
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The data directory: one CA (the default).
    DataDir,
    /// The Kubernetes API: several replicas share one CA.
    Kubernetes(crate::store::KubeStoreConfig),
}

#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The bounds of every listener (timeouts, connection cap, header size, drain).
    pub limits: meshid_proto::serve::Limits,
    /// Repeated refusals from one peer for one reason within this window are one audit record.
    pub audit_window: Duration,
    /// The audit log, and with [`StoreConfig::DataDir`] the CA's state.
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    /// This replica's name (its pod's name in Kubernetes): names its own records and its hold
    /// on the rotation lease.
    pub replica: String,
    pub trust_domain: TrustDomain,
    pub grpc_addr: SocketAddr,
    pub svid_ttl: Duration,
    pub source: CaSource,
    pub k8s: K8sConfig,
    /// Extra DNS names for the CA's serving certificate (beyond `localhost`).
    pub dns_names: Vec<String>,
    /// Extra IP addresses for the CA's serving certificate (beyond 127.0.0.1 and ::1).
    pub ip_addresses: Vec<IpAddr>,
    /// HTTPS listen address: `POST /token`, JWKS and RFC 8414 metadata.
    pub http_addr: SocketAddr,
    /// Admin listen address: `/healthz`, `/ready`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// The policy file (services, scopes, routes, callers); none = no services, no tokens.
    pub policy: Option<PathBuf>,
    /// `iss` of every access token, and the base of the metadata URLs.
    pub token_issuer: String,
    /// Default access-token lifetime (capped at 15 min and the caller certificate's life).
    pub token_ttl: Duration,
    /// Token requests per second per caller identity.
    pub token_rate_limit: u32,
    /// Algorithm of newly created token-signing keys.
    pub token_alg: crate::token::TokenAlg,
    /// What the admission webhook (`POST /inject` on the HTTPS port) puts into pods.
    pub inject: crate::inject::InjectConfig,
    /// Rotation: lifetimes of new keys, the renewal spread, the automatic schedule.
    pub rotation: RotationConfig,
}

/// How the CA's keys are rotated ([`crate::rotation`]).
#[derive(Debug, Clone, Copy)]
pub struct RotationConfig {
    /// Lifetimes of a generated root and intermediate.
    pub lifetimes: crate::authority::Lifetimes,
    /// How long a token-signing key signs before the schedule replaces it.
    pub token_key_ttl: Duration,
    /// Sidecars holding an SVID of a superseded authority renew within this window.
    pub renew_window: Duration,
    /// Prepare at half of the active key's life, activate a sixth before its end, retire
    /// when safe, with no operator.
    pub auto: bool,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            lifetimes: Default::default(),
            token_key_ttl: Duration::from_secs(30 * 24 * 3600),
            renew_window: Duration::from_secs(120),
            auto: true,
        }
    }
}
