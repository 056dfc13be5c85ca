//! The CA's state behind one interface, so the file store of today and a Kubernetes-backed store
//! for several replicas later are interchangeable.
//!
//! The store holds bytes and records; it makes no security decisions (expiry, replay, which key
//! signs) — those live in `attest` and `authority`. Every method is safe to call from several
//! processes on the same backing state: `meshid ca join-token` writes while `meshid ca serve`
//! reads.

pub mod fs;

use std::time::SystemTime;

use meshid_proto::Secret;
use serde::{Deserialize, Serialize};

pub use fs::FsStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} at {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} at {path} is corrupt: {detail}")]
    Corrupt {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("join token already exists")]
    JoinTokenExists,
}

/// Where a CA key is in its life: prepared (its root in the bundle, its key in the JWKS, not
/// signing yet), active (signs new SVIDs or tokens), old (superseded by a newer active key,
/// still trusted while what it signed lives), retired (out of the bundle and the JWKS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    Prepared,
    Active,
    Old,
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
            Self::Retired => "retired",
        }
    }

    /// In the bundle (for a CA key) or the JWKS (for a token key).
    pub fn trusted(self) -> bool {
        self != Self::Retired
    }
}

/// One X.509 CA (a root and the intermediate that signs leaves) as stored.
#[derive(Debug, Clone)]
pub struct AuthorityRecord {
    pub id: String,
    pub state: KeyState,
    pub created_at: SystemTime,
    pub root_cert_pem: String,
    /// Absent when the operator brought an intermediate and keeps the root key elsewhere.
    pub root_key_pem: Option<Secret>,
    pub intermediate_cert_pem: String,
    pub intermediate_key_pem: Secret,
    /// When a newer key became active and this one stopped signing.
    pub superseded_at: Option<SystemTime>,
    /// Tainted (SPIRE's word): every SVID it signed is to be renewed at once.
    pub tainted: bool,
}

/// One token-signing key as stored.
#[derive(Debug, Clone)]
pub struct TokenKeyRecord {
    /// RFC 7638 thumbprint of the public key.
    pub kid: String,
    /// JWS algorithm: `ES256` or `EdDSA`.
    pub alg: String,
    pub state: KeyState,
    pub created_at: SystemTime,
    pub pkcs8_pem: Secret,
    /// When a newer key became active and this one stopped signing.
    pub superseded_at: Option<SystemTime>,
}

/// What a revocation names: every SVID of one identity, or one SVID by serial.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokedKind {
    SpiffeId,
    Serial,
}

/// One revocation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    pub kind: RevokedKind,
    /// The SPIFFE ID, or the serial in lowercase hex.
    pub value: String,
    /// Seconds since the Unix epoch.
    pub revoked_at: i64,
    pub reason: String,
}

/// An SVID the CA issued that may still be in use: it has not expired and its holder has not
/// renewed it yet. What `rotate retire` waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// Lowercase hex.
    pub serial: String,
    pub spiffe_id: String,
    /// The [`AuthorityRecord::id`] that signed it.
    pub authority: String,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
}

/// A join token as stored: never the token, only what it grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub spiffe_id: String,
    /// Seconds since the Unix epoch.
    pub expires_at: i64,
    pub reusable: bool,
    pub created_at: i64,
}

/// A stored join token and whether a single-use token has been spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJoinToken {
    pub record: JoinTokenRecord,
    pub used: bool,
}

/// The CA's persistent state.
pub trait Store: Send + Sync + 'static {
    /// Every CA key, in all states, oldest first. Empty on a new data directory.
    fn load_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError>;

    /// Replace the set of CA keys and their states, atomically.
    fn save_authorities(&self, records: &[AuthorityRecord]) -> Result<(), StoreError>;

    /// Every token-signing key, in all states, oldest first. Empty on a new data directory.
    fn load_token_keys(&self) -> Result<Vec<TokenKeyRecord>, StoreError>;

    /// Replace the set of token-signing keys and their states, atomically.
    fn save_token_keys(&self, records: &[TokenKeyRecord]) -> Result<(), StoreError>;

    /// Store a new join token under the hex SHA-256 of the token.
    fn create_join_token(&self, hash: &str, record: &JoinTokenRecord) -> Result<(), StoreError>;

    /// The join token with this hash, if any.
    fn join_token(&self, hash: &str) -> Result<Option<StoredJoinToken>, StoreError>;

    /// Mark a single-use token spent. Exactly one caller gets `true`, however many race.
    fn spend_join_token(&self, hash: &str) -> Result<bool, StoreError>;

    /// Every revocation in force.
    fn load_revocations(&self) -> Result<Vec<RevocationRecord>, StoreError>;

    /// Replace the revocations in force, atomically.
    fn save_revocations(&self, records: &[RevocationRecord]) -> Result<(), StoreError>;

    /// The SVIDs that may still be in use, as last saved.
    fn load_issued(&self) -> Result<Vec<IssuedRecord>, StoreError>;

    /// Replace the record of SVIDs that may still be in use, atomically.
    fn save_issued(&self, records: &[IssuedRecord]) -> Result<(), StoreError>;
}
