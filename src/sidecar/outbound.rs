//! Outbound: the app's plain HTTP in, mutual TLS to the callee's sidecar out.
//!
//! An HTTP proxy on `--outbound-addr` (the app sets `HTTP_PROXY`): absolute-form requests, or
//! origin-form with the Host header naming the service. The service name gives the callee's
//! SPIFFE ID (from the CA's directory) and its address (`--route NAME=HOST:PORT`, or
//! `NAME:15006`). Connections are pooled per service, HTTP/2 when the callee offers it (ALPN).
//! A token for the callee's audience is attached unless the app sent its own `Authorization`
//! header, which is then forwarded untouched (the documented rule).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshid_proto::SpiffeId;
use meshid_proto::serve::{ConnInfo, Protocol, Server};
use meshid_proto::tls::CertSlot;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::control::Control;
use super::identity::{Current, Identity};
use super::metrics::{Metrics, Outcome};
use super::proxy::{self, Body};
use super::tls::MeshTls;
use super::token_cache::{TokenCache, TokenFetchError};

/// The callee sidecar's inbound port when no `--route` names an address.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

pub struct Outbound {
    control: Arc<Control>,
    identity: Arc<Identity>,
    tls: Arc<MeshTls>,
    routes: Arc<HashMap<String, String>>,
    tokens: Arc<TokenCache>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    /// The connection pool of the identity in use (by x5t). A new SVID gets a new pool, so a
    /// token bound to the new certificate never travels over a connection made with the old
    /// one; requests in flight keep the old pool until they finish.
    pool: Mutex<Option<(String, Client<MeshConnector, Incoming>)>>,
}

impl Outbound {
    pub fn new(
        control: Arc<Control>,
        identity: Arc<Identity>,
        tls: Arc<MeshTls>,
        tokens: Arc<TokenCache>,
        metrics: Arc<Metrics>,
        routes: HashMap<String, String>,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            control,
            identity,
            tls,
            routes: Arc::new(routes),
            tokens,
            metrics,
            connect_timeout,
            pool: Mutex::new(None),
        })
    }

    /// The pool for `identity`, made on first use after each renewal.
    fn client(&self, identity: &Current) -> Client<MeshConnector, Incoming> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((x5t, client)) = pool.as_ref()
            && *x5t == identity.x5t
        {
            return client.clone();
        }
        let connector = MeshConnector {
            control: self.control.clone(),
            tls: self.tls.clone(),
            routes: self.routes.clone(),
            identity: CertSlot::new(identity.key.clone()),
            configs: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout: self.connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .build(connector);
        *pool = Some((identity.x5t.clone(), client.clone()));
        client
    }
}

pub async fn serve(out: Arc<Outbound>, server: Server, shutdown: CancellationToken) {
    server
        .protocol(Protocol::Http1)
        .serve(
            move |_: &ConnInfo| {
                let out = out.clone();
                Some(hyper::service::service_fn(move |req: Request<Incoming>| {
                    let out = out.clone();
                    // Host and path only: a query may carry what must not be exported.
                    let span = tracing::info_span!(
                        "outbound",
                        method = %req.method(),
                        host = req.uri().host().unwrap_or_default(),
                        path = %req.uri().path()
                    );
                    crate::telemetry::continue_trace(&span, req.headers());
                    async move {
                        Ok::<_, std::convert::Infallible>(handle(&out, req).instrument(span).await)
                    }
                }))
            },
            shutdown,
        )
        .await;
}

/// The service a request is for: the host of an absolute-form URI, else the Host header; a
/// qualified name (`orders.shop.svc.cluster.local`) is tried as given, then by its first label.
fn target(req: &Request<Incoming>, known: impl Fn(&str) -> bool) -> Option<String> {
    let host = req.uri().host().map(str::to_owned).or_else(|| {
        let h = req.headers().get(header::HOST)?.to_str().ok()?;
        Some(h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h).to_owned())
    })?;
    let host = host.to_ascii_lowercase();
    if known(&host) {
        return Some(host);
    }
    let first = host.split('.').next()?.to_owned();
    known(&first).then_some(first)
}

async fn handle(out: &Outbound, mut req: Request<Incoming>) -> Response<Body> {
    if req.method() == http::Method::CONNECT {
        out.metrics.request(Outcome::OutboundConnectUnsupported);
        return proxy::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported by the meshid proxy yet",
        );
    }
    let Some(dir) = out.control.directory.load_full() else {
        out.metrics.request(Outcome::OutboundNoDirectory);
        return proxy::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "meshid: no service directory from the CA yet",
        );
    };
    let Some(name) = target(&req, |n| dir.service(n).is_some()) else {
        out.metrics.request(Outcome::OutboundUnknownService);
        return proxy::text(
            StatusCode::BAD_GATEWAY,
            "meshid: the request names no service of the mesh directory",
        );
    };
    // One identity for this request: its connection and its token both come from it.
    let identity = out.identity.current();
    let client = out.client(&identity);
    let headers = req.headers_mut();
    proxy::strip_hop_by_hop(headers);
    proxy::strip_identity(headers);
    if !headers.contains_key(header::AUTHORIZATION) {
        match out
            .tokens
            .get(&name, &identity.svid.spiffe_id, &identity, &dir)
            .await
        {
            Ok(bearer) => {
                headers.insert(header::AUTHORIZATION, bearer);
            }
            // No token for this callee (not an allowed caller, or the CA is away): send the
            // call without one and let the callee's rules decide (a /healthz route needs none).
            Err(TokenFetchError::Refused { .. }) => {
                debug!(service = %name, "no token for this callee")
            }
            Err(e) => warn!(service = %name, "no token: {e}"),
        }
    }
    let Some(uri) = proxy::uri_for(name.as_str(), req.uri()) else {
        return proxy::text(StatusCode::BAD_REQUEST, "meshid: bad request target");
    };
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_11;
    match client.request(req).await {
        Ok(resp) => {
            out.metrics.request(Outcome::OutboundForwarded);
            let (mut parts, body) = resp.into_parts();
            proxy::strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            out.metrics.request(Outcome::OutboundUpstreamError);
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            warn!(service = %name, "upstream failed: {msg}");
            proxy::text(
                StatusCode::BAD_GATEWAY,
                format!("meshid: upstream {name} failed: {msg}"),
            )
        }
    }
}

/// Dials a service's sidecar with mutual TLS as one identity, verifying the callee's SPIFFE ID.
#[derive(Clone)]
struct MeshConnector {
    control: Arc<Control>,
    tls: Arc<MeshTls>,
    routes: Arc<HashMap<String, String>>,
    identity: Arc<CertSlot>,
    /// One client config per callee (each with its TLS session cache, so reconnects resume).
    configs: Arc<Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>>,
    /// Bound on TCP connect plus the TLS handshake.
    connect_timeout: Duration,
}

pub struct MeshStream {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
}

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<MeshStream, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let name = uri.host().unwrap_or_default().to_owned();
            let dir = this
                .control
                .directory
                .load_full()
                .ok_or_else(|| std::io::Error::other("no service directory yet"))?;
            let service = dir
                .service(&name)
                .ok_or_else(|| std::io::Error::other(format!("{name} is not in the directory")))?;
            let addr = this
                .routes
                .get(&name)
                .cloned()
                .unwrap_or_else(|| format!("{name}:{DEFAULT_INBOUND_PORT}"));
            let server_name = ServerName::try_from(name.clone()).map_err(std::io::Error::other)?;
            let config = this
                .configs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(service.id.clone())
                .or_insert_with(|| this.tls.client(&service.id, this.identity.clone()))
                .clone();
            let dial = async {
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(config)
                    .connect(server_name, tcp)
                    .await
            };
            let tls = tokio::time::timeout(this.connect_timeout, dial)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no mutual TLS with {name} at {addr} within {:?}",
                            this.connect_timeout
                        ),
                    )
                })??;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(MeshStream {
                io: TokioIo::new(tls),
                h2,
            })
        })
    }
}
