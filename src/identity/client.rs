//! The CA client: TLS to the CA verified as `spiffe://<td>/meshid/ca` with the one SPIFFE
//! verifier, first issuance by attestation, renewal over mutual TLS with the current SVID, and
//! retries with capped backoff for failures worth retrying.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use meshid_proto::pb::{self, ca_client::CaClient as PbClient};
use meshid_proto::tls::{self, CertSlot};
use meshid_proto::verify::{PeerRule, SpiffeVerifier, TrustSource};
use meshid_proto::{Secret, SpiffeId, TrustBundle, TrustDomain};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::Svid;
use super::backoff::Backoff;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("CA address {0:?} must be HOST:PORT")]
    BadAddress(String),
    #[error("cannot reach the CA at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("CA refused ({code:?}): {message}")]
    Refused { code: Code, message: String },
    #[error("CA answer is unusable: {0}")]
    BadAnswer(String),
    #[error("generating a key: {0}")]
    Key(String),
}

impl ClientError {
    /// Failures that may go away by themselves: the CA is starting, restarting, or overloaded.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::DeadlineExceeded
            ),
            _ => false,
        }
    }
}

impl ClientError {
    /// The CA refused the certificate this call presented (its chain is not trusted there any
    /// more, as after a root recovery, or that one certificate is revoked): renewing with it
    /// cannot work, attesting again may.
    pub fn refuses_certificate(&self) -> bool {
        const CERTIFICATE_ALERTS: [&str; 6] = [
            "BadCertificate",
            "UnknownCA",
            "CertificateExpired",
            "CertificateRevoked",
            "CertificateUnknown",
            "CertificateRequired",
        ];
        match self {
            Self::Unreachable { detail, .. } => {
                detail.contains("received fatal alert")
                    && CERTIFICATE_ALERTS.iter().any(|a| detail.contains(a))
            }
            Self::Refused { code, message } => {
                *code == Code::Unauthenticated
                    || (*code == Code::PermissionDenied
                        && message.contains("certificate is revoked"))
            }
            _ => false,
        }
    }
}

/// How a workload proves itself for its first SVID.
#[derive(Debug, Clone)]
pub enum Attestation {
    JoinToken(Secret),
    K8sToken(Secret),
}

/// One CA address.
#[derive(Debug)]
struct Target {
    addr: String,
    host: String,
    port: u16,
}

/// The CA, at one address or several (replicas): every connection goes to the one that
/// answered last, and when it does not answer, to the next. A name that resolves to several
/// addresses (a headless Service) is tried address by address as well.
#[derive(Clone)]
pub struct CaClient {
    /// As given, for messages.
    addr: String,
    targets: Arc<[Target]>,
    /// The target that answered last.
    preferred: Arc<AtomicUsize>,
    trust_domain: TrustDomain,
    trust: Arc<TrustSource>,
}

/// How long one connection attempt may take with one CA address, and with several (a
/// replica that vanished without a word must not hold the sidecar up for long).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT_SEVERAL: Duration = Duration::from_secs(2);

impl CaClient {
    /// `addr` is HOST:PORT, or several separated by commas (the CA's replicas); `bundle` the
    /// roots to trust for the CA's certificate.
    pub fn new(addr: &str, bundle: TrustBundle) -> Result<Self, ClientError> {
        let targets = addr
            .split(',')
            .map(|one| {
                let one = one.trim();
                let bad = || ClientError::BadAddress(one.to_owned());
                let (host, port) = one.rsplit_once(':').ok_or_else(bad)?;
                let port: u16 = port.parse().map_err(|_| bad())?;
                let host = host.trim_matches(['[', ']']).to_owned();
                if host.is_empty() || host.contains(['/', ' ']) {
                    return Err(bad());
                }
                Ok(Target {
                    addr: one.to_owned(),
                    host,
                    port,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let trust_domain = bundle.trust_domain.clone();
        let trust = TrustSource::new(bundle).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        Ok(Self {
            addr: addr.to_owned(),
            targets: targets.into(),
            preferred: Arc::default(),
            trust_domain,
            trust,
        })
    }

    /// The roots this client trusts for the CA; shared, so a bundle update reaches every user.
    pub fn trust(&self) -> Arc<TrustSource> {
        self.trust.clone()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// A gRPC client to the CA, optionally presenting `client_cert` (renewal): to the address
    /// that answered last, or when it does not, to the next that does.
    pub async fn connect(
        &self,
        client_cert: Option<Arc<CertSlot>>,
    ) -> Result<PbClient<Channel>, ClientError> {
        let n = self.targets.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let at = (start + i) % n;
            match self
                .connect_to(&self.targets[at], client_cert.clone())
                .await
            {
                Ok(c) => {
                    if at != start {
                        tracing::info!(
                            "CA at {} answers; using it ({})",
                            self.targets[at].addr,
                            failures.join("; ")
                        );
                    }
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok(c);
                }
                Err(e) if n == 1 => return Err(e),
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(ClientError::Unreachable {
            addr: self.addr.clone(),
            detail: failures.join("; "),
        })
    }

    /// The replica that answered last said it cannot serve now (UNAVAILABLE): the next
    /// connection goes to the next address, if there is one.
    pub fn next_replica(&self) {
        if self.targets.len() > 1 {
            let at = self.preferred.load(Ordering::Relaxed);
            let _ = self.preferred.compare_exchange(
                at,
                (at + 1) % self.targets.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    async fn connect_to(
        &self,
        target: &Target,
        client_cert: Option<Arc<CertSlot>>,
    ) -> Result<PbClient<Channel>, ClientError> {
        let verifier = SpiffeVerifier::new(
            self.trust.clone(),
            PeerRule::Exact(self.trust_domain.ca_id()),
        );
        let builder = rustls::ClientConfig::builder_with_provider(meshid_proto::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match client_cert {
            Some(slot) => builder.with_client_cert_resolver(slot),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server_name = ServerName::try_from(target.host.clone())
            .map_err(|_| ClientError::BadAddress(target.addr.clone()))?;
        let (host, port) = (target.host.clone(), target.port);
        // The URI only names the authority; TLS is ours, so tonic sees a plain connection.
        let endpoint = Endpoint::from_shared(format!("http://{}", target.addr))
            .map_err(|_| ClientError::BadAddress(target.addr.clone()))?
            .connect_timeout(if self.targets.len() > 1 {
                CONNECT_TIMEOUT_SEVERAL
            } else {
                CONNECT_TIMEOUT
            })
            .timeout(Duration::from_secs(15))
            // Watch streams must notice a CA that vanished without closing the connection.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let (connector, server_name, host) =
                    (connector.clone(), server_name.clone(), host.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    tcp.set_nodelay(true)?;
                    let tls = connector.connect(server_name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| ClientError::Unreachable {
                addr: target.addr.clone(),
                detail: error_chain(&e),
            })?;
        Ok(PbClient::new(channel))
    }

    /// First issuance: a new key, a CSR, and the attestation.
    pub async fn issue(&self, attestation: &Attestation) -> Result<Svid, ClientError> {
        let (key, csr) = new_key_and_csr()?;
        let kind = match attestation {
            Attestation::JoinToken(t) => pb::attestation::Kind::JoinToken(t.expose().to_owned()),
            Attestation::K8sToken(t) => {
                pb::attestation::Kind::K8sServiceAccountToken(t.expose().to_owned())
            }
        };
        let request = pb::IssueSvidRequest {
            attestation: Some(pb::Attestation { kind: Some(kind) }),
            csr,
        };
        let answer = self
            .connect(None)
            .await?
            .issue_svid(request)
            .await
            .map_err(|s| self.failed(s))?
            .into_inner();
        self.accept(answer, key)
    }

    /// Renewal over mutual TLS with `current`; a fresh key each time.
    pub async fn renew(&self, current: &Svid) -> Result<Svid, ClientError> {
        let ck = current.certified_key().map_err(ClientError::Key)?;
        let (key, csr) = new_key_and_csr()?;
        let answer = self
            .connect(Some(CertSlot::new(ck)))
            .await?
            .renew_svid(pb::RenewSvidRequest { csr })
            .await
            .map_err(|s| self.failed(s))?
            .into_inner();
        self.accept(answer, key)
    }

    /// A call's failure; a replica that cannot serve now is passed over for the next try.
    fn failed(&self, status: tonic::Status) -> ClientError {
        let e = refused(&self.addr, status);
        if matches!(
            &e,
            ClientError::Refused {
                code: Code::Unavailable,
                ..
            }
        ) || matches!(&e, ClientError::Unreachable { .. })
        {
            self.next_replica();
        }
        e
    }

    /// Check the answer before using it: the leaf must carry our new key and a valid ID.
    fn accept(&self, answer: pb::SvidResponse, key: KeyPair) -> Result<Svid, ClientError> {
        let bad = |m: String| ClientError::BadAnswer(m);
        let chain: Vec<CertificateDer<'static>> = answer
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
        let info = meshid_proto::svid::inspect(leaf).map_err(|e| bad(e.to_string()))?;
        let claimed = SpiffeId::parse(&answer.spiffe_id).map_err(|e| bad(e.to_string()))?;
        if claimed != info.spiffe_id {
            return Err(bad(format!(
                "answer names {claimed} but the certificate is {}",
                info.spiffe_id
            )));
        }
        let key_pem = Secret::new(key.serialize_pem());
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        tls::certified_key(chain.clone(), key_der).map_err(|e| bad(e.to_string()))?;
        let bundle = answer
            .bundle
            .ok_or_else(|| bad("no bundle".into()))
            .and_then(|b| TrustBundle::try_from(b).map_err(|e| bad(e.to_string())))?;
        Ok(Svid {
            spiffe_id: info.spiffe_id,
            chain,
            key_pem,
            not_after: info.not_after,
            bundle,
        })
    }
}

fn new_key_and_csr() -> Result<(KeyPair, Vec<u8>), ClientError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ClientError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    // The CA decides the identity; the CSR only carries the public key.
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ClientError::Key(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

/// A gRPC error as the caller should see it: a transport failure (no connection, a TLS
/// handshake the CA refused) says so with its cause, rather than "CA refused (Unknown)".
fn refused(addr: &str, status: tonic::Status) -> ClientError {
    if std::error::Error::source(&status).is_some()
        && matches!(
            status.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled
        )
    {
        return ClientError::Unreachable {
            addr: addr.to_owned(),
            detail: error_chain(&status),
        };
    }
    ClientError::Refused {
        code: status.code(),
        message: status.message().to_owned(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Run `op` until it succeeds, fails for good, or `deadline` passes; backoff doubles from
/// 200 ms up to 5 s, with jitter so a fleet does not retry in lockstep.
pub async fn with_retry<T, F, Fut>(deadline: Instant, mut op: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && Instant::now() + backoff.step() < deadline => {
                let wait = backoff.next_delay();
                tracing::info!("CA not ready ({e}); retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}
