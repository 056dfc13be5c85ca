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

    /// Inbound: TLS 1.3, a client certificate from this trust domain required. ALPN: HTTP/2,
    /// HTTP/1.1, HTTP/2 end to end ([`H2_END_TO_END_ALPN`]) or meshid's opaque TCP tunnel
    /// ([`TCP_ALPN`]).
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
        config.alpn_protocols = vec![
            b"h2".to_vec(),
            b"http/1.1".to_vec(),
            H2_END_TO_END_ALPN.to_vec(),
            TCP_ALPN.to_vec(),
        ];
        Arc::new(config)
    }

    /// Outbound to a peer that must be `peer` (or, with `None`, any SPIFFE ID of this trust
    /// domain: the caller checks it after the handshake), presenting exactly `identity`,
    /// speaking `alpn`. The caller keeps one config per peer, identity and protocol, and with
    /// it the TLS session cache.
    pub fn client(
        &self,
        peer: Option<&SpiffeId>,
        identity: Arc<CertSlot>,
        alpn: Alpn,
    ) -> Arc<rustls::ClientConfig> {
        let rule = match peer {
            Some(id) => PeerRule::Exact(id.clone()),
            None => PeerRule::InTrustDomain(self.trust_domain.clone()),
        };
        let verifier = SpiffeVerifier::new(self.trust.clone(), rule);
        let mut config =
            rustls::ClientConfig::builder_with_provider(meshid_proto::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("aws-lc-rs supports TLS 1.3")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_cert_resolver(identity);
        config.alpn_protocols = vec![alpn.id().to_vec()];
        Arc::new(config)
    }
}

/// The ALPN id of meshid's opaque TCP tunnel between sidecars: after the handshake the caller
/// sends the app port it wants (2 bytes, big-endian), the callee answers one status byte
/// ([`TunnelStatus`](super::tunnel::TunnelStatus)) and, if it is 0, bytes flow both ways.
pub const TCP_ALPN: &[u8] = b"meshid/tcp";

/// HTTP/2 between the sidecars for an app that speaks HTTP/2 itself (h2c, gRPC): the callee's
/// sidecar hands these requests to its app as h2c. Plain `h2` carries HTTP/1.1 apps' requests,
/// multiplexed, and reaches the app as HTTP/1.1 (unless the request is gRPC).
pub const H2_END_TO_END_ALPN: &[u8] = b"meshid/h2";

/// What a connection between sidecars carries. Requests of HTTP/1.1 apps travel multiplexed
/// over HTTP/2 (one connection carries every concurrent call), upgrades (WebSocket) over
/// HTTP/1.1, requests of HTTP/2 apps over HTTP/2 end to end (gRPC's streams and trailers), and
/// anything else as an opaque tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    Http1,
    H2,
    H2EndToEnd,
    Tcp,
}

impl Alpn {
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::Http1 => b"http/1.1",
            Alpn::H2 => b"h2",
            Alpn::H2EndToEnd => H2_END_TO_END_ALPN,
            Alpn::Tcp => TCP_ALPN,
        }
    }

    /// Whether hyper speaks HTTP/2 on it.
    pub fn is_h2(self) -> bool {
        matches!(self, Alpn::H2 | Alpn::H2EndToEnd)
    }
}
