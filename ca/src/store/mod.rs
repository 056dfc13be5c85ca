//! The CA's state behind one interface: the data directory ([`FsStore`], one CA) and the
//! Kubernetes API ([`KubeStore`], several replicas) are interchangeable.
//!
//! The store holds bytes and records; it makes no security decisions (expiry, replay, which key
//! signs) — those live in `attest` and `authority`. Every method is safe to call from several
//! processes on the same backing state: `meshid ca join-token` writes while `meshid ca serve`
//! reads, and replicas write while others read.
//!
//! Shared documents (the CA keys, the token keys, the revocations) are read with their
//! [`Version`] and saved only if nobody saved since: a save that lost a race is refused with
//! [`StoreError::Conflict`], and the caller reads again and decides again. What each replica
//! knows alone (the SVIDs it issued) is a [`ReplicaRecord`] of its own, which nobody else writes.

pub mod fs;
pub mod kube;

use std::time::SystemTime;

use meshid_proto::Secret;
use serde::{Deserialize, Serialize};

pub use fs::{FsStore, valid_replica_name};
pub use kube::{KubeStore, KubeStoreConfig};

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
    /// A conditional save lost a race: someone saved `what` since it was read.
    #[error("{what} changed since it was read (another replica saved first)")]
    Conflict { what: &'static str },
    #[error("the Kubernetes API, {what}: {detail}")]
    Api { what: String, detail: String },
}

/// A join token's hash names a file and an object: 64 lowercase hex digits, nothing else.
pub(crate) fn valid_token_hash(hash: &str) -> bool {
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

/// What a conditional save compares: the version the caller read. Opaque (a digest of the file,
/// a `resourceVersion`); empty when nothing is stored yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Version(pub String);

impl Version {
    /// Nothing stored yet: a save with this version creates, and fails if another created first.
    pub fn absent() -> Self {
        Self::default()
    }
}

/// A document as read, and its version.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub version: Version,
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

/// What one CA replica alone knows, saved by it only: the SVIDs it issued that may still be in
/// use, and the SVIDs other replicas issued that it saw renewed. The live set of the whole CA is
/// every replica's `issued` less every replica's `renewed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub replica: String,
    /// Seconds since the Unix epoch.
    pub updated_at: i64,
    pub issued: Vec<IssuedRecord>,
    #[serde(default)]
    pub renewed: Vec<IssuedRecord>,
    /// The versions of the CA keys and of the token keys it had in force when it saved this:
    /// a rotation step that retires a key waits until every live replica has caught up.
    #[serde(default)]
    pub authorities: String,
    #[serde(default)]
    pub token_keys: String,
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
    /// Where the state lives, for messages: a data directory's path, `kubernetes namespace/ns`.
    fn describe(&self) -> String;

    /// Every CA key, in all states, oldest first. Empty on a new store.
    fn load_authorities(&self) -> Result<Versioned<Vec<AuthorityRecord>>, StoreError>;

    /// Replace the set of CA keys and their states, atomically, if it is still at `expected`.
    fn save_authorities(
        &self,
        records: &[AuthorityRecord],
        expected: &Version,
    ) -> Result<Version, StoreError>;

    /// Every token-signing key, in all states, oldest first. Empty on a new store.
    fn load_token_keys(&self) -> Result<Versioned<Vec<TokenKeyRecord>>, StoreError>;

    /// Replace the set of token-signing keys, atomically, if it is still at `expected`.
    fn save_token_keys(
        &self,
        records: &[TokenKeyRecord],
        expected: &Version,
    ) -> Result<Version, StoreError>;

    /// Store a new join token under the hex SHA-256 of the token.
    fn create_join_token(&self, hash: &str, record: &JoinTokenRecord) -> Result<(), StoreError>;

    /// The join token with this hash, if any.
    fn join_token(&self, hash: &str) -> Result<Option<StoredJoinToken>, StoreError>;

    /// Mark a single-use token spent. Exactly one caller gets `true`, however many race, in
    /// however many processes.
    fn spend_join_token(&self, hash: &str) -> Result<bool, StoreError>;

    /// Every revocation in force.
    fn load_revocations(&self) -> Result<Versioned<Vec<RevocationRecord>>, StoreError>;

    /// Replace the revocations in force, atomically, if they are still at `expected`.
    fn save_revocations(
        &self,
        records: &[RevocationRecord],
        expected: &Version,
    ) -> Result<Version, StoreError>;

    /// Every replica's record (this one's among them), as last saved.
    fn load_replicas(&self) -> Result<Vec<ReplicaRecord>, StoreError>;

    /// Replace this replica's own record.
    fn save_replica(&self, record: &ReplicaRecord) -> Result<(), StoreError>;

    /// Take or keep the lease that lets one replica at a time run the automatic rotation
    /// schedule: `true` while `holder` has it. A holder that stops renewing for `ttl` loses it.
    fn try_lead(&self, holder: &str, ttl: std::time::Duration) -> Result<bool, StoreError>;

    /// Notified when another process may have changed the shared documents (a watch event),
    /// for stores that can tell; the others are read again every few seconds.
    fn changes(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}
