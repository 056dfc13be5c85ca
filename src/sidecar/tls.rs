//! The one place the sidecar builds rustls configs. Both sides read the current certificate
//! from the identity's `CertSlot` and the current roots from the shared `TrustSource`, so a
//! renewal, a reloaded file or a new bundle takes effect on the next handshake without
//! rebuilding anything, and open connections keep their session.

use std::sync::Arc;

use meshid_proto::tls::CertSlot;
use meshid_proto::verify::{PeerRule, SpiffeVerifier, TrustSource};
use meshid_proto::{SpiffeId, TrustDomain};

pub struct MeshTls {
    slot: Arc<CertSlot>,
    trust: Arc<TrustSource>,
    trust_domain: TrustDomain,
}

impl MeshTls {
    pub fn new(slot: Arc<CertSlot>, trust: Arc<TrustSource>, trust_domain: TrustDomain) -> Self {
        Self {
            slot,
            trust,
            trust_domain,
        }
    }

    /// Inbound: TLS 1.3, a client certificate from this trust domain required.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        let verifier = SpiffeVerifier::new(
            self.trust.clone(),
            PeerRule::InTrustDomain(self.trust_domain.clone()),
        );
        let mut config =
            rustls::ServerConfig::builder_with_provider(meshid_proto::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("aws-lc-rs supports TLS 1.3")
                .with_client_cert_verifier(Arc::new(verifier))
                .with_cert_resolver(self.slot.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Outbound to a peer that must be `peer`, presenting exactly `identity` (the caller keeps
    /// one config per peer and identity, and with it the TLS session cache).
    pub fn client(&self, peer: &SpiffeId, identity: Arc<CertSlot>) -> Arc<rustls::ClientConfig> {
        let verifier = SpiffeVerifier::new(self.trust.clone(), PeerRule::Exact(peer.clone()));
        let mut config =
            rustls::ClientConfig::builder_with_provider(meshid_proto::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("aws-lc-rs supports TLS 1.3")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_cert_resolver(identity);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}
