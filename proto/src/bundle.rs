//! The trust bundle: the roots a trust domain's certificates chain to. During a CA rotation it
//! holds several roots at once; `sequence` grows with every change.

use rustls_pki_types::CertificateDer;

use crate::id::{SpiffeIdError, TrustDomain};
use crate::pb;
use crate::pem::{self, PemError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    pub roots: Vec<CertificateDer<'static>>,
    pub sequence: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle has a bad trust domain: {0}")]
    TrustDomain(#[from] SpiffeIdError),
    #[error("bundle holds no root certificate")]
    Empty,
    #[error("bundle PEM: {0}")]
    Pem(#[from] PemError),
}

impl TrustBundle {
    /// The roots as concatenated PEM, the `bundle.pem` format.
    pub fn to_pem(&self) -> String {
        pem::encode_certs(&self.roots)
    }

    /// A bundle from `bundle.pem` contents.
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        Ok(Self {
            trust_domain,
            roots: pem::decode_certs(pem)?,
            sequence: 0,
        })
    }
}

impl From<&TrustBundle> for pb::Bundle {
    fn from(b: &TrustBundle) -> Self {
        pb::Bundle {
            trust_domain: b.trust_domain.to_string(),
            roots: b.roots.iter().map(|r| r.to_vec()).collect(),
            sequence: b.sequence,
        }
    }
}

impl TryFrom<pb::Bundle> for TrustBundle {
    type Error = BundleError;
    fn try_from(b: pb::Bundle) -> Result<Self, Self::Error> {
        if b.roots.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(Self {
            trust_domain: TrustDomain::parse(&b.trust_domain)?,
            roots: b.roots.into_iter().map(CertificateDer::from).collect(),
            sequence: b.sequence,
        })
    }
}
