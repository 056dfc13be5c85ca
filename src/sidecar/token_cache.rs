//! Outbound tokens: one per callee service, minted by the CA over mutual TLS with the current
//! SVID (so it is bound to it), cached, and replaced before it expires or when the SVID
//! changes (a token bound to the old certificate would be refused).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::HeaderValue;
use meshid_proto::pb::{self, ca_client::CaClient as PbClient};
use meshid_proto::tls::CertSlot;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use super::identity::Current;
use super::metrics::Metrics;
use crate::identity::client::CaClient;

/// Refresh a token this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(30);

struct Cached {
    /// `Bearer <token>`, ready to insert (a cheap clone), marked sensitive so HTTP/2 never
    /// indexes it and `Debug` never shows it.
    header: HeaderValue,
    x5t: String,
    refresh_at: Instant,
}

pub struct TokenCache {
    ca: CaClient,
    metrics: Arc<Metrics>,
    tokens: std::sync::Mutex<HashMap<String, Arc<Cached>>>,
    /// One gRPC channel to the CA per certificate (the token binds the TLS client certificate).
    channel: Mutex<Option<(String, PbClient<Channel>)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFetchError {
    #[error("the CA refuses a token for {service}: {message}")]
    Refused { service: String, message: String },
    #[error("CA unreachable: {0}")]
    Unavailable(String),
}

impl TokenCache {
    pub fn new(ca: CaClient, metrics: Arc<Metrics>) -> Self {
        Self {
            ca,
            metrics,
            tokens: std::sync::Mutex::new(HashMap::new()),
            channel: Mutex::new(None),
        }
    }

    /// The cached token for `service`, if it is bound to `x5t` and not due for refresh.
    fn cached(&self, service: &str, x5t: &str) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(service)
            .filter(|c| c.x5t == x5t && Instant::now() < c.refresh_at)
            .map(|c| c.header.clone())
    }

    /// A token for calling `service` over a connection that presents `identity`, from the
    /// cache when still good.
    pub async fn get(
        &self,
        service: &str,
        identity: &Current,
    ) -> Result<HeaderValue, TokenFetchError> {
        let x5t = identity.x5t.as_str();
        if let Some(header) = self.cached(service, x5t) {
            self.metrics
                .token_cache_hits
                .fetch_add(1, Ordering::Relaxed);
            return Ok(header);
        }
        self.metrics
            .token_cache_misses
            .fetch_add(1, Ordering::Relaxed);
        let mut channel = self.channel.lock().await;
        // Another caller may have fetched it while we waited for the lock.
        if let Some(header) = self.cached(service, x5t) {
            return Ok(header);
        }
        if channel.as_ref().is_none_or(|(bound, _)| *bound != x5t) {
            let client = self
                .ca
                .connect(Some(CertSlot::new(identity.key.clone())))
                .await
                .map_err(|e| TokenFetchError::Unavailable(e.to_string()))?;
            *channel = Some((x5t.to_owned(), client));
        }
        let (_, client) = channel.as_mut().expect("set above");
        let started = Instant::now();
        let answer = client
            .issue_token(pb::IssueTokenRequest {
                scope: String::new(),
                audience: service.to_owned(),
            })
            .await;
        let t = match answer {
            Ok(r) => r.into_inner(),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
                ) =>
            {
                *channel = None;
                return Err(TokenFetchError::Unavailable(s.message().to_owned()));
            }
            Err(s) => {
                return Err(TokenFetchError::Refused {
                    service: service.to_owned(),
                    message: s.message().to_owned(),
                });
            }
        };
        let life = Duration::from_secs(t.expires_in.max(0) as u64);
        let refresh_at = started + life.saturating_sub(REFRESH_MARGIN.min(life / 2));
        let mut header =
            HeaderValue::from_str(&format!("Bearer {}", t.access_token)).map_err(|_| {
                TokenFetchError::Refused {
                    service: service.to_owned(),
                    message: "the CA's token is not a valid header value".into(),
                }
            })?;
        header.set_sensitive(true);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                service.to_owned(),
                Arc::new(Cached {
                    header: header.clone(),
                    x5t: x5t.to_owned(),
                    refresh_at,
                }),
            );
        Ok(header)
    }
}
