//! JWT-SVIDs: the SPIFFE JWT-SVID profile, apart from the OAuth access tokens. The CA mints
//! them (`IssueJwtSvid`) with a token-signing key, so the trust domain's JWT bundle is the CA's
//! JWKS; the sidecar's Workload API hands them to apps and validates them for apps.
//!
//! The two profiles never pass for each other: a JWT-SVID has `typ` JWT, no `iss`, no `scope`
//! and no `cnf`, so the access-token verifier (which wants `typ` at+jwt and an `iss`) refuses
//! it; and [`validate`] refuses a token whose `typ` is anything but JWT or JOSE (the SPIFFE
//! JWT-SVID spec, §3), so an access token is not accepted as a JWT-SVID.

use std::time::SystemTime;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::unix_seconds;
use crate::id::{SpiffeId, TrustDomain};
use crate::jwks::JwksCache;
use crate::token::LEEWAY_SECONDS;

/// The `typ` header of a JWT-SVID.
pub const JWT_SVID_TYP: &str = "JWT";
/// At most this many audiences in one JWT-SVID.
pub const MAX_AUDIENCES: usize = 16;
/// At most this many bytes in one audience.
pub const MAX_AUDIENCE_BYTES: usize = 256;
/// A JWT-SVID (or anything presented as one) larger than this is refused unread.
pub const MAX_JWT_SVID_BYTES: usize = 8 * 1024;

/// The claims of a JWT-SVID as the CA mints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtSvidClaims {
    /// The workload's SPIFFE ID.
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
}

/// Audiences as asked for a JWT-SVID: at least one, each non-empty, printable and bounded.
/// The same check runs in the sidecar (Workload API) and in the CA.
pub fn check_audiences(audiences: &[String]) -> Result<(), String> {
    if audiences.is_empty() {
        return Err("at least one audience is required".into());
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(format!(
            "{} audiences asked; at most {MAX_AUDIENCES}",
            audiences.len()
        ));
    }
    for a in audiences {
        if a.is_empty() {
            return Err("an audience is empty".into());
        }
        if a.len() > MAX_AUDIENCE_BYTES {
            return Err(format!(
                "an audience is {} bytes; at most {MAX_AUDIENCE_BYTES}",
                a.len()
            ));
        }
        if a.chars().any(char::is_control) {
            return Err("an audience holds a control character".into());
        }
    }
    Ok(())
}

/// Why a JWT-SVID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtSvidError {
    #[error("not a well-formed JWT")]
    Malformed,
    #[error("larger than {MAX_JWT_SVID_BYTES} bytes")]
    TooLarge,
    #[error(
        "token type {0:?} is not a JWT-SVID's (JWT or JOSE); an access token is not a JWT-SVID"
    )]
    WrongType(String),
    #[error("algorithm {0:?} is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("signing key {0:?} is not in the trust domain's JWT bundle")]
    UnknownKid(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("audience does not include {0:?}")]
    WrongAudience(String),
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("claim {0} missing or malformed")]
    BadClaim(String),
    #[error("subject {0:?} is not a SPIFFE ID")]
    BadSubject(String),
    #[error("subject {subject} is not of trust domain {trust_domain}")]
    ForeignTrustDomain {
        subject: String,
        trust_domain: String,
    },
}

/// A JWT-SVID that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub spiffe_id: SpiffeId,
    /// Every claim of the payload, as sent.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// Validate `token` as a JWT-SVID of `trust_domain` for `audience`: `typ` JWT or JOSE (or
/// none), `alg` ES256 (what meshid signs JWT-SVIDs with; never `none`, never HS*),
/// `kid` a key of the JWT bundle, the signature, `aud` holding `audience`, `exp` not past and
/// `nbf`/`iat` not ahead (with [`LEEWAY_SECONDS`]), `sub` a SPIFFE ID of the trust domain.
pub async fn validate(
    token: &str,
    audience: &str,
    keys: &JwksCache,
    trust_domain: &TrustDomain,
    now: SystemTime,
) -> Result<Validated, JwtSvidError> {
    if token.len() > MAX_JWT_SVID_BYTES {
        return Err(JwtSvidError::TooLarge);
    }
    let header = token.split('.').next().unwrap_or_default();
    if token.split('.').count() != 3 {
        return Err(JwtSvidError::Malformed);
    }
    let header: serde_json::Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtSvidError::Malformed)?;
    match &header["typ"] {
        serde_json::Value::Null => {}
        serde_json::Value::String(t) if t == "JWT" || t == "JOSE" => {}
        other => {
            return Err(JwtSvidError::WrongType(
                other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_owned),
            ));
        }
    }
    // The one algorithm meshid signs JWT-SVIDs with (the profile allows no EdDSA).
    let alg_name = header["alg"].as_str().unwrap_or_default();
    let alg = match alg_name {
        "ES256" => Algorithm::ES256,
        other => return Err(JwtSvidError::AlgorithmNotAllowed(other.to_owned())),
    };
    let kid = header["kid"].as_str().unwrap_or_default();
    if kid.is_empty() {
        return Err(JwtSvidError::UnknownKid(String::new()));
    }
    let jwk = keys
        .key(kid)
        .await
        .ok_or_else(|| JwtSvidError::UnknownKid(kid.to_owned()))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| JwtSvidError::UnknownKid(kid.to_owned()))?;
    let mut v = Validation::new(alg);
    v.set_audience(&[audience]);
    // Time is checked below against the caller's clock only.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    use jsonwebtoken::errors::ErrorKind;
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => JwtSvidError::BadSignature,
            ErrorKind::ExpiredSignature => JwtSvidError::Expired,
            ErrorKind::ImmatureSignature => JwtSvidError::NotYetValid,
            ErrorKind::InvalidAudience => JwtSvidError::WrongAudience(audience.to_owned()),
            ErrorKind::InvalidAlgorithm => JwtSvidError::AlgorithmNotAllowed(alg_name.to_owned()),
            ErrorKind::MissingRequiredClaim(c) => JwtSvidError::BadClaim(c.clone()),
            ErrorKind::Json(_) => JwtSvidError::BadClaim("(payload is not a JSON object)".into()),
            _ => JwtSvidError::Malformed,
        })?;
    let claims = data.claims;
    let now_s = unix_seconds(now);
    let exp = claims["exp"]
        .as_i64()
        .ok_or_else(|| JwtSvidError::BadClaim("exp".into()))?;
    if exp.saturating_add(LEEWAY_SECONDS as i64) <= now_s {
        return Err(JwtSvidError::Expired);
    }
    // `nbf` and `iat` too.
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf
            .as_i64()
            .ok_or_else(|| JwtSvidError::BadClaim("nbf".into()))?;
        if nbf.saturating_sub(LEEWAY_SECONDS as i64) > now_s {
            return Err(JwtSvidError::NotYetValid);
        }
    }
    if let Some(iat) = claims.get("iat") {
        let iat = iat
            .as_i64()
            .ok_or_else(|| JwtSvidError::BadClaim("iat".into()))?;
        if iat.saturating_sub(LEEWAY_SECONDS as i64) > now_s {
            return Err(JwtSvidError::NotYetValid);
        }
    }
    let sub = claims["sub"]
        .as_str()
        .ok_or_else(|| JwtSvidError::BadClaim("sub".into()))?;
    let spiffe_id = SpiffeId::parse(sub).map_err(|_| JwtSvidError::BadSubject(sub.to_owned()))?;
    if spiffe_id.trust_domain() != trust_domain {
        return Err(JwtSvidError::ForeignTrustDomain {
            subject: sub.to_owned(),
            trust_domain: trust_domain.to_string(),
        });
    }
    Ok(Validated { spiffe_id, claims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwks::StaticJwks;
    use jsonwebtoken::Header;
    use jsonwebtoken::jwk::JwkSet;
    use std::sync::Arc;

    const AUD: &str = "spiffe://cluster.local/ns/shop/sa/db";

    /// An ES256 key with its public JWK (the access-token tests' key).
    type Key = crate::token::tests::TestKey;

    fn key(kid: &str) -> Key {
        Key::new(kid)
    }

    fn cache(keys: &[&Key]) -> JwksCache {
        JwksCache::new(Arc::new(StaticJwks(JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        })))
    }

    fn sign(k: &Key, typ: Option<&str>, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = k.jwk.common.key_id.clone();
        h.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(&h, &claims, &k.encoding).unwrap()
    }

    fn claims(sub: &str, aud: serde_json::Value, exp_in: i64) -> serde_json::Value {
        let now = unix_seconds(SystemTime::now());
        serde_json::json!({"sub": sub, "aud": aud, "exp": now + exp_in, "iat": now})
    }

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").unwrap()
    }

    async fn check(c: &JwksCache, token: &str, aud: &str) -> Result<Validated, JwtSvidError> {
        validate(token, aud, c, &td(), SystemTime::now()).await
    }

    #[tokio::test]
    async fn a_jwt_svid_validates_for_each_of_its_audiences_and_gives_its_claims() {
        let k = key("k1");
        let c = cache(&[&k]);
        let sub = "spiffe://cluster.local/ns/shop/sa/web";
        let t = sign(
            &k,
            Some("JWT"),
            claims(sub, serde_json::json!([AUD, "other"]), 300),
        );
        for aud in [AUD, "other"] {
            let v = check(&c, &t, aud).await.unwrap();
            assert_eq!(v.spiffe_id.to_string(), sub);
            assert_eq!(v.claims["aud"], serde_json::json!([AUD, "other"]));
        }
        // A single audience as a string, and no typ at all, are both the spec's.
        let t = sign(&k, None, claims(sub, serde_json::json!(AUD), 300));
        assert!(check(&c, &t, AUD).await.is_ok());
        let t = sign(&k, Some("JOSE"), claims(sub, serde_json::json!(AUD), 300));
        assert!(check(&c, &t, AUD).await.is_ok());
    }

    #[tokio::test]
    async fn every_refusal_has_its_reason() {
        let k = key("k1");
        let stranger = key("k2");
        let c = cache(&[&k]);
        let sub = "spiffe://cluster.local/ns/shop/sa/web";
        let good = claims(sub, serde_json::json!([AUD]), 300);
        let t = sign(&k, Some("JWT"), good.clone());
        assert_eq!(
            check(&c, &t, "someone-else").await.unwrap_err(),
            JwtSvidError::WrongAudience("someone-else".into())
        );
        let at = sign(&k, Some("at+jwt"), good.clone());
        assert_eq!(
            check(&c, &at, AUD).await.unwrap_err(),
            JwtSvidError::WrongType("at+jwt".into())
        );
        let t = sign(&stranger, Some("JWT"), good.clone());
        assert_eq!(
            check(&c, &t, AUD).await.unwrap_err(),
            JwtSvidError::UnknownKid("k2".into())
        );
        // A known kid whose signature is another key's.
        let mut forged = sign(&stranger, Some("JWT"), good.clone());
        let header_k1 = sign(&k, Some("JWT"), good.clone());
        let h = header_k1.split('.').next().unwrap();
        forged = format!("{h}.{}", forged.split_once('.').unwrap().1);
        assert_eq!(
            check(&c, &forged, AUD).await.unwrap_err(),
            JwtSvidError::BadSignature
        );
        let t = sign(&k, Some("JWT"), claims(sub, serde_json::json!([AUD]), -120));
        assert_eq!(check(&c, &t, AUD).await.unwrap_err(), JwtSvidError::Expired);
        let t = sign(
            &k,
            Some("JWT"),
            claims("web", serde_json::json!([AUD]), 300),
        );
        assert_eq!(
            check(&c, &t, AUD).await.unwrap_err(),
            JwtSvidError::BadSubject("web".into())
        );
        let t = sign(
            &k,
            Some("JWT"),
            claims("spiffe://other.org/x", serde_json::json!([AUD]), 300),
        );
        assert!(matches!(
            check(&c, &t, AUD).await.unwrap_err(),
            JwtSvidError::ForeignTrustDomain { .. }
        ));
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        let t = sign(&k, Some("JWT"), no_exp);
        assert_eq!(
            check(&c, &t, AUD).await.unwrap_err(),
            JwtSvidError::BadClaim("exp".into())
        );
        assert_eq!(
            check(&c, "a.b", AUD).await.unwrap_err(),
            JwtSvidError::Malformed
        );
        assert_eq!(
            check(&c, &"x".repeat(MAX_JWT_SVID_BYTES + 1), AUD)
                .await
                .unwrap_err(),
            JwtSvidError::TooLarge
        );
        // alg none: refused by its header, whatever the rest says.
        let none_header =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#);
        let body = t.split('.').nth(1).unwrap();
        assert_eq!(
            check(&c, &format!("{none_header}.{body}."), AUD)
                .await
                .unwrap_err(),
            JwtSvidError::AlgorithmNotAllowed("none".into())
        );
    }

    #[test]
    fn audiences_are_checked_before_anything_is_signed() {
        let ok = |a: &[&str]| check_audiences(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["db"]).is_ok());
        assert!(ok(&[]).unwrap_err().contains("at least one"));
        assert!(ok(&[""]).unwrap_err().contains("empty"));
        assert!(ok(&["a\nb"]).unwrap_err().contains("control"));
        assert!(ok(&[&"a".repeat(300)]).unwrap_err().contains("at most 256"));
        assert!(ok(&["a"; 17]).unwrap_err().contains("at most 16"));
    }
}
