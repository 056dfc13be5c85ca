//! What the sidecar learns from the CA besides its SVID, over gRPC watch streams that
//! reconnect with backoff: the trust bundle (several roots during a rotation) and the service
//! directory (names, SPIFFE IDs, route rules, allowed callers). Also the JWKS source for the
//! inbound token verifier.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meshid_proto::TrustBundle;
use meshid_proto::bundle::cert_sha256;
use meshid_proto::directory::Directory;
use meshid_proto::pb::{self, ca_client::CaClient as PbClient};
use meshid_proto::token::JwksSource;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::identity::backoff::Backoff;
use crate::identity::client::CaClient;

/// The latest directory, if one arrived yet, and what else readiness waits for.
pub struct Control {
    pub directory: ArcSwapOption<Directory>,
    pub has_bundle: AtomicBool,
    /// The inbound token verifier holds the issuer's JWKS.
    pub has_jwks: AtomicBool,
    /// Ticks on every new directory.
    directory_changed: tokio::sync::watch::Sender<u64>,
    /// The latest trust bundle from the CA, with its rotation hints.
    bundle: tokio::sync::watch::Sender<Option<Arc<TrustBundle>>>,
    /// Held while the trust in force is replaced (the CA's bundle, or roots from the
    /// `--ca-bundle` file): one update at a time, none lost.
    trust_update: std::sync::Mutex<()>,
    /// Roots a bundle from the CA took away (retired): a stale `--ca-bundle` file (a kubelet
    /// cache behind the CA) never brings them back.
    removed_roots: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    /// Watch streams to the CA (bundle, directory) that failed or ended and were reopened.
    pub stream_breaks: std::sync::atomic::AtomicU64,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            directory: ArcSwapOption::empty(),
            has_bundle: AtomicBool::new(false),
            has_jwks: AtomicBool::new(false),
            directory_changed: tokio::sync::watch::channel(0).0,
            bundle: tokio::sync::watch::channel(None).0,
            trust_update: Default::default(),
            removed_roots: Default::default(),
            stream_breaks: Default::default(),
        }
    }
}

impl Control {
    pub fn watch_directory(&self) -> tokio::sync::watch::Receiver<u64> {
        self.directory_changed.subscribe()
    }

    /// The trust bundle from the CA: the latest now, and each new one (a rotation step).
    pub fn watch_bundle(&self) -> tokio::sync::watch::Receiver<Option<Arc<TrustBundle>>> {
        self.bundle.subscribe()
    }

    /// Make `bundle` (from the CA) the trust in force, remembering the roots it takes away.
    fn apply_ca_bundle(
        &self,
        trust: &meshid_proto::verify::TrustSource,
        bundle: TrustBundle,
    ) -> Result<(), String> {
        let _one = self.trust_update.lock().unwrap_or_else(|p| p.into_inner());
        let before: Vec<[u8; 32]> = trust
            .current()
            .bundle
            .roots
            .iter()
            .map(|r| cert_sha256(r))
            .collect();
        let after: std::collections::HashSet<[u8; 32]> =
            bundle.roots.iter().map(|r| cert_sha256(r)).collect();
        trust.update(bundle).map_err(|e| e.to_string())?;
        let mut removed = self.removed_roots.lock().unwrap_or_else(|p| p.into_inner());
        removed.extend(before.into_iter().filter(|r| !after.contains(r)));
        removed.retain(|r| !after.contains(r));
        Ok(())
    }

    /// Add the roots of `file` that the trust in force lacks and no CA bundle took away.
    /// Returns how many were added.
    fn add_file_roots(
        &self,
        trust: &meshid_proto::verify::TrustSource,
        file: TrustBundle,
    ) -> Result<usize, String> {
        let _one = self.trust_update.lock().unwrap_or_else(|p| p.into_inner());
        let removed = self.removed_roots.lock().unwrap_or_else(|p| p.into_inner());
        let mut merged = trust.current().bundle.clone();
        let before = merged.roots.len();
        for root in file.roots {
            if !merged.roots.contains(&root) && !removed.contains(&cert_sha256(&root)) {
                merged.roots.push(root);
            }
        }
        let added = merged.roots.len() - before;
        if added > 0 {
            trust.update(merged).map_err(|e| e.to_string())?;
        }
        Ok(added)
    }

    fn set_directory(&self, dir: Directory) {
        let sequence = dir.sequence;
        self.directory.store(Some(Arc::new(dir)));
        self.directory_changed.send_replace(sequence);
    }
}

/// Follow `WatchBundle` and `WatchDirectory` until `shutdown`.
/// One gRPC connection to the CA for the sidecar's control traffic (both watch streams and
/// JWKS fetches, multiplexed on one HTTP/2 connection), presenting the sidecar's SVID: the CA
/// then holds one connection per sidecar for it, not three. Made on first use and again after
/// a failure.
pub struct ControlChannel {
    ca: CaClient,
    svid: Arc<meshid_proto::tls::CertSlot>,
    /// The client, and the thumbprint of the SVID its connection presented.
    client: tokio::sync::Mutex<Option<(String, PbClient<Channel>)>>,
}

impl ControlChannel {
    pub fn new(ca: CaClient, svid: Arc<meshid_proto::tls::CertSlot>) -> Arc<Self> {
        Arc::new(Self {
            ca,
            svid,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// A client on a connection that presented the SVID in use now: after a renewal the next
    /// call connects anew (the CA ends watch streams when the SVID they were opened with
    /// expires, and refuses new ones on a connection whose SVID has). Returns the SVID's
    /// thumbprint, for [`Self::reset`].
    pub async fn client(&self) -> Result<(PbClient<Channel>, String), String> {
        let x5t = self
            .svid
            .current()
            .cert
            .first()
            .map(|c| meshid_proto::token::x5t_s256(c))
            .unwrap_or_default();
        let mut client = self.client.lock().await;
        if let Some((bound, c)) = client.as_ref()
            && *bound == x5t
        {
            return Ok((c.clone(), x5t));
        }
        let c = self
            .ca
            .connect(Some(self.svid.clone()))
            .await
            .map_err(|e| e.to_string())?;
        *client = Some((x5t.clone(), c.clone()));
        Ok((c, x5t))
    }

    /// After a failure on the client for `x5t`: the next call connects anew. A newer client
    /// (made meanwhile by another stream) is kept; streams still open keep their connection.
    pub async fn reset(&self, x5t: &str) {
        let mut client = self.client.lock().await;
        if client.as_ref().is_some_and(|(bound, _)| bound == x5t) {
            *client = None;
        }
    }
}

pub fn follow(
    control: Arc<Control>,
    ca: CaClient,
    channel: Arc<ControlChannel>,
    bundle_file: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    // The client the bundle stream was opened on: acknowledgements go on the same connection,
    // which is how the CA tells which sidecar they come from.
    let stream_client: Arc<tokio::sync::Mutex<Option<PbClient<Channel>>>> = Arc::default();
    let breaks = control.clone();
    let open_bundle = {
        let (channel, stream_client) = (channel.clone(), stream_client.clone());
        move || {
            let (channel, stream_client) = (channel.clone(), stream_client.clone());
            async move {
                let (mut client, x5t) = channel.client().await?;
                match client.watch_bundle(pb::GetBundleRequest {}).await {
                    Ok(s) => {
                        *stream_client.lock().await = Some(client);
                        Ok(s.into_inner())
                    }
                    Err(e) => {
                        channel.reset(&x5t).await;
                        Err(e.to_string())
                    }
                }
            }
        }
    };
    let apply_bundle = {
        let (control, ca) = (control.clone(), ca.clone());
        move |b: pb::Bundle| {
            let (control, ca, bundle_file) = (control.clone(), ca.clone(), bundle_file.clone());
            let stream_client = stream_client.clone();
            async move {
                let bundle = TrustBundle::try_from(b).map_err(|e| e.to_string())?;
                control.apply_ca_bundle(&ca.trust(), bundle.clone())?;
                control.has_bundle.store(true, Ordering::Relaxed);
                // A reconnected stream starts with the bundle it had: only a change wakes
                // those who follow it (the renewal schedule, the JWKS).
                let changed = control.bundle.send_if_modified(|current| {
                    if current.as_deref() == Some(&bundle) {
                        return false;
                    }
                    *current = Some(Arc::new(bundle.clone()));
                    true
                });
                if changed {
                    info!(
                        sequence = bundle.sequence,
                        roots = bundle.roots.len(),
                        "trust bundle in force"
                    );
                }
                // Tell the CA: a rotation step that starts or stops using a root waits for
                // every connected sidecar to trust the new bundle.
                let client = stream_client.lock().await.clone();
                if let Some(mut client) = client {
                    let ack = pb::BundleAck {
                        sequence: bundle.sequence,
                        roots_sha256: bundle
                            .roots
                            .iter()
                            .map(|r| cert_sha256(r).to_vec())
                            .collect(),
                    };
                    // A few tries: a rotation step waits for this, then passes us over.
                    for attempt in 1..=3 {
                        match client.ack_bundle(ack.clone()).await {
                            Ok(_) => break,
                            Err(e) if attempt == 3 => {
                                warn!("acknowledging the trust bundle to the CA: {}", e.message())
                            }
                            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                        }
                    }
                }
                // The copy on disk is for the app and tooling; its fsync runs off the runtime
                // thread, which may be the only one carrying traffic.
                let pem = bundle.to_pem();
                let written = tokio::task::spawn_blocking(move || {
                    meshid_proto::atomic_file::write_atomic(&bundle_file, pem.as_bytes(), 0o644)
                        .map_err(|e| format!("writing {}: {e}", bundle_file.display()))
                })
                .await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!("{e}"),
                    Err(e) => warn!("writing the bundle: {e}"),
                }
                Ok(())
            }
        }
    };
    tokio::spawn(keep_following(
        "bundle",
        breaks.clone(),
        shutdown.clone(),
        open_bundle,
        apply_bundle,
    ));

    // The directory is for workloads of the mesh only: the stream presents this sidecar's SVID.
    let open_directory = move || {
        let channel = channel.clone();
        async move {
            let (mut client, x5t) = channel.client().await?;
            match client.watch_directory(pb::WatchDirectoryRequest {}).await {
                Ok(s) => Ok(s.into_inner()),
                Err(e) => {
                    channel.reset(&x5t).await;
                    Err(e.to_string())
                }
            }
        }
    };
    let apply_directory = move |d: pb::Directory| {
        let result = Directory::try_from(d)
            .map_err(|e| e.to_string())
            .map(|dir| {
                info!(
                    sequence = dir.sequence,
                    services = dir.services().len(),
                    "service directory updated"
                );
                control.set_directory(dir);
            });
        std::future::ready(result)
    };
    tokio::spawn(keep_following(
        "directory",
        breaks,
        shutdown,
        open_directory,
        apply_directory,
    ));
}

/// Follow the `--ca-bundle` file: roots that appear in it (the bundle ConfigMap the CA keeps
/// current in Kubernetes, or an operator's copy of `meshid ca bundle` after a root recovery)
/// are trusted at once beside the CA's bundle. That is the way back to a CA whose new root
/// this sidecar has never seen: it could not connect to learn it otherwise. The next bundle
/// from the CA replaces the union. A file that does not parse is refused with a log line and
/// changes nothing.
pub fn watch_bundle_file(
    path: std::path::PathBuf,
    control: Arc<Control>,
    ca: CaClient,
    shutdown: CancellationToken,
) {
    let Some(dir) = path.parent().map(|d| {
        if d.as_os_str().is_empty() {
            std::path::PathBuf::from(".")
        } else {
            d.to_path_buf()
        }
    }) else {
        return;
    };
    let mut changes = meshid_proto::dir_watch::DirWatch::new(&dir, "the --ca-bundle file");
    tokio::spawn(async move {
        let read = |path: std::path::PathBuf| async move {
            tokio::task::spawn_blocking(move || std::fs::read(&path))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        let mut seen = read(path.clone()).await.ok();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.changed() => {}
            }
            let now = read(path.clone()).await.ok();
            if now == seen {
                continue;
            }
            seen = now.clone();
            let Some(pem) = now else {
                continue; // gone for now (a symlink swap in progress): the trust stays
            };
            let td = ca.trust_domain().clone();
            match TrustBundle::from_pem(td, &pem) {
                Err(e) => warn!(
                    "{} changed but is refused, the trust in force stays: {e}",
                    path.display()
                ),
                Ok(file) => match control.add_file_roots(&ca.trust(), file) {
                    Ok(0) => {}
                    Ok(added) => info!(
                        added,
                        "{} brought new roots: trusted now beside the CA's bundle",
                        path.display()
                    ),
                    Err(e) => warn!("{} refused: {e}", path.display()),
                },
            }
        }
    });
}

/// Keep a server stream open: apply every message, and when the stream fails or ends,
/// reconnect with capped, jittered backoff (reset by every message), until `shutdown`.
async fn keep_following<T, Open, Opening, Apply, Applying>(
    what: &'static str,
    breaks: Arc<Control>,
    shutdown: CancellationToken,
    mut open: Open,
    mut apply: Apply,
) where
    Open: FnMut() -> Opening,
    Opening: std::future::Future<Output = Result<tonic::Streaming<T>, String>>,
    Apply: FnMut(T) -> Applying,
    Applying: std::future::Future<Output = Result<(), String>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let result = async {
            let mut stream = open().await?;
            while let Some(message) = stream.message().await.map_err(|e| e.to_string())? {
                apply(message).await?;
                backoff.reset();
            }
            Ok::<(), String>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = result => match r {
                Err(e) => {
                    breaks.stream_breaks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!("{what} stream: {e}; reconnecting")
                }
                // The CA ended the stream (it is stopping): reconnect, to another replica
                // when there is one.
                Ok(()) => {
                    breaks.stream_breaks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    info!("{what} stream ended by the CA; reconnecting")
                }
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// The CA's JWKS over gRPC (on the control channel), for the inbound token verifier.
pub struct CaJwks(pub Arc<ControlChannel>);

/// The CA's JWT bundle over gRPC (the JWT-SVID keys), for the Workload API.
pub struct CaJwtBundle(pub Arc<ControlChannel>);

type JwksFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<jsonwebtoken::jwk::JwkSet, String>> + Send + 'a>,
>;

/// One JWKS-shaped answer of the CA: `GetJwks` or `GetJwtBundle`.
fn fetch_jwks(channel: &ControlChannel, jwt_bundle: bool) -> JwksFuture<'_> {
    Box::pin(async move {
        let (mut client, x5t) = channel.client().await?;
        let answer = if jwt_bundle {
            client.get_jwt_bundle(pb::GetJwksRequest {}).await
        } else {
            client.get_jwks(pb::GetJwksRequest {}).await
        };
        let json = match answer {
            Ok(r) => r.into_inner().json,
            Err(e) => {
                channel.reset(&x5t).await;
                return Err(e.to_string());
            }
        };
        serde_json::from_str(&json).map_err(|e| e.to_string())
    })
}

impl JwksSource for CaJwks {
    fn fetch(&self) -> JwksFuture<'_> {
        fetch_jwks(&self.0, false)
    }
}

impl JwksSource for CaJwtBundle {
    fn fetch(&self) -> JwksFuture<'_> {
        fetch_jwks(&self.0, true)
    }
}
