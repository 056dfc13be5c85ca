//! `meshid inject` (Kubernetes YAML in, the same with the sidecar added out) and
//! `meshid wait-ready` (what the older, pre-native-sidecar layout holds the app with).

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use meshid_ca::inject::{InjectConfig, inject_yaml};

/// What injection puts into pods: shared by `meshid inject` and the CA's admission webhook.
#[derive(Args, Clone, Debug)]
pub struct InjectConfigArgs {
    /// The sidecar image.
    #[arg(long = "inject-image", env = "MESHID_INJECT_IMAGE", default_value_t = InjectConfig::default().image)]
    pub image: String,
    /// The image of the init container that writes the iptables rules (the binary plus iptables).
    #[arg(long = "inject-init-image", env = "MESHID_INJECT_INIT_IMAGE", default_value_t = InjectConfig::default().init_image)]
    pub init_image: String,
    /// Where injected sidecars reach the CA's gRPC port.
    #[arg(long = "inject-ca-addr", env = "MESHID_INJECT_CA_ADDR", default_value_t = InjectConfig::default().ca_addr)]
    pub ca_addr: String,
    /// The ConfigMap (key bundle.pem) holding the trust bundle in each meshed namespace.
    #[arg(long = "inject-bundle-configmap", env = "MESHID_INJECT_BUNDLE_CONFIGMAP", default_value_t = InjectConfig::default().bundle_configmap)]
    pub bundle_configmap: String,
    /// Native sidecars (an init container with restartPolicy: Always; Kubernetes 1.29 and
    /// later). `false`: the older layout, the sidecar as the first container with a postStart
    /// hook that holds the app until the pod has its identity.
    #[arg(long = "inject-native-sidecars", env = "MESHID_INJECT_NATIVE_SIDECARS", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecars: bool,
}

impl From<InjectConfigArgs> for InjectConfig {
    fn from(a: InjectConfigArgs) -> Self {
        InjectConfig {
            image: a.image,
            init_image: a.init_image,
            ca_addr: a.ca_addr,
            bundle_configmap: a.bundle_configmap,
            native_sidecars: a.native_sidecars,
        }
    }
}

#[derive(Args)]
pub struct InjectArgs {
    /// Files to inject (multi-document YAML), or `-` for stdin (the default).
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Copy objects of kinds meshid does not know unchanged, instead of refusing them.
    #[arg(long)]
    pass_unknown: bool,
    #[command(flatten)]
    config: InjectConfigArgs,
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let config = InjectConfig::from(args.config);
    let files = if args.files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        args.files
    };
    // Everything is read and injected before anything is written: bad input writes nothing.
    let mut out = String::new();
    let mut report = Vec::new();
    for file in &files {
        let text = if file.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            s
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        let (yaml, lines) = inject_yaml(&text, &config, args.pass_unknown)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        if !out.is_empty() && !yaml.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&yaml);
        report.extend(
            lines
                .into_iter()
                .map(|l| format!("{}: {l}", file.display())),
        );
    }
    print!("{out}");
    for line in report {
        eprintln!("{line}");
    }
    Ok(())
}

#[derive(Args)]
pub struct WaitReadyArgs {
    /// The sidecar's admin endpoint.
    #[arg(long, env = "MESHID_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
    /// Give up (and fail) after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Poll the sidecar's `/ready` until it answers 200.
pub async fn wait_ready(args: WaitReadyArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.timeout;
    loop {
        let last = match ready(args.admin_addr).await {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => format!("{status}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!(
                "the sidecar at {} is not ready after {:?} ({last})",
                args.admin_addr,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ready(addr: std::net::SocketAddr) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let tcp = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
        .await??;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::get("/ready")
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(1), send.send_request(req)).await??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
