//! The admin endpoint on `--admin-addr` (loopback by default): `/healthz` (the process runs),
//! `/ready` (an SVID, the bundle and the directory are held; the body says what is missing, so
//! an app container can wait for it), `/metrics` (Prometheus text format), and
//! `/app-health/CONTAINER/PROBE`: the app's own kubelet probes, which `meshid inject` rewrites
//! to come here (a kubelet cannot make mutual TLS, so the inbound port would refuse it); the
//! sidecar asks the app locally and answers with the app's status.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use meshid_proto::serve::{ConnInfo, Protocol, Server};
use tokio_util::sync::CancellationToken;

use super::control::Control;
use super::metrics::Metrics;
use super::proxy::{self, Body};

pub struct Admin {
    pub has_svid: AtomicBool,
    pub control: Arc<Control>,
    pub metrics: Arc<Metrics>,
    /// `CONTAINER/PROBE` -> what to ask the app (`--app-probes`, set by `meshid inject`).
    pub app_probes: HashMap<String, AppProbe>,
}

/// One of the app's probes, as the kubelet would have made it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AppProbe {
    pub port: u16,
    #[serde(default)]
    pub path: Option<String>,
    /// A TCP connect instead of an HTTP GET.
    #[serde(default)]
    pub tcp: bool,
    #[serde(default)]
    pub headers: Vec<ProbeHeader>,
    /// The kubelet's timeout for this probe.
    #[serde(default = "default_probe_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_probe_timeout_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

/// Parse `--app-probes` (JSON: `{"CONTAINER/PROBE": {"port": 8080, "path": "/healthz"}}`).
pub fn parse_app_probes(json: &str) -> Result<HashMap<String, AppProbe>, String> {
    serde_json::from_str(json).map_err(|e| format!("--app-probes is not a probe map: {e}"))
}

/// Where the app is probed: the pod's address (`MESHID_POD_IP`, from the downward API), as the
/// kubelet would, else loopback.
fn probe_host() -> std::net::IpAddr {
    std::env::var("MESHID_POD_IP")
        .ok()
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
}

async fn app_health(probe: &AppProbe) -> Response<Body> {
    let addr = std::net::SocketAddr::new(probe_host(), probe.port);
    // Answer within the kubelet's timeout, with a margin for the way back.
    let limit = Duration::from_millis(probe.timeout_ms.saturating_sub(100).max(100));
    let connect = tokio::time::timeout(
        limit,
        super::inbound::connect_app(addr, !addr.ip().is_loopback()),
    );
    let tcp = match connect.await {
        Ok(Ok(tcp)) => tcp,
        _ => {
            return proxy::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the app does not accept connections on port {}", probe.port),
            );
        }
    };
    if probe.tcp {
        return proxy::text(StatusCode::OK, "the app accepts connections");
    }
    let path = probe.path.as_deref().unwrap_or("/");
    let ask = async {
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut req = Request::get(path)
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|_| std::io::Error::other("bad probe path"))?;
        let headers = req.headers_mut();
        headers.insert(
            header::HOST,
            http::HeaderValue::from_str(&addr.to_string()).expect("an address is a header value"),
        );
        headers.insert(
            header::USER_AGENT,
            http::HeaderValue::from_static("kube-probe (via meshid)"),
        );
        // The probe's own headers replace these, as the kubelet's do.
        for h in &probe.headers {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(h.name.as_bytes()),
                http::HeaderValue::from_str(&h.value),
            ) {
                headers.insert(n, v);
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(send.send_request(req).await?.status())
    };
    match tokio::time::timeout(limit, ask).await {
        Ok(Ok(status)) => {
            let mut r = proxy::text(status, format!("the app answered {status}"));
            *r.status_mut() = status;
            r
        }
        Ok(Err(e)) => proxy::text(StatusCode::SERVICE_UNAVAILABLE, format!("the app: {e}")),
        Err(_) => proxy::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the app did not answer in time",
        ),
    }
}

impl Admin {
    fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.has_svid.load(Ordering::Relaxed) {
            m.push("svid");
        }
        if !self.control.has_bundle.load(Ordering::Relaxed) {
            m.push("bundle");
        }
        if self.control.directory.load().is_none() {
            m.push("directory");
        }
        if !self.control.has_jwks.load(Ordering::Relaxed) {
            m.push("jwks");
        }
        m
    }
}

pub async fn serve(admin: Arc<Admin>, server: Server, shutdown: CancellationToken) {
    server
        .protocol(Protocol::Http1)
        .serve(
            move |_: &ConnInfo| {
                let admin = admin.clone();
                Some(hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&admin, req).await) }
                }))
            },
            shutdown,
        )
        .await;
}

/// The probe listener (`--probe-addr`, on the pod network for the kubelet): `/healthz`,
/// `/ready` and `/app-health/...` only; `/metrics` stays on the admin port.
pub async fn serve_probes(admin: Arc<Admin>, server: Server, shutdown: CancellationToken) {
    server
        .protocol(Protocol::Http1)
        .serve(
            move |_: &ConnInfo| {
                let admin = admin.clone();
                Some(hyper::service::service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move {
                        let path = req.uri().path();
                        let r = if path == "/healthz"
                            || path == "/ready"
                            || path.starts_with("/app-health/")
                        {
                            handle(&admin, req).await
                        } else {
                            proxy::text(
                                StatusCode::NOT_FOUND,
                                "not found: /healthz, /ready, /app-health/CONTAINER/PROBE",
                            )
                        };
                        Ok::<_, std::convert::Infallible>(r)
                    }
                }))
            },
            shutdown,
        )
        .await;
}

async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return proxy::text(StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    if let Some(probe) = req.uri().path().strip_prefix("/app-health/") {
        return match admin.app_probes.get(probe) {
            Some(p) => app_health(p).await,
            None => proxy::text(StatusCode::NOT_FOUND, format!("no app probe {probe:?}")),
        };
    }
    match req.uri().path() {
        "/healthz" => proxy::text(StatusCode::OK, "ok"),
        "/ready" => match admin.missing().as_slice() {
            [] => proxy::text(StatusCode::OK, "ready"),
            missing => proxy::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for {}", missing.join(", ")),
            ),
        },
        "/metrics" => {
            let now = meshid_proto::clock::unix_seconds(std::time::SystemTime::now());
            let mut text = admin.metrics.render(now);
            text.push_str(&format!(
                "# HELP meshid_ca_stream_breaks_total Watch streams to the CA (bundle, directory) that failed or ended; each is reopened with backoff.\n\
                 # TYPE meshid_ca_stream_breaks_total counter\nmeshid_ca_stream_breaks_total {}\n",
                admin.control.stream_breaks.load(Ordering::Relaxed)
            ));
            let mut r = Response::new(proxy::full(text));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => proxy::text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /ready, /metrics, /app-health/CONTAINER/PROBE",
        ),
    }
}
