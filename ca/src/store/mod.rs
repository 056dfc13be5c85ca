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

/// Where a CA key is in its life: prepared (root in the bundle, not signing yet), active (signs
/// new SVIDs), retired (out of the bundle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    Prepared,
    Active,
    Retired,
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
}
