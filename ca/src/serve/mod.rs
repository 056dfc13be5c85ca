//! The CA's front ends: the gRPC, HTTPS and admin listeners and their TLS. They translate; the
//! decisions (attest, issue, grant, rotate, audit) are made in [`crate::ca::CaCore`].
//!
//! gRPC runs over our own rustls config (tonic's `ServerTlsConfig` cannot take a custom
//! verifier or a swappable certificate): the CA presents its own SVID
//! (`spiffe://<td>/meshid/ca`, plus DNS/IP SANs for stock clients) and accepts callers with or
//! without a client certificate — first issuance is anonymous and proven by attestation, renewal
//! presents the current SVID, which the SPIFFE verifier checks against the bundle.

pub mod admin;
pub mod grpc;
pub mod http;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshid_proto::SpiffeId;
use meshid_proto::pb::ca_server::CaServer;
use meshid_proto::serve::{Anonymous, Limits, Protocol, Server};
use meshid_proto::tls::{self, CertSlot};
use meshid_proto::verify::{PeerRule, SpiffeVerifier, TrustSource};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::issue::{self, X509SvidParams};
use crate::policy;

use crate::ca::{CaCore, MAX_MESSAGE_BYTES, StartError};

/// A connection without a client certificate is closed after this long: first issuance and a
/// JWKS read take well under a second.
const ANONYMOUS_MAX_AGE: Duration = Duration::from_secs(30);
/// The admin endpoint serves a scraper and a probe or two, never a crowd.
const ADMIN_MAX_CONNECTIONS: usize = 64;
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

impl CaCore {
    /// A fresh serving certificate for the CA itself.
    fn serving_cert(&self) -> Result<Arc<rustls::sign::CertifiedKey>, StartError> {
        let err = |m: String| StartError::ServingCert(m);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
        let csr_key = issue::CsrKey::from_key_pair(&key).map_err(|e| err(e.to_string()))?;
        let mut dns = vec!["localhost".to_owned()];
        dns.extend(self.config.dns_names.iter().cloned());
        let mut ips = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        ips.extend(self.config.ip_addresses.iter().copied());
        let ca_id: SpiffeId = self.config.trust_domain.ca_id();
        let authorities = self.authorities.load();
        let active = authorities.active().map_err(|e| err(e.to_string()))?;
        let svid = issue::sign_x509_svid(
            active,
            X509SvidParams {
                spiffe_id: &ca_id,
                key: &csr_key,
                ttl: SERVING_CERT_TTL,
                now: self.clock.now(),
                dns_names: &dns,
                ip_addresses: &ips,
            },
        )
        .map_err(|e| err(e.to_string()))?;
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        tls::certified_key(svid.chain, pkcs8).map_err(|e| err(e.to_string()))
    }

    fn server_tls(
        &self,
        slot: Arc<CertSlot>,
        trust: Arc<TrustSource>,
        alpn: &[&[u8]],
    ) -> rustls::ServerConfig {
        let verifier = SpiffeVerifier::new(
            trust,
            PeerRule::InTrustDomain(self.config.trust_domain.clone()),
        )
        .allow_anonymous_clients();
        let mut config =
            rustls::ServerConfig::builder_with_provider(meshid_proto::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("aws-lc-rs supports TLS 1.3")
                .with_client_cert_verifier(Arc::new(verifier))
                .with_cert_resolver(slot);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

/// A self-signed certificate no client trusts: what the gRPC and HTTPS listeners present while
/// the CA's authority has expired, so the process (and its admin endpoint) stays up.
fn placeholder_cert() -> Result<Arc<rustls::sign::CertifiedKey>, StartError> {
    let err = |m: String| StartError::ServingCert(m);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
    let cert = rcgen::CertificateParams::new(vec!["meshid-ca-expired".to_owned()])
        .and_then(|p| p.self_signed(&key))
        .map_err(|e| err(e.to_string()))?;
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    tls::certified_key(vec![cert.der().clone()], pkcs8).map_err(|e| err(e.to_string()))
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((listener, local))
}

/// Bind the gRPC, HTTPS and admin listeners and serve until `shutdown` fires; then stop
/// accepting, end the watch streams (sidecars reconnect, to another replica when there is
/// one), let calls in flight finish, and return within the drain bound.
pub async fn serve(core: Arc<CaCore>, shutdown: CancellationToken) -> Result<(), StartError> {
    let limits = core.config.limits;
    let (listener, local) = bind(core.config.grpc_addr).await?;
    let (http_listener, http_local) = bind(core.config.http_addr).await?;
    let (admin_listener, admin_local) = bind(core.config.admin_addr).await?;
    let credential = admin::write_credentials(&core.config.data_dir, admin_local)
        .map_err(|e| StartError::ServingCert(format!("admin credentials: {e}")))?;

    // An expired CA still starts: its admin endpoint is how it is recovered.
    let serving = match core.serving_cert() {
        Ok(ck) => ck,
        Err(e) => {
            error!(
                "the CA cannot sign its own serving certificate ({e}); serving a placeholder until it is recovered"
            );
            placeholder_cert()?
        }
    };
    let slot = CertSlot::new(serving);
    let trust =
        TrustSource::new(core.bundle()).map_err(|e| StartError::ServingCert(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(core.server_tls(
        slot.clone(),
        trust.clone(),
        &[b"h2"],
    )));
    let http_acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(core.server_tls(
        slot.clone(),
        trust.clone(),
        &[b"h2", b"http/1.1"],
    )));
    let mut servers = tokio::task::JoinSet::new();
    // Callers without a certificate (first issuance, JWKS and metadata readers) have a quota
    // of their own: a flood of them cannot take the slots that renewals and watch streams need.
    let anonymous = Anonymous {
        max_connections: (limits.max_connections / 10).max(64),
        max_age: ANONYMOUS_MAX_AGE,
    };
    let server = Server::new("ca-https", http_listener, limits)
        .tls(http_acceptor)
        .anonymous(anonymous);
    core.metrics.listeners.register(&server);
    servers.spawn(http::serve(core.clone(), server, shutdown.clone()));
    // Probes and the scraper may reach this port from the pod network: a short idle bound, so
    // clients holding connections cannot starve the kubelet's probes (or an operator) for long.
    let admin_limits = Limits {
        max_connections: limits.max_connections.min(ADMIN_MAX_CONNECTIONS),
        idle_timeout: limits.idle_timeout.min(std::time::Duration::from_secs(10)),
        header_read_timeout: limits
            .header_read_timeout
            .min(std::time::Duration::from_secs(5)),
        ..limits
    };
    let server = Server::new("ca-admin", admin_listener, admin_limits).protocol(Protocol::Http1);
    core.metrics.listeners.register(&server);
    servers.spawn(admin::serve(
        core.clone(),
        credential,
        server,
        shutdown.clone(),
    ));
    let publisher = core
        .bundle_publisher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(publisher) = publisher {
        let counter = core.clone();
        let count: crate::publish::Counter = Arc::new(move |outcome| {
            counter
                .metrics
                .count(crate::publish::WRITES_METRIC, outcome)
        });
        crate::publish::spawn(publisher, core.watch_bundle(), count, shutdown.clone());
    }
    if let Some(path) = core.config.policy.clone() {
        let (apply, refuse) = (core.clone(), core.clone());
        policy::watch(
            path,
            core.config.trust_domain.clone(),
            core.config.token_issuer.clone(),
            Arc::new(move |d| apply.apply_policy(d)),
            Arc::new(move |e| refuse.refuse_policy(e)),
            shutdown.clone(),
        );
    }

    // The serving certificate is renewed at half its life; the trust source follows the bundle.
    {
        let (core, slot, trust, shutdown) =
            (core.clone(), slot.clone(), trust.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut bundles = core.watch_bundle();
            let mut renew = tokio::time::interval(SERVING_CERT_TTL / 2);
            renew.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = renew.tick() => match core.serving_cert() {
                        Ok(ck) => slot.replace(ck),
                        Err(e) => error!("renewing the CA serving certificate: {e}"),
                    },
                    changed = bundles.changed() => {
                        if changed.is_err() { break; }
                        let next = bundles.borrow_and_update().clone();
                        if let Err(e) = trust.update(next) { error!("new trust bundle refused: {e}"); }
                        // A rotation step: the CA's own certificate follows the active
                        // authority, so it never chains to a root about to leave the bundle.
                        match core.serving_cert() {
                            Ok(ck) => slot.replace(ck),
                            Err(e) => error!("renewing the CA serving certificate: {e}"),
                        }
                    }
                }
            }
        });
    }

    core.spawn_rotation(shutdown.clone());
    core.warn_expiry();
    info!(grpc = %local, https = %http_local, trust_domain = %core.config.trust_domain, "CA serving");
    let grpc = CaServer::new(grpc::GrpcCa::new(core.clone(), shutdown.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(grpc).prepare();
    let service = hyper_util::service::TowerToHyperService::new(routes);
    let server = Server::new("ca-grpc", listener, limits)
        .tls(acceptor)
        .anonymous(anonymous)
        .conn_info_in_requests();
    core.metrics.listeners.register(&server);
    server
        .serve(move |_| Some(service.clone()), shutdown.clone())
        .await;
    while servers.join_next().await.is_some() {}
    // Refusals aggregated in the last window go to the audit log before the process exits.
    core.audit.flush();
    // The operator credential is good for this run only: once stopped, no stale copy is left
    // for whoever binds the admin port next.
    for file in [admin::TOKEN_FILE, admin::ADDR_FILE] {
        let _ = std::fs::remove_file(core.config.data_dir.join(file));
    }
    info!("CA stopped");
    Ok(())
}
