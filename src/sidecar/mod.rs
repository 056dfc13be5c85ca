//! The sidecar (`meshid sidecar`): the per-pod agent and proxy.
//!
//! Start-up: the admin endpoint first (not ready), then an identity (from a valid SVID left in
//! the cert directory, else by attestation), then the CA's bundle and directory streams, then
//! the inbound (mTLS, `:15006`) and outbound (HTTP proxy, `127.0.0.1:15001`) listeners. For the
//! pod's life: renewal, file reloads, bundle and directory updates.

pub mod access_log;
pub mod admin;
pub mod control;
pub mod dial;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod proxy;
pub mod rate_limit;
pub mod tls;
pub mod token_cache;
pub mod transparent;
pub mod tunnel;
pub mod workload_api;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use meshid_proto::TrustDomain;
use meshid_proto::serve::{Limits, Server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::identity::client::CaClient;
use crate::identity::files;

/// The sidecar's checked configuration.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub ca: CaClientConfig,
    pub attest: identity::AttestSource,
    pub cert_dir: PathBuf,
    pub app: SocketAddr,
    /// Inbound listeners (one per address: `0.0.0.0:15006`, and `[::]:15006` for IPv6).
    pub inbound_addrs: Vec<SocketAddr>,
    /// Outbound listeners (`127.0.0.1:15001`, and `[::1]:15001` where iptables redirects IPv6).
    pub outbound_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// The kubelet's probes on the pod network (`/healthz`, `/ready`, `/app-health`), apart
    /// from the admin endpoint.
    pub probe_addr: Option<SocketAddr>,
    /// Service name -> HOST:PORT of its sidecar, when DNS is not used.
    pub routes: HashMap<String, String>,
    /// The bounds of every listener (timeouts, connection cap, header size, drain).
    pub limits: Limits,
    /// Outbound: time to connect to and complete mutual TLS with a callee's sidecar.
    pub connect_timeout: Duration,
    /// Transparent mode: how long a redirected connection may stay silent before it is taken
    /// for a server-first protocol and tunnelled as opaque TCP.
    pub detect_timeout: Duration,
    /// Tunnels and upgraded connections with no byte either way for this long are closed.
    pub tunnel_idle_timeout: Duration,
    /// Destination ports tunnelled as opaque TCP without detection (besides the policy's).
    pub opaque_ports: Vec<u16>,
    /// The app's kubelet probes, answered on the admin port.
    pub app_probes: HashMap<String, admin::AppProbe>,
    /// Where the access log goes, and whether allowed requests are logged (refusals are).
    pub access_log: access_log::Sink,
    pub access_log_allowed: bool,
    /// The SPIFFE Workload API's socket, when the app wants its own SVID.
    pub workload_api: Option<workload_api::WorkloadApiConfig>,
}

/// The admin endpoint serves a probe and a scraper, never a crowd.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The probe listener serves the kubelet, on the pod network.
const PROBE_MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, Clone)]
pub struct CaClientConfig {
    pub addr: String,
    pub bundle: meshid_proto::TrustBundle,
    /// Where `bundle` came from (`--ca-bundle`): followed for roots added later.
    pub bundle_file: Option<PathBuf>,
    pub trust_domain: TrustDomain,
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("CA client: {0}")]
    Client(#[from] crate::identity::client::ClientError),
    #[error("{0}")]
    Identity(String),
    #[error("access log: {0}")]
    AccessLog(std::io::Error),
    #[error("Workload API socket {0}")]
    WorkloadApi(#[from] workload_api::BindError),
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind { what, addr, source })
}

/// Run until `shutdown`.
pub async fn run(config: SidecarConfig, shutdown: CancellationToken) -> Result<(), SidecarError> {
    let metrics = Arc::new(metrics::Metrics::default());
    let control = Arc::new(control::Control::default());
    let admin = Arc::new(admin::Admin {
        has_svid: AtomicBool::new(false),
        control: control.clone(),
        metrics: metrics.clone(),
        app_probes: config.app_probes.clone(),
    });
    // The access log's file opens now: one that cannot be written is a start-up error.
    let access_log = access_log::AccessLog::start(
        config.access_log.clone(),
        config.access_log_allowed,
        metrics.clone(),
    )
    .map_err(SidecarError::AccessLog)?;
    // Bind everything first: a port in use is a start-up error, not a surprise later.
    let admin_listener = bind("admin", config.admin_addr).await?;
    let probe_listener = match config.probe_addr {
        Some(addr) => Some(bind("probe", addr).await?),
        None => None,
    };
    let mut inbound_listeners = Vec::new();
    for addr in &config.inbound_addrs {
        inbound_listeners.push(bind("inbound", *addr).await?);
    }
    let mut outbound_listeners = Vec::new();
    for addr in &config.outbound_addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => outbound_listeners.push(l),
            // A pod whose kernel has IPv6 turned off has no ::1: it has no IPv6 traffic to
            // take either (`init-iptables` writes IPv6 rules only where IPv6 works).
            Err(e)
                if addr.ip() == std::net::Ipv6Addr::LOCALHOST
                    && e.kind() == std::io::ErrorKind::AddrNotAvailable =>
            {
                tracing::warn!(%addr, "no IPv6 loopback in this pod: not listening there");
            }
            Err(source) => {
                return Err(SidecarError::Bind {
                    what: "outbound",
                    addr: *addr,
                    source,
                });
            }
        }
    }
    // The Workload API's socket: checked now, bound once the pod has an identity (until then
    // a client finds no socket and retries, as SPIFFE libraries do).
    if let Some(w) = &config.workload_api {
        workload_api::check(w)?;
    }
    let admin_limits = Limits {
        max_connections: config.limits.max_connections.min(ADMIN_MAX_CONNECTIONS),
        ..config.limits
    };
    let mut servers = tokio::task::JoinSet::new();
    let server = Server::new("admin", admin_listener, admin_limits);
    metrics.listeners.register(&server);
    servers.spawn(admin::serve(admin.clone(), server, shutdown.clone()));
    if let Some(listener) = probe_listener {
        // Reachable from the pod network: a cap of its own and a short idle bound, so that
        // clients holding connections cannot starve the kubelet's probes for long.
        let probe_limits = Limits {
            max_connections: PROBE_MAX_CONNECTIONS,
            idle_timeout: Duration::from_secs(10),
            header_read_timeout: config
                .limits
                .header_read_timeout
                .min(Duration::from_secs(5)),
            ..config.limits
        };
        let server = Server::new("probe", listener, probe_limits);
        metrics.listeners.register(&server);
        servers.spawn(admin::serve_probes(admin.clone(), server, shutdown.clone()));
    }

    let ca = CaClient::new(&config.ca.addr, config.ca.bundle.clone())?;
    let td = config.ca.trust_domain.clone();
    let svid = match identity::from_disk(&config.cert_dir, &td, &ca) {
        Some(svid) => {
            info!(spiffe_id = %svid.spiffe_id, "using the SVID left in the cert directory");
            svid
        }
        None => {
            let Some(svid) = identity::obtain(&ca, &config.attest, &shutdown).await else {
                return Ok(());
            };
            files::write(&config.cert_dir, &svid)
                .map_err(|e| SidecarError::Identity(e.to_string()))?;
            svid
        }
    };
    info!(spiffe_id = %svid.spiffe_id, "identity held");
    // The SVID's bundle and the --ca-bundle roots: a restarted pod whose SVID predates a root
    // recovery reaches the CA through the new root in its --ca-bundle file.
    let mut trusted = svid.bundle.clone();
    for root in &config.ca.bundle.roots {
        if !trusted.roots.contains(root) {
            trusted.roots.push(root.clone());
        }
    }
    ca.trust()
        .update(trusted)
        .map_err(|e| SidecarError::Identity(e.to_string()))?;
    let identity = identity::Identity::new(
        svid,
        config.cert_dir.clone(),
        metrics.clone(),
        Arc::new(meshid_proto::SystemClock),
    )
    .map_err(SidecarError::Identity)?;
    admin.has_svid.store(true, Ordering::Relaxed);

    let channel = control::ControlChannel::new(ca.clone(), identity.slot.clone());
    // One copy of the CA's token-signing keys for the inbound token checks and the Workload
    // API (JWT bundles, JWT-SVID validation).
    let jwks = Arc::new(meshid_proto::jwks::JwksCache::new(Arc::new(
        control::CaJwks(channel.clone()),
    )));
    control::follow(
        control.clone(),
        ca.clone(),
        channel.clone(),
        config.cert_dir.join(files::BUNDLE_FILE),
        shutdown.clone(),
    );
    tokio::spawn(identity::renew_forever(
        identity.clone(),
        ca.clone(),
        config.attest.clone(),
        control.clone(),
        shutdown.clone(),
    ));
    identity::watch_files(identity.clone(), ca.clone(), td.clone(), shutdown.clone());
    if let Some(file) = &config.ca.bundle_file {
        control::watch_bundle_file(file.clone(), control.clone(), ca.clone(), shutdown.clone());
    }

    let tls = Arc::new(tls::MeshTls::new(identity.slot.clone(), ca.trust(), td));
    let tokens = token_cache::TokenCache::new(
        token_cache::CaTokens::new(ca.clone()),
        metrics.clone(),
        identity.clock.clone(),
    );
    let dialer = dial::Dialer::new(tls.clone(), config.connect_timeout);
    let outbound = outbound::Outbound::new(
        control.clone(),
        identity.clone(),
        dialer,
        tokens,
        metrics.clone(),
        outbound::OutboundConfig {
            routes: config.routes.clone(),
            detect_timeout: config.detect_timeout,
            opaque_ports: config.opaque_ports.clone(),
            drain_timeout: config.limits.drain_timeout,
            header_read_timeout: config.limits.header_read_timeout,
            tunnels: proxy::Tunnels::new(
                config.limits.max_connections,
                config.tunnel_idle_timeout,
                config.limits.drain_timeout,
                shutdown.clone(),
            ),
        },
    );
    let own_ports = std::iter::once(config.admin_addr.port())
        .chain(config.probe_addr.map(|a| a.port()))
        .chain(config.inbound_addrs.iter().map(|a| a.port()))
        .chain(config.outbound_addrs.iter().map(|a| a.port()))
        .collect();
    if let Some(w) = &config.workload_api {
        let listener = workload_api::bind(w)?;
        let api = workload_api::WorkloadApi::new(
            identity.clone(),
            ca.trust(),
            jwks.clone(),
            channel.clone(),
            config.ca.trust_domain.clone(),
            w.allowed_uids.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        servers.spawn(workload_api::serve(
            api,
            listener,
            w.clone(),
            config.limits,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let inbound = inbound::Inbound::new(
        control,
        identity,
        metrics.clone(),
        jwks,
        inbound::InboundConfig {
            app: config.app,
            own_ports,
            connect_timeout: config.connect_timeout,
            tunnels: proxy::Tunnels::new(
                config.limits.max_connections,
                config.tunnel_idle_timeout,
                config.limits.drain_timeout,
                shutdown.clone(),
            ),
            access_log,
        },
    );
    {
        let (inbound, shutdown) = (inbound.clone(), shutdown.clone());
        tokio::spawn(async move { inbound.prime_jwks(shutdown).await });
    }
    for listener in outbound_listeners {
        let server = Server::new("outbound", listener, config.limits);
        metrics.listeners.register(&server);
        servers.spawn(outbound::serve(outbound.clone(), server, shutdown.clone()));
    }
    for listener in inbound_listeners {
        let server = Server::new("inbound", listener, config.limits);
        metrics.listeners.register(&server);
        servers.spawn(inbound::serve(
            inbound.clone(),
            tls.clone(),
            server,
            shutdown.clone(),
        ));
    }
    info!(inbound = ?config.inbound_addrs, outbound = ?config.outbound_addrs, admin = %config.admin_addr, app = %config.app, "sidecar serving");
    // Until shutdown; then each listener stops accepting and drains its requests in flight.
    while servers.join_next().await.is_some() {}
    info!("sidecar stopped");
    Ok(())
}
