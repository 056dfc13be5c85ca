//! The one SPIFFE certificate verifier: webpki path validation against the current trust
//! bundle, then the URI SAN check. It implements both rustls `ServerCertVerifier` (a client
//! checking the server it dialled) and `ClientCertVerifier` (a server checking its caller).
//!
//! Stock hostname verification does not apply to SPIFFE: SVIDs carry a URI SAN, not a DNS name
//! (rustls's `WebPkiServerVerifier` would refuse them with `CertNotValidForName`), so the
//! `ServerName` a client dials is ignored and the peer's SPIFFE ID is checked instead.
//!
//! The bundle sits behind an `ArcSwap`: a rotation replaces it in one store, and the next
//! handshake uses the new roots while open connections keep their session.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::bundle::TrustBundle;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError};

/// Why a peer certificate was refused.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("certificate chain does not verify: {0:?}")]
    Chain(webpki::Error),
    #[error("peer identity: {0}")]
    Svid(#[from] SvidError),
    #[error("peer is {actual}, expected {expected}")]
    UnexpectedPeer { expected: String, actual: SpiffeId },
    #[error("trust bundle root does not parse as a trust anchor: {0}")]
    BadRoot(String),
}

/// rustls shows the reason of a refused certificate with `Debug`: make that the readable
/// message (`peer is spiffe://…, expected spiffe://…`), as it reaches operators in 502 bodies.
impl std::fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A trust bundle with its roots already parsed into webpki trust anchors.
#[derive(Debug)]
pub struct Anchored {
    pub bundle: TrustBundle,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Anchored {
    pub fn new(bundle: TrustBundle) -> Result<Self, VerifyError> {
        let anchors = bundle
            .roots
            .iter()
            .map(|root| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|a| a.to_owned())
                    .map_err(|e| VerifyError::BadRoot(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { bundle, anchors })
    }
}

/// The current trust bundle, shared by every verifier that should follow the same rotation.
#[derive(Debug)]
pub struct TrustSource {
    anchored: ArcSwap<Anchored>,
    /// Ticks on every update (the Workload API streams bundles on it).
    changed: tokio::sync::watch::Sender<u64>,
}

impl TrustSource {
    pub fn new(bundle: TrustBundle) -> Result<Arc<Self>, VerifyError> {
        Ok(Arc::new(Self {
            anchored: ArcSwap::from_pointee(Anchored::new(bundle)?),
            changed: tokio::sync::watch::channel(0).0,
        }))
    }

    /// Replace the bundle; the next handshake uses it. A bundle that does not parse is refused
    /// and the current one stays in force.
    pub fn update(&self, bundle: TrustBundle) -> Result<(), VerifyError> {
        self.anchored.store(Arc::new(Anchored::new(bundle)?));
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    pub fn current(&self) -> Arc<Anchored> {
        self.anchored.load_full()
    }

    /// Ticks whenever the bundle in force is replaced.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Which peers a verifier accepts once their chain is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRule {
    /// Exactly this SPIFFE ID (a client dialling a known service, or the CA).
    Exact(SpiffeId),
    /// Any SPIFFE ID in this trust domain; finer authorization happens after the handshake.
    InTrustDomain(TrustDomain),
}

impl PeerRule {
    fn check(&self, id: &SpiffeId) -> Result<(), VerifyError> {
        let ok = match self {
            PeerRule::Exact(want) => want == id,
            PeerRule::InTrustDomain(td) => id.trust_domain() == td,
        };
        if ok {
            Ok(())
        } else {
            let expected = match self {
                PeerRule::Exact(want) => want.to_string(),
                PeerRule::InTrustDomain(td) => format!("an ID in trust domain {td}"),
            };
            Err(VerifyError::UnexpectedPeer {
                expected,
                actual: id.clone(),
            })
        }
    }
}

/// Verifies SVID chains for rustls, on either side of a handshake.
#[derive(Debug)]
pub struct SpiffeVerifier {
    trust: Arc<TrustSource>,
    rule: PeerRule,
    client_auth_mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl SpiffeVerifier {
    /// A verifier whose callers (server side) must present a client certificate.
    pub fn new(trust: Arc<TrustSource>, rule: PeerRule) -> Self {
        Self {
            trust,
            rule,
            client_auth_mandatory: true,
            provider: crate::crypto_provider(),
        }
    }

    /// Server side only: accept callers without a certificate too (first issuance at the CA,
    /// where the caller proves itself by attestation instead). A certificate that is presented
    /// is still fully verified.
    pub fn allow_anonymous_clients(mut self) -> Self {
        self.client_auth_mandatory = false;
        self
    }

    /// Path validation to a root of the current bundle for `usage`, then the SPIFFE ID rule.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, VerifyError> {
        let current = self.trust.current();
        let cert = EndEntityCert::try_from(end_entity).map_err(VerifyError::Chain)?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &current.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(VerifyError::Chain)?;
        let id = svid::spiffe_id_of(end_entity)?;
        self.rule.check(&id)?;
        Ok(id)
    }

    fn to_rustls(err: VerifyError) -> rustls::Error {
        let cert_err = match &err {
            VerifyError::Chain(webpki::Error::CertExpired { .. }) => CertificateError::Expired,
            VerifyError::Chain(webpki::Error::CertNotValidYet { .. }) => {
                CertificateError::NotValidYet
            }
            VerifyError::Chain(webpki::Error::UnknownIssuer) => CertificateError::UnknownIssuer,
            VerifyError::Chain(webpki::Error::InvalidSignatureForPublicKey) => {
                CertificateError::BadSignature
            }
            VerifyError::Chain(webpki::Error::RequiredEkuNotFoundContext(_)) => {
                CertificateError::InvalidPurpose
            }
            _ => CertificateError::Other(OtherError(Arc::new(err))),
        };
        rustls::Error::InvalidCertificate(cert_err)
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_chain(end_entity, intermediates, now, KeyUsage::server_auth())
            .map(|_| ServerCertVerified::assertion())
            .map_err(Self::to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_chain(end_entity, intermediates, now, KeyUsage::client_auth())
            .map(|_| ClientCertVerified::assertion())
            .map_err(Self::to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
