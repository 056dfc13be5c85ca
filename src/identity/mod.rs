//! A workload's identity from the client side: generate a key (it never leaves this process),
//! send a CSR to the CA, keep the SVID, write it to a cert directory. `meshid svid fetch` uses
//! this once; the sidecar uses it for its whole life (obtain, renew, reload).

pub mod backoff;
pub mod client;
pub mod files;

use std::time::SystemTime;

use meshid_proto::{Secret, SpiffeId, TrustBundle};
use rustls_pki_types::CertificateDer;

/// An SVID with its private key and the bundle it came with.
#[derive(Debug, Clone)]
pub struct Svid {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 PEM.
    pub key_pem: Secret,
    pub not_after: SystemTime,
    pub bundle: TrustBundle,
}

impl Svid {
    /// The chain and key as rustls presents them (mutual TLS with this identity).
    pub fn certified_key(&self) -> Result<std::sync::Arc<rustls::sign::CertifiedKey>, String> {
        use rustls_pki_types::pem::PemObject;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.expose().as_bytes())
            .map_err(|_| "the private key does not parse".to_owned())?;
        meshid_proto::tls::certified_key(self.chain.clone(), key).map_err(|e| e.to_string())
    }
}
