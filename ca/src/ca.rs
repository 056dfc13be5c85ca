//! The CA core: the state every front end shares ([`CaCore`]) and the decisions made on it
//! (attest, issue, grant, audit). The front ends in [`crate::serve`] only translate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meshid_proto::directory::Directory;
use meshid_proto::jwt_svid::JwtSvidClaims;
use meshid_proto::svid;
use meshid_proto::token::{AccessTokenClaims, Confirmation, x5t_s256};
use meshid_proto::{Clock, Secret, SpiffeId, TrustBundle};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::attest::k8s::{K8sAttestor, OidcJwks, TokenReview};
use crate::attest::{self, AttestError, AttestationKind, Attested};
use crate::audit::{Audit, AuditRecord};
use crate::authority::Authorities;
use crate::config::{CaConfig, K8sConfig};
use crate::grant::{self, GrantError, GrantRequest, RateLimiter};
use crate::issue::{self, IssueError, IssuedSvid, X509SvidParams};
use crate::policy::{self, PolicyError};
use crate::store::{FsStore, KubeStore, Store};
use crate::token::{TokenInitError, TokenKeys};

/// Largest gRPC message the CA decodes; a CSR is a few hundred bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Why a request was refused; mapped to gRPC codes in one place ([`crate::serve::grpc`]).
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Attest(#[from] AttestError),
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl CaError {
    /// A short, stable reason code for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Attest(AttestError::Missing) => "no_attestation",
            Self::Attest(AttestError::JoinTokenUnknown) => "join_token_unknown",
            Self::Attest(AttestError::JoinTokenExpired { .. }) => "join_token_expired",
            Self::Attest(AttestError::JoinTokenReplayed) => "join_token_replayed",
            Self::Attest(AttestError::K8sDisabled) => "k8s_disabled",
            Self::Attest(AttestError::K8sRefused(_)) => "k8s_refused",
            Self::Attest(AttestError::K8sWrongAudience) => "k8s_wrong_audience",
            Self::Attest(AttestError::K8sUnavailable(_)) => "k8s_unavailable",
            Self::Attest(AttestError::JoinTokenCorrupt | AttestError::Store(_)) => "store_error",
            Self::Issue(IssueError::UnsupportedKey(_)) => "unsupported_key",
            Self::Issue(IssueError::CsrSignature) => "csr_signature",
            Self::Issue(
                IssueError::CsrMissing | IssueError::CsrMalformed | IssueError::CsrTooLarge { .. },
            ) => "csr_invalid",
            Self::Issue(_) | Self::Internal(_) => "internal",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening data directory: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("loading CA keys: {0}")]
    Init(#[from] crate::authority::InitError),
    #[error("opening audit log: {0}")]
    Audit(std::io::Error),
    #[error("Kubernetes attestation: {0}")]
    K8s(#[from] crate::attest::k8s::K8sConfigError),
    #[error("serving certificate: {0}")]
    ServingCert(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("policy {path}: {error}")]
    Policy { path: String, error: PolicyError },
    #[error("token-signing keys: {0}")]
    TokenKeys(#[from] TokenInitError),
}

/// A token request as received by a front end.
#[derive(Debug, Clone, Default)]
pub struct TokenParams<'a> {
    /// `None` for gRPC, where the grant type is implied.
    pub grant_type: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub scope: Option<&'a str>,
    pub audience: Option<&'a str>,
}

/// A minted access token, as the front ends return it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub access_token: Secret,
    pub expires_in: i64,
    pub scope: String,
}

/// A first-issuance request's proof, as received.
pub enum Proof {
    JoinToken(Secret),
    K8sToken(Secret),
}

/// The CA's state, shared by every front end.
pub struct CaCore {
    pub config: CaConfig,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) authorities: ArcSwap<Authorities>,
    pub(crate) bundle: watch::Sender<TrustBundle>,
    pub(crate) audit: Audit,
    pub(crate) k8s: Option<K8sAttestor>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) token_keys: ArcSwap<TokenKeys>,
    pub(crate) directory: watch::Sender<Arc<Directory>>,
    pub(crate) limiter: RateLimiter,
    /// JWT-SVIDs have a budget of their own: an app asking its Workload API for many can never
    /// use up its sidecar's access-token grants.
    pub(crate) jwt_svid_limiter: RateLimiter,
    pub(crate) policy_refusals: AtomicU64,
    pub(crate) metrics: crate::serve::admin::CaMetrics,
    /// Set by [`CaCore::publish_bundle_configmaps`], started by [`crate::serve::serve`].
    pub(crate) bundle_publisher: std::sync::Mutex<Option<crate::publish::Publisher>>,
    /// Issued serials, connected sidecars, revocations ([`crate::rotation`]).
    pub(crate) rotation: crate::rotation::RotationState,
    /// The versions of the shared documents in force here, for conditional saves.
    pub(crate) versions: std::sync::Mutex<StoreVersions>,
}

/// What version of each shared document this replica last read or saved.
#[derive(Debug, Default)]
pub(crate) struct StoreVersions {
    pub authorities: crate::store::Version,
    pub token_keys: crate::store::Version,
    pub revocations: crate::store::Version,
}

impl CaCore {
    /// Open the store, creating the CA on first start.
    pub fn open(config: CaConfig, clock: Arc<dyn Clock>) -> Result<Arc<Self>, StartError> {
        let store: Arc<dyn Store> = match &config.store {
            crate::config::StoreConfig::DataDir => Arc::new(FsStore::open(&config.data_dir)?),
            crate::config::StoreConfig::Kubernetes(k) => {
                // The audit log stays on the replica's own disk.
                std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                    StartError::Store(crate::store::StoreError::Io {
                        what: "data directory",
                        path: config.data_dir.display().to_string(),
                        source: e,
                    })
                })?;
                KubeStore::open(k)?
            }
        };
        info!(replica = %config.replica, "CA state in the {}", store.describe());
        let (authorities, authorities_version) = Authorities::load_or_init(
            store.as_ref(),
            &config.trust_domain,
            &config.source,
            config.rotation.lifetimes,
            clock.now(),
        )?;
        if !matches!(config.source, crate::config::CaSource::Generate)
            && store.load_authorities()?.value.len() > 1
        {
            warn!(
                "data directory already holds CA keys; the brought CA files only seed a new directory"
            );
        }
        let audit =
            Audit::open_with_window(&config.data_dir.join("audit.log"), config.audit_window)
                .map_err(StartError::Audit)?;
        let k8s = match &config.k8s {
            K8sConfig::Disabled => None,
            K8sConfig::TokenReview {
                api_url,
                ca_file,
                token_file,
            } => Some(K8sAttestor::TokenReview(TokenReview::new(
                api_url,
                ca_file,
                token_file.clone(),
            )?)),
            K8sConfig::Oidc { issuer, jwks_file } => Some(K8sAttestor::Oidc(OidcJwks::from_file(
                issuer.clone(),
                jwks_file,
            )?)),
        };
        let (token_keys, token_keys_version) =
            TokenKeys::load_or_init(store.as_ref(), config.token_alg, clock.now())?;
        let mut first =
            crate::rotation::bundle_of(&authorities, &token_keys, config.rotation.renew_window);
        first.sequence = 1;
        let (bundle, _) = watch::channel(first);
        let revocations = store.load_revocations()?;
        let rotation = crate::rotation::RotationState::new(
            &config.replica,
            &store.load_replicas()?,
            revocations.value,
        );
        let versions = std::sync::Mutex::new(StoreVersions {
            authorities: authorities_version,
            token_keys: token_keys_version,
            revocations: revocations.version,
        });
        let mut dir =
            match &config.policy {
                Some(path) => policy::load(path, &config.trust_domain, &config.token_issuer)
                    .map_err(|error| StartError::Policy {
                        path: path.display().to_string(),
                        error,
                    })?,
                None => Directory::new(
                    0,
                    config.trust_domain.clone(),
                    config.token_issuer.clone(),
                    Default::default(),
                ),
            };
        dir.sequence = 1;
        dir.set_revoked(rotation.revoked());
        let (directory, _) = watch::channel(Arc::new(dir));
        Ok(Arc::new(Self {
            limiter: RateLimiter::new(config.token_rate_limit),
            jwt_svid_limiter: RateLimiter::new(config.token_rate_limit),
            config,
            store,
            authorities: ArcSwap::from_pointee(authorities),
            bundle,
            audit,
            k8s,
            clock,
            token_keys: ArcSwap::from_pointee(token_keys),
            directory,
            policy_refusals: AtomicU64::new(0),
            metrics: crate::serve::admin::CaMetrics::default(),
            bundle_publisher: Default::default(),
            rotation,
            versions,
        }))
    }

    pub fn bundle(&self) -> TrustBundle {
        self.bundle.borrow().clone()
    }

    pub fn watch_bundle(&self) -> watch::Receiver<TrustBundle> {
        self.bundle.subscribe()
    }

    /// Keep the bundle ConfigMap current in Kubernetes ([`crate::publish`]) once [`serve`] runs.
    pub fn publish_bundle_configmaps(&self, publisher: crate::publish::Publisher) {
        *self
            .bundle_publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(publisher);
    }

    pub fn directory(&self) -> Arc<Directory> {
        self.directory.borrow().clone()
    }

    pub fn watch_directory(&self) -> watch::Receiver<Arc<Directory>> {
        self.directory.subscribe()
    }

    /// When the intermediate that signs new SVIDs expires.
    pub fn signing_ca_expiry(&self) -> Option<std::time::SystemTime> {
        self.authorities
            .load()
            .active()
            .ok()
            .map(|a| a.intermediate_not_after)
    }

    /// The expiries an alert watches: (metric, help, when) for the active root, intermediate
    /// and token key (whose "expiry" is when the schedule wants it replaced).
    pub fn expiries(&self) -> Vec<(&'static str, &'static str, std::time::SystemTime)> {
        let mut out = Vec::new();
        if let Ok(a) = self.authorities.load().active() {
            out.push((
                "meshid_ca_root_expiry_seconds",
                "Seconds until the active root expires.",
                a.root_not_after,
            ));
            out.push((
                "meshid_ca_intermediate_expiry_seconds",
                "Seconds until the signing intermediate expires.",
                a.intermediate_not_after,
            ));
        }
        if let Ok(k) = self.token_keys.load().active() {
            out.push((
                "meshid_ca_token_key_expiry_seconds",
                "Seconds until the active token-signing key is due for replacement (--token-key-ttl).",
                k.record().created_at + self.config.rotation.token_key_ttl,
            ));
        }
        out
    }

    /// Audit records lost to write failures.
    pub fn audit_lost(&self) -> u64 {
        self.audit.lost()
    }

    /// How many policy reloads were refused since start.
    pub fn policy_refusals(&self) -> u64 {
        self.policy_refusals.load(Ordering::Relaxed)
    }

    /// A new policy that compiled: in force from now on, streamed to every sidecar.
    pub(crate) fn apply_policy(&self, mut next: Directory) {
        self.directory.send_modify(|current| {
            next.sequence = current.sequence + 1;
            // Revocations are not policy: they stay whatever the file says.
            next.set_revoked(current.revoked().clone());
            info!(
                sequence = next.sequence,
                services = next.services().len(),
                "policy reloaded"
            );
            *current = Arc::new(next);
        });
    }

    pub(crate) fn refuse_policy(&self, error: PolicyError) {
        self.policy_refusals.fetch_add(1, Ordering::Relaxed);
        let path = self
            .config
            .policy
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        error!(policy = %path, "policy refused, the last good policy stays in force: {error}");
    }

    /// The JWT bundle: the keys JWT-SVIDs are signed with (see [`TokenKeys::jwt_bundle`]).
    pub fn jwt_bundle(&self) -> serde_json::Value {
        self.token_keys.load().jwt_bundle()
    }

    /// RFC 7517 JWK Set of the token-signing keys not retired.
    pub fn jwks(&self) -> serde_json::Value {
        self.token_keys.load().jwks()
    }

    /// RFC 8414 authorization server metadata.
    pub fn metadata(&self) -> serde_json::Value {
        let iss = &self.config.token_issuer;
        let scopes: Vec<String> = self
            .directory()
            .services()
            .values()
            .flat_map(|s| s.scopes.iter().map(|x| x.to_string()))
            .collect();
        serde_json::json!({
            "issuer": iss,
            "token_endpoint": format!("{iss}/token"),
            "jwks_uri": format!("{iss}/.well-known/jwks.json"),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["tls_client_auth"],
            "tls_client_certificate_bound_access_tokens": true,
            "response_types_supported": [],
            "scopes_supported": scopes,
        })
    }

    /// The client-credentials grant for a caller authenticated by `chain` (its SVID over
    /// mutual TLS), the one implementation behind `POST /token` and gRPC `IssueToken`.
    #[tracing::instrument(name = "token_grant", skip_all, fields(peer = ?peer))]
    pub async fn grant(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        params: TokenParams<'_>,
        peer: Option<SocketAddr>,
    ) -> Result<IssuedToken, GrantError> {
        let mut caller = None;
        let mut audience = None;
        let result = (|| {
            let (leaf, info) = self.svid_caller(
                chain,
                "mutual TLS with the client's SVID is required (tls_client_auth)",
                &mut caller,
            )?;
            if let Err(retry_after) = self.limiter.check(&info.spiffe_id, Instant::now()) {
                return Err(GrantError::RateLimited { retry_after });
            }
            match params.grant_type {
                Some("client_credentials") | None => {}
                Some("") => {
                    return Err(GrantError::InvalidRequest("grant_type is required".into()));
                }
                Some(other) => {
                    return Err(GrantError::UnsupportedGrantType(format!(
                        "grant_type {other:?} is not supported; use client_credentials"
                    )));
                }
            }
            let dir = self.directory();
            let g = grant::decide(
                &dir,
                &GrantRequest {
                    caller: &info.spiffe_id,
                    client_id: params.client_id,
                    scope: params.scope,
                    audience: params.audience,
                },
            )?;
            audience = Some(g.audience.to_string());
            let (now_s, exp) = self.token_window(info.not_after)?;
            let mut jti = [0u8; 16];
            aws_lc_rs::rand::fill(&mut jti)
                .map_err(|_| GrantError::Internal("random source failed".into()))?;
            let claims = AccessTokenClaims {
                iss: self.config.token_issuer.clone(),
                sub: info.spiffe_id.to_string(),
                client_id: g.client_id.clone(),
                aud: g.audience.to_string(),
                scope: g.scope_string(),
                iat: now_s,
                nbf: now_s,
                exp,
                jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
                // RFC 8705 §3.1: bound to the certificate that authenticated this request.
                cnf: Confirmation {
                    x5t_s256: x5t_s256(leaf),
                },
            };
            let token = self
                .token_keys
                .load()
                .mint(&claims)
                .map_err(|e| GrantError::Internal(e.to_string()))?;
            Ok((
                IssuedToken {
                    access_token: token,
                    expires_in: exp - now_s,
                    scope: claims.scope.clone(),
                },
                claims.jti,
            ))
        })();
        let mut rec = AuditRecord::new(
            "token_grant",
            if result.is_ok() { "granted" } else { "refused" },
            self.clock.now(),
        );
        rec.attestation = Some(AttestationKind::X509Svid.as_str());
        rec.peer = peer.map(|p| p.to_string());
        rec.spiffe_id = caller.map(|c| c.to_string());
        rec.audience = audience;
        rec.scope_requested = params.scope.map(str::to_owned);
        match &result {
            Ok((t, jti)) => {
                self.metrics
                    .count("meshid_ca_token_grants_total", "service");
                rec.scope_granted = Some(t.scope.clone());
                rec.jti = Some(jti.clone());
                debug!(spiffe_id = ?rec.spiffe_id, scope = %t.scope, "token granted");
                self.write_audit(rec).await;
            }
            Err(e) => {
                self.metrics
                    .count("meshid_ca_token_denials_total", e.code());
                rec.reason = Some(match e {
                    // The wait differs from one refusal to the next; the reason must not, or a
                    // flood of rate-limited requests would not aggregate.
                    GrantError::RateLimited { .. } => {
                        format!("{}: too many token requests", e.code())
                    }
                    e => format!("{}: {e}", e.code()),
                });
                self.audit.refusal(rec);
            }
        }
        result.map(|(t, _)| t)
    }

    /// When a token (or JWT-SVID) minted now for a certificate valid until `not_after` starts
    /// and ends, in Unix seconds: `--token-ttl`, never over 15 minutes, never past the
    /// certificate.
    fn token_window(&self, not_after: std::time::SystemTime) -> Result<(i64, i64), GrantError> {
        let now_s = meshid_proto::clock::unix_seconds(self.clock.now());
        let ttl = self.config.token_ttl.min(Duration::from_secs(
            meshid_proto::token::MAX_LIFETIME_SECONDS as u64,
        ));
        let exp = (now_s + ttl.as_secs() as i64).min(meshid_proto::clock::unix_seconds(not_after));
        if exp <= now_s {
            return Err(GrantError::InvalidClient(
                "client certificate has expired".into(),
            ));
        }
        Ok((now_s, exp))
    }

    /// The caller of a request authenticated by its SVID over mutual TLS (`missing`: what to
    /// say when there is none): its leaf and what the leaf says, once it is known not to be
    /// revoked. `caller` learns the SPIFFE ID either way, for the audit line.
    fn svid_caller<'c>(
        &self,
        chain: Option<&'c [CertificateDer<'static>]>,
        missing: &str,
        caller: &mut Option<SpiffeId>,
    ) -> Result<(&'c CertificateDer<'static>, svid::SvidInfo), GrantError> {
        let leaf = chain
            .and_then(|c| c.first())
            .ok_or_else(|| GrantError::InvalidClient(missing.into()))?;
        let info = svid::inspect(leaf)
            .map_err(|e| GrantError::InvalidClient(format!("client certificate: {e}")))?;
        *caller = Some(info.spiffe_id.clone());
        if let Some(why) = self.revoked(&info.spiffe_id, Some(&info.serial)) {
            return Err(GrantError::UnauthorizedClient(format!(
                "{}: {why}",
                info.spiffe_id
            )));
        }
        Ok((leaf, info))
    }

    /// A JWT-SVID for the caller (its SVID over mutual TLS) for `audiences`: `sub` is the
    /// caller's SPIFFE ID, signed by the active token-signing key, living as long as an access
    /// token would (never past the caller's certificate). Audited like a grant.
    pub async fn issue_jwt_svid(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        audiences: &[String],
        peer: Option<SocketAddr>,
    ) -> Result<(SpiffeId, Secret, i64), GrantError> {
        let mut caller = None;
        let result = (|| {
            let (_, info) = self.svid_caller(
                chain,
                "a JWT-SVID is issued to the caller's SVID over mutual TLS",
                &mut caller,
            )?;
            meshid_proto::jwt_svid::check_audiences(audiences)
                .map_err(GrantError::InvalidRequest)?;
            if let Err(retry_after) = self.jwt_svid_limiter.check(&info.spiffe_id, Instant::now()) {
                return Err(GrantError::RateLimited { retry_after });
            }
            let (now_s, exp) = self.token_window(info.not_after)?;
            let claims = JwtSvidClaims {
                sub: info.spiffe_id.to_string(),
                aud: audiences.to_vec(),
                exp,
                iat: now_s,
            };
            let keys = self.token_keys.load();
            let token = keys
                .mint_jwt_svid(&claims)
                .map_err(|e| GrantError::Internal(e.to_string()))?
                .ok_or_else(|| {
                    // SPIFFE JWT-SVID §3 names RS*, ES* and PS*: SPIFFE libraries refuse EdDSA.
                    GrantError::UnsupportedAlgorithm(
                        "the active token-signing key is EdDSA, which the SPIFFE JWT-SVID profile does not allow; \
                         JWT-SVIDs need a CA started with --token-alg ES256"
                            .into(),
                    )
                })?;
            Ok((info.spiffe_id, token, exp))
        })();
        let mut rec = AuditRecord::new(
            "jwt_svid_issue",
            if result.is_ok() { "issued" } else { "refused" },
            self.clock.now(),
        );
        rec.attestation = Some(AttestationKind::X509Svid.as_str());
        rec.peer = peer.map(|p| p.to_string());
        rec.spiffe_id = caller.map(|c| c.to_string());
        rec.audience = Some(audiences.join(" ")).filter(|a| !a.is_empty() && a.len() <= 4096);
        match &result {
            Ok((_, _, exp)) => {
                self.metrics.count("meshid_ca_jwt_svids_total", "issued");
                rec.expires_at = std::time::UNIX_EPOCH
                    .checked_add(Duration::from_secs((*exp).max(0) as u64))
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string());
                self.write_audit(rec).await;
            }
            Err(e) => {
                self.metrics.count("meshid_ca_jwt_svids_total", e.code());
                rec.reason = Some(match e {
                    GrantError::RateLimited { .. } => {
                        format!("{}: too many requests", e.code())
                    }
                    e => format!("{}: {e}", e.code()),
                });
                self.audit.refusal(rec);
            }
        }
        result
    }

    /// Audit a token request a front end refused before it could be decided (a malformed
    /// form), so every refusal is accounted for (aggregated, see [`Audit::refusal`]).
    pub async fn refuse_token_request(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        err: &GrantError,
        peer: Option<SocketAddr>,
    ) {
        let mut rec = AuditRecord::new("token_grant", "refused", self.clock.now());
        rec.attestation = Some(AttestationKind::X509Svid.as_str());
        rec.peer = peer.map(|p| p.to_string());
        rec.spiffe_id = chain
            .and_then(|c| c.first())
            .and_then(|leaf| svid::spiffe_id_of(leaf).ok())
            .map(|id| id.to_string());
        rec.reason = Some(format!("{}: {err}", err.code()));
        self.metrics
            .count("meshid_ca_token_denials_total", err.code());
        self.audit.refusal(rec);
    }

    /// One audit line for an issuance or a grant, written (to the kernel) before the caller's
    /// reply leaves. Refusals go to [`Audit::refusal`] instead: aggregated, never waited for.
    pub(crate) async fn write_audit(&self, rec: AuditRecord) {
        let audit = self.audit.clone();
        let written = tokio::task::spawn_blocking(move || audit.write(&rec)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(
                "audit log write failed, the record is lost (meshid_ca_audit_write_failures_total): {e}"
            ),
            Err(e) => error!("audit log write task failed: {e}"),
        }
    }

    /// First issuance: attest, then sign for the attested ID.
    #[tracing::instrument(name = "x509_svid_issue", skip_all, fields(peer = ?peer))]
    pub async fn issue(
        &self,
        proof: Option<Proof>,
        csr: &[u8],
        peer: Option<SocketAddr>,
    ) -> Result<IssuedSvid, CaError> {
        let kind = match &proof {
            Some(Proof::JoinToken(_)) => Some(AttestationKind::JoinToken),
            Some(Proof::K8sToken(_)) => Some(AttestationKind::K8sServiceAccount),
            None => None,
        };
        let result = async {
            let key = issue::parse_csr(csr)?;
            let attested = self.attest(proof).await?;
            if let Some(why) = self.revoked(&attested.spiffe_id, None) {
                return Err(CaError::PermissionDenied(format!(
                    "{}: {why} (meshid ca unrevoke)",
                    attested.spiffe_id
                )));
            }
            self.sign(&attested, &key)
        }
        .await;
        self.record("x509_svid_issue", kind, peer, &result).await;
        result
    }

    /// Renewal: the caller's current SVID (already chain-verified by the TLS layer) names it.
    #[tracing::instrument(name = "x509_svid_renew", skip_all, fields(peer = ?peer))]
    pub async fn renew(
        &self,
        peer_chain: Option<&[CertificateDer<'static>]>,
        csr: &[u8],
        peer: Option<SocketAddr>,
    ) -> Result<IssuedSvid, CaError> {
        let result = async {
            let leaf = peer_chain.and_then(|c| c.first()).ok_or_else(|| {
                CaError::Unauthenticated(
                    "renewal needs the current SVID as TLS client certificate".into(),
                )
            })?;
            let id = svid::spiffe_id_of(leaf)
                .map_err(|e| CaError::Unauthenticated(format!("client certificate: {e}")))?;
            if id.trust_domain() != &self.config.trust_domain
                || id == self.config.trust_domain.ca_id()
            {
                return Err(CaError::PermissionDenied(format!(
                    "{id} cannot be renewed by this CA"
                )));
            }
            let presented = svid::inspect(leaf)
                .map_err(|e| CaError::Unauthenticated(format!("client certificate: {e}")))?;
            if let Some(why) = self.revoked(&id, Some(&presented.serial)) {
                return Err(CaError::PermissionDenied(format!(
                    "{id}: {why}; it cannot be renewed"
                )));
            }
            let key = issue::parse_csr(csr)?;
            let svid = self.sign(
                &Attested {
                    spiffe_id: id,
                    kind: AttestationKind::X509Svid,
                },
                &key,
            )?;
            // The holder moves to the new SVID: the presented one no longer holds a rotation.
            self.note_renewed(&presented.serial);
            Ok(svid)
        }
        .await;
        self.record(
            "x509_svid_renew",
            Some(AttestationKind::X509Svid),
            peer,
            &result,
        )
        .await;
        result
    }

    async fn attest(&self, proof: Option<Proof>) -> Result<Attested, CaError> {
        let attested = match proof {
            None => return Err(AttestError::Missing.into()),
            Some(Proof::JoinToken(token)) => {
                let store = self.store.clone();
                let now = self.clock.now();
                // The trust-domain check runs inside, before a single-use token is spent.
                let td = self.config.trust_domain.clone();
                tokio::task::spawn_blocking(move || {
                    attest::join_token::attest(store.as_ref(), &token, &td, now)
                })
                .await
                .map_err(|e| CaError::Internal(format!("attestation task: {e}")))?
                .map_err(|e| match e {
                    attest::join_token::JoinTokenError::Attest(e) => CaError::Attest(e),
                    attest::join_token::JoinTokenError::Refused(e) => {
                        CaError::PermissionDenied(e.to_string())
                    }
                })?
            }
            Some(Proof::K8sToken(token)) => {
                let k8s = self.k8s.as_ref().ok_or(AttestError::K8sDisabled)?;
                k8s.attest(&self.config.trust_domain, &token).await?
            }
        };
        let id = &attested.spiffe_id;
        if id.trust_domain() != &self.config.trust_domain {
            return Err(CaError::PermissionDenied(format!(
                "attested ID {id} is outside trust domain {}",
                self.config.trust_domain
            )));
        }
        if *id == self.config.trust_domain.ca_id() {
            return Err(CaError::PermissionDenied(format!(
                "{id} is reserved for the CA"
            )));
        }
        Ok(attested)
    }

    fn sign(&self, attested: &Attested, key: &issue::CsrKey) -> Result<IssuedSvid, CaError> {
        let authorities = self.authorities.load();
        let active = authorities
            .active()
            .map_err(|e| CaError::Internal(e.to_string()))?;
        let svid = issue::sign_x509_svid(
            active,
            X509SvidParams {
                spiffe_id: &attested.spiffe_id,
                key,
                ttl: self.config.svid_ttl,
                now: self.clock.now(),
                dns_names: &[],
                ip_addresses: &[],
            },
        )
        .inspect_err(|e| {
            if matches!(e, IssueError::AuthorityExpiring { .. }) {
                self.warn_expiry();
            }
        })?;
        self.note_issued(&active.id, &svid);
        Ok(svid)
    }

    /// Audit an issuance or renewal: an issued SVID's line is written before the reply leaves;
    /// a refusal is aggregated ([`Audit::refusal`]) and never waited for.
    async fn record(
        &self,
        event: &'static str,
        kind: Option<AttestationKind>,
        peer: Option<SocketAddr>,
        result: &Result<IssuedSvid, CaError>,
    ) {
        let now = self.clock.now();
        let mut rec = AuditRecord::new(
            event,
            if result.is_ok() { "issued" } else { "refused" },
            now,
        );
        rec.attestation = kind.map(AttestationKind::as_str);
        rec.peer = peer.map(|p| p.to_string());
        match result {
            Ok(svid) => {
                self.metrics.count(
                    "meshid_ca_svid_issued_total",
                    kind.map(AttestationKind::as_str).unwrap_or("none"),
                );
                rec.spiffe_id = Some(svid.spiffe_id.to_string());
                rec.serial = Some(svid.serial.clone());
                rec.expires_at =
                    Some(humantime::format_rfc3339_seconds(svid.not_after).to_string());
                info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, event, "issued");
                self.write_audit(rec).await;
            }
            Err(e) => {
                self.metrics.count("meshid_ca_svid_refused_total", e.code());
                rec.reason = Some(e.to_string());
                // The audit logs the refusal at WARN, the first of a window only.
                self.audit.refusal(rec);
            }
        }
    }
}
