//! Kubernetes attestation: a projected ServiceAccount token with audience `meshid-ca` names
//! the caller's namespace and service account, which give `spiffe://<td>/ns/<ns>/sa/<sa>`.
//!
//! Two ways to check the token, chosen by the operator:
//! - [`TokenReview`]: ask the API server (`POST /apis/authentication.k8s.io/v1/tokenreviews`),
//!   authenticating as the CA's own service account. Catches deleted pods and service accounts.
//! - [`OidcJwks`]: offline, against the cluster's service-account issuer and its JWKS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meshid_proto::{Secret, TrustDomain};
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use serde::Deserialize;

use super::{AttestError, AttestationKind, Attested, K8S_AUDIENCE};

/// Where the kubelet mounts the CA's own service-account credentials.
pub const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE: usize = 256 * 1024;
/// Longer inputs are not ServiceAccount tokens; refuse before any work.
const MAX_TOKEN_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum K8sConfigError {
    #[error("API server URL {0:?} must be https://host[:port]")]
    BadUrl(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no usable CA certificate")]
    BadCa { path: String },
    #[error("JWKS in {path}: {detail}")]
    BadJwks { path: String, detail: String },
}

/// The configured way of checking ServiceAccount tokens.
pub enum K8sAttestor {
    TokenReview(TokenReview),
    Oidc(OidcJwks),
}

impl K8sAttestor {
    pub async fn attest(&self, td: &TrustDomain, token: &Secret) -> Result<Attested, AttestError> {
        if token.expose().len() > MAX_TOKEN_LEN {
            return Err(AttestError::K8sRefused("token is too long".into()));
        }
        let (ns, sa) = match self {
            Self::TokenReview(r) => r.review(token).await?,
            Self::Oidc(o) => o.verify(token)?,
        };
        let spiffe_id = td.workload_id(&ns, &sa).map_err(|e| {
            AttestError::K8sRefused(format!(
                "namespace/service account do not form a SPIFFE ID: {e}"
            ))
        })?;
        Ok(Attested {
            spiffe_id,
            kind: AttestationKind::K8sServiceAccount,
        })
    }
}

/// `system:serviceaccount:<ns>:<sa>` -> (ns, sa).
fn parse_username(username: &str) -> Result<(String, String), AttestError> {
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| AttestError::K8sRefused(format!("{username:?} is not a service account")))?;
    match rest.split_once(':') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => {
            Ok((ns.into(), sa.into()))
        }
        _ => Err(AttestError::K8sRefused(format!(
            "malformed service account name {username:?}"
        ))),
    }
}

/// The Kubernetes API server as the CA reaches it (TokenReview, the bundle ConfigMaps): its
/// address, TLS verified against the cluster's CA, and the CA's own bearer-token file.
pub struct ApiEndpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `host:port` (`[host]:port` for IPv6), for the Host header and messages.
    pub(crate) authority: String,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) tls: tokio_rustls::TlsConnector,
    /// Re-read on every request, because the kubelet rotates it.
    pub(crate) credentials: PathBuf,
}

impl ApiEndpoint {
    /// `api_url` is `https://host[:port]`; `ca_file` the API server's CA; `credentials` a file
    /// with the CA's own bearer token.
    pub fn new(
        api_url: &str,
        ca_file: &Path,
        credentials: PathBuf,
    ) -> Result<Self, K8sConfigError> {
        let bad = || K8sConfigError::BadUrl(api_url.to_owned());
        let uri: http::Uri = api_url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") || uri.path().len() > 1 {
            return Err(bad());
        }
        let host = uri
            .host()
            .ok_or_else(bad)?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        let bad_ca = || K8sConfigError::BadCa {
            path: ca_file.display().to_string(),
        };
        let pem = std::fs::read(ca_file).map_err(|source| K8sConfigError::Read {
            path: ca_file.display().to_string(),
            source,
        })?;
        let certs = meshid_proto::pem::decode_certs(&pem).map_err(|_| bad_ca())?;
        let mut roots = RootCertStore::empty();
        if roots.add_parsable_certificates(certs).0 == 0 {
            return Err(bad_ca());
        }
        // The API server has an ordinary DNS/IP certificate, so stock webpki verification applies.
        let config = rustls::ClientConfig::builder_with_provider(meshid_proto::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            host,
            port,
            authority,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            credentials,
        })
    }
}

/// TokenReview against the API server.
pub struct TokenReview {
    api: ApiEndpoint,
}

#[derive(Deserialize)]
struct ReviewResponse {
    status: Option<ReviewStatus>,
}

#[derive(Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    user: Option<ReviewUser>,
    #[serde(default)]
    audiences: Vec<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ReviewUser {
    username: String,
}

impl TokenReview {
    /// `api_url` is `https://host[:port]`; `ca_file` the API server's CA; `credentials` a file
    /// with the CA's own bearer token, re-read on every review because kubelet rotates it.
    pub fn new(
        api_url: &str,
        ca_file: &Path,
        credentials: PathBuf,
    ) -> Result<Self, K8sConfigError> {
        Ok(Self {
            api: ApiEndpoint::new(api_url, ca_file, credentials)?,
        })
    }

    async fn review(&self, token: &Secret) -> Result<(String, String), AttestError> {
        let unavailable = |m: String| AttestError::K8sUnavailable(m);
        let bearer = tokio::fs::read_to_string(&self.api.credentials)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "reading CA credentials {}: {e}",
                    self.api.credentials.display()
                ))
            })?;
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": { "token": token.expose(), "audiences": [K8S_AUDIENCE] },
        });
        // The credentials file is outside input: a byte that cannot go in a header is an
        // error of this review, never a crash of the CA (and the value is never printed).
        let mut authorization =
            hyper::header::HeaderValue::from_str(&format!("Bearer {}", bearer.trim())).map_err(
                |_| {
                    unavailable(format!(
                        "CA credentials {} hold bytes that cannot be sent in a header",
                        self.api.credentials.display()
                    ))
                },
            )?;
        authorization.set_sensitive(true);
        let request = hyper::Request::post("/apis/authentication.k8s.io/v1/tokenreviews")
            .header(hyper::header::HOST, &self.api.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::AUTHORIZATION, authorization)
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| unavailable(format!("building the TokenReview request: {e}")))?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect((self.api.host.as_str(), self.api.port))
                .await
                .map_err(|e| unavailable(format!("connecting to {}: {e}", self.api.authority)))?;
            let tls = self
                .api
                .tls
                .connect(self.api.server_name.clone(), tcp)
                .await
                .map_err(|e| unavailable(format!("TLS to the API server: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unavailable(format!("HTTP to the API server: {e}")))?;
            tokio::spawn(conn);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unavailable(format!("TokenReview request: {e}")))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| unavailable(format!("reading TokenReview response: {e}")))?
                .to_bytes();
            Ok::<_, AttestError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| unavailable(format!("no TokenReview answer within {TIMEOUT:?}")))??;
        if !status.is_success() {
            return Err(unavailable(format!("TokenReview answered HTTP {status}")));
        }
        let review: ReviewResponse = serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("TokenReview response is not JSON: {e}")))?;
        let status = review
            .status
            .ok_or_else(|| unavailable("TokenReview response has no status".into()))?;
        if !status.authenticated {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            if why.contains("audience") {
                return Err(AttestError::K8sWrongAudience);
            }
            return Err(AttestError::K8sRefused(why));
        }
        // The API server answers with the audiences the token is valid for among those we asked.
        if !status.audiences.iter().any(|a| a == K8S_AUDIENCE) {
            return Err(AttestError::K8sWrongAudience);
        }
        let user = status
            .user
            .ok_or_else(|| AttestError::K8sRefused("TokenReview names no user".into()))?;
        parse_username(&user.username)
    }
}

/// Offline validation against the service-account issuer's JWKS.
pub struct OidcJwks {
    issuer: String,
    keys: JwkSet,
}

#[derive(Deserialize)]
struct SaClaims {
    sub: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaim,
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: String,
    serviceaccount: NameRef,
}

#[derive(Deserialize)]
struct NameRef {
    name: String,
}

impl OidcJwks {
    pub fn from_file(issuer: String, path: &Path) -> Result<Self, K8sConfigError> {
        let bytes = std::fs::read(path).map_err(|source| K8sConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let keys: JwkSet = serde_json::from_slice(&bytes).map_err(|e| K8sConfigError::BadJwks {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        if keys.keys.is_empty() {
            return Err(K8sConfigError::BadJwks {
                path: path.display().to_string(),
                detail: "no keys".into(),
            });
        }
        Ok(Self { issuer, keys })
    }

    fn verify(&self, token: &Secret) -> Result<(String, String), AttestError> {
        use jsonwebtoken::errors::ErrorKind;
        let refused = |m: &str| AttestError::K8sRefused(m.to_owned());
        let header =
            jsonwebtoken::decode_header(token.expose()).map_err(|_| refused("not a JWT"))?;
        // Kubernetes signs with RS256 or ES256; never accept anything else (no none, no HS*).
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(refused("algorithm not allowed (RS256 or ES256 only)"));
        }
        let jwk = match &header.kid {
            Some(kid) => self.keys.find(kid),
            None if self.keys.keys.len() == 1 => self.keys.keys.first(),
            None => None,
        }
        .ok_or_else(|| refused("signing key is not in the cluster's JWKS"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| refused("JWKS key is unusable"))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[K8S_AUDIENCE]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 30;
        let data =
            jsonwebtoken::decode::<SaClaims>(token.expose(), &key, &v).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidAudience => AttestError::K8sWrongAudience,
                    ErrorKind::ExpiredSignature => refused("token expired"),
                    ErrorKind::InvalidIssuer => refused("token issuer is not the cluster's"),
                    ErrorKind::InvalidSignature => refused("signature does not verify"),
                    ErrorKind::MissingRequiredClaim(c) => {
                        AttestError::K8sRefused(format!("claim {c} missing"))
                    }
                    _ => refused("token does not validate"),
                }
            })?;
        let claims = data.claims;
        let (ns, sa) = parse_username(&claims.sub)?;
        if ns != claims.kubernetes.namespace || sa != claims.kubernetes.serviceaccount.name {
            return Err(refused("sub and kubernetes.io claims disagree"));
        }
        Ok((ns, sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames_parse() {
        assert_eq!(
            parse_username("system:serviceaccount:shop:orders").unwrap(),
            ("shop".to_owned(), "orders".to_owned())
        );
        assert!(parse_username("system:node:worker-1").is_err());
        assert!(parse_username("system:serviceaccount:shop").is_err());
        assert!(parse_username("system:serviceaccount::x").is_err());
    }
}
