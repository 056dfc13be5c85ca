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
    /// What a rotation asks of the sidecars besides trusting `roots`.
    pub rotation: RotationHints,
}

/// Sent with the bundle during a rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationHints {
    /// SHA-256 of the intermediates (DER) that no longer sign: an SVID signed by one of them is
    /// renewed now, at a random moment within `renew_window`.
    pub renew_issuers: Vec<[u8; 32]>,
    pub renew_window: std::time::Duration,
    /// The `kid`s of the token-signing keys in the JWKS now: a verifier holding others (or
    /// missing one) fetches the JWKS again.
    pub token_kids: Vec<String>,
}

/// SHA-256 of a certificate's DER, how rotation hints name an issuer.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
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
            rotation: RotationHints::default(),
        })
    }
}

impl From<&TrustBundle> for pb::Bundle {
    fn from(b: &TrustBundle) -> Self {
        pb::Bundle {
            trust_domain: b.trust_domain.to_string(),
            roots: b.roots.iter().map(|r| r.to_vec()).collect(),
            sequence: b.sequence,
            renew_issuers: b
                .rotation
                .renew_issuers
                .iter()
                .map(|h| h.to_vec())
                .collect(),
            renew_window_seconds: b.rotation.renew_window.as_secs().min(u32::MAX as u64) as u32,
            token_kids: b.rotation.token_kids.clone(),
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
            rotation: RotationHints {
                // A hint that is not a SHA-256 names nothing; it is dropped, not an error.
                renew_issuers: b
                    .renew_issuers
                    .iter()
                    .filter_map(|h| <[u8; 32]>::try_from(h.as_slice()).ok())
                    .collect(),
                renew_window: std::time::Duration::from_secs(b.renew_window_seconds.into()),
                token_kids: b.token_kids,
            },
        })
    }
}
