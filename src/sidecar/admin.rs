//! The admin endpoint on `--admin-addr` (loopback by default): `/healthz` (the process runs),
//! `/ready` (an SVID, the bundle and the directory are held; the body says what is missing, so
//! an app container can wait for it), `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
                    async move { Ok::<_, std::convert::Infallible>(handle(&admin, req)) }
                }))
            },
            shutdown,
        )
        .await;
}

fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return proxy::text(StatusCode::METHOD_NOT_ALLOWED, "GET only");
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
            "not found: /healthz, /ready, /metrics",
        ),
    }
}
