//! Access tokens: the claims the CA mints (RFC 9068 JWT profile, bound to the caller's
//! certificate per RFC 8705 §3) and the one verifier a resource server — the callee's sidecar —
//! runs on every presented token (RFC 9068 §4, RFC 8725).
//!
//! The verifier never trusts the token's header for anything but choosing among keys and
//! algorithms it already allows: `typ` must be `at+jwt`, `alg` must be ES256 or EdDSA (never
//! `none`, never HS*), `kid` must name a key of the issuer's JWKS. The JWKS is cached, refetched
//! (rate-limited) when an unknown `kid` shows up, and the last good copy is kept when a fetch
//! fails. Verified tokens are cached until they expire, so a busy callee does not verify the
//! same token twice; the certificate binding and the scope are still checked on every use.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::unix_seconds;
use crate::directory::Scope;

/// RFC 9068 §2.1: the `typ` header of a JWT access token.
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// Largest clock skew tolerated on `exp`/`nbf`.
pub const LEEWAY_SECONDS: u64 = 30;
/// DESIGN: never a token that lives longer than 15 minutes.
pub const MAX_LIFETIME_SECONDS: i64 = 15 * 60;
const MAX_TOKEN_BYTES: usize = 8 * 1024;
const MAX_KEYS: usize = 16;
const MAX_CACHED_TOKENS: usize = 10_000;

/// RFC 8705 §3.1 confirmation claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// The claims of a meshid access token (RFC 9068 §2.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    pub iss: String,
    /// The caller's SPIFFE ID.
    pub sub: String,
    /// The caller's service name.
    pub client_id: String,
    /// The target service's SPIFFE ID.
    pub aud: String,
    /// Space-separated scopes.
    pub scope: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    pub cnf: Confirmation,
}

/// RFC 8705 §3.1: base64url(SHA-256(DER of the certificate)).
pub fn x5t_s256(cert_der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// Why a presented token was refused. Each maps to RFC 6750 `invalid_token` except
/// `InsufficientScope`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token type {0:?} is not at+jwt")]
    WrongType(String),
    #[error("algorithm {0:?} is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("signing key {0:?} is not in the issuer's JWKS")]
    UnknownKid(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("issuer is not {expected}")]
    WrongIssuer { expected: String },
    #[error("audience is not {expected}")]
    WrongAudience { expected: String },
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token lives longer than {MAX_LIFETIME_SECONDS} s")]
    LifetimeTooLong,
    #[error("claim {0} missing or malformed")]
    BadClaim(String),
    #[error("token is bound to another certificate (cnf x5t#S256 mismatch)")]
    CertificateMismatch,
    #[error("token lacks scope {0}")]
    InsufficientScope(String),
}

/// A token that passed every check but the per-use ones (certificate binding, scope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub claims: AccessTokenClaims,
    pub scopes: BTreeSet<String>,
}

type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<JwkSet, String>> + Send + 'a>>;

/// Where the verifier gets the issuer's keys (the CA over gRPC in a sidecar, a fixed set in
/// tests).
pub trait JwksSource: Send + Sync + 'static {
    fn fetch(&self) -> FetchFuture<'_>;
}

/// A fixed key set.
pub struct StaticJwks(pub JwkSet);

impl JwksSource for StaticJwks {
    fn fetch(&self) -> FetchFuture<'_> {
        let keys = self.0.clone();
        Box::pin(async move { Ok(keys) })
    }
}

/// The resource server's token check.
pub struct TokenVerifier {
    issuer: String,
    audience: String,
    source: Arc<dyn JwksSource>,
    keys: ArcSwap<JwkSet>,
    last_fetch: Mutex<Option<Instant>>,
    refetch_after: Duration,
    verified: Mutex<HashMap<[u8; 32], Arc<VerifiedToken>>>,
}

fn b64_json(part: &str) -> Option<serde_json::Value> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl TokenVerifier {
    /// `audience` is this service's SPIFFE ID. Keys are fetched on first use.
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        source: Arc<dyn JwksSource>,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            source,
            keys: ArcSwap::from_pointee(JwkSet { keys: Vec::new() }),
            last_fetch: Mutex::new(None),
            refetch_after: Duration::from_secs(10),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Minimum time between two JWKS fetches triggered by unknown `kid`s.
    pub fn refetch_after(mut self, d: Duration) -> Self {
        self.refetch_after = d;
        self
    }

    /// Fetch the JWKS now if the last fetch is older than the refetch interval. A failed fetch
    /// keeps the keys we have.
    async fn refresh(&self) {
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.refetch_after) {
                return;
            }
            *last = Some(Instant::now());
        }
        match self.source.fetch().await {
            Ok(mut set) => {
                set.keys.truncate(MAX_KEYS);
                self.keys.store(Arc::new(set));
            }
            Err(e) => tracing::warn!("JWKS fetch failed, keeping the last good keys: {e}"),
        }
    }

    /// Check `token` presented over a connection whose client certificate is `peer_cert_der`,
    /// for a route that needs `required` (if any).
    pub async fn verify(
        &self,
        token: &str,
        peer_cert_der: &[u8],
        required: Option<&Scope>,
        now: SystemTime,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        self.verify_bound(token, &x5t_s256(peer_cert_der), required, now)
            .await
    }

    /// [`verify`](Self::verify) with the peer certificate's RFC 8705 thumbprint already
    /// computed (once per connection rather than once per request).
    pub async fn verify_bound(
        &self,
        token: &str,
        presented_x5t: &str,
        required: Option<&Scope>,
        now: SystemTime,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let cache_key: [u8; 32] =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
                .as_ref()
                .try_into()
                .expect("SHA-256 is 32 bytes");
        let now_s = unix_seconds(now);
        let cached = {
            let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(&cache_key).cloned()
        };
        let verified = match cached {
            Some(v) if v.claims.exp + LEEWAY_SECONDS as i64 > now_s => v,
            _ => {
                let v = Arc::new(self.verify_uncached(token, now_s).await?);
                let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_CACHED_TOKENS {
                    cache.retain(|_, t| t.claims.exp + LEEWAY_SECONDS as i64 > now_s);
                    if cache.len() >= MAX_CACHED_TOKENS {
                        cache.clear();
                    }
                }
                cache.insert(cache_key, v.clone());
                v
            }
        };
        // Per use: the token must belong to the certificate it arrived with (RFC 8705 §3).
        if aws_lc_rs::constant_time::verify_slices_are_equal(
            presented_x5t.as_bytes(),
            verified.claims.cnf.x5t_s256.as_bytes(),
        )
        .is_err()
        {
            return Err(TokenError::CertificateMismatch);
        }
        if let Some(scope) = required
            && !verified.scopes.contains(scope.as_str())
        {
            return Err(TokenError::InsufficientScope(scope.to_string()));
        }
        Ok(verified)
    }

    /// How many verified tokens are cached (for metrics and tests).
    pub fn cached(&self) -> usize {
        self.verified.lock().map(|c| c.len()).unwrap_or(0)
    }

    async fn verify_uncached(&self, token: &str, now_s: i64) -> Result<VerifiedToken, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header = b64_json(header).ok_or(TokenError::Malformed)?;
        let typ = header["typ"].as_str().unwrap_or_default();
        // RFC 9068 §4: typ is at+jwt (or application/at+jwt); anything else is refused.
        if !typ.eq_ignore_ascii_case(ACCESS_TOKEN_TYP)
            && !typ.eq_ignore_ascii_case("application/at+jwt")
        {
            return Err(TokenError::WrongType(typ.to_owned()));
        }
        let alg_name = header["alg"].as_str().unwrap_or_default();
        let alg = match alg_name {
            "ES256" => Algorithm::ES256,
            "EdDSA" => Algorithm::EdDSA,
            other => return Err(TokenError::AlgorithmNotAllowed(other.to_owned())),
        };
        let kid = header["kid"]
            .as_str()
            .ok_or(TokenError::UnknownKid(String::new()))?;
        let mut jwk = self.keys.load().find(kid).cloned();
        if jwk.is_none() {
            self.refresh().await;
            jwk = self.keys.load().find(kid).cloned();
        }
        let jwk = jwk.ok_or_else(|| TokenError::UnknownKid(kid.to_owned()))?;
        let key =
            DecodingKey::from_jwk(&jwk).map_err(|_| TokenError::UnknownKid(kid.to_owned()))?;
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.leeway = LEEWAY_SECONDS;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        use jsonwebtoken::errors::ErrorKind;
        let data =
            jsonwebtoken::decode::<AccessTokenClaims>(token, &key, &v).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::InvalidIssuer => TokenError::WrongIssuer {
                        expected: self.issuer.clone(),
                    },
                    ErrorKind::InvalidAudience => TokenError::WrongAudience {
                        expected: self.audience.clone(),
                    },
                    ErrorKind::InvalidAlgorithm => {
                        TokenError::AlgorithmNotAllowed(alg_name.to_owned())
                    }
                    ErrorKind::MissingRequiredClaim(c) => TokenError::BadClaim(c.clone()),
                    ErrorKind::Json(_) => TokenError::BadClaim(
                        "(claims do not match the access-token profile)".into(),
                    ),
                    _ => TokenError::Malformed,
                }
            })?;
        let claims = data.claims;
        if claims.exp - claims.iat > MAX_LIFETIME_SECONDS {
            return Err(TokenError::LifetimeTooLong);
        }
        if claims.iat > now_s + LEEWAY_SECONDS as i64 {
            return Err(TokenError::NotYetValid);
        }
        let scopes = claims
            .scope
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect();
        Ok(VerifiedToken { claims, scopes })
    }
}
