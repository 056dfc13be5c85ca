//! What the sidecar learns from the CA besides its SVID, over gRPC watch streams that
//! reconnect with backoff: the trust bundle (several roots during a rotation) and the service
//! directory (names, SPIFFE IDs, route rules, allowed callers). Also the JWKS source for the
//! inbound token verifier.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meshid_proto::TrustBundle;
use meshid_proto::directory::Directory;
use meshid_proto::pb;
use meshid_proto::token::JwksSource;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::identity::client::{CaClient, jitter};

/// The latest directory, if one arrived yet.
#[derive(Default)]
pub struct Control {
    pub directory: ArcSwapOption<Directory>,
    pub has_bundle: AtomicBool,
}

/// Follow `WatchBundle` and `WatchDirectory` until `shutdown`.
pub fn follow(
    control: Arc<Control>,
    ca: CaClient,
    bundle_file: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    {
        let (control, ca, shutdown) = (control.clone(), ca.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let result = async {
                    let mut stream = ca
                        .connect(None)
                        .await
                        .map_err(|e| e.to_string())?
                        .watch_bundle(pb::GetBundleRequest {})
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    while let Some(b) = stream.message().await.map_err(|e| e.to_string())? {
                        let bundle = TrustBundle::try_from(b).map_err(|e| e.to_string())?;
                        ca.trust()
                            .update(bundle.clone())
                            .map_err(|e| e.to_string())?;
                        if let Err(e) = meshid_proto::atomic_file::write_atomic(
                            &bundle_file,
                            bundle.to_pem().as_bytes(),
                            0o644,
                        ) {
                            warn!("writing {}: {e}", bundle_file.display());
                        }
                        control.has_bundle.store(true, Ordering::Relaxed);
                        backoff = Duration::from_millis(200);
                    }
                    Ok::<(), String>(())
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = result => if let Err(e) = r { warn!("bundle stream: {e}; reconnecting") },
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        });
    }
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            let result = async {
                let mut stream = ca
                    .connect(None)
                    .await
                    .map_err(|e| e.to_string())?
                    .watch_directory(pb::WatchDirectoryRequest {})
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                while let Some(d) = stream.message().await.map_err(|e| e.to_string())? {
                    let dir = Directory::try_from(d).map_err(|e| e.to_string())?;
                    info!(
                        sequence = dir.sequence,
                        services = dir.services.len(),
                        "service directory updated"
                    );
                    control.directory.store(Some(Arc::new(dir)));
                    backoff = Duration::from_millis(200);
                }
                Ok::<(), String>(())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = result => if let Err(e) = r { warn!("directory stream: {e}; reconnecting") },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    });
}

/// The CA's JWKS over gRPC, for the inbound token verifier.
pub struct CaJwks(pub CaClient);

impl JwksSource for CaJwks {
    fn fetch(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<jsonwebtoken::jwk::JwkSet, String>> + Send + '_,
        >,
    > {
        Box::pin(async move {
            let json = self
                .0
                .connect(None)
                .await
                .map_err(|e| e.to_string())?
                .get_jwks(pb::GetJwksRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .json;
            serde_json::from_str(&json).map_err(|e| e.to_string())
        })
    }
}
