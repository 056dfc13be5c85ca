//! The HTTPS front end for OAuth clients: `POST /token` (RFC 6749 §4.4 client credentials with
//! RFC 8705 `tls_client_auth`), `GET /.well-known/jwks.json` and `GET
//! /.well-known/oauth-authorization-server` (RFC 8414). Grant decisions are [`CaCore::grant`]'s;
//! this module parses the form and maps errors to RFC 6749 §5.2 bodies, here and nowhere else.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use meshid_proto::serve::{ConnInfo, Server};
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::ca::{CaCore, TokenParams};
use crate::grant::GrantError;

const MAX_FORM_BYTES: usize = 16 * 1024;

pub async fn serve(core: Arc<CaCore>, server: Server, shutdown: CancellationToken) {
    server
        .serve(
            move |conn: &ConnInfo| {
                let (core, conn) = (core.clone(), conn.clone());
                Some(hyper::service::service_fn(move |req| {
                    let (core, conn) = (core.clone(), conn.clone());
                    async move {
                        let chain = conn.peer_chain.as_deref().map(Vec::as_slice);
                        Ok::<_, Infallible>(route(&core, chain, conn.peer, req).await)
                    }
                }))
            },
            shutdown,
        )
        .await;
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// RFC 6749 §5.2 error response; the one mapping from grant errors to HTTP.
fn oauth_error(err: &GrantError) -> Response<Full<Bytes>> {
    let status = match err {
        GrantError::InvalidClient(_) => StatusCode::UNAUTHORIZED,
        GrantError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        GrantError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut r = json_response(
        status,
        json!({"error": err.code(), "error_description": err.to_string()}),
    );
    no_store(&mut r);
    if let GrantError::RateLimited { retry_after } = err {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
    }
    r
}

/// RFC 6749 §5.1: token responses must not be cached.
fn no_store(r: &mut Response<Full<Bytes>>) {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

async fn route(
    core: &CaCore,
    chain: Option<&[CertificateDer<'static>]>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/token") => token(core, chain, peer, req).await,
        (&Method::GET, "/.well-known/jwks.json") => {
            let mut r = json_response(StatusCode::OK, core.jwks());
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=60"),
            );
            r
        }
        (&Method::GET, "/.well-known/oauth-authorization-server") => {
            json_response(StatusCode::OK, core.metadata())
        }
        (&Method::POST, "/inject") => inject(core, req).await,
        (
            _,
            "/token"
            | "/.well-known/jwks.json"
            | "/.well-known/oauth-authorization-server"
            | "/inject",
        ) => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}

/// The API server sends pods of at most a few MiB (its request limit is 3 MiB).
const MAX_REVIEW_BYTES: usize = 4 << 20;

/// The mutating admission webhook: an AdmissionReview v1 for a pod in, the review's response
/// (a JSONPatch that adds the sidecar, or allowed unchanged, or refused with the reason) out.
async fn inject(core: &CaCore, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // Reviews in progress at once (each may hold a few MiB): the API server sends few, and
    // anonymous clients must not be able to make the CA hold many.
    static REVIEWS: std::sync::LazyLock<tokio::sync::Semaphore> =
        std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(32));
    let Ok(_permit) = REVIEWS.try_acquire() else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "too many admission reviews in progress; retry"}),
        );
    };
    let limit = core.config.limits.header_read_timeout;
    let body = match tokio::time::timeout(
        limit,
        Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("the AdmissionReview is over {MAX_REVIEW_BYTES} bytes or was cut off")}),
            );
        }
        Err(_) => {
            return json_response(
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": format!("the body did not arrive within {limit:?}")}),
            );
        }
    };
    match crate::inject::admission_review(&body, &core.config.inject) {
        Ok(review) => {
            let allowed = review["response"]["allowed"] == true;
            let patched = review["response"].get("patch").is_some();
            tracing::info!(
                uid = review["response"]["uid"].as_str().unwrap_or_default(),
                allowed,
                patched,
                "admission review answered"
            );
            json_response(StatusCode::OK, review)
        }
        Err(e) => {
            tracing::warn!("admission review refused: {e}");
            json_response(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}))
        }
    }
}

async fn token(
    core: &CaCore,
    chain: Option<&[CertificateDer<'static>]>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match token_params(core, chain, peer, req).await {
        Ok(r) => r,
        Err(e) => {
            core.refuse_token_request(chain, &e, Some(peer)).await;
            oauth_error(&e)
        }
    }
}

/// Parse the form and run the grant; a malformed request is returned as the error to audit.
async fn token_params(
    core: &CaCore,
    chain: Option<&[CertificateDer<'static>]>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, GrantError> {
    let form_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    // Read the (bounded) body before answering: an HTTP/2 stream answered with its body unread
    // is reset, and clients report that instead of our error.
    // A client that trickles its body is cut off like one that trickles its head.
    let limit = core.config.limits.header_read_timeout;
    let body = match tokio::time::timeout(
        limit,
        Limited::new(req.into_body(), MAX_FORM_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return Err(GrantError::InvalidRequest(format!(
                "the body is over {MAX_FORM_BYTES} bytes or was cut off"
            )));
        }
        Err(_) => {
            return Err(GrantError::InvalidRequest(format!(
                "the body did not arrive within {limit:?}"
            )));
        }
    };
    if !form_type {
        return Err(GrantError::InvalidRequest(
            "the body must be application/x-www-form-urlencoded".into(),
        ));
    }
    // RFC 6749 §3.2: parameters must not be included more than once.
    let mut form: HashMap<String, String> = HashMap::new();
    for (k, v) in form_urlencoded::parse(&body) {
        if form.insert(k.to_string(), v.into_owned()).is_some() {
            return Err(GrantError::InvalidRequest(format!(
                "parameter {k} is repeated"
            )));
        }
    }
    let audience = match (form.get("audience"), form.get("resource")) {
        (Some(a), Some(r)) if a != r => {
            return Err(GrantError::InvalidRequest(
                "audience and resource disagree".into(),
            ));
        }
        (a, r) => a.or(r).map(String::as_str),
    };
    let params = TokenParams {
        grant_type: Some(form.get("grant_type").map(String::as_str).unwrap_or("")),
        client_id: form.get("client_id").map(String::as_str),
        scope: form.get("scope").map(String::as_str),
        audience,
    };
    // The grant audits its own outcome.
    Ok(match core.grant(chain, params, Some(peer)).await {
        Ok(t) => {
            let mut r = json_response(
                StatusCode::OK,
                json!({
                    "access_token": t.access_token.expose(),
                    "token_type": "Bearer",
                    "expires_in": t.expires_in,
                    "scope": t.scope,
                }),
            );
            no_store(&mut r);
            r
        }
        Err(e) => oauth_error(&e),
    })
}
