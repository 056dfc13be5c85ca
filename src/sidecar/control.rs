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
    let open_bundle = {
        let ca = ca.clone();
        move || {
            let ca = ca.clone();
            async move {
                let mut client = ca.connect(None).await.map_err(|e| e.to_string())?;
                let stream = client.watch_bundle(pb::GetBundleRequest {}).await;
                stream.map(|s| s.into_inner()).map_err(|e| e.to_string())
            }
        }
    };
    let apply_bundle = {
        let (control, ca) = (control.clone(), ca.clone());
        move |b: pb::Bundle| {
            let bundle = TrustBundle::try_from(b).map_err(|e| e.to_string())?;
            ca.trust()
                .update(bundle.clone())
                .map_err(|e| e.to_string())?;
            let pem = bundle.to_pem();
            if let Err(e) =
                meshid_proto::atomic_file::write_atomic(&bundle_file, pem.as_bytes(), 0o644)
            {
                warn!("writing {}: {e}", bundle_file.display());
            }
            control.has_bundle.store(true, Ordering::Relaxed);
            Ok(())
        }
    };
    tokio::spawn(keep_following(
        "bundle",
        shutdown.clone(),
        open_bundle,
        apply_bundle,
    ));

    let open_directory = move || {
        let ca = ca.clone();
        async move {
            let mut client = ca.connect(None).await.map_err(|e| e.to_string())?;
            let stream = client.watch_directory(pb::WatchDirectoryRequest {}).await;
            stream.map(|s| s.into_inner()).map_err(|e| e.to_string())
        }
    };
    let apply_directory = move |d: pb::Directory| {
        let dir = Directory::try_from(d).map_err(|e| e.to_string())?;
        info!(
            sequence = dir.sequence,
            services = dir.services().len(),
            "service directory updated"
        );
        control.directory.store(Some(Arc::new(dir)));
        Ok(())
    };
    tokio::spawn(keep_following(
        "directory",
        shutdown,
        open_directory,
        apply_directory,
    ));
}

/// Keep a server stream open: apply every message, and when the stream fails or ends,
/// reconnect with capped, jittered backoff (reset by every message), until `shutdown`.
async fn keep_following<T, Open, Opening>(
    what: &'static str,
    shutdown: CancellationToken,
    mut open: Open,
    mut apply: impl FnMut(T) -> Result<(), String>,
) where
    Open: FnMut() -> Opening,
    Opening: std::future::Future<Output = Result<tonic::Streaming<T>, String>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = async {
            let mut stream = open().await?;
            while let Some(message) = stream.message().await.map_err(|e| e.to_string())? {
                apply(message)?;
                backoff = Duration::from_millis(200);
            }
            Ok::<(), String>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = result => if let Err(e) = r { warn!("{what} stream: {e}; reconnecting") },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jitter(backoff)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
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
