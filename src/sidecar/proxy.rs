//! HTTP plumbing both proxy directions share: the body type, short text responses, and the
//! headers a proxy must not forward (RFC 9110 §7.6.1) or must not trust from a caller.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Uri, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Headers only the callee's sidecar may set; any copy from a caller is removed first.
pub const PEER_HEADER: HeaderName = HeaderName::from_static("x-meshid-peer");
pub const SCOPES_HEADER: HeaderName = HeaderName::from_static("x-meshid-scopes");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut r = Response::new(full(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Remove hop-by-hop headers, including any the `Connection` header names. Runs on every
/// proxied request and response, so the usual case (no `Connection` header, as in HTTP/2)
/// allocates nothing.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
    }
    for n in [
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &HTTP2_SETTINGS,
    ] {
        headers.remove(n);
    }
}

/// The WebSocket upgrade a request asks for (`Upgrade: websocket`, with `upgrade` among the
/// `Connection` options). No other upgrade crosses the mesh: after a switch the sidecars only
/// copy bytes, so an upgrade to, say, `h2c` would let a caller speak HTTP/2 to the app past
/// every route rule. Other `Upgrade` headers are dropped with the hop-by-hop ones.
pub fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|o| o.trim().eq_ignore_ascii_case("upgrade"));
    let upgrade = headers.get(header::UPGRADE)?;
    let websocket = upgrade
        .to_str()
        .is_ok_and(|u| u.trim().eq_ignore_ascii_case("websocket"));
    (asks && websocket && headers.get_all(header::UPGRADE).iter().count() == 1)
        .then(|| upgrade.clone())
}

/// [`strip_hop_by_hop`] for a request or response the proxy forwards: what must still reach
/// the next hop is put back, namely `TE: trailers` (gRPC servers refuse requests without it;
/// the one TE value HTTP/2 allows) and, for an upgrade, `Upgrade` with `Connection: upgrade`.
pub fn prepare_forward(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Connections that left HTTP (upgrades, tunnels): a bound on how many at once (beyond the
/// listener's connection cap, which they leave once upgraded), an idle timeout, and the drain
/// after shutdown.
pub struct Tunnels {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    idle: std::time::Duration,
    grace: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
}

pub type TunnelPermit = tokio::sync::OwnedSemaphorePermit;

/// Every tunnel slot is taken.
#[derive(Debug, Clone, Copy)]
pub struct NoTunnelSlot;

impl NoTunnelSlot {
    /// What the caller is answered.
    pub fn response(self) -> Response<Body> {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "meshid: too many tunnels and upgraded connections open",
        )
    }
}

/// A request's WebSocket upgrade, waiting for the next hop to switch.
pub struct PendingUpgrade {
    down: hyper::upgrade::OnUpgrade,
    permit: TunnelPermit,
}

impl Tunnels {
    pub fn new(
        max: usize,
        idle: std::time::Duration,
        grace: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
            idle,
            grace,
            shutdown,
        })
    }

    /// A slot for one more tunnel, if any is left.
    pub fn permit(&self) -> Option<TunnelPermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    pub fn shutdown(&self) -> &tokio_util::sync::CancellationToken {
        &self.shutdown
    }

    /// Ready a request for the next hop: hop-by-hop headers stripped, except a WebSocket
    /// upgrade of an HTTP/1.1 request, which takes a tunnel slot and keeps its `Upgrade`. `Err`:
    /// no slot is left.
    pub fn forward_request(
        &self,
        req: &mut http::Request<hyper::body::Incoming>,
    ) -> Result<Option<PendingUpgrade>, NoTunnelSlot> {
        let upgrade = if req.version() == http::Version::HTTP_2 {
            None
        } else {
            upgrade_of(req.headers())
        };
        let pending = match upgrade {
            None => None,
            Some(_) => match self.permit() {
                Some(permit) => Some(PendingUpgrade {
                    down: hyper::upgrade::on(&mut *req),
                    permit,
                }),
                None => {
                    tracing::warn!(
                        "refused: as many tunnels and upgraded connections as allowed are open"
                    );
                    return Err(NoTunnelSlot);
                }
            },
        };
        prepare_forward(req.headers_mut(), upgrade);
        Ok(pending)
    }

    /// The next hop's response, for the caller: when it switched protocols (to the upgrade the
    /// request asked for), both sides are joined; otherwise hop-by-hop headers go.
    pub fn forward_response(
        self: &std::sync::Arc<Self>,
        mut resp: Response<hyper::body::Incoming>,
        pending: Option<PendingUpgrade>,
    ) -> Response<Body> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(p) = pending
        {
            let up = hyper::upgrade::on(&mut resp);
            self.join_upgrades(p.down, up, p.permit);
            return resp.map(|b| b.boxed());
        }
        let (mut parts, body) = resp.into_parts();
        prepare_forward(&mut parts.headers, None);
        Response::from_parts(parts, body.boxed())
    }

    /// Join two upgraded connections (the app's and the next hop's) once both sides have
    /// switched, and copy bytes both ways (see [`Tunnels::splice`]).
    fn join_upgrades(
        self: &std::sync::Arc<Self>,
        down: hyper::upgrade::OnUpgrade,
        up: hyper::upgrade::OnUpgrade,
        permit: TunnelPermit,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (down, up) = match tokio::try_join!(down, up) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!("upgrade did not complete: {e}");
                    return;
                }
            };
            let mut down = hyper_util::rt::TokioIo::new(down);
            let mut up = hyper_util::rt::TokioIo::new(up);
            this.splice(&mut down, &mut up).await;
        });
    }

    /// Copy bytes both ways until both directions end (half-closes are passed on), no byte has
    /// moved either way for the idle timeout, or the grace after shutdown has passed. Returns
    /// the bytes copied (a to b, b to a).
    pub async fn splice<A, B>(&self, a: &mut A, b: &mut B) -> (u64, u64)
    where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        let epoch = std::time::Instant::now();
        let last = std::sync::atomic::AtomicU64::new(0);
        let mut a = Moving {
            io: a,
            last: &last,
            epoch,
        };
        let copy = tokio::io::copy_bidirectional(&mut a, b);
        tokio::pin!(copy);
        let idle_for = |now: std::time::Instant| {
            let moved =
                std::time::Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed));
            now.duration_since(epoch).saturating_sub(moved)
        };
        loop {
            let left = self
                .idle
                .saturating_sub(idle_for(std::time::Instant::now()));
            tokio::select! {
                r = &mut copy => return r.unwrap_or_default(),
                _ = tokio::time::sleep(left) => {
                    if idle_for(std::time::Instant::now()) >= self.idle {
                        tracing::debug!("tunnel idle for {:?}; closing", self.idle);
                        return (0, 0);
                    }
                }
                _ = self.shutdown.cancelled() => break,
            }
        }
        tokio::time::timeout(self.grace, copy)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }
}

/// One side of a splice, noting when bytes last moved through it (either way).
struct Moving<'a, T: ?Sized> {
    io: &'a mut T,
    last: &'a std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl<T: ?Sized> Moving<'_, T> {
    fn moved(&self) {
        self.last.store(
            self.epoch.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl<T: tokio::io::AsyncRead + Unpin + ?Sized> tokio::io::AsyncRead for Moving<'_, T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.moved();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin + ?Sized> tokio::io::AsyncWrite for Moving<'_, T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut *this.io).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        r
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// `http://{authority}` followed by the path and query of `uri` (`/` when it has none), for
/// the next hop. Reuses the path's buffer instead of formatting and re-parsing the whole URI.
pub fn uri_for<A>(authority: A, uri: &Uri) -> Option<Uri>
where
    Authority: TryFrom<A>,
{
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(Authority::try_from(authority).ok()?);
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).ok()
}

/// `http://{authority}{path}?{query}`: the next hop of a request whose path was canonicalized.
pub fn uri_with_path(authority: Authority, path: &str, query: Option<&str>) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")).ok()?,
        None => PathAndQuery::try_from(path).ok()?,
    });
    Uri::from_parts(parts).ok()
}

/// Headers some frameworks read to serve another path or method than the request line's
/// (Symfony and IIS `X-Original-URL`/`X-Rewrite-URL`, the method overrides of Rails, Express,
/// Spring and others): rules are decided on the request line, so none of them reaches the app.
const REWRITE_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Remove every caller-supplied copy of the identity headers, also spelled with `_` for `-`
/// (CGI and WSGI servers turn `x_meshid_peer` into the same variable as `x-meshid-peer`).
pub fn strip_identity(headers: &mut HeaderMap) {
    headers.remove(&PEER_HEADER);
    headers.remove(&SCOPES_HEADER);
    strip_underscore_aliases(headers, &[PEER_HEADER, SCOPES_HEADER]);
}

/// Remove the headers that would let a caller change the path or method the app serves
/// (also spelled with `_`).
pub fn strip_rewrites(headers: &mut HeaderMap) {
    for h in &REWRITE_HEADERS {
        headers.remove(h);
    }
    strip_underscore_aliases(headers, &REWRITE_HEADERS);
}

/// Remove every header whose name, with `_` read as `-`, is one of `names`. Allocates only
/// when a header name holds a `_`.
fn strip_underscore_aliases(headers: &mut HeaderMap, names: &[HeaderName]) {
    if !headers.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let aliases: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let dashed = k.as_str().replace('_', "-");
            k.as_str().contains('_') && names.iter().any(|n| n.as_str() == dashed)
        })
        .cloned()
        .collect();
    for k in aliases {
        headers.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hop_uri_keeps_path_and_query() {
        let from: Uri = "http://orders.shop.svc/a/b?x=1&y=%20".parse().unwrap();
        let to = uri_for("127.0.0.1:8080", &from).unwrap();
        assert_eq!(to.to_string(), "http://127.0.0.1:8080/a/b?x=1&y=%20");
        let origin_form: Uri = "/only/path".parse().unwrap();
        assert_eq!(
            uri_for("orders", &origin_form).unwrap().to_string(),
            "http://orders/only/path"
        );
        let no_path: Uri = "http://orders".parse().unwrap();
        assert_eq!(uri_for("orders", &no_path).unwrap().path(), "/");
        assert!(uri_for("bad host/x", &from).is_none(), "not an authority");
    }

    #[test]
    fn forwarding_keeps_te_trailers_and_upgrades_only() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, x-hop"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        let up = upgrade_of(&h);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        prepare_forward(&mut h, up);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(!h.contains_key("x-hop"));

        let mut h2c = HeaderMap::new();
        h2c.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h2c.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h2c.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAoAAAAAIAAAAA"),
        );
        assert!(upgrade_of(&h2c).is_none(), "only WebSocket upgrades cross");
        prepare_forward(&mut h2c, None);
        assert!(h2c.is_empty(), "{h2c:?}");

        let mut plain = HeaderMap::new();
        plain.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        plain.insert(header::TE, HeaderValue::from_static("gzip"));
        assert!(
            upgrade_of(&plain).is_none(),
            "Upgrade without Connection: upgrade"
        );
        prepare_forward(&mut plain, None);
        assert!(plain.is_empty(), "{plain:?}");
    }

    #[test]
    fn hop_by_hop_and_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        h.append(PEER_HEADER, HeaderValue::from_static("spiffe://forged"));
        h.append(PEER_HEADER, HeaderValue::from_static("spiffe://forged2"));
        h.insert(
            "x_meshid_peer",
            HeaderValue::from_static("spiffe://forged3"),
        );
        h.insert("X_Meshid_Scopes", HeaderValue::from_static("orders:write"));
        h.insert("x-original-url", HeaderValue::from_static("/admin"));
        h.insert("x_original_url", HeaderValue::from_static("/admin"));
        h.insert("x_http_method_override", HeaderValue::from_static("DELETE"));
        h.insert("x-http-method-override", HeaderValue::from_static("DELETE"));
        strip_hop_by_hop(&mut h);
        strip_identity(&mut h);
        strip_rewrites(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(
            h.contains_key("traceparent"),
            "trace context passes through"
        );
    }
}
