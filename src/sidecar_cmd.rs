//! `meshid sidecar`: flags -> a checked `SidecarConfig`, then the sidecar until SIGTERM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::ca_args::{AttestArgs, CaArgs};
use meshid::sidecar::{self, CaClientConfig, SidecarConfig};

#[derive(Args)]
pub struct SidecarArgs {
    /// Settings from a YAML file whose keys are these flags' names (`cert-dir: /var/run/meshid`);
    /// a flag or environment variable given as well wins over the file.
    #[arg(long, env = "MESHID_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    ca: CaArgs,
    #[command(flatten)]
    attest: AttestArgs,
    /// Where svid.pem, svid_key.pem (0600) and bundle.pem live; files replaced here are reloaded.
    #[arg(long, env = "MESHID_CERT_DIR")]
    cert_dir: PathBuf,
    /// The app this sidecar fronts, 127.0.0.1:PORT.
    #[arg(long, env = "MESHID_APP")]
    app: SocketAddr,
    /// Inbound mutual-TLS listener(s), comma-separated; `[::]:15006` takes IPv4 and IPv6
    /// (transparent mode redirects the app's inbound ports here).
    #[arg(
        long,
        env = "MESHID_INBOUND_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15006"
    )]
    inbound_addr: Vec<SocketAddr>,
    /// Outbound listener(s), comma-separated: the HTTP proxy for the app
    /// (HTTP_PROXY=http://127.0.0.1:15001), and where iptables redirects the pod's outbound
    /// TCP in transparent mode (add `[::1]:15001` for IPv6).
    #[arg(
        long,
        env = "MESHID_OUTBOUND_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:15001"
    )]
    outbound_addr: Vec<SocketAddr>,
    /// Admin endpoint: /healthz, /ready, /metrics.
    #[arg(long, env = "MESHID_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// The kubelet's probes (`/healthz`, `/ready`, `/app-health/CONTAINER/PROBE`) on an
    /// address of their own, reachable from the pod network (`[::]:15020` when injected),
    /// while `--admin-addr` (with `/metrics`) stays on loopback.
    #[arg(long, env = "MESHID_PROBE_ADDR")]
    probe_addr: Option<SocketAddr>,
    /// Where a service's sidecar listens, NAME=HOST:PORT (repeatable); otherwise NAME:15006.
    #[arg(long = "route", env = "MESHID_ROUTE", value_delimiter = ',')]
    routes: Vec<String>,
    /// Threads that run the sidecar. 1 (the default) is one event loop, as a sidecar that
    /// shares its pod's CPU wants: the least CPU and memory per request. More threads give
    /// more throughput to a pod whose sidecar has cores of its own.
    #[arg(long, env = "MESHID_WORKERS", default_value = "1")]
    pub workers: std::num::NonZeroUsize,
    /// Outbound: time to connect to a callee's sidecar and complete mutual TLS.
    #[arg(long, env = "MESHID_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    connect_timeout: std::time::Duration,
    /// Transparent mode: how long a redirected connection may stay silent before it is taken
    /// for a server-first protocol (MySQL, SMTP) and tunnelled as opaque TCP. Ports the
    /// policy declares opaque are tunnelled at once.
    #[arg(long, env = "MESHID_DETECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    detect_timeout: std::time::Duration,
    /// Tunnels (opaque TCP, CONNECT, passthrough) and upgraded connections (WebSocket) with no
    /// byte moving either way for this long are closed.
    #[arg(long, env = "MESHID_TUNNEL_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    tunnel_idle_timeout: std::time::Duration,
    /// Transparent mode: destination ports (comma-separated) tunnelled as opaque TCP at once,
    /// without detection, besides the ports the policy declares opaque (set from the
    /// `meshid.io/opaque-ports` annotation). The callee's policy must declare them opaque too.
    #[arg(long, env = "MESHID_OPAQUE_PORTS", value_delimiter = ',')]
    opaque_ports: Vec<u16>,
    /// The app's kubelet probes to answer on the admin port at `/app-health/CONTAINER/PROBE`,
    /// as JSON (`meshid inject` sets it): {"app/readinessProbe": {"port": 8080, "path": "/healthz"}}.
    #[arg(long, env = "MESHID_APP_PROBES")]
    app_probes: Option<String>,
    /// The access log: one JSON line per request decision, to `stderr`, a file, or `off`.
    #[arg(long, env = "MESHID_ACCESS_LOG", default_value = "stderr")]
    access_log: sidecar::access_log::Sink,
    /// Log allowed requests too, not only refusals.
    #[arg(long, env = "MESHID_ACCESS_LOG_ALLOWED")]
    access_log_allowed: bool,
    /// Serve the SPIFFE Workload API on this unix socket, for apps that do their own mutual
    /// TLS or want JWT-SVIDs (point SPIFFE_ENDPOINT_SOCKET=unix://PATH at it). The app gets this
    /// pod's identity, private key included.
    #[arg(long, env = "MESHID_WORKLOAD_API_SOCKET", value_name = "PATH")]
    workload_api_socket: Option<PathBuf>,
    /// Only processes with these UIDs (comma-separated; from the kernel, SO_PEERCRED) may call
    /// the Workload API; others get PermissionDenied. Default: whoever can open the socket.
    #[arg(
        long,
        env = "MESHID_WORKLOAD_API_ALLOWED_UIDS",
        value_delimiter = ',',
        value_name = "UID"
    )]
    workload_api_allowed_uids: Vec<u32>,
    /// The Workload API socket's permission bits, in octal. The default lets any process that
    /// can reach the socket's directory connect (in a pod: the containers that mount it).
    #[arg(long, env = "MESHID_WORKLOAD_API_SOCKET_MODE", default_value = "0666", value_parser = parse_mode)]
    workload_api_socket_mode: u32,
    #[command(flatten)]
    limits: crate::limit_args::LimitArgs,
}

/// An octal file mode, `0660` or `660`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal file mode such as 0660")),
    }
}

impl TryFrom<SidecarArgs> for SidecarConfig {
    type Error = anyhow::Error;

    fn try_from(a: SidecarArgs) -> anyhow::Result<Self> {
        if let Some(file) = &a.config {
            tracing::info!(file = %file.display(), "settings from --config");
        }
        let bundle = a.ca.bundle()?;
        let trust_domain = bundle.trust_domain.clone();
        let attest = a.attest.source()?;
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
        if a.connect_timeout.is_zero() {
            bail!("--connect-timeout must be longer than 0s");
        }
        if a.opaque_ports.contains(&0) {
            bail!("--opaque-ports: 0 is not a TCP port");
        }
        if a.tunnel_idle_timeout.is_zero() {
            bail!("--tunnel-idle-timeout must be longer than 0s");
        }
        if a.inbound_addr.is_empty() || a.outbound_addr.is_empty() {
            bail!("--inbound-addr and --outbound-addr need at least one address");
        }
        let limits = a.limits.limits(10_000)?;
        if !a.workload_api_allowed_uids.is_empty() && a.workload_api_socket.is_none() {
            bail!("--workload-api-allowed-uids needs --workload-api-socket");
        }
        let workload_api =
            a.workload_api_socket
                .map(|socket| sidecar::workload_api::WorkloadApiConfig {
                    socket,
                    allowed_uids: a.workload_api_allowed_uids,
                    socket_mode: a.workload_api_socket_mode,
                });
        Ok(SidecarConfig {
            limits,
            connect_timeout: a.connect_timeout,
            detect_timeout: a.detect_timeout,
            tunnel_idle_timeout: a.tunnel_idle_timeout,
            opaque_ports: a.opaque_ports,
            access_log: a.access_log,
            access_log_allowed: a.access_log_allowed,
            workload_api,
            app_probes: match &a.app_probes {
                Some(json) => {
                    meshid::sidecar::admin::parse_app_probes(json).map_err(anyhow::Error::msg)?
                }
                None => HashMap::new(),
            },
            ca: CaClientConfig {
                addr: a.ca.ca,
                bundle,
                bundle_file: Some(a.ca.ca_bundle),
                trust_domain,
            },
            attest,
            cert_dir: a.cert_dir,
            app: a.app,
            inbound_addrs: a.inbound_addr,
            outbound_addrs: a.outbound_addr,
            admin_addr: a.admin_addr,
            probe_addr: a.probe_addr,
            routes,
        })
    }
}

pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let config = SidecarConfig::try_from(args)?;
    sidecar::run(config, crate::shutdown_on_signal()).await?;
    Ok(())
}
