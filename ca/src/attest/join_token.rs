//! Join tokens: one-time (or reusable) bootstrap secrets bound to one SPIFFE ID.
//!
//! The token is 32 random bytes (256 bits), printed once. The store keeps only its SHA-256,
//! which also names the record, so looking a token up compares hashes, never the token.
//!
//! A token is spent only once everything else about it has passed, including that this CA may
//! issue to the ID it names: a refused token stays unspent, so the refusal cannot be used to
//! burn it.

use std::time::{Duration, SystemTime};

use base64::Engine;
use meshid_proto::{Secret, SpiffeId, TrustDomain};

use super::{AttestError, AttestationKind, Attested, IdRefused};
use crate::store::{JoinTokenRecord, Store, StoreError};

const PREFIX: &str = "mjt.";
/// Longer inputs cannot be a token we printed; refusing them early bounds hashing work.
const MAX_TOKEN_LEN: usize = 128;

/// Hex SHA-256 of a token: the only form in which it is stored.
pub fn hash(token: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Mint a token for `spiffe_id`, store its hash, and return it (the only time it exists whole).
pub fn create(
    store: &dyn Store,
    spiffe_id: &SpiffeId,
    ttl: Duration,
    reusable: bool,
    now: SystemTime,
) -> Result<Secret, StoreError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
    let token = format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let now_s = meshid_proto::clock::unix_seconds(now);
    store.create_join_token(
        &hash(&token),
        &JoinTokenRecord {
            spiffe_id: spiffe_id.to_string(),
            expires_at: now_s + ttl.as_secs() as i64,
            reusable,
            created_at: now_s,
        },
    )?;
    Ok(Secret::new(token))
}

/// Why a presented join token did not attest.
#[derive(Debug, thiserror::Error)]
pub enum JoinTokenError {
    /// The token itself: unknown, expired, replayed, or the store failed.
    #[error(transparent)]
    Attest(#[from] AttestError),
    /// A good token for an ID this CA must not issue to (another trust domain, the CA's own).
    #[error(transparent)]
    Refused(#[from] IdRefused),
}

impl From<StoreError> for JoinTokenError {
    fn from(e: StoreError) -> Self {
        Self::Attest(e.into())
    }
}

/// Check a presented token for a CA of `trust_domain` and, if single-use, spend it: last, after
/// every check, so a refused token is not spent.
pub fn attest(
    store: &dyn Store,
    token: &Secret,
    trust_domain: &TrustDomain,
    now: SystemTime,
) -> Result<Attested, JoinTokenError> {
    let t = token.expose();
    if t.len() > MAX_TOKEN_LEN || !t.starts_with(PREFIX) {
        return Err(AttestError::JoinTokenUnknown.into());
    }
    let h = hash(t);
    let stored = store.join_token(&h)?.ok_or(AttestError::JoinTokenUnknown)?;
    if stored.used && !stored.record.reusable {
        return Err(AttestError::JoinTokenReplayed.into());
    }
    if meshid_proto::clock::unix_seconds(now) >= stored.record.expires_at {
        return Err(AttestError::JoinTokenExpired {
            expired_at: SystemTime::UNIX_EPOCH
                + Duration::from_secs(stored.record.expires_at.max(0) as u64),
        }
        .into());
    }
    let spiffe_id =
        SpiffeId::parse(&stored.record.spiffe_id).map_err(|_| AttestError::JoinTokenCorrupt)?;
    super::check_issuable(trust_domain, &spiffe_id)?;
    if !stored.record.reusable && !store.spend_join_token(&h)? {
        // Someone else spent it between our read and our rename.
        return Err(AttestError::JoinTokenReplayed.into());
    }
    Ok(Attested {
        spiffe_id,
        kind: AttestationKind::JoinToken,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FsStore;

    fn td() -> TrustDomain {
        TrustDomain::parse("td").unwrap()
    }

    fn setup() -> (tempfile::TempDir, FsStore, SpiffeId) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        (
            dir,
            store,
            SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
        )
    }

    fn attest_err(store: &FsStore, token: &Secret, now: SystemTime) -> JoinTokenError {
        attest(store, token, &td(), now).unwrap_err()
    }

    #[test]
    fn replayed_join_token_is_refused() {
        let (_d, store, id) = setup();
        let now = SystemTime::now();
        let token = create(&store, &id, Duration::from_secs(60), false, now).unwrap();
        assert_eq!(attest(&store, &token, &td(), now).unwrap().spiffe_id, id);
        assert!(matches!(
            attest_err(&store, &token, now),
            JoinTokenError::Attest(AttestError::JoinTokenReplayed)
        ));
    }

    #[test]
    fn reusable_token_works_twice() {
        let (_d, store, id) = setup();
        let now = SystemTime::now();
        let token = create(&store, &id, Duration::from_secs(60), true, now).unwrap();
        attest(&store, &token, &td(), now).unwrap();
        attest(&store, &token, &td(), now).unwrap();
    }

    #[test]
    fn expired_and_unknown_tokens_are_refused() {
        let (_d, store, id) = setup();
        let now = SystemTime::now();
        let token = create(&store, &id, Duration::from_secs(60), false, now).unwrap();
        let later = now + Duration::from_secs(61);
        assert!(matches!(
            attest_err(&store, &token, later),
            JoinTokenError::Attest(AttestError::JoinTokenExpired { .. })
        ));
        let forged = Secret::new("mjt.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        assert!(matches!(
            attest_err(&store, &forged, now),
            JoinTokenError::Attest(AttestError::JoinTokenUnknown)
        ));
        assert!(matches!(
            attest_err(&store, &Secret::new("x".repeat(10_000)), now),
            JoinTokenError::Attest(AttestError::JoinTokenUnknown)
        ));
    }

    #[test]
    fn token_for_another_trust_domain_is_refused_and_not_spent() {
        let (_d, store, _) = setup();
        let now = SystemTime::now();
        let foreign = SpiffeId::parse("spiffe://other.domain/ns/x/sa/y").unwrap();
        let token = create(&store, &foreign, Duration::from_secs(60), false, now).unwrap();
        for _ in 0..2 {
            // Refused for what it names each time, never "already used": it was not spent.
            match attest_err(&store, &token, now) {
                JoinTokenError::Refused(refused) => assert_eq!(
                    refused,
                    IdRefused::OutsideTrustDomain {
                        id: foreign.clone(),
                        trust_domain: td(),
                    }
                ),
                other => panic!("expected a trust-domain refusal, got {other:?}"),
            }
        }
        let stored = store.join_token(&hash(token.expose())).unwrap().unwrap();
        assert!(!stored.used, "a refused token must not be spent");
    }

    #[test]
    fn token_for_the_ca_id_is_refused_and_not_spent() {
        let (_d, store, _) = setup();
        let now = SystemTime::now();
        let token = create(&store, &td().ca_id(), Duration::from_secs(60), false, now).unwrap();
        match attest_err(&store, &token, now) {
            JoinTokenError::Refused(refused) => {
                assert_eq!(refused, IdRefused::ReservedForCa { id: td().ca_id() });
                assert!(refused.to_string().contains("reserved for the CA"));
            }
            other => panic!("expected the CA ID to be refused, got {other:?}"),
        }
        let stored = store.join_token(&hash(token.expose())).unwrap().unwrap();
        assert!(!stored.used, "a refused token must not be spent");
    }

    #[test]
    fn only_the_hash_is_stored() {
        let (dir, store, id) = setup();
        let token = create(
            &store,
            &id,
            Duration::from_secs(60),
            false,
            SystemTime::now(),
        )
        .unwrap();
        for entry in std::fs::read_dir(dir.path().join("join-tokens")).unwrap() {
            let entry = entry.unwrap();
            let contents = std::fs::read_to_string(entry.path()).unwrap();
            let name = entry.file_name().into_string().unwrap();
            assert!(!contents.contains(token.expose()) && !name.contains(token.expose()));
        }
    }
}
