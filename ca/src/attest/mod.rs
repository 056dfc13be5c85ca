//! Attestation: how a caller proves who it is before its first SVID. The SPIFFE ID is derived
//! here, from the proof alone.
//!
//! - [`join_token`]: a token printed by `meshid ca join-token`, bound to one SPIFFE ID, stored
//!   only as a hash, expiring, single-use unless reusable.
//! - [`k8s`]: a projected ServiceAccount token (audience `meshid-ca`), checked by the API server
//!   (TokenReview) or offline against the cluster's OIDC JWKS.
//!
//! Errors name what was wrong but never contain the presented token.

pub mod join_token;
pub mod k8s;

use std::time::SystemTime;

use meshid_proto::{SpiffeId, TrustDomain};

use crate::store::StoreError;

/// Audience every Kubernetes token presented to the CA must carry.
pub const K8S_AUDIENCE: &str = "meshid-ca";

/// The kind of proof, for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestationKind {
    JoinToken,
    K8sServiceAccount,
    /// Renewal: the caller's current SVID over mutual TLS.
    X509Svid,
}

impl AttestationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JoinToken => "join_token",
            Self::K8sServiceAccount => "k8s_sat",
            Self::X509Svid => "x509_svid",
        }
    }
}

/// Why a proven identity still gets nothing from this CA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdRefused {
    #[error("attested ID {id} is outside trust domain {trust_domain}")]
    OutsideTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("{id} is reserved for the CA")]
    ReservedForCa { id: SpiffeId },
}

/// Whether this CA (of `trust_domain`) may issue to `id`: only IDs of its own trust domain, and
/// never the CA's own ID (`spiffe://<td>/meshid/ca`).
pub fn check_issuable(trust_domain: &TrustDomain, id: &SpiffeId) -> Result<(), IdRefused> {
    if id.trust_domain() != trust_domain {
        return Err(IdRefused::OutsideTrustDomain {
            id: id.clone(),
            trust_domain: trust_domain.clone(),
        });
    }
    if *id == trust_domain.ca_id() {
        return Err(IdRefused::ReservedForCa { id: id.clone() });
    }
    Ok(())
}

/// A proven identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    pub spiffe_id: SpiffeId,
    pub kind: AttestationKind,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("no attestation in the request: send a join token or a Kubernetes token")]
    Missing,
    #[error("join token is not known to this CA")]
    JoinTokenUnknown,
    #[error("join token expired at {}", humantime::format_rfc3339_seconds(*expired_at))]
    JoinTokenExpired { expired_at: SystemTime },
    #[error("join token was already used (single-use tokens cannot be replayed)")]
    JoinTokenReplayed,
    #[error("join token record names an invalid SPIFFE ID")]
    JoinTokenCorrupt,
    #[error("Kubernetes attestation is not configured on this CA")]
    K8sDisabled,
    #[error("Kubernetes token refused: {0}")]
    K8sRefused(String),
    #[error("Kubernetes token audience is not {K8S_AUDIENCE}")]
    K8sWrongAudience,
    #[error("Kubernetes API unavailable: {0}")]
    K8sUnavailable(String),
    #[error("CA store: {0}")]
    Store(#[from] StoreError),
}
