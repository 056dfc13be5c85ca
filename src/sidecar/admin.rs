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

/// The kubelet's default probe timeout is 1 s: answer within it.
const PROBE_TIMEOUT: Duration = Duration::from_millis(900);

async fn app_health(probe: &AppProbe) -> Response<Body> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], probe.port));
    let connect = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr));
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
            .header(header::HOST, addr.to_string())
            .header(header::USER_AGENT, "kube-probe (via meshid)");
        for h in &probe.headers {
            req = req.header(h.name.as_str(), h.value.as_str());
        }
        let req = req
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|_| std::io::Error::other("bad probe request"))?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(send.send_request(req).await?.status())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, ask).await {
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
            let mut r = Response::new(proxy::full(admin.metrics.render(now)));
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
