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
use tokio::net::{TcpListener, TcpStream};
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
/// request's extensions (gRPC handlers read it from there).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The client's certificate chain, leaf first, when TLS was used and the client sent one
    /// (already verified by the TLS configuration's client verifier).
    pub peer_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
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

/// One listener with its bounds.
pub struct Server {
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    protocol: Protocol,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<Stats>,
    on_tls_error: Option<TlsErrorHook>,
}

type TlsErrorHook = Arc<dyn Fn(&std::io::Error) + Send + Sync>;

impl Server {
    pub fn new(name: &'static str, listener: TcpListener, limits: Limits) -> Self {
        Self {
            name,
            listener,
            limits,
            protocol: Protocol::Auto,
            tls: None,
            stats: Arc::new(Stats::default()),
            on_tls_error: None,
        }
    }

    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

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
        let Server {
            name,
            listener,
            limits,
            protocol,
            tls,
            stats,
            on_tls_error,
        } = self;
        let make = Arc::new(make);
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let tracker = TaskTracker::new();
        let mut last_over_limit_warning: Option<Instant> = None;
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
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
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                stats.over_limit.fetch_add(1, Ordering::Relaxed);
                if last_over_limit_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_over_limit_warning = Some(Instant::now());
                    warn!(
                        listener = name,
                        max = limits.max_connections,
                        "connection limit reached; refusing new connections"
                    );
                }
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (make, stats, tls, on_tls_error, shutdown) = (
                make.clone(),
                stats.clone(),
                tls.clone(),
                on_tls_error.clone(),
                shutdown.clone(),
            );
            tracker.spawn(async move {
                let _permit = permit;
                stats.active.fetch_add(1, Ordering::Relaxed);
                let (io, info) = match tls {
                    None => (
                        Io::Plain(tcp),
                        ConnInfo {
                            peer,
                            peer_chain: None,
                        },
                    ),
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                        let result = tokio::select! {
                            r = handshake => r,
                            _ = shutdown.cancelled() => {
                                stats.active.fetch_sub(1, Ordering::Relaxed);
                                return;
                            }
                        };
                        match result {
                            Ok(Ok(tls)) => {
                                let peer_chain = tls.get_ref().1.peer_certificates().map(|c| {
                                    Arc::new(c.iter().map(|x| x.clone().into_owned()).collect())
                                });
                                (Io::Tls(Box::new(tls)), ConnInfo { peer, peer_chain })
                            }
                            Ok(Err(e)) => {
                                stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
                                if let Some(f) = &on_tls_error {
                                    f(&e);
                                }
                                debug!(listener = name, %peer, "TLS handshake refused: {e}");
                                stats.active.fetch_sub(1, Ordering::Relaxed);
                                return;
                            }
                            Err(_) => {
                                stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                                debug!(listener = name, %peer, "TLS handshake timed out");
                                stats.active.fetch_sub(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                };
                if let Some(service) = make(&info) {
                    serve_connection(name, io, info, service, limits, protocol, &stats, shutdown)
                        .await;
                }
                stats.active.fetch_sub(1, Ordering::Relaxed);
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

/// A plain or TLS connection, as one IO type for hyper.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
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
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
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
    /// Wakes the connection's watchdog when the last request in flight ends (no timer runs
    /// while requests are in flight: a CA holding 10,000 watch streams does no work for them).
    became_idle: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            became_idle: tokio::sync::Notify::new(),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// `Some(how long)` when no request is in flight.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.epoch.elapsed().saturating_sub(since))
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
            a.became_idle.notify_one();
        }
    }
}

/// A response body that keeps its request in flight until it is done or dropped.
pub struct TrackedBody<B> {
    inner: B,
    _in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            this._in_flight = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's service, wrapped: counts requests in flight and adds [`ConnInfo`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    info: ConnInfo,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = Response<TrackedBody<Pin<Box<B>>>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        req.extensions_mut().insert(self.info.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|b| TrackedBody {
                inner: Box::pin(b),
                _in_flight: Some(in_flight),
            }))
        })
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S, B>(
    name: &'static str,
    io: Io,
    info: ConnInfo,
    service: S,
    limits: Limits,
    protocol: Protocol,
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
    let activity = Activity::new();
    let peer = info.peer;
    let service = Tracked {
        inner: service,
        activity: activity.clone(),
        info,
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    if protocol == Protocol::Http1 {
        builder = builder.http1_only();
    }
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    // After we asked the connection to finish: close it for good at this instant.
    let mut hard_close: Option<tokio::time::Instant> = None;
    loop {
        // When to look again: the grace deadline, or when the idle limit runs out; none while
        // requests are in flight (the last one to end wakes us).
        let deadline = hard_close.or_else(|| {
            let idle = activity.idle_for()?;
            let limit = if activity.requests.load(Ordering::Relaxed) == 0 {
                limits.header_read_timeout
            } else {
                limits.idle_timeout
            };
            Some(tokio::time::Instant::now() + limit.saturating_sub(idle))
        });
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(listener = name, %peer, "connection ended: {e}");
                }
                return;
            }
            _ = activity.became_idle.notified(), if deadline.is_none() => {}
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                if hard_close.is_some() {
                    debug!(listener = name, %peer, "connection closed after its grace period");
                    return;
                }
                let Some(idle) = activity.idle_for() else { continue };
                let first = activity.requests.load(Ordering::Relaxed) == 0;
                let limit = if first { limits.header_read_timeout } else { limits.idle_timeout };
                if idle >= limit {
                    if first {
                        stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                        debug!(listener = name, %peer, "no complete request head within {limit:?}; closing");
                    } else {
                        stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                        debug!(listener = name, %peer, "idle for {limit:?}; closing");
                    }
                    conn.as_mut().graceful_shutdown();
                    hard_close = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
            _ = shutdown.cancelled(), if hard_close.is_none() => {
                conn.as_mut().graceful_shutdown();
                hard_close = Some(tokio::time::Instant::now() + limits.drain_timeout);
            }
        }
    }
}

/// Bind `addr`, for a [`Server`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
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
