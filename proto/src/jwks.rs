//! The issuer's signing keys as a verifier holds them: one cache of the CA's JWKS that the
//! access-token verifier (the callee's sidecar) and the Workload API (JWT bundles, JWT-SVID
//! validation) share, so a sidecar fetches the JWKS once for both.
//!
//! The keys are fetched on first use, again (rate-limited) when an unknown `kid` shows up, and
//! at once when the CA announces a different key set with its bundle; the last good copy is
//! kept when a fetch fails. One fetch at a time: lookups that meet an unknown `kid` while a
//! fetch is in flight wait for it and look again, rather than each fetching or failing.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{Jwk, JwkSet};

/// At most this many keys are kept from one JWKS.
pub const MAX_KEYS: usize = 16;
/// Callers that meet an unknown `kid` wait for the JWKS fetch; a CA that does not answer must
/// not hold their requests longer than this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<JwkSet, String>> + Send + 'a>>;

/// Where the keys come from (the CA over gRPC in a sidecar, a fixed set in tests).
pub trait JwksSource: Send + Sync + 'static {
    fn fetch(&self) -> FetchFuture<'_>;
}

/// A fixed key set.
pub struct StaticJwks(pub JwkSet);

impl JwksSource for StaticJwks {
    fn fetch(&self) -> FetchFuture<'_> {
        let keys = self.0.clone();
        Box::pin(async move { Ok(keys) })
    }
}

/// Why the JWKS could not be (re)loaded. The cache keeps the keys it had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("fetching the issuer's JWKS failed: {0}")]
    Fetch(String),
    #[error("the issuer's JWKS did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("the issuer's JWKS holds no key with a kid")]
    NoKeys,
}

/// The issuer's keys, as last fetched.
pub struct JwksCache {
    source: Arc<dyn JwksSource>,
    keys: ArcSwap<JwkSet>,
    /// Held for the whole of a fetch, so there is one fetch at a time and every caller that
    /// needs fresh keys waits for it. Inside: when the last fetch (success or failure) ended.
    fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches ended so far (success or failure), bumped after `keys` is stored: a caller that
    /// read it before looking at `keys` can tell, once it holds `fetch`, whether a fetch ended
    /// in between, and then look again instead of fetching again.
    fetches: AtomicU64,
    /// Ticks whenever the key set held changes (the Workload API streams JWT bundles on it).
    changed: tokio::sync::watch::Sender<u64>,
    refetch_after: Duration,
    fetch_timeout: Duration,
}

impl JwksCache {
    /// Empty until the first fetch.
    pub fn new(source: Arc<dyn JwksSource>) -> Self {
        Self {
            source,
            keys: ArcSwap::from_pointee(JwkSet { keys: Vec::new() }),
            fetch: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            changed: tokio::sync::watch::channel(0).0,
            refetch_after: Duration::from_secs(10),
            fetch_timeout: FETCH_TIMEOUT,
        }
    }

    /// Minimum time between two fetches triggered by unknown `kid`s.
    pub fn refetch_after(mut self, d: Duration) -> Self {
        self.refetch_after = d;
        self
    }

    /// Longest wait for one fetch (default 5 s); a fetch that takes longer has failed.
    pub fn fetch_timeout(mut self, d: Duration) -> Self {
        self.fetch_timeout = d;
        self
    }

    /// Fetch now, whatever the refetch interval, waiting for a fetch already in flight first.
    /// A failed fetch keeps the keys we have.
    pub async fn prime(&self) -> Result<(), JwksError> {
        let mut last = self.fetch.lock().await;
        self.fetch_locked(&mut last).await
    }

    /// Whether at least one key is held.
    pub fn has_keys(&self) -> bool {
        !self.keys.load().keys.is_empty()
    }

    /// The keys held now.
    pub fn keys(&self) -> Arc<JwkSet> {
        self.keys.load_full()
    }

    /// Ticks whenever the keys held change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The `kid`s of the keys held now.
    pub fn kids(&self) -> BTreeSet<String> {
        self.keys
            .load()
            .keys
            .iter()
            .filter_map(|k| k.common.key_id.clone())
            .collect()
    }

    /// Follow the key set the issuer announces (the CA sends its `kid`s with every trust
    /// bundle): when the keys held differ from `announced`, fetch now, whatever the refetch
    /// interval, so a new key is known before the first token signed with it arrives and a
    /// retired key stops being accepted. Returns whether it fetched.
    pub async fn follow_kids(&self, announced: &[String]) -> Result<bool, JwksError> {
        let announced: BTreeSet<String> = announced.iter().cloned().collect();
        if announced.is_empty() || self.kids() == announced {
            return Ok(false);
        }
        let mut last = self.fetch.lock().await;
        if self.kids() == announced {
            return Ok(false); // a fetch that ended while we waited brought them
        }
        self.fetch_locked(&mut last).await?;
        Ok(true)
    }

    /// The key named `kid`: from the cache, else after a fetch. Every caller that misses while
    /// a fetch is in flight waits for that one fetch and looks again; a new fetch starts only
    /// if none ended since this caller looked and the last one ended at least `refetch_after`
    /// ago (an unknown `kid` is cheap for an attacker to send). The wait is bounded by
    /// `fetch_timeout` per fetch ahead in the queue.
    pub async fn key(&self, kid: &str) -> Option<Jwk> {
        // Read the count before the keys: a fetch that stores new keys after this read is seen
        // below as a changed count.
        let seen = self.fetches.load(Ordering::Acquire);
        if let Some(jwk) = self.keys.load().find(kid) {
            return Some(jwk.clone());
        }
        let mut last = self.fetch.lock().await;
        let fetched_meanwhile = self.fetches.load(Ordering::Acquire) != seen;
        let fetched_recently = last.is_some_and(|t| t.elapsed() < self.refetch_after);
        if !fetched_meanwhile && !fetched_recently {
            // The failure is logged inside; the caller sees the kid as unknown.
            let _ = self.fetch_locked(&mut last).await;
        }
        drop(last);
        self.keys.load().find(kid).cloned()
    }

    /// One fetch, with `fetch` held (`last` is its contents). Keys without a `kid` can never be
    /// chosen and are dropped; at most [`MAX_KEYS`] are kept. A failed, empty or late
    /// (`fetch_timeout`) fetch keeps the last good keys. If this future is dropped mid-fetch,
    /// nothing is recorded, so the next caller fetches instead of being rate-limited by a fetch
    /// that never ended.
    async fn fetch_locked(&self, last: &mut Option<Instant>) -> Result<(), JwksError> {
        let fetched = tokio::time::timeout(self.fetch_timeout, self.source.fetch()).await;
        *last = Some(Instant::now());
        let outcome = match fetched {
            Err(_elapsed) => Err(JwksError::Timeout(self.fetch_timeout)),
            Ok(Err(e)) => Err(JwksError::Fetch(e)),
            Ok(Ok(mut set)) => {
                set.keys.retain(|k| k.common.key_id.is_some());
                if set.keys.len() > MAX_KEYS {
                    tracing::warn!(
                        "the JWKS holds {} keys; keeping the first {MAX_KEYS}",
                        set.keys.len()
                    );
                    set.keys.truncate(MAX_KEYS);
                }
                if set.keys.is_empty() {
                    Err(JwksError::NoKeys)
                } else {
                    let changed = *self.keys.load_full() != set;
                    self.keys.store(Arc::new(set));
                    if changed {
                        self.changed.send_modify(|n| *n += 1);
                    }
                    Ok(())
                }
            }
        };
        if let Err(e) = &outcome {
            tracing::warn!("{e}; keeping the last good keys");
        }
        self.fetches.fetch_add(1, Ordering::Release);
        outcome
    }
}
