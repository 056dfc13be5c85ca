//! Access tokens: the claims the CA mints (RFC 9068 JWT profile, bound to the caller's
//! certificate per RFC 8705 §3) and the one verifier a resource server — the callee's sidecar —
//! runs on every presented token (RFC 9068 §4, RFC 8725).
//!
//! The verifier never trusts the token's header for anything but choosing among keys and
//! algorithms it already allows: `typ` must be `at+jwt`, `alg` must be ES256 or EdDSA (never
//! `none`, never HS*), `kid` must name a key of the issuer's JWKS (held by a
//! [`JwksCache`](crate::jwks::JwksCache), shared with the Workload API). Verified tokens are
//! cached until they expire, so a busy callee does not verify the same token twice; the
//! certificate binding and the scope are still checked on every use.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine;
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

use crate::jwks::JwksCache;
pub use crate::jwks::{JwksError, JwksSource, StaticJwks};

/// The resource server's token check.
pub struct TokenVerifier {
    issuer: String,
    audience: String,
    keys: Arc<JwksCache>,
    verified: Mutex<HashMap<[u8; 32], Arc<VerifiedToken>>>,
}

fn b64_json(part: &str) -> Option<serde_json::Value> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl TokenVerifier {
    /// `audience` is this service's SPIFFE ID. Keys are fetched from `source` on first use.
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        source: Arc<dyn JwksSource>,
    ) -> Self {
        Self::with_keys(issuer, audience, Arc::new(JwksCache::new(source)))
    }

    /// A verifier that reads the issuer's keys from `keys` (shared with other verifiers).
    pub fn with_keys(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        keys: Arc<JwksCache>,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            keys,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Fetch the JWKS now (see [`JwksCache::prime`]). A sidecar calls this before it reports
    /// ready, so the first requests it admits do not wait for keys.
    pub async fn prime(&self) -> Result<(), JwksError> {
        self.keys.prime().await
    }

    /// Whether the verifier holds at least one key of the issuer.
    pub fn has_keys(&self) -> bool {
        self.keys.has_keys()
    }

    /// The `kid`s of the keys held now.
    pub fn kids(&self) -> BTreeSet<String> {
        self.keys.kids()
    }

    /// Follow the key set the issuer announces ([`JwksCache::follow_kids`]). Verified tokens
    /// are forgotten when a key is dropped (they are checked again against the keys held).
    /// Returns whether it fetched.
    pub async fn follow_kids(&self, announced: &[String]) -> Result<bool, JwksError> {
        let held = self.keys.kids();
        let fetched = self.keys.follow_kids(announced).await?;
        if !held.is_subset(&self.keys.kids()) {
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        Ok(fetched)
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
            // The whole validity window on every use, not only at first sight: a clock
            // stepped back makes a cached token not valid yet again.
            Some(v)
                if v.claims.exp.saturating_add(LEEWAY_SECONDS as i64) > now_s
                    && v.claims
                        .nbf
                        .max(v.claims.iat)
                        .saturating_sub(LEEWAY_SECONDS as i64)
                        <= now_s =>
            {
                v
            }
            _ => {
                let v = Arc::new(self.verify_uncached(token, now_s).await?);
                let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_CACHED_TOKENS {
                    cache.retain(|_, t| t.claims.exp.saturating_add(LEEWAY_SECONDS as i64) > now_s);
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
        let jwk = self
            .keys
            .key(kid)
            .await
            .ok_or_else(|| TokenError::UnknownKid(kid.to_owned()))?;
        let key =
            DecodingKey::from_jwk(&jwk).map_err(|_| TokenError::UnknownKid(kid.to_owned()))?;
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        // Time is checked below against the caller's `now` (the one clock), not by the
        // library, which reads the system clock itself.
        v.validate_exp = false;
        v.validate_nbf = false;
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
        let leeway = LEEWAY_SECONDS as i64;
        if claims.exp.saturating_add(leeway) <= now_s {
            return Err(TokenError::Expired);
        }
        if claims.nbf.saturating_sub(leeway) > now_s {
            return Err(TokenError::NotYetValid);
        }
        if claims.iat > claims.exp {
            return Err(TokenError::BadClaim("iat (after exp)".into()));
        }
        if claims.exp.saturating_sub(claims.iat) > MAX_LIFETIME_SECONDS {
            return Err(TokenError::LifetimeTooLong);
        }
        if claims.iat.saturating_sub(leeway) > now_s {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::jwks::{FetchFuture, MAX_KEYS};
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{EncodingKey, Header};
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    const ISSUER: &str = "https://ca.test";
    const AUDIENCE: &str = "spiffe://td/ns/shop/sa/orders";
    const PEER_CERT: &[u8] = b"caller certificate DER";

    /// An ES256 signing key and its public JWK, named `kid`.
    pub(crate) struct TestKey {
        pub(crate) kid: String,
        pub(crate) encoding: EncodingKey,
        pub(crate) jwk: Jwk,
    }

    impl TestKey {
        pub(crate) fn new(kid: &str) -> Self {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &rng,
            )
            .unwrap();
            let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
            let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap();
            jwk.common.key_id = Some(kid.to_owned());
            Self {
                kid: kid.to_owned(),
                encoding,
                jwk,
            }
        }

        /// A valid access token for `AUDIENCE`, bound to `PEER_CERT`; `jti` tells tokens apart.
        fn token(&self, jti: &str) -> String {
            let now = unix_seconds(SystemTime::now());
            let claims = AccessTokenClaims {
                iss: ISSUER.into(),
                sub: "spiffe://td/ns/shop/sa/frontend".into(),
                client_id: "frontend".into(),
                aud: AUDIENCE.into(),
                scope: "orders:read".into(),
                iat: now,
                nbf: now,
                exp: now + 300,
                jti: jti.into(),
                cnf: Confirmation {
                    x5t_s256: x5t_s256(PEER_CERT),
                },
            };
            let mut header = Header::new(Algorithm::ES256);
            header.typ = Some(ACCESS_TOKEN_TYP.into());
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
        }
    }

    fn set(keys: &[&TestKey]) -> JwkSet {
        JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        }
    }

    /// A JWKS source that counts its fetches, answers from a script (the last answer repeats)
    /// and, while its gate is closed, does not answer at all: a slow CA.
    struct FakeJwks {
        answers: Mutex<VecDeque<Result<JwkSet, String>>>,
        fetches: AtomicUsize,
        gate: tokio::sync::watch::Sender<bool>,
    }

    impl FakeJwks {
        fn new(answers: impl IntoIterator<Item = Result<JwkSet, String>>) -> Arc<Self> {
            Arc::new(Self {
                answers: Mutex::new(answers.into_iter().collect()),
                fetches: AtomicUsize::new(0),
                gate: tokio::sync::watch::Sender::new(true),
            })
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }

        fn close_gate(&self) {
            self.gate.send_replace(false);
        }

        fn open_gate(&self) {
            self.gate.send_replace(true);
        }
    }

    impl JwksSource for FakeJwks {
        fn fetch(&self) -> FetchFuture<'_> {
            Box::pin(async move {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                let mut gate = self.gate.subscribe();
                gate.wait_for(|open| *open).await.expect("gate kept open");
                let mut answers = self.answers.lock().unwrap();
                if answers.len() > 1 {
                    answers.pop_front().unwrap()
                } else {
                    answers.front().cloned().expect("at least one answer")
                }
            })
        }
    }

    fn verifier(source: &Arc<FakeJwks>) -> TokenVerifier {
        TokenVerifier::new(ISSUER, AUDIENCE, source.clone())
    }

    /// A verifier whose key cache is set up by `f` (refetch interval, fetch timeout).
    fn verifier_with(
        source: &Arc<FakeJwks>,
        f: impl FnOnce(JwksCache) -> JwksCache,
    ) -> TokenVerifier {
        TokenVerifier::with_keys(
            ISSUER,
            AUDIENCE,
            Arc::new(f(JwksCache::new(source.clone()))),
        )
    }

    async fn check(v: &TokenVerifier, token: &str) -> Result<Arc<VerifiedToken>, TokenError> {
        v.verify(token, PEER_CERT, None, SystemTime::now()).await
    }

    /// Lets every other task on this (current-thread) runtime run until it blocks.
    async fn let_others_run() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn concurrent_verifications_of_an_unknown_kid_share_one_fetch() {
        let key = TestKey::new("k1");
        let source = FakeJwks::new([Ok(set(&[&key]))]);
        source.close_gate();
        let v = Arc::new(verifier(&source));
        let token = key.token("burst");
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (v, token) = (v.clone(), token.clone());
            burst.spawn(async move { check(&v, &token).await });
        }
        // All 20 are now waiting on the one fetch the first of them started.
        let_others_run().await;
        assert_eq!(source.fetches(), 1);
        source.open_gate();
        let results = burst.join_all().await;
        assert_eq!(results.len(), 20);
        for r in results {
            assert_eq!(r.unwrap().claims.jti, "burst");
        }
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test]
    async fn concurrent_verifications_of_a_kid_missing_from_the_jwks_share_one_fetch() {
        let known = TestKey::new("k1");
        let stranger = TestKey::new("not-ours");
        let source = FakeJwks::new([Ok(set(&[&known]))]);
        source.close_gate();
        let v = Arc::new(verifier(&source));
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..20 {
            let (v, token) = (v.clone(), stranger.token(&format!("t{i}")));
            burst.spawn(async move { check(&v, &token).await });
        }
        let_others_run().await;
        source.open_gate();
        for r in burst.join_all().await {
            assert_eq!(r.unwrap_err(), TokenError::UnknownKid("not-ours".into()));
        }
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_last_good_keys() {
        let key = TestKey::new("k1");
        let rotated = TestKey::new("k2");
        let source = FakeJwks::new([Ok(set(&[&key])), Err("CA unreachable".into())]);
        let v = verifier_with(&source, |c| c.refetch_after(Duration::ZERO));
        check(&v, &key.token("a")).await.unwrap();
        // k2 is unknown, the refetch fails: k2 stays unknown and k1 still verifies.
        assert_eq!(
            check(&v, &rotated.token("b")).await.unwrap_err(),
            TokenError::UnknownKid("k2".into())
        );
        assert_eq!(source.fetches(), 2);
        assert!(v.has_keys());
        check(&v, &key.token("c")).await.unwrap();
        assert_eq!(source.fetches(), 2);
        assert_eq!(
            v.prime().await,
            Err(JwksError::Fetch("CA unreachable".into()))
        );
        check(&v, &key.token("d")).await.unwrap();
    }

    #[tokio::test]
    async fn an_empty_jwks_keeps_the_last_good_keys() {
        let key = TestKey::new("k1");
        let source = FakeJwks::new([Ok(set(&[&key])), Ok(JwkSet { keys: Vec::new() })]);
        let v = verifier(&source);
        v.prime().await.unwrap();
        assert_eq!(v.prime().await, Err(JwksError::NoKeys));
        check(&v, &key.token("a")).await.unwrap();
    }

    #[tokio::test]
    async fn an_unknown_kid_soon_after_a_fetch_does_not_fetch_again() {
        let key = TestKey::new("k1");
        let stranger = TestKey::new("k9");
        let source = FakeJwks::new([Ok(set(&[&key]))]);
        let v = verifier(&source);
        check(&v, &key.token("a")).await.unwrap();
        assert_eq!(source.fetches(), 1);
        for i in 0..5 {
            assert_eq!(
                check(&v, &stranger.token(&format!("t{i}")))
                    .await
                    .unwrap_err(),
                TokenError::UnknownKid("k9".into())
            );
        }
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test]
    async fn an_unknown_kid_fetches_again_once_refetch_after_has_passed() {
        let old = TestKey::new("k1");
        let new = TestKey::new("k2");
        let source = FakeJwks::new([Ok(set(&[&old])), Ok(set(&[&old, &new]))]);
        let v = verifier_with(&source, |c| c.refetch_after(Duration::from_millis(50)));
        check(&v, &old.token("a")).await.unwrap();
        // Within the interval the rotated-in key stays unknown and nothing is fetched...
        assert_eq!(
            check(&v, &new.token("b")).await.unwrap_err(),
            TokenError::UnknownKid("k2".into())
        );
        assert_eq!(source.fetches(), 1);
        // ...after it, the next unknown kid fetches once more and finds it.
        tokio::time::sleep(Duration::from_millis(60)).await;
        check(&v, &new.token("c")).await.unwrap();
        assert_eq!(source.fetches(), 2);
        check(&v, &new.token("d")).await.unwrap();
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test]
    async fn announced_kids_fetch_a_new_key_at_once_and_drop_a_retired_one() {
        let old = TestKey::new("k1");
        let new = TestKey::new("k2");
        let source = FakeJwks::new([Ok(set(&[&old])), Ok(set(&[&old, &new])), Ok(set(&[&new]))]);
        // A long refetch interval: without the announcement the new kid would stay unknown.
        let v = verifier_with(&source, |c| c.refetch_after(Duration::from_secs(3600)));
        check(&v, &old.token("a")).await.unwrap();
        // The kids held are the ones announced: nothing to fetch.
        assert!(!v.follow_kids(&["k1".into()]).await.unwrap());
        assert!(!v.follow_kids(&[]).await.unwrap());
        assert_eq!(source.fetches(), 1);
        // Prepared: the new key is fetched before any token signed with it arrives.
        assert!(v.follow_kids(&["k1".into(), "k2".into()]).await.unwrap());
        check(&v, &new.token("b")).await.unwrap();
        assert_eq!(source.fetches(), 2);
        // Retired: the old key goes, and a token it signed (even one verified before) with it.
        assert!(v.follow_kids(&["k2".into()]).await.unwrap());
        assert_eq!(v.kids(), BTreeSet::from(["k2".to_owned()]));
        assert_eq!(
            check(&v, &old.token("a")).await.unwrap_err(),
            TokenError::UnknownKid("k1".into())
        );
        check(&v, &new.token("b")).await.unwrap();
    }

    #[tokio::test]
    async fn at_most_sixteen_keys_are_kept() {
        let keys: Vec<TestKey> = (0..20).map(|i| TestKey::new(&format!("k{i}"))).collect();
        let source = FakeJwks::new([Ok(set(&keys.iter().collect::<Vec<_>>()))]);
        let v = verifier(&source);
        v.prime().await.unwrap();
        assert_eq!(v.keys.keys().keys.len(), MAX_KEYS);
        // The first sixteen, in the JWKS's order.
        check(&v, &keys[15].token("a")).await.unwrap();
        assert_eq!(
            check(&v, &keys[16].token("b")).await.unwrap_err(),
            TokenError::UnknownKid("k16".into())
        );
    }

    #[tokio::test]
    async fn keys_without_a_kid_do_not_count_against_the_bound() {
        let mut anonymous = TestKey::new("unused").jwk;
        anonymous.common.key_id = None;
        let named: Vec<TestKey> = (0..MAX_KEYS)
            .map(|i| TestKey::new(&format!("k{i}")))
            .collect();
        let mut jwks = JwkSet {
            keys: vec![anonymous; 4],
        };
        jwks.keys.extend(named.iter().map(|k| k.jwk.clone()));
        let v = verifier(&FakeJwks::new([Ok(jwks)]));
        v.prime().await.unwrap();
        assert_eq!(v.keys.keys().keys.len(), MAX_KEYS);
        check(&v, &named[MAX_KEYS - 1].token("a")).await.unwrap();
    }

    #[tokio::test]
    async fn prime_loads_the_keys_so_the_first_request_does_not_fetch() {
        let key = TestKey::new("k1");
        let source = FakeJwks::new([Err("not yet".into()), Ok(set(&[&key]))]);
        let v = verifier(&source);
        assert!(!v.has_keys());
        assert_eq!(v.prime().await, Err(JwksError::Fetch("not yet".into())));
        assert!(!v.has_keys());
        // prime is explicit: it fetches whatever the refetch interval says.
        v.prime().await.unwrap();
        assert!(v.has_keys());
        assert_eq!(source.fetches(), 2);
        check(&v, &key.token("a")).await.unwrap();
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test]
    async fn a_ca_that_does_not_answer_fails_the_fetch_after_the_timeout() {
        let key = TestKey::new("k1");
        let source = FakeJwks::new([Ok(set(&[&key]))]);
        source.close_gate();
        let v = verifier_with(&source, |c| c.fetch_timeout(Duration::from_millis(20)));
        assert_eq!(
            check(&v, &key.token("a")).await.unwrap_err(),
            TokenError::UnknownKid("k1".into())
        );
        assert_eq!(
            v.prime().await,
            Err(JwksError::Timeout(Duration::from_millis(20)))
        );
        source.open_gate();
        v.prime().await.unwrap();
        check(&v, &key.token("b")).await.unwrap();
    }

    #[tokio::test]
    async fn a_verification_dropped_mid_fetch_does_not_block_the_next_fetch() {
        let key = TestKey::new("k1");
        let source = FakeJwks::new([Ok(set(&[&key]))]);
        source.close_gate();
        let v = Arc::new(verifier(&source));
        let first = {
            let (v, token) = (v.clone(), key.token("a"));
            tokio::spawn(async move { check(&v, &token).await })
        };
        let_others_run().await;
        assert_eq!(source.fetches(), 1);
        // The caller goes away (its client hung up) while the CA is still answering.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        source.open_gate();
        check(&v, &key.token("b")).await.unwrap();
        assert_eq!(source.fetches(), 2);
    }
}
