//! The one connection-serving piece every listener of meshid uses (the CA's gRPC, HTTPS and
//! admin ports; the sidecar's inbound, outbound and admin ports), so that each of them has the
//! same bounds on slow, idle and too many clients:
//!
//! - a TLS handshake must finish within `handshake_timeout`;
//! - the first request head must arrive within `header_read_timeout` (HTTP/1 and HTTP/2: a
//!   connection that completes TLS and then trickles bytes, or sends an HTTP/2 preface and no
//!   complete HEADERS, is closed);
//! - a connection with no request in flight (a response body still streaming counts as in
//!   flight, so long-lived gRPC watch streams are not idle) is closed after `idle_timeout`;
//! - HTTP/2 connections are pinged every `keepalive_interval` and closed when a ping is not
//!   answered within `keepalive_timeout` (half-open connections of dead pods are reaped);
//! - at most `max_connections` at once per listener: beyond that a new connection is closed at
//!   once, and counted;
//! - request heads are bounded by `max_header_bytes` (HTTP/1 buffer, HTTP/2 header list).
//!
//! A listener is a TCP socket (plain or TLS) or a unix socket (the sidecar's Workload API,
//! where each connection also carries the peer's credentials, [`ConnInfo::peer_cred`]).
//!
//! On shutdown a listener stops accepting, asks every connection to finish (HTTP/2 GOAWAY,
//! HTTP/1 `Connection: close` after the request in flight), and closes what is left after
//! `drain_timeout`. Services that hold streams open (gRPC watches) end them on the same
//! cancellation token, so clients reconnect elsewhere.

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The bounds of one listener. Every field has a flag in the commands that serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            // Longer than clients keep pooled connections (90 s), so a client never sends on a
            // connection the server is closing.
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// What a service learns about the connection a request came on. Also inserted into every
/// request's extensions when the listener asks for it (gRPC handlers read it from there).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Where the client was sent by a NAT rule (iptables `REDIRECT`): the address it meant to
    /// reach, when that differs from the listener's own. `None` for a direct connection, and
    /// on listeners that do not ask for it ([`Server::original_dst`]).
    pub original_dst: Option<SocketAddr>,
    /// The client's certificate chain, leaf first, when TLS was used and the client sent one
    /// (already verified by the TLS configuration's client verifier).
    pub peer_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The application protocol the TLS handshake agreed on (ALPN), if any.
    pub alpn: Option<Vec<u8>>,
    /// On a unix socket: who connected, as the kernel tells it (`SO_PEERCRED`). `peer` is then
    /// the unspecified address `0.0.0.0:0`.
    pub peer_cred: Option<PeerCred>,
}

/// The credentials of the process at the other end of a unix socket, taken by the kernel when
/// it connected (it cannot forge them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Where a [`Server`] accepts.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    async fn accept(
        &self,
        max_header_bytes: usize,
    ) -> std::io::Result<(Io, SocketAddr, Option<PeerCred>)> {
        match self {
            Listener::Tcp(l) => {
                let (tcp, peer) = l.accept().await?;
                let _ = tcp.set_nodelay(true);
                Ok((Io::Plain(tcp), peer, None))
            }
            Listener::Unix(l) => {
                let (unix, _) = l.accept().await?;
                let cred = unix.peer_cred().ok().map(|c| PeerCred {
                    uid: c.uid(),
                    gid: c.gid(),
                    pid: c.pid(),
                });
                Ok((
                    // gRPC clients put the socket path in :authority (see uds_authority).
                    Io::Unix(Box::new(crate::uds_authority::UdsAuthority::new(
                        unix,
                        max_header_bytes,
                    ))),
                    SocketAddr::from(([0, 0, 0, 0], 0)),
                    cred,
                ))
            }
        }
    }
}

/// What a listener does with one accepted connection.
pub enum Conn<S> {
    /// Serve HTTP on it with this service, under the listener's bounds.
    Http(S),
    /// Hand the connection over (a tunnel, or a connection whose protocol must be detected
    /// first). The handler may still serve HTTP on it with [`Accepted::serve_http`].
    Stream(StreamHandler),
}

pub type StreamHandler = Box<dyn FnOnce(Accepted) -> BoxFuture + Send>;
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A connection handed to a [`StreamHandler`]: its IO, what is known about it, and what it
/// needs to be served as HTTP under the listener's bounds after all.
pub struct Accepted {
    pub io: Io,
    pub info: ConnInfo,
    http: HttpCtx,
}

struct HttpCtx {
    name: &'static str,
    builder: Arc<AutoBuilder>,
    limits: Limits,
    max_age: Option<Duration>,
    conn_info_in_requests: bool,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
}

impl Accepted {
    /// The listener's shutdown signal (tunnels end on it, after the drain timeout).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.http.shutdown
    }

    /// The listener's bounds.
    pub fn limits(&self) -> &Limits {
        &self.http.limits
    }

    /// Serve HTTP (HTTP/1.1 or HTTP/2 by the preface; upgrades allowed) on this connection,
    /// with the listener's bounds.
    pub async fn serve_http<S, B>(self, service: S)
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let Accepted { io, info, http } = self;
        let bounds = ConnBounds {
            limits: http.limits,
            max_age: http.max_age,
            conn_info_in_requests: http.conn_info_in_requests,
        };
        serve_connection(
            http.name,
            &http.builder,
            io,
            info,
            service,
            bounds,
            &http.stats,
            http.shutdown,
        )
        .await;
    }
}

/// The original destination of a connection that a NAT rule redirected here
/// (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST` for IPv6), or `None` when it came directly.
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let v4 = || sock.original_dst_v4().ok().and_then(|a| a.as_socket());
    let v6 = || sock.original_dst_v6().ok().and_then(|a| a.as_socket());
    let found = match local {
        SocketAddr::V4(_) => v4(),
        // A dual-stack listener sees IPv4 clients as v4-mapped addresses.
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => v4().or_else(v6),
        SocketAddr::V6(_) => v6(),
    }?;
    let same = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
    };
    (!same(found, local)).then_some(found)
}

/// Which HTTP versions a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 only (the explicit proxy, admin endpoints).
    Http1,
    /// HTTP/1.1 or HTTP/2, told apart by the connection preface.
    Auto,
}

/// Counters of what the bounds did, for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub over_limit: AtomicU64,
    pub handshake_failed: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub idle_closed: AtomicU64,
}

/// The [`Stats`] of a process's listeners, for its `/metrics`.
#[derive(Default)]
pub struct ListenerStats(std::sync::Mutex<Vec<(&'static str, Arc<Stats>)>>);

impl ListenerStats {
    pub fn register(&self, server: &Server) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((server.name, server.stats()));
    }

    /// `meshid_listener_connections_total{listener,outcome}` and
    /// `meshid_listener_active_connections{listener}`, in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let listeners = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            out,
            "# HELP meshid_listener_connections_total Connections by listener and what became of them \
             (accepted, or closed by a bound).\n# TYPE meshid_listener_connections_total counter"
        );
        for (name, s) in listeners.iter() {
            for (outcome, v) in [
                ("accepted", &s.accepted),
                ("over_limit", &s.over_limit),
                ("handshake_failed", &s.handshake_failed),
                ("handshake_timeout", &s.handshake_timeouts),
                ("header_timeout", &s.header_timeouts),
                ("idle_closed", &s.idle_closed),
            ] {
                let _ = writeln!(
                    out,
                    "meshid_listener_connections_total{{listener=\"{name}\",outcome=\"{outcome}\"}} {}",
                    v.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP meshid_listener_active_connections Connections open now, by listener.\n\
             # TYPE meshid_listener_active_connections gauge"
        );
        for (name, s) in listeners.iter() {
            let _ = writeln!(
                out,
                "meshid_listener_active_connections{{listener=\"{name}\"}} {}",
                s.active.load(Ordering::Relaxed)
            );
        }
    }
}

/// One listener with its bounds.
pub struct Server {
    name: &'static str,
    listener: Listener,
    limits: Limits,
    protocol: Protocol,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<Stats>,
    on_tls_error: Option<TlsErrorHook>,
    anonymous: Option<Anonymous>,
    conn_info_in_requests: bool,
    original_dst: bool,
    max_concurrent_streams: Option<u32>,
}

/// Bounds for TLS clients that present no certificate (first issuance, JWKS readers): a quota
/// of their own, so that anonymous connections can never take the slots of the workloads'
/// authenticated ones, and a maximum age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anonymous {
    pub max_connections: usize,
    pub max_age: Duration,
}

type TlsErrorHook = Arc<dyn Fn(&std::io::Error) + Send + Sync>;

impl Server {
    pub fn new(name: &'static str, listener: TcpListener, limits: Limits) -> Self {
        Self::on(name, Listener::Tcp(listener), limits)
    }

    /// A listener on a unix socket (no TLS: who may connect is the socket file's permissions,
    /// and who did connect is in [`ConnInfo::peer_cred`]).
    pub fn unix(name: &'static str, listener: UnixListener, limits: Limits) -> Self {
        Self::on(name, Listener::Unix(listener), limits)
    }

    fn on(name: &'static str, listener: Listener, limits: Limits) -> Self {
        Self {
            name,
            listener,
            limits,
            protocol: Protocol::Auto,
            tls: None,
            stats: Arc::new(Stats::default()),
            on_tls_error: None,
            anonymous: None,
            conn_info_in_requests: false,
            original_dst: false,
            max_concurrent_streams: None,
        }
    }

    /// Look up each connection's original destination ([`ConnInfo::original_dst`]): the
    /// sidecar's listeners, which iptables rules redirect to.
    pub fn original_dst(mut self) -> Self {
        self.original_dst = true;
        self
    }

    /// Insert the connection's [`ConnInfo`] into every request's extensions (for services,
    /// such as tonic's, that are made once rather than per connection).
    pub fn conn_info_in_requests(mut self) -> Self {
        self.conn_info_in_requests = true;
        self
    }

    /// At most `n` HTTP/2 streams at once per connection (hyper's default is 200).
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        self.max_concurrent_streams = Some(n);
        self
    }

    /// Give TLS clients without a certificate their own quota and a maximum connection age.
    pub fn anonymous(mut self, bounds: Anonymous) -> Self {
        self.anonymous = Some(bounds);
        self
    }

    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Serve TLS (TCP listeners only; a unix listener with TLS refuses every connection).
    pub fn tls(mut self, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        self.tls = Some(acceptor);
        self
    }

    /// Called for every refused TLS handshake (metrics).
    pub fn on_tls_error(mut self, f: impl Fn(&std::io::Error) + Send + Sync + 'static) -> Self {
        self.on_tls_error = Some(Arc::new(f));
        self
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serve until `shutdown`, then drain (at most `drain_timeout`) and return. `make` builds
    /// the service of one connection, or refuses the connection with `None`.
    pub async fn serve<M, S, B>(self, make: M, shutdown: CancellationToken)
    where
        M: Fn(&ConnInfo) -> Option<S> + Send + Sync + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        self.serve_conns(move |info: &ConnInfo| make(info).map(Conn::Http), shutdown)
            .await
    }

    /// [`Server::serve`], where `make` may also take a connection over ([`Conn::Stream`]).
    pub async fn serve_conns<M, S, B>(self, make: M, shutdown: CancellationToken)
    where
        M: Fn(&ConnInfo) -> Option<Conn<S>> + Send + Sync + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let Server {
            name,
            listener,
            limits,
            protocol,
            tls,
            stats,
            on_tls_error,
            anonymous,
            conn_info_in_requests,
            original_dst: want_original_dst,
            max_concurrent_streams,
        } = self;
        let anonymous_permits =
            anonymous.map(|a| (Arc::new(Semaphore::new(a.max_connections)), a.max_age));
        let builder = Arc::new(http_builder(&limits, protocol, max_concurrent_streams));
        let handshakes = Arc::new(Handshakes::new(
            anonymous.map_or(limits.max_connections, |a| a.max_connections),
            HANDSHAKES_PER_ADDRESS,
        ));
        let make = Arc::new(make);
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let tracker = TaskTracker::new();
        let mut last_over_limit_warning: Option<Instant> = None;
        loop {
            let (io, peer, peer_cred) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept(limits.max_header_bytes) => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(listener = name, "accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            // TLS listeners: a connection takes a handshake slot (few per source address)
            // until it has shown who it is, and only then a slot of its kind; clients that
            // connect and never finish the handshake cannot fill the slots of the workloads.
            let pre = match &tls {
                Some(_) => handshakes.begin(peer.ip()).map(Slot::Handshake),
                None => permits.clone().try_acquire_owned().ok().map(Slot::Served),
            };
            let Some(pre) = pre else {
                stats.over_limit.fetch_add(1, Ordering::Relaxed);
                if last_over_limit_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_over_limit_warning = Some(Instant::now());
                    warn!(
                        listener = name,
                        max = limits.max_connections,
                        "connection limit reached; refusing new connections"
                    );
                }
                drop(io);
                continue;
            };
            let permits = permits.clone();
            let (make, stats, tls, on_tls_error, shutdown, anonymous_permits, builder) = (
                make.clone(),
                stats.clone(),
                tls.clone(),
                on_tls_error.clone(),
                shutdown.clone(),
                anonymous_permits.clone(),
                builder.clone(),
            );
            tracker.spawn(async move {
                let mut _slot = pre;
                let _active = Active::new(&stats);
                let original_dst = match &io {
                    Io::Plain(tcp) if want_original_dst => original_dst(tcp),
                    _ => None,
                };
                let (io, info) = match (tls, io) {
                    (None, io) => (
                        io,
                        ConnInfo {
                            peer,
                            original_dst,
                            peer_chain: None,
                            alpn: None,
                            peer_cred,
                        },
                    ),
                    (Some(_), Io::Unix(_) | Io::Tls(_)) => {
                        warn!(listener = name, "TLS is served on TCP listeners only");
                        return;
                    }
                    (Some(acceptor), Io::Plain(tcp)) => {
                        let handshake =
                            tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                        let result = tokio::select! {
                            r = handshake => r,
                            _ = shutdown.cancelled() => return,
                        };
                        match result {
                            Ok(Ok(tls)) => {
                                let session = tls.get_ref().1;
                                let peer_chain = session.peer_certificates().map(|c| {
                                    Arc::new(c.iter().map(|x| x.clone().into_owned()).collect())
                                });
                                let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
                                (
                                    Io::Tls(Box::new(tls)),
                                    ConnInfo {
                                        peer,
                                        original_dst,
                                        peer_chain,
                                        alpn,
                                        peer_cred: None,
                                    },
                                )
                            }
                            Ok(Err(e)) => {
                                stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
                                if let Some(f) = &on_tls_error {
                                    f(&e);
                                }
                                debug!(listener = name, %peer, "TLS handshake refused: {e}");
                                return;
                            }
                            Err(_) => {
                                stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                                debug!(listener = name, %peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                // After the handshake: a slot of the connection's kind. A TLS client without a
                // certificate comes from the anonymous quota, for a while.
                let mut max_age = None;
                if matches!(_slot, Slot::Handshake(_)) {
                    let anonymous = info.peer_chain.is_none();
                    let permit = match &anonymous_permits {
                        Some((sem, age)) if anonymous => {
                            max_age = Some(*age);
                            sem.clone().try_acquire_owned()
                        }
                        _ => permits.try_acquire_owned(),
                    };
                    match permit {
                        Ok(p) => _slot = Slot::Served(p),
                        Err(_) => {
                            stats.over_limit.fetch_add(1, Ordering::Relaxed);
                            debug!(listener = name, %peer, anonymous, "connection quota reached; closing");
                            return;
                        }
                    }
                }
                match make(&info) {
                    None => {}
                    Some(Conn::Http(service)) => {
                        let bounds = ConnBounds {
                            limits,
                            max_age,
                            conn_info_in_requests,
                        };
                        serve_connection(
                            name, &builder, io, info, service, bounds, &stats, shutdown,
                        )
                        .await;
                    }
                    Some(Conn::Stream(handler)) => {
                        let http = HttpCtx {
                            name,
                            builder,
                            limits,
                            max_age,
                            conn_info_in_requests,
                            stats: stats.clone(),
                            shutdown,
                        };
                        handler(Accepted { io, info, http }).await;
                    }
                }
            });
        }
        drop(listener);
        tracker.close();
        if !tracker.is_empty() {
            info!(
                listener = name,
                connections = tracker.len(),
                "draining connections"
            );
        }
        // Each connection closes itself at the latest `drain_timeout` after the signal; this
        // bound is only a backstop.
        let _ = tokio::time::timeout(
            limits.drain_timeout + Duration::from_secs(1),
            tracker.wait(),
        )
        .await;
    }
}

/// At most this many TLS handshakes in progress from one source address.
pub const HANDSHAKES_PER_ADDRESS: usize = 256;

/// What a connection holds: a handshake slot until it has shown who it is, then a slot of the
/// listener's (or the anonymous) quota.
enum Slot {
    Handshake(#[allow(dead_code)] HandshakeSlot),
    Served(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
}

/// TLS handshakes in progress: a bound in all and one per source address.
struct Handshakes {
    all: Arc<Semaphore>,
    per_address: usize,
    by_address: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

struct HandshakeSlot {
    _all: tokio::sync::OwnedSemaphorePermit,
    address: std::net::IpAddr,
    owner: Arc<Handshakes>,
}

impl Handshakes {
    fn new(all: usize, per_address: usize) -> Self {
        Self {
            all: Arc::new(Semaphore::new(all)),
            per_address,
            by_address: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn begin(self: &Arc<Self>, address: std::net::IpAddr) -> Option<HandshakeSlot> {
        let all = self.all.clone().try_acquire_owned().ok()?;
        let mut by = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let n = by.entry(address).or_default();
        if *n >= self.per_address {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot {
            _all: all,
            address,
            owner: self.clone(),
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut by = self
            .owner
            .by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                by.remove(&self.address);
            }
        }
    }
}

/// Counts a connection as active for as long as it lives (also if its task panics).
struct Active<'a>(&'a Stats);

impl<'a> Active<'a> {
    fn new(stats: &'a Stats) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A plain TCP, TLS or unix connection, as one IO type for hyper.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Unix(Box<crate::uds_authority::UdsAuthority<UnixStream>>),
}

impl Io {
    /// The TCP connection underneath (none on a unix socket).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Io::Plain(s) => Some(s),
            Io::Tls(s) => Some(s.get_ref().0),
            Io::Unix(_) => None,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Requests in flight on one connection, and since when none has been.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds after `epoch` when the connection last became idle.
    idle_since_ms: AtomicU64,
    /// HTTP/1 only: milliseconds after `epoch` when bytes of a next request head arrived on an
    /// idle keep-alive connection (`NO_HEAD` when none have).
    head_since_ms: AtomicU64,
    /// Set once the client's first bytes are the HTTP/2 preface: then bytes on an idle
    /// connection are pings and window updates, not the start of a request head.
    http2: std::sync::atomic::AtomicBool,
    first_read: std::sync::atomic::AtomicBool,
    /// Wakes the connection's watchdog when the last request in flight ends or a next request
    /// head starts (no timer runs while requests are in flight: a CA holding 10,000 watch
    /// streams does no work for them).
    changed: tokio::sync::Notify,
}

const NO_HEAD: u64 = u64::MAX;

/// Why a connection would be closed, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// No complete request head since the connection (or the head) started.
    HeaderRead,
    /// No request in flight.
    Idle,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(NO_HEAD),
            http2: std::sync::atomic::AtomicBool::new(false),
            first_read: std::sync::atomic::AtomicBool::new(true),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.head_since_ms.store(NO_HEAD, Ordering::Release);
        InFlight(self.clone())
    }

    /// Bytes arrived from the client.
    fn read(&self, bytes: &[u8]) {
        if self.first_read.swap(false, Ordering::Relaxed) && bytes.starts_with(b"PRI ") {
            self.http2.store(true, Ordering::Relaxed);
        }
        if self.http2.load(Ordering::Relaxed)
            || self.in_flight.load(Ordering::Acquire) > 0
            || self.requests.load(Ordering::Relaxed) == 0
        {
            return;
        }
        if self
            .head_since_ms
            .compare_exchange(NO_HEAD, self.now_ms(), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.changed.notify_one();
        }
    }

    /// When no request is in flight: which bound applies and how long it has been running.
    fn bound(&self, limits: &Limits) -> Option<(Bound, Duration, Duration)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let now = self.now_ms();
        let (bound, since) = if self.requests.load(Ordering::Relaxed) == 0 {
            (Bound::HeaderRead, 0)
        } else {
            match self.head_since_ms.load(Ordering::Acquire) {
                NO_HEAD => (Bound::Idle, self.idle_since_ms.load(Ordering::Acquire)),
                head => (Bound::HeaderRead, head),
            }
        };
        let limit = match bound {
            Bound::HeaderRead => limits.header_read_timeout,
            Bound::Idle => limits.idle_timeout,
        };
        Some((
            bound,
            Duration::from_millis(now.saturating_sub(since)),
            limit,
        ))
    }
}

/// The connection's IO, telling [`Activity`] when bytes arrive.
struct Watched {
    io: Io,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() > before
        {
            this.activity.read(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request in flight (its handler, then its response body); dropping it ends it.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.epoch.elapsed().as_millis() as u64, Ordering::Release);
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.changed.notify_one();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until it is done or dropped. The body
    /// of a response to HEAD is dropped here (hyper does so for HTTP/1, not for HTTP/2, where
    /// DATA on a HEAD stream is a protocol error to the client).
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
        head: bool,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        loop {
            let r = this.inner.as_mut().poll_frame(cx);
            match r {
                Poll::Ready(None) => *this.in_flight = None,
                Poll::Ready(Some(Ok(ref f))) if *this.head && f.is_data() => continue,
                _ => {}
            }
            return r;
        }
    }

    fn is_end_stream(&self) -> bool {
        // A HEAD response ends with its headers (HTTP/2: END_STREAM on HEADERS), while its
        // size hint still tells the length a GET would have had.
        self.head || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's service, wrapped: counts requests in flight (and adds [`ConnInfo`] to
/// each request when the service asked for it).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    info: Option<ConnInfo>,
}

pin_project_lite::pin_project! {
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        head: bool,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let (in_flight, head) = (this.in_flight.take(), *this.head);
        Poll::Ready(Ok(resp.map(|inner| TrackedBody {
            inner,
            in_flight,
            head,
        })))
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if req.version() == http::Version::HTTP_2 {
            // Also when the preface did not arrive in the first read.
            self.activity.http2.store(true, Ordering::Relaxed);
        }
        let in_flight = self.activity.begin();
        let head = req.method() == http::Method::HEAD;
        if let Some(info) = &self.info {
            req.extensions_mut().insert(info.clone());
        }
        TrackedFuture {
            inner: self.inner.call(req),
            in_flight: Some(in_flight),
            head,
        }
    }
}

/// What bounds one connection, and how it is served.
struct ConnBounds {
    limits: Limits,
    /// Close after this long whatever it does (anonymous connections).
    max_age: Option<Duration>,
    conn_info_in_requests: bool,
}

/// hyper's connection builder for a listener, made once.
fn http_builder(limits: &Limits, protocol: Protocol, streams: Option<u32>) -> AutoBuilder {
    let mut builder = AutoBuilder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The header-read bound is the watchdog's: hyper's own would also close idle
        // keep-alive connections after it (not after the idle timeout), under clients that
        // pool them for longer.
        .header_read_timeout(None)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    // Neither the header table size nor the frame size is raised: `uds_authority` relies on
    // their initial values. (`None` to hyper would mean no limit: keep its 200 then.)
    if let Some(n) = streams {
        builder.http2().max_concurrent_streams(n);
    }
    if protocol == Protocol::Http1 {
        builder = builder.http1_only();
    }
    builder
}

type AutoBuilder = hyper_util::server::conn::auto::Builder<TokioExecutor>;

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S, B>(
    name: &'static str,
    builder: &AutoBuilder,
    io: Io,
    info: ConnInfo,
    service: S,
    bounds: ConnBounds,
    stats: &Stats,
    shutdown: CancellationToken,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let ConnBounds {
        limits,
        max_age,
        conn_info_in_requests,
    } = bounds;
    let too_old = max_age.map(|a| tokio::time::Instant::now() + a);
    let activity = Activity::new();
    let peer = info.peer;
    let service = Tracked {
        inner: service,
        activity: activity.clone(),
        info: conn_info_in_requests.then_some(info),
    };
    let io = Watched {
        io,
        activity: activity.clone(),
    };
    // Upgrades (WebSocket, CONNECT) are the service's to accept; a connection that upgrades
    // leaves these bounds with its IO.
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    // After we asked the connection to finish: close it for good at this instant.
    let mut hard_close: Option<tokio::time::Instant> = None;
    loop {
        // When to look again: the grace deadline, or when the bound in force runs out; none
        // while requests are in flight (the last one to end wakes us, as does a next head).
        let deadline = hard_close.or_else(|| {
            let (_, running, limit) = activity.bound(&limits)?;
            Some(tokio::time::Instant::now() + limit.saturating_sub(running))
        });
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(listener = name, %peer, "connection ended: {e}");
                }
                return;
            }
            _ = activity.changed.notified() => {}
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                if hard_close.is_some() {
                    debug!(listener = name, %peer, "connection closed after its grace period");
                    return;
                }
                let Some((bound, running, limit)) = activity.bound(&limits) else { continue };
                if running < limit {
                    continue;
                }
                match bound {
                    Bound::HeaderRead => {
                        stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                        debug!(listener = name, %peer, "no complete request head within {limit:?}; closing");
                    }
                    Bound::Idle => {
                        stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                        debug!(listener = name, %peer, "idle for {limit:?}; closing");
                    }
                }
                conn.as_mut().graceful_shutdown();
                hard_close = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
            _ = tokio::time::sleep_until(too_old.unwrap_or_else(tokio::time::Instant::now)), if too_old.is_some() && hard_close.is_none() => {
                debug!(listener = name, %peer, "anonymous connection reached its maximum age; closing");
                conn.as_mut().graceful_shutdown();
                hard_close = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
            _ = shutdown.cancelled(), if hard_close.is_none() => {
                conn.as_mut().graceful_shutdown();
                hard_close = Some(tokio::time::Instant::now() + limits.drain_timeout);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn quick() -> Limits {
        Limits {
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            drain_timeout: Duration::from_millis(500),
            max_connections: 2,
            ..Limits::default()
        }
    }

    async fn hello_server(
        limits: Limits,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = Server::new("test", listener, limits).protocol(Protocol::Http1);
        let task = tokio::spawn(server.serve(
            |_: &ConnInfo| {
                Some(hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"hi"),
                    )))
                }))
            },
            shutdown.clone(),
        ));
        (addr, shutdown, task)
    }

    async fn closed_within(s: &mut TcpStream, d: Duration) -> bool {
        let mut buf = [0u8; 256];
        matches!(
            tokio::time::timeout(d, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await,
            Ok(())
        )
    }

    #[tokio::test]
    async fn a_client_that_sends_no_complete_head_is_closed() {
        let (addr, _stop, _) = hello_server(quick()).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        assert!(closed_within(&mut slow, Duration::from_secs(3)).await);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_and_over_the_limit_is_refused() {
        let (addr, _stop, _) = hello_server(quick()).await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = a.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let _b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Two held: the third is closed at once.
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut c, Duration::from_millis(500)).await);
        // The idle keep-alive connection goes after idle_timeout.
        assert!(closed_within(&mut a, Duration::from_secs(3)).await);
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_outlives_the_header_timeout_but_not_a_slow_next_head() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_secs(3),
            ..quick()
        };
        let (addr, _stop, _) = hello_server(limits).await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 512];
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = a.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // Idle for longer than the header timeout: still open, and serves the next request.
        tokio::time::sleep(Duration::from_millis(800)).await;
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = a.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // A next head trickled slowly is cut off after the header timeout, not the idle one.
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        assert!(closed_within(&mut a, Duration::from_secs(3)).await);
        assert!(
            started.elapsed() < Duration::from_millis(2000),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn handshakes_are_bounded_in_all_and_per_source_address() {
        let h = Arc::new(Handshakes::new(10, 3));
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3)
            .map(|_| h.begin(a).expect("under the bound"))
            .collect();
        assert!(h.begin(a).is_none(), "a fourth from one address");
        let others: Vec<_> = (0..3)
            .map(|_| h.begin(b).expect("another address"))
            .collect();
        drop(held);
        assert!(h.begin(a).is_some(), "finished handshakes free their slots");
        assert_eq!(h.by_address.lock().unwrap().len(), 1, "{:?}", h.by_address);
        drop(others);
        let many: Vec<_> = (0..40)
            .filter_map(|i| h.begin(std::net::IpAddr::from([10, 1, 0, i as u8])))
            .collect();
        assert_eq!(many.len(), 10, "the bound in all");
    }

    #[tokio::test]
    async fn shutdown_drains_and_returns() {
        let (addr, stop, task) = hello_server(quick()).await;
        let mut held = TcpStream::connect(addr).await.unwrap();
        held.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let _ = held.read(&mut buf).await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("the server returns within its drain bound")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "no longer accepting"
        );
    }
}
