//! Outbound: the app's plain traffic in, mutual TLS to the callee's sidecar out.
//!
//! One listener (`--outbound-addr`) serves two kinds of connection:
//! - the explicit proxy (the app sets `HTTP_PROXY`): absolute-form requests, or origin-form
//!   with the Host header naming the service; HTTP/1.1 or h2c with prior knowledge; WebSocket
//!   upgrades; and `CONNECT` tunnels (HTTP inside is checked per request as any other call;
//!   anything else only to a port the callee declares opaque). The service name gives the
//!   callee's SPIFFE ID (from the CA's directory) and its address (`--route NAME=HOST:PORT`,
//!   or `NAME:15006`). Connections are pooled per service and per protocol: HTTP/1.1 travels as
//!   HTTP/1.1 and HTTP/2 as HTTP/2, end to end.
//! - transparent connections, which the pod's iptables rules redirected here: see
//!   [`transparent`](super::transparent).
//!
//! A token for the callee's audience is attached unless the app sent its own `Authorization`
//! header, which is then forwarded untouched (the documented rule).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshid_proto::directory::Directory;
use meshid_proto::serve::{Conn, ConnInfo, Protocol, Server};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::control::Control;
use super::dial::{Dialer, MeshTlsStream, Target};
use super::identity::{Current, Identity};
use super::metrics::{Metrics, Outcome};
use super::proxy::{self, Body};
use super::tls::Alpn;
use super::token_cache::{TokenCache, TokenFetchError};
use super::transparent;
use super::tunnel::{self, TunnelError};

/// The callee sidecar's inbound port when no `--route` names an address.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

pub struct Outbound {
    pub(super) control: Arc<Control>,
    pub(super) identity: Arc<Identity>,
    pub(super) dialer: Arc<Dialer>,
    routes: Arc<HashMap<String, String>>,
    pub(super) tokens: Arc<TokenCache>,
    pub(super) metrics: Arc<Metrics>,
    /// How long a redirected connection may take to show its first bytes before it is taken
    /// for a server-first protocol and tunnelled as opaque TCP.
    pub(super) detect_timeout: Duration,
    /// Destination ports tunnelled without detection, besides the policy's opaque ports.
    pub(super) opaque_ports: Vec<u16>,
    /// Tunnels and upgraded connections: how many, how idle, how they end.
    pub(super) tunnels: Arc<proxy::Tunnels>,
    /// HTTP inside CONNECT tunnels ends this long after shutdown.
    drain_timeout: Duration,
    /// HTTP inside a CONNECT tunnel: the bound on each request head.
    header_read_timeout: Duration,
    /// The connection pools of the identity in use (by x5t). A new SVID gets new pools, so a
    /// token bound to the new certificate never travels over a connection made with the old
    /// one; requests in flight keep the old pools until they finish.
    pools: Mutex<Option<(String, Pools)>>,
}

/// One pool per protocol between the sidecars (see [`Alpn`]).
#[derive(Clone)]
struct Pools {
    /// Upgrades (WebSocket).
    http1: Client<MeshConnector, Incoming>,
    /// HTTP/1.1 apps' requests, multiplexed.
    h2: Client<MeshConnector, Incoming>,
    /// HTTP/2 apps' requests (gRPC, h2c).
    h2_end_to_end: Client<MeshConnector, Incoming>,
}

pub struct OutboundConfig {
    pub routes: HashMap<String, String>,
    pub detect_timeout: Duration,
    pub opaque_ports: Vec<u16>,
    pub drain_timeout: Duration,
    pub header_read_timeout: Duration,
    pub tunnels: Arc<proxy::Tunnels>,
}

impl Outbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        control: Arc<Control>,
        identity: Arc<Identity>,
        dialer: Arc<Dialer>,
        tokens: Arc<TokenCache>,
        metrics: Arc<Metrics>,
        config: OutboundConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            control,
            identity,
            dialer,
            routes: Arc::new(config.routes),
            tokens,
            metrics,
            detect_timeout: config.detect_timeout,
            opaque_ports: config.opaque_ports,
            drain_timeout: config.drain_timeout,
            header_read_timeout: config.header_read_timeout,
            tunnels: config.tunnels,
            pools: Mutex::new(None),
        })
    }

    /// The pools for `identity`, made on first use after each renewal.
    fn pools(&self, identity: &Arc<Current>) -> Pools {
        let mut pool = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((x5t, pools)) = pool.as_ref()
            && *x5t == identity.x5t
        {
            return pools.clone();
        }
        let connector = |alpn| MeshConnector {
            control: self.control.clone(),
            dialer: self.dialer.clone(),
            routes: self.routes.clone(),
            identity: identity.clone(),
            alpn,
        };
        let h2 = |alpn| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .build(connector(alpn))
        };
        let pools = Pools {
            http1: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector(Alpn::Http1)),
            h2: h2(Alpn::H2),
            h2_end_to_end: h2(Alpn::H2EndToEnd),
        };
        *pool = Some((identity.x5t.clone(), pools.clone()));
        pools
    }

    /// Where the sidecar of service `name` listens.
    fn sidecar_addr(&self, name: &str) -> String {
        sidecar_addr(&self.routes, name)
    }
}

fn sidecar_addr(routes: &HashMap<String, String>, name: &str) -> String {
    routes
        .get(name)
        .cloned()
        .unwrap_or_else(|| format!("{name}:{DEFAULT_INBOUND_PORT}"))
}

pub async fn serve(out: Arc<Outbound>, server: Server, shutdown: CancellationToken) {
    server
        .protocol(Protocol::Auto)
        .original_dst()
        .serve_conns(
            move |info: &ConnInfo| {
                if let Some(dst) = info.original_dst {
                    let out = out.clone();
                    return Some(Conn::Stream(Box::new(move |acc| {
                        Box::pin(transparent::handle(out, acc, dst))
                    })));
                }
                Some(Conn::Http(service(out.clone(), None)))
            },
            shutdown,
        )
        .await;
}

/// The explicit proxy's service; `fixed`: the service every request is for (HTTP inside a
/// CONNECT tunnel to it).
fn service(
    out: Arc<Outbound>,
    fixed: Option<Arc<str>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let (out, fixed) = (out.clone(), fixed.clone());
        // Host and path only: a query may carry what must not be exported.
        let span = tracing::info_span!(
            "outbound",
            method = %req.method(),
            host = req.uri().host().unwrap_or_default(),
            path = %req.uri().path()
        );
        crate::telemetry::continue_trace(&span, req.headers());
        async move {
            Ok::<_, std::convert::Infallible>(
                handle(&out, req, fixed.as_deref()).instrument(span).await,
            )
        }
    })
}

/// The service a request is for: the host of an absolute-form URI, else the Host header.
pub(super) fn target(req: &Request<Incoming>, known: impl Fn(&str) -> bool) -> Option<String> {
    let host = req.uri().host().map(str::to_owned).or_else(|| {
        let h = req.headers().get(header::HOST)?.to_str().ok()?;
        Some(h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h).to_owned())
    })?;
    service_named(&host, known)
}

/// The service a host name names: a qualified name (`orders.shop.svc.cluster.local`) is tried
/// as given, then by its first label.
pub(super) fn service_named(host: &str, known: impl Fn(&str) -> bool) -> Option<String> {
    let host = host.to_ascii_lowercase();
    if known(&host) {
        return Some(host);
    }
    let first = host.split('.').next()?.to_owned();
    known(&first).then_some(first)
}

/// The message of an error and its sources.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Attach a token for `service` unless the app sent its own `Authorization`.
pub(super) async fn attach_token(
    tokens: &Arc<TokenCache>,
    headers: &mut http::HeaderMap,
    service: &str,
    identity: &Arc<Current>,
    dir: &Directory,
) {
    if headers.contains_key(header::AUTHORIZATION) {
        return;
    }
    match tokens
        .get(service, &identity.svid.spiffe_id, identity, dir)
        .await
    {
        Ok(bearer) => {
            headers.insert(header::AUTHORIZATION, bearer);
        }
        // No token for this callee (not an allowed caller, or the CA is away): send the call
        // without one and let the callee's rules decide (a /healthz route needs none).
        Err(TokenFetchError::Refused { .. }) => debug!(%service, "no token for this callee"),
        Err(e) => warn!(%service, "no token: {e}"),
    }
}

async fn handle(
    out: &Arc<Outbound>,
    mut req: Request<Incoming>,
    fixed: Option<&str>,
) -> Response<Body> {
    let Some(dir) = out.control.directory.load_full() else {
        out.metrics.request(Outcome::OutboundNoDirectory);
        return proxy::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "meshid: no service directory from the CA yet",
        );
    };
    if req.method() == http::Method::CONNECT && fixed.is_none() {
        return connect(out, req, &dir).await;
    }
    let name = match fixed {
        Some(name) => Some(name.to_owned()),
        None => target(&req, |n| dir.service(n).is_some()),
    };
    let Some(name) = name else {
        out.metrics.request(Outcome::OutboundUnknownService);
        return proxy::text(
            StatusCode::BAD_GATEWAY,
            "meshid: the request names no service of the mesh directory",
        );
    };
    // One identity for this request: its connection and its token both come from it.
    let identity = out.identity.current();
    let pools = out.pools(&identity);
    let h2 = req.version() == http::Version::HTTP_2;
    let upgrade = match out.tunnels.forward_request(&mut req) {
        Ok(u) => u,
        Err(full) => {
            out.metrics.request(Outcome::OutboundUpstreamError);
            return full.response();
        }
    };
    let headers = req.headers_mut();
    proxy::strip_identity(headers);
    attach_token(&out.tokens, headers, &name, &identity, &dir).await;
    let Some(uri) = proxy::uri_for(name.as_str(), req.uri()) else {
        return proxy::text(StatusCode::BAD_REQUEST, "meshid: bad request target");
    };
    *req.uri_mut() = uri;
    let client = if h2 {
        *req.version_mut() = http::Version::HTTP_2;
        pools.h2_end_to_end
    } else {
        *req.version_mut() = http::Version::HTTP_11;
        if upgrade.is_some() {
            pools.http1
        } else {
            pools.h2
        }
    };
    match client.request(req).await {
        Ok(resp) => {
            out.metrics.request(Outcome::OutboundForwarded);
            out.tunnels.forward_response(resp, upgrade)
        }
        Err(e) => {
            out.metrics.request(Outcome::OutboundUpstreamError);
            let msg = error_chain(&e);
            warn!(service = %name, "upstream failed: {msg}");
            proxy::text(
                StatusCode::BAD_GATEWAY,
                format!("meshid: upstream {name} failed: {msg}"),
            )
        }
    }
}

/// `CONNECT HOST:PORT` from an app that tunnels through its proxy (gRPC and WebSocket clients
/// do, for every target). To a service of the mesh: HTTP inside the tunnel is served as any
/// other call (route rules and tokens apply per request); anything else crosses only to a port
/// the callee declares opaque. Outside the mesh: a plain tunnel when a passthrough rule of the
/// policy allows the address.
async fn connect(
    out: &Arc<Outbound>,
    req: Request<Incoming>,
    dir: &Arc<Directory>,
) -> Response<Body> {
    let Some(authority) = req.uri().authority().cloned() else {
        return proxy::text(StatusCode::BAD_REQUEST, "meshid: CONNECT needs HOST:PORT");
    };
    let Some(port) = authority.port_u16() else {
        return proxy::text(StatusCode::BAD_REQUEST, "meshid: CONNECT needs HOST:PORT");
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let Some(permit) = out.tunnels.permit() else {
        return too_many_tunnels(out);
    };
    if let Some(name) = service_named(host, |n| dir.service(n).is_some()) {
        let svc = dir.service(&name).expect("named by the directory");
        if !svc.opaque_ports.contains(&port) {
            // HTTP inside: served here, each request checked and given its token.
            out.metrics.request(Outcome::OutboundTunnel);
            let (out, name) = (out.clone(), Arc::<str>::from(name));
            tokio::spawn(async move {
                let _permit = permit;
                let Ok(upgraded) = hyper::upgrade::on(req).await else {
                    return;
                };
                let svc = service(out.clone(), Some(name.clone()));
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(out.header_read_timeout);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30));
                let conn = builder.serve_connection_with_upgrades(upgraded, svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r {
                        debug!(service = %name, "CONNECT tunnel: {e} (only HTTP crosses a tunnel to a port that is not opaque)");
                    },
                    _ = out.tunnels.shutdown().cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(out.drain_timeout, conn).await;
                    }
                }
            });
            return Response::new(proxy::full(""));
        }
        let identity = out.identity.current();
        let addr = out.sidecar_addr(&name);
        return match tunnel::open(
            &out.dialer,
            &identity,
            dir,
            Target::Host(&addr),
            Some(&svc.id),
            port,
        )
        .await
        {
            Ok((tls, _)) => {
                out.metrics.request(Outcome::OutboundTunnel);
                let tunnels = out.tunnels.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let Ok(upgraded) = hyper::upgrade::on(req).await else {
                        return;
                    };
                    let (mut down, mut up) = (TokioIo::new(upgraded), tls);
                    tunnels.splice(&mut down, &mut up).await;
                });
                Response::new(proxy::full(""))
            }
            Err(e) => tunnel_refused(out, &authority, e),
        };
    }
    // Outside the mesh.
    let allowed = match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => addrs.into_iter().find(|a| dir.passes_through(*a)),
        Err(_) => None,
    };
    let Some(addr) = allowed else {
        out.metrics.request(Outcome::OutboundNotInMesh);
        warn!(%authority, "refused: not a service of the mesh, and no passthrough rule allows it");
        return proxy::text(
            StatusCode::FORBIDDEN,
            format!(
                "meshid: {authority} is not a service of the mesh, and no passthrough rule of the policy allows it"
            ),
        );
    };
    match tokio::time::timeout(out.dialer.connect_timeout(), TcpStream::connect(addr)).await {
        Ok(Ok(mut tcp)) => {
            out.metrics.request(Outcome::OutboundPassthrough);
            let tunnels = out.tunnels.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Ok(upgraded) = hyper::upgrade::on(req).await else {
                    return;
                };
                let mut down = TokioIo::new(upgraded);
                tunnels.splice(&mut down, &mut tcp).await;
            });
            Response::new(proxy::full(""))
        }
        _ => {
            out.metrics.request(Outcome::OutboundUpstreamError);
            proxy::text(
                StatusCode::BAD_GATEWAY,
                format!("meshid: {authority} ({addr}) does not accept connections"),
            )
        }
    }
}

fn too_many_tunnels(out: &Outbound) -> Response<Body> {
    out.metrics.request(Outcome::OutboundUpstreamError);
    warn!("refused: as many tunnels and upgraded connections as allowed are open");
    proxy::NoTunnelSlot.response()
}

fn tunnel_refused(out: &Outbound, to: &dyn std::fmt::Display, e: TunnelError) -> Response<Body> {
    warn!(%to, "tunnel refused: {e}");
    match e {
        TunnelError::Refused { .. } | TunnelError::NotAService(_) => {
            out.metrics.request(Outcome::OutboundTunnelRefused);
            proxy::text(StatusCode::FORBIDDEN, format!("meshid: {e}"))
        }
        _ => {
            out.metrics.request(Outcome::OutboundUpstreamError);
            proxy::text(StatusCode::BAD_GATEWAY, format!("meshid: {e}"))
        }
    }
}

/// Dials a service's sidecar with mutual TLS as one identity and protocol, verifying the
/// callee's SPIFFE ID (the pools' connector).
#[derive(Clone)]
struct MeshConnector {
    control: Arc<Control>,
    dialer: Arc<Dialer>,
    routes: Arc<HashMap<String, String>>,
    identity: Arc<Current>,
    alpn: Alpn,
}

pub struct MeshStream {
    io: TokioIo<MeshTlsStream>,
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
            let addr = sidecar_addr(&this.routes, &name);
            let (tls, _) = this
                .dialer
                .dial(
                    Target::Host(&addr),
                    &this.identity,
                    Some(&service.id),
                    this.alpn,
                )
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("{name} at {addr}: {e}")))?;
            Ok(MeshStream {
                io: TokioIo::new(tls),
                h2: this.alpn.is_h2(),
            })
        })
    }
}
