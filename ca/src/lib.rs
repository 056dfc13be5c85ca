//! meshid's control plane: attest -> issue, over gRPC.
//!
//! A caller proves who it is ([`attest`]: a join token or a Kubernetes ServiceAccount token, or
//! its current SVID for a renewal), the CA decides its SPIFFE ID from that proof alone, and
//! [`issue`] signs an X509-SVID for the public key of the caller's CSR with the active
//! [`authority`]. All state (CA keys in their rotation states, join-token hashes) sits behind
//! one [`store::Store`]; every issuance and refusal leaves an [`audit`] line.

pub mod attest;
pub mod audit;
pub mod authority;
pub mod ca;
pub mod config;
pub mod grant;
pub mod inject;
pub mod issue;
pub mod policy;
pub mod policy_diff;
pub mod policy_explain;
pub mod policy_graph;
pub mod publish;
pub mod rotation;
pub mod serve;
pub mod store;
pub mod token;

pub use config::CaConfig;
