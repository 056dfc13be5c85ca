//! The CA's admin endpoint on `--admin-addr` (loopback by default): `/healthz`, `/ready` (keys
//! loaded and listeners bound, which is true once this serves) and `/metrics` in the Prometheus
//! text format. Counters are labelled by short reason codes, never by messages or identities.
//!
//! The operator commands (`meshid ca rotate`, `revoke`, `unrevoke`) talk to the running CA
//! here, with a bearer credential the CA writes at start into its data directory
//! (`admin.token`, 0600, beside `admin.addr`): whoever may read the CA's keys may rotate them,
//! nobody else on the host.
//!
//! ```text
//! GET    /rotation                                     status (JSON)
//! POST   /rotation/{prepare|activate|retire|recover}?what=root|intermediate|token-key[&force=true]
//! POST   /rotation/taint?authority=ID
//! POST   /revocations?spiffe_id=ID|serial=HEX[&reason=TEXT]      revoke
//! DELETE /revocations?spiffe_id=ID|serial=HEX                    unrevoke
//! ```

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use std::path::Path;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use meshid_proto::serve::{ConnInfo, Server};
use tokio_util::sync::CancellationToken;

use crate::ca::CaCore;
use crate::rotation::{RotateError, Step, What};
use crate::store::RevokedKind;

/// The admin credential's file in the data directory.
pub const TOKEN_FILE: &str = "admin.token";
/// The admin endpoint's bound address, for the operator commands.
pub const ADDR_FILE: &str = "admin.addr";

/// A new admin credential and the bound address, into the data directory.
pub fn write_credentials(
    dir: &Path,
    addr: std::net::SocketAddr,
) -> std::io::Result<meshid_proto::Secret> {
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| std::io::Error::other("random source failed"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    meshid_proto::atomic_file::write_atomic(&dir.join(TOKEN_FILE), token.as_bytes(), 0o600)?;
    meshid_proto::atomic_file::write_atomic(
        &dir.join(ADDR_FILE),
        format!("{addr}\n").as_bytes(),
        0o644,
    )?;
    Ok(meshid_proto::Secret::new(token))
}

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
                "meshid_ca_jwt_svids_total",
                "outcome",
                "JWT-SVID requests, by outcome (issued, or the refusal's RFC 6749 code).",
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
            "# HELP meshid_ca_audit_write_failures_total Audit records that could not be written (a full or failing disk; each is logged).\n\
             # TYPE meshid_ca_audit_write_failures_total counter\nmeshid_ca_audit_write_failures_total {}",
            core.audit_lost()
        );
        let _ = writeln!(
            out,
            "# HELP meshid_ca_policy_sequence Sequence number of the policy in force.\n\
             # TYPE meshid_ca_policy_sequence gauge\nmeshid_ca_policy_sequence {}",
            core.directory().sequence
        );
        for (metric, help, at) in core.expiries() {
            let _ = writeln!(
                out,
                "# HELP {metric} {help}\n# TYPE {metric} gauge\n{metric} {}",
                meshid_proto::clock::unix_seconds(at) - now
            );
        }
        let status = core.rotation_status();
        let _ = writeln!(
            out,
            "# HELP meshid_ca_sidecars_connected Sidecars holding a bundle stream.\n\
             # TYPE meshid_ca_sidecars_connected gauge\nmeshid_ca_sidecars_connected {}\n\
             # HELP meshid_ca_sidecars_not_acknowledged Connected sidecars that have not acknowledged the bundle in force.\n\
             # TYPE meshid_ca_sidecars_not_acknowledged gauge\nmeshid_ca_sidecars_not_acknowledged {}\n\
             # HELP meshid_ca_revocations Revocations in force.\n\
             # TYPE meshid_ca_revocations gauge\nmeshid_ca_revocations {}",
            status.sidecars.connected,
            status.sidecars.not_acknowledged.len(),
            status.revocations.len()
        );
        let _ = writeln!(
            out,
            "# HELP meshid_ca_authority_live_svids SVIDs under each X.509 authority that may still be in use.\n\
             # TYPE meshid_ca_authority_live_svids gauge"
        );
        for a in &status.authorities {
            let _ = writeln!(
                out,
                "meshid_ca_authority_live_svids{{authority=\"{}\",state=\"{}\"}} {}",
                a.id, a.state, a.live_svids
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

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_string_pretty(body).expect("serializes");
    body.push('\n');
    text(status, body, "application/json")
}

fn error(status: StatusCode, message: String, waiting_for: Vec<String>) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({"error": message, "waiting_for": waiting_for}),
    )
}

/// Whether the request carries the admin credential of this run (compared in constant time).
fn authorized(expected: &meshid_proto::Secret, req: &Request<Incoming>) -> bool {
    let expected = expected.expose().as_bytes();
    if expected.is_empty() {
        return false;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    expected.len() == given.len()
        && aws_lc_rs::constant_time::verify_slices_are_equal(expected, given.as_bytes()).is_ok()
}

/// The operator API: rotation and revocation, for `meshid ca rotate|revoke` on the CA's own
/// host (in Kubernetes, `kubectl exec` into the CA's pod). Loopback callers only, whatever
/// address the listener is bound to: the probes and the scraper may reach the port from the
/// network, the operator API never.
async fn operator(
    core: &CaCore,
    credential: &meshid_proto::Secret,
    peer: std::net::SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if !peer.ip().to_canonical().is_loopback() {
        return error(
            StatusCode::FORBIDDEN,
            "the rotation and revocation API answers on loopback only: run `meshid ca rotate` on the CA's host (in Kubernetes: kubectl exec into the CA's pod)".into(),
            vec![],
        );
    }
    if !authorized(credential, req) {
        return error(
            StatusCode::UNAUTHORIZED,
            format!(
                "the admin credential is missing or wrong: the operator commands read it from {TOKEN_FILE} in the CA's data directory"
            ),
            vec![],
        );
    }
    let path = req.uri().path();
    let method = req.method();
    let query = match query_of(req, path) {
        Ok(q) => q,
        Err(m) => return error(StatusCode::BAD_REQUEST, m, vec![]),
    };
    let result = if path == "/rotation" && method == Method::GET {
        return json(StatusCode::OK, &core.rotation_status());
    } else if path == "/rotation/taint" && method == Method::POST {
        match query.get("authority") {
            Some(id) => core.taint(id).await,
            None => Err(RotateError::Invalid("give authority=ID".into())),
        }
    } else if let Some(step) = path.strip_prefix("/rotation/")
        && method == Method::POST
    {
        let force = query.get("force").is_some_and(|f| f == "true");
        match (
            Step::parse(step),
            query
                .get("what")
                .ok_or_else(|| RotateError::Invalid("give what=root|intermediate|token-key".into()))
                .and_then(|w| What::parse(w)),
        ) {
            (Ok(step), Ok(what)) => core.rotate(step, what, force).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    } else if path == "/revocations" && (method == Method::POST || method == Method::DELETE) {
        let target = match (query.get("spiffe_id"), query.get("serial")) {
            (Some(id), None) => Ok((RevokedKind::SpiffeId, id)),
            (None, Some(serial)) => Ok((RevokedKind::Serial, serial)),
            _ => Err(RotateError::Invalid(
                "give exactly one of spiffe_id=ID or serial=HEX".into(),
            )),
        };
        match target {
            Ok((kind, value)) => {
                let reason = query.get("reason").map(String::as_str).unwrap_or("");
                if reason.len() > 512 {
                    Err(RotateError::Invalid(
                        "reason is longer than 512 bytes".into(),
                    ))
                } else {
                    core.set_revoked(kind, value, reason, method == Method::POST)
                        .await
                }
            }
            Err(e) => Err(e),
        }
    } else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no {method} {path} here"),
            vec![],
        );
    };
    match result {
        Ok(report) => json(StatusCode::OK, &report),
        Err(RotateError::Refused {
            reason,
            waiting_for,
        }) => error(StatusCode::CONFLICT, reason, waiting_for),
        Err(RotateError::Invalid(m)) => error(StatusCode::BAD_REQUEST, m, vec![]),
        Err(RotateError::Internal(m) | RotateError::Conflict(m)) => {
            tracing::error!("rotation step failed: {m}");
            error(StatusCode::INTERNAL_SERVER_ERROR, m, vec![])
        }
    }
}

/// The query of an operator request: each parameter at most once, and only those the path
/// takes (a misspelt `What=` must not fall back to a default).
fn query_of(req: &Request<Incoming>, path: &str) -> Result<BTreeMap<String, String>, String> {
    let allowed: &[&str] = match path {
        "/rotation/taint" => &["authority"],
        "/revocations" => &["spiffe_id", "serial", "reason"],
        p if p.starts_with("/rotation/") => &["what", "force"],
        _ => &[],
    };
    let mut query = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(format!(
                "unknown parameter {k:?} for {path} (it takes: {})",
                allowed.join(", ")
            ));
        }
        if query.insert(k.to_string(), v.into_owned()).is_some() {
            return Err(format!("parameter {k:?} given twice"));
        }
    }
    Ok(query)
}

async fn handle(
    core: &CaCore,
    credential: &meshid_proto::Secret,
    peer: std::net::SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path.starts_with("/rotation") || path == "/revocations" {
        return operator(core, credential, peer, req).await;
    }
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/ready" => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/metrics" => text(
            StatusCode::OK,
            core.metrics.render(core),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /ready, /metrics, /rotation, /revocations\n".into(),
            "text/plain",
        ),
    }
}

pub async fn serve(
    core: Arc<CaCore>,
    credential: meshid_proto::Secret,
    server: Server,
    shutdown: CancellationToken,
) {
    let credential = Arc::new(credential);
    server
        .serve(
            move |conn: &ConnInfo| {
                let (core, credential, peer) = (core.clone(), credential.clone(), conn.peer);
                Some(hyper::service::service_fn(move |req| {
                    let (core, credential) = (core.clone(), credential.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handle(&core, &credential, peer, &req).await,
                        )
                    }
                }))
            },
            shutdown,
        )
        .await;
}
