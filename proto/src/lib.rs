//! meshid's shared vocabulary: the control-plane contract (gRPC, generated from `proto/`) and the
//! identity types both sides use. The CA and the sidecar depend on this crate and never on each
//! other.
//!
//! There is exactly one SPIFFE certificate verifier ([`verify::SpiffeVerifier`]) and it lives
//! here, so the CA, the sidecar in both directions and `meshid svid fetch` check certificates
//! the same way.

pub mod atomic_file;
pub mod bundle;
pub mod clock;
pub mod dir_watch;
pub mod directory;
pub mod id;
pub mod jwks;
pub mod jwt_svid;
pub mod path;
pub mod pem;
pub mod secret;
pub mod serve;
pub mod svid;
pub mod throttle;
pub mod tls;
pub mod token;
pub mod uds_authority;
pub mod verify;

pub use bundle::TrustBundle;
pub use clock::{Clock, SystemClock};
pub use id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use secret::Secret;

/// Generated gRPC types and stubs for `meshid.ca.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("meshid.ca.v1");
}

/// Generated gRPC types and stubs for the SPIFFE Workload API (`SpiffeWorkloadAPI`, no proto
/// package).
#[allow(clippy::all, missing_docs)]
pub mod workload {
    tonic::include_proto!("_");
}

/// `Debug` for the [`pb`] messages that carry a secret, which print it as `[redacted]`.
mod pb_debug;

/// The only crypto provider meshid uses, handed explicitly to every rustls builder so nothing
/// depends on a process-wide default.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<std::sync::Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}
