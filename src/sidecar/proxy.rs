//! HTTP plumbing both proxy directions share: the body type, short text responses, and the
//! headers a proxy must not forward (RFC 9110 §7.6.1) or must not trust from a caller.

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Headers only the callee's sidecar may set; any copy from a caller is removed first.
pub const PEER_HEADER: &str = "x-meshid-peer";
pub const SCOPES_HEADER: &str = "x-meshid-scopes";

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

/// Remove hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    for n in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Remove every caller-supplied copy of the identity headers.
pub fn strip_identity(headers: &mut HeaderMap) {
    headers.remove(PEER_HEADER);
    headers.remove(SCOPES_HEADER);
}

#[cfg(test)]
mod tests {
    use super::*;

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
        strip_hop_by_hop(&mut h);
        strip_identity(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(
            h.contains_key("traceparent"),
            "trace context passes through"
        );
    }
}
