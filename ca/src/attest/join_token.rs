//! Join tokens: one-time (or reusable) bootstrap secrets bound to one SPIFFE ID.
//!
//! The token is 32 random bytes (256 bits), printed once. The store keeps only its SHA-256,
//! which also names the record, so looking a token up compares hashes, never the token.

use std::time::{Duration, SystemTime};

use base64::Engine;
use meshid_proto::{Secret, SpiffeId};

use super::{AttestError, AttestationKind, Attested};
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

/// Check a presented token and, if single-use, spend it.
pub fn attest(store: &dyn Store, token: &Secret, now: SystemTime) -> Result<Attested, AttestError> {
    let t = token.expose();
    if t.len() > MAX_TOKEN_LEN || !t.starts_with(PREFIX) {
        return Err(AttestError::JoinTokenUnknown);
    }
    let h = hash(t);
    let stored = store.join_token(&h)?.ok_or(AttestError::JoinTokenUnknown)?;
    if stored.used && !stored.record.reusable {
        return Err(AttestError::JoinTokenReplayed);
    }
    if meshid_proto::clock::unix_seconds(now) >= stored.record.expires_at {
        return Err(AttestError::JoinTokenExpired {
            expired_at: SystemTime::UNIX_EPOCH
                + Duration::from_secs(stored.record.expires_at.max(0) as u64),
        });
    }
    let spiffe_id =
        SpiffeId::parse(&stored.record.spiffe_id).map_err(|_| AttestError::JoinTokenCorrupt)?;
    if !stored.record.reusable && !store.spend_join_token(&h)? {
        // Someone else spent it between our read and our rename.
        return Err(AttestError::JoinTokenReplayed);
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

    fn setup() -> (tempfile::TempDir, FsStore, SpiffeId) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        (
            dir,
            store,
            SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
        )
    }

    #[test]
    fn replayed_join_token_is_refused() {
        let (_d, store, id) = setup();
        let now = SystemTime::now();
        let token = create(&store, &id, Duration::from_secs(60), false, now).unwrap();
        assert_eq!(attest(&store, &token, now).unwrap().spiffe_id, id);
        assert!(matches!(
            attest(&store, &token, now),
            Err(AttestError::JoinTokenReplayed)
        ));
    }

    #[test]
    fn reusable_token_works_twice() {
        let (_d, store, id) = setup();
        let now = SystemTime::now();
        let token = create(&store, &id, Duration::from_secs(60), true, now).unwrap();
        attest(&store, &token, now).unwrap();
        attest(&store, &token, now).unwrap();
    }

    #[test]
    fn expired_and_unknown_tokens_are_refused() {
        let (_d, store, id) = setup();
        let now = SystemTime::now();
        let token = create(&store, &id, Duration::from_secs(60), false, now).unwrap();
        let later = now + Duration::from_secs(61);
        assert!(matches!(
            attest(&store, &token, later),
            Err(AttestError::JoinTokenExpired { .. })
        ));
        let forged = Secret::new("mjt.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        assert!(matches!(
            attest(&store, &forged, now),
            Err(AttestError::JoinTokenUnknown)
        ));
        assert!(matches!(
            attest(&store, &Secret::new("x".repeat(10_000)), now),
            Err(AttestError::JoinTokenUnknown)
        ));
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
