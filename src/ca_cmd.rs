//! `meshid ca ...`: the control plane (`serve`) and the operator commands that work next to a
//! running CA on the same data directory (`join-token`, `bundle`), through the store's
//! atomic files.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use meshid_ca::attest::join_token;
use meshid_ca::authority::Authorities;
use meshid_ca::config::{CaConfig, CaSource, K8sConfig, StoreConfig};
use meshid_ca::store::{FsStore, KubeStore, KubeStoreConfig, Store};
use meshid_ca::token::TokenAlg;
use meshid_ca::{issue, serve};
use meshid_proto::{SpiffeId, SystemClock, TrustDomain};

#[derive(Subcommand)]
pub enum CaCommand {
    /// Run the CA: gRPC for sidecars and `meshid svid fetch`, HTTPS for OAuth clients.
    Serve(Box<ServeArgs>),
    /// Print a new join token bound to one SPIFFE ID (only its hash is stored).
    JoinToken(JoinTokenArgs),
    /// Print the current trust bundle (PEM), for bootstrapping sidecars.
    Bundle(BundleArgs),
    /// Rotate the root, the intermediate or the token-signing key of the running CA, with no
    /// restart anywhere: prepare, activate, retire (or recover an expired one); status.
    Rotate(crate::rotate_cmd::RotateArgs),
    /// Revoke an identity (or one SVID by serial): the CA stops issuing, renewing and granting
    /// for it, and every sidecar refuses its calls within seconds.
    Revoke(crate::rotate_cmd::RevokeArgs),
    /// Lift a revocation.
    Unrevoke(crate::rotate_cmd::RevokeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Settings from a YAML file whose keys are these flags' names (`data-dir: /var/lib/meshid`);
    /// a flag or environment variable given as well wins over the file.
    #[arg(long, env = "MESHID_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// What the admission webhook (`POST /inject` on the HTTPS port) puts into pods.
    #[command(flatten)]
    inject: crate::inject_cmd::InjectConfigArgs,
    /// Data directory: CA keys (0600), join-token hashes, audit log. Created if missing.
    #[arg(long, env = "MESHID_DATA_DIR")]
    data_dir: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, env = "MESHID_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// gRPC listen address (TLS).
    #[arg(long, env = "MESHID_GRPC_ADDR", default_value = "0.0.0.0:8443")]
    grpc_addr: SocketAddr,
    /// HTTPS listen address: POST /token, /.well-known/jwks.json, RFC 8414 metadata.
    #[arg(long, env = "MESHID_HTTP_ADDR", default_value = "0.0.0.0:8444")]
    http_addr: SocketAddr,
    /// Admin listen address: /healthz, /ready, /metrics (Prometheus).
    #[arg(long, env = "MESHID_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
    admin_addr: SocketAddr,
    /// Policy file (YAML): services, scopes, route rules, callers. Hot-reloaded; a bad change is
    /// refused and the last good policy stays in force. Without it the CA grants no tokens.
    #[arg(long, env = "MESHID_POLICY")]
    policy: Option<PathBuf>,
    /// `iss` of access tokens and base of the metadata URLs [default: https://localhost:<http port>].
    #[arg(long, env = "MESHID_ISSUER")]
    issuer: Option<String>,
    /// Access-token lifetime (at most 15m; never past the caller's certificate). Sidecars
    /// refresh at a third of it, so the default survives a CA outage of over 6 minutes.
    #[arg(long, env = "MESHID_TOKEN_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
    /// Token requests per second per caller identity (429 with Retry-After beyond it).
    #[arg(long, env = "MESHID_TOKEN_RATE_LIMIT", default_value_t = 100)]
    token_rate_limit: u32,
    /// Algorithm of a new token-signing key: ES256 or EdDSA.
    #[arg(long, env = "MESHID_TOKEN_ALG", default_value = "ES256")]
    token_alg: String,
    /// Lifetime of issued SVIDs (at least 1m; never past the CA's own expiry).
    #[arg(long, env = "MESHID_SVID_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    svid_ttl: Duration,
    /// Extra DNS name or IP address for the CA's serving certificate (repeatable). `localhost`,
    /// 127.0.0.1 and ::1 are always included.
    #[arg(long = "san", env = "MESHID_SAN", value_delimiter = ',')]
    sans: Vec<String>,
    /// Bring your own root: its certificate (PEM). meshid makes the intermediate. Used only
    /// when the data directory is new.
    #[arg(
        long,
        env = "MESHID_ROOT_CERT",
        requires = "root_key",
        conflicts_with = "intermediate_cert"
    )]
    root_cert: Option<PathBuf>,
    /// The brought root's private key (PKCS#8 PEM).
    #[arg(long, env = "MESHID_ROOT_KEY", requires = "root_cert")]
    root_key: Option<PathBuf>,
    /// Bring your own intermediate (PEM); needs --intermediate-key and --upstream-bundle.
    #[arg(long, env = "MESHID_INTERMEDIATE_CERT", requires_all = ["intermediate_key", "upstream_bundle"])]
    intermediate_cert: Option<PathBuf>,
    /// The brought intermediate's private key (PKCS#8 PEM).
    #[arg(long, env = "MESHID_INTERMEDIATE_KEY", requires = "intermediate_cert")]
    intermediate_key: Option<PathBuf>,
    /// The root certificate (PEM) the brought intermediate chains to.
    #[arg(long, env = "MESHID_UPSTREAM_BUNDLE", requires = "intermediate_cert")]
    upstream_bundle: Option<PathBuf>,
    #[command(flatten)]
    k8s_api: K8sApiArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// This replica's name, unique among the CA's replicas: it names the replica's own record
    /// of what it issued, and its hold on the rotation lease [default: the host name, which in
    /// Kubernetes is the pod's name].
    #[arg(long, env = "MESHID_REPLICA_NAME")]
    replica_name: Option<String>,
    /// Validate ServiceAccount tokens offline against this JWKS file (the cluster's
    /// `/openid/v1/jwks`) instead of TokenReview; needs --k8s-issuer.
    #[arg(long, env = "MESHID_K8S_JWKS", requires = "k8s_issuer")]
    k8s_jwks: Option<PathBuf>,
    /// The cluster's service-account token issuer (`iss`), for --k8s-jwks.
    #[arg(long, env = "MESHID_K8S_ISSUER")]
    k8s_issuer: Option<String>,
    /// Keep a ConfigMap with the trust bundle (key `bundle.pem`) current in every namespace
    /// this label selector matches, e.g. `meshid.io/inject=enabled`, for pods to mount. Talks
    /// to the API server given by --k8s-api (or the in-cluster defaults). Never deletes.
    #[arg(long, env = "MESHID_BUNDLE_CONFIGMAP_NAMESPACE_SELECTOR")]
    bundle_configmap_namespace_selector: Option<String>,
    /// Name of the bundle ConfigMap.
    #[arg(
        long,
        env = "MESHID_BUNDLE_CONFIGMAP_NAME",
        default_value = meshid_ca::publish::DEFAULT_CONFIGMAP_NAME
    )]
    bundle_configmap_name: String,
    /// Repeated refusals from one peer for one reason within this window are written as one
    /// audit record with a count (the first at once, the rest when the window ends).
    #[arg(long, env = "MESHID_AUDIT_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    audit_window: Duration,
    #[command(flatten)]
    limits: crate::limit_args::LimitArgs,
    /// Lifetime of a root the CA generates (first start, root rotation).
    #[arg(long, env = "MESHID_ROOT_TTL", default_value = "87600h", value_parser = humantime::parse_duration)]
    root_ttl: Duration,
    /// Lifetime of an intermediate the CA generates (never past its root).
    #[arg(long, env = "MESHID_INTERMEDIATE_TTL", default_value = "8760h", value_parser = humantime::parse_duration)]
    intermediate_ttl: Duration,
    /// How long a token-signing key signs before the schedule replaces it.
    #[arg(long, env = "MESHID_TOKEN_KEY_TTL", default_value = "720h", value_parser = humantime::parse_duration)]
    token_key_ttl: Duration,
    /// After an activation, sidecars holding an SVID of the old authority renew at a random
    /// moment within this window (so the CA is not stampeded).
    #[arg(long, env = "MESHID_RENEW_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    renew_window: Duration,
    /// Automatic rotation: prepare at half of the active key's life, activate a sixth before
    /// its end, retire when safe. `--auto-rotate false` leaves every step to the operator.
    #[arg(long, env = "MESHID_AUTO_ROTATE", default_value_t = true, action = clap::ArgAction::Set)]
    auto_rotate: bool,
}

/// The Kubernetes API server: for TokenReview, the bundle ConfigMaps and `--store kubernetes`.
#[derive(Args)]
pub struct K8sApiArgs {
    /// Kubernetes API server, https://HOST[:PORT] (default in a pod: from
    /// KUBERNETES_SERVICE_HOST).
    #[arg(long = "k8s-api", env = "MESHID_K8S_API")]
    url: Option<String>,
    /// CA certificate of the API server.
    #[arg(
        long = "k8s-api-ca",
        env = "MESHID_K8S_API_CA",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    ca: PathBuf,
    /// File with the CA's own bearer token for the API server (re-read as it rotates).
    #[arg(
        long = "k8s-api-token-file",
        env = "MESHID_K8S_API_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    token_file: PathBuf,
}

impl K8sApiArgs {
    fn url(&self) -> Option<String> {
        self.url.clone().or_else(in_cluster_api)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// The data directory (one CA).
    DataDir,
    /// Secrets, ConfigMaps and a Lease in the Kubernetes API (several replicas).
    Kubernetes,
}

/// Where the CA's keys, rotation state, token keys, revocations and join tokens live.
#[derive(Args)]
pub struct StoreArgs {
    /// Where the CA's state lives: `data-dir` (the default) or `kubernetes`, shared by every
    /// replica through the API server given by --k8s-api.
    #[arg(
        long = "store",
        env = "MESHID_STORE",
        value_enum,
        default_value = "data-dir"
    )]
    kind: StoreKind,
    /// The namespace of the CA's Secrets, ConfigMaps and Lease with --store kubernetes
    /// [default in a pod: its own namespace].
    #[arg(long = "store-namespace", env = "MESHID_STORE_NAMESPACE")]
    namespace: Option<String>,
}

const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl StoreArgs {
    fn config(&self, api: &K8sApiArgs) -> anyhow::Result<StoreConfig> {
        if self.kind == StoreKind::DataDir {
            if self.namespace.is_some() {
                bail!("--store-namespace is for --store kubernetes");
            }
            return Ok(StoreConfig::DataDir);
        }
        let Some(api_url) = api.url() else {
            bail!(
                "--store kubernetes needs the Kubernetes API server: give --k8s-api https://HOST:PORT (in a pod it is found from KUBERNETES_SERVICE_HOST)"
            );
        };
        let namespace = match &self.namespace {
            Some(ns) => ns.clone(),
            None => std::fs::read_to_string(POD_NAMESPACE_FILE)
                .map(|s| s.trim().to_owned())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "--store kubernetes: give --store-namespace (outside a pod; {POD_NAMESPACE_FILE}: {e})"
                    )
                })?,
        };
        Ok(StoreConfig::Kubernetes(KubeStoreConfig {
            api_url,
            ca_file: api.ca.clone(),
            token_file: api.token_file.clone(),
            namespace,
        }))
    }

    /// The store the operator commands (`join-token`, `bundle`) work on.
    fn open(
        &self,
        api: &K8sApiArgs,
        data_dir: Option<&std::path::Path>,
    ) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match self.config(api)? {
            StoreConfig::DataDir => {
                let Some(data_dir) = data_dir else {
                    bail!("give --data-dir (the CA's), or --store kubernetes");
                };
                Arc::new(
                    FsStore::open(data_dir)
                        .with_context(|| format!("opening {}", data_dir.display()))?,
                )
            }
            StoreConfig::Kubernetes(k) => KubeStore::open(&k)
                .with_context(|| format!("opening the CA store in namespace {}", k.namespace))?,
        })
    }
}

/// This host's name (in Kubernetes, the pod's), as a replica name: lowercase, and any
/// character a DNS name cannot hold made a `-`.
fn host_name() -> Option<String> {
    let name = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())?;
    let name: String = name
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches(['-', '.']).to_owned();
    (!name.is_empty()).then_some(name)
}

#[derive(Args)]
pub struct JoinTokenArgs {
    /// The CA's data directory (required unless --store kubernetes).
    #[arg(long, env = "MESHID_DATA_DIR", required_unless_present = "kind")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    k8s_api: K8sApiArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// The identity the token grants, e.g. spiffe://cluster.local/ns/shop/sa/orders.
    #[arg(long, env = "MESHID_SPIFFE_ID")]
    spiffe_id: String,
    /// How long the token can be used.
    #[arg(long, env = "MESHID_JOIN_TOKEN_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Allow the token to be used more than once (for re-attestation after a long outage).
    #[arg(long, env = "MESHID_JOIN_TOKEN_REUSABLE")]
    reusable: bool,
    /// The CA's trust domain, which --spiffe-id must be in. Read from the CA's certificates in
    /// --data-dir when they name it (a different value here is then an error); needed only for
    /// a brought intermediate without a spiffe:// URI SAN [default there: cluster.local].
    #[arg(long, env = "MESHID_TRUST_DOMAIN")]
    trust_domain: Option<String>,
}

#[derive(Args)]
pub struct BundleArgs {
    /// The CA's data directory (required unless --store kubernetes).
    #[arg(long, env = "MESHID_DATA_DIR", required_unless_present = "kind")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    k8s_api: K8sApiArgs,
    #[command(flatten)]
    store: StoreArgs,
}

impl TryFrom<ServeArgs> for CaConfig {
    type Error = anyhow::Error;

    fn try_from(a: ServeArgs) -> anyhow::Result<Self> {
        if let Some(file) = &a.config {
            tracing::info!(file = %file.display(), "settings from --config");
        }
        let trust_domain = TrustDomain::parse(&a.trust_domain).context("--trust-domain")?;
        if a.svid_ttl < issue::MIN_SVID_TTL {
            bail!("--svid-ttl {:?} is below the minimum of 1m", a.svid_ttl);
        }
        if a.token_ttl.is_zero() || a.token_ttl > Duration::from_secs(15 * 60) {
            bail!("--token-ttl {:?} must be between 1s and 15m", a.token_ttl);
        }
        let token_alg = TokenAlg::parse(&a.token_alg)
            .with_context(|| format!("--token-alg {:?}: use ES256 or EdDSA", a.token_alg))?;
        if a.token_rate_limit == 0 {
            bail!("--token-rate-limit must be at least 1");
        }
        let issuer_given = a.issuer.is_some();
        let token_issuer = match a.issuer {
            Some(iss) => {
                let uri: http::Uri = iss.parse().with_context(|| format!("--issuer {iss:?}"))?;
                if uri.scheme_str() != Some("https") || uri.query().is_some() || iss.ends_with('/')
                {
                    bail!(
                        "--issuer {iss:?} must be an https URL without query or trailing slash (RFC 8414)"
                    );
                }
                iss
            }
            None => format!("https://localhost:{}", a.http_addr.port()),
        };
        let (mut dns_names, mut ip_addresses) = (Vec::new(), Vec::new());
        for san in a.sans {
            match san.parse::<IpAddr>() {
                Ok(ip) => ip_addresses.push(ip),
                Err(_) if !san.is_empty() && san.is_ascii() && !san.contains(['/', ' ', ':']) => {
                    dns_names.push(san)
                }
                Err(_) => bail!("--san {san:?} is neither a DNS name nor an IP address"),
            }
        }
        let source = match (
            a.root_cert,
            a.root_key,
            a.intermediate_cert,
            a.intermediate_key,
            a.upstream_bundle,
        ) {
            (Some(cert), Some(key), None, None, None) => CaSource::Root { cert, key },
            (None, None, Some(cert), Some(key), Some(root_cert)) => CaSource::Intermediate {
                root_cert,
                cert,
                key,
            },
            (None, None, None, None, None) => CaSource::Generate,
            _ => bail!(
                "give either --root-cert and --root-key, or --intermediate-cert, --intermediate-key and --upstream-bundle"
            ),
        };
        let store = a.store.config(&a.k8s_api)?;
        // Every replica must name the same issuer, or a token minted by one is refused by
        // sidecars that follow another.
        if matches!(store, StoreConfig::Kubernetes(_)) && !issuer_given {
            bail!(
                "--store kubernetes needs --issuer: one https URL every replica names in its tokens, e.g. https://meshid-ca.meshid-system.svc:8444 (the CA's Service)"
            );
        }
        let replica = match a.replica_name.or_else(host_name) {
            Some(name) if meshid_ca::store::valid_replica_name(&name) => name,
            Some(name) => bail!(
                "--replica-name {name:?} must be a DNS name (letters, digits, '-', '.'), as a pod's name is"
            ),
            None => bail!("--replica-name: this host has no name; give one"),
        };
        let k8s = match (a.k8s_jwks, a.k8s_issuer, a.k8s_api.url()) {
            (Some(jwks_file), Some(issuer), _) => K8sConfig::Oidc { issuer, jwks_file },
            (None, _, Some(api_url)) => K8sConfig::TokenReview {
                api_url,
                ca_file: a.k8s_api.ca,
                token_file: a.k8s_api.token_file,
            },
            _ => K8sConfig::Disabled,
        };
        let limits = a.limits.limits(50_000)?;
        let min_ca_ttl = issue::MIN_SVID_TTL * 2;
        if a.root_ttl < min_ca_ttl || a.intermediate_ttl < min_ca_ttl {
            bail!(
                "--root-ttl and --intermediate-ttl must be at least 2m (twice the shortest SVID)"
            );
        }
        if a.token_key_ttl < Duration::from_secs(60) {
            bail!("--token-key-ttl must be at least 1m");
        }
        if a.renew_window.is_zero() || a.renew_window > Duration::from_secs(3600) {
            bail!("--renew-window must be between 1s and 1h");
        }
        let rotation = meshid_ca::config::RotationConfig {
            lifetimes: meshid_ca::authority::Lifetimes {
                root: a.root_ttl,
                intermediate: a.intermediate_ttl,
            },
            token_key_ttl: a.token_key_ttl,
            renew_window: a.renew_window,
            auto: a.auto_rotate,
        };
        if a.audit_window.is_zero() {
            bail!("--audit-window must be longer than 0s");
        }
        Ok(CaConfig {
            audit_window: a.audit_window,
            limits,
            data_dir: a.data_dir,
            store,
            replica,
            trust_domain,
            grpc_addr: a.grpc_addr,
            svid_ttl: a.svid_ttl,
            source,
            k8s,
            dns_names,
            ip_addresses,
            http_addr: a.http_addr,
            admin_addr: a.admin_addr,
            policy: a.policy,
            token_issuer,
            token_ttl: a.token_ttl,
            token_rate_limit: a.token_rate_limit,
            token_alg,
            inject: a.inject.into(),
            rotation,
        })
    }
}

pub async fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Serve(args) => {
            let publisher = bundle_publisher(&args)?;
            let config = CaConfig::try_from(*args)?;
            let data_dir = config.data_dir.display().to_string();
            let core = meshid_ca::ca::CaCore::open(config, Arc::new(SystemClock))
                .with_context(|| format!("starting the CA on {data_dir}"))?;
            if let Some(publisher) = publisher {
                core.publish_bundle_configmaps(publisher);
            }
            serve::serve(core, crate::shutdown_on_signal()).await?;
            Ok(())
        }
        CaCommand::JoinToken(args) => {
            let id = SpiffeId::parse(&args.spiffe_id)
                .with_context(|| format!("--spiffe-id {:?}", args.spiffe_id))?;
            if id == id.trust_domain().ca_id() {
                bail!("--spiffe-id {id} is reserved for the CA itself");
            }
            if args.ttl.is_zero() {
                bail!("--ttl must be longer than 0s");
            }
            let store = args.store.open(&args.k8s_api, args.data_dir.as_deref())?;
            // The CA refuses a token for another trust domain when it is presented; refusing
            // it here tells the operator now, not the workload later.
            let (td, from) = join_token_trust_domain(store.as_ref(), &args)?;
            match meshid_ca::attest::check_issuable(&td, &id) {
                Ok(()) => {}
                Err(meshid_ca::attest::IdRefused::OutsideTrustDomain { .. }) => bail!(
                    "--spiffe-id {id} is outside this CA's trust domain: expected an ID in trust domain {td} (spiffe://{td}/...; {from})"
                ),
                Err(meshid_ca::attest::IdRefused::ReservedForCa { .. }) => {
                    bail!("--spiffe-id {id} is reserved for the CA itself")
                }
            }
            let token = join_token::create(
                store.as_ref(),
                &id,
                args.ttl,
                args.reusable,
                std::time::SystemTime::now(),
            )
            .context("storing the join token")?;
            println!("{}", token.expose());
            Ok(())
        }
        CaCommand::Rotate(args) => crate::rotate_cmd::rotate(args).await,
        CaCommand::Revoke(args) => crate::rotate_cmd::revoke(args, true).await,
        CaCommand::Unrevoke(args) => crate::rotate_cmd::revoke(args, false).await,
        CaCommand::Bundle(args) => {
            let store = args.store.open(&args.k8s_api, args.data_dir.as_deref())?;
            let records = store.load_authorities().context("reading CA keys")?.value;
            if records.is_empty() {
                bail!(
                    "the {} holds no CA yet: start `meshid ca serve` on it once first",
                    store.describe()
                );
            }
            // The trust domain does not appear in PEM output; any valid one will do here.
            let td = TrustDomain::parse("cluster.local").expect("static trust domain is valid");
            let authorities = Authorities::new(td, records).context("reading CA keys")?;
            print!("{}", authorities.bundle(0).to_pem());
            Ok(())
        }
    }
}

/// The API server of the cluster this runs in, from the environment kubelet gives every pod.
fn in_cluster_api() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Some(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// The bundle ConfigMap publisher --bundle-configmap-namespace-selector asks for, on the API
/// server connection TokenReview uses (--k8s-api or the in-cluster defaults, --k8s-api-ca,
/// --k8s-api-token-file), whichever way ServiceAccount tokens are checked.
fn bundle_publisher(a: &ServeArgs) -> anyhow::Result<Option<meshid_ca::publish::Publisher>> {
    let Some(selector) = a.bundle_configmap_namespace_selector.clone() else {
        return Ok(None);
    };
    let Some(api_url) = a.k8s_api.url() else {
        bail!(
            "--bundle-configmap-namespace-selector needs the Kubernetes API server: give --k8s-api https://HOST:PORT (in a pod it is found from KUBERNETES_SERVICE_HOST)"
        );
    };
    let publisher = meshid_ca::publish::Publisher::new(meshid_ca::publish::PublishConfig {
        api_url,
        ca_file: a.k8s_api.ca.clone(),
        token_file: a.k8s_api.token_file.clone(),
        namespace_selector: selector,
        configmap_name: a.bundle_configmap_name.clone(),
    })
    .context("--bundle-configmap-namespace-selector")?;
    Ok(Some(publisher))
}

/// The trust domain `join-token` holds --spiffe-id to, and where it came from: what the CA's
/// certificates in the data directory name, else --trust-domain, else `ca serve`'s default.
fn join_token_trust_domain(
    store: &dyn Store,
    args: &JoinTokenArgs,
) -> anyhow::Result<(TrustDomain, String)> {
    let given = args
        .trust_domain
        .as_deref()
        .map(|td| TrustDomain::parse(td).with_context(|| format!("--trust-domain {td:?}")))
        .transpose()?;
    let records = store.load_authorities().context("reading CA keys")?.value;
    let recorded = meshid_ca::authority::recorded_trust_domain(&records)
        .with_context(|| format!("reading CA keys in the {}", store.describe()))?;
    Ok(match (recorded, given) {
        (Some(recorded), Some(given)) if recorded != given => bail!(
            "--trust-domain {given} is not this CA's trust domain: its intermediate certificate in the {} names {recorded}",
            store.describe()
        ),
        (Some(recorded), _) => (
            recorded,
            format!(
                "named by the CA's intermediate certificate in the {}",
                store.describe()
            ),
        ),
        (None, Some(given)) => (given, "from --trust-domain".to_owned()),
        (None, None) => (
            TrustDomain::parse("cluster.local").expect("static trust domain is valid"),
            format!(
                "the default: the CA's certificates in the {} name none, give --trust-domain",
                store.describe()
            ),
        ),
    })
}
