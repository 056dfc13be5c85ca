//! The CA's admin endpoint on `--admin-addr` (loopback by default): `/healthz`, `/ready` (keys
//! loaded and listeners bound, which is true once this serves) and `/metrics` in the Prometheus
//! text format. Counters are labelled by short reason codes, never by messages or identities.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use meshid_proto::serve::{ConnInfo, Server};
use tokio_util::sync::CancellationToken;

use crate::ca::CaCore;

/// Counters by (metric, label value).
#[derive(Default)]
pub struct CaMetrics {
    counters: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// What the bounds of each listener did (timeouts, connection caps, anonymous quota).
    pub listeners: meshid_proto::serve::ListenerStats,
}

impl CaMetrics {
    pub fn count(&self, metric: &'static str, label: &'static str) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((metric, label))
            .or_default() += 1;
    }

    fn render(&self, core: &CaCore) -> String {
        let mut out = String::new();
        let help: &[(&str, &str, &str)] = &[
            (
                "meshid_ca_svid_issued_total",
                "attestation",
                "SVIDs issued, by attestation kind.",
            ),
            (
                "meshid_ca_svid_refused_total",
                "reason",
                "SVID requests refused, by reason.",
            ),
            (
                "meshid_ca_token_grants_total",
                "audience_kind",
                "Access tokens granted.",
            ),
            (
                "meshid_ca_token_denials_total",
                "reason",
                "Token requests refused, by RFC 6749 error code.",
            ),
            (
                crate::publish::WRITES_METRIC,
                "outcome",
                "Bundle ConfigMap writes to Kubernetes, by outcome.",
            ),
        ];
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for (metric, label, text) in help {
            let _ = writeln!(out, "# HELP {metric} {text}\n# TYPE {metric} counter");
            for ((m, value), n) in counters.iter() {
                if m == metric {
                    let _ = writeln!(out, "{metric}{{{label}=\"{value}\"}} {n}");
                }
            }
        }
        let now = meshid_proto::clock::unix_seconds(std::time::SystemTime::now());
        let _ = writeln!(
            out,
            "# HELP meshid_ca_policy_reload_refusals_total Policy changes refused (the last good policy stayed).\n\
             # TYPE meshid_ca_policy_reload_refusals_total counter\nmeshid_ca_policy_reload_refusals_total {}",
            core.policy_refusals()
        );
        let _ = writeln!(
            out,
            "# HELP meshid_ca_policy_sequence Sequence number of the policy in force.\n\
             # TYPE meshid_ca_policy_sequence gauge\nmeshid_ca_policy_sequence {}",
            core.directory().sequence
        );
        if let Some(exp) = core.signing_ca_expiry() {
            let _ = writeln!(
                out,
                "# HELP meshid_ca_intermediate_expiry_seconds Seconds until the signing intermediate expires.\n\
                 # TYPE meshid_ca_intermediate_expiry_seconds gauge\nmeshid_ca_intermediate_expiry_seconds {}",
                meshid_proto::clock::unix_seconds(exp) - now
            );
        }
        self.listeners.render(&mut out);
        out
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn handle(core: &CaCore, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/ready" => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/metrics" => text(
            StatusCode::OK,
            core.metrics.render(core),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /ready, /metrics\n".into(),
            "text/plain",
        ),
    }
}

pub async fn serve(core: Arc<CaCore>, server: Server, shutdown: CancellationToken) {
    server
        .serve(
            move |_: &ConnInfo| {
                let core = core.clone();
                Some(hyper::service::service_fn(move |req| {
                    let core = core.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&core, &req)) }
                }))
            },
            shutdown,
        )
        .await;
}
