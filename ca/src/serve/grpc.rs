//! The gRPC front end: decodes requests, hands them to [`CaCore`], and maps its errors to gRPC
//! status codes — here and nowhere else. Messages say what was wrong; internal details stay in
//! the CA's log.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use meshid_proto::Secret;
use meshid_proto::pb::{self, attestation::Kind};
use meshid_proto::serve::ConnInfo;
use rustls_pki_types::CertificateDer;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::error;

use crate::attest::AttestError;
use crate::ca::{CaCore, CaError, Proof, TokenParams};
use crate::grant::GrantError;
use crate::issue::{IssueError, IssuedSvid};

pub struct GrpcCa {
    core: Arc<CaCore>,
    /// Ends the watch streams when the CA stops, so sidecars reconnect instead of holding
    /// the process open.
    shutdown: CancellationToken,
}

/// The caller's address and verified certificate chain, from the connection it came on.
fn caller<T>(
    request: &Request<T>,
) -> (
    Option<SocketAddr>,
    Option<Arc<Vec<CertificateDer<'static>>>>,
) {
    match request.extensions().get::<ConnInfo>() {
        Some(c) => (Some(c.peer), c.peer_chain.clone()),
        None => (None, None),
    }
}

impl GrpcCa {
    pub fn new(core: Arc<CaCore>, shutdown: CancellationToken) -> Self {
        Self { core, shutdown }
    }

    fn watch_until<T>(
        &self,
        request: &Request<T>,
        what: &str,
    ) -> Result<impl std::future::Future<Output = ()> + Send + 'static, Status> {
        // A revoked workload follows nothing (nor counts as a sidecar a rotation waits for).
        let (_, chain) = caller(request);
        if let Some(info) = chain
            .as_deref()
            .and_then(|c| c.first())
            .and_then(|leaf| meshid_proto::svid::inspect(leaf).ok())
            && let Some(why) = self.core.revoked(&info.spiffe_id, Some(&info.serial))
        {
            return Err(Status::permission_denied(format!(
                "{what}: {} is refused: {why}",
                info.spiffe_id
            )));
        }
        watch_until(request, what, self.shutdown.clone())
    }
}

/// For a watch stream: the caller must present an SVID, and the stream lasts while that SVID
/// is valid (a connection outlives its certificate; the stream must not), or until the CA
/// stops. A sidecar then reconnects with its renewed SVID.
fn watch_until<T>(
    request: &Request<T>,
    what: &str,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, Status> {
    {
        let (_, chain) = caller(request);
        let Some(leaf) = chain.as_deref().and_then(|c| c.first()) else {
            return Err(Status::unauthenticated(format!(
                "{what} needs an SVID of this trust domain as TLS client certificate"
            )));
        };
        let info = meshid_proto::svid::inspect(leaf).map_err(|e| {
            Status::unauthenticated(format!(
                "{what}: the client certificate is not an SVID: {e}"
            ))
        })?;
        let left = info
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        if left.is_zero() {
            return Err(Status::unauthenticated(format!(
                "the SVID this connection presented has expired; reconnect with the current one for {what}"
            )));
        }
        Ok(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(left) => {}
            }
        })
    }
}

impl GrpcCa {
    fn response(&self, svid: IssuedSvid) -> Response<pb::SvidResponse> {
        Response::new(pb::SvidResponse {
            spiffe_id: svid.spiffe_id.to_string(),
            cert_chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
            expires_at: meshid_proto::clock::unix_seconds(svid.not_after),
            bundle: Some((&self.core.bundle()).into()),
        })
    }
}

/// The one mapping from CA errors to gRPC codes.
pub fn status(err: CaError) -> Status {
    match err {
        CaError::Attest(AttestError::Missing) => Status::invalid_argument(err.to_string()),
        CaError::Attest(AttestError::K8sDisabled) => Status::failed_precondition(err.to_string()),
        CaError::Attest(AttestError::K8sUnavailable(_)) => {
            error!("{err}");
            Status::unavailable("Kubernetes API unavailable; retry later")
        }
        // The cluster store away (the API server restarting): another try will do.
        CaError::Attest(AttestError::Store(crate::store::StoreError::Api { .. })) => {
            error!("{err}");
            Status::unavailable("the CA's store (the Kubernetes API) is unreachable; retry later")
        }
        CaError::Attest(AttestError::Store(_) | AttestError::JoinTokenCorrupt) => {
            error!("{err}");
            Status::internal("CA storage error; see the CA log")
        }
        CaError::Attest(_) | CaError::Unauthenticated(_) => {
            Status::unauthenticated(err.to_string())
        }
        CaError::PermissionDenied(_) => Status::permission_denied(err.to_string()),
        CaError::Issue(
            IssueError::CsrMissing
            | IssueError::CsrTooLarge { .. }
            | IssueError::CsrMalformed
            | IssueError::CsrSignature
            | IssueError::UnsupportedKey(_),
        ) => Status::invalid_argument(err.to_string()),
        CaError::Issue(_) | CaError::Internal(_) => {
            error!("{err}");
            Status::internal("CA could not sign; see the CA log")
        }
    }
}

/// Grant errors as gRPC codes; the RFC 6749 code leads the message.
pub fn grant_status(err: GrantError) -> Status {
    let msg = format!("{}: {err}", err.code());
    match err {
        GrantError::InvalidRequest(_) | GrantError::UnsupportedGrantType(_) => {
            Status::invalid_argument(msg)
        }
        GrantError::InvalidClient(_) => Status::unauthenticated(msg),
        GrantError::UnauthorizedClient(_) | GrantError::InvalidScope(_) => {
            Status::permission_denied(msg)
        }
        GrantError::RateLimited { .. } => Status::resource_exhausted(msg),
        GrantError::UnsupportedAlgorithm(_) => Status::failed_precondition(msg),
        GrantError::Internal(_) => {
            error!("{err}");
            Status::internal("CA could not mint a token; see the CA log")
        }
    }
}

type DirectoryStream = Pin<Box<dyn Stream<Item = Result<pb::Directory, Status>> + Send>>;

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::Bundle, Status>> + Send>>;

#[tonic::async_trait]
impl pb::ca_server::Ca for GrpcCa {
    async fn issue_svid(
        &self,
        request: Request<pb::IssueSvidRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        let (peer, _) = caller(&request);
        let req = request.into_inner();
        let proof = req.attestation.and_then(|a| a.kind).map(|k| match k {
            Kind::JoinToken(t) => Proof::JoinToken(Secret::new(t)),
            Kind::K8sServiceAccountToken(t) => Proof::K8sToken(Secret::new(t)),
        });
        let svid = self
            .core
            .issue(proof, &req.csr, peer)
            .await
            .map_err(status)?;
        Ok(self.response(svid))
    }

    async fn renew_svid(
        &self,
        request: Request<pb::RenewSvidRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        let (peer, chain) = caller(&request);
        let req = request.into_inner();
        let svid = self
            .core
            .renew(chain.as_deref().map(|c| c.as_slice()), &req.csr, peer)
            .await
            .map_err(status)?;
        Ok(self.response(svid))
    }

    async fn get_bundle(
        &self,
        _: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        Ok(Response::new((&self.core.bundle()).into()))
    }

    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let (peer, chain) = caller(&request);
        let req = request.into_inner();
        let params = TokenParams {
            grant_type: None,
            client_id: None,
            scope: Some(req.scope.as_str()),
            audience: Some(req.audience.as_str()),
        };
        let t = self
            .core
            .grant(chain.as_deref().map(|c| c.as_slice()), params, peer)
            .await
            .map_err(grant_status)?;
        Ok(Response::new(pb::IssueTokenResponse {
            access_token: t.access_token.expose().to_owned(),
            token_type: "Bearer".into(),
            expires_in: t.expires_in,
            scope: t.scope,
        }))
    }

    async fn get_jwks(&self, _: Request<pb::GetJwksRequest>) -> Result<Response<pb::Jwks>, Status> {
        Ok(Response::new(pb::Jwks {
            json: self.core.jwks().to_string(),
        }))
    }

    async fn get_jwt_bundle(
        &self,
        _: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::Jwks>, Status> {
        Ok(Response::new(pb::Jwks {
            json: self.core.jwt_bundle().to_string(),
        }))
    }

    type WatchDirectoryStream = DirectoryStream;

    async fn watch_directory(
        &self,
        request: Request<pb::WatchDirectoryRequest>,
    ) -> Result<Response<DirectoryStream>, Status> {
        // The directory names every service, SPIFFE ID, route and grant: only workloads of
        // the mesh (an SVID, verified by the TLS layer against the bundle) may read it.
        let until = self.watch_until(&request, "WatchDirectory")?;
        let stream = WatchStream::new(self.core.watch_directory())
            .map(|d| Ok(pb::Directory::from(d.as_ref())))
            .take_until(until);
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchBundleStream = BundleStream;

    async fn watch_bundle(
        &self,
        request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        // A stream holds a connection open for good: only workloads of the mesh may hold one
        // (the bundle itself is public: `GetBundle` answers anyone).
        let until = self.watch_until(&request, "WatchBundle (GetBundle needs none)")?;
        // The sidecar counts as connected (a rotation step waits for its acknowledgement)
        // for as long as this stream lives.
        let (peer, chain) = caller(&request);
        let guard = match (peer, chain.as_deref().and_then(|c| c.first())) {
            (Some(peer), Some(leaf)) => meshid_proto::svid::spiffe_id_of(leaf)
                .ok()
                .map(|id| self.core.watch_sidecar(peer, id.to_string())),
            _ => None,
        };
        let stream = WatchStream::new(self.core.watch_bundle())
            .map(move |b| {
                let _connected = &guard;
                Ok(pb::Bundle::from(&b))
            })
            .take_until(until);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn issue_jwt_svid(
        &self,
        request: Request<pb::IssueJwtSvidRequest>,
    ) -> Result<Response<pb::JwtSvidResponse>, Status> {
        let (peer, chain) = caller(&request);
        let req = request.into_inner();
        let (spiffe_id, token, expires_at) = self
            .core
            .issue_jwt_svid(chain.as_deref().map(|c| c.as_slice()), &req.audience, peer)
            .await
            .map_err(grant_status)?;
        Ok(Response::new(pb::JwtSvidResponse {
            spiffe_id: spiffe_id.to_string(),
            token: token.expose().to_owned(),
            expires_at,
        }))
    }

    async fn ack_bundle(
        &self,
        request: Request<pb::BundleAck>,
    ) -> Result<Response<pb::BundleAckResponse>, Status> {
        let (peer, chain) = caller(&request);
        let (Some(peer), Some(_)) = (peer, chain.as_deref().and_then(|c| c.first())) else {
            return Err(Status::unauthenticated(
                "AckBundle needs the SVID of the sidecar that watches the bundle",
            ));
        };
        let ack = request.into_inner();
        if ack.roots_sha256.len() > 64 {
            return Err(Status::invalid_argument("at most 64 roots"));
        }
        let roots = ack
            .roots_sha256
            .iter()
            .map(|h| {
                <[u8; 32]>::try_from(h.as_slice()).map_err(|_| {
                    Status::invalid_argument("roots_sha256 holds SHA-256 digests (32 bytes)")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.core.ack_bundle(peer, roots);
        Ok(Response::new(pb::BundleAckResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant, SystemTime};

    fn request_with_leaf(not_after: SystemTime) -> Request<()> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/orders"
                .try_into()
                .unwrap(),
        )];
        params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key).unwrap();
        let mut r = Request::new(());
        r.extensions_mut().insert(ConnInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            original_dst: None,
            peer_chain: Some(Arc::new(vec![cert.der().clone()])),
            alpn: None,
            peer_cred: None,
        });
        r
    }

    #[tokio::test]
    async fn a_watch_stream_ends_when_the_callers_svid_does() {
        let r = request_with_leaf(SystemTime::now() + Duration::from_secs(2));
        let started = Instant::now();
        let until = watch_until(&r, "WatchDirectory", CancellationToken::new())
            .unwrap_or_else(|s| panic!("{s:?}"));
        until.await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn an_expired_svid_or_none_opens_no_watch_stream() {
        let r = request_with_leaf(SystemTime::now() - Duration::from_secs(1));
        let e = watch_until(&r, "WatchDirectory", CancellationToken::new())
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("has expired"), "{}", e.message());
        let e = watch_until(&Request::new(()), "WatchBundle", CancellationToken::new())
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("WatchBundle needs an SVID"),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn a_watch_stream_ends_when_the_ca_stops() {
        let r = request_with_leaf(SystemTime::now() + Duration::from_secs(3600));
        let stop = CancellationToken::new();
        let until =
            watch_until(&r, "WatchDirectory", stop.clone()).unwrap_or_else(|s| panic!("{s:?}"));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), until)
            .await
            .unwrap();
    }
}
