//! The one token minter and its signing keys.
//!
//! Keys go through prepared -> active -> retired like the X.509 CA keys: the JWKS publishes
//! every key that is not retired (so a new key is known before it signs, and an old one stays
//! verifiable until its tokens expire); only the active key signs. `kid` is the RFC 7638 JWK
//! thumbprint. ES256 by default, EdDSA (Ed25519) selectable.
//!
//! Tokens are serialized here directly (RFC 7515 compact form) with a pre-parsed aws-lc-rs key,
//! so minting costs one signature and no key parsing.

use std::time::SystemTime;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use base64::Engine;
use meshid_proto::Secret;
use meshid_proto::jwt_svid::{JWT_SVID_TYP, JwtSvidClaims};
use meshid_proto::token::{ACCESS_TOKEN_TYP, AccessTokenClaims};
use serde_json::json;

use crate::store::{KeyState, TokenKeyRecord};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAlg {
    Es256,
    EdDsa,
}

impl TokenAlg {
    pub fn jws_name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ES256" => Some(Self::Es256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("token key {kid}: {detail}")]
    Bad { kid: String, detail: String },
    #[error("no active token-signing key")]
    NoActive,
    #[error("signing failed")]
    Sign,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenInitError {
    #[error(transparent)]
    Key(#[from] TokenKeyError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

enum Signer {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// One parsed signing key.
pub struct TokenKey {
    pub kid: String,
    pub alg: TokenAlg,
    pub state: KeyState,
    signer: Signer,
    jwk: serde_json::Value,
    record: TokenKeyRecord,
    /// The key that signs JWT-SVIDs in this key's place (ES256 keys only).
    jwt_svid: Option<JwtSvidKey>,
}

/// A JWT-SVID signing key, derived from a token-signing key (HKDF-SHA256 of its PKCS#8), so it
/// lives, rotates and retires with it and needs no storage of its own, yet is another key with
/// another `kid`: a JWT-SVID verifies only against the JWT bundle, an access token only against
/// the JWKS, even for a validator that ignores `typ`.
struct JwtSvidKey {
    kid: String,
    signer: EcdsaKeyPair,
    jwk: serde_json::Value,
}

/// The P-256 key derived from `pkcs8` for JWT-SVIDs.
fn derive_jwt_svid_key(pkcs8: &[u8]) -> Option<JwtSvidKey> {
    use aws_lc_rs::agreement::{ECDH_P256, PrivateKey};
    use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
    let prk = Salt::new(HKDF_SHA256, b"meshid jwt-svid signing key").extract(pkcs8);
    // A scalar out of range (about 2^-32 likely) takes the next counter.
    (0u8..16).find_map(|counter| {
        let mut scalar = [0u8; 32];
        prk.expand(&[b"v1", &[counter]], HKDF_SHA256)
            .ok()?
            .fill(&mut scalar)
            .ok()?;
        let public = PrivateKey::from_private_key(&ECDH_P256, &scalar)
            .ok()?
            .compute_public_key()
            .ok()?;
        let signer = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &scalar,
            public.as_ref(),
        )
        .ok()?;
        let point = signer.public_key().as_ref();
        let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
        let kid = thumbprint(&format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#));
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "jwt-svid"});
        Some(JwtSvidKey { kid, signer, jwk })
    })
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// RFC 7638 thumbprint over the required members in lexicographic order.
fn thumbprint(canonical: &str) -> String {
    B64.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        canonical.as_bytes(),
    ))
}

impl TokenKey {
    /// A brand-new key.
    pub fn generate(
        alg: TokenAlg,
        state: KeyState,
        now: SystemTime,
    ) -> Result<Self, TokenKeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = match alg {
            TokenAlg::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| TokenKeyError::Sign)?
                .as_ref()
                .to_vec(),
            TokenAlg::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| TokenKeyError::Sign)?
                .as_ref()
                .to_vec(),
        };
        Self::from_record(TokenKeyRecord {
            kid: String::new(),
            alg: alg.jws_name().to_owned(),
            state,
            created_at: now,
            pkcs8_pem: Secret::new(meshid_proto::pem::encode("PRIVATE KEY", &pkcs8)),
            superseded_at: None,
        })
    }

    /// Parse a stored key; the kid is derived from the key, so a record's kid is checked.
    pub fn from_record(mut record: TokenKeyRecord) -> Result<Self, TokenKeyError> {
        let bad = |detail: &str| TokenKeyError::Bad {
            kid: record.kid.clone(),
            detail: detail.to_owned(),
        };
        let alg = TokenAlg::parse(&record.alg).ok_or_else(|| bad("unknown algorithm"))?;
        let der = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(
                record.pkcs8_pem.expose().as_bytes(),
            )
            .map_err(|_| bad("not a PKCS#8 PEM key"))?
        };
        let jwt_svid = match alg {
            TokenAlg::Es256 => derive_jwt_svid_key(der.secret_pkcs8_der()),
            TokenAlg::EdDsa => None,
        };
        let (signer, jwk, canonical) = match alg {
            TokenAlg::Es256 => {
                let kp = EcdsaKeyPair::from_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    der.secret_pkcs8_der(),
                )
                .map_err(|_| bad("not a P-256 key"))?;
                let point = kp.public_key().as_ref().to_vec(); // 0x04 || X || Y
                let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
                let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
                let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y});
                (Signer::Es256(kp), jwk, canonical)
            }
            TokenAlg::EdDsa => {
                let kp = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
                    .map_err(|_| bad("not an Ed25519 key"))?;
                let x = B64.encode(kp.public_key().as_ref());
                let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
                let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": x});
                (Signer::EdDsa(kp), jwk, canonical)
            }
        };
        let kid = thumbprint(&canonical);
        if !record.kid.is_empty() && record.kid != kid {
            return Err(bad("kid does not match the key"));
        }
        record.kid = kid.clone();
        let mut jwk = jwk;
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!(alg.jws_name());
        jwk["use"] = json!("sig");
        Ok(Self {
            kid,
            alg,
            state: record.state,
            signer,
            jwk,
            record,
            jwt_svid,
        })
    }

    pub fn record(&self) -> &TokenKeyRecord {
        &self.record
    }

    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, TokenKeyError> {
        match &self.signer {
            Signer::Es256(kp) => kp
                .sign(&SystemRandom::new(), input)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| TokenKeyError::Sign),
            Signer::EdDsa(kp) => Ok(kp.sign(input).as_ref().to_vec()),
        }
    }
}

/// Every token-signing key.
#[derive(Debug)]
pub struct TokenKeys {
    keys: Vec<TokenKey>,
}

impl TokenKeys {
    pub fn new(keys: Vec<TokenKey>) -> Result<Self, TokenKeyError> {
        let this = Self { keys };
        this.active()?;
        Ok(this)
    }

    /// The keys in `store`; on a new store, a first active key of `alg`, saved.
    pub fn load_or_init(
        store: &dyn crate::store::Store,
        alg: TokenAlg,
        now: SystemTime,
    ) -> Result<(Self, crate::store::Version), TokenInitError> {
        let mut loaded = store.load_token_keys()?;
        if loaded.value.is_empty() {
            let first = TokenKey::generate(alg, KeyState::Active, now)?;
            match store.save_token_keys(std::slice::from_ref(first.record()), &loaded.version) {
                Ok(_) => {}
                // Another replica made the first key meanwhile: use it.
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e.into()),
            }
            loaded = store.load_token_keys()?;
        }
        let keys = loaded
            .value
            .into_iter()
            .map(TokenKey::from_record)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((Self::new(keys)?, loaded.version))
    }

    /// Every key, oldest first.
    pub fn keys(&self) -> &[TokenKey] {
        &self.keys
    }

    /// The records of every key, as the store holds them.
    pub fn records(&self) -> Vec<TokenKeyRecord> {
        self.keys.iter().map(|k| k.record.clone()).collect()
    }

    pub fn active(&self) -> Result<&TokenKey, TokenKeyError> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.state == KeyState::Active)
            .ok_or(TokenKeyError::NoActive)
    }

    /// The JWT bundle (a JWKS): the JWT-SVID keys of every key not retired.
    pub fn jwt_bundle(&self) -> serde_json::Value {
        json!({"keys": self
            .keys
            .iter()
            .filter(|k| k.state.trusted())
            .filter_map(|k| k.jwt_svid.as_ref().map(|j| j.jwk.clone()))
            .collect::<Vec<_>>()})
    }

    /// RFC 7517 JWK Set of every key not retired.
    pub fn jwks(&self) -> serde_json::Value {
        json!({"keys": self.keys.iter().filter(|k| k.state.trusted()).map(|k| k.jwk.clone()).collect::<Vec<_>>()})
    }

    /// Sign `claims` with the active key: RFC 9068 header (`typ: at+jwt`, `alg`, `kid`).
    pub fn mint(&self, claims: &AccessTokenClaims) -> Result<Secret, TokenKeyError> {
        self.sign_jws(ACCESS_TOKEN_TYP, claims)
    }

    /// Sign a JWT-SVID with the active key (`typ: JWT`, `alg`, `kid`: the only header fields
    /// the SPIFFE JWT-SVID profile allows).
    /// `None` when the active key is not ES256 (it has no JWT-SVID key).
    pub fn mint_jwt_svid(&self, claims: &JwtSvidClaims) -> Result<Option<Secret>, TokenKeyError> {
        let Some(key) = &self.active()?.jwt_svid else {
            return Ok(None);
        };
        let header = json!({"alg": "ES256", "typ": JWT_SVID_TYP, "kid": key.kid});
        let signer = |input: &[u8]| {
            key.signer
                .sign(&SystemRandom::new(), input)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| TokenKeyError::Sign)
        };
        compact(&header, claims, signer).map(Some)
    }

    /// RFC 7515 compact serialization of `claims` under a header of `typ`, `alg` and `kid`.
    fn sign_jws(&self, typ: &str, claims: &impl serde::Serialize) -> Result<Secret, TokenKeyError> {
        let key = self.active()?;
        let header = json!({"alg": key.alg.jws_name(), "typ": typ, "kid": key.kid});
        compact(&header, claims, |input| key.sign(input))
    }
}

/// `header.payload.signature`, base64url without padding.
fn compact(
    header: &serde_json::Value,
    claims: &impl serde::Serialize,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, TokenKeyError>,
) -> Result<Secret, TokenKeyError> {
    let payload = serde_json::to_vec(claims).map_err(|_| TokenKeyError::Sign)?;
    let mut out = B64.encode(header.to_string());
    out.push('.');
    out.push_str(&B64.encode(payload));
    let sig = sign(out.as_bytes())?;
    out.push('.');
    out.push_str(&B64.encode(sig));
    Ok(Secret::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_proto::directory::Scope;
    use meshid_proto::token::{Confirmation, StaticJwks, TokenError, TokenVerifier};
    use std::sync::Arc;

    fn claims(now: i64) -> AccessTokenClaims {
        AccessTokenClaims {
            iss: "https://ca".into(),
            sub: "spiffe://td/ns/a/sa/frontend".into(),
            client_id: "frontend".into(),
            aud: "spiffe://td/ns/a/sa/orders".into(),
            scope: "orders:read".into(),
            iat: now,
            nbf: now,
            exp: now + 300,
            jti: "j1".into(),
            cnf: Confirmation {
                x5t_s256: meshid_proto::token::x5t_s256(b"caller cert"),
            },
        }
    }

    fn verifier(keys: &TokenKeys) -> TokenVerifier {
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(keys.jwks()).unwrap();
        TokenVerifier::new(
            "https://ca",
            "spiffe://td/ns/a/sa/orders",
            Arc::new(StaticJwks(set)),
        )
    }

    fn b64(v: serde_json::Value) -> String {
        B64.encode(v.to_string())
    }

    #[tokio::test]
    async fn jwt_svids_have_keys_of_their_own_and_the_two_profiles_never_verify_for_each_other() {
        use meshid_proto::jwks::JwksCache;
        use meshid_proto::jwt_svid::{JwtSvidError, validate};
        let now = SystemTime::now();
        let key = TokenKey::generate(TokenAlg::Es256, KeyState::Active, now).unwrap();
        // Derived from the stored key: the same after a restart (a reload of the record).
        let again = TokenKey::from_record(key.record().clone()).unwrap();
        let keys = TokenKeys::new(vec![key]).unwrap();
        let bundle = keys.jwt_bundle();
        assert_eq!(bundle, TokenKeys::new(vec![again]).unwrap().jwt_bundle());
        let jwt_kid = bundle["keys"][0]["kid"].as_str().unwrap().to_owned();
        assert_eq!(bundle["keys"][0]["use"], "jwt-svid");
        assert_ne!(
            jwt_kid,
            keys.active().unwrap().kid,
            "another key, another kid"
        );
        let cache = |v: serde_json::Value| {
            JwksCache::new(Arc::new(StaticJwks(serde_json::from_value(v).unwrap())))
        };
        let (jwt_keys, access_keys) = (cache(bundle), cache(keys.jwks()));
        let now_s = meshid_proto::clock::unix_seconds(now);
        let svid = keys
            .mint_jwt_svid(&JwtSvidClaims {
                sub: "spiffe://td/ns/a/sa/frontend".into(),
                aud: vec!["spiffe://td/ns/a/sa/orders".into()],
                exp: now_s + 300,
                iat: now_s,
            })
            .unwrap()
            .unwrap();
        let td = meshid_proto::TrustDomain::parse("td").unwrap();
        let aud = "spiffe://td/ns/a/sa/orders";
        let ok = validate(svid.expose(), aud, &jwt_keys, &td, now)
            .await
            .unwrap();
        assert_eq!(ok.spiffe_id.to_string(), "spiffe://td/ns/a/sa/frontend");
        // A JWT-SVID is no key of the JWKS; an access token no key of the JWT bundle.
        assert_eq!(
            validate(svid.expose(), aud, &access_keys, &td, now)
                .await
                .unwrap_err(),
            JwtSvidError::UnknownKid(jwt_kid)
        );
        let token = keys.mint(&claims(now_s)).unwrap();
        let v = verifier(&keys);
        assert!(matches!(
            v.verify(svid.expose(), b"caller cert", None, now)
                .await
                .unwrap_err(),
            TokenError::WrongType(_)
        ));
        assert!(matches!(
            validate(token.expose(), aud, &jwt_keys, &td, now)
                .await
                .unwrap_err(),
            JwtSvidError::WrongType(_)
        ));
        // An EdDSA key has no JWT-SVID key.
        let ed = TokenKeys::new(vec![
            TokenKey::generate(TokenAlg::EdDsa, KeyState::Active, now).unwrap(),
        ])
        .unwrap();
        assert_eq!(ed.jwt_bundle()["keys"], serde_json::json!([]));
        assert!(
            ed.mint_jwt_svid(&JwtSvidClaims {
                sub: String::new(),
                aud: vec![],
                exp: 0,
                iat: 0
            })
            .unwrap()
            .is_none()
        );
    }

    #[tokio::test]
    async fn minted_tokens_verify_with_both_algorithms() {
        for alg in [TokenAlg::Es256, TokenAlg::EdDsa] {
            let keys = TokenKeys::new(vec![
                TokenKey::generate(alg, KeyState::Active, SystemTime::now()).unwrap(),
            ])
            .unwrap();
            let now = SystemTime::now();
            let token = keys
                .mint(&claims(meshid_proto::clock::unix_seconds(now)))
                .unwrap();
            let v = verifier(&keys);
            let read = Scope::parse("orders:read").unwrap();
            let ok = v
                .verify(token.expose(), b"caller cert", Some(&read), now)
                .await
                .unwrap();
            assert_eq!(ok.claims.client_id, "frontend");
            assert_eq!(v.cached(), 1);
        }
    }

    #[tokio::test]
    async fn every_verification_failure_has_its_reason() {
        let keys = TokenKeys::new(vec![
            TokenKey::generate(TokenAlg::Es256, KeyState::Active, SystemTime::now()).unwrap(),
        ])
        .unwrap();
        let other = TokenKeys::new(vec![
            TokenKey::generate(TokenAlg::Es256, KeyState::Active, SystemTime::now()).unwrap(),
        ])
        .unwrap();
        let now = SystemTime::now();
        let t = meshid_proto::clock::unix_seconds(now);
        let v = verifier(&keys);
        let cert = b"caller cert";
        let check = |token: String| {
            let v = &v;
            async move { v.verify(&token, cert, None, now).await.map(|_| ()) }
        };
        let good = keys.mint(&claims(t)).unwrap().expose().to_owned();
        let parts: Vec<&str> = good.split('.').collect();

        // Tampered payload.
        let mut c = claims(t);
        c.scope = "orders:read orders:write".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(check(tampered).await, Err(TokenError::BadSignature));

        // alg none.
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "at+jwt"})),
            parts[1]
        );
        assert_eq!(
            check(none).await,
            Err(TokenError::AlgorithmNotAllowed("none".into()))
        );

        // HS256 with the public key as the HMAC secret (the classic key-confusion attack).
        let kid = keys.active().unwrap().kid.clone();
        let header = b64(json!({"alg": "HS256", "typ": "at+jwt", "kid": kid}));
        let input = format!("{header}.{}", parts[1]);
        let secret = keys.jwks().to_string();
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes()),
            input.as_bytes(),
        );
        assert_eq!(
            check(format!("{input}.{}", B64.encode(mac.as_ref()))).await,
            Err(TokenError::AlgorithmNotAllowed("HS256".into()))
        );

        // Unknown kid: signed by a key the JWKS does not hold.
        let foreign = other.mint(&claims(t)).unwrap().expose().to_owned();
        assert!(matches!(
            check(foreign).await,
            Err(TokenError::UnknownKid(_))
        ));

        // typ JWT instead of at+jwt.
        let jwt_typ = format!(
            "{}.{}.{}",
            b64(json!({"alg": "ES256", "typ": "JWT", "kid": kid})),
            parts[1],
            parts[2]
        );
        assert_eq!(
            check(jwt_typ).await,
            Err(TokenError::WrongType("JWT".into()))
        );

        // Wrong issuer, wrong audience, expired, lifetime too long.
        let mut c = claims(t);
        c.iss = "https://evil".into();
        assert!(matches!(
            check(keys.mint(&c).unwrap().expose().to_owned()).await,
            Err(TokenError::WrongIssuer { .. })
        ));
        let mut c = claims(t);
        c.aud = "spiffe://td/ns/a/sa/billing".into();
        assert!(matches!(
            check(keys.mint(&c).unwrap().expose().to_owned()).await,
            Err(TokenError::WrongAudience { .. })
        ));
        let mut c = claims(t - 1000);
        c.exp = t - 31;
        assert_eq!(
            check(keys.mint(&c).unwrap().expose().to_owned()).await,
            Err(TokenError::Expired)
        );
        let mut c = claims(t);
        c.exp = t + 3600;
        assert_eq!(
            check(keys.mint(&c).unwrap().expose().to_owned()).await,
            Err(TokenError::LifetimeTooLong)
        );

        // Within the 30 s leeway an expired token still passes; just past it, it does not.
        let mut c = claims(t - 600);
        c.exp = t - 20;
        assert_eq!(
            check(keys.mint(&c).unwrap().expose().to_owned()).await,
            Ok(())
        );

        // cnf of another certificate, and a missing scope.
        assert_eq!(
            v.verify(&good, b"another cert", None, now)
                .await
                .map(|_| ()),
            Err(TokenError::CertificateMismatch)
        );
        let write = Scope::parse("orders:write").unwrap();
        assert_eq!(
            v.verify(&good, cert, Some(&write), now).await.map(|_| ()),
            Err(TokenError::InsufficientScope("orders:write".into()))
        );
        assert_eq!(check("not.a.jwt".into()).await, Err(TokenError::Malformed));
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint_and_is_checked() {
        let key = TokenKey::generate(TokenAlg::Es256, KeyState::Active, SystemTime::now()).unwrap();
        let mut rec = key.record().clone();
        assert_eq!(TokenKey::from_record(rec.clone()).unwrap().kid, key.kid);
        rec.kid = "forged".into();
        assert!(TokenKey::from_record(rec).is_err());
        assert_eq!(key.kid.len(), 43);
    }
}
