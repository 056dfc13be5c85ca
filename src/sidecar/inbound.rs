//! Inbound: mutual TLS on `--inbound-addr`, then the checks, then the app.
//!
//! The TLS layer requires a client certificate that chains to the current bundle (the one
//! SPIFFE verifier). Per request: the caller's SPIFFE ID must be an allowed caller of this
//! service; the first matching route decides the scope needed; the bearer token is verified
//! (the one token verifier: typ, alg, kid, iss, aud = this service, exp, cnf = this caller's
//! certificate, scope). Refusals follow RFC 6750: 401 with `WWW-Authenticate: Bearer
//! error="invalid_token"`, 403 with `error="insufficient_scope"`. Allowed requests reach the
//! app with `x-meshid-peer` and `x-meshid-scopes`; caller copies of those are removed first.
//! Bodies stream both ways, in the caller's protocol (HTTP/1.1, with upgrades such as
//! WebSocket, or HTTP/2 as h2c to the app, so gRPC works); connections a rule redirected
//! here go to the port the caller dialled, others to `--app`. Opaque TCP tunnels
//! ([`tunnel`](super::tunnel)) reach only the ports the policy declares opaque, for allowed
//! callers.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshid_proto::SpiffeId;
use meshid_proto::directory::Directory;
use meshid_proto::jwks::JwksCache;
use meshid_proto::serve::{Accepted, Conn, ConnInfo, Server};
use meshid_proto::throttle::{Throttle, Verdict};
use meshid_proto::token::{TokenError, TokenVerifier, VerifiedToken};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::access_log::{AccessLog, Entry};
use super::control::Control;
use super::identity::Identity;
use super::metrics::{Metrics, Outcome};
use super::proxy::{self, Body, PEER_HEADER, SCOPES_HEADER};
use super::rate_limit::{RateLimiter, retry_after_seconds};
use super::tls::{H2_END_TO_END_ALPN, MeshTls, TCP_ALPN};
use super::tunnel::{self, TunnelStatus};
use crate::identity::backoff::Backoff;

/// The source address the sidecar connects to its app from (IPv4): `meshid init-iptables`
/// lets connections from it through to the pod's own address (Istio uses the same one).
pub const INBOUND_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

pub struct Inbound {
    control: Arc<Control>,
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    app: SocketAddr,
    /// `app` as a URI authority, made once.
    app_authority: Authority,
    /// The CA's token-signing keys (shared with the Workload API).
    jwks: Arc<JwksCache>,
    verifier: Mutex<Option<(String, SpiffeId, Arc<TokenVerifier>)>>,
    /// One WARN per caller and reason per window.
    log_throttle: Throttle,
    /// To the app at `--app`, and (from [`INBOUND_SOURCE`]) at the pod's own address for
    /// redirected connections.
    direct: AppClients,
    redirected: AppClients,
    /// The sidecar's own ports, which no redirected connection or tunnel may reach.
    own_ports: Vec<u16>,
    connect_timeout: Duration,
    /// Upgraded connections (WebSocket) and tunnels: how many, how idle, how they end.
    tunnels: Arc<proxy::Tunnels>,
    /// The policy's per-caller request rates.
    rate_limits: RateLimiter,
    access_log: AccessLog,
}

pub struct InboundConfig {
    /// `--app`: where direct connections' requests go (and the host of every app port).
    pub app: SocketAddr,
    /// The sidecar's own ports, never an app's.
    pub own_ports: Vec<u16>,
    pub connect_timeout: Duration,
    pub tunnels: Arc<proxy::Tunnels>,
    pub access_log: AccessLog,
}

/// HTTP/1.1 and h2c (HTTP/2 with prior knowledge) clients to the app.
struct AppClients {
    http1: Client<HttpConnector, Incoming>,
    h2c: Client<HttpConnector, Incoming>,
}

impl AppClients {
    fn new(http: HttpConnector) -> Self {
        Self {
            http1: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(http.clone()),
            h2c: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .http2_only(true)
                .build(http),
        }
    }
}

/// Connect to the app for a tunnel (or a probe), from [`INBOUND_SOURCE`] when it is at the
/// pod's address.
pub(super) async fn connect_app(
    app: SocketAddr,
    from_inbound_source: bool,
) -> std::io::Result<tokio::net::TcpStream> {
    if from_inbound_source && app.is_ipv4() {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(INBOUND_SOURCE.into(), 0))?;
        socket.connect(app).await
    } else {
        tokio::net::TcpStream::connect(app).await
    }
}

/// What the handshake proved about the caller, computed once per connection, and where its
/// requests go.
struct Peer {
    id: SpiffeId,
    /// The serial of the caller's certificate (lowercase hex), for the directory's deny list.
    serial: String,
    /// RFC 8705 thumbprint of the caller's certificate: what its tokens must be bound to.
    x5t: String,
    /// `x-meshid-peer` for the app.
    header: HeaderValue,
    /// Where this connection's requests go: the address the caller dialled when a rule
    /// redirected it here, else `--app`. `None`: one of the sidecar's own ports.
    app: Option<(SocketAddr, Authority)>,
    redirected: bool,
    /// The caller's app speaks HTTP/2 (ALPN `meshid/h2`): its requests reach the app as h2c.
    h2_end_to_end: bool,
}

impl Inbound {
    pub fn new(
        control: Arc<Control>,
        identity: Arc<Identity>,
        metrics: Arc<Metrics>,
        jwks: Arc<JwksCache>,
        config: InboundConfig,
    ) -> Arc<Self> {
        let InboundConfig {
            app,
            own_ports,
            connect_timeout,
            tunnels,
            access_log,
        } = config;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let direct = AppClients::new(http.clone());
        http.set_local_addresses(INBOUND_SOURCE, std::net::Ipv6Addr::UNSPECIFIED);
        let redirected = AppClients::new(http);
        Arc::new(Self {
            control,
            identity,
            metrics,
            app,
            app_authority: Authority::try_from(app.to_string().as_str())
                .expect("a socket address is a valid authority"),
            jwks,
            verifier: Mutex::new(None),
            log_throttle: Throttle::new(Duration::from_secs(10), 10_000),
            direct,
            redirected,
            own_ports,
            connect_timeout,
            tunnels,
            rate_limits: RateLimiter::default(),
            access_log,
        })
    }

    /// Where the requests of a connection go (see [`Peer::app`]): a redirected connection to
    /// its original destination, the pod's own address (never 127.0.0.1: what the pod binds
    /// to loopback only stays private to it), anything else to `--app`.
    fn app_for(&self, original_dst: Option<SocketAddr>) -> Option<(SocketAddr, Authority)> {
        let app = match original_dst {
            None => return Some((self.app, self.app_authority.clone())),
            Some(dst) if self.own_ports.contains(&dst.port()) => return None,
            Some(dst) => SocketAddr::new(dst.ip().to_canonical(), dst.port()),
        };
        Some((app, Authority::try_from(app.to_string().as_str()).ok()?))
    }

    /// Count a refusal and log it, throttled per caller and reason: the first of a window at
    /// WARN, repeats at DEBUG, and the next WARN says how many there were. A caller that
    /// floods refused requests cannot flood the log.
    fn refused(&self, peer: &SpiffeId, outcome: Outcome, detail: std::fmt::Arguments<'_>) {
        self.metrics.request(outcome);
        let reason = outcome.labels().1;
        match self
            .log_throttle
            .check(&format!("{peer}|{reason}"), std::time::Instant::now())
        {
            Verdict::Log { suppressed: 0 } => warn!(%peer, reason, "refused: {detail}"),
            Verdict::Log { suppressed } => warn!(
                %peer,
                reason,
                suppressed,
                "refused: {detail} ({suppressed} more like this from this caller before)"
            ),
            Verdict::Quiet => debug!(%peer, reason, "refused: {detail}"),
        }
    }

    /// The token verifier for this service and the directory's issuer (rebuilt if either
    /// changes; its caches live as long as it does).
    fn verifier(&self, issuer: &str, me: &SpiffeId) -> Arc<TokenVerifier> {
        let mut v = self.verifier.lock().unwrap_or_else(|p| p.into_inner());
        match v.as_ref() {
            Some((iss, id, verifier)) if iss == issuer && id == me => verifier.clone(),
            _ => {
                let verifier = Arc::new(TokenVerifier::with_keys(
                    issuer,
                    me.to_string(),
                    self.jwks.clone(),
                ));
                *v = Some((issuer.to_owned(), me.clone(), verifier.clone()));
                verifier
            }
        }
    }
}

impl Inbound {
    /// Hold the issuer's JWKS before the sidecar says ready, so the first burst of calls a new
    /// pod receives is not refused while concurrent verifications wait for keys. Retries with
    /// backoff until it works or `shutdown`.
    pub async fn prime_jwks(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut directories = self.control.watch_directory();
        loop {
            let dir = self.control.directory.load_full();
            let wait = match dir {
                None => None,
                Some(dir) => {
                    let me = self.identity.current().svid.spiffe_id.clone();
                    match self.verifier(&dir.token_issuer, &me).prime().await {
                        Ok(()) => {
                            self.control
                                .has_jwks
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                            return self.follow_token_kids(shutdown).await;
                        }
                        Err(e) => {
                            let d = backoff.next_delay();
                            warn!("fetching the token issuer's JWKS, retrying in {d:?}: {e}");
                            Some(d)
                        }
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = directories.changed() => {}
                _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))) => {}
            }
        }
    }
}

impl Inbound {
    /// Keep the verifier's keys those the CA announces with every bundle (its token `kid`s):
    /// a key prepared for rotation is fetched before any token signed with it can arrive, and
    /// a retired one stops being accepted. A failed fetch is retried with backoff.
    async fn follow_token_kids(&self, shutdown: CancellationToken) {
        let mut bundles = self.control.watch_bundle();
        let mut directories = self.control.watch_directory();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let kids = bundles
                .borrow_and_update()
                .as_ref()
                .map(|b| b.rotation.token_kids.clone())
                .unwrap_or_default();
            let mut retry = None;
            if let Some(dir) = self.control.directory.load_full() {
                let me = self.identity.current().svid.spiffe_id.clone();
                let verifier = self.verifier(&dir.token_issuer, &me);
                match verifier.follow_kids(&kids).await {
                    Ok(true) if verifier.kids() != kids.iter().cloned().collect() => {
                        // The JWKS is behind what the bundle announced (another replica, say):
                        // again later, not at once.
                        let d = backoff.next_delay();
                        debug!(
                            ?kids,
                            "the JWKS does not hold the announced keys yet; again in {d:?}"
                        );
                        retry = Some(d);
                    }
                    Ok(true) => {
                        backoff.reset();
                        tracing::info!(?kids, "token-signing keys changed: JWKS fetched");
                    }
                    Ok(false) => backoff.reset(),
                    Err(e) => {
                        let d = backoff.next_delay();
                        warn!("following the CA's token keys, retrying in {d:?}: {e}");
                        retry = Some(d);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = bundles.changed() => if r.is_err() { return },
                _ = directories.changed() => {}
                _ = tokio::time::sleep(retry.unwrap_or(Duration::from_secs(3600))) => {}
            }
        }
    }
}

pub async fn serve(
    inb: Arc<Inbound>,
    tls: Arc<MeshTls>,
    server: Server,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server());
    let metrics = inb.metrics.clone();
    server
        .tls(acceptor)
        .original_dst()
        .on_tls_error(move |_| metrics.request(Outcome::InboundTlsRefused))
        .serve_conns(
            move |conn: &ConnInfo| {
                // The TLS layer required a client certificate chained to the bundle; a leaf
                // without a SPIFFE ID cannot be a caller.
                let leaf = conn.peer_chain.as_deref()?.first()?;
                let meshid_proto::svid::SvidInfo {
                    spiffe_id: id,
                    serial,
                    ..
                } = meshid_proto::svid::inspect(leaf).ok()?;
                if conn.alpn.as_deref() == Some(TCP_ALPN) {
                    let inb = inb.clone();
                    return Some(Conn::Stream(Box::new(move |acc| {
                        Box::pin(async move { accept_tunnel(&inb, id, serial, acc).await })
                    })));
                }
                let header = HeaderValue::from_str(&id.to_string()).ok()?;
                let peer = Arc::new(Peer {
                    x5t: meshid_proto::token::x5t_s256(leaf),
                    id,
                    serial,
                    header,
                    app: inb.app_for(conn.original_dst),
                    redirected: conn.original_dst.is_some(),
                    h2_end_to_end: conn.alpn.as_deref() == Some(H2_END_TO_END_ALPN),
                });
                let inb = inb.clone();
                Some(Conn::Http(hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (inb, peer) = (inb.clone(), peer.clone());
                    // A span per request, child of the caller's W3C trace context when it sent
                    // one. The path only: a query may carry what must not be exported.
                    let span = tracing::info_span!("inbound", method = %req.method(), path = %req.uri().path(), peer = %peer.id);
                    crate::telemetry::continue_trace(&span, req.headers());
                    async move {
                        let logged = inb.access_log.wants(false).then(|| Logged {
                            started: std::time::Instant::now(),
                            method: req.method().clone(),
                            trace_id: crate::telemetry::trace_id(&span, req.headers()),
                        });
                        let mut facts = Facts::default();
                        let resp = handle(&inb, &peer, req, &mut facts).instrument(span).await;
                        if let Some(logged) = logged {
                            inb.log_access(&peer, logged, facts, resp.status());
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                })))
            },
            shutdown,
        )
        .await;
}

/// An opaque tunnel from a caller's sidecar: the port it asks for, decided by the policy
/// (allowed caller, opaque port), then bytes both ways with the app on that port.
async fn accept_tunnel(inb: &Inbound, peer: SpiffeId, serial: String, mut acc: Accepted) {
    let timeout = acc.limits().header_read_timeout;
    let Ok(port) = tunnel::read_port(&mut acc.io, timeout).await else {
        return;
    };
    let decision = match inb.control.directory.load_full() {
        None => Err(TunnelStatus::Unavailable),
        Some(dir) => {
            let me = dir.service_by_id(&inb.identity.current().svid.spiffe_id);
            match me {
                None => Err(TunnelStatus::Unavailable),
                Some(me) => {
                    let allowed = dir
                        .service_by_id(&peer)
                        .is_some_and(|c| me.callers.contains_key(&c.name));
                    if dir.revoked().refuses(&peer, &serial).is_some() {
                        Err(TunnelStatus::Revoked)
                    } else if !allowed {
                        Err(TunnelStatus::CallerNotAllowed)
                    } else if !me.opaque_ports.contains(&port) || inb.own_ports.contains(&port) {
                        Err(TunnelStatus::PortNotOpaque)
                    } else {
                        Ok(me.name.clone())
                    }
                }
            }
        }
    };
    let service = match decision {
        Ok(s) => s,
        Err(status) => {
            let outcome = match status {
                TunnelStatus::CallerNotAllowed => Outcome::InboundCallerNotAllowed,
                TunnelStatus::Revoked => Outcome::InboundRevoked,
                _ => Outcome::InboundTunnelRefused,
            };
            inb.refused(
                &peer,
                outcome,
                format_args!("tunnel to port {port}: {}", status.reason()),
            );
            let _ = tunnel::answer(&mut acc.io, status).await;
            return;
        }
    };
    // A redirected tunnel goes to the pod's own address, like its requests would.
    let redirected = acc.info.original_dst;
    let app = match redirected {
        Some(dst) => SocketAddr::new(dst.ip().to_canonical(), port),
        None => SocketAddr::new(inb.app.ip(), port),
    };
    let mut tcp =
        match tokio::time::timeout(inb.connect_timeout, connect_app(app, redirected.is_some()))
            .await
        {
            Ok(Ok(tcp)) => tcp,
            _ => {
                warn!(%peer, "tunnel: the app at {app} does not accept connections");
                let _ = tunnel::answer(&mut acc.io, TunnelStatus::AppUnreachable).await;
                return;
            }
        };
    let _ = tcp.set_nodelay(true);
    if tunnel::answer(&mut acc.io, TunnelStatus::Open)
        .await
        .is_err()
    {
        return;
    }
    inb.metrics.request(Outcome::InboundTunnelAllowed);
    debug!(%peer, %service, port, "tunnel open");
    // A tunnel lives as long as its bytes move: one whose caller is revoked meanwhile is
    // closed when the directory saying so arrives (requests are checked one by one instead).
    tokio::select! {
        _ = inb.tunnels.splice(&mut acc.io, &mut tcp) => {}
        why = inb.revocation_of(&peer, &serial) => {
            inb.refused(&peer, Outcome::InboundRevoked, format_args!("open tunnel to port {port} closed: {why}"));
        }
    }
}

impl Inbound {
    /// Resolves once the directory revokes this caller (its identity or this certificate).
    async fn revocation_of(&self, peer: &SpiffeId, serial: &str) -> &'static str {
        let mut directories = self.control.watch_directory();
        loop {
            let revoked = self
                .control
                .directory
                .load()
                .as_ref()
                .and_then(|d| d.revoked().refuses(peer, serial));
            if let Some(why) = revoked {
                return why;
            }
            if directories.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// What the decision on one request found out, for the access log: cheap to gather (counted
/// references and indices), turned into an [`Entry`] only when the log wants it.
#[derive(Default)]
struct Facts {
    outcome: Option<Outcome>,
    dir: Option<Arc<Directory>>,
    /// The canonical path, when it differs from the request's.
    path: Option<String>,
    raw_path: Option<String>,
    /// The index of the matched route in this service's rules.
    route: Option<usize>,
    token: Option<Arc<VerifiedToken>>,
}

/// Taken before the request is handled, when the access log is on.
struct Logged {
    started: std::time::Instant,
    method: http::Method,
    trace_id: Option<String>,
}

impl Facts {
    fn count(&mut self, inb: &Inbound, outcome: Outcome) {
        self.outcome = Some(outcome);
        inb.metrics.request(outcome);
    }
}

impl Inbound {
    /// [`Inbound::refused`], remembered for the access log.
    fn refuse(
        &self,
        facts: &mut Facts,
        peer: &SpiffeId,
        outcome: Outcome,
        detail: std::fmt::Arguments<'_>,
    ) {
        facts.outcome = Some(outcome);
        self.refused(peer, outcome, detail);
    }

    fn log_access(&self, peer: &Peer, logged: Logged, facts: Facts, status: StatusCode) {
        let outcome = facts.outcome.unwrap_or(Outcome::InboundAllowed);
        let allowed = outcome == Outcome::InboundAllowed;
        if !self.access_log.wants(allowed) {
            return;
        }
        let current = self.identity.current();
        let me = &current.svid.spiffe_id;
        let dir = facts.dir.as_deref();
        let service = dir.and_then(|d| d.service_by_id(me));
        let route = service.zip(facts.route).and_then(|(s, i)| s.routes.get(i));
        self.access_log.log(&Entry {
            time: SystemTime::now(),
            caller: &peer.id,
            caller_service: dir
                .and_then(|d| d.service_by_id(&peer.id))
                .map(|c| c.name.as_str()),
            callee: me,
            callee_service: service.map(|s| s.name.as_str()),
            method: logged.method.as_str(),
            path: facts
                .path
                .as_deref()
                .or(facts.raw_path.as_deref())
                .unwrap_or_default(),
            route,
            scope_required: route.and_then(|r| r.scope.as_ref()),
            scopes_presented: facts.token.as_deref().map(|t| &t.scopes),
            decision: if allowed { "allow" } else { "deny" },
            reason: outcome.labels().1,
            status: status.as_u16(),
            latency_ms: logged.started.elapsed().as_secs_f64() * 1000.0,
            trace_id: logged.trace_id.as_deref(),
        });
    }
}

fn bearer_refusal(
    status: StatusCode,
    error: &str,
    description: &str,
    scope: Option<&str>,
) -> Response<Body> {
    let mut challenge = format!(
        "Bearer realm=\"meshid\", error=\"{error}\", error_description=\"{}\"",
        description.replace('"', "'")
    );
    if let Some(s) = scope {
        challenge.push_str(&format!(", scope=\"{s}\""));
    }
    let mut r = proxy::text(status, format!("meshid: {description}"));
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

async fn handle(
    inb: &Inbound,
    peer: &Peer,
    mut req: Request<Incoming>,
    facts: &mut Facts,
) -> Response<Body> {
    // One canonical path, before any rule: rules are decided on it and the app receives it.
    // The usual path is canonical already: then nothing is allocated or rebuilt for it.
    let rewritten: Option<String> = match meshid_proto::path::canonicalize(req.uri().path()) {
        Ok(Cow::Borrowed(_)) => None,
        Ok(Cow::Owned(p)) => Some(p),
        Err(e) => {
            facts.raw_path = Some(req.uri().path().to_owned());
            inb.refuse(
                facts,
                &peer.id,
                Outcome::InboundBadPath,
                format_args!("{e}"),
            );
            return proxy::text(StatusCode::BAD_REQUEST, format!("meshid: {e}"));
        }
    };
    if inb.access_log.wants(false) {
        facts.path = rewritten.clone();
        facts.raw_path = Some(req.uri().path().to_owned());
    }
    let Some(dir) = inb.control.directory.load_full() else {
        facts.count(inb, Outcome::InboundNoDirectory);
        return proxy::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "meshid: no service directory from the CA yet",
        );
    };
    if inb.access_log.wants(false) {
        facts.dir = Some(dir.clone());
    }
    let current = inb.identity.current();
    let my_id = &current.svid.spiffe_id;
    let Some(me) = dir.service_by_id(my_id) else {
        facts.count(inb, Outcome::InboundNotAService);
        return proxy::text(
            StatusCode::FORBIDDEN,
            format!("meshid: {my_id} is not a service of the policy"),
        );
    };
    // A revoked caller first (`meshid ca revoke`; the deny list comes with the directory).
    if let Some(why) = dir.revoked().refuses(&peer.id, &peer.serial) {
        inb.refuse(
            facts,
            &peer.id,
            Outcome::InboundRevoked,
            format_args!("{why}"),
        );
        return proxy::text(
            StatusCode::FORBIDDEN,
            format!("meshid: {} is refused: {why}", peer.id),
        );
    }
    // Allowed callers next: a caller the policy does not name learns nothing more.
    let caller = dir
        .service_by_id(&peer.id)
        .filter(|c| me.callers.contains_key(&c.name));
    let Some(caller) = caller else {
        inb.refuse(
            facts,
            &peer.id,
            Outcome::InboundCallerNotAllowed,
            format_args!("may not call {}", me.name),
        );
        return proxy::text(
            StatusCode::FORBIDDEN,
            format!("meshid: {} may not call {}", peer.id, me.name),
        );
    };
    // The caller's rate, before any work on the request: a flood costs one atomic each.
    if !me.rate_limits.is_empty()
        && let Some(limit) = me.rate_limits.get(&caller.name)
        && let Err(wait) = inb
            .rate_limits
            .admit(&caller.name, *limit, std::time::Instant::now())
    {
        *inb.metrics
            .rate_limited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(caller.name.clone())
            .or_default() += 1;
        inb.refuse(
            facts,
            &peer.id,
            Outcome::InboundRateLimited,
            format_args!("over its rate limit to {} ({limit})", me.name),
        );
        let seconds = retry_after_seconds(wait);
        let mut r = proxy::text(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "meshid: {} is over its rate limit to {} ({limit}); retry in {seconds} s",
                caller.name, me.name
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return r;
    }
    let path = rewritten.as_deref().unwrap_or(req.uri().path());
    let Some((index, route)) = me
        .routes
        .iter()
        .enumerate()
        .find(|(_, r)| r.matches(req.method().as_str(), path))
    else {
        inb.refuse(
            facts,
            &peer.id,
            Outcome::InboundNoRoute,
            format_args!("no route matches {} {path}", req.method()),
        );
        return proxy::text(
            StatusCode::FORBIDDEN,
            format!(
                "meshid: no route of {} matches {} {path}",
                me.name,
                req.method(),
            ),
        );
    };
    facts.route = Some(index);
    let mut scopes = String::new();
    if let Some(required) = &route.scope {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(token) = token else {
            inb.refuse(
                facts,
                &peer.id,
                Outcome::InboundNoToken,
                format_args!("no bearer token"),
            );
            // RFC 6750 §3.1: no error code when the request carries no credentials at all.
            let mut r = proxy::text(
                StatusCode::UNAUTHORIZED,
                format!("meshid: {path} needs a bearer token with {required}"),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"meshid\""),
            );
            return r;
        };
        let verifier = inb.verifier(&dir.token_issuer, my_id);
        let verified = verifier
            .verify_bound(token, &peer.x5t, None, SystemTime::now())
            .await
            .and_then(|v| {
                if inb.access_log.wants(false) {
                    facts.token = Some(v.clone());
                }
                if v.scopes.contains(required.as_str()) {
                    Ok(v)
                } else {
                    Err(TokenError::InsufficientScope(required.to_string()))
                }
            });
        match verified {
            Ok(v) => scopes = v.claims.scope.clone(),
            Err(TokenError::InsufficientScope(s)) => {
                inb.refuse(
                    facts,
                    &peer.id,
                    Outcome::InboundInsufficientScope,
                    format_args!("insufficient scope, {s} needed"),
                );
                return bearer_refusal(
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    &format!("the token lacks scope {s}"),
                    Some(&s),
                );
            }
            Err(e) => {
                let reason = match e {
                    TokenError::CertificateMismatch => Outcome::InboundTokenCnfMismatch,
                    TokenError::Expired => Outcome::InboundTokenExpired,
                    _ => Outcome::InboundInvalidToken,
                };
                inb.refuse(facts, &peer.id, reason, format_args!("invalid token: {e}"));
                return bearer_refusal(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    &e.to_string(),
                    None,
                );
            }
        }
    }
    let Some((app, app_authority)) = peer.app.clone() else {
        inb.refuse(
            facts,
            &peer.id,
            Outcome::InboundNoRoute,
            format_args!("a redirected connection to one of the sidecar's own ports"),
        );
        return proxy::text(StatusCode::FORBIDDEN, "meshid: not a port of the app");
    };
    facts.count(inb, Outcome::InboundAllowed);
    // HTTP/2 to the app (h2c) when the caller's app speaks it, or the request is gRPC (a
    // client doing its own mutual TLS); otherwise HTTP/1.1, which every app speaks.
    let h2 = req.version() == http::Version::HTTP_2
        && (peer.h2_end_to_end
            || req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("application/grpc")));
    let upgrade = match inb.tunnels.forward_request(&mut req) {
        Ok(u) => u,
        Err(full) => return full.response(),
    };
    let headers = req.headers_mut();
    proxy::strip_identity(headers);
    proxy::strip_rewrites(headers);
    // The token was for this sidecar; the app gets the verified facts instead.
    headers.remove(header::AUTHORIZATION);
    headers.insert(PEER_HEADER, peer.header.clone());
    if let Ok(v) = HeaderValue::from_str(&scopes) {
        headers.insert(SCOPES_HEADER, v);
    }
    let uri = match &rewritten {
        None => proxy::uri_for(app_authority, req.uri()),
        Some(p) => proxy::uri_with_path(app_authority, p, req.uri().query()),
    };
    let Some(uri) = uri else {
        return proxy::text(StatusCode::BAD_REQUEST, "meshid: bad request target");
    };
    if !h2
        && !req.headers().contains_key(header::HOST)
        && let Some(a) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        // HTTP/2 callers of HTTP/1.1 apps send :authority, not Host; the app gets it as Host.
        req.headers_mut().insert(header::HOST, a);
    }
    *req.uri_mut() = uri;
    let clients = if peer.redirected {
        &inb.redirected
    } else {
        &inb.direct
    };
    let client = if h2 {
        &clients.h2c
    } else {
        *req.version_mut() = http::Version::HTTP_11;
        &clients.http1
    };
    match client.request(req).await {
        Ok(resp) => inb.tunnels.forward_response(resp, upgrade),
        Err(e) => {
            warn!("app at {app} failed: {e}");
            proxy::text(
                StatusCode::BAD_GATEWAY,
                format!("meshid: the app at {app} did not answer"),
            )
        }
    }
}
