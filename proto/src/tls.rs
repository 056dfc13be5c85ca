//! A hot-swappable certificate for rustls: the current `CertifiedKey` behind an `ArcSwap`,
//! served to every new handshake on either side. Replacing it is one pointer store, so a
//! renewal or a reloaded file takes effect on the next connection while open ones keep theirs.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug)]
pub struct CertSlot(ArcSwap<CertifiedKey>);

#[derive(Debug, thiserror::Error)]
pub enum CertSlotError {
    #[error("private key is not usable: {0}")]
    Key(rustls::Error),
    #[error("private key does not match the certificate: {0}")]
    Mismatch(rustls::Error),
}

/// A rustls `CertifiedKey` from a chain (leaf first) and its private key, checked to match.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, CertSlotError> {
    let provider = crate::crypto_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(CertSlotError::Key)?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(CertSlotError::Mismatch)?;
    Ok(Arc::new(ck))
}

impl CertSlot {
    pub fn new(initial: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(ArcSwap::new(initial)))
    }

    pub fn replace(&self, next: Arc<CertifiedKey>) {
        self.0.store(next);
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.load_full()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let current = self.current();
        current
            .key
            .choose_scheme(sigschemes)
            .map(|_| current.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
