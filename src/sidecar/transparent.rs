//! Transparent mode: connections the pod's iptables rules redirected to the outbound listener
//! (`meshid init-iptables`), with their original destination from `SO_ORIGINAL_DST`.
//!
//! For each one, in this order:
//! - a destination a passthrough rule of the policy allows (the Kubernetes API, an external
//!   database) is connected to in plain TCP;
//! - a port some service declares opaque is tunnelled at once (server-first protocols such as
//!   MySQL's would wait forever for the client to speak);
//! - otherwise the first bytes tell: HTTP/1.1 or HTTP/2 (the h2c preface) is served as HTTP,
//!   each request with the callee's token; anything else, or silence for the detection timeout,
//!   is tunnelled as opaque TCP.
//!
//! Every connection to the destination is mutual TLS to the sidecar that the callee pod's own
//! rules bring it to. The callee's identity is the service the request's Host names (then the
//! handshake must prove exactly that SPIFFE ID), or else what the handshake proves (which must
//! be a service of the directory). A destination that completes no mutual TLS is not in the
//! mesh: refused, and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshid_proto::directory::Directory;
use meshid_proto::serve::Accepted;
use meshid_proto::throttle::{Throttle, Verdict};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::dial::Target;
use super::identity::Current;
use super::metrics::Outcome;
use super::outbound::{Outbound, attach_token, target};
use super::proxy::{self, Body};
use super::tls::Alpn;
use super::tunnel;

/// What the first bytes of a connection say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http,
    Opaque,
    /// The client closed before sending anything.
    Closed,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `Some` once `bytes` decide, `None` while they are a prefix of an HTTP request line or the
/// HTTP/2 preface.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    let mut undecided = false;
    for m in METHODS.iter().chain([&H2_PREFACE]) {
        let n = bytes.len().min(m.len());
        if bytes[..n] == m[..n] {
            if bytes.len() >= m.len() {
                return Some(Detected::Http);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Peek at the first bytes (without consuming them) until they decide, for at most `timeout`.
async fn detect(tcp: &TcpStream, timeout: Duration) -> Detected {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 24];
    let mut wait = Duration::from_millis(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, tcp.peek(&mut buf)).await {
            Err(_) => return Detected::Opaque,
            Ok(Ok(0)) | Ok(Err(_)) => return Detected::Closed,
            Ok(Ok(n)) => n,
        };
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        if Instant::now() >= deadline {
            return Detected::Opaque;
        }
        // A request line split over segments: look again soon, then less and less often (a
        // client that stalls mid-method costs a wake-up per 100 ms, not a busy loop).
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    }
}

/// One WARN per destination and reason per window (a pod whose app retries a refused
/// destination in a loop cannot flood the log).
static THROTTLE: std::sync::LazyLock<Throttle> =
    std::sync::LazyLock::new(|| Throttle::new(Duration::from_secs(10), 10_000));

fn refused(out: &Outbound, dst: SocketAddr, outcome: Outcome, detail: std::fmt::Arguments<'_>) {
    out.metrics.request(outcome);
    let reason = outcome.labels().1;
    match THROTTLE.check(&format!("{dst}|{reason}"), Instant::now()) {
        Verdict::Log { suppressed: 0 } => warn!(%dst, reason, "transparent: {detail}"),
        Verdict::Log { suppressed } => {
            warn!(%dst, reason, suppressed, "transparent: {detail} ({suppressed} more before)")
        }
        Verdict::Quiet => debug!(%dst, reason, "transparent: {detail}"),
    }
}

pub async fn handle(out: Arc<Outbound>, mut acc: Accepted, dst: SocketAddr) {
    if out.dialer.is_own_dial(acc.info.peer) {
        // Our own connection came back: the rules do not exclude the sidecar's UID.
        out.metrics.request(Outcome::OutboundNotInMesh);
        tracing::error!(
            %dst,
            "the sidecar's own connection was redirected back to it: run the sidecar as the UID \
             that `meshid init-iptables --proxy-uid` excludes"
        );
        return;
    }
    let Some(dir) = out.control.directory.load_full() else {
        out.metrics.request(Outcome::OutboundNoDirectory);
        return;
    };
    if dir.passes_through(dst) {
        match tokio::time::timeout(out.dialer.connect_timeout(), TcpStream::connect(dst)).await {
            Ok(Ok(mut tcp)) => {
                out.metrics.request(Outcome::OutboundPassthrough);
                let _ = tcp.set_nodelay(true);
                out.tunnels.splice(&mut acc.io, &mut tcp).await;
            }
            _ => refused(
                &out,
                dst,
                Outcome::OutboundUpstreamError,
                format_args!("passthrough destination does not accept connections"),
            ),
        }
        return;
    }
    let detected = if dir.is_opaque_port(dst.port()) || out.opaque_ports.contains(&dst.port()) {
        Detected::Opaque
    } else {
        match acc.io.tcp() {
            Some(tcp) => detect(tcp, out.detect_timeout).await,
            // The outbound listeners are TCP; nothing else is redirected here.
            None => Detected::Closed,
        }
    };
    match detected {
        Detected::Closed => {}
        Detected::Http => {
            let http = Arc::new(TransparentHttp {
                out: out.clone(),
                dst,
                upstream: tokio::sync::Mutex::new(None),
            });
            acc.serve_http(hyper::service::service_fn(move |req| {
                let http = http.clone();
                async move { Ok::<_, std::convert::Infallible>(http.call(req).await) }
            }))
            .await;
        }
        Detected::Opaque => {
            let identity = out.identity.current();
            match tunnel::open(
                &out.dialer,
                &identity,
                &dir,
                Target::Addr(dst),
                None,
                dst.port(),
            )
            .await
            {
                Ok((mut tls, service)) => {
                    out.metrics.request(Outcome::OutboundTunnel);
                    debug!(%dst, %service, "opaque tunnel open");
                    out.tunnels.splice(&mut acc.io, &mut tls).await;
                }
                Err(tunnel::TunnelError::Dial(e)) => refused(
                    &out,
                    dst,
                    Outcome::OutboundNotInMesh,
                    format_args!(
                        "not in the mesh (no mutual TLS: {e}); a passthrough rule of the policy lets it through"
                    ),
                ),
                Err(e) => refused(
                    &out,
                    dst,
                    Outcome::OutboundTunnelRefused,
                    format_args!("{e}"),
                ),
            }
        }
    }
}

/// The upstream of one redirected HTTP connection: one mutual-TLS connection to the
/// destination, in the app's protocol, made at the first request.
struct TransparentHttp {
    out: Arc<Outbound>,
    dst: SocketAddr,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
}

struct Upstream {
    /// The callee, as the handshake proved it.
    service: String,
    /// The identity the connection was made with: its tokens must be bound to it.
    identity: Arc<Current>,
    sender: Sender,
}

enum Sender {
    Http1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

impl TransparentHttp {
    async fn connect(
        &self,
        identity: &Arc<Current>,
        dir: &Directory,
        expected: Option<&str>,
        h2: bool,
    ) -> Result<Upstream, Response<Body>> {
        let expect_id = expected.and_then(|n| dir.service(n)).map(|s| &s.id);
        let alpn = if h2 { Alpn::H2EndToEnd } else { Alpn::Http1 };
        let (tls, id) = match self
            .out
            .dialer
            .dial(Target::Addr(self.dst), identity, expect_id, alpn)
            .await
        {
            Ok(x) => x,
            Err(e) => {
                refused(
                    &self.out,
                    self.dst,
                    Outcome::OutboundNotInMesh,
                    format_args!("no mutual TLS: {e}"),
                );
                return Err(proxy::text(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "meshid: {} is not in the mesh or not the expected service (no mutual TLS: {e}); \
                         a passthrough rule of the policy lets a destination outside the mesh through",
                        self.dst
                    ),
                ));
            }
        };
        let Some(service) = dir.service_by_id(&id) else {
            refused(
                &self.out,
                self.dst,
                Outcome::OutboundNotInMesh,
                format_args!("{id} is not a service of the directory"),
            );
            return Err(proxy::text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "meshid: {} presented {id}, which is not a service of the mesh",
                    self.dst
                ),
            ));
        };
        let io = TokioIo::new(tls);
        let sender = if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(io)
                .await
                .map_err(|e| upstream_failed(&self.out, &service.name, &e))?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|e| upstream_failed(&self.out, &service.name, &e))?;
            tokio::spawn(conn.with_upgrades());
            Sender::Http1(sender)
        };
        Ok(Upstream {
            service: service.name.clone(),
            identity: identity.clone(),
            sender,
        })
    }

    async fn call(&self, mut req: Request<Incoming>) -> Response<Body> {
        let Some(dir) = self.out.control.directory.load_full() else {
            self.out.metrics.request(Outcome::OutboundNoDirectory);
            return proxy::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "meshid: no service directory from the CA yet",
            );
        };
        let expected = target(&req, |n| dir.service(n).is_some());
        let h2 = req.version() == http::Version::HTTP_2;
        let identity = self.out.identity.current();
        let mut guard = self.upstream.lock().await;
        let stale = guard
            .as_ref()
            .is_none_or(|u| u.sender.is_closed() || u.identity.x5t != identity.x5t);
        if stale {
            match self.connect(&identity, &dir, expected.as_deref(), h2).await {
                Ok(u) => *guard = Some(u),
                Err(resp) => return resp,
            }
        }
        let up = guard.as_mut().expect("connected above");
        if let Some(want) = &expected
            && *want != up.service
        {
            self.out.metrics.request(Outcome::OutboundMisdirected);
            return proxy::text(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "meshid: this connection is to {} ({}), not to {want}",
                    up.service, self.dst
                ),
            );
        }
        let upgrade = match self.out.tunnels.forward_request(&mut req) {
            Ok(u) => u,
            Err(full) => return full.response(),
        };
        let headers = req.headers_mut();
        proxy::strip_identity(headers);
        let (service, identity) = (up.service.clone(), up.identity.clone());
        attach_token(&self.out.tokens, headers, &service, &identity, &dir).await;
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let result = match &mut up.sender {
            Sender::Http1(sender) => {
                // HTTP/1.1 to the next hop: origin-form, the app's Host kept.
                *req.uri_mut() = Uri::from(path);
                *req.version_mut() = http::Version::HTTP_11;
                if sender.ready().await.is_err() {
                    *guard = None;
                    return upstream_failed(&self.out, &service, &"connection closed");
                }
                let fut = sender.send_request(req);
                drop(guard);
                fut.await
            }
            Sender::H2(sender) => {
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .or_else(|| {
                        req.headers()
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| self.dst.to_string());
                match proxy::uri_for(authority.as_str(), &Uri::from(path)) {
                    Some(uri) => *req.uri_mut() = uri,
                    None => return proxy::text(StatusCode::BAD_REQUEST, "meshid: bad authority"),
                }
                let mut sender = sender.clone();
                drop(guard);
                sender.send_request(req).await
            }
        };
        match result {
            Ok(resp) => {
                self.out.metrics.request(Outcome::OutboundForwarded);
                self.out.tunnels.forward_response(resp, upgrade)
            }
            Err(e) => upstream_failed(&self.out, &service, &e),
        }
    }
}

fn upstream_failed(
    out: &Outbound,
    service: &str,
    e: &(dyn std::fmt::Display + Send + Sync),
) -> Response<Body> {
    out.metrics.request(Outcome::OutboundUpstreamError);
    warn!(%service, "upstream failed: {e}");
    proxy::text(
        StatusCode::BAD_GATEWAY,
        format!("meshid: upstream {service} failed: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http_from_the_rest() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"POST /x"), Some(Detected::Http));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Some(Detected::Http)
        );
        // Prefixes wait for more.
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"P"), None);
        // TLS, PostgreSQL's startup, binary: opaque.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Detected::Opaque));
        assert_eq!(
            classify(&[0, 0, 0, 8, 4, 210, 22, 47]),
            Some(Detected::Opaque)
        );
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Some(Detected::Opaque),
            "methods are case-sensitive"
        );
    }
}
