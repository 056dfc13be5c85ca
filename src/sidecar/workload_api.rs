//! The SPIFFE Workload API on a unix socket (`--workload-api-socket`), for apps that do their
//! own mutual TLS or want a JWT-SVID: go-spiffe, rust-spiffe, java-spiffe, py-spiffe and
//! spiffe-helper reach it through `SPIFFE_ENDPOINT_SOCKET=unix://PATH`.
//!
//! What the app gets is the pod's one identity, the sidecar's own: its X.509-SVID with the
//! private key (handed over on this socket and nowhere else), the trust bundle in force, and
//! JWT-SVIDs the CA mints for the sidecar's identity. The streams send the full state at once
//! and again on every renewal, every bundle change (a CA rotation) and every change of the
//! token-signing keys (the JWT bundle).
//!
//! As the SPIFFE Workload Endpoint spec says, every call must carry the metadata
//! `workload.spiffe.io: true` (else InvalidArgument), so a browser or an SSRF-able HTTP client
//! in the pod cannot be made to call it. Who may call is the socket file's mode, and, with
//! `--workload-api-allowed-uids`, the caller's UID as the kernel reports it (`SO_PEERCRED`):
//! others get PermissionDenied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshid_proto::jwks::JwksCache;
use meshid_proto::serve::{ConnInfo, Limits, Server};
use meshid_proto::verify::TrustSource;
use meshid_proto::workload::{self as pb, spiffe_workload_api_server as api};
use meshid_proto::{Secret, TrustDomain, pb as ca_pb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::control::{CaJwtBundle, ControlChannel};
use super::identity::Identity;
use super::metrics::Metrics;
use crate::identity::backoff::Backoff;

/// The metadata every Workload API call must carry (SPIFFE Workload Endpoint §4).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// An app, its init steps and a helper or two: never a crowd.
const MAX_CONNECTIONS: usize = 128;
/// Requests are tiny (a few audiences, one token).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest wait of a first `FetchJWTBundles` for the JWT bundle.
const JWT_BUNDLE_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for another caller's request to the CA for the same audiences.
const MINT_WAIT: Duration = Duration::from_secs(5);
/// Whether the CA answered `status` itself, deciding (rather than being away or slow: a
/// request timeout is `Cancelled` in tonic).
fn refuses(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
    )
}
/// While the CA cannot mint one, a cached JWT-SVID is handed out if it has this long left.
const OUTAGE_MARGIN_SECONDS: i64 = 5;
/// JWT-SVIDs kept for reuse, by audience set.
const MAX_CACHED_JWT_SVIDS: usize = 1024;

/// Where the socket is and who may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadApiConfig {
    pub socket: PathBuf,
    /// Empty: any process that can open the socket file.
    pub allowed_uids: Vec<u32>,
    /// The socket file's permission bits.
    pub socket_mode: u32,
}

/// Why the socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{path}: another process is serving on this socket")]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether `config.socket` can be taken: its directory exists or can be made, and what is at
/// the path is nothing, or a socket nobody answers on (left by a previous run). Checked at
/// start-up, before attestation; [`bind`] checks again when it binds.
pub fn check(config: &WorkloadApiConfig) -> Result<(), BindError> {
    use std::os::unix::fs::FileTypeExt;
    let path = &config.socket;
    let io = |source| BindError::Io {
        path: path.clone(),
        source,
    };
    let (private, staged) = staging(path)?;
    // sun_path holds 108 bytes with the closing NUL, for the final and the staged name.
    let longest = path.as_os_str().len().max(staged.as_os_str().len());
    if longest > 107 {
        return Err(io(std::io::Error::other(format!(
            "too long for a unix socket: {} bytes, and {longest} while it is made (at most 107)",
            path.as_os_str().len()
        ))));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // The directory must take the staging directory (and so the socket).
    std::fs::create_dir(&private)
        .and_then(|()| std::fs::remove_dir(&private))
        .map_err(io)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse { path: path.clone() });
            }
            Ok(())
        }
        Ok(_) => Err(BindError::NotASocket { path: path.clone() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// A private directory beside `path` (a new random name) and the socket's name in it.
fn staging(path: &Path) -> Result<(PathBuf, PathBuf), BindError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut nonce = [0u8; 4];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| BindError::Io {
        path: path.to_owned(),
        source: std::io::Error::other("random source failed"),
    })?;
    let private = dir.join(format!(".m{:08x}", u32::from_le_bytes(nonce)));
    let staged = private.join("s");
    Ok((private, staged))
}

/// Open the socket. It is bound and given its mode in a directory of its own (0700: nobody
/// can connect, or swap a symlink in, before the mode is set), then renamed to its path, which
/// atomically replaces a socket left by a previous run; there is no moment without a socket
/// and no unlink to race.
pub fn bind(config: &WorkloadApiConfig) -> Result<tokio::net::UnixListener, BindError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    check(config)?;
    let path = &config.socket;
    let io = |source| BindError::Io {
        path: path.clone(),
        source,
    };
    let (private, staged) = staging(path)?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io)?;
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(config.socket_mode))?;
        std::fs::rename(&staged, path)?;
        listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound.map_err(io)
}

/// A JWT-SVID kept for reuse.
struct CachedJwt {
    spiffe_id: String,
    token: Secret,
    iat: i64,
    exp: i64,
}

/// The Workload API's state; cheap to clone into the streams.
#[derive(Clone)]
pub struct WorkloadApi(Arc<Inner>);

struct Inner {
    identity: Arc<Identity>,
    trust: Arc<TrustSource>,
    /// The JWT bundle: the keys of JWT-SVIDs (others than the access tokens').
    jwt_keys: Arc<JwksCache>,
    channel: Arc<ControlChannel>,
    trust_domain: TrustDomain,
    allowed_uids: Vec<u32>,
    jwt_svids: Mutex<HashMap<Vec<String>, CachedJwt>>,
    /// One JWT-SVID request to the CA at a time per audience set: callers that miss the cache
    /// together wait for it (a while at most) and find what it brought.
    minting: Mutex<HashMap<Vec<String>, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl WorkloadApi {
    /// The API for `identity`. `access_keys` are the CA's token keys as the inbound checks
    /// follow them: when they change, the JWT bundle is fetched again.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identity: Arc<Identity>,
        trust: Arc<TrustSource>,
        access_keys: Arc<JwksCache>,
        channel: Arc<ControlChannel>,
        trust_domain: TrustDomain,
        allowed_uids: Vec<u32>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let jwt_keys = Arc::new(JwksCache::new(Arc::new(CaJwtBundle(channel.clone()))));
        tokio::spawn(follow_jwt_bundle(
            access_keys,
            jwt_keys.clone(),
            shutdown.clone(),
        ));
        Self(Arc::new(Inner {
            identity,
            trust,
            jwt_keys,
            channel,
            trust_domain,
            allowed_uids,
            jwt_svids: Mutex::new(HashMap::new()),
            minting: Mutex::new(HashMap::new()),
            metrics,
            shutdown,
        }))
    }
}

/// Keep the JWT bundle current: fetched at start, and again whenever the CA's token keys
/// change (a rotation step prepares, activates or retires one, and its JWT-SVID key with it).
async fn follow_jwt_bundle(
    access_keys: Arc<JwksCache>,
    jwt_keys: Arc<JwksCache>,
    shutdown: CancellationToken,
) {
    let mut changes = access_keys.subscribe();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let retry = match jwt_keys.prime().await {
            // No key (a CA with EdDSA token keys signs no JWT-SVID): as it stands until the
            // token keys change.
            Ok(()) | Err(meshid_proto::jwks::JwksError::NoKeys) => {
                backoff.reset();
                None
            }
            Err(e) => {
                let wait = backoff.next_delay();
                debug!("fetching the JWT bundle, again in {wait:?}: {e}");
                Some(wait)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed(), if retry.is_none() => if changed.is_err() { return },
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
        }
    }
}

/// Connections at once from processes whose UID `--workload-api-allowed-uids` does not name:
/// enough to be told PermissionDenied, never enough to take the slots of the app.
const STRANGER_CONNECTIONS: usize = 4;
/// HTTP/2 streams at once per connection (the app's streams and a few calls).
const MAX_STREAMS: u32 = 16;

/// A connection's service, holding the connection's slot in a quota while it lives.
#[derive(Clone)]
struct Held<S> {
    inner: S,
    _slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl<S: hyper::service::Service<R>, R> hyper::service::Service<R> for Held<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.inner.call(request)
    }
}

/// Serve the Workload API on `listener` until `shutdown`, then remove the socket file.
pub async fn serve(
    api: WorkloadApi,
    listener: tokio::net::UnixListener,
    config: WorkloadApiConfig,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let limits = Limits {
        max_connections: limits.max_connections.min(MAX_CONNECTIONS),
        ..limits
    };
    let allowed_uids = config.allowed_uids.clone();
    let strangers = Arc::new(tokio::sync::Semaphore::new(STRANGER_CONNECTIONS));
    let service =
        api::SpiffeWorkloadApiServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(service).prepare();
    let service = hyper_util::service::TowerToHyperService::new(routes);
    let server = Server::unix("workload-api", listener, limits)
        .max_concurrent_streams(MAX_STREAMS)
        .conn_info_in_requests();
    metrics.listeners.register(&server);
    let socket = config.socket;
    info!(endpoint = %endpoint(&socket), "SPIFFE Workload API serving (SPIFFE_ENDPOINT_SOCKET)");
    let admit = move |info: &ConnInfo| {
        let allowed = allowed_uids.is_empty()
            || info
                .peer_cred
                .is_some_and(|c| allowed_uids.contains(&c.uid));
        let slot = if allowed {
            None
        } else {
            let Ok(permit) = strangers.clone().try_acquire_owned() else {
                debug!(uid = ?info.peer_cred.map(|c| c.uid), "Workload API: a UID not allowed is over its connection quota; closed");
                return None;
            };
            Some(Arc::new(permit))
        };
        Some(Held {
            inner: service.clone(),
            _slot: slot,
        })
    };
    server.serve(admit, shutdown).await;
    let _ = std::fs::remove_file(&socket);
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The trust domain as the Workload API keys bundles: its SPIFFE ID.
fn td_id(td: &TrustDomain) -> String {
    format!("spiffe://{td}")
}

fn concat_der<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    certs.into_iter().flatten().copied().collect()
}

impl Inner {
    /// Every call: the security header, then the caller's UID when the flag names some.
    fn admit<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        let refused = |status: Status, outcome: &'static str| {
            self.count(rpc, outcome);
            debug!(rpc, "Workload API call refused: {}", status.message());
            Err(status)
        };
        let header = request.metadata().get(SECURITY_HEADER);
        if header.and_then(|v| v.to_str().ok()) != Some("true") {
            return refused(
                Status::invalid_argument(format!(
                    "security header missing from request: {SECURITY_HEADER}: true"
                )),
                "invalid_argument",
            );
        }
        if !self.allowed_uids.is_empty() {
            let cred = request
                .extensions()
                .get::<ConnInfo>()
                .and_then(|c| c.peer_cred);
            match cred {
                Some(c) if self.allowed_uids.contains(&c.uid) => {}
                Some(c) => {
                    return refused(
                        Status::permission_denied(format!(
                            "uid {} may not use this Workload API (--workload-api-allowed-uids)",
                            c.uid
                        )),
                        "permission_denied",
                    );
                }
                None => {
                    return refused(
                        Status::permission_denied(
                            "the caller's credentials are unknown; --workload-api-allowed-uids admits none",
                        ),
                        "permission_denied",
                    );
                }
            }
        }
        Ok(())
    }

    fn count(&self, rpc: &'static str, outcome: &'static str) {
        *self
            .metrics
            .workload_api
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((rpc, outcome))
            .or_default() += 1;
    }

    fn bundle_der(&self) -> Vec<u8> {
        let trust = self.trust.current();
        concat_der(trust.bundle.roots.iter().map(|r| r.as_ref()))
    }

    /// The SVID in use and the bundle in force, as `FetchX509SVID` sends them.
    fn x509_svid(&self) -> Result<pb::X509svidResponse, Status> {
        use rustls_pki_types::pem::PemObject;
        let current = self.identity.current();
        let svid = &current.svid;
        let key =
            rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(svid.key_pem.expose().as_bytes())
                .map_err(|_| Status::internal("the SVID's private key is not PKCS#8"))?;
        Ok(pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: svid.spiffe_id.to_string(),
                x509_svid: concat_der(svid.chain.iter().map(|c| c.as_ref())),
                x509_svid_key: key.secret_pkcs8_der().to_vec(),
                bundle: self.bundle_der(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        })
    }

    fn x509_bundles(&self) -> pb::X509BundlesResponse {
        pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: HashMap::from([(td_id(&self.trust_domain), self.bundle_der())]),
        }
    }

    /// The JWT bundle as the CA publishes it (its JWT-SVID keys, `use: jwt-svid`). `None`
    /// until it is known.
    fn jwt_bundles(&self) -> Option<pb::JwtBundlesResponse> {
        if !self.jwt_keys.has_keys() {
            return None;
        }
        let jwks = serde_json::to_vec(self.jwt_keys.keys().as_ref()).ok()?;
        Some(pb::JwtBundlesResponse {
            bundles: HashMap::from([(td_id(&self.trust_domain), jwks)]),
        })
    }

    /// One new JWT-SVID from the CA.
    async fn mint(&self, audiences: &[String]) -> Result<ca_pb::JwtSvidResponse, Status> {
        let (mut client, x5t) = self
            .channel
            .client()
            .await
            .map_err(|e| Status::unavailable(format!("the CA cannot be reached: {e}")))?;
        let answer = client
            .issue_jwt_svid(ca_pb::IssueJwtSvidRequest {
                audience: audiences.to_vec(),
            })
            .await;
        match answer {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => {
                // A broken or stalled connection: the next call connects anew.
                if !refuses(&s) {
                    self.channel.reset(&x5t).await;
                }
                Err(Status::new(
                    s.code(),
                    format!("the CA refused a JWT-SVID: {}", s.message()),
                ))
            }
        }
    }

    /// A JWT-SVID for `audiences` (sorted, deduplicated): a cached one while more than half of
    /// its life is left, else a new one from the CA; while the CA cannot give one, a cached one
    /// that is still valid.
    async fn jwt_svid(&self, audiences: Vec<String>) -> Result<pb::Jwtsvid, Status> {
        let spiffe_id = self.identity.current().svid.spiffe_id.to_string();
        // The cached one for these audiences: `fresh`, more than half of its life left; else
        // at least OUTAGE_MARGIN_SECONDS. The clock is read at each look (a look after a wait
        // must not find valid what expired meanwhile).
        let cached = |fresh: bool| {
            let now = meshid_proto::clock::unix_seconds(SystemTime::now());
            let cache = self.jwt_svids.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(&audiences)
                .filter(|c| c.spiffe_id == spiffe_id)
                .filter(|c| {
                    if fresh {
                        now < c.iat + (c.exp - c.iat) / 2
                    } else {
                        now + OUTAGE_MARGIN_SECONDS <= c.exp
                    }
                })
                .map(|c| pb::Jwtsvid {
                    spiffe_id: spiffe_id.clone(),
                    svid: c.token.expose().to_owned(),
                    hint: String::new(),
                })
        };
        if let Some(svid) = cached(true) {
            return Ok(svid);
        }
        let flight = {
            let mut flights = self.minting.lock().unwrap_or_else(|p| p.into_inner());
            flights.retain(|_, f| Arc::strong_count(f) > 1);
            flights.entry(audiences.clone()).or_default().clone()
        };
        let Ok(_one) = tokio::time::timeout(MINT_WAIT, flight.lock_owned()).await else {
            return cached(false).ok_or_else(|| {
                Status::unavailable("the CA is slow to give a JWT-SVID; try again")
            });
        };
        if let Some(svid) = cached(true) {
            return Ok(svid); // brought by the request this one waited for
        }
        let minted = match self.mint(&audiences).await {
            Ok(m) => m,
            // The CA refuses (a revoked identity, a bad request, EdDSA keys): its answer.
            Err(status) if refuses(&status) => return Err(status),
            // The CA away, slow or busy: one still valid for a while does (as SPIRE's agent
            // serves from its cache).
            Err(status) => return cached(false).ok_or(status),
        };
        let now = meshid_proto::clock::unix_seconds(SystemTime::now());
        let mut cache = self.jwt_svids.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_JWT_SVIDS {
            cache.retain(|_, c| c.exp > now);
            if cache.len() >= MAX_CACHED_JWT_SVIDS {
                cache.clear();
            }
        }
        cache.insert(
            audiences,
            CachedJwt {
                spiffe_id: minted.spiffe_id.clone(),
                token: Secret::new(minted.token.clone()),
                iat: now,
                exp: minted.expires_at,
            },
        );
        Ok(pb::Jwtsvid {
            spiffe_id: minted.spiffe_id,
            svid: minted.token,
            hint: String::new(),
        })
    }
}

/// Ticks on every change of what a stream follows.
type Changes = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// The changes of one watch channel (not its current value).
fn changes<T: Clone + Send + Sync + 'static>(rx: tokio::sync::watch::Receiver<T>) -> Changes {
    Box::pin(WatchStream::from_changes(rx).map(|_| ()))
}

/// A stream that sends `state()` now and again whenever it differs from what was sent last,
/// looking again on each tick of `changed`. It ends when the client goes away, when the sidecar
/// stops, or with `state`'s error.
fn follow<T, F>(inner: Arc<Inner>, state: F, mut changed: Changes) -> Streamed<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&Inner) -> Result<Option<T>, Status> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut last: Option<T> = None;
        loop {
            let next = match state(&inner) {
                Err(status) => Some(Err(status)),
                Ok(Some(now)) if last.as_ref() != Some(&now) => Some(Ok(now)),
                Ok(_) => None,
            };
            if let Some(next) = next {
                // Room on the stream first, so that a client that never reads cannot hold this
                // task past its leaving or the sidecar's stopping.
                let slot = tokio::select! {
                    slot = tx.reserve() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                    _ = inner.shutdown.cancelled() => return,
                };
                let failed = next.is_err();
                if let Ok(now) = &next {
                    last = Some(now.clone());
                }
                slot.send(next);
                if failed {
                    return;
                }
            }
            tokio::select! {
                tick = changed.next() => if tick.is_none() { return },
                _ = tx.closed() => return,
                _ = inner.shutdown.cancelled() => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// `serde_json` to `google.protobuf.Value`.
fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

#[tonic::async_trait]
impl api::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Streamed<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.0.admit(&request, "FetchX509SVID")?;
        self.0.count("FetchX509SVID", "ok");
        // A renewal (a new SVID) or a new bundle (a rotation step).
        let changed = changes(self.0.identity.watch()).merge(changes(self.0.trust.subscribe()));
        Ok(Response::new(follow(
            self.0.clone(),
            |inner| inner.x509_svid().map(Some),
            Box::pin(changed),
        )))
    }

    type FetchX509BundlesStream = Streamed<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.0.admit(&request, "FetchX509Bundles")?;
        self.0.count("FetchX509Bundles", "ok");
        Ok(Response::new(follow(
            self.0.clone(),
            |inner| Ok(Some(inner.x509_bundles())),
            changes(self.0.trust.subscribe()),
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const RPC: &str = "FetchJWTSVID";
        self.0.admit(&request, RPC)?;
        let req = request.into_inner();
        let refuse = |status: Status, outcome| {
            self.0.count(RPC, outcome);
            Err(status)
        };
        let mut audiences = req.audience;
        audiences.sort();
        audiences.dedup();
        if let Err(e) = meshid_proto::jwt_svid::check_audiences(&audiences) {
            return refuse(
                Status::invalid_argument(format!("audience: {e}")),
                "invalid_argument",
            );
        }
        let mine = self.0.identity.current().svid.spiffe_id.to_string();
        if !req.spiffe_id.is_empty() && req.spiffe_id != mine {
            if meshid_proto::SpiffeId::parse(&req.spiffe_id).is_err() {
                return refuse(
                    Status::invalid_argument(format!(
                        "spiffe_id {:?} is not a SPIFFE ID",
                        req.spiffe_id
                    )),
                    "invalid_argument",
                );
            }
            return refuse(
                Status::permission_denied(format!(
                    "this workload is {mine}; it is not entitled to {}",
                    req.spiffe_id
                )),
                "permission_denied",
            );
        }
        match self.0.jwt_svid(audiences).await {
            Ok(svid) => {
                self.0.count(RPC, "ok");
                Ok(Response::new(pb::JwtsvidResponse { svids: vec![svid] }))
            }
            Err(s) => refuse(s, "ca_error"),
        }
    }

    type FetchJWTBundlesStream = Streamed<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.0.admit(&request, "FetchJWTBundles")?;
        if !self.0.jwt_keys.has_keys() {
            // Not known yet (the sidecar has just started): wait a while for the follower to
            // bring it, then say so, so the client retries rather than waits.
            let mut changes = self.0.jwt_keys.subscribe();
            let arrived = tokio::time::timeout(JWT_BUNDLE_WAIT, async {
                while !self.0.jwt_keys.has_keys() {
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if arrived.is_err() || !self.0.jwt_keys.has_keys() {
                self.0.count("FetchJWTBundles", "unavailable");
                return Err(Status::unavailable(
                    "the JWT bundle is not known yet (the CA has not given it; a CA with EdDSA token keys has none)",
                ));
            }
        }
        self.0.count("FetchJWTBundles", "ok");
        Ok(Response::new(follow(
            self.0.clone(),
            |inner| Ok(inner.jwt_bundles()),
            changes(self.0.jwt_keys.subscribe()),
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        const RPC: &str = "ValidateJWTSVID";
        self.0.admit(&request, RPC)?;
        let req = request.into_inner();
        let refuse = |message: String| {
            self.0.count(RPC, "invalid_argument");
            Err(Status::invalid_argument(message))
        };
        if req.audience.is_empty() {
            return refuse("audience must be specified".into());
        }
        if req.svid.is_empty() {
            return refuse("svid must be specified".into());
        }
        match meshid_proto::jwt_svid::validate(
            &req.svid,
            &req.audience,
            &self.0.jwt_keys,
            &self.0.trust_domain,
            SystemTime::now(),
        )
        .await
        {
            Ok(v) => {
                self.0.count(RPC, "ok");
                Ok(Response::new(pb::ValidateJwtsvidResponse {
                    spiffe_id: v.spiffe_id.to_string(),
                    claims: Some(to_struct(v.claims)),
                }))
            }
            Err(e) => refuse(format!("the JWT-SVID is not valid: {e}")),
        }
    }
}

/// The socket path as `SPIFFE_ENDPOINT_SOCKET` names it.
pub fn endpoint(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(socket: PathBuf) -> WorkloadApiConfig {
        WorkloadApiConfig {
            socket,
            allowed_uids: Vec::new(),
            socket_mode: 0o660,
        }
    }

    #[tokio::test]
    async fn a_socket_is_staged_privately_renamed_into_place_and_never_taken_from_a_live_one() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let c = config(tmp.path().join("run/agent.sock"));
        let listener = bind(&c).unwrap();
        let mode = std::fs::metadata(&c.socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let beside: Vec<_> = std::fs::read_dir(tmp.path().join("run")).unwrap().collect();
        assert_eq!(beside.len(), 1, "no staging directory is left");
        // Live: refused, before and at binding.
        assert!(matches!(check(&c), Err(BindError::InUse { .. })));
        assert!(matches!(bind(&c), Err(BindError::InUse { .. })));
        // Left by a stopped process: taken over.
        drop(listener);
        assert!(check(&c).is_ok());
        let _again = bind(&c).unwrap();
        // Not a socket: never replaced.
        let file = config(tmp.path().join("run/file"));
        std::fs::write(&file.socket, b"x").unwrap();
        assert!(matches!(check(&file), Err(BindError::NotASocket { .. })));
        assert_eq!(std::fs::read(&file.socket).unwrap(), b"x");
    }

    #[test]
    fn a_ca_that_is_away_or_stalled_is_told_apart_from_one_that_refuses() {
        use tonic::Code;
        // tonic reports its request timeout as Cancelled: a stalled CA, not a refusal.
        for away in [
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Unknown,
            Code::Internal,
        ] {
            assert!(!refuses(&Status::new(away, "")), "{away:?}");
        }
        for refusal in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::FailedPrecondition,
        ] {
            assert!(refuses(&Status::new(refusal, "")), "{refusal:?}");
        }
    }

    #[test]
    fn a_path_too_long_for_a_unix_socket_is_refused_at_the_check() {
        let tmp = tempfile::tempdir().unwrap();
        let len = tmp.path().as_os_str().len();
        // The name itself too long.
        let c = config(tmp.path().join("a".repeat(110 - len)));
        let e = check(&c).unwrap_err().to_string();
        assert!(e.contains("too long for a unix socket"), "{e}");
        // A name that fits, in a directory too long for the staging name (12 bytes more).
        let dir = tmp.path().join("d".repeat(99 - len));
        let c = config(dir.join("s.sock"));
        assert!(c.socket.as_os_str().len() <= 107);
        let e = check(&c).unwrap_err().to_string();
        assert!(e.contains("while it is made"), "{e}");
    }
}
